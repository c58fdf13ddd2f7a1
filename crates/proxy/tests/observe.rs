//! Trace context and response flags at the data plane, with real sockets: `traceparent`
//! reaches the upstream (the caller's trace kept, a new trace started when there is none),
//! spans reach an OTLP receiver, and a request no route matches is counted with flag `NR`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::{DataPlane, DataPlaneConfig, ObservabilityConfig, RuntimeConfig};

/// Answers with the `traceparent` it received (or `none`).
async fn echo_backend(ip: IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let tp = req
                        .headers()
                        .get("traceparent")
                        .map(|v| v.to_str().unwrap().to_string())
                        .unwrap_or_else(|| "none".into());
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        tp,
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn otlp_receiver(ip: IpAddr) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            store
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        }
    });
    (format!("http://{addr}"), got)
}

async fn get(addr: SocketAddr, target: &str, traceparent: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tp = traceparent
        .map(|t| format!("traceparent: {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: example.com\r\n{tp}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn manifests(backend: SocketAddr) -> String {
    format!(
        r#"{svc}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: traced, namespace: default}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: 18081, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{name: traced}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /echo}}}}]
    backendRefs: [{{name: echo, port: 9080}}]
"#,
        svc = support::service_labeled("echo", backend, "app: echo, version: v1")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_spans_and_no_route_flag() {
    let pid = std::process::id();
    let ip: IpAddr = format!("127.91.{}.1", pid % 250 + 1).parse().unwrap();
    let backend = echo_backend(ip).await;
    let (otlp, batches) = otlp_receiver(ip);
    let objects = parse_manifests(&manifests(backend), "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        observability: ObservabilityConfig {
            otlp_endpoint: Some(otlp),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let rt = RuntimeConfig {
        snapshot: Arc::new(translation.snapshot),
        ..RuntimeConfig::empty()
    };
    dp.apply(rt).await;
    let addr = SocketAddr::new(ip, 18081);

    // The caller's trace continues; the parent becomes this proxy's span.
    let incoming = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (status, upstream_tp) = get(addr, "/echo", Some(incoming)).await;
    assert_eq!(status, 200);
    assert!(
        upstream_tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{upstream_tp}"
    );
    assert!(upstream_tp.ends_with("-01"), "{upstream_tp}");
    let proxy_span = upstream_tp.split('-').nth(2).unwrap().to_string();
    assert_ne!(proxy_span, "b7ad6b7169203331");
    // Without one, a trace starts here.
    let (_, fresh) = get(addr, "/echo", None).await;
    assert!(
        waystone_proxy::trace::TraceParent::parse(&fresh).is_some(),
        "{fresh}"
    );
    assert_eq!(get(addr, "/nowhere", None).await.0, 404);

    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans: Vec<serde_json::Value> = batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| {
                b["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        if spans.len() >= 3 {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans: {spans:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let first = spans
        .iter()
        .find(|s| s["traceId"] == "0af7651916cd43dd8448eb211c80319c")
        .unwrap();
    assert_eq!(first["spanId"], proxy_span.as_str());
    assert_eq!(first["parentSpanId"], "b7ad6b7169203331");
    assert_eq!(first["name"], "echo.default.svc.cluster.local:9080/*");

    let mut text = String::new();
    waystone_proxy::metrics::render_prometheus(&mut text);
    let no_route = text
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("source_workload=\"traced\"")
                && l.contains("response_code=\"404\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    assert!(no_route.contains("response_flags=\"NR\""), "{no_route}");
    assert!(
        no_route.contains("destination_service_name=\"unknown\""),
        "{no_route}"
    );
    assert!(no_route.ends_with(" 1"), "{no_route}");
    let ok = text
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("source_workload=\"traced\"")
                && l.contains("response_code=\"200\"")
        })
        .unwrap();
    assert!(
        ok.contains("destination_app=\"echo\",destination_version=\"v1\""),
        "{ok}"
    );
    assert!(ok.ends_with(" 2"), "{ok}");
    dp.shutdown(Duration::from_secs(1)).await;
}
