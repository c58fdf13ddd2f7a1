//! The data plane in-process: real sockets on loopback, a real backend, the
//! real basic_auth module, a config built by the real translation.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waystone_model::snapshot::{FailStrategy, PluginId};
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::{DataPlane, DataPlaneConfig, LoadedPlugin, PluginSlot, RuntimeConfig};
use waystone_wasm::{EngineConfig, PluginSpec, WasmEngine};

async fn backend(ip: IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = format!("{} {}", req.method(), req.uri().path());
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("x-served-by", "backend")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn get(addr: SocketAddr, target: &str, host: &str, auth: Option<&str>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out)
}

fn manifests(backend: SocketAddr) -> String {
    format!(
        r#"{svc}---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: gw, namespace: default}}
spec:
  gatewayClassName: istio
  listeners: [{{name: http, port: 18080, protocol: HTTP}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: r, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /}}}}]
    backendRefs: [{{name: productpage, port: 9080}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: auth, namespace: default}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: gw}}]
  url: file:///unused.wasm
  phase: AUTHN
  pluginConfig:
    basic_auth_rules:
    - prefix: /productpage
      request_methods: [GET]
      credentials: ["ok:test"]
"#,
        svc = support::service("productpage", backend)
    )
}

fn basic_auth() -> Vec<u8> {
    let path = std::env::var_os("WAYSTONE_BASIC_AUTH_WASM")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../target/wasm/basic_auth.wasm")
        });
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/build-plugins.sh first",
            path.display()
        )
    })
}

