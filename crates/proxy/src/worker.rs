//! Worker threads: each runs a single-threaded tokio runtime and owns one
//! instance of every plugin it has run, so a request's plugin contexts never
//! leave the thread that created them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use waystone_wasm::{
    ContextAction, GrpcCommand, HostError, HttpCallResponse, PendingCallout, PluginInstance,
};

use crate::callout::{self, GrpcOutcome, GrpcStreamEvent, GrpcStreamInput, Resolver};
use crate::chain::deliver_grpc;
use crate::metrics::{CallOutcome, Callback, KeyMap, PluginCalls};
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
        // The clock that times plugin callbacks calibrates itself on first use (about a
        // millisecond, at most 200): here, not in some worker's first request.
        quanta::Instant::now();
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
                        let heartbeat = tokio::task::spawn_local(heartbeat());
                        while let Some(job) = rx.recv().await {
                            tokio::task::spawn_local(job());
                        }
                        heartbeat.abort();
                    });
                    // The channel closed: let in-flight connections finish (the
                    // caller bounds the drain by closing them). Root drivers stop now, so
                    // they do not keep the worker alive.
                    STOPPING.with(|s| s.set(true));
                    INSTANCES.with(|c| c.borrow_mut().clear());
                    rt.block_on(local);
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

/// This worker's heartbeat: the request-head timeout's sweep (`head_timeout.rs`) once every
/// [`HEARTBEAT`]. Its timer also keeps a wake-up planned that is earlier than any timer a
/// request arms (hyper's 30 s header-read timeout on HBONE connections, a body's trailer
/// wait). Tokio's driver writes its eventfd to wake itself whenever a timer is registered
/// earlier than its planned wake-up, and with no timer planned every registration counts as
/// earlier: when hyper armed its header-read timer for every keep-alive request on every
/// listener, that was a `write` and an extra `epoll_wait` for about every other request
/// (measured with `perf stat -e syscalls:sys_enter_write`, 2 workers: 0.52 writes per request
/// before, see BENCHMARKS.md).
async fn heartbeat() {
    loop {
        crate::head_timeout::sweep();
        tokio::time::sleep(HEARTBEAT).await;
    }
}

const HEARTBEAT: Duration = crate::head_timeout::SWEEP_EVERY;

pub type SharedInstance = Rc<RefCell<PluginInstance>>;

/// This worker's instance of one plugin revision, with the plugin it runs and its handle on
/// that plugin's call series. Requests hold it by `Rc`: the `Arc<LoadedPlugin>`, whose count
/// every worker shares, is cloned once per worker instead of once per request, so a request
/// writes to no cache line another core is writing too.
pub struct WorkerPlugin {
    pub plugin: Arc<LoadedPlugin>,
    pub instance: SharedInstance,
    pub calls: PluginCalls,
}

thread_local! {
    /// This worker's instances, by plugin revision.
    static INSTANCES: RefCell<KeyMap<u64, Rc<WorkerPlugin>>> = RefCell::default();
    /// The snapshot the latest request on this worker ran with: what callouts of root contexts
    /// (ticks, queues) and `proxy_http_call`'s upstream check resolve names against.
    static RESOLVER: RefCell<Option<Rc<Resolver>>> = const { RefCell::new(None) };
    /// Set when the worker drains: root drivers end.
    static STOPPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Per instance (by address), where its driver takes root-context callouts.
    static ROOT_CALLOUTS: RefCell<KeyMap<usize, mpsc::UnboundedSender<PendingCallout>>> =
        RefCell::default();
    /// Per instance (by address), how many root-context callouts are in flight: while some are,
    /// a paused request of that plugin may still be resumed by the root context.
    static ROOT_IN_FLIGHT: RefCell<KeyMap<usize, usize>> = RefCell::default();
    /// HTTP contexts alive on this worker, by (instance address, context id): where actions a
    /// plugin aims at them (`proxy_set_effective_context` + continue/close/local reply) go,
    /// with the filter index of that context in its request's chain.
    static CONTEXTS: RefCell<KeyMap<(usize, u32), (usize, ActionSender)>> =
        RefCell::default();
}

pub type ActionSender = crate::local_channel::Sender<(usize, ContextAction)>;

/// Makes `ctx` of `instance` reachable by actions other contexts of that instance aim at it.
pub fn register_context(instance: &SharedInstance, ctx: u32, idx: usize, tx: ActionSender) {
    let key = (Rc::as_ptr(instance) as usize, ctx);
    CONTEXTS.with(|c| c.borrow_mut().insert(key, (idx, tx)));
}

