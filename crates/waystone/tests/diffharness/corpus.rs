//! The data files under tests/differential/: one corpus per plugin, the
//! harness settings, and the host features a case may require.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// tests/differential/harness.yaml
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Harness {
    /// Every feature name a case may list under `requires`.
    pub known_features: Vec<String>,
    /// Features the host on this branch lacks: their cases are skipped, and
    /// the run prints each one. Empty once the host is complete.
    pub missing_features: Vec<String>,
    /// Response headers each proxy adds by itself, never compared.
    pub ignored_response_headers: Vec<String>,
    /// Request headers each proxy adds on the way upstream; the echo backend
    /// leaves them out of its echo.
    pub ignored_upstream_headers: Vec<String>,
    /// Host bugs found by this harness and not fixed yet on this branch, each
    /// tolerated where it shows and counted in the run's summary. Must be
    /// empty when the host is complete; an entry that no case needs fails.
    #[serde(default)]
    pub pending_host_fixes: Vec<PendingFix>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingFix {
    pub name: String,
    /// A response header line (`name: value`) Envoy sends and Waystone does not.
    pub envoy_only_header: String,
}

/// tests/differential/<plugin>.yaml
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Corpus {
    /// The module: target/wasm/<plugin>.wasm.
    pub plugin: String,
    /// For reports and docs: which SDK built it.
    pub sdk: String,
    /// Envoy's root_id and the WasmPlugin's pluginName (empty: unset).
    #[serde(default)]
    pub root_id: String,
    /// Given to the plugin as its configuration, serialized as JSON.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// A message the plugin logs once at the end of every stream (from
    /// on_log): the harness waits for it before it reads a case's log lines.
    pub log_fence: String,
    /// Log messages starting with one of these are not compared (e.g. an
    /// SDK's own debug lines that print host-assigned context ids).
    #[serde(default)]
    pub ignore_logs: Vec<String>,
    /// HTTP cases (a listener with the plugin as an HTTP filter).
    #[serde(default)]
    pub cases: Vec<Case>,
    /// L4 cases (`type: NETWORK`, each with its own listener and chain): `tcp.rs`.
    #[serde(default)]
    pub tcp_cases: Vec<super::tcp::TcpCase>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default)]
    pub requires: Vec<String>,
    pub request: Request,
    /// Checked on both proxies, on top of comparing them.
    #[serde(default)]
    pub expect: Option<Expect>,
    /// Repeat the request (bounded) until `expect` holds: for effects that
    /// arrive asynchronously (ticks, queues).
    #[serde(default)]
    pub eventually: bool,
    /// A known, documented difference: which parts may differ, and why.
    #[serde(default)]
    pub differs: Option<Differs>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default = "get")]
    pub method: String,
    #[serde(default = "slash")]
    pub path: String,
    /// In order; a name may repeat.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    #[serde(default)]
    pub body: Option<String>,
    /// Sent chunked, with these trailers.
    #[serde(default)]
    pub trailers: Vec<(String, String)>,
}

fn get() -> String {
    "GET".into()
}

fn slash() -> String {
    "/".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub status: Option<u16>,
    /// Each must be present with this value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The body must contain each.
    #[serde(default)]
    pub body_contains: Vec<String>,
    /// The plugin's log lines must contain each (substring of some line).
    #[serde(default)]
    pub logs_contain: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Differs {
    /// Among status, headers, body, logs.
    pub parts: Vec<String>,
    /// The entry in docs/compat-differences.md.
    pub reason: String,
}

pub fn dir() -> PathBuf {
    crate::common::repo_root().join("tests/differential")
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn harness() -> Harness {
    let h: Harness = parse(&dir().join("harness.yaml"));
    for m in &h.missing_features {
        assert!(
            h.known_features.contains(m),
            "harness.yaml: missing feature {m:?} is not in known_features"
        );
    }
    h
}

/// Every corpus, in file-name order; each case's `requires` checked against
/// the known features so a typo cannot skip a case.
pub fn corpora(h: &Harness) -> Vec<Corpus> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && p.file_name().is_some_and(|n| n != "harness.yaml")
        })
        .collect();
    files.sort();
    files
        .iter()
        .map(|f| {
            let c: Corpus = parse(f);
            for case in &c.cases {
                for r in &case.requires {
                    assert!(
                        h.known_features.contains(r),
                        "{}: case {:?} requires unknown feature {r:?} (known: {:?})",
                        f.display(),
                        case.name,
                        h.known_features
                    );
                }
                if let Some(d) = &case.differs {
                    for p in &d.parts {
                        assert!(
                            ["status", "headers", "body", "logs"].contains(&p.as_str()),
                            "{}: case {:?}: differs.parts has {p:?}",
                            f.display(),
                            case.name
                        );
                    }
                }
            }
            for case in &c.tcp_cases {
                if let Some(d) = &case.differs {
                    for p in &d.parts {
                        assert!(
                            ["received", "end", "logs"].contains(&p.as_str()),
                            "{}: tcp case {:?}: differs.parts has {p:?}",
                            f.display(),
                            case.name
                        );
                    }
                }
            }
            c
        })
        .collect()
}
