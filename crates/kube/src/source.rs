//! The API server as a config source: one reflector (list, then watch) per kind, kept in memory.
//!
//! kube-runtime's watcher resumes from the last resourceVersion after a dropped connection,
//! re-lists when the watch expired (410 Gone), and backs off while the API server is away.
//! The reflector stores keep the last complete list meanwhile, so what serves keeps serving.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, discovery};
use tokio::sync::Notify;
use waystone_model::snapshot::ObjectKey;
use waystone_model::{Resource, all_kinds};

use crate::convert::resource_from_api;
use crate::error::KubeError;

/// What a process reads: everything (the controller), or what one data plane needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    /// One gateway or waypoint: only its own Gateway object is watched.
    Gateway(ObjectKey),
}

/// Resolves the `ApiResource` of a model kind on this server. EndpointSlice is
/// `discovery.k8s.io/v1` from Kubernetes 1.21 and `v1beta1` before: ask discovery.
pub async fn api_resource(client: &Client, kind: &str) -> Result<ApiResource, KubeError> {
    let info = all_kinds()
        .iter()
        .find(|k| k.kind == kind)
        .ok_or_else(|| KubeError::UnknownKind(kind.to_string()))?;
    let mut versions = vec![info.version];
    if kind == "EndpointSlice" {
        versions.push("v1beta1");
    }
    let mut last = None;
    for v in versions {
        let gvk = GroupVersionKind::gvk(info.group, v, info.kind);
        match discovery::pinned_kind(client, &gvk).await {
            Ok((ar, _)) => return Ok(ar),
            Err(e) => last = Some(e),
        }
    }
    Err(KubeError::Discovery {
        kind: kind.to_string(),
        source: Box::new(last.expect("at least one version was tried")),
    })
}

/// Kinds whose CRD a cluster may lack; they are watched only where served.
pub const OPTIONAL_KINDS: &[&str] = &["TCPRoute"];

struct Watched {
    ar: ApiResource,
    store: Store<DynamicObject>,
}

/// Reflectors for every kind the translation reads, except Secrets (fetched by name).
pub struct KubeSource {
    client: Client,
    watched: Vec<Watched>,
    changed: Arc<Notify>,
    secrets: Mutex<BTreeMap<ObjectKey, Resource>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Discovers the kinds and starts one reflector per kind. Fails when a kind is not served
    /// (a CRD missing), naming it, except the [`OPTIONAL_KINDS`], which are then not watched.
    pub async fn start(client: Client, scope: &Scope) -> Result<Self, KubeError> {
        let changed = Arc::new(Notify::new());
        let mut watched = Vec::new();
        let mut tasks = Vec::new();
        for info in all_kinds() {
            if info.kind == "Secret" {
                continue;
            }
            let ar = match api_resource(&client, info.kind).await {
                Ok(ar) => ar,
                // TCPRoute ships in the Gateway API's experimental channel only: a cluster with
                // the standard CRDs serves gateways without it, and Waystone runs there too.
                Err(e) if OPTIONAL_KINDS.contains(&info.kind) => {
                    tracing::info!(kind = info.kind, error = %e, "kind not served by this cluster; not watching it");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            let mut cfg = watcher::Config::default();
            if let (Scope::Gateway(key), "Gateway") = (scope, info.kind) {
                cfg = cfg.fields(&format!(
                    "metadata.namespace={},metadata.name={}",
                    key.namespace, key.name
                ));
            }
            let writer = reflector::store::Writer::new(ar.clone());
            let store = writer.as_reader();
            let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
            let notify = changed.clone();
            let kind = info.kind;
            tasks.push(tokio::spawn(async move {
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    match event {
                        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                        Ok(_) => notify.notify_one(),
                        Err(e) => {
                            tracing::warn!(kind, error = %e, "watch interrupted; retrying with backoff and keeping the last known objects")
                        }
                    }
                }
            }));
            watched.push(Watched { ar, store });
        }
        Ok(Self {
            client,
            watched,
            changed,
            secrets: Mutex::new(BTreeMap::new()),
            tasks,
        })
    }

    /// Fires after every change once the first lists are in.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Waits until every kind has been listed once: translating before that would swap in a
    /// config with objects missing.
    pub async fn ready(&self) {
        for w in &self.watched {
            let _ = w.store.wait_until_ready().await;
        }
    }

    /// Every object the reflectors hold, converted, plus the Secrets plugins reference. Objects
    /// that cannot be read are logged and left out (the rest still translate).
    pub async fn objects(&self) -> Vec<Resource> {
        let mut out = Vec::new();
        for w in &self.watched {
            for obj in w.store.state() {
                let value = match serde_json::to_value(obj.as_ref()) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(kind = %w.ar.kind, error = %e, "unreadable object");
                        continue;
                    }
                };
                match resource_from_api(value, &w.ar.api_version, &w.ar.kind) {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::warn!(kind = %w.ar.kind, error = %e, "object left out"),
                }
            }
        }
        let wanted = referenced_secrets(&out);
        out.extend(self.secrets(&wanted).await);
        out
    }

    /// Reads the named Secrets one by one: a data plane needs a few pull secrets, never the
    /// right to list every Secret. When the API server cannot be reached the last copy stays.
    async fn secrets(&self, wanted: &BTreeSet<ObjectKey>) -> Vec<Resource> {
        let ar = ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&());
        let mut fresh = BTreeMap::new();
        for key in wanted {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &key.namespace, &ar);
            match api.get_opt(&key.name).await {
                Ok(Some(obj)) => {
                    let converted = serde_json::to_value(&obj)
                        .map_err(|e| e.to_string())
                        .and_then(|v| {
                            resource_from_api(v, "v1", "Secret").map_err(|e| e.to_string())
                        });
                    match converted {
                        Ok(r) => {
                            fresh.insert(key.clone(), r);
                        }
                        Err(e) => tracing::warn!(secret = %key, error = %e, "unreadable Secret"),
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(secret = %key, error = %e, "cannot read Secret; keeping the last copy");
                    if let Some(old) = self.secrets.lock().expect("secrets lock").get(key) {
                        fresh.insert(key.clone(), old.clone());
                    }
                }
            }
        }
        let mut cache = self.secrets.lock().expect("secrets lock");
        *cache = fresh;
        cache.values().cloned().collect()
    }
}

/// `imagePullSecret`s of WasmPlugins and TrafficExtensions, in their namespaces.
pub fn referenced_secrets(objects: &[Resource]) -> BTreeSet<ObjectKey> {
    let mut out = BTreeSet::new();
    for obj in objects {
        let (ns, secret) = match obj {
            Resource::WasmPlugin(p) => (&p.metadata.namespace, p.spec.image_pull_secret.as_ref()),
            Resource::TrafficExtension(t) => (
                &t.metadata.namespace,
                t.spec
                    .wasm
                    .as_ref()
                    .and_then(|w| w.image_pull_secret.as_ref()),
            ),
            _ => continue,
        };
        if let Some(s) = secret.filter(|s| !s.is_empty()) {
            let ns = ns.clone().unwrap_or_else(|| "default".into());
            out.insert(ObjectKey::new(ns, s.clone()));
        }
    }
    out
}