pub fn unregister_context(instance: &SharedInstance, ctx: u32) {
    let key = (Rc::as_ptr(instance) as usize, ctx);
    CONTEXTS.with(|c| c.borrow_mut().remove(&key));
}

/// Hands the actions the plugin aimed at other contexts (since the last call) to the requests
/// owning them; actions for contexts already gone are dropped, as Envoy ignores them.
pub fn route_context_actions(instance: &SharedInstance) {
    let Ok(mut inst) = instance.try_borrow_mut() else {
        return;
    };
    let actions = inst.take_context_actions();
    drop(inst);
    if actions.is_empty() {
        return;
    }
    let ptr = Rc::as_ptr(instance) as usize;
    CONTEXTS.with(|c| {
        let c = c.borrow();
        for action in actions {
            let ctx = match &action {
                ContextAction::Continue { context_id, .. }
                | ContextAction::Close { context_id, .. }
                | ContextAction::LocalResponse { context_id, .. } => *context_id,
            };
            match c.get(&(ptr, ctx)) {
                Some((idx, tx)) => {
                    let _ = tx.send((*idx, action));
                }
                None => tracing::debug!(
                    context = ctx,
                    "dropping an action aimed at a context that is gone"
                ),
            }
        }
    });
}

/// Whether the root context of `instance` may still act on its own: it ticks or has callouts
/// in flight.
pub fn root_may_act(instance: &SharedInstance) -> bool {
    let ticking = instance
        .try_borrow()
        .is_ok_and(|i| i.tick_period().is_some());
    let key = Rc::as_ptr(instance) as usize;
    ticking || ROOT_IN_FLIGHT.with(|c| c.borrow().get(&key).is_some_and(|n| *n > 0))
}

/// Remembers the snapshot of the request being handled and returns this worker's resolver
/// for it. While the snapshot is unchanged this clones an `Rc`, not the two `Arc`s (whose
/// counts every worker would otherwise bump on every request).
pub fn set_resolver(
    snapshot: &Arc<waystone_model::snapshot::Snapshot>,
    default_namespace: &Arc<str>,
) -> Rc<Resolver> {
    RESOLVER.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some(r) if Arc::ptr_eq(&r.snapshot, snapshot) => r.clone(),
            _ => {
                let r = Rc::new(Resolver {
                    snapshot: snapshot.clone(),
                    default_namespace: default_namespace.clone(),
                });
                *c = Some(r.clone());
                r
            }
        }
    })
}

fn current_resolver() -> Option<Resolver> {
    RESOLVER.with(|c| c.borrow().as_deref().cloned())
}

/// This worker's instance of `plugin`, started on first use, with its root driver.
pub fn instance_for(plugin: &Arc<LoadedPlugin>) -> Result<Rc<WorkerPlugin>, HostError> {
    if let Some(i) = INSTANCES.with(|c| c.borrow().get(&plugin.revision).cloned()) {
        return Ok(i);
    }
    let calls = PluginCalls::new(plugin.revision, &plugin.spec.name);
    let started_at = std::time::Instant::now();
    let result = PluginInstance::start(&plugin.module, plugin.spec.clone());
    calls.record(
        Callback::Start,
        CallOutcome::of(&result.as_ref().map(|_| ()), false, None),
        started_at.elapsed(),
    );
    let mut started = result?;
    // Unknown upstreams are refused at call time (BadArgument), as Envoy refuses unknown
    // clusters. The check runs on this worker, during a guest call.
    started.set_upstream_check(Arc::new(|upstream: &str| {
        RESOLVER.with(|c| c.borrow().as_ref().is_some_and(|r| r.knows(upstream)))
    }));
    let instance = Rc::new(RefCell::new(started));
    spawn_root_driver(plugin, &instance);
    let entry = Rc::new(WorkerPlugin {
        plugin: plugin.clone(),
        instance,
        calls,
    });
    INSTANCES.with(|c| c.borrow_mut().insert(plugin.revision, entry.clone()));
    Ok(entry)
}

/// Hands a callout of `instance`'s root context to that instance's driver.
pub fn spawn_root_callout(instance: &SharedInstance, call: PendingCallout) {
    let key = Rc::as_ptr(instance) as usize;
    ROOT_CALLOUTS.with(|c| {
        if let Some(tx) = c.borrow().get(&key) {
            let _ = tx.send(call);
        }
    });
}

