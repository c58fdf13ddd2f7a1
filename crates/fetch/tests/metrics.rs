//! Istio's agent metrics, counted exactly. The counters are process-global, so this binary
//! holds one test: nothing else in the process fetches while it counts.

mod support;

use std::time::Duration;

use support::*;
use waystone_fetch::testing::Registry;
use waystone_fetch::{
    ConversionResult, FetchRequest, MetricsSnapshot, PullPolicy, PushOptions, RemoteFetchResult,
    metrics, push, record_conversion, render_prometheus,
};

#[derive(Debug, PartialEq)]
struct Delta {
    hit: u64,
    miss: u64,
    success: u64,
    download_failure: u64,
    manifest_failure: u64,
    checksum_mismatched: u64,
}

fn delta(before: &MetricsSnapshot) -> Delta {
    let now = metrics();
    let r = |x| now.remote(x) - before.remote(x);
    Delta {
        hit: now.cache_lookup_hit - before.cache_lookup_hit,
        miss: now.cache_lookup_miss - before.cache_lookup_miss,
        success: r(RemoteFetchResult::Success),
        download_failure: r(RemoteFetchResult::DownloadFailure),
        manifest_failure: r(RemoteFetchResult::ManifestFailure),
        checksum_mismatched: r(RemoteFetchResult::ChecksumMismatched),
    }
}

fn d(hit: u64, miss: u64, success: u64, download: u64, manifest: u64, checksum: u64) -> Delta {
    Delta {
        hit,
        miss,
        success,
        download_failure: download,
        manifest_failure: manifest,
        checksum_mismatched: checksum,
    }
}

