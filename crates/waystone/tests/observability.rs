//! Operability through the real binary: after a walkthrough-like sequence, the admin endpoint's
//! metrics count exactly what was sent, the config dump matches what was applied, proxy-config
//! and describe print the expected tables, the JSON access log names the denying plugin, and
//! spans reach an OTLP receiver.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::Value;
use waystone_fetch::testing::Registry;

const GW_CREDS: &str = "Basic YWRtaW4zOmFkbWluMw==";

/// One series of a Prometheus text page: metric name and labels.
type Series = (String, BTreeMap<String, String>);

fn parse_prometheus(text: &str) -> Vec<(Series, f64)> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Values here never hold `",` so splitting on it is exact.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        out.push(((name.to_string(), map), value.parse().unwrap()));
    }
    out
}

/// Sum of the series of `name` whose labels include all of `want`.
fn sum(metrics: &[(Series, f64)], name: &str, want: &[(&str, &str)]) -> f64 {
    metrics
        .iter()
        .filter(|((n, labels), _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// A tiny OTLP/HTTP receiver: stores each JSON body POSTed to /v1/traces.
fn otlp_receiver(ip: &str) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let store = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("content-length")
                {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            assert!(
                request_line.starts_with("POST /v1/traces "),
                "{request_line}"
            );
            store
                .lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
        }
    });
    (format!("http://{addr}"), got)
}

fn spans(batches: &[Value]) -> Vec<Value> {
    batches
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|rs| {
            let service = rs["resource"]["attributes"][0]["value"]["stringValue"].clone();
            rs["scopeSpans"][0]["spans"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut s| {
                    s["service"] = service.clone();
                    s
                })
        })
        .collect()
}

