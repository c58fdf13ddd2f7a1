//! `waystone cache list|prune`: the module cache `waystone up` fills under `<data-dir>/cache`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use waystone_fetch::{CacheEntry, FetchConfig, Fetcher};

use crate::args::CachePruneArgs;
use crate::table::{KUBECTL, Table, human_duration};
use crate::{CliError, CliResult};

/// The directory `waystone up` gives its fetcher.
fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cache")
}

/// None when nothing was ever cached there: listing must not create the directory.
fn open(data_dir: &Path) -> CliResult<Option<Fetcher>> {
    let dir = cache_dir(data_dir);
    if !dir.is_dir() {
        return Ok(None);
    }
    Fetcher::new(FetchConfig::new(dir))
        .map(Some)
        .map_err(|e| CliError::Failed(e.to_string()))
}

pub(crate) fn list(data_dir: &Path) -> CliResult {
    let entries = match open(data_dir)? {
        Some(f) => f
            .cache_entries()
            .map_err(|e| CliError::Failed(e.to_string()))?,
        None => Vec::new(),
    };
    if entries.is_empty() {
        // kubectl's wording for an empty listing, on stderr as kubectl prints it.
        eprintln!("No modules found in {}.", cache_dir(data_dir).display());
        return Ok(());
    }
    print!("{}", render_list(&entries, SystemTime::now()));
    Ok(())
}

pub(crate) fn prune(data_dir: &Path, args: CachePruneArgs) -> CliResult {
    let removed = match open(data_dir)? {
        Some(f) => f
            .prune_cache(args.unused_for)
            .map_err(|e| CliError::Failed(e.to_string()))?,
        None => Vec::new(),
    };
    print!("{}", render_pruned(&removed));
    Ok(())
}

fn render_list(entries: &[CacheEntry], now: SystemTime) -> String {
    let mut table = Table::new(["DIGEST", "SIZE", "LAST USED", "SOURCES"]);
    for e in entries {
        // A last use in the future (clock moved back) shows as now, as kubectl's AGE does.
        let since = now
            .duration_since(e.last_used)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let sources = if e.keys.is_empty() {
            "<none>".to_string()
        } else {
            e.keys.join(",")
        };
        table.rows.push(vec![
            e.digest.clone(),
            e.size.to_string(),
            format!("{} ago", human_duration(since)),
            sources,
        ]);
    }
    table.render(KUBECTL)
}

fn render_pruned(removed: &[CacheEntry]) -> String {
    let mut out = String::new();
    for e in removed {
        out.push_str(&format!("removed {} ({} bytes)\n", e.digest, e.size));
    }
    let total: u64 = removed.iter().map(|e| e.size).sum();
    let noun = if removed.len() == 1 {
        "module"
    } else {
        "modules"
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

    fn entry(hex: char, size: u64, last_used: SystemTime, keys: &[&str]) -> CacheEntry {
        CacheEntry {
            digest: format!("sha256:{}", hex.to_string().repeat(64)),
            size,
            last_used,
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn list_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let entries = [
            entry(
                'a',
                1234,
                now - Duration::from_secs(300),
                &["oci://r:5000/f:v1", "oci://r:5000/f@sha256:bb"],
            ),
            entry('c', 9, now - Duration::from_secs(3 * 86400), &[]),
        ];
        let a = "a".repeat(64);
        let c = "c".repeat(64);
        assert_eq!(
            render_list(&entries, now),
            format!(
                "DIGEST{pad}SIZE   LAST USED   SOURCES\n\
                 sha256:{a}   1234   5m ago      oci://r:5000/f:v1,oci://r:5000/f@sha256:bb\n\
                 sha256:{c}   9      3d ago      <none>\n",
                pad = " ".repeat(7 + 64 + 3 - 6)
            )
        );
    }

    #[test]
    fn prune_lines_and_total() {
        let t = SystemTime::UNIX_EPOCH;
        let a = "a".repeat(64);
        assert_eq!(
            render_pruned(&[entry('a', 10, t, &[]), entry('b', 5, t, &[])]),
            format!(
                "removed sha256:{a} (10 bytes)\nremoved sha256:{} (5 bytes)\n\
                 total: 2 modules removed, 15 bytes freed\n",
                "b".repeat(64)
            )
        );
        assert_eq!(
            render_pruned(&[]),
            "total: 0 modules removed, 0 bytes freed\n"
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
    fn prune_removes_from_the_data_dir_cache() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("cache/modules/sha256");
        std::fs::create_dir_all(&modules).unwrap();
        let bytes = b"\0asm\x01\0\0\0";
        let hex = waystone_fetch::sha256_hex(bytes);
        std::fs::write(modules.join(format!("{hex}.wasm")), bytes).unwrap();
        let fetcher = open(dir.path()).unwrap().unwrap();
        let listed = fetcher.cache_entries().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].digest, format!("sha256:{hex}"));
        prune(
            dir.path(),
            CachePruneArgs {
                unused_for: Duration::ZERO,
            },
        )
        .unwrap();
        assert!(fetcher.cache_entries().unwrap().is_empty());
    }
}
