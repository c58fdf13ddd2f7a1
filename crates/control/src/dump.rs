//! The config dump: what the data plane runs right now, as JSON (`/config_dump` on the admin
//! endpoint, `GET /v1/config_dump` on the local API, `waystone proxy-config`). Built from the
//! running [`RuntimeConfig`], the listeners' bound addresses and the reconciler's load report;
//! every list keeps the snapshot's order (sorted by key; chains in execution order).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use waystone_model::snapshot::{
    ExtensionKind, FailStrategy, GatewayRole, ObjectKey, PathMatch, Phase, PluginId, Snapshot,
    WaypointFor,
};
use waystone_proxy::{PluginSlot, RuntimeConfig};

/// What the reconciler knows about one plugin's module (kept across passes).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginReport {
    pub url: String,
    /// The module serving now (`sha256:…`), if any.
    pub digest: Option<String>,
    pub manifest_digest: Option<String>,
    /// `Loaded`, `UpdateFailed` (the previous module serves), `LoadFailed` or `Pending`.
    pub state: String,
    pub last_error: Option<String>,
}

pub type PluginReports = BTreeMap<PluginId, PluginReport>;

/// Inputs of a dump, gathered by the caller.
pub struct DumpInput<'a> {
    pub runtime: &'a RuntimeConfig,
    pub listeners: &'a BTreeMap<(ObjectKey, String, u16), SocketAddr>,
    pub reports: &'a PluginReports,
    pub entry: Option<SocketAddr>,
}

pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Authn => "AUTHN",
        Phase::Authz => "AUTHZ",
        Phase::Stats => "STATS",
        Phase::Unspecified => "UNSPECIFIED_PHASE",
    }
}

pub fn fail_strategy_name(f: FailStrategy) -> &'static str {
    match f {
        FailStrategy::FailClose => "FAIL_CLOSE",
        FailStrategy::FailOpen => "FAIL_OPEN",
        FailStrategy::FailReload => "FAIL_RELOAD",
    }
}

fn kind_name(k: ExtensionKind) -> &'static str {
    match k {
        ExtensionKind::WasmPlugin => "WasmPlugin",
        ExtensionKind::TrafficExtension => "TrafficExtension",
    }
}

fn plugin_entry(input: &DumpInput<'_>, id: &PluginId) -> Value {
    let snapshot: &Snapshot = &input.runtime.snapshot;
    let cfg = snapshot.plugins.get(id);
    let report = input.reports.get(id);
    let (state, last_error, digest) = match (input.runtime.plugins.get(id), report) {
        (_, Some(r)) => (r.state.clone(), r.last_error.clone(), r.digest.clone()),
        (Some(PluginSlot::Ready(p)), None) => {
            ("Loaded".to_string(), None, Some(p.module_digest.clone()))
        }
        (Some(PluginSlot::Failed { reason, .. }), None) => {
            ("LoadFailed".to_string(), Some(reason.clone()), None)
        }
        (None, None) => ("Pending".to_string(), None, None),
    };
    json!({
        "name": cfg.map(|c| c.filter_name.clone()).unwrap_or_else(|| format!("{}.{}", id.key.namespace, id.key.name)),
        "kind": kind_name(id.kind),
        "namespace": id.key.namespace,
        "resource": id.key.name,
        "phase": cfg.map(|c| phase_name(c.phase)),
        "priority": cfg.and_then(|c| c.priority),
        "url": cfg.map(|c| c.url.clone()),
        "sha256": cfg.and_then(|c| c.sha256.clone()),
        "digest": digest,
        "failStrategy": cfg.map(|c| fail_strategy_name(c.fail_strategy)),
        "state": state,
        "lastError": last_error,
    })
}

fn path_match(p: &PathMatch) -> String {
    match p {
        PathMatch::Exact(v) => format!("Exact {v}"),
        PathMatch::Prefix(v) => format!("PathPrefix {v}"),
        PathMatch::Regex(v) => format!("RegularExpression {v}"),
    }
}

