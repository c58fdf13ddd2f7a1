//! Bad input loses nothing: a broken manifest, a module that cannot be
//! fetched, a wrong digest — each says why, and what was serving keeps serving.

mod common;

use common::*;
use waystone_fetch::testing::Registry;

const GW_CREDS: &str = "Basic YWRtaW4zOmFkbWluMw==";

fn condition(w: &Waystone, name: &str, kind: &str) -> serde_json::Value {
    let p = w.get_json(&["wasmplugin", name]);
    p["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
        .unwrap_or_else(|| panic!("no {kind} condition in {p}"))
}

#[test]
fn bad_input_changes_nothing_that_is_serving() {
    let wasm = basic_auth_wasm();
    let registry = Registry::start().expect("start docker-registry");
    let image = format!("oci://{}/basic_auth:1.12.0", registry.host());
    let dir = tempfile::tempdir().unwrap();
    let net = private_loopback(2);
    let w = Waystone::start(&dir.path().join("data"), net, &registry.host());
    push(&w, &wasm, &image);
    let _bookinfo = Bookinfo::start(&w, &format!("{}.{}.{}.100", net[0], net[1], net[2]));
    w.apply(&example("bookinfo-gateway.yaml", &image));
    w.apply(&example("basic-auth-at-gateway.yaml", &image));
    let gw = w.gateway_host("bookinfo-gateway");
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);

    // 1. A manifest with an unknown field is refused whole, naming the field.
    let broken =
        example("basic-auth-at-gateway.yaml", &image).replace("targetRefs:", "targetRefz:");
    let out = w.cli_stdin(&["apply", "-f", "-"], Some(&broken));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        err.contains("targetRefz") && err.contains("basic-auth-at-gateway"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    // A multi-document apply with one bad document stores none of them.
    let mixed = format!(
        "{}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: extra}}\nspec: {{ports: [{{port: \"eighty\"}}]}}\n",
        example("basic-auth-at-waypoint.yaml", &image)
    );
    let out = w.cli_stdin(&["apply", "-f", "-"], Some(&mixed));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.ports[0].port"),
        "{out:?}"
    );
    assert!(
        !w.cli(&["get", "wasmplugin", "basic-auth-at-waypoint"])
            .status
            .success()
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);

    // 2. An update whose module cannot be fetched: the old module keeps serving, status says why.
    let missing = format!("oci://{}/basic_auth:does-not-exist", registry.host());
    let update = example("basic-auth-at-gateway.yaml", &missing);
    let out = w.cli_stdin(&["apply", "-f", "-"], Some(&update));
    assert!(out.status.success());
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        warn.contains("Warning:") && warn.contains("does-not-exist"),
        "{warn}"
    );
    let c = condition(&w, "basic-auth-at-gateway", "ModuleLoaded");
    assert_eq!(c["status"], "False", "{c}");
    assert_eq!(c["reason"], "UpdateFailed", "{c}");
    assert!(
        c["message"].as_str().unwrap().contains("keeps serving"),
        "{c}"
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);

    // 3. A wrong digest: refused with both digests named; the old module keeps serving.
    let wrong = "ab".repeat(32);
    let pinned = example("basic-auth-at-gateway.yaml", &image).replace(
        "  phase: AUTHN",
        &format!("  sha256: \"{wrong}\"\n  phase: AUTHN"),
    );
    w.apply(&pinned);
    let c = condition(&w, "basic-auth-at-gateway", "ModuleLoaded");
    let msg = c["message"].as_str().unwrap();
    assert!(msg.contains(&wrong) && msg.contains("sha256"), "{c}");
    assert!(
        msg.matches(char::is_alphanumeric).count() > 128,
        "names both digests: {msg}"
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);

    // Back to the good spec: status heals.
    w.apply(&example("basic-auth-at-gateway.yaml", &image));
    assert_eq!(
        condition(&w, "basic-auth-at-gateway", "ModuleLoaded")["status"],
        "True"
    );

    // 4. A new plugin that cannot be fetched: FAIL_OPEN skips it, FAIL_CLOSE denies its chain.
    let open = format!(
        "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: broken-open}}\nspec:\n  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: bookinfo-gateway}}]\n  url: {missing}\n  failStrategy: FAIL_OPEN\n"
    );
    w.apply(&open);
    assert_eq!(
        condition(&w, "broken-open", "ModuleLoaded")["reason"],
        "LoadFailed"
    );
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 200);
    let close = open
        .replace("broken-open", "broken-close")
        .replace("FAIL_OPEN", "FAIL_CLOSE");
    w.apply(&close);
    assert_eq!(gateway_get(&gw, "/productpage", Some(GW_CREDS)), 403);

    // 5. The module appears later: the retry heals it without a restart.
    push(&w, &wasm, &missing);
    wait_until(
        std::time::Duration::from_secs(30),
        || gateway_get(&gw, "/productpage", Some(GW_CREDS)) == 200,
        || w.log_text(),
    );
    assert_eq!(
        condition(&w, "broken-close", "ModuleLoaded")["status"],
        "True"
    );
    assert_eq!(gateway_get(&gw, "/productpage", None), 401);
}
