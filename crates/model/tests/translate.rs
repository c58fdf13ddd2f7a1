//! Table tests for the translation rules, one test per rule, plus the whole walkthrough.

use std::collections::BTreeMap;

use waystone_model::snapshot::*;
use waystone_model::{Resource, TranslateOptions, Translation, parse_manifests, translate};

const WALKTHROUGH: &str = include_str!("data/walkthrough.yaml");

/// Parses YAML, defaults the namespace to `default`, and gives objects without a
/// creationTimestamp increasing ones in document order (so "older" is "written first").
fn objects(yaml: &str) -> Vec<Resource> {
    let mut out = parse_manifests(yaml, "test.yaml").expect("test YAML parses");
    for (i, o) in out.iter_mut().enumerate() {
        o.set_default_namespace("default");
        let m = o.meta_mut();
        if m.creation_timestamp.is_none() {
            m.creation_timestamp = Some(format!("2024-01-01T00:00:{:02}Z", i));
        }
    }
    out
}

fn run(yaml: &str) -> Translation {
    translate(&objects(yaml), &TranslateOptions::default())
}

fn ok(yaml: &str) -> Snapshot {
    let t = run(yaml);
    assert!(t.errors.is_empty(), "unexpected errors: {:?}", t.errors);
    t.snapshot
}

fn names(chain: &[PluginId]) -> Vec<String> {
    chain.iter().map(|id| id.key.to_string()).collect()
}

fn gw<'a>(s: &'a Snapshot, ns: &str, name: &str) -> &'a GatewayConfig {
    s.gateway(&ObjectKey::new(ns, name))
        .unwrap_or_else(|| panic!("gateway {ns}/{name} missing"))
}

fn listener_chain(s: &Snapshot, ns: &str, name: &str, listener: &str) -> Vec<String> {
    let g = gw(s, ns, name);
    names(
        &g.listeners
            .iter()
            .find(|l| l.name == listener)
            .expect("listener")
            .chain,
    )
}

/// Chain of `service` port `port` on waypoint `ns/name`; `None` when the service is not on it.
fn waypoint_chain(
    s: &Snapshot,
    ns: &str,
    name: &str,
    service: &str,
    port: u16,
) -> Option<Vec<String>> {
    let g = gw(s, ns, name);
    let ws = g
        .waypoint_services
        .iter()
        .find(|w| w.service.name == service)?;
    Some(names(
        &ws.ports
            .iter()
            .find(|p| p.port == port)
            .expect("port")
            .chain,
    ))
}

const INGRESS: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: alt, port: 8080, protocol: HTTP}
"#;

const WAYPOINT: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint}
spec:
  gatewayClassName: istio-waypoint
  listeners:
  - {name: mesh, port: 15008, protocol: HBONE}
"#;

fn plugin(name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec:\n  url: oci://reg.local/p:1\n{body}\n"
    )
}

fn plugin_in(ns: &str, name: &str, body: &str) -> String {
    format!(
        "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  url: oci://reg.local/p:1\n{body}\n"
    )
}

fn service(name: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  ports:\n  - {{name: http, port: 9080}}\n"
    )
}

const NS_DEFAULT_ENROLLED: &str = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint}}
"#;

const TARGET_INGRESS: &str =
    "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]";
const TARGET_WAYPOINT: &str =
    "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";

// ---------------------------------------------------------------- attachment

#[test]
fn attachment_by_target_ref_gateway() {
    let yaml = format!(
        "{INGRESS}{}{}",
        plugin("at-ingress", TARGET_INGRESS),
        plugin(
            "at-other",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]"
        )
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/at-ingress"]
    );
    assert_eq!(
        listener_chain(&s, "default", "ingress", "alt"),
        ["default/at-ingress"]
    );
    assert_eq!(
        s.plugins.len(),
        1,
        "only referenced plugins are in the snapshot"
    );
}

#[test]
fn attachment_by_target_ref_gateway_requires_same_namespace() {
    let yaml = format!(
        "{INGRESS}{}",
        plugin_in("other", "elsewhere", TARGET_INGRESS)
    );
    let s = ok(&yaml);
    assert!(listener_chain(&s, "default", "ingress", "http").is_empty());
    assert!(s.plugins.is_empty());
}

#[test]
fn attachment_by_target_ref_service_only_on_waypoints() {
    let yaml = format!(
        "{WAYPOINT}{INGRESS}{NS_DEFAULT_ENROLLED}{}{}{}",
        service("reviews", ""),
        service("ratings", ""),
        plugin(
            "for-reviews",
            "  targetRefs: [{kind: Service, group: \"\", name: reviews}]"
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9080).unwrap(),
        ["default/for-reviews"]
    );
    assert!(
        waypoint_chain(&s, "default", "waypoint", "ratings", 9080)
            .unwrap()
            .is_empty()
    );
    assert!(listener_chain(&s, "default", "ingress", "http").is_empty());
}

#[test]
fn attachment_by_target_ref_service_group_core() {
    let yaml = format!(
        "{WAYPOINT}{NS_DEFAULT_ENROLLED}{}{}",
        service("reviews", ""),
        plugin(
            "core",
            "  targetRefs: [{kind: Service, group: core, name: reviews}]"
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9080).unwrap(),
        ["default/core"]
    );
}

#[test]
fn attachment_by_target_ref_gateway_class_root_namespace_only() {
    let class_ref = "  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]";
    let other_class =
        "  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio}]";
    let yaml = format!(
        "{WAYPOINT}{INGRESS}{NS_DEFAULT_ENROLLED}{}{}{}{}",
        service("reviews", ""),
        plugin_in("istio-system", "mesh-wide", class_ref),
        plugin_in("default", "not-root", class_ref),
        plugin_in("istio-system", "other-class", other_class),
    );
    let s = ok(&yaml);
    assert_eq!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9080).unwrap(),
        ["istio-system/mesh-wide"]
    );
    // GatewayClass refs never reach ingress gateways, whatever the class.
    assert!(listener_chain(&s, "default", "ingress", "http").is_empty());
}