/// Runs, on this worker, everything an instance's root context asked for: `proxy_on_tick`
/// every tick period, `proxy_on_queue_ready` when a queue it registered gets an item (the
/// enqueuing thread wakes this task), and the answers of its callouts. It lives as long as the
/// instance does (it holds it weakly), so ticks and queue callbacks always reach the same
/// instance as the root context that asked for them.
fn spawn_root_driver(plugin: &Arc<LoadedPlugin>, instance: &SharedInstance) {
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<()>();
    instance.borrow().set_queue_waker(Arc::new(move || {
        let _ = wake_tx.send(());
    }));
    let (call_tx, mut call_rx) = mpsc::unbounded_channel::<PendingCallout>();
    let key = Rc::as_ptr(instance) as usize;
    ROOT_CALLOUTS.with(|c| c.borrow_mut().insert(key, call_tx));
    let weak: Weak<RefCell<PluginInstance>> = Rc::downgrade(instance);
    let revision = plugin.revision;
    let name = plugin.spec.name.clone();
    tokio::task::spawn_local(async move {
        enum Done {
            Http(u32, Option<HttpCallResponse>),
            Grpc(u32, GrpcOutcome),
        }
        let mut in_flight: JoinSet<Done> = JoinSet::new();
        // The root context's open gRPC streams: their sending sides and tasks, by token.
        let mut stream_inputs: HashMap<u32, mpsc::UnboundedSender<GrpcStreamInput>> =
            HashMap::new();
        let mut stream_tasks: HashMap<u32, tokio::task::AbortHandle> = HashMap::new();
        let (events_tx, mut events_rx) =
            crate::local_channel::channel::<(usize, u32, GrpcStreamEvent)>();
        let mut next_tick: Option<Instant> = None;
        loop {
            if STOPPING.with(|s| s.get()) {
                break;
            }
            let Some(inst) = weak.upgrade() else {
                break;
            };
            // Root callouts queued by the last callback (tick, queue, answer, configure).
            let (calls, grpc) = {
                let mut i = inst.borrow_mut();
                (i.take_callouts(), i.take_grpc_commands())
            };
            let period = inst.borrow().tick_period();
            drop(inst);
            if let Some(resolver) = current_resolver() {
                for call in calls {
                    let r = resolver.clone();
                    in_flight.spawn_local(async move {
                        let token = call.token;
                        Done::Http(token, callout::http_call(&r, call).await)
                    });
                }
                for cmd in grpc {
                    match cmd {
                        GrpcCommand::Call {
                            token,
                            call,
                            message,
                            timeout,
                            ..
                        } => {
                            let r = resolver.clone();
                            in_flight.spawn_local(async move {
                                Done::Grpc(
                                    token,
                                    callout::grpc_call(&r, call, message, timeout).await,
                                )
                            });
                        }
                        GrpcCommand::OpenStream { token, call, .. } => {
                            let (tx, rx) = mpsc::unbounded_channel();
                            stream_inputs.insert(token, tx);
                            let (r, events) = (resolver.clone(), events_tx.clone());
                            let handle = in_flight.spawn_local(async move {
                                Done::Grpc(
                                    token,
                                    callout::grpc_stream(&r, call, rx, events, 0, token).await,
                                )
                            });
                            stream_tasks.insert(token, handle);
                        }
                        GrpcCommand::Send {
                            token,
                            message,
                            end_of_stream,
                        } => {
                            if let Some(tx) = stream_inputs.get(&token) {
                                let _ = tx.send(GrpcStreamInput::Message {
                                    message,
                                    end_of_stream,
                                });
                            }
                        }
                        GrpcCommand::Close { token } => {
                            if let Some(tx) = stream_inputs.get(&token) {
                                let _ = tx.send(GrpcStreamInput::Close);
                            }
                        }
                        GrpcCommand::Cancel { token } => {
                            stream_inputs.remove(&token);
                            if let Some(h) = stream_tasks.remove(&token) {
                                h.abort();
                            }
                        }
                    }
                }
            }
            next_tick = period.map(|p| next_tick.unwrap_or_else(|| Instant::now() + p));
            // Without a tick period, look again now and then: a later callback may set one.
            let wake_at = next_tick.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            ROOT_IN_FLIGHT.with(|c| c.borrow_mut().insert(key, in_flight.len()));
            let result: Result<(), HostError> = tokio::select! {
                _ = tokio::time::sleep_until(wake_at) => {
                    match (next_tick, period) {
                        (Some(due), Some(p)) if Instant::now() >= due => {
                            // Skip missed ticks rather than firing a burst.
                            next_tick = Some((due + p).max(Instant::now()));
                            with_instance(&weak, |i| i.on_tick())
                        }
                        _ => Ok(()),
                    }
                }
                woke = wake_rx.recv() => {
                    if woke.is_none() {
                        break;
                    }
                    with_instance(&weak, |i| i.deliver_queue_ready().map(|_| ()))
                }
                Some(call) = call_rx.recv() => {
                    if let Some(r) = current_resolver() {
                        in_flight.spawn_local(async move {
                            let token = call.token;
                            Done::Http(token, callout::http_call(&r, call).await)
                        });
                    }
                    Ok(())
                }
                Some((_, token, event)) = events_rx.recv() => {
                    with_instance(&weak, |i| deliver_stream_event(i, token, event))
                }
                Some(Ok(done)) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Done::Grpc(token, _) = &done {
                        stream_inputs.remove(token);
                        stream_tasks.remove(token);
                    }
                    // What a stream reported before it ended comes first.
                    let mut early = Ok(());
                    while let Ok((_, token, event)) = events_rx.try_recv() {
                        early = early.and(with_instance(&weak, |i| deliver_stream_event(i, token, event)));
                    }
                    early.and_then(|()| with_instance(&weak, |i| match done {
                        Done::Http(token, response) => {
                            i.on_http_call_response(token, response, None).map(|_| ())
                        }
                        Done::Grpc(token, outcome) => deliver_grpc(i, token, outcome, None),
                    }))
                }
            };
            ROOT_IN_FLIGHT.with(|c| c.borrow_mut().insert(key, in_flight.len()));
            if let Some(inst) = weak.upgrade() {
                route_context_actions(&inst);
            }
            if let Err(err) = result {
                tracing::warn!(plugin = %name, error = %err, "plugin failed in a root-context callback");
                if weak.upgrade().is_some_and(|i| i.borrow().is_poisoned()) {
                    discard_instance(revision);
                    break;
                }
            }
        }
        ROOT_CALLOUTS.with(|c| c.borrow_mut().remove(&key));
        ROOT_IN_FLIGHT.with(|c| c.borrow_mut().remove(&key));
    });
}

