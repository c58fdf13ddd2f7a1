//! The one pure function from resources to the [`Snapshot`] the data plane runs.
//!
//! Rules follow Istio (`pilot/pkg/model/{extensions,policyattachment,push_context}.go`) and the
//! Gateway API; `/work/shared/reference/istio-wasm-semantics.md` is the written spec. A bad
//! object is rejected alone, with an [`ObjectError`]; the rest still translates.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use serde_json::Value;

use crate::object::Resource;
use crate::resources::{
    self as r, ObjectMeta, PolicyTargetReference, TrafficSelector, WorkloadMode,
};
use crate::snapshot::*;
use crate::validate::url_digest;

const WAYPOINT_CLASS: &str = "istio-waypoint";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const LABEL_USE_WAYPOINT: &str = "istio.io/use-waypoint";
const LABEL_USE_WAYPOINT_NS: &str = "istio.io/use-waypoint-namespace";
const LABEL_WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";
const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// Inputs of the translation that do not come from resources.
#[derive(Debug, Clone, PartialEq)]
pub struct TranslateOptions {
    /// Istio's root namespace: its plugins with a selector apply mesh-wide, and only it may
    /// target `GatewayClass istio-waypoint`.
    pub root_namespace: String,
    /// The control plane's environment, for `vmConfig.env[].valueFrom: HOST`.
    pub host_env: BTreeMap<String, String>,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            root_namespace: "istio-system".to_string(),
            host_env: BTreeMap::new(),
        }
    }
}

/// The snapshot, and the objects that were left out of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Translation {
    pub snapshot: Snapshot,
    pub errors: Vec<ObjectError>,
}

/// One object rejected by the translation (the others still apply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    /// The Kind, e.g. `WasmPlugin`.
    pub kind: &'static str,
    /// Namespace is empty for cluster-scoped kinds.
    pub key: ObjectKey,
    pub message: String,
}

impl std::fmt::Display for ObjectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.namespace.is_empty() {
            write!(f, "{} {}: {}", self.kind, self.key.name, self.message)
        } else {
            write!(f, "{} {}: {}", self.kind, self.key, self.message)
        }
    }
}

fn key_of(res: &Resource) -> ObjectKey {
    let m = res.meta();
    let ns = if res.kind_info().namespaced {
        m.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".to_string())
    } else {
        String::new()
    };
    ObjectKey::new(ns, m.name.clone())
}

/// A plugin after normalization, with what attachment needs.
struct Extension<'a> {
    meta: &'a ObjectMeta,
    key: ObjectKey,
    selector: Option<&'a BTreeMap<String, String>>,
    target_refs: Vec<&'a PolicyTargetReference>,
    matches: &'a [TrafficSelector],
    config: PluginConfig,
}

/// The fields WasmPlugin and `TrafficExtension.spec.wasm` share.
struct Module<'a> {
    url: &'a str,
    sha256: Option<&'a str>,
    image_pull_policy: Option<r::ImagePullPolicy>,
    image_pull_secret: Option<&'a str>,
    plugin_config: Option<&'a Value>,
    plugin_name: Option<&'a str>,
    fail_strategy: Option<r::WasmFailStrategy>,
    vm_config: Option<&'a r::VmConfig>,
    plugin_type: Option<r::WasmPluginType>,
}

