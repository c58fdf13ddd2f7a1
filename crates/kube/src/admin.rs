//! Reading a data-plane pod's admin endpoint from outside the cluster: `waystone proxy-config`
//! and `describe` in Kubernetes mode. The pod is found by the labels the controller puts on
//! it; its `/config_dump` is read through the API server's pod proxy subresource
//! (`/api/v1/namespaces/NS/pods/POD:PORT/proxy/config_dump`), which needs only the
//! kubeconfig's credentials (RBAC `get pods/proxy`), not a port-forward through the kubelet.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;
use waystone_model::snapshot::ObjectKey;

use crate::controller::{GATEWAY_NAME_LABEL, MANAGED_BY};
use crate::error::KubeError;

/// The admin port of `waystone proxy` (Envoy's admin port in an Istio proxy).
pub const ADMIN_PORT: u16 = 15000;
/// The name the controller gives that container port; a pod that names none gets `ADMIN_PORT`.
pub const ADMIN_PORT_NAME: &str = "admin";

/// A data-plane pod that can answer: its name and admin port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlanePod {
    pub gateway: ObjectKey,
    pub pod: String,
    pub port: u16,
}

fn label_selector(gateway: Option<&str>) -> String {
    match gateway {
        Some(name) => format!("{GATEWAY_NAME_LABEL}={name},{MANAGED_BY}=waystone"),
        None => format!("{GATEWAY_NAME_LABEL},{MANAGED_BY}=waystone"),
    }
}

/// Running, ready and not being deleted.
fn serving(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    pod.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn admin_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(ADMIN_PORT)
}

fn describe_pod(pod: &Pod) -> String {
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    let state = if pod.metadata.deletion_timestamp.is_some() {
        "Terminating".to_string()
    } else if phase == "Running" {
        "Running, not ready".to_string()
    } else {
        phase
    };
    format!(
        "{} ({state})",
        pod.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
}

/// Picks one serving pod of `gateway`, in name order so repeated calls read the same pod.
fn pick(gateway: &ObjectKey, pods: &[Pod]) -> Result<DataPlanePod, KubeError> {
    let mut serving: Vec<&Pod> = pods.iter().filter(|p| serving(p)).collect();
    serving.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    match serving.first() {
        Some(pod) => Ok(DataPlanePod {
            gateway: gateway.clone(),
            pod: pod.metadata.name.clone().unwrap_or_default(),
            port: admin_port(pod),
        }),
        None => Err(KubeError::NoDataPlane {
            gateway: gateway.to_string(),
            detail: if pods.is_empty() {
                format!(
                    "no pod has the labels {}",
                    label_selector(Some(&gateway.name))
                )
            } else {
                format!(
                    "none of its pods is running and ready: {}",
                    pods.iter().map(describe_pod).collect::<Vec<_>>().join(", ")
                )
            },
        }),
    }
}

/// The pod serving `gateway` (a Gateway's namespace and name).
pub async fn data_plane_pod(
    client: &kube::Client,
    gateway: &ObjectKey,
) -> Result<DataPlanePod, KubeError> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &gateway.namespace);
    let pods = api
        .list(&ListParams::default().labels(&label_selector(Some(&gateway.name))))
        .await
        .map_err(|e| KubeError::api(format!("listing the pods of gateway {gateway}"), e))?;
    pick(gateway, &pods.items)
}

/// One serving pod per gateway, in every namespace the credentials may list.
pub async fn data_plane_pods(client: &kube::Client) -> Result<Vec<DataPlanePod>, KubeError> {
    let api: Api<Pod> = Api::all(client.clone());
    let pods = api
        .list(&ListParams::default().labels(&label_selector(None)))
        .await
        .map_err(|e| KubeError::api("listing Waystone data-plane pods", e))?;
    let mut by_gateway: BTreeMap<ObjectKey, Vec<Pod>> = BTreeMap::new();
    for pod in pods.items {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let Some(name) = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(GATEWAY_NAME_LABEL))
            .cloned()
        else {
            continue;
        };
        by_gateway
            .entry(ObjectKey::new(namespace, name))
            .or_default()
            .push(pod);
    }
    Ok(by_gateway
        .iter()
        .filter_map(|(gw, pods)| pick(gw, pods).ok())
        .collect())
}

