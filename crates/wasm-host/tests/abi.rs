//! Proxy-Wasm ABI behaviour, driven by small WAT plugins.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use waystone_wasm::{
    AbiVersion, Action, HeaderMap, HostError, HttpStream, PluginInstance, StreamType,
};

fn request(path: &str) -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", path);
    s.request_headers.add(":authority", "example.com");
    s
}

const HEADERS_WAT: &str = r#"
  (data (i32.const 0) "X-A")
  (data (i32.const 8) "1")
  (data (i32.const 16) "2")
  (data (i32.const 24) "x-b")
  (data (i32.const 32) "v")
  (data (i32.const 40) ":path")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    (call $rec (call $add_hv (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 1)))
    (call $rec (call $add_hv (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 16) (i32.const 1)))
    ;; first of repeated values, copied to response header x-b
    (call $rec (call $get_hv (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 24) (i32.const 3))
    (call $rec (call $rep_hv (i32.const 0) (i32.const 40) (i32.const 5) (i32.const 32) (i32.const 1)))
    (call $rec (call $rem_hv (i32.const 0) (i32.const 0) (i32.const 3)))
    (call $rec (call $get_hv (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $rem_hv (i32.const 0) (i32.const 0) (i32.const 3)))
    ;; pairs round trip: request headers → response trailers
    (call $rec (call $get_pairs (i32.const 0) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $set_pairs (i32.const 3) (i32.load (i32.const 1024)) (i32.load (i32.const 1028))))
    (call $rec (call $map_size (i32.const 0) (i32.const 1032)))
    (call $rec (call $get_hv (i32.const 9) (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $get_hv (i32.const 6) (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028)))
    (call $report)
    (i32.const 0))
"#;

#[test]
fn header_map_operations_round_trip() {
    let engine = engine();
    let module = engine.compile(&wat_module(HEADERS_WAT)).unwrap();
    assert_eq!(module.abi(), AbiVersion::V0_2_1);
    assert!(module.has_export("proxy_on_request_headers"));
    assert!(!module.has_export("proxy_on_response_body"));
    let mut inst = start(&module, "ns.headers");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/a?b=1");
    stream.request_headers.add("x-a", "0");
    let action = inst.on_request_headers(ctx, &mut stream, false).unwrap();
    assert_eq!(action, Action::Continue);
    assert_eq!(
        statuses(&stream),
        vec![0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 2, 1]
    );
    assert_eq!(stream.response_headers.get("x-b"), Some(&b"0"[..]));
    // A replaced header moves to the end, as in Envoy's header maps.
    let expected: HeaderMap = [
        (":method", "GET"),
        (":authority", "example.com"),
        (":path", "v"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.as_bytes().to_vec()))
    .collect();
    assert_eq!(stream.request_headers, expected);
    assert_eq!(stream.response_trailers, expected);
    inst.finish_http_context(ctx, &mut stream).unwrap();
    assert!(!inst.is_poisoned());
}

#[test]
fn local_response_with_headers() {
    let headers = serialize(&[("WWW-Authenticate", b"Basic realm=istio"), ("x-two", b"2")]);
    let body = format!(
        r#"
  (data (i32.const 0) "{}")
  (data (i32.const 512) "denied")
  (data (i32.const 600) "access denied")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $send (i32.const 401) (i32.const 512) (i32.const 6) (i32.const 600) (i32.const 13)
      (i32.const 0) (i32.const {}) (i32.const -1)))
    (i32.const 1))
"#,
        wat_bytes(&headers),
        headers.len()
    );
    let engine = engine();
    let module = engine.compile(&wat_module(&body)).unwrap();
    let mut inst = start(&module, "ns.reply");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    assert_eq!(
        inst.on_request_headers(ctx, &mut stream, true).unwrap(),
        Action::Pause
    );
    let reply = stream.local_response.take().expect("local response");
    assert_eq!(reply.status, 401);
    assert_eq!(reply.details, "denied");
    assert_eq!(reply.body, b"access denied");
    assert_eq!(reply.grpc_status, -1);
    assert_eq!(
        reply.headers,
        vec![
            (
                "www-authenticate".to_string(),
                b"Basic realm=istio".to_vec()
            ),
            ("x-two".to_string(), b"2".to_vec())
        ]
    );
}

