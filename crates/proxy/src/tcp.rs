//! L4 (`type: NETWORK`) plugins on relayed TCP connections: gateway listeners of protocol
//! `TCP` (TCPRoute backends) and the waypoint's HBONE relay for TCP service ports.
//!
//! Semantics follow Envoy's network Wasm filter in front of `tcp_proxy`:
//! - `proxy_on_new_connection` once per plugin, in chain order, before the upstream connect;
//! - `proxy_on_downstream_data(size, eos)` per read, in chain order; a Pause keeps the bytes
//!   at that plugin, and its next call sees them with what arrived since (buffer 2);
//! - `proxy_on_upstream_data(size, eos)` per upstream read, last plugin first (Envoy runs
//!   write filters in reverse); at upstream end of stream each plugin also gets
//!   `proxy_on_upstream_connection_close(Unknown)` right after it, as Envoy does (it has no
//!   upstream connection event to report);
//! - `proxy_on_downstream_connection_close(peer)`: `Remote` when the client's end is what
//!   closed the connection, `Local` when the proxy closed it (a plugin's
//!   `proxy_close_stream`, a fail-closed fault, an upstream failure, our half-close last);
//! - then `proxy_on_done`, `proxy_on_log`, `proxy_on_delete` per plugin.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use waystone_model::snapshot::{FailStrategy, PluginId};
use waystone_wasm::{Action, HostError, NetworkStream, PeerType, StreamProperties};

use crate::metrics::{self, CallOutcome, Callback};
use crate::runtime::{LoadedPlugin, PluginSlot, RuntimeConfig};
use crate::worker::{self, SharedInstance};

const READ_CHUNK: usize = 16 << 10;

