//! Per-request Wasm cost on this host: context create → request headers → response
//! headers → done, for the real basic_auth plugin (allowed and denied requests) and
//! for a plugin that does nothing. The headline number behind BENCHMARKS.md's
//! "per-request Wasm overhead" target is `basic_auth/allowed`.
//!
//! Run: `cargo bench -p waystone-wasm --bench per_request` (after
//! `scripts/build-plugins.sh`).

mod support;

use criterion::{Criterion, criterion_group, criterion_main};
use support::{ALLOWED, BASIC_AUTH_CONFIG, instance, one_request, request};
use waystone_wasm::{EngineConfig, WasmEngine};

fn per_request(c: &mut Criterion) {
    let engine = WasmEngine::new(EngineConfig::default()).expect("engine");
    let mut group = c.benchmark_group("per_request");
    let mut auth = instance(&engine, "basic_auth", BASIC_AUTH_CONFIG);
    group.bench_function("basic_auth/allowed", |b| {
        b.iter(|| one_request(&mut auth, ALLOWED))
    });
    group.bench_function("basic_auth/denied", |b| {
        b.iter(|| one_request(&mut auth, None))
    });
    let mut noop = instance(&engine, "noop", "");
    group.bench_function("noop", |b| b.iter(|| one_request(&mut noop, ALLOWED)));
    group.bench_function("host_only/build_stream", |b| b.iter(|| request(ALLOWED)));
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
