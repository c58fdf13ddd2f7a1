//! The user's docker config as the credential fallback, and https registries: system roots,
//! an extra CA, or listed as insecure. Against real `docker-registry` processes on loopback.

mod support;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use support::*;
use waystone_fetch::testing::{Registry, RegistryOptions};
use waystone_fetch::{
    DockerConfig, FetchConfig, FetchError, FetchRequest, Fetcher, PushOptions, push,
};

const USER: &str = "carol";
const PASSWORD: &str = "pw-never-logged-7731";

fn fetcher_with(cache: &Path, f: impl FnOnce(&mut FetchConfig)) -> Fetcher {
    let mut cfg = FetchConfig::new(cache.to_path_buf());
    cfg.docker_config = DockerConfig::Disabled;
    f(&mut cfg);
    Fetcher::new(cfg).unwrap()
}

fn write_docker_config(dir: &Path, json: &str) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, json).unwrap();
    path
}

/// Everything tracing writes while the guard lives on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test(flavor = "current_thread")]
async fn docker_config_is_the_fallback_when_no_pull_secret_is_named() {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let reg = Registry::start_with_htpasswd(USER, PASSWORD).unwrap();
    let url = reg.url("private/mod:1");
    let wasm = module("docker-config");
    let opts = PushOptions {
        insecure: true,
        username: Some(USER.into()),
        password: Some(PASSWORD.into()),
        ..PushOptions::default()
    };
    push(&wasm, &url, &opts).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let insecure = vec![reg.host()];

    // `docker login` style: an `auth` entry under an `http://host:port/v1/` key.
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    let login = write_docker_config(
        dir.path(),
        &format!(
            r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"eDp5"}},"http://{}/v1/":{{"auth":"{auth}"}}}},"credsStore":"none"}}"#,
            reg.host()
        ),
    );
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher_with(cache.path(), |c| {
        c.insecure_registries = insecure.clone();
        c.docker_config = DockerConfig::File(login.clone());
    });
    let got = f.fetch(&FetchRequest::new(&url)).await.unwrap();
    assert_eq!(*got.bytes, wasm);

    // `username`/`password` entries under the bare `host:port`; read at each fetch, so
    // rewriting the file takes effect without a new fetcher.
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher_with(cache.path(), |c| {
        c.insecure_registries = insecure.clone();
        c.docker_config = DockerConfig::File(login.clone());
    });
    write_docker_config(
        dir.path(),
        &format!(
            r#"{{"auths":{{"{}":{{"username":"{USER}","password":"nope"}}}}}}"#,
            reg.host()
        ),
    );
    let err = f.fetch(&FetchRequest::new(&url)).await.unwrap_err();
    assert!(err.to_string().contains("credentials for"), "{err}");
    assert!(err.to_string().contains("rejected"), "{err}");
    write_docker_config(
        dir.path(),
        &format!(
            r#"{{"auths":{{"{}":{{"username":"{USER}","password":"{PASSWORD}"}}}}}}"#,
            reg.host()
        ),
    );
    assert_eq!(
        *f.fetch(&FetchRequest::new(&url)).await.unwrap().bytes,
        wasm
    );

    // A named pull secret wins over the docker config, even when the secret is wrong.
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher_with(cache.path(), |c| {
        c.insecure_registries = insecure.clone();
        c.docker_config = DockerConfig::File(login.clone());
    });
    let mut with_secret = FetchRequest::new(&url);
    with_secret.pull_secret = Some(
        format!(
            r#"{{"auths":{{"{}":{{"username":"{USER}","password":"bad"}}}}}}"#,
            reg.host()
        )
        .into_bytes(),
    );
    let err = f.fetch(&with_secret).await.unwrap_err();
    assert!(matches!(err, FetchError::Unauthorized { .. }), "{err}");

    // No entry for this registry, a missing file, a malformed file, or the fallback turned
    // off: anonymous, hence refused, and the error says no credentials were had.
    let other = write_docker_config(
        dir.path(),
        r#"{"auths":{"elsewhere.example:5000":{"username":"u","password":"p"}}}"#,
    );
    let malformed = dir.path().join("malformed.json");
    std::fs::write(&malformed, format!("{{\"auths\": {PASSWORD}")).unwrap();
    for source in [
        DockerConfig::File(other),
        DockerConfig::File(dir.path().join("missing.json")),
        DockerConfig::File(malformed),
        DockerConfig::Disabled,
    ] {
        let cache = tempfile::tempdir().unwrap();
        let f = fetcher_with(cache.path(), |c| {
            c.insecure_registries = insecure.clone();
            c.docker_config = source.clone();
        });
        let err = f.fetch(&FetchRequest::new(&url)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "fetching {url}: 401 Unauthorized (no credentials for {})",
                reg.host()
            ),
            "{source:?}"
        );
    }

    let logs = logs.text();
    assert!(
        logs.contains("using credentials from docker config"),
        "{logs}"
    );
    assert!(logs.contains("ignoring docker config"), "{logs}");
    assert!(!logs.contains(PASSWORD), "secret logged: {logs}");
    assert!(!logs.contains(&auth), "secret logged: {logs}");
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM.
struct TestPki {
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "waystone test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca, &ca_key);
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    server
        .distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &issuer).unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server_cert_pem: cert.pem(),
        server_key_pem: key.serialize_pem(),
    }
}

