//! What a waypoint's Deployment needs to take its HBONE identity from Istio's CA, as the pods
//! Istio injects have it: the projected service-account token with audience `istio-ca`, the
//! mesh root from the `istio-ca-root-cert` ConfigMap istiod writes into every namespace, and
//! the pod's namespace and service account for the SPIFFE identity.

use serde_json::{Value, json};
use waystone_proxy::hbone::istio_ca::{DEFAULT_ROOT_CERT, DEFAULT_TOKEN_FILE};

/// Kubelet renews a projected token at 80% of this; istio-agent asks for 12 hours too.
const TOKEN_EXPIRATION_SECONDS: i64 = 43_200;

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("/", |(dir, _)| dir)
}

fn file_name(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(_, name)| name)
}

/// Turns a data-plane Deployment (as `controller::data_plane_objects` builds it) into one
/// whose proxy runs with `--istio-ca`.
pub fn add_istio_ca(deployment: &mut Value) {
    let spec = &mut deployment["spec"]["template"]["spec"];
    if let Some(volumes) = spec["volumes"].as_array_mut() {
        volumes.push(json!({
            "name": "istio-token",
            "projected": {"sources": [{"serviceAccountToken": {
                "audience": "istio-ca",
                "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                "path": file_name(DEFAULT_TOKEN_FILE),
            }}]}
        }));
        volumes.push(json!({
            "name": "istiod-ca-cert",
            "configMap": {"name": "istio-ca-root-cert"}
        }));
    }
    let Some(containers) = spec["containers"].as_array_mut() else {
        return;
    };
    for c in containers {
        if let Some(args) = c["args"].as_array_mut() {
            args.push(json!("--istio-ca"));
        }
        if let Some(env) = c["env"].as_array_mut() {
            env.push(json!({"name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}));
            env.push(json!({"name": "SERVICE_ACCOUNT",
                "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}}));
        }
        if let Some(mounts) = c["volumeMounts"].as_array_mut() {
            mounts.push(json!({"name": "istio-token", "mountPath": parent(DEFAULT_TOKEN_FILE), "readOnly": true}));
            mounts.push(json!({"name": "istiod-ca-cert", "mountPath": parent(DEFAULT_ROOT_CERT), "readOnly": true}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::data_plane_objects;
    use waystone_model::snapshot::ObjectKey;

    #[test]
    fn the_waypoint_deployment_mounts_the_token_and_the_mesh_root() {
        let g: waystone_model::resources::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "waypoint", "namespace": "apps"},
            "spec": {"gatewayClassName": "istio-waypoint",
                     "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}
        }))
        .unwrap();
        let mut objects = data_plane_objects(&g, &ObjectKey::new("apps", "waypoint"), "img", true);
        let (_, deploy) = objects
            .iter_mut()
            .find(|(k, _)| *k == "Deployment")
            .unwrap();
        add_istio_ca(deploy);
        let spec = &deploy["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(c["args"].as_array().unwrap().last().unwrap(), "--istio-ca");
        let mounts: Vec<(&str, &str)> = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap(),
                    m["mountPath"].as_str().unwrap(),
                )
            })
            .collect();
        assert!(mounts.contains(&("istio-token", "/var/run/secrets/tokens")));
        assert!(mounts.contains(&("istiod-ca-cert", "/var/run/secrets/istio")));
        let token = spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "istio-token")
            .unwrap();
        let sat = &token["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(sat["audience"], "istio-ca");
        assert_eq!(sat["path"], "istio-token");
        let env: Vec<&str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert!(env.contains(&"POD_NAMESPACE") && env.contains(&"SERVICE_ACCOUNT"));
    }
}