#[test]
fn buffers_prepend_append_replace() {
    let body = r#"
  (data (i32.const 0) ">>")
  (data (i32.const 8) "!")
  (data (i32.const 16) "new")
  (data (i32.const 24) "got")
  (data (i32.const 32) "cfg")
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (call $rec (call $get_buf (i32.const 0) (i32.const 1) (i32.const 3) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 24) (i32.const 3))
    (call $rec (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 2)))
    (call $rec (call $set_buf (i32.const 0) (i32.const -1) (i32.const 0) (i32.const 8) (i32.const 1)))
    (call $rec (call $set_buf (i32.const 1) (i32.const 0) (i32.const 100) (i32.const 16) (i32.const 3)))
    (call $rec (call $get_buf (i32.const 7) (i32.const 0) (i32.const 100) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 32) (i32.const 3))
    (call $rec (call $get_buf (i32.const 3) (i32.const 0) (i32.const 10) (i32.const 1024) (i32.const 1028)))
    ;; start beyond the end: Ok with a null pointer
    (call $rec (call $get_buf (i32.const 0) (i32.const 100) (i32.const 10) (i32.const 1024) (i32.const 1028)))
    (call $rec (i32.load (i32.const 1024)))
    (call $rec (call $buf_status (i32.const 0) (i32.const 1032) (i32.const 1036)))
    (call $rec (i32.load (i32.const 1032)))
    (call $rec (call $set_buf (i32.const 7) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1)))
    (call $report)
    (i32.const 1))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module(body)).unwrap();
    let mut inst = start(&module, "ns.buffers");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    stream.request_body = b"hello".to_vec();
    stream.response_body = b"old response".to_vec();
    assert_eq!(
        inst.on_request_body(ctx, &mut stream, true).unwrap(),
        Action::Pause
    );
    assert_eq!(
        statuses(&stream),
        vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 8, 2]
    );
    assert_eq!(stream.request_body, b">>hello!");
    assert_eq!(stream.response_body, b"new");
    assert_eq!(stream.response_headers.get("got"), Some(&b"ell"[..]));
    assert_eq!(stream.response_headers.get("cfg"), Some(&b"{\"k\":1}"[..]));
}

const PROPS_WAT: &str = r#"
  (data (i32.const 0) "plugin_name")
  (data (i32.const 16) "request\00path")
  (data (i32.const 32) "source\00address")
  (data (i32.const 48) "source\00port")
  (data (i32.const 64) "no\00such")
  (data (i32.const 80) "my\00key")
  (data (i32.const 96) "value-1")
  (data (i32.const 112) "request.url_path")
  (data (i32.const 0x300) "p-name")
  (data (i32.const 0x310) "p-path")
  (data (i32.const 0x320) "p-src")
  (data (i32.const 0x330) "p-port")
  (data (i32.const 0x340) "p-extra")
  (data (i32.const 0x350) "p-url")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (call $get_prop (i32.const 0) (i32.const 11) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0x300) (i32.const 6))
    (call $rec (call $get_prop (i32.const 16) (i32.const 12) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0x310) (i32.const 6))
    (call $rec (call $get_prop (i32.const 32) (i32.const 14) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0x320) (i32.const 5))
    (call $rec (call $get_prop (i32.const 48) (i32.const 11) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0x330) (i32.const 6))
    (call $rec (call $get_prop (i32.const 112) (i32.const 16) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0x350) (i32.const 5))
    (call $rec (call $get_prop (i32.const 64) (i32.const 7) (i32.const 1024) (i32.const 1028)))
    ;; a value set by an earlier plugin of the chain, if any
    (if (i32.eqz (call $get_prop (i32.const 80) (i32.const 6) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x340) (i32.const 7))))
    (call $rec (call $set_prop (i32.const 80) (i32.const 6) (i32.const 96) (i32.const 7)))
    (call $report)
    (i32.const 0))
"#;

