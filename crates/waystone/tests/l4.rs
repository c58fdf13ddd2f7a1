//! L4 end to end through `waystone up`: a Gateway listener of protocol TCP, a TCPRoute to a TCP
//! echo Service, and a `type: NETWORK` WasmPlugin (the SDK plugin `rust_tcp`, proxy-wasm 0.2)
//! loaded from a file: bytes rewritten, the callbacks logged in order, the connection closed
//! on the trigger payload, and FAIL_CLOSE on a trap.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn manifests(backend: SocketAddr, wasm: &str, config: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  ports: [{{name: tcp-echo, port: 7000}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-1
  labels: {{kubernetes.io/service-name: echo}}
addressType: IPv4
endpoints: [{{addresses: ["{ip}"]}}]
ports: [{{name: tcp-echo, port: {port}}}]
---
{l4}"#,
        ip = backend.ip(),
        port = backend.port(),
        l4 = tcp_gateway_yaml(wasm, config, 7000),
    )
}

/// The plugin's messages in the `waystone up` log, oldest first.
fn plugin_messages(w: &Waystone) -> Vec<String> {
    w.log_text()
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("waystone::wasm: ")?;
            rest.strip_suffix(" plugin=default.tcp-echo-l4")
                .map(str::to_string)
        })
        .collect()
}

fn wait_for_messages(w: &Waystone, line: &str, count: usize) -> Vec<String> {
    let mut last = Vec::new();
    wait_until(
        Duration::from_secs(20),
        || {
            last = plugin_messages(w);
            last.iter().filter(|l| l.as_str() == line).count() >= count
        },
        || format!("plugin never logged {line:?} x{count}\n{}", w.log_text()),
    );
    last
}

#[test]
fn tcp_route_through_waystone_up() {
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(7);
    let ip = format!("{}.{}.{}.50", net[0], net[1], net[2]);
    let backend = echo_backend(&ip);
    let wasm = repo_root().join("target/wasm/rust_tcp.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run scripts/build-sdk-plugins.sh rust",
        wasm.display()
    );
    let wasm = wasm.display().to_string();
    let w = Waystone::start(&dir.path().join("data"), net, "none");
    let config = r#"{rewrite_from: "ping", rewrite_to: "PONG", close_on: "QUIT"}"#;
    let out = w.apply(&manifests(backend, &wasm, config));
    assert!(
        out.contains("tcproute.gateway.networking.k8s.io/echo created"),
        "{out}"
    );
    let gw = w.get_json(&["gateway", "tcp-gateway"]);
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 1, "{gw}");
    assert_eq!(
        gw["status"]["listeners"][0]["supportedKinds"][0]["kind"],
        "TCPRoute"
    );
    let addr = format!("{}:7000", w.gateway_host("tcp-gateway"));

    // Bytes rewritten by the plugin on the way in, echoed back.
    let mut s = tcp_connect(&addr);
    s.write_all(b"ping\n").unwrap();
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"PONG\n");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"");
    let logs = wait_for_messages(&w, "end", 1);
    assert_eq!(
        logs,
        [
            "new_connection",
            "downstream_data size=5 eos=false",
            "upstream_data size=5 eos=false",
            "downstream_data size=0 eos=true",
            "upstream_data size=0 eos=true",
            "upstream_close peer=unknown",
            "downstream_close peer=local",
            "done",
            "bytes downstream=5 upstream=5",
            "end",
        ]
    );

    // The trigger payload: the plugin closes the connection; nothing reaches the echo.
    let mut s = tcp_connect(&addr);
    s.write_all(b"QUIT\n").unwrap();
    assert_eq!(read_all(&mut s), b"");
    let logs = wait_for_messages(&w, "end", 2);
    assert!(
        logs.contains(&"closing the connection".to_string()),
        "{logs:?}"
    );

    // FAIL_CLOSE: a trap closes the connection; the next connection gets a fresh instance.
    let config = r#"{rewrite_from: "ping", rewrite_to: "PONG", trap_on: "BOOM"}"#;
    w.apply(&manifests(backend, &wasm, config));
    let mut s = tcp_connect(&addr);
    s.write_all(b"BOOM\n").unwrap();
    assert_eq!(read_all(&mut s), b"");
    let mut s = tcp_connect(&addr);
    s.write_all(b"ping\n").unwrap();
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"PONG\n");
    let (_, metrics) = w.admin_get("/stats/prometheus");
    assert!(
        metrics.contains(
            "plugin=\"default.tcp-echo-l4\",callback=\"proxy_on_downstream_data\",outcome=\"trap\""
        ),
        "{metrics}"
    );
}
