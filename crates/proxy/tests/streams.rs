//! The HTTP stream through a plugin chain, with Envoy's semantics: bodies delivered chunk by
//! chunk (Pause buffers until end of stream, with the buffer limit), trailers both ways over
//! HTTP/1.1 chunked and h2, a response held while a plugin's callout is in flight, and a root
//! context resuming or answering a request it parked (`proxy_set_effective_context`). Real
//! sockets on loopback; the plugin is WAT so each behaviour is exact.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use waystone_proxy::{DataPlane, DataPlaneConfig};

/// The plugin; its behaviour is chosen by the second byte of `:path`:
/// - `s`, `t`: marks each request and response body chunk it sees with `c` (more follows) or
///   `E` (end of stream), prepended, and continues;
/// - `p`: pauses the request body until end of stream, then prepends `P`;
/// - `h`: from the response headers, calls `reviews:9080` and pauses; the answer's `:status`
///   becomes response header `x-callout-status` and the response resumes;
/// - `r` / `l`: parks the request (Pause); the root context's next tick resumes it (`r`) or
///   answers it 403 (`l`) through `proxy_set_effective_context`.
///
/// Trailers: adds `x-added-req: 1` to request trailers and `x-added-resp: 1` to response ones.
fn plugin() -> Vec<u8> {
    let call_headers = support::serialize_pairs(&[
        (":method", "GET"),
        (":path", "/ratings"),
        (":authority", "reviews"),
    ]);
    let basics = support::GUEST_BASICS;
    let wat = format!(
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_hv (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $grpc_stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 65536))
  (global $parked (mut i32) (i32.const 0))
  (global $parked_mode (mut i32) (i32.const 0))
  {basics}
  (data (i32.const 0) ":path")
  (data (i32.const 8) "cEP")
  (data (i32.const 16) "x-added-req")
  (data (i32.const 32) "x-added-resp")
  (data (i32.const 48) "1")
  (data (i32.const 56) "reviews:9080")
  (data (i32.const 72) ":status")
  (data (i32.const 80) "x-callout-status")
  (data (i32.const 100) "parked")
  (data (i32.const 112) "content-length")
  (data (i32.const 128) "echo.Echo")
  (data (i32.const 144) "Stream")
  (data (i32.const 152) "one")
  (data (i32.const 156) "two")
  (data (i32.const 160) "x-md")
  (data (i32.const 168) "x-g-md")
  (data (i32.const 176) "x-g-msg")
  (data (i32.const 184) "grpc-message")
  (data (i32.const 200) "x-g-trailer")
  (data (i32.const 216) "x-g-status")
  (data (i32.const 0x1800) "\00\00\00\00")
  (data (i32.const 0x1000) "{call_headers}")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 10)))
    (i32.const 1))
  ;; The second byte of :path of the running stream.
  (func $mode (result i32)
    (if (call $get_hv (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 1024) (i32.const 1028))
      (then (return (i32.const 0))))
    (i32.load8_u (i32.add (i32.load (i32.const 1024)) (i32.const 1))))
  (func $marked (param $m i32) (result i32)
    (i32.or (i32.eq (local.get $m) (i32.const 115)) (i32.eq (local.get $m) (i32.const 116))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $m i32)
    (local.set $m (call $mode))
    ;; The body changes size: the length header would be stale.
    (if (i32.or (call $marked (local.get $m)) (i32.eq (local.get $m) (i32.const 112)))
      (then (drop (call $remove_hv (i32.const 0) (i32.const 112) (i32.const 14)))))
    (if (i32.or (i32.eq (local.get $m) (i32.const 114)) (i32.eq (local.get $m) (i32.const 108)))
      (then
        (global.set $parked (local.get $ctx))
        (global.set $parked_mode (local.get $m))
        (return (i32.const 1))))
    ;; g: a gRPC stream; two messages, the second half-closes; resumed on close.
    (if (i32.eq (local.get $m) (i32.const 103))
      (then
        (if (call $grpc_stream (i32.const 56) (i32.const 12) (i32.const 128) (i32.const 9)
              (i32.const 144) (i32.const 6) (i32.const 0x1800) (i32.const 4) (i32.const 1044))
          (then (return (i32.const 0))))
        (drop (call $grpc_send (i32.load (i32.const 1044)) (i32.const 152) (i32.const 3) (i32.const 0)))
        (drop (call $grpc_send (i32.load (i32.const 1044)) (i32.const 156) (i32.const 3) (i32.const 1)))
        (return (i32.const 1))))
    (i32.const 0))
  (func (export "proxy_on_grpc_receive_initial_metadata") (param i32 i32 i32)
    (if (i32.eqz (call $get_hv (i32.const 4) (i32.const 160) (i32.const 4) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 168) (i32.const 6)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028)))))))
  (func (export "proxy_on_grpc_receive") (param i32 i32) (param $size i32)
    (if (i32.eqz (call $get_buf (i32.const 5) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 176) (i32.const 7)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028)))))))
  (func (export "proxy_on_grpc_receive_trailing_metadata") (param i32 i32 i32)
    (if (i32.eqz (call $get_hv (i32.const 5) (i32.const 184) (i32.const 12) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 200) (i32.const 11)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028)))))))
  (func (export "proxy_on_grpc_close") (param i32 i32) (param $status i32)
    (i32.store8 (i32.const 1100) (i32.add (i32.const 48) (local.get $status)))
    (drop (call $add_hv (i32.const 0) (i32.const 216) (i32.const 10) (i32.const 1100) (i32.const 1)))
    (drop (call $continue (i32.const 0))))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (local $m i32)
    (local.set $m (call $mode))
    (if (call $marked (local.get $m))
      (then
        (drop (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.add (i32.const 8) (local.get $eos)) (i32.const 1)))
        (return (i32.const 0))))
    (if (i32.eq (local.get $m) (i32.const 112))
      (then
        (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
        (drop (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 1)))))
    (i32.const 0))
  (func (export "proxy_on_request_trailers") (param $ctx i32) (param i32) (result i32)
    (drop (call $add_hv (i32.const 1) (i32.const 16) (i32.const 11) (i32.const 48) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (if (i32.eq (call $mode) (i32.const 104))
      (then
        (drop (call $http_call (i32.const 56) (i32.const 12)
          (i32.const 0x1000) (i32.const {chl}) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
          (i32.const 5000) (i32.const 1040)))
        (return (i32.const 1))))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (call $marked (call $mode))
      (then
        (drop (call $set_buf (i32.const 1) (i32.const 0) (i32.const 0)
          (i32.add (i32.const 8) (local.get $eos)) (i32.const 1)))))
    (i32.const 0))
  (func (export "proxy_on_response_trailers") (param $ctx i32) (param i32) (result i32)
    (drop (call $add_hv (i32.const 3) (i32.const 32) (i32.const 12) (i32.const 48) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_http_call_response") (param $ctx i32) (param i32 i32 i32 i32)
    (if (i32.eqz (call $get_hv (i32.const 6) (i32.const 72) (i32.const 7) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 2) (i32.const 80) (i32.const 16)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))))
    (drop (call $continue (i32.const 1))))
  (func (export "proxy_on_tick") (param i32)
    (if (i32.eqz (global.get $parked)) (then (return)))
    (if (i32.eqz (call $effective (global.get $parked)))
      (then
        (if (i32.eq (global.get $parked_mode) (i32.const 114))
          (then (drop (call $continue (i32.const 0))))
          (else (drop (call $local (i32.const 403) (i32.const 100) (i32.const 6)
            (i32.const 100) (i32.const 6) (i32.const 0) (i32.const 0) (i32.const -1)))))))
    (global.set $parked (i32.const 0)))
)"#,
        call_headers = support::wat_bytes(&call_headers),
        chl = call_headers.len(),
    );
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

