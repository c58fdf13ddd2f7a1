//! `waystone controller`: the control plane in a cluster. It reads everything, loads each
//! plugin once to report whether its module was fetched and loaded, writes status (Gateway,
//! HTTPRoute and TCPRoute parents, WasmPlugin, TrafficExtension), and deploys one data plane (Deployment,
//! Service, ServiceAccount, owned by the Gateway) per Gateway of a class it manages.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use waystone_control::pipeline::{
    Condition, Pipeline, StatusUpdate, conditions, key_of, rejected_reasons, same_status,
    translated_gateway_accepted, untranslated_gateway_status,
};
use waystone_model::Resource;
use waystone_model::resources::{BackendFilters, BackendRefOf};
use waystone_model::snapshot::{GatewayRole, ObjectKey, Snapshot};

use crate::error::KubeError;
use crate::source::{KubeSource, Scope};
use crate::{Engines, FIELD_MANAGER};

pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Gateway classes whose Gateways this controller serves (status, data planes).
    pub classes: Vec<String>,
    /// `controllerName` written into HTTPRoute and TCPRoute parent status.
    pub controller_name: String,
    /// The image data-plane Deployments run.
    pub proxy_image: String,
    /// Create Deployments, Services and ServiceAccounts for managed Gateways.
    pub deploy: bool,
    /// A pass runs at least this often (Secrets are read by name, not watched).
    pub resync: Duration,
    /// Waypoint Deployments take their HBONE identity from Istio's CA (`--istio-ca`).
    pub waypoint_istio_ca: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            classes: vec!["waystone".into(), "istio-waypoint".into()],
            controller_name: "waystone.io/gateway-controller".into(),
            proxy_image: format!("ghcr.io/waystone/waystone:{}", env!("CARGO_PKG_VERSION")),
            deploy: true,
            resync: Duration::from_secs(60),
            waypoint_istio_ca: false,
        }
    }
}

/// Runs until `shutdown` resolves.
pub async fn run_controller(
    client: Client,
    engines: Engines,
    opts: ControllerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), KubeError> {
    let source = KubeSource::start(client.clone(), &Scope::All).await?;
    source.ready().await;
    tracing::info!(classes = ?opts.classes, "controller synced with the API server");
    let mut ctl = Controller {
        client,
        pipeline: Pipeline::new(engines.engine, engines.fetcher, engines.translate),
        applied: HashMap::new(),
        opts,
    };
    let changed = source.changed();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut retry = Duration::from_secs(2);
    loop {
        let objects = source.objects().await;
        let failing = ctl.pass(&objects).await;
        let wait = if failing {
            let d = retry;
            retry = (retry * 2).min(Duration::from_secs(60));
            d
        } else {
            retry = Duration::from_secs(2);
            ctl.opts.resync
        };
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => return Ok(()),
        }
    }
}

struct Controller {
    client: Client,
    pipeline: Pipeline,
    /// What was last applied per owned object, so unchanged ones are not re-sent every pass.
    applied: HashMap<(String, ObjectKey), Value>,
    opts: ControllerOptions,
}

