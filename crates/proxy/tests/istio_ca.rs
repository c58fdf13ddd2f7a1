//! The HBONE identity from Istio's CA, on loopback: a fake istiod (gRPC over h2 and TLS,
//! serving certificate for `istiod.istio-system.svc` from the mesh root) authenticates the
//! bearer token, signs the CSR for the token's identity with a 4 s lifetime, and the waypoint
//! keeps serving HBONE while its certificate rotates, the token goes bad, or the CA goes away.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use waystone_model::snapshot::ObjectKey;
use waystone_model::{TranslateOptions, parse_manifests, translate};
use waystone_proxy::hbone::istio_ca::{CREATE_CERTIFICATE_PATH, RotationStatus};
use waystone_proxy::hbone::{
    CaFailure, CaRotation, HboneClient, HboneConfig, HboneError, HboneOutbound, Identity,
    IstioCaClient, IstioCaOptions, SpiffeId,
};
use waystone_proxy::{DataPlane, DataPlaneConfig, RuntimeConfig};

const TD: &str = "cluster.local";
const ISTIOD_NAME: &str = "istiod.istio-system.svc";
const WAYPOINT_TOKEN: &str = "token-of-the-waypoint";
const SLEEP_TOKEN: &str = "token-of-sleep";
/// Longest lifetime the fake CA grants, whatever is asked: rotation happens in seconds.
const MAX_TTL: Duration = Duration::from_secs(4);
const ECHO_IP: &str = "10.96.0.20";

fn net(k: u8) -> IpAddr {
    let pid = std::process::id();
    format!("127.93.{}.{k}", pid % 250 + 1).parse().unwrap()
}

fn waypoint_id() -> SpiffeId {
    SpiffeId::new(TD, "istio-system", "waypoint")
}

// ------------------------------------------------------------------ fake istiod

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sign,
    EmptyChain,
    /// Signs a key of its own instead of the CSR's.
    OtherKey,
    /// Signs the CSR for another service account than the token's.
    OtherIdentity,
}

struct CaState {
    mode: Mode,
    /// (serial, DER) of every certificate issued, in order.
    issued: Vec<(u64, Vec<u8>)>,
    /// `clusterid` headers seen.
    cluster_ids: Vec<String>,
}