#[test]
fn properties_and_set_property_seen_by_next_plugin() {
    let engine = engine();
    let module = engine.compile(&wat_module(PROPS_WAT)).unwrap();
    let mut first = start(&module, "ns.first");
    let mut second = start(&module, "ns.second");
    let mut stream = request("/productpage?x=1");
    stream.properties.source = Some("10.1.2.3:4567".parse::<SocketAddr>().unwrap());

    let c1 = first.create_http_context().unwrap();
    first.on_request_headers(c1, &mut stream, true).unwrap();
    let h = &stream.response_headers;
    assert_eq!(h.get("p-name"), Some(&b"ns.first"[..]));
    assert_eq!(h.get("p-path"), Some(&b"/productpage?x=1"[..]));
    assert_eq!(h.get("p-src"), Some(&b"10.1.2.3:4567"[..]));
    assert_eq!(h.get("p-port"), Some(&4567i64.to_le_bytes()[..]));
    assert_eq!(h.get("p-url"), Some(&b"/productpage"[..]));
    assert_eq!(h.get("p-extra"), None);
    // The tenth status is the unknown property: NotFound.
    assert_eq!(statuses(&stream), vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(
        stream
            .properties
            .extra
            .get(&b"my\0key"[..])
            .map(Vec::as_slice),
        Some(&b"value-1"[..])
    );

    stream.response_headers.clear();
    let c2 = second.create_http_context().unwrap();
    second.on_request_headers(c2, &mut stream, true).unwrap();
    assert_eq!(
        stream.response_headers.get("p-name"),
        Some(&b"ns.second"[..])
    );
    assert_eq!(
        stream.response_headers.get("p-extra"),
        Some(&b"value-1"[..])
    );
    assert_eq!(
        statuses(&stream),
        vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    );
}

#[test]
fn logs_stdout_and_environ() {
    let body = r#"
  (data (i32.const 0) "hello from wasm")
  (data (i32.const 32) "out: part1")
  (data (i32.const 48) "part2\nrest")
  ;; iovecs at 256: (32, 10) (48, 6)
  (data (i32.const 256) "\20\00\00\00\0a\00\00\00\30\00\00\00\0a\00\00\00")
  (data (i32.const 0x300) "env")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (call $log (i32.const 2) (i32.const 0) (i32.const 15)))
    (call $rec (call $log (i32.const 9) (i32.const 0) (i32.const 15)))
    (call $rec (call $get_log_level (i32.const 1040)))
    (call $rec (i32.load (i32.const 1040)))
    (call $rec (call $fd_write (i32.const 1) (i32.const 256) (i32.const 2) (i32.const 1044)))
    (call $rec (i32.load (i32.const 1044)))
    (call $rec (call $fd_write (i32.const 5) (i32.const 256) (i32.const 2) (i32.const 1044)))
    (call $rec (call $env_sizes (i32.const 1048) (i32.const 1052)))
    (call $rec (i32.load (i32.const 1048)))
    (call $rec (i32.load (i32.const 1052)))
    (call $rec (call $env_get (i32.const 1100) (i32.const 1200)))
    (i32.store (i32.const 1024) (i32.load (i32.const 1100)))
    (i32.store (i32.const 1028) (i32.sub (i32.load (i32.const 1052)) (i32.const 1)))
    (call $hdr (i32.const 0x300) (i32.const 3))
    (call $rec (call $prestat (i32.const 3) (i32.const 1060)))
    (call $rec (call $clock (i32.const 0) (i64.const 1) (i32.const 1064)))
    (call $rec (i64.gt_u (i64.load (i32.const 1064)) (i64.const 1600000000000000000)))
    (call $rec (call $now (i32.const 1072)))
    (call $rec (i64.gt_u (i64.load (i32.const 1072)) (i64.const 1600000000000000000)))
    (call $rec (call $random (i32.const 1080) (i32.const 16)))
    (call $report)
    (i32.const 0))
"#;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let engine = engine();
    let module = engine.compile(&wat_module(body)).unwrap();
    tracing::subscriber::with_default(subscriber, || {
        let mut inst = start(&module, "ns.logger");
        let ctx = inst.create_http_context().unwrap();
        let mut stream = request("/");
        inst.on_request_headers(ctx, &mut stream, true).unwrap();
        assert_eq!(
            statuses(&stream),
            vec![0, 2, 0, 2, 0, 20, 8, 0, 1, 12, 0, 0, 8, 0, 1, 0, 1, 0]
        );
        assert_eq!(
            stream.response_headers.get("env"),
            Some(&b"GREETING=hi"[..])
        );
        drop(inst); // flushes the unfinished stdout line
    });
    let text = captured.text();
    assert!(text.contains("hello from wasm"), "{text}");
    assert!(text.contains("plugin=ns.logger"), "{text}");
    assert!(text.contains("out: part1part2"), "{text}");
    assert!(text.contains("rest"), "{text}");
    assert!(text.contains("waystone::wasm"), "{text}");
}

