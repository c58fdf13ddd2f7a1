//! The CLI's operations against an API server (`--kubeconfig` / `KUBECONFIG`): the same
//! objects as the local API, stored as ordinary Kubernetes objects so kubectl sees them too.

use std::collections::BTreeMap;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use waystone_model::{Resource, lookup_kind, parse_manifests};

use crate::FIELD_MANAGER;
use crate::source::api_resource;

/// A failed call: the API server's HTTP code and message when it answered.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub code: Option<u16>,
    pub message: String,
}

impl CallError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            code: None,
            message: message.into(),
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code == Some(404)
    }
}

impl From<kube::Error> for CallError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => CallError {
                code: Some(s.code),
                message: s.message,
            },
            other => CallError::new(other.to_string()),
        }
    }
}

impl From<crate::KubeError> for CallError {
    fn from(e: crate::KubeError) -> Self {
        // Keep an HTTP code where there is one, so the CLI prints the message alone.
        let code = match &e {
            crate::KubeError::NoDataPlane { .. } => Some(404),
            crate::KubeError::Api { source, .. } => match source.as_ref() {
                kube::Error::Api(s) => Some(s.code),
                _ => None,
            },
            _ => None,
        };
        CallError {
            code,
            message: e.to_string(),
        }
    }
}

/// One object applied: kubectl's `created`, `configured` or `unchanged`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub action: String,
}

#[derive(Clone)]
pub struct KubeClient {
    client: kube::Client,
}

impl KubeClient {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// The config dump of the pod serving `gateway` (see [`crate::admin`]).
    pub async fn gateway_config_dump(
        &self,
        gateway: &waystone_model::snapshot::ObjectKey,
    ) -> Result<Value, CallError> {
        let pod = crate::admin::data_plane_pod(&self.client, gateway).await?;
        Ok(crate::admin::config_dump(&self.client, &pod).await?)
    }

    /// Every gateway's data plane's config dump, merged; with the pods that could not be read.
    pub async fn all_config_dumps(&self) -> Result<(Value, Vec<String>), CallError> {
        let mut dumps = Vec::new();
        let mut failures = Vec::new();
        for pod in crate::admin::data_plane_pods(&self.client).await? {
            match crate::admin::config_dump(&self.client, &pod).await {
                Ok(d) => dumps.push(d),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Ok((crate::admin::merge_dumps(&dumps), failures))
    }

    async fn api(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<(Api<DynamicObject>, String), CallError> {
        let info = lookup_kind(kind).ok_or_else(|| {
            CallError::new(format!(
                "the server doesn't have a resource type \"{kind}\""
            ))
        })?;
        let ar = api_resource(&self.client, info.kind).await?;
        let api = match namespace {
            Some(ns) if info.namespaced && !ns.is_empty() => {
                Api::namespaced_with(self.client.clone(), ns, &ar)
            }
            _ => Api::all_with(self.client.clone(), &ar),
        };
        Ok((api, ar.api_version))
    }

    /// Parses strictly (as the local API does), then server-side applies each object.
    pub async fn apply(
        &self,
        manifests: &str,
        source: &str,
        default_namespace: &str,
    ) -> Result<Vec<Applied>, CallError> {
        let objects =
            parse_manifests(manifests, source).map_err(|e| CallError::new(e.to_string()))?;
        let mut out = Vec::new();
        for mut obj in objects {
            obj.set_default_namespace(default_namespace);
            out.push(self.apply_one(&obj).await?);
        }
        Ok(out)
    }

    async fn apply_one(&self, obj: &Resource) -> Result<Applied, CallError> {
        let info = obj.kind_info();
        let ns = obj.meta().namespace.clone().unwrap_or_default();
        let name = obj.meta().name.clone();
        let (api, api_version) = self.api(info.kind, Some(&ns)).await?;
        let before = api.get_opt(&name).await?;
        let mut body = obj.to_json();
        if let Some(m) = body.as_object_mut() {
            m.remove("status");
            m.insert("apiVersion".into(), json!(api_version));
            if let Some(Value::Object(meta)) = m.get_mut("metadata") {
                for k in [
                    "resourceVersion",
                    "uid",
                    "creationTimestamp",
                    "generation",
                    "managedFields",
                ] {
                    meta.remove(k);
                }
            }
        }
        let after = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&body),
            )
            .await
            .map_err(|e| {
                let e = CallError::from(e);
                CallError {
                    code: e.code,
                    message: format!("{} {}: {}", info.kind, obj.display_name(), e.message),
                }
            })?;
        let action = match before {
            None => "created",
            Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
                "unchanged"
            }
            Some(_) => "configured",
        };
        Ok(Applied {
            kind: info.kind.to_string(),
            namespace: ns,
            name,
            action: action.into(),
        })
    }

    /// Objects of `kind` as kubectl shows them (with `apiVersion` and `kind`).
    pub async fn list(&self, kind: &str, namespace: Option<&str>) -> Result<Vec<Value>, CallError> {
        let (api, api_version) = self.api(kind, namespace).await?;
        let info = lookup_kind(kind).expect("resolved above");
        let list = api.list(&ListParams::default()).await?;
        let mut items: Vec<Value> = list
            .items
            .into_iter()
            .map(|o| with_type(o, &api_version, info.kind))
            .collect();
        items.sort_by_key(|v| {
            (
                v.pointer("/metadata/namespace")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                v.pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        });
        Ok(items)
    }

    pub async fn get(&self, kind: &str, namespace: &str, name: &str) -> Result<Value, CallError> {
        let (api, api_version) = self.api(kind, Some(namespace)).await?;
        let info = lookup_kind(kind).expect("resolved above");
        Ok(with_type(api.get(name).await?, &api_version, info.kind))
    }

    pub async fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<(), CallError> {
        let (api, _) = self.api(kind, Some(namespace)).await?;
        api.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Sets and removes labels; refuses to change an existing value without `overwrite`, as
    /// kubectl does. Returns whether anything changed.
    pub async fn label(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        overwrite: bool,
    ) -> Result<bool, CallError> {
        let (api, _) = self.api(kind, Some(namespace)).await?;
        let current = api.get(name).await?;
        let labels = current.metadata.labels.unwrap_or_default();
        let mut patch = serde_json::Map::new();
        for (k, v) in set {
            match labels.get(k) {
                Some(old) if old == v => {}
                Some(old) if !overwrite => {
                    return Err(CallError {
                        code: Some(409),
                        message: format!(
                            "'{k}' already has a value ({old}), and --overwrite is false"
                        ),
                    });
                }
                _ => {
                    patch.insert(k.clone(), json!(v));
                }
            }
        }
        for k in remove {
            if labels.contains_key(k) {
                patch.insert(k.clone(), Value::Null);
            }
        }
        if patch.is_empty() {
            return Ok(false);
        }
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": patch}})),
        )
        .await?;
        Ok(true)
    }
}

fn with_type(obj: DynamicObject, api_version: &str, kind: &str) -> Value {
    let mut v = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(api_version));
        m.insert("kind".into(), json!(kind));
        if let Some(Value::Object(meta)) = m.get_mut("metadata") {
            meta.remove("managedFields");
        }
    }
    v
}
