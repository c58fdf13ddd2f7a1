//! HBONE end to end on loopback: a test CA issuing SPIFFE certificates, a waypoint whose
//! `mesh` listener terminates HBONE, the real basic_auth module, and clients (the project's
//! own, a raw rustls one for refusals, and Python's h2 as a third party).

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use waystone_model::snapshot::{ExtensionKind, FailStrategy, ObjectKey, PluginId};
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::hbone::ca::LocalCa;
use waystone_proxy::hbone::{
    HboneClient, HboneConfig, HboneOutbound, Identity, IdentityFiles, SpiffeId,
};
use waystone_proxy::{DataPlane, DataPlaneConfig, LoadedPlugin, PluginSlot, RuntimeConfig};
use waystone_wasm::{EngineConfig, PluginSpec, WasmEngine};

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86_400);
const OK_AUTH: &str = "Basic b2s6dGVzdA==";
const PRODUCTPAGE_IP: &str = "10.96.0.10";

/// Adds the request headers `x-principal` (`source.principal`) and `x-mtls: true`
/// (`connection.mtls`) so the backend can echo what plugins saw.
fn principal_wat() -> String {
    let basics = support::GUEST_BASICS;
    format!(
        r#"(module
  (import "env" "proxy_get_property" (func $get_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 4096))
  {basics}
  (data (i32.const 0) "source\00principal")
  (data (i32.const 32) "connection\00mtls")
  (data (i32.const 64) "x-principal")
  (data (i32.const 80) "x-mtls")
  (data (i32.const 96) "true")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $get_prop (i32.const 0) (i32.const 16) (i32.const 1024) (i32.const 1028)))
      (then (drop (call $add_hv (i32.const 0) (i32.const 64) (i32.const 11)
        (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))))
    (if (i32.eqz (call $get_prop (i32.const 32) (i32.const 15) (i32.const 1024) (i32.const 1028)))
      (then (if (i32.eq (i32.load8_u (i32.load (i32.const 1024))) (i32.const 1))
        (then (drop (call $add_hv (i32.const 0) (i32.const 80) (i32.const 6) (i32.const 96) (i32.const 4)))))))
    (i32.const 0)))"#
    )
}

fn net(k: u8) -> IpAddr {
    let pid = std::process::id();
    format!("127.91.{}.{k}", pid % 250 + 1).parse().unwrap()
}

