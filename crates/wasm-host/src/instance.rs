//! A running plugin: one wasmtime `Store`, its root context and the HTTP contexts created on
//! it. Every guest call is bounded by the epoch deadline and the memory cap; any fault poisons
//! the instance so the data plane replaces it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::{Store, Trap, TypedFunc, WasmParams, WasmResults};

use crate::engine::{CompiledModule, EPOCH_TICK};
use crate::error::HostError;
use crate::hostcalls::flush_lines;
use crate::state::{GuestExit, HostState};
use crate::types::{Action, HttpStream, PluginSpec, StreamType};

const ROOT_CONTEXT: u32 = 1;

/// Instances alive in this process: what leak checks (and metrics) read.
static LIVE_INSTANCES: AtomicUsize = AtomicUsize::new(0);

type Cb1 = Option<TypedFunc<i32, ()>>;
type CbBool1 = Option<TypedFunc<i32, i32>>;
type Cb2 = Option<TypedFunc<(i32, i32), i32>>;
type Cb3 = Option<TypedFunc<(i32, i32, i32), i32>>;

/// The guest callbacks, looked up once per instance. `compile` checked their signatures.
struct Callbacks {
    context_create: TypedFunc<(i32, i32), ()>,
    on_vm_start: Cb2,
    on_configure: Cb2,
    on_request_headers: Cb3,
    on_request_body: Cb3,
    on_request_trailers: Cb2,
    on_response_headers: Cb3,
    on_response_body: Cb3,
    on_response_trailers: Cb2,
    on_done: CbBool1,
    on_log: Cb1,
    on_delete: Cb1,
}

/// One plugin instance. `Send` but not `Sync`: one worker thread uses it at a time.
pub struct PluginInstance {
    store: Store<HostState>,
    callbacks: Callbacks,
    spec: Arc<PluginSpec>,
    next_context: u32,
    poisoned: bool,
    deadline_ticks: u64,
    // Keeps the engine (and its epoch ticker) alive as long as the instance runs.
    _module: CompiledModule,
}

impl PluginInstance {
    /// Instantiates, runs `_initialize` (or `_start`), creates the root context (id 1), calls
    /// `proxy_on_vm_start` and `proxy_on_configure`.
    pub fn start(module: &CompiledModule, spec: Arc<PluginSpec>) -> Result<Self, HostError> {
        let engine = &module.inner.engine.inner;
        let cfg = &engine.config;
        let state = HostState::new(spec.clone(), engine.shared.clone(), cfg.max_memory_bytes);
        let mut store = Store::new(&engine.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Rounded up, plus one tick because the current tick may be about to end.
        let deadline_ticks =
            cfg.call_deadline.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1;
        store.set_epoch_deadline(deadline_ticks);

        let instance = match module.inner.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => {
                return Err(classify(&spec, &store, "instantiate", cfg.call_deadline, e)
                    .unwrap_or_else(|reason| HostError::Instantiate {
                        plugin: spec.name.clone(),
                        reason,
                    }));
            }
        };
        let instantiate_err = |what: &str, e: wasmtime::Error| HostError::Instantiate {
            plugin: spec.name.clone(),
            reason: format!("{what}: {e:#}"),
        };
        let memory = instance.get_memory(&mut store, "memory");
        let allocator =
            match instance.get_typed_func::<i32, i32>(&mut store, "proxy_on_memory_allocate") {
                Ok(f) => f,
                Err(_) => instance
                    .get_typed_func::<i32, i32>(&mut store, "malloc")
                    .map_err(|e| instantiate_err("malloc", e))?,
            };
        store.data_mut().memory = memory;
        store.data_mut().allocator = Some(allocator);

        macro_rules! optional {
            ($name:literal) => {
                match instance.get_func(&mut store, $name) {
                    Some(f) => Some(f.typed(&store).map_err(|e| instantiate_err($name, e))?),
                    None => None,
                }
            };
        }
        let callbacks = Callbacks {
            context_create: instance
                .get_typed_func(&mut store, "proxy_on_context_create")
                .map_err(|e| instantiate_err("proxy_on_context_create", e))?,
            on_vm_start: optional!("proxy_on_vm_start"),
            on_configure: optional!("proxy_on_configure"),
            on_request_headers: optional!("proxy_on_request_headers"),
            on_request_body: optional!("proxy_on_request_body"),
            on_request_trailers: optional!("proxy_on_request_trailers"),
            on_response_headers: optional!("proxy_on_response_headers"),
            on_response_body: optional!("proxy_on_response_body"),
            on_response_trailers: optional!("proxy_on_response_trailers"),
            on_done: optional!("proxy_on_done"),
            on_log: optional!("proxy_on_log"),
            on_delete: optional!("proxy_on_delete"),
        };
        let init: Option<TypedFunc<(), ()>> = optional!("_initialize");
        let start_fn: Option<TypedFunc<(), ()>> = optional!("_start");

        LIVE_INSTANCES.fetch_add(1, Ordering::Relaxed);
        let mut this = PluginInstance {
            store,
            callbacks,
            spec: spec.clone(),
            next_context: ROOT_CONTEXT + 1,
            poisoned: false,
            deadline_ticks,
            _module: module.clone(),
        };

        if let Some(f) = init {
            this.call("_initialize", f, (), None)?;
        } else if let Some(f) = start_fn {
            match this.call_raw(f, (), None) {
                Ok(()) => {}
                // A WASI command returning from main may exit with 0: that is a normal end.
                Err(e) if matches!(e.downcast_ref::<GuestExit>(), Some(GuestExit::ProcExit(0))) => {
                }
                Err(e) => return Err(this.fault("_start", e)),
            }
        }

        this.store.data_mut().contexts.insert(ROOT_CONTEXT);
        let create = this.callbacks.context_create.clone();
        this.call(
            "proxy_on_context_create",
            create,
            (ROOT_CONTEXT as i32, 0),
            None,
        )?;

        if let Some(f) = this.callbacks.on_vm_start.clone() {
            let size = spec.vm_configuration.len() as i32;
            if this.call("proxy_on_vm_start", f, (ROOT_CONTEXT as i32, size), None)? == 0 {
                return Err(HostError::VmStartRejected {
                    plugin: spec.name.clone(),
                });
            }
        }
        if let Some(f) = this.callbacks.on_configure.clone() {
            let size = spec.plugin_configuration.len() as i32;
            if this.call("proxy_on_configure", f, (ROOT_CONTEXT as i32, size), None)? == 0 {
                return Err(HostError::ConfigureRejected {
                    plugin: spec.name.clone(),
                });
            }
        }
        Ok(this)
    }

