//! L4 cases: `type: NETWORK` plugins on a TCP connection. Each case gets its own listener on
//! both proxies: in Envoy one `envoy.filters.network.wasm` per plugin of the case's chain in
//! front of `envoy.filters.network.tcp_proxy`, in Waystone a Gateway listener of protocol TCP,
//! a TCPRoute and one WasmPlugin `type: NETWORK` per plugin (ordered by priority). Both relay
//! to the same TCP echo backend. A client plays the case's script and the harness compares
//! the bytes it received, how the connection ended, and every plugin's log lines (labelled
//! with the plugin's place in the chain, in the order they were written).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::Report;
use super::corpus::Corpus;
use super::envoy::LogLine;

/// tests/differential/<plugin>.yaml `tcp_cases:` entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCase {
    pub name: String,
    /// The plugins in chain order, each given its configuration (serialized as JSON); all run
    /// the corpus's module. Empty: one plugin with the corpus's `config`.
    #[serde(default)]
    pub chain: Vec<serde_json::Value>,
    pub script: Vec<Step>,
    #[serde(default)]
    pub expect: Option<TcpExpect>,
    /// A known, documented difference: which parts (received, end, logs) may differ, and why.
    #[serde(default)]
    pub differs: Option<super::corpus::Differs>,
}

/// One step of a client's script.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Step {
    /// Writes these bytes.
    Send(String),
    /// Reads until everything received so far ends with this text (bounded).
    Recv(String),
    /// Waits (bounded) until some plugin of the case logged a line containing this text: what
    /// makes a case deterministic where the proxy holds bytes.
    Log(String),
    /// Half-closes the client's side (its end of stream).
    Shutdown,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpExpect {
    /// Everything the client received, exactly.
    pub received: Option<String>,
    /// `eof` (the proxy closed cleanly) or `reset`.
    pub end: Option<String>,
    /// Each a substring of some log line (`[n] message`).
    #[serde(default)]
    pub logs_contain: Vec<String>,
}

/// A case's listener: its port and the names of its plugins (`<namespace>.<name>`), in chain
/// order.
pub struct CaseSetup {
    pub port: u16,
    pub k8s_names: Vec<String>,
    pub configs: Vec<String>,
}

const STEP_WAIT: Duration = Duration::from_secs(4);
const END_WAIT: Duration = Duration::from_secs(5);

fn k8s_name(plugin: &str, case: usize, n: usize) -> String {
    format!("diff-{}-c{case}-p{n}", plugin.replace('_', "-"))
}

/// Every TCP case of every corpus, with ports from `first_port` on.
pub fn setups(corpora: &[Corpus], first_port: u16) -> Vec<(usize, usize, CaseSetup)> {
    let mut out = Vec::new();
    let mut port = first_port;
    for (ci, c) in corpora.iter().enumerate() {
        for (k, case) in c.tcp_cases.iter().enumerate() {
            let configs: Vec<String> = if case.chain.is_empty() {
                vec![
                    c.config
                        .as_ref()
                        .map(|v| serde_json::to_string(v).unwrap())
                        .unwrap_or_default(),
                ]
            } else {
                case.chain
                    .iter()
                    .map(|v| serde_json::to_string(v).unwrap())
                    .collect()
            };
            let k8s_names = (0..configs.len())
                .map(|n| k8s_name(&c.plugin, k, n + 1))
                .collect();
            out.push((
                ci,
                k,
                CaseSetup {
                    port,
                    k8s_names,
                    configs,
                },
            ));
            port += 1;
        }
    }
    out
}

/// The cluster Envoy's `tcp_proxy` relays to, named as Istio names the Service's port.
pub const TCP_ECHO_CLUSTER: &str = "outbound|7000||tcpecho.default.svc.cluster.local";