/// The dump as JSON.
pub fn config_dump(input: &DumpInput<'_>) -> Value {
    let snapshot = &input.runtime.snapshot;
    let chain =
        |ids: &[PluginId]| -> Vec<Value> { ids.iter().map(|id| plugin_entry(input, id)).collect() };
    let gateways: Vec<Value> = snapshot
        .gateways
        .iter()
        .map(|gw| {
            let (kind, waypoint_for) = match &gw.role {
                GatewayRole::Ingress => ("gateway", None),
                GatewayRole::Waypoint { waypoint_for } => (
                    "waypoint",
                    Some(match waypoint_for {
                        WaypointFor::Service => "service",
                        WaypointFor::Workload => "workload",
                        WaypointFor::All => "all",
                        WaypointFor::None => "none",
                    }),
                ),
            };
            let listeners: Vec<Value> = gw
                .listeners
                .iter()
                .map(|l| {
                    let address = input
                        .listeners
                        .get(&(gw.key.clone(), l.name.clone(), l.port))
                        .map(|a| a.to_string());
                    let routes: Vec<Value> = l
                        .routes
                        .iter()
                        .map(|r| {
                            let matches: Vec<Value> = r
                                .matches
                                .iter()
                                .map(|m| {
                                    json!({
                                        "path": m.path.as_ref().map(path_match),
                                        "method": m.method,
                                        "headers": m.headers.iter().map(|h| format!("{}{}{}", h.name, if h.regex { "~=" } else { "=" }, h.value)).collect::<Vec<_>>(),
                                        "queryParams": m.query_params.iter().map(|h| format!("{}{}{}", h.name, if h.regex { "~=" } else { "=" }, h.value)).collect::<Vec<_>>(),
                                    })
                                })
                                .collect();
                            json!({
                                "route": r.route.to_string(),
                                "rule": r.rule_index,
                                "hostnames": r.hostnames,
                                "matches": matches,
                                "backends": r.backends.iter().map(|b| json!({
                                    "service": b.service.to_string(),
                                    "port": b.port,
                                    "weight": b.weight,
                                })).collect::<Vec<_>>(),
                            })
                        })
                        .collect();
                    json!({
                        "name": l.name,
                        "port": l.port,
                        "protocol": l.protocol,
                        "hostname": l.hostname,
                        "address": address,
                        "routes": routes,
                        "tcpRoutes": l.tcp_routes.iter().map(|r| json!({
                            "route": r.route.to_string(),
                            "rule": r.rule_index,
                            "backends": r.backends.iter().map(|b| json!({
                                "service": b.service.to_string(),
                                "port": b.port,
                                "weight": b.weight,
                            })).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                        "chain": chain(&l.chain),
                    })
                })
                .collect();
            let services: Vec<Value> = gw
                .waypoint_services
                .iter()
                .map(|s| {
                    json!({
                        "service": s.service.to_string(),
                        "ports": s.ports.iter().map(|p| json!({
                            "port": p.port,
                            "protocol": match p.protocol {
                                waystone_model::snapshot::PortProtocol::Http => "HTTP",
                                waystone_model::snapshot::PortProtocol::Tcp => "TCP",
                            },
                            "chain": chain(&p.chain),
                            "networkChain": chain(&p.network_chain),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "name": gw.key.name,
                "namespace": gw.key.namespace,
                "class": gw.class_name,
                "kind": kind,
                "waypointFor": waypoint_for,
                "accessLog": gw.access_log.map(|a| a.as_str()),
                "generation": gw.generation,
                "listeners": listeners,
                "services": services,
            })
        })
        .collect();
    let services: Vec<Value> = snapshot
        .services
        .iter()
        .map(|s| {
            json!({
                "name": s.key.name,
                "namespace": s.key.namespace,
                "clusterIP": s.cluster_ip,
                "waypoint": s.waypoint.as_ref().map(|w| w.to_string()),
                "ports": s.ports.iter().map(|p| json!({
                    "name": p.name,
                    "port": p.port,
                    "protocol": p.protocol,
                    "appProtocol": p.app_protocol,
                    "endpoints": p.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let plugins: Vec<Value> = snapshot
        .plugins
        .keys()
        .map(|id| plugin_entry(input, id))
        .collect();
    json!({
        "entry": { "address": input.entry.map(|a| a.to_string()) },
        "gateways": gateways,
        "services": services,
        "plugins": plugins,
    })
}
