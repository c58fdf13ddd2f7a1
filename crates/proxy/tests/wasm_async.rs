//! Plugins that wait: HTTP callouts to a Service on loopback (with timeout), tick timers and
//! shared-queue notifications, through the real data plane and real sockets.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waystone_model::snapshot::{ExtensionKind, FailStrategy, ObjectKey, PluginId};
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::{DataPlane, DataPlaneConfig, LoadedPlugin, PluginSlot, RuntimeConfig};
use waystone_wasm::{EngineConfig, MetricValue, PluginSpec, WasmEngine};

/// Answers `<x-callout-status>|<x-callout-body>|<x-call-status>` from the request's headers
/// (main backend), or `rating 5` (the callout target), or never (the slow service).
async fn backend(ip: IpAddr, kind: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let h = |n: &str| {
                            req.headers()
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("-")
                                .to_string()
                        };
                        let body = match kind {
                            "main" => format!(
                                "{}|{}|{}",
                                h("x-callout-status"),
                                h("x-callout-body"),
                                h("x-call-status")
                            ),
                            "slow" => {
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                String::new()
                            }
                            _ => format!("rating 5 for {}", req.uri().path()),
                        };
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr, target: &str, extra: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: example.com\r\n{extra}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

fn manifests(main: SocketAddr, reviews: SocketAddr, slow: SocketAddr, port: u16) -> String {
    format!(
        r#"{}
---
{}
---
{}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: {port}, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - backendRefs: [{{name: productpage, port: 9080}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: waiter, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: gw}}]
  url: file:///unused.wasm
"#,
        support::service("productpage", main),
        support::service("reviews", reviews),
        support::service("slow", slow),
    )
}

/// The plugin: calls the upstream named by the request's `x-upstream` header and copies the
/// answer's `:status` and body into request headers before resuming; ticks every 20 ms; owns
/// queue "q" and counts what it dequeues; `/enqueue` puts an item on it.
fn plugin() -> Vec<u8> {
    let headers = support::serialize_pairs(&[
        (":method", "GET"),
        (":path", "/ratings"),
        (":authority", "reviews"),
    ]);
    let hex = support::wat_bytes(&headers);
    let basics = support::GUEST_BASICS;
    let wat = format!(
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg_q (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $res_q (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $def_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 65536))
  {basics}
  (data (i32.const 0) "x-upstream")
  (data (i32.const 16) ":status")
  (data (i32.const 32) "x-callout-status")
  (data (i32.const 48) "x-callout-body")
  (data (i32.const 64) "x-call-status")
  (data (i32.const 80) "q")
  (data (i32.const 88) "ticks")
  (data (i32.const 96) "queued")
  (data (i32.const 104) ":path")
  (data (i32.const 112) "item")
  (data (i32.const 0x1000) "{hex}")
  (func $count (param $p i32) (param $l i32)
    (drop (call $def_metric (i32.const 0) (local.get $p) (local.get $l) (i32.const 1996)))
    (drop (call $inc_metric (i32.load (i32.const 1996)) (i64.const 1))))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 20)))
    (drop (call $reg_q (i32.const 80) (i32.const 1) (i32.const 2000)))
    (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (call $count (i32.const 88) (i32.const 5)))
  (func (export "proxy_on_queue_ready") (param i32) (param $id i32)
    (if (i32.eqz (call $deq (local.get $id) (i32.const 1024) (i32.const 1028)))
      (then (call $count (i32.const 96) (i32.const 6)))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $s i32)
    ;; /enqueue: put an item on queue "q" (vm id "")
    (drop (call $get_hv (i32.const 0) (i32.const 104) (i32.const 5) (i32.const 1024) (i32.const 1028)))
    (if (i32.eq (i32.load8_u (i32.add (i32.load (i32.const 1024)) (i32.const 1))) (i32.const 101))
      (then
        (if (i32.eqz (call $res_q (i32.const 0) (i32.const 0) (i32.const 80) (i32.const 1) (i32.const 2004)))
          (then (drop (call $enq (i32.load (i32.const 2004)) (i32.const 112) (i32.const 4)))))
        (return (i32.const 0))))
    (if (call $get_hv (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 1024) (i32.const 1028))
      (then (return (i32.const 0))))
    (local.set $s (call $http_call (i32.load (i32.const 1024)) (i32.load (i32.const 1028))
      (i32.const 0x1000) (i32.const {hl}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 300) (i32.const 1040)))
    (if (local.get $s)
      (then
        (i32.store8 (i32.const 1100) (i32.add (i32.const 48) (local.get $s)))
        (drop (call $add_hv (i32.const 0) (i32.const 64) (i32.const 13) (i32.const 1100) (i32.const 1)))
        (return (i32.const 0))))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
    (if (i32.eqz (call $get_hv (i32.const 6) (i32.const 16) (i32.const 7) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 32) (i32.const 16)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))))
    (if (i32.eqz (call $get_buf (i32.const 4) (i32.const 0) (local.get $bs) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 48) (i32.const 14)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))))
    (drop (call $continue (i32.const 0))))
)"#,
        hl = headers.len()
    );
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

