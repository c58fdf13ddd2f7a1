//! Cold and warm plugin loads, as `waystone up` does them, from a real registry on loopback.
//!
//! cold: empty caches: fetch from the registry, then compile with cranelift (and write both
//!       caches).
//! warm: a restart: a new fetcher and engine on the same caches: the module from the module
//!       cache, the compiled code deserialized from the compiled-module cache.
//!
//! Run with `scripts/bench-fetch.sh` (release build). Modules: `basic_auth.wasm` (argument 1,
//! default `target/wasm/basic_auth.wasm`) and a generated one of at least 10 MB.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use waystone_fetch::testing::Registry;
use waystone_fetch::{DockerConfig, FetchConfig, FetchRequest, Fetcher, PushOptions, push};
use waystone_wasm::{CompiledCache, CompiledSource, EngineConfig, WasmEngine};

/// A valid Proxy-Wasm module of at least `min_bytes`: many functions of straight-line
/// arithmetic, so its size is code cranelift has to compile (not a data segment).
fn large_module(min_bytes: usize) -> Vec<u8> {
    let mut body = String::new();
    for i in 0..60 {
        body.push_str(&format!(
            "(local.set 1 (i32.xor (i32.add (local.get 1) (i32.const {})) (i32.mul (local.get 0) (i32.const {}))))",
            i * 7919 + 13,
            i * 104_729 + 1
        ));
    }
    let func = |n: usize| {
        format!("(func $f{n} (param i32) (result i32) (local i32) {body} (local.get 1))\n")
    };
    // Measure one function's encoded size to know how many make `min_bytes`.
    let probe = wat::parse_str(format!("(module {})", func(0))).expect("probe module");
    let per_function = probe.len().saturating_sub(8).max(1);
    // The probe also carries a type section: leave room for the estimate being low.
    let count = min_bytes / per_function * 21 / 20 + 1;
    let mut wat = String::from(
        "(module (memory (export \"memory\") 1)\n\
         (func (export \"proxy_abi_version_0_2_1\"))\n\
         (func (export \"proxy_on_memory_allocate\") (param i32) (result i32) i32.const 0)\n\
         (func (export \"proxy_on_context_create\") (param i32 i32))\n",
    );
    for n in 0..count {
        wat.push_str(&func(n));
    }
    wat.push(')');
    let wasm = wat::parse_str(&wat).expect("generated module");
    assert!(wasm.len() >= min_bytes, "{} < {min_bytes}", wasm.len());
    wasm
}

struct Run {
    fetch: Duration,
    compile: Duration,
    source: CompiledSource,
    cache_hit: bool,
}

async fn load(cache_dir: &std::path::Path, url: &str, insecure: &str) -> Run {
    let mut cfg = FetchConfig::new(cache_dir.join("cache"));
    cfg.insecure_registries = vec![insecure.to_string()];
    cfg.docker_config = DockerConfig::Disabled;
    let fetcher = Fetcher::new(cfg).expect("fetcher");
    let compiled = CompiledCache::open(&cache_dir.join("cache/compiled")).expect("compiled cache");
    let engine = WasmEngine::new(EngineConfig::default()).expect("engine");

    let t = Instant::now();
    let fetched = fetcher.fetch(&FetchRequest::new(url)).await.expect("fetch");
    let fetch = t.elapsed();
    let bytes = fetched.bytes.clone();
    let t = Instant::now();
    let (_module, source) =
        tokio::task::spawn_blocking(move || compiled.load_or_compile(&engine, &bytes))
            .await
            .expect("compile task")
            .expect("compile");
    Run {
        fetch,
        compile: t.elapsed(),
        source,
        cache_hit: fetched.cache_hit,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let basic_auth = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/wasm/basic_auth.wasm"));
    let basic_auth = std::fs::read(&basic_auth).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run scripts/build-plugins.sh first)",
            basic_auth.display()
        )
    });
    let t = Instant::now();
    let large = large_module(10 << 20);
    eprintln!(
        "generated a {:.1} MB module in {:.1} s",
        large.len() as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );

    let registry = Registry::start().expect("docker-registry");
    let insecure = PushOptions {
        insecure: true,
        ..PushOptions::default()
    };
    println!(
        "{:<16} {:>10} {:>6} {:>11} {:>12} {:>10}",
        "module", "size", "run", "fetch ms", "compile ms", "total ms"
    );
    for (name, wasm) in [("basic_auth", &basic_auth), ("generated", &large)] {
        let url = registry.url(&format!("bench/{name}:1"));
        push(wasm, &url, &insecure).await.expect("push");
        let dir = tempfile::tempdir().expect("temp dir");
        let cold = load(dir.path(), &url, &registry.host()).await;
        assert!(!cold.cache_hit && cold.source == CompiledSource::Compiled);
        let warm = load(dir.path(), &url, &registry.host()).await;
        assert!(warm.cache_hit && warm.source == CompiledSource::Cache);
        for (label, r) in [("cold", &cold), ("warm", &warm)] {
            println!(
                "{:<16} {:>10} {:>6} {:>11} {:>12} {:>10}",
                name,
                wasm.len(),
                label,
                ms(r.fetch),
                ms(r.compile),
                ms(r.fetch + r.compile)
            );
        }
    }
}
