//! L4 (`type: NETWORK`) plugins on relayed TCP connections: gateway listeners of protocol
//! `TCP` (TCPRoute backends) and the waypoint's HBONE relay for TCP service ports.
//!
//! Semantics follow Envoy's network Wasm filters in front of `tcp_proxy`, as the differential
//! suite shows them (`tests/differential/rust_tcp.yaml`):
//! - iteration reaches a plugin first through `proxy_on_context_create` +
//!   `proxy_on_new_connection`; a Pause there stops it: later plugins, the upstream connect and
//!   reading the client wait until that context continues (`proxy_continue_stream(2)`, from its
//!   root context's tick or callout answer after `proxy_set_effective_context`);
//! - `proxy_on_downstream_data(size, eos)`: each read event runs the plugins from the first
//!   over the connection's whole unsent read buffer (one read event takes what the socket has,
//!   end of stream included); a Pause leaves the buffer, as earlier plugins changed it, for
//!   the next read, where every plugin sees it again; a continue from another context
//!   resumes iteration at the plugin after the one that paused;
//! - `proxy_on_upstream_data(size, eos)` per upstream read event, last plugin first (Envoy's
//!   write filters) over the whole unsent upstream buffer; at upstream end of stream each
//!   plugin also gets `proxy_on_upstream_connection_close(Unknown)` right after it, as Envoy
//!   does (it has no upstream connection event to report);
//! - `proxy_close_stream(2|3)`, from the connection's own callbacks or from another context,
//!   closes the connection;
//! - at the close, per plugin in chain order: `proxy_on_downstream_connection_close(peer)`
//!   (`Remote` when the client's end is what closed the connection, `Local` when the proxy
//!   closed it: a plugin's close, a fail-closed fault, an upstream failure, our half-close
//!   last), then `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`; plugins iteration never
//!   reached get nothing.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use waystone_model::snapshot::{FailStrategy, PluginId};
use waystone_wasm::{
    Action, ContextAction, HostError, NetworkStream, PeerType, StreamProperties, StreamType,
};

use crate::metrics::{CallOutcome, Callback, PluginCalls};
use crate::runtime::{LoadedPlugin, PluginSlot, RuntimeConfig};
use crate::worker::{self, SharedInstance, WorkerPlugin};

const READ_CHUNK: usize = 16 << 10;

struct Filter {
    /// The plugin, this worker's instance of it and its call series (through `Deref`).
    worker: Rc<WorkerPlugin>,
    /// Created when iteration first reaches this filter (Envoy creates the Wasm context in
    /// the filter's `onNewConnection`); 0 until then.
    ctx: u32,
    /// `proxy_on_new_connection` ran (Envoy's `initialized_`).
    initialized: bool,
    /// FAIL_OPEN after a fault: bytes pass it untouched and it gets no more callbacks.
    bypassed: bool,
}

impl std::ops::Deref for Filter {
    type Target = WorkerPlugin;
    fn deref(&self) -> &WorkerPlugin {
        &self.worker
    }
}

/// Why the proxy closes a connection itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// A plugin called `proxy_close_stream`.
    Plugin,
    /// A plugin failed (or could not be loaded) and fails closed.
    Fault,
}

/// What one direction's bytes became after the chain.
#[derive(Default)]
struct Step {
    out: Vec<u8>,
    /// The end of stream passed every plugin (none paused on it).
    eos: bool,
    close: Option<CloseReason>,
}

impl Step {
    fn close(reason: CloseReason) -> Self {
        Self {
            close: Some(reason),
            ..Default::default()
        }
    }
}