    /// Creates an HTTP context under the root context and returns its id.
    pub fn create_http_context(&mut self) -> Result<u32, HostError> {
        let id = self.next_context;
        // Ids are never reused while the instance lives; wrapping past u32 skips 0 and root.
        self.next_context = self.next_context.checked_add(1).unwrap_or(ROOT_CONTEXT + 1);
        let create = self.callbacks.context_create.clone();
        self.store.data_mut().contexts.insert(id);
        if let Err(e) = self.call(
            "proxy_on_context_create",
            create,
            (id as i32, ROOT_CONTEXT as i32),
            None,
        ) {
            self.store.data_mut().contexts.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    pub fn on_request_headers(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.request_headers.len() as i32;
        let f = self.callbacks.on_request_headers.clone();
        self.http_callback(
            "proxy_on_request_headers",
            f,
            ctx,
            n,
            Some(end_of_stream),
            stream,
        )
    }

    pub fn on_request_body(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.request_body.len() as i32;
        let f = self.callbacks.on_request_body.clone();
        self.http_callback(
            "proxy_on_request_body",
            f,
            ctx,
            n,
            Some(end_of_stream),
            stream,
        )
    }

    pub fn on_request_trailers(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        let n = stream.request_trailers.len() as i32;
        let f = self.callbacks.on_request_trailers.clone();
        self.http_callback2("proxy_on_request_trailers", f, ctx, n, stream)
    }

    pub fn on_response_headers(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.response_headers.len() as i32;
        let f = self.callbacks.on_response_headers.clone();
        self.http_callback(
            "proxy_on_response_headers",
            f,
            ctx,
            n,
            Some(end_of_stream),
            stream,
        )
    }

    pub fn on_response_body(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.response_body.len() as i32;
        let f = self.callbacks.on_response_body.clone();
        self.http_callback(
            "proxy_on_response_body",
            f,
            ctx,
            n,
            Some(end_of_stream),
            stream,
        )
    }

    pub fn on_response_trailers(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        let n = stream.response_trailers.len() as i32;
        let f = self.callbacks.on_response_trailers.clone();
        self.http_callback2("proxy_on_response_trailers", f, ctx, n, stream)
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`, in that order. The context is
    /// forgotten even if one of them fails.
    pub fn finish_http_context(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
    ) -> Result<(), HostError> {
        self.check_context("proxy_on_done", ctx)?;
        let result = self.finish_inner(ctx, stream);
        self.store.data_mut().contexts.remove(&ctx);
        result
    }

    fn finish_inner(&mut self, ctx: u32, stream: &mut HttpStream) -> Result<(), HostError> {
        let c = ctx as i32;
        // For HTTP contexts the answer of on_done (whether the context may be deleted now) is
        // not waited for: the stream is over.
        if let Some(f) = self.callbacks.on_done.clone() {
            self.call("proxy_on_done", f, c, Some(stream))?;
        }
        if let Some(f) = self.callbacks.on_log.clone() {
            self.call("proxy_on_log", f, c, Some(stream))?;
        }
        if let Some(f) = self.callbacks.on_delete.clone() {
            self.call("proxy_on_delete", f, c, Some(stream))?;
        }
        Ok(())
    }

    /// How many instances are alive in this process (started and not yet dropped, whatever
    /// their plugin). A number that keeps growing across config swaps and faults is a leak.
    pub fn live_instances() -> usize {
        LIVE_INSTANCES.load(Ordering::Relaxed)
    }

    /// True after a trap, deadline or memory-limit fault: the instance must be dropped and
    /// replaced.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn spec(&self) -> &PluginSpec {
        &self.spec
    }

    /// The period the plugin asked for with `proxy_set_tick_period_milliseconds` (0 = none).
    pub fn tick_period_ms(&self) -> u32 {
        self.store.data().tick_period_ms
    }

    /// The stream the plugin asked to close with `proxy_close_stream`, if any; cleared by the
    /// call.
    pub fn take_close_request(&mut self) -> Option<StreamType> {
        self.store.data_mut().close_requested.take()
    }

    /// Whether the plugin called `proxy_done` (it finished work it had deferred in `on_done`).
    pub fn done_requested(&self) -> bool {
        self.store.data().done_requested
    }

    /// Number of contexts alive, the root one included.
    pub fn live_contexts(&self) -> usize {
        self.store.data().contexts.len()
    }

    fn check_context(&self, callback: &'static str, ctx: u32) -> Result<(), HostError> {
        if ctx == ROOT_CONTEXT || !self.store.data().contexts.contains(&ctx) {
            return Err(HostError::UnknownContext {
                plugin: self.spec.name.clone(),
                callback,
                context: ctx,
            });
        }
        Ok(())
    }

    fn http_callback(
        &mut self,
        callback: &'static str,
        f: Cb3,
        ctx: u32,
        n: i32,
        eos: Option<bool>,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let Some(f) = f else {
            return self.refuse_if_poisoned(callback).map(|()| Action::Continue);
        };
        let eos = i32::from(eos.unwrap_or(false));
        self.call(callback, f, (ctx as i32, n, eos), Some(stream))
            .map(action)
    }

    fn http_callback2(
        &mut self,
        callback: &'static str,
        f: Cb2,
        ctx: u32,
        n: i32,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let Some(f) = f else {
            return self.refuse_if_poisoned(callback).map(|()| Action::Continue);
        };
        self.call(callback, f, (ctx as i32, n), Some(stream))
            .map(action)
    }

    fn refuse_if_poisoned(&self, callback: &'static str) -> Result<(), HostError> {
        if self.poisoned {
            return Err(HostError::Poisoned {
                plugin: self.spec.name.clone(),
                callback,
            });
        }
        Ok(())
    }

    /// Runs one guest callback under the deadline, with `stream` reachable from host functions
    /// for its duration (moved into the store and back, also on error).
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        f: TypedFunc<P, R>,
        params: P,
        stream: Option<&mut HttpStream>,
    ) -> Result<R, HostError> {
        self.refuse_if_poisoned(callback)?;
        self.call_raw(f, params, stream)
            .map_err(|e| self.fault(callback, e))
    }

    fn call_raw<P: WasmParams, R: WasmResults>(
        &mut self,
        f: TypedFunc<P, R>,
        params: P,
        stream: Option<&mut HttpStream>,
    ) -> wasmtime::Result<R> {
        self.store.set_epoch_deadline(self.deadline_ticks);
        match stream {
            Some(s) => {
                self.store.data_mut().stream = Some(std::mem::take(s));
                let r = f.call(&mut self.store, params);
                *s = self.store.data_mut().stream.take().unwrap_or_default();
                r
            }
            None => f.call(&mut self.store, params),
        }
    }

    /// Poisons the instance and names the fault.
    fn fault(&mut self, callback: &'static str, e: wasmtime::Error) -> HostError {
        self.poisoned = true;
        let deadline = self._module.inner.engine.inner.config.call_deadline;
        classify(&self.spec, &self.store, callback, deadline, e).unwrap_or_else(|reason| {
            HostError::Trap {
                plugin: self.spec.name.clone(),
                callback,
                reason,
            }
        })
    }
}

/// Names the fault: memory cap and deadline get their own errors, anything else is a trap
/// whose reason (`Err`) the caller wraps.
fn classify(
    spec: &PluginSpec,
    store: &Store<HostState>,
    callback: &'static str,
    deadline: std::time::Duration,
    e: wasmtime::Error,
) -> Result<HostError, String> {
    if store.data().limiter.hit {
        return Ok(HostError::MemoryLimit {
            plugin: spec.name.clone(),
            callback,
            limit_bytes: store.data().limiter.max_bytes,
        });
    }
    if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return Ok(HostError::DeadlineExceeded {
            plugin: spec.name.clone(),
            callback,
            deadline,
        });
    }
    if let Some(exit) = e.downcast_ref::<GuestExit>() {
        return Err(exit.to_string());
    }
    Err(format!("{e:#}"))
}

fn action(code: i32) -> Action {
    // 0 Continue; 2 is ContinueAndEndStream in the Proxy-Wasm SDK enums; anything else stops
    // iteration (StopIteration, StopAllIterationAndBuffer/Watermark).
    match code {
        0 | 2 => Action::Continue,
        _ => Action::Pause,
    }
}

impl Drop for PluginInstance {
    fn drop(&mut self) {
        LIVE_INSTANCES.fetch_sub(1, Ordering::Relaxed);
        let state = self.store.data_mut();
        let name = state.spec.name.clone();
        flush_lines(&mut state.stdout, 2, &name, true);
        flush_lines(&mut state.stderr, 4, &name, true);
    }
}
