//! The admin endpoint of `waystone up` (Envoy's admin port counterpart; default
//! `127.0.0.1:15000`, the bound address written to `<data-dir>/admin.addr`). No token: like
//! Envoy's, it is meant for loopback.
//!
//! | path | answer |
//! |---|---|
//! | `GET /ready` | 200 `LIVE` once the first configuration runs, else 503 `PRE_INITIALIZING` |
//! | `GET /healthz` | 200 `ok` while the process serves |
//! | `GET /config_dump` | the running configuration as JSON (see [`crate::dump`]) |
//! | `GET /stats/prometheus` | every metric source, Prometheus text format 0.0.4 |
//! | `GET/POST /logging` | current levels; `?level=L` sets the process level, `?plugin=NS.NAME&level=L` one plugin's |

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use waystone_proxy::DataPlane;
use waystone_wasm::{LogLevel, MetricKind, MetricSample, MetricValue};

use crate::dump::{DumpInput, PluginReports, config_dump};

pub const ADMIN_ADDR_FILE: &str = "admin.addr";

/// Appends Prometheus text for one family of metrics. Sources are called in order on every
/// scrape, each from the scraping thread; they must be cheap and never block on a worker.
pub type MetricSource = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Replaces the process's `tracing` filter with the given directives (`EnvFilter` syntax).
pub type SetLogFilter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// How `/logging` changes the process's log levels.
#[derive(Clone)]
pub struct LogControl {
    pub set_filter: SetLogFilter,
    /// The directives in force at start (`RUST_LOG`, or the CLI's default level).
    pub initial: String,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("initial", &self.initial)
            .finish_non_exhaustive()
    }
}

pub struct AdminState {
    pub dataplane: Arc<DataPlane>,
    pub ready: Arc<AtomicBool>,
    pub reports: Arc<Mutex<PluginReports>>,
    pub sources: Vec<MetricSource>,
    pub log: Option<LogControl>,
    /// The process-level directives now in force.
    pub process_filter: Mutex<String>,
}

impl AdminState {
    /// The config dump of what runs now.
    pub fn dump(&self) -> serde_json::Value {
        let runtime = self.dataplane.current();
        let listeners = self.dataplane.listener_addresses();
        let reports = self
            .reports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        config_dump(&DumpInput {
            runtime: &runtime,
            listeners: &listeners,
            reports: &reports,
            entry: self.dataplane.entry_address(),
        })
    }
}

/// The metric sources every process with a data plane exports: Istio's request metrics and
/// Waystone's plugin metrics, plugin-defined metrics, and Istio agent's module fetch metrics.
pub fn standard_sources(engine: waystone_wasm::WasmEngine) -> Vec<MetricSource> {
    vec![
        Arc::new(waystone_proxy::metrics::render_prometheus),
        Arc::new(move |out: &mut String| render_custom_metrics(&engine.metrics_snapshot(), out)),
        Arc::new(waystone_fetch::render_prometheus),
    ]
}

/// Binds the admin endpoint on `addr` (when `fallback`, a free port on the same IP if `addr`
/// is taken) and serves it until `stop` turns true. Returns the bound address and the task.
pub async fn serve(
    addr: SocketAddr,
    fallback: bool,
    state: Arc<AdminState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Err(e) if fallback && e.kind() == std::io::ErrorKind::AddrInUse => {
            tracing::warn!(%addr, "admin port taken by another process; using a free port");
            tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
        }
        r => r,
    }
    .map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("binding the admin endpoint on {addr}: {e}"),
        )
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(admin = %bound, "admin endpoint listening");
    let task = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    Ok((bound, task))
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/ready", get(ready))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/config_dump", get(dump))
        .route("/stats/prometheus", get(prometheus))
        .route("/logging", get(logging).post(logging))
        .with_state(state)
}

async fn ready(State(s): State<Arc<AdminState>>) -> Response {
    if s.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "LIVE\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "PRE_INITIALIZING\n").into_response()
    }
}

async fn dump(State(s): State<Arc<AdminState>>) -> Json<serde_json::Value> {
    Json(s.dump())
}

