//! ABI 0.1.0, streamed bodies, L4 (network) contexts and Envoy's property vocabulary.

mod common;

use std::net::SocketAddr;

use common::*;
use waystone_wasm::{
    AbiVersion, Action, HostError, HttpStream, NetworkStream, PeerType, StreamType,
};

fn request() -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", "/a?b");
    s.request_headers.add(":authority", "example.com");
    s
}

const V010_WAT: &str = r#"(module
  (import "env" "proxy_continue_request" (func $cont_req (result i32)))
  (import "env" "proxy_continue_response" (func $cont_resp (result i32)))
  (import "env" "proxy_clear_route_cache" (func $clear (result i32)))
  (import "env" "proxy_get_configuration" (func $get_cfg (param i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 4096))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (func (export "proxy_abi_version_0_1_0"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (data (i32.const 0) "x-n")
  (data (i32.const 16) "x-cfg")
  (data (i32.const 32) "x-clear")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
    (i32.store8 (i32.const 100) (i32.add (i32.const 48) (local.get $n)))
    (drop (call $add_hv (i32.const 0) (i32.const 0) (i32.const 3) (i32.const 100) (i32.const 1)))
    (drop (call $get_cfg (i32.const 200) (i32.const 204)))
    (drop (call $add_hv (i32.const 0) (i32.const 16) (i32.const 5) (i32.load (i32.const 200)) (i32.load (i32.const 204))))
    (i32.store8 (i32.const 101) (i32.add (i32.const 48) (call $clear)))
    (drop (call $add_hv (i32.const 0) (i32.const 32) (i32.const 7) (i32.const 101) (i32.const 1)))
    (drop (call $cont_req))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (result i32)
    (drop (call $cont_resp))
    (i32.const 0)))"#;

#[test]
fn abi_0_1_0_modules_run_with_their_own_signatures() {
    let engine = engine();
    let module = engine.compile(&wat::parse_str(V010_WAT).unwrap()).unwrap();
    assert_eq!(module.abi(), AbiVersion::V0_1_0);
    let mut inst = start(&module, "ns.old");
    assert_eq!(inst.abi(), AbiVersion::V0_1_0);
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    assert_eq!(
        inst.on_request_headers(ctx, &mut stream, true).unwrap(),
        Action::Pause
    );
    assert_eq!(stream.request_headers.get("x-n"), Some(&b"3"[..]));
    assert_eq!(stream.request_headers.get("x-cfg"), Some(&b"{\"k\":1}"[..]));
    assert_eq!(stream.request_headers.get("x-clear"), Some(&b"0"[..]));
    assert_eq!(stream.continue_requested.take(), Some(StreamType::Request));
    inst.on_response_headers(ctx, &mut stream, true).unwrap();
    assert_eq!(stream.continue_requested, Some(StreamType::Response));
    inst.finish_http_context(ctx, &mut stream).unwrap();
}

#[test]
fn host_functions_of_another_abi_version_are_refused_at_load() {
    let engine = engine();
    let text = V010_WAT.replace("proxy_continue_request", "proxy_continue_stream");
    let text = text.replace(
        "(func $cont_req (result i32))",
        "(func $cont_req (param i32) (result i32))",
    );
    let text = text.replace("(call $cont_req)", "(call $cont_req (i32.const 0))");
    let err = engine
        .compile(&wat::parse_str(&text).unwrap())
        .err()
        .unwrap();
    assert!(
        matches!(&err, HostError::ImportNotInAbi { name, abi: AbiVersion::V0_1_0 } if name == "proxy_continue_stream"),
        "{err}"
    );
    let modern = format!(
        "(module (import \"env\" \"proxy_continue_request\" (func (result i32))) {PRELUDE} (func (export \"proxy_abi_version_0_2_1\")))"
    );
    let err = engine
        .compile(&wat::parse_str(&modern).unwrap())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("ABI 0.2.1 but imports `env::proxy_continue_request`"),
        "{err}"
    );
}

