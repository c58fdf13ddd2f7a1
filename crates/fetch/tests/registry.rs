//! Fetch and push against a real `docker-registry` on loopback.

mod support;

use std::time::Duration;

use support::*;
use waystone_fetch::testing::Registry;
use waystone_fetch::{
    FetchConfig, FetchError, FetchRequest, Fetcher, PullPolicy, PushLayout, PushOptions, push,
    sha256_hex,
};

const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_TGZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn insecure() -> PushOptions {
    PushOptions {
        insecure: true,
        ..PushOptions::default()
    }
}

fn req(url: &str) -> FetchRequest {
    FetchRequest::new(url)
}

#[tokio::test]
async fn push_oci_then_fetch_by_tag_and_by_digest() {
    let reg = Registry::start().unwrap();
    let wasm = module("oci");
    let pushed = push(&wasm, &reg.url("wasm/basic_auth:1.0"), &insecure())
        .await
        .unwrap();
    assert_eq!(
        pushed.reference,
        format!("{}@{}", reg.url("wasm/basic_auth"), pushed.manifest_digest)
    );

    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    let got = f
        .fetch(&req(&reg.url("wasm/basic_auth:1.0")))
        .await
        .unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.module_digest, digest(&wasm));
    assert_eq!(
        got.manifest_digest.as_deref(),
        Some(pushed.manifest_digest.as_str())
    );
    assert!(!got.cache_hit);

    // By digest, with the expected sha256 too, into a fresh cache so the registry is asked.
    let cache2 = tempfile::tempdir().unwrap();
    let f2 = fetcher(cache2.path(), &[reg.host()]);
    let mut r = req(&pushed.reference);
    r.sha256 = Some(
        pushed
            .manifest_digest
            .trim_start_matches("sha256:")
            .to_string(),
    );
    let got = f2.fetch(&r).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    assert!(!got.cache_hit);

    // Re-pushing the same module gives the same digest (deterministic image).
    let again = push(&wasm, &reg.url("wasm/basic_auth:1.1"), &insecure())
        .await
        .unwrap();
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
}

#[tokio::test]
async fn push_compat_then_fetch() {
    let reg = Registry::start().unwrap();
    let wasm = module("compat");
    let opts = PushOptions {
        layout: PushLayout::Compat,
        ..insecure()
    };
    let pushed = push(&wasm, &reg.url("compat/mod:v1"), &opts).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let got = fetcher(cache.path(), &[reg.host()])
        .fetch(&req(&reg.url("compat/mod:v1")))
        .await
        .unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.manifest_digest, Some(pushed.manifest_digest));
}

#[tokio::test]
async fn docker_schema2_uses_plugin_wasm_of_last_tar_gzip_layer() {
    let reg = Registry::start().unwrap();
    let host = reg.host();
    let old = module("older layer");
    let new = module("last layer");
    let layers = vec![
        (
            DOCKER_TGZ,
            tar_gz(&[("plugin.wasm", &old), ("README", b"hi")]),
        ),
        (
            DOCKER_TGZ,
            tar_gz(&[("etc/other", b"x"), ("./plugin.wasm", &new)]),
        ),
    ];
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    push_image(
        &host,
        "docker/mod",
        "v2",
        DOCKER_MANIFEST,
        ("application/vnd.docker.container.image.v1+json", config),
        &layers,
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let got = fetcher(cache.path(), std::slice::from_ref(&host))
        .fetch(&req(&format!("{host}/docker/mod:v2")))
        .await
        .unwrap();
    assert_eq!(*got.bytes, new);
}

#[tokio::test]
async fn oci_index_picks_the_entry_holding_wasm_and_non_wasm_fails() {
    let reg = Registry::start().unwrap();
    let host = reg.host();
    // A manifest whose only layer is an uncompressed tar: not a Wasm image.
    let not_wasm = push_image(
        &host,
        "multi/mod",
        "notwasm",
        OCI_MANIFEST,
        ("application/vnd.oci.image.config.v1+json", b"{}"),
        &[(
            "application/vnd.oci.image.layer.v1.tar",
            b"not a tar".to_vec(),
        )],
    )
    .await;
    let wasm = module("index");
    let pushed = push(&wasm, &reg.url("multi/mod:wasm"), &insecure())
        .await
        .unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest(&not_wasm), "size": not_wasm.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": pushed.manifest_digest, "size": 1,
             "platform": {"architecture": "wasm", "os": "wasip1"}},
        ],
    });
    // The size of the second entry must be right for the registry to accept the index.
    let wasm_manifest_len = reqwest::Client::new()
        .get(format!("http://{host}/v2/multi/mod/manifests/wasm"))
        .header("accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    let mut index = index;
    index["manifests"][1]["size"] = wasm_manifest_len.into();
    let index_bytes = serde_json::to_vec(&index).unwrap();
    let index_digest = put_manifest(&host, "multi/mod", "multi", OCI_INDEX, &index_bytes).await;

    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), std::slice::from_ref(&host));
    let got = f.fetch(&req(&reg.url("multi/mod:multi"))).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.manifest_digest.as_deref(), Some(index_digest.as_str()));

    let err = f
        .fetch(&req(&reg.url("multi/mod:notwasm")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::NoWasmLayer { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("manifest has no Wasm layer"), "{msg}");
    assert!(
        msg.contains("application/vnd.oci.image.layer.v1.tar"),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!("fetching {}", reg.url("multi/mod:notwasm"))),
        "{msg}"
    );
}

