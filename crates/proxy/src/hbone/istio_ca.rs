//! Workload certificates from istiod's CA, the way istio-agent and ztunnel get theirs: the
//! gRPC method `istio.v1.auth.IstioCertificateService/CreateCertificate` over TLS to istiod,
//! a fresh key and CSR per request, and the pod's projected service-account token (audience
//! `istio-ca`) as bearer credential. [`CaRotation`] keeps an [`Identity`] current without
//! files: it asks again once a fraction of the certificate's lifetime has passed, and retries
//! with backoff while the certificate in force keeps serving.
//!
//! The two messages are small enough to encode by hand (no protobuf code generation):
//! `IstioCertificateRequest { string csr = 1; int64 validity_duration = 3; Struct metadata = 4 }`
//! and `IstioCertificateResponse { repeated string cert_chain = 1 }` (leaf first, root last).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType};
use rustls::RootCertStore;
use rustls::server::ParsedCertificate;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::HboneError;
use super::identity::{Identity, SpiffeId, not_after};

/// The gRPC path of `IstioCertificateService.CreateCertificate`.
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// istiod's secure gRPC port, where istio-agent and ztunnel ask for certificates.
pub const DEFAULT_CA_ADDRESS: &str = "istiod.istio-system.svc:15012";
/// The mesh root (`istio-ca-root-cert` ConfigMap) as istio-agent mounts it.
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";
/// The projected service-account token with audience `istio-ca`; kubelet rotates it.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
/// The cluster name istiod expects unless the mesh is multi-cluster.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";
/// Istio's default workload certificate lifetime.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Istio's `SECRET_GRACE_PERIOD_RATIO`: renew once half of the lifetime has passed.
pub const DEFAULT_GRACE_RATIO: f64 = 0.5;
/// Shortest time between two successful renewals.
const MIN_RENEWAL_GAP: Duration = Duration::from_millis(500);

/// Why a certificate request to the Istio CA failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaFailure {
    #[error("unreachable: {0}")]
    Unreachable(String),
    #[error("TLS handshake failed (is --ca-root-cert the mesh root?): {0}")]
    Tls(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the CA refused our token (UNAUTHENTICATED): {0}")]
    Unauthenticated(String),
    #[error("gRPC status {code} ({name}): {message}")]
    Status {
        code: u32,
        name: &'static str,
        message: String,
    },
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("the response carries no certificate chain")]
    EmptyChain,
    #[error("the issued certificate does not carry the public key of our CSR")]
    KeyMismatch,
    #[error("the issued certificate names {got}, we asked for {expected}")]
    WrongIdentity { expected: String, got: String },
    #[error("the issued certificate has already expired")]
    Expired,
    #[error("cannot read the service account token {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("cannot use the CA root certificate {path}: {reason}")]
    RootCert { path: PathBuf, reason: String },
    #[error("cannot build the CSR: {0}")]
    Csr(String),
}

/// Where and how to ask the Istio CA for this workload's certificate.
#[derive(Debug, Clone)]
pub struct IstioCaOptions {
    /// `host:port` or `https://host:port` (the mesh config's `caAddress`).
    pub address: String,
    /// The name istiod's serving certificate must carry; the address's host unless set.
    pub tls_server_name: Option<String>,
    /// Trust roots for istiod's serving certificate (PEM), also trusted for HBONE peers;
    /// re-read at each request.
    pub root_cert: PathBuf,
    /// The bearer token, re-read at each request.
    pub token_file: PathBuf,
    /// Sent as the `clusterid` header.
    pub cluster_id: String,
    /// The identity to ask for; the CA decides from the token, and a certificate naming any
    /// other identity is refused.
    pub id: SpiffeId,
    /// Requested lifetime (`validity_duration`); the CA may shorten it.
    pub cert_ttl: Duration,
    /// Renew once this fraction of the lifetime has passed (0 < ratio < 1).
    pub grace_ratio: f64,
    /// First retry delay after a failed renewal; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Bound on one request (connect, TLS, RPC).
    pub request_timeout: Duration,
}