#[test]
fn selector_matches_gateway_pod_labels() {
    let yaml = format!(
        "{INGRESS}{}{}{}",
        plugin(
            "by-name",
            "  selector: {matchLabels: {gateway.networking.k8s.io/gateway-name: ingress}}"
        ),
        plugin(
            "by-istio-name",
            "  selector: {matchLabels: {istio.io/gateway-name: ingress}}"
        ),
        plugin("no-match", "  selector: {matchLabels: {app: reviews}}"),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/by-name", "default/by-istio-name"]
    );
}

#[test]
fn selector_matches_infrastructure_labels() {
    let yaml = format!(
        "{}{}",
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  infrastructure: {labels: {team: edge}}
  listeners: [{name: http, port: 80, protocol: HTTP}]
"#,
        plugin("by-infra", "  selector: {matchLabels: {team: edge}}"),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/by-infra"]
    );
}

#[test]
fn selector_empty_matches_every_gateway_in_namespace() {
    let yaml = format!(
        "{INGRESS}{}{}{}",
        plugin("no-selector", ""),
        plugin("empty-selector", "  selector: {}"),
        plugin_in("other", "elsewhere", ""),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/no-selector", "default/empty-selector"]
    );
}

#[test]
fn selector_in_root_namespace_applies_to_every_namespace() {
    let yaml = format!(
        "{INGRESS}{}{}",
        plugin_in(
            "istio-system",
            "root-match",
            "  selector: {matchLabels: {istio.io/gateway-name: ingress}}"
        ),
        plugin_in(
            "istio-system",
            "root-miss",
            "  selector: {matchLabels: {istio.io/gateway-name: nope}}"
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["istio-system/root-match"]
    );
}

#[test]
fn selector_ignored_when_target_refs_set() {
    // targetRefs to another gateway: the (empty) selector must not attach it here.
    let yaml = format!(
        "{INGRESS}{}",
        plugin(
            "elsewhere",
            "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other}]"
        )
    );
    let s = ok(&yaml);
    assert!(listener_chain(&s, "default", "ingress", "http").is_empty());
}

#[test]
fn waypoint_ignores_selector_only_plugins() {
    let yaml = format!(
        "{WAYPOINT}{NS_DEFAULT_ENROLLED}{}{}{}",
        service("reviews", ""),
        plugin("no-selector", ""),
        plugin(
            "by-name",
            "  selector: {matchLabels: {istio.io/gateway-name: waypoint}}"
        ),
    );
    let s = ok(&yaml);
    assert!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9080)
            .unwrap()
            .is_empty()
    );
    assert!(s.plugins.is_empty());
}

// ---------------------------------------------------------------- waypoint binding

fn waypoint_of(s: &Snapshot, svc: &str) -> Option<String> {
    s.service(&ObjectKey::new("default", svc))
        .expect("service")
        .waypoint
        .as_ref()
        .map(|k| k.to_string())
}

#[test]
fn use_waypoint_label_on_service() {
    let yaml = format!(
        "{WAYPOINT}{}{}",
        service("a", "istio.io/use-waypoint: waypoint"),
        service("b", "")
    );
    let s = ok(&yaml);
    assert_eq!(waypoint_of(&s, "a").as_deref(), Some("default/waypoint"));
    assert_eq!(waypoint_of(&s, "b"), None);
    let wp = gw(&s, "default", "waypoint");
    assert_eq!(wp.waypoint_services.len(), 1);
    assert_eq!(wp.waypoint_services[0].service.name, "a");
}

#[test]
fn use_waypoint_label_on_namespace() {
    let yaml = format!("{WAYPOINT}{NS_DEFAULT_ENROLLED}{}", service("a", ""));
    assert_eq!(
        waypoint_of(&ok(&yaml), "a").as_deref(),
        Some("default/waypoint")
    );
}

#[test]
fn use_waypoint_service_label_wins_over_namespace() {
    let other = WAYPOINT.replace("name: waypoint", "name: other");
    let yaml = format!(
        "{WAYPOINT}---{other}{NS_DEFAULT_ENROLLED}{}",
        service("a", "istio.io/use-waypoint: other")
    );
    assert_eq!(
        waypoint_of(&ok(&yaml), "a").as_deref(),
        Some("default/other")
    );
}

#[test]
fn use_waypoint_none_on_service_opts_out() {
    let yaml = format!(
        "{WAYPOINT}{NS_DEFAULT_ENROLLED}{}",
        service("a", "istio.io/use-waypoint: none")
    );
    let s = ok(&yaml);
    assert_eq!(waypoint_of(&s, "a"), None);
    assert!(gw(&s, "default", "waypoint").waypoint_services.is_empty());
}

#[test]
fn use_waypoint_namespace_label() {
    let wp_elsewhere = WAYPOINT.replace(
        "metadata: {name: waypoint}",
        "metadata: {name: waypoint, namespace: mesh}",
    );
    let yaml = format!(
        "{wp_elsewhere}{}{}",
        service(
            "a",
            "istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: mesh"
        ),
        service("b", "istio.io/use-waypoint: waypoint"),
    );
    let s = ok(&yaml);
    assert_eq!(waypoint_of(&s, "a").as_deref(), Some("mesh/waypoint"));
    // No waypoint named so in the service's own namespace: no binding.
    assert_eq!(waypoint_of(&s, "b"), None);
    let ns_labels = r#"
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/use-waypoint: waypoint, istio.io/use-waypoint-namespace: mesh}}
"#;
    let yaml = format!("{wp_elsewhere}{ns_labels}{}", service("c", ""));
    assert_eq!(
        waypoint_of(&ok(&yaml), "c").as_deref(),
        Some("mesh/waypoint")
    );
}

#[test]
fn use_waypoint_requires_waypoint_class() {
    let yaml = format!(
        "{INGRESS}{}",
        service("a", "istio.io/use-waypoint: ingress")
    );
    assert_eq!(waypoint_of(&ok(&yaml), "a"), None);
}

