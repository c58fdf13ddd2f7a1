//! Malformed and oversized HTTP at a listener: each bad client gets a 4xx or a closed
//! connection, and a well-behaved client on the same worker never notices.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waystone_proxy::{MAX_REQUEST_HEAD, MAX_REQUEST_HEADERS};

/// Writes `raw`, then reads until the server closes (bounded); returns what came back.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before it has read everything: ignore write errors.
    let _ = s.write_all(raw).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the server kept a bad connection open: {out:?}"
    );
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> Option<u16> {
    answer.split(' ').nth(1).and_then(|s| s.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_4xx_or_a_closed_connection_and_harm_no_one_else() {
    let ip = net(6);
    let backend = Backend::start(ip).await;
    let engine = engine(Duration::from_secs(1), 64 << 20);
    let noop = compile(&engine, &plugin_wasm("noop"));
    let dp = dataplane(ip, 1).await;
    let yaml = manifests(backend.addr, &[("gw", 18080, Some(("FAIL_CLOSE", "{}")))]);
    let addr = apply(&dp, runtime(&yaml, |_| noop.clone()), "gw").await;
    // A well-behaved client on a keep-alive connection: on the one worker, like every bad one.
    let good = client();
    assert_eq!(send(&good, addr, "/", &[]).await.status, 200);

    let big = "a".repeat(MAX_REQUEST_HEAD + 1024);
    let many: String = (0..MAX_REQUEST_HEADERS + 20)
        .map(|i| format!("x-h{i}: v\r\n"))
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "oversized header",
            format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\n\r\n").into_bytes(),
        ),
        (
            "too many headers",
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").into_bytes(),
        ),
        (
            "oversized request line",
            format!("GET /{big} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes(),
        ),
        ("TLS to a plain listener", {
            let mut v = vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03];
            v.extend(std::iter::repeat_n(0u8, 300));
            v
        }),
        ("garbage", b"\x00\x01\x02 nonsense \xff\xfe\r\n\r\n".to_vec()),
        (
            "bad header name",
            b"GET / HTTP/1.1\r\nHost: a\r\nbad header: x\r\n\r\n".to_vec(),
        ),
        (
            "conflicting lengths",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello"
                .to_vec(),
        ),
        (
            "bad chunked body",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        ),
        ("h2 preface then garbage", {
            let mut v = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            v.extend(std::iter::repeat_n(0xffu8, 64));
            v
        }),
    ];
    let hits = backend.hits();
    for (what, raw) in &cases {
        let answer = raw_exchange(addr, raw).await;
        match status_of(&answer) {
            // A 4xx, or nothing (an h2 GOAWAY or a plain close).
            Some(s) => assert!((400..500).contains(&s), "{what}: {answer}"),
            None => assert!(!answer.starts_with("HTTP/1.1 2"), "{what}: {answer:?}"),
        }
        // The good client's connection and worker are unharmed.
        assert_eq!(
            send(&good, addr, "/", &[]).await.status,
            200,
            "after {what}"
        );
    }
    assert_eq!(
        backend.hits(),
        hits + cases.len() as u64,
        "only the good client's requests reached the upstream"
    );

    // A flood of bad connections at once, then the good client again.
    let flood: Vec<_> = (0..100)
        .map(|i| {
            let raw = cases[i % cases.len()].1.clone();
            tokio::spawn(async move { raw_exchange(addr, &raw).await })
        })
        .collect();
    for f in flood {
        f.await.unwrap();
    }
    assert_eq!(send(&good, addr, "/", &[]).await.status, 200);

    // h2: a header list over the limit fails that request only; the connection goes on.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let ok = |r: hyper::Request<Empty<Bytes>>| h2.request(r);
    let small = hyper::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    assert_eq!(ok(small).await.unwrap().status(), 200);
    let huge = hyper::Request::get(format!("http://{addr}/"))
        .header("x-big", big.as_str())
        .body(Empty::new())
        .unwrap();
    match ok(huge).await {
        Ok(resp) => assert!(resp.status().is_client_error(), "{resp:?}"),
        Err(e) => eprintln!("oversized h2 header list refused: {e}"),
    }
    let small = hyper::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap();
    assert_eq!(ok(small).await.unwrap().status(), 200);
    dp.shutdown(Duration::from_secs(2)).await;
}

