//! Per-plugin log levels, changed at run time (the admin endpoint's `/logging?plugin=`).
//!
//! Process-wide: plugin name (`<namespace>.<name>`) → Proxy-Wasm level, plus a default for
//! plugins without one. With nothing set, plugins follow the process's `tracing` filter as
//! before. `proxy_log` drops lines below the plugin's level and `proxy_get_log_level` answers
//! it, so a plugin that checks its level first does not even format them. Raising detail for
//! one plugin beyond the process filter also needs that filter opened for the
//! `waystone::wasm` target; the admin endpoint does both.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{OnceLock, RwLock};

/// Proxy-Wasm log levels (`proxy_log`'s numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace = 0,
    Debug = 1,
    Info = 2,
    Warn = 3,
    Error = 4,
    Critical = 5,
}

impl LogLevel {
    /// `trace`, `debug`, `info`, `warn`/`warning`, `error`, `critical`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_lowercase().as_str() {
            "trace" => Self::Trace,
            "debug" => Self::Debug,
            "info" => Self::Info,
            "warn" | "warning" => Self::Warn,
            "error" => Self::Error,
            "critical" | "off" => Self::Critical,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Debug => "debug",
            Self::Info => "info",
            Self::Warn => "warn",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

#[derive(Default)]
struct Levels {
    default: Option<LogLevel>,
    plugins: BTreeMap<String, LogLevel>,
}

/// Whether any level is set: the common case (none) costs one relaxed load per log call.
static ACTIVE: AtomicBool = AtomicBool::new(false);

fn levels() -> &'static RwLock<Levels> {
    static L: OnceLock<RwLock<Levels>> = OnceLock::new();
    L.get_or_init(Default::default)
}

fn update(f: impl FnOnce(&mut Levels)) {
    let mut l = levels().write().unwrap_or_else(|p| p.into_inner());
    f(&mut l);
    ACTIVE.store(
        l.default.is_some() || !l.plugins.is_empty(),
        Ordering::Release,
    );
}

/// Sets (or with `None` clears) the level of one plugin.
pub fn set_plugin_log_level(plugin: &str, level: Option<LogLevel>) {
    update(|l| match level {
        Some(level) => {
            l.plugins.insert(plugin.to_string(), level);
        }
        None => {
            l.plugins.remove(plugin);
        }
    });
}

/// Sets (or clears) the level of plugins that have none of their own.
pub fn set_default_plugin_log_level(level: Option<LogLevel>) {
    update(|l| l.default = level);
}

/// The default and the per-plugin levels currently set.
pub fn plugin_log_levels() -> (Option<LogLevel>, BTreeMap<String, LogLevel>) {
    let l = levels().read().unwrap_or_else(|p| p.into_inner());
    (l.default, l.plugins.clone())
}

/// The level set for `plugin` (its own, else the default); `None`: follow `tracing`.
pub(crate) fn configured(plugin: &str) -> Option<u32> {
    if !ACTIVE.load(Ordering::Acquire) {
        return None;
    }
    let l = levels().read().unwrap_or_else(|p| p.into_inner());
    l.plugins
        .get(plugin)
        .copied()
        .or(l.default)
        .map(|v| v as u32)
}

/// True when a `proxy_log` line at `level` from `plugin` is below its configured level.
pub(crate) fn drops(plugin: &str, level: i32) -> bool {
    configured(plugin).is_some_and(|min| level >= 0 && (level as u32) < min)
}

/// The effective level of `plugin`, given the level `tracing` would allow.
pub(crate) fn effective(plugin: &str, from_tracing: impl FnOnce() -> u32) -> u32 {
    configured(plugin).unwrap_or_else(from_tracing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_levels_override_the_default() {
        let name = "test-ns.log-level-plugin";
        assert!(!drops(name, 0) || ACTIVE.load(Ordering::Acquire));
        set_plugin_log_level(name, Some(LogLevel::Warn));
        assert!(drops(name, LogLevel::Info as i32));
        assert!(!drops(name, LogLevel::Warn as i32));
        assert_eq!(effective(name, || 0), 3);
        set_plugin_log_level(name, None);
        assert_eq!(
            effective(name, || 2),
            plugin_log_levels().0.map_or(2, |l| l as u32)
        );
        assert_eq!(LogLevel::parse("WARNING"), Some(LogLevel::Warn));
        assert!(LogLevel::parse("loud").is_none());
    }
}