fn waypoint_for_case(
    gateway_label: Option<&str>,
    class_label: Option<&str>,
) -> (WaypointFor, Option<String>) {
    let mut yaml = String::from(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n",
    );
    if let Some(v) = gateway_label {
        yaml.push_str(&format!("  labels: {{istio.io/waypoint-for: {v}}}\n"));
    }
    yaml.push_str("spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n");
    if let Some(v) = class_label {
        yaml.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata:\n  name: istio-waypoint\n  labels: {{istio.io/waypoint-for: {v}}}\nspec: {{controllerName: istio.io/mesh-controller}}\n"
        ));
    }
    yaml.push_str(&service("a", "istio.io/use-waypoint: waypoint"));
    let s = ok(&yaml);
    let GatewayRole::Waypoint { waypoint_for } = gw(&s, "default", "waypoint").role.clone() else {
        panic!("not a waypoint")
    };
    (waypoint_for, waypoint_of(&s, "a"))
}

#[test]
fn waypoint_for_on_gateway_and_class() {
    let bound = Some("default/waypoint".to_string());
    assert_eq!(
        waypoint_for_case(None, None),
        (WaypointFor::Service, bound.clone())
    );
    assert_eq!(
        waypoint_for_case(Some("service"), None),
        (WaypointFor::Service, bound.clone())
    );
    assert_eq!(
        waypoint_for_case(Some("all"), None),
        (WaypointFor::All, bound.clone())
    );
    assert_eq!(
        waypoint_for_case(Some("workload"), None),
        (WaypointFor::Workload, None)
    );
    assert_eq!(
        waypoint_for_case(Some("none"), None),
        (WaypointFor::None, None)
    );
    // The class's label applies when the Gateway has none, and the Gateway's wins.
    assert_eq!(
        waypoint_for_case(None, Some("workload")),
        (WaypointFor::Workload, None)
    );
    assert_eq!(
        waypoint_for_case(None, Some("all")),
        (WaypointFor::All, bound.clone())
    );
    assert_eq!(
        waypoint_for_case(Some("service"), Some("none")),
        (WaypointFor::Service, bound)
    );
}

// ---------------------------------------------------------------- chain order

#[test]
fn phases_order_the_chain() {
    let yaml = format!(
        "{INGRESS}{}{}{}{}{}",
        plugin("unset", TARGET_INGRESS),
        plugin("stats", &format!("{TARGET_INGRESS}\n  phase: STATS")),
        plugin(
            "unspecified",
            &format!("{TARGET_INGRESS}\n  phase: UNSPECIFIED_PHASE")
        ),
        plugin("authz", &format!("{TARGET_INGRESS}\n  phase: AUTHZ")),
        plugin("authn", &format!("{TARGET_INGRESS}\n  phase: AUTHN")),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        [
            "default/authn",
            "default/authz",
            "default/stats",
            "default/unset",
            "default/unspecified"
        ]
    );
    let p = &s.plugins[&PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", "unset"),
    }];
    assert_eq!(p.phase, Phase::Unspecified);
}

#[test]
fn priority_higher_first_unset_last() {
    let yaml = format!(
        "{INGRESS}{}{}{}{}{}",
        plugin("unset", TARGET_INGRESS),
        plugin("zero", &format!("{TARGET_INGRESS}\n  priority: 0")),
        plugin("negative", &format!("{TARGET_INGRESS}\n  priority: -5")),
        plugin("ten", &format!("{TARGET_INGRESS}\n  priority: 10")),
        plugin(
            "explicit-null",
            &format!("{TARGET_INGRESS}\n  priority: null")
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        [
            "default/ten",
            "default/zero",
            "default/negative",
            "default/unset",
            "default/explicit-null"
        ]
    );
}

#[test]
fn tie_break_creation_timestamp_then_name_then_namespace() {
    let ts = |name: &str, t: &str| {
        format!(
            "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}, creationTimestamp: \"{t}\"}}\nspec:\n  url: oci://r/p:1\n{TARGET_INGRESS}\n"
        )
    };
    let yaml = format!(
        "{INGRESS}{}{}{}",
        ts("a-newest", "2024-03-01T00:00:00Z"),
        ts("z-oldest", "2024-01-01T00:00:00Z"),
        ts("b-same", "2024-02-01T00:00:00Z") + &ts("a-same", "2024-02-01T00:00:00Z"),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        [
            "default/z-oldest",
            "default/a-same",
            "default/b-same",
            "default/a-newest"
        ]
    );
    // Same name and timestamp in two namespaces: the namespace decides. The root namespace's
    // empty-selector plugins apply everywhere, which puts both on one chain.
    let root = |ns: &str| {
        format!(
            "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: same, namespace: {ns}, creationTimestamp: \"2024-01-01T00:00:00Z\"}}\nspec:\n  url: oci://r/p:1\n"
        )
    };
    let yaml = format!("{INGRESS}{}{}", root("istio-system"), root("default"));
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/same", "istio-system/same"]
    );
}

#[test]
fn network_plugins_stay_out_of_http_chains() {
    let yaml = format!(
        "{INGRESS}{}",
        plugin("l4", &format!("{TARGET_INGRESS}\n  type: NETWORK"))
    );
    let s = ok(&yaml);
    assert!(listener_chain(&s, "default", "ingress", "http").is_empty());
    assert!(s.plugins.is_empty());
}

// ---------------------------------------------------------------- match

#[test]
fn match_ports_and_modes_on_ingress_are_client() {
    let yaml = format!(
        "{INGRESS}{}{}{}{}{}",
        plugin(
            "port-80",
            &format!("{TARGET_INGRESS}\n  match: [{{ports: [{{number: 80}}]}}]")
        ),
        plugin(
            "client-8080",
            &format!("{TARGET_INGRESS}\n  match: [{{mode: CLIENT, ports: [{{number: 8080}}]}}]")
        ),
        plugin(
            "server",
            &format!("{TARGET_INGRESS}\n  match: [{{mode: SERVER}}]")
        ),
        plugin(
            "both",
            &format!("{TARGET_INGRESS}\n  match: [{{mode: CLIENT_AND_SERVER}}]")
        ),
        plugin(
            "any-entry",
            &format!(
                "{TARGET_INGRESS}\n  match: [{{mode: SERVER}}, {{mode: UNDEFINED, ports: [{{number: 80}}]}}]"
            )
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/port-80", "default/both", "default/any-entry"]
    );
    assert_eq!(
        listener_chain(&s, "default", "ingress", "alt"),
        ["default/client-8080", "default/both"]
    );
}

#[test]
fn match_on_waypoint_is_server_against_service_port() {
    let svc = r#"
---
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  ports:
  - {name: http, port: 9080}
  - {name: admin, port: 9090}
"#;
    let yaml = format!(
        "{WAYPOINT}{NS_DEFAULT_ENROLLED}{svc}{}{}{}",
        plugin(
            "server-9080",
            &format!("{TARGET_WAYPOINT}\n  match: [{{mode: SERVER, ports: [{{number: 9080}}]}}]")
        ),
        plugin(
            "client",
            &format!("{TARGET_WAYPOINT}\n  match: [{{mode: CLIENT}}]")
        ),
        plugin("all", TARGET_WAYPOINT),
    );
    let s = ok(&yaml);
    assert_eq!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9080).unwrap(),
        ["default/server-9080", "default/all"]
    );
    assert_eq!(
        waypoint_chain(&s, "default", "waypoint", "reviews", 9090).unwrap(),
        ["default/all"]
    );
}

