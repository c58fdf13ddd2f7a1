//! HTTP and gRPC callouts: queued for the embedder, answered through the delivery APIs.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use waystone_wasm::{Action, GrpcCommand, GrpcTarget, HeaderMap, HttpCallResponse, HttpStream};

fn request() -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", "/");
    s.request_headers.add(":authority", "example.com");
    s
}

fn http_call_wat() -> String {
    let headers = serialize(&[
        (":method", b"POST"),
        (":path", b"/ratings"),
        (":authority", b"reviews"),
        ("x-from", b"plugin"),
    ]);
    let trailers = serialize(&[("x-t", b"1")]);
    format!(
        r#"
  (data (i32.const 0) "reviews:9080")
  (data (i32.const 16) "nope")
  (data (i32.const 0x1000) "{h}")
  (data (i32.const 0x1200) "{t}")
  (data (i32.const 0x1300) "ping")
  (data (i32.const 0x300) ":status")
  (data (i32.const 0x310) "x-status")
  (data (i32.const 0x320) "x-body")
  (data (i32.const 0x330) "grpc-status")
  (data (i32.const 0x340) "x-trailer")
  (data (i32.const 0x350) "x-message")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    ;; unknown upstream, then missing pseudo-headers: BadArgument
    (call $rec (call $http_call (i32.const 16) (i32.const 4) (i32.const 0x1000) (i32.const {hl})
      (i32.const 0x1300) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 1040)))
    (call $rec (call $http_call (i32.const 0) (i32.const 12) (i32.const 0) (i32.const 0)
      (i32.const 0x1300) (i32.const 4) (i32.const 0) (i32.const 0) (i32.const 500) (i32.const 1040)))
    (call $rec (call $http_call (i32.const 0) (i32.const 12) (i32.const 0x1000) (i32.const {hl})
      (i32.const 0x1300) (i32.const 4) (i32.const 0x1200) (i32.const {tl}) (i32.const 500) (i32.const 1040)))
    (call $rec (i32.load (i32.const 1040)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
    (call $rec (local.get $token))
    (call $rec (local.get $nh))
    (call $rec (local.get $bs))
    (call $rec (local.get $nt))
    (if (i32.eqz (call $get_hv (i32.const 6) (i32.const 0x300) (i32.const 7) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x310) (i32.const 8))))
    (if (local.get $bs) (then
      (if (i32.eqz (call $get_buf (i32.const 4) (i32.const 0) (local.get $bs) (i32.const 1024) (i32.const 1028)))
        (then (call $hdr (i32.const 0x320) (i32.const 6))))))
    (if (i32.eqz (call $get_hv (i32.const 7) (i32.const 0x330) (i32.const 11) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x340) (i32.const 9))))
    (call $rec (call $get_status (i32.const 1048) (i32.const 1024) (i32.const 1028)))
    (call $rec (i32.load (i32.const 1048)))
    (if (i32.load (i32.const 1028)) (then (call $hdr (i32.const 0x350) (i32.const 9))))
    (call $rec (call $continue (i32.const 0)))
    (call $report))
"#,
        h = wat_bytes(&headers),
        hl = headers.len(),
        t = wat_bytes(&trailers),
        tl = trailers.len()
    )
}

