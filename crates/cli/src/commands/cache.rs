//! `waystone cache list|prune`: the module cache `waystone up` fills under `<data-dir>/cache`:
//! fetched modules (`waystone-fetch`) and the modules compiled from them (`waystone-wasm`,
//! under `cache/compiled`).

use std::path::Path;
use std::time::SystemTime;

use waystone_control::paths::{cache_dir, compiled_cache_dir};
use waystone_fetch::{CacheEntry, DockerConfig, FetchConfig, Fetcher};
use waystone_wasm::{CompiledCache, CompiledEntry};

use crate::args::CachePruneArgs;
use crate::table::{KUBECTL, Table, human_duration};
use crate::{CliError, CliResult};

/// None when nothing was ever cached there: listing must not create the directory.
fn open(data_dir: &Path) -> CliResult<Option<Fetcher>> {
    let dir = cache_dir(data_dir);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut cfg = FetchConfig::new(dir);
    // Listing and pruning never talk to a registry.
    cfg.docker_config = DockerConfig::Disabled;
    Fetcher::new(cfg)
        .map(Some)
        .map_err(|e| CliError::Failed(e.to_string()))
}

fn open_compiled(data_dir: &Path) -> CliResult<Option<CompiledCache>> {
    CompiledCache::open_existing(&compiled_cache_dir(data_dir))
        .map_err(|e| CliError::Failed(e.to_string()))
}

/// One line of the listing: a fetched module or a compiled one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Row {
    Module(CacheEntry),
    Compiled(CompiledEntry),
}

impl Row {
    fn digest(&self) -> &str {
        match self {
            Row::Module(e) => &e.digest,
            Row::Compiled(e) => &e.module_digest,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Row::Module(e) => e.size,
            Row::Compiled(e) => e.size,
        }
    }
}

fn rows(
    data_dir: &Path,
    modules: impl FnOnce(&Fetcher) -> Result<Vec<CacheEntry>, waystone_fetch::FetchError>,
    compiled: impl FnOnce(
        &CompiledCache,
    ) -> Result<Vec<CompiledEntry>, waystone_wasm::CompiledCacheError>,
) -> CliResult<Vec<Row>> {
    let failed = |e: &dyn std::fmt::Display| CliError::Failed(e.to_string());
    let mut out = Vec::new();
    if let Some(f) = open(data_dir)? {
        out.extend(
            modules(&f)
                .map_err(|e| failed(&e))?
                .into_iter()
                .map(Row::Module),
        );
    }
    if let Some(c) = open_compiled(data_dir)? {
        out.extend(
            compiled(&c)
                .map_err(|e| failed(&e))?
                .into_iter()
                .map(Row::Compiled),
        );
    }
    Ok(out)
}

pub(crate) fn list(data_dir: &Path) -> CliResult {
    let rows = rows(data_dir, |f| f.cache_entries(), |c| c.entries())?;
    if rows.is_empty() {
        // kubectl's wording for an empty listing, on stderr as kubectl prints it.
        eprintln!("No modules found in {}.", cache_dir(data_dir).display());
        return Ok(());
    }
    print!("{}", render_list(&rows, SystemTime::now()));
    Ok(())
}

pub(crate) fn prune(data_dir: &Path, args: CachePruneArgs) -> CliResult {
    let removed = rows(
        data_dir,
        |f| f.prune_cache(args.unused_for),
        |c| c.prune(args.unused_for),
    )?;
    print!("{}", render_pruned(&removed));
    Ok(())
}

fn render_list(rows: &[Row], now: SystemTime) -> String {
    let mut table = Table::new(["KIND", "DIGEST", "SIZE", "LAST USED", "SOURCES"]);
    for row in rows {
        let (kind, last_used, sources) = match row {
            Row::Module(e) => (
                "module",
                e.last_used,
                if e.keys.is_empty() {
                    "<none>".to_string()
                } else {
                    e.keys.join(",")
                },
            ),
            Row::Compiled(e) => ("compiled", e.last_used, format!("engine {}", e.engine_key)),
        };
        // A last use in the future (clock moved back) shows as now, as kubectl's AGE does.
        let since = now
            .duration_since(last_used)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        table.rows.push(vec![
            kind.to_string(),
            row.digest().to_string(),
            row.size().to_string(),
            format!("{} ago", human_duration(since)),
            sources,
        ]);
    }
    table.render(KUBECTL)
}