fn net() -> IpAddr {
    let pid = std::process::id();
    format!("127.91.{}.1", pid % 250 + 1).parse().unwrap()
}

fn metric(engine: &WasmEngine, name: &str) -> u64 {
    engine
        .metrics_snapshot()
        .iter()
        .find(|m| m.name == name)
        .map(|m| match m.value {
            MetricValue::Counter(c) => c,
            _ => 0,
        })
        .unwrap_or(0)
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_ticks_and_queues_through_the_data_plane() {
    let ip = net();
    let main = backend(ip, "main").await;
    let reviews = backend(ip, "reviews").await;
    let slow = backend(ip, "slow").await;
    let objects = parse_manifests(&manifests(main, reviews, slow, 18082), "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let snapshot = Arc::new(translation.snapshot);
    let id = PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", "waiter"),
    };
    let engine = WasmEngine::new(EngineConfig::default()).unwrap();
    let module = engine.compile(&plugin()).unwrap();
    let loaded = Arc::new(LoadedPlugin {
        id: id.clone(),
        module,
        spec: Arc::new(PluginSpec {
            name: "default.waiter".into(),
            ..PluginSpec::default()
        }),
        fail_strategy: FailStrategy::FailClose,
        revision: 7,
        module_digest: "sha256:test".into(),
    });
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 2,
        gateway_address: ip,
        entry_address: None,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut plugins = std::collections::BTreeMap::new();
    plugins.insert(id, PluginSlot::Ready(loaded));
    let bindings = dp
        .apply(RuntimeConfig {
            snapshot,
            plugins,
            default_namespace: "default".into(),
        })
        .await;
    let addr = *bindings[&ObjectKey::new("default", "gw")].listeners[0]
        .result
        .as_ref()
        .unwrap();

    // The request waits for the callout, then goes on with what it returned.
    for upstream in [
        "reviews:9080",
        "outbound|9080||reviews.default.svc.cluster.local",
    ] {
        let (status, text) = get(addr, "/p", &format!("x-upstream: {upstream}\r\n")).await;
        assert_eq!(status, 200, "{text}");
        assert!(
            text.ends_with("200|rating 5 for /ratings|-"),
            "{upstream}: {text}"
        );
    }
    // Unknown upstream: proxy_http_call answers BadArgument (2) at once.
    let (status, text) = get(addr, "/p", "x-upstream: nope:1\r\n").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("-|-|2"), "{text}");
    // The plugin's 300 ms timeout: Envoy's local 504 reaches the plugin.
    let started = Instant::now();
    let (status, text) = get(
        addr,
        "/p",
        "x-upstream: outbound|9080||slow.default.svc.cluster.local\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("504|upstream request timeout|-"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Ticks run on the worker that owns the instance.
    wait_for("two ticks", || metric(&engine, "ticks") >= 2).await;
    // A queue item enqueued by a request reaches the root context that registered it.
    let (status, _) = get(addr, "/enqueue", "").await;
    assert_eq!(status, 200);
    wait_for("the queue item", || metric(&engine, "queued") == 1).await;

    dp.shutdown(Duration::from_secs(2)).await;
}
