//! Every host function, called by a hostile module with arbitrary pointers, lengths and
//! values, from every kind of callback, with a lying allocator. The fuzz input is turned into
//! a module (text format, compiled per input); the host must answer each call with a status
//! or a trap, never panic, and every callback must return within the deadline.
//!
//! Signatures are not copied from the host: at start-up each candidate name is linked with the
//! arities the ABI allows and kept with the one the host accepts, so a host that changes
//! signatures is still fuzzed fully.
#![no_main]

use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use waystone_wasm::{EngineConfig, HttpStream, PluginInstance, PluginSpec, WasmEngine};

const PROXY: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_configuration",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_header_map_size",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_get_status",
    "proxy_send_local_response",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_call_foreign_function",
];

/// WASI functions with their parameter types (`i` i32, `I` i64) and whether they return.
const WASI: &[(&str, &str, bool)] = &[
    ("fd_write", "iiii", true),
    ("fd_read", "iiii", true),
    ("fd_close", "i", true),
    ("fd_seek", "iIii", true),
    ("fd_fdstat_get", "ii", true),
    ("fd_fdstat_set_flags", "ii", true),
    ("fd_filestat_get", "ii", true),
    ("fd_prestat_get", "ii", true),
    ("fd_prestat_dir_name", "iii", true),
    ("clock_time_get", "iIi", true),
    ("clock_res_get", "ii", true),
    ("random_get", "ii", true),
    ("environ_sizes_get", "ii", true),
    ("environ_get", "ii", true),
    ("args_sizes_get", "ii", true),
    ("args_get", "ii", true),
    ("proc_exit", "i", false),
    ("sched_yield", "", true),
    ("poll_oneoff", "iiii", true),
];

struct HostFn {
    module: &'static str,
    name: &'static str,
    params: Vec<char>,
    result: bool,
}

impl HostFn {
    fn import(&self, index: usize) -> String {
        let params: String = self
            .params
            .iter()
            .map(|p| if *p == 'I' { " i64" } else { " i32" })
            .collect();
        let result = if self.result { " (result i32)" } else { "" };
        format!(
            "(import \"{}\" \"{}\" (func $f{index} (param{params}){result}))",
            self.module, self.name
        )
    }
}

/// Constant data every module carries, so some pointers land on meaningful bytes.
const DATA_AT: &[(u32, &[u8])] = &[
    // A serialized map {":path": "/x", "a": "b"}.
    (
        256,
        b"\x02\x00\x00\x00\x05\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00\x00\x01\x00\x00\x00:path\x00/x\x00a\x00b\x00",
    ),
    (384, b":path"),
    (400, b"request\x00path"),
    (420, b"x-fuzz"),
    (440, b"shared-key"),
];

const INTERESTING: &[i64] = &[
    0, 1, 2, 5, 6, 8, 12, 256, 384, 400, 420, 440, 4096, 65532, 65535, 65536, 131072, -1, -8,
    i32::MAX as i64, i32::MIN as i64,
];

