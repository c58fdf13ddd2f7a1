//! Scale check for Kubernetes mode: 2,000 Services (with EndpointSlices), 200 Gateways
//! (100 ingress gateways with an HTTPRoute each, 100 waypoints) and 500 WasmPlugins. Prints the
//! time to converge after one change (a full re-translation: the pure function is the whole
//! cost before plugins load, and loaded plugins are reused by fingerprint) and the memory.
//!
//! `cargo run --release -p waystone-model --example translate_scale`

use std::time::Instant;

use serde_json::json;
use waystone_model::{Resource, TranslateOptions, translate};

const NAMESPACES: usize = 20;
const SERVICES: usize = 2000;
const GATEWAYS: usize = 100;
const WAYPOINTS: usize = 100;
const PLUGINS: usize = 500;

fn obj(v: serde_json::Value) -> Resource {
    Resource::from_json(v).expect("generated objects are valid")
}

fn plugin(i: usize, priority: i64) -> Resource {
    let ns = format!("ns{}", i % NAMESPACES);
    // Half target an ingress gateway, half a service behind a waypoint.
    let target = if i.is_multiple_of(2) {
        json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": format!("gw{}", (i / 2) % (GATEWAYS / NAMESPACES))})
    } else {
        json!({"group": "", "kind": "Service", "name": format!("svc{}", i % (SERVICES / NAMESPACES))})
    };
    obj(json!({
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": format!("p{i}"), "namespace": ns, "generation": 1},
        "spec": {"url": format!("oci://registry.example/plugins/p{}:1.0", i % 7), "phase": "AUTHN",
                  "priority": priority, "targetRefs": [target],
                  "pluginConfig": {"rules": [{"prefix": "/", "credentials": ["a:b"]}]}}
    }))
}

fn objects() -> Vec<Resource> {
    let mut out = Vec::new();
    for n in 0..NAMESPACES {
        out.push(obj(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns{n}"), "labels": {"istio.io/use-waypoint": format!("wp{}", n % (WAYPOINTS / NAMESPACES))}}})));
    }
    for s in 0..SERVICES {
        let ns = format!("ns{}", s % NAMESPACES);
        let name = format!("svc{}", s / NAMESPACES);
        out.push(obj(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": format!("10.{}.{}.{}", s / 65536, (s / 256) % 256, s % 256),
                     "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}})));
        out.push(obj(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-1"), "namespace": ns, "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [format!("10.200.{}.{}", s / 256, s % 256)], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "port": 9080}]})));
    }
    for g in 0..GATEWAYS {
        let ns = format!("ns{}", g % NAMESPACES);
        let name = format!("gw{}", g / NAMESPACES);
        out.push(obj(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"gatewayClassName": "waystone", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}})));
        out.push(obj(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": format!("r{}", g / NAMESPACES), "namespace": ns},
            "spec": {"parentRefs": [{"name": name}],
                     "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                                "backendRefs": [{"name": format!("svc{}", g / NAMESPACES), "port": 9080}]}]}})));
    }
    for w in 0..WAYPOINTS {
        out.push(obj(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": format!("wp{}", w / NAMESPACES), "namespace": format!("ns{}", w % NAMESPACES),
                         "labels": {"istio.io/waypoint-for": "service"}},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}})));
    }
    for p in 0..PLUGINS {
        out.push(plugin(p, 10));
    }
    out
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    let opts = TranslateOptions::default();
    let before = rss_kib("VmRSS:");
    let mut objs = objects();
    let first = Instant::now();
    let t = translate(&objs, &opts);
    let first = first.elapsed();
    assert!(
        t.errors.is_empty(),
        "{:?}",
        &t.errors[..t.errors.len().min(3)]
    );
    let s = &t.snapshot;
    let chains: usize = s
        .gateways
        .iter()
        .map(|g| {
            g.listeners.iter().map(|l| l.chain.len()).sum::<usize>()
                + g.waypoint_services
                    .iter()
                    .flat_map(|w| &w.ports)
                    .map(|p| p.chain.len())
                    .sum::<usize>()
        })
        .sum();
    println!(
        "objects: {} (services {SERVICES}, gateways+waypoints {}, wasmplugins {PLUGINS}); snapshot: {} gateways, {} services, {} plugins, {chains} chain entries",
        objs.len(),
        GATEWAYS + WAYPOINTS,
        s.gateways.len(),
        s.services.len(),
        s.plugins.len()
    );
    println!("first translation: {:.1} ms", first.as_secs_f64() * 1e3);

    // One change (a plugin's priority), then converge: translate everything again, 5 times.
    let mut worst = std::time::Duration::ZERO;
    for round in 0..5 {
        let i = round * 97 % PLUGINS;
        let pos = objs
            .iter()
            .position(|o| o.meta().name == format!("p{i}") && o.kind_info().kind == "WasmPlugin")
            .unwrap();
        objs[pos] = plugin(i, 100 + round as i64);
        let start = Instant::now();
        let t2 = translate(&objs, &opts);
        let d = start.elapsed();
        assert_ne!(t2.snapshot, t.snapshot);
        worst = worst.max(d);
    }
    println!(
        "converge after one change (worst of 5): {:.1} ms (target < 1000 ms)",
        worst.as_secs_f64() * 1e3
    );
    println!(
        "memory: RSS {:.1} MiB (objects + snapshot {:.1} MiB), peak {:.1} MiB",
        rss_kib("VmRSS:") as f64 / 1024.0,
        (rss_kib("VmRSS:").saturating_sub(before)) as f64 / 1024.0,
        rss_kib("VmHWM:") as f64 / 1024.0
    );
    assert!(worst.as_secs_f64() < 1.0, "converging took {worst:?}");
}
