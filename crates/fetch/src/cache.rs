//! The on-disk module cache.
//!
//! Layout under the cache dir:
//! - `modules/sha256/<hex>.wasm`: module bytes, content-addressed by their own sha256;
//! - `index/<sha256 of key>.json`: one small file per key (`oci://host/repo:tag` or
//!   `oci://host/repo@sha256:<manifest>`) naming the module and manifest digests.
//!
//! One file per key keeps updates atomic without a shared index lock between processes.
//! Every write goes to a temp file in the same directory, is fsynced, then renamed, so readers
//! see either the old or the new complete file; module reads still re-verify the digest.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::error::FetchError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub key: String,
    /// `sha256:<hex>` of the module bytes.
    pub module_digest: String,
    /// `sha256:<hex>` of the image manifest as served.
    pub manifest_digest: String,
}

/// One cached module, as `waystone cache list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    /// `sha256:<hex>` of the module bytes.
    pub digest: String,
    pub size: u64,
    /// When the module was last fetched or served from the cache (the file's mtime).
    pub last_used: SystemTime,
    /// The urls whose index entries point at this module, sorted.
    pub keys: Vec<String>,
}

/// A temp file this old belongs to a writer that died: live writes take milliseconds.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);

/// The index key prefix for `http(s)://` sources, dropped when showing keys as urls.
pub(crate) const HTTP_KEY_PREFIX: &str = "http-source:";

#[derive(Debug)]
pub(crate) struct Cache {
    modules: PathBuf,
    index: PathBuf,
    max_module_bytes: u64,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    pub fn open(root: &Path, max_module_bytes: u64) -> Result<Self, FetchError> {
        let modules = root.join("modules").join("sha256");
        let index = root.join("index");
        for dir in [&modules, &index] {
            std::fs::create_dir_all(dir).map_err(|source| FetchError::Cache {
                path: dir.clone(),
                source,
            })?;
        }
        let cache = Self {
            modules,
            index,
            max_module_bytes,
        };
        cache.update_entries_gauge();
        Ok(cache)
    }

    /// Sets `wasm_cache_entries` to the number of modules on disk now.
    fn update_entries_gauge(&self) {
        if let Ok(files) = self.module_files() {
            crate::metrics::set_cache_entries(files.len() as u64);
        }
    }

    pub fn module_path(&self, module_digest: &str) -> Option<PathBuf> {
        let hex = module_digest.strip_prefix("sha256:")?;
        crate::reference::normalize_hex(hex)
            .filter(|h| h == hex)
            .map(|h| self.modules.join(format!("{h}.wasm")))
    }

    fn index_path(&self, key: &str) -> PathBuf {
        self.index
            .join(format!("{}.json", crate::sha256_hex(key.as_bytes())))
    }

    /// The cached module, or None when absent or damaged (a damaged file is removed so the
    /// caller's re-fetch can replace it).
    pub async fn load_module(&self, module_digest: &str) -> Option<Arc<Vec<u8>>> {
        let path = self.module_path(module_digest)?;
        let max = self.max_module_bytes;
        let digest = module_digest.to_string();
        tokio::task::spawn_blocking(move || load_verified(&path, &digest, max))
            .await
            .ok()
            .flatten()
    }

    pub async fn store_module(
        &self,
        module_digest: &str,
        bytes: Arc<Vec<u8>>,
    ) -> Result<(), FetchError> {
        let Some(path) = self.module_path(module_digest) else {
            return Ok(());
        };
        let result = tokio::task::spawn_blocking(move || {
            write_atomic(&path, &bytes).map_err(|source| FetchError::Cache { path, source })
        })
        .await
        .unwrap_or_else(|e| {
            Err(FetchError::Cache {
                path: self.modules.clone(),
                source: io::Error::other(e.to_string()),
            })
        });
        self.update_entries_gauge();
        result
    }

    pub async fn lookup(&self, key: &str) -> Option<IndexEntry> {
        let path = self.index_path(key);
        let bytes = tokio::fs::read(&path).await.ok()?;
        match serde_json::from_slice::<IndexEntry>(&bytes) {
            Ok(entry) if entry.key == key => Some(entry),
            _ => {
                tracing::warn!(path = %path.display(), "ignoring unreadable module cache index entry");
                None
            }
        }
    }

