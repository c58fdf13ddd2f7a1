//! A small certificate authority issuing SPIFFE workload certificates: the local mesh's
//! stand-in for istiod's CA (`waystone up --hbone`), and the test CA of the HBONE tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::HboneError;
use super::identity::{IdentityFiles, SpiffeId};

const LOCAL_CA_NAME: &str = "waystone local mesh CA";

/// A CA key and its self-signed root.
pub struct LocalCa {
    root_pem: String,
    key: KeyPair,
    params: CertificateParams,
}

/// One issued workload certificate, PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_chain_pem: String,
    pub key_pem: String,
}

fn ca_error(what: &str, e: impl std::fmt::Display) -> HboneError {
    HboneError::Ca(format!("{what}: {e}"))
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "waystone");
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

impl LocalCa {
    /// A fresh CA whose root names `name`.
    pub fn generate(name: &str) -> Result<Self, HboneError> {
        let key = KeyPair::generate().map_err(|e| ca_error("generating the CA key", e))?;
        let params = ca_params(name);
        let root = params
            .self_signed(&key)
            .map_err(|e| ca_error("signing the CA root", e))?;
        Ok(Self {
            root_pem: root.pem(),
            key,
            params,
        })
    }

    /// The CA kept in `dir` (`ca-cert.pem`, `ca-key.pem`, mode 0600 for the key), created
    /// on first use so that restarts keep trusting the same root.
    pub fn load_or_create(dir: &Path) -> Result<Self, HboneError> {
        let cert_path = dir.join("ca-cert.pem");
        let key_path = dir.join("ca-key.pem");
        if cert_path.exists() && key_path.exists() {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).map_err(|source| HboneError::ReadFile {
                    path: p.clone(),
                    source,
                })
            };
            let root_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| ca_error(&format!("reading {}", key_path.display()), e))?;
            // The root's subject is rebuilt from the same fixed name (rcgen encodes it
            // deterministically), so issued certificates name the stored root as issuer.
            let params = ca_params(LOCAL_CA_NAME);
            return Ok(Self {
                root_pem,
                key,
                params,
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| HboneError::WriteFile {
            path: dir.to_path_buf(),
            source,
        })?;
        let ca = Self::generate(LOCAL_CA_NAME)?;
        write_private(&key_path, ca.key.serialize_pem().as_bytes())?;
        write_file(&cert_path, ca.root_pem.as_bytes())?;
        Ok(ca)
    }

    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a certificate for `id` (URI SAN), usable as server and client certificate,
    /// valid from an hour ago for `valid_for`.
    pub fn issue(&self, id: &SpiffeId, valid_for: Duration) -> Result<IssuedCert, HboneError> {
        let key = KeyPair::generate().map_err(|e| ca_error("generating a workload key", e))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|e| ca_error("encoding the SPIFFE URI", e))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now
            + time::Duration::try_from(valid_for).map_err(|e| ca_error("validity period", e))?;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            &rand::random::<[u8; 16]>().map(|b| b & 0x7f),
        ));
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| ca_error("signing a workload certificate", e))?;
        Ok(IssuedCert {
            cert_chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate for `id` and writes it, with the root, as `<dir>/<stem>-cert.pem`,
    /// `<stem>-key.pem` (0600) and `<dir>/ca-cert.pem`.
    pub fn issue_to_files(
        &self,
        id: &SpiffeId,
        valid_for: Duration,
        dir: &Path,
        stem: &str,
    ) -> Result<IdentityFiles, HboneError> {
        let issued = self.issue(id, valid_for)?;
        let files = IdentityFiles {
            cert_chain: dir.join(format!("{stem}-cert.pem")),
            key: dir.join(format!("{stem}-key.pem")),
            roots: dir.join("ca-cert.pem"),
        };
        write_private(&files.key, issued.key_pem.as_bytes())?;
        write_file(&files.cert_chain, issued.cert_chain_pem.as_bytes())?;
        if !files.roots.exists() {
            write_file(&files.roots, self.root_pem.as_bytes())?;
        }
        Ok(files)
    }
}

/// Writes through a temporary file and a rename, so a reader polling the path never sees
/// half a PEM file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), HboneError> {
    write_with_mode(path, bytes, 0o644)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), HboneError> {
    write_with_mode(path, bytes, 0o600)
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HboneError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| HboneError::WriteFile {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
