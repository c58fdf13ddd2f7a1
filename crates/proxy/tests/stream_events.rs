//! Events of a request's contexts delivered at any time of its stream, as Envoy does: a body
//! paused mid-stream while a callout is in flight is held (later chunks appended) and flows on
//! when the callout's answer resumes it, both ways; a gRPC stream opened from the request
//! headers delivers its messages while the response streams, and is cancelled (no callbacks)
//! when the HTTP stream ends; `proxy_close_stream`, on the plugin's own stream or on a parked
//! one through `proxy_set_effective_context`, resets the stream (HTTP/1.1: the connection
//! closes without a response; h2: RST_STREAM) and the access log says `wasm_close_stream`.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use waystone_model::snapshot::AccessLogFormat;
use waystone_proxy::{DataPlane, DataPlaneConfig, ObservabilityConfig};
use waystone_wasm::{MetricValue, WasmEngine};

/// The plugin; its behaviour is chosen by the second byte of `:path`:
/// - `b` / `B`: the first request (`b`) or response (`B`) body callback calls `reviews:9080`
///   `/hold` and every body callback pauses until the answer, which resumes that side;
/// - `g`: the request headers open a gRPC stream and send one message (the stream stays open);
/// - `k`: parks the request; the root's next tick closes it through `proxy_set_effective_context`;
/// - `K`: closes its own stream from the request headers.
///
/// Counters: `body_calls` (body callbacks), `grpc_msgs`, `grpc_closes`.
fn plugin() -> Vec<u8> {
    let call = support::serialize_pairs(&[
        (":method", "GET"),
        (":path", "/hold"),
        (":authority", "reviews"),
    ]);
    let hex = support::wat_bytes(&call);
    let basics = support::GUEST_BASICS;
    let wat = format!(
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $grpc_stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $def_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 65536))
  (global $calling (mut i32) (i32.const 0))
  (global $answered (mut i32) (i32.const 0))
  (global $parked (mut i32) (i32.const 0))
  {basics}
  (data (i32.const 0) ":path")
  (data (i32.const 16) "reviews:9080")
  (data (i32.const 32) "echo.Echo")
  (data (i32.const 48) "Stream")
  (data (i32.const 56) "one")
  (data (i32.const 64) "grpc_msgs")
  (data (i32.const 80) "grpc_closes")
  (data (i32.const 96) "body_calls")
  (data (i32.const 0x1800) "\00\00\00\00")
  (data (i32.const 0x1000) "{hex}")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 10)))
    (i32.const 1))
  (func $count (param $name i32) (param $len i32)
    (drop (call $def_metric (i32.const 0) (local.get $name) (local.get $len) (i32.const 1048)))
    (drop (call $inc_metric (i32.load (i32.const 1048)) (i64.const 1))))
  (func $mode (result i32)
    (if (call $get_hv (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 1024) (i32.const 1028))
      (then (return (i32.const 0))))
    (i32.load8_u (i32.add (i32.load (i32.const 1024)) (i32.const 1))))
  ;; A body callback of the side `want` (98 request, 66 response): calls once, pauses until
  ;; the answer.
  (func $body (param $want i32) (result i32)
    (if (i32.ne (call $mode) (local.get $want)) (then (return (i32.const 0))))
    (call $count (i32.const 96) (i32.const 10))
    (if (global.get $answered) (then (return (i32.const 0))))
    (if (i32.eqz (global.get $calling))
      (then
        (global.set $calling (i32.const 1))
        (drop (call $http_call (i32.const 16) (i32.const 12)
          (i32.const 0x1000) (i32.const {len}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.const 5000) (i32.const 1040)))))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $m i32)
    (local.set $m (call $mode))
    (global.set $calling (i32.const 0))
    (global.set $answered (i32.const 0))
    (if (i32.eq (local.get $m) (i32.const 107))
      (then
        (global.set $parked (local.get $ctx))
        (return (i32.const 1))))
    (if (i32.eq (local.get $m) (i32.const 75))
      (then (drop (call $close (i32.const 0)))))
    (if (i32.eq (local.get $m) (i32.const 103))
      (then
        (if (i32.eqz (call $grpc_stream (i32.const 16) (i32.const 12) (i32.const 32) (i32.const 9)
              (i32.const 48) (i32.const 6) (i32.const 0x1800) (i32.const 4) (i32.const 1044)))
          (then (drop (call $grpc_send (i32.load (i32.const 1044)) (i32.const 56) (i32.const 3) (i32.const 0)))))))
    (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $body (i32.const 98)))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (call $body (i32.const 66)))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (global.set $answered (i32.const 1))
    (drop (call $continue (i32.eq (call $mode) (i32.const 66)))))
  (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
    (call $count (i32.const 64) (i32.const 9)))
  (func (export "proxy_on_grpc_close") (param i32 i32 i32)
    (call $count (i32.const 80) (i32.const 11)))
  (func (export "proxy_on_tick") (param i32)
    (if (i32.eqz (global.get $parked)) (then (return)))
    (if (i32.eqz (call $effective (global.get $parked)))
      (then (drop (call $close (i32.const 0)))))
    (global.set $parked (i32.const 0)))
)"#,
        len = call.len(),
    );
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

