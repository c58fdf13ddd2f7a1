//! What the data plane runs: a snapshot plus, for each plugin it names, the
//! loaded module or the reason it could not be loaded.

use std::collections::BTreeMap;
use std::sync::Arc;

use waystone_model::snapshot::{FailStrategy, PluginId, Snapshot};
use waystone_wasm::{CompiledModule, PluginSpec};

/// A plugin ready to run: its compiled module and the spec each instance starts with.
#[derive(Clone)]
pub struct LoadedPlugin {
    pub id: PluginId,
    pub module: CompiledModule,
    pub spec: Arc<PluginSpec>,
    pub fail_strategy: FailStrategy,
    /// Changes whenever the module or its configuration changes, so workers
    /// know to start fresh instances (it keys the per-worker instance cache).
    pub revision: u64,
    /// The module digest, for logs and status.
    pub module_digest: String,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin")
            .field("id", &self.id)
            .field("revision", &self.revision)
            .field("module_digest", &self.module_digest)
            .finish()
    }
}

/// The state of one plugin of the snapshot.
#[derive(Debug, Clone)]
pub enum PluginSlot {
    Ready(Arc<LoadedPlugin>),
    /// The module could not be fetched, compiled or configured. FAIL_OPEN
    /// plugins are skipped; any other strategy denies the chain's requests.
    Failed {
        fail_strategy: FailStrategy,
        reason: String,
    },
}

/// A worker's handle on the runtime config current when it took it: an `Rc` of this is what
/// the worker's requests share (`dataplane::worker_config`), so a request writes no reference
/// count that other workers write.
#[derive(Debug)]
pub struct WorkerConfig(pub Arc<RuntimeConfig>);

impl std::ops::Deref for WorkerConfig {
    type Target = RuntimeConfig;
    fn deref(&self) -> &RuntimeConfig {
        &self.0
    }
}

/// One consistent configuration: swapped atomically, read per request.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub snapshot: Arc<Snapshot>,
    pub plugins: BTreeMap<PluginId, PluginSlot>,
    /// Namespace used for short service names at the local mesh entry.
    pub default_namespace: Arc<str>,
}

impl RuntimeConfig {
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::empty()),
            plugins: BTreeMap::new(),
            default_namespace: "default".into(),
        }
    }
}
