//! Hostile modules: random and out-of-range pointers and lengths into every host function never
//! touch host memory, never crash the host and never poison the instance.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use waystone_wasm::{HttpStream, NetworkStream};

/// Every import of PRELUDE and EXTRA a guest can call without ending itself (`proc_exit`
/// is left out on purpose): (WAT name, parameter types).
const FUNCTIONS: &[(&str, &str)] = &[
    ("$log", "iii"),
    ("$get_log_level", "i"),
    ("$now", "i"),
    ("$tick", "i"),
    ("$get_hv", "iiiii"),
    ("$add_hv", "iiiii"),
    ("$rep_hv", "iiiii"),
    ("$rem_hv", "iii"),
    ("$get_pairs", "iii"),
    ("$set_pairs", "iii"),
    ("$map_size", "ii"),
    ("$send", "iiiiiiii"),
    ("$get_buf", "iiiii"),
    ("$set_buf", "iiiii"),
    ("$buf_status", "iii"),
    ("$get_prop", "iiii"),
    ("$set_prop", "iiii"),
    ("$get_shared", "iiiii"),
    ("$set_shared", "iiiii"),
    ("$reg_q", "iii"),
    ("$res_q", "iiiii"),
    ("$enq", "iii"),
    ("$deq", "iii"),
    ("$def_metric", "iiii"),
    ("$inc_metric", "iI"),
    ("$rec_metric", "iI"),
    ("$get_metric", "ii"),
    ("$continue", "i"),
    ("$close", "i"),
    ("$get_status", "iii"),
    ("$http_call", "iiiiiiiiii"),
    ("$ffi", "iiiiii"),
    ("$fd_write", "iiii"),
    ("$env_sizes", "ii"),
    ("$env_get", "ii"),
    ("$random", "ii"),
    ("$clock", "iIi"),
    ("$prestat", "ii"),
    ("$set_effective", "i"),
    ("$done", ""),
    ("$grpc_call", "iiiiiiiiiiii"),
    ("$grpc_stream", "iiiiiiiii"),
    ("$grpc_send", "iiii"),
    ("$grpc_cancel", "i"),
    ("$grpc_close", "i"),
];

/// Pointers and lengths a hostile guest would try: around the end of its 256 KiB memory,
/// negative (huge unsigned), zero, and anything at all.
fn hostile_i32(rng: &mut impl Rng) -> i32 {
    match rng.gen_range(0..8) {
        0 => -16,
        1 => 0x3ffff,
        2 => 0x40000,
        3 => 0,
        4 => i32::MAX,
        5 => rng.gen_range(0..0x40000),
        6 => rng.gen_range(0..8),
        _ => rng.r#gen(),
    }
}

fn calls(rng: &mut impl Rng, per_function: usize) -> String {
    let mut out = String::new();
    for (name, params) in FUNCTIONS {
        for _ in 0..per_function {
            let args: Vec<String> = params
                .chars()
                .map(|t| match t {
                    'I' => format!("(i64.const {})", rng.r#gen::<i64>()),
                    _ => format!("(i32.const {})", hostile_i32(rng)),
                })
                .collect();
            out.push_str(&format!("(drop (call {name} {}))\n", args.join(" ")));
        }
    }
    out
}

#[test]
fn random_arguments_to_every_host_function_never_crash_or_poison() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x05ee_dab1);
    for round in 0..4 {
        let body = format!(
            r#"
  (func $fuzz
    {calls})
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $fuzz) (i32.const 0))
  (func (export "proxy_on_tick") (param i32) (call $fuzz))
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) (call $fuzz) (i32.const 0))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32) (call $fuzz))
"#,
            calls = calls(&mut rng, 6)
        );
        let engine = engine();
        let module = engine.compile(&wat_module2(&body)).unwrap();
        let mut inst = start(&module, &format!("ns.fuzz{round}"));
        let ctx = inst.create_http_context().unwrap();
        let mut stream = HttpStream::default();
        stream.request_headers.add(":path", "/");
        stream.request_body = vec![7; 100];
        inst.on_request_headers(ctx, &mut stream, false)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Without a stream (root context), on an L4 connection, and while a callout answer is
        // readable.
        inst.on_tick()
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let net = inst.create_network_context().unwrap();
        let mut conn = NetworkStream {
            downstream_data: vec![1; 10],
            ..NetworkStream::default()
        };
        inst.on_downstream_data(net, &mut conn, true).unwrap();
        for call in inst.take_callouts() {
            inst.on_http_call_response(call.token, None, None).unwrap();
        }
        assert!(!inst.is_poisoned(), "round {round}");
        inst.finish_http_context(ctx, &mut stream).unwrap();
    }
}

