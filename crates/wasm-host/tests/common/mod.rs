//! Builds small WAT plugins for the ABI tests.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use waystone_wasm::{
    CompiledModule, EngineConfig, HttpStream, PluginInstance, PluginSpec, WasmEngine,
};

/// Imports every test may use, a bump allocator from 64 KiB, and helpers:
/// `$rec` appends a status byte at 2048.., `$report` sends them as the body of a local reply,
/// `$hdr` adds response header (key ptr/len at 0x300+) from the value returned in (1024, 1028).
pub const PRELUDE: &str = r#"
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_log_level" (func $get_log_level (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $rep_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $rem_hv (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_size" (func $map_size (param i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $send (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_status" (func $buf_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $reg_q (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $res_q (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $enq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $deq (param i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $def_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc_metric (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $rec_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close (param i32) (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $ffi (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (import "wasi_unstable" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))

  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 65536))
  (global $st (mut i32) (i32.const 2048))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $rec (param $s i32)
    (i32.store8 (global.get $st) (local.get $s))
    (global.set $st (i32.add (global.get $st) (i32.const 1))))
  (func $report
    (drop (call $send (i32.const 200) (i32.const 0) (i32.const 0)
      (i32.const 2048) (i32.sub (global.get $st) (i32.const 2048))
      (i32.const 0) (i32.const 0) (i32.const -1))))
  ;; adds response header named by (kptr, klen) with the value last returned at (1024, 1028)
  (func $hdr (param $k i32) (param $kl i32)
    (call $rec (call $add_hv (i32.const 2) (local.get $k) (local.get $kl)
      (i32.load (i32.const 1024)) (i32.load (i32.const 1028)))))
"#;

/// `(module PRELUDE <abi export> body)`.
pub fn wat_module(body: &str) -> Vec<u8> {
    let text = format!("(module {PRELUDE}\n (func (export \"proxy_abi_version_0_2_1\"))\n {body})");
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// Bytes as a WAT string literal body.
pub fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

pub fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(*v);
        out.push(0);
    }
    out
}

pub fn engine() -> WasmEngine {
    WasmEngine::new(EngineConfig::default()).expect("engine")
}

pub fn engine_with(max_memory_bytes: usize, call_deadline: Duration) -> WasmEngine {
    WasmEngine::new(EngineConfig {
        max_memory_bytes,
        call_deadline,
    })
    .expect("engine")
}

pub fn spec(name: &str) -> Arc<PluginSpec> {
    Arc::new(PluginSpec {
        name: name.into(),
        root_id: "root".into(),
        vm_id: "vm".into(),
        plugin_configuration: b"{\"k\":1}".to_vec(),
        vm_configuration: Vec::new(),
        env: vec![("GREETING".into(), "hi".into())],
    })
}

pub fn start(module: &CompiledModule, name: &str) -> PluginInstance {
    PluginInstance::start(module, spec(name)).expect("plugin starts")
}

pub fn header<'a>(stream: &'a HttpStream, which: &str, name: &str) -> Option<&'a [u8]> {
    match which {
        "req" => stream.request_headers.get(name),
        _ => stream.response_headers.get(name),
    }
}

/// The status bytes the guest reported through `$report`.
pub fn statuses(stream: &HttpStream) -> Vec<u8> {
    stream
        .local_response
        .as_ref()
        .expect("the guest reported its statuses")
        .body
        .clone()
}

/// Captures `tracing` output of the current thread.
#[derive(Clone, Default)]
pub struct Captured(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Host functions the newer tests use besides [`PRELUDE`], and metric helpers:
/// `$count(name_ptr, name_len)` adds 1 to the counter named so, `$add(.., i64)` adds a value.
pub const EXTRA: &str = r#"
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $grpc_stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $grpc_cancel (param i32) (result i32)))
  (import "env" "proxy_grpc_close" (func $grpc_close (param i32) (result i32)))
"#;

/// Helpers over [`EXTRA`] (functions must follow every import).
pub const EXTRA_FUNCS: &str = r#"
  (func $add (param $p i32) (param $l i32) (param $v i64)
    (drop (call $def_metric (i32.const 0) (local.get $p) (local.get $l) (i32.const 1996)))
    (drop (call $inc_metric (i32.load (i32.const 1996)) (local.get $v))))
  (func $count (param $p i32) (param $l i32)
    (call $add (local.get $p) (local.get $l) (i64.const 1)))
"#;

/// `(module PRELUDE EXTRA <0.2.1 marker> body)`.
pub fn wat_module2(body: &str) -> Vec<u8> {
    let text = format!(
        "(module {EXTRA}\n{PRELUDE}\n{EXTRA_FUNCS}\n (func (export \"proxy_abi_version_0_2_1\"))\n {body})"
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test WAT: {e}\n{text}"))
}

/// The value of a plugin-defined counter or gauge (0 when never defined).
pub fn metric(engine: &WasmEngine, name: &str) -> u64 {
    engine
        .metrics_snapshot()
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| match m.value {
            waystone_wasm::MetricValue::Counter(c) => c,
            waystone_wasm::MetricValue::Gauge(g) => g as u64,
            waystone_wasm::MetricValue::Histogram { count, .. } => count,
        })
        .unwrap_or(0)
}

pub fn spec_with(name: &str, config: &[u8]) -> Arc<PluginSpec> {
    let mut s = (*spec(name)).clone();
    s.plugin_configuration = config.to_vec();
    Arc::new(s)
}
