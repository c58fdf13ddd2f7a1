//! `file://` modules.

mod support;

use support::{digest, fetcher, module};
use waystone_fetch::{FetchError, FetchRequest, sha256_hex};

#[tokio::test]
async fn file_urls_with_and_without_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("file");
    let path = dir.path().join("plugin.wasm");
    std::fs::write(&path, &wasm).unwrap();
    let url = format!("file://{}", path.display());
    let f = fetcher(&dir.path().join("cache"), &[]);

    let got = f.fetch(&FetchRequest::new(&url)).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.module_digest, digest(&wasm));
    assert_eq!(got.manifest_digest, None);
    assert_eq!(got.source, url);

    let mut r = FetchRequest::new(&url);
    r.sha256 = Some(sha256_hex(&wasm));
    assert_eq!(*f.fetch(&r).await.unwrap().bytes, wasm);

    r.sha256 = Some("0".repeat(64));
    let err = f.fetch(&r).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "fetching {url}: sha256 mismatch: expected {}, got {}",
            "0".repeat(64),
            sha256_hex(&wasm)
        )
    );

    r.sha256 = Some("not-hex".into());
    assert!(matches!(
        f.fetch(&r).await.unwrap_err(),
        FetchError::InvalidUrl { .. }
    ));
}

#[tokio::test]
async fn file_errors() {
    let dir = tempfile::tempdir().unwrap();
    let f = fetcher(&dir.path().join("cache"), &[]);

    let missing = format!("file://{}/nope.wasm", dir.path().display());
    let err = f.fetch(&FetchRequest::new(&missing)).await.unwrap_err();
    assert!(matches!(err, FetchError::FileNotFound { .. }), "{err}");
    assert!(err.to_string().contains("file not found"), "{err}");

    let text = dir.path().join("text.wasm");
    std::fs::write(&text, b"hello world, not wasm").unwrap();
    let err = f
        .fetch(&FetchRequest::new(format!("file://{}", text.display())))
        .await
        .unwrap_err();
    assert!(
        err.to_string().ends_with("not a Wasm module (bad magic)"),
        "{err}"
    );

    let short = dir.path().join("short.wasm");
    std::fs::write(&short, b"\0asm").unwrap();
    let err = f
        .fetch(&FetchRequest::new(format!("file://{}", short.display())))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NotWasm { .. }), "{err}");

    let big = dir.path().join("big.wasm");
    std::fs::write(&big, module(&"x".repeat(100))).unwrap();
    let mut cfg = waystone_fetch::FetchConfig::new(dir.path().join("cache2"));
    cfg.max_module_bytes = 64;
    let err = waystone_fetch::Fetcher::new(cfg)
        .unwrap()
        .fetch(&FetchRequest::new(format!("file://{}", big.display())))
        .await
        .unwrap_err();
    assert!(
        err.to_string().ends_with("module is larger than 64 bytes"),
        "{err}"
    );

    let err = f
        .fetch(&FetchRequest::new("file://relative.wasm"))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::InvalidUrl { .. }), "{err}");
}
