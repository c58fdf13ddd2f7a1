//! The user's walkthrough, end to end through the real binary: a real OCI
//! registry, `waystone up`, the bookinfo demo, the CLI, and HTTP on loopback.

mod common;

use common::*;
use waystone_fetch::testing::Registry;

const GW_CREDS: &str = "Basic YWRtaW4zOmFkbWluMw==";
const SVC_CREDS: &str = "Basic MXQtaW4zOmFkbWluMw==";

fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn walkthrough_gateway_waypoint_service_and_restart() {
    let wasm = basic_auth_wasm();
    let registry = Registry::start().expect("start docker-registry");
    let image = format!(
        "oci://{}/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
        registry.host()
    );
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(0);
    let mut w = Waystone::start(&dir.path().join("data"), net, &registry.host());
    push(&w, &wasm, &image);
    let _bookinfo = Bookinfo::start(&w, &format!("{}.{}.{}.100", net[0], net[1], net[2]));

    // Step 2: the ingress gateway and a plugin on it.
    let out = w.apply(&example("bookinfo-gateway.yaml", &image));
    assert!(
        out.contains("gateway.gateway.networking.k8s.io/bookinfo-gateway created"),
        "{out}"
    );
    assert!(
        out.contains("httproute.gateway.networking.k8s.io/bookinfo created"),
        "{out}"
    );
    let gw = w.gateway_host("bookinfo-gateway");
    assert_eq!(gw, w.gateway_ip);
    assert_eq!(gateway_get(&gw, "/productpage", None), 200, "no plugin yet");
    let out = w.apply(&example("basic-auth-at-gateway.yaml", &image));
    assert_eq!(
        out.trim(),
        "wasmplugin.extensions.istio.io/basic-auth-at-gateway created"
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);
    let (status, headers, body) = http(&format!("{gw}:80"), "/productpage", &gw, &[]);
    assert_eq!(status, 401);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k == "www-authenticate" && v == "Basic realm=istio"),
        "{headers:?}"
    );
    assert!(body.is_empty());
    // Paths the plugin does not cover pass.
    assert_eq!(gateway_get(&gw, "/static/app.css", None), 200);

    let rows = table_rows(&w.ok(&["get", "gateway"]));
    assert_eq!(rows[0], ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]);
    assert_eq!(
        rows[1][..4],
        ["bookinfo-gateway", "istio", gw.as_str(), "True"]
    );

    // Step 3: a namespace waypoint; traffic through it passes without plugins.
    let out = w.ok(&["waypoint", "apply", "--enroll-namespace", "--wait"]);
    assert!(out.contains("waypoint default/waypoint applied"), "{out}");
    assert!(
        out.contains("namespace default labeled with \"istio.io/use-waypoint=waypoint\""),
        "{out}"
    );
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        200
    );
    let rows = table_rows(&w.ok(&["get", "gateway"]));
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[2][..2], ["waypoint", "istio-waypoint"]);
    assert_eq!(rows[2][3], "True");

    // Step 4: a plugin on the waypoint.
    w.apply(&example("basic-auth-at-waypoint.yaml", &image));
    let rows = table_rows(&w.ok(&["get", "wasmplugin"]));
    assert_eq!(rows[0], ["NAME", "AGE"]);
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["basic-auth-at-gateway", "basic-auth-at-waypoint"]);
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        401
    );
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", Some(GW_CREDS)),
        200
    );
    // Every authority form a client may use reaches the same chain.
    for authority in [
        "productpage",
        "productpage.default",
        "productpage.default.svc.cluster.local:9080",
    ] {
        assert_eq!(
            mesh_get(w.entry, authority, "/productpage", None),
            401,
            "{authority}"
        );
    }

    // Step 5: a plugin for one service, behind the same waypoint.
    w.apply(&example("basic-auth-for-service.yaml", &image));
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", Some(GW_CREDS)),
        200
    );
    assert_eq!(
        mesh_get(w.entry, "reviews:9080", "/reviews/1", Some(SVC_CREDS)),
        200
    );
    assert_eq!(mesh_get(w.entry, "reviews:9080", "/reviews/1", None), 401);
    // details has no service plugin and no /details rule: it passes.
    assert_eq!(mesh_get(w.entry, "details:9080", "/details/1", None), 200);

    // Status says where each plugin runs and that its module loaded.
    let p = w.get_json(&["wasmplugin", "basic-auth-for-service"]);
    let conds = p["status"]["conditions"].as_array().unwrap();
    let loaded = conds.iter().find(|c| c["type"] == "ModuleLoaded").unwrap();
    assert_eq!(loaded["status"], "True", "{p}");
    assert!(
        p["status"]["module"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // A restart brings back the same configuration from the store.
    w.restart();
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        401
    );
    assert_eq!(mesh_get(w.entry, "reviews:9080", "/reviews/1", None), 401);
    assert_eq!(
        mesh_get(w.entry, "reviews:9080", "/reviews/1", Some(SVC_CREDS)),
        200
    );

    // Cleanup as the docs do it.
    let out = w.ok(&[
        "delete",
        "wasmplugin",
        "basic-auth-at-gateway",
        "basic-auth-at-waypoint",
        "basic-auth-for-service",
    ]);
    assert!(
        out.contains("wasmplugin.extensions.istio.io \"basic-auth-for-service\" deleted"),
        "{out}"
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 200);
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        200
    );
    assert_eq!(mesh_get(w.entry, "reviews:9080", "/reviews/1", None), 200);
    w.stop();
}

