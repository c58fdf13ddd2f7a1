//! Module-distribution metrics under the names Istio's agent exports, as process-global
//! atomics: every `Fetcher` of the process adds to the same counters, as one agent would.
//!
//! - `wasm_cache_entries` (gauge): modules in the on-disk cache, set when a cache is opened,
//!   filled or pruned.
//! - `wasm_cache_lookup_count{hit}`: one per `fetch` of a remote (oci or http) module; `true`
//!   when the module bytes came from the cache (also after an `Always` re-resolve found a known
//!   manifest), `false` when they had to be downloaded or could not be had.
//! - `wasm_remote_fetch_count{result}`: one per download attempt, with Istio's result values:
//!   `success`, `manifest_failure` (the registry or server could not be reached, refused us, or
//!   served no usable manifest), `download_failure` (the module blob or body could not be read
//!   or is not a module), `checksum_mismatched` (a digest did not match).
//! - `wasm_config_conversion_count{result}` and `wasm_config_conversion_duration` (ms): one per
//!   plugin load (fetch and compile), recorded by the control plane with [`record_conversion`].

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::error::FetchError;

/// Istio's `wasm_remote_fetch_count` result values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoteFetchResult {
    Success,
    DownloadFailure,
    ManifestFailure,
    ChecksumMismatched,
}

impl RemoteFetchResult {
    pub const ALL: [RemoteFetchResult; 4] = [
        RemoteFetchResult::Success,
        RemoteFetchResult::DownloadFailure,
        RemoteFetchResult::ManifestFailure,
        RemoteFetchResult::ChecksumMismatched,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RemoteFetchResult::Success => "success",
            RemoteFetchResult::DownloadFailure => "download_failure",
            RemoteFetchResult::ManifestFailure => "manifest_failure",
            RemoteFetchResult::ChecksumMismatched => "checksum_mismatched",
        }
    }

    /// How a failed remote fetch is counted.
    pub(crate) fn of_error(e: &FetchError) -> RemoteFetchResult {
        match e {
            FetchError::DigestMismatch { .. } => RemoteFetchResult::ChecksumMismatched,
            FetchError::NotWasm { .. }
            | FetchError::TooLarge { .. }
            | FetchError::BadArchive { .. } => RemoteFetchResult::DownloadFailure,
            // The manifest was had; its blob was not.
            FetchError::Registry { what, .. } if what.starts_with("GET blob") => {
                RemoteFetchResult::DownloadFailure
            }
            FetchError::Connect { reason, .. } if reason.starts_with("GET blob") => {
                RemoteFetchResult::DownloadFailure
            }
            _ => RemoteFetchResult::ManifestFailure,
        }
    }
}

/// `wasm_config_conversion_count` result values: Istio's `success` and `fetch_failure`, plus
/// `compile_failure` for a module that was fetched but does not compile or configure (Envoy
/// reports that elsewhere; Waystone compiles in the same step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversionResult {
    Success,
    FetchFailure,
    CompileFailure,
}

impl ConversionResult {
    pub const ALL: [ConversionResult; 3] = [
        ConversionResult::Success,
        ConversionResult::FetchFailure,
        ConversionResult::CompileFailure,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ConversionResult::Success => "success",
            ConversionResult::FetchFailure => "fetch_failure",
            ConversionResult::CompileFailure => "compile_failure",
        }
    }
}

/// Upper bounds (ms) of the conversion-duration buckets: a cache hit takes milliseconds, a
/// cold fetch and compile of a large module seconds.
pub const CONVERSION_BUCKETS_MS: [f64; 14] = [
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];

struct Metrics {
    cache_entries: AtomicU64,
    lookup_hit: AtomicU64,
    lookup_miss: AtomicU64,
    remote: [AtomicU64; 4],
    conversions: [AtomicU64; 3],
    /// Cumulative counts per bucket, plus +Inf last.
    duration_buckets: [AtomicU64; CONVERSION_BUCKETS_MS.len() + 1],
    /// Sum of durations in microseconds, so integer atomics keep sub-ms precision.
    duration_sum_us: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);

static METRICS: Metrics = Metrics {
    cache_entries: ZERO,
    lookup_hit: ZERO,
    lookup_miss: ZERO,
    remote: [ZERO; 4],
    conversions: [ZERO; 3],
    duration_buckets: [ZERO; CONVERSION_BUCKETS_MS.len() + 1],
    duration_sum_us: ZERO,
};

fn remote_index(r: RemoteFetchResult) -> usize {
    RemoteFetchResult::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(0)
}

fn conversion_index(r: ConversionResult) -> usize {
    ConversionResult::ALL
        .iter()
        .position(|x| *x == r)
        .unwrap_or(0)
}

pub(crate) fn set_cache_entries(n: u64) {
    METRICS.cache_entries.store(n, Ordering::Relaxed);
}