fn json(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// Envoy listeners (JSON) for the TCP cases, and the echo cluster: each plugin in its own VM
/// (`vm_id` = its name), as each WasmPlugin gets its own instance in Waystone.
pub fn envoy_listeners(
    ip: &str,
    corpora: &[Corpus],
    setups: &[(usize, usize, CaseSetup)],
) -> Vec<String> {
    setups
        .iter()
        .map(|(ci, _, s)| {
            let c = &corpora[*ci];
            let wasm = crate::wasm_of(c);
            let mut filters: Vec<String> = s
                .k8s_names
                .iter()
                .zip(&s.configs)
                .map(|(name, config)| {
                    let name = format!("default.{name}");
                    format!(
                        r#"{{"name": "envoy.filters.network.wasm", "typed_config": {{
  "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
  "config": {{"name": {n}, "root_id": {root_id},
    "configuration": {{"@type": "type.googleapis.com/google.protobuf.StringValue", "value": {config}}},
    "vm_config": {{"vm_id": {n}, "runtime": "envoy.wasm.runtime.v8", "code": {{"local": {{"filename": {wasm}}}}}}}}}}}}}"#,
                        n = json(&name),
                        root_id = json(&c.root_id),
                        config = json(config),
                        wasm = json(wasm.to_str().unwrap()),
                    )
                })
                .collect();
            filters.push(format!(
                r#"{{"name": "envoy.filters.network.tcp_proxy", "typed_config": {{
  "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
  "stat_prefix": "tcp{port}", "cluster": {cluster}}}}}"#,
                port = s.port,
                cluster = json(TCP_ECHO_CLUSTER)
            ));
            format!(
                r#"{{"name": "tcp-{port}", "address": {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}},
  "filter_chains": [{{"filters": [{filters}]}}]}}"#,
                port = s.port,
                filters = filters.join(",\n")
            )
        })
        .collect()
}

pub fn envoy_cluster(echo: SocketAddr) -> String {
    format!(
        r#"{{"name": {cluster}, "connect_timeout": "2s", "type": "STATIC",
   "load_assignment": {{"cluster_name": {cluster}, "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address":
     {{"socket_address": {{"address": "{ip}", "port_value": {port}}}}}}}}}]}}]}}}}"#,
        cluster = json(TCP_ECHO_CLUSTER),
        ip = echo.ip(),
        port = echo.port()
    )
}

/// Waystone's objects for the TCP cases: the `tcpecho` Service and, per case, a Gateway with
/// a TCP listener, a TCPRoute and the case's WasmPlugins (`type: NETWORK`; earlier in the
/// chain = higher priority).
pub fn manifests(
    corpora: &[Corpus],
    setups: &[(usize, usize, CaseSetup)],
    echo: SocketAddr,
) -> String {
    let mut out = format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: tcpecho\nspec:\n  ports:\n  - name: tcp-echo\n    port: 7000\n    protocol: TCP\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: tcpecho-local\n  labels:\n    kubernetes.io/service-name: tcpecho\n\
         addressType: IPv4\nendpoints:\n- addresses:\n  - \"{}\"\n  conditions:\n    ready: true\nports:\n- name: tcp-echo\n  port: {}\n  protocol: TCP\n",
        echo.ip(),
        echo.port()
    );
    for (ci, _, s) in setups {
        let c = &corpora[*ci];
        let gw = gateway_name(s);
        let url = format!("file://{}", crate::wasm_of(c).display());
        let plugin_name = if c.root_id.is_empty() {
            String::new()
        } else {
            format!("  pluginName: {}\n", json(&c.root_id))
        };
        let _ = write!(
            out,
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {gw}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - name: tcp\n    port: {port}\n    protocol: TCP\n\
             ---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata:\n  name: {gw}\nspec:\n  parentRefs:\n  - name: {gw}\n  rules:\n  - backendRefs:\n    - name: tcpecho\n      port: 7000\n",
            port = s.port
        );
        for (n, (name, config)) in s.k8s_names.iter().zip(&s.configs).enumerate() {
            let config = if config.is_empty() {
                String::new()
            } else {
                format!("  pluginConfig: {config}\n")
            };
            let _ = write!(
                out,
                "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: {gw}\n  url: {url}\n  type: NETWORK\n  priority: {priority}\n{plugin_name}{config}",
                priority = 100 - n as i32
            );
        }
    }
    out
}

