//! The worker's upstream connection pool against a raw TCP backend that counts its
//! connections: keep-alive connections are reused, and a pooled connection the backend closed
//! is replaced without failing the request.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request with `200 ok`; with `close_after_each`, closes the connection right
/// after each answer without saying so (as a keep-alive timeout firing would).
async fn raw_backend(ip: std::net::IpAddr, close_after_each: bool) -> (SocketAddr, Arc<AtomicU64>) {
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
                    // GET requests only: a request ends at its blank line.
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if sock.write_all(answer).await.is_err() {
                            return;
                        }
                        if close_after_each {
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
    let (backend, accepted) = raw_backend(ip, false).await;
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
    let (backend, accepted) = raw_backend(ip, true).await;
    let (_dp, addr) = gateway(ip, backend).await;
    let c = client();
    for i in 0..30 {
        let a = send(&c, addr, "/", &[]).await;
        assert_eq!((a.status, a.body.as_str()), (200, "ok"), "request {i}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 30);
}