/// The older draft of the page: a dedicated waypoint for reviews, targeted as a Gateway.
#[test]
fn walkthrough_dedicated_reviews_waypoint() {
    let wasm = basic_auth_wasm();
    let registry = Registry::start().expect("start docker-registry");
    let image = format!(
        "oci://{}/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
        registry.host()
    );
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(1);
    let w = Waystone::start(&dir.path().join("data"), net, &registry.host());
    push(&w, &wasm, &image);
    let _bookinfo = Bookinfo::start(&w, &format!("{}.{}.{}.100", net[0], net[1], net[2]));

    w.ok(&["waypoint", "apply", "--enroll-namespace", "--wait"]);
    w.apply(&example("basic-auth-at-waypoint.yaml", &image));
    let out = w.ok(&[
        "waypoint",
        "apply",
        "-n",
        "default",
        "--name",
        "reviews-svc-waypoint",
        "--wait",
    ]);
    assert!(
        out.contains("waypoint default/reviews-svc-waypoint applied"),
        "{out}"
    );
    let out = w.ok(&[
        "label",
        "service",
        "reviews",
        "istio.io/use-waypoint=reviews-svc-waypoint",
    ]);
    assert_eq!(out.trim(), "service/reviews labeled");
    let rows = table_rows(&w.ok(&["get", "gateway"]));
    let names: Vec<&str> = rows[1..].iter().map(|r| r[0].as_str()).collect();
    assert_eq!(names, ["reviews-svc-waypoint", "waypoint"]);
    assert!(rows[1..].iter().all(|r| r[3] == "True"), "{rows:?}");

    w.apply(&example("basic-auth-for-service-waypoint.yaml", &image));
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", Some(GW_CREDS)),
        200
    );
    assert_eq!(
        mesh_get(w.entry, "productpage:9080", "/productpage", None),
        401
    );
    assert_eq!(
        mesh_get(w.entry, "reviews:9080", "/reviews/1", Some(SVC_CREDS)),
        200
    );
    assert_eq!(mesh_get(w.entry, "reviews:9080", "/reviews/1", None), 401);
    // reviews left the namespace waypoint: its /productpage rule no longer applies there,
    // and the dedicated waypoint's rule is only for /reviews.
    assert_eq!(mesh_get(w.entry, "reviews:9080", "/productpage", None), 404);
}