fn callback_module(vm_start: i32, configure: i32) -> Vec<u8> {
    wat_module(&format!(
        r#"
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const {vm_start}))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const {configure}))
"#
    ))
}

#[test]
fn configure_false_is_rejected_naming_the_plugin() {
    let engine = engine();
    let module = engine.compile(&callback_module(1, 0)).unwrap();
    let err = PluginInstance::start(&module, spec("ns.picky"))
        .err()
        .expect("rejected");
    assert!(
        matches!(&err, HostError::ConfigureRejected { plugin } if plugin == "ns.picky"),
        "{err}"
    );
    assert!(err.to_string().contains("ns.picky"));

    let module = engine.compile(&callback_module(0, 1)).unwrap();
    let err = PluginInstance::start(&module, spec("ns.vm"))
        .err()
        .expect("rejected");
    assert!(
        matches!(&err, HostError::VmStartRejected { plugin } if plugin == "ns.vm"),
        "{err}"
    );

    let module = engine.compile(&callback_module(1, 1)).unwrap();
    PluginInstance::start(&module, spec("ns.ok")).expect("accepted");
}

fn raw(text: &str) -> Vec<u8> {
    wat::parse_str(text).unwrap()
}

#[test]
fn abi_detection_and_required_exports() {
    let engine = engine();
    let err = engine
        .compile(&raw(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_9_9_9"))
                (func (export "proxy_on_context_create") (param i32 i32)))"#,
        ))
        .err()
        .unwrap();
    match &err {
        HostError::UnknownAbi { exports } => {
            assert!(exports.contains(&"proxy_abi_version_9_9_9".to_string()))
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("proxy_abi_version_9_9_9"));

    // 0.1.0 header callbacks take (ctx, n): the 0.2 signature is refused for them.
    let err = engine
        .compile(&raw(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_1_0"))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "malloc") (param i32) (result i32) (i32.const 0))
                (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0)))"#,
        ))
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::ExportSignature { export, expected, .. }
            if export == "proxy_on_request_headers" && expected == "(func (param i32 i32) (result i32))"),
        "{err}"
    );

    let err = engine
        .compile(&raw(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0"))
                (func (export "proxy_on_context_create") (param i32 i32)))"#,
        ))
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::MissingExport { export, .. } if export == "proxy_on_memory_allocate"),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "its exports are: [memory, proxy_abi_version_0_2_0, proxy_on_context_create]"
        ),
        "{err}"
    );

    let err = engine
        .compile(&raw(r#"(module (func (export "proxy_abi_version_0_2_0"))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#))
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::MissingExport { export, .. } if export == "memory"),
        "{err}"
    );

    let ok = engine
        .compile(&raw(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0"))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#,
        ))
        .unwrap();
    assert_eq!(ok.abi(), AbiVersion::V0_2_0);

    let err = engine
        .compile(&raw(
            r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
                (func (export "proxy_on_context_create") (param i32 i32))
                (func (export "malloc") (param i32) (result i32) (i32.const 0))
                (func (export "proxy_on_request_headers") (param i32 i32) (result i32) (i32.const 0)))"#,
        ))
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::ExportSignature { export, .. } if export == "proxy_on_request_headers"),
        "{err}"
    );

    assert!(matches!(
        engine.compile(b"not wasm"),
        Err(HostError::Compile { .. })
    ));
}

#[test]
fn unknown_and_mismatched_imports_are_named() {
    let engine = engine();
    let base = r#"(memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "malloc") (param i32) (result i32) (i32.const 0))"#;
    let err = engine
        .compile(&raw(&format!(
            r#"(module (import "env" "proxy_frobnicate" (func (param i32) (result i32)))
                (import "wasi_snapshot_preview1" "sock_accept" (func (param i32 i32 i32) (result i32))) {base})"#
        )))
        .err()
        .unwrap();
    match &err {
        HostError::UnknownImport { module, name } => {
            assert_eq!(module, "env");
            assert!(name.contains("proxy_frobnicate"), "{name}");
            assert!(name.contains("sock_accept"), "{name}");
        }
        other => panic!("unexpected {other}"),
    }

    let err = engine
        .compile(&raw(&format!(
            r#"(module (import "env" "proxy_log" (func (param i32) (result i32))) {base})"#
        )))
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::ImportMismatch { name, .. } if name == "proxy_log"),
        "{err}"
    );
}