/// Answers `<method> <path> principal=<x-principal> mtls=<x-mtls>`.
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
                    let h = |n: &str| {
                        req.headers()
                            .get(n)
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_default()
                    };
                    let body = format!(
                        "{} {} principal={} mtls={}",
                        req.method(),
                        req.uri().path(),
                        h("x-principal"),
                        h("x-mtls")
                    );
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from(
                        body,
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

fn manifests(productpage: SocketAddr, reviews: SocketAddr) -> String {
    let svc = |name: &str, ip: &str, ep: SocketAddr| {
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {ip}
  ports: [{{name: http, port: 9080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
endpoints: [{{addresses: ["{epip}"]}}]
ports: [{{name: http, port: {epport}}}]
"#,
            epip = ep.ip(),
            epport = ep.port()
        )
    };
    format!(
        r#"{}{}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: auth, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: productpage}}]
  url: file:///unused.wasm
  phase: AUTHN
  pluginConfig:
    basic_auth_rules:
    - prefix: /productpage
      request_methods: [GET]
      credentials: ["ok:test"]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: principal, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: productpage}}]
  url: file:///unused.wasm
  phase: STATS
"#,
        svc("productpage", PRODUCTPAGE_IP, productpage),
        svc("reviews", "10.96.0.11", reviews),
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

fn runtime(productpage: SocketAddr, reviews: SocketAddr) -> RuntimeConfig {
    let objects = parse_manifests(&manifests(productpage, reviews), "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    let snapshot = Arc::new(translation.snapshot);
    let engine = WasmEngine::new(EngineConfig::default()).unwrap();
    let mut plugins = BTreeMap::new();
    // Revisions key the workers' instance caches: one per plugin.
    for (revision, name, wasm) in [
        (1, "auth", basic_auth()),
        (2, "principal", wat::parse_str(principal_wat()).unwrap()),
    ] {
        let id = PluginId {
            kind: ExtensionKind::WasmPlugin,
            key: ObjectKey::new("default", name),
        };
        let cfg = snapshot
            .plugins
            .get(&id)
            .expect("plugin in snapshot")
            .clone();
        let plugin = LoadedPlugin {
            id: id.clone(),
            module: engine.compile(&wasm).unwrap(),
            spec: Arc::new(PluginSpec {
                name: cfg.filter_name.clone(),
                root_id: cfg.root_id.clone(),
                vm_id: String::new(),
                plugin_configuration: cfg.configuration.clone(),
                vm_configuration: Vec::new(),
                env: Vec::new(),
            }),
            fail_strategy: FailStrategy::FailClose,
            revision,
            module_digest: "sha256:test".into(),
        };
        plugins.insert(id, PluginSlot::Ready(Arc::new(plugin)));
    }
    RuntimeConfig {
        snapshot,
        plugins,
        default_namespace: "default".into(),
    }
}

struct Pki {
    ca: LocalCa,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            ca: LocalCa::load_or_create(&dir.path().join("ca")).unwrap(),
            dir,
        }
    }

    fn identity(&self, ns: &str, sa: &str) -> Arc<Identity> {
        let issued = self.ca.issue(&SpiffeId::new(TD, ns, sa), DAY).unwrap();
        Arc::new(
            Identity::from_pem(
                TD,
                issued.cert_chain_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                self.ca.root_pem().as_bytes(),
            )
            .unwrap(),
        )
    }

    fn files(&self, ns: &str, sa: &str) -> IdentityFiles {
        self.ca
            .issue_to_files(&SpiffeId::new(TD, ns, sa), DAY, self.dir.path(), sa)
            .unwrap()
    }
}

struct Mesh {
    dp: DataPlane,
    waypoint: SocketAddr,
    pki: Pki,
}

async fn mesh(k: u8, hbone: impl FnOnce(&Pki) -> HboneConfig) -> Mesh {
    let ip = net(k);
    let (productpage, reviews) = (backend(ip).await, backend(ip).await);
    let pki = Pki::new();
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 2,
        gateway_address: ip,
        entry_address: Some(SocketAddr::new(ip, 0)),
        hbone: Some(hbone(&pki)),
        ..Default::default()
    })
    .await
    .unwrap();
    let bindings = dp.apply(runtime(productpage, reviews)).await;
    let waypoint = *bindings[&ObjectKey::new("default", "waypoint")].listeners[0]
        .result
        .as_ref()
        .unwrap();
    Mesh { dp, waypoint, pki }
}

fn inbound(identity: Arc<Identity>) -> HboneConfig {
    HboneConfig {
        identity,
        inbound: true,
        entry: false,
        outbound: HboneOutbound::default(),
    }
}

/// One HTTP/1.1 request over an established byte stream (a CONNECT stream).
async fn http_over<S>(stream: S, path: &str, auth: Option<&str>) -> (u16, String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    request(&mut sender, path, auth).await
}

