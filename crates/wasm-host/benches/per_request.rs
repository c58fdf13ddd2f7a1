//! Per-request Wasm cost on this host: context create → request headers → response
//! headers → done, for the real basic_auth plugin (allowed and denied requests) and
//! for a plugin that does nothing. The headline number behind BENCHMARKS.md's
//! "per-request Wasm overhead" target is `basic_auth/allowed`.
//!
//! Run: `cargo bench -p waystone-wasm --bench per_request` (after
//! `scripts/build-plugins.sh`).

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use waystone_wasm::{EngineConfig, HttpStream, PluginInstance, PluginSpec, WasmEngine};

const CONFIG: &str = r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET","POST"],"credentials":["ok:test"]}]}"#;

fn plugin(name: &str) -> Vec<u8> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/wasm"))
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run scripts/build-plugins.sh first",
            path.display()
        )
    })
}

fn instance(engine: &WasmEngine, name: &str, config: &str) -> PluginInstance {
    let module = engine.compile(&plugin(name)).expect("module compiles");
    let spec = Arc::new(PluginSpec {
        name: format!("bench.{name}"),
        root_id: String::new(),
        vm_id: name.into(),
        plugin_configuration: config.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
        env: Vec::new(),
    });
    PluginInstance::start(&module, spec).expect("plugin starts")
}

/// A request as the data plane hands it over: pseudo-headers plus what curl sends.
fn request(auth: Option<&str>) -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", "/productpage");
    s.request_headers.add(":authority", "bookinfo.example");
    s.request_headers.add(":scheme", "http");
    s.request_headers.add("user-agent", "curl/8.5.0");
    s.request_headers.add("accept", "*/*");
    if let Some(a) = auth {
        s.request_headers.add("authorization", a);
    }
    s
}

/// Building the stream is part of the measured cost: the data plane builds one per
/// request too.
fn one_request(inst: &mut PluginInstance, auth: Option<&str>) {
    let mut stream = request(auth);
    let ctx = inst.create_http_context().expect("context");
    inst.on_request_headers(ctx, &mut stream, true)
        .expect("request headers");
    stream.response_headers.add(":status", "200");
    stream.response_headers.add("content-type", "text/html");
    inst.on_response_headers(ctx, &mut stream, true)
        .expect("response headers");
    inst.finish_http_context(ctx, &mut stream).expect("done");
}

fn per_request(c: &mut Criterion) {
    let engine = WasmEngine::new(EngineConfig::default()).expect("engine");
    let mut group = c.benchmark_group("per_request");
    let mut auth = instance(&engine, "basic_auth", CONFIG);
    let allowed = Some("Basic b2s6dGVzdA==");
    group.bench_function("basic_auth/allowed", |b| {
        b.iter(|| one_request(&mut auth, allowed))
    });
    group.bench_function("basic_auth/denied", |b| {
        b.iter(|| one_request(&mut auth, None))
    });
    let mut noop = instance(&engine, "noop", "");
    group.bench_function("noop", |b| b.iter(|| one_request(&mut noop, allowed)));
    group.bench_function("host_only/build_stream", |b| b.iter(|| request(allowed)));
    group.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