#[test]
fn infinite_loop_hits_the_deadline_and_poisons() {
    let engine = engine_with(64 << 20, Duration::from_millis(100));
    let module = engine
        .compile(&wat_module(
            r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (loop $l (br $l)) (i32.const 0))"#,
        ))
        .unwrap();
    let mut inst = start(&module, "ns.spin");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    let began = Instant::now();
    let err = inst.on_request_headers(ctx, &mut stream, true).unwrap_err();
    let took = began.elapsed();
    assert!(
        matches!(&err, HostError::DeadlineExceeded { plugin, callback: "proxy_on_request_headers", .. } if plugin == "ns.spin"),
        "{err}"
    );
    assert!(
        took >= Duration::from_millis(90),
        "stopped too early: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "deadline not enforced in bounds: {took:?}"
    );
    assert!(inst.is_poisoned());
    // The stream came back despite the fault.
    assert_eq!(stream.request_headers.get(":path"), Some(&b"/"[..]));
    let err = inst.on_request_headers(ctx, &mut stream, true).unwrap_err();
    assert!(matches!(err, HostError::Poisoned { .. }), "{err}");
    assert!(matches!(
        inst.create_http_context(),
        Err(HostError::Poisoned { .. })
    ));
}

#[test]
fn memory_growth_beyond_the_cap_faults() {
    let engine = engine_with(1 << 20, Duration::from_secs(1));
    let module = engine
        .compile(&wat_module(
            r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (drop (memory.grow (i32.const 64))) (i32.const 0))"#,
        ))
        .unwrap();
    let mut inst = start(&module, "ns.hungry");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    let err = inst.on_request_headers(ctx, &mut stream, true).unwrap_err();
    assert!(
        matches!(&err, HostError::MemoryLimit { plugin, limit_bytes: 1048576, .. } if plugin == "ns.hungry"),
        "{err}"
    );
    assert!(inst.is_poisoned());
}

#[test]
fn initial_memory_beyond_the_cap_fails_to_start() {
    let engine = engine_with(128 * 1024, Duration::from_secs(1));
    let module = engine.compile(&wat_module("")).unwrap();
    let err = PluginInstance::start(&module, spec("ns.big"))
        .err()
        .expect("refused");
    assert!(matches!(err, HostError::MemoryLimit { .. }), "{err}");
}

#[test]
fn traps_and_proc_exit_poison_and_keep_stream_changes() {
    let engine = engine();
    let module = engine
        .compile(&wat_module(
            r#"(data (i32.const 0) "x-before") (data (i32.const 16) "1")
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (drop (call $add_hv (i32.const 0) (i32.const 0) (i32.const 8) (i32.const 16) (i32.const 1)))
                 (unreachable))
               (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
                 (call $exit (i32.const 3)) (i32.const 0))"#,
        ))
        .unwrap();
    let mut inst = start(&module, "ns.trap");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    let err = inst.on_request_headers(ctx, &mut stream, true).unwrap_err();
    assert!(
        matches!(&err, HostError::Trap { plugin, callback: "proxy_on_request_headers", .. } if plugin == "ns.trap"),
        "{err}"
    );
    assert_eq!(stream.request_headers.get("x-before"), Some(&b"1"[..]));
    assert!(inst.is_poisoned());

    let mut inst = start(&module, "ns.exit");
    let ctx = inst.create_http_context().unwrap();
    let err = inst
        .on_response_headers(ctx, &mut stream, true)
        .unwrap_err();
    assert!(err.to_string().contains("proc_exit(3)"), "{err}");
    assert!(inst.is_poisoned());
}

