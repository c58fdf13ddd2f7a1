//! Runs one request through a Proxy-Wasm plugin chain, phase by phase.
//!
//! Request callbacks run in chain order, response callbacks in reverse order
//! (Envoy's decoder/encoder order). A plugin that fails at run time is handled
//! by its fail strategy; a plugin that could not be loaded denies the chain
//! unless it is FAIL_OPEN.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

// Callbacks are timed with the TSC, scaled to nanoseconds (`quanta`; the OS clock where the TSC
// is not invariant): two reads and the duration between them take about 32 ns here against
// 47 with `std::time::Instant` (`clock_gettime`), and a request with one plugin makes eight
// reads. A callback's start and end are read on the same worker thread.
use quanta::Instant;
use smallvec::SmallVec;

use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use waystone_model::snapshot::{FailStrategy, PluginId};
use waystone_wasm::{
    Action, ContextAction, GrpcCommand, HeaderMap as WasmHeaders, HostError, HttpCallResponse,
    HttpStream, LocalResponse, StreamType,
};

use crate::callout::{self, GrpcOutcome, GrpcStreamEvent, GrpcStreamInput, Resolver};
use crate::local_channel;
use crate::metrics::{CallOutcome, Callback, PluginCalls};
use crate::trace::PluginSpan;

use crate::runtime::{LoadedPlugin, PluginSlot, RuntimeConfig};
use crate::worker::{self, WorkerPlugin};

/// A reply the proxy sends instead of (or in place of) the upstream's.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Why, in Envoy's `response_code_details` spirit (`wasm:<plugin>:<status>`).
    pub details: String,
}

impl LocalReply {
    pub fn text(status: u16, details: impl Into<String>, body: impl Into<String>) -> Self {
        let body = body.into().into_bytes();
        Self {
            status,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body,
            details: details.into(),
        }
    }
}

pub enum Outcome {
    Continue,
    Respond(LocalReply),
    /// A plugin closed the stream (`proxy_close_stream`): reset it without a response.
    Reset(StreamReset),
}

/// A stream a plugin reset, as Envoy's `resetStream()`: HTTP/1.1 closes the connection without a
/// response, h2 sends RST_STREAM. Also the error a listener's service returns for it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {plugin} closed the stream (proxy_close_stream)")]
pub struct StreamReset {
    pub plugin: String,
}

impl StreamReset {
    /// Envoy's `response_code_details` for a stream a Proxy-Wasm plugin closed.
    pub const DETAILS: &'static str = "wasm_close_stream";
}

/// How the chain ended a body or trailers phase early.
pub enum Halt {
    Reply(LocalReply),
    Reset(StreamReset),
}

impl From<LocalReply> for Halt {
    fn from(r: LocalReply) -> Self {
        Halt::Reply(r)
    }
}

/// What one event of the run's contexts (a callout's answer, a gRPC stream's report, an action
/// another context aimed at one of them) did to the stream.
enum Effect {
    Nothing,
    /// Filter `.0` asked to continue the `.1` side.
    Continued(usize, StreamType),
    /// Filter `.0` faulted and is bypassed (fail open): what it held flows on.
    Bypassed(usize),
    Halt(Halt),
}

/// An event of the run's contexts, as it arrived.
enum Event {
    Stream(usize, u32, GrpcStreamEvent),
    Answer(usize, Answer),
    Action(usize, ContextAction),
    /// A call the plugin cancelled was joined.
    Cancelled,
}

struct ActiveFilter {
    /// The plugin, this worker's instance of it and its call series (`plugin`, `instance`,
    /// `calls` through `Deref`).
    worker: Rc<WorkerPlugin>,
    ctx: u32,
    /// Set after a fail-open fault: the plugin sees nothing more of this stream.
    bypassed: bool,
}

impl std::ops::Deref for ActiveFilter {
    type Target = WorkerPlugin;
    fn deref(&self) -> &WorkerPlugin {
        &self.worker
    }
}

type GrpcEventChannel = (
    callout::GrpcEvents,
    local_channel::Receiver<(usize, u32, GrpcStreamEvent)>,
);

/// An answered callout of one filter's context, waiting to be delivered.
enum Answer {
    Http(u32, Option<HttpCallResponse>),
    Grpc(u32, GrpcOutcome),
}

