//! The kinds Waystone understands, and the names kubectl accepts for them.

/// Static description of one resource kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: &'static str,
    /// `""` for the core group.
    pub group: &'static str,
    /// The version Waystone stores and prints.
    pub version: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
}

impl KindInfo {
    /// `group/version`, or just `version` for the core group (`v1`).
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// What kubectl prints before `/name created`: `service`, `wasmplugin.extensions.istio.io`.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.singular.to_string()
        } else {
            format!("{}.{}", self.singular, self.group)
        }
    }

    /// Versions accepted in `apiVersion` on input. Gateway API still serves v1beta1, and
    /// manifests copied from older docs use it.
    pub fn accepts_version(&self, version: &str) -> bool {
        version == self.version
            || (self.group == GATEWAY_GROUP && version == "v1beta1" && self.version == "v1")
    }
}

pub(crate) const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
pub(crate) const EXTENSIONS_GROUP: &str = "extensions.istio.io";

pub(crate) const NAMESPACE: usize = 0;
pub(crate) const SERVICE: usize = 1;
pub(crate) const ENDPOINT_SLICE: usize = 2;
pub(crate) const GATEWAY: usize = 3;
pub(crate) const GATEWAY_CLASS: usize = 4;
pub(crate) const HTTP_ROUTE: usize = 5;
pub(crate) const WASM_PLUGIN: usize = 6;
pub(crate) const TRAFFIC_EXTENSION: usize = 7;
pub(crate) const SECRET: usize = 8;
pub(crate) const TCP_ROUTE: usize = 9;

static KINDS: [KindInfo; 10] = [
    KindInfo {
        kind: "Namespace",
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
    },
    KindInfo {
        kind: "Service",
        group: "",
        version: "v1",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        namespaced: true,
    },
    KindInfo {
        kind: "EndpointSlice",
        group: "discovery.k8s.io",
        version: "v1",
        plural: "endpointslices",
        singular: "endpointslice",
        short_names: &[],
        namespaced: true,
    },
    KindInfo {
        kind: "Gateway",
        group: GATEWAY_GROUP,
        version: "v1",
        plural: "gateways",
        singular: "gateway",
        short_names: &["gtw"],
        namespaced: true,
    },
    KindInfo {
        kind: "GatewayClass",
        group: GATEWAY_GROUP,
        version: "v1",
        plural: "gatewayclasses",
        singular: "gatewayclass",
        short_names: &["gc"],
        namespaced: false,
    },
    KindInfo {
        kind: "HTTPRoute",
        group: GATEWAY_GROUP,
        version: "v1",
        plural: "httproutes",
        singular: "httproute",
        short_names: &[],
        namespaced: true,
    },
    KindInfo {
        kind: "WasmPlugin",
        group: EXTENSIONS_GROUP,
        version: "v1alpha1",
        plural: "wasmplugins",
        singular: "wasmplugin",
        short_names: &[],
        namespaced: true,
    },
    KindInfo {
        kind: "TrafficExtension",
        group: EXTENSIONS_GROUP,
        version: "v1alpha1",
        plural: "trafficextensions",
        singular: "trafficextension",
        short_names: &[],
        namespaced: true,
    },
    KindInfo {
        kind: "Secret",
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        short_names: &[],
        namespaced: true,
    },
    // Experimental channel only: v1alpha2 is the one version served.
    KindInfo {
        kind: "TCPRoute",
        group: GATEWAY_GROUP,
        version: "v1alpha2",
        plural: "tcproutes",
        singular: "tcproute",
        short_names: &[],
        namespaced: true,
    },
];

/// Every kind Waystone knows, in a stable order.
pub fn all_kinds() -> &'static [KindInfo] {
    &KINDS
}

pub(crate) fn kind_at(index: usize) -> &'static KindInfo {
    &KINDS[index]
}

/// Resolves what a user types after `get`/`delete`: singular, plural, short name, the Kind
/// (any case), or `plural.group` / `singular.group` (`wasmplugins.extensions.istio.io`).
pub fn lookup_kind(name: &str) -> Option<&'static KindInfo> {
    let lower = name.to_ascii_lowercase();
    let (resource, group) = match lower.split_once('.') {
        Some((r, g)) => (r.to_string(), Some(g.to_string())),
        None => (lower.clone(), None),
    };
    KINDS.iter().find(|k| {
        let name_matches = resource == k.plural
            || resource == k.singular
            || resource == k.kind.to_ascii_lowercase()
            || k.short_names.contains(&resource.as_str());
        match &group {
            None => name_matches,
            // kubectl accepts `service.v1.` style too rarely; `plural.group` is what users type.
            Some(g) => {
                name_matches
                    && (g == k.group
                        || (k.group.is_empty() && (g == "core" || g.is_empty()))
                        || g.strip_prefix(&format!("{}.", k.version)) == Some(k.group))
            }
        }
    })
}

/// Finds the kind for an `apiVersion`/`kind` pair from a manifest.
pub(crate) fn kind_for(api_version: &str, kind: &str) -> Option<&'static KindInfo> {
    let (group, version) = match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    KINDS
        .iter()
        .find(|k| k.kind == kind && k.group == group && k.accepts_version(version))
}
