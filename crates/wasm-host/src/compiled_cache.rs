//! Compiled modules on disk, so a restart (or a second plugin using the same module) does not
//! run cranelift again.
//!
//! One file per (module, engine): `<module sha256>-<engine key>.cwasm`, where the engine key is
//! a sha256 of wasmtime's `precompile_compatibility_hash` (compiler, flags, tunables, version)
//! and this file's format version. The file is `MAGIC`, the 64-hex sha256 of the payload, a
//! newline, then the payload `Module::serialize` produced. The checksum sits in the same file
//! as the bytes it covers, so one atomic rename publishes both: there is no moment where a
//! reader sees new bytes next to an old checksum.

use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use crate::engine::{CompiledModule, WasmEngine};
use crate::error::HostError;

const MAGIC: &[u8] = b"WAYSTONE-CWASM-1\n";
/// Bumped whenever the file layout or what goes into the key changes.
const FORMAT_VERSION: u32 = 1;
const EXTENSION: &str = "cwasm";
/// A temp file this old belongs to a writer that died: live writes take well under a minute.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum CompiledCacheError {
    #[error("compiled-module cache {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where a module handed out by [`CompiledCache::load_or_compile`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompiledSource {
    /// Deserialized from the cache: no compilation.
    Cache,
    /// Compiled now; there was no entry for this module and engine.
    Compiled,
    /// Compiled now because the entry was damaged or refused; the entry was rewritten.
    Recompiled,
}

/// One cached compiled module, for `waystone cache list|prune`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledEntry {
    /// `sha256:<hex>` of the Wasm module it was compiled from.
    pub module_digest: String,
    /// The engine key (16 hex digits) it was compiled for.
    pub engine_key: String,
    pub size: u64,
    /// When it was last written or loaded (the file's mtime).
    pub last_used: SystemTime,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CompiledCache {
    dir: PathBuf,
}