/// The NETWORK plugins of one connection, with their contexts.
///
/// Envoy's network filter manager keeps one read buffer per connection: each read (and each
/// `continueReading`) runs the filters over the *whole* buffer, from the first filter on a
/// read and from the one after the resumer on a continue, and a filter that stops iteration
/// leaves the bytes (as earlier filters changed them) in that buffer. Writes work alike
/// over the upstream read buffer, last filter first. `down_pending`/`up_pending` are those
/// buffers, so earlier plugins see held bytes again, as in Envoy.
pub(crate) struct L4Chain {
    filters: Vec<Filter>,
    conn: NetworkStream,
    down_pending: Vec<u8>,
    /// The client's end of stream was read.
    down_eos: bool,
    /// The client's end of stream passed every plugin (the upstream was half-closed).
    down_finished: bool,
    up_pending: Vec<u8>,
    /// Iteration reached the end of the chain once: `tcp_proxy`'s `onNewConnection`, which
    /// connects the upstream.
    connect_wanted: bool,
    /// Actions other contexts (a root's tick or callout answer) aim at this connection's
    /// contexts, with the filter index (`worker::route_context_actions`).
    actions_tx: worker::ActionSender,
    actions: Option<crate::local_channel::Receiver<(usize, ContextAction)>>,
}

impl L4Chain {
    /// Takes an instance of each plugin and runs `proxy_on_new_connection` in chain order
    /// until one pauses. `Some`: the connection must be closed at once (a fail-closed plugin
    /// could not run, or a plugin closed it); contexts already created are ended by
    /// [`L4Chain::end`]. The upstream is connected once [`L4Chain::wants_upstream`].
    pub(crate) fn start(
        chain: &[PluginId],
        rt: &RuntimeConfig,
        properties: StreamProperties,
    ) -> (Self, Option<CloseReason>) {
        // Root contexts' callouts (a tick resuming this connection) resolve against the
        // worker's latest snapshot.
        worker::set_resolver(&rt.snapshot, &rt.default_namespace);
        let (actions_tx, actions) = crate::local_channel::channel();
        let mut this = Self {
            filters: Vec::new(),
            conn: NetworkStream {
                properties,
                ..Default::default()
            },
            down_pending: Vec::new(),
            down_eos: false,
            down_finished: false,
            up_pending: Vec::new(),
            connect_wanted: false,
            actions_tx,
            actions: Some(actions),
        };
        for id in chain {
            let plugin = match rt.plugins.get(id) {
                Some(PluginSlot::Ready(p)) => p,
                Some(PluginSlot::Failed {
                    fail_strategy: FailStrategy::FailOpen,
                    ..
                }) => continue,
                Some(PluginSlot::Failed { reason, .. }) => {
                    tracing::warn!(plugin = %id, %reason, "closing connection: plugin is not loaded (fail closed)");
                    return (this, Some(CloseReason::Fault));
                }
                None => {
                    tracing::error!(plugin = %id, "closing connection: plugin missing from the runtime config");
                    return (this, Some(CloseReason::Fault));
                }
            };
            let worker = match worker::instance_for(plugin) {
                Ok(w) => w,
                Err(err) => match fails_closed(plugin, &err) {
                    true => return (this, Some(CloseReason::Fault)),
                    false => continue,
                },
            };
            this.filters.push(Filter {
                worker,
                ctx: 0,
                initialized: false,
                bypassed: false,
            });
        }
        let close = this.advance_down(0).close;
        (this, close)
    }

    /// Whether iteration has reached `tcp_proxy`: the upstream may be connected.
    pub(crate) fn wants_upstream(&self) -> bool {
        self.connect_wanted
    }