#[test]
fn pause_on_a_body_buffers_until_end_of_stream() {
    let body = r#"
  (data (i32.const 0) "x-body")
  (data (i32.const 8) "x-calls")
  (global $calls (mut i32) (i32.const 48))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 1))))
    (drop (call $get_buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
    (call $hdr (i32.const 0) (i32.const 6))
    (i32.store8 (i32.const 1100) (global.get $calls))
    (drop (call $add_hv (i32.const 2) (i32.const 8) (i32.const 7) (i32.const 1100) (i32.const 1)))
    (i32.const 0))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module2(body)).unwrap();
    let mut inst = start(&module, "ns.body");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    // The embedder appends each chunk and keeps what a paused plugin held back.
    for (chunk, eos, expected) in [
        (&b"ab"[..], false, Action::Pause),
        (b"cd", false, Action::Pause),
        (b"e", true, Action::Continue),
    ] {
        stream.request_body.extend_from_slice(chunk);
        assert_eq!(
            inst.on_request_body(ctx, &mut stream, eos).unwrap(),
            expected
        );
    }
    assert_eq!(stream.response_headers.get("x-body"), Some(&b"abcde"[..]));
    assert_eq!(stream.response_headers.get("x-calls"), Some(&b"3"[..]));
}

const L4_WAT: &str = r#"
  (data (i32.const 0) "> ")
  (data (i32.const 8) "UP")
  (data (i32.const 16) "conns")
  (data (i32.const 32) "down_peer")
  (data (i32.const 48) "up_peer")
  (data (i32.const 64) "source\00port")
  (data (i32.const 80) "port")
  (data (i32.const 96) "closed")
  (func (export "proxy_on_new_connection") (param $ctx i32) (result i32)
    (call $count (i32.const 16) (i32.const 5))
    (if (i32.eqz (call $get_prop (i32.const 64) (i32.const 11) (i32.const 1024) (i32.const 1028)))
      (then (call $add (i32.const 80) (i32.const 4) (i64.load (i32.load (i32.const 1024))))))
    (i32.const 0))
  (func (export "proxy_on_downstream_data") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (drop (call $set_buf (i32.const 2) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 2)))
    (i32.const 0))
  (func (export "proxy_on_upstream_data") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (drop (call $set_buf (i32.const 3) (i32.const 0) (local.get $size) (i32.const 8) (i32.const 2)))
    (if (local.get $eos) (then (drop (call $close (i32.const 2)))))
    (i32.const 0))
  (func (export "proxy_on_downstream_connection_close") (param $ctx i32) (param $peer i32)
    (call $add (i32.const 32) (i32.const 9) (i64.extend_i32_u (local.get $peer))))
  (func (export "proxy_on_upstream_connection_close") (param $ctx i32) (param $peer i32)
    (call $add (i32.const 48) (i32.const 7) (i64.extend_i32_u (local.get $peer))))
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    (call $count (i32.const 96) (i32.const 6))
    (i32.const 1))
"#;

#[test]
fn network_contexts_see_and_change_both_directions() {
    let engine = engine();
    let module = engine.compile(&wat_module2(L4_WAT)).unwrap();
    let mut inst = start(&module, "ns.tcp");
    let ctx = inst.create_network_context().unwrap();
    let mut conn = NetworkStream::default();
    conn.properties.source = Some("127.0.0.1:5000".parse::<SocketAddr>().unwrap());
    assert_eq!(
        inst.on_new_connection(ctx, &mut conn).unwrap(),
        Action::Continue
    );
    assert_eq!(metric(&engine, "conns"), 1);
    assert_eq!(metric(&engine, "port"), 5000);

    conn.downstream_data = b"hello".to_vec();
    inst.on_downstream_data(ctx, &mut conn, false).unwrap();
    assert_eq!(conn.downstream_data, b"> hello");
    conn.upstream_data = b"response".to_vec();
    inst.on_upstream_data(ctx, &mut conn, true).unwrap();
    assert_eq!(conn.upstream_data, b"UP");
    assert_eq!(conn.close_requested, Some(StreamType::Downstream));

    inst.on_downstream_connection_close(ctx, PeerType::Remote, &mut conn)
        .unwrap();
    inst.on_upstream_connection_close(ctx, PeerType::Local, &mut conn)
        .unwrap();
    assert_eq!(metric(&engine, "down_peer"), 2);
    assert_eq!(metric(&engine, "up_peer"), 1);
    inst.finish_network_context(ctx, &mut conn).unwrap();
    assert_eq!(metric(&engine, "closed"), 1);
    assert_eq!(inst.live_contexts(), 1);
}