impl IstioCaOptions {
    /// Istio's defaults for `id`.
    pub fn new(id: SpiffeId) -> Self {
        Self {
            address: DEFAULT_CA_ADDRESS.to_string(),
            tls_server_name: None,
            root_cert: PathBuf::from(DEFAULT_ROOT_CERT),
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            id,
            cert_ttl: DEFAULT_CERT_TTL,
            grace_ratio: DEFAULT_GRACE_RATIO,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// One certificate the CA issued, checked against our key and identity.
#[derive(Debug, Clone)]
pub struct IssuedIdentity {
    /// Leaf and intermediates (PEM): what we present.
    pub cert_chain_pem: String,
    /// The key generated for this request (PKCS#8 PEM); never leaves the process.
    pub key_pem: String,
    /// The root file's certificates plus the chain's last one (PEM).
    pub roots_pem: String,
    pub not_after: SystemTime,
    /// When the response arrived: the lifetime is counted from here, so a CA that backdates
    /// `notBefore` for clock skew does not make us renew early.
    pub received: SystemTime,
}

impl IssuedIdentity {
    /// When to ask for the next certificate.
    pub fn refresh_at(&self, grace_ratio: f64) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        self.received + life.mul_f64(grace_ratio)
    }
}

/// A client of `IstioCertificateService`; one TLS connection per request (a renewal is rare
/// and istiod may have moved between two of them).
pub struct IstioCaClient {
    opts: IstioCaOptions,
    host: String,
    port: u16,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl std::fmt::Debug for IstioCaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IstioCaClient")
            .field("address", &self.opts.address)
            .field("id", &self.opts.id.to_string())
            .finish()
    }
}

impl IstioCaClient {
    pub fn new(opts: IstioCaOptions) -> Result<Self, HboneError> {
        let bad = |reason: String| HboneError::IstioCa {
            address: opts.address.clone(),
            failure: CaFailure::Protocol(reason),
        };
        let rest = match opts.address.split_once("://") {
            Some(("https", rest)) => rest,
            Some((scheme, _)) => {
                return Err(bad(format!(
                    "scheme {scheme}: the CA is reached over TLS (host:port or https://host:port)"
                )));
            }
            None => opts.address.as_str(),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
            .ok_or_else(|| bad(format!("{rest:?} is not host:port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad(format!("{rest:?} has no host")));
        }
        if !(opts.grace_ratio > 0.0 && opts.grace_ratio < 1.0) {
            return Err(bad(format!(
                "grace ratio {} is not between 0 and 1",
                opts.grace_ratio
            )));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            provider: super::identity::provider(),
            opts,
        })
    }

    pub fn options(&self) -> &IstioCaOptions {
        &self.opts
    }

    fn fail(&self, failure: CaFailure) -> HboneError {
        HboneError::IstioCa {
            address: self.opts.address.clone(),
            failure,
        }
    }

    /// Asks for a certificate for our identity with a freshly generated key.
    pub async fn fetch(&self) -> Result<IssuedIdentity, HboneError> {
        let limit = self.opts.request_timeout;
        match tokio::time::timeout(limit, self.fetch_once()).await {
            Ok(r) => r.map_err(|f| self.fail(f)),
            Err(_) => Err(self.fail(CaFailure::Timeout(limit))),
        }
    }

    async fn fetch_once(&self) -> Result<IssuedIdentity, CaFailure> {
        let token = read_token(&self.opts.token_file)?;
        let (roots, roots_pem) = read_roots(&self.opts.root_cert)?;
        let key = KeyPair::generate().map_err(|e| CaFailure::Csr(e.to_string()))?;
        let csr = csr_pem(&self.opts.id, &key)?;
        let request = encode_request(&csr, self.opts.cert_ttl.as_secs() as i64);
        let response = self.call(roots, &token, grpc_frame(&request)).await?;
        let chain = decode_response(&response)?;
        check_issued(&self.opts.id, &key, chain, roots_pem)
    }

    /// One unary gRPC call over a fresh TLS + h2 connection; the response message's bytes.
    async fn call(
        &self,
        roots: RootCertStore,
        token: &str,
        body: Bytes,
    ) -> Result<Bytes, CaFailure> {
        let server_name = self
            .opts
            .tls_server_name
            .clone()
            .unwrap_or_else(|| self.host.clone());
        let name = ServerName::try_from(server_name.clone())
            .map_err(|e| CaFailure::Tls(format!("server name {server_name:?}: {e}")))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| CaFailure::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| CaFailure::Unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| CaFailure::Tls(e.to_string()))?;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| CaFailure::Protocol(format!("h2 handshake: {e}")))?;
        let address = self.opts.address.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(ca = %address, error = %e, "CA connection ended");
            }
        });
        let uri = format!(
            "https://{server_name}:{}{CREATE_CERTIFICATE_PATH}",
            self.port
        );
        let mut req = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        if !self.opts.cluster_id.is_empty() {
            req = req.header("clusterid", self.opts.cluster_id.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| CaFailure::Token {
            path: self.opts.token_file.clone(),
            reason: format!("the token or the cluster id is not a valid header value: {e}"),
        })?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CaFailure::Unreachable(format!("request failed: {e}")))?;
        if resp.status() != http::StatusCode::OK {
            return Err(CaFailure::Protocol(format!(
                "HTTP status {}",
                resp.status()
            )));
        }
        // A trailers-only response (every error) carries the status in the headers.
        if let Some(failure) = grpc_status(resp.headers()) {
            return Err(failure);
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CaFailure::Protocol(format!("reading the response: {e}")))?;
        match collected.trailers().and_then(grpc_status) {
            Some(failure) => return Err(failure),
            None if collected.trailers().is_none() => {
                return Err(CaFailure::Protocol("no grpc-status trailer".to_string()));
            }
            None => {}
        }
        unframe(collected.to_bytes())
    }
}