/// What the backend was sent, as it answers it: `body=<body>;trailers=<k:v,...>`.
struct Backend {
    addr: SocketAddr,
    /// The first request-body frame of each request, as it arrives.
    first_bytes: mpsc::UnboundedReceiver<Bytes>,
    /// `/big` sends its second half when this gets a message.
    release: mpsc::UnboundedSender<()>,
}

/// `/big`: 64 KiB, the second 32 KiB only once released. `/ratings`: `rating`. Otherwise the
/// echo above, with response trailer `x-backend: 1` when the request has `x-resp-trailer`.
async fn backend(ip: IpAddr) -> Backend {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (first_tx, first_bytes) = mpsc::unbounded_channel();
    let (release, release_rx) = mpsc::unbounded_channel::<()>();
    let release_rx = std::sync::Arc::new(tokio::sync::Mutex::new(release_rx));
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let first_tx = first_tx.clone();
            let release_rx = release_rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let first_tx = first_tx.clone();
                    let release_rx = release_rx.clone();
                    async move {
                        let (tx, rx) = mpsc::channel(4);
                        let path = req.uri().path().to_string();
                        let resp_trailer = req.headers().contains_key("x-resp-trailer");
                        if path == "/big" {
                            tokio::spawn(async move {
                                let half = Bytes::from(vec![b'x'; 32 << 10]);
                                let _ = tx.send(Frame::data(half.clone())).await;
                                release_rx.lock().await.recv().await;
                                let _ = tx.send(Frame::data(half)).await;
                            });
                        } else if path == "/echo.Echo/Stream" {
                            let body = req.into_body();
                            tokio::spawn(async move {
                                support::grpc_echo(body, &tx, || {}).await;
                                let mut t = http::HeaderMap::new();
                                t.insert("grpc-status", "0".parse().unwrap());
                                t.insert("grpc-message", "done".parse().unwrap());
                                let _ = tx.send(Frame::trailers(t)).await;
                            });
                            let mut resp = hyper::Response::new(support::FrameChannel(rx));
                            resp.headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                            resp.headers_mut().insert("x-md", "1".parse().unwrap());
                            return Ok(resp);
                        } else if path == "/ratings" {
                            let _ = tx.send(Frame::data(Bytes::from("rating"))).await;
                        } else {
                            let g: Vec<String> = req
                                .headers()
                                .iter()
                                .filter(|(k, _)| k.as_str().starts_with("x-g-"))
                                .map(|(k, v)| format!("{k}:{}", v.to_str().unwrap()))
                                .collect();
                            let g = g.join(",");
                            let mut body = req.into_body();
                            let mut got = Vec::new();
                            let mut trailers = String::new();
                            let mut first = true;
                            while let Some(Ok(frame)) = body.frame().await {
                                if let Some(d) = frame.data_ref() {
                                    if first {
                                        let _ = first_tx.send(d.clone());
                                        first = false;
                                    }
                                    got.extend_from_slice(d);
                                }
                                if let Some(t) = frame.trailers_ref() {
                                    let mut pairs: Vec<String> = t
                                        .iter()
                                        .map(|(k, v)| format!("{k}:{}", v.to_str().unwrap()))
                                        .collect();
                                    pairs.sort();
                                    trailers = pairs.join(",");
                                }
                            }
                            let text = format!(
                                "body={};trailers={trailers};g={g}",
                                String::from_utf8_lossy(&got)
                            );
                            let _ = tx.send(Frame::data(Bytes::from(text))).await;
                            if resp_trailer {
                                let mut t = http::HeaderMap::new();
                                t.insert("x-backend", "1".parse().unwrap());
                                let _ = tx.send(Frame::trailers(t)).await;
                            }
                        }
                        let mut resp = hyper::Response::new(support::FrameChannel(rx));
                        if resp_trailer {
                            resp.headers_mut()
                                .insert("trailer", "x-backend".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Backend {
        addr,
        first_bytes,
        release,
    }
}

async fn start(
    salt: u8,
    max_buffered_body: usize,
    module: Option<Vec<u8>>,
    config: &str,
) -> (DataPlane, SocketAddr, Backend) {
    let ip = support::net(salt);
    let backend = backend(ip).await;
    let engine = support::engine(Duration::from_secs(1), 64 << 20);
    let module = support::compile(&engine, &module.unwrap_or_else(plugin));
    let rt = support::runtime(
        &support::gateway_with_reviews(backend.addr, 18090 + u16::from(salt), config),
        |_| module.clone(),
    );
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        max_buffered_body,
        // The trailer tests send their trailers right after the body; on a loaded machine
        // the default 20 ms stall could pass in between and drop the plugin's added trailer.
        trailer_wait: Duration::from_secs(5),
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = support::apply(&dp, rt, "gw").await;
    (dp, addr, backend)
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

async fn read_all(mut s: tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    within("the response", s.read_to_end(&mut out))
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn chunked_head(path: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n{extra}Connection: close\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_stream_chunk_by_chunk_and_pause_buffers_until_the_end() {
    let (dp, addr, mut backend) = start(0, 8, None, "{}").await;

    // Each chunk reaches the plugin, and the backend, before the next one is sent; the end of
    // a chunked body comes as an empty last chunk.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(chunked_head("/s", "").as_bytes())
        .await
        .unwrap();
    s.write_all(b"3\r\naaa\r\n").await.unwrap();
    let first = within("the first chunk upstream", backend.first_bytes.recv())
        .await
        .unwrap();
    assert_eq!(&first[..], b"caaa");
    // Larger than the buffer limit, but passed on: only held bytes count.
    s.write_all(b"c\r\nbbbbbbbbbbbb\r\n0\r\n\r\n")
        .await
        .unwrap();
    let text = read_all(s).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("body=caaacbbbbbbbbbbbbE;trailers="), "{text}");

    // Pause holds the chunks; at the end the plugin sees the whole body once.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(chunked_head("/p", "").as_bytes())
        .await
        .unwrap();
    s.write_all(b"3\r\naaa\r\n").await.unwrap();
    s.write_all(b"3\r\nbbb\r\n0\r\n\r\n").await.unwrap();
    let text = read_all(s).await;
    assert!(text.contains("body=Paaabbb;"), "{text}");
    assert_eq!(&backend.first_bytes.recv().await.unwrap()[..], b"Paaabbb");

    // Held beyond the limit (8 bytes here): Envoy's 413.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(chunked_head("/p", "").as_bytes())
        .await
        .unwrap();
    s.write_all(b"5\r\naaaaa\r\n5\r\nbbbbb\r\n0\r\n\r\n")
        .await
        .unwrap();
    let text = read_all(s).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // A content-length body's last chunk carries end_of_stream itself.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /s HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\nConnection: close\r\n\r\nxyz",
    )
    .await
    .unwrap();
    let text = read_all(s).await;
    assert!(text.contains("body=Exyz;"), "{text}");
    assert!(
        !text.to_ascii_lowercase().contains("content-length: 3"),
        "{text}"
    );
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_response_streams_through_basic_auth_without_buffering() {
    let wasm = support::plugin_wasm("basic_auth");
    let config = "{basic_auth_rules: [{prefix: /admin, request_methods: [GET], credentials: [\"ok:test\"]}]}";
    let (dp, addr, backend) = start(1, 16 << 20, Some(wasm), config).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    // The first half arrives while the backend still holds the second.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 << 10];
    while got.len() < 32 << 10 {
        let n = within("the first half", s.read(&mut buf)).await.unwrap();
        assert!(n > 0, "connection closed early");
        got.extend_from_slice(&buf[..n]);
    }
    backend.release.send(()).unwrap();
    within("the rest", s.read_to_end(&mut got)).await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{}", &text[..100]);
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(body.bytes().filter(|b| *b == b'x').count(), 64 << 10);
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_both_ways_over_http1_chunked() {
    let (dp, addr, _backend) = start(2, 16 << 20, None, "{}").await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(chunked_head("/t", "TE: trailers\r\nx-resp-trailer: 1\r\n").as_bytes())
        .await
        .unwrap();
    s.write_all(b"3\r\naaa\r\n0\r\nx-client: 1\r\n\r\n")
        .await
        .unwrap();
    let text = read_all(s).await;
    // The last data chunk had end_of_stream false (trailers followed): no `E` marker.
    assert!(
        text.contains("body=caaa;trailers=x-added-req:1,x-client:1"),
        "{text}"
    );
    let tail = text
        .rsplit("\r\n0\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(tail.contains("x-backend: 1"), "{text}");
    assert!(tail.contains("x-added-resp: 1"), "{text}");
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_both_ways_over_h2() {
    let (dp, addr, _backend) = start(3, 16 << 20, None, "{}").await;
    let io = TokioIo::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(4);
    let req = hyper::Request::post(format!("http://{addr}/t"))
        .header("x-resp-trailer", "1")
        .header("te", "trailers")
        .body(support::FrameChannel(rx))
        .unwrap();
    tx.send(Frame::data(Bytes::from("aaa"))).await.unwrap();
    let mut t = http::HeaderMap::new();
    t.insert("x-client", "1".parse().unwrap());
    tx.send(Frame::trailers(t)).await.unwrap();
    drop(tx);
    let resp = within("the h2 response", sender.send_request(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let collected = within("the h2 body", resp.into_body().collect())
        .await
        .unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers");
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    assert!(
        body.contains("body=caaa;trailers=x-added-req:1,x-client:1"),
        "{body}"
    );
    assert_eq!(trailers.get("x-backend").unwrap(), "1");
    assert_eq!(trailers.get("x-added-resp").unwrap(), "1");
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_response_waits_for_its_callout() {
    let (dp, addr, _backend) = start(4, 16 << 20, None, "{}").await;
    let c = support::client();
    let a = within("the response", support::send(&c, addr, "/h", &[])).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.header("x-callout-status"), Some("200"), "{a:?}");
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_context_resumes_or_answers_a_parked_request() {
    let (dp, addr, _backend) = start(5, 16 << 20, None, "{}").await;
    let c = support::client();
    let a = within("the resumed request", support::send(&c, addr, "/r", &[])).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("body=;"), "{a:?}");
    let a = within("the answered request", support::send(&c, addr, "/l", &[])).await;
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body, "parked");
    dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_run_over_h2_message_by_message() {
    let (dp, addr, _backend) = start(6, 16 << 20, None, "{}").await;
    let c = support::client();
    let a = within(
        "the request resumed by the stream's close",
        support::send(&c, addr, "/g", &[]),
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(
        a.body.ends_with(
            ";g=x-g-md:1,x-g-msg:echo:one,x-g-msg:echo:two,x-g-trailer:done,x-g-status:0"
        ),
        "{a:?}"
    );
    dp.shutdown(Duration::from_secs(2)).await;
}