/// The chain state of one request.
pub struct ChainRun {
    /// Inline up to two: the vector's allocation was one of the few a request with one plugin
    /// makes that a request without plugins does not.
    filters: SmallVec<[ActiveFilter; 2]>,
    pub stream: HttpStream,
    resolver: Option<Rc<Resolver>>,
    /// Callouts of this request's contexts in flight on the worker, with the filter index.
    /// Dropped (aborted) with the run: Envoy cancels a context's callouts when it ends.
    /// Created with the first callout (most requests make none, and a set allocates).
    callouts: Option<JoinSet<(usize, Answer)>>,
    grpc_calls: HashMap<u32, AbortHandle>,
    /// Set when the request is traced: every plugin callback becomes a child span.
    pub spans: Option<Rc<RefCell<Vec<PluginSpan>>>>,
    /// Body bytes each filter holds back after pausing (Envoy's StopIterationAndBuffer), by
    /// filter index: what it is shown again, with what arrives next, at its next callback.
    held: [Vec<Vec<u8>>; 2],
    /// Actions other contexts (a root context, after `proxy_set_effective_context`) aimed at
    /// this request's contexts, with the filter index (`worker::route_context_actions`).
    actions_tx: worker::ActionSender,
    actions: local_channel::Receiver<(usize, ContextAction)>,
    /// The sending side of each open gRPC stream of this request's contexts, by token.
    grpc_inputs: HashMap<u32, mpsc::UnboundedSender<GrpcStreamInput>>,
    /// Initial metadata and messages of those streams as they arrive (their end comes through
    /// `callouts`); created when the first stream opens.
    grpc_events: Option<GrpcEventChannel>,
    /// When the last body callback ended, if it continued quietly and nothing but this run's
    /// bookkeeping ran since: [`ChainRun::finish_after_body`] times the first Done from there
    /// instead of reading the clock again.
    body_end: Option<Instant>,
}

/// The direction of a body or trailers phase: request filters run in chain order, response
/// filters last plugin first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Request = 0,
    Response = 1,
}

impl Dir {
    fn stream_type(self) -> StreamType {
        match self {
            Dir::Request => StreamType::Request,
            Dir::Response => StreamType::Response,
        }
    }
}

/// Whether a filter passes the data it was shown on, or holds it back.
enum Flow {
    Pass,
    Hold,
}

/// When a callback started: the monotonic clock for metrics, wall time for spans.
struct CallStart(Instant, Option<SystemTime>);

impl ChainRun {
    pub fn new(stream: HttpStream) -> Self {
        let (actions_tx, actions) = local_channel::channel();
        Self {
            filters: SmallVec::new(),
            stream,
            resolver: None,
            callouts: None,
            grpc_calls: HashMap::new(),
            spans: None,
            held: [Vec::new(), Vec::new()],
            actions_tx,
            actions,
            grpc_inputs: HashMap::new(),
            grpc_events: None,
            body_end: None,
        }
    }

    fn call_start(&self) -> CallStart {
        CallStart(
            Instant::now(),
            self.spans.as_ref().map(|_| SystemTime::now()),
        )
    }

    /// When a callback that follows another one directly starts: when that one ended.
    fn call_start_at(&self, at: Instant) -> CallStart {
        CallStart(at, self.spans.as_ref().map(|_| SystemTime::now()))
    }

    /// Records one callback of `plugin`: its outcome, latency and (when traced) its span.
    /// Returns when it ended.
    fn observe(
        &self,
        plugin: &LoadedPlugin,
        calls: &PluginCalls,
        callback: Callback,
        start: CallStart,
        result: Result<bool, &HostError>,
    ) -> Instant {
        let local = self.stream.local_response.as_ref().map(|l| l.status);
        let paused = matches!(result, Ok(true));
        let outcome = CallOutcome::of(&result.map(|_| ()), paused, local);
        let end = Instant::now();
        calls.record(callback, outcome, end.saturating_duration_since(start.0));
        if let (Some(spans), Some(wall)) = (&self.spans, start.1) {
            spans.borrow_mut().push(PluginSpan {
                plugin: Arc::from(plugin.spec.name.as_str()),
                callback: callback.as_str(),
                outcome: outcome.as_str(),
                start_unix_nanos: crate::observe::unix_nanos(wall),
                end_unix_nanos: crate::observe::unix_nanos(SystemTime::now()),
            });
        }
        end
    }

    fn observe_action(
        &self,
        idx: usize,
        callback: Callback,
        start: CallStart,
        result: &Result<Action, HostError>,
    ) -> Instant {
        let r = match result {
            Ok(a) => Ok(*a == Action::Pause),
            Err(e) => Err(e),
        };
        let f = &self.filters[idx];
        self.observe(&f.plugin, &f.calls, callback, start, r)
    }

    /// True when some plugin of the chain has a body or trailers callback for `dir`: only then
    /// does the proxy look at the body's frames (otherwise they pass untouched).
    pub fn wants_stream(&self, dir: Dir) -> bool {
        self.filters
            .iter()
            .any(|f| !f.bypassed && f.plugin.module.handles_body(dir.stream_type()))
    }