    /// Creates the filter's context and runs `proxy_on_new_connection`: `Err` stops
    /// iteration (a Pause), with a close reason when the connection must close.
    fn initialize(&mut self, idx: usize) -> Result<(), Option<CloseReason>> {
        let f = &mut self.filters[idx];
        f.initialized = true;
        let started = Instant::now();
        let created = f.instance.borrow_mut().create_network_context();
        record(
            &f.calls,
            Callback::ContextCreate,
            &created.as_ref().map(|_| false),
            started,
        );
        match created {
            Ok(ctx) => {
                f.ctx = ctx;
                worker::register_context(&f.instance, ctx, idx, self.actions_tx.clone());
            }
            Err(err) => {
                discard_if_poisoned(&f.plugin, &f.instance);
                f.bypassed = true;
                return match fails_closed(&f.plugin, &err) {
                    true => Err(Some(CloseReason::Fault)),
                    false => Ok(()),
                };
            }
        }
        let started = Instant::now();
        let result = {
            let f = &self.filters[idx];
            f.instance
                .borrow_mut()
                .on_new_connection(f.ctx, &mut self.conn)
        };
        let paused = matches!(result, Ok(Action::Pause));
        if let Some(reason) = self.settle(idx, Callback::NewConnection, result, started) {
            return Err(Some(reason));
        }
        if paused && !self.filters[idx].bypassed {
            return Err(None);
        }
        Ok(())
    }

    /// The upstream host once connected (`upstream.address`).
    pub(crate) fn set_upstream(&mut self, addr: SocketAddr) {
        self.conn.properties.upstream = Some(addr);
    }

    /// Records a callback and interprets its result: `Some` closes the connection.
    fn settle(
        &mut self,
        idx: usize,
        callback: Callback,
        result: Result<Action, HostError>,
        started: Instant,
    ) -> Option<CloseReason> {
        let close = self.conn.close_requested.take().is_some();
        let f = &mut self.filters[idx];
        // What the callback aimed at other contexts (after `proxy_set_effective_context`).
        worker::route_context_actions(&f.instance);
        // HTTP callouts a connection's context made go out now through the instance's driver,
        // which delivers the answer to that context (it may then continue or close the
        // connection: routed back here as an action); gRPC ones wait for the driver's turn.
        for call in f.instance.borrow_mut().take_callouts() {
            worker::spawn_root_callout(&f.instance, call);
        }
        match result {
            Ok(action) => {
                let outcome = if close {
                    CallOutcome::Close
                } else if action == Action::Pause {
                    CallOutcome::Pause
                } else {
                    CallOutcome::Continue
                };
                f.calls.record(callback, outcome, started.elapsed());
                close.then_some(CloseReason::Plugin)
            }
            Err(err) => {
                f.calls.record(
                    callback,
                    CallOutcome::of(&Err(&err), false, None),
                    started.elapsed(),
                );
                discard_if_poisoned(&f.plugin, &f.instance);
                f.bypassed = true;
                fails_closed(&f.plugin, &err).then_some(CloseReason::Fault)
            }
        }
    }

    /// A downstream read (or its end): appended to the read buffer, which then runs through
    /// the plugins from the first.
    fn downstream(&mut self, data: Vec<u8>, eos: bool) -> Step {
        self.down_pending.extend_from_slice(&data);
        self.down_eos |= eos;
        self.advance_down(0)
    }

    /// Envoy's `onContinueReading` from filter `from`: filters not yet initialized get
    /// `proxy_on_new_connection` first, then each gets the whole read buffer (when it has
    /// bytes or the end of stream); a Pause leaves the buffer where it is. Past the last
    /// plugin the upstream is wanted and the buffer leaves.
    fn advance_down(&mut self, from: usize) -> Step {
        if self.down_finished {
            return Step::default();
        }
        for idx in from..self.filters.len() {
            if self.filters[idx].bypassed {
                continue;
            }
            if !self.filters[idx].initialized {
                match self.initialize(idx) {
                    Ok(()) => {}
                    Err(Some(reason)) => return Step::close(reason),
                    Err(None) => return Step::default(),
                }
                if self.filters[idx].bypassed {
                    continue;
                }
            }
            if self.down_pending.is_empty() && !self.down_eos {
                continue;
            }
            let f = &self.filters[idx];
            self.conn.downstream_data = std::mem::take(&mut self.down_pending);
            let started = Instant::now();
            let result =
                f.instance
                    .borrow_mut()
                    .on_downstream_data(f.ctx, &mut self.conn, self.down_eos);
            self.down_pending = std::mem::take(&mut self.conn.downstream_data);
            let paused = matches!(result, Ok(Action::Pause));
            if let Some(reason) = self.settle(idx, Callback::DownstreamData, result, started) {
                return Step::close(reason);
            }
            if paused && !self.filters[idx].bypassed {
                return Step::default();
            }
        }
        self.connect_wanted = true;
        self.down_finished = self.down_eos;
        Step {
            out: std::mem::take(&mut self.down_pending),
            eos: self.down_eos,
            close: None,
        }
    }

