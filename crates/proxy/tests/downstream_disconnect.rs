//! Envoy's `DC` flag: a client that goes away before its response is complete is counted in
//! `istio_requests_total{response_flags="DC"}` and logged, both while the upstream has not
//! answered yet (response code 0, `downstream_remote_disconnect`) and in the middle of the
//! response body (the upstream's code, the bytes sent so far). Real sockets: a slow backend
//! that holds its answer, a client that closes early.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use waystone_model::snapshot::AccessLogFormat;
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::{DataPlane, DataPlaneConfig, ObservabilityConfig, RuntimeConfig};

/// A backend that reads a request head, tells the test which path arrived, then for
/// `/partial` sends the head and 5 of 10 body bytes; it never finishes until `release`.
async fn slow_backend(
    ip: IpAddr,
    arrived: mpsc::UnboundedSender<String>,
) -> (SocketAddr, Arc<Notify>) {
    let (listener, addr) = support::listen(ip).await;
    let release = Arc::new(Notify::new());
    let held = release.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let arrived = arrived.clone();
            let held = held.clone();
            tokio::spawn(async move {
                let Some(head) = support::read_head(&mut s).await else {
                    return;
                };
                let text = String::from_utf8_lossy(&head);
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                if path == "/partial" {
                    s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
                        .await
                        .unwrap();
                    s.flush().await.unwrap();
                }
                let _ = arrived.send(path);
                held.notified().await;
            });
        }
    });
    (addr, release)
}

fn manifests(backend: SocketAddr) -> String {
    format!(
        r#"{svc}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: impatient, namespace: default, annotations: {{waystone.io/access-log: json}}}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: 18082, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{name: impatient}}]
  rules:
  - backendRefs: [{{name: slow, port: 9080}}]
"#,
        svc = support::service_labeled("slow", backend, "app: slow")
    )
}

fn dc_lines() -> Vec<String> {
    let mut text = String::new();
    waystone_proxy::metrics::render_prometheus(&mut text);
    text.lines()
        .filter(|l| {
            l.starts_with("istio_requests_total{") && l.contains("source_workload=\"impatient\"")
        })
        .map(str::to_string)
        .collect()
}

async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_gone_before_and_during_the_response_is_dc() {
    let pid = std::process::id();
    let ip: IpAddr = format!("127.92.{}.1", pid % 250 + 1).parse().unwrap();
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (backend, release) = slow_backend(ip, arrived_tx).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let translation = translate(
        &parse_manifests(&manifests(backend), "test").unwrap(),
        &TranslateOptions::default(),
    );
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        observability: ObservabilityConfig {
            access_log: AccessLogFormat::Off,
            access_log_file: Some(log.clone()),
            otlp_endpoint: None,
        },
        ..Default::default()
    })
    .await
    .unwrap();
    dp.apply(RuntimeConfig {
        snapshot: Arc::new(translation.snapshot),
        ..RuntimeConfig::empty()
    })
    .await;
    let gateway = SocketAddr::new(ip, 18082);
    let request = |path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: slow.example\r\nUser-Agent: impatient\r\n\r\n")
    };

    // 1. The upstream has the request but has not answered: the client leaves.
    let mut client = tokio::net::TcpStream::connect(gateway).await.unwrap();
    client.write_all(request("/hang").as_bytes()).await.unwrap();
    assert_eq!(arrived.recv().await.as_deref(), Some("/hang"));
    assert!(dc_lines().is_empty(), "nothing is recorded while waiting");
    drop(client);
    let line = wait_for("the DC of an unanswered request", || {
        dc_lines()
            .into_iter()
            .find(|l| l.contains("response_code=\"0\""))
    })
    .await;
    assert!(line.contains("response_flags=\"DC\""), "{line}");
    assert!(line.ends_with(" 1"), "{line}");

    // 2. Half the body has reached the client when it leaves.
    let mut client = tokio::net::TcpStream::connect(gateway).await.unwrap();
    client
        .write_all(request("/partial").as_bytes())
        .await
        .unwrap();
    assert_eq!(arrived.recv().await.as_deref(), Some("/partial"));
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"hello") {
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
    drop(client);
    let line = wait_for("the DC of a response cut short", || {
        dc_lines()
            .into_iter()
            .find(|l| l.contains("response_code=\"200\""))
    })
    .await;
    assert!(line.contains("response_flags=\"DC\""), "{line}");
    assert!(line.ends_with(" 1"), "{line}");
    assert_eq!(dc_lines().len(), 2, "exactly two series: {:?}", dc_lines());

    let entries: Vec<serde_json::Value> = wait_for("two access log lines", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    let upstream = backend.to_string();
    for (entry, code, details, sent) in [
        (&entries[0], 0, "downstream_remote_disconnect", 0),
        (&entries[1], 200, "via_upstream", 5),
    ] {
        assert_eq!(entry["gateway"], "default/impatient", "{entry}");
        assert_eq!(entry["response_code"], code, "{entry}");
        assert_eq!(entry["response_flags"], "DC", "{entry}");
        assert_eq!(entry["response_code_details"], details, "{entry}");
        assert_eq!(entry["bytes_sent"], sent, "{entry}");
        assert_eq!(entry["upstream_host"], upstream.as_str(), "{entry}");
        assert_eq!(entry["user_agent"], "impatient", "{entry}");
    }
    assert_eq!(entries[0]["path"], "/hang");
    assert_eq!(entries[1]["path"], "/partial");
    release.notify_waiters();
    dp.shutdown(Duration::from_secs(1)).await;
}