#[test]
fn bad_pointers_get_invalid_memory_access() {
    // -16 = 0xfffffff0: far past the 256 KiB memory; 0x3ffff: one byte before its end.
    let body = r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $bad i32) (local $edge i32)
    (local.set $bad (i32.const -16))
    (local.set $edge (i32.const 0x3ffff))
    (call $rec (call $log (i32.const 2) (local.get $bad) (i32.const 4)))
    (call $rec (call $log (i32.const 2) (i32.const 0) (i32.const -1)))
    (call $rec (call $get_log_level (local.get $edge)))
    (call $rec (call $now (local.get $bad)))
    (call $rec (call $get_hv (i32.const 0) (local.get $bad) (i32.const 4) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $get_hv (i32.const 0) (i32.const 0) (i32.const 0) (local.get $bad) (i32.const 1028)))
    (call $rec (call $add_hv (i32.const 0) (i32.const 0) (i32.const 4) (local.get $bad) (i32.const 4)))
    (call $rec (call $rep_hv (i32.const 0) (local.get $bad) (i32.const 4) (i32.const 0) (i32.const 4)))
    (call $rec (call $rem_hv (i32.const 0) (local.get $bad) (i32.const 4)))
    (call $rec (call $get_pairs (i32.const 0) (i32.const 1024) (local.get $edge)))
    (call $rec (call $set_pairs (i32.const 0) (local.get $bad) (i32.const 16)))
    (call $rec (call $map_size (i32.const 0) (local.get $bad)))
    (call $rec (call $send (i32.const 403) (local.get $bad) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const -1)))
    (call $rec (call $send (i32.const 403) (i32.const 0) (i32.const 0) (local.get $bad) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const -1)))
    (call $rec (call $get_buf (i32.const 0) (i32.const 0) (i32.const 10) (local.get $bad) (i32.const 1028)))
    (call $rec (call $set_buf (i32.const 0) (i32.const 0) (i32.const 0) (local.get $bad) (i32.const 2)))
    (call $rec (call $buf_status (i32.const 0) (local.get $bad) (i32.const 1032)))
    (call $rec (call $get_prop (local.get $bad) (i32.const 4) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $set_prop (i32.const 0) (i32.const 4) (local.get $bad) (i32.const 4)))
    (call $rec (call $get_shared (local.get $bad) (i32.const 4) (i32.const 1024) (i32.const 1028) (i32.const 1032)))
    (call $rec (call $set_shared (i32.const 0) (i32.const 4) (local.get $bad) (i32.const 4) (i32.const 0)))
    (call $rec (call $reg_q (local.get $bad) (i32.const 4) (i32.const 1024)))
    (call $rec (call $reg_q (i32.const 0) (i32.const 4) (local.get $bad)))
    (call $rec (call $res_q (local.get $bad) (i32.const 2) (i32.const 0) (i32.const 4) (i32.const 1024)))
    (call $rec (call $enq (i32.const 1) (local.get $bad) (i32.const 4)))
    (call $rec (call $deq (i32.const 1) (local.get $bad) (i32.const 1028)))
    (call $rec (call $def_metric (i32.const 0) (local.get $bad) (i32.const 4) (i32.const 1024)))
    (call $rec (call $get_metric (i32.const 1) (local.get $bad)))
    (call $rec (call $get_status (local.get $bad) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $http_call (local.get $bad) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 1024)))
    (call $rec (call $ffi (local.get $bad) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 1024) (i32.const 1028)))
    ;; WASI answers EFAULT (21)
    (call $rec (call $fd_write (i32.const 1) (local.get $bad) (i32.const 1) (i32.const 1044)))
    (call $rec (call $env_get (local.get $bad) (i32.const 1200)))
    (call $rec (call $env_sizes (local.get $bad) (i32.const 1052)))
    (call $rec (call $random (local.get $edge) (i32.const 2)))
    (call $rec (call $clock (i32.const 0) (i64.const 1) (local.get $bad)))
    (call $report)
    (i32.const 0))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module(body)).unwrap();
    let mut inst = start(&module, "ns.hostile");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    let got = statuses(&stream);
    let (proxy, wasi) = got.split_at(got.len() - 5);
    assert_eq!(
        proxy,
        vec![6u8; proxy.len()].as_slice(),
        "proxy statuses {proxy:?}"
    );
    assert_eq!(wasi, &[21u8; 5], "wasi errnos {wasi:?}");
    assert!(!inst.is_poisoned());
    // Nothing was stored through the bad calls.
    assert_eq!(stream.request_headers.len(), 3);
}

