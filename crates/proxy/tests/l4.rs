//! L4 (`type: NETWORK`) plugins on a gateway listener of protocol TCP routed by a TCPRoute:
//! the SDK plugin `rust_tcp` (crates.io proxy-wasm 0.2) against a TCP echo backend, with the
//! exact order of the callbacks it logs.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

/// Every plugin log line of this process (`proxy_log` → tracing target `waystone::wasm`).
fn plugin_lines() -> Arc<Mutex<Vec<u8>>> {
    static LINES: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LINES
        .get_or_init(|| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = lines.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("waystone::wasm=info")
                .without_time()
                .with_target(false)
                .with_level(false)
                .with_ansi(false)
                .with_writer(move || Sink(sink.clone()))
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            lines
        })
        .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The messages plugin `plugin` (`<namespace>.<name>`) logged, oldest first.
fn logs_of(plugin: &str) -> Vec<String> {
    let suffix = format!(" plugin={plugin}");
    let text = String::from_utf8_lossy(&plugin_lines().lock().unwrap()).into_owned();
    text.lines()
        .filter_map(|l| l.trim().strip_suffix(&suffix).map(str::to_string))
        .collect()
}

/// Waits (bounded) until `plugin` logged `line` `count` times.
async fn wait_for_log(plugin: &str, line: &str, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logs = logs_of(plugin);
        if logs.iter().filter(|l| l.as_str() == line).count() >= count {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{plugin} never logged {line:?} ({count}x); it logged {logs:#?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP echo server: every byte read is written back; the end of stream is echoed too.
async fn echo_backend(ip: IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A Service `echo` on the backend, a Gateway `name` with a TCP listener, a TCPRoute to the
/// service, and a NETWORK WasmPlugin `<name>-l4` (plus an HTTP one, which must not run).
fn l4_manifests(name: &str, backend: SocketAddr, strategy: &str, config: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default}}
spec:
  ports: [{{name: tcp-echo, port: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints: [{{addresses: ["{ip}"]}}]
ports: [{{name: tcp-echo, port: {port}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {name}, namespace: default}}
spec:
  gatewayClassName: istio
  listeners: [{{name: tcp, port: 7000, protocol: TCP}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: {name}-route, namespace: default}}
spec:
  parentRefs: [{{name: {name}, sectionName: tcp}}]
  rules:
  - backendRefs: [{{name: echo, port: 7000}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}-l4, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: {name}}}]
  url: file:///unused.wasm
  type: NETWORK
  failStrategy: {strategy}
  pluginConfig: {config}
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}-http, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: {name}}}]
  url: file:///unused.wasm
"#,
        ip = backend.ip(),
        port = backend.port()
    )
}

async fn gateway(
    salt: u8,
    name: &str,
    strategy: &str,
    config: &str,
) -> (waystone_proxy::DataPlane, SocketAddr, SocketAddr) {
    plugin_lines();
    let ip = net(salt);
    let backend = echo_backend(ip).await;
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let tcp = compile(&engine, &plugin_wasm("rust_tcp"));
    let rt = runtime(&l4_manifests(name, backend, strategy, config), |_| {
        tcp.clone()
    });
    // HTTP plugins stay off TCP listeners: only the NETWORK one is in the chain.
    let gw = rt
        .snapshot
        .gateways
        .iter()
        .find(|g| g.key.name == name)
        .unwrap();
    assert_eq!(
        gw.listeners[0].chain,
        vec![plugin_id(&format!("{name}-l4"))]
    );
    let dp = dataplane(ip, 1).await;
    let addr = apply(&dp, rt, name).await;
    (dp, addr, backend)
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .expect("reply in time")
        .unwrap();
    buf
}