#[tokio::test]
async fn fetch_metrics_count_exactly() {
    let reg = Registry::start().unwrap();
    let insecure = PushOptions {
        insecure: true,
        ..PushOptions::default()
    };
    let (a, b) = (module("metrics-a"), module("metrics-b"));
    let pushed_a = push(&a, &reg.url("m/a:1"), &insecure).await.unwrap();
    push(&b, &reg.url("m/b:1"), &insecure).await.unwrap();
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    assert_eq!(metrics().cache_entries, 0);
    let start = metrics();

    // A first fetch misses and downloads; the next one hits.
    f.fetch(&FetchRequest::new(reg.url("m/a:1"))).await.unwrap();
    assert_eq!(delta(&start), d(0, 1, 1, 0, 0, 0));
    assert_eq!(metrics().cache_entries, 1);
    f.fetch(&FetchRequest::new(reg.url("m/a:1"))).await.unwrap();
    assert_eq!(delta(&start), d(1, 1, 1, 0, 0, 0));

    // Always re-resolves the tag, finds a known manifest: a hit, no download.
    let mut always = FetchRequest::new(reg.url("m/a:1"));
    always.pull_policy = PullPolicy::Always;
    f.fetch(&always).await.unwrap();
    assert_eq!(delta(&start), d(2, 1, 1, 0, 0, 0));

    // An unknown tag: the manifest cannot be had.
    f.fetch(&FetchRequest::new(reg.url("m/a:nope")))
        .await
        .unwrap_err();
    assert_eq!(delta(&start), d(2, 2, 1, 0, 1, 0));

    // A wrong sha256 for a manifest not in the cache.
    let mut wrong = FetchRequest::new(reg.url("m/b:1"));
    wrong.sha256 = Some("0".repeat(64));
    f.fetch(&wrong).await.unwrap_err();
    assert_eq!(delta(&start), d(2, 3, 1, 0, 1, 1));

    // The manifest is there but its module blob is gone.
    let resp = reqwest::Client::new()
        .delete(format!("http://{}/v2/m/b/blobs/{}", reg.host(), digest(&b)))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    f.fetch(&FetchRequest::new(reg.url("m/b:1")))
        .await
        .unwrap_err();
    assert_eq!(delta(&start), d(2, 4, 1, 1, 1, 1));

    // A plain download that fails is a download failure (there is no manifest).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    f.fetch(&FetchRequest::new(format!(
        "http://127.0.0.1:{port}/x.wasm"
    )))
    .await
    .unwrap_err();
    assert_eq!(delta(&start), d(2, 5, 1, 2, 1, 1));

    // A pinned digest already in the cache: a hit. file:// and malformed urls: not counted.
    f.fetch(&FetchRequest::new(pushed_a.reference.clone()))
        .await
        .unwrap();
    let file = cache.path().join("a.wasm");
    std::fs::write(&file, &a).unwrap();
    f.fetch(&FetchRequest::new(format!("file://{}", file.display())))
        .await
        .unwrap();
    f.fetch(&FetchRequest::new("oci://")).await.unwrap_err();
    assert_eq!(delta(&start), d(3, 5, 1, 2, 1, 1));

    // Conversions are recorded by the control plane; the histogram is cumulative.
    let before = metrics();
    record_conversion(ConversionResult::Success, Duration::from_micros(3_500));
    record_conversion(ConversionResult::FetchFailure, Duration::from_millis(700));
    record_conversion(ConversionResult::CompileFailure, Duration::from_secs(120));
    let after = metrics();
    for (r, n) in [
        (ConversionResult::Success, 1),
        (ConversionResult::FetchFailure, 1),
        (ConversionResult::CompileFailure, 1),
    ] {
        assert_eq!(after.conversion(r) - before.conversion(r), n, "{r:?}");
    }
    let bucket = |le: f64| {
        let i = waystone_fetch::CONVERSION_BUCKETS_MS
            .iter()
            .position(|b| *b == le)
            .unwrap();
        after.conversion_buckets[i] - before.conversion_buckets[i]
    };
    assert_eq!(bucket(1.0), 0);
    assert_eq!(bucket(5.0), 1);
    assert_eq!(bucket(500.0), 1);
    assert_eq!(bucket(1000.0), 2);
    assert_eq!(bucket(60000.0), 2);
    assert_eq!(after.conversion_count() - before.conversion_count(), 3);
    let sum = after.conversion_sum_ms - before.conversion_sum_ms;
    assert!((sum - 120_703.5).abs() < 0.01, "{sum}");

    let mut text = String::new();
    render_prometheus(&mut text);
    let m = metrics();
    for line in [
        "# TYPE wasm_cache_entries gauge".to_string(),
        format!("wasm_cache_entries {}", m.cache_entries),
        "# TYPE wasm_cache_lookup_count counter".to_string(),
        format!(
            "wasm_cache_lookup_count{{hit=\"true\"}} {}",
            m.cache_lookup_hit
        ),
        format!(
            "wasm_cache_lookup_count{{hit=\"false\"}} {}",
            m.cache_lookup_miss
        ),
        "# TYPE wasm_remote_fetch_count counter".to_string(),
        format!(
            "wasm_remote_fetch_count{{result=\"success\"}} {}",
            m.remote(RemoteFetchResult::Success)
        ),
        format!(
            "wasm_remote_fetch_count{{result=\"download_failure\"}} {}",
            m.remote(RemoteFetchResult::DownloadFailure)
        ),
        format!(
            "wasm_remote_fetch_count{{result=\"manifest_failure\"}} {}",
            m.remote(RemoteFetchResult::ManifestFailure)
        ),
        format!(
            "wasm_remote_fetch_count{{result=\"checksum_mismatched\"}} {}",
            m.remote(RemoteFetchResult::ChecksumMismatched)
        ),
        "# TYPE wasm_config_conversion_count counter".to_string(),
        format!(
            "wasm_config_conversion_count{{result=\"success\"}} {}",
            m.conversion(ConversionResult::Success)
        ),
        format!(
            "wasm_config_conversion_count{{result=\"fetch_failure\"}} {}",
            m.conversion(ConversionResult::FetchFailure)
        ),
        "# TYPE wasm_config_conversion_duration histogram".to_string(),
        format!(
            "wasm_config_conversion_duration_bucket{{le=\"5\"}} {}",
            m.conversion_buckets[1]
        ),
        format!(
            "wasm_config_conversion_duration_bucket{{le=\"+Inf\"}} {}",
            m.conversion_count()
        ),
        format!(
            "wasm_config_conversion_duration_count {}",
            m.conversion_count()
        ),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // Every sample line is `name{labels} value` with a numeric value.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = l.rsplit_once(' ').unwrap();
        value
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad sample {l:?}"));
    }

    // Pruning empties the cache and the gauge follows.
    f.prune_cache(Duration::ZERO).unwrap();
    assert_eq!(metrics().cache_entries, 0);
}
