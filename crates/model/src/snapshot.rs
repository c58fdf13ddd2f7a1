//! The normalized configuration the data plane runs. Produced only by
//! [`crate::translate`]; never written by hand, never read from users.
//!
//! Everything here is plain data: no sockets, no modules, no threads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which resource kind a plugin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExtensionKind {
    WasmPlugin,
    TrafficExtension,
}

/// Identity of one plugin in the snapshot: the object it came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PluginId {
    pub kind: ExtensionKind,
    pub key: ObjectKey,
}

impl std::fmt::Display for PluginId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            ExtensionKind::WasmPlugin => "wasmplugin",
            ExtensionKind::TrafficExtension => "trafficextension",
        };
        write!(f, "{kind}/{}", self.key)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    Authn,
    Authz,
    Stats,
    Unspecified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum FailStrategy {
    #[default]
    FailClose,
    FailOpen,
    FailReload,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PullPolicy {
    IfNotPresent,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum PluginType {
    #[default]
    Http,
    Network,
}

/// Everything needed to fetch, load and configure one plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginConfig {
    pub id: PluginId,
    /// Normalized: always has a scheme (`oci://` added when the user gave none).
    pub url: String,
    /// Lowercase hex, from `sha256` or from an `@sha256:` digest in the url.
    pub sha256: Option<String>,
    /// Effective policy after Istio's defaulting (`latest` → Always, sha256 → IfNotPresent).
    pub pull_policy: PullPolicy,
    /// Contents of the referenced `kubernetes.io/dockerconfigjson` Secret (`.dockerconfigjson`,
    /// decoded). `Some(Err)` when the plugin names a secret that is missing or malformed.
    pub pull_secret: Option<Result<Vec<u8>, String>>,
    /// The bytes given to `proxy_on_configure`: `pluginConfig` serialized as JSON, empty when unset.
    pub configuration: Vec<u8>,
    /// Root id (`pluginName`), empty when unset.
    pub root_id: String,
    /// `<namespace>.<name>`, as Istio names the filter.
    pub filter_name: String,
    pub phase: Phase,
    /// `None` is lower than any explicit priority.
    pub priority: Option<i64>,
    pub fail_strategy: FailStrategy,
    /// Resolved `vmConfig.env`: HOST values are read from the control plane's environment.
    pub env: Vec<(String, String)>,
    pub plugin_type: PluginType,
    /// The object's `metadata.resourceVersion`: an `Always` plugin re-pulls when it changes.
    pub resource_version: String,
    pub generation: i64,
}

/// A gateway's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GatewayRole {
    /// An ingress gateway (any class other than `istio-waypoint`).
    Ingress,
    /// A waypoint (class `istio-waypoint`), and what traffic it takes (`istio.io/waypoint-for`).
    Waypoint { waypoint_for: WaypointFor },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaypointFor {
    Service,
    Workload,
    All,
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Every gateway and waypoint, sorted by key.
    pub gateways: Vec<GatewayConfig>,
    /// Every service, sorted by key.
    pub services: Vec<ServiceConfig>,
    /// Every plugin referenced by at least one chain, by id.
    pub plugins: BTreeMap<PluginId, PluginConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayConfig {
    pub key: ObjectKey,
    pub class_name: String,
    pub role: GatewayRole,
    pub listeners: Vec<ListenerConfig>,
    /// Waypoints only: the services whose traffic this waypoint takes, with their chains.
    pub waypoint_services: Vec<WaypointService>,
    /// `metadata.generation` of the Gateway, for status.
    pub generation: i64,
    /// The `waystone.io/access-log` annotation; `None`: the process default (`--access-log`).
    #[serde(default)]
    pub access_log: Option<AccessLogFormat>,
}

/// Access log format of a gateway or waypoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Off,
    /// Istio's default text line (Envoy's format plus `response_code_details`).
    Text,
    Json,
}

impl AccessLogFormat {
    /// `off`, `text` or `json` (as the annotation and `--access-log` spell it).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Self::Off),
            "text" => Some(Self::Text),
            "json" => Some(Self::Json),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerConfig {
    pub name: String,
    pub port: u16,
    /// `HTTP`, `HTTPS`, `TCP`, `HBONE`, ... as written.
    pub protocol: String,
    pub hostname: Option<String>,
    /// Ingress only: the routes attached to this listener, in Gateway API precedence order.
    pub routes: Vec<RouteConfig>,
    /// Ingress only: the plugin chain, in execution order. On a `TCP` listener these are the
    /// `NETWORK` plugins, on any other the `HTTP` ones.
    pub chain: Vec<PluginId>,
    /// Ingress `TCP` listeners only: the TCPRoute rules attached, oldest route first; the first
    /// one with a backend carries the listener's bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp_routes: Vec<TcpRouteConfig>,
}

impl ListenerConfig {
    /// A listener whose connections are relayed as bytes (protocol `TCP`).
    pub fn is_tcp(&self) -> bool {
        self.protocol == "TCP"
    }

    /// The routes attached to this listener, each once, and their kind (`TCPRoute` on a `TCP`
    /// listener, else `HTTPRoute`): what Gateway status counts and route status checks.
    pub fn attached_routes(&self) -> (BTreeSet<&ObjectKey>, &'static str) {
        if self.is_tcp() {
            (
                self.tcp_routes.iter().map(|r| &r.route).collect(),
                "TCPRoute",
            )
        } else {
            (self.routes.iter().map(|r| &r.route).collect(), "HTTPRoute")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TcpRouteConfig {
    /// `namespace/name` of the TCPRoute, and the rule index.
    pub route: ObjectKey,
    pub rule_index: usize,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteConfig {
    /// `namespace/name` of the HTTPRoute, and the rule index.
    pub route: ObjectKey,
    pub rule_index: usize,
    /// Empty: any host.
    pub hostnames: Vec<String>,
    /// Empty: match everything (a rule without matches matches `PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    pub backends: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<HeaderMatch>,
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeaderMatch {
    /// Lowercased for headers; as written for query parameters.
    pub name: String,
    pub value: String,
    pub regex: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub service: ObjectKey,
    pub port: u16,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaypointService {
    pub service: ObjectKey,
    /// One chain per service port (a plugin's `match.ports` may select some ports only).
    pub ports: Vec<PortChain>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortChain {
    pub port: u16,
    /// `HTTP` plugins, for a port the waypoint serves as HTTP (empty on a TCP port).
    pub chain: Vec<PluginId>,
    /// How the waypoint serves the port.
    #[serde(default)]
    pub protocol: PortProtocol,
    /// `NETWORK` plugins, for a TCP port (empty on an HTTP port).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_chain: Vec<PluginId>,
}

/// How a waypoint treats a service port: Istio reads `appProtocol`, else the port name's
/// prefix (`http-web`, `tcp-db`). A port that says neither is served as HTTP here (Istio
/// sniffs the first bytes instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum PortProtocol {
    #[default]
    Http,
    Tcp,
}

impl PortProtocol {
    /// Istio's protocol names (case-insensitive, `kubernetes.io/h2c` and `kubernetes.io/ws`
    /// included): HTTP-like ones give `Http`; `tcp`, `tls`, `https` and the database protocols
    /// give `Tcp`; anything else is `None` (not said).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "http" | "http2" | "http_proxy" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
            | "kubernetes.io/ws" => Some(Self::Http),
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
                Some(Self::Tcp)
            }
            _ => None,
        }
    }

    /// `appProtocol` first, then the name up to its first `-`; unsaid means HTTP.
    pub fn of_port(port: &ServicePortConfig) -> Self {
        port.app_protocol
            .as_deref()
            .and_then(Self::from_name)
            .or_else(|| {
                let name = port.name.as_deref()?;
                Self::from_name(name.split('-').next().unwrap_or(name))
            })
            .unwrap_or(Self::Http)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceConfig {
    pub key: ObjectKey,
    pub labels: BTreeMap<String, String>,
    /// `spec.clusterIP`, when set and not `None`.
    pub cluster_ip: Option<String>,
    pub ports: Vec<ServicePortConfig>,
    /// The waypoint this service's traffic goes through, if any (after Service/Namespace
    /// labels, `none`, `use-waypoint-namespace` and the waypoint's `waypoint-for`).
    pub waypoint: Option<ObjectKey>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServicePortConfig {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: String,
    pub app_protocol: Option<String>,
    /// Ready endpoints for this port, from the EndpointSlices labelled
    /// `kubernetes.io/service-name=<service>` (port matched by name).
    pub endpoints: Vec<SocketAddr>,
}

impl Snapshot {
    pub fn empty() -> Self {
        Self {
            gateways: Vec::new(),
            services: Vec::new(),
            plugins: BTreeMap::new(),
        }
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceConfig> {
        self.services
            .binary_search_by(|s| s.key.cmp(key))
            .ok()
            .map(|i| &self.services[i])
    }

    pub fn gateway(&self, key: &ObjectKey) -> Option<&GatewayConfig> {
        self.gateways
            .binary_search_by(|g| g.key.cmp(key))
            .ok()
            .map(|i| &self.gateways[i])
    }
}