struct Index<'a> {
    namespaces: BTreeMap<&'a str, &'a r::Namespace>,
    classes: BTreeMap<&'a str, &'a r::GatewayClass>,
    gateways: BTreeMap<ObjectKey, &'a r::Gateway>,
    routes: Vec<(ObjectKey, &'a r::HttpRoute)>,
    tcp_routes: Vec<(ObjectKey, &'a r::TcpRoute)>,
    services: BTreeMap<ObjectKey, &'a r::Service>,
    slices: Vec<(ObjectKey, &'a r::EndpointSlice)>,
    secrets: BTreeMap<ObjectKey, &'a r::Secret>,
    extensions: Vec<Extension<'a>>,
}

impl Index<'_> {
    fn namespace_labels(&self, ns: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(ns).map(|n| &n.metadata.labels)
    }
}

/// Translates every object into one snapshot. Pure: same input, same output.
pub fn translate(objects: &[Resource], opts: &TranslateOptions) -> Translation {
    let mut errors = Vec::new();

    // Later copies of the same object replace earlier ones, as a re-apply would.
    let mut latest: BTreeMap<(&'static str, ObjectKey), &Resource> = BTreeMap::new();
    for res in objects {
        latest.insert((res.kind_info().kind, key_of(res)), res);
    }

    let mut idx = Index {
        namespaces: BTreeMap::new(),
        classes: BTreeMap::new(),
        gateways: BTreeMap::new(),
        routes: Vec::new(),
        tcp_routes: Vec::new(),
        services: BTreeMap::new(),
        slices: Vec::new(),
        secrets: BTreeMap::new(),
        extensions: Vec::new(),
    };
    let mut plugin_objects = Vec::new();
    for ((kind, key), res) in &latest {
        if let Err(e) = res.validate() {
            let message = e
                .issues
                .iter()
                .map(|i| format!("{}: {}", i.field, i.message))
                .collect::<Vec<_>>()
                .join("; ");
            errors.push(ObjectError {
                kind,
                key: key.clone(),
                message,
            });
            continue;
        }
        match res {
            Resource::Namespace(n) => {
                idx.namespaces.insert(n.metadata.name.as_str(), n);
            }
            Resource::GatewayClass(c) => {
                idx.classes.insert(c.metadata.name.as_str(), c);
            }
            Resource::Gateway(g) => {
                idx.gateways.insert(key.clone(), g);
            }
            Resource::HttpRoute(h) => idx.routes.push((key.clone(), h)),
            Resource::TcpRoute(t) => idx.tcp_routes.push((key.clone(), t)),
            Resource::Service(s) => {
                idx.services.insert(key.clone(), s);
            }
            Resource::EndpointSlice(s) => idx.slices.push((key.clone(), s)),
            Resource::Secret(s) => {
                idx.secrets.insert(key.clone(), s);
            }
            Resource::WasmPlugin(_) | Resource::TrafficExtension(_) => {
                plugin_objects.push((key.clone(), *res))
            }
        }
    }
    for (key, res) in plugin_objects {
        match extension_of(res, key.clone(), &idx, opts) {
            Ok(ext) => idx.extensions.push(ext),
            Err(message) => errors.push(ObjectError {
                kind: res.kind_info().kind,
                key,
                message,
            }),
        }
    }

    let services: Vec<ServiceConfig> = idx
        .services
        .iter()
        .map(|(key, svc)| service_config(key, svc, &idx))
        .collect();

    let mut gateways = Vec::new();
    for (key, gw) in &idx.gateways {
        let mut config = gateway_config(key, gw, &idx, &services, opts);
        // A bad annotation must not take the gateway down: it serves with the process
        // default, and the error refuses the write (embedded) or shows on its status.
        match access_log_annotation(gw) {
            Ok(format) => config.access_log = format,
            Err(message) => errors.push(ObjectError {
                kind: "Gateway",
                key: key.clone(),
                message,
            }),
        }
        gateways.push(config);
    }

    let mut used = BTreeSet::new();
    for g in &gateways {
        for l in &g.listeners {
            used.extend(l.chain.iter().cloned());
        }
        for ws in &g.waypoint_services {
            for p in &ws.ports {
                used.extend(p.chain.iter().cloned());
                used.extend(p.network_chain.iter().cloned());
            }
        }
    }
    let plugins = idx
        .extensions
        .iter()
        .filter(|e| used.contains(&e.config.id))
        .map(|e| (e.config.id.clone(), e.config.clone()))
        .collect();

    Translation {
        snapshot: Snapshot {
            gateways,
            services,
            plugins,
        },
        errors,
    }
}

// ---------------------------------------------------------------- plugins

fn extension_of<'a>(
    res: &'a Resource,
    key: ObjectKey,
    idx: &Index<'a>,
    opts: &TranslateOptions,
) -> Result<Extension<'a>, String> {
    match res {
        Resource::WasmPlugin(p) => {
            let s = &p.spec;
            // The deprecated single targetRef only counts when targetRefs is empty.
            let target_refs = if s.target_refs.is_empty() {
                s.target_ref.iter().collect()
            } else {
                s.target_refs.iter().collect()
            };
            let phase = match s.phase {
                Some(r::WasmPhase::Authn) => Phase::Authn,
                Some(r::WasmPhase::Authz) => Phase::Authz,
                Some(r::WasmPhase::Stats) => Phase::Stats,
                Some(r::WasmPhase::Unspecified) | None => Phase::Unspecified,
            };
            let module = Module {
                url: &s.url,
                sha256: s.sha256.as_deref(),
                image_pull_policy: s.image_pull_policy,
                image_pull_secret: s.image_pull_secret.as_deref(),
                plugin_config: s.plugin_config.as_ref(),
                plugin_name: s.plugin_name.as_deref(),
                fail_strategy: s.fail_strategy,
                vm_config: s.vm_config.as_ref(),
                plugin_type: s.type_,
            };
            let id = PluginId {
                kind: ExtensionKind::WasmPlugin,
                key: key.clone(),
            };
            Ok(Extension {
                meta: &p.metadata,
                config: plugin_config(id, &p.metadata, &module, phase, s.priority, idx, opts),
                key,
                selector: s.selector.as_ref().map(|s| &s.match_labels),
                target_refs,
                matches: &s.match_,
            })
        }
        Resource::TrafficExtension(t) => {
            let s = &t.spec;
            let Some(w) = &s.wasm else {
                return Err(
                    "spec.lua: lua is not supported; only wasm extensions run here".to_string(),
                );
            };
            let phase = match s.phase {
                Some(r::TrafficExtensionPhase::Authn) => Phase::Authn,
                Some(r::TrafficExtensionPhase::Authz) => Phase::Authz,
                Some(r::TrafficExtensionPhase::Stats) => Phase::Stats,
                Some(r::TrafficExtensionPhase::Unspecified) | None => Phase::Unspecified,
            };
            let module = Module {
                url: &w.url,
                sha256: w.sha256.as_deref(),
                image_pull_policy: w.image_pull_policy,
                image_pull_secret: w.image_pull_secret.as_deref(),
                plugin_config: w.plugin_config.as_ref(),
                plugin_name: w.plugin_name.as_deref(),
                fail_strategy: w.fail_strategy,
                vm_config: w.vm_config.as_ref(),
                plugin_type: w.type_,
            };
            let id = PluginId {
                kind: ExtensionKind::TrafficExtension,
                key: key.clone(),
            };
            Ok(Extension {
                meta: &t.metadata,
                config: plugin_config(id, &t.metadata, &module, phase, s.priority, idx, opts),
                key,
                selector: s.selector.as_ref().map(|s| &s.match_labels),
                target_refs: s.target_refs.iter().collect(),
                matches: &s.match_,
            })
        }
        other => Err(format!("{} is not a plugin kind", other.kind_info().kind)),
    }
}