    /// Indices of the active filters in the order `dir` runs them.
    fn order(&self, dir: Dir) -> impl Iterator<Item = usize> + use<> {
        let n = self.filters.len();
        let reverse = dir == Dir::Response;
        (0..n).map(move |i| if reverse { n - 1 - i } else { i })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Creates a context in each plugin of `chain` and runs its request-headers callback. A
    /// plugin that pauses while it has callouts in flight holds the request until it resumes
    /// it (`proxy_continue_stream`) or answers it (`proxy_send_local_response`).
    pub async fn request_headers(
        &mut self,
        chain: &[PluginId],
        rt: &RuntimeConfig,
        end_of_stream: bool,
    ) -> Outcome {
        self.resolver = Some(worker::set_resolver(&rt.snapshot, &rt.default_namespace));
        for id in chain {
            let plugin = match rt.plugins.get(id) {
                Some(PluginSlot::Ready(p)) => p,
                Some(PluginSlot::Failed {
                    fail_strategy: FailStrategy::FailOpen,
                    ..
                }) => continue,
                Some(PluginSlot::Failed { reason, .. }) => {
                    tracing::warn!(plugin = %id, %reason, "denying request: plugin is not loaded (fail closed)");
                    return Outcome::Respond(unavailable_reply(id));
                }
                None => {
                    tracing::error!(plugin = %id, "denying request: plugin missing from the runtime config");
                    return Outcome::Respond(unavailable_reply(id));
                }
            };
            let w = match worker::instance_for(plugin) {
                Ok(w) => w,
                Err(err) => match fault(plugin, &err) {
                    Some(reply) => return Outcome::Respond(reply),
                    None => continue,
                },
            };
            let start = self.call_start();
            let created = w.instance.borrow_mut().create_http_context();
            let created_at = self.observe(
                &w.plugin,
                &w.calls,
                Callback::ContextCreate,
                start,
                created.as_ref().map(|_| false),
            );
            let ctx = match created {
                Ok(ctx) => ctx,
                Err(err) => match fault(plugin, &err) {
                    Some(reply) => return Outcome::Respond(reply),
                    None => continue,
                },
            };
            let idx = self.filters.len();
            worker::register_context(&w.instance, ctx, idx, self.actions_tx.clone());
            self.filters.push(ActiveFilter {
                worker: w,
                ctx,
                bypassed: false,
            });
            // The headers callback follows the context's creation directly: one clock read.
            let start = self.call_start_at(created_at);
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_request_headers(f.ctx, &mut self.stream, end_of_stream)
            };
            self.observe_action(idx, Callback::RequestHeaders, start, &result);
            if self.continued_quietly(idx, &result) {
                continue;
            }
            if let Some(out) = self.settle(idx, result, end_of_stream).await {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Runs one chunk of body (`eos`: the last one; false when trailers follow) through the
    /// filters of `dir` and returns what leaves the chain. Each filter with a body callback is
    /// shown what it held back plus what the filters before it let through; `Continue` passes
    /// that on, `Pause` keeps it (more than `limit` bytes held: `Err` with Envoy's 413 for a
    /// request, 500 for a response). A pause on the last chunk waits for the plugin to resume
    /// (its callouts' answers) or answer the stream; a pause before it holds the data while
    /// the pump goes on reading, and [`ChainRun::on_event`] releases it when the plugin resumes.
    pub async fn body_chunk(
        &mut self,
        dir: Dir,
        chunk: Vec<u8>,
        eos: bool,
        limit: usize,
    ) -> Result<Vec<u8>, Halt> {
        match dir {
            Dir::Request => self.stream.request_body_bytes += chunk.len() as u64,
            Dir::Response => self.stream.response_body_bytes += chunk.len() as u64,
        }
        self.run_body(dir, None, chunk, eos, limit).await
    }

    /// Runs body data through the filters of `dir` that come after filter `after` (all of them
    /// when `None`).
    async fn run_body(
        &mut self,
        dir: Dir,
        after: Option<usize>,
        chunk: Vec<u8>,
        eos: bool,
        limit: usize,
    ) -> Result<Vec<u8>, Halt> {
        let mut carry = chunk;
        let mut skipping = after.is_some();
        self.body_end = None;
        for idx in self.order(dir) {
            if skipping {
                skipping = Some(idx) != after;
                continue;
            }
            let f = &self.filters[idx];
            if f.bypassed || !f.plugin.module.has_body_callback(dir.stream_type()) {
                continue;
            }
            let mut shown = self.take_held(dir, idx);
            if shown.is_empty() {
                shown = carry;
            } else {
                shown.extend_from_slice(&carry);
            }
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                let mut inst = f.instance.borrow_mut();
                match dir {
                    Dir::Request => {
                        self.stream.request_body = shown;
                        self.stream.request_complete = eos;
                        inst.on_request_body(f.ctx, &mut self.stream, eos)
                    }
                    Dir::Response => {
                        self.stream.response_body = shown;
                        self.stream.response_complete = eos;
                        inst.on_response_body(f.ctx, &mut self.stream, eos)
                    }
                }
            };
            let callback = match dir {
                Dir::Request => Callback::RequestBody,
                Dir::Response => Callback::ResponseBody,
            };
            let end = self.observe_action(idx, callback, start, &result);
            let flow = if self.continued_quietly(idx, &result) {
                self.body_end = Some(end);
                Flow::Pass
            } else {
                self.body_end = None;
                self.settle_stream(idx, dir, result, eos).await?
            };
            let body = match dir {
                Dir::Request => std::mem::take(&mut self.stream.request_body),
                Dir::Response => std::mem::take(&mut self.stream.response_body),
            };
            match flow {
                Flow::Pass => carry = body,
                Flow::Hold => {
                    // Only what a plugin holds counts against the limit; passing data never does.
                    if body.len() > limit {
                        return Err(Halt::Reply(too_large(dir)));
                    }
                    *self.held_mut(dir, idx) = body;
                    return Ok(Vec::new());
                }
            }
        }
        Ok(carry)
    }

    /// Runs the trailers of `dir` through the chain: each filter gets its trailers callback, and
    /// once it continues, the body it still held flows on ahead of the trailers (as in Envoy).
    /// Returns the body bytes released and the trailers as the plugins left them.
    pub async fn trailers(
        &mut self,
        dir: Dir,
        trailers: WasmHeaders,
    ) -> Result<(Vec<u8>, WasmHeaders), Halt> {
        match dir {
            Dir::Request => self.stream.request_trailers = trailers,
            Dir::Response => self.stream.response_trailers = trailers,
        }
        let mut carry = Vec::new();
        for idx in self.order(dir) {
            if self.filters[idx].bypassed {
                continue;
            }
            let mut held = self.take_held(dir, idx);
            held.extend_from_slice(&carry);
            carry = held;
            if !self.filters[idx]
                .plugin
                .module
                .has_trailers_callback(dir.stream_type())
            {
                continue;
            }
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                let mut inst = f.instance.borrow_mut();
                match dir {
                    Dir::Request => inst.on_request_trailers(f.ctx, &mut self.stream),
                    Dir::Response => inst.on_response_trailers(f.ctx, &mut self.stream),
                }
            };
            let callback = match dir {
                Dir::Request => Callback::RequestTrailers,
                Dir::Response => Callback::ResponseTrailers,
            };
            self.observe_action(idx, callback, start, &result);
            // Trailers end the stream: a pause here waits like one on the last body chunk.
            self.settle_stream(idx, dir, result, true).await?;
        }
        let trailers = match dir {
            Dir::Request => std::mem::take(&mut self.stream.request_trailers),
            Dir::Response => std::mem::take(&mut self.stream.response_trailers),
        };
        Ok((carry, trailers))
    }

    /// Takes what filter `idx` holds back of `dir`: empty, and nothing allocated, when the
    /// filter holds nothing.
    fn take_held(&mut self, dir: Dir, idx: usize) -> Vec<u8> {
        self.held[dir as usize]
            .get_mut(idx)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn held_mut(&mut self, dir: Dir, idx: usize) -> &mut Vec<u8> {
        let held = &mut self.held[dir as usize];
        if held.len() < self.filters.len() {
            held.resize_with(self.filters.len(), Vec::new);
        }
        &mut held[idx]
    }

    /// Interprets a body or trailers callback result: pass the data on, hold it (a pause before
    /// the end of the stream), or end the stream with a reply.
    async fn settle_stream(
        &mut self,
        idx: usize,
        dir: Dir,
        result: Result<Action, HostError>,
        end_of_stream: bool,
    ) -> Result<Flow, Halt> {
        let action = match result {
            Ok(action) => action,
            Err(err) => {
                return match self.runtime_fault(idx, &err) {
                    Some(Outcome::Respond(reply)) => Err(Halt::Reply(reply)),
                    // Bypassed (fail open): what it was shown flows on.
                    _ => Ok(Flow::Pass),
                };
            }
        };
        self.dispatch(idx);
        if let Some(local) = self.stream.local_response.take() {
            return Err(Halt::Reply(plugin_reply(&self.filters[idx].plugin, local)));
        }
        if let Some(reset) = self.take_close(idx) {
            return Err(Halt::Reset(reset));
        }
        let continued = self.stream.continue_requested.take().is_some();
        if action == Action::Continue || continued {
            return Ok(Flow::Pass);
        }
        if !end_of_stream {
            return Ok(Flow::Hold);
        }
        match self.wait_for_resume(idx, dir).await {
            Resume::Continued => Ok(Flow::Pass),
            Resume::Respond(Outcome::Respond(reply)) => Err(Halt::Reply(reply)),
            Resume::Respond(Outcome::Reset(reset)) => Err(Halt::Reset(reset)),
            Resume::Respond(Outcome::Continue) => Ok(Flow::Pass),
            Resume::NothingToWaitFor => {
                let name = &self.filters[idx].plugin.spec.name;
                tracing::warn!(plugin = %name, "plugin paused the end of the stream with nothing left to resume it");
                Err(Halt::Reply(LocalReply::text(
                    500,
                    format!("wasm:{name}:paused"),
                    format!("plugin {name} paused the stream\n"),
                )))
            }
        }
    }

    /// A `proxy_close_stream` of filter `idx`'s own stream during its last callback.
    fn take_close(&self, idx: usize) -> Option<StreamReset> {
        let f = &self.filters[idx];
        let closed = f.instance.borrow_mut().take_close_request();
        matches!(closed, Some(StreamType::Request | StreamType::Response)).then(|| StreamReset {
            plugin: f.plugin.spec.name.clone(),
        })
    }

    /// Runs the response-headers callbacks, last plugin first. A plugin that pauses with
    /// callouts in flight holds the response until it resumes or answers it.
    pub async fn response_headers(&mut self, end_of_stream: bool) -> Outcome {
        for idx in (0..self.filters.len()).rev() {
            if self.filters[idx].bypassed {
                continue;
            }
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_response_headers(f.ctx, &mut self.stream, end_of_stream)
            };
            self.observe_action(idx, Callback::ResponseHeaders, start, &result);
            if self.continued_quietly(idx, &result) {
                continue;
            }
            if let Some(out) = self.settle_response(idx, result).await {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Ends every context: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish(&mut self) {
        self.finish_from(None);
    }

    /// [`ChainRun::finish`] right after [`ChainRun::body_chunk`] returned, with nothing
    /// awaited since: the first Done is timed from where the last body callback ended.
    pub fn finish_after_body(&mut self) {
        let at = self.body_end.take();
        self.finish_from(at);
    }

    /// `at`: when the callback this follows directly ended. Each Done after the first follows
    /// the one before it directly, so the chain reads the clock once per plugin.
    fn finish_from(&mut self, mut at: Option<Instant>) {
        for f in &self.filters {
            worker::unregister_context(&f.instance, f.ctx);
            if f.bypassed {
                continue;
            }
            let start = match at {
                Some(t) => self.call_start_at(t),
                None => self.call_start(),
            };
            let result = f
                .instance
                .borrow_mut()
                .finish_http_context(f.ctx, &mut self.stream);
            at = Some(self.observe(
                &f.plugin,
                &f.calls,
                Callback::Done,
                start,
                result.as_ref().map(|_| false),
            ));
            if let Err(err) = result {
                at = None;
                tracing::warn!(plugin = %f.plugin.id, error = %err, "plugin failed while closing its context");
                if f.instance.borrow().is_poisoned() {
                    worker::discard_instance(f.plugin.revision);
                }
            }
        }
        self.filters.clear();
    }

    /// The usual end of a callback, settled without the `settle*` futures (whose set-up costs
    /// more than the rest of a callback's bookkeeping): it returned Continue and left nothing
    /// to act on, so they would only pass the data on. No local reply, no callouts, gRPC
    /// operations or actions for other contexts, no close; a `proxy_continue_stream` it made
    /// is moot (it continued anyway) and cleared as they would.
    fn continued_quietly(&mut self, idx: usize, result: &Result<Action, HostError>) -> bool {
        if !matches!(result, Ok(Action::Continue)) || self.stream.local_response.is_some() {
            return false;
        }
        let queued = match self.filters[idx].instance.try_borrow() {
            Ok(inst) => inst.has_queued_work(),
            Err(_) => true,
        };
        if queued {
            return false;
        }
        self.stream.continue_requested = None;
        true
    }

    /// Interprets a request-path callback result.
    async fn settle(
        &mut self,
        idx: usize,
        result: Result<Action, HostError>,
        end_of_stream: bool,
    ) -> Option<Outcome> {
        match result {
            Ok(action) => {
                self.dispatch(idx);
                if let Some(local) = self.stream.local_response.take() {
                    return Some(Outcome::Respond(plugin_reply(
                        &self.filters[idx].plugin,
                        local,
                    )));
                }
                if let Some(reset) = self.take_close(idx) {
                    return Some(Outcome::Reset(reset));
                }
                let mut continued = self.stream.continue_requested.take().is_some();
                if action == Action::Pause && !continued {
                    match self.wait_for_resume(idx, Dir::Request).await {
                        Resume::Continued => continued = true,
                        Resume::Respond(out) => return Some(out),
                        Resume::NothingToWaitFor => {}
                    }
                }
                if action == Action::Pause && end_of_stream && !continued {
                    // Nothing in flight can resume this stream: answer rather than hang the
                    // client.
                    let name = &self.filters[idx].plugin.spec.name;
                    tracing::warn!(plugin = %name, "plugin paused the request with nothing left to resume it");
                    return Some(Outcome::Respond(LocalReply::text(
                        500,
                        format!("wasm:{name}:paused"),
                        format!("plugin {name} paused the request\n"),
                    )));
                }
                None
            }
            Err(err) => self.runtime_fault(idx, &err),
        }
    }

    /// Starts the callouts the filter's plugin queued during its last callback. Callouts of
    /// this request's context run in the run's join set; the root context's go to the worker's
    /// driver of that instance.
    fn dispatch(&mut self, idx: usize) {
        let f = &self.filters[idx];
        worker::route_context_actions(&f.instance);
        let (calls, grpc) = {
            let mut inst = f.instance.borrow_mut();
            (inst.take_callouts(), inst.take_grpc_commands())
        };
        if calls.is_empty() && grpc.is_empty() {
            return;
        }
        // Each callout's task holds the request's resolver by `Rc`.
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        for call in calls {
            if call.context_id != f.ctx {
                worker::spawn_root_callout(&f.instance, call);
                continue;
            }
            let resolver = resolver.clone();
            spawn_callout(&mut self.callouts, async move {
                let token = call.token;
                (
                    idx,
                    Answer::Http(token, callout::http_call(&resolver, call).await),
                )
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
                    let resolver = resolver.clone();
                    let handle = spawn_callout(&mut self.callouts, async move {
                        let outcome = callout::grpc_call(&resolver, call, message, timeout).await;
                        (idx, Answer::Grpc(token, outcome))
                    });
                    self.grpc_calls.insert(token, handle);
                }
                GrpcCommand::OpenStream { token, call, .. } => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    self.grpc_inputs.insert(token, tx);
                    let events = self
                        .grpc_events
                        .get_or_insert_with(local_channel::channel)
                        .0
                        .clone();
                    let resolver = resolver.clone();
                    let handle = spawn_callout(&mut self.callouts, async move {
                        let outcome =
                            callout::grpc_stream(&resolver, call, rx, events, idx, token).await;
                        (idx, Answer::Grpc(token, outcome))
                    });
                    self.grpc_calls.insert(token, handle);
                }
                GrpcCommand::Send {
                    token,
                    message,
                    end_of_stream,
                } => {
                    if let Some(tx) = self.grpc_inputs.get(&token) {
                        let _ = tx.send(GrpcStreamInput::Message {
                            message,
                            end_of_stream,
                        });
                    }
                }
                GrpcCommand::Close { token } => {
                    if let Some(tx) = self.grpc_inputs.get(&token) {
                        let _ = tx.send(GrpcStreamInput::Close);
                    }
                }
                GrpcCommand::Cancel { token } => {
                    self.grpc_inputs.remove(&token);
                    if let Some(h) = self.grpc_calls.remove(&token) {
                        h.abort();
                    }
                }
            }
        }
    }

    /// Delivers what a gRPC stream of filter `owner` reported, with this request's stream.
    fn deliver_stream_event(
        &mut self,
        owner: usize,
        token: u32,
        event: GrpcStreamEvent,
    ) -> Result<(), HostError> {
        let f = &self.filters[owner];
        let mut inst = f.instance.borrow_mut();
        match event {
            GrpcStreamEvent::InitialMetadata(md) => {
                inst.on_grpc_receive_initial_metadata(token, md, Some(&mut self.stream))?
            }
            GrpcStreamEvent::Message(m) => {
                inst.on_grpc_receive(token, m, Some(&mut self.stream))?
            }
        };
        Ok(())
    }

    /// Delivers the events of the run's contexts while the plugin at `idx` holds the `dir` side
    /// of the stream, until it resumes or answers it, or nothing is left in flight.
    async fn wait_for_resume(&mut self, idx: usize, dir: Dir) -> Resume {
        loop {
            let own = self.has_callouts();
            // The plugin's root context may resume the request too (a tick, its own callout's
            // answer): wait while it could.
            let event = if !own && !worker::root_may_act(&self.filters[idx].instance) {
                match self.actions.try_recv() {
                    Ok((owner, action)) => Event::Action(owner, action),
                    Err(_) => return Resume::NothingToWaitFor,
                }
            } else {
                tokio::select! {
                    event = self.next_event() => event,
                    // Looks again now and then whether the root context can still act.
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)), if !own => continue,
                }
            };
            match self.handle_event(event) {
                Effect::Nothing => {}
                Effect::Continued(owner, stream) => {
                    if owner == idx && stream == dir.stream_type() {
                        return Resume::Continued;
                    }
                }
                Effect::Bypassed(owner) => {
                    if owner == idx {
                        return Resume::Continued;
                    }
                }
                Effect::Halt(Halt::Reply(reply)) => {
                    return Resume::Respond(Outcome::Respond(reply));
                }
                Effect::Halt(Halt::Reset(reset)) => return Resume::Respond(Outcome::Reset(reset)),
            }
        }
    }

    /// The next event of the run's contexts: what their gRPC streams report, their callouts'
    /// answers, actions other contexts aim at them. Pending until there is one.
    async fn next_event(&mut self) -> Event {
        let calls = self.has_callouts();
        // The usual case, no callout or gRPC stream in flight: only another context's action
        // can come, and waiting on it alone skips the select's set-up and random start (the
        // other branches would be disabled anyway).
        if !calls && self.grpc_events.is_none() {
            return match self.actions.recv().await {
                Some((owner, action)) => Event::Action(owner, action),
                None => std::future::pending().await,
            };
        }
        let streams = self.grpc_events.as_mut().map(|(_, rx)| rx);
        tokio::select! {
            Some((owner, token, event)) = recv_if_some(streams) => Event::Stream(owner, token, event),
            Some(joined) = join_if_some(self.callouts.as_mut()), if calls => match joined {
                Ok((owner, answer)) => Event::Answer(owner, answer),
                Err(_) => Event::Cancelled,
            },
            Some((owner, action)) = self.actions.recv() => Event::Action(owner, action),
            else => std::future::pending().await,
        }
    }

    /// Delivers `event` to the context it belongs to, with this request's stream, and says
    /// what that did.
    fn handle_event(&mut self, event: Event) -> Effect {
        let owner = match event {
            Event::Cancelled => return Effect::Nothing,
            Event::Action(owner, action) => return self.apply_action(owner, action),
            Event::Stream(owner, token, event) => {
                if self.filters[owner].bypassed {
                    return Effect::Nothing;
                }
                if let Err(err) = self.deliver_stream_event(owner, token, event) {
                    return self.fault_effect(owner, &err);
                }
                owner
            }
            Event::Answer(owner, answer) => {
                // What a stream reported before it ended comes first.
                while let Some((o, token, event)) = self
                    .grpc_events
                    .as_mut()
                    .and_then(|(_, rx)| rx.try_recv().ok())
                {
                    if self.filters[o].bypassed {
                        continue;
                    }
                    if let Err(err) = self.deliver_stream_event(o, token, event) {
                        match self.fault_effect(o, &err) {
                            Effect::Halt(h) => return Effect::Halt(h),
                            _ => continue,
                        }
                    }
                }
                if let Answer::Grpc(token, _) = &answer {
                    self.grpc_inputs.remove(token);
                    self.grpc_calls.remove(token);
                }
                if self.filters[owner].bypassed {
                    return Effect::Nothing;
                }
                let result = {
                    let f = &self.filters[owner];
                    let mut inst = f.instance.borrow_mut();
                    deliver(&mut inst, answer, &mut self.stream)
                };
                if let Err(err) = result {
                    return self.fault_effect(owner, &err);
                }
                owner
            }
        };
        self.dispatch(owner);
        if let Some(local) = self.stream.local_response.take() {
            return Effect::Halt(Halt::Reply(plugin_reply(
                &self.filters[owner].plugin,
                local,
            )));
        }
        if let Some(reset) = self.take_close(owner) {
            return Effect::Halt(Halt::Reset(reset));
        }
        match self.stream.continue_requested.take() {
            Some(stream) => Effect::Continued(owner, stream),
            None => Effect::Nothing,
        }
    }

    fn fault_effect(&mut self, owner: usize, err: &HostError) -> Effect {
        match self.runtime_fault(owner, err) {
            Some(Outcome::Respond(reply)) => Effect::Halt(Halt::Reply(reply)),
            Some(Outcome::Reset(reset)) => Effect::Halt(Halt::Reset(reset)),
            _ => Effect::Bypassed(owner),
        }
    }

    /// An action another context aimed at filter `owner`'s context.
    fn apply_action(&mut self, owner: usize, action: ContextAction) -> Effect {
        let plugin = &self.filters[owner].plugin;
        match action {
            ContextAction::LocalResponse { response, .. } => {
                Effect::Halt(Halt::Reply(plugin_reply(plugin, response)))
            }
            ContextAction::Continue { stream, .. } => Effect::Continued(owner, stream),
            // Envoy resets the stream (`resetStream()`), whichever side was named.
            ContextAction::Close { .. } => Effect::Halt(Halt::Reset(StreamReset {
                plugin: plugin.spec.name.clone(),
            })),
        }
    }

    /// Handles one event while the pump reads the `dir` body: returns the body data a resumed
    /// filter released (run through the filters after it), to send on.
    pub async fn on_event(
        &mut self,
        dir: Dir,
        event: PendingEvent,
        limit: usize,
    ) -> Result<Vec<u8>, Halt> {
        let owner = match self.handle_event(event.0) {
            Effect::Nothing => return Ok(Vec::new()),
            Effect::Continued(owner, stream) if stream == dir.stream_type() => owner,
            Effect::Continued(..) => return Ok(Vec::new()),
            Effect::Bypassed(owner) => owner,
            Effect::Halt(h) => return Err(h),
        };
        let held = self.take_held(dir, owner);
        if held.is_empty() {
            return Ok(Vec::new());
        }
        // Envoy's continueDecoding/continueEncoding: the buffered body goes on to the next
        // filters; the end of the stream has not been seen yet (else the pump would be waiting
        // in `body_chunk`).
        self.run_body(dir, Some(owner), held, false, limit).await
    }

    /// The next event of the run's contexts, for a pump that also reads a body (see
    /// [`ChainRun::on_event`]).
    pub async fn event(&mut self) -> PendingEvent {
        PendingEvent(self.next_event().await)
    }

    /// Awaits `fut` (the upstream's answer) while delivering the events of the run's contexts,
    /// as Envoy does at any time of the stream: gRPC stream messages, callout answers, actions
    /// of other contexts. A plugin may answer or reset the stream meanwhile.
    ///
    /// `fut` comes pinned by the caller: moved in and pinned here, the upstream exchange
    /// would be stored (and copied) twice in this future.
    pub async fn while_waiting<F: std::future::Future>(
        &mut self,
        mut fut: std::pin::Pin<&mut F>,
    ) -> Result<F::Output, Halt> {
        loop {
            tokio::select! {
                biased;
                out = fut.as_mut() => return Ok(out),
                event = self.next_event() => match self.handle_event(event) {
                    Effect::Halt(h) => return Err(h),
                    Effect::Nothing | Effect::Continued(..) | Effect::Bypassed(_) => {}
                },
            }
        }
    }

    /// True while a callout or gRPC stream of the run's contexts is in flight.
    pub fn has_callouts(&self) -> bool {
        self.callouts.as_ref().is_some_and(|c| !c.is_empty())
    }

    async fn settle_response(
        &mut self,
        idx: usize,
        result: Result<Action, HostError>,
    ) -> Option<Outcome> {
        match result {
            Ok(action) => {
                self.dispatch(idx);
                // A local reply from the response path replaces the upstream's response.
                if let Some(local) = self.stream.local_response.take() {
                    return Some(Outcome::Respond(plugin_reply(
                        &self.filters[idx].plugin,
                        local,
                    )));
                }
                if let Some(reset) = self.take_close(idx) {
                    return Some(Outcome::Reset(reset));
                }
                let continued = self.stream.continue_requested.take().is_some();
                if action == Action::Pause && !continued {
                    // Waits only while something can resume it; a pause nothing can end is
                    // taken as Continue, so the client is not left hanging.
                    match self.wait_for_resume(idx, Dir::Response).await {
                        Resume::Respond(out) => return Some(out),
                        Resume::Continued | Resume::NothingToWaitFor => {}
                    }
                }
                None
            }
            Err(err) => self.runtime_fault(idx, &err),
        }
    }

    fn runtime_fault(&mut self, idx: usize, err: &HostError) -> Option<Outcome> {
        let f = &mut self.filters[idx];
        if f.instance.borrow().is_poisoned() {
            worker::discard_instance(f.plugin.revision);
        }
        f.bypassed = true;
        fault(&f.plugin, err).map(Outcome::Respond)
    }
}

impl Drop for ChainRun {
    /// A request dropped before `finish` (its client went away) leaves no context reachable.
    /// The header maps' buffers go back to the worker for the next request.
    fn drop(&mut self) {
        for f in &self.filters {
            worker::unregister_context(&f.instance, f.ctx);
        }
        std::mem::take(&mut self.stream.request_headers).recycle();
        std::mem::take(&mut self.stream.response_headers).recycle();
    }
}

/// Runs a callout of the run in its set, created with the first callout.
fn spawn_callout(
    set: &mut Option<JoinSet<(usize, Answer)>>,
    call: impl std::future::Future<Output = (usize, Answer)> + 'static,
) -> AbortHandle {
    set.get_or_insert_with(JoinSet::new).spawn_local(call)
}

/// The next message of `rx`; `None` at once when there is no channel.
async fn recv_if_some<T>(rx: Option<&mut local_channel::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => None,
    }
}

