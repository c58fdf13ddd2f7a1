//! The embedded store's reconcile loop: store → [`Pipeline`] (translate →
//! fetch/compile/configure plugins) → swap into the data plane → write status.
//! One pass at a time; a pass that fails for one plugin keeps serving what it
//! can (and the last good module).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify, watch};
use waystone_fetch::Fetcher;
use waystone_model::TranslateOptions;
use waystone_proxy::DataPlane;
use waystone_wasm::WasmEngine;

use crate::pipeline::{Pipeline, StatusUpdate};
use crate::store::{Store, Write};

pub struct Reconciler {
    pub store: Arc<Mutex<Store>>,
    pub changed: Arc<Notify>,
    pub applied: watch::Sender<u64>,
    pub dataplane: Arc<DataPlane>,
    pipeline: Pipeline,
    /// Each plugin's module state after the latest pass, for the config dump.
    pub reports: Arc<std::sync::Mutex<crate::dump::PluginReports>>,
    retry_delay: Duration,
}

impl Reconciler {
    pub fn new(
        store: Arc<Mutex<Store>>,
        changed: Arc<Notify>,
        applied: watch::Sender<u64>,
        dataplane: Arc<DataPlane>,
        engine: WasmEngine,
        fetcher: Fetcher,
        opts: TranslateOptions,
    ) -> Self {
        Self {
            store,
            changed,
            applied,
            dataplane,
            pipeline: Pipeline::new(engine, fetcher, opts),
            retry_delay: Duration::from_secs(2),
            reports: Default::default(),
        }
    }

    /// Keeps compiled modules on disk so a restart does not recompile.
    pub fn set_compiled_cache(&mut self, cache: Option<waystone_wasm::CompiledCache>) {
        self.pipeline.compiled_cache = cache;
    }

    /// Runs passes until `stop` fires: on every change, and with backoff while a plugin is failing.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        loop {
            let failing = match self.pass().await {
                Ok(failing) => failing,
                Err(e) => {
                    tracing::error!(error = %e, "reconcile failed; keeping the running config");
                    true
                }
            };
            let retry = if failing {
                let d = self.retry_delay;
                self.retry_delay = (self.retry_delay * 2).min(Duration::from_secs(60));
                Some(d)
            } else {
                self.retry_delay = Duration::from_secs(2);
                None
            };
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = async { match retry { Some(d) => tokio::time::sleep(d).await, None => std::future::pending().await } } => {
                    tracing::info!("retrying plugins that failed to load");
                }
                _ = stop.changed() => return,
            }
        }
    }

    /// One pass. Returns whether some plugin is failing (so a retry is due).
    async fn pass(&mut self) -> Result<bool, crate::store::StoreError> {
        let (version, objects) = {
            let store = self.store.lock().await;
            (store.current_version()?, store.list(None, None)?)
        };
        let built = self.pipeline.build(&objects).await;
        let snapshot = built.runtime.snapshot.clone();
        let bindings = self.dataplane.apply(built.runtime).await;
        *self.reports.lock().unwrap_or_else(|p| p.into_inner()) =
            self.pipeline.plugin_reports(&snapshot);
        let updates = self.pipeline.statuses(
            &objects,
            &snapshot,
            Some(&bindings),
            &built.translation_errors,
        );
        self.write_status(updates).await?;
        self.applied.send_replace(version);
        Ok(built.failing)
    }

    async fn write_status(
        &self,
        updates: Vec<StatusUpdate>,
    ) -> Result<(), crate::store::StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut store = self.store.lock().await;
        let version = store.current_version()?;
        let mut writes = Vec::new();
        for u in updates {
            // Re-read under the lock: a concurrent apply must not be overwritten by a stale copy.
            if let Some(mut current) = store.get(u.kind, &u.key.namespace, &u.key.name)? {
                current.set_status(Some(u.status));
                writes.push(Write::Put(Box::new(current)));
            }
        }
        store.commit(&writes, version)
    }
}
