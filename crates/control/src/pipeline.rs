//! One translation and swap for every config source: objects → `translate` →
//! fetch/compile/configure plugins → a [`RuntimeConfig`] ready to swap, and the
//! status each object should carry. The embedded store (`reconcile.rs`) and the
//! Kubernetes source (`waystone-kube`) both drive this; neither knows the other.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};
use waystone_fetch::{ConversionResult, FetchRequest, Fetcher, record_conversion};
use waystone_model::snapshot::{
    ExtensionKind, FailStrategy, GatewayRole, ObjectKey, PluginConfig, PluginId, PullPolicy,
    Snapshot,
};
use waystone_model::{ObjectError, Resource, TranslateOptions, Translation, translate};
use waystone_proxy::{GatewayBinding, LoadedPlugin, PluginSlot, RuntimeConfig};
use waystone_wasm::{
    CompiledCache, CompiledModule, CompiledSource, PluginInstance, PluginSpec, WasmEngine,
};

pub use crate::status::{Condition, conditions};

/// What the pipeline remembers about one plugin between passes.
struct PluginState {
    /// Hash of everything that, when changed, means a new load.
    fingerprint: u64,
    /// The last module that loaded, still serving if a later load failed.
    ready: Option<(u64, Arc<LoadedPlugin>)>,
    /// The error of the latest attempt for `fingerprint`, if it failed.
    error: Option<String>,
    url: String,
    manifest_digest: Option<String>,
}

/// Plugin loading state kept between passes, and the translation step.
pub struct Pipeline {
    pub engine: WasmEngine,
    pub fetcher: Fetcher,
    pub opts: TranslateOptions,
    /// Compiled modules on disk, so a restart does not recompile; None when unusable.
    pub compiled_cache: Option<CompiledCache>,
    plugins: HashMap<PluginId, PluginState>,
    compiled: HashMap<String, CompiledModule>,
    revisions: u64,
    /// A module was compiled (or read from the disk cache) since the heap was last trimmed.
    compiled_since_trim: bool,
}

/// The result of one pass over a set of objects.
pub struct Built {
    pub translation_errors: Vec<ObjectError>,
    pub runtime: RuntimeConfig,
    /// Some plugin failed to load: a retry (with backoff) is due.
    pub failing: bool,
}

/// One object's new status, computed because it differs from what the object carries.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub kind: &'static str,
    /// Namespace is empty for cluster-scoped kinds.
    pub key: ObjectKey,
    pub status: Value,
}

impl Pipeline {
    pub fn new(engine: WasmEngine, fetcher: Fetcher, opts: TranslateOptions) -> Self {
        Self {
            engine,
            fetcher,
            opts,
            compiled_cache: None,
            plugins: HashMap::new(),
            compiled: HashMap::new(),
            revisions: 0,
            compiled_since_trim: false,
        }
    }

    /// Translates `objects` and loads every plugin the snapshot names (reusing loaded ones).
    pub async fn build(&mut self, objects: &[Resource]) -> Built {
        let translation = translate(objects, &self.opts);
        self.build_from(translation, |s| s).await
    }

    /// Like [`Pipeline::build`], with `narrow` applied to the snapshot before plugins load: a
    /// data plane that runs one gateway loads only that gateway's plugins.
    pub async fn build_from(
        &mut self,
        translation: Translation,
        narrow: impl FnOnce(Snapshot) -> Snapshot,
    ) -> Built {
        for e in &translation.errors {
            tracing::warn!(kind = e.kind, object = %e.key, reason = %e.message, "object rejected");
        }
        let snapshot = Arc::new(narrow(translation.snapshot));
        let mut slots = BTreeMap::new();
        let mut failing = false;
        for (id, cfg) in &snapshot.plugins {
            let slot = self.load(cfg).await;
            if matches!(slot, PluginSlot::Failed { .. })
                || self.plugins.get(id).is_some_and(|s| s.error.is_some())
            {
                failing = true;
            }
            slots.insert(id.clone(), slot);
        }
        self.plugins
            .retain(|id, _| snapshot.plugins.contains_key(id));
        let live: HashSet<&str> = self
            .plugins
            .values()
            .filter_map(|s| s.ready.as_ref().map(|(_, p)| p.module_digest.as_str()))
            .collect();
        self.compiled
            .retain(|digest, _| live.contains(digest.as_str()));
        if std::mem::take(&mut self.compiled_since_trim) {
            // Off the apply path: the new config is not held up by it.
            tokio::task::spawn_blocking(crate::memory::release_freed_heap);
        }
        Built {
            translation_errors: translation.errors,
            runtime: RuntimeConfig {
                snapshot,
                plugins: slots,
                default_namespace: "default".into(),
            },
            failing,
        }
    }