fn plugin_config(
    id: PluginId,
    meta: &ObjectMeta,
    m: &Module<'_>,
    phase: Phase,
    priority: Option<i64>,
    idx: &Index<'_>,
    opts: &TranslateOptions,
) -> PluginConfig {
    let url = normalize_url(m.url);
    let sha256 = m
        .sha256
        .filter(|s| !s.is_empty())
        .or_else(|| url_digest(&url))
        .map(|s| s.to_ascii_lowercase());
    let pull_policy = pull_policy(&url, sha256.is_some(), m.image_pull_policy);
    let pull_secret = m
        .image_pull_secret
        .map(|name| pull_secret(&id.key.namespace, name, idx));
    let configuration = match m.plugin_config {
        None | Some(Value::Null) => Vec::new(),
        // Istio passes no configuration for an empty object either.
        Some(Value::Object(o)) if o.is_empty() => Vec::new(),
        Some(v) => serde_json::to_vec(v).unwrap_or_default(),
    };
    let env = m
        .vm_config
        .map(|vm| {
            vm.env
                .iter()
                .filter_map(
                    |e| match e.value_from.unwrap_or(r::EnvValueSource::Inline) {
                        r::EnvValueSource::Inline => {
                            Some((e.name.clone(), e.value.clone().unwrap_or_default()))
                        }
                        // A HOST variable the control plane does not have is simply not set, as
                        // Envoy does for missing host variables.
                        r::EnvValueSource::Host => opts
                            .host_env
                            .get(&e.name)
                            .map(|v| (e.name.clone(), v.clone())),
                    },
                )
                .collect()
        })
        .unwrap_or_default();
    PluginConfig {
        filter_name: format!("{}.{}", id.key.namespace, id.key.name),
        id,
        url,
        sha256,
        pull_policy,
        pull_secret,
        configuration,
        root_id: m.plugin_name.unwrap_or_default().to_string(),
        phase,
        priority,
        fail_strategy: match m.fail_strategy {
            Some(r::WasmFailStrategy::FailOpen) => FailStrategy::FailOpen,
            Some(r::WasmFailStrategy::FailReload) => FailStrategy::FailReload,
            Some(r::WasmFailStrategy::FailClose) | None => FailStrategy::FailClose,
        },
        env,
        plugin_type: match m.plugin_type {
            Some(r::WasmPluginType::Network) => PluginType::Network,
            _ => PluginType::Http,
        },
        resource_version: meta.resource_version.clone().unwrap_or_default(),
        generation: meta.generation.unwrap_or(0),
    }
}

/// Istio's rule: a url without a scheme is an OCI reference.
pub(crate) fn normalize_url(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("oci://{url}")
    }
}

