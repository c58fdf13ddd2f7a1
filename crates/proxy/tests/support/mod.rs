//! Shared by the data-plane reliability suites: a counting backend, a gateway with one
//! plugin built by the real translation, a keep-alive client, and the test plugins.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use waystone_model::snapshot::{ExtensionKind, FailStrategy, ObjectKey, PluginId};
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::{DataPlane, DataPlaneConfig, LoadedPlugin, PluginSlot, RuntimeConfig};
use waystone_wasm::{CompiledModule, EngineConfig, PluginSpec, WasmEngine};

/// The module `scripts/build-plugins.sh` wrote for plugin `name`.
pub fn plugin_wasm(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/wasm")
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/build-plugins.sh first",
            path.display()
        )
    })
}

/// A loopback address of this test process's own (127.91.X.Y), so parallel test processes
/// never share ports. `salt` separates the tests of one file.
pub fn net(salt: u8) -> IpAddr {
    let pid = std::process::id();
    // Gateways of one data plane take consecutive addresses from here: leave room.
    format!("127.91.{}.{}", pid % 250 + 1, u16::from(salt) * 36 + 1)
        .parse()
        .unwrap()
}

/// A listener on `ip`, any port, and its address.
pub async fn listen(ip: IpAddr) -> (tokio::net::TcpListener, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, addr)
}

/// Reads from `s` until a whole request head (up to its blank line) has arrived; `None` when
/// the peer closed or failed first.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// An HTTP/1.1 backend that counts the requests it received and answered; `/slow` answers
/// after 1 s.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    pub arrivals: Arc<AtomicU64>,
}