#[tokio::test]
async fn wasm_layer_with_bad_magic_is_rejected() {
    let reg = Registry::start().unwrap();
    let host = reg.host();
    push_image(
        &host,
        "bad/magic",
        "1",
        OCI_MANIFEST,
        (WASM_CONFIG, b"{}"),
        &[(WASM_LAYER, b"#!/bin/sh\necho not wasm\n".to_vec())],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path(), &[host])
        .fetch(&req(&reg.url("bad/magic:1")))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("not a Wasm module (bad magic)"),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_sha256_names_both_digests() {
    let reg = Registry::start().unwrap();
    let pushed = push(&module("sha"), &reg.url("sha/mod:1"), &insecure())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut r = req(&reg.url("sha/mod:1"));
    let wrong = "ab".repeat(32);
    r.sha256 = Some(wrong.clone());
    let err = fetcher(cache.path(), &[reg.host()])
        .fetch(&r)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, FetchError::DigestMismatch { .. }), "{msg}");
    assert!(msg.contains("sha256 mismatch"), "{msg}");
    assert!(msg.contains(&wrong), "{msg}");
    assert!(
        msg.contains(pushed.manifest_digest.trim_start_matches("sha256:")),
        "{msg}"
    );
}

#[tokio::test]
async fn plain_http_refused_unless_insecure() {
    let reg = Registry::start().unwrap();
    push(&module("x"), &reg.url("plain/mod:1"), &insecure())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let err = fetcher(cache.path(), &[])
        .fetch(&req(&reg.url("plain/mod:1")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::InsecureRefused { .. }), "{err}");
    let expected = format!(
        "fetching {}: registry {} is not listed as insecure; plain HTTP refused",
        reg.url("plain/mod:1"),
        reg.host()
    );
    assert_eq!(err.to_string(), expected);
    // "*" allows every registry.
    fetcher(cache.path(), &["*".to_string()])
        .fetch(&req(&reg.url("plain/mod:1")))
        .await
        .unwrap();
    // Push follows the same rule.
    let err = push(
        &module("x"),
        &reg.url("plain/mod:2"),
        &PushOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, FetchError::InsecureRefused { .. }), "{err}");
}

