//! Shared helpers: test modules, raw distribution-API pushes, layer archives, and a counting
//! (optionally Bearer-demanding) loopback proxy in front of the registry.
#![allow(dead_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use waystone_fetch::{FetchConfig, Fetcher, sha256_hex};

/// `(module)` plus a custom section whose payload makes each module distinct.
pub fn module(tag: &str) -> Vec<u8> {
    let name = b"waystone-test";
    let mut content = vec![name.len() as u8];
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0);
    leb128(&mut m, content.len());
    m.extend_from_slice(&content);
    m
}

fn leb128(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

pub fn fetcher(cache: &Path, insecure: &[String]) -> Fetcher {
    let mut cfg = FetchConfig::new(cache.to_path_buf());
    cfg.insecure_registries = insecure.to_vec();
    // Hermetic: the developer's own docker login must not change what tests see.
    cfg.docker_config = waystone_fetch::DockerConfig::Disabled;
    Fetcher::new(cfg).expect("fetcher")
}

/// Monolithic blob upload over plain HTTP, as the distribution spec describes it.
pub async fn put_blob(host: &str, repo: &str, bytes: &[u8]) -> String {
    let client = reqwest::Client::new();
    let d = digest(bytes);
    let resp = client
        .post(format!("http://{host}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202, "POST upload");
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let mut url = reqwest::Url::parse(&format!("http://{host}/"))
        .unwrap()
        .join(&location)
        .unwrap();
    url.query_pairs_mut().append_pair("digest", &d);
    let resp = client
        .put(url)
        .header("content-type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201, "PUT blob");
    d
}

pub async fn put_manifest(
    host: &str,
    repo: &str,
    tag: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let resp = reqwest::Client::new()
        .put(format!("http://{host}/v2/{repo}/manifests/{tag}"))
        .header("content-type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 201, "PUT manifest: {text}");
    digest(body)
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({"mediaType": media_type, "digest": digest(bytes), "size": bytes.len()})
}

/// Pushes config + layers under `media_type` and returns the manifest bytes.
pub async fn push_image(
    host: &str,
    repo: &str,
    tag: &str,
    manifest_type: &str,
    config: (&str, &[u8]),
    layers: &[(&str, Vec<u8>)],
) -> Vec<u8> {
    put_blob(host, repo, config.1).await;
    for (_, bytes) in layers {
        put_blob(host, repo, bytes).await;
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": descriptor(config.0, config.1),
        "layers": layers.iter().map(|(t, b)| descriptor(t, b)).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    put_manifest(host, repo, tag, manifest_type, &bytes).await;
    bytes
}

/// A tar+gzip of `(raw name, contents)`; names are written verbatim (`..` included), which the
/// tar crate's safe path setter would refuse.
pub fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        builder
            .append(&raw_header(name, data.len() as u64), *data)
            .unwrap();
    }
    gzip(&builder.into_inner().unwrap())
}

fn raw_header(name: &str, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    {
        let gnu = header.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    }
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    header
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A tar.gz whose first entry inflates to `inflated` zero bytes, followed by plugin.wasm.
pub fn gzip_bomb(inflated: u64, wasm: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(raw_header("filler", inflated).as_bytes())
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = inflated;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        gz.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    let pad = (512 - (inflated % 512) as usize) % 512;
    gz.write_all(&vec![0u8; pad]).unwrap();
    let mut tail = tar::Builder::new(Vec::new());
    tail.append(&raw_header("plugin.wasm", wasm.len() as u64), wasm)
        .unwrap();
    gz.write_all(&tail.into_inner().unwrap()).unwrap();
    gz.finish().unwrap()
}

/// Request counters of a [`Proxy`].
#[derive(Default)]
pub struct Counts {
    pub blob_gets: AtomicUsize,
    pub manifest_gets: AtomicUsize,
    pub token_requests: AtomicUsize,
}

/// A loopback HTTP proxy to the registry that counts requests before forwarding them, so
/// "one download" is measured at the wire. With `bearer`, it plays a token-auth registry:
/// 401 + `WWW-Authenticate: Bearer` until the request carries the token from `/token`.
pub struct Proxy {
    pub addr: SocketAddr,
    pub counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

pub const TOKEN: &str = "test-token-7f3a";

impl Proxy {
    pub async fn start(upstream: String, bearer: bool) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counts = c.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(req, upstream.clone(), counts.clone(), addr, bearer)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Proxy { addr, counts, task }
    }

    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn blob_gets(&self) -> usize {
        self.counts.blob_gets.load(Ordering::SeqCst)
    }

    pub fn manifest_gets(&self) -> usize {
        self.counts.manifest_gets.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    req: Request<Incoming>,
    upstream: String,
    counts: Arc<Counts>,
    me: SocketAddr,
    bearer: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if path.starts_with("/token") {
        counts.token_requests.fetch_add(1, Ordering::SeqCst);
        let body = format!(r#"{{"token":"{TOKEN}"}}"#);
        return Ok(Response::new(Full::new(Bytes::from(body))));
    }
    if bearer {
        let ok = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        if !ok {
            let challenge = format!(
                r#"Bearer realm="http://{me}/token",service="test-registry",scope="repository:bearer/mod:pull""#
            );
            return Ok(Response::builder()
                .status(401)
                .header("www-authenticate", challenge)
                .body(Full::new(Bytes::new()))
                .unwrap());
        }
    }
    if req.method() == hyper::Method::GET {
        if path.contains("/blobs/") {
            counts.blob_gets.fetch_add(1, Ordering::SeqCst);
        } else if path.contains("/manifests/") {
            counts.manifest_gets.fetch_add(1, Ordering::SeqCst);
        }
    }
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes()).unwrap();
    let accept = req.headers().get("accept").cloned();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let mut fwd = reqwest::Client::new()
        .request(method, format!("http://{upstream}{path}"))
        .body(body.to_vec());
    if let Some(a) = accept {
        fwd = fwd.header("accept", a.to_str().unwrap());
    }
    let resp = fwd.send().await.unwrap();
    let mut out = Response::builder().status(resp.status().as_u16());
    for name in ["content-type", "docker-content-digest", "location"] {
        if let Some(v) = resp.headers().get(name) {
            out = out.header(name, v.to_str().unwrap());
        }
    }
    let bytes = resp.bytes().await.unwrap();
    Ok(out.body(Full::new(bytes)).unwrap())
}