struct Filter {
    plugin: Arc<LoadedPlugin>,
    instance: SharedInstance,
    ctx: u32,
    /// FAIL_OPEN after a fault: bytes pass it untouched and it gets no more callbacks.
    bypassed: bool,
    /// Bytes this plugin paused on, handed back with the next read (buffer 2 / 3).
    held_down: Vec<u8>,
    held_up: Vec<u8>,
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
struct Step {
    out: Vec<u8>,
    /// The end of stream passed every plugin (none paused on it).
    eos: bool,
    close: Option<CloseReason>,
}

/// The NETWORK plugins of one connection, with their contexts.
pub(crate) struct L4Chain {
    filters: Vec<Filter>,
    conn: NetworkStream,
}

impl L4Chain {
    /// Creates a context per plugin and runs `proxy_on_new_connection` in chain order. `Err`:
    /// the connection must be closed at once (a fail-closed plugin could not run, or a plugin
    /// closed it); contexts already created are ended by [`L4Chain::end`].
    pub(crate) fn start(
        chain: &[PluginId],
        rt: &RuntimeConfig,
        properties: StreamProperties,
    ) -> (Self, Option<CloseReason>) {
        let mut this = Self {
            filters: Vec::new(),
            conn: NetworkStream {
                properties,
                ..Default::default()
            },
        };
        for id in chain {
            let plugin = match rt.plugins.get(id) {
                Some(PluginSlot::Ready(p)) => p.clone(),
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
            let instance = match worker::instance_for(&plugin) {
                Ok(i) => i,
                Err(err) => match fails_closed(&plugin, &err) {
                    true => return (this, Some(CloseReason::Fault)),
                    false => continue,
                },
            };
            let started = Instant::now();
            let created = instance.borrow_mut().create_network_context();
            record(
                &plugin,
                Callback::ContextCreate,
                &created.as_ref().map(|_| false),
                started,
            );
            let ctx = match created {
                Ok(ctx) => ctx,
                Err(err) => {
                    discard_if_poisoned(&plugin, &instance);
                    match fails_closed(&plugin, &err) {
                        true => return (this, Some(CloseReason::Fault)),
                        false => continue,
                    }
                }
            };
            this.filters.push(Filter {
                plugin,
                instance,
                ctx,
                bypassed: false,
                held_down: Vec::new(),
                held_up: Vec::new(),
            });
            let idx = this.filters.len() - 1;
            let started = Instant::now();
            let result = {
                let f = &this.filters[idx];
                f.instance
                    .borrow_mut()
                    .on_new_connection(f.ctx, &mut this.conn)
            };
            // A Pause here would hold the upstream connect until the plugin resumes reading,
            // which only a callout or timer could do: the connection proceeds (documented).
            if let Some(reason) = this.settle(idx, Callback::NewConnection, result, started) {
                return (this, Some(reason));
            }
        }
        (this, None)
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
        match result {
            Ok(action) => {
                let outcome = if close {
                    CallOutcome::Close
                } else if action == Action::Pause {
                    CallOutcome::Pause
                } else {
                    CallOutcome::Continue
                };
                metrics::record_plugin_call(
                    f.plugin.revision,
                    &f.plugin.spec.name,
                    callback,
                    outcome,
                    started.elapsed(),
                );
                close.then_some(CloseReason::Plugin)
            }
            Err(err) => {
                metrics::record_plugin_call(
                    f.plugin.revision,
                    &f.plugin.spec.name,
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

    /// Runs a downstream read (or its end) through the plugins in chain order.
    fn downstream(&mut self, data: Vec<u8>, eos: bool) -> Step {
        let order: Vec<usize> = (0..self.filters.len()).collect();
        self.direction(&order, data, eos, true)
    }

    /// Runs an upstream read (or its end) through the plugins, last first.
    fn upstream(&mut self, data: Vec<u8>, eos: bool) -> Step {
        let order: Vec<usize> = (0..self.filters.len()).rev().collect();
        self.direction(&order, data, eos, false)
    }

    fn direction(&mut self, order: &[usize], data: Vec<u8>, eos: bool, down: bool) -> Step {
        let mut carry = data;
        for &idx in order {
            if self.filters[idx].bypassed {
                continue;
            }
            if carry.is_empty() && !eos {
                break;
            }
            let f = &mut self.filters[idx];
            let held = if down {
                &mut f.held_down
            } else {
                &mut f.held_up
            };
            held.extend_from_slice(&carry);
            let buffer = std::mem::take(held);
            let started = Instant::now();
            let result = {
                let mut inst = f.instance.borrow_mut();
                if down {
                    self.conn.downstream_data = buffer;
                    inst.on_downstream_data(f.ctx, &mut self.conn, eos)
                } else {
                    self.conn.upstream_data = buffer;
                    inst.on_upstream_data(f.ctx, &mut self.conn, eos)
                }
            };
            let buffer = std::mem::take(if down {
                &mut self.conn.downstream_data
            } else {
                &mut self.conn.upstream_data
            });
            let paused = matches!(result, Ok(Action::Pause));
            let callback = if down {
                Callback::DownstreamData
            } else {
                Callback::UpstreamData
            };
            let faulted = result.is_err();
            let close = self.settle(idx, callback, result, started);
            if !down && eos && !faulted {
                self.upstream_closed(idx);
            }
            if let Some(reason) = close {
                return Step {
                    out: Vec::new(),
                    eos: false,
                    close: Some(reason),
                };
            }
            if paused && !faulted {
                let f = &mut self.filters[idx];
                *(if down {
                    &mut f.held_down
                } else {
                    &mut f.held_up
                }) = buffer;
                // Held at this plugin, end of stream included, as Envoy's StopIteration.
                return Step {
                    out: Vec::new(),
                    eos: false,
                    close: None,
                };
            }
            carry = buffer;
        }
        Step {
            out: carry,
            eos,
            close: None,
        }
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
            &f.plugin,
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

    /// The downstream connection closed: `proxy_on_downstream_connection_close(peer)` for every
    /// plugin, then `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub(crate) fn end(&mut self, peer: PeerType) {
        for idx in 0..self.filters.len() {
            let f = &mut self.filters[idx];
            if f.bypassed {
                continue;
            }
            let started = Instant::now();
            let result =
                f.instance
                    .borrow_mut()
                    .on_downstream_connection_close(f.ctx, peer, &mut self.conn);
            self.settle_close(idx, result, started);
        }
        self.conn.close_requested = None;
        for f in &self.filters {
            if f.bypassed {
                continue;
            }
            let started = Instant::now();
            let result = f
                .instance
                .borrow_mut()
                .finish_network_context(f.ctx, &mut self.conn);
            record(
                &f.plugin,
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
    plugin: &LoadedPlugin,
    callback: Callback,
    result: &Result<bool, &HostError>,
    started: Instant,
) {
    let outcome = CallOutcome::of(&result.map(|_| ()), matches!(result, Ok(true)), None);
    metrics::record_plugin_call(
        plugin.revision,
        &plugin.spec.name,
        callback,
        outcome,
        started.elapsed(),
    );
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

/// Relays bytes between `downstream` and the already connected `upstream` through `chain`
/// until the connection is over, then ends the chain's contexts. Runs on a worker.
/// A data-plane drain to 2 (stop) closes the connection.
pub(crate) async fn relay<D, U>(
    downstream: D,
    upstream: U,
    chain: L4Chain,
    drain: Option<tokio::sync::watch::Receiver<u8>>,
) where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let chain = Rc::new(RefCell::new(chain));
    let (mut down_r, mut down_w) = tokio::io::split(downstream);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Order of the two events that close the downstream connection normally: whichever
    // comes last decides the peer type Envoy reports.
    let seq = std::cell::Cell::new(0u32);
    let client_eof_at = std::cell::Cell::new(0u32);
    let our_shutdown_at = std::cell::Cell::new(0u32);

    let downstream_to_upstream = {
        let chain = chain.clone();
        let stop_tx = stop_tx.clone();
        let mut stop = stop_rx.clone();
        let (seq, client_eof_at) = (&seq, &client_eof_at);
        async move {
            let mut buf = vec![0u8; READ_CHUNK];
            loop {
                let read = tokio::select! {
                    r = down_r.read(&mut buf) => r,
                    _ = stop.wait_for(|s| *s) => return DirEnd::Close,
                };
                let (data, eos) = match read {
                    Ok(0) => {
                        seq.set(seq.get() + 1);
                        client_eof_at.set(seq.get());
                        (Vec::new(), true)
                    }
                    Ok(n) => (buf[..n].to_vec(), false),
                    Err(_) => {
                        let _ = stop_tx.send(true);
                        return DirEnd::ReadError;
                    }
                };
                let step = chain.borrow_mut().downstream(data, eos);
                if step.close.is_some() {
                    let _ = stop_tx.send(true);
                    return DirEnd::Close;
                }
                if !step.out.is_empty() && up_w.write_all(&step.out).await.is_err() {
                    let _ = stop_tx.send(true);
                    return DirEnd::WriteError;
                }
                if eos {
                    if !step.eos {
                        return DirEnd::Held;
                    }
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
            loop {
                let read = tokio::select! {
                    r = up_r.read(&mut buf) => r,
                    _ = stop.wait_for(|s| *s) => return (DirEnd::Close, down_w),
                };
                let (data, eos) = match read {
                    Ok(0) => (Vec::new(), true),
                    Ok(n) => (buf[..n].to_vec(), false),
                    Err(_) => {
                        // An upstream reset: tcp_proxy closes the downstream connection.
                        let _ = stop_tx.send(true);
                        return (DirEnd::ReadError, down_w);
                    }
                };
                let step = chain.borrow_mut().upstream(data, eos);
                if step.close.is_some() {
                    let _ = stop_tx.send(true);
                    return (DirEnd::Close, down_w);
                }
                if !step.out.is_empty() && down_w.write_all(&step.out).await.is_err() {
                    let _ = stop_tx.send(true);
                    return (DirEnd::WriteError, down_w);
                }
                if eos {
                    if !step.eos {
                        return (DirEnd::Held, down_w);
                    }
                    let _ = down_w.shutdown().await;
                    seq.set(seq.get() + 1);
                    our_shutdown_at.set(seq.get());
                    return (DirEnd::Eof, down_w);
                }
            }
        }
    };
    // Stops both directions when the data plane stops; never ends by itself.
    let stopper = async move {
        if let Some(mut drain) = drain
            && drain.wait_for(|d| *d >= 2).await.is_ok()
        {
            let _ = stop_tx.send(true);
        }
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
        node_id: node_id.to_string(),
        cluster_name,
        route_name,
        ..Default::default()
    }
}
