//! The upstream's response head reaches the plugins unconverted and is converted only when
//! one of them looks at it: whatever callback looks first (the headers callback, a body
//! callback, `proxy_on_log`) and however it looks (a header, all pairs, a `response.*`
//! property), it sees the head the upstream sent, and the count the headers callback was
//! given matches what it can read. A chain that never looks forwards the head untouched.

mod support;

use std::time::Duration;

/// The plugin; its behaviour is chosen by the second byte of `:path`:
/// - `c`: the headers callback reads all response pairs and adds `x-count: same` when their
///   number is the count it was given (`diff` otherwise);
/// - `b`: the body callback replaces the body with response header `x-served-by`;
/// - `p`: the body callback replaces the body with property `response.headers.x-served-by`;
/// - `l`: `proxy_on_log` keeps response header `x-served-by` in shared data `seen`;
/// - `r`: the headers callback adds `x-seen` with what shared data `seen` holds;
/// - anything else: the plugin looks at nothing of the response.
///
/// A lookup that fails writes `missing` instead.
fn plugin() -> Vec<u8> {
    let basics = support::GUEST_BASICS;
    let wat = format!(
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_hv (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $bump (mut i32) (i32.const 65536))
  (global $mode (mut i32) (i32.const 0))
  {basics}
  (data (i32.const 0) ":path")
  (data (i32.const 16) "x-served-by")
  (data (i32.const 32) "x-count")
  (data (i32.const 48) "same")
  (data (i32.const 56) "diff")
  (data (i32.const 64) "response\00headers\00x-served-by")
  (data (i32.const 100) "seen")
  (data (i32.const 112) "x-seen")
  (data (i32.const 128) "missing")
  ;; Lookups answer through 200 (pointer) and 204 (size); 208 takes a CAS.
  (func $served_by (result i32)
    (call $get_hv (i32.const 2) (i32.const 16) (i32.const 11) (i32.const 200) (i32.const 204)))
  (func $missing
    (i32.store (i32.const 200) (i32.const 128))
    (i32.store (i32.const 204) (i32.const 7)))
  (func $replace_body (param $size i32)
    (drop (call $set_buffer (i32.const 1) (i32.const 0) (local.get $size)
      (i32.load (i32.const 200)) (i32.load (i32.const 204)))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $mode (i32.const 0))
    (if (i32.eqz (call $get_hv (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 200) (i32.const 204)))
      (then (global.set $mode (i32.load8_u (i32.add (i32.load (i32.const 200)) (i32.const 1))))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param i32) (result i32)
    ;; c
    (if (i32.eq (global.get $mode) (i32.const 99))
      (then
        (drop (call $get_pairs (i32.const 2) (i32.const 200) (i32.const 204)))
        (if (i32.eq (i32.load (i32.load (i32.const 200))) (local.get $n))
          (then (drop (call $add_hv (i32.const 2) (i32.const 32) (i32.const 7) (i32.const 48) (i32.const 4))))
          (else (drop (call $add_hv (i32.const 2) (i32.const 32) (i32.const 7) (i32.const 56) (i32.const 4)))))))
    ;; r
    (if (i32.eq (global.get $mode) (i32.const 114))
      (then
        (if (call $get_shared (i32.const 100) (i32.const 4) (i32.const 200) (i32.const 204) (i32.const 208))
          (then (call $missing)))
        (drop (call $add_hv (i32.const 2) (i32.const 112) (i32.const 6)
          (i32.load (i32.const 200)) (i32.load (i32.const 204))))))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.eqz (local.get $eos)) (then (return (i32.const 0))))
    ;; b
    (if (i32.eq (global.get $mode) (i32.const 98))
      (then
        (if (call $served_by) (then (call $missing)))
        (call $replace_body (local.get $size))))
    ;; p
    (if (i32.eq (global.get $mode) (i32.const 112))
      (then
        (if (call $get_property (i32.const 64) (i32.const 28) (i32.const 200) (i32.const 204))
          (then (call $missing)))
        (call $replace_body (local.get $size))))
    (i32.const 0))
  (func (export "proxy_on_log") (param i32)
    ;; l
    (if (i32.eq (global.get $mode) (i32.const 108))
      (then
        (if (call $served_by) (then (call $missing)))
        (drop (call $set_shared (i32.const 100) (i32.const 4)
          (i32.load (i32.const 200)) (i32.load (i32.const 204)) (i32.const 0))))))
)"#
    );
    wat::parse_str(&wat).unwrap_or_else(|e| panic!("{e}\n{wat}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_the_upstream_head_from_any_callback_and_an_unread_one_passes_as_sent() {
    let ip = support::net(0);
    let backend = support::Backend::start(ip).await;
    let engine = support::engine(Duration::from_secs(1), 64 << 20);
    let module = support::compile(&engine, &plugin());
    let rt = support::runtime(
        &support::manifests(backend.addr, &[("gw", 18290, Some(("FAIL_CLOSE", "{}")))]),
        |_| module.clone(),
    );
    let dp = support::dataplane(ip, 1).await;
    let addr = support::apply(&dp, rt, "gw").await;
    let c = support::client();

    // Nobody looks: the head goes out as the backend sent it.
    let a = support::send(&c, addr, "/n", &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-served-by"), Some("backend"));
    assert_eq!(a.header("content-length"), Some("6"));
    assert_eq!(a.body, "GET /n");

    // The count the headers callback is given is what it then reads.
    let a = support::send(&c, addr, "/c", &[]).await;
    assert_eq!(a.header("x-count"), Some("same"), "{a:?}");
    assert_eq!(a.header("x-served-by"), Some("backend"));

    // First looked at from the body callback, by header and by property.
    let a = support::send(&c, addr, "/b", &[]).await;
    assert_eq!(a.body, "backend", "{a:?}");
    let a = support::send(&c, addr, "/p", &[]).await;
    assert_eq!(a.body, "backend", "{a:?}");

    // First looked at from proxy_on_log, after the response is built: the next request
    // reports what it saw.
    let a = support::send(&c, addr, "/l", &[]).await;
    assert_eq!(a.body, "GET /l");
    let a = support::send(&c, addr, "/r", &[]).await;
    assert_eq!(a.header("x-seen"), Some("backend"), "{a:?}");
    dp.shutdown(Duration::from_secs(2)).await;
}