    /// The statuses that changed: Gateways (when `bindings` is given, i.e. this process binds
    /// the listeners), WasmPlugins and TrafficExtensions.
    pub fn statuses(
        &self,
        objects: &[Resource],
        snapshot: &Snapshot,
        bindings: Option<&BTreeMap<ObjectKey, GatewayBinding>>,
        errors: &[ObjectError],
    ) -> Vec<StatusUpdate> {
        let mut updates = Vec::new();
        for obj in objects {
            let kind = obj.kind_info().kind;
            let key = key_of(obj);
            let generation = obj.meta().generation.unwrap_or(1);
            let rejected = rejected_reasons(errors, kind, &key);
            let status = match (kind, bindings) {
                ("Gateway", Some(b)) => {
                    gateway_status(obj, snapshot, b.get(&key), &rejected, generation)
                }
                ("WasmPlugin" | "TrafficExtension", _) => {
                    let id = plugin_id(kind, &key);
                    self.plugin_status(obj, &id, snapshot, &rejected, generation)
                }
                _ => continue,
            };
            if !same_status(obj.status(), &status) {
                updates.push(StatusUpdate { kind, key, status });
            }
        }
        updates
    }

    /// Each plugin's module state after the latest pass, for the config dump.
    pub fn plugin_reports(&self, snapshot: &Snapshot) -> crate::dump::PluginReports {
        snapshot
            .plugins
            .keys()
            .map(|id| {
                let report = match self.plugins.get(id) {
                    Some(state) => crate::dump::PluginReport {
                        url: state.url.clone(),
                        digest: state.ready.as_ref().map(|(_, p)| p.module_digest.clone()),
                        manifest_digest: state.manifest_digest.clone(),
                        state: match (&state.error, &state.ready) {
                            (None, Some(_)) => "Loaded",
                            (Some(_), Some(_)) => "UpdateFailed",
                            (Some(_), None) => "LoadFailed",
                            (None, None) => "Pending",
                        }
                        .to_string(),
                        last_error: state.error.clone(),
                    },
                    None => crate::dump::PluginReport {
                        state: "Pending".into(),
                        ..Default::default()
                    },
                };
                (id.clone(), report)
            })
            .collect()
    }

    /// Loads a plugin, reusing what is already loaded when nothing relevant changed.
    async fn load(&mut self, cfg: &PluginConfig) -> PluginSlot {
        let fingerprint = fingerprint(cfg);
        if let Some(state) = self.plugins.get(&cfg.id)
            && state.fingerprint == fingerprint
            && state.error.is_none()
            && let Some((_, ready)) = &state.ready
        {
            return PluginSlot::Ready(ready.clone());
        }
        match self.try_load(cfg).await {
            Ok((plugin, manifest_digest)) => {
                tracing::info!(plugin = %cfg.id, digest = %plugin.module_digest, url = %cfg.url, "plugin loaded");
                let plugin = Arc::new(plugin);
                self.plugins.insert(
                    cfg.id.clone(),
                    PluginState {
                        fingerprint,
                        ready: Some((fingerprint, plugin.clone())),
                        error: None,
                        url: cfg.url.clone(),
                        manifest_digest,
                    },
                );
                PluginSlot::Ready(plugin)
            }
            Err(reason) => {
                tracing::warn!(plugin = %cfg.id, url = %cfg.url, %reason, "plugin failed to load");
                let previous = self.plugins.remove(&cfg.id);
                let ready = previous.as_ref().and_then(|p| p.ready.clone());
                let manifest_digest = previous.and_then(|p| p.manifest_digest);
                let slot = match &ready {
                    // The update failed: the previous module keeps serving.
                    Some((_, p)) => PluginSlot::Ready(p.clone()),
                    None => PluginSlot::Failed {
                        fail_strategy: cfg.fail_strategy,
                        reason: reason.clone(),
                    },
                };
                self.plugins.insert(
                    cfg.id.clone(),
                    PluginState {
                        fingerprint,
                        ready,
                        error: Some(reason),
                        url: cfg.url.clone(),
                        manifest_digest,
                    },
                );
                slot
            }
        }
    }