#[tokio::test]
async fn htpasswd_registry_needs_credentials() {
    let reg = Registry::start_with_htpasswd("alice", "s3cret-pw").unwrap();
    let url = reg.url("private/mod:1");
    let wasm = module("private");

    let err = push(&wasm, &url, &insecure()).await.unwrap_err();
    assert!(matches!(err, FetchError::Unauthorized { .. }), "{err}");

    let opts = PushOptions {
        username: Some("alice".into()),
        password: Some("s3cret-pw".into()),
        ..insecure()
    };
    let pushed = push(&wasm, &url, &opts).await.unwrap();

    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    let err = f.fetch(&req(&url)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "fetching {url}: 401 Unauthorized (no credentials for {})",
            reg.host()
        )
    );

    let auth = base64_encode("alice:s3cret-pw");
    let mut r = req(&url);
    r.pull_secret = Some(
        format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            reg.host()
        )
        .into_bytes(),
    );
    let got = f.fetch(&r).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    assert_eq!(got.manifest_digest, Some(pushed.manifest_digest));

    let cache2 = tempfile::tempdir().unwrap();
    let mut bad = req(&url);
    bad.pull_secret = Some(
        format!(
            r#"{{"auths":{{"{}":{{"username":"alice","password":"wrong-pw"}}}}}}"#,
            reg.host()
        )
        .into_bytes(),
    );
    let err = fetcher(cache2.path(), &[reg.host()])
        .fetch(&bad)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("rejected"), "{msg}");
    assert!(!msg.contains("wrong-pw"), "secret leaked: {msg}");
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn cache_serves_if_not_present_after_registry_stops() {
    let mut reg = Registry::start().unwrap();
    let wasm = module("cached");
    let url = reg.url("cache/mod:1");
    let pushed = push(&wasm, &url, &insecure()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    assert!(!f.fetch(&req(&url)).await.unwrap().cache_hit);
    assert!(f.fetch(&req(&url)).await.unwrap().cache_hit);

    reg.stop();
    // A new fetcher on the same dir: the hit comes from disk, by tag and by digest.
    let f = fetcher(cache.path(), &[reg.host()]);
    let got = f.fetch(&req(&url)).await.unwrap();
    assert!(got.cache_hit);
    assert_eq!(*got.bytes, wasm);
    assert_eq!(
        got.manifest_digest.as_deref(),
        Some(pushed.manifest_digest.as_str())
    );
    let got = f.fetch(&req(&pushed.reference)).await.unwrap();
    assert!(got.cache_hit);
    // Always must go to the registry, which is gone.
    let mut always = req(&url);
    always.pull_policy = PullPolicy::Always;
    let err = f.fetch(&always).await.unwrap_err();
    assert!(matches!(err, FetchError::Connect { .. }), "{err}");
}

#[tokio::test]
async fn always_re_resolves_the_tag_and_reuses_known_blobs() {
    let reg = Registry::start().unwrap();
    let proxy = Proxy::start(reg.host(), false).await;
    let v1 = module("v1");
    push(&v1, &reg.url("always/mod:latest"), &insecure())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[proxy.host()]);
    let url = format!("oci://{}/always/mod:latest", proxy.host());
    let mut always = req(&url);
    always.pull_policy = PullPolicy::Always;

    assert!(!f.fetch(&always).await.unwrap().cache_hit);
    let again = f.fetch(&always).await.unwrap();
    assert!(again.cache_hit);
    assert_eq!(*again.bytes, v1);
    assert_eq!(
        proxy.manifest_gets(),
        2,
        "Always asks for the manifest each time"
    );
    assert_eq!(
        proxy.blob_gets(),
        1,
        "a known manifest's blob is not downloaded again"
    );

    let v2 = module("v2");
    push(&v2, &reg.url("always/mod:latest"), &insecure())
        .await
        .unwrap();
    // IfNotPresent keeps the cached tag; Always sees the move.
    assert_eq!(*f.fetch(&req(&url)).await.unwrap().bytes, v1);
    let moved = f.fetch(&always).await.unwrap();
    assert_eq!(*moved.bytes, v2);
    assert!(!moved.cache_hit);
    assert_eq!(*f.fetch(&req(&url)).await.unwrap().bytes, v2);
}

#[tokio::test]
async fn corrupted_cache_file_is_detected_and_refetched() {
    let reg = Registry::start().unwrap();
    let wasm = module("corrupt");
    let url = reg.url("corrupt/mod:1");
    push(&wasm, &url, &insecure()).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    f.fetch(&req(&url)).await.unwrap();
    let file = cache
        .path()
        .join("modules/sha256")
        .join(format!("{}.wasm", sha256_hex(&wasm)));
    assert_eq!(std::fs::read(&file).unwrap(), wasm);
    let mut damaged = wasm.clone();
    *damaged.last_mut().unwrap() ^= 0xff;
    std::fs::write(&file, &damaged).unwrap();

    let got = f.fetch(&req(&url)).await.unwrap();
    assert!(!got.cache_hit, "a damaged entry must not be served");
    assert_eq!(*got.bytes, wasm);
    assert_eq!(std::fs::read(&file).unwrap(), wasm, "entry rewritten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fetches_of_one_url_download_once() {
    let reg = Registry::start().unwrap();
    let proxy = Proxy::start(reg.host(), false).await;
    let wasm = module(&"c".repeat(4000));
    push(&wasm, &reg.url("conc/mod:1"), &insecure())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[proxy.host()]);
    let url = format!("oci://{}/conc/mod:1", proxy.host());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let f = f.clone();
            let url = url.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                f.fetch(&FetchRequest::new(url)).await
            })
        })
        .collect();
    let mut downloads = 0;
    for t in tasks {
        let got = t.await.unwrap().unwrap();
        assert_eq!(*got.bytes, wasm);
        if !got.cache_hit {
            downloads += 1;
        }
    }
    assert_eq!(downloads, 1);
    assert_eq!(proxy.blob_gets(), 1);
    assert_eq!(proxy.manifest_gets(), 1);
}

