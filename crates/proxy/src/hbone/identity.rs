//! Workload identity for HBONE: a SPIFFE certificate chain, its key and the trust roots,
//! behind one atomic pointer so a rotation reaches new handshakes at once while
//! established connections keep the keys they negotiated with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use super::HboneError;

/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, Istio's workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// Parses the Istio form; any other SPIFFE path is refused because policies key on ns/sa.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None)
                if !td.is_empty() && !ns.is_empty() && !sa.is_empty() =>
            {
                Some(Self::new(td, ns, sa))
            }
            _ => None,
        }
    }

    /// The SPIFFE identity of a DER certificate, from its URI SANs.
    pub fn from_cert(cert: &CertificateDer<'_>) -> Result<Self, String> {
        let parsed = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| format!("unparsable certificate: {e}"))?;
        let uris: Vec<&str> = parsed.valid_uri_names().collect();
        uris.iter()
            .find_map(|u| Self::parse(u))
            .ok_or_else(|| format!("no spiffe://<td>/ns/<ns>/sa/<sa> URI SAN (URIs: {uris:?})"))
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// Where a file-based identity is read from (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// Leaf first, then intermediates.
    pub cert_chain: PathBuf,
    /// PKCS#8, PKCS#1 or SEC1.
    pub key: PathBuf,
    /// The trust roots peers' chains must end in.
    pub roots: PathBuf,
}

struct State {
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    client_verifier: Arc<dyn ClientCertVerifier>,
    id: SpiffeId,
    not_after: Option<SystemTime>,
}