/// The CA's verdict from `grpc-status`/`grpc-message`, when it is not OK.
fn grpc_status(headers: &http::HeaderMap) -> Option<CaFailure> {
    let code: u32 = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if code == 0 {
        return None;
    }
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Some(match code {
        16 => CaFailure::Unauthenticated(message),
        _ => CaFailure::Status {
            code,
            name: grpc_code_name(code),
            message,
        },
    })
}

fn grpc_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if v[i] == b'%'
            && i + 2 < v.len()
            && let (Some(h), Some(l)) = (hex(v[i + 1]), hex(v[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(v[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_token(path: &std::path::Path) -> Result<String, CaFailure> {
    let err = |reason: String| CaFailure::Token {
        path: path.to_path_buf(),
        reason,
    };
    let raw = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(err("the file is empty".to_string()));
    }
    Ok(token.to_string())
}

fn read_roots(path: &std::path::Path) -> Result<(RootCertStore, String), CaFailure> {
    let err = |reason: String| CaFailure::RootCert {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.map_err(|e| err(e.to_string()))?)
            .map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no CERTIFICATE block".to_string()));
    }
    Ok((roots, pem))
}

/// A PEM CSR for `id` (the URI SAN istiod checks against the token's identity).
fn csr_pem(id: &SpiffeId, key: &KeyPair) -> Result<String, CaFailure> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = id
        .to_string()
        .try_into()
        .map_err(|e| CaFailure::Csr(format!("{id}: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CaFailure::Csr(e.to_string()))
}

/// Splits the response chain, then checks what matters before the certificate may serve:
/// it exists, it is for our key, it names the identity we asked for, it is still valid.
fn check_issued(
    id: &SpiffeId,
    key: &KeyPair,
    chain: Vec<String>,
    mut roots_pem: String,
) -> Result<IssuedIdentity, CaFailure> {
    let Some(leaf_pem) = chain.first() else {
        return Err(CaFailure::EmptyChain);
    };
    let leaf = CertificateDer::pem_slice_iter(leaf_pem.as_bytes())
        .next()
        .ok_or_else(|| CaFailure::Protocol("the first chain entry holds no certificate".into()))?
        .map_err(|e| CaFailure::Protocol(format!("the leaf certificate: {e}")))?;
    let parsed = ParsedCertificate::try_from(&leaf)
        .map_err(|e| CaFailure::Protocol(format!("the leaf certificate: {e}")))?;
    if parsed.subject_public_key_info().as_ref() != key.subject_public_key_info().as_slice() {
        return Err(CaFailure::KeyMismatch);
    }
    let got = SpiffeId::from_cert(&leaf).map_err(|reason| CaFailure::WrongIdentity {
        expected: id.to_string(),
        got: reason,
    })?;
    if got != *id {
        return Err(CaFailure::WrongIdentity {
            expected: id.to_string(),
            got: got.to_string(),
        });
    }
    let received = SystemTime::now();
    let not_after = not_after(&leaf)
        .ok_or_else(|| CaFailure::Protocol("the leaf's notAfter is unreadable".into()))?;
    if not_after <= received {
        return Err(CaFailure::Expired);
    }
    // Leaf first, root last: present the leaf and intermediates, trust the root.
    let presented = if chain.len() > 1 {
        &chain[..chain.len() - 1]
    } else {
        &chain[..]
    };
    let mut cert_chain_pem = String::new();
    for c in presented {
        cert_chain_pem.push_str(c.trim_end());
        cert_chain_pem.push('\n');
    }
    if chain.len() > 1 {
        if !roots_pem.ends_with('\n') {
            roots_pem.push('\n');
        }
        roots_pem.push_str(chain[chain.len() - 1].trim_end());
        roots_pem.push('\n');
    }
    Ok(IssuedIdentity {
        cert_chain_pem,
        key_pem: key.serialize_pem(),
        roots_pem,
        not_after,
        received,
    })
}

// ------------------------------------------------------------------ wire format

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.first()?;
        buf.advance(1);
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// `IstioCertificateRequest { csr = 1 (string), validity_duration = 3 (int64) }`; no
/// `metadata` (only impersonating callers such as ztunnel need it).
pub fn encode_request(csr: &str, validity_secs: i64) -> Bytes {
    let mut buf = BytesMut::with_capacity(csr.len() + 16);
    put_varint(&mut buf, (1 << 3) | 2);
    put_varint(&mut buf, csr.len() as u64);
    buf.put_slice(csr.as_bytes());
    if validity_secs != 0 {
        put_varint(&mut buf, 3 << 3);
        put_varint(&mut buf, validity_secs as u64);
    }
    buf.freeze()
}

/// `IstioCertificateResponse.cert_chain` (field 1, repeated string); unknown fields skipped.
pub fn decode_response(mut buf: &[u8]) -> Result<Vec<String>, CaFailure> {
    let bad =
        |what: &str| CaFailure::Protocol(format!("malformed IstioCertificateResponse: {what}"));
    let mut chain = Vec::new();
    while !buf.is_empty() {
        let tag = get_varint(&mut buf).ok_or_else(|| bad("truncated tag"))?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                get_varint(&mut buf).ok_or_else(|| bad("truncated varint"))?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if buf.len() < n {
                    return Err(bad("truncated fixed field"));
                }
                buf.advance(n);
            }
            2 => {
                let len = get_varint(&mut buf).ok_or_else(|| bad("truncated length"))? as usize;
                if buf.len() < len {
                    return Err(bad("truncated string"));
                }
                if field == 1 {
                    let s = std::str::from_utf8(&buf[..len]).map_err(|_| bad("non-UTF-8 chain"))?;
                    chain.push(s.to_string());
                }
                buf.advance(len);
            }
            _ => return Err(bad("unknown wire type")),
        }
    }
    Ok(chain)
}

/// gRPC length-prefixed message framing (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(message.len() + 5);
    buf.put_u8(0);
    buf.put_u32(message.len() as u32);
    buf.put_slice(message);
    buf.freeze()
}

/// The single message of a unary response.
fn unframe(body: Bytes) -> Result<Bytes, CaFailure> {
    if body.len() < 5 {
        return Err(CaFailure::Protocol(format!(
            "a {}-byte body is no gRPC message",
            body.len()
        )));
    }
    if body[0] != 0 {
        return Err(CaFailure::Protocol(
            "compressed message (we accept none)".to_string(),
        ));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if body.len() - 5 != len {
        return Err(CaFailure::Protocol(format!(
            "message length {len} but {} bytes follow",
            body.len() - 5
        )));
    }
    Ok(body.slice(5..))
}

// ------------------------------------------------------------------ rotation

/// What the rotation has done, for logs, readiness and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RotationStatus {
    /// Certificates installed after the first.
    pub rotations: u64,
    /// Failed requests since the process started.
    pub failures: u64,
    /// The last failure, cleared by a success.
    pub last_error: Option<String>,
    /// Expiry of the certificate in force.
    pub not_after: Option<SystemTime>,
    /// When the next request is due.
    pub next_attempt: Option<SystemTime>,
}

/// An [`Identity`] obtained from the Istio CA and renewed before it expires, until this
/// value is dropped.
pub struct CaRotation {
    identity: Arc<Identity>,
    status: watch::Receiver<RotationStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for CaRotation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaRotation")
            .field("identity", &self.identity)
            .field("status", &*self.status.borrow())
            .finish()
    }
}

impl CaRotation {
    /// Gets the first certificate (one attempt: the caller decides how long to wait for the
    /// CA at startup), then renews it on the current tokio runtime.
    pub async fn start(client: IstioCaClient) -> Result<Self, HboneError> {
        let issued = client.fetch().await?;
        let identity = Arc::new(Identity::from_pem(
            &client.opts.id.trust_domain,
            issued.cert_chain_pem.as_bytes(),
            issued.key_pem.as_bytes(),
            issued.roots_pem.as_bytes(),
        )?);
        let ratio = client.opts.grace_ratio;
        let next = issued.refresh_at(ratio);
        tracing::info!(ca = %client.opts.address, identity = %identity.spiffe_id(),
            expires = %fmt_time(issued.not_after), renew_at = %fmt_time(next),
            "certificate issued by the Istio CA");
        let (tx, status) = watch::channel(RotationStatus {
            not_after: Some(issued.not_after),
            next_attempt: Some(next),
            ..Default::default()
        });
        let task = tokio::spawn(rotate(client, identity.clone(), tx, next, issued.not_after));
        Ok(Self {
            identity,
            status,
            task,
        })
    }

    pub fn identity(&self) -> &Arc<Identity> {
        &self.identity
    }

    /// Changes with every attempt.
    pub fn status(&self) -> watch::Receiver<RotationStatus> {
        self.status.clone()
    }
}

impl Drop for CaRotation {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn rotate(
    client: IstioCaClient,
    identity: Arc<Identity>,
    tx: watch::Sender<RotationStatus>,
    mut next: SystemTime,
    mut not_after: SystemTime,
) {
    let opts = &client.opts;
    let mut backoff = opts.retry_initial;
    loop {
        let wait = next
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        let result = client.fetch().await.and_then(|issued| {
            identity.replace(
                issued.cert_chain_pem.as_bytes(),
                issued.key_pem.as_bytes(),
                issued.roots_pem.as_bytes(),
            )?;
            Ok(issued)
        });
        match result {
            Ok(issued) => {
                backoff = opts.retry_initial;
                not_after = issued.not_after;
                // A CA granting absurdly short lifetimes must not make us hammer it.
                next = issued
                    .refresh_at(opts.grace_ratio)
                    .max(SystemTime::now() + MIN_RENEWAL_GAP);
                tracing::info!(ca = %opts.address, expires = %fmt_time(not_after),
                    renew_at = %fmt_time(next), "HBONE certificate renewed by the Istio CA");
                tx.send_modify(|s| {
                    s.rotations += 1;
                    s.last_error = None;
                    s.not_after = Some(not_after);
                    s.next_attempt = Some(next);
                });
            }
            Err(e) => {
                let now = SystemTime::now();
                next = now + backoff;
                backoff = (backoff * 2).min(opts.retry_max);
                if now >= not_after {
                    tracing::error!(error = %e, retry_at = %fmt_time(next),
                        "HBONE certificate expired and the Istio CA does not renew it; peers will refuse new handshakes");
                } else {
                    tracing::warn!(error = %e, expires = %fmt_time(not_after), retry_at = %fmt_time(next),
                        "HBONE certificate renewal failed; the current certificate keeps serving");
                }
                tx.send_modify(|s| {
                    s.failures += 1;
                    s.last_error = Some(e.to_string());
                    s.next_attempt = Some(next);
                });
            }
        }
    }
}

fn fmt_time(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs}s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding_matches_the_proto_field_numbers() {
        let b = encode_request("CSR", 300);
        // field 1 LEN "CSR", field 3 VARINT 300 (0xac 0x02).
        assert_eq!(&b[..], &[0x0a, 3, b'C', b'S', b'R', 0x18, 0xac, 0x02]);
        assert_eq!(&grpc_frame(&b)[..5], &[0, 0, 0, 0, 8]);
    }

    #[test]
    fn response_decoding_keeps_the_chain_order_and_skips_unknown_fields() {
        let mut m = BytesMut::new();
        for (tag, s) in [(0x0a, "leaf"), (0x12, "ignored"), (0x0a, "root")] {
            m.put_u8(tag);
            put_varint(&mut m, s.len() as u64);
            m.put_slice(s.as_bytes());
        }
        m.put_slice(&[0x18, 0x96, 0x01]); // a varint field 3
        assert_eq!(decode_response(&m).unwrap(), vec!["leaf", "root"]);
        assert!(decode_response(&[0x0a, 10, b'x']).is_err());
        let framed = grpc_frame(&m);
        assert_eq!(unframe(framed).unwrap(), m.freeze());
        assert!(unframe(Bytes::from_static(&[0, 0, 0, 0, 9, 1])).is_err());
    }

    #[test]
    fn grpc_status_names_the_reason() {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-status", "16".parse().unwrap());
        h.insert("grpc-message", "token%20expired".parse().unwrap());
        assert_eq!(
            grpc_status(&h),
            Some(CaFailure::Unauthenticated("token expired".into()))
        );
        h.insert("grpc-status", "14".parse().unwrap());
        assert!(matches!(
            grpc_status(&h),
            Some(CaFailure::Status {
                code: 14,
                name: "UNAVAILABLE",
                ..
            })
        ));
        h.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(grpc_status(&h), None);
    }

    #[test]
    fn addresses() {
        let id = SpiffeId::new("cluster.local", "ns", "sa");
        let with = |a: &str| {
            let mut o = IstioCaOptions::new(id.clone());
            o.address = a.to_string();
            IstioCaClient::new(o).map(|c| (c.host, c.port))
        };
        assert_eq!(
            with("istiod.istio-system.svc:15012").unwrap(),
            ("istiod.istio-system.svc".to_string(), 15012)
        );
        assert_eq!(
            with("https://127.0.0.1:15012/").unwrap(),
            ("127.0.0.1".to_string(), 15012)
        );
        assert_eq!(with("[::1]:1").unwrap(), ("::1".to_string(), 1));
        assert!(with("http://istiod:15010").is_err());
        assert!(with("istiod").is_err());
    }

    #[test]
    fn refresh_at_counts_from_receipt() {
        let received = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let issued = IssuedIdentity {
            cert_chain_pem: String::new(),
            key_pem: String::new(),
            roots_pem: String::new(),
            not_after: received + Duration::from_secs(100),
            received,
        };
        assert_eq!(issued.refresh_at(0.5), received + Duration::from_secs(50));
    }
}