#[test]
fn envoy_property_vocabulary_and_encodings() {
    let paths: &[(&str, &str)] = &[
        ("p-dur", "request\\00duration"),
        ("p-size", "request\\00size"),
        ("p-tsize", "request\\00total_size"),
        ("p-details", "response\\00code_details"),
        ("p-flags", "response\\00flags"),
        ("p-rsize", "response\\00size"),
        ("p-grpc", "response\\00grpc_status"),
        ("p-up", "upstream\\00address"),
        ("p-upport", "upstream\\00port"),
        ("p-mtls", "connection\\00mtls"),
        ("p-xds", "xds\\00cluster_name"),
        ("p-root", "plugin_root_id"),
        ("p-vm", "plugin_vm_id"),
        ("p-node", "node\\00cluster"),
        ("p-fs", "filter_state\\00wasm.mine"),
        ("p-connid", "connection\\00id"),
    ];
    let mut body = String::from(
        r#"(data (i32.const 0x7f0) "mine") (data (i32.const 0x7f8) "v")
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $set_prop (i32.const 0x7f0) (i32.const 4) (i32.const 0x7f8) (i32.const 1)))
"#,
    );
    let mut data = String::new();
    for (i, (name, path)) in paths.iter().enumerate() {
        let key_at = 0x300 + i * 16;
        let path_at = 0x1000 + i * 32;
        let path_len = path.replace("\\00", "\0").len();
        data.push_str(&format!(
            "(data (i32.const {key_at}) \"{name}\") (data (i32.const {path_at}) \"{path}\")\n"
        ));
        body.push_str(&format!(
            "(if (i32.eqz (call $get_prop (i32.const {path_at}) (i32.const {path_len}) (i32.const 1024) (i32.const 1028)))
               (then (call $hdr (i32.const {key_at}) (i32.const {}))))\n",
            name.len()
        ));
    }
    body.push_str("(i32.const 0))\n");
    let engine = engine();
    let module = engine
        .compile(&wat_module2(&format!("{data}{body}")))
        .unwrap();
    let mut inst = start(&module, "ns.props");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    stream.properties.start_time = Some(std::time::SystemTime::now());
    stream.properties.upstream = Some("10.0.0.7:9080".parse().unwrap());
    stream.properties.response_code_details = "via_upstream".into();
    stream.properties.cluster_name = "outbound|9080||reviews.default.svc.cluster.local".into();
    stream.properties.node_cluster = "waystone".into();
    stream.properties.connection_id = 42;
    stream.request_body_bytes = 11;
    stream.response_body_bytes = 7;
    stream.response_headers.add(":status", "200");
    stream.response_trailers.add("grpc-status", "3");
    inst.on_response_headers(ctx, &mut stream, false).unwrap();
    let h = |name: &str| {
        stream
            .response_headers
            .get(name)
            .unwrap_or_else(|| panic!("property for {name} missing"))
            .to_vec()
    };
    let int = |name: &str| i64::from_le_bytes(h(name).try_into().expect("8 bytes"));
    assert!(int("p-dur") >= 0);
    assert_eq!(int("p-size"), 11);
    // header bytes (:method GET :path /a?b :authority example.com) + body
    assert_eq!(int("p-tsize"), (7 + 3 + 5 + 4 + 10 + 11 + 11) as i64);
    assert_eq!(h("p-details"), b"via_upstream");
    assert_eq!(int("p-flags"), 0);
    assert_eq!(int("p-rsize"), 7);
    assert_eq!(int("p-grpc"), 3);
    assert_eq!(h("p-up"), b"10.0.0.7:9080");
    assert_eq!(int("p-upport"), 9080);
    assert_eq!(h("p-mtls"), vec![0]);
    assert_eq!(
        h("p-xds"),
        b"outbound|9080||reviews.default.svc.cluster.local"
    );
    assert_eq!(h("p-root"), b"root");
    assert_eq!(h("p-vm"), b"vm");
    assert_eq!(h("p-node"), b"waystone");
    assert_eq!(h("p-fs"), b"v");
    assert_eq!(int("p-connid"), 42);
}