    /// An upstream read (or its end): appended to the upstream read buffer, which runs
    /// through the plugins, last first (Envoy's write filters), each seeing all of it.
    fn upstream(&mut self, data: Vec<u8>, eos: bool) -> Step {
        self.up_pending.extend_from_slice(&data);
        for idx in (0..self.filters.len()).rev() {
            let f = &self.filters[idx];
            // A filter iteration never reached has no context: Envoy passes the bytes.
            if f.bypassed || !f.initialized {
                continue;
            }
            if self.up_pending.is_empty() && !eos {
                break;
            }
            self.conn.upstream_data = std::mem::take(&mut self.up_pending);
            let started = Instant::now();
            let result = f
                .instance
                .borrow_mut()
                .on_upstream_data(f.ctx, &mut self.conn, eos);
            self.up_pending = std::mem::take(&mut self.conn.upstream_data);
            let paused = matches!(result, Ok(Action::Pause));
            let faulted = result.is_err();
            let close = self.settle(idx, Callback::UpstreamData, result, started);
            if eos && !faulted {
                self.upstream_closed(idx);
            }
            if let Some(reason) = close {
                return Step::close(reason);
            }
            if paused && !faulted {
                // Held in the upstream read buffer, end of stream included, as Envoy's
                // StopIteration: the next upstream read brings it back.
                return Step::default();
            }
        }
        Step {
            out: std::mem::take(&mut self.up_pending),
            eos,
            close: None,
        }
    }

    /// An action another context aimed at one of ours: `proxy_continue_stream(Downstream)`
    /// is Envoy's `continueReading` (iteration resumes after that filter), a close closes
    /// the connection. Continuing the upstream is unimplemented in Envoy: ignored.
    fn act(&mut self, idx: usize, action: ContextAction) -> Step {
        match action {
            ContextAction::Continue {
                stream: StreamType::Downstream,
                ..
            } if self.filters.get(idx).is_some_and(|f| !f.bypassed) => self.advance_down(idx + 1),
            ContextAction::Close {
                stream: StreamType::Downstream | StreamType::Upstream,
                ..
            } => Step::close(CloseReason::Plugin),
            _ => Step::default(),
        }
    }

    /// Where actions aimed at this connection's contexts arrive; taken once by the relay.
    fn take_actions(&mut self) -> crate::local_channel::Receiver<(usize, ContextAction)> {
        self.actions
            .take()
            .unwrap_or_else(|| crate::local_channel::channel().1)
    }

    fn upstream_closed(&mut self, idx: usize) {
        let f = &mut self.filters[idx];
        if f.bypassed {
            return;
        }
        let started = Instant::now();
        let result = f.instance.borrow_mut().on_upstream_connection_close(
            f.ctx,
            PeerType::Unknown,
            &mut self.conn,
        );
        self.conn.close_requested = None;
        self.settle_close(idx, result, started);
    }

    fn settle_close(&mut self, idx: usize, result: Result<(), HostError>, started: Instant) {
        let f = &mut self.filters[idx];
        record(
            &f.calls,
            Callback::ConnectionClose,
            &result.as_ref().map(|_| false),
            started,
        );
        if let Err(err) = result {
            tracing::warn!(plugin = %f.plugin.id, error = %err, "plugin failed in a connection-close callback");
            discard_if_poisoned(&f.plugin, &f.instance);
            f.bypassed = true;
        }
    }