/// Explicit policy wins. Otherwise a pinned digest never needs a re-pull, and an OCI
/// reference tagged `latest` (or untagged, which means `latest`) is pulled again on change.
fn pull_policy(url: &str, pinned: bool, explicit: Option<r::ImagePullPolicy>) -> PullPolicy {
    match explicit {
        Some(r::ImagePullPolicy::Always) => return PullPolicy::Always,
        Some(r::ImagePullPolicy::IfNotPresent) => return PullPolicy::IfNotPresent,
        Some(r::ImagePullPolicy::Unspecified) | None => {}
    }
    if pinned {
        return PullPolicy::IfNotPresent;
    }
    if let Some(reference) = url.strip_prefix("oci://") {
        let last = reference.rsplit('/').next().unwrap_or(reference);
        let tag = last.split_once(':').map(|(_, t)| t);
        if tag.is_none_or(|t| t == "latest") {
            return PullPolicy::Always;
        }
    }
    PullPolicy::IfNotPresent
}

fn pull_secret(namespace: &str, name: &str, idx: &Index<'_>) -> Result<Vec<u8>, String> {
    let key = ObjectKey::new(namespace, name);
    let secret = idx
        .secrets
        .get(&key)
        .ok_or_else(|| format!("secret {key} not found"))?;
    let ty = secret.type_.as_deref().unwrap_or("Opaque");
    if ty != DOCKER_CONFIG_TYPE {
        return Err(format!(
            "secret {key} is of type {ty}, expected {DOCKER_CONFIG_TYPE}"
        ));
    }
    if let Some(plain) = secret.string_data.get(DOCKER_CONFIG_KEY) {
        return Ok(plain.as_bytes().to_vec());
    }
    let encoded = secret
        .data
        .get(DOCKER_CONFIG_KEY)
        .ok_or_else(|| format!("secret {key} has no {DOCKER_CONFIG_KEY} key"))?;
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| format!("secret {key}: {DOCKER_CONFIG_KEY} is not valid base64"))
}

/// Whether a plugin's `match` list selects traffic of this direction on this port. Any entry
/// may match; an entry with no mode (UNDEFINED) or CLIENT_AND_SERVER matches both directions.
fn match_applies(matches: &[TrafficSelector], mode: WorkloadMode, port: u16) -> bool {
    matches.is_empty()
        || matches.iter().any(|m| {
            let mode_ok = match m.mode.unwrap_or(WorkloadMode::Undefined) {
                WorkloadMode::Undefined | WorkloadMode::ClientAndServer => true,
                other => other == mode,
            };
            mode_ok && (m.ports.is_empty() || m.ports.iter().any(|p| p.number == i64::from(port)))
        })
}

/// Chain order: phase (AUTHN, AUTHZ, STATS, UNSPECIFIED), then higher priority first with an
/// unset priority after every explicit one, then older creationTimestamp, name, namespace.
fn ordered_chain(mut exts: Vec<&Extension<'_>>) -> Vec<PluginId> {
    exts.sort_by(|a, b| {
        let key = |e: &Extension<'_>| {
            (
                e.config.phase,
                match e.config.priority {
                    Some(p) => (0, Reverse(p)),
                    None => (1, Reverse(0)),
                },
                e.meta.creation_timestamp.clone().unwrap_or_default(),
                e.key.name.clone(),
                e.key.namespace.clone(),
                e.config.id.kind,
            )
        };
        key(a).cmp(&key(b))
    });
    exts.into_iter().map(|e| e.config.id.clone()).collect()
}

fn refs_gateway(e: &Extension<'_>, gw: &ObjectKey) -> bool {
    e.key.namespace == gw.namespace
        && e.target_refs
            .iter()
            .any(|r| r.kind == "Gateway" && r.group == GATEWAY_GROUP && r.name == gw.name)
}

fn refs_waypoint_class(e: &Extension<'_>, root_ns: &str) -> bool {
    e.key.namespace == root_ns
        && e.target_refs.iter().any(|r| {
            r.kind == "GatewayClass" && r.group == GATEWAY_GROUP && r.name == WAYPOINT_CLASS
        })
}

fn refs_service(e: &Extension<'_>, svc: &ObjectKey) -> bool {
    e.key.namespace == svc.namespace
        && e.target_refs.iter().any(|r| {
            r.kind == "Service" && (r.group.is_empty() || r.group == "core") && r.name == svc.name
        })
}