// ---------------------------------------------------------------- plugin fields

fn plugin_config(yaml: &str, name: &str) -> PluginConfig {
    let s = ok(yaml);
    s.plugins[&PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", name),
    }]
        .clone()
}

fn plugin_with(name: &str, url: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec:\n  url: {url}\n{TARGET_INGRESS}\n{extra}\n"
    )
}

#[test]
fn deprecated_target_ref_merges_into_target_refs() {
    let yaml = format!(
        "{INGRESS}---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: old}}\nspec:\n  url: oci://r/p:1\n  targetRef: {{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}}\n"
    );
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/old"]
    );
}

#[test]
fn url_normalization_adds_oci_scheme() {
    let yaml = format!(
        "{INGRESS}{}{}{}",
        plugin_with("bare", "ghcr.io/org/plugin:1.0", ""),
        plugin_with("https", "https://example.com/p.wasm", ""),
        plugin_with("file", "file:///opt/p.wasm", ""),
    );
    assert_eq!(
        plugin_config(&yaml, "bare").url,
        "oci://ghcr.io/org/plugin:1.0"
    );
    assert_eq!(
        plugin_config(&yaml, "https").url,
        "https://example.com/p.wasm"
    );
    assert_eq!(plugin_config(&yaml, "file").url, "file:///opt/p.wasm");
}

#[test]
fn pull_policy_defaulting() {
    let digest = "a".repeat(64);
    let yaml = format!(
        "{INGRESS}{}{}{}{}{}{}{}",
        plugin_with("tagged", "oci://r/p:1.0", ""),
        plugin_with("latest", "oci://r/p:latest", ""),
        plugin_with("untagged", "r:5000/p", ""),
        plugin_with(
            "explicit",
            "oci://r/p:latest",
            "  imagePullPolicy: IfNotPresent"
        ),
        plugin_with(
            "explicit-always",
            "oci://r/p:1.0",
            "  imagePullPolicy: Always"
        ),
        plugin_with("pinned", "oci://r/p:latest", &format!("  sha256: {digest}")),
        plugin_with(
            "http",
            "https://example.com/p.wasm",
            "  imagePullPolicy: UNSPECIFIED_POLICY"
        ),
    );
    let policy = |n: &str| plugin_config(&yaml, n).pull_policy;
    assert_eq!(policy("tagged"), PullPolicy::IfNotPresent);
    assert_eq!(policy("latest"), PullPolicy::Always);
    assert_eq!(policy("untagged"), PullPolicy::Always);
    assert_eq!(policy("explicit"), PullPolicy::IfNotPresent);
    assert_eq!(policy("explicit-always"), PullPolicy::Always);
    assert_eq!(policy("pinned"), PullPolicy::IfNotPresent);
    assert_eq!(policy("http"), PullPolicy::IfNotPresent);
}

#[test]
fn sha256_from_field_or_url_digest() {
    let digest = "AB".repeat(32);
    let yaml = format!(
        "{INGRESS}{}{}{}",
        plugin_with(
            "field",
            "oci://r/p:1",
            &format!("  sha256: {}", "c".repeat(64))
        ),
        plugin_with("url", &format!("oci://r/p@sha256:{digest}"), ""),
        plugin_with("none", "oci://r/p:1", ""),
    );
    assert_eq!(plugin_config(&yaml, "field").sha256, Some("c".repeat(64)));
    assert_eq!(plugin_config(&yaml, "url").sha256, Some("ab".repeat(32)));
    assert_eq!(
        plugin_config(&yaml, "url").pull_policy,
        PullPolicy::IfNotPresent
    );
    assert_eq!(plugin_config(&yaml, "none").sha256, None);
}

