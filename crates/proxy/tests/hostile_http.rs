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