fn deliver_stream_event(
    i: &mut PluginInstance,
    token: u32,
    event: GrpcStreamEvent,
) -> Result<(), HostError> {
    match event {
        GrpcStreamEvent::InitialMetadata(md) => i.on_grpc_receive_initial_metadata(token, md, None),
        GrpcStreamEvent::Message(m) => i.on_grpc_receive(token, m, None),
    }
    .map(|_| ())
}

/// Runs `f` on the instance if it still exists and no request is using it right now (a
/// request holds the borrow only within a callback, never across an await).
fn with_instance(
    weak: &Weak<RefCell<PluginInstance>>,
    f: impl FnOnce(&mut PluginInstance) -> Result<(), HostError>,
) -> Result<(), HostError> {
    let Some(inst) = weak.upgrade() else {
        return Ok(());
    };
    let mut guard = inst.borrow_mut();
    f(&mut guard)
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
            .filter_map(|p| {
                p.instance
                    .try_borrow()
                    .ok()
                    .map(|i| crate::metrics::InstanceStats {
                        plugin: i.spec().name.clone(),
                        instances: 1,
                        memory_bytes: i.memory_bytes() as u64,
                    })
            })
            .collect()
    })
}

/// Drops instances of revisions no longer in use, after telling their root context
/// (`proxy_on_done`, then `proxy_on_delete` when it agrees). Requests still running on such an
/// instance finish with it.
pub fn retain_instances(live: &std::collections::HashSet<u64>) {
    let removed: Vec<SharedInstance> = INSTANCES.with(|c| {
        let mut c = c.borrow_mut();
        let gone = c
            .iter()
            .filter(|(rev, _)| !live.contains(rev))
            .map(|(_, p)| p.instance.clone())
            .collect();
        c.retain(|rev, _| live.contains(rev));
        gone
    });
    for inst in removed {
        if let Ok(mut i) = inst.try_borrow_mut()
            && !i.is_poisoned()
            && let Err(err) = i.shutdown()
        {
            tracing::warn!(plugin = %i.spec().name, error = %err, "plugin failed while shutting down");
        }
    }
}