#[test]
fn pull_secret_present_and_missing() {
    let secret = r#"
---
apiVersion: v1
kind: Secret
metadata: {name: regcred}
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: eyJhdXRocyI6e319
---
apiVersion: v1
kind: Secret
metadata: {name: opaque}
stringData: {.dockerconfigjson: "{}"}
"#;
    let yaml = format!(
        "{INGRESS}{secret}{}{}{}{}",
        plugin_with("with-secret", "oci://r/p:1", "  imagePullSecret: regcred"),
        plugin_with("missing", "oci://r/p:1", "  imagePullSecret: nosuch"),
        plugin_with("wrong-type", "oci://r/p:1", "  imagePullSecret: opaque"),
        plugin_with("no-secret", "oci://r/p:1", ""),
    );
    assert_eq!(
        plugin_config(&yaml, "with-secret").pull_secret,
        Some(Ok(br#"{"auths":{}}"#.to_vec()))
    );
    assert_eq!(
        plugin_config(&yaml, "missing").pull_secret,
        Some(Err("secret default/nosuch not found".to_string()))
    );
    assert!(
        matches!(plugin_config(&yaml, "wrong-type").pull_secret, Some(Err(e)) if e.contains("kubernetes.io/dockerconfigjson"))
    );
    assert_eq!(plugin_config(&yaml, "no-secret").pull_secret, None);
    // A secret in another namespace does not count.
    let yaml = format!(
        "{INGRESS}{}{}",
        secret.replace(
            "metadata: {name: regcred}",
            "metadata: {name: regcred, namespace: other}"
        ),
        plugin_with("cross", "oci://r/p:1", "  imagePullSecret: regcred"),
    );
    assert_eq!(
        plugin_config(&yaml, "cross").pull_secret,
        Some(Err("secret default/regcred not found".to_string()))
    );
}

#[test]
fn plugin_fields_are_normalized() {
    let yaml = format!(
        "{INGRESS}{}{}",
        plugin_with(
            "full",
            "oci://r/p:1",
            "  pluginName: my_root\n  failStrategy: FAIL_OPEN\n  pluginConfig: {b: 1, a: [x]}\n  vmConfig:\n    env:\n    - {name: INLINED, value: v1}\n    - {name: DEFAULTED}\n    - {name: FROM_HOST, valueFrom: HOST}\n    - {name: MISSING_HOST, valueFrom: HOST}",
        ),
        plugin_with("bare", "oci://r/p:1", "  pluginConfig: {}"),
    );
    let objs = objects(&yaml);
    let opts = TranslateOptions {
        root_namespace: "istio-system".into(),
        host_env: BTreeMap::from([("FROM_HOST".to_string(), "host-value".to_string())]),
    };
    let t = translate(&objs, &opts);
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let id = |n: &str| PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", n),
    };
    let full = &t.snapshot.plugins[&id("full")];
    assert_eq!(full.root_id, "my_root");
    assert_eq!(full.filter_name, "default.full");
    assert_eq!(full.fail_strategy, FailStrategy::FailOpen);
    assert_eq!(
        String::from_utf8(full.configuration.clone()).unwrap(),
        r#"{"b":1,"a":["x"]}"#
    );
    assert_eq!(
        full.env,
        [
            ("INLINED".to_string(), "v1".to_string()),
            ("DEFAULTED".to_string(), String::new()),
            ("FROM_HOST".to_string(), "host-value".to_string()),
        ]
    );
    let bare = &t.snapshot.plugins[&id("bare")];
    assert!(bare.configuration.is_empty());
    assert_eq!(bare.root_id, "");
    assert_eq!(bare.fail_strategy, FailStrategy::FailClose);
    assert_eq!(bare.plugin_type, PluginType::Http);
}

#[test]
fn traffic_extension_wasm_attaches_and_lua_is_rejected() {
    let yaml = format!(
        "{INGRESS}{}",
        r#"
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: te}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]
  phase: AUTHZ
  priority: 3
  wasm: {url: "r/p:1", pluginName: root}
---
apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {name: lua}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: ingress}]
  lua: {inlineCode: "function envoy_on_request(h) end"}
"#
    );
    let t = run(&yaml);
    assert_eq!(t.errors.len(), 1);
    assert_eq!(t.errors[0].kind, "TrafficExtension");
    assert_eq!(t.errors[0].key, ObjectKey::new("default", "lua"));
    assert!(
        t.errors[0].message.contains("lua is not supported"),
        "{}",
        t.errors[0].message
    );
    let chain = &gw(&t.snapshot, "default", "ingress").listeners[0].chain;
    assert_eq!(
        chain,
        &[PluginId {
            kind: ExtensionKind::TrafficExtension,
            key: ObjectKey::new("default", "te")
        }]
    );
    let p = &t.snapshot.plugins[&chain[0]];
    assert_eq!(
        (p.phase, p.priority, p.url.as_str(), p.root_id.as_str()),
        (Phase::Authz, Some(3), "oci://r/p:1", "root")
    );
}

#[test]
fn invalid_object_is_rejected_alone() {
    let yaml = format!(
        "{INGRESS}{}{}",
        plugin_with("bad", "oci://r/p:1", "  sha256: nothex"),
        plugin_with("good", "oci://r/p:1", ""),
    );
    let t = run(&yaml);
    assert_eq!(t.errors.len(), 1);
    assert_eq!(t.errors[0].key.name, "bad");
    assert!(
        t.errors[0]
            .message
            .contains("spec.sha256: must be 64 hex characters"),
        "{}",
        t.errors[0].message
    );
    assert_eq!(
        listener_chain(&t.snapshot, "default", "ingress", "http"),
        ["default/good"]
    );
}

// ---------------------------------------------------------------- routes

fn route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n"
    )
}

fn route_order(s: &Snapshot, listener: &str) -> Vec<String> {
    gw(s, "default", "ingress")
        .listeners
        .iter()
        .find(|l| l.name == listener)
        .unwrap()
        .routes
        .iter()
        .map(|r| format!("{}#{}", r.route.name, r.rule_index))
        .collect()
}

#[test]
fn route_precedence_gateway_api_order() {
    let yaml = format!(
        "{INGRESS}{}{}{}",
        route(
            "first",
            "{name: ingress}",
            "  - matches: [{path: {type: PathPrefix, value: /}}]\n    backendRefs: [{name: a, port: 80}]\n  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-A, value: \"1\"}]}]\n  - matches: [{path: {type: PathPrefix, value: /api}, method: GET}]",
        ),
        route(
            "second",
            "{name: ingress}",
            "  - matches: [{path: {type: Exact, value: /x}}]\n  - matches: [{path: {type: PathPrefix, value: /api/v1}}]\n  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-A, value: \"1\"}, {name: X-B, value: \"2\"}]}]",
        ),
        route(
            "third",
            "{name: ingress}",
            "  - backendRefs: [{name: b, port: 80, weight: 3, namespace: other}]"
        ),
    );
    let s = ok(&yaml);
    assert_eq!(
        route_order(&s, "http"),
        [
            "second#0", "second#1", "first#2", "second#2", "first#1", "first#0", "third#0"
        ]
    );
    let l = &gw(&s, "default", "ingress").listeners[0];
    let first0 = l
        .routes
        .iter()
        .find(|r| r.route.name == "first" && r.rule_index == 0)
        .unwrap();
    assert_eq!(
        first0.backends,
        [Backend {
            service: ObjectKey::new("default", "a"),
            port: 80,
            weight: 1
        }]
    );
    let third = l.routes.iter().find(|r| r.route.name == "third").unwrap();
    assert_eq!(
        third.backends,
        [Backend {
            service: ObjectKey::new("other", "b"),
            port: 80,
            weight: 3
        }]
    );
    let first1 = l
        .routes
        .iter()
        .find(|r| r.route.name == "first" && r.rule_index == 1)
        .unwrap();
    assert_eq!(
        first1.matches[0].headers[0].name, "x-a",
        "header names are lowercased"
    );
}