/// Selector-based attachment, which only ingress gateways honour. Plugins in the root
/// namespace apply mesh-wide, as Istio's root-namespace policies do.
fn selector_matches(
    e: &Extension<'_>,
    gw: &ObjectKey,
    pod_labels: &BTreeMap<String, String>,
    root_ns: &str,
) -> bool {
    e.target_refs.is_empty()
        && (e.key.namespace == gw.namespace || e.key.namespace == root_ns)
        && e.selector
            .is_none_or(|sel| sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
}

// ---------------------------------------------------------------- services

/// Which waypoint a service's traffic goes through. Labels come in pairs from one object:
/// the Service's own `use-waypoint`(+`-namespace`), else its Namespace's.
fn service_waypoint(key: &ObjectKey, svc: &r::Service, idx: &Index<'_>) -> Option<ObjectKey> {
    let svc_labels = &svc.metadata.labels;
    let (name, ns) = match svc_labels.get(LABEL_USE_WAYPOINT) {
        Some(name) => (name.clone(), svc_labels.get(LABEL_USE_WAYPOINT_NS).cloned()),
        None => {
            let ns_labels = idx.namespace_labels(&key.namespace)?;
            let name = ns_labels.get(LABEL_USE_WAYPOINT)?;
            (name.clone(), ns_labels.get(LABEL_USE_WAYPOINT_NS).cloned())
        }
    };
    if name.is_empty() || name == "none" {
        return None;
    }
    let wp = ObjectKey::new(
        ns.filter(|n| !n.is_empty())
            .unwrap_or_else(|| key.namespace.clone()),
        name,
    );
    let gw = idx.gateways.get(&wp)?;
    if gw.spec.gateway_class_name != WAYPOINT_CLASS {
        return None;
    }
    match waypoint_for(gw, idx) {
        WaypointFor::Service | WaypointFor::All => Some(wp),
        WaypointFor::Workload | WaypointFor::None => None,
    }
}

fn waypoint_for(gw: &r::Gateway, idx: &Index<'_>) -> WaypointFor {
    let label = gw.metadata.labels.get(LABEL_WAYPOINT_FOR).or_else(|| {
        idx.classes
            .get(gw.spec.gateway_class_name.as_str())
            .and_then(|c| c.metadata.labels.get(LABEL_WAYPOINT_FOR))
    });
    match label.map(String::as_str) {
        Some("workload") => WaypointFor::Workload,
        Some("all") => WaypointFor::All,
        Some("none") => WaypointFor::None,
        // `service` is the default, and what Istio falls back to for values it does not know.
        _ => WaypointFor::Service,
    }
}

fn service_config(key: &ObjectKey, svc: &r::Service, idx: &Index<'_>) -> ServiceConfig {
    let slices: Vec<&r::EndpointSlice> = idx
        .slices
        .iter()
        .filter(|(k, s)| {
            k.namespace == key.namespace
                && s.metadata
                    .labels
                    .get(LABEL_SERVICE_NAME)
                    .map(String::as_str)
                    == Some(key.name.as_str())
        })
        .map(|(_, s)| *s)
        .collect();
    let ports = svc
        .spec
        .ports
        .iter()
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let name = p.name.clone().filter(|n| !n.is_empty());
            let mut endpoints = BTreeSet::new();
            for slice in &slices {
                for sp in &slice.ports {
                    // Slice ports carry the Service port's name; both unnamed also matches.
                    if sp.name.as_deref().filter(|n| !n.is_empty()) != name.as_deref() {
                        continue;
                    }
                    let Some(number) = sp.port.and_then(|n| u16::try_from(n).ok()) else {
                        continue;
                    };
                    for ep in &slice.endpoints {
                        if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                            continue;
                        }
                        for a in &ep.addresses {
                            if let Ok(ip) = a.parse::<IpAddr>() {
                                endpoints.insert(SocketAddr::new(ip, number));
                            }
                        }
                    }
                }
            }
            Some(ServicePortConfig {
                name,
                port,
                protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                app_protocol: p.app_protocol.clone(),
                endpoints: endpoints.into_iter().collect(),
            })
        })
        .collect();
    ServiceConfig {
        key: key.clone(),
        labels: svc.metadata.labels.clone(),
        cluster_ip: svc
            .spec
            .cluster_ip
            .clone()
            .filter(|ip| !ip.is_empty() && ip != "None"),
        ports,
        waypoint: service_waypoint(key, svc, idx),
    }
}

// ---------------------------------------------------------------- gateways

