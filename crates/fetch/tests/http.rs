//! `http(s)://` sources, retries and the SSRF guard, against a tiny hyper server on loopback.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use waystone_fetch::{FetchConfig, FetchError, FetchRequest, Fetcher, PullPolicy, sha256_hex};

/// What the server answers: status, extra headers, body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);
/// Decides the answer from the 1-based request number and the request path.
type Script = dyn Fn(usize, &str) -> Answer + Send + Sync;

struct Server {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(script: impl Fn(usize, &str) -> Answer + Send + Sync + 'static) -> Server {
        let script: Arc<Script> = Arc::new(script);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (script, hits) = (script.clone(), h.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let n = hits.fetch_add(1, Ordering::SeqCst) + 1;
                        let (status, headers, body) = script(n, req.uri().path());
                        let mut resp = Response::builder().status(status);
                        for (k, v) in headers {
                            resp = resp.header(k, v);
                        }
                        async move {
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Server { addr, hits, task }
    }

    /// Always answers 200 with `body`.
    async fn serving(body: Vec<u8>) -> Server {
        Server::start(move |_, _| (200, Vec::new(), body.clone())).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // A custom section named "t" whose payload makes each module distinct.
    m.push(0);
    m.push((2 + tag.len()) as u8);
    m.push(1);
    m.push(b't');
    m.extend_from_slice(tag.as_bytes());
    m
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A tar with the given entries; names are written raw so `../` survives.
fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_ustar();
        let raw = &mut header.as_old_mut().name;
        raw[..name.len()].copy_from_slice(name.as_bytes());
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

fn config(cache: &std::path::Path) -> FetchConfig {
    let mut cfg = FetchConfig::new(cache.to_path_buf());
    cfg.retry_base = Duration::from_millis(10);
    cfg
}

fn fetcher(cache: &std::path::Path) -> Fetcher {
    Fetcher::new(config(cache)).unwrap()
}

fn with_sha(url: &str, module: &[u8]) -> FetchRequest {
    let mut req = FetchRequest::new(url);
    req.sha256 = Some(sha256_hex(module));
    req
}

#[tokio::test]
async fn raw_module_is_cached_by_url() {
    let wasm = module("raw");
    let server = Server::serving(wasm.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let url = server.url("/filter.wasm");
    let got = fetcher(cache.path())
        .fetch(&with_sha(&url, &wasm))
        .await
        .unwrap();
    assert_eq!(*got.bytes, wasm);
    assert!(!got.cache_hit);
    assert_eq!(got.module_digest, format!("sha256:{}", sha256_hex(&wasm)));
    assert_eq!(got.manifest_digest, None);

    // A new fetcher on the same cache: no network for a known url, with or without sha256.
    let again = fetcher(cache.path());
    for req in [with_sha(&url, &wasm), FetchRequest::new(&url)] {
        let hit = again.fetch(&req).await.unwrap();
        assert!(hit.cache_hit);
        assert_eq!(*hit.bytes, wasm);
    }
    assert_eq!(server.hits(), 1);

    // A different expected digest is not served from the cache.
    let err = again
        .fetch(&with_sha(&url, &module("other")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{err}");
    assert_eq!(server.hits(), 2);

    let mut always = FetchRequest::new(&url);
    always.pull_policy = PullPolicy::Always;
    assert!(!again.fetch(&always).await.unwrap().cache_hit);
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn gzip_tar_and_tar_gz_bodies_yield_the_module() {
    let wasm = module("packed");
    let in_dir = tar(&[("README.md", b"docs"), ("./plugins/filter.wasm", &wasm)]);
    let cases = [
        ("gzip", gzip(&wasm)),
        ("tar", in_dir.clone()),
        ("tar.gz", gzip(&in_dir)),
    ];
    for (kind, body) in cases {
        let server = Server::serving(body).await;
        let cache = tempfile::tempdir().unwrap();
        // The expected digest is the module's, not the body's.
        let got = fetcher(cache.path())
            .fetch(&with_sha(&server.url("/m"), &wasm))
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(*got.bytes, wasm, "{kind}");
    }
}

#[tokio::test]
async fn digest_mismatch_names_both_digests() {
    let wasm = module("served");
    let server = Server::serving(gzip(&wasm)).await;
    let cache = tempfile::tempdir().unwrap();
    let wanted = module("wanted");
    let err = fetcher(cache.path())
        .fetch(&with_sha(&server.url("/m.wasm.gz"), &wanted))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains(&sha256_hex(&wanted)), "{msg}");
    assert!(msg.contains(&sha256_hex(&wasm)), "{msg}");
}

#[tokio::test]
async fn bad_bodies_are_refused() {
    let wasm = module("x");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text", b"<html>not found</html>".to_vec(), "bad magic"),
        (
            "two modules",
            tar(&[("a.wasm", &wasm), ("b.wasm", &wasm)]),
            "more than one .wasm module",
        ),
        (
            "traversal",
            gzip(&tar(&[("../evil.wasm", &wasm)])),
            "escapes the archive root",
        ),
        (
            "no module",
            tar(&[("README.md", b"docs")]),
            "holds no .wasm module",
        ),
        (
            "gzip bomb",
            gzip(&vec![0u8; 3 << 20]),
            "decompresses to more than",
        ),
        (
            "too large",
            [wasm.clone(), vec![0; 4096]].concat(),
            "larger than 1024 bytes",
        ),
        (
            "too large in tar",
            tar(&[("big.wasm", &[wasm.clone(), vec![0; 4096]].concat())]),
            "larger than 1024 bytes",
        ),
    ];
    for (what, body, expect) in cases {
        let server = Server::serving(body).await;
        let cache = tempfile::tempdir().unwrap();
        let mut cfg = config(cache.path());
        cfg.max_module_bytes = 1024;
        let err = Fetcher::new(cfg)
            .unwrap()
            .fetch(&FetchRequest::new(server.url("/m")))
            .await
            .unwrap_err();
        assert!(err.to_string().contains(expect), "{what}: {err}");
    }
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let wasm = module("flaky");
    let body = wasm.clone();
    let server = Server::start(move |n, _| {
        if n <= 2 {
            (503, Vec::new(), Vec::new())
        } else {
            (200, Vec::new(), body.clone())
        }
    })
    .await;
    let cache = tempfile::tempdir().unwrap();
    let got = fetcher(cache.path())
        .fetch(&FetchRequest::new(server.url("/m.wasm")))
        .await
        .unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(server.hits(), 3);
}

#[tokio::test]
async fn no_retry_on_501() {
    let server = Server::start(|_, _| (501, Vec::new(), Vec::new())).await;
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path())
        .fetch(&FetchRequest::new(server.url("/m.wasm")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::HttpStatus { .. }), "{err}");
    assert!(err.to_string().contains("501 Not Implemented"), "{err}");
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn gives_up_after_six_attempts() {
    let server = Server::start(|_, _| (500, Vec::new(), Vec::new())).await;
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path())
        .fetch(&FetchRequest::new(server.url("/m.wasm")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("server answered 500 Internal Server Error after 6 attempts"),
        "{err}"
    );
    assert_eq!(server.hits(), 6);
}

#[tokio::test]
async fn registry_requests_retry_too() {
    // A registry that fails twice and then demands a token from a realm on a link-local
    // address: the retries happen, then the realm is refused before anything dials it.
    let server = Server::start(|n, _| {
        if n <= 2 {
            return (502, Vec::new(), Vec::new());
        }
        let challenge = r#"Bearer realm="http://169.254.169.254/token",service="s""#;
        (
            401,
            vec![("www-authenticate".into(), challenge.into())],
            Vec::new(),
        )
    })
    .await;
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(cache.path());
    let host = server.addr.to_string();
    cfg.insecure_registries = vec![host.clone()];
    cfg.allow_private_realms = true;
    let before = server.hits();
    let err = Fetcher::new(cfg)
        .unwrap()
        .fetch(&FetchRequest::new(format!("oci://{host}/r/m:1")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Refused { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("refusing to fetch from link-local/metadata address 169.254.169.254"),
        "{err}"
    );
    // The HTTPS probe of an insecure registry may or may not reach the handler; the manifest
    // GET was tried three times.
    assert!(server.hits() - before >= 3, "{}", server.hits());
}

#[tokio::test]
async fn token_realm_on_private_address_is_refused_by_default() {
    for realm in [
        "http://10.1.2.3/token",
        "http://192.168.0.1/token",
        "http://[fc00::1]/t",
    ] {
        let challenge = format!(r#"Bearer realm="{realm}",service="s""#);
        let server = Server::start(move |_, _| {
            (
                401,
                vec![("www-authenticate".into(), challenge.clone())],
                Vec::new(),
            )
        })
        .await;
        let cache = tempfile::tempdir().unwrap();
        let mut cfg = config(cache.path());
        let host = server.addr.to_string();
        cfg.insecure_registries = vec![host.clone()];
        let err = Fetcher::new(cfg)
            .unwrap()
            .fetch(&FetchRequest::new(format!("oci://{host}/r/m:1")))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("refusing token realm on private/loopback address"),
            "{realm}: {err}"
        );
    }
}

#[tokio::test]
async fn link_local_and_metadata_sources_are_refused() {
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path());
    let cases = [
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("https://169.254.10.20/m.wasm", "169.254.10.20"),
        ("http://[fe80::1]:8080/m.wasm", "fe80::1"),
        ("http://[fd00:ec2::254]/latest", "fd00:ec2::254"),
        (
            "http://metadata.google.internal/x",
            "metadata.google.internal",
        ),
        ("oci://169.254.169.254/repo/mod:1", "169.254.169.254"),
        ("oci://[fe80::1]:5000/repo/mod:1", "fe80::1"),
        (
            "oci://metadata.google.internal/repo/mod:1",
            "metadata.google.internal",
        ),
    ];
    for (url, addr) in cases {
        let err = f.fetch(&FetchRequest::new(url)).await.unwrap_err();
        assert!(matches!(err, FetchError::Refused { .. }), "{url}: {err}");
        assert!(
            err.to_string().ends_with(&format!(
                "refusing to fetch from link-local/metadata address {addr}"
            )),
            "{url}: {err}"
        );
    }
}

#[tokio::test]
async fn redirect_to_metadata_is_refused() {
    let server = Server::start(|_, _| {
        (
            302,
            vec![(
                "location".into(),
                "http://169.254.169.254/latest/meta-data".into(),
            )],
            Vec::new(),
        )
    })
    .await;
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path())
        .fetch(&FetchRequest::new(server.url("/m.wasm")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("refusing to fetch from link-local/metadata address 169.254.169.254"),
        "{err}"
    );
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn hostnames_go_through_the_guarded_resolver() {
    // `localhost` is resolved by the guard and by the client's own resolver; neither may get
    // in the way of an ordinary address.
    let wasm = module("named");
    let server = Server::serving(wasm.clone()).await;
    let cache = tempfile::tempdir().unwrap();
    let url = format!("http://localhost:{}/m.wasm", server.addr.port());
    let got = fetcher(cache.path())
        .fetch(&FetchRequest::new(url))
        .await
        .unwrap();
    assert_eq!(*got.bytes, wasm);
}