impl Backend {
    pub async fn start(ip: IpAddr) -> Backend {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let arrivals = Arc::new(AtomicU64::new(0));
        let (counter, arrived) = (hits.clone(), arrivals.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                let (counter, arrived) = (counter.clone(), arrived.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let counter = counter.clone();
                        arrived.fetch_add(1, Ordering::SeqCst);
                        async move {
                            if req.uri().path() == "/slow" {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            counter.fetch_add(1, Ordering::SeqCst);
                            let body = format!("{} {}", req.method(), req.uri().path());
                            let mut resp =
                                hyper::Response::builder().header("x-served-by", "backend");
                            // Hop-by-hop names in the head, which plugins must not be shown
                            // or counted (response_head.rs).
                            if req.uri().path() == "/c" {
                                resp = resp
                                    .header("keep-alive", "timeout=5")
                                    .header("connection", "keep-alive");
                            }
                            Ok::<_, std::convert::Infallible>(
                                resp.body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            hits,
            arrivals,
        }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    pub fn arrivals(&self) -> u64 {
        self.arrivals.load(Ordering::SeqCst)
    }
}

/// `(gateway name, port, plugin as (failStrategy, pluginConfig))`.
pub type GatewaySpec<'a> = (&'a str, u16, Option<(&'a str, &'a str)>);

/// A Service backed by `backend`, and for each `(gateway, port, plugin)` a Gateway, an
/// HTTPRoute to the service and (when `plugin` is set) a WasmPlugin `<gateway>-plugin` with
/// that `failStrategy` and `pluginConfig` (inline YAML).
pub fn manifests(backend: SocketAddr, gateways: &[GatewaySpec<'_>]) -> String {
    manifests_with_endpoints(&[backend], gateways)
}

/// [`manifests`] with one endpoint of the service per address of `backends` (all on the first
/// one's port: an EndpointSlice names one port for all its addresses).
pub fn manifests_with_endpoints(backends: &[SocketAddr], gateways: &[GatewaySpec<'_>]) -> String {
    let addresses = backends
        .iter()
        .map(|b| format!(r#"{{addresses: ["{}"]}}"#, b.ip()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: app, namespace: default}}
spec:
  ports: [{{name: http, port: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-1
  namespace: default
  labels: {{kubernetes.io/service-name: app}}
addressType: IPv4
endpoints: [{addresses}]
ports: [{{name: http, port: {port}}}]
"#,
        port = backends[0].port()
    );
    for (gw, port, plugin) in gateways {
        out.push_str(&format!(
            r#"---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {gw}, namespace: default}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {gw}-route, namespace: default}}
spec:
  parentRefs: [{{name: {gw}}}]
  rules:
  - backendRefs: [{{name: app, port: 8080}}]
"#
        ));
        if let Some((strategy, config)) = plugin {
            out.push_str(&format!(
                r#"---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {gw}-plugin, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: {gw}}}]
  url: file:///unused.wasm
  failStrategy: {strategy}
  pluginConfig: {config}
"#
            ));
        }
    }
    out
}

pub fn plugin_id(name: &str) -> PluginId {
    PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", name),
    }
}

static REVISIONS: AtomicU64 = AtomicU64::new(1);

/// Translates `yaml` and loads every plugin it names with `module_for(plugin name)`, each
/// with a new revision (so workers start fresh instances).
pub fn runtime(yaml: &str, module_for: impl Fn(&str) -> CompiledModule) -> RuntimeConfig {
    let objects = parse_manifests(yaml, "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let snapshot = Arc::new(translation.snapshot);
    let mut plugins = BTreeMap::new();
    for (id, cfg) in &snapshot.plugins {
        let plugin = LoadedPlugin {
            id: id.clone(),
            module: module_for(&id.key.name),
            spec: Arc::new(PluginSpec {
                name: cfg.filter_name.clone(),
                root_id: cfg.root_id.clone(),
                vm_id: String::new(),
                plugin_configuration: cfg.configuration.clone(),
                vm_configuration: Vec::new(),
                env: Vec::new(),
            }),
            fail_strategy: cfg.fail_strategy,
            revision: REVISIONS.fetch_add(1, Ordering::Relaxed),
            module_digest: "sha256:test".into(),
        };
        plugins.insert(id.clone(), PluginSlot::Ready(Arc::new(plugin)));
    }
    RuntimeConfig {
        snapshot,
        plugins,
        default_namespace: "default".into(),
    }
}

pub fn engine(call_deadline: Duration, max_memory_bytes: usize) -> WasmEngine {
    WasmEngine::new(EngineConfig {
        max_memory_bytes,
        call_deadline,
    })
    .unwrap()
}

pub async fn dataplane(ip: IpAddr, workers: usize) -> DataPlane {
    DataPlane::start(DataPlaneConfig {
        workers,
        gateway_address: ip,
        entry_address: None,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Applies `rt` and returns the address of gateway `gw`'s listener.
pub async fn apply(dp: &DataPlane, rt: RuntimeConfig, gw: &str) -> SocketAddr {
    apply_all(dp, rt).await[gw]
}

/// Applies `rt` and returns each gateway's listener address, by gateway name.
pub async fn apply_all(dp: &DataPlane, rt: RuntimeConfig) -> BTreeMap<String, SocketAddr> {
    dp.apply(rt)
        .await
        .into_iter()
        .map(|(key, binding)| (key.name, *binding.listeners[0].result.as_ref().unwrap()))
        .collect()
}

pub fn fail_strategy(name: &str) -> FailStrategy {
    match name {
        "FAIL_OPEN" => FailStrategy::FailOpen,
        "FAIL_RELOAD" => FailStrategy::FailReload,
        _ => FailStrategy::FailClose,
    }
}

/// A keep-alive HTTP/1.1 client (one pooled connection per concurrent request).
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub async fn send(
    c: &HttpClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = hyper::Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = c
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("request to {addr}{path} failed: {e:?}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// This process's resident set size, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Compiles a module with `engine`, panicking with the reason.
pub fn compile(engine: &WasmEngine, bytes: &[u8]) -> CompiledModule {
    engine.compile(bytes).unwrap()
}

/// A body fed frame by frame through a channel, for test backends and clients.
pub struct FrameChannel(pub tokio::sync::mpsc::Receiver<hyper::body::Frame<Bytes>>);

impl hyper::body::Body for FrameChannel {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

/// The test backends' gRPC echo: answers each length-prefixed message of `body` with
/// `echo:<message>` on `tx`, calling `on_reply` after each, until the body ends.
pub async fn grpc_echo(
    mut body: hyper::body::Incoming,
    tx: &tokio::sync::mpsc::Sender<hyper::body::Frame<Bytes>>,
    mut on_reply: impl FnMut(),
) {
    let mut buf = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Some(d) = frame.data_ref() else { continue };
        buf.extend_from_slice(d);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let reply = [b"echo:", &buf[5..5 + len]].concat();
            buf.drain(..5 + len);
            let mut framed = vec![0];
            framed.extend((reply.len() as u32).to_be_bytes());
            framed.extend(reply);
            let _ = tx.send(hyper::body::Frame::data(Bytes::from(framed))).await;
            on_reply();
        }
    }
}

/// The exports every hand-written test plugin needs beside its callbacks: a bump allocator
/// over the `$bump` global the module declares, the ABI version, an empty context create.
pub const GUEST_BASICS: &str = r#"  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))"#;

/// `bytes` as a WAT data string (`\xx` escapes).
pub fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// Proxy-Wasm's serialized header pairs (count, lengths, then NUL-terminated names and
/// values), for the hand-written plugins' callout headers.
pub fn serialize_pairs(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

/// [`manifests`] for gateway `gw` on `port` with a FAIL_CLOSE plugin of `config`, plus a
/// Service `reviews:9080` backed by `backend` (the callout upstream of the plugin tests).
pub fn gateway_with_reviews(backend: SocketAddr, port: u16, config: &str) -> String {
    let gateway = manifests(backend, &[("gw", port, Some(("FAIL_CLOSE", config)))]);
    format!("{gateway}\n---{}", service("reviews", backend))
}

/// A Service `name` (port 9080, `http`) with one endpoint, `addr`.
pub fn service(name: &str, addr: SocketAddr) -> String {
    service_labeled(name, addr, "")
}

/// [`service`] with `labels` (YAML flow-map entries, e.g. `app: echo`) on the Service.
pub fn service_labeled(name: &str, addr: SocketAddr, labels: &str) -> String {
    let labels = if labels.is_empty() {
        String::new()
    } else {
        format!(", labels: {{{labels}}}")
    };
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default{labels}}}
spec:
  ports: [{{name: http, port: 9080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{{addresses: ["{ip}"]}}]
ports: [{{name: http, port: {port}}}]
"#,
        ip = addr.ip(),
        port = addr.port()
    )
}