fn gateway_config(
    key: &ObjectKey,
    gw: &r::Gateway,
    idx: &Index<'_>,
    services: &[ServiceConfig],
    opts: &TranslateOptions,
) -> GatewayConfig {
    let class_name = gw.spec.gateway_class_name.clone();
    let is_waypoint = class_name == WAYPOINT_CLASS;
    let role = if is_waypoint {
        GatewayRole::Waypoint {
            waypoint_for: waypoint_for(gw, idx),
        }
    } else {
        GatewayRole::Ingress
    };
    let listeners = gw
        .spec
        .listeners
        .iter()
        .filter_map(|l| {
            let port = u16::try_from(l.port).ok()?;
            let tcp = l.protocol == "TCP";
            let (routes, tcp_routes, chain) = if is_waypoint {
                (Vec::new(), Vec::new(), Vec::new())
            } else {
                // Istio puts NETWORK plugins in the network filter chain of TCP listeners and
                // HTTP plugins in the HTTP filter chain of HTTP ones.
                let kind = if tcp {
                    PluginType::Network
                } else {
                    PluginType::Http
                };
                (
                    listener_routes(key, l, idx),
                    listener_tcp_routes(key, l, idx),
                    ingress_chain(key, gw, port, kind, idx, opts),
                )
            };
            Some(ListenerConfig {
                name: l.name.clone(),
                port,
                protocol: l.protocol.clone(),
                hostname: l.hostname.clone(),
                routes,
                chain,
                tcp_routes,
            })
        })
        .collect();
    let waypoint_services = if is_waypoint {
        services
            .iter()
            .filter(|s| s.waypoint.as_ref() == Some(key))
            .map(|s| WaypointService {
                service: s.key.clone(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| {
                        let protocol = PortProtocol::of_port(p);
                        let chain = |kind| waypoint_chain(key, &s.key, p.port, kind, idx, opts);
                        match protocol {
                            PortProtocol::Http => PortChain {
                                port: p.port,
                                chain: chain(PluginType::Http),
                                protocol,
                                network_chain: Vec::new(),
                            },
                            PortProtocol::Tcp => PortChain {
                                port: p.port,
                                chain: Vec::new(),
                                protocol,
                                network_chain: chain(PluginType::Network),
                            },
                        }
                    })
                    .collect(),
            })
            .collect()
    } else {
        Vec::new()
    };
    GatewayConfig {
        key: key.clone(),
        class_name,
        role,
        listeners,
        waypoint_services,
        generation: gw.metadata.generation.unwrap_or(0),
        access_log: None,
    }
}

/// Per-gateway access log format: `off`, `text` or `json`; absent: the process default.
pub const ACCESS_LOG_ANNOTATION: &str = "waystone.io/access-log";

/// The gateway's access log format from [`ACCESS_LOG_ANNOTATION`]; an unknown value is an
/// error naming the annotation and the values it accepts.
pub fn access_log_annotation(gw: &r::Gateway) -> Result<Option<AccessLogFormat>, String> {
    let Some(value) = gw.metadata.annotations.get(ACCESS_LOG_ANNOTATION) else {
        return Ok(None);
    };
    AccessLogFormat::parse(value.trim()).map(Some).ok_or_else(|| {
        format!(
            "metadata.annotations[{ACCESS_LOG_ANNOTATION}]: unknown value {value:?} (allowed: off, text, json)"
        )
    })
}

/// The labels Istio's gateway deployment puts on its pods, which selectors match.
fn gateway_pod_labels(key: &ObjectKey, gw: &r::Gateway) -> BTreeMap<String, String> {
    let mut labels = gw
        .spec
        .infrastructure
        .as_ref()
        .map(|i| i.labels.clone())
        .unwrap_or_default();
    labels.insert(
        "gateway.networking.k8s.io/gateway-name".to_string(),
        key.name.clone(),
    );
    labels.insert("istio.io/gateway-name".to_string(), key.name.clone());
    labels
}

fn ingress_chain(
    key: &ObjectKey,
    gw: &r::Gateway,
    port: u16,
    kind: PluginType,
    idx: &Index<'_>,
    opts: &TranslateOptions,
) -> Vec<PluginId> {
    let pod_labels = gateway_pod_labels(key, gw);
    let exts = idx
        .extensions
        .iter()
        .filter(|e| e.config.plugin_type == kind)
        .filter(|e| {
            refs_gateway(e, key) || selector_matches(e, key, &pod_labels, &opts.root_namespace)
        })
        // Istio classifies gateway listeners as ListenerClassGateway, whose traffic mode is
        // CLIENT (workloadModeForListenerClass in pilot/pkg/model/extensions.go).
        .filter(|e| match_applies(e.matches, WorkloadMode::Client, port))
        .collect();
    ordered_chain(exts)
}