#[tokio::test]
async fn https_registry_needs_its_ca_or_an_insecure_listing() {
    let pki = test_pki();
    let reg = Registry::start_with(RegistryOptions {
        tls: Some((pki.server_cert_pem.clone(), pki.server_key_pem.clone())),
        ..Default::default()
    })
    .unwrap();
    let url = reg.url("tls/mod:1");
    let wasm = module("tls");
    // Pushing with the insecure allowance means TLS without verification here.
    let pushed = push(
        &wasm,
        &url,
        &PushOptions {
            insecure: true,
            ..PushOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &pki.ca_pem).unwrap();

    // System roots only: the handshake fails and the error says it is a certificate problem,
    // not that the registry should be insecure (it does speak TLS).
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher_with(cache.path(), |_| {})
        .fetch(&FetchRequest::new(&url))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::Connect { .. }), "{msg}");
    assert!(msg.contains("TLS handshake failed"), "{msg}");
    assert!(msg.contains("UnknownIssuer"), "{msg}");
    assert!(msg.contains("--registry-ca"), "{msg}");

    // With the CA: verified TLS works, for OCI and for a plain https download of the blob.
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher_with(cache.path(), |c| c.ca_file = Some(ca_file.clone()));
    let got = f.fetch(&FetchRequest::new(&url)).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.manifest_digest, Some(pushed.manifest_digest));
    let blob = format!("https://{}/v2/tls/mod/blobs/{}", reg.host(), digest(&wasm));
    let got = f.fetch(&FetchRequest::new(&blob)).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    // The same download without the CA fails the same way.
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher_with(cache.path(), |_| {})
        .fetch(&FetchRequest::new(&blob))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("TLS handshake failed"), "{err}");

    // Listed as insecure: unverified TLS, no CA needed.
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher_with(cache.path(), |c| c.insecure_registries = vec![reg.host()]);
    assert_eq!(
        *f.fetch(&FetchRequest::new(&url)).await.unwrap().bytes,
        wasm
    );

    // A CA file that is missing or holds no certificate stops the fetcher from starting.
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for bad in [dir.path().join("missing.pem"), not_pem] {
        let mut cfg = FetchConfig::new(cache.path().to_path_buf());
        cfg.ca_file = Some(bad.clone());
        let err = Fetcher::new(cfg).unwrap_err();
        assert!(matches!(err, FetchError::CaFile { .. }), "{err}");
        assert!(
            err.to_string().contains(&bad.display().to_string()),
            "{err}"
        );
    }
}
