//! The request both per-request measurements run (`benches/per_request.rs` under criterion,
//! `examples/per_request_loop.rs` under an instruction counter).

use std::path::PathBuf;
use std::sync::Arc;

use waystone_wasm::{HeaderMap, HttpStream, PluginInstance, PluginSpec, StreamData, WasmEngine};

pub const BASIC_AUTH_CONFIG: &str = r#"{"basic_auth_rules":[{"prefix":"/","request_methods":["GET","POST"],"credentials":["ok:test"]}]}"#;

/// Credentials basic_auth accepts with [`BASIC_AUTH_CONFIG`].
pub const ALLOWED: Option<&str> = Some("Basic b2s6dGVzdA==");

pub fn plugin(name: &str) -> Vec<u8> {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/wasm"))
        .join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {}: {e}; run scripts/build-plugins.sh first",
            path.display()
        )
    })
}

pub fn instance(engine: &WasmEngine, name: &str, config: &str) -> PluginInstance {
    let module = engine.compile(&plugin(name)).expect("module compiles");
    let spec = Arc::new(PluginSpec {
        name: format!("bench.{name}"),
        root_id: String::new(),
        vm_id: name.into(),
        plugin_configuration: config.as_bytes().to_vec(),
        vm_configuration: Vec::new(),
        env: Vec::new(),
    });
    PluginInstance::start(&module, spec).expect("plugin starts")
}

/// A request as the data plane hands it over: pseudo-headers plus what curl sends, in a map
/// sized up front as the data plane sizes it from the request it parsed.
pub fn request(auth: Option<&str>) -> HttpStream {
    let mut s = HttpStream::from(StreamData {
        request_headers: HeaderMap::with_capacity(8, 128),
        ..StreamData::default()
    });
    s.request_headers.add(":method", "GET");
    s.request_headers.add(":path", "/productpage");
    s.request_headers.add(":authority", "bookinfo.example");
    s.request_headers.add(":scheme", "http");
    s.request_headers.add("user-agent", "curl/8.5.0");
    s.request_headers.add("accept", "*/*");
    if let Some(a) = auth {
        s.request_headers.add("authorization", a);
    }
    s
}

/// context create → request headers → response headers → done. Building the stream is part
/// of the cost: the data plane builds one per request too.
pub fn one_request(inst: &mut PluginInstance, auth: Option<&str>) {
    let mut stream = request(auth);
    let ctx = inst.create_http_context().expect("context");
    inst.on_request_headers(ctx, &mut stream, true)
        .expect("request headers");
    stream.response_headers = HeaderMap::with_capacity(2, 32);
    stream.response_headers.add(":status", "200");
    stream.response_headers.add("content-type", "text/html");
    inst.on_response_headers(ctx, &mut stream, true)
        .expect("response headers");
    inst.finish_http_context(ctx, &mut stream).expect("done");
}