/// A waypoint never applies selector-only plugins: only targetRefs to the waypoint, to the
/// `istio-waypoint` class (root namespace), or to the destination Service attach.
fn waypoint_chain(
    waypoint: &ObjectKey,
    service: &ObjectKey,
    port: u16,
    kind: PluginType,
    idx: &Index<'_>,
    opts: &TranslateOptions,
) -> Vec<PluginId> {
    let exts = idx
        .extensions
        .iter()
        .filter(|e| e.config.plugin_type == kind)
        .filter(|e| {
            refs_gateway(e, waypoint)
                || refs_waypoint_class(e, &opts.root_namespace)
                || refs_service(e, service)
        })
        // Waypoints take inbound traffic for the service: SERVER.
        .filter(|e| match_applies(e.matches, WorkloadMode::Server, port))
        .collect();
    ordered_chain(exts)
}

// ---------------------------------------------------------------- routes

fn listener_routes(key: &ObjectKey, l: &r::Listener, idx: &Index<'_>) -> Vec<RouteConfig> {
    if !matches!(l.protocol.as_str(), "HTTP" | "HTTPS") || !allows_http_route(l) {
        return Vec::new();
    }
    let mut candidates = Vec::new();
    for (rkey, route) in &idx.routes {
        let attached = route
            .spec
            .parent_refs
            .iter()
            .any(|p| parent_ref_selects(p, &rkey.namespace, key, l));
        if !attached || !namespace_allowed(l, &key.namespace, &rkey.namespace, idx) {
            continue;
        }
        let Some(hostnames) = intersect_hostnames(l.hostname.as_deref(), &route.spec.hostnames)
        else {
            continue;
        };
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let rank = rule_rank(rule);
            let config = RouteConfig {
                route: rkey.clone(),
                rule_index: i,
                hostnames: hostnames.clone(),
                matches: rule.matches.iter().map(route_match).collect(),
                backends: service_backends(&rule.backend_refs, &rkey.namespace),
            };
            let created = route
                .metadata
                .creation_timestamp
                .clone()
                .unwrap_or_default();
            candidates.push(((rank, created, rkey.clone(), i), config));
        }
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    candidates.into_iter().map(|(_, c)| c).collect()
}

/// Whether a route's parentRef (the route in `route_ns`) names listener `l` of gateway `key`.
fn parent_ref_selects(
    p: &r::ParentReference,
    route_ns: &str,
    key: &ObjectKey,
    l: &r::Listener,
) -> bool {
    p.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
        && p.kind.as_deref().unwrap_or("Gateway") == "Gateway"
        && p.namespace.as_deref().unwrap_or(route_ns) == key.namespace
        && p.name == key.name
        && p.section_name.as_ref().is_none_or(|s| *s == l.name)
        && p.port.is_none_or(|port| port == l.port)
}

/// The Service backends of a rule (other kinds are not routed to), namespaced like the route
/// when the reference does not say; a reference without a valid port is left out (validation
/// reports it).
fn service_backends<F: r::BackendFilters>(
    refs: &[r::BackendRefOf<F>],
    route_ns: &str,
) -> Vec<Backend> {
    refs.iter()
        .filter(|b| {
            b.kind.as_deref().unwrap_or("Service") == "Service"
                && matches!(b.group.as_deref().unwrap_or(""), "" | "core")
        })
        .filter_map(|b| {
            Some(Backend {
                service: ObjectKey::new(
                    b.namespace.clone().unwrap_or_else(|| route_ns.to_string()),
                    b.name.clone(),
                ),
                port: u16::try_from(b.port?).ok()?,
                weight: u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0),
            })
        })
        .collect()
}

/// TCPRoutes attached to a `TCP` listener (same parentRef rules as HTTPRoutes, no hostnames),
/// oldest first, then by namespace/name: Gateway API gives a listener's traffic to the oldest
/// route when several claim it.
fn listener_tcp_routes(key: &ObjectKey, l: &r::Listener, idx: &Index<'_>) -> Vec<TcpRouteConfig> {
    if l.protocol != "TCP" || !allows_route_kind(l, "TCPRoute") {
        return Vec::new();
    }
    let mut candidates = Vec::new();
    for (rkey, route) in &idx.tcp_routes {
        let attached = route
            .spec
            .parent_refs
            .iter()
            .any(|p| parent_ref_selects(p, &rkey.namespace, key, l));
        if !attached || !namespace_allowed(l, &key.namespace, &rkey.namespace, idx) {
            continue;
        }
        let created = route
            .metadata
            .creation_timestamp
            .clone()
            .unwrap_or_default();
        for (i, rule) in route.spec.rules.iter().enumerate() {
            let config = TcpRouteConfig {
                route: rkey.clone(),
                rule_index: i,
                backends: service_backends(&rule.backend_refs, &rkey.namespace),
            };
            candidates.push(((created.clone(), rkey.clone(), i), config));
        }
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0));
    candidates.into_iter().map(|(_, c)| c).collect()
}