pub fn gateway_name(s: &CaseSetup) -> String {
    // The first plugin's name without its `-p1`.
    s.k8s_names[0].trim_end_matches("-p1").to_string()
}

/// One proxy as a TCP case sees it: where to connect, and every log line of the plugins whose
/// name starts with `default.diff-` (name, line), oldest first.
pub struct TcpSide<'a> {
    pub addr: String,
    pub logs: Box<dyn Fn() -> Vec<(String, LogLine)> + 'a>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOutcome {
    pub received: Vec<u8>,
    pub end: String,
    pub logs: Vec<String>,
}

/// The lines of `names` written since `from`, each as `[n] message` (n: place in the chain).
fn case_lines(all: &[(String, LogLine)], from: usize, names: &[String]) -> Vec<String> {
    all.iter()
        .skip(from)
        .filter_map(|(name, l)| {
            let n = names.iter().position(|x| x == name)?;
            Some(format!("[{}] {}", n + 1, l.message))
        })
        .collect()
}

fn read_some(s: &mut TcpStream, received: &mut Vec<u8>, end: &mut Option<String>) {
    let mut buf = [0u8; 4096];
    match s.read(&mut buf) {
        Ok(0) => *end = Some("eof".into()),
        Ok(n) => received.extend_from_slice(&buf[..n]),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        Err(_) => *end = Some("reset".into()),
    }
}

