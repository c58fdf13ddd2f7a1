//! Worker threads: each runs a single-threaded tokio runtime and owns one
//! instance of every plugin it has run, so a request's plugin contexts never
//! leave the thread that created them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use tokio::sync::mpsc;
use waystone_wasm::{HostError, PluginInstance};

use crate::runtime::LoadedPlugin;

/// Work sent to a worker: a future factory run on its local task set.
pub type Job = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send>;

pub struct Workers {
    senders: std::sync::RwLock<Vec<mpsc::UnboundedSender<Job>>>,
    next: std::sync::atomic::AtomicUsize,
    threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    count: usize,
}

impl Workers {
    pub fn start(count: usize) -> std::io::Result<Self> {
        let count = count.max(1);
        let mut senders = Vec::new();
        let mut threads = Vec::new();
        for i in 0..count {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = std::thread::Builder::new()
                .name(format!("waystone-worker-{i}"))
                .spawn(move || {
                    let local = tokio::task::LocalSet::new();
                    local.block_on(&rt, async move {
                        while let Some(job) = rx.recv().await {
                            tokio::task::spawn_local(job());
                        }
                    });
                    // The channel closed: let in-flight connections finish (the
                    // caller bounds the drain by closing them).
                    rt.block_on(local);
                    INSTANCES.with(|c| c.borrow_mut().clear());
                })?;
            senders.push(tx);
            threads.push(handle);
        }
        Ok(Self {
            senders: std::sync::RwLock::new(senders),
            next: Default::default(),
            threads: std::sync::Mutex::new(threads),
            count,
        })
    }

    /// Runs `job` on the next worker, round-robin.
    pub fn dispatch(&self, job: Job) {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.count;
        let senders = self.senders.read().unwrap_or_else(|p| p.into_inner());
        // No sender means shutdown: dropping the job closes its connection.
        if let Some(tx) = senders.get(n) {
            let _ = tx.send(job);
        }
    }

    /// Runs a job made by `make` on every worker.
    pub fn broadcast(&self, make: impl Fn() -> Job) {
        let senders = self.senders.read().unwrap_or_else(|p| p.into_inner());
        for tx in senders.iter() {
            let _ = tx.send(make());
        }
    }

    /// Stops taking jobs and waits until every worker's connections are done.
    pub fn stop(&self) {
        self.senders
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

pub type SharedInstance = Rc<RefCell<PluginInstance>>;

thread_local! {
    /// This worker's instances, by plugin revision.
    static INSTANCES: RefCell<HashMap<u64, SharedInstance>> = RefCell::new(HashMap::new());
}

/// This worker's instance of `plugin`, started on first use.
pub fn instance_for(plugin: &Arc<LoadedPlugin>) -> Result<SharedInstance, HostError> {
    if let Some(i) = INSTANCES.with(|c| c.borrow().get(&plugin.revision).cloned()) {
        return Ok(i);
    }
    let started = std::time::Instant::now();
    let result = PluginInstance::start(&plugin.module, plugin.spec.clone());
    crate::metrics::record_plugin_call(
        plugin.revision,
        &plugin.spec.name,
        crate::metrics::Callback::Start,
        crate::metrics::CallOutcome::of(&result.as_ref().map(|_| ()), false, None),
        started.elapsed(),
    );
    let instance = Rc::new(RefCell::new(result?));
    INSTANCES.with(|c| c.borrow_mut().insert(plugin.revision, instance.clone()));
    Ok(instance)
}

/// Drops this worker's instance of `revision` (after a fault), so the next
/// request starts a fresh one. Requests still holding it finish with it.
pub fn discard_instance(revision: u64) {
    INSTANCES.with(|c| c.borrow_mut().remove(&revision));
}

/// This worker's live instances: plugin name, memory size.
pub fn instance_stats() -> Vec<crate::metrics::InstanceStats> {
    INSTANCES.with(|c| {
        c.borrow()
            .values()
            // An instance is never borrowed across an await, so this only skips in theory.
            .filter_map(|i| {
                i.try_borrow().ok().map(|i| crate::metrics::InstanceStats {
                    plugin: i.spec().name.clone(),
                    instances: 1,
                    memory_bytes: i.memory_bytes() as u64,
                })
            })
            .collect()
    })
}

/// Drops instances of revisions no longer in use.
pub fn retain_instances(live: &std::collections::HashSet<u64>) {
    INSTANCES.with(|c| c.borrow_mut().retain(|rev, _| live.contains(rev)));
}