/// One workload identity, swapped atomically on reload.
pub struct Identity {
    trust_domain: String,
    provider: Arc<CryptoProvider>,
    state: ArcSwap<State>,
    files: Option<IdentityFiles>,
    /// (mtime, len) of each file at the last load, to notice changes by polling.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.state.load().id.to_string())
            .field("files", &self.files)
            .finish()
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// An identity from PEM text. The leaf must carry a SPIFFE URI SAN in `trust_domain`.
    pub fn from_pem(
        trust_domain: &str,
        cert_chain: &[u8],
        key: &[u8],
        roots: &[u8],
    ) -> Result<Self, HboneError> {
        let provider = provider();
        let state = build_state(trust_domain, &provider, cert_chain, key, roots)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            provider,
            state: ArcSwap::from_pointee(state),
            files: None,
            stamps: Mutex::new(Vec::new()),
        })
    }

    /// An identity read from files; [`Identity::reload_if_changed`] picks up new contents.
    pub fn from_files(trust_domain: &str, files: IdentityFiles) -> Result<Self, HboneError> {
        let stamps = stamps(&files);
        let (chain, key, roots) = read_files(&files)?;
        let mut identity = Self::from_pem(trust_domain, &chain, &key, &roots)?;
        identity.files = Some(files);
        identity.stamps = Mutex::new(stamps);
        Ok(identity)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// This workload's own SPIFFE identity (from the current leaf).
    pub fn spiffe_id(&self) -> SpiffeId {
        self.state.load().id.clone()
    }

    /// The current leaf certificate (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.state.load().key.cert[0].clone()
    }

    /// When the current leaf expires, if it could be read.
    pub fn not_after(&self) -> Option<SystemTime> {
        self.state.load().not_after
    }

    /// Replaces the identity (a CA response, or a reload). Checked first: on error the
    /// previous identity stays in force.
    pub fn replace(&self, cert_chain: &[u8], key: &[u8], roots: &[u8]) -> Result<(), HboneError> {
        let state = build_state(&self.trust_domain, &self.provider, cert_chain, key, roots)?;
        tracing::info!(identity = %state.id, "HBONE identity loaded");
        self.state.store(Arc::new(state));
        Ok(())
    }

    /// Reloads the files when any of them changed (mtime or size) since the last load.
    /// Returns whether a new identity is now in force.
    pub fn reload_if_changed(&self) -> Result<bool, HboneError> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let now = stamps(files);
        {
            let last = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return Ok(false);
            }
        }
        let (chain, key, roots) = read_files(files)?;
        // Stamp first: a half-written set that fails to parse is retried on the next change,
        // not every poll.
        *self.stamps.lock().unwrap_or_else(|p| p.into_inner()) = now;
        self.replace(&chain, &key, &roots)?;
        Ok(true)
    }

    /// Polls the files every `every` on the current tokio runtime until `self` is dropped.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(identity) = weak.upgrade() else {
                    return;
                };
                if let Err(e) = identity.reload_if_changed() {
                    tracing::warn!(error = %e, "HBONE identity reload failed; keeping the previous one");
                }
            }
        })
    }

    /// TLS 1.3 server config: our certificate, a required client certificate chained to the
    /// roots and naming a SPIFFE identity in our trust domain; ALPN h2.
    pub fn server_config(self: &Arc<Self>) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// TLS 1.3 client config: our certificate as client certificate; the server's chain must
    /// end in our roots and name a SPIFFE identity in our trust domain (no DNS name check:
    /// peers are addressed by IP and identified by SPIFFE ID, as in the mesh); ALPN h2.
    pub fn client_config(self: &Arc<Self>) -> Arc<rustls::ClientConfig> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("ring supports TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    fn check_peer(&self, cert: &CertificateDer<'_>) -> Result<SpiffeId, rustls::Error> {
        let id = SpiffeId::from_cert(cert).map_err(peer_error)?;
        if id.trust_domain != self.trust_domain {
            return Err(peer_error(format!(
                "peer identity {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }
}

fn peer_error(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(PeerIdentityError(msg)),
    )))
}

#[derive(Debug)]
struct PeerIdentityError(String);

impl std::fmt::Display for PeerIdentityError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PeerIdentityError {}

fn stamps(files: &IdentityFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.cert_chain, &files.key, &files.roots]
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// (certificate chain, key, roots) as PEM bytes.
type PemSet = (Vec<u8>, Vec<u8>, Vec<u8>);

fn read_files(files: &IdentityFiles) -> Result<PemSet, HboneError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| HboneError::ReadFile {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok((
        read(&files.cert_chain)?,
        read(&files.key)?,
        read(&files.roots)?,
    ))
}

fn build_state(
    trust_domain: &str,
    provider: &Arc<CryptoProvider>,
    chain_pem: &[u8],
    key_pem: &[u8],
    roots_pem: &[u8],
) -> Result<State, HboneError> {
    let invalid = |what: &str, reason: String| HboneError::InvalidIdentity {
        what: what.to_string(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("certificate chain", e.to_string()))?;
    if chain.is_empty() {
        return Err(invalid(
            "certificate chain",
            "no CERTIFICATE block".to_string(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| invalid("private key", e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem) {
        let cert = cert.map_err(|e| invalid("trust roots", e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| invalid("trust roots", e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("trust roots", "no CERTIFICATE block".to_string()));
    }
    let id = SpiffeId::from_cert(&chain[0]).map_err(|r| invalid("certificate chain", r))?;
    if id.trust_domain != trust_domain {
        return Err(invalid(
            "certificate chain",
            format!("identity {id} is not in trust domain {trust_domain}"),
        ));
    }
    let not_after = not_after(&chain[0]);
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| invalid("private key", e.to_string()))?;
    let roots = Arc::new(roots);
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| invalid("trust roots", e.to_string()))?;
    Ok(State {
        key: Arc::new(certified),
        roots,
        client_verifier,
        id,
        not_after,
    })
}

/// The leaf's notAfter, read with a minimal DER walk (tbsCertificate → validity), so that
/// rotation can be scheduled before expiry without a full X.509 parser.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&len0, rest) = rest.split_first()?;
        let (len, rest) = if len0 < 0x80 {
            (len0 as usize, rest)
        } else {
            let n = (len0 & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
    let (_, cert, _) = tlv(cert.as_ref())?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    // version [0] is optional; then serial, signature, issuer, validity.
    let (tag, _, r) = tlv(rest)?;
    rest = if tag == 0xa0 { tlv(r)?.2 } else { r };
    let (_, _, r) = tlv(rest)?; // signature algorithm
    let (_, _, r) = tlv(r)?; // issuer
    let (_, validity, _) = tlv(r)?;
    let (_, _, r) = tlv(validity)?; // notBefore
    let (tag, time, _) = tlv(r)?;
    let s = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let y: i64 = s.get(0..2)?.parse().ok()?;
            (if y >= 50 { 1900 + y } else { 2000 + y }, s.get(2..)?)
        }
        0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
        _ => return None,
    };
    let num = |r: std::ops::Range<usize>| rest.get(r)?.parse::<i64>().ok();
    let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
    // Days from the civil date (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if mo <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Serves the current certificate both as server and as client certificate.
#[derive(Debug)]
struct Resolver(Arc<Identity>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Chain to the current roots (webpki, client-auth usage), then a SPIFFE ID in our domain.
#[derive(Debug)]
struct SpiffeClientVerifier(Arc<Identity>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints would have to borrow from a state that may be swapped; they are optional.
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let state = self.0.state.load();
        state
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        self.0.check_peer(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(Tls::V12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(Tls::V13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Clone, Copy)]
enum Tls {
    V12,
    V13,
}

impl Identity {
    /// Handshake signatures, checked the same way by the client and the server verifier.
    fn verify_signature(
        &self,
        version: Tls,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        match version {
            Tls::V12 => rustls::crypto::verify_tls12_signature(message, cert, dss, algs),
            Tls::V13 => rustls::crypto::verify_tls13_signature(message, cert, dss, algs),
        }
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier(Arc<Identity>);

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let state = self.0.state.load();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &state.roots,
            intermediates,
            now,
            self.0.provider.signature_verification_algorithms.all,
        )?;
        self.0.check_peer(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(Tls::V12, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(Tls::V13, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/bookinfo").unwrap();
        assert_eq!(id, SpiffeId::new("cluster.local", "default", "bookinfo"));
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
        for bad in [
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/x/extra",
            "spiffe:///ns/a/sa/b",
            "https://cluster.local/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }
}
