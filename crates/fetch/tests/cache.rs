//! Listing and pruning the on-disk module cache, filled through `http://` fetches from a
//! loopback server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use waystone_fetch::{FetchConfig, FetchRequest, Fetcher, sha256_hex};

/// Serves `module(<path without the slash>)` for every path.
struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| {
                    let body = module(req.uri().path().trim_start_matches('/'));
                    async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Server { addr, task }
}

fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    // A custom section named "t" carrying the tag keeps modules distinct.
    m.extend_from_slice(&[0, (2 + tag.len()) as u8, 1, b't']);
    m.extend_from_slice(tag.as_bytes());
    m
}

fn digest(tag: &str) -> String {
    format!("sha256:{}", sha256_hex(&module(tag)))
}

fn module_file(cache: &Path, tag: &str) -> std::path::PathBuf {
    cache
        .join("modules/sha256")
        .join(format!("{}.wasm", sha256_hex(&module(tag))))
}

fn age(path: &Path, by: Duration) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(SystemTime::now() - by)
        .unwrap();
}

#[tokio::test]
async fn lists_modules_with_their_urls_and_prunes_only_old_ones() {
    let server = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(FetchConfig::new(dir.path().to_path_buf())).unwrap();
    let url = |p: &str| format!("http://{}/{p}", server.addr);
    for u in [url("old"), url("new")] {
        fetcher.fetch(&FetchRequest::new(u)).await.unwrap();
    }
    // A second url serving the same module bytes as "old" shares its cache file.
    fetcher
        .fetch(&FetchRequest::new(format!("{}?again", url("old"))))
        .await
        .unwrap();

    let mut expected = vec![
        (
            digest("old"),
            module("old").len() as u64,
            vec![url("old"), format!("{}?again", url("old"))],
        ),
        (digest("new"), module("new").len() as u64, vec![url("new")]),
    ];
    expected.sort();
    for (_, _, keys) in &mut expected {
        keys.sort();
    }
    let listed = fetcher.cache_entries().unwrap();
    let got: Vec<_> = listed
        .iter()
        .map(|e| (e.digest.clone(), e.size, e.keys.clone()))
        .collect();
    assert_eq!(got, expected);
    let before = SystemTime::now() - Duration::from_secs(60);
    assert!(listed.iter().all(|e| e.last_used > before));

    age(
        &module_file(dir.path(), "old"),
        Duration::from_secs(48 * 3600),
    );
    age(&module_file(dir.path(), "new"), Duration::from_secs(3600));
    // A temp file from a writer that died long ago, and one being written right now.
    let stale = dir.path().join("index/.x.json.1.1.tmp");
    let live = dir.path().join("modules/sha256/.y.wasm.1.2.tmp");
    std::fs::write(&stale, b"{").unwrap();
    std::fs::write(&live, b"\0asm").unwrap();
    age(&stale, Duration::from_secs(2 * 3600));

    let removed = fetcher.prune_cache(Duration::from_secs(24 * 3600)).unwrap();
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(removed[0].digest, digest("old"));
    assert_eq!(removed[0].keys.len(), 2);
    assert!(!module_file(dir.path(), "old").exists());
    assert!(!stale.exists());
    assert!(
        live.exists(),
        "a fresh temp file may belong to a live writer"
    );

    let left: Vec<_> = fetcher
        .cache_entries()
        .unwrap()
        .into_iter()
        .map(|e| e.digest)
        .collect();
    assert_eq!(left, vec![digest("new")]);
    // The index entries of the pruned module went with it: only "new" is still indexed.
    assert_eq!(
        std::fs::read_dir(dir.path().join("index")).unwrap().count(),
        1
    );

    // The pruned url is downloaded again; the kept one is still served from the cache.
    let again = fetcher.fetch(&FetchRequest::new(url("old"))).await.unwrap();
    assert!(!again.cache_hit);
    let kept = fetcher.fetch(&FetchRequest::new(url("new"))).await.unwrap();
    assert!(kept.cache_hit);
}

#[tokio::test]
async fn a_cache_hit_counts_as_use() {
    let server = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Fetcher::new(FetchConfig::new(dir.path().to_path_buf())).unwrap();
    let req = FetchRequest::new(format!("http://{}/hit", server.addr));
    fetcher.fetch(&req).await.unwrap();
    let path = module_file(dir.path(), "hit");
    age(&path, Duration::from_secs(48 * 3600));
    let hit = fetcher.fetch(&req).await.unwrap();
    assert!(hit.cache_hit);
    let removed = fetcher.prune_cache(Duration::from_secs(24 * 3600)).unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    assert!(path.exists());
    // Unused for less than zero time is every module.
    let removed = fetcher.prune_cache(Duration::ZERO).unwrap();
    assert_eq!(removed.len(), 1);
    assert!(fetcher.cache_entries().unwrap().is_empty());
}