impl Controller {
    /// One pass; returns whether something failed and a retry is due.
    async fn pass(&mut self, objects: &[Resource]) -> bool {
        let built = self.pipeline.build(objects).await;
        let snapshot = built.runtime.snapshot.clone();
        let mut failing = built.failing;
        let managed: Vec<&Resource> = objects
            .iter()
            .filter(|o| matches!(o, Resource::Gateway(g) if self.opts.classes.contains(&g.spec.gateway_class_name)))
            .collect();
        let mut services = BTreeMap::new();
        if self.opts.deploy {
            for gw in &managed {
                match self.deploy(gw, &snapshot).await {
                    Ok(svc) => {
                        services.insert(key_of(gw), svc);
                    }
                    Err(e) => {
                        tracing::warn!(gateway = %key_of(gw), error = %e, "deploying the data plane failed");
                        failing = true;
                    }
                }
            }
            if let Err(e) = self.remove_orphans(&managed).await {
                tracing::warn!(error = %e, "removing data planes of deleted Gateways failed");
                failing = true;
            }
        }
        let mut updates =
            self.pipeline
                .statuses(objects, &snapshot, None, &built.translation_errors);
        for gw in &managed {
            let key = key_of(gw);
            let rejected = rejected_reasons(&built.translation_errors, "Gateway", &key);
            let status = gateway_status(
                gw,
                &snapshot,
                services.get(&key),
                &rejected,
                self.opts.deploy,
            );
            if !same_status(gw.status(), &status) {
                updates.push(StatusUpdate {
                    kind: "Gateway",
                    key,
                    status,
                });
            }
        }
        updates.extend(route_statuses(
            objects,
            &snapshot,
            &managed,
            &self.opts.controller_name,
        ));
        for u in updates {
            if let Err(e) = self.write_status(&u).await {
                tracing::warn!(kind = u.kind, object = %u.key, error = %e, "writing status failed");
                failing = true;
            }
        }
        failing
    }

    async fn write_status(&self, u: &StatusUpdate) -> Result<(), KubeError> {
        let ar = crate::source::api_resource(&self.client, u.kind).await?;
        let api: Api<DynamicObject> = if u.key.namespace.is_empty() {
            Api::all_with(self.client.clone(), &ar)
        } else {
            Api::namespaced_with(self.client.clone(), &u.key.namespace, &ar)
        };
        api.patch_status(
            &u.key.name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": u.status })),
        )
        .await
        .map_err(|e| KubeError::api(format!("status of {} {}", u.kind, u.key), e))?;
        Ok(())
    }

    /// Applies the ServiceAccount, Service and Deployment of one Gateway; returns the Service
    /// as the API server holds it (for the address).
    async fn deploy(&mut self, gw: &Resource, snapshot: &Snapshot) -> Result<Value, KubeError> {
        let Resource::Gateway(g) = gw else {
            unreachable!("only Gateways are deployed")
        };
        let key = key_of(gw);
        let waypoint = snapshot
            .gateway(&key)
            .is_some_and(|c| matches!(c.role, GatewayRole::Waypoint { .. }));
        let mut objects = data_plane_objects(g, &key, &self.opts.proxy_image, waypoint);
        if waypoint && self.opts.waypoint_istio_ca {
            for (kind, body) in &mut objects {
                if *kind == "Deployment" {
                    crate::mesh_identity::add_istio_ca(body);
                }
            }
        }
        let mut service = Value::Null;
        for (kind, body) in objects {
            let ar = owned_resource(kind);
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.namespace, &ar);
            let name = data_plane_name(&key.name);
            let cache_key = (kind.to_string(), key.clone());
            if self.applied.get(&cache_key) == Some(&body) && kind != "Service" {
                continue;
            }
            let params = PatchParams::apply(FIELD_MANAGER).force();
            let out = api
                .patch(&name, &params, &Patch::Apply(&body))
                .await
                .map_err(|e| KubeError::api(format!("{kind} {}/{name}", key.namespace), e))?;
            if kind == "Service" {
                service = serde_json::to_value(&out).unwrap_or(Value::Null);
            }
            self.applied.insert(cache_key, body);
        }
        Ok(service)
    }

    /// Deletes the data planes whose Gateway is gone or no longer of a managed class. Owner
    /// references let a cluster's garbage collector do this too; doing it here does not
    /// depend on one running.
    async fn remove_orphans(&mut self, managed: &[&Resource]) -> Result<(), KubeError> {
        let keep: BTreeSet<ObjectKey> = managed.iter().map(|g| key_of(g)).collect();
        let lp = ListParams::default().labels(&format!("{MANAGED_BY}=waystone"));
        for kind in ["Deployment", "Service", "ServiceAccount"] {
            let ar = owned_resource(kind);
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &ar);
            let list = api
                .list(&lp)
                .await
                .map_err(|e| KubeError::api(format!("listing {kind}s"), e))?;
            for obj in list {
                let ns = obj.metadata.namespace.clone().unwrap_or_default();
                let Some(gw) = obj
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(GATEWAY_NAME_LABEL))
                else {
                    continue;
                };
                let owner = ObjectKey::new(ns.clone(), gw.clone());
                if keep.contains(&owner) {
                    continue;
                }
                let name = obj.metadata.name.clone().unwrap_or_default();
                let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), &ns, &ar);
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => {
                        tracing::info!(kind, object = %format!("{ns}/{name}"), gateway = %owner, "removed the data plane of a deleted Gateway")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        return Err(KubeError::api(format!("deleting {kind} {ns}/{name}"), e));
                    }
                }
                self.applied.remove(&(kind.to_string(), owner));
            }
        }
        Ok(())
    }
}

