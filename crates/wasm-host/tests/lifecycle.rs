//! Contexts, timers, queues and shared data across threads, driven by WAT plugins.

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use waystone_wasm::{ContextAction, HttpStream, PluginInstance, StreamType};

fn request() -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", "/");
    s.request_headers.add(":authority", "example.com");
    s
}

const LIFECYCLE_WAT: &str = r#"
  (data (i32.const 0) "ticks")
  (data (i32.const 16) "root_deleted")
  (data (i32.const 32) "done_refused")
  (data (i32.const 48) "bad_effective")
  (global $closing (mut i32) (i32.const 0))
  (global $paused (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (global.set $paused (local.get $ctx))
    (i32.const 1))
  (func (export "proxy_on_tick") (param $root i32)
    (call $count (i32.const 0) (i32.const 5))
    (if (i32.eq (call $set_effective (i32.const 999)) (i32.const 2))
      (then (call $count (i32.const 48) (i32.const 13))))
    ;; the root context resumes the request it paused
    (if (global.get $paused) (then
      (drop (call $set_effective (global.get $paused)))
      (drop (call $continue (i32.const 0)))
      (global.set $paused (i32.const 0))))
    (if (global.get $closing)
      (then (drop (call $done)))
      (else (if (i32.eq (call $done) (i32.const 1))
        (then (call $count (i32.const 32) (i32.const 12)))))))
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    (if (result i32) (i32.eq (local.get $ctx) (i32.const 1))
      (then (global.set $closing (i32.const 1)) (i32.const 0))
      (else (call $rec (i32.const 68)) (i32.const 1))))
  (func (export "proxy_on_log") (param $ctx i32)
    (call $rec (i32.const 76)))
  (func (export "proxy_on_delete") (param $ctx i32)
    (if (i32.eq (local.get $ctx) (i32.const 1))
      (then (call $count (i32.const 16) (i32.const 12)))
      (else (call $rec (i32.const 88)) (call $report))))
"#;

#[test]
fn ticks_effective_context_and_root_shutdown_with_proxy_done() {
    let engine = engine();
    let module = engine.compile(&wat_module2(LIFECYCLE_WAT)).unwrap();
    let mut inst = start(&module, "ns.life");
    assert_eq!(inst.tick_period(), Some(Duration::from_millis(20)));

    let ctx = inst.create_http_context().unwrap();
    let mut stream = request();
    assert_eq!(
        inst.on_request_headers(ctx, &mut stream, true).unwrap(),
        waystone_wasm::Action::Pause
    );
    inst.on_tick().unwrap();
    assert_eq!(metric(&engine, "ticks"), 1);
    assert_eq!(metric(&engine, "bad_effective"), 1);
    // proxy_done before the root context is closing: NotFound.
    assert_eq!(metric(&engine, "done_refused"), 1);
    assert_eq!(
        inst.take_context_actions(),
        vec![ContextAction::Continue {
            context_id: ctx,
            stream: StreamType::Request
        }]
    );

    // HTTP contexts end with on_done, on_log, on_delete, in that order.
    inst.finish_http_context(ctx, &mut stream).unwrap();
    assert_eq!(statuses(&stream), b"DLX");

    // The root answers false to on_done: it stays until it calls proxy_done.
    assert!(!inst.shutdown().unwrap());
    assert!(!inst.is_finished());
    assert_eq!(metric(&engine, "root_deleted"), 0);
    inst.on_tick().unwrap();
    assert!(inst.is_finished());
    assert_eq!(metric(&engine, "root_deleted"), 1);
    assert!(inst.shutdown().unwrap());
    // Nothing is called after the root context is gone.
    inst.on_tick().unwrap();
    assert_eq!(metric(&engine, "ticks"), 2);
    assert!(!inst.is_poisoned());
}

#[test]
fn root_whose_on_done_answers_true_is_deleted_at_once() {
    let body = r#"
  (data (i32.const 0) "deleted")
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32) (call $count (i32.const 0) (i32.const 7)))
"#;
    let engine = engine();
    let module = engine.compile(&wat_module2(body)).unwrap();
    let mut inst = start(&module, "ns.quick");
    assert_eq!(inst.tick_period(), None);
    assert!(inst.shutdown().unwrap());
    assert!(inst.is_finished());
    assert_eq!(metric(&engine, "deleted"), 1);
}

const QUEUE_WAT: &str = r#"
  (data (i32.const 0) "q")
  (data (i32.const 8) "vm")
  (data (i32.const 16) "ready")
  (data (i32.const 32) "item")
  (data (i32.const 48) "bytes")
  (data (i32.const 64) "wrong_queue")
  (func (export "proxy_on_configure") (param i32) (param $size i32) (result i32)
    ;; only the instance configured with "owner" registers the queue
    (if (i32.eq (local.get $size) (i32.const 5))
      (then (drop (call $reg_q (i32.const 0) (i32.const 1) (i32.const 1040)))))
    (i32.const 1))
  (func (export "proxy_on_queue_ready") (param $root i32) (param $id i32)
    (call $count (i32.const 16) (i32.const 5))
    (if (i32.ne (local.get $id) (i32.load (i32.const 1040)))
      (then (call $count (i32.const 64) (i32.const 11))))
    (if (i32.eqz (call $deq (local.get $id) (i32.const 1024) (i32.const 1028)))
      (then (call $add (i32.const 48) (i32.const 5) (i64.extend_i32_u (i32.load (i32.const 1028)))))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $res_q (i32.const 8) (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 1044)))
      (then (drop (call $enq (i32.load (i32.const 1044)) (i32.const 32) (i32.const 4)))))
    (i32.const 0))
