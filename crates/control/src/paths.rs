//! Where Waystone keeps its state.

use std::path::PathBuf;

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