    /// The downstream connection closed: per plugin in chain order (as Envoy's filters each
    /// hear the close event and finish their context there),
    /// `proxy_on_downstream_connection_close(peer)`, then `proxy_on_done`, `proxy_on_log`,
    /// `proxy_on_delete`.
    pub(crate) fn end(&mut self, peer: PeerType) {
        for f in &self.filters {
            if f.ctx != 0 {
                worker::unregister_context(&f.instance, f.ctx);
            }
        }
        for idx in 0..self.filters.len() {
            // Envoy reports nothing to a filter iteration never reached (no context).
            if self.filters[idx].bypassed || !self.filters[idx].initialized {
                continue;
            }
            let started = Instant::now();
            let result = {
                let f = &self.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_downstream_connection_close(f.ctx, peer, &mut self.conn)
            };
            self.settle_close(idx, result, started);
            self.conn.close_requested = None;
            let f = &self.filters[idx];
            if f.bypassed {
                continue;
            }
            let started = Instant::now();
            let result = f
                .instance
                .borrow_mut()
                .finish_network_context(f.ctx, &mut self.conn);
            record(
                &f.calls,
                Callback::Done,
                &result.as_ref().map(|_| false),
                started,
            );
            if let Err(err) = result {
                tracing::warn!(plugin = %f.plugin.id, error = %err, "plugin failed while closing its context");
                discard_if_poisoned(&f.plugin, &f.instance);
            }
        }
        self.filters.clear();
    }
}

fn record(
    calls: &PluginCalls,
    callback: Callback,
    result: &Result<bool, &HostError>,
    started: Instant,
) {
    let outcome = CallOutcome::of(&result.map(|_| ()), matches!(result, Ok(true)), None);
    calls.record(callback, outcome, started.elapsed());
}

fn discard_if_poisoned(plugin: &LoadedPlugin, instance: &SharedInstance) {
    if instance.borrow().is_poisoned() {
        worker::discard_instance(plugin.revision);
    }
}

/// A plugin's fail strategy applied to a fault: true closes the connection.
fn fails_closed(plugin: &LoadedPlugin, err: &HostError) -> bool {
    let name = &plugin.spec.name;
    match plugin.fail_strategy {
        FailStrategy::FailOpen => {
            tracing::warn!(plugin = %name, error = %err, "plugin failed; bypassing it (FAIL_OPEN)");
            false
        }
        FailStrategy::FailClose | FailStrategy::FailReload => {
            tracing::error!(plugin = %name, error = %err, "plugin failed; closing the connection");
            true
        }
    }
}

/// How the relay of one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DirEnd {
    /// The reader saw end of stream and it was passed on (the writer half-closed).
    Eof,
    /// The chain holds the end of stream (a plugin paused on it): nothing more flows.
    Held,
    /// The proxy closes the connection.
    Close,
    /// Reading failed (reset): the connection is over.
    ReadError,
    /// Writing to the other side failed.
    WriteError,
}