#[test]
fn shared_data_queues_metrics_and_unsupported_calls() {
    let body = r#"
  (data (i32.const 0) "key")
  (data (i32.const 8) "v1")
  (data (i32.const 16) "hits")
  (data (i32.const 24) "vm")
  (data (i32.const 32) "q")
  (data (i32.const 0x300) "shared")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (call $get_shared (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028) (i32.const 1032)))
    (call $rec (call $set_shared (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 2) (i32.const 0)))
    (call $rec (call $get_shared (i32.const 0) (i32.const 3) (i32.const 1024) (i32.const 1028) (i32.const 1032)))
    (call $hdr (i32.const 0x300) (i32.const 6))
    ;; stale cas
    (call $rec (call $set_shared (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 2)
      (i32.add (i32.load (i32.const 1032)) (i32.const 1000))))
    (call $rec (call $set_shared (i32.const 0) (i32.const 3) (i32.const 8) (i32.const 2) (i32.load (i32.const 1032))))
    (call $rec (call $reg_q (i32.const 32) (i32.const 1) (i32.const 1040)))
    (call $rec (call $res_q (i32.const 24) (i32.const 2) (i32.const 32) (i32.const 1) (i32.const 1044)))
    (call $rec (i32.eq (i32.load (i32.const 1040)) (i32.load (i32.const 1044))))
    (call $rec (call $deq (i32.load (i32.const 1040)) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $enq (i32.load (i32.const 1040)) (i32.const 8) (i32.const 2)))
    (call $rec (call $deq (i32.load (i32.const 1040)) (i32.const 1024) (i32.const 1028)))
    (call $rec (i32.load (i32.const 1028)))
    (call $rec (call $def_metric (i32.const 0) (i32.const 16) (i32.const 4) (i32.const 1048)))
    (call $rec (call $inc_metric (i32.load (i32.const 1048)) (i64.const 3)))
    (call $rec (call $get_metric (i32.load (i32.const 1048)) (i32.const 1056)))
    (call $rec (i32.wrap_i64 (i64.load (i32.const 1056))))
    (call $rec (call $get_metric (i32.const 999) (i32.const 1056)))
    (call $rec (call $http_call (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 1024)))
    (call $rec (call $ffi (i32.const 0) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 1024) (i32.const 1028)))
    (call $rec (call $get_status (i32.const 1024) (i32.const 1028) (i32.const 1032)))
    (call $rec (call $continue (i32.const 1)))
    (call $rec (call $close (i32.const 0)))
    (call $rec (call $tick (i32.const 250)))
    (call $report)
    (i32.const 0))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module(body)).unwrap();
    let mut inst = start(&module, "ns.shared");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request("/");
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    assert_eq!(
        statuses(&stream),
        vec![
            1, 0, 0, 0, 8, 0, 0, 0, 1, 7, 0, 0, 2, 0, 0, 0, 3, 1, 2, 1, 0, 0, 0, 0
        ]
    );
    assert_eq!(stream.response_headers.get("shared"), Some(&b"v1"[..]));
    assert_eq!(stream.continue_requested, Some(StreamType::Response));
    assert_eq!(inst.take_close_request(), Some(StreamType::Request));
    assert_eq!(inst.tick_period_ms(), 250);
    let metrics = engine.metrics_snapshot();
    assert_eq!(metrics.len(), 1);
    assert_eq!(metrics[0].name, "hits");
    assert_eq!(metrics[0].value, waystone_wasm::MetricValue::Counter(3));
}

#[test]
fn unknown_context_ids_are_refused() {
    let engine = engine();
    let module = engine.compile(&wat_module(HEADERS_WAT)).unwrap();
    let mut inst = start(&module, "ns.ctx");
    let mut stream = request("/");
    let err = inst.on_request_headers(42, &mut stream, true).unwrap_err();
    assert!(
        matches!(err, HostError::UnknownContext { context: 42, .. }),
        "{err}"
    );
    let ctx = inst.create_http_context().unwrap();
    inst.finish_http_context(ctx, &mut stream).unwrap();
    assert!(matches!(
        inst.finish_http_context(ctx, &mut stream),
        Err(HostError::UnknownContext { .. })
    ));
    assert_eq!(inst.live_contexts(), 1);
    assert!(!inst.is_poisoned());
}

#[test]
fn compiled_module_and_engine_are_shareable() {
    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}
    assert_send_sync::<waystone_wasm::CompiledModule>();
    assert_send_sync::<waystone_wasm::WasmEngine>();
    assert_send::<PluginInstance>();

    let engine = engine();
    let module = engine.compile(&wat_module(HEADERS_WAT)).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let module = module.clone();
            std::thread::spawn(move || {
                let mut inst = start(&module, &format!("ns.t{i}"));
                let ctx = inst.create_http_context().unwrap();
                let mut stream = request("/");
                inst.on_request_headers(ctx, &mut stream, true).unwrap();
                stream.response_headers.get("x-b").map(<[u8]>::to_vec)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Some(b"1".to_vec()));
    }
}
