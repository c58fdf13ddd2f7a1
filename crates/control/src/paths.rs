//! Where Waystone keeps its state.

use std::path::{Path, PathBuf};

/// Fetched modules (and their index), as `waystone-fetch` lays them out.
pub fn cache_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("cache")
}

/// Compiled modules (wasmtime serialization), as `waystone-wasm` lays them out.
pub fn compiled_cache_dir(data_dir: &Path) -> PathBuf {
    cache_dir(data_dir).join("compiled")
}

/// The data directory: the flag, else `WAYSTONE_DATA_DIR`, else
/// `$XDG_DATA_HOME/waystone`, else `~/.local/share/waystone`.
pub fn resolve_data_dir(flag: Option<PathBuf>) -> PathBuf {
    if let Some(dir) = flag {
        return dir;
    }
    if let Some(dir) = std::env::var_os("WAYSTONE_DATA_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("waystone");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/waystone")
}