/// Reads what `r` has now, as Envoy reads a socket until it would block: a first read
/// waits, the following ones only take what is already there, so data and an end of stream
/// that arrived together reach the plugins in one callback. `None`: reading failed.
async fn read_event<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Option<(Vec<u8>, bool)> {
    let n = r.read(buf).await.ok()?;
    if n == 0 {
        return Some((Vec::new(), true));
    }
    let mut data = buf[..n].to_vec();
    while data.len() < READ_EVENT_MAX {
        let more = std::future::poll_fn(|cx| {
            let mut rb = tokio::io::ReadBuf::new(buf);
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb) {
                std::task::Poll::Ready(Ok(())) => Some(Ok(rb.filled().len())),
                std::task::Poll::Ready(Err(e)) => Some(Err(e)),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        match more {
            None => break,
            Some(Ok(0)) => return Some((data, true)),
            Some(Ok(n)) => data.extend_from_slice(&buf[..n]),
            // The error shows again at the next read; deliver what came first.
            Some(Err(_)) => break,
        }
    }
    Some((data, false))
}

/// Envoy's default per-connection buffer limit: one read event takes at most this much.
const READ_EVENT_MAX: usize = 1 << 20;

/// Runs one accepted connection: the plugins' new-connection callbacks have run
/// ([`L4Chain::start`]); once iteration reaches the end of the chain (at once, or when the
/// plugin that paused continues, e.g. from its root context's tick) `connect` opens the
/// upstream and the bytes are relayed through `chain` until the connection is over, then
/// the chain's contexts end. While a plugin holds its new connection nothing is read from
/// the client, as in Envoy. A data-plane drain to 2 (stop) closes the connection.
pub(crate) async fn serve<D, U, C, F>(
    downstream: D,
    mut chain: L4Chain,
    connect: C,
    drain: Option<tokio::sync::watch::Receiver<u8>>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
    C: FnOnce() -> F,
    F: Future<Output = Option<(SocketAddr, U)>>,
{
    let mut actions = chain.take_actions();
    let stopped = async {
        match drain {
            Some(mut d) => {
                let _ = d.wait_for(|d| *d >= 2).await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(stopped);
    while !chain.wants_upstream() {
        let step = tokio::select! {
            action = actions.recv() => match action {
                Some((idx, action)) => chain.act(idx, action),
                None => Step::close(CloseReason::Plugin),
            },
            _ = &mut stopped => Step::close(CloseReason::Plugin),
        };
        if step.close.is_some() {
            drop(downstream);
            chain.end(PeerType::Local);
            return;
        }
    }
    let Some((endpoint, upstream)) = connect().await else {
        // tcp_proxy closes the downstream connection itself: a local close.
        drop(downstream);
        chain.end(PeerType::Local);
        return;
    };
    chain.set_upstream(endpoint);
    relay(downstream, upstream, chain, actions, stopped).await;
}

/// Relays bytes between `downstream` and the connected `upstream` through `chain` until the
/// connection is over, then ends the chain's contexts. Runs on a worker.
async fn relay<D, U>(
    downstream: D,
    upstream: U,
    chain: L4Chain,
    mut actions: crate::local_channel::Receiver<(usize, ContextAction)>,
    stopped: std::pin::Pin<&mut impl Future<Output = ()>>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let chain = Rc::new(RefCell::new(chain));
    let (mut down_r, mut down_w) = tokio::io::split(downstream);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Set when the upstream direction is over: a client end of stream a plugin still holds
    // can no longer matter.
    let (up_done_tx, up_done_rx) = tokio::sync::watch::channel(false);
    // Order of the two events that close the downstream connection normally: whichever
    // comes last decides the peer type Envoy reports.
    let seq = std::cell::Cell::new(0u32);
    let client_eof_at = std::cell::Cell::new(0u32);
    let our_shutdown_at = std::cell::Cell::new(0u32);

    let downstream_to_upstream = {
        let chain = chain.clone();
        let stop_tx = stop_tx.clone();
        let mut stop = stop_rx.clone();
        let mut up_done = up_done_rx.clone();
        let (seq, client_eof_at) = (&seq, &client_eof_at);
        async move {
            let mut buf = vec![0u8; READ_CHUNK];
            // The client's end of stream was read: only a plugin's continue moves on.
            let mut client_eof = false;
            loop {
                // Envoy's per-connection buffer limit: while plugins hold this much of the
                // client's bytes, the client is not read (its sends back up in TCP) until a
                // continue drains them, so a paused connection's memory stays bounded.
                let room = chain.borrow().down_pending.len() < READ_EVENT_MAX;
                let step = tokio::select! {
                    read = read_event(&mut down_r, &mut buf), if !client_eof && room => {
                        let Some((data, eos)) = read else {
                            let _ = stop_tx.send(true);
                            return DirEnd::ReadError;
                        };
                        if eos {
                            client_eof = true;
                            seq.set(seq.get() + 1);
                            client_eof_at.set(seq.get());
                        }
                        chain.borrow_mut().downstream(data, eos)
                    }
                    Some((idx, action)) = actions.recv() => chain.borrow_mut().act(idx, action),
                    _ = stop.wait_for(|s| *s) => return DirEnd::Close,
                    _ = up_done.wait_for(|d| *d), if client_eof => return DirEnd::Held,
                };
                if step.close.is_some() {
                    let _ = stop_tx.send(true);
                    return DirEnd::Close;
                }
                if !step.out.is_empty() && up_w.write_all(&step.out).await.is_err() {
                    let _ = stop_tx.send(true);
                    return DirEnd::WriteError;
                }
                if step.eos {
                    let _ = up_w.shutdown().await;
                    return DirEnd::Eof;
                }
            }
        }
    };
    let upstream_to_downstream = {
        let chain = chain.clone();
        let stop_tx = stop_tx.clone();
        let mut stop = stop_rx.clone();
        let (seq, our_shutdown_at) = (&seq, &our_shutdown_at);
        async move {
            let mut buf = vec![0u8; READ_CHUNK];
            let end = loop {
                let read = tokio::select! {
                    r = read_event(&mut up_r, &mut buf) => r,
                    _ = stop.wait_for(|s| *s) => break DirEnd::Close,
                };
                let Some((data, eos)) = read else {
                    // An upstream reset: tcp_proxy closes the downstream connection.
                    let _ = stop_tx.send(true);
                    break DirEnd::ReadError;
                };
                let step = chain.borrow_mut().upstream(data, eos);
                if step.close.is_some() {
                    let _ = stop_tx.send(true);
                    break DirEnd::Close;
                }
                if !step.out.is_empty() && down_w.write_all(&step.out).await.is_err() {
                    let _ = stop_tx.send(true);
                    break DirEnd::WriteError;
                }
                if eos {
                    if !step.eos {
                        break DirEnd::Held;
                    }
                    let _ = down_w.shutdown().await;
                    seq.set(seq.get() + 1);
                    our_shutdown_at.set(seq.get());
                    break DirEnd::Eof;
                }
            };
            let _ = up_done_tx.send(true);
            (end, down_w)
        }
    };
    // Stops both directions when the data plane stops; never ends by itself.
    let stopper = async move {
        stopped.await;
        let _ = stop_tx.send(true);
        std::future::pending::<std::convert::Infallible>().await
    };
    let both = async { tokio::join!(downstream_to_upstream, upstream_to_downstream) };
    let (down_end, (up_end, mut down_w)) = tokio::select! {
        ends = both => ends,
        never = stopper => match never {},
    };
    let peer = match (down_end, up_end) {
        (DirEnd::Eof, DirEnd::Eof) if client_eof_at.get() > our_shutdown_at.get() => {
            PeerType::Remote
        }
        (DirEnd::Eof, DirEnd::Eof) => PeerType::Local,
        // The client reset or went away while we wrote to it.
        (DirEnd::ReadError, _) | (_, DirEnd::WriteError) => PeerType::Remote,
        _ => PeerType::Local,
    };
    // Closing is what the peer sees first; the plugins hear of it after, as in Envoy.
    let _ = down_w.shutdown().await;
    drop(down_w);
    chain.borrow_mut().end(peer);
}

/// Facts the plugins of one connection see as properties.
pub(crate) fn properties(
    source: SocketAddr,
    destination: SocketAddr,
    connection_id: u64,
    node_id: &str,
    cluster_name: String,
    route_name: String,
) -> StreamProperties {
    StreamProperties {
        source: Some(source),
        destination: Some(destination),
        connection_id,
        start_time: Some(std::time::SystemTime::now()),
        node_id: node_id.into(),
        cluster_name: cluster_name.into(),
        route_name: route_name.into(),
        ..Default::default()
    }
}