#[test]
fn route_precedence_ties_older_route_first() {
    let yaml = format!(
        "{INGRESS}{}{}",
        route(
            "zz-old",
            "{name: ingress}",
            "  - matches: [{path: {type: PathPrefix, value: /a}}]"
        ),
        route(
            "aa-new",
            "{name: ingress}",
            "  - matches: [{path: {type: PathPrefix, value: /b}}]"
        ),
    );
    assert_eq!(route_order(&ok(&yaml), "http"), ["zz-old#0", "aa-new#0"]);
}

#[test]
fn parent_ref_section_name_and_port() {
    let rule = "  - matches: [{path: {type: PathPrefix, value: /}}]";
    let yaml = format!(
        "{INGRESS}{}{}{}{}",
        route("by-section", "{name: ingress, sectionName: alt}", rule),
        route("by-port", "{name: ingress, port: 80}", rule),
        route("whole", "{name: ingress}", rule),
        route(
            "wrong-kind",
            "{name: ingress, kind: Service, group: \"\"}",
            rule
        ),
    );
    let s = ok(&yaml);
    assert_eq!(route_order(&s, "http"), ["by-port#0", "whole#0"]);
    assert_eq!(route_order(&s, "alt"), ["by-section#0", "whole#0"]);
}

#[test]
fn allowed_routes_namespaces() {
    let gateway = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: alt, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: sel, port: 8081, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared: "yes"}}}}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {shared: "yes"}}
"#;
    let rule = "  - matches: [{path: {type: PathPrefix, value: /}}]";
    let cross = route("cross", "{name: ingress, namespace: default}", rule).replace(
        "metadata: {name: cross}",
        "metadata: {name: cross, namespace: team}",
    );
    let yaml = format!("{gateway}{cross}");
    let s = ok(&yaml);
    assert!(route_order(&s, "http").is_empty(), "Same is the default");
    assert_eq!(route_order(&s, "alt"), ["cross#0"]);
    assert_eq!(route_order(&s, "sel"), ["cross#0"]);
}

#[test]
fn hostnames_intersect_with_listener() {
    let gateway = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com"}
"#;
    let rule = "  - matches: [{path: {type: PathPrefix, value: /}}]";
    let yaml = format!(
        "{gateway}{}{}{}",
        route("match", "{name: ingress}", rule).replace(
            "spec:\n",
            "spec:\n  hostnames: [a.example.com, other.org]\n"
        ),
        route("none", "{name: ingress}", rule)
            .replace("spec:\n", "spec:\n  hostnames: [other.org]\n"),
        route("any", "{name: ingress}", rule),
    );
    let s = ok(&yaml);
    let l = &gw(&s, "default", "ingress").listeners[0];
    let hosts: Vec<(String, Vec<String>)> = l
        .routes
        .iter()
        .map(|r| (r.route.name.clone(), r.hostnames.clone()))
        .collect();
    assert_eq!(
        hosts,
        [
            ("match".to_string(), vec!["a.example.com".to_string()]),
            ("any".to_string(), vec!["*.example.com".to_string()]),
        ]
    );
}

// ---------------------------------------------------------------- endpoints

#[test]
fn endpoints_readiness_and_port_name_mapping() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  clusterIP: 10.0.0.7
  ports:
  - {name: http, port: 9080, targetPort: 8080, appProtocol: http}
  - {name: grpc, port: 9090, targetPort: grpc}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-abc, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: grpc, port: 7070}
endpoints:
- addresses: [10.1.0.1]
  conditions: {ready: true}
- addresses: [10.1.0.2]
- addresses: [10.1.0.3]
  conditions: {ready: false, serving: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-v6, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv6
ports:
- {name: http, port: 8080}
endpoints:
- addresses: ["fd00::1"]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, labels: {kubernetes.io/service-name: ratings}}
addressType: IPv4
ports: [{name: http, port: 1}]
endpoints: [{addresses: [10.9.9.9]}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports: [{port: 80}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: headless-1, labels: {kubernetes.io/service-name: headless}}
addressType: IPv4
ports: [{port: 8000}]
endpoints: [{addresses: [10.2.0.1]}]
"#;
    let s = ok(yaml);
    let svc = s.service(&ObjectKey::new("default", "reviews")).unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("10.0.0.7"));
    let http = &svc.ports[0];
    assert_eq!(
        (
            http.name.as_deref(),
            http.port,
            http.app_protocol.as_deref()
        ),
        (Some("http"), 9080, Some("http"))
    );
    let eps: Vec<String> = http.endpoints.iter().map(|e| e.to_string()).collect();
    assert_eq!(eps, ["10.1.0.1:8080", "10.1.0.2:8080", "[fd00::1]:8080"]);
    let grpc: Vec<String> = svc.ports[1]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(grpc, ["10.1.0.1:7070", "10.1.0.2:7070"]);
    let headless = s.service(&ObjectKey::new("default", "headless")).unwrap();
    assert_eq!(headless.cluster_ip, None);
    let eps: Vec<String> = headless.ports[0]
        .endpoints
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        eps,
        ["10.2.0.1:8000"],
        "unnamed slice port matches the unnamed service port"
    );
}

// ---------------------------------------------------------------- the walkthrough

fn bookinfo() -> String {
    let mut out = String::new();
    for (i, name) in ["productpage", "reviews", "details", "ratings"]
        .iter()
        .enumerate()
    {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  clusterIP: 10.96.0.{}\n  ports: [{{name: http, port: 9080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 9080}}]\nendpoints: [{{addresses: [10.244.0.{}]}}]\n",
            10 + i,
            10 + i
        ));
    }
    out
}

