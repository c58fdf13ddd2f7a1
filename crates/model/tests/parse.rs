//! Reading manifests: the walkthrough, error messages, kinds, round trips and validation.

use serde_json::json;
use waystone_model::{ParseError, Resource, all_kinds, lookup_kind, parse_manifests};

const WALKTHROUGH: &str = include_str!("data/walkthrough.yaml");
const REAL_WALKTHROUGH: &str = "/work/shared/reference/walkthrough.yaml";

fn err(text: &str) -> String {
    parse_manifests(text, "walk.yaml")
        .expect_err("must not parse")
        .to_string()
}

fn one(text: &str) -> Resource {
    let mut v = parse_manifests(text, "t.yaml").expect("parses");
    assert_eq!(v.len(), 1);
    v.remove(0)
}

#[test]
fn walkthrough_parses_and_validates() {
    let objs = parse_manifests(WALKTHROUGH, "walkthrough.yaml").unwrap();
    let kinds: Vec<(&str, &str)> = objs
        .iter()
        .map(|o| (o.kind_info().kind, o.meta().name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("Gateway", "bookinfo-gateway"),
            ("HTTPRoute", "bookinfo"),
            ("WasmPlugin", "basic-auth-at-gateway"),
            ("Gateway", "waypoint"),
            ("WasmPlugin", "basic-auth-at-waypoint"),
            ("WasmPlugin", "basic-auth-for-service"),
            ("TrafficExtension", "basic-auth-for-service-te"),
        ]
    );
    for o in &objs {
        assert_eq!(
            o.meta().namespace,
            None,
            "parsing leaves the namespace unset"
        );
        o.validate().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn real_walkthrough_file_parses_when_present() {
    let Ok(text) = std::fs::read_to_string(REAL_WALKTHROUGH) else {
        eprintln!("{REAL_WALKTHROUGH} not present; the copy in tests/data is tested instead");
        return;
    };
    let objs = parse_manifests(&text, REAL_WALKTHROUGH).unwrap();
    assert_eq!(objs.len(), 7);
    for o in &objs {
        o.validate().unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn error_unknown_field_names_document_object_and_path() {
    let text = "# leading comment\n---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n  name: basic-auth\nspec:\n  url: oci://r/p:1\n  targetRefs:\n  - kind: Gateway\n    nme: x\n";
    assert_eq!(
        err(text),
        "walk.yaml: document 3 (WasmPlugin basic-auth): spec.targetRefs[0].nme: unknown field `nme`, expected one of `group`, `kind`, `name`, `namespace`"
    );
    let e = parse_manifests(text, "walk.yaml").unwrap_err();
    assert!(
        matches!(e, ParseError::Object(o) if o.document == 3 && o.path == "spec.targetRefs[0].nme")
    );
}

#[test]
fn error_wrong_type() {
    let text = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\nspec:\n  url: x\n  priority: x\n";
    assert_eq!(
        err(text),
        "walk.yaml: document 1 (WasmPlugin p): spec.priority: invalid type: string \"x\", expected i64"
    );
    let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n  - port: 80\n    targetPort: [1]\n";
    assert_eq!(
        err(text),
        "walk.yaml: document 1 (Service a): spec.ports[0].targetPort: invalid type: sequence, expected an integer or a string"
    );
}

#[test]
fn error_unknown_enum_value() {
    let text = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\nspec:\n  url: x\n  phase: AUTHM\n";
    assert_eq!(
        err(text),
        "walk.yaml: document 1 (WasmPlugin p): spec.phase: unknown variant `AUTHM`, expected one of `UNSPECIFIED_PHASE`, `AUTHN`, `AUTHZ`, `STATS`"
    );
}

#[test]
fn error_unknown_top_level_and_metadata_fields() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\nspce: {}\n";
    assert!(
        err(text).starts_with("walk.yaml: document 1 (Namespace a): spce: unknown field `spce`"),
        "{}",
        err(text)
    );
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a, labelz: {}}\n";
    assert!(err(text).starts_with(
        "walk.yaml: document 1 (Namespace a): metadata.labelz: unknown field `labelz`"
    ));
}

#[test]
fn error_unknown_kind_and_api_version() {
    assert_eq!(
        err("apiVersion: foo/v1\nkind: Bar\nmetadata: {name: a}\n"),
        "walk.yaml: document 1 (Bar a): unknown kind \"Bar\" (apiVersion \"foo/v1\")"
    );
    assert_eq!(
        err("apiVersion: extensions.istio.io/v1beta9\nkind: WasmPlugin\nmetadata: {name: a}\n"),
        "walk.yaml: document 1 (WasmPlugin a): unsupported apiVersion \"extensions.istio.io/v1beta9\" for kind WasmPlugin (expected \"extensions.istio.io/v1alpha1\")"
    );
    assert_eq!(
        err("kind: Service\nmetadata: {name: a}\n"),
        "walk.yaml: document 1 (Service a): apiVersion: required"
    );
    assert_eq!(
        err("- 1\n- 2\n"),
        "walk.yaml: document 1: expected an object, found an array"
    );
}

#[test]
fn error_bad_yaml_names_source_and_line() {
    let e = err("apiVersion: v1\nkind: [Namespace\nmetadata: 1\n");
    assert!(e.starts_with("walk.yaml: invalid YAML: line "), "{e}");
}

#[test]
fn json_input_and_kind_list() {
    let json_text = r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"j"}}"#;
    assert_eq!(one(json_text).meta().name, "j");
    let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Secret, metadata: {name: s}, type: Opaque, data: {k: dmFsdWU=}}\n";
    let objs = parse_manifests(list, "l.yaml").unwrap();
    assert_eq!(
        objs.iter().map(|o| o.kind_info().kind).collect::<Vec<_>>(),
        ["Namespace", "Secret"]
    );
    let bad = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: a}}\n- {apiVersion: v1, kind: Namespace, metadata: {name: b, x: 1}}\n";
    assert!(
        err(bad)
            .starts_with("walk.yaml: document 1 item 1 (Namespace b): metadata.x: unknown field"),
        "{}",
        err(bad)
    );
}