fn owned_resource(kind: &str) -> ApiResource {
    match kind {
        "Deployment" => ApiResource::erase::<k8s_openapi::api::apps::v1::Deployment>(&()),
        "Service" => ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
        _ => ApiResource::erase::<k8s_openapi::api::core::v1::ServiceAccount>(&()),
    }
}

/// The name of a Gateway's Deployment, Service and ServiceAccount.
pub fn data_plane_name(gateway: &str) -> String {
    format!("{gateway}-waystone")
}

/// The ServiceAccount, Service and Deployment that run one Gateway's data plane.
pub fn data_plane_objects(
    g: &waystone_model::resources::Gateway,
    key: &ObjectKey,
    image: &str,
    waypoint: bool,
) -> Vec<(&'static str, Value)> {
    let name = data_plane_name(&key.name);
    let labels = json!({
        MANAGED_BY: "waystone",
        GATEWAY_NAME_LABEL: key.name,
    });
    let owner = json!([{
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "name": key.name,
        "uid": g.metadata.uid.clone().unwrap_or_default(),
        "controller": true,
        "blockOwnerDeletion": true,
    }]);
    let meta = json!({
        "name": name,
        "namespace": key.namespace,
        "labels": labels,
        "ownerReferences": owner,
    });
    let mut ports: Vec<i64> = g.spec.listeners.iter().map(|l| l.port).collect();
    ports.sort_unstable();
    ports.dedup();
    let service_ports: Vec<Value> = ports
        .iter()
        .map(
            |p| json!({"name": format!("port-{p}"), "port": p, "targetPort": p, "protocol": "TCP"}),
        )
        .collect();
    let mut container_ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"containerPort": p, "protocol": "TCP"}))
        .collect();
    // `waystone proxy-config` finds the admin endpoint by this name (API server pod proxy).
    container_ports.push(json!({
        "name": crate::admin::ADMIN_PORT_NAME,
        "containerPort": crate::admin::ADMIN_PORT,
        "protocol": "TCP",
    }));
    let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta});
    let svc = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta,
        "spec": {
            "type": if waypoint { "ClusterIP" } else { "LoadBalancer" },
            "selector": { GATEWAY_NAME_LABEL: key.name },
            "ports": service_ports,
        }
    });
    let deploy = json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { GATEWAY_NAME_LABEL: key.name } },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "serviceAccountName": name,
                    "containers": [{
                        "name": "waystone",
                        "image": image,
                        "args": ["proxy", "--gateway", format!("{}/{}", key.namespace, key.name), "--gateway-address", "0.0.0.0"],
                        "ports": container_ports,
                        "readinessProbe": {
                            "httpGet": { "path": "/ready", "port": crate::admin::ADMIN_PORT_NAME },
                            "periodSeconds": 5,
                        },
                        "securityContext": {
                            "runAsNonRoot": true, "runAsUser": 65532,
                            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"], "add": ["NET_BIND_SERVICE"] }
                        },
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/waystone"}],
                        "env": [{"name": "WAYSTONE_DATA_DIR", "value": "/var/lib/waystone"}]
                    }],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            }
        }
    });
    vec![
        ("ServiceAccount", sa),
        ("Service", svc),
        ("Deployment", deploy),
    ]
}