    /// `load_module` timed and counted in Istio's conversion metrics.
    async fn try_load(
        &mut self,
        cfg: &PluginConfig,
    ) -> Result<(LoadedPlugin, Option<String>), String> {
        let started = Instant::now();
        let result = self.load_module(cfg).await;
        let outcome = match &result {
            Ok(_) => ConversionResult::Success,
            Err((stage, _)) => *stage,
        };
        record_conversion(outcome, started.elapsed());
        result.map_err(|(_, reason)| reason)
    }

    async fn load_module(
        &mut self,
        cfg: &PluginConfig,
    ) -> Result<(LoadedPlugin, Option<String>), (ConversionResult, String)> {
        let fetch_failed = |reason: String| (ConversionResult::FetchFailure, reason);
        let compile_failed = |reason: String| (ConversionResult::CompileFailure, reason);
        let pull_secret = match &cfg.pull_secret {
            None => None,
            Some(Ok(bytes)) => Some(bytes.clone()),
            Some(Err(e)) => return Err(fetch_failed(format!("image pull secret: {e}"))),
        };
        let request = FetchRequest {
            url: cfg.url.clone(),
            sha256: cfg.sha256.clone(),
            pull_policy: match cfg.pull_policy {
                PullPolicy::Always => waystone_fetch::PullPolicy::Always,
                PullPolicy::IfNotPresent => waystone_fetch::PullPolicy::IfNotPresent,
            },
            pull_secret,
        };
        let fetched = self
            .fetcher
            .fetch(&request)
            .await
            .map_err(|e| fetch_failed(e.to_string()))?;
        let module = match self.compiled.get(&fetched.module_digest) {
            Some(m) => m.clone(),
            None => {
                let engine = self.engine.clone();
                let bytes = fetched.bytes.clone();
                let disk = self.compiled_cache.clone();
                let (m, source) = tokio::task::spawn_blocking(move || match disk {
                    Some(disk) => disk.load_or_compile(&engine, &bytes),
                    None => engine
                        .compile(&bytes)
                        .map(|m| (m, CompiledSource::Compiled)),
                })
                .await
                .map_err(|e| compile_failed(format!("compiling: {e}")))?
                .map_err(|e| compile_failed(format!("compiling {}: {e}", fetched.module_digest)))?;
                tracing::debug!(digest = %fetched.module_digest, ?source, "module compiled");
                self.compiled_since_trim = true;
                self.compiled
                    .insert(fetched.module_digest.clone(), m.clone());
                m
            }
        };
        let spec = Arc::new(PluginSpec {
            name: cfg.filter_name.clone(),
            root_id: cfg.root_id.clone(),
            vm_id: String::new(),
            plugin_configuration: cfg.configuration.clone(),
            vm_configuration: Vec::new(),
            env: cfg.env.clone(),
        });
        // Start one instance now so a configuration the plugin refuses is
        // reported here, not discovered by the first request.
        {
            let module = module.clone();
            let spec = spec.clone();
            tokio::task::spawn_blocking(move || PluginInstance::start(&module, spec).map(drop))
                .await
                .map_err(|e| compile_failed(format!("starting: {e}")))?
                .map_err(|e| compile_failed(e.to_string()))?;
        }
        self.revisions += 1;
        Ok((
            LoadedPlugin {
                id: cfg.id.clone(),
                module,
                spec,
                fail_strategy: cfg.fail_strategy,
                revision: self.revisions,
                module_digest: fetched.module_digest.clone(),
            },
            fetched.manifest_digest.clone(),
        ))
    }