fn net() -> IpAddr {
    let pid = std::process::id();
    format!("127.90.{}.1", pid % 250 + 1).parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_runs_the_chain_and_swaps_config_atomically() {
    let ip = net();
    let backend = backend(ip).await;
    let objects = parse_manifests(&manifests(backend), "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let snapshot = Arc::new(translation.snapshot);
    let id = PluginId {
        kind: waystone_model::snapshot::ExtensionKind::WasmPlugin,
        key: waystone_model::snapshot::ObjectKey::new("default", "auth"),
    };
    let cfg = snapshot
        .plugins
        .get(&id)
        .expect("the plugin is in the snapshot")
        .clone();

    let engine = WasmEngine::new(EngineConfig::default()).unwrap();
    let module = engine.compile(&basic_auth()).unwrap();
    let plugin = Arc::new(LoadedPlugin {
        id: id.clone(),
        module,
        spec: Arc::new(PluginSpec {
            name: cfg.filter_name.clone(),
            root_id: cfg.root_id.clone(),
            vm_id: String::new(),
            plugin_configuration: cfg.configuration.clone(),
            vm_configuration: Vec::new(),
            env: Vec::new(),
        }),
        fail_strategy: FailStrategy::FailClose,
        revision: 1,
        module_digest: "sha256:test".into(),
    });

    let dp = DataPlane::start(DataPlaneConfig {
        workers: 2,
        gateway_address: ip,
        entry_address: Some(SocketAddr::new(ip, 0)),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut plugins = std::collections::BTreeMap::new();
    plugins.insert(id.clone(), PluginSlot::Ready(plugin));
    let rt = RuntimeConfig {
        snapshot: snapshot.clone(),
        plugins,
        default_namespace: "default".into(),
    };
    let bindings = dp.apply(rt.clone()).await;
    let binding = &bindings[&waystone_model::snapshot::ObjectKey::new("default", "gw")];
    let addr = *binding.listeners[0].result.as_ref().unwrap();
    assert_eq!(addr, SocketAddr::new(ip, 18080));

    let (status, text) = get(addr, "/productpage", "example.com", None).await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=istio"),
        "{text}"
    );
    let (status, text) = get(
        addr,
        "/productpage?x=1",
        "example.com",
        Some("Basic b2s6dGVzdA=="),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("GET /productpage"), "{text}");
    assert!(text.contains("x-served-by: backend"), "{text}");
    let (status, _) = get(addr, "/other", "example.com", None).await;
    assert_eq!(status, 200);

    // Many requests over both workers: every one gets the right answer.
    let mut tasks = Vec::new();
    for i in 0..50 {
        tasks.push(tokio::spawn(async move {
            let auth = if i % 2 == 0 {
                Some("Basic b2s6dGVzdA==")
            } else {
                None
            };
            (i, get(addr, "/productpage", "example.com", auth).await.0)
        }));
    }
    for t in tasks {
        let (i, status) = t.await.unwrap();
        assert_eq!(status, if i % 2 == 0 { 200 } else { 401 });
    }

    // A plugin that failed to load fails closed...
    let mut failed = rt.clone();
    failed.plugins.insert(
        id.clone(),
        PluginSlot::Failed {
            fail_strategy: FailStrategy::FailClose,
            reason: "x".into(),
        },
    );
    dp.apply(failed).await;
    assert_eq!(get(addr, "/other", "example.com", None).await.0, 403);
    // ...or is skipped when FAIL_OPEN.
    let mut open = rt.clone();
    open.plugins.insert(
        id.clone(),
        PluginSlot::Failed {
            fail_strategy: FailStrategy::FailOpen,
            reason: "x".into(),
        },
    );
    dp.apply(open).await;
    assert_eq!(get(addr, "/productpage", "example.com", None).await.0, 200);

    // The mesh entry resolves services by name; without a waypoint it goes straight to endpoints.
    let entry = dp.entry_address().unwrap();
    let (status, text) = get(
        entry,
        "http://productpage:9080/productpage",
        "productpage:9080",
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, _) = get(entry, "http://nothing:9080/", "nothing:9080", None).await;
    assert_eq!(status, 404);

    // h2c (prior knowledge) works on the same listeners, with plugins applied.
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<Bytes>>();
    dp.apply(rt.clone()).await;
    for (auth, want) in [(None, 401), (Some("Basic b2s6dGVzdA=="), 200)] {
        let mut req = hyper::Request::get(format!("http://{addr}/productpage"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = h2
            .request(req.body(http_body_util::Empty::new()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status().as_u16(), want);
    }

    // Config swaps under load fail no request: each finishes on the config it started with.
    let loaders: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..40 {
                    statuses.push(
                        get(
                            addr,
                            "/productpage",
                            "example.com",
                            Some("Basic b2s6dGVzdA=="),
                        )
                        .await
                        .0,
                    );
                }
                statuses
            })
        })
        .collect();
    let PluginSlot::Ready(first) = rt.plugins[&id].clone() else {
        unreachable!()
    };
    for revision in 2..22u64 {
        let mut next = rt.clone();
        let mut plugin = (*first).clone();
        plugin.revision = revision;
        next.plugins
            .insert(id.clone(), PluginSlot::Ready(Arc::new(plugin)));
        dp.apply(next).await;
        tokio::task::yield_now().await;
    }
    for l in loaders {
        let statuses = l.await.unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    }

    // Removing the gateway closes its listener.
    dp.apply(RuntimeConfig::empty()).await;
    let closed = tokio::net::TcpStream::connect(addr).await;
    assert!(closed.is_err(), "listener should be closed");
    dp.shutdown(std::time::Duration::from_secs(2)).await;
    let _ = http_body_util::Empty::<Bytes>::new().collect().await;
}

/// A backend on `addr` that answers with the address it serves on.
async fn named_backend(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let svc = service_fn(
                move |_req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = Full::new(Bytes::from(format!("served by {addr}")));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_spreads_requests_over_every_endpoint() {
    // Two endpoints of one Service, on two loopback addresses with one port.
    let base = net();
    let IpAddr::V4(v4) = base else { unreachable!() };
    let [a, b, c, _] = v4.octets();
    let (ip1, ip2) = (IpAddr::from([a, b, c, 11]), IpAddr::from([a, b, c, 12]));
    let (e1, e2) = loop {
        let e1 = named_backend(SocketAddr::new(ip1, 0)).await.unwrap();
        if let Ok(e2) = named_backend(SocketAddr::new(ip2, e1.port())).await {
            break (e1, e2);
        }
    };
    let yaml = support::manifests_with_endpoints(&[e1, e2], &[("lb", 18081, None)]);
    // One worker: every request is picked by the same worker, one after the other.
    let dp = support::dataplane(base, 1).await;
    let addr = support::apply(&dp, support::runtime(&yaml, |_| unreachable!()), "lb").await;
    let mut served = std::collections::BTreeMap::new();
    for _ in 0..10 {
        let (status, text) = get(addr, "/", "example.com", None).await;
        assert_eq!(status, 200, "{text}");
        let by = text.rsplit("served by ").next().unwrap().to_string();
        *served.entry(by).or_insert(0) += 1;
    }
    let want = [(e1.to_string(), 5), (e2.to_string(), 5)].into();
    assert_eq!(served, want);
    dp.shutdown(std::time::Duration::from_secs(2)).await;
}
