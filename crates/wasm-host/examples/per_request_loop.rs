//! Runs the per-request Wasm path of `benches/per_request.rs` a fixed number of times, so an
//! instruction counter gives a per-request cost that does not move with the load of a shared
//! machine (criterion's wall-clock medians do; this VM has no hardware counters):
//!
//! ```sh
//! cargo build --release -p waystone-wasm --example per_request_loop
//! valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect=per_request_loop::one_request_counted --smc-check=all-non-file \
//!     target/release/examples/per_request_loop basic_auth 2000
//! ```
//! Collected instructions / 2000 = instructions per request.

#[path = "../benches/support/mod.rs"]
mod support;

use support::{ALLOWED, BASIC_AUTH_CONFIG, instance, one_request};
use waystone_wasm::{EngineConfig, PluginInstance, WasmEngine};

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_else(|| "basic_auth".into());
    let n: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let engine = WasmEngine::new(EngineConfig::default()).expect("engine");
    let config = if name.starts_with("basic_auth") {
        BASIC_AUTH_CONFIG
    } else {
        ""
    };
    let mut inst = instance(&engine, &name, config);
    let start = std::time::Instant::now();
    for _ in 0..n {
        one_request_counted(&mut inst);
    }
    let per = start.elapsed() / n.max(1);
    eprintln!("{name}: {n} requests, {per:?} per request (wall clock)");
}

/// Not inlined, so a profiler can count just this.
#[inline(never)]
fn one_request_counted(inst: &mut PluginInstance) {
    one_request(inst, ALLOWED);
}