impl CompiledCache {
    /// Opens (creating) the cache directory and makes it private (0700): only this user may
    /// put files there, which is what makes loading them sound (see `deserialize_verified`).
    /// Fails when the directory cannot be made private (it belongs to someone else).
    pub fn open(dir: &Path) -> Result<Self, CompiledCacheError> {
        let err = |source| CompiledCacheError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens the cache only if the directory exists: for listing without creating anything.
    pub fn open_existing(dir: &Path) -> Result<Option<Self>, CompiledCacheError> {
        if dir.is_dir() {
            Self::open(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file a module with sha256 `module_hex` compiled by `engine` is cached in.
    pub fn path_for(&self, engine: &WasmEngine, module_hex: &str) -> PathBuf {
        self.dir.join(format!(
            "{module_hex}-{}.{EXTENSION}",
            engine_key(&engine.inner.engine)
        ))
    }

    /// The module compiled from `wasm`: deserialized from the cache when a sound entry exists,
    /// else compiled and written to the cache (a write failure is logged; the module is still
    /// returned). Blocking: run it on a blocking thread.
    pub fn load_or_compile(
        &self,
        engine: &WasmEngine,
        wasm: &[u8],
    ) -> Result<(CompiledModule, CompiledSource), HostError> {
        let module_hex = hex(&Sha256::digest(wasm));
        let path = self.path_for(engine, &module_hex);
        let mut source = CompiledSource::Compiled;
        match std::fs::read(&path) {
            Ok(file) => match deserialize_verified(&engine.inner.engine, &file) {
                Ok(module) => match engine.link(module) {
                    Ok(compiled) => {
                        touch(&path);
                        return Ok((compiled, CompiledSource::Cache));
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "cached compiled module does not link; recompiling");
                        source = CompiledSource::Recompiled;
                    }
                },
                Err(reason) => {
                    tracing::warn!(path = %path.display(), %reason, "ignoring damaged compiled-module cache entry; recompiling");
                    source = CompiledSource::Recompiled;
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read compiled-module cache entry; recompiling");
                source = CompiledSource::Recompiled;
            }
        }
        let module = Module::new(&engine.inner.engine, wasm).map_err(|e| HostError::Compile {
            reason: format!("{e:#}"),
        })?;
        // Link first: a module the host refuses is not worth caching.
        let compiled = engine.link(module.clone())?;
        match module.serialize() {
            Ok(payload) => {
                if let Err(e) = write_entry(&path, &payload) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write compiled-module cache entry");
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot serialize compiled module"),
        }
        Ok((compiled, source))
    }

    /// Every entry, sorted by module digest then engine key.
    pub fn entries(&self) -> Result<Vec<CompiledEntry>, CompiledCacheError> {
        let err = |source| CompiledCacheError::Io {
            path: self.dir.clone(),
            source,
        };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(err)? {
            let entry = entry.map_err(err)?;
            let path = entry.path();
            let Some((module_hex, engine_key)) = parse_name(&path) else {
                continue;
            };
            // Removed between readdir and stat by a concurrent prune.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            out.push(CompiledEntry {
                module_digest: format!("sha256:{module_hex}"),
                engine_key,
                size: meta.len(),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                path,
            });
        }
        out.sort_by(|a, b| {
            (&a.module_digest, &a.engine_key).cmp(&(&b.module_digest, &b.engine_key))
        });
        Ok(out)
    }

    /// Removes entries unused for `unused_for` (and temp files left by writers that died);
    /// returns the removed entries.
    pub fn prune(&self, unused_for: Duration) -> Result<Vec<CompiledEntry>, CompiledCacheError> {
        let now = SystemTime::now();
        let older = |t: SystemTime, age: Duration| now.duration_since(t).is_ok_and(|d| d >= age);
        let mut removed = Vec::new();
        for entry in self.entries()? {
            // A load may have used it since the listing: look again right before.
            match std::fs::metadata(&entry.path).and_then(|m| m.modified()) {
                Ok(t) if older(t, unused_for) => {}
                _ => continue,
            }
            match std::fs::remove_file(&entry.path) {
                Ok(()) => removed.push(entry),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CompiledCacheError::Io {
                        path: entry.path,
                        source,
                    });
                }
            }
        }
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            for entry in dir.flatten() {
                let is_temp = entry.file_name().to_string_lossy().ends_with(".tmp");
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| older(t, STALE_TEMP_AGE));
                if is_temp && stale {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        Ok(removed)
    }
}

/// 16 hex digits naming everything about `engine` that decides whether a serialized module
/// fits it.
fn engine_key(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    FORMAT_VERSION.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex(&hasher.0.finalize()[..8])
}

/// Feeds `Hash` input into sha256, which (unlike `DefaultHasher`) is the same in every build.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        // Only the full digest is used; `Hasher` wants a u64 from its users.
        let d = self.0.clone().finalize();
        u64::from_le_bytes(d[..8].try_into().unwrap_or([0; 8]))
    }
}

/// Checks the file's magic and checksum, then deserializes the payload.
///
/// `Module::deserialize` is unsafe because it maps the payload as executable code after only
/// light validation: bytes not produced by `Module::serialize` could run anything. Here that
/// is sound because only this process's user can have written the file: the cache directory
/// is made 0700 by `CompiledCache::open` (which fails if it cannot), and we write entries only
/// from `Module::serialize` output, to a temp file in that directory, fsynced and renamed into
/// place, so no reader sees a partial file. What remains — a torn or bit-rotted file after a
/// disk fault, or a file someone copied in by hand — is caught by the sha256 of the payload
/// stored in the file and checked here over the exact bytes passed on; a mismatch is an error
/// and the caller recompiles. A payload from another wasmtime version or engine configuration
/// has another file name (the engine key), and wasmtime itself rejects such payloads with an
/// error, not undefined behaviour.
#[allow(unsafe_code)]
fn deserialize_verified(engine: &Engine, file: &[u8]) -> Result<Module, String> {
    let rest = file
        .strip_prefix(MAGIC)
        .ok_or("not a Waystone compiled-module file (bad magic)")?;
    if rest.len() < 65 || rest[64] != b'\n' {
        return Err("truncated header".into());
    }
    let (stored, payload) = (&rest[..64], &rest[65..]);
    let actual = hex(&Sha256::digest(payload));
    if stored != actual.as_bytes() {
        return Err(format!(
            "payload sha256 {actual} does not match the stored {}",
            String::from_utf8_lossy(stored)
        ));
    }
    // SAFETY: see the function's documentation: `payload` is, byte for byte, what
    // `Module::serialize` wrote into our private directory.
    unsafe { Module::deserialize(engine, payload) }.map_err(|e| format!("{e:#}"))
}