struct Backend {
    addr: SocketAddr,
    /// The first request-body frame of each echoed request, as it arrives.
    first_bytes: mpsc::UnboundedReceiver<Bytes>,
    /// `/hold` answers once notified.
    hold: Arc<Notify>,
    /// `/two` sends `two` once notified.
    two: Arc<Notify>,
    /// Each gRPC message the echo stream answered.
    echoed: mpsc::UnboundedReceiver<()>,
}

/// `/hold`: `held` once released. `…/two`: `one`, then `two` once released.
/// `/echo.Echo/Stream`: answers each gRPC message with `echo:<message>` and stays open.
/// Otherwise: `body=<request body>`.
async fn backend(ip: IpAddr) -> Backend {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (first_tx, first_bytes) = mpsc::unbounded_channel();
    let (echo_tx, echoed) = mpsc::unbounded_channel();
    let (hold, two) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let (hold2, two2) = (hold.clone(), two.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let (first_tx, echo_tx) = (first_tx.clone(), echo_tx.clone());
            let (hold, two) = (hold2.clone(), two2.clone());
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (first_tx, echo_tx) = (first_tx.clone(), echo_tx.clone());
                let (hold, two) = (hold.clone(), two.clone());
                async move {
                    let (tx, rx) = mpsc::channel(4);
                    let mut resp_headers = Vec::new();
                    match req.uri().path() {
                        "/hold" => {
                            hold.notified().await;
                            let _ = tx.send(Frame::data(Bytes::from("held"))).await;
                        }
                        p if p.ends_with("/two") => {
                            let _ = tx.send(Frame::data(Bytes::from("one"))).await;
                            tokio::spawn(async move {
                                two.notified().await;
                                let _ = tx.send(Frame::data(Bytes::from("two"))).await;
                            });
                        }
                        "/echo.Echo/Stream" => {
                            resp_headers.push(("content-type", "application/grpc"));
                            let body = req.into_body();
                            tokio::spawn(async move {
                                support::grpc_echo(body, &tx, || {
                                    let _ = echo_tx.send(());
                                })
                                .await;
                            });
                        }
                        _ => {
                            let mut body = req.into_body();
                            let mut got = Vec::new();
                            while let Some(Ok(frame)) = body.frame().await {
                                if let Some(d) = frame.data_ref() {
                                    if got.is_empty() {
                                        let _ = first_tx.send(d.clone());
                                    }
                                    got.extend_from_slice(d);
                                }
                            }
                            let text = format!("body={}", String::from_utf8_lossy(&got));
                            let _ = tx.send(Frame::data(Bytes::from(text))).await;
                        }
                    }
                    let mut resp = hyper::Response::new(support::FrameChannel(rx));
                    for (k, v) in resp_headers {
                        resp.headers_mut().insert(k, v.parse().unwrap());
                    }
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend {
        addr,
        first_bytes,
        hold,
        two,
        echoed,
    }
}

struct Setup {
    dp: DataPlane,
    addr: SocketAddr,
    backend: Backend,
    engine: WasmEngine,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn start(salt: u8) -> Setup {
    let ip = support::net(salt);
    let backend = backend(ip).await;
    let engine = support::engine(Duration::from_secs(1), 64 << 20);
    let module = support::compile(&engine, &plugin());
    let rt = support::runtime(
        &support::gateway_with_reviews(backend.addr, 18190 + u16::from(salt), "{}"),
        |_| module.clone(),
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        observability: ObservabilityConfig {
            access_log: AccessLogFormat::Json,
            access_log_file: Some(log.clone()),
            otlp_endpoint: None,
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = support::apply(&dp, rt, "gw").await;
    Setup {
        dp,
        addr,
        backend,
        engine,
        log,
        _dir: dir,
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
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

async fn wait_for<T>(what: &str, mut ok: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = ok() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn read_until(s: &mut tokio::net::TcpStream, got: &mut Vec<u8>, needle: &[u8]) {
    let mut buf = [0u8; 4096];
    while !got.windows(needle.len()).any(|w| w == needle) {
        let n = within("more of the response", s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_paused_mid_stream_flows_on_when_the_callout_resumes_it() {
    let mut t = start(0).await;
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    s.write_all(
        b"POST /b HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\naaa\r\n",
    )
    .await
    .unwrap();
    wait_for("the first body callback", || {
        (metric(&t.engine, "body_calls") == 1).then_some(())
    })
    .await;
    // Held with the first: the plugin is shown both, and nothing goes upstream yet.
    s.write_all(b"3\r\nbbb\r\n").await.unwrap();
    wait_for("the second body callback", || {
        (metric(&t.engine, "body_calls") == 2).then_some(())
    })
    .await;
    assert!(
        t.backend.first_bytes.try_recv().is_err(),
        "held body leaked"
    );
    // The answer resumes the request: the held body leaves before the body ends.
    t.backend.hold.notify_one();
    let first = within("the held body upstream", t.backend.first_bytes.recv())
        .await
        .unwrap();
    assert_eq!(&first[..], b"aaabbb");
    s.write_all(b"3\r\nccc\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    within("the response", s.read_to_end(&mut out))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("body=aaabbbccc"), "{text}");
    t.dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_body_paused_mid_stream_flows_on_when_the_callout_resumes_it() {
    let t = start(1).await;
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"GET /B/two HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // The head leaves; `one` is held until the callout answers.
    read_until(&mut s, &mut got, b"\r\n\r\n").await;
    wait_for("the first body callback", || {
        (metric(&t.engine, "body_calls") == 1).then_some(())
    })
    .await;
    t.backend.hold.notify_one();
    // `one` reaches the client while the backend still holds `two`.
    read_until(&mut s, &mut got, b"one").await;
    t.backend.two.notify_one();
    within("the rest", s.read_to_end(&mut got)).await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("two"), "{text}");
    t.dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stream_messages_arrive_while_the_response_streams_and_end_with_it() {
    let mut t = start(2).await;
    let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
    s.write_all(b"GET /g/two HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The request did not wait for the stream: the response's first part arrives...
    let mut got = Vec::new();
    read_until(&mut s, &mut got, b"one").await;
    within("the echo", t.backend.echoed.recv()).await.unwrap();
    // ...and the stream's message reaches the plugin while the response still streams.
    wait_for("the gRPC message delivered", || {
        (metric(&t.engine, "grpc_msgs") == 1).then_some(())
    })
    .await;
    t.backend.two.notify_one();
    within("the rest", s.read_to_end(&mut got)).await.unwrap();
    assert!(String::from_utf8_lossy(&got).contains("two"));
    // The HTTP stream ended with the gRPC stream open: cancelled, as Envoy does when a
    // context is deleted; no close callback follows. A later request proves the worker went
    // on past that point.
    let c = support::client();
    let a = within("a later request", support::send(&c, t.addr, "/x", &[])).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(metric(&t.engine, "grpc_closes"), 0);
    t.dp.shutdown(Duration::from_secs(2)).await;
}

fn reset_lines(log: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["response_code_details"] == "wasm_close_stream")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stream_resets_over_http1_and_h2() {
    let t = start(3).await;
    // HTTP/1.1, a parked request closed by the root context: no response, the connection
    // closes.
    for path in ["/k", "/K"] {
        let mut s = tokio::net::TcpStream::connect(t.addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: example.com\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        let read = within("the connection to close", s.read_to_end(&mut out)).await;
        assert!(
            read.is_err() || out.is_empty(),
            "{path}: {}",
            String::from_utf8_lossy(&out)
        );
    }
    // h2: the stream is reset and the connection serves the next stream.
    let io = TokioIo::new(tokio::net::TcpStream::connect(t.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = |path: &str| {
        hyper::Request::get(format!("http://{}{path}", t.addr))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap()
    };
    let err = within("the reset", sender.send_request(req("/k")))
        .await
        .expect_err("a reset stream has no response");
    // hyper's client error wraps h2's `Reset(stream, reason, Remote)`.
    let shown = format!("{err:?}");
    assert!(
        shown.contains("Reset(") && shown.contains("Remote"),
        "{shown}"
    );
    let ok = within("the next stream", sender.send_request(req("/x")))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let lines = wait_for("three reset streams logged", || {
        let l = reset_lines(&t.log);
        (l.len() == 3).then_some(l)
    })
    .await;
    for l in &lines {
        assert_eq!(l["response_code"], 0, "{l}");
        assert_eq!(l["response_flags"], "-", "{l}");
    }
    t.dp.shutdown(Duration::from_secs(2)).await;
}