fn render_pruned(removed: &[Row]) -> String {
    let mut out = String::new();
    for row in removed {
        let what = match row {
            Row::Module(_) => "",
            Row::Compiled(_) => "compiled ",
        };
        out.push_str(&format!(
            "removed {what}{} ({} bytes)\n",
            row.digest(),
            row.size()
        ));
    }
    let total: u64 = removed.iter().map(Row::size).sum();
    let noun = if removed.len() == 1 {
        "entry"
    } else {
        "entries"
    };
    out.push_str(&format!(
        "total: {} {noun} removed, {total} bytes freed\n",
        removed.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(hex: char, size: u64, last_used: SystemTime, keys: &[&str]) -> Row {
        Row::Module(CacheEntry {
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            size,
            last_used,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        })
    }

    fn compiled(hex: char, size: u64, last_used: SystemTime) -> Row {
        Row::Compiled(CompiledEntry {
            module_digest: format!("sha256:{}", hex.to_string().repeat(64)),
            engine_key: "0123456789abcdef".into(),
            size,
            last_used,
            path: "/x".into(),
        })
    }

    #[test]
    fn list_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let rows = [
            entry(
                'a',
                1234,
                now - Duration::from_secs(300),
                &["oci://r:5000/f:v1", "oci://r:5000/f@sha256:bb"],
            ),
            entry('c', 9, now - Duration::from_secs(3 * 86400), &[]),
            compiled('a', 55555, now - Duration::from_secs(60)),
        ];
        let a = "a".repeat(64);
        let c = "c".repeat(64);
        assert_eq!(
            render_list(&rows, now),
            format!(
                "KIND       DIGEST{pad}SIZE    LAST USED   SOURCES\n\
                 module     sha256:{a}   1234    5m ago      oci://r:5000/f:v1,oci://r:5000/f@sha256:bb\n\
                 module     sha256:{c}   9       3d ago      <none>\n\
                 compiled   sha256:{a}   55555   60s ago     engine 0123456789abcdef\n",
                pad = " ".repeat(7 + 64 + 3 - 6)
            )
        );
    }

    #[test]
    fn prune_lines_and_total() {
        let t = SystemTime::UNIX_EPOCH;
        let a = "a".repeat(64);
        assert_eq!(
            render_pruned(&[entry('a', 10, t, &[]), compiled('a', 5, t)]),
            format!(
                "removed sha256:{a} (10 bytes)\nremoved compiled sha256:{a} (5 bytes)\n\
                 total: 2 entries removed, 15 bytes freed\n"
            )
        );
        assert_eq!(
            render_pruned(&[]),
            "total: 0 entries removed, 0 bytes freed\n"
        );
    }

    #[test]
    fn missing_cache_is_empty_and_not_created() {
        let dir = tempfile::tempdir().unwrap();
        list(dir.path()).unwrap();
        prune(
            dir.path(),
            CachePruneArgs {
                unused_for: Duration::ZERO,
            },
        )
        .unwrap();
        assert!(!dir.path().join("cache").exists());
    }

    #[test]
    fn prune_removes_modules_and_compiled_modules() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("cache/modules/sha256");
        std::fs::create_dir_all(&modules).unwrap();
        let bytes = b"\0asm\x01\0\0\0";
        let hex = waystone_fetch::sha256_hex(bytes);
        std::fs::write(modules.join(format!("{hex}.wasm")), bytes).unwrap();
        let engine = waystone_wasm::WasmEngine::new(Default::default()).unwrap();
        let wasm = br#"(module (memory (export "memory") 1)
            (func (export "proxy_abi_version_0_2_1"))
            (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
            (func (export "proxy_on_context_create") (param i32 i32)))"#;
        let compiled_cache = CompiledCache::open(&compiled_cache_dir(dir.path())).unwrap();
        compiled_cache.load_or_compile(&engine, wasm).unwrap();

        let listed = rows(dir.path(), |f| f.cache_entries(), |c| c.entries()).unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(matches!(&listed[0], Row::Module(e) if e.digest == format!("sha256:{hex}")));
        assert!(matches!(&listed[1], Row::Compiled(_)));
        prune(
            dir.path(),
            CachePruneArgs {
                unused_for: Duration::ZERO,
            },
        )
        .unwrap();
        assert!(
            rows(dir.path(), |f| f.cache_entries(), |c| c.entries())
                .unwrap()
                .is_empty()
        );
    }
}