async fn prometheus(State(s): State<Arc<AdminState>>) -> Response {
    let instances = s.dataplane.plugin_instances().await;
    let mut out = String::with_capacity(16 << 10);
    for source in &s.sources {
        source(&mut out);
    }
    waystone_proxy::metrics::render_instances(&mut out, &instances);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Renders plugin-defined metrics (`proxy_define_metric`) as Envoy exports its `wasmcustom`
/// namespace: under the plugin's own name, characters Prometheus refuses turned into `_`.
pub fn render_custom_metrics(samples: &[MetricSample], out: &mut String) {
    for m in samples {
        let name = prometheus_name(&m.name);
        match (m.kind, m.value) {
            (MetricKind::Counter, MetricValue::Counter(v)) => {
                let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
            }
            (MetricKind::Gauge, MetricValue::Gauge(v)) => {
                let _ = writeln!(out, "# TYPE {name} gauge\n{name} {v}");
            }
            (_, MetricValue::Histogram { count, sum }) => {
                // The host keeps only count and sum: one +Inf bucket.
                let _ = writeln!(
                    out,
                    "# TYPE {name} histogram\n{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
                );
            }
            (_, MetricValue::Counter(v)) => {
                let _ = writeln!(out, "{name} {v}");
            }
            (_, MetricValue::Gauge(v)) => {
                let _ = writeln!(out, "{name} {v}");
            }
        }
    }
}

fn prometheus_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}

fn tracing_level(l: LogLevel) -> &'static str {
    match l {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error | LogLevel::Critical => "error",
    }
}

/// The bare level of a directive list (`info` in `info,hyper=warn`); `info` when none.
fn bare_level(directives: &str) -> LogLevel {
    directives
        .split(',')
        .filter(|d| !d.contains('='))
        .filter_map(|d| LogLevel::parse(d.trim()))
        .next_back()
        .unwrap_or(LogLevel::Info)
}

async fn logging(
    State(s): State<Arc<AdminState>>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    match apply_logging(&s, &q) {
        Ok(()) => (StatusCode::OK, levels_text(&s)).into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

fn apply_logging(s: &AdminState, q: &HashMap<String, String>) -> Result<(), String> {
    let Some(level) = q.get("level") else {
        if q.contains_key("plugin") {
            return Err("logging: `plugin` needs a `level`".into());
        }
        return Ok(());
    };
    let parsed = LogLevel::parse(level).ok_or_else(|| {
        format!("logging: unknown level {level:?} (trace, debug, info, warn, error, critical)")
    })?;
    let mut filter = s.process_filter.lock().unwrap_or_else(|p| p.into_inner());
    match q.get("plugin") {
        Some(plugin) => waystone_wasm::set_plugin_log_level(plugin, Some(parsed)),
        None => *filter = tracing_level(parsed).to_string(),
    }
    let base = bare_level(&filter);
    let (_, plugins) = waystone_wasm::plugin_log_levels();
    // Plugins without a level of their own keep the process level; the wasm target opens
    // as far as the most verbose plugin needs, and `proxy_log` drops the rest per plugin.
    waystone_wasm::set_default_plugin_log_level((!plugins.is_empty()).then_some(base));
    let mut directives = filter.clone();
    if let Some(min) = plugins.values().copied().min()
        && min < base
    {
        let _ = write!(directives, ",waystone::wasm={}", tracing_level(min));
    }
    match &s.log {
        Some(log) => (log.set_filter)(&directives),
        None => Err("logging: this process cannot change its log filter".into()),
    }
}

fn levels_text(s: &AdminState) -> String {
    let filter = s
        .process_filter
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let (default, plugins): (_, BTreeMap<String, LogLevel>) = waystone_wasm::plugin_log_levels();
    let mut out = format!("process: {filter}\n");
    if let Some(d) = default {
        let _ = writeln!(out, "plugins (default): {}", d.as_str());
    }
    for (name, level) in plugins {
        let _ = writeln!(out, "plugin {name}: {}", level.as_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_metric_names_and_kinds() {
        let mut out = String::new();
        render_custom_metrics(
            &[
                MetricSample {
                    name: "my.counter-x".into(),
                    kind: MetricKind::Counter,
                    value: MetricValue::Counter(3),
                },
                MetricSample {
                    name: "1gauge".into(),
                    kind: MetricKind::Gauge,
                    value: MetricValue::Gauge(-2),
                },
                MetricSample {
                    name: "lat".into(),
                    kind: MetricKind::Histogram,
                    value: MetricValue::Histogram { count: 2, sum: 30 },
                },
            ],
            &mut out,
        );
        assert_eq!(
            out,
            "# TYPE my_counter_x counter\nmy_counter_x 3\n\
             # TYPE _1gauge gauge\n_1gauge -2\n\
             # TYPE lat histogram\nlat_bucket{le=\"+Inf\"} 2\nlat_sum 30\nlat_count 2\n"
        );
    }

    #[test]
    fn bare_levels() {
        assert_eq!(bare_level("info,hyper=warn"), LogLevel::Info);
        assert_eq!(bare_level("waystone=debug"), LogLevel::Info);
        assert_eq!(bare_level("warn"), LogLevel::Warn);
    }
}