/// Whether `allowedRoutes.kinds` admits `kind`; unset or empty means the kinds that fit the
/// listener's protocol.
fn allows_route_kind(l: &r::Listener, kind: &str) -> bool {
    match l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
        None => true,
        Some(kinds) if kinds.is_empty() => true,
        Some(kinds) => kinds.iter().any(|k| {
            k.kind == kind && k.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
        }),
    }
}

fn allows_http_route(l: &r::Listener) -> bool {
    match l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
        None => true,
        Some(kinds) if kinds.is_empty() => true,
        Some(kinds) => kinds.iter().any(|k| {
            k.kind == "HTTPRoute" && k.group.as_deref().unwrap_or(GATEWAY_GROUP) == GATEWAY_GROUP
        }),
    }
}

fn namespace_allowed(l: &r::Listener, gw_ns: &str, route_ns: &str, idx: &Index<'_>) -> bool {
    let ns = l
        .allowed_routes
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    match ns.and_then(|n| n.from.as_deref()).unwrap_or("Same") {
        "All" => true,
        "Selector" => {
            let empty = BTreeMap::new();
            let labels = idx.namespace_labels(route_ns).unwrap_or(&empty);
            ns.and_then(|n| n.selector.as_ref())
                .is_some_and(|sel| label_selector_matches(sel, labels))
        }
        _ => gw_ns == route_ns,
    }
}

fn label_selector_matches(sel: &r::LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    sel.match_labels
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v))
        && sel.match_expressions.iter().all(|e| {
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| e.values.contains(v)),
                "NotIn" => value.is_none_or(|v| !e.values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// Gateway API hostname intersection. `None`: the route does not attach to this listener.
fn intersect_hostnames(listener: Option<&str>, route: &[String]) -> Option<Vec<String>> {
    let Some(lh) = listener else {
        return Some(route.to_vec());
    };
    if route.is_empty() {
        return Some(vec![lh.to_string()]);
    }
    let mut out = Vec::new();
    for rh in route {
        if rh == lh || wildcard_covers(lh, rh) {
            out.push(rh.clone());
        } else if wildcard_covers(rh, lh) {
            out.push(lh.to_string());
        }
    }
    out.dedup();
    if out.is_empty() { None } else { Some(out) }
}

/// `*.example.com` covers `a.example.com` and `a.b.example.com`, not `example.com`.
fn wildcard_covers(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => {
            host.len() > suffix.len() && host.ends_with(suffix) && !host.starts_with('*')
        }
        None => false,
    }
}

/// Smaller is more specific. Gateway API precedence: exact path, then longest prefix, then
/// method, then more headers, then more query params. A rule ranks by its most specific match.
type Rank = (u8, Reverse<usize>, u8, Reverse<usize>, Reverse<usize>);

fn match_rank(m: &r::HttpRouteMatch) -> Rank {
    let (class, len) = match &m.path {
        None => (1, 1),
        Some(p) => {
            let len = p.value.as_deref().unwrap_or("/").len();
            match p.type_.unwrap_or(r::PathMatchType::PathPrefix) {
                r::PathMatchType::Exact => (0, len),
                r::PathMatchType::PathPrefix => (1, len),
                r::PathMatchType::RegularExpression => (2, len),
            }
        }
    };
    (
        class,
        Reverse(len),
        u8::from(m.method.is_none()),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
    )
}

fn rule_rank(rule: &r::HttpRouteRule) -> Rank {
    rule.matches
        .iter()
        .map(match_rank)
        .min()
        .unwrap_or((1, Reverse(1), 1, Reverse(0), Reverse(0)))
}

fn route_match(m: &r::HttpRouteMatch) -> RouteMatch {
    let header = |h: &r::HttpHeaderMatch, lower: bool| HeaderMatch {
        name: if lower {
            h.name.to_ascii_lowercase()
        } else {
            h.name.clone()
        },
        value: h.value.clone(),
        regex: h.type_ == Some(r::HeaderMatchType::RegularExpression),
    };
    RouteMatch {
        path: m.path.as_ref().map(|p| {
            let v = p.value.clone().unwrap_or_else(|| "/".to_string());
            match p.type_.unwrap_or(r::PathMatchType::PathPrefix) {
                r::PathMatchType::Exact => PathMatch::Exact(v),
                r::PathMatchType::PathPrefix => PathMatch::Prefix(v),
                r::PathMatchType::RegularExpression => PathMatch::Regex(v),
            }
        }),
        headers: m.headers.iter().map(|h| header(h, true)).collect(),
        query_params: m.query_params.iter().map(|h| header(h, false)).collect(),
        method: m.method.clone(),
    }
}