fn walkthrough_objects(extra: &str) -> Vec<Resource> {
    // The TrafficExtension duplicates basic-auth-for-service in the newer API; the chain
    // assertions below are about the WasmPlugin walkthrough, so leave it out.
    let wasm_only: Vec<Resource> = parse_manifests(WALKTHROUGH, "walkthrough.yaml")
        .unwrap()
        .into_iter()
        .filter(|r| r.kind_info().kind != "TrafficExtension")
        .collect();
    let mut all = wasm_only;
    all.extend(objects(&format!(
        "{NS_DEFAULT_ENROLLED}{}{extra}",
        bookinfo()
    )));
    let stamps = [
        ("basic-auth-at-gateway", "2024-05-01T10:00:00Z"),
        ("basic-auth-at-waypoint", "2024-05-01T10:01:00Z"),
        ("basic-auth-for-service", "2024-05-01T10:02:00Z"),
    ];
    for o in &mut all {
        o.set_default_namespace("default");
        let m = o.meta_mut();
        if let Some((_, t)) = stamps.iter().find(|(n, _)| *n == m.name) {
            m.creation_timestamp = Some(t.to_string());
        }
    }
    all
}

#[test]
fn walkthrough_namespace_waypoint_chains() {
    let t = translate(&walkthrough_objects(""), &TranslateOptions::default());
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let s = &t.snapshot;
    assert_eq!(
        listener_chain(s, "default", "bookinfo-gateway", "http"),
        ["default/basic-auth-at-gateway"]
    );
    let ingress = gw(s, "default", "bookinfo-gateway");
    assert_eq!(ingress.role, GatewayRole::Ingress);
    assert_eq!(ingress.listeners[0].routes.len(), 1);
    assert_eq!(
        ingress.listeners[0].routes[0].backends,
        [Backend {
            service: ObjectKey::new("default", "productpage"),
            port: 9080,
            weight: 1
        }]
    );
    let wp = gw(s, "default", "waypoint");
    assert_eq!(
        wp.role,
        GatewayRole::Waypoint {
            waypoint_for: WaypointFor::Service
        }
    );
    assert_eq!(wp.waypoint_services.len(), 4);
    assert_eq!(
        waypoint_chain(s, "default", "waypoint", "productpage", 9080).unwrap(),
        ["default/basic-auth-at-waypoint"]
    );
    assert_eq!(
        waypoint_chain(s, "default", "waypoint", "reviews", 9080).unwrap(),
        [
            "default/basic-auth-at-waypoint",
            "default/basic-auth-for-service"
        ]
    );
    assert_eq!(s.plugins.len(), 3);
    let at_gw = &s.plugins[&PluginId {
        kind: ExtensionKind::WasmPlugin,
        key: ObjectKey::new("default", "basic-auth-at-gateway"),
    }];
    assert_eq!(at_gw.phase, Phase::Authn);
    assert_eq!(at_gw.pull_policy, PullPolicy::IfNotPresent);
    assert_eq!(
        String::from_utf8(at_gw.configuration.clone()).unwrap(),
        r#"{"basic_auth_rules":[{"prefix":"/productpage","request_methods":["GET","POST"],"credentials":["ok:test","YWRtaW4zOmFkbWluMw=="]}]}"#
    );
}

#[test]
fn walkthrough_timestamp_order_decides_equal_phase_plugins() {
    // Make the service plugin older: it must now run first on reviews.
    let mut objs = walkthrough_objects("");
    for o in &mut objs {
        if o.meta().name == "basic-auth-for-service" {
            o.meta_mut().creation_timestamp = Some("2024-04-01T00:00:00Z".into());
        }
    }
    let t = translate(&objs, &TranslateOptions::default());
    assert_eq!(
        waypoint_chain(&t.snapshot, "default", "waypoint", "reviews", 9080).unwrap(),
        [
            "default/basic-auth-for-service",
            "default/basic-auth-at-waypoint"
        ]
    );
}

#[test]
fn walkthrough_dedicated_service_waypoint() {
    let extra = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: reviews-svc-waypoint}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: basic-auth-at-reviews-waypoint, creationTimestamp: "2024-05-01T10:03:00Z"}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: reviews-svc-waypoint}]
  url: oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0
  phase: AUTHN
"#;
    let mut objs = walkthrough_objects(extra);
    for o in &mut objs {
        if o.meta().name == "reviews" && o.kind_info().kind == "Service" {
            o.meta_mut().labels.insert(
                "istio.io/use-waypoint".into(),
                "reviews-svc-waypoint".into(),
            );
        }
    }
    let t = translate(&objs, &TranslateOptions::default());
    assert!(t.errors.is_empty(), "{:?}", t.errors);
    let s = &t.snapshot;
    assert_eq!(
        waypoint_chain(s, "default", "reviews-svc-waypoint", "reviews", 9080).unwrap(),
        [
            "default/basic-auth-for-service",
            "default/basic-auth-at-reviews-waypoint"
        ]
    );
    assert_eq!(
        waypoint_chain(s, "default", "waypoint", "reviews", 9080),
        None
    );
    assert_eq!(
        waypoint_chain(s, "default", "waypoint", "productpage", 9080).unwrap(),
        ["default/basic-auth-at-waypoint"]
    );
    let svcs: Vec<&str> = gw(s, "default", "reviews-svc-waypoint")
        .waypoint_services
        .iter()
        .map(|w| w.service.name.as_str())
        .collect();
    assert_eq!(svcs, ["reviews"]);
}

#[test]
fn translation_is_deterministic() {
    let mut objs = walkthrough_objects("");
    let a = translate(&objs, &TranslateOptions::default());
    objs.reverse();
    let b = translate(&objs, &TranslateOptions::default());
    assert_eq!(a, b);
}

// ---------------------------------------------------------------- L4 (TCPRoute, NETWORK plugins)

const TCP_GATEWAY: &str = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: db, port: 5432, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: pg}
spec:
  ports: [{name: tcp-pg, port: 5432}]
"#;

fn tcp_route(name: &str, section: &str, backend: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {{name: {name}}}\nspec:\n  parentRefs: [{{name: ingress, sectionName: {section}}}]\n  rules:\n  - backendRefs: [{{name: {backend}, port: 5432}}]\n"
    )
}