/// Gateway status in a cluster: Accepted once translated; Programmed once its data plane's
/// Service has an address (as Istio reports it), with that address.
fn gateway_status(
    gw: &Resource,
    snapshot: &Snapshot,
    service: Option<&Value>,
    rejected: &[&str],
    deploy: bool,
) -> Value {
    let generation = gw.meta().generation.unwrap_or(1);
    let key = key_of(gw);
    let Some(cfg) = snapshot.gateway(&key) else {
        return untranslated_gateway_status(gw, rejected, generation);
    };
    let mut addresses = Vec::new();
    if let Some(svc) = service {
        let ingress = svc
            .pointer("/status/loadBalancer/ingress")
            .and_then(Value::as_array);
        for i in ingress.into_iter().flatten() {
            if let Some(ip) = i.get("ip").and_then(Value::as_str) {
                addresses.push(json!({"type": "IPAddress", "value": ip}));
            } else if let Some(h) = i.get("hostname").and_then(Value::as_str) {
                addresses.push(json!({"type": "Hostname", "value": h}));
            }
        }
        if let Some(ip) = svc
            .pointer("/spec/clusterIP")
            .and_then(Value::as_str)
            .filter(|ip| *ip != "None")
        {
            addresses.push(json!({"type": "IPAddress", "value": ip}));
        }
    }
    let name = data_plane_name(&key.name);
    let (programmed, msg) = match (deploy, addresses.is_empty()) {
        (false, _) => (
            true,
            "data plane deployed outside the controller".to_string(),
        ),
        (true, false) => (
            true,
            format!("deployment and service {name} created; address from service {name}"),
        ),
        (true, true) => (
            false,
            format!("waiting for service {name} to get an address"),
        ),
    };
    let old_listeners = gw
        .status()
        .and_then(|s| s.get("listeners"))
        .and_then(Value::as_array);
    let listeners: Vec<Value> = cfg
        .listeners
        .iter()
        .map(|l| {
            let (attached, route_kind) = l.attached_routes();
            let c = [
                Condition::new("Accepted", true, "Accepted", "listener accepted"),
                Condition::new(
                    "Programmed",
                    programmed,
                    if programmed { "Programmed" } else { "Pending" },
                    msg.clone(),
                ),
                Condition::new(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "all references resolved",
                ),
            ];
            let old = old_listeners.and_then(|ls| {
                ls.iter()
                    .find(|o| o.get("name").and_then(Value::as_str) == Some(&l.name))
            });
            json!({
                "name": l.name,
                "attachedRoutes": attached.len(),
                "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": route_kind}],
                "conditions": conditions(&c, old, generation),
            })
        })
        .collect();
    let c = [
        translated_gateway_accepted(rejected),
        Condition::new(
            "Programmed",
            programmed,
            if programmed { "Programmed" } else { "Pending" },
            msg,
        ),
    ];
    let mut status =
        json!({ "conditions": conditions(&c, gw.status(), generation), "listeners": listeners });
    if !addresses.is_empty() {
        status["addresses"] = Value::Array(addresses);
    }
    status
}

