//! The real basic_auth plugin (built by `scripts/build-plugins.sh`) on this host.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use waystone_wasm::{
    Action, CompiledModule, EngineConfig, HostError, HttpStream, PluginInstance, PluginSpec,
    WasmEngine,
};

const CONFIG: &str = r#"{"basic_auth_rules":[{"prefix":"/productpage","request_methods":["GET","POST"],"credentials":["ok:test","YWRtaW4zOmFkbWluMw=="]}]}"#;

fn wasm_path() -> PathBuf {
    match std::env::var_os("WAYSTONE_BASIC_AUTH_WASM") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../target/wasm/basic_auth.wasm"
        )),
    }
}

fn wasm() -> Vec<u8> {
    let path = wasm_path();
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read the basic_auth plugin at {}: {e}; run `scripts/build-plugins.sh` first \
             (or point WAYSTONE_BASIC_AUTH_WASM at a build)",
            path.display()
        )
    })
}

fn spec(config: &str) -> Arc<PluginSpec> {
    Arc::new(PluginSpec {
        name: "istio-system.basic-auth".into(),
        root_id: "basic_auth_root".into(),
        vm_id: "basic_auth".into(),
        plugin_configuration: config.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
        env: Vec::new(),
    })
}

fn compile() -> (WasmEngine, CompiledModule) {
    let engine = WasmEngine::new(EngineConfig::default()).unwrap();
    let module = engine
        .compile(&wasm())
        .expect("basic_auth.wasm compiles and links");
    (engine, module)
}

fn request(method: &str, path: &str, auth: Option<&str>) -> HttpStream {
    let mut s = HttpStream::default();
    s.request_headers.add(":method", method);
    s.request_headers.add(":path", path);
    s.request_headers.add(":authority", "bookinfo.example");
    s.request_headers.add(":scheme", "http");
    if let Some(a) = auth {
        s.request_headers.add("authorization", a);
    }
    s
}

/// Runs the request phase then the response phase like the data plane does; returns the
/// request-headers action.
fn exchange(inst: &mut PluginInstance, stream: &mut HttpStream) -> Action {
    let ctx = inst.create_http_context().unwrap();
    let action = inst.on_request_headers(ctx, stream, true).unwrap();
    stream.response_headers.add(":status", "200");
    inst.on_response_headers(ctx, stream, true).unwrap();
    inst.finish_http_context(ctx, stream).unwrap();
    action
}

#[test]
fn missing_credentials_get_401_with_realm() {
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).expect("plugin starts");
    let mut stream = request("GET", "/productpage", None);
    let action = exchange(&mut inst, &mut stream);
    assert_eq!(action, Action::Pause);
    let reply = stream.local_response.as_ref().expect("a local 401");
    assert_eq!(reply.status, 401);
    assert!(reply.body.is_empty(), "body {:?}", reply.body);
    let realm = reply
        .headers
        .iter()
        .find(|(k, _)| k == "www-authenticate")
        .map(|(_, v)| v.as_slice());
    assert_eq!(realm, Some(&b"Basic realm=istio"[..]));
    assert!(!inst.is_poisoned());
}

#[test]
fn valid_credentials_continue() {
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).unwrap();
    for auth in ["Basic YWRtaW4zOmFkbWluMw==", "Basic b2s6dGVzdA=="] {
        let mut stream = request("GET", "/productpage", Some(auth));
        assert_eq!(exchange(&mut inst, &mut stream), Action::Continue, "{auth}");
        assert!(stream.local_response.is_none(), "{auth}");
    }
    let mut stream = request("POST", "/productpage", Some("Basic d3Jvbmc6d3Jvbmc="));
    assert_eq!(exchange(&mut inst, &mut stream), Action::Pause);
    assert_eq!(stream.local_response.as_ref().map(|r| r.status), Some(401));
}

#[test]
fn credentials_that_are_not_utf8_get_401_and_the_instance_lives_on() {
    // obs-text is legal in an HTTP/1.1 header value. The SDK's String reads abort the plugin
    // on it (a trap, poisoning the instance): the plugin reads bytes, so this is just a wrong
    // credential.
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).unwrap();
    let mut stream = request("GET", "/productpage", None);
    stream
        .request_headers
        .add("authorization", &b"Basic b2s6dGVzdA\xff\xfe"[..]);
    assert_eq!(exchange(&mut inst, &mut stream), Action::Pause);
    assert_eq!(stream.local_response.as_ref().map(|r| r.status), Some(401));
    assert!(!inst.is_poisoned());
    let mut stream = request("GET", "/productpage", Some("Basic b2s6dGVzdA=="));
    assert_eq!(exchange(&mut inst, &mut stream), Action::Continue);
}

/// The module's allocator (size-class free lists in front of dlmalloc) and the SDK keep no
/// memory per request: after a warm-up, thousands of requests of every outcome and of header
/// values in every size class, and past the largest, leave the linear memory as it was.
#[test]
fn memory_stays_flat_over_many_requests() {
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).unwrap();
    let long = format!("Basic {}", "x".repeat(700));
    let round = |inst: &mut PluginInstance, i: usize| {
        let path = format!("/productpage/{}", "p".repeat(i % 300));
        let auth = match i % 4 {
            0 => Some("Basic b2s6dGVzdA=="),
            1 => None,
            2 => Some(long.as_str()),
            _ => Some("Basic d3Jvbmc6d3Jvbmc="),
        };
        let mut stream = request("GET", &path, auth);
        let want = if i.is_multiple_of(4) {
            Action::Continue
        } else {
            Action::Pause
        };
        assert_eq!(exchange(inst, &mut stream), want, "request {i}");
    };
    for i in 0..2_000 {
        round(&mut inst, i);
    }
    let warm = inst.memory_bytes();
    for i in 0..20_000 {
        round(&mut inst, i);
    }
    assert_eq!(inst.memory_bytes(), warm, "linear memory grew");
    assert!(!inst.is_poisoned());
}

