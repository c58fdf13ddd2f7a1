//! A running plugin: one wasmtime `Store`, its root context and the HTTP contexts created on
//! it. Every guest call is bounded by the epoch deadline and the memory cap; any fault poisons
//! the instance so the data plane replaces it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::{Store, Trap, TypedFunc, WasmParams, WasmResults};

use crate::engine::{CompiledModule, EPOCH_TICK};
use crate::error::HostError;
use crate::hostcalls::flush_lines;
use crate::shared::QueueWaker;
use crate::state::{ContextAction, Delivery, GuestExit, HostState, UpstreamCheck};
use crate::status::Status;
use crate::types::{
    AbiVersion, Action, GrpcCommand, HeaderMap, HttpCallResponse, HttpStream, NetworkStream,
    PeerType, PendingCallout, PluginSpec, StreamType,
};

/// The id of the root context of every instance (one plugin per instance).
pub const ROOT_CONTEXT: u32 = 1;

/// Instances alive in this process: what leak checks (and metrics) read.
static LIVE_INSTANCES: AtomicUsize = AtomicUsize::new(0);

// Callbacks are cloned out of the instance for every guest call (the call needs `&mut self`).
// A `TypedFunc` clone bumps several reference counts inside wasmtime's engine-wide type
// registry, shared by every worker thread; an `Arc` of our own is one uncontended increment.
type Cb<P, R> = Arc<TypedFunc<P, R>>;
type Cb1 = Option<Cb<i32, ()>>;
type CbBool1 = Option<Cb<i32, i32>>;
type Cb2 = Option<Cb<(i32, i32), i32>>;
type Cb2Void = Option<Cb<(i32, i32), ()>>;
type Cb3 = Option<Cb<(i32, i32, i32), i32>>;
type Cb3Void = Option<Cb<(i32, i32, i32), ()>>;
type Cb5Void = Option<Cb<(i32, i32, i32, i32, i32), ()>>;

/// Header callbacks: ABI 0.1.0 has no end_of_stream parameter.
#[derive(Clone)]
enum HeadersCb {
    V01(Cb<(i32, i32), i32>),
    V02(Cb<(i32, i32, i32), i32>),
}

/// The guest callbacks, looked up once per instance. `compile` checked their signatures.
struct Callbacks {
    context_create: Cb<(i32, i32), ()>,
    on_vm_start: Cb2,
    on_configure: Cb2,
    on_tick: Cb1,
    on_queue_ready: Cb2Void,
    on_request_headers: Option<HeadersCb>,
    on_request_body: Cb3,
    on_request_trailers: Cb2,
    on_response_headers: Option<HeadersCb>,
    on_response_body: Cb3,
    on_response_trailers: Cb2,
    on_http_call_response: Cb5Void,
    on_grpc_initial_metadata: Cb3Void,
    on_grpc_receive: Cb3Void,
    on_grpc_trailing_metadata: Cb3Void,
    on_grpc_close: Cb3Void,
    on_new_connection: CbBool1,
    on_downstream_data: Cb3,
    on_upstream_data: Cb3,
    on_downstream_close: Cb2Void,
    on_upstream_close: Cb2Void,
    on_done: CbBool1,
    on_log: Cb1,
    on_delete: Cb1,
}

/// What a guest call may reach besides the instance's own state.
enum Attach<'a> {
    Nothing,
    Http(&'a mut HttpStream),
    Network(&'a mut NetworkStream),
}

impl<'a> From<Option<&'a mut HttpStream>> for Attach<'a> {
    fn from(s: Option<&'a mut HttpStream>) -> Self {
        match s {
            Some(s) => Attach::Http(s),
            None => Attach::Nothing,
        }
    }
}

