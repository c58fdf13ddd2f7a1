//! The worker's upstream HTTP/1.1 client and pool against raw TCP backends that count their
//! connections: keep-alive connections are reused, a pooled connection the backend closed is
//! replaced without failing the request, and every way a response can be framed (RFC 9112)
//! comes through whole.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a raw backend answers to the request for a path, and whether it then closes the
/// connection.
type Script = fn(&str) -> (&'static [u8], bool);

/// A raw TCP backend answering each request (its head; a body is never read) as `script`
/// says, counting the connections it accepts.
async fn raw_backend(ip: std::net::IpAddr, script: Script) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // A request ends at its blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let (answer, close) = script(head.split(' ').nth(1).unwrap_or("/"));
                        if sock.write_all(answer).await.is_err() || close {
                            return;
                        }
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

/// A one-worker gateway without plugins in front of `backend`.
async fn gateway(
    ip: std::net::IpAddr,
    backend: SocketAddr,
) -> (waystone_proxy::DataPlane, SocketAddr) {
    let dp = dataplane(ip, 1).await;
    let rt = runtime(&manifests(backend, &[("gw", 18080, None)]), |_| {
        unreachable!("no plugins")
    });
    let addr = apply(&dp, rt, "gw").await;
    (dp, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_upstream_connections_are_reused() {
    let ip = net(1);
    let (backend, accepted) = raw_backend(ip, |_| (OK, false)).await;
    let (_dp, addr) = gateway(ip, backend).await;
    let c = client();
    for _ in 0..50 {
        let a = send(&c, addr, "/", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    }
    // One worker, one request at a time: one upstream connection carries all of them.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    let ip = net(2);
    // Closes right after each answer without saying so, as a keep-alive timeout firing would.
    let (backend, accepted) = raw_backend(ip, |_| (OK, true)).await;
    let (_dp, addr) = gateway(ip, backend).await;
    let c = client();
    for i in 0..30 {
        let a = send(&c, addr, "/", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 30);
}

/// One answer per way of framing a response; `/close`, `/garbage` and `/early` close after.
fn framings(path: &str) -> (&'static [u8], bool) {
    match path {
        "/continue" => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ndone", false),
        "/chunked" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-trailer: t\r\n\r\n", false),
        "/head" => (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", false),
        "/nocontent" => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        "/close" => (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", true),
        "/garbage" => (b"HTTP/1.1 abc\r\n\r\n", true),
        "/early" => (b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\nconnection: close\r\n\r\nbig", true),
        _ => (OK, false),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_framing_comes_through_and_keep_alive_ones_reuse_the_connection() {
    let ip = net(3);
    let (backend, accepted) = raw_backend(ip, framings).await;
    let (_dp, addr) = gateway(ip, backend).await;
    let c = client();

    // A 1xx before the answer is skipped; chunked bodies are decoded (extensions ignored); a
    // HEAD answer's content-length announces no body; 204 has none. All on one connection.
    let a = send(&c, addr, "/continue", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "done"));
    let a = send(&c, addr, "/chunked", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "abcde"));
    let head = c
        .request(
            hyper::Request::head(format!("http://{addr}/head"))
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "10");
    let a = send(&c, addr, "/nocontent", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (204, ""));
    let a = send(&c, addr, "/", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "keep-alive answers reuse one connection"
    );

    // A body delimited by the upstream's close; the connection is not reused after it.
    let a = send(&c, addr, "/close", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "until the end"));
    let a = send(&c, addr, "/", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // An invalid status line is the upstream's fault: 503, and the next request is served.
    let a = send(&c, addr, "/garbage", &[]).await;
    assert_eq!(a.status, 503, "{}", a.body);
    assert!(a.body.contains("invalid response"), "{}", a.body);
    let a = send(&c, addr, "/", &[]).await;
    assert_eq!((a.status, a.body.as_str()), (200, "ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_before_the_request_body_ends_reaches_the_client() {
    let ip = net(4);
    let (backend, _) = raw_backend(ip, framings).await;
    let (_dp, addr) = gateway(ip, backend).await;
    // The client announces a megabyte and sends a little: the upstream answers at once.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /early HTTP/1.1\r\nhost: a\r\ncontent-length: 1000000\r\n\r\nsome")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("big") {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no answer: {}", String::from_utf8_lossy(&got)),
        }
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.ends_with("big"), "{got}");
}