#[tokio::test]
async fn tar_path_traversal_and_gzip_bomb_are_rejected() {
    let reg = Registry::start().unwrap();
    let host = reg.host();
    let wasm = module("tar");
    push_image(
        &host,
        "evil/traversal",
        "1",
        OCI_MANIFEST,
        ("application/vnd.oci.image.config.v1+json", b"{}"),
        &[(
            "application/vnd.oci.image.layer.v1.tar+gzip",
            tar_gz(&[("../plugin.wasm", &wasm)]),
        )],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), std::slice::from_ref(&host));
    let err = f
        .fetch(&req(&reg.url("evil/traversal:1")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::BadArchive { .. }), "{err}");
    assert!(err.to_string().contains("escapes the layer root"), "{err}");
    assert!(!cache.path().parent().unwrap().join("plugin.wasm").exists());

    // 64 MiB of zeros gzip to ~64 KiB; with a 1 MiB module limit extraction stops at 2 MiB.
    let bomb = gzip_bomb(64 << 20, &wasm);
    assert!(bomb.len() < 1 << 20);
    push_image(
        &host,
        "evil/bomb",
        "1",
        OCI_MANIFEST,
        ("application/vnd.oci.image.config.v1+json", b"{}"),
        &[("application/vnd.oci.image.layer.v1.tar+gzip", bomb)],
    )
    .await;
    let mut cfg = FetchConfig::new(cache.path().to_path_buf());
    cfg.insecure_registries = vec![host];
    cfg.max_module_bytes = 1 << 20;
    let err = Fetcher::new(cfg)
        .unwrap()
        .fetch(&req(&reg.url("evil/bomb:1")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("decompresses to more than 2097152 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn module_over_the_size_limit_is_refused() {
    let reg = Registry::start().unwrap();
    let wasm = module(&"L".repeat(3000));
    push(&wasm, &reg.url("big/mod:1"), &insecure())
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = FetchConfig::new(cache.path().to_path_buf());
    cfg.insecure_registries = vec![reg.host()];
    cfg.max_module_bytes = 1024;
    let err = Fetcher::new(cfg)
        .unwrap()
        .fetch(&req(&reg.url("big/mod:1")))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("module is larger than 1024 bytes"),
        "{err}"
    );
}

#[tokio::test]
async fn bearer_token_flow() {
    let reg = Registry::start().unwrap();
    let wasm = module("bearer");
    push(&wasm, &reg.url("bearer/mod:1"), &insecure())
        .await
        .unwrap();
    let proxy = Proxy::start(reg.host(), true).await;
    let cache = tempfile::tempdir().unwrap();
    let url = format!("oci://{}/bearer/mod:1", proxy.host());
    // The proxy's token realm is on loopback: refused unless private realms are allowed.
    let err = fetcher(cache.path(), &[proxy.host()])
        .fetch(&req(&url))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Refused { .. }) && err.to_string().contains("private/loopback"),
        "{err}"
    );
    let mut cfg = FetchConfig::new(cache.path().to_path_buf());
    cfg.insecure_registries = vec![proxy.host()];
    cfg.allow_private_realms = true;
    let got = Fetcher::new(cfg).unwrap().fetch(&req(&url)).await.unwrap();
    assert_eq!(*got.bytes, wasm);
    // One token for the session; the manifest and blob requests reuse it.
    assert_eq!(
        proxy
            .counts
            .token_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(proxy.blob_gets(), 1);
}

#[tokio::test]
async fn unreachable_and_silent_registries() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let host = format!("127.0.0.1:{port}");
    let cache = tempfile::tempdir().unwrap();
    let url = format!("oci://{host}/gone/mod:1");
    let err = fetcher(cache.path(), std::slice::from_ref(&host))
        .fetch(&req(&url))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Connect { .. }), "{err}");
    assert!(
        err.to_string()
            .to_lowercase()
            .contains("connection refused"),
        "{err}"
    );

    // Accepts connections but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = silent.local_addr().unwrap().to_string();
    let mut cfg = FetchConfig::new(cache.path().to_path_buf());
    cfg.insecure_registries = vec![host.clone()];
    cfg.timeout = Duration::from_millis(300);
    let err = Fetcher::new(cfg)
        .unwrap()
        .fetch(&req(&format!("oci://{host}/slow/mod:1")))
        .await
        .unwrap_err();
    assert!(matches!(err, FetchError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("timed out after 300ms"), "{err}");
}