/// A backend that reads one request head, then answers `/slowhead` after `delay`, and
/// `/slowbody` with its head at once and its body after `delay`.
async fn slow_backend(ip: std::net::IpAddr, delay: Duration) -> SocketAddr {
    let (listener, addr) = listen(ip).await;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let slow_head = head.starts_with(b"GET /slowhead ");
                if slow_head {
                    tokio::time::sleep(delay).await;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
                    .await;
                if !slow_head {
                    tokio::time::sleep(delay).await;
                }
                let _ = s.write_all(b"slow").await;
                let _ = s.read(&mut [0u8; 64]).await;
            });
        }
    });
    addr
}

/// Reads until the peer closes or `limit` passes; true when it closed (EOF or reset).
async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut sink = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut sink))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_or_trickling_http1_connection_is_closed_after_the_head_timeout_and_nothing_else() {
    let ip = net(7);
    let timeout = Duration::from_secs(1);
    let slow = slow_backend(ip, Duration::from_secs(3)).await;
    let dp = waystone_proxy::DataPlane::start(waystone_proxy::DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        head_timeout: timeout,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = apply(
        &dp,
        runtime(&manifests(slow, &[("gw", 18081, None)]), |_| unreachable!()),
        "gw",
    )
    .await;
    let connect = || tokio::net::TcpStream::connect(addr);
    // Closed after the timeout, by the first sweep after it (once a second; a loaded machine
    // may run it late, hence the margin).
    let bound = timeout + Duration::from_secs(5);

    let silent = async {
        let mut s = connect().await.unwrap();
        let t = std::time::Instant::now();
        assert!(
            closed_within(&mut s, bound).await,
            "a silent connection stayed open"
        );
        assert!(
            t.elapsed() >= timeout,
            "closed before the timeout: {:?}",
            t.elapsed()
        );
    };
    let trickling = async {
        let mut s = connect().await.unwrap();
        let t = std::time::Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
        // One header line every 200 ms: bytes keep coming, the head never completes.
        let mut i = 0;
        let closed = loop {
            if t.elapsed() > bound {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            i += 1;
            if s.write_all(format!("x-{i}: v\r\n").as_bytes())
                .await
                .is_err()
            {
                break true;
            }
            let mut b = [0u8; 64];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
            {
                break true;
            }
        };
        assert!(
            closed,
            "a head trickled byte by byte kept the connection open"
        );
        assert!(
            t.elapsed() >= timeout,
            "closed before the timeout: {:?}",
            t.elapsed()
        );
    };
    // Answers slower than the timeout, head or body, with the client waiting: not idle. After
    // the answer the keep-alive connection is idle, and closed in its turn.
    let waiting = |path: &'static str| async move {
        let mut s = connect().await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1024];
        while !got.ends_with(b"slow") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer"))
                .unwrap();
            assert!(
                n > 0,
                "{path}: closed while the answer was on its way: {got:?}"
            );
            got.extend_from_slice(&b[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{path}: {got:?}");
        let t = std::time::Instant::now();
        assert!(
            closed_within(&mut s, bound).await,
            "{path}: the idle connection stayed open"
        );
        assert!(t.elapsed() >= timeout, "{path}: closed before the timeout");
    };
    // HTTP/2 (prior knowledge) is not held to a head timeout: idle past it, a PING is answered.
    let h2 = async {
        let mut s = connect().await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        tokio::time::sleep(bound).await;
        s.write_all(b"\0\0\x08\x06\0\0\0\0\0waystone")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 256];
        let ack: &[u8] = b"\0\0\x08\x06\x01\0\0\0\0waystone";
        while !got.windows(ack.len()).any(|w| w == ack) {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
                .await
                .expect("no PING ack")
                .unwrap();
            assert!(n > 0, "the idle h2 connection was closed");
            got.extend_from_slice(&b[..n]);
        }
    };
    tokio::join!(
        silent,
        trickling,
        waiting("/slowhead"),
        waiting("/slowbody"),
        h2
    );
    dp.shutdown(Duration::from_secs(2)).await;
}