/// The next finished task of `set`; `None` at once when there is no set.
async fn join_if_some<T: 'static>(
    set: Option<&mut JoinSet<T>>,
) -> Option<Result<T, tokio::task::JoinError>> {
    match set {
        Some(set) => set.join_next().await,
        None => None,
    }
}

/// An event of the run's contexts, taken by [`ChainRun::event`].
pub struct PendingEvent(Event);

enum Resume {
    Continued,
    Respond(Outcome),
    NothingToWaitFor,
}

fn deliver(
    inst: &mut waystone_wasm::PluginInstance,
    answer: Answer,
    stream: &mut HttpStream,
) -> Result<(), HostError> {
    match answer {
        Answer::Http(token, response) => {
            inst.on_http_call_response(token, response, Some(stream))?;
        }
        Answer::Grpc(token, outcome) => deliver_grpc(inst, token, outcome, Some(stream))?,
    }
    Ok(())
}

/// Tells the plugin what a unary gRPC call produced, in gRPC order.
pub(crate) fn deliver_grpc(
    inst: &mut waystone_wasm::PluginInstance,
    token: u32,
    outcome: GrpcOutcome,
    mut stream: Option<&mut HttpStream>,
) -> Result<(), HostError> {
    if let Some(md) = outcome.initial_metadata {
        inst.on_grpc_receive_initial_metadata(token, md, stream.as_deref_mut())?;
    }
    for message in outcome.messages {
        inst.on_grpc_receive(token, message, stream.as_deref_mut())?;
    }
    if let Some(md) = outcome.trailing_metadata {
        inst.on_grpc_receive_trailing_metadata(token, md, stream.as_deref_mut())?;
    }
    inst.on_grpc_close(token, outcome.status, &outcome.message, stream)?;
    Ok(())
}

