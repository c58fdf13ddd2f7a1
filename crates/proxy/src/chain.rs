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
use std::time::{Instant, SystemTime};

use tokio::task::{AbortHandle, JoinSet};
use waystone_model::snapshot::{FailStrategy, PluginId};
use waystone_wasm::{
    Action, GrpcCommand, HostError, HttpCallResponse, HttpStream, LocalResponse, StreamType,
};

use crate::callout::{self, GrpcOutcome, Resolver};
use crate::metrics::{self, CallOutcome, Callback};
use crate::trace::PluginSpan;

use crate::runtime::{LoadedPlugin, PluginSlot, RuntimeConfig};
use crate::worker::{self, SharedInstance};

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
}

struct ActiveFilter {
    plugin: Arc<LoadedPlugin>,
    instance: SharedInstance,
    ctx: u32,
    /// Set after a fail-open fault: the plugin sees nothing more of this stream.
    bypassed: bool,
}

/// An answered callout of one filter's context, waiting to be delivered.
enum Answer {
    Http(u32, Option<HttpCallResponse>),
    Grpc(u32, GrpcOutcome),
}

/// The chain state of one request.
pub struct ChainRun {
    filters: Vec<ActiveFilter>,
    pub stream: HttpStream,
    resolver: Option<Resolver>,
    /// Callouts of this request's contexts in flight on the worker, with the filter index.
    /// Dropped (aborted) with the run: Envoy cancels a context's callouts when it ends.
    callouts: JoinSet<(usize, Answer)>,
    grpc_calls: HashMap<u32, AbortHandle>,
    /// Set when the request is traced: every plugin callback becomes a child span.
    pub spans: Option<Rc<RefCell<Vec<PluginSpan>>>>,
}

/// When a callback started: the monotonic clock for metrics, wall time for spans.
struct CallStart(Instant, Option<SystemTime>);

impl ChainRun {
    pub fn new(stream: HttpStream) -> Self {
        Self {
            filters: Vec::new(),
            stream,
            resolver: None,
            callouts: JoinSet::new(),
            grpc_calls: HashMap::new(),
            spans: None,
        }
    }

    fn call_start(&self) -> CallStart {
        CallStart(
            Instant::now(),
            self.spans.as_ref().map(|_| SystemTime::now()),
        )
    }

    /// Records one callback of `plugin`: its outcome, latency and (when traced) its span.
    fn observe(
        &self,
        plugin: &LoadedPlugin,
        callback: Callback,
        start: CallStart,
        result: Result<bool, &HostError>,
    ) {
        let local = self.stream.local_response.as_ref().map(|l| l.status);
        let paused = matches!(result, Ok(true));
        let outcome = CallOutcome::of(&result.map(|_| ()), paused, local);
        metrics::record_plugin_call(
            plugin.revision,
            &plugin.spec.name,
            callback,
            outcome,
            start.0.elapsed(),
        );
        if let (Some(spans), Some(wall)) = (&self.spans, start.1) {
            spans.borrow_mut().push(PluginSpan {
                plugin: Arc::from(plugin.spec.name.as_str()),
                callback: callback.as_str(),
                outcome: outcome.as_str(),
                start_unix_nanos: crate::observe::unix_nanos(wall),
                end_unix_nanos: crate::observe::unix_nanos(SystemTime::now()),
            });
        }
    }

    fn observe_action(
        &self,
        idx: usize,
        callback: Callback,
        start: CallStart,
        result: &Result<Action, HostError>,
    ) {
        let r = match result {
            Ok(a) => Ok(*a == Action::Pause),
            Err(e) => Err(e),
        };
        self.observe(&self.filters[idx].plugin, callback, start, r);
    }

    /// True when some plugin of the chain reads request bodies (so the proxy buffers them).
    pub fn wants_request_body(&self) -> bool {
        self.filters
            .iter()
            .any(|f| !f.bypassed && f.plugin.module.has_export("proxy_on_request_body"))
    }