/// Writes `MAGIC`, the checksum and the payload to a temp file in the cache directory,
/// fsyncs, renames over `path`, fsyncs the directory.
fn write_entry(path: &Path, payload: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("cache path has no parent directory"))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(MAGIC)?;
        f.write_all(hex(&Sha256::digest(payload)).as_bytes())?;
        f.write_all(b"\n")?;
        f.write_all(payload)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Marks an entry used now, for `prune`; failing only makes it look older than it is.
fn touch(path: &Path) {
    if let Err(e) = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now())) {
        tracing::debug!(path = %path.display(), error = %e, "could not mark compiled module used");
    }
}

/// `<64 hex>-<16 hex>.cwasm` → the two parts.
fn parse_name(path: &Path) -> Option<(String, String)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(&format!(".{EXTENSION}"))?;
    let (module, engine) = stem.split_once('-')?;
    let is_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (is_hex(module, 64) && is_hex(engine, 16)).then(|| (module.to_string(), engine.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::engine::EngineConfig;

    /// A valid Proxy-Wasm module with `functions` extra functions, so compiling it takes a
    /// measurable while.
    fn module(functions: usize, salt: u32) -> Vec<u8> {
        let mut wat = String::from(
            "(module (memory (export \"memory\") 1)\n\
             (func (export \"proxy_abi_version_0_2_1\"))\n\
             (func (export \"proxy_on_memory_allocate\") (param i32) (result i32) i32.const 0)\n\
             (func (export \"proxy_on_context_create\") (param i32 i32))\n",
        );
        for i in 0..functions {
            wat.push_str(&format!(
                "(func (export \"f{i}\") (param i32) (result i32) \
                 (local i32) (local.set 1 (i32.const {salt})) \
                 (block (loop (local.set 1 (i32.add (i32.mul (local.get 1) (i32.const {i})) (local.get 0))) \
                 (br_if 1 (i32.gt_u (local.get 1) (i32.const 100000))) \
                 (local.set 0 (i32.add (local.get 0) (i32.const 1))) (br 0))) (local.get 1))\n"
            ));
        }
        wat.push(')');
        wat::parse_str(&wat).unwrap()
    }

    fn engine() -> WasmEngine {
        WasmEngine::new(EngineConfig::default()).unwrap()
    }

    #[test]
    fn second_load_deserializes_instead_of_compiling() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::open(&dir.path().join("compiled")).unwrap();
        let mode = std::fs::metadata(cache.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let engine = engine();
        let wasm = module(3000, 1);

        let t = Instant::now();
        let (m, source) = cache.load_or_compile(&engine, &wasm).unwrap();
        let cold = t.elapsed();
        assert_eq!(source, CompiledSource::Compiled);
        assert!(m.has_export("f2999"));

        // A fresh engine with the same configuration, as after a restart.
        let engine = self::engine();
        let t = Instant::now();
        let (m, source) = cache.load_or_compile(&engine, &wasm).unwrap();
        let warm = t.elapsed();
        assert_eq!(source, CompiledSource::Cache);
        assert!(m.has_export("f2999"));
        eprintln!("cold compile {cold:?}, warm load {warm:?}");
        assert!(
            warm < cold,
            "warm load {warm:?} not faster than compile {cold:?}"
        );

        let entries = cache.entries().unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].module_digest,
            format!("sha256:{}", hex(&Sha256::digest(&wasm)))
        );
        let leftovers = std::fs::read_dir(cache.dir())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".tmp")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn damaged_entries_are_recompiled_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::open(dir.path()).unwrap();
        let engine = engine();
        let wasm = module(10, 2);
        cache.load_or_compile(&engine, &wasm).unwrap();
        let path = cache.path_for(&engine, &hex(&Sha256::digest(&wasm)));
        let good = std::fs::read(&path).unwrap();

        // One flipped bit in the code, a truncated file, a foreign file, an empty one.
        let mut flipped = good.clone();
        let last = flipped.len() - 100;
        flipped[last] ^= 0x01;
        let damaged: [Vec<u8>; 4] = [
            flipped,
            good[..good.len() / 2].to_vec(),
            b"\x7fELF not ours".to_vec(),
            Vec::new(),
        ];
        for bad in damaged {
            std::fs::write(&path, &bad).unwrap();
            let (m, source) = cache.load_or_compile(&engine, &wasm).unwrap();
            assert_eq!(source, CompiledSource::Recompiled);
            assert!(m.has_export("f9"));
            assert_eq!(std::fs::read(&path).unwrap(), good, "entry rewritten");
            let (_, source) = cache.load_or_compile(&engine, &wasm).unwrap();
            assert_eq!(source, CompiledSource::Cache);
        }
    }

    #[test]
    fn engine_configuration_is_part_of_the_key() {
        let speed = Engine::new(wasmtime::Config::new().epoch_interruption(true)).unwrap();
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true)
            .cranelift_opt_level(wasmtime::OptLevel::None);
        let none = Engine::new(&cfg).unwrap();
        let no_epochs = Engine::new(&wasmtime::Config::new()).unwrap();
        let keys = [
            engine_key(&speed),
            engine_key(&none),
            engine_key(&no_epochs),
        ];
        assert_ne!(keys[0], keys[1]);
        assert_ne!(keys[0], keys[2]);
        assert_ne!(keys[1], keys[2]);
        // Same configuration, same key: a restart finds its entries.
        let again = Engine::new(wasmtime::Config::new().epoch_interruption(true)).unwrap();
        assert_eq!(engine_key(&speed), engine_key(&again));

        // An entry written for one engine is refused by an incompatible one (with an error,
        // which the cache turns into a recompile), even if someone renamed the file.
        let m = Module::new(&none, wat::parse_str("(module)").unwrap()).unwrap();
        let payload = m.serialize().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cwasm");
        write_entry(&path, &payload).unwrap();
        let file = std::fs::read(&path).unwrap();
        assert!(deserialize_verified(&none, &file).is_ok());
        assert!(deserialize_verified(&no_epochs, &file).is_err());
    }

    #[test]
    fn prune_removes_unused_entries_only() {
        let dir = tempfile::tempdir().unwrap();
        let cache = CompiledCache::open(dir.path()).unwrap();
        let engine = engine();
        let (a, b) = (module(1, 3), module(1, 4));
        cache.load_or_compile(&engine, &a).unwrap();
        cache.load_or_compile(&engine, &b).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        let a_path = cache.path_for(&engine, &hex(&Sha256::digest(&a)));
        std::fs::File::open(&a_path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let removed = cache.prune(Duration::from_secs(3600)).unwrap();
        assert_eq!(removed.len(), 1);
        assert_eq!(removed[0].path, a_path);
        assert_eq!(cache.entries().unwrap().len(), 1);
        assert_eq!(cache.prune(Duration::ZERO).unwrap().len(), 1);
        assert!(cache.entries().unwrap().is_empty());
    }
}