#[test]
fn other_paths_continue() {
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).unwrap();
    let mut stream = request("GET", "/other", None);
    assert_eq!(exchange(&mut inst, &mut stream), Action::Continue);
    assert!(stream.local_response.is_none());
}

#[test]
fn bad_configuration_is_rejected() {
    let (_engine, module) = compile();
    for config in [
        "not json",
        r#"{"basic_auth_rules":[{"prefix":"/x","credentials":["no-colon-not-base64!"]}]}"#,
    ] {
        let err = PluginInstance::start(&module, spec(config))
            .err()
            .expect("rejected");
        assert!(
            matches!(&err, HostError::ConfigureRejected { plugin } if plugin == "istio-system.basic-auth"),
            "{config}: {err}"
        );
    }
}

/// Timing report, not an assertion: `cargo test -p waystone-wasm --test basic_auth -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_costs() {
    let bytes = wasm();
    let engine = WasmEngine::new(EngineConfig::default()).unwrap();
    let t = Instant::now();
    let module = engine.compile(&bytes).unwrap();
    let compile = t.elapsed();

    let starts = 20;
    let t = Instant::now();
    for _ in 0..starts {
        PluginInstance::start(&module, spec(CONFIG)).unwrap();
    }
    let start = t.elapsed() / starts;

    let mut inst = PluginInstance::start(&module, spec(CONFIG)).unwrap();
    let n = 20_000u32;
    let t = Instant::now();
    for i in 0..n {
        let auth = if i % 2 == 0 {
            Some("Basic YWRtaW4zOmFkbWluMw==")
        } else {
            None
        };
        let mut stream = request("GET", "/productpage", auth);
        exchange(&mut inst, &mut stream);
    }
    let per_request = t.elapsed() / n;
    println!(
        "basic_auth.wasm ({} bytes): compile {compile:?}, instance start {start:?}, \
         request (create ctx → req headers → resp headers → finish) {per_request:?}",
        bytes.len()
    );
}

/// Request headers handed over unconverted, counting the conversions asked of them.
#[derive(Debug)]
struct Unconverted {
    pairs: Vec<(&'static str, &'static str)>,
    /// Whether it answers reads by name, or leaves them to the converted map.
    answers: bool,
    fills: std::sync::atomic::AtomicUsize,
}

impl waystone_wasm::HeaderSource for Unconverted {
    fn count(&self) -> usize {
        self.pairs.len()
    }
    fn fill(&self, into: &mut waystone_wasm::HeaderMap) {
        self.fills
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (n, v) in &self.pairs {
            into.add(n, v.as_bytes());
        }
    }
    fn first_value(&self, name: &[u8], out: &mut Vec<u8>) -> Option<bool> {
        if !self.answers {
            return None;
        }
        let found = self.pairs.iter().find(|(n, _)| n.as_bytes() == name);
        if let Some((_, v)) = found {
            out.extend_from_slice(v.as_bytes());
        }
        Some(found.is_some())
    }
}

#[test]
fn reads_by_name_are_answered_by_an_unconverted_source() {
    let (_engine, module) = compile();
    let mut inst = PluginInstance::start(&module, spec(CONFIG)).expect("plugin starts");
    for (auth, allowed) in [(Some("Basic b2s6dGVzdA=="), true), (None, false)] {
        let mut pairs = vec![
            (":authority", "bookinfo.example"),
            (":path", "/productpage"),
            (":method", "GET"),
            (":scheme", "http"),
        ];
        pairs.extend(auth.map(|a| ("authorization", a)));
        let source = Arc::new(Unconverted {
            pairs,
            answers: true,
            fills: Default::default(),
        });
        let mut stream = HttpStream::default();
        stream.request_source = Some(source.clone());
        let action = exchange(&mut inst, &mut stream);
        assert_eq!(action == Action::Continue, allowed, "{auth:?}");
        assert_eq!(stream.local_response.is_none(), allowed, "{auth:?}");
        // basic_auth reads three headers by name: none of that converts the map.
        assert_eq!(
            source.fills.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{auth:?}"
        );
        assert!(stream.request_source.is_some());
        assert_eq!(stream.request_header_count(), 4 + usize::from(allowed));
    }
    // A source that cannot answer reads by name is converted at the first one, once, and
    // the converted map answers from then on.
    let source = Arc::new(Unconverted {
        pairs: vec![(":path", "/other"), (":method", "GET")],
        answers: false,
        fills: Default::default(),
    });
    let mut stream = HttpStream::default();
    stream.request_source = Some(source.clone());
    assert_eq!(exchange(&mut inst, &mut stream), Action::Continue);
    assert_eq!(source.fills.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(stream.request_source.is_none());
    assert_eq!(stream.request_headers.get(":path"), Some(&b"/other"[..]));
    assert!(!stream.request_headers.is_modified());
}