/// HTTPRoute and TCPRoute `status.parents` entries for the parents this controller serves;
/// other controllers' entries are kept as they are.
fn route_statuses(
    objects: &[Resource],
    snapshot: &Snapshot,
    managed: &[&Resource],
    controller_name: &str,
) -> Vec<StatusUpdate> {
    let managed: BTreeSet<ObjectKey> = managed.iter().map(|g| key_of(g)).collect();
    let mut out = Vec::new();
    for obj in objects {
        let key = key_of(obj);
        let (kind, parent_refs, missing) = match obj {
            Resource::HttpRoute(r) => (
                "HTTPRoute",
                &r.spec.parent_refs,
                missing_services(
                    r.spec.rules.iter().flat_map(|r| &r.backend_refs),
                    &key.namespace,
                    snapshot,
                ),
            ),
            Resource::TcpRoute(r) => (
                "TCPRoute",
                &r.spec.parent_refs,
                missing_services(
                    r.spec.rules.iter().flat_map(|r| &r.backend_refs),
                    &key.namespace,
                    snapshot,
                ),
            ),
            _ => continue,
        };
        let generation = obj.meta().generation.unwrap_or(1);
        let old_parents = obj
            .status()
            .and_then(|s| s.get("parents"))
            .and_then(Value::as_array);
        let mut parents: Vec<Value> = old_parents
            .into_iter()
            .flatten()
            .filter(|p| p.get("controllerName").and_then(Value::as_str) != Some(controller_name))
            .cloned()
            .collect();
        let mut ours = 0;
        for pref in parent_refs {
            if pref.kind.as_deref().unwrap_or("Gateway") != "Gateway" {
                continue;
            }
            let ns = pref
                .namespace
                .clone()
                .unwrap_or_else(|| key.namespace.clone());
            let gw_key = ObjectKey::new(ns, pref.name.clone());
            if !managed.contains(&gw_key) {
                continue;
            }
            ours += 1;
            let attached = snapshot.gateway(&gw_key).is_some_and(|g| {
                g.listeners.iter().any(|l| {
                    let (routes, route_kind) = l.attached_routes();
                    pref.section_name.as_ref().is_none_or(|s| *s == l.name)
                        && route_kind == kind
                        && routes.contains(&key)
                })
            });
            let old = old_parents.and_then(|ps| {
                ps.iter().find(|p| {
                    p.get("controllerName").and_then(Value::as_str) == Some(controller_name)
                        && p.pointer("/parentRef/name").and_then(Value::as_str) == Some(&pref.name)
                })
            });
            let c = [
                if attached {
                    Condition::new(
                        "Accepted",
                        true,
                        "Accepted",
                        format!("attached to gateway {gw_key}"),
                    )
                } else {
                    Condition::new(
                        "Accepted",
                        false,
                        "NotAllowedByListeners",
                        format!("no listener of gateway {gw_key} accepts this route"),
                    )
                },
                if missing.is_empty() {
                    Condition::new(
                        "ResolvedRefs",
                        true,
                        "ResolvedRefs",
                        "all backends resolved",
                    )
                } else {
                    Condition::new(
                        "ResolvedRefs",
                        false,
                        "BackendNotFound",
                        format!("backend service(s) not found: {}", missing.join(", ")),
                    )
                },
            ];
            let mut parent_ref =
                json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": pref.name});
            if let Some(ns) = &pref.namespace {
                parent_ref["namespace"] = json!(ns);
            }
            if let Some(s) = &pref.section_name {
                parent_ref["sectionName"] = json!(s);
            }
            parents.push(json!({
                "parentRef": parent_ref,
                "controllerName": controller_name,
                "conditions": conditions(&c, old, generation),
            }));
        }
        if ours == 0 {
            continue;
        }
        let status = json!({ "parents": parents });
        if !same_status(obj.status(), &status) {
            out.push(StatusUpdate { kind, key, status });
        }
    }
    out
}

/// The Services a route's backendRefs name that the snapshot does not have, as `ns/name`.
fn missing_services<'a, F: BackendFilters + 'a>(
    refs: impl Iterator<Item = &'a BackendRefOf<F>>,
    route_ns: &str,
    snapshot: &Snapshot,
) -> Vec<String> {
    refs.filter(|b| b.kind.as_deref().unwrap_or("Service") == "Service")
        .filter_map(|b| {
            let ns = b.namespace.clone().unwrap_or_else(|| route_ns.to_string());
            let svc = ObjectKey::new(ns, b.name.clone());
            snapshot.service(&svc).is_none().then(|| svc.to_string())
        })
        .collect()
}