"#;

#[test]
fn queue_ready_reaches_the_registering_instance_from_another_thread() {
    let engine = engine();
    let module = engine.compile(&wat_module2(QUEUE_WAT)).unwrap();
    let mut owner = PluginInstance::start(&module, spec_with("ns.owner", b"owner")).unwrap();
    let (tx, rx) = mpsc::channel::<()>();
    let tx = std::sync::Mutex::new(tx);
    owner.set_queue_waker(std::sync::Arc::new(move || {
        let _ = tx.lock().unwrap().send(());
    }));
    assert!(!owner.has_queue_ready());

    let producer_module = module.clone();
    std::thread::spawn(move || {
        let mut producer = start(&producer_module, "ns.producer");
        for _ in 0..2 {
            let ctx = producer.create_http_context().unwrap();
            let mut stream = request();
            producer.on_request_headers(ctx, &mut stream, true).unwrap();
            producer.finish_http_context(ctx, &mut stream).unwrap();
        }
    })
    .join()
    .unwrap();

    rx.recv_timeout(Duration::from_secs(5))
        .expect("the waker ran on the producer's thread");
    assert!(owner.has_queue_ready());
    assert_eq!(owner.deliver_queue_ready().unwrap(), 2);
    assert_eq!(metric(&engine, "ready"), 2);
    assert_eq!(metric(&engine, "bytes"), 8);
    assert_eq!(metric(&engine, "wrong_queue"), 0);
    assert_eq!(owner.deliver_queue_ready().unwrap(), 0);
}

const CAS_WAT: &str = r#"
  (data (i32.const 0) "counter")
  (data (i32.const 16) "counter")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $s i32)
    (loop $retry
      (local.set $s (call $get_shared (i32.const 0) (i32.const 7) (i32.const 1024) (i32.const 1028) (i32.const 1032)))
      (if (i32.eq (local.get $s) (i32.const 1))
        (then
          (i32.store (i32.const 1100) (i32.const 1))
          (local.set $s (call $set_shared (i32.const 0) (i32.const 7) (i32.const 1100) (i32.const 4) (i32.const 0))))
        (else
          (i32.store (i32.const 1100) (i32.add (i32.load (i32.load (i32.const 1024))) (i32.const 1)))
          (local.set $s (call $set_shared (i32.const 0) (i32.const 7) (i32.const 1100) (i32.const 4)
            (i32.load (i32.const 1032))))))
      (br_if $retry (i32.eq (local.get $s) (i32.const 8))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $get_shared (i32.const 0) (i32.const 7) (i32.const 1024) (i32.const 1028) (i32.const 1032)))
    (call $hdr (i32.const 16) (i32.const 7))
    (i32.const 0))
"#;

#[test]
fn shared_data_cas_increments_are_not_lost_across_threads() {
    const PER_THREAD: u32 = 200;
    let engine = engine();
    let module = engine.compile(&wat_module2(CAS_WAT)).unwrap();
    let run = |inst: &mut PluginInstance| {
        let ctx = inst.create_http_context().unwrap();
        let mut stream = request();
        inst.on_request_headers(ctx, &mut stream, true).unwrap();
        inst.finish_http_context(ctx, &mut stream).unwrap();
    };
    let mut main = start(&module, "ns.cas");
    run(&mut main);
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let module = module.clone();
            std::thread::spawn(move || {
                let mut inst = start(&module, &format!("ns.cas{i}"));
                for _ in 0..PER_THREAD {
                    run(&mut inst);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let ctx = main.create_http_context().unwrap();
    let mut stream = request();
    main.on_response_headers(ctx, &mut stream, true).unwrap();
    let bytes = stream.response_headers.get("counter").unwrap();
    let value = u32::from_le_bytes(bytes.try_into().unwrap());
    assert_eq!(value, 1 + 2 * PER_THREAD);

    // Another vm_id does not see it.
    let mut other_spec = (*spec("ns.other")).clone();
    other_spec.vm_id = "other-vm".into();
    let mut other = PluginInstance::start(&module, std::sync::Arc::new(other_spec)).unwrap();
    let ctx = other.create_http_context().unwrap();
    let mut stream = request();
    other.on_request_headers(ctx, &mut stream, true).unwrap();
    other.on_response_headers(ctx, &mut stream, true).unwrap();
    assert_eq!(
        stream.response_headers.get("counter"),
        Some(&1u32.to_le_bytes()[..])
    );
}