/// Addresses, digests and times differ per run: replace them with stable words.
fn redact(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, val) in m.iter_mut() {
                match (k.as_str(), &val) {
                    ("address" | "clusterIP", Value::String(_)) => *val = "<address>".into(),
                    ("digest", Value::String(_)) => *val = "<digest>".into(),
                    ("url", Value::String(_)) => *val = "<url>".into(),
                    ("endpoints", Value::Array(a)) => {
                        *val = Value::Array(a.iter().map(|_| "<endpoint>".into()).collect())
                    }
                    ("generation", _) => *val = 0.into(),
                    _ => redact(val),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

#[test]
fn metrics_dump_access_log_traces_proxy_config_and_describe() {
    let wasm = basic_auth_wasm();
    let registry = Registry::start().expect("start docker-registry");
    let image = format!(
        "oci://{}/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
        registry.host()
    );
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(2);
    let ip = format!("{}.{}.{}.150", net[0], net[1], net[2]);
    let (otlp, batches) = otlp_receiver(&ip);
    let access_log = dir.path().join("access.log");
    let w = Waystone::start_with(
        &dir.path().join("data"),
        net,
        &registry.host(),
        &[
            "--access-log-file",
            access_log.to_str().unwrap(),
            "--otlp-endpoint",
            &otlp,
        ],
    );
    assert_eq!(w.admin_get("/ready"), (200, "LIVE\n".to_string()));
    assert_eq!(w.admin_get("/healthz").0, 200);
    push(&w, &wasm, &image);
    let _bookinfo = Bookinfo::start(&w, &format!("{}.{}.{}.100", net[0], net[1], net[2]));

    // The gateway logs JSON (its annotation); the waypoint keeps the default (off).
    let gateway_yaml = example("bookinfo-gateway.yaml", &image).replacen(
        "metadata:\n  name: bookinfo-gateway\n",
        "metadata:\n  name: bookinfo-gateway\n  annotations:\n    waystone.io/access-log: json\n",
        1,
    );
    w.apply(&gateway_yaml);
    let gw = w.gateway_host("bookinfo-gateway");
    assert_eq!(gateway_get(&gw, "/productpage", None), 200);
    w.apply(&example("basic-auth-at-gateway.yaml", &image));
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, _, _) = http(
        &format!("{gw}:80"),
        "/productpage",
        &gw,
        &[("traceparent", traceparent)],
    );
    assert_eq!(status, 401);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);
    assert_eq!(gateway_get(&gw, "/static/app.css", None), 200);

    w.ok(&["waypoint", "apply", "--enroll-namespace", "--wait"]);
    w.apply(&example("basic-auth-at-waypoint.yaml", &image));
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        401
    );
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", Some(GW_CREDS)),
        200
    );
    assert_eq!(mesh_get(w.entry, "details:9080", "/details/1", None), 200);

    // --- metrics: exact counts per reporter, destination and code. A request is recorded
    // when its response has been sent, just before the client sees the connection close.
    let scrape = || parse_prometheus(&w.admin_get("/stats/prometheus").1);
    let mut metrics = scrape();
    wait_until(
        Duration::from_secs(10),
        || {
            metrics = scrape();
            sum(&metrics, "istio_requests_total", &[]) >= 8.0
        },
        || w.admin_get("/stats/prometheus").1,
    );
    let requests = |reporter: &str, service: &str, code: &str| {
        sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", reporter),
                ("destination_service_name", service),
                ("destination_service_namespace", "default"),
                ("response_code", code),
                ("response_flags", "-"),
                ("request_protocol", "http"),
            ],
        )
    };
    assert_eq!(requests("source", "productpage", "200"), 3.0);
    assert_eq!(requests("source", "productpage", "401"), 2.0);
    assert_eq!(requests("waypoint", "productpage", "401"), 1.0);
    assert_eq!(requests("waypoint", "productpage", "200"), 1.0);
    assert_eq!(requests("waypoint", "details", "200"), 1.0);
    assert_eq!(sum(&metrics, "istio_requests_total", &[]), 8.0);
    assert_eq!(
        sum(
            &metrics,
            "istio_requests_total",
            &[
                ("source_workload", "bookinfo-gateway"),
                (
                    "destination_service",
                    "productpage.default.svc.cluster.local"
                ),
                ("connection_security_policy", "none"),
            ]
        ),
        5.0
    );
    assert_eq!(
        sum(
            &metrics,
            "istio_request_duration_milliseconds_count",
            &[("reporter", "waypoint")]
        ),
        3.0
    );
    assert_eq!(
        sum(
            &metrics,
            "istio_response_bytes_count",
            &[("reporter", "source")]
        ),
        5.0
    );
    // A 401 from basic_auth has an empty body: every one is in the first bucket.
    assert_eq!(
        sum(
            &metrics,
            "istio_response_bytes_bucket",
            &[
                ("reporter", "source"),
                ("response_code", "401"),
                ("le", "1")
            ]
        ),
        2.0
    );

    let calls = |plugin: &str, callback: &str, outcome: &str| {
        sum(
            &metrics,
            "waystone_wasm_plugin_calls_total",
            &[
                ("plugin", plugin),
                ("callback", callback),
                ("outcome", outcome),
            ],
        )
    };
    let gw_plugin = "default.basic-auth-at-gateway";
    let wp_plugin = "default.basic-auth-at-waypoint";
    assert_eq!(calls(gw_plugin, "proxy_on_context_create", "continue"), 4.0);
    assert_eq!(
        calls(gw_plugin, "proxy_on_request_headers", "local_reply"),
        2.0
    );
    assert_eq!(
        sum(
            &metrics,
            "waystone_wasm_plugin_calls_total",
            &[
                ("plugin", gw_plugin),
                ("outcome", "local_reply"),
                ("response_code", "401")
            ]
        ),
        2.0
    );
    assert_eq!(
        calls(gw_plugin, "proxy_on_request_headers", "continue"),
        2.0
    );
    assert_eq!(
        calls(gw_plugin, "proxy_on_response_headers", "continue"),
        4.0
    );
    assert_eq!(calls(gw_plugin, "proxy_on_done", "continue"), 4.0);
    assert_eq!(
        calls(wp_plugin, "proxy_on_request_headers", "local_reply"),
        1.0
    );
    assert_eq!(
        calls(wp_plugin, "proxy_on_request_headers", "continue"),
        2.0
    );
    for plugin in [gw_plugin, wp_plugin] {
        for bad in ["trap", "deadline", "memory", "error"] {
            assert_eq!(
                sum(
                    &metrics,
                    "waystone_wasm_plugin_calls_total",
                    &[("plugin", plugin), ("outcome", bad)]
                ),
                0.0
            );
        }
        // Every worker instance was started once (its configure call) and is still live.
        let instances = sum(
            &metrics,
            "waystone_wasm_plugin_instances",
            &[("plugin", plugin)],
        );
        assert!((1.0..=2.0).contains(&instances), "{instances}");
        assert_eq!(calls(plugin, "proxy_on_configure", "continue"), instances);
        assert!(
            sum(
                &metrics,
                "waystone_wasm_plugin_memory_bytes",
                &[("plugin", plugin)]
            ) >= 65536.0 * instances
        );
    }
    assert_eq!(
        sum(
            &metrics,
            "waystone_wasm_plugin_call_duration_seconds_count",
            &[
                ("plugin", gw_plugin),
                ("callback", "proxy_on_request_headers")
            ]
        ),
        4.0
    );

    // --- the access log: the gateway's five requests, JSON; the 401s name the plugin.
    let read_log = || std::fs::read_to_string(&access_log).unwrap_or_default();
    wait_until(
        Duration::from_secs(10),
        || read_log().lines().count() >= 5,
        read_log,
    );
    let lines: Vec<Value> = read_log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{lines:?}");
    let denied: Vec<&Value> = lines.iter().filter(|l| l["response_code"] == 401).collect();
    assert_eq!(denied.len(), 2);
    for l in &denied {
        assert_eq!(
            l["response_code_details"],
            "wasm:default.basic-auth-at-gateway:401"
        );
        assert_eq!(l["upstream_host"], Value::Null);
        assert_eq!(l["path"], "/productpage");
        assert_eq!(l["gateway"], "default/bookinfo-gateway");
    }
    assert!(
        lines
            .iter()
            .filter(|l| l["response_code"] == 200)
            .all(|l| l["response_code_details"] == "via_upstream"
                && l["upstream_cluster"] == "outbound|9080||productpage.default.svc.cluster.local"),
        "{lines:?}"
    );

    // --- traces: the request that came with a traceparent keeps its trace id, its server span
    // is a child of the caller's span, and each plugin callback is a child of the server span.
    let got_spans = || spans(&batches.lock().unwrap());
    wait_until(
        Duration::from_secs(10),
        || {
            got_spans()
                .iter()
                .any(|s| s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        },
        || format!("{:?}", batches.lock().unwrap()),
    );
    let all = got_spans();
    let traced: Vec<&Value> = all
        .iter()
        .filter(|s| s["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        .collect();
    let server = traced.iter().find(|s| s["kind"] == 2).unwrap();
    assert_eq!(server["parentSpanId"], "00f067aa0ba902b7");
    assert_eq!(server["service"], "bookinfo-gateway.default");
    assert_ne!(server["spanId"], "00f067aa0ba902b7");
    let children: Vec<&&Value> = traced.iter().filter(|s| s["kind"] == 1).collect();
    let names: Vec<&str> = children
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "wasm default.basic-auth-at-gateway proxy_on_context_create",
            "wasm default.basic-auth-at-gateway proxy_on_request_headers",
            "wasm default.basic-auth-at-gateway proxy_on_response_headers",
            "wasm default.basic-auth-at-gateway proxy_on_done",
        ]
    );
    assert!(
        children
            .iter()
            .all(|c| c["parentSpanId"] == server["spanId"])
    );

    // --- the config dump: what was applied, in execution order, with load state.
    let (status, body) = w.admin_get("/config_dump");
    assert_eq!(status, 200);
    let mut dump: Value = serde_json::from_str(&body).unwrap();
    let via_api: Value =
        serde_json::from_str(&w.ok(&["proxy-config", "bookinfo-gateway", "-o", "json"])).unwrap();
    assert_eq!(via_api["name"], "bookinfo-gateway");
    let gw_entry = dump["gateways"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "bookinfo-gateway")
        .unwrap();
    assert_eq!(gw_entry["listeners"][0]["address"], format!("{gw}:80"));
    let digest = gw_entry["listeners"][0]["chain"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(digest.starts_with("sha256:"), "{digest}");
    redact(&mut dump);
    let expected =
        std::fs::read_to_string(repo_root().join("crates/waystone/tests/data/config_dump.json"))
            .unwrap();
    let expected: Value = serde_json::from_str(&expected).unwrap();
    assert_eq!(
        dump,
        expected,
        "config dump differs; got:\n{}",
        serde_json::to_string_pretty(&dump).unwrap()
    );

    // --- proxy-config and describe tables.
    assert_eq!(
        w.ok(&["proxy-config", "bookinfo-gateway", "chains"]),
        BOOKINFO_GATEWAY_CHAINS
    );
    assert_eq!(
        w.ok(&["proxy-config", "waypoint", "chains"]),
        "SERVICE                 PORT     ORDER     PLUGIN                             PHASE     PRIORITY     FAIL STRATEGY     STATE\n\
         default/details         9080     1         default.basic-auth-at-waypoint     AUTHN     -            FAIL_CLOSE        Loaded\n\
         default/productpage     9080     1         default.basic-auth-at-waypoint     AUTHN     -            FAIL_CLOSE        Loaded\n\
         default/ratings         9080     1         default.basic-auth-at-waypoint     AUTHN     -            FAIL_CLOSE        Loaded\n\
         default/reviews         9080     1         default.basic-auth-at-waypoint     AUTHN     -            FAIL_CLOSE        Loaded\n"
    );
    assert_one_loaded_plugin(
        &w.ok(&["proxy-config", "bookinfo-gateway", "plugins"]),
        "default.basic-auth-at-gateway",
        &image,
        &digest,
    );
    let describe = w.ok(&["describe", "wasmplugin", "basic-auth-at-waypoint"]);
    assert_describe_loaded_plugin(
        &describe,
        "basic-auth-at-waypoint",
        &image,
        &digest,
        "  KIND       NAME               LISTENER/SERVICE      PORT   POSITION\n\
        \x20 Waypoint   default/waypoint   default/details       9080   1/1\n\
        \x20 Waypoint   default/waypoint   default/productpage   9080   1/1\n\
        \x20 Waypoint   default/waypoint   default/ratings       9080   1/1\n\
        \x20 Waypoint   default/waypoint   default/reviews       9080   1/1\n",
    );
    assert!(
        describe.contains("  ModuleLoaded   True     Loaded"),
        "{describe}"
    );

    // --- run-time log levels.
    let (status, body) = w.admin_get("/logging?plugin=default.basic-auth-at-gateway&level=debug");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("plugin default.basic-auth-at-gateway: debug"),
        "{body}"
    );
    assert!(body.contains("plugins (default): info"), "{body}");
    let (status, body) = w.admin_get("/logging?level=warn");
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("process: warn\n"), "{body}");
    let (status, _) = w.admin_get("/logging?level=loud");
    assert_eq!(status, 400);
}

#[test]
fn an_unknown_access_log_annotation_is_refused_at_apply() {
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(3);
    let w = Waystone::start(&dir.path().join("data"), net, "");
    let gateway = |value: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: loud\n  annotations:\n    waystone.io/access-log: {value}\nspec:\n  gatewayClassName: istio\n  listeners:\n  - {{name: http, port: 80, protocol: HTTP}}\n"
        )
    };
    let out = w.cli_stdin(&["apply", "-f", "-"], Some(&gateway("verbose")));
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: Gateway default/loud: metadata.annotations[waystone.io/access-log]: unknown value \"verbose\" (allowed: off, text, json)\n"
    );
    // Nothing was stored, and nothing runs.
    let out = w.cli(&["get", "gateway", "loud"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\"loud\" not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, dump) = w.admin_get("/config_dump");
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["gateways"], serde_json::json!([]), "{dump:#}");
    // A known value is stored and runs with that format.
    w.apply(&gateway("text"));
    let (_, dump) = w.admin_get("/config_dump");
    let dump: Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["gateways"][0]["accessLog"], "text", "{dump:#}");
}