struct Engine {
    engine: WasmEngine,
    functions: Vec<HostFn>,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let engine = WasmEngine::new(EngineConfig {
            max_memory_bytes: 4 << 20,
            call_deadline: Duration::from_millis(200),
        })
        .expect("engine");
        let minimal = |import: &str| {
            format!(
                "(module {import} (memory (export \"memory\") 1)
                  (func (export \"proxy_on_memory_allocate\") (param i32) (result i32) i32.const 0)
                  (func (export \"proxy_on_context_create\") (param i32 i32))
                  (func (export \"proxy_abi_version_0_2_1\")))"
            )
        };
        let links = |f: &HostFn| engine.compile(minimal(&f.import(0)).as_bytes()).is_ok();
        let mut functions = Vec::new();
        for name in PROXY {
            let found = (0..=12).flat_map(|n| [(n, true), (n, false)]).find_map(|(n, result)| {
                let f = HostFn {
                    module: "env",
                    name,
                    params: vec!['i'; n],
                    result,
                };
                links(&f).then_some(f)
            });
            functions.extend(found);
        }
        for (name, params, result) in WASI {
            let f = HostFn {
                module: "wasi_snapshot_preview1",
                name,
                params: params.chars().collect(),
                result: *result,
            };
            if links(&f) {
                functions.push(f);
            }
        }
        assert!(functions.len() > 40, "only {} host functions link", functions.len());
        eprintln!("host_calls: fuzzing {} host functions", functions.len());
        Engine { engine, functions }
    })
}

/// Reads the fuzz input as a program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn value(&mut self) -> Option<i64> {
        let sel = self.byte()?;
        if (sel as usize) < INTERESTING.len() * 8 {
            return Some(INTERESTING[sel as usize % INTERESTING.len()]);
        }
        let mut b = [0u8; 4];
        for x in &mut b {
            *x = self.byte()?;
        }
        Some(i64::from(i32::from_le_bytes(b)))
    }
}

/// Callbacks the generated calls run in: configure, request headers, response headers, log.
const PHASES: usize = 4;

fn module_text(data: &[u8]) -> String {
    let e = engine();
    let mut input = Input(data);
    let mut used = std::collections::BTreeSet::new();
    let mut bodies = vec![String::new(); PHASES];
    while let Some(op) = input.byte() {
        let phase = (op as usize >> 4) % PHASES;
        if op & 0x0f == 0x0f {
            // Make the allocator lie (or tell the truth) from now on.
            let Some(v) = input.value() else { break };
            let _ = write!(bodies[phase], "(global.set $alloc (i32.const {}))", v as i32);
            continue;
        }
        let Some(which) = input.byte() else { break };
        let index = which as usize % e.functions.len();
        let f = &e.functions[index];
        let mut args = String::new();
        for p in &f.params {
            let Some(v) = input.value() else { break };
            if *p == 'I' {
                let _ = write!(args, " (i64.const {v})");
            } else {
                let _ = write!(args, " (i32.const {})", v as i32);
            }
        }
        if args.matches("const").count() != f.params.len() {
            break;
        }
        used.insert(index);
        let call = format!("(call $f{index}{args})");
        bodies[phase].push_str(&if f.result { format!("(drop {call})") } else { call });
    }
    let imports: String = used.iter().map(|i| e.functions[*i].import(*i)).collect();
    let data_segments: String = DATA_AT
        .iter()
        .map(|(at, bytes)| {
            let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
            format!("(data (i32.const {at}) \"{escaped}\")")
        })
        .collect();
    format!(
        "(module {imports}
          (memory (export \"memory\") 1 2)
          {data_segments}
          (global $alloc (mut i32) (i32.const 8192))
          (func (export \"proxy_on_memory_allocate\") (param i32) (result i32) global.get $alloc)
          (func (export \"proxy_on_context_create\") (param i32 i32))
          (func (export \"proxy_on_configure\") (param i32 i32) (result i32) {} i32.const 1)
          (func (export \"proxy_on_request_headers\") (param i32 i32 i32) (result i32) {} i32.const 0)
          (func (export \"proxy_on_response_headers\") (param i32 i32 i32) (result i32) {} i32.const 0)
          (func (export \"proxy_on_log\") (param i32) {})
          (func (export \"proxy_abi_version_0_2_1\")))",
        bodies[0], bodies[1], bodies[2], bodies[3]
    )
}

fuzz_target!(|data: &[u8]| {
    let text = module_text(data);
    let module = engine()
        .engine
        .compile(text.as_bytes())
        .unwrap_or_else(|e| panic!("a generated module does not compile: {e}\n{text}"));
    let spec = Arc::new(PluginSpec {
        name: "fuzz.host-calls".into(),
        plugin_configuration: b"{\"k\":\"v\"}".to_vec(),
        ..PluginSpec::default()
    });
    // Errors are fine (traps, refused configuration); panics and hangs are not.
    let Ok(mut instance) = PluginInstance::start(&module, spec) else {
        return;
    };
    let Ok(ctx) = instance.create_http_context() else {
        return;
    };
    let mut stream = HttpStream::default();
    stream.request_headers.add(":path", b"/fuzz".to_vec());
    stream.request_headers.add("x-fuzz", b"1".to_vec());
    stream.response_headers.add(":status", b"200".to_vec());
    let _ = instance.on_request_headers(ctx, &mut stream, true);
    let _ = instance.on_response_headers(ctx, &mut stream, true);
    let _ = instance.finish_http_context(ctx, &mut stream);
});