/// Applies a plugin's fail strategy to a runtime fault: `None` means bypass it.
fn fault(plugin: &LoadedPlugin, err: &HostError) -> Option<LocalReply> {
    let name = &plugin.spec.name;
    match plugin.fail_strategy {
        FailStrategy::FailOpen => {
            tracing::warn!(plugin = %name, error = %err, "plugin failed; bypassing it (FAIL_OPEN)");
            None
        }
        FailStrategy::FailClose | FailStrategy::FailReload => {
            tracing::error!(plugin = %name, error = %err, "plugin failed; answering 503");
            Some(LocalReply::text(
                503,
                format!("wasm:{name}:fault"),
                format!("plugin {name} failed\n"),
            ))
        }
    }
}

/// Envoy's answer when a filter buffers more than the buffer limit: 413 for a request, 500 for
/// a response (sent only if the response headers have not left yet; else the stream is reset).
fn too_large(dir: Dir) -> LocalReply {
    match dir {
        Dir::Request => LocalReply::text(413, "request_payload_too_large", "Payload Too Large"),
        Dir::Response => {
            LocalReply::text(500, "response_payload_too_large", "Internal Server Error")
        }
    }
}

fn unavailable_reply(id: &PluginId) -> LocalReply {
    let name = format!("{}.{}", id.key.namespace, id.key.name);
    LocalReply::text(
        403,
        format!("wasm:{name}:unavailable"),
        format!("access denied: plugin {name} is not loaded and fails closed\n"),
    )
}

fn plugin_reply(plugin: &LoadedPlugin, local: LocalResponse) -> LocalReply {
    let mut headers = local.headers;
    // Envoy's local replies with a body say what it is unless the plugin did.
    if !local.body.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        headers.push(("content-type".into(), b"text/plain".to_vec()));
    }
    LocalReply {
        status: local.status,
        details: format!("wasm:{}:{}", plugin.spec.name, local.status),
        headers,
        body: local.body,
    }
}