async fn request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
    auth: Option<&str>,
) -> (u16, String) {
    sender.ready().await.unwrap();
    let mut req = hyper::Request::get(path).header("host", "productpage:9080");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let resp = sender
        .send_request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_runs_the_chain_relays_tcp_and_pools_sessions() {
    let m = mesh(1, |pki| inbound(pki.identity("istio-system", "waypoint"))).await;
    let client = HboneClient::new(m.pki.identity("default", "sleep"));
    let authority = format!("{PRODUCTPAGE_IP}:9080");

    let s = client.connect(m.waypoint, &authority, None).await.unwrap();
    let (status, body) = http_over(s, "/productpage", None).await;
    assert_eq!(status, 401, "{body}");
    let s = client.connect(m.waypoint, &authority, None).await.unwrap();
    let (status, body) = http_over(s, "/productpage", Some(OK_AUTH)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        "GET /productpage principal=spiffe://cluster.local/ns/default/sa/sleep mtls=true"
    );
    // By name, as well as by cluster IP.
    let s = client
        .connect(
            m.waypoint,
            "productpage.default.svc.cluster.local:9080",
            None,
        )
        .await
        .unwrap();
    assert_eq!(http_over(s, "/productpage", None).await.0, 401);

    // A service port without plugins is relayed as TCP: no chain, so no plugin headers.
    let s = client
        .connect(m.waypoint, "10.96.0.11:9080", None)
        .await
        .unwrap();
    let (status, body) = http_over(s, "/reviews", None).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "GET /reviews principal= mtls=")
    );

    // Unknown destinations are refused at CONNECT.
    let err = client
        .connect(m.waypoint, "10.1.1.1:80", None)
        .await
        .err()
        .expect("unknown destination refused");
    assert!(err.to_string().contains("status 404"), "{err}");

    // Many concurrent streams, one TLS session.
    let client = Arc::new(client);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (client, authority, waypoint) = (client.clone(), authority.clone(), m.waypoint);
            tokio::spawn(async move {
                let s = client.connect(waypoint, &authority, None).await.unwrap();
                let auth = (i % 2 == 0).then_some(OK_AUTH);
                (i, http_over(s, "/productpage", auth).await.0)
            })
        })
        .collect();
    for t in tasks {
        let (i, status) = t.await.unwrap();
        assert_eq!(status, if i % 2 == 0 { 200 } else { 401 });
    }
    assert_eq!(client.sessions_dialed(), 1);
    m.dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_entry_speaks_hbone_to_the_waypoint() {
    let m = mesh(2, |pki| HboneConfig {
        identity: pki.identity("istio-system", "waystone"),
        inbound: true,
        entry: true,
        outbound: HboneOutbound::default(),
    })
    .await;
    let entry = m.dp.entry_address().unwrap();
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let get = |auth: Option<&'static str>| {
        let client = client.clone();
        async move {
            let mut req = hyper::Request::get(format!("http://{entry}/productpage"))
                .header("host", "productpage:9080");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let resp = client
                .request(req.body(Empty::new()).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(get(None).await.0, 401);
    let (status, body) = get(Some(OK_AUTH)).await;
    assert_eq!(status, 200, "{body}");
    // The waypoint saw the entry's SPIFFE identity over mTLS: the request crossed HBONE.
    assert_eq!(
        body,
        "GET /productpage principal=spiffe://cluster.local/ns/istio-system/sa/waystone mtls=true"
    );
    m.dp.shutdown(Duration::from_secs(2)).await;
}

// ------------------------------------------------------------------ refusals

/// Accepts any server certificate: the refusal tests check the waypoint's side only.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls_pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Handshake, h2 and one CONNECT with `client_cert` (cert PEM, key PEM) or none; returns the
/// CONNECT status, or the error that ended the attempt.
async fn raw_connect(
    waypoint: SocketAddr,
    client_cert: Option<(String, String)>,
) -> Result<u16, String> {
    use rustls_pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(waypoint).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::IpAddress(waypoint.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .map_err(|e| format!("h2: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("CONNECT")
        .uri(format!("{PRODUCTPAGE_IP}:9080"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .map_err(|_| "CONNECT timed out".to_string())?
        .map_err(|e| format!("CONNECT: {e}"))?;
    Ok(resp.status().as_u16())
}

fn pem(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> (String, String) {
    (cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_refuses_clients_without_a_valid_spiffe_certificate() {
    let m = mesh(3, |pki| inbound(pki.identity("istio-system", "waypoint"))).await;
    let good = m
        .pki
        .ca
        .issue(&SpiffeId::new(TD, "default", "sleep"), DAY)
        .unwrap();
    // The control: the same raw client with a good certificate gets through.
    assert_eq!(
        raw_connect(m.waypoint, Some((good.cert_chain_pem, good.key_pem))).await,
        Ok(200)
    );

    let missing = raw_connect(m.waypoint, None).await;
    assert!(missing.is_err(), "no client certificate: {missing:?}");

    let other_ca = LocalCa::generate("another CA").unwrap();
    let wrong_ca = other_ca
        .issue(&SpiffeId::new(TD, "default", "sleep"), DAY)
        .unwrap();
    let r = raw_connect(
        m.waypoint,
        Some((wrong_ca.cert_chain_pem, wrong_ca.key_pem)),
    )
    .await;
    assert!(r.is_err(), "certificate from another CA: {r:?}");

    let wrong_td = m
        .pki
        .ca
        .issue(&SpiffeId::new("evil.example", "default", "sleep"), DAY)
        .unwrap();
    let r = raw_connect(
        m.waypoint,
        Some((wrong_td.cert_chain_pem, wrong_td.key_pem)),
    )
    .await;
    assert!(r.is_err(), "another trust domain: {r:?}");

    // Chained to the right root, but a DNS name instead of a SPIFFE URI.
    let ca_dir = m.pki.dir.path().join("ca");
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca-key.pem")).unwrap())
            .unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["sleep.default".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let mut ca_params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::OrganizationName, "waystone");
    dn.push(rcgen::DnType::CommonName, "waystone local mesh CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let r = raw_connect(m.waypoint, Some(pem(&cert, &key))).await;
    assert!(r.is_err(), "no SPIFFE URI SAN: {r:?}");

    // The project's client refuses a waypoint from another trust root as well.
    let stranger = {
        let issued = other_ca
            .issue(&SpiffeId::new(TD, "default", "sleep"), DAY)
            .unwrap();
        Arc::new(
            Identity::from_pem(
                TD,
                issued.cert_chain_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                other_ca.root_pem().as_bytes(),
            )
            .unwrap(),
        )
    };
    let err = HboneClient::new(stranger)
        .connect(m.waypoint, &format!("{PRODUCTPAGE_IP}:9080"), None)
        .await
        .err()
        .expect("untrusted waypoint refused");
    assert!(err.to_string().contains("TLS handshake"), "{err}");
    m.dp.shutdown(Duration::from_secs(2)).await;
}

// ------------------------------------------------------------------ rotation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_streams() {
    let files_holder = std::sync::Mutex::new(None);
    let m = mesh(4, |pki| {
        let files = pki.files("istio-system", "waypoint");
        *files_holder.lock().unwrap() = Some(files.clone());
        let identity = Arc::new(Identity::from_files(TD, files).unwrap());
        identity.spawn_reloader(Duration::from_millis(50));
        inbound(identity)
    })
    .await;
    let files = files_holder.lock().unwrap().take().unwrap();
    let server_identity = Identity::from_files(TD, files.clone()).unwrap();
    let first_leaf = server_identity.leaf();

    // An established stream with a keep-alive HTTP/1.1 connection inside.
    let client = HboneClient::new(m.pki.identity("default", "sleep"));
    let stream = client
        .connect(m.waypoint, &format!("{PRODUCTPAGE_IP}:9080"), None)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        request(&mut sender, "/productpage", Some(OK_AUTH)).await.0,
        200
    );

    // Rotate: a new certificate and key in the same files.
    m.pki
        .ca
        .issue_to_files(
            &SpiffeId::new(TD, "istio-system", "waypoint"),
            DAY,
            m.pki.dir.path(),
            "waypoint",
        )
        .unwrap();
    // The data plane's identity polls (spawned reloader); wait until new handshakes show the
    // new leaf, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let new_leaf = loop {
        let leaf = presented_leaf(m.waypoint, &m.pki).await;
        if leaf != first_leaf {
            break leaf;
        }
        assert!(Instant::now() < deadline, "rotation not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        new_leaf,
        Identity::from_files(TD, files).unwrap().leaf(),
        "the new handshake presents the rotated certificate"
    );
    // The stream established before the rotation still carries requests.
    assert_eq!(
        request(&mut sender, "/productpage", Some(OK_AUTH)).await.0,
        200
    );
    assert_eq!(request(&mut sender, "/productpage", None).await.0, 401);
    m.dp.shutdown(Duration::from_secs(2)).await;
}

/// The leaf certificate the waypoint presents to a fresh handshake.
async fn presented_leaf(
    waypoint: SocketAddr,
    pki: &Pki,
) -> rustls_pki_types::CertificateDer<'static> {
    let identity = pki.identity("default", "probe");
    let tcp = tokio::net::TcpStream::connect(waypoint).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(identity.client_config())
        .connect(
            rustls_pki_types::ServerName::IpAddress(waypoint.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

// ------------------------------------------------------------------ outbound

/// A ztunnel stand-in in front of one workload: terminates HBONE with `identity`, records
/// the CONNECT authorities and relays each stream to `workload`.
async fn ztunnel(
    ip: IpAddr,
    identity: Arc<Identity>,
    workload: SocketAddr,
) -> (
    SocketAddr,
    Arc<std::sync::Mutex<Vec<String>>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sessions = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(identity.server_config());
    let (seen2, sessions2) = (seen.clone(), sessions.clone());
    tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            sessions2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else {
                    return;
                };
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    seen.lock()
                        .unwrap()
                        .push(req.uri().authority().unwrap().to_string());
                    tokio::spawn(async move {
                        let mut up = TokioIo::new(hyper::upgrade::on(req).await.unwrap());
                        let mut down = tokio::net::TcpStream::connect(workload).await.unwrap();
                        let _ = tokio::io::copy_bidirectional(&mut up, &mut down).await;
                    });
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            Empty::<Bytes>::new(),
                        ))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen, sessions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waypoint_reaches_hbone_endpoints_over_pooled_sessions() {
    let ip = net(5);
    let pki = Pki::new();
    let (productpage, reviews) = (backend(ip).await, backend(ip).await);
    let (tunnel, seen, sessions) =
        ztunnel(ip, pki.identity("default", "productpage"), productpage).await;
    let mut outbound = HboneOutbound::default();
    outbound.tunnels.insert(productpage, tunnel);
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        hbone: Some(HboneConfig {
            identity: pki.identity("istio-system", "waypoint"),
            inbound: true,
            entry: false,
            outbound,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let bindings = dp.apply(runtime(productpage, reviews)).await;
    let waypoint = *bindings[&ObjectKey::new("default", "waypoint")].listeners[0]
        .result
        .as_ref()
        .unwrap();
    let client = HboneClient::new(pki.identity("default", "sleep"));
    for i in 0..6 {
        // Fresh downstream streams, each request forwarded upstream through the tunnel.
        let s = client
            .connect(waypoint, &format!("{PRODUCTPAGE_IP}:9080"), None)
            .await
            .unwrap();
        let (status, body) = http_over(s, "/productpage", Some(OK_AUTH)).await;
        assert_eq!(status, 200, "request {i}: {body}");
    }
    // TCP relay (no plugins on reviews) to a plain endpoint still works alongside.
    let s = client
        .connect(waypoint, "10.96.0.11:9080", None)
        .await
        .unwrap();
    assert_eq!(http_over(s, "/reviews", None).await.0, 200);

    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| *a == productpage.to_string()),
        "{seen:?}"
    );
    assert_eq!(
        sessions.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one pooled h2 session carries every CONNECT stream"
    );
    dp.shutdown(Duration::from_secs(2)).await;
}

// ------------------------------------------------------------------ third party

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_h2_client_reaches_the_service_through_the_waypoint() {
    let check = std::process::Command::new("python3")
        .args(["-c", "import h2"])
        .status()
        .expect("python3 runs");
    assert!(
        check.success(),
        "the Python h2 package is missing: scripts/test.sh installs it (pip install h2)"
    );
    let m = mesh(6, |pki| inbound(pki.identity("istio-system", "waypoint"))).await;
    let files = m.pki.files("default", "curlish");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hbone_client.py");
    let run = |auth: Option<&str>| {
        let mut cmd = std::process::Command::new("python3");
        cmd.arg(&script)
            .arg(m.waypoint.ip().to_string())
            .arg(m.waypoint.port().to_string())
            .arg(&files.cert_chain)
            .arg(&files.key)
            .arg(&files.roots)
            .arg(format!("{PRODUCTPAGE_IP}:9080"))
            .arg("/productpage");
        if let Some(a) = auth {
            cmd.arg(a);
        }
        async move {
            // The client's own socket timeout (10 s) bounds the run.
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            text
        }
    };
    let denied = run(None).await;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let allowed = run(Some(OK_AUTH)).await;
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
    assert!(
        allowed.contains("principal=spiffe://cluster.local/ns/default/sa/curlish mtls=true"),
        "{allowed}"
    );
    m.dp.shutdown(Duration::from_secs(2)).await;
}

// ------------------------------------------------------------------ benchmark

/// Sequential latency and concurrent throughput through the waypoint's chain (basic_auth and
/// the principal plugin), plain HTTP/1.1 on the listener vs HBONE (one CONNECT stream per
/// client connection, HTTP/1.1 inside). Run: `cargo nextest run -p waystone-proxy
/// --run-ignored only hbone_vs_plain --no-capture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints numbers"]
async fn hbone_vs_plain_benchmark() {
    const SEQ: usize = 1000;
    const CONC: usize = 16;
    const PER: usize = 100;
    let ip = net(7);
    let (productpage, reviews) = (backend(ip).await, backend(ip).await);
    let pki = Pki::new();
    let start = |hbone: Option<HboneConfig>, k: u8| async move {
        let gw_ip = net(k);
        let dp = DataPlane::start(DataPlaneConfig {
            workers: 2,
            gateway_address: gw_ip,
            entry_address: None,
            hbone,
            ..Default::default()
        })
        .await
        .unwrap();
        let b = dp.apply(runtime(productpage, reviews)).await;
        let addr = *b[&ObjectKey::new("default", "waypoint")].listeners[0]
            .result
            .as_ref()
            .unwrap();
        (dp, addr)
    };
    let (plain_dp, plain) = start(None, 8).await;
    let (hbone_dp, hbone) = start(Some(inbound(pki.identity("istio-system", "waypoint"))), 9).await;
    let client = Arc::new(HboneClient::new(pki.identity("default", "sleep")));

    async fn sender(
        client: Option<Arc<HboneClient>>,
        addr: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
        let (s, conn) = match client {
            Some(c) => {
                let stream = c
                    .connect(addr, &format!("{PRODUCTPAGE_IP}:9080"), None)
                    .await
                    .unwrap();
                let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                return s;
            }
            None => {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .unwrap()
            }
        };
        tokio::spawn(conn);
        s
    }

    for (name, c, addr) in [
        ("plain", None, plain),
        ("hbone", Some(client.clone()), hbone),
    ] {
        let mut s = sender(c.clone(), addr).await;
        for _ in 0..50 {
            assert_eq!(request(&mut s, "/productpage", Some(OK_AUTH)).await.0, 200);
        }
        let mut lat = Vec::with_capacity(SEQ);
        for _ in 0..SEQ {
            let t = Instant::now();
            assert_eq!(request(&mut s, "/productpage", Some(OK_AUTH)).await.0, 200);
            lat.push(t.elapsed());
        }
        lat.sort();
        let t = Instant::now();
        let tasks: Vec<_> = (0..CONC)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut s = sender(c, addr).await;
                    for _ in 0..PER {
                        assert_eq!(request(&mut s, "/productpage", Some(OK_AUTH)).await.0, 200);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let rps = (CONC * PER) as f64 / t.elapsed().as_secs_f64();
        // New connection per request: TCP connect vs (pooled TLS session +) CONNECT stream.
        let t = Instant::now();
        for _ in 0..200 {
            let mut s = sender(c.clone(), addr).await;
            assert_eq!(request(&mut s, "/productpage", Some(OK_AUTH)).await.0, 200);
        }
        let per_conn = t.elapsed() / 200;
        println!(
            "BENCH {name}: sequential p50 {:?} p99 {:?}; {CONC}x{PER} concurrent {rps:.0} req/s; new connection + request {per_conn:?}",
            lat[SEQ / 2],
            lat[SEQ * 99 / 100],
        );
    }
    plain_dp.shutdown(Duration::from_secs(2)).await;
    hbone_dp.shutdown(Duration::from_secs(2)).await;
}