    /// Status of a WasmPlugin/TrafficExtension: whether it attaches, and whether its module
    /// was fetched and loaded (and the error when not).
    pub fn plugin_status(
        &self,
        obj: &Resource,
        id: &PluginId,
        snapshot: &Snapshot,
        rejected: &[&str],
        generation: i64,
    ) -> Value {
        if !rejected.is_empty() {
            let c = [Condition::new(
                "Accepted",
                false,
                "Invalid",
                rejected.join("; "),
            )];
            return json!({ "conditions": conditions(&c, obj.status(), generation) });
        }
        let attachments = attachments(snapshot, id);
        let mut conds = Vec::new();
        if attachments.is_empty() {
            conds.push(Condition::new(
                "Accepted",
                true,
                "Accepted",
                "attached to no gateway or waypoint",
            ));
            conds.push(Condition::unknown(
                "ModuleLoaded",
                "NotAttached",
                "not fetched: nothing runs this plugin",
            ));
            return json!({ "conditions": conditions(&conds, obj.status(), generation) });
        }
        conds.push(Condition::new(
            "Accepted",
            true,
            "Accepted",
            format!("attached to {}", attachments.join("; ")),
        ));
        let fail = snapshot
            .plugins
            .get(id)
            .map(|p| p.fail_strategy)
            .unwrap_or_default();
        let mut module = Value::Null;
        match self.plugins.get(id) {
            Some(state) => {
                module = json!({
                    "url": state.url,
                    "digest": state.ready.as_ref().map(|(_, p)| p.module_digest.clone()),
                    "manifestDigest": state.manifest_digest,
                });
                match (&state.error, &state.ready) {
                    (None, Some((_, p))) => conds.push(Condition::new(
                        "ModuleLoaded",
                        true,
                        "Loaded",
                        format!(
                            "module {} fetched, compiled and configured",
                            p.module_digest
                        ),
                    )),
                    (Some(err), Some((_, p))) => conds.push(Condition::new(
                        "ModuleLoaded",
                        false,
                        "UpdateFailed",
                        format!(
                            "{err}; the previous module {} keeps serving",
                            p.module_digest
                        ),
                    )),
                    (Some(err), None) => {
                        let effect = match fail {
                            FailStrategy::FailOpen => "requests bypass this plugin (FAIL_OPEN)",
                            _ => "requests it applies to are denied (FAIL_CLOSE)",
                        };
                        conds.push(Condition::new(
                            "ModuleLoaded",
                            false,
                            "LoadFailed",
                            format!("{err}; {effect}"),
                        ));
                    }
                    (None, None) => {
                        conds.push(Condition::unknown("ModuleLoaded", "Pending", "loading"))
                    }
                }
            }
            None => conds.push(Condition::unknown("ModuleLoaded", "Pending", "loading")),
        }
        let mut status = json!({ "conditions": conditions(&conds, obj.status(), generation) });
        if !module.is_null() {
            status["module"] = module;
        }
        status
    }
}

/// `namespace/name` as stored (namespace empty for cluster-scoped kinds).
pub fn key_of(obj: &Resource) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey::new(
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone(),
    )
}

/// The translation's reasons for leaving one object out.
pub fn rejected_reasons<'a>(
    errors: &'a [ObjectError],
    kind: &str,
    key: &ObjectKey,
) -> Vec<&'a str> {
    errors
        .iter()
        .filter(|e| e.kind == kind && e.key == *key)
        .map(|e| e.message.as_str())
        .collect()
}

/// The snapshot id of a WasmPlugin or TrafficExtension.
pub fn plugin_id(kind: &str, key: &ObjectKey) -> PluginId {
    let kind = if kind == "TrafficExtension" {
        ExtensionKind::TrafficExtension
    } else {
        ExtensionKind::WasmPlugin
    };
    PluginId {
        kind,
        key: key.clone(),
    }
}

/// Status of a Gateway the translation left out: not accepted, with the reasons.
pub fn untranslated_gateway_status(obj: &Resource, rejected: &[&str], generation: i64) -> Value {
    let reason = if rejected.is_empty() {
        "not translated".to_string()
    } else {
        rejected.join("; ")
    };
    let c = [
        Condition::new("Accepted", false, "Invalid", reason.clone()),
        Condition::new("Programmed", false, "Invalid", reason),
    ];
    json!({ "conditions": conditions(&c, obj.status(), generation) })
}

/// `Accepted` of a Gateway that translated: false while some of it was refused (an invalid
/// annotation), though the rest of it serves.
pub fn translated_gateway_accepted(rejected: &[&str]) -> Condition {
    if rejected.is_empty() {
        Condition::new("Accepted", true, "Accepted", "accepted by waystone")
    } else {
        Condition::new(
            "Accepted",
            false,
            "Invalid",
            format!("{}; the rest of the gateway is served", rejected.join("; ")),
        )
    }
}