/// One plugin instance. `Send` but not `Sync`: one worker thread uses it at a time.
pub struct PluginInstance {
    store: Store<HostState>,
    callbacks: Callbacks,
    spec: Arc<PluginSpec>,
    next_context: u32,
    poisoned: bool,
    /// The root context got proxy_on_delete: the plugin is shut down.
    finished: bool,
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
        let abi = module.abi();
        let state = HostState::new(
            spec.clone(),
            abi,
            engine.shared.clone(),
            cfg.max_memory_bytes,
        );
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
                    Some(f) => Some(Arc::new(
                        f.typed(&store).map_err(|e| instantiate_err($name, e))?,
                    )),
                    None => None,
                }
            };
        }
        macro_rules! headers {
            ($name:literal) => {
                if abi == AbiVersion::V0_1_0 {
                    optional!($name).map(HeadersCb::V01)
                } else {
                    optional!($name).map(HeadersCb::V02)
                }
            };
        }
        let callbacks = Callbacks {
            context_create: Arc::new(
                instance
                    .get_typed_func(&mut store, "proxy_on_context_create")
                    .map_err(|e| instantiate_err("proxy_on_context_create", e))?,
            ),
            on_vm_start: optional!("proxy_on_vm_start"),
            on_configure: optional!("proxy_on_configure"),
            on_tick: optional!("proxy_on_tick"),
            on_queue_ready: optional!("proxy_on_queue_ready"),
            on_request_headers: headers!("proxy_on_request_headers"),
            on_request_body: optional!("proxy_on_request_body"),
            on_request_trailers: optional!("proxy_on_request_trailers"),
            on_response_headers: headers!("proxy_on_response_headers"),
            on_response_body: optional!("proxy_on_response_body"),
            on_response_trailers: optional!("proxy_on_response_trailers"),
            on_http_call_response: optional!("proxy_on_http_call_response"),
            on_grpc_initial_metadata: optional!("proxy_on_grpc_receive_initial_metadata"),
            on_grpc_receive: optional!("proxy_on_grpc_receive"),
            on_grpc_trailing_metadata: optional!("proxy_on_grpc_receive_trailing_metadata"),
            on_grpc_close: optional!("proxy_on_grpc_close"),
            on_new_connection: optional!("proxy_on_new_connection"),
            on_downstream_data: optional!("proxy_on_downstream_data"),
            on_upstream_data: optional!("proxy_on_upstream_data"),
            on_downstream_close: optional!("proxy_on_downstream_connection_close"),
            on_upstream_close: optional!("proxy_on_upstream_connection_close"),
            on_done: optional!("proxy_on_done"),
            on_log: optional!("proxy_on_log"),
            on_delete: optional!("proxy_on_delete"),
        };
        let init: Option<Cb<(), ()>> = optional!("_initialize");
        let start_fn: Option<Cb<(), ()>> = optional!("_start");

        LIVE_INSTANCES.fetch_add(1, Ordering::Relaxed);
        let mut this = PluginInstance {
            store,
            callbacks,
            spec: spec.clone(),
            next_context: ROOT_CONTEXT + 1,
            poisoned: false,
            finished: false,
            deadline_ticks,
            _module: module.clone(),
        };

        if let Some(f) = init {
            this.call("_initialize", f, (), ROOT_CONTEXT, Attach::Nothing)?;
        } else if let Some(f) = start_fn {
            let mut site = this.parts().0;
            match site.call_raw(&f, (), ROOT_CONTEXT, Attach::Nothing) {
                Ok(()) => {}
                // A WASI command returning from main may exit with 0: that is a normal end.
                Err(e) if matches!(e.downcast_ref::<GuestExit>(), Some(GuestExit::ProcExit(0))) => {
                }
                Err(e) => return Err(site.fault("_start", e)),
            }
        }

        this.store.data_mut().contexts.insert(ROOT_CONTEXT);
        let create = this.callbacks.context_create.clone();
        this.call(
            "proxy_on_context_create",
            create,
            (ROOT_CONTEXT as i32, 0),
            ROOT_CONTEXT,
            Attach::Nothing,
        )?;

        if let Some(f) = this.callbacks.on_vm_start.clone() {
            let size = spec.vm_configuration.len() as i32;
            let args = (ROOT_CONTEXT as i32, size);
            if this.call("proxy_on_vm_start", f, args, ROOT_CONTEXT, Attach::Nothing)? == 0 {
                return Err(HostError::VmStartRejected {
                    plugin: spec.name.clone(),
                });
            }
        }
        if let Some(f) = this.callbacks.on_configure.clone() {
            let size = spec.plugin_configuration.len() as i32;
            let args = (ROOT_CONTEXT as i32, size);
            if this.call("proxy_on_configure", f, args, ROOT_CONTEXT, Attach::Nothing)? == 0 {
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
        self.store.data_mut().contexts.insert(id);
        let (mut site, cbs) = self.parts();
        if let Err(e) = site.call(
            "proxy_on_context_create",
            &cbs.context_create,
            (id as i32, ROOT_CONTEXT as i32),
            id,
            Attach::Nothing,
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
        let n = stream.request_header_count() as i32;
        self.headers_callback(
            "proxy_on_request_headers",
            |c| &c.on_request_headers,
            ctx,
            n,
            end_of_stream,
            stream,
        )
    }

    /// Body callbacks see what is buffered in `stream.request_body`: the embedder appends each
    /// chunk before the call. On `Continue` the embedder passes the buffered bytes on and clears
    /// the buffer; on `Pause` it keeps buffering, so at end of stream the plugin sees every byte
    /// it held back (Envoy's StopIterationAndBuffer).
    pub fn on_request_body(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.request_body.len() as i32;
        self.http_callback(
            "proxy_on_request_body",
            |c| &c.on_request_body,
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
        self.http_callback2(
            "proxy_on_request_trailers",
            |c| &c.on_request_trailers,
            ctx,
            n,
            stream,
        )
    }

    pub fn on_response_headers(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = stream.response_header_count() as i32;
        self.headers_callback(
            "proxy_on_response_headers",
            |c| &c.on_response_headers,
            ctx,
            n,
            end_of_stream,
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
        self.http_callback(
            "proxy_on_response_body",
            |c| &c.on_response_body,
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
        self.http_callback2(
            "proxy_on_response_trailers",
            |c| &c.on_response_trailers,
            ctx,
            n,
            stream,
        )
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`, in that order. The context is
    /// forgotten even if one of them fails.
    pub fn finish_http_context(
        &mut self,
        ctx: u32,
        stream: &mut HttpStream,
    ) -> Result<(), HostError> {
        self.check_context("proxy_on_done", ctx)?;
        let result = self.finish_inner(ctx, Attach::Http(stream));
        self.forget_context(ctx);
        result
    }

    fn finish_inner(&mut self, ctx: u32, attach: Attach<'_>) -> Result<(), HostError> {
        let (mut site, cbs) = self.parts();
        // The stream is moved into the store once for the three calls, not once per call.
        match attach {
            Attach::Http(s) => {
                site.attach_stream(s);
                let r = finish_calls(&mut site, cbs, ctx);
                site.detach_stream(s);
                r
            }
            Attach::Network(s) => {
                site.store.data_mut().network = Some(std::mem::take(s));
                let r = finish_calls(&mut site, cbs, ctx);
                *s = site.store.data_mut().network.take().unwrap_or_default();
                r
            }
            Attach::Nothing => finish_calls(&mut site, cbs, ctx),
        }
    }

    /// Drops a finished context and cancels the callouts it still had in flight (Envoy cancels
    /// them when the context is destroyed): their answers are no longer delivered.
    fn forget_context(&mut self, ctx: u32) {
        let state = self.store.data_mut();
        state.contexts.remove(&ctx);
        let co = &mut state.callouts;
        co.http_owner.retain(|_, owner| *owner != ctx);
        co.queued_http.retain(|c| c.context_id != ctx);
        let cancelled: Vec<u32> = co
            .grpc_owner
            .iter()
            .filter(|(_, owner)| **owner == ctx)
            .map(|(token, _)| *token)
            .collect();
        for token in cancelled {
            co.grpc_owner.remove(&token);
            co.queued_grpc.push(GrpcCommand::Cancel { token });
        }
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

    /// Whether the calls since the embedder last took them left it anything to act on: HTTP
    /// calls or gRPC operations to start, actions aimed at other contexts, or a stream to
    /// close. When false, the `take_*` calls would all come back empty.
    pub fn has_queued_work(&self) -> bool {
        let state = self.store.data();
        !state.callouts.queued_http.is_empty()
            || !state.callouts.queued_grpc.is_empty()
            || !state.context_actions.is_empty()
            || state.close_requested.is_some()
    }

    /// Number of contexts alive, the root one included.
    pub fn live_contexts(&self) -> usize {
        self.store.data().contexts.len()
    }

    /// The ABI version the module announced.
    pub fn abi(&self) -> AbiVersion {
        self.store.data().abi
    }

    /// The tick period the plugin asked for, `None` when it asked for none (or for 0).
    pub fn tick_period(&self) -> Option<Duration> {
        match self.store.data().tick_period_ms {
            0 => None,
            ms => Some(Duration::from_millis(u64::from(ms))),
        }
    }

    /// `proxy_on_tick` on the root context. The embedder calls it every [`Self::tick_period`],
    /// on the thread that owns the instance.
    pub fn on_tick(&mut self) -> Result<(), HostError> {
        if let Some(f) = self.callbacks.on_tick.clone() {
            self.root_call("proxy_on_tick", f, ROOT_CONTEXT as i32)?;
        }
        Ok(())
    }

    /// Installs what wakes the instance's owner when a queue this instance registered gets an
    /// item (called on the enqueuing thread; it should only signal, e.g. send on a channel).
    /// Pending notifications are then delivered with [`Self::deliver_queue_ready`].
    pub fn set_queue_waker(&self, waker: QueueWaker) {
        self.store.data().queue_signal.set_waker(waker);
    }

    /// Whether `proxy_on_queue_ready` notifications are waiting.
    pub fn has_queue_ready(&self) -> bool {
        self.store.data().queue_signal.has_pending()
    }

    /// Calls `proxy_on_queue_ready(root, queue_id)` once per item enqueued since the last call
    /// (Envoy posts one notification per enqueue). Returns how many were delivered.
    pub fn deliver_queue_ready(&mut self) -> Result<usize, HostError> {
        let mut delivered = 0;
        while let Some(id) = self.store.data().queue_signal.pop() {
            if let Some(f) = self.callbacks.on_queue_ready.clone() {
                self.root_call("proxy_on_queue_ready", f, (ROOT_CONTEXT as i32, id as i32))?;
            }
            delivered += 1;
        }
        Ok(delivered)
    }

    /// Lets `proxy_http_call` / `proxy_grpc_*` refuse unknown upstreams with BadArgument at call
    /// time, as Envoy does for an unknown cluster. Without it every name is accepted.
    pub fn set_upstream_check(&mut self, check: UpstreamCheck) {
        self.store.data_mut().upstream_check = Some(check);
    }

    /// HTTP calls the plugin started since the last call, in order.
    pub fn take_callouts(&mut self) -> Vec<PendingCallout> {
        std::mem::take(&mut self.store.data_mut().callouts.queued_http)
    }

    /// gRPC operations the plugin asked for since the last call, in order.
    pub fn take_grpc_commands(&mut self) -> Vec<GrpcCommand> {
        std::mem::take(&mut self.store.data_mut().callouts.queued_grpc)
    }

    /// The context an unanswered HTTP call belongs to; `None` once answered or cancelled
    /// (its context finished).
    pub fn callout_context(&self, token: u32) -> Option<u32> {
        self.store.data().callouts.http_owner.get(&token).copied()
    }

    /// The context a live gRPC call or stream belongs to.
    pub fn grpc_context(&self, token: u32) -> Option<u32> {
        self.store.data().callouts.grpc_owner.get(&token).copied()
    }

    /// Stream actions the plugin aimed at other contexts (after `proxy_set_effective_context`).
    pub fn take_context_actions(&mut self) -> Vec<ContextAction> {
        std::mem::take(&mut self.store.data_mut().context_actions)
    }

    /// Delivers the answer of an HTTP call: `proxy_on_http_call_response(ctx, token, headers,
    /// body_size, trailers)` with the response readable through map types 6/7 and buffer 4.
    /// `None` is a failure (reset, refused connection): no headers, and `proxy_get_status` says
    /// BrokenConnection. Pass the stream of the calling context when it is an HTTP context.
    /// Returns false (and calls nothing) when the token is unknown or its context is gone.
    pub fn on_http_call_response(
        &mut self,
        token: u32,
        response: Option<HttpCallResponse>,
        stream: Option<&mut HttpStream>,
    ) -> Result<bool, HostError> {
        let Some(ctx) = self.store.data_mut().callouts.http_owner.remove(&token) else {
            return Ok(false);
        };
        let (n_headers, body_size, n_trailers) = match &response {
            Some(r) => (r.headers.len(), r.body.len(), r.trailers.len()),
            None => (0, 0, 0),
        };
        let Some(f) = self.callbacks.on_http_call_response.clone() else {
            return self
                .refuse_if_poisoned("proxy_on_http_call_response")
                .map(|()| true);
        };
        let status = match response {
            Some(_) => None,
            None => Some((Status::BrokenConnection.code() as u32, b"reset".to_vec())),
        };
        self.store.data_mut().delivery = Delivery {
            http_response: Some(response.unwrap_or_default()),
            status,
            ..Delivery::default()
        };
        // Envoy makes every callout the root context's (proxy-wasm-cpp-host retargets
        // `proxy_http_call` to the root), so the answer names the root; SDKs route it to the
        // caller themselves (AssemblyScript's runtime looks the token up on the root context it
        // is given, and reads out of bounds when given another). Host calls still act on the
        // caller's stream until the plugin switches with `proxy_set_effective_context`.
        let args = (
            ROOT_CONTEXT as i32,
            token as i32,
            n_headers as i32,
            body_size as i32,
            n_trailers as i32,
        );
        let r = self.call("proxy_on_http_call_response", f, args, ctx, stream.into());
        self.store.data_mut().delivery = Delivery::default();
        r?;
        self.after_root_callback()?;
        Ok(true)
    }

    /// `proxy_on_grpc_receive_initial_metadata`, metadata readable as map type 4.
    pub fn on_grpc_receive_initial_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
        stream: Option<&mut HttpStream>,
    ) -> Result<bool, HostError> {
        let n = metadata.len() as i32;
        let f = self.callbacks.on_grpc_initial_metadata.clone();
        let delivery = Delivery {
            grpc_initial: Some(metadata),
            ..Delivery::default()
        };
        self.grpc_deliver(
            "proxy_on_grpc_receive_initial_metadata",
            f,
            token,
            n,
            delivery,
            stream,
            false,
        )
    }

    /// `proxy_on_grpc_receive`, the message readable as buffer type 5.
    pub fn on_grpc_receive(
        &mut self,
        token: u32,
        message: Vec<u8>,
        stream: Option<&mut HttpStream>,
    ) -> Result<bool, HostError> {
        let n = message.len() as i32;
        let f = self.callbacks.on_grpc_receive.clone();
        let delivery = Delivery {
            grpc_message: Some(message),
            ..Delivery::default()
        };
        self.grpc_deliver(
            "proxy_on_grpc_receive",
            f,
            token,
            n,
            delivery,
            stream,
            false,
        )
    }

    /// `proxy_on_grpc_receive_trailing_metadata`, metadata readable as map type 5.
    pub fn on_grpc_receive_trailing_metadata(
        &mut self,
        token: u32,
        metadata: HeaderMap,
        stream: Option<&mut HttpStream>,
    ) -> Result<bool, HostError> {
        let n = metadata.len() as i32;
        let f = self.callbacks.on_grpc_trailing_metadata.clone();
        let delivery = Delivery {
            grpc_trailing: Some(metadata),
            ..Delivery::default()
        };
        self.grpc_deliver(
            "proxy_on_grpc_receive_trailing_metadata",
            f,
            token,
            n,
            delivery,
            stream,
            false,
        )
    }

    /// `proxy_on_grpc_close(ctx, token, status)`; `proxy_get_status` answers the status and
    /// message during the call. The token is forgotten afterwards.
    pub fn on_grpc_close(
        &mut self,
        token: u32,
        status: u32,
        message: &str,
        stream: Option<&mut HttpStream>,
    ) -> Result<bool, HostError> {
        let f = self.callbacks.on_grpc_close.clone();
        let delivery = Delivery {
            status: Some((status, message.as_bytes().to_vec())),
            ..Delivery::default()
        };
        self.grpc_deliver(
            "proxy_on_grpc_close",
            f,
            token,
            status as i32,
            delivery,
            stream,
            true,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn grpc_deliver(
        &mut self,
        callback: &'static str,
        f: Cb3Void,
        token: u32,
        arg: i32,
        delivery: Delivery,
        stream: Option<&mut HttpStream>,
        last: bool,
    ) -> Result<bool, HostError> {
        let owners = &mut self.store.data_mut().callouts.grpc_owner;
        let ctx = if last {
            owners.remove(&token)
        } else {
            owners.get(&token).copied()
        };
        let Some(ctx) = ctx else {
            return Ok(false);
        };
        let Some(f) = f else {
            return self.refuse_if_poisoned(callback).map(|()| true);
        };
        self.store.data_mut().delivery = delivery;
        let r = self.call(
            callback,
            f,
            // The root's, as for HTTP calls (see on_http_call_response).
            (ROOT_CONTEXT as i32, token as i32, arg),
            ctx,
            stream.into(),
        );
        self.store.data_mut().delivery = Delivery::default();
        r?;
        self.after_root_callback()?;
        Ok(true)
    }

    /// Creates an L4 (network) context under the root context.
    pub fn create_network_context(&mut self) -> Result<u32, HostError> {
        self.create_http_context()
    }

    /// `proxy_on_new_connection(ctx)`.
    pub fn on_new_connection(
        &mut self,
        ctx: u32,
        conn: &mut NetworkStream,
    ) -> Result<Action, HostError> {
        self.check_context("proxy_on_new_connection", ctx)?;
        let Some(f) = self.callbacks.on_new_connection.clone() else {
            return self
                .refuse_if_poisoned("proxy_on_new_connection")
                .map(|()| Action::Continue);
        };
        self.call(
            "proxy_on_new_connection",
            f,
            ctx as i32,
            ctx,
            Attach::Network(conn),
        )
        .map(action)
    }

    /// `proxy_on_downstream_data(ctx, size, eos)` over `conn.downstream_data` (buffer type 2):
    /// like HTTP bodies, the embedder appends each read and passes the buffer on after
    /// `Continue`.
    pub fn on_downstream_data(
        &mut self,
        ctx: u32,
        conn: &mut NetworkStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = conn.downstream_data.len() as i32;
        let f = self.callbacks.on_downstream_data.clone();
        self.network_data("proxy_on_downstream_data", f, ctx, n, end_of_stream, conn)
    }

    /// `proxy_on_upstream_data(ctx, size, eos)` over `conn.upstream_data` (buffer type 3).
    pub fn on_upstream_data(
        &mut self,
        ctx: u32,
        conn: &mut NetworkStream,
        end_of_stream: bool,
    ) -> Result<Action, HostError> {
        let n = conn.upstream_data.len() as i32;
        let f = self.callbacks.on_upstream_data.clone();
        self.network_data("proxy_on_upstream_data", f, ctx, n, end_of_stream, conn)
    }

    fn network_data(
        &mut self,
        callback: &'static str,
        f: Cb3,
        ctx: u32,
        n: i32,
        eos: bool,
        conn: &mut NetworkStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let Some(f) = f else {
            return self.refuse_if_poisoned(callback).map(|()| Action::Continue);
        };
        self.call(
            callback,
            f,
            (ctx as i32, n, i32::from(eos)),
            ctx,
            Attach::Network(conn),
        )
        .map(action)
    }

    /// `proxy_on_downstream_connection_close(ctx, peer)`.
    pub fn on_downstream_connection_close(
        &mut self,
        ctx: u32,
        peer: PeerType,
        conn: &mut NetworkStream,
    ) -> Result<(), HostError> {
        let f = self.callbacks.on_downstream_close.clone();
        self.network_close("proxy_on_downstream_connection_close", f, ctx, peer, conn)
    }

    /// `proxy_on_upstream_connection_close(ctx, peer)`.
    pub fn on_upstream_connection_close(
        &mut self,
        ctx: u32,
        peer: PeerType,
        conn: &mut NetworkStream,
    ) -> Result<(), HostError> {
        let f = self.callbacks.on_upstream_close.clone();
        self.network_close("proxy_on_upstream_connection_close", f, ctx, peer, conn)
    }

    fn network_close(
        &mut self,
        callback: &'static str,
        f: Cb2Void,
        ctx: u32,
        peer: PeerType,
        conn: &mut NetworkStream,
    ) -> Result<(), HostError> {
        self.check_context(callback, ctx)?;
        match f {
            Some(f) => self.call(
                callback,
                f,
                (ctx as i32, peer as i32),
                ctx,
                Attach::Network(conn),
            ),
            None => self.refuse_if_poisoned(callback),
        }
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` for an L4 context.
    pub fn finish_network_context(
        &mut self,
        ctx: u32,
        conn: &mut NetworkStream,
    ) -> Result<(), HostError> {
        self.check_context("proxy_on_done", ctx)?;
        let result = self.finish_inner(ctx, Attach::Network(conn));
        self.forget_context(ctx);
        result
    }

    /// Starts shutting the plugin down (config removed it): `proxy_on_done` on the root
    /// context. When it answers true the root context is deleted at once (`proxy_on_delete`) and
    /// this returns true; when false the plugin still has work in flight and finishes by calling
    /// `proxy_done` from a later callback (tick, queue, callout answer), as in Envoy. Until then
    /// the embedder keeps delivering those callbacks; [`Self::is_finished`] tells when it is over.
    pub fn shutdown(&mut self) -> Result<bool, HostError> {
        if self.finished || self.store.data().root_closing {
            return Ok(self.finished);
        }
        let done = match self.callbacks.on_done.clone() {
            Some(f) => {
                let c = ROOT_CONTEXT as i32;
                self.call("proxy_on_done", f, c, ROOT_CONTEXT, Attach::Nothing)? != 0
            }
            None => true,
        };
        if done {
            self.delete_root()?;
        } else {
            self.store.data_mut().root_closing = true;
            // proxy_done may already have been called during proxy_on_done itself.
            self.after_root_callback()?;
        }
        Ok(self.finished)
    }

    /// The root context was deleted: nothing more will be called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn delete_root(&mut self) -> Result<(), HostError> {
        self.finished = true;
        self.store.data_mut().contexts.remove(&ROOT_CONTEXT);
        if let Some(f) = self.callbacks.on_delete.clone() {
            let c = ROOT_CONTEXT as i32;
            self.call("proxy_on_delete", f, c, ROOT_CONTEXT, Attach::Nothing)?;
        }
        Ok(())
    }

    /// After a callback that may have called `proxy_done`: a closing root context that did so
    /// is deleted now.
    fn after_root_callback(&mut self) -> Result<(), HostError> {
        let state = self.store.data();
        if state.root_closing && state.done_requested && !self.finished {
            self.delete_root()?;
        }
        Ok(())
    }

    fn root_call<P: WasmParams>(
        &mut self,
        callback: &'static str,
        f: Cb<P, ()>,
        params: P,
    ) -> Result<(), HostError> {
        if self.finished {
            return Ok(());
        }
        self.call(callback, f, params, ROOT_CONTEXT, Attach::Nothing)?;
        self.after_root_callback()
    }

    /// Current size of the instance's linear memory, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.store
            .data()
            .memory
            .map_or(0, |m| m.data_size(&self.store))
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

    /// `which` picks the callback out of the instance's [`Callbacks`].
    fn http_callback(
        &mut self,
        callback: &'static str,
        which: fn(&Callbacks) -> &Cb3,
        ctx: u32,
        n: i32,
        eos: Option<bool>,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let (mut site, cbs) = self.parts();
        let Some(f) = which(cbs) else {
            return self.refuse_if_poisoned(callback).map(|()| Action::Continue);
        };
        let eos = i32::from(eos.unwrap_or(false));
        site.call(callback, f, (ctx as i32, n, eos), ctx, Attach::Http(stream))
            .map(action)
    }

    fn headers_callback(
        &mut self,
        callback: &'static str,
        which: fn(&Callbacks) -> &Option<HeadersCb>,
        ctx: u32,
        n: i32,
        eos: bool,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let attach = Attach::Http(stream);
        let (mut site, cbs) = self.parts();
        match which(cbs) {
            None => self.refuse_if_poisoned(callback).map(|()| Action::Continue),
            Some(HeadersCb::V01(f)) => site
                .call(callback, f, (ctx as i32, n), ctx, attach)
                .map(action),
            Some(HeadersCb::V02(f)) => site
                .call(callback, f, (ctx as i32, n, i32::from(eos)), ctx, attach)
                .map(action),
        }
    }

    fn http_callback2(
        &mut self,
        callback: &'static str,
        which: fn(&Callbacks) -> &Cb2,
        ctx: u32,
        n: i32,
        stream: &mut HttpStream,
    ) -> Result<Action, HostError> {
        self.check_context(callback, ctx)?;
        let (mut site, cbs) = self.parts();
        let Some(f) = which(cbs) else {
            return self.refuse_if_poisoned(callback).map(|()| Action::Continue);
        };
        site.call(callback, f, (ctx as i32, n), ctx, Attach::Http(stream))
            .map(action)
    }

    fn refuse_if_poisoned(&self, callback: &'static str) -> Result<(), HostError> {
        refuse_if_poisoned(self.poisoned, &self.spec, callback)
    }

    /// The instance split for a guest call: what the call uses, and the callbacks, so that a
    /// callback is called through a reference into [`Callbacks`] instead of a clone of its
    /// `Arc` (an atomic increment and decrement for each of a request's seven callbacks).
    fn parts(&mut self) -> (CallSite<'_>, &Callbacks) {
        let site = CallSite {
            store: &mut self.store,
            poisoned: &mut self.poisoned,
            spec: &self.spec,
            deadline_ticks: self.deadline_ticks,
            module: &self._module,
        };
        (site, &self.callbacks)
    }

    /// [`CallSite::call`] for a callback the caller holds (the rarer ones, cloned).
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        f: Cb<P, R>,
        params: P,
        ctx: u32,
        attach: Attach<'_>,
    ) -> Result<R, HostError> {
        self.parts().0.call(callback, &f, params, ctx, attach)
    }
}

fn refuse_if_poisoned(
    poisoned: bool,
    spec: &PluginSpec,
    callback: &'static str,
) -> Result<(), HostError> {
    if poisoned {
        return Err(HostError::Poisoned {
            plugin: spec.name.clone(),
            callback,
        });
    }
    Ok(())
}

/// What a guest call uses of its instance ([`PluginInstance::parts`]).
struct CallSite<'a> {
    store: &'a mut Store<HostState>,
    poisoned: &'a mut bool,
    spec: &'a PluginSpec,
    deadline_ticks: u64,
    /// Read only to name a fault (the deadline it may have passed).
    module: &'a CompiledModule,
}

impl CallSite<'_> {
    /// Runs one guest callback under the deadline, with `stream` reachable from host functions
    /// for its duration (moved into the store and back, also on error).
    fn call<P: WasmParams, R: WasmResults>(
        &mut self,
        callback: &'static str,
        f: &TypedFunc<P, R>,
        params: P,
        ctx: u32,
        attach: Attach<'_>,
    ) -> Result<R, HostError> {
        refuse_if_poisoned(*self.poisoned, self.spec, callback)?;
        self.call_raw(f, params, ctx, attach)
            .map_err(|e| self.fault(callback, e))
    }

    /// `ctx` is the context the callback runs for: host calls act on it until the guest
    /// switches with `proxy_set_effective_context`.
    fn call_raw<P: WasmParams, R: WasmResults>(
        &mut self,
        f: &TypedFunc<P, R>,
        params: P,
        ctx: u32,
        attach: Attach<'_>,
    ) -> wasmtime::Result<R> {
        self.store.set_epoch_deadline(self.deadline_ticks);
        let state = self.store.data_mut();
        state.current_context = ctx;
        state.effective_context = ctx;
        match attach {
            Attach::Http(s) => {
                self.attach_stream(s);
                let r = f.call(&mut *self.store, params);
                self.detach_stream(s);
                r
            }
            Attach::Network(s) => {
                self.store.data_mut().network = Some(std::mem::take(s));
                let r = f.call(&mut *self.store, params);
                *s = self.store.data_mut().network.take().unwrap_or_default();
                r
            }
            Attach::Nothing => f.call(&mut *self.store, params),
        }
    }

    /// Moves the caller's stream into the store for a callback, leaving the spare in its place.
    fn attach_stream(&mut self, s: &mut HttpStream) {
        let state = self.store.data_mut();
        let spare = state.spare_stream.take().unwrap_or_default();
        state.stream = Some(std::mem::replace(s, spare));
    }

    /// Gives the caller its stream back after a callback (also after a fault).
    fn detach_stream(&mut self, s: &mut HttpStream) {
        let state = self.store.data_mut();
        let stream = state.stream.take().unwrap_or_default();
        state.spare_stream = Some(std::mem::replace(s, stream));
    }

    /// Poisons the instance and names the fault.
    fn fault(&mut self, callback: &'static str, e: wasmtime::Error) -> HostError {
        *self.poisoned = true;
        let deadline = self.module.inner.engine.inner.config.call_deadline;
        classify(self.spec, self.store, callback, deadline, e).unwrap_or_else(|reason| {
            HostError::Trap {
                plugin: self.spec.name.clone(),
                callback,
                reason,
            }
        })
    }
}

/// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` with the context's stream already in the
/// store.
fn finish_calls(site: &mut CallSite<'_>, cbs: &Callbacks, ctx: u32) -> Result<(), HostError> {
    let c = ctx as i32;
    // For stream contexts the answer of on_done (whether the context may be deleted now) is not
    // waited for: the stream is over.
    if let Some(f) = &cbs.on_done {
        site.call("proxy_on_done", f, c, ctx, Attach::Nothing)?;
    }
    if let Some(f) = &cbs.on_log {
        site.call("proxy_on_log", f, c, ctx, Attach::Nothing)?;
    }
    if let Some(f) = &cbs.on_delete {
        site.call("proxy_on_delete", f, c, ctx, Attach::Nothing)?;
    }
    Ok(())
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