#[test]
fn http_call_is_queued_and_its_response_readable_through_maps_6_7_and_buffer_4() {
    let engine = engine();
    let module = engine.compile(&wat_module2(&http_call_wat())).unwrap();
    let mut inst = start(&module, "ns.callout");
    inst.set_upstream_check(Arc::new(|u: &str| u != "nope"));
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    assert_eq!(
        inst.on_request_headers(ctx, &mut stream, true).unwrap(),
        Action::Pause
    );
    let calls = inst.take_callouts();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.upstream, "reviews:9080");
    assert_eq!(call.context_id, ctx);
    assert_eq!(call.body, b"ping");
    assert_eq!(call.timeout, Duration::from_millis(500));
    assert_eq!(
        call.headers,
        vec![
            (":method".to_string(), b"POST".to_vec()),
            (":path".to_string(), b"/ratings".to_vec()),
            (":authority".to_string(), b"reviews".to_vec()),
            ("x-from".to_string(), b"plugin".to_vec()),
        ]
    );
    assert_eq!(call.trailers, vec![("x-t".to_string(), b"1".to_vec())]);
    assert_eq!(inst.callout_context(call.token), Some(ctx));

    let mut response = HttpCallResponse::default();
    response.headers.add(":status", "201");
    response.headers.add("content-type", "text/plain");
    response.body = b"pong!".to_vec();
    response.trailers.add("grpc-status", "0");
    assert!(
        inst.on_http_call_response(call.token, Some(response), Some(&mut stream))
            .unwrap()
    );
    // statuses: 2, 2, 0, token; then token, 2 headers, 5 body bytes, 1 trailer, three $hdr adds,
    // get_status Ok with code 0, continue Ok.
    assert_eq!(
        statuses(&stream),
        vec![
            2,
            2,
            0,
            call.token as u8,
            call.token as u8,
            2,
            5,
            1,
            0,
            0,
            0,
            0,
            0,
            0
        ]
    );
    assert_eq!(stream.response_headers.get("x-status"), Some(&b"201"[..]));
    assert_eq!(stream.response_headers.get("x-body"), Some(&b"pong!"[..]));
    assert_eq!(stream.response_headers.get("x-trailer"), Some(&b"0"[..]));
    assert_eq!(
        stream.continue_requested,
        Some(waystone_wasm::StreamType::Request)
    );
    // Answered: the token is gone, a second answer is not delivered.
    assert_eq!(inst.callout_context(call.token), None);
    assert!(
        !inst
            .on_http_call_response(call.token, None, Some(&mut stream))
            .unwrap()
    );
    inst.finish_http_context(ctx, &mut stream).unwrap();
}

#[test]
fn failed_and_cancelled_http_calls() {
    let engine = engine();
    let module = engine.compile(&wat_module2(&http_call_wat())).unwrap();
    let mut inst = start(&module, "ns.callout-fail");

    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    let token = inst.take_callouts()[0].token;
    stream.local_response = None;
    assert!(
        inst.on_http_call_response(token, None, Some(&mut stream))
            .unwrap()
    );
    // A failure: no headers, no body, no trailers; get_status says BrokenConnection ("reset").
    let got = statuses(&stream);
    assert_eq!(&got[got.len() - 8..], &[token as u8, 0, 0, 0, 0, 11, 0, 0]);
    assert_eq!(
        stream.response_headers.get("x-message"),
        Some(&b"reset"[..])
    );
    inst.finish_http_context(ctx, &mut stream).unwrap();

    // A context that ends first cancels its calls: the answer is dropped.
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    let token = inst.take_callouts()[0].token;
    inst.finish_http_context(ctx, &mut stream).unwrap();
    assert_eq!(inst.callout_context(token), None);
    assert!(!inst.on_http_call_response(token, None, None).unwrap());
    assert!(!inst.is_poisoned());
}

const GRPC_WAT: &str = r#"
  (data (i32.const 0) "grpc-svc")
  (data (i32.const 16) "pkg.Svc")
  (data (i32.const 32) "Do")
  (data (i32.const 48) "msg")
  (data (i32.const 0x300) "x-md")
  (data (i32.const 0x310) "x-init")
  (data (i32.const 0x320) "x-msg")
  (data (i32.const 0x330) "x-trail")
  (data (i32.const 0x340) "x-close")
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (call $rec (call $grpc_call (i32.const 0) (i32.const 8) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 2)
      (i32.const 0) (i32.const 0) (i32.const 48) (i32.const 3) (i32.const 1000) (i32.const 1040)))
    (call $rec (call $grpc_stream (i32.const 0) (i32.const 8) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 2)
      (i32.const 0) (i32.const 0) (i32.const 1044)))
    (call $rec (call $grpc_send (i32.load (i32.const 1044)) (i32.const 48) (i32.const 3) (i32.const 0)))
    (call $rec (call $grpc_send (i32.load (i32.const 1040)) (i32.const 48) (i32.const 3) (i32.const 0)))
    (call $rec (call $grpc_send (i32.const 99) (i32.const 48) (i32.const 3) (i32.const 0)))
    (call $rec (call $grpc_close (i32.load (i32.const 1044))))
    (call $rec (call $grpc_cancel (i32.const 99)))
    (call $rec (i32.load (i32.const 1040)))
    (call $rec (i32.load (i32.const 1044)))
    (i32.const 1))
  (func (export "proxy_on_grpc_receive_initial_metadata") (param $ctx i32) (param $token i32) (param $n i32)
    (call $rec (local.get $n))
    (if (i32.eqz (call $get_hv (i32.const 4) (i32.const 0x300) (i32.const 4) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x310) (i32.const 6)))))
  (func (export "proxy_on_grpc_receive") (param $ctx i32) (param $token i32) (param $size i32)
    (call $rec (local.get $size))
    (if (i32.eqz (call $get_buf (i32.const 5) (i32.const 0) (local.get $size) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x320) (i32.const 5)))))
  (func (export "proxy_on_grpc_receive_trailing_metadata") (param $ctx i32) (param $token i32) (param $n i32)
    (call $rec (local.get $n))
    (if (i32.eqz (call $get_hv (i32.const 5) (i32.const 0x300) (i32.const 4) (i32.const 1024) (i32.const 1028)))
      (then (call $hdr (i32.const 0x330) (i32.const 7)))))
  (func (export "proxy_on_grpc_close") (param $ctx i32) (param $token i32) (param $status i32)
    (call $rec (local.get $status))
    (call $rec (call $get_status (i32.const 1048) (i32.const 1024) (i32.const 1028)))
    (call $rec (i32.load (i32.const 1048)))
    (call $hdr (i32.const 0x340) (i32.const 7))
    (call $report))