/// `GET /config_dump` of `pod`'s admin endpoint, through the API server's pod proxy.
pub async fn config_dump(client: &kube::Client, pod: &DataPlanePod) -> Result<Value, KubeError> {
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}:{}/proxy/config_dump",
        pod.gateway.namespace, pod.pod, pod.port
    );
    let what = || {
        format!(
            "reading the config dump of gateway {} from pod {}/{} port {} (API server pod proxy)",
            pod.gateway, pod.gateway.namespace, pod.pod, pod.port
        )
    };
    let request = http::Request::get(&path)
        .body(Vec::new())
        .map_err(|e| KubeError::Config(format!("{}: {e}", what())))?;
    let text = client
        .request_text(request)
        .await
        .map_err(|e| KubeError::api(what(), e))?;
    serde_json::from_str(&text)
        .map_err(|e| KubeError::Config(format!("{}: not a config dump: {e}", what())))
}

/// The config dumps of every gateway's data plane merged into one (gateways, services and
/// plugins listed once each), for `describe`: a plugin may run in several gateways' pods.
pub fn merge_dumps(dumps: &[Value]) -> Value {
    let mut gateways = Vec::new();
    let mut services: BTreeMap<String, Value> = BTreeMap::new();
    let mut plugins: BTreeMap<String, Value> = BTreeMap::new();
    for d in dumps {
        gateways.extend(d["gateways"].as_array().into_iter().flatten().cloned());
        for s in d["services"].as_array().into_iter().flatten() {
            services
                .entry(format!("{}/{}", s["namespace"], s["name"]))
                .or_insert_with(|| s.clone());
        }
        for p in d["plugins"].as_array().into_iter().flatten() {
            let key = format!("{}/{}/{}", p["kind"], p["namespace"], p["resource"]);
            // A pod whose module failed to load must not hide one where it serves.
            let replace = plugins
                .get(&key)
                .is_some_and(|old| old["state"] != "Loaded" && p["state"] == "Loaded");
            if replace || !plugins.contains_key(&key) {
                plugins.insert(key, p.clone());
            }
        }
    }
    serde_json::json!({
        "gateways": gateways,
        "services": services.into_values().collect::<Vec<_>>(),
        "plugins": plugins.into_values().collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, phase: &str, ready: bool, port: Option<i32>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"containers": [{"name": "waystone", "ports": port.map(|p| vec![
                json!({"name": "admin", "containerPort": p})]).unwrap_or_default()}]},
            "status": {"phase": phase, "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    #[test]
    fn picks_a_running_ready_pod_and_its_admin_port() {
        let gw = ObjectKey::new("default", "gw");
        let pods = [
            pod("gw-waystone-b", "Running", true, Some(15123)),
            pod("gw-waystone-a", "Pending", false, None),
            pod("gw-waystone-c", "Running", true, None),
        ];
        assert_eq!(
            pick(&gw, &pods).unwrap(),
            DataPlanePod {
                gateway: gw.clone(),
                pod: "gw-waystone-b".into(),
                port: 15123
            }
        );
        assert_eq!(pick(&gw, &pods[2..]).unwrap().port, ADMIN_PORT);
    }

    #[test]
    fn no_serving_pod_names_the_gateway_and_why() {
        let gw = ObjectKey::new("default", "gw");
        assert_eq!(
            pick(&gw, &[]).unwrap_err().to_string(),
            "no data-plane pod serves gateway default/gw: no pod has the labels \
             gateway.networking.k8s.io/gateway-name=gw,app.kubernetes.io/managed-by=waystone"
        );
        let pods = [
            pod("gw-waystone-a", "Pending", false, None),
            pod("gw-waystone-b", "Running", false, None),
        ];
        assert_eq!(
            pick(&gw, &pods).unwrap_err().to_string(),
            "no data-plane pod serves gateway default/gw: none of its pods is running and \
             ready: gw-waystone-a (Pending), gw-waystone-b (Running, not ready)"
        );
    }

    #[test]
    fn merged_dumps_list_each_plugin_once_preferring_a_loaded_one() {
        let failed = json!({"kind": "WasmPlugin", "namespace": "default", "resource": "auth",
            "state": "LoadFailed"});
        let loaded = json!({"kind": "WasmPlugin", "namespace": "default", "resource": "auth",
            "state": "Loaded"});
        let merged = merge_dumps(&[
            json!({"gateways": [{"name": "a"}], "plugins": [failed]}),
            json!({"gateways": [{"name": "b"}], "plugins": [loaded.clone()]}),
        ]);
        assert_eq!(merged["gateways"], json!([{"name": "a"}, {"name": "b"}]));
        assert_eq!(merged["plugins"], json!([loaded]));
    }
}