async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("the proxy closed the connection in time")
        .unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_held_rewritten_and_every_callback_is_logged_in_order() {
    let config =
        r#"{rewrite_from: "ping", rewrite_to: "PONG", hold_until: "\n", log_properties: true}"#;
    let (dp, addr, backend) = gateway(1, "l4-order", "FAIL_CLOSE", config).await;
    let plugin = "default.l4-order-l4";

    let mut s = TcpStream::connect(addr).await.unwrap();
    let client = s.local_addr().unwrap();
    s.write_all(b"hel").await.unwrap();
    // The plugin pauses on a partial line: the proxy holds the bytes...
    wait_for_log(plugin, "holding 3 bytes", 1).await;
    s.write_all(b"lo ping\n").await.unwrap();
    // ...and hands them back with what follows: one rewritten line reaches the backend.
    assert_eq!(read_exactly(&mut s, 11).await, b"hello PONG\n");
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    let logs = wait_for_log(plugin, "end", 1).await;

    let expected = vec![
        "new_connection".to_string(),
        format!("properties source={client} destination={addr} connection_id=ID"),
        "downstream_data size=3 eos=false".into(),
        "holding 3 bytes".into(),
        "downstream_data size=11 eos=false".into(),
        "upstream_data size=11 eos=false".into(),
        "downstream_data size=0 eos=true".into(),
        "upstream_data size=0 eos=true".into(),
        "upstream_close peer=unknown".into(),
        // The client's end came first; the proxy's half-close after the echo's end completed
        // the close: a local close, as Envoy reports it.
        "downstream_close peer=local".into(),
        "done".into(),
        "bytes downstream=11 upstream=11".into(),
        format!("upstream={backend}"),
        "end".into(),
    ];
    let logs: Vec<String> = logs
        .into_iter()
        .map(|l| match l.split_once("connection_id=") {
            Some((head, id)) if id.parse::<u64>().is_ok() => format!("{head}connection_id=ID"),
            _ => l,
        })
        .collect();
    assert_eq!(logs, expected);
    dp.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stream_from_the_plugin_closes_the_connection() {
    let (dp, addr, _) = gateway(2, "l4-close", "FAIL_CLOSE", r#"{close_on: "QUIT"}"#).await;
    let plugin = "default.l4-close-l4";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hi\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 3).await, b"hi\n");
    s.write_all(b"QUIT\n").await.unwrap();
    // Closed by the proxy: nothing of the trigger reaches the echo, so nothing comes back.
    assert_eq!(read_to_end(&mut s).await, b"");
    let logs = wait_for_log(plugin, "end", 1).await;
    assert_eq!(
        logs,
        [
            "new_connection",
            "downstream_data size=3 eos=false",
            "upstream_data size=3 eos=false",
            "downstream_data size=5 eos=false",
            "closing the connection",
            "downstream_close peer=local",
            "done",
            "bytes downstream=3 upstream=3",
            "end",
        ]
    );
    let mut metrics = String::new();
    waystone_proxy::metrics::render_prometheus(&mut metrics);
    assert!(
        metrics.contains(&format!(
            "waystone_wasm_plugin_calls_total{{plugin=\"{plugin}\",callback=\"proxy_on_downstream_data\",outcome=\"close\",response_code=\"\"}} 1"
        )),
        "{metrics}"
    );
    dp.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_closes_the_connection_when_failing_closed_and_is_bypassed_when_open() {
    let (dp, addr, _) = gateway(3, "l4-trap", "FAIL_CLOSE", r#"{trap_on: "BOOM"}"#).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"BOOM\n").await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    // The faulted instance is replaced: the next connection is served.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"fine\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"fine\n");
    let mut metrics = String::new();
    waystone_proxy::metrics::render_prometheus(&mut metrics);
    assert!(
        metrics.contains(
            "plugin=\"default.l4-trap-l4\",callback=\"proxy_on_downstream_data\",outcome=\"trap\""
        ),
        "{metrics}"
    );
    dp.shutdown(Duration::from_secs(1)).await;

    let (dp, addr, _) = gateway(4, "l4-open", "FAIL_OPEN", r#"{trap_on: "BOOM"}"#).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"BOOM\n").await.unwrap();
    // FAIL_OPEN: the plugin is bypassed and the bytes flow on, the held ones included.
    assert_eq!(read_exactly(&mut s, 5).await, b"BOOM\n");
    s.write_all(b"more\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 5).await, b"more\n");
    dp.shutdown(Duration::from_secs(1)).await;
}

/// The waypoint's HBONE relay of a TCP service port runs the port's NETWORK plugins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_tcp_ports_run_network_plugins_on_the_hbone_relay() {
    use waystone_proxy::hbone::ca::LocalCa;
    use waystone_proxy::hbone::{HboneClient, HboneConfig, HboneOutbound, Identity, SpiffeId};

    plugin_lines();
    let ip = net(5);
    let backend = echo_backend(ip).await;
    let yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/use-waypoint: waypoint}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata: {{name: db, namespace: default}}
spec:
  clusterIP: 10.96.0.20
  ports: [{{name: tcp-db, port: 5432}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  namespace: default
  labels: {{kubernetes.io/service-name: db}}
addressType: IPv4
endpoints: [{{addresses: ["{ip}"]}}]
ports: [{{name: tcp-db, port: {port}}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: wp-l4, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  url: file:///unused.wasm
  type: NETWORK
  pluginConfig: {{rewrite_from: "ping", rewrite_to: "PONG", log_properties: true}}
"#,
        ip = backend.ip(),
        port = backend.port()
    );
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let tcp = compile(&engine, &plugin_wasm("rust_tcp"));
    let rt = runtime(&yaml, |_| tcp.clone());
    let dir = tempfile::tempdir().unwrap();
    let ca = LocalCa::load_or_create(&dir.path().join("ca")).unwrap();
    let identity = |ns: &str, sa: &str| {
        let issued = ca
            .issue(
                &SpiffeId::new("cluster.local", ns, sa),
                Duration::from_secs(86_400),
            )
            .unwrap();
        Arc::new(
            Identity::from_pem(
                "cluster.local",
                issued.cert_chain_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                ca.root_pem().as_bytes(),
            )
            .unwrap(),
        )
    };
    let dp = waystone_proxy::DataPlane::start(waystone_proxy::DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        hbone: Some(HboneConfig {
            identity: identity("istio-system", "waypoint"),
            inbound: true,
            entry: false,
            outbound: HboneOutbound::default(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let waypoint = apply(&dp, rt, "waypoint").await;
    let client = HboneClient::new(identity("default", "sleep"));
    let mut s = client
        .connect(waypoint, "10.96.0.20:5432", None)
        .await
        .unwrap();
    s.write_all(b"ping\n").await.unwrap();
    let mut reply = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut reply))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&reply, b"PONG\n");
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("end in time")
        .unwrap();
    assert!(rest.is_empty());
    let logs = wait_for_log("default.wp-l4", "end", 1).await;
    // The CONNECT authority is the destination the plugin sees.
    assert!(
        logs[1].starts_with("properties source=")
            && logs[1].contains(" destination=10.96.0.20:5432 "),
        "{logs:?}"
    );
    let callbacks: Vec<&str> = logs
        .iter()
        .map(String::as_str)
        .filter(|l| !l.starts_with("properties") && !l.starts_with("upstream="))
        .collect();
    assert_eq!(
        callbacks,
        [
            "new_connection",
            "downstream_data size=5 eos=false",
            "upstream_data size=5 eos=false",
            "downstream_data size=0 eos=true",
            "upstream_data size=0 eos=true",
            "upstream_close peer=unknown",
            "downstream_close peer=local",
            "done",
            "bytes downstream=5 upstream=5",
            "end",
        ]
    );
    assert!(logs.contains(&format!("upstream={backend}")), "{logs:?}");
    dp.shutdown(Duration::from_secs(1)).await;
}

/// A Pause from `proxy_on_new_connection` holds the connection (nothing read, no upstream
/// connect) until the plugin's root context continues it from a tick (Envoy's
/// `continueReading`); then the bytes sent meanwhile flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_paused_waits_for_its_root_context() {
    let config = r#"{pause_on_new_connection: true, resume_after_ms: 50}"#;
    let (dp, addr, _) = gateway(6, "l4-resume", "FAIL_CLOSE", config).await;
    let plugin = "default.l4-resume-l4";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"early\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 6).await, b"early\n");
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    let logs = wait_for_log(plugin, "end", 1).await;
    assert_eq!(
        logs[..5],
        [
            "new_connection",
            "pausing the new connection",
            "root resumes a paused connection",
            "downstream_data size=6 eos=false",
            "upstream_data size=6 eos=false",
        ],
        "{logs:#?}"
    );
    dp.shutdown(Duration::from_secs(1)).await;
}

/// The root context closes a connection its plugin holds (`proxy_set_effective_context` +
/// `proxy_close_stream`): a local close, and the plugin never saw data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_context_closes_a_held_connection() {
    let config = r#"{pause_on_new_connection: true, resume_after_ms: 50, root_action: close}"#;
    let (dp, addr, _) = gateway(7, "l4-rootclose", "FAIL_CLOSE", config).await;
    let plugin = "default.l4-rootclose-l4";
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    let logs = wait_for_log(plugin, "end", 1).await;
    assert_eq!(
        logs,
        [
            "new_connection",
            "pausing the new connection",
            "root closes a paused connection",
            "downstream_close peer=local",
            "done",
            "bytes downstream=0 upstream=0",
            "end",
        ]
    );
    dp.shutdown(Duration::from_secs(1)).await;
}

/// A connection's own context sends `proxy_http_call` while it holds its new connection; the
/// answer (here the TCP echo is no HTTP server, so the callout fails and is answered locally)
/// reaches that context, whose `proxy_continue_stream(2)` lets the connection through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_resumes_from_its_own_callout_answer() {
    let config = r#"{pause_on_new_connection: true, connection_callout: true, callout_upstream: "outbound|7000||echo.default.svc.cluster.local"}"#;
    let (dp, addr, _) = gateway(0, "l4-owncall", "FAIL_CLOSE", config).await;
    let plugin = "default.l4-owncall-l4";
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"after\n").await.unwrap();
    assert_eq!(read_exactly(&mut s, 6).await, b"after\n");
    s.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, b"");
    let logs = wait_for_log(plugin, "end", 1).await;
    assert_eq!(
        logs[..3],
        [
            "new_connection",
            "connection sent a callout",
            "pausing the new connection"
        ],
        "{logs:#?}"
    );
    assert!(
        logs[3].starts_with("connection callout answered "),
        "{logs:#?}"
    );
    assert_eq!(logs[4], "downstream_data size=6 eos=false", "{logs:#?}");
    dp.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_not_read_while_plugins_hold_a_full_buffer() {
    // The plugin holds everything until a newline that never comes.
    let (_dp, addr, _) = gateway(2, "l4-full", "FAIL_CLOSE", r#"{hold_until: "\n"}"#).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    // 8 MiB offered; the proxy may take at most its 1 MiB limit plus one read event before
    // it stops reading, so most of it must stay unsent (in the client's and the kernel's
    // buffers) however long the client keeps trying.
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0usize;
    let deadline = Instant::now() + Duration::from_secs(2);
    while sent < 8 << 20 && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), client.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => panic!("write failed: {e}"),
            Err(_) => {} // blocked: the proxy stopped reading
        }
    }
    let sizes: Vec<usize> = logs_of("default.l4-full-l4")
        .iter()
        .filter_map(|l| {
            l.strip_prefix("downstream_data size=")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    let largest = sizes.iter().copied().max().unwrap_or(0);
    assert!(
        largest <= 2 << 20,
        "the plugin was shown {largest} held bytes at once (sent {sent})"
    );
    assert!(sent < 8 << 20, "the proxy kept reading all {sent} bytes");
}