#[test]
fn empty_documents_and_comments_are_skipped() {
    let text = "# only a comment\n---\n\n---\n# another\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n";
    assert_eq!(parse_manifests(text, "t").unwrap().len(), 1);
    assert!(parse_manifests("", "t").unwrap().is_empty());
}

#[test]
fn gateway_api_v1beta1_is_accepted_and_printed_as_v1() {
    let g = one(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  gatewayClassName: istio\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n",
    );
    assert_eq!(g.to_json()["apiVersion"], "gateway.networking.k8s.io/v1");
}

#[test]
fn default_namespace_only_for_namespaced_kinds() {
    let mut objs = parse_manifests(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: t, namespace: other}\n",
        "t",
    )
    .unwrap();
    for o in &mut objs {
        o.set_default_namespace("default");
    }
    let ns: Vec<Option<&str>> = objs.iter().map(|o| o.meta().namespace.as_deref()).collect();
    assert_eq!(ns, [None, Some("default"), Some("other")]);
}

#[test]
fn to_json_round_trips_and_keeps_status() {
    let text = r#"
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: p
  namespace: default
  labels: {a: b}
  annotations: {note: "free text: anything"}
  creationTimestamp: "2024-01-01T00:00:00Z"
  resourceVersion: "7"
  generation: 2
  uid: 1234
  finalizers: [x]
  ownerReferences: [{kind: Foo, name: bar}]
spec:
  selector: {matchLabels: {app: x}}
  url: oci://r/p:1
  sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
  imagePullPolicy: Always
  imagePullSecret: regcred
  pluginConfig: {nested: {any: [1, "two", null]}}
  pluginName: root
  phase: AUTHZ
  priority: null
  failStrategy: FAIL_RELOAD
  vmConfig: {env: [{name: A, value: b}, {name: H, valueFrom: HOST}]}
  match: [{mode: SERVER, ports: [{number: 8080}]}]
  type: HTTP
status:
  conditions: [{type: Ready, status: "True"}]
"#;
    let mut p = one(text.replace("uid: 1234", "uid: \"1234\"").as_str());
    let j = p.to_json();
    assert_eq!(j["kind"], "WasmPlugin");
    assert_eq!(
        j["spec"]["pluginConfig"],
        json!({"nested": {"any": [1, "two", null]}})
    );
    assert_eq!(j["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(Resource::from_json(j.clone()).unwrap(), p);
    assert_eq!(p.spec_json(), j["spec"]);
    p.set_status(None);
    assert!(p.status().is_none());
    assert!(p.to_json().get("status").is_none());
    p.validate().unwrap();
}

#[test]
fn spec_json_for_secret_and_endpoint_slice() {
    let s = one(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: s, labels: {a: b}}\ntype: Opaque\ndata: {k: dmFsdWU=}\n",
    );
    assert_eq!(
        s.spec_json(),
        json!({"type": "Opaque", "data": {"k": "dmFsdWU="}})
    );
    let e = one(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: [{addresses: [1.2.3.4]}]\nports: [{port: 80}]\n",
    );
    assert_eq!(
        e.spec_json(),
        json!({"addressType": "IPv4", "endpoints": [{"addresses": ["1.2.3.4"]}], "ports": [{"port": 80}]})
    );
}

#[test]
fn lookup_kind_accepts_what_kubectl_accepts() {
    let cases = [
        ("gtw", "Gateway"),
        ("gateway", "Gateway"),
        ("gateways", "Gateway"),
        ("Gateway", "Gateway"),
        ("gateways.gateway.networking.k8s.io", "Gateway"),
        ("svc", "Service"),
        ("services", "Service"),
        ("ns", "Namespace"),
        ("namespace", "Namespace"),
        ("httproute", "HTTPRoute"),
        ("httproutes", "HTTPRoute"),
        ("HTTPRoute", "HTTPRoute"),
        ("wasmplugin", "WasmPlugin"),
        ("wasmplugins", "WasmPlugin"),
        ("WASMPLUGIN", "WasmPlugin"),
        ("wasmplugins.extensions.istio.io", "WasmPlugin"),
        ("wasmplugin.extensions.istio.io", "WasmPlugin"),
        ("trafficextension", "TrafficExtension"),
        ("trafficextensions", "TrafficExtension"),
        ("endpointslice", "EndpointSlice"),
        ("endpointslices.discovery.k8s.io", "EndpointSlice"),
        ("secret", "Secret"),
        ("secrets", "Secret"),
        ("gatewayclass", "GatewayClass"),
        ("gatewayclasses", "GatewayClass"),
        ("gc", "GatewayClass"),
    ];
    for (name, kind) in cases {
        assert_eq!(lookup_kind(name).map(|k| k.kind), Some(kind), "{name}");
    }
    for name in [
        "pods",
        "wasmplugins.networking.istio.io",
        "",
        "gateway.example.com",
    ] {
        assert!(lookup_kind(name).is_none(), "{name}");
    }
}

#[test]
fn kind_info_names() {
    let q = |n: &str| lookup_kind(n).unwrap().qualified();
    assert_eq!(q("wasmplugin"), "wasmplugin.extensions.istio.io");
    assert_eq!(q("svc"), "service");
    assert_eq!(q("gtw"), "gateway.gateway.networking.k8s.io");
    assert_eq!(q("ns"), "namespace");
    assert_eq!(
        lookup_kind("wasmplugin").unwrap().api_version(),
        "extensions.istio.io/v1alpha1"
    );
    assert_eq!(lookup_kind("svc").unwrap().api_version(), "v1");
    assert_eq!(all_kinds().len(), 10);
    assert_eq!(
        lookup_kind("tcproutes").unwrap().api_version(),
        "gateway.networking.k8s.io/v1alpha2"
    );
    assert!(!lookup_kind("gc").unwrap().namespaced);
    assert!(lookup_kind("secret").unwrap().namespaced);
}

/// Each case: a manifest and the exact validation message expected.
#[test]
fn validation_messages() {
    let wp = |spec: &str| {
        format!(
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: foo, namespace: default}}\nspec:\n{spec}\n"
        )
    };
    let digest_a = "a".repeat(64);
    let digest_b = "b".repeat(64);
    let cases: Vec<(String, &str)> = vec![
        (wp("  sha256: abc"), "WasmPlugin default/foo: spec.url: required; spec.sha256: must be 64 hex characters"),
        (wp("  url: ftp://x/y"), "WasmPlugin default/foo: spec.url: scheme \"ftp\" must be one of oci, http, https, file"),
        (
            wp(&format!("  url: oci://r/p@sha256:{digest_a}\n  sha256: {digest_b}")),
            "WasmPlugin default/foo: spec.sha256: \"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\" does not match the digest in the url (sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa)",
        ),
        (
            wp("  url: r/p\n  selector: {matchLabels: {a: b}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]"),
            "WasmPlugin default/foo: spec: only one of selector, targetRef or targetRefs can be set",
        ),
        (
            wp("  url: r/p\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g, namespace: other}]"),
            "WasmPlugin default/foo: spec.targetRefs[0].namespace: cross namespace referencing is not currently supported",
        ),
        (
            wp("  url: r/p\n  targetRefs: [{kind: Pod, name: g}]"),
            "WasmPlugin default/foo: spec.targetRefs[0].kind: \"Pod\" is not supported; use one of Gateway, GatewayClass, Service, ServiceEntry",
        ),
        (
            wp("  url: r/p\n  targetRefs: [{kind: Service, group: apps, name: g}]"),
            "WasmPlugin default/foo: spec.targetRefs[0].group: \"apps\" is not the group of Service (expected \"\" or \"core\")",
        ),
        (
            wp(&format!(
                "  url: r/p\n  targetRefs: [{}]",
                vec!["{kind: Service, name: s}"; 17].join(", ")
            )),
            "WasmPlugin default/foo: spec.targetRefs: at most 16 target references",
        ),
        (
            wp("  url: r/p\n  vmConfig: {env: [{name: A, valueFrom: HOST, value: x}, {name: B}, {name: B}]}"),
            "WasmPlugin default/foo: spec.vmConfig.env[0].value: value may only be set when valueFrom is INLINE; spec.vmConfig.env[2].name: duplicate variable \"B\"",
        ),
        (
            wp("  url: r/p\n  match: [{ports: [{number: 0}, {number: 70000}]}]"),
            "WasmPlugin default/foo: spec.match[0].ports[0].number: port 0 must be between 1 and 65535; spec.match[0].ports[1].number: port 70000 must be between 1 and 65535",
        ),
        (
            "apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: {name: te}\nspec:\n  phase: AUTHN\n".to_string(),
            "TrafficExtension te: spec: exactly one of wasm or lua must be set",
        ),
        (
            format!(
                "apiVersion: extensions.istio.io/v1alpha1\nkind: TrafficExtension\nmetadata: {{name: te}}\nspec:\n  lua: {{inlineCode: \"{}\"}}\n",
                "x".repeat(65537)
            ),
            "TrafficExtension te: spec.lua.inlineCode: 65537 bytes is more than the limit of 65536",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: g}\nspec:\n  gatewayClassName: istio\n  listeners: [{name: a, port: 80, protocol: HTTP}, {name: a, port: 0, protocol: HTTP}]\n".to_string(),
            "Gateway g: spec.listeners[1].name: duplicate listener name \"a\"; spec.listeners[1].port: port 0 must be between 1 and 65535",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  rules: [{matches: [{path: {type: PathPrefix, value: api}}], backendRefs: [{name: s}]}]\n".to_string(),
            "HTTPRoute r: spec.rules[0].matches[0].path.value: \"api\" must start with '/'; spec.rules[0].backendRefs[0].port: required when referring to a Service",
        ),
        (
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {k: \"not base64!\"}\n".to_string(),
            "Secret s: data[k]: is not valid base64",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: Bad_Name}\n".to_string(),
            "Service Bad_Name: metadata.name: \"Bad_Name\" must be a DNS-1123 label (lowercase letters, digits and '-', starting and ending with a letter or digit)",
        ),
    ];
    for (text, want) in cases {
        let obj = one(&text);
        let got = obj.validate().expect_err(want).to_string();
        assert_eq!(got, want);
    }
}