pub(crate) fn record_lookup(hit: bool) {
    let c = if hit {
        &METRICS.lookup_hit
    } else {
        &METRICS.lookup_miss
    };
    c.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn record_remote_fetch(result: RemoteFetchResult) {
    METRICS.remote[remote_index(result)].fetch_add(1, Ordering::Relaxed);
}

/// Records one plugin load (fetch plus compile) and how long it took.
pub fn record_conversion(result: ConversionResult, duration: Duration) {
    METRICS.conversions[conversion_index(result)].fetch_add(1, Ordering::Relaxed);
    let ms = duration.as_secs_f64() * 1000.0;
    for (i, bound) in CONVERSION_BUCKETS_MS.iter().enumerate() {
        if ms <= *bound {
            METRICS.duration_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    METRICS.duration_buckets[CONVERSION_BUCKETS_MS.len()].fetch_add(1, Ordering::Relaxed);
    let us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
    METRICS.duration_sum_us.fetch_add(us, Ordering::Relaxed);
}

/// A copy of every metric at one moment (each value read atomically, not all together).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsSnapshot {
    pub cache_entries: u64,
    pub cache_lookup_hit: u64,
    pub cache_lookup_miss: u64,
    /// Indexed like [`RemoteFetchResult::ALL`].
    pub remote_fetch: [u64; 4],
    /// Indexed like [`ConversionResult::ALL`].
    pub conversions: [u64; 3],
    /// Cumulative counts for [`CONVERSION_BUCKETS_MS`], then +Inf.
    pub conversion_buckets: Vec<u64>,
    pub conversion_sum_ms: f64,
}

impl MetricsSnapshot {
    pub fn remote(&self, r: RemoteFetchResult) -> u64 {
        self.remote_fetch[remote_index(r)]
    }

    pub fn conversion(&self, r: ConversionResult) -> u64 {
        self.conversions[conversion_index(r)]
    }

    pub fn conversion_count(&self) -> u64 {
        self.conversion_buckets.last().copied().unwrap_or(0)
    }
}

pub fn metrics() -> MetricsSnapshot {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    MetricsSnapshot {
        cache_entries: get(&METRICS.cache_entries),
        cache_lookup_hit: get(&METRICS.lookup_hit),
        cache_lookup_miss: get(&METRICS.lookup_miss),
        remote_fetch: std::array::from_fn(|i| get(&METRICS.remote[i])),
        conversions: std::array::from_fn(|i| get(&METRICS.conversions[i])),
        conversion_buckets: METRICS.duration_buckets.iter().map(get).collect(),
        conversion_sum_ms: get(&METRICS.duration_sum_us) as f64 / 1000.0,
    }
}

/// Appends the metrics in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus(out: &mut String) {
    let m = metrics();
    let _ = write!(
        out,
        "# HELP wasm_cache_entries Number of Wasm modules in the on-disk module cache.\n\
         # TYPE wasm_cache_entries gauge\n\
         wasm_cache_entries {}\n\
         # HELP wasm_cache_lookup_count Number of Wasm module cache lookups.\n\
         # TYPE wasm_cache_lookup_count counter\n\
         wasm_cache_lookup_count{{hit=\"true\"}} {}\n\
         wasm_cache_lookup_count{{hit=\"false\"}} {}\n\
         # HELP wasm_remote_fetch_count Number of remote Wasm module fetches, by result.\n\
         # TYPE wasm_remote_fetch_count counter\n",
        m.cache_entries, m.cache_lookup_hit, m.cache_lookup_miss
    );
    for r in RemoteFetchResult::ALL {
        let _ = writeln!(
            out,
            "wasm_remote_fetch_count{{result=\"{}\"}} {}",
            r.label(),
            m.remote(r)
        );
    }
    out.push_str(
        "# HELP wasm_config_conversion_count Number of Wasm plugin loads (fetch and compile), by result.\n\
         # TYPE wasm_config_conversion_count counter\n",
    );
    for r in ConversionResult::ALL {
        let _ = writeln!(
            out,
            "wasm_config_conversion_count{{result=\"{}\"}} {}",
            r.label(),
            m.conversion(r)
        );
    }
    out.push_str(
        "# HELP wasm_config_conversion_duration Time to load a Wasm plugin (fetch and compile), in milliseconds.\n\
         # TYPE wasm_config_conversion_duration histogram\n",
    );
    for (bound, count) in CONVERSION_BUCKETS_MS.iter().zip(&m.conversion_buckets) {
        let _ = writeln!(
            out,
            "wasm_config_conversion_duration_bucket{{le=\"{bound}\"}} {count}"
        );
    }
    let _ = write!(
        out,
        "wasm_config_conversion_duration_bucket{{le=\"+Inf\"}} {}\n\
         wasm_config_conversion_duration_sum {}\n\
         wasm_config_conversion_duration_count {}\n",
        m.conversion_count(),
        m.conversion_sum_ms,
        m.conversion_count()
    );
}