#[test]
fn network_plugins_run_on_tcp_listeners_and_http_plugins_on_http_ones() {
    let yaml = [
        TCP_GATEWAY.to_string(),
        plugin("http-one", TARGET_INGRESS),
        plugin("l4-one", &format!("{TARGET_INGRESS}\n  type: NETWORK")),
        tcp_route("to-pg", "db", "pg"),
    ]
    .concat();
    let s = ok(&yaml);
    assert_eq!(
        listener_chain(&s, "default", "ingress", "http"),
        ["default/http-one"]
    );
    assert_eq!(
        listener_chain(&s, "default", "ingress", "db"),
        ["default/l4-one"]
    );
    // Both are referenced, so both are loaded.
    assert_eq!(s.plugins.len(), 2);
    let db = gw(&s, "default", "ingress")
        .listeners
        .iter()
        .find(|l| l.name == "db")
        .unwrap();
    assert!(db.is_tcp());
    assert_eq!(db.tcp_routes.len(), 1);
    assert_eq!(db.tcp_routes[0].route, ObjectKey::new("default", "to-pg"));
    assert_eq!(
        db.tcp_routes[0].backends,
        [Backend {
            service: ObjectKey::new("default", "pg"),
            port: 5432,
            weight: 1
        }]
    );
    // HTTP listeners take no TCPRoutes, TCP listeners no HTTPRoutes.
    let http = gw(&s, "default", "ingress")
        .listeners
        .iter()
        .find(|l| l.name == "http")
        .unwrap();
    assert!(http.tcp_routes.is_empty());
}

#[test]
fn tcp_routes_attach_by_section_and_oldest_first() {
    let yaml = [
        TCP_GATEWAY.to_string(),
        tcp_route("older", "db", "pg"),
        tcp_route("newer", "db", "other"),
        tcp_route("wrong-section", "http", "pg"),
    ]
    .concat();
    let s = ok(&yaml);
    let routes: Vec<String> = gw(&s, "default", "ingress")
        .listeners
        .iter()
        .flat_map(|l| {
            l.tcp_routes
                .iter()
                .map(|r| format!("{}:{}", l.name, r.route.name))
        })
        .collect();
    assert_eq!(routes, ["db:older", "db:newer"]);
}

#[test]
fn tcp_route_is_parsed_strictly_and_validated() {
    let bad_field = "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: ingress}]\n  rules: [{backendRefs: [{name: pg, port: 5432}], matches: []}]\n";
    let err = parse_manifests(bad_field, "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.rules[0]") && err.contains("matches"),
        "{err}"
    );
    // HTTPRoute backends take filters; TCPRoute's share their type but not that field.
    let filters = "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: ingress}]\n  rules: [{backendRefs: [{name: pg, port: 5432, filters: []}]}]\n";
    let err = parse_manifests(filters, "t.yaml").unwrap_err().to_string();
    assert!(
        err.contains("spec.rules[0].backendRefs[0].filters") && err.contains("unknown field"),
        "{err}"
    );
    let v1 = tcp_route("r", "db", "pg").replace("v1alpha2", "v1");
    let err = parse_manifests(&v1, "t.yaml").unwrap_err().to_string();
    assert!(err.contains("unsupported apiVersion"), "{err}");
    let no_port = "---\napiVersion: gateway.networking.k8s.io/v1alpha2\nkind: TCPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: ingress}]\n  rules: [{backendRefs: [{name: pg}]}]\n";
    let t = run(&[TCP_GATEWAY, no_port].concat());
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert!(
        t.errors[0].to_string().contains("backendRefs[0].port"),
        "{}",
        t.errors[0]
    );
}

#[test]
fn waypoint_ports_are_tcp_or_http_by_app_protocol_then_name_prefix() {
    let svc = r#"
---
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  ports:
  - {name: http-web, port: 80}
  - {name: tcp-db, port: 5432}
  - {name: web, port: 8080, appProtocol: tcp}
  - {name: tcp-but-h2c, port: 8443, appProtocol: kubernetes.io/h2c}
  - {name: plain, port: 9000}
"#;
    let yaml = [
        WAYPOINT.to_string(),
        NS_DEFAULT_ENROLLED.to_string(),
        svc.to_string(),
        plugin("http-one", TARGET_WAYPOINT),
        plugin("l4-one", &format!("{TARGET_WAYPOINT}\n  type: NETWORK")),
    ]
    .concat();
    let s = ok(&yaml);
    let ws = gw(&s, "default", "waypoint")
        .waypoint_services
        .iter()
        .find(|w| w.service.name == "mixed")
        .unwrap();
    let got: Vec<(u16, PortProtocol, Vec<String>, Vec<String>)> = ws
        .ports
        .iter()
        .map(|p| (p.port, p.protocol, names(&p.chain), names(&p.network_chain)))
        .collect();
    let http = |port| {
        (
            port,
            PortProtocol::Http,
            vec!["default/http-one".to_string()],
            vec![],
        )
    };
    let tcp = |port| {
        (
            port,
            PortProtocol::Tcp,
            vec![],
            vec!["default/l4-one".to_string()],
        )
    };
    assert_eq!(
        got,
        [http(80), tcp(5432), tcp(8080), http(8443), http(9000)]
    );
}

// ---------------------------------------------------------------- access log annotation

fn annotated_ingress(value: &str) -> String {
    INGRESS.replace(
        "metadata: {name: ingress}",
        &format!(
            "metadata: {{name: ingress, annotations: {{waystone.io/access-log: \"{value}\"}}}}"
        ),
    )
}

#[test]
fn access_log_annotation_values() {
    for (value, expected) in [
        ("off", Some(AccessLogFormat::Off)),
        ("text", Some(AccessLogFormat::Text)),
        (" json ", Some(AccessLogFormat::Json)),
    ] {
        let s = ok(&annotated_ingress(value));
        assert_eq!(
            gw(&s, "default", "ingress").access_log,
            expected,
            "{value:?}"
        );
    }
    assert_eq!(gw(&ok(INGRESS), "default", "ingress").access_log, None);
}

#[test]
fn unknown_access_log_annotation_is_an_error_but_the_gateway_still_translates() {
    let t = run(&format!("{}{}", annotated_ingress("verbose"), WAYPOINT));
    assert_eq!(t.errors.len(), 1, "{:?}", t.errors);
    assert_eq!(
        t.errors[0].to_string(),
        "Gateway default/ingress: metadata.annotations[waystone.io/access-log]: unknown value \"verbose\" (allowed: off, text, json)"
    );
    let g = gw(&t.snapshot, "default", "ingress");
    assert_eq!(g.access_log, None, "the process default applies");
    assert_eq!(g.listeners.len(), 2, "the rest of the gateway is kept");
}