struct FakeIstiod {
    addr: SocketAddr,
    root_pem: String,
    root_key: KeyPair,
    root_params: CertificateParams,
    state: Arc<Mutex<CaState>>,
    accept: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "fake istio mesh root");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl FakeIstiod {
    async fn start(ip: IpAddr) -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params();
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        // istiod's serving certificate, from the same mesh root, as in a default install.
        let serving_key = KeyPair::generate().unwrap();
        let mut serving = CertificateParams::new(vec![ISTIOD_NAME.to_string()]).unwrap();
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving
            .signed_by(&serving_key, &Issuer::from_params(&root_params, &root_key))
            .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![serving_cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::from_pem_slice(serving_key.serialize_pem().as_bytes())
                .unwrap(),
        )
        .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(CaState {
            mode: Mode::Sign,
            issued: Vec::new(),
            cluster_ids: Vec::new(),
        }));
        let signer = Arc::new(Signer {
            root_key: KeyPair::from_pem(&root_key.serialize_pem()).unwrap(),
            root_params: ca_params(),
            root_pem: root_pem.clone(),
            state: state.clone(),
            serial: AtomicU64::new(1),
        });
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, signer) = (acceptor.clone(), signer.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let signer = signer.clone();
                        async move { Ok::<_, std::convert::Infallible>(signer.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("root-cert.pem"), &root_pem).unwrap();
        Self {
            addr,
            root_pem,
            root_key,
            root_params,
            state,
            accept,
            dir,
        }
    }

    fn set_mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Stops accepting connections and closes the listening socket.
    async fn stop(&self) {
        self.accept.abort();
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(self.addr).await.is_ok() {
            assert!(Instant::now() < deadline, "the fake CA still accepts");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The serial the CA gave `leaf`.
    fn serial_of(&self, leaf: &CertificateDer<'_>) -> u64 {
        self.state
            .lock()
            .unwrap()
            .issued
            .iter()
            .find(|(_, der)| der.as_slice() == leaf.as_ref())
            .map(|(s, _)| *s)
            .expect("a certificate this CA issued")
    }

    fn issued_count(&self) -> usize {
        self.state.lock().unwrap().issued.len()
    }

    fn token_file(&self, name: &str, token: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p
    }

    fn options(&self, id: SpiffeId, token_file: &Path) -> IstioCaOptions {
        let mut o = IstioCaOptions::new(id);
        o.address = self.addr.to_string();
        o.tls_server_name = Some(ISTIOD_NAME.to_string());
        o.root_cert = self.dir.path().join("root-cert.pem");
        o.token_file = token_file.to_path_buf();
        o.cert_ttl = MAX_TTL;
        o.retry_initial = Duration::from_millis(100);
        o.retry_max = Duration::from_millis(400);
        o.request_timeout = Duration::from_secs(3);
        o
    }
}

struct Signer {
    root_key: KeyPair,
    root_params: CertificateParams,
    root_pem: String,
    state: Arc<Mutex<CaState>>,
    serial: AtomicU64,
}

type Body = BoxBody<Bytes, std::convert::Infallible>;

fn grpc_error(code: u32, message: &str) -> hyper::Response<Body> {
    hyper::Response::builder()
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message.replace(' ', "%20"))
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

fn varint(buf: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[0];
        buf.advance(1);
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// `IstioCertificateRequest`: (csr = 1, validity_duration = 3).
fn decode_request(mut buf: &[u8]) -> (String, i64) {
    let (mut csr, mut ttl) = (String::new(), 0);
    while !buf.is_empty() {
        let tag = varint(&mut buf);
        match (tag >> 3, tag & 7) {
            (1, 2) => {
                let n = varint(&mut buf) as usize;
                csr = String::from_utf8(buf[..n].to_vec()).unwrap();
                buf.advance(n);
            }
            (3, 0) => ttl = varint(&mut buf) as i64,
            (_, 2) => {
                let n = varint(&mut buf) as usize;
                buf.advance(n);
            }
            (_, 0) => {
                varint(&mut buf);
            }
            other => panic!("unexpected field {other:?}"),
        }
    }
    (csr, ttl)
}

impl Signer {
    async fn handle(&self, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Body> {
        assert_eq!(req.uri().path(), CREATE_CERTIFICATE_PATH);
        assert_eq!(req.headers()["content-type"], "application/grpc");
        if let Some(c) = req.headers().get("clusterid") {
            let c = c.to_str().unwrap().to_string();
            self.state.lock().unwrap().cluster_ids.push(c);
        }
        // Like istiod's TokenReview: the token alone decides the identity.
        let sa = match req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
        {
            Some(v) if v == format!("Bearer {WAYPOINT_TOKEN}") => ("istio-system", "waypoint"),
            Some(v) if v == format!("Bearer {SLEEP_TOKEN}") => ("default", "sleep"),
            _ => return grpc_error(16, "authentication failure"),
        };
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert_eq!(body[0], 0);
        let (csr_pem, ttl) = decode_request(&body[5..5 + len]);
        let mode = self.state.lock().unwrap().mode;
        if mode == Mode::EmptyChain {
            return self.reply(&[]);
        }
        let csr = CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        let sa = if mode == Mode::OtherIdentity {
            (sa.0, "someone-else")
        } else {
            sa
        };
        let id = SpiffeId::new(TD, sa.0, sa.1);
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        let ttl = Duration::from_secs(ttl.max(1) as u64).min(MAX_TTL);
        // Backdated for clock skew, as real CAs do; the client must count from receipt.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + ttl;
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        params.serial_number = Some(serial.into());
        let issuer = Issuer::from_params(&self.root_params, &self.root_key);
        let cert = if mode == Mode::OtherKey {
            params.signed_by(&KeyPair::generate().unwrap(), &issuer)
        } else {
            params.signed_by(&csr.public_key, &issuer)
        }
        .unwrap();
        self.state
            .lock()
            .unwrap()
            .issued
            .push((serial, cert.der().to_vec()));
        self.reply(&[cert.pem(), self.root_pem.clone()])
    }

    /// `IstioCertificateResponse { repeated string cert_chain = 1 }` and an OK trailer.
    fn reply(&self, chain: &[String]) -> hyper::Response<Body> {
        let mut msg = BytesMut::new();
        for c in chain {
            msg.put_u8(0x0a);
            let mut n = c.len() as u64;
            while n >= 0x80 {
                msg.put_u8(n as u8 | 0x80);
                n >>= 7;
            }
            msg.put_u8(n as u8);
            msg.put_slice(c.as_bytes());
        }
        let mut framed = BytesMut::new();
        framed.put_u8(0);
        framed.put_u32(msg.len() as u32);
        framed.put_slice(&msg);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        hyper::Response::builder()
            .header("content-type", "application/grpc")
            .body(
                Full::new(framed.freeze())
                    .with_trailers(async move { Some(Ok(trailers)) })
                    .boxed(),
            )
            .unwrap()
    }
}

// ------------------------------------------------------------------ the waypoint

/// A TCP echo server: a service without plugins, so the waypoint relays HBONE streams to it.
async fn echo(ip: IpAddr) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn runtime(echo: SocketAddr) -> RuntimeConfig {
    let manifests = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: default, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  clusterIP: {ECHO_IP}
  ports: [{{name: tcp, port: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  namespace: default
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints: [{{addresses: ["{}"]}}]
ports: [{{name: tcp, port: {}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: default}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
"#,
        echo.ip(),
        echo.port()
    );
    let objects = parse_manifests(&manifests, "test").unwrap();
    let translation = translate(&objects, &TranslateOptions::default());
    assert!(translation.errors.is_empty(), "{:?}", translation.errors);
    RuntimeConfig {
        snapshot: Arc::new(translation.snapshot),
        plugins: BTreeMap::new(),
        default_namespace: "default".into(),
    }
}

struct Waypoint {
    dp: DataPlane,
    addr: SocketAddr,
}

async fn waypoint(ip: IpAddr, identity: Arc<Identity>) -> Waypoint {
    let dp = DataPlane::start(DataPlaneConfig {
        workers: 1,
        gateway_address: ip,
        entry_address: None,
        hbone: Some(HboneConfig {
            identity,
            inbound: true,
            entry: false,
            outbound: HboneOutbound::default(),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let bindings = dp.apply(runtime(echo(ip).await)).await;
    let addr = *bindings[&ObjectKey::new("default", "waypoint")].listeners[0]
        .result
        .as_ref()
        .unwrap();
    Waypoint { dp, addr }
}

/// A long-lived client identity from the mesh root (a ztunnel's, in a cluster).
fn client_identity(ca: &FakeIstiod) -> Arc<Identity> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(
        SpiffeId::new(TD, "default", "sleep")
            .to_string()
            .try_into()
            .unwrap(),
    )];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca.root_params, &ca.root_key))
        .unwrap();
    Arc::new(
        Identity::from_pem(
            TD,
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            ca.root_pem.as_bytes(),
        )
        .unwrap(),
    )
}

/// The leaf a fresh handshake with the waypoint gets, or the handshake's error.
async fn presented(
    waypoint: SocketAddr,
    client: &Arc<Identity>,
) -> Result<CertificateDer<'static>, String> {
    let tcp = tokio::net::TcpStream::connect(waypoint).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client.client_config())
        .connect(
            rustls_pki_types::ServerName::IpAddress(waypoint.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

async fn round_trip(stream: &mut waystone_proxy::hbone::HboneStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    let mut buf = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Waits (bounded) for the rotation status to satisfy `pred`.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<RotationStatus>,
    what: &str,
    pred: impl Fn(&RotationStatus) -> bool,
) -> RotationStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        {
            let s = rx.borrow_and_update();
            if pred(&s) {
                return s.clone();
            }
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            panic!("{what}: not within 15 s; status {:?}", *rx.borrow());
        }
    }
}

fn ca_failure(e: HboneError) -> (String, CaFailure) {
    match e {
        HboneError::IstioCa { address, failure } => (address, failure),
        other => panic!("not an Istio CA error: {other}"),
    }
}

/// A fake istiod on `ip` and the waypoint's rotation, holding its first certificate (serial 1)
/// from it; the token is the file `token`, which tests rewrite to change what istiod sees.
async fn ca_with_rotation(ip: IpAddr) -> (FakeIstiod, CaRotation) {
    let ca = FakeIstiod::start(ip).await;
    let token = ca.token_file("token", WAYPOINT_TOKEN);
    let rotation =
        CaRotation::start(IstioCaClient::new(ca.options(waypoint_id(), &token)).unwrap())
            .await
            .unwrap();
    (ca, rotation)
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_a_fresh_key_for_the_token_identity() {
    let ca = FakeIstiod::start(net(1)).await;
    let token = ca.token_file("token", WAYPOINT_TOKEN);
    let client = IstioCaClient::new(ca.options(waypoint_id(), &token)).unwrap();
    let first = client.fetch().await.unwrap();
    let second = client.fetch().await.unwrap();
    assert_ne!(first.key_pem, second.key_pem, "a new key per request");

    let identity = Identity::from_pem(
        TD,
        first.cert_chain_pem.as_bytes(),
        first.key_pem.as_bytes(),
        first.roots_pem.as_bytes(),
    )
    .unwrap();
    assert_eq!(identity.spiffe_id(), waypoint_id());
    assert_eq!(ca.serial_of(&identity.leaf()), 1);
    // Leaf presented, root trusted (from the root file and the chain's end).
    assert_eq!(
        CertificateDer::pem_slice_iter(first.cert_chain_pem.as_bytes()).count(),
        1
    );
    assert!(first.roots_pem.contains(ca.root_pem.trim()));
    // The CA's 4 s cap, counted from receipt although notBefore is backdated 5 minutes.
    let life = first.not_after.duration_since(first.received).unwrap();
    assert!(
        life <= MAX_TTL && life >= Duration::from_secs(2),
        "{life:?}"
    );
    let refresh = first
        .refresh_at(0.5)
        .duration_since(first.received)
        .unwrap();
    assert!(refresh <= MAX_TTL / 2, "{refresh:?}");
    assert_eq!(
        ca.state.lock().unwrap().cluster_ids,
        vec!["Kubernetes".to_string(); 2]
    );

    // Another pod's token gets that pod's identity.
    let sleep_token = ca.token_file("sleep-token", SLEEP_TOKEN);
    let sleep = IstioCaClient::new(ca.options(SpiffeId::new(TD, "default", "sleep"), &sleep_token))
        .unwrap()
        .fetch()
        .await
        .unwrap();
    assert!(sleep.not_after > SystemTime::now());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_failures_name_the_address_and_the_reason() {
    let ca = FakeIstiod::start(net(2)).await;
    let good = ca.token_file("token", WAYPOINT_TOKEN);
    let fetch = |opts: IstioCaOptions| async move {
        let e = IstioCaClient::new(opts).unwrap().fetch().await.unwrap_err();
        let text = e.to_string();
        let (address, failure) = ca_failure(e);
        assert!(text.contains(&address), "{text}");
        (failure, text)
    };
    let addr = ca.addr.to_string();

    let bad = ca.token_file("bad", "not-a-token");
    let (f, text) = fetch(ca.options(waypoint_id(), &bad)).await;
    assert!(
        matches!(f, CaFailure::Unauthenticated(ref m) if m == "authentication failure"),
        "{f:?}"
    );
    assert_eq!(
        text,
        format!(
            "Istio CA {addr}: the CA refused our token (UNAUTHENTICATED): authentication failure"
        )
    );

    let (f, _) = fetch(ca.options(waypoint_id(), &ca.dir.path().join("missing"))).await;
    assert!(matches!(f, CaFailure::Token { .. }), "{f:?}");

    // The token is for istio-system/waypoint: asking for another identity is refused here.
    let (f, text) = fetch(ca.options(SpiffeId::new(TD, "default", "sleep"), &good)).await;
    assert!(matches!(f, CaFailure::WrongIdentity { .. }), "{f:?}");
    assert!(
        text.contains("spiffe://cluster.local/ns/istio-system/sa/waypoint"),
        "{text}"
    );

    for (mode, check) in [
        (
            Mode::EmptyChain,
            (|f: &CaFailure| *f == CaFailure::EmptyChain) as fn(&CaFailure) -> bool,
        ),
        (Mode::OtherKey, |f| *f == CaFailure::KeyMismatch),
        (
            Mode::OtherIdentity,
            |f| matches!(f, CaFailure::WrongIdentity { got, .. } if got.ends_with("/sa/someone-else")),
        ),
    ] {
        ca.set_mode(mode);
        let (f, _) = fetch(ca.options(waypoint_id(), &good)).await;
        assert!(check(&f), "{mode:?}: {f:?}");
    }
    ca.set_mode(Mode::Sign);

    // istiod's certificate does not chain to a root we were not given.
    let other_root = FakeIstiod::start(net(3)).await;
    let mut opts = ca.options(waypoint_id(), &good);
    opts.root_cert = other_root.dir.path().join("root-cert.pem");
    let (f, _) = fetch(opts).await;
    assert!(matches!(f, CaFailure::Tls(_)), "{f:?}");
    // Nor does it name another server.
    let mut opts = ca.options(waypoint_id(), &good);
    opts.tls_server_name = Some("istiod.elsewhere.svc".into());
    let (f, _) = fetch(opts).await;
    assert!(matches!(f, CaFailure::Tls(_)), "{f:?}");

    ca.stop().await;
    let (f, _) = fetch(ca.options(waypoint_id(), &good)).await;
    assert!(matches!(f, CaFailure::Unreachable(_)), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_an_open_hbone_stream() {
    let ip = net(4);
    let (ca, rotation) = ca_with_rotation(ip).await;
    let first = rotation.identity().leaf();
    let first_not_after = rotation.identity().not_after().unwrap();
    assert_eq!(ca.serial_of(&first), 1);
    let wp = waypoint(ip, rotation.identity().clone()).await;
    let client_id = client_identity(&ca);

    let client = HboneClient::new(client_id.clone());
    let mut stream = client
        .connect(wp.addr, &format!("{ECHO_IP}:7000"), None)
        .await
        .unwrap();
    round_trip(&mut stream, b"before the rotation").await;
    let mut status = rotation.status();
    assert_eq!(
        status.borrow().rotations,
        0,
        "setup outlasted half the certificate's lifetime: the stream did not open under certificate 1"
    );
    let s = wait_for(&mut status, "a rotation", |s| s.rotations >= 1).await;
    assert_eq!(s.last_error, None);
    let now_serial = ca.serial_of(&rotation.identity().leaf());
    assert!(now_serial > 1);
    // New handshakes present a newer certificate (the rotation goes on every ~2 s).
    let seen = ca.serial_of(&presented(wp.addr, &client_id).await.unwrap());
    assert!(
        seen >= now_serial,
        "handshake saw serial {seen}, rotation installed {now_serial}"
    );
    // The stream opened under certificate 1 keeps flowing...
    round_trip(&mut stream, b"after the rotation").await;
    // ...even after certificate 1 has expired: established sessions are not re-verified.
    let deadline = Instant::now() + Duration::from_secs(10);
    while SystemTime::now() <= first_not_after + Duration::from_secs(1) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    round_trip(&mut stream, b"after the first certificate expired").await;
    // And a new client reaches the service through the rotated identity.
    let mut fresh = HboneClient::new(client_id.clone())
        .connect(wp.addr, &format!("{ECHO_IP}:7000"), None)
        .await
        .unwrap();
    round_trip(&mut fresh, b"new session").await;
    assert!(ca.issued_count() >= 3, "{}", ca.issued_count());
    wp.dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_keeps_the_current_certificate_serving() {
    let ip = net(5);
    let (ca, rotation) = ca_with_rotation(ip).await;
    // Kubelet writes a token istiod does not accept; the file is re-read at each request.
    ca.token_file("token", "revoked");
    let wp = waypoint(ip, rotation.identity().clone()).await;
    let client_id = client_identity(&ca);
    let mut status = rotation.status();
    let s = wait_for(&mut status, "a refused renewal", |s| s.failures >= 1).await;
    let err = s.last_error.unwrap();
    assert!(
        err.contains(&ca.addr.to_string()) && err.contains("UNAUTHENTICATED"),
        "{err}"
    );
    assert_eq!(s.rotations, 0);
    assert_eq!(ca.serial_of(&rotation.identity().leaf()), 1);
    assert_eq!(
        ca.serial_of(&presented(wp.addr, &client_id).await.unwrap()),
        1
    );

    // A good token again: the next retry renews.
    ca.token_file("token", WAYPOINT_TOKEN);
    let s = wait_for(&mut status, "a renewal after the fix", |s| s.rotations >= 1).await;
    assert_eq!(s.last_error, None);
    assert!(ca.serial_of(&presented(wp.addr, &client_id).await.unwrap()) > 1);
    wp.dp.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_down_the_certificate_serves_until_it_expires() {
    let ip = net(6);
    let (ca, rotation) = ca_with_rotation(ip).await;
    let not_after = rotation.identity().not_after().unwrap();
    ca.stop().await;
    let wp = waypoint(ip, rotation.identity().clone()).await;
    let client_id = client_identity(&ca);

    let mut status = rotation.status();
    let s = wait_for(&mut status, "retries", |s| s.failures >= 2).await;
    let err = s.last_error.unwrap();
    assert!(
        err.contains(&ca.addr.to_string()) && err.contains("unreachable"),
        "{err}"
    );
    let retry_at = s.next_attempt.unwrap();
    assert!(
        retry_at <= SystemTime::now() + Duration::from_millis(500),
        "backoff stays bounded"
    );
    // Until it expires the first certificate keeps serving new handshakes...
    if SystemTime::now() + Duration::from_millis(300) < not_after {
        assert_eq!(
            ca.serial_of(&presented(wp.addr, &client_id).await.unwrap()),
            1
        );
    }
    // ...after that peers refuse it, and the rotation keeps trying.
    let deadline = Instant::now() + Duration::from_secs(10);
    let refusal = loop {
        match presented(wp.addr, &client_id).await {
            Ok(leaf) => assert_eq!(ca.serial_of(&leaf), 1),
            Err(e) => break e,
        }
        assert!(
            Instant::now() < deadline,
            "still accepted long after expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        SystemTime::now() + Duration::from_secs(1) >= not_after,
        "refused before expiry: {refusal}"
    );
    assert!(refusal.to_lowercase().contains("expired"), "{refusal}");
    let failures = status.borrow().failures;
    wait_for(&mut status, "retries after expiry", |s| {
        s.failures > failures
    })
    .await;
    wp.dp.shutdown(Duration::from_secs(2)).await;
}