    pub fn wants_response_body(&self) -> bool {
        self.filters
            .iter()
            .any(|f| !f.bypassed && f.plugin.module.has_export("proxy_on_response_body"))
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
        let resolver = Resolver {
            snapshot: rt.snapshot.clone(),
            default_namespace: rt.default_namespace.clone(),
        };
        worker::set_resolver(&resolver);
        self.resolver = Some(resolver);
        for id in chain {
            let plugin = match rt.plugins.get(id) {
                Some(PluginSlot::Ready(p)) => p.clone(),
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
            let instance = match worker::instance_for(&plugin) {
                Ok(i) => i,
                Err(err) => match fault(&plugin, &err) {
                    Some(reply) => return Outcome::Respond(reply),
                    None => continue,
                },
            };
            let start = self.call_start();
            let created = instance.borrow_mut().create_http_context();
            self.observe(
                &plugin,
                Callback::ContextCreate,
                start,
                created.as_ref().map(|_| false),
            );
            let ctx = match created {
                Ok(ctx) => ctx,
                Err(err) => match fault(&plugin, &err) {
                    Some(reply) => return Outcome::Respond(reply),
                    None => continue,
                },
            };
            self.filters.push(ActiveFilter {
                plugin,
                instance,
                ctx,
                bypassed: false,
            });
            let idx = self.filters.len() - 1;
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_request_headers(f.ctx, &mut self.stream, end_of_stream)
            };
            self.observe_action(idx, Callback::RequestHeaders, start, &result);
            if let Some(out) = self.settle(idx, result, end_of_stream).await {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Runs the request-body callbacks over the whole (buffered) body.
    pub async fn request_body(&mut self) -> Outcome {
        for idx in 0..self.filters.len() {
            if self.filters[idx].bypassed {
                continue;
            }
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_request_body(f.ctx, &mut self.stream, true)
            };
            self.observe_action(idx, Callback::RequestBody, start, &result);
            if let Some(out) = self.settle(idx, result, true).await {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Runs the response-headers callbacks, last plugin first.
    pub fn response_headers(&mut self, end_of_stream: bool) -> Outcome {
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
            if let Some(out) = self.settle_response(idx, result) {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Runs the response-body callbacks over the whole (buffered) body, last plugin first.
    pub fn response_body(&mut self) -> Outcome {
        for idx in (0..self.filters.len()).rev() {
            if self.filters[idx].bypassed {
                continue;
            }
            let start = self.call_start();
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_response_body(f.ctx, &mut self.stream, true)
            };
            self.observe_action(idx, Callback::ResponseBody, start, &result);
            if let Some(out) = self.settle_response(idx, result) {
                return out;
            }
        }
        Outcome::Continue
    }

    /// Ends every context: `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish(&mut self) {
        for f in &self.filters {
            if f.bypassed {
                continue;
            }
            let start = self.call_start();
            let result = f
                .instance
                .borrow_mut()
                .finish_http_context(f.ctx, &mut self.stream);
            self.observe(
                &f.plugin,
                Callback::Done,
                start,
                result.as_ref().map(|_| false),
            );
            if let Err(err) = result {
                tracing::warn!(plugin = %f.plugin.id, error = %err, "plugin failed while closing its context");
                if f.instance.borrow().is_poisoned() {
                    worker::discard_instance(f.plugin.revision);
                }
            }
        }
        self.filters.clear();
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
                let mut continued = self.stream.continue_requested.take().is_some();
                if action == Action::Pause && !continued {
                    match self.wait_for_resume(idx).await {
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
        let (calls, grpc) = {
            let mut inst = f.instance.borrow_mut();
            (inst.take_callouts(), inst.take_grpc_commands())
        };
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        for call in calls {
            if call.context_id != f.ctx {
                worker::spawn_root_callout(&f.instance, call, resolver.clone());
                continue;
            }
            let resolver = resolver.clone();
            self.callouts.spawn_local(async move {
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
                    let handle = self.callouts.spawn_local(async move {
                        let outcome = callout::grpc_call(&resolver, call, message, timeout).await;
                        (idx, Answer::Grpc(token, outcome))
                    });
                    self.grpc_calls.insert(token, handle);
                }
                GrpcCommand::OpenStream { token, .. } => {
                    // Streams are not carried by this proxy yet: the plugin is told at once.
                    self.callouts.spawn_local(async move {
                        let outcome = GrpcOutcome {
                            initial_metadata: None,
                            messages: Vec::new(),
                            trailing_metadata: None,
                            status: 12,
                            message: "gRPC streams are not supported by this proxy yet".into(),
                        };
                        (idx, Answer::Grpc(token, outcome))
                    });
                }
                GrpcCommand::Cancel { token } => {
                    if let Some(h) = self.grpc_calls.remove(&token) {
                        h.abort();
                    }
                }
                GrpcCommand::Send { .. } | GrpcCommand::Close { .. } => {}
            }
        }
    }

    /// Delivers callout answers while the plugin at `idx` holds the request, until it resumes
    /// or answers it, or nothing is left in flight.
    async fn wait_for_resume(&mut self, idx: usize) -> Resume {
        while let Some(joined) = self.callouts.join_next().await {
            let Ok((owner, answer)) = joined else {
                continue; // aborted (cancelled) call
            };
            let result = {
                let f = &self.filters[owner];
                let mut inst = f.instance.borrow_mut();
                deliver(&mut inst, answer, &mut self.stream)
            };
            if let Err(err) = result {
                if let Some(out) = self.runtime_fault(owner, &err) {
                    return Resume::Respond(out);
                }
                if owner == idx {
                    return Resume::Continued;
                }
                continue;
            }
            self.dispatch(owner);
            if let Some(local) = self.stream.local_response.take() {
                return Resume::Respond(Outcome::Respond(plugin_reply(
                    &self.filters[owner].plugin,
                    local,
                )));
            }
            if self.stream.continue_requested.take() == Some(StreamType::Request) {
                return Resume::Continued;
            }
        }
        Resume::NothingToWaitFor
    }

    fn settle_response(
        &mut self,
        idx: usize,
        result: Result<Action, HostError>,
    ) -> Option<Outcome> {
        match result {
            Ok(_) => {
                // A local reply from the response path replaces the upstream's response.
                self.stream
                    .local_response
                    .take()
                    .map(|local| Outcome::Respond(plugin_reply(&self.filters[idx].plugin, local)))
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