"#;

#[test]
fn grpc_calls_and_streams_are_queued_and_answers_delivered() {
    let engine = engine();
    let module = engine.compile(&wat_module2(GRPC_WAT)).unwrap();
    let mut inst = start(&module, "ns.grpc");
    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    inst.on_request_headers(ctx, &mut stream, true).unwrap();
    let target = GrpcTarget {
        upstream: "grpc-svc".into(),
        service: "pkg.Svc".into(),
        method: "Do".into(),
        initial_metadata: vec![],
    };
    assert_eq!(
        inst.take_grpc_commands(),
        vec![
            GrpcCommand::Call {
                token: 1,
                context_id: ctx,
                call: target.clone(),
                message: b"msg".to_vec(),
                timeout: Duration::from_secs(1),
            },
            GrpcCommand::OpenStream {
                token: 2,
                context_id: ctx,
                call: target,
            },
            GrpcCommand::Send {
                token: 2,
                message: b"msg".to_vec(),
                end_of_stream: false,
            },
            GrpcCommand::Close { token: 2 },
        ]
    );
    let md: HeaderMap = [("x-md", b"a".to_vec())].into_iter().collect();
    let tr: HeaderMap = [("x-md", b"t".to_vec())].into_iter().collect();
    assert!(
        inst.on_grpc_receive_initial_metadata(1, md, Some(&mut stream))
            .unwrap()
    );
    assert!(
        inst.on_grpc_receive(1, b"reply".to_vec(), Some(&mut stream))
            .unwrap()
    );
    assert!(
        inst.on_grpc_receive_trailing_metadata(1, tr, Some(&mut stream))
            .unwrap()
    );
    assert!(
        inst.on_grpc_close(1, 14, "unavailable", Some(&mut stream))
            .unwrap()
    );
    assert_eq!(
        statuses(&stream),
        vec![0, 0, 0, 2, 1, 0, 1, 1, 2, 1, 0, 5, 0, 1, 0, 14, 0, 14, 0]
    );
    assert_eq!(stream.response_headers.get("x-init"), Some(&b"a"[..]));
    assert_eq!(stream.response_headers.get("x-msg"), Some(&b"reply"[..]));
    assert_eq!(stream.response_headers.get("x-trail"), Some(&b"t"[..]));
    assert_eq!(
        stream.response_headers.get("x-close"),
        Some(&b"unavailable"[..])
    );
    assert_eq!(inst.grpc_context(1), None);
    assert!(!inst.on_grpc_receive(1, vec![], Some(&mut stream)).unwrap());
    // The stream is still open; finishing the context cancels it.
    assert_eq!(inst.grpc_context(2), Some(ctx));
    inst.finish_http_context(ctx, &mut stream).unwrap();
    assert_eq!(
        inst.take_grpc_commands(),
        vec![GrpcCommand::Cancel { token: 2 }]
    );
}