/// Status of a Gateway whose listeners this process binds (`binding`).
pub fn gateway_status(
    obj: &Resource,
    snapshot: &Snapshot,
    binding: Option<&GatewayBinding>,
    rejected: &[&str],
    generation: i64,
) -> Value {
    let Some(gw) = snapshot.gateway(&key_of(obj)) else {
        return untranslated_gateway_status(obj, rejected, generation);
    };
    let old_listeners = obj
        .status()
        .and_then(|s| s.get("listeners"))
        .and_then(|l| l.as_array());
    let mut listeners = Vec::new();
    let mut all_bound = true;
    let mut problems = Vec::new();
    for l in &gw.listeners {
        let bound = binding.and_then(|b| b.listeners.iter().find(|lb| lb.name == l.name));
        let (ok, msg) = match bound.map(|b| &b.result) {
            Some(Ok(addr)) => (true, format!("listening on {addr}")),
            Some(Err(e)) => (false, e.clone()),
            None => (false, "not bound".to_string()),
        };
        if !ok {
            all_bound = false;
            problems.push(format!("listener {}: {msg}", l.name));
        }
        let c = [Condition::new(
            "Programmed",
            ok,
            if ok { "Programmed" } else { "Invalid" },
            msg,
        )];
        let old = old_listeners.and_then(|ls| {
            ls.iter()
                .find(|o| o.get("name").and_then(|n| n.as_str()) == Some(&l.name))
        });
        let (attached, kind) = l.attached_routes();
        listeners.push(json!({
            "name": l.name,
            "attachedRoutes": attached.len(),
            "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": kind}],
            "conditions": conditions(&c, old, generation),
        }));
    }
    let waypoint = matches!(gw.role, GatewayRole::Waypoint { .. });
    let programmed_msg = if all_bound {
        if waypoint {
            format!("waypoint serving {} service(s)", gw.waypoint_services.len())
        } else {
            "all listeners are bound".to_string()
        }
    } else {
        problems.join("; ")
    };
    let c = [
        translated_gateway_accepted(rejected),
        Condition::new(
            "Programmed",
            all_bound,
            if all_bound { "Programmed" } else { "Invalid" },
            programmed_msg,
        ),
    ];
    let mut status = json!({
        "conditions": conditions(&c, obj.status(), generation),
        "listeners": listeners,
    });
    if let Some(b) = binding {
        status["addresses"] = json!([{ "type": "IPAddress", "value": b.address.to_string() }]);
    }
    status
}

/// Where a plugin runs, for status and `describe`.
pub fn attachments(snapshot: &Snapshot, id: &PluginId) -> Vec<String> {
    let mut out = Vec::new();
    for gw in &snapshot.gateways {
        match gw.role {
            GatewayRole::Ingress => {
                if gw.listeners.iter().any(|l| l.chain.contains(id)) {
                    out.push(format!("gateway {}", gw.key));
                }
            }
            GatewayRole::Waypoint { .. } => {
                let services: Vec<String> = gw
                    .waypoint_services
                    .iter()
                    .filter(|s| s.ports.iter().any(|p| p.chain.contains(id)))
                    .map(|s| s.service.name.clone())
                    .collect();
                if !services.is_empty() {
                    out.push(format!(
                        "waypoint {} (services: {})",
                        gw.key,
                        services.join(", ")
                    ));
                }
            }
        }
    }
    out
}

/// Status equality that ignores transition times (they are kept when nothing changed).
pub fn same_status(old: Option<&Value>, new: &Value) -> bool {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    old.is_some_and(|o| strip(o) == strip(new))
}

fn fingerprint(cfg: &PluginConfig) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cfg.url.hash(&mut h);
    cfg.sha256.hash(&mut h);
    cfg.configuration.hash(&mut h);
    cfg.root_id.hash(&mut h);
    cfg.filter_name.hash(&mut h);
    cfg.env.hash(&mut h);
    format!("{:?}", cfg.fail_strategy).hash(&mut h);
    match &cfg.pull_secret {
        Some(Ok(b)) => b.hash(&mut h),
        Some(Err(e)) => e.hash(&mut h),
        None => 0u8.hash(&mut h),
    }
    // `Always` re-pulls when the object changes (its generation), as Istio does.
    if cfg.pull_policy == PullPolicy::Always {
        cfg.generation.hash(&mut h);
    }
    h.finish()
}