/// Plays the script on one proxy and collects what the client and the plugins saw.
fn play(side: &TcpSide<'_>, case: &TcpCase, names: &[String]) -> Result<TcpOutcome, String> {
    let from = (side.logs)().len();
    let mut s =
        TcpStream::connect(&side.addr).map_err(|e| format!("connect {}: {e}", side.addr))?;
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut received = Vec::new();
    let mut end: Option<String> = None;
    let mut problems = Vec::new();
    for step in &case.script {
        match step {
            Step::Send(text) => {
                if let Err(e) = s.write_all(text.as_bytes()) {
                    problems.push(format!("send {text:?}: {e}"));
                }
            }
            Step::Shutdown => {
                let _ = s.shutdown(Shutdown::Write);
            }
            Step::Recv(text) => {
                let deadline = Instant::now() + STEP_WAIT;
                while !received.ends_with(text.as_bytes()) && end.is_none() {
                    if Instant::now() > deadline {
                        problems.push(format!(
                            "never received {text:?} (got {:?})",
                            String::from_utf8_lossy(&received)
                        ));
                        break;
                    }
                    read_some(&mut s, &mut received, &mut end);
                }
            }
            Step::Log(text) => {
                let deadline = Instant::now() + STEP_WAIT;
                while !case_lines(&(side.logs)(), from, names)
                    .iter()
                    .any(|l| l.contains(text.as_str()))
                {
                    if Instant::now() > deadline {
                        problems.push(format!("no plugin logged {text:?}"));
                        break;
                    }
                    read_some(&mut s, &mut received, &mut end);
                }
            }
        }
    }
    let deadline = Instant::now() + END_WAIT;
    while end.is_none() {
        if Instant::now() > deadline {
            end = Some("open".into());
            break;
        }
        read_some(&mut s, &mut received, &mut end);
    }
    drop(s);
    // Every plugin of the chain logs `end` from on_log: wait for all of them.
    let deadline = Instant::now() + END_WAIT;
    let logs = loop {
        let lines = case_lines(&(side.logs)(), from, names);
        let fences = lines.iter().filter(|l| l.ends_with("] end")).count();
        if fences >= names.len() {
            break lines;
        }
        if Instant::now() > deadline {
            problems.push(format!(
                "only {fences} of {} plugins logged `end`",
                names.len()
            ));
            break lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let outcome = TcpOutcome {
        received,
        end: end.unwrap_or_default(),
        logs,
    };
    if problems.is_empty() {
        Ok(outcome)
    } else {
        Err(format!(
            "{} (received {:?}, end {}, logs{})",
            problems.join("; "),
            String::from_utf8_lossy(&outcome.received),
            outcome.end,
            show(&outcome.logs)
        ))
    }
}

fn show(l: &[String]) -> String {
    l.iter().map(|l| format!("\n      {l}")).collect()
}

fn check(expect: &TcpExpect, o: &TcpOutcome) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = &expect.received
        && o.received != r.as_bytes()
    {
        out.push(format!(
            "received {:?} (expected {r:?})",
            String::from_utf8_lossy(&o.received)
        ));
    }
    if let Some(e) = &expect.end
        && &o.end != e
    {
        out.push(format!("ended {} (expected {e})", o.end));
    }
    for needle in &expect.logs_contain {
        if !o.logs.iter().any(|l| l.contains(needle.as_str())) {
            out.push(format!("no log line contains {needle:?}"));
        }
    }
    out
}

fn compare(e: &TcpOutcome, w: &TcpOutcome) -> Vec<(&'static str, String)> {
    let mut d = Vec::new();
    if e.received != w.received {
        d.push((
            "received",
            format!(
                "\n    envoy:    {:?}\n    waystone: {:?}",
                String::from_utf8_lossy(&e.received),
                String::from_utf8_lossy(&w.received)
            ),
        ));
    }
    if e.end != w.end {
        d.push(("end", format!("envoy {} / waystone {}", e.end, w.end)));
    }
    if e.logs != w.logs {
        d.push((
            "logs",
            format!(
                "\n    envoy:{}\n    waystone:{}",
                show(&e.logs),
                show(&w.logs)
            ),
        ));
    }
    d
}

/// Runs one TCP case through both proxies and records the verdict.
pub fn run_case(
    corpus: &Corpus,
    case: &TcpCase,
    setup: &CaseSetup,
    envoy: &TcpSide<'_>,
    ws: &TcpSide<'_>,
    report: &mut Report,
) {
    let id = format!("{}/tcp/{}", corpus.plugin, case.name);
    let names: Vec<String> = setup
        .k8s_names
        .iter()
        .map(|n| format!("default.{n}"))
        .collect();
    let e = play(envoy, case, &names);
    let w = play(ws, case, &names);
    super::judge(
        report,
        &id,
        (e, w),
        |o| case.expect.as_ref().map_or_else(Vec::new, |x| check(x, o)),
        |e, w| (compare(e, w), Vec::new()),
        case.differs.as_ref(),
    );
}

/// Envoy: `... wasm log <name>: <msg>` for plugin names starting with `prefix`.
pub fn envoy_lines(text: &str, prefix: &str) -> Vec<(String, LogLine)> {
    text.lines()
        .filter_map(|l| {
            let idx = l.find("] wasm log ")?;
            let level = super::envoy::level_of(l.split("][").nth(2)?)?;
            let rest = &l[idx + "] wasm log ".len()..];
            let (name, message) = rest.split_once(": ")?;
            // `<name> <root_id>` when a root id is set.
            let name = name.split(' ').next()?;
            plugin_line(prefix, name, level, message)
        })
        .collect()
}

/// A log line of a plugin whose name starts with `prefix` (the case's plugins), by name.
fn plugin_line(prefix: &str, name: &str, level: u8, message: &str) -> Option<(String, LogLine)> {
    name.starts_with(prefix).then(|| {
        (
            name.to_string(),
            LogLine {
                level,
                message: message.to_string(),
            },
        )
    })
}

/// Waystone: `<time> <LEVEL> waystone::wasm: <msg> plugin=<name>`.
pub fn waystone_lines(text: &str, prefix: &str) -> Vec<(String, LogLine)> {
    text.lines()
        .filter_map(|l| {
            let idx = l.find(" waystone::wasm: ")?;
            let level =
                super::envoy::level_of(&l[..idx].split_whitespace().last()?.to_ascii_lowercase())?;
            let rest = &l[idx + " waystone::wasm: ".len()..];
            let (message, name) = rest.rsplit_once(" plugin=")?;
            plugin_line(prefix, name, level, message)
        })
        .collect()
}
