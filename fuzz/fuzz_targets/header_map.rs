//! Serialized header maps (count, lengths, NUL-terminated strings) as a hostile guest hands
//! them to `proxy_set_header_map_pairs`: the bytes are the plugin configuration, which a fixed
//! module copies into its memory and passes on. The host must never panic or over-allocate,
//! and a well-formed map must land exactly as a reference parser reads it.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use waystone_wasm::{CompiledModule, EngineConfig, HttpStream, PluginInstance, PluginSpec, WasmEngine};

const GUEST: &str = r#"
(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_map (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_map (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1 64)
  (global $heap (mut i32) (i32.const 1024))
  (global $config_ptr (mut i32) (i32.const 0))
  (global $config_len (mut i32) (i32.const 0))
  ;; A bump allocator that grows memory as needed.
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $at i32) (local $end i32)
    (local.set $at (global.get $heap))
    (local.set $end (i32.add (local.get $at) (local.get $n)))
    (block $fits
      (br_if $fits (i32.le_u (local.get $end) (i32.mul (memory.size) (i32.const 65536))))
      (br_if $fits (i32.ge_s (memory.grow
        (i32.add (i32.shr_u (i32.sub (local.get $end) (i32.mul (memory.size) (i32.const 65536))) (i32.const 16)) (i32.const 1)))
        (i32.const 0)))
      (return (i32.const 0)))
    (global.set $heap (local.get $end))
    (local.get $at))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    ;; PluginConfiguration (7): all of it, written to (ptr, len) at 0 and 4.
    (drop (call $get_buffer (i32.const 7) (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 4)))
    (global.set $config_ptr (i32.load (i32.const 0)))
    (global.set $config_len (i32.load (i32.const 4)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $set_map (i32.const 0) (global.get $config_ptr) (global.get $config_len)))
    (drop (call $get_map (i32.const 0) (i32.const 8) (i32.const 12)))
    ;; And the response trailers, a map nothing else fills.
    (drop (call $set_map (i32.const 3) (global.get $config_ptr) (global.get $config_len)))
    (i32.const 0))
  (func (export "proxy_abi_version_0_2_1")))
"#;

fn module() -> &'static CompiledModule {
    static MODULE: OnceLock<CompiledModule> = OnceLock::new();
    MODULE.get_or_init(|| {
        let engine = WasmEngine::new(EngineConfig {
            max_memory_bytes: 8 << 20,
            call_deadline: Duration::from_millis(500),
        })
        .expect("engine");
        engine.compile(GUEST.as_bytes()).expect("the guest compiles")
    })
}

/// The format, read independently of the host: `None` when the sizes do not fit the data.
fn reference(data: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    if data.is_empty() {
        return Some(Vec::new());
    }
    let word = |at: usize| -> Option<u64> {
        let b = data.get(at..at + 4)?;
        Some(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    let count = word(0)?;
    let mut pos = 4u64.checked_add(count.checked_mul(8)?)?;
    if pos > data.len() as u64 {
        return None;
    }
    let mut out = Vec::new();
    for i in 0..count as usize {
        let (k, v) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = data.get(pos as usize..(pos + k) as usize)?;
        pos += k + 1;
        let value = data.get(pos as usize..(pos + v) as usize)?;
        pos += v + 1;
        if pos > data.len() as u64 {
            return None;
        }
        out.push((String::from_utf8_lossy(key).to_ascii_lowercase(), value.to_vec()));
    }
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let spec = Arc::new(PluginSpec {
        name: "fuzz.header-map".into(),
        plugin_configuration: data.to_vec(),
        ..PluginSpec::default()
    });
    let mut instance = PluginInstance::start(module(), spec).expect("the guest starts");
    let ctx = instance.create_http_context().expect("a context");
    let mut stream = HttpStream::default();
    stream.request_headers.add(":path", b"/before".to_vec());
    let result = instance.on_request_headers(ctx, &mut stream, true);
    assert!(result.is_ok(), "the host failed the guest: {result:?}");
    if let Some(want) = reference(data) {
        let got: Vec<(String, Vec<u8>)> = stream
            .request_headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect();
        assert_eq!(got, want, "the map the guest set");
    }
    let _ = instance.finish_http_context(ctx, &mut stream);
});