    pub async fn record(&self, entry: IndexEntry) -> Result<(), FetchError> {
        let path = self.index_path(&entry.key);
        let bytes = serde_json::to_vec(&entry).map_err(|e| FetchError::Cache {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        tokio::task::spawn_blocking(move || {
            write_atomic(&path, &bytes).map_err(|source| FetchError::Cache { path, source })
        })
        .await
        .unwrap_or_else(|e| {
            Err(FetchError::Cache {
                path: self.index.clone(),
                source: io::Error::other(e.to_string()),
            })
        })
    }
}

impl Cache {
    /// Every module in the cache with the keys pointing at it, sorted by digest.
    pub fn entries(&self) -> Result<Vec<CacheEntry>, FetchError> {
        let keys = self.index_files()?;
        let mut by_digest: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (_, entry) in keys {
            let shown = entry
                .key
                .strip_prefix(HTTP_KEY_PREFIX)
                .unwrap_or(&entry.key)
                .to_string();
            by_digest
                .entry(entry.module_digest)
                .or_default()
                .push(shown);
        }
        let mut out = Vec::new();
        for (digest, path) in self.module_files()? {
            // A module removed since the listing (by a concurrent prune or a damage check) is
            // simply not there any more.
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let mut keys = by_digest.remove(&digest).unwrap_or_default();
            keys.sort();
            out.push(CacheEntry {
                digest,
                size: meta.len(),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                keys,
            });
        }
        Ok(out)
    }

    /// Removes modules unused for `unused_for` and the index entries naming them, index
    /// entries whose module is gone, and stale temp files; returns the removed modules.
    pub fn prune(&self, unused_for: Duration) -> Result<Vec<CacheEntry>, FetchError> {
        let now = SystemTime::now();
        let older_than = |t: SystemTime, age: Duration| {
            now.duration_since(t).is_ok_and(|elapsed| elapsed >= age)
        };
        let index = self.index_files()?;
        let mut removed = Vec::new();
        for entry in self.entries()? {
            if !older_than(entry.last_used, unused_for) {
                continue;
            }
            let Some(path) = self.module_path(&entry.digest) else {
                continue;
            };
            // A fetch may have used the module since the listing: look again right before.
            match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) if older_than(t, unused_for) => {}
                _ => continue,
            }
            for (index_path, e) in &index {
                if e.module_digest == entry.digest {
                    remove_if_present(index_path)?;
                }
            }
            remove_if_present(&path)?;
            removed.push(entry);
        }
        // Dangling index entries would only cost a failed lookup, but they clutter listings.
        for (index_path, e) in &index {
            if let Some(module) = self.module_path(&e.module_digest)
                && !module.exists()
            {
                remove_if_present(index_path)?;
            }
        }
        for dir in [&self.modules, &self.index] {
            for (path, meta) in dir_files(dir)? {
                let is_temp = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(".tmp"));
                if is_temp && meta.modified().is_ok_and(|t| older_than(t, STALE_TEMP_AGE)) {
                    remove_if_present(&path)?;
                }
            }
        }
        self.update_entries_gauge();
        Ok(removed)
    }

    /// `(digest, path)` of every well-named module file.
    fn module_files(&self) -> Result<Vec<(String, PathBuf)>, FetchError> {
        let mut out = Vec::new();
        for (path, _) in dir_files(&self.modules)? {
            let Some(hex) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".wasm"))
            else {
                continue;
            };
            let digest = format!("sha256:{hex}");
            if self.module_path(&digest).as_ref() == Some(&path) {
                out.push((digest, path));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every readable index entry with its file; unreadable ones are skipped as `lookup` does.
    fn index_files(&self) -> Result<Vec<(PathBuf, IndexEntry)>, FetchError> {
        let mut out = Vec::new();
        for (path, _) in dir_files(&self.index)? {
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if let Ok(entry) = serde_json::from_slice::<IndexEntry>(&bytes)
                && path == self.index_path(&entry.key)
            {
                out.push((path, entry));
            }
        }
        Ok(out)
    }
}

/// Regular files directly in `dir`, with their metadata.
fn dir_files(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>, FetchError> {
    let err = |source| FetchError::Cache {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        // Vanished between readdir and stat: another process removed it.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_file() {
            out.push((entry.path(), meta));
        }
    }
    Ok(out)
}

fn remove_if_present(path: &Path) -> Result<(), FetchError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FetchError::Cache {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn load_verified(path: &Path, module_digest: &str, max: u64) -> Option<Arc<Vec<u8>>> {
    let meta = std::fs::metadata(path).ok()?;
    let damaged = |why: &str| {
        tracing::warn!(path = %path.display(), reason = why, "removing damaged module cache entry");
        let _ = std::fs::remove_file(path);
        None
    };
    if meta.len() > max {
        return damaged("larger than the module size limit");
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(_) => return damaged("unreadable"),
    };
    if format!("sha256:{}", crate::sha256_hex(&bytes)) != module_digest {
        return damaged("content does not match its digest");
    }
    // The mtime is the module's last use, which `prune` goes by; failing to bump it only
    // makes the module look older than it is.
    if let Err(e) = std::fs::File::open(path).and_then(|f| f.set_modified(SystemTime::now())) {
        tracing::debug!(path = %path.display(), error = %e, "could not mark module cache entry used");
    }
    Some(Arc::new(bytes))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("cache path has no parent directory"))?;
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename itself must survive a crash too.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn store_load_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let bytes = b"\0asm\x01\0\0\0".to_vec();
        let digest = format!("sha256:{}", crate::sha256_hex(&bytes));
        assert!(cache.load_module(&digest).await.is_none());
        cache
            .store_module(&digest, Arc::new(bytes.clone()))
            .await
            .unwrap();
        assert_eq!(*cache.load_module(&digest).await.unwrap(), bytes);
        let path = cache.module_path(&digest).unwrap();
        std::fs::write(&path, b"\0asm\x01\0\0\0garbage").unwrap();
        assert!(cache.load_module(&digest).await.is_none());
        assert!(!path.exists(), "damaged entry must be removed");
        // No temp files are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[tokio::test]
    async fn index_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let entry = IndexEntry {
            key: "oci://h:1/r:t".into(),
            module_digest: "sha256:aa".into(),
            manifest_digest: "sha256:bb".into(),
        };
        assert_eq!(cache.lookup(&entry.key).await, None);
        cache.record(entry.clone()).await.unwrap();
        assert_eq!(cache.lookup(&entry.key).await, Some(entry));
        assert_eq!(cache.lookup("oci://h:1/r:other").await, None);
    }
}