#[test]
fn bad_pointers_to_the_new_host_functions_get_invalid_memory_access() {
    let body = r#"
  (data (i32.const 0) "svc")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $bad i32)
    (local.set $bad (i32.const -16))
    (call $rec (call $grpc_call (local.get $bad) (i32.const 3) (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 1024)))
    (call $rec (call $grpc_call (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3)
      (i32.const 0) (i32.const 0) (local.get $bad) (i32.const 4) (i32.const 10) (i32.const 1024)))
    (call $rec (call $grpc_call (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 10) (local.get $bad)))
    (call $rec (call $grpc_stream (i32.const 0) (i32.const 3) (local.get $bad) (i32.const 3) (i32.const 0) (i32.const 3)
      (i32.const 0) (i32.const 0) (i32.const 1024)))
    (call $rec (call $grpc_stream (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 3)
      (local.get $bad) (i32.const 8) (i32.const 1024)))
    (call $rec (call $grpc_send (i32.const 2) (local.get $bad) (i32.const 3) (i32.const 0)))
    (call $rec (call $http_call (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 0) (local.get $bad) (i32.const 4)
      (i32.const 0) (i32.const 0) (i32.const 10) (i32.const 1024)))
    (call $rec (call $http_call (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0) (i32.const 0) (i32.const 10) (local.get $bad)))
    (call $rec (call $get_status (i32.const 1024) (local.get $bad) (i32.const 1028)))
    (call $rec (call $get_status (i32.const 1024) (i32.const 1028) (i32.const 0x3ffff)))
    (call $report)
    (i32.const 0))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module2(body)).unwrap();
    let mut inst = start(&module, "ns.hostile2");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = HttpStream::default();
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    let got = statuses(&stream);
    assert_eq!(got, vec![6u8; got.len()], "statuses {got:?}");
    assert!(inst.take_callouts().is_empty());
    assert!(inst.take_grpc_commands().is_empty());
    assert!(!inst.is_poisoned());
}

/// An allocator that reads a header from inside itself (the host is copying a value out to
/// it at that moment) gets InternalFailure for the inner read: no recursion, and the outer
/// read still completes.
#[test]
fn a_header_read_from_inside_the_allocator_fails_instead_of_recursing() {
    let wat = r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 4096))
  (data (i32.const 0) ":path")
  (data (i32.const 16) "x-inner")
  (data (i32.const 32) "x-outer")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    ;; status of a read made while the host is inside this allocation, as an ASCII digit pair
    (i32.store8 (i32.const 200) (i32.add (i32.const 48)
      (call $get_hv (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 300) (i32.const 304))))
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.store8 (i32.const 201) (i32.add (i32.const 48)
      (call $get_hv (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 100) (i32.const 104))))
    (drop (call $add_hv (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 200) (i32.const 1)))
    (drop (call $add_hv (i32.const 0) (i32.const 32) (i32.const 7)
      (i32.load (i32.const 100)) (i32.load (i32.const 104))))
    (i32.const 0)))"#;
    let engine = engine();
    let module = engine.compile(&wat::parse_str(wat).unwrap()).unwrap();
    let mut inst = start(&module, "ns.reentrant-alloc");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = HttpStream::default();
    stream.request_headers.add(":path", "/p");
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    // Status 10 is InternalFailure: '0' + 10 = ':'.
    assert_eq!(stream.request_headers.get("x-inner"), Some(&b":"[..]));
    assert_eq!(stream.request_headers.get("x-outer"), Some(&b"/p"[..]));
    assert!(!inst.is_poisoned());
    inst.finish_http_context(ctx, &mut stream).unwrap();
}
