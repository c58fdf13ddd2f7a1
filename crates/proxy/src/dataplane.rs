//! Listeners and the atomic configuration swap.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use waystone_model::snapshot::ObjectKey;

use crate::handler::{self, ConnInfo, Entry, HandlerSettings};
use crate::head_timeout::{HeadWatch, WatchedBody, WatchedIo};
use crate::metrics::{InstanceStats, LabelTable};
use crate::observe::Observer;
use crate::runtime::{PluginSlot, RuntimeConfig, WorkerConfig};
use crate::worker::{self, Workers};

#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    pub workers: usize,
    /// Where gateway listeners bind first; on loopback, a gateway whose ports
    /// are taken there moves to the next loopback address.
    pub gateway_address: IpAddr,
    /// The local mesh entry listener (`None`: no entry listener).
    pub entry_address: Option<SocketAddr>,
    /// Largest body buffered for plugins that read bodies.
    pub max_buffered_body: usize,
    pub node_id: String,
    /// HBONE on waypoint listeners, to endpoints and from the mesh entry (`None`: plain HTTP).
    pub hbone: Option<crate::hbone::HboneConfig>,
    /// Access logs and tracing.
    pub observability: crate::observe::ObservabilityConfig,
    /// How long an HTTP/1.1 head waits for a stalled body while its trailers are not known yet
    /// (see `stream.rs`).
    pub trailer_wait: std::time::Duration,
    /// How long an idle HTTP/1.1 connection (accepted, or its last response over) may take to
    /// send a complete request head before it is closed (`head_timeout.rs`).
    pub head_timeout: std::time::Duration,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            gateway_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            entry_address: Some(SocketAddr::from(([127, 0, 0, 1], 15001))),
            max_buffered_body: 16 << 20,
            node_id: "waystone".into(),
            hbone: None,
            observability: Default::default(),
            trailer_wait: crate::stream::HEAD_STALL,
            head_timeout: crate::head_timeout::HEAD_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
    #[error("cannot start observability: {0}")]
    Observability(String),
    #[error("cannot bind the mesh entry listener on {addr}: {source}")]
    Entry {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Where one gateway's listeners ended up.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayBinding {
    pub address: IpAddr,
    pub listeners: Vec<ListenerBinding>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerBinding {
    pub name: String,
    pub port: u16,
    /// The bound address, or why it could not be bound.
    pub result: Result<SocketAddr, String>,
}

struct Bound {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// The accept loop: awaited on close so the socket is gone when `apply` returns.
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ListenerKey {
    gateway: ObjectKey,
    name: String,
    port: u16,
}

struct Shared {
    config: ArcSwap<RuntimeConfig>,
    settings: HandlerSettings,
    workers: Workers,
    /// 0 running, 1 draining (finish in-flight requests, close idle connections).
    drain: watch::Sender<u8>,
    connections: AtomicU64,
    hbone: Option<HboneShared>,
    head_timeout: std::time::Duration,
}

struct HboneShared {
    inbound: Option<Arc<crate::hbone::server::Inbound>>,
    entry: bool,
    waypoints: crate::hbone::entry::WaypointListeners,
}

pub struct DataPlane {
    shared: Arc<Shared>,
    cfg: DataPlaneConfig,
    listeners: std::sync::Mutex<BTreeMap<ListenerKey, Bound>>,
    addresses: std::sync::Mutex<BTreeMap<ObjectKey, IpAddr>>,
    entry: Option<Bound>,
}

impl DataPlane {
    /// Starts the workers and the mesh entry listener. Must run inside a tokio runtime.
    pub async fn start(cfg: DataPlaneConfig) -> Result<Self, DataPlaneError> {
        let workers = Workers::start(cfg.workers).map_err(DataPlaneError::Workers)?;
        let (drain, _) = watch::channel(0u8);
        let observer = Observer::new(&cfg.observability).map_err(DataPlaneError::Observability)?;
        let shared = Arc::new(Shared {
            config: ArcSwap::from_pointee(RuntimeConfig::empty()),
            settings: HandlerSettings {
                max_buffered_body: cfg.max_buffered_body,
                trailer_wait: cfg.trailer_wait,
                node_id: cfg.node_id.as_str().into(),
                observer: Arc::new(observer),
            },
            workers,
            drain,
            connections: AtomicU64::new(0),
            head_timeout: cfg.head_timeout,
            hbone: cfg.hbone.as_ref().map(|h| HboneShared {
                inbound: h.inbound.then(|| {
                    Arc::new(crate::hbone::server::Inbound::new(
                        h.identity.clone(),
                        cfg.node_id.clone(),
                    ))
                }),
                entry: h.entry,
                waypoints: Default::default(),
            }),
        });
        if let Some(h) = &cfg.hbone {
            let (identity, routes) = (h.identity.clone(), h.outbound.clone());
            // Installed synchronously when the worker takes the job, so before any
            // connection job queued after it.
            shared.workers.broadcast(|| {
                let (identity, routes) = (identity.clone(), routes.clone());
                Box::new(move || {
                    crate::hbone::client::install(Arc::new(crate::hbone::client::WorkerOutbound {
                        client: crate::hbone::HboneClient::new(identity),
                        routes,
                    }));
                    Box::pin(async {})
                })
            });
        }
        let entry = match cfg.entry_address {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| DataPlaneError::Entry { addr, source })?;
                Some(spawn_accept(shared.clone(), listener, Entry::Mesh))
            }
            None => None,
        };
        if let Some(e) = &entry {
            tracing::info!(address = %e.addr, "mesh entry listening");
        }
        Ok(Self {
            shared,
            cfg,
            listeners: Default::default(),
            addresses: Default::default(),
            entry,
        })
    }

    pub fn entry_address(&self) -> Option<SocketAddr> {
        self.entry.as_ref().map(|b| b.addr)
    }

    pub fn current(&self) -> Arc<RuntimeConfig> {
        self.shared.config.load_full()
    }

    /// Swaps in `rt` (requests already running finish on the config they
    /// started with), then opens the listeners it needs and closes the rest.
    pub async fn apply(&self, rt: RuntimeConfig) -> BTreeMap<ObjectKey, GatewayBinding> {
        let live: HashSet<u64> = rt
            .plugins
            .values()
            .filter_map(|s| match s {
                PluginSlot::Ready(p) => Some(p.revision),
                PluginSlot::Failed { .. } => None,
            })
            .collect();
        let snapshot = rt.snapshot.clone();
        // Labels first: a request on the new config then finds its label set.
        self.shared
            .settings
            .observer
            .labels
            .store(Arc::new(LabelTable::build(&snapshot)));
        self.shared.config.store(Arc::new(rt));
        let live = Arc::new(live);
        self.shared.workers.broadcast(|| {
            let live = live.clone();
            Box::new(move || {
                Box::pin(async move {
                    // Nothing of the old config stays alive on a worker that sees no more
                    // requests.
                    forget_worker_config();
                    worker::retain_instances(&live)
                })
            })
        });

        let mut bindings = BTreeMap::new();
        let mut wanted = HashSet::new();
        for gw in &snapshot.gateways {
            let ports: Vec<(String, u16, String)> = gw
                .listeners
                .iter()
                .map(|l| (l.name.clone(), l.port, l.protocol.clone()))
                .collect();
            for (name, port, _) in &ports {
                wanted.insert(ListenerKey {
                    gateway: gw.key.clone(),
                    name: name.clone(),
                    port: *port,
                });
            }
            bindings.insert(gw.key.clone(), self.bind_gateway(&gw.key, &ports).await);
        }
        let closed: Vec<Bound> = {
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<ListenerKey> = listeners
                .keys()
                .filter(|k| !wanted.contains(*k))
                .cloned()
                .collect();
            gone.into_iter()
                .filter_map(|key| {
                    let bound = listeners.remove(&key)?;
                    tracing::info!(gateway = %key.gateway, listener = %key.name, address = %bound.addr, "closing listener");
                    if let Some(h) = &self.shared.hbone {
                        h.waypoints.remove(&key.gateway, bound.addr);
                    }
                    Some(bound)
                })
                .collect()
        };
        for bound in closed {
            let _ = bound.stop.send(true);
            let _ = bound.task.await;
        }
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        addresses.retain(|gw, _| snapshot.gateway(gw).is_some());
        bindings
    }

    async fn bind_gateway(
        &self,
        gateway: &ObjectKey,
        ports: &[(String, u16, String)],
    ) -> GatewayBinding {
        let existing: Vec<(ListenerKey, SocketAddr)> = {
            let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            listeners
                .iter()
                .filter(|(k, _)| &k.gateway == gateway)
                .map(|(k, b)| (k.clone(), b.addr))
                .collect()
        };
        let known = self
            .addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(gateway)
            .copied();
        let candidates: Vec<IpAddr> = match known {
            Some(ip) => vec![ip],
            None => self.candidate_addresses(),
        };
        let mut last = None;
        for ip in candidates {
            if known.is_none() && self.address_taken(ip, gateway) {
                continue;
            }
            let mut results = Vec::new();
            let mut fresh = Vec::new();
            let mut conflict = false;
            for (name, port, protocol) in ports {
                let key = ListenerKey {
                    gateway: gateway.clone(),
                    name: name.clone(),
                    port: *port,
                };
                if let Some((_, addr)) = existing.iter().find(|(k, _)| k == &key) {
                    results.push(ListenerBinding {
                        name: name.clone(),
                        port: *port,
                        result: Ok(*addr),
                    });
                    continue;
                }
                if !matches!(protocol.as_str(), "HTTP" | "HBONE" | "TCP") {
                    results.push(ListenerBinding {
                        name: name.clone(),
                        port: *port,
                        result: Err(format!(
                            "protocol {protocol} is not supported yet (HTTP, HBONE and TCP are)"
                        )),
                    });
                    continue;
                }
                match TcpListener::bind(SocketAddr::new(ip, *port)).await {
                    Ok(l) => {
                        let addr = l.local_addr().unwrap_or(SocketAddr::new(ip, *port));
                        fresh.push((key, l));
                        results.push(ListenerBinding {
                            name: name.clone(),
                            port: *port,
                            result: Ok(addr),
                        });
                    }
                    Err(e) => {
                        if e.kind() == std::io::ErrorKind::AddrInUse && known.is_none() {
                            conflict = true;
                        }
                        results.push(ListenerBinding {
                            name: name.clone(),
                            port: *port,
                            result: Err(format!("cannot bind {}: {e}", SocketAddr::new(ip, *port))),
                        });
                    }
                }
            }
            if conflict {
                // Another process holds one of these ports here: try the next address.
                last = Some(GatewayBinding {
                    address: ip,
                    listeners: results,
                });
                continue;
            }
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            for (key, l) in fresh {
                let entry = Entry::Gateway {
                    gateway: key.gateway.clone(),
                    listener: key.name.clone(),
                };
                let bound = spawn_accept(self.shared.clone(), l, entry);
                tracing::info!(gateway = %gateway, listener = %key.name, address = %bound.addr, "listening");
                if let Some(h) = &self.shared.hbone
                    && ports.iter().any(|(n, _, p)| n == &key.name && p == "HBONE")
                {
                    h.waypoints.set(key.gateway.clone(), bound.addr);
                }
                listeners.insert(key, bound);
            }
            self.addresses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(gateway.clone(), ip);
            return GatewayBinding {
                address: ip,
                listeners: results,
            };
        }
        last.unwrap_or(GatewayBinding {
            address: self.cfg.gateway_address,
            listeners: ports
                .iter()
                .map(|(name, port, _)| ListenerBinding {
                    name: name.clone(),
                    port: *port,
                    result: Err("no free address for this gateway".into()),
                })
                .collect(),
        })
    }

    /// The configured address, then (on IPv4 loopback) the next addresses of 127.0.0.0/8.
    fn candidate_addresses(&self) -> Vec<IpAddr> {
        let base = self.cfg.gateway_address;
        let mut out = vec![base];
        if let IpAddr::V4(v4) = base
            && v4.is_loopback()
        {
            let [a, b, c, d] = v4.octets();
            for i in 1..=64u8 {
                let Some(last) = d.checked_add(i) else { break };
                if last == 255 {
                    break;
                }
                out.push(IpAddr::V4(Ipv4Addr::new(a, b, c, last)));
            }
        }
        out
    }

    /// True when another gateway of this process already uses `ip`.
    fn address_taken(&self, ip: IpAddr, gateway: &ObjectKey) -> bool {
        self.addresses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(g, a)| *a == ip && g != gateway)
    }

    /// Every bound gateway/waypoint listener: (gateway, listener name, port) → address.
    pub fn listener_addresses(&self) -> BTreeMap<(ObjectKey, String, u16), SocketAddr> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, b)| ((k.gateway.clone(), k.name.clone(), k.port), b.addr))
            .collect()
    }

    /// Live plugin instances of every worker (one entry per instance), asked of each worker
    /// on its own thread; a worker that does not answer within a second is left out.
    pub async fn plugin_instances(&self) -> Vec<InstanceStats> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.shared.workers.broadcast(|| {
            let tx = tx.clone();
            Box::new(move || {
                Box::pin(async move {
                    let _ = tx.send(worker::instance_stats());
                })
            })
        });
        drop(tx);
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while let Ok(Some(stats)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            out.extend(stats);
        }
        out
    }

    /// Stops accepting, lets in-flight requests finish for up to `grace`, then stops the workers.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        if let Some(e) = &self.entry {
            let _ = e.stop.send(true);
        }
        for bound in self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let _ = bound.stop.send(true);
        }
        let _ = self.shared.drain.send(1);
        let deadline = tokio::time::Instant::now() + grace;
        while self.shared.connections.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = self.shared.drain.send(2);
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.workers.stop()).await;
    }
}

fn spawn_accept(shared: Arc<Shared>, listener: TcpListener, entry: Entry) -> Bound {
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let (stop, mut stopped) = watch::channel(false);
    let entry = Arc::new(entry);
    let task = tokio::spawn(async move {
        static CONN_IDS: AtomicU64 = AtomicU64::new(1);
        loop {
            let accepted = tokio::select! {
                _ = stopped.changed() => break,
                a = listener.accept() => a,
            };
            let (socket, peer) = match accepted {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(address = %addr, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(std_socket) = socket.into_std() else {
                continue;
            };
            let conn = ConnInfo {
                peer,
                local: addr,
                id: CONN_IDS.fetch_add(1, Ordering::Relaxed),
            };
            let shared2 = shared.clone();
            let entry = entry.clone();
            shared.connections.fetch_add(1, Ordering::AcqRel);
            shared.workers.dispatch(Box::new(move || {
                Box::pin(serve_connection(shared2, std_socket, conn, entry))
            }));
        }
    });
    Bound { addr, stop, task }
}

async fn serve_connection(
    shared: Arc<Shared>,
    socket: std::net::TcpStream,
    conn: ConnInfo,
    entry: Arc<Entry>,
) {
    struct Done(Arc<Shared>);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.connections.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _done = Done(shared.clone());
    let socket = match socket
        .set_nonblocking(true)
        .and_then(|_| tokio::net::TcpStream::from_std(socket))
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot adopt accepted socket");
            return;
        }
    };
    let _ = socket.set_nodelay(true);
    if let Entry::Gateway { gateway, listener } = &*entry
        && is_tcp_listener(&shared, gateway, listener)
    {
        let drain = shared.drain.subscribe();
        serve_tcp(&shared, socket, conn, gateway, listener, drain).await;
        return;
    }
    if let Some((inbound, waypoint)) = hbone_listener(&shared, &entry) {
        let (handle_shared, config_shared) = (shared.clone(), shared.clone());
        let handle: crate::hbone::server::HandleFn = std::rc::Rc::new(move |req| {
            let (shared, entry) = (handle_shared.clone(), entry.clone());
            Box::pin(async move {
                let rt = worker_config(&shared.config);
                handler::handle(req, &entry, conn, rt, &shared.settings).await
            })
        });
        let config = std::rc::Rc::new(move || config_shared.config.load_full());
        let drain = shared.drain.subscribe();
        crate::hbone::server::serve(socket, conn, inbound, waypoint, config, handle, drain).await;
        return;
    }
    // Watched for the request-head timeout until the connection ends (with the service).
    let registered = HeadWatch::register(shared.head_timeout);
    let watch = registered.watch().clone();
    // One `Rc` clone per request instead of two `Arc` clones: the counts of `Shared` and of the
    // listener's `Entry` are touched by every worker, so each clone and drop would move their
    // cache line between cores.
    let service_ctx = std::rc::Rc::new((shared.clone(), entry, registered));
    let service = service_fn(move |req| {
        let ctx = service_ctx.clone();
        async move {
            let (shared, entry) = (&ctx.0, &*ctx.1);
            // Busy until hyper drops the response body: no head is due meanwhile.
            let in_flight = ctx.2.watch().begin();
            let rt = worker_config(&shared.config);
            if let (Entry::Mesh, Some(h)) = (entry, &shared.hbone)
                && h.entry
                && let Some((tunnel, dest)) =
                    crate::hbone::entry::tunnel_target(&rt, &h.waypoints, &req)
            {
                let response = crate::hbone::entry::forward(req, conn, tunnel, dest).await;
                return Ok(response.map(|b| WatchedBody::new(b, in_flight)));
            }
            handler::into_service_result(
                handler::handle(req, entry, conn, rt, &shared.settings).await,
            )
            .map(|r| r.map(|b| WatchedBody::new(b, in_flight)))
        }
    });
    let mut builder = auto::Builder::new(LocalExec);
    // Limits on what a client may make the proxy hold: a request head larger than the
    // buffer or with more headers is answered 431 and the connection closed; an h2 header
    // list over the limit resets the stream; the stream cap bounds one h2 connection's work.
    // The request-head timeout is `head_timeout.rs`'s, not hyper's per-request timer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_REQUEST_HEAD)
        .max_headers(MAX_REQUEST_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_REQUEST_HEAD as u32)
        .max_concurrent_streams(MAX_H2_STREAMS);
    let connection = builder.serve_connection(TokioIo::new(WatchedIo::new(socket, watch)), service);
    tokio::pin!(connection);
    let mut drain = shared.drain.subscribe();
    loop {
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                }
                return;
            }
            changed = drain.changed() => {
                match (changed, *drain.borrow()) {
                    (Ok(()), 1) => connection.as_mut().graceful_shutdown(),
                    _ => return,
                }
            }
        }
    }
}

/// An ingress gateway's listener of protocol `TCP`: its connections are relayed as bytes.
fn is_tcp_listener(shared: &Shared, gateway: &ObjectKey, listener: &str) -> bool {
    let rt = shared.config.load();
    rt.snapshot.gateway(gateway).is_some_and(|gw| {
        gw.role == waystone_model::snapshot::GatewayRole::Ingress
            && gw
                .listeners
                .iter()
                .any(|l| l.name == listener && l.is_tcp())
    })
}

/// One connection on a `TCP` listener: the listener's NETWORK plugins, then the bytes to an
/// endpoint of the first TCPRoute backend (Envoy's wasm network filter before `tcp_proxy`).
async fn serve_tcp(
    shared: &Shared,
    socket: tokio::net::TcpStream,
    conn: ConnInfo,
    gateway: &ObjectKey,
    listener: &str,
    drain: watch::Receiver<u8>,
) {
    let rt = shared.config.load_full();
    let Some(l) = rt
        .snapshot
        .gateway(gateway)
        .and_then(|gw| gw.listeners.iter().find(|l| l.name == listener))
    else {
        return;
    };
    let target = l
        .tcp_routes
        .iter()
        .find(|r| !r.backends.is_empty())
        .and_then(|route| {
            let backend = crate::routing::pick_backend_here(&route.backends)?;
            let service = rt.snapshot.service(&backend.service)?;
            let port = service.ports.iter().find(|p| p.port == backend.port)?;
            Some((route, service, port))
        });
    let (cluster_name, route_name) = match &target {
        Some((route, service, port)) => (
            format!(
                "outbound|{}||{}.{}.svc.cluster.local",
                port.port, service.key.name, service.key.namespace
            ),
            format!("{}/{}", route.route, route.rule_index),
        ),
        None => (String::new(), String::new()),
    };
    let props = crate::tcp::properties(
        conn.peer,
        conn.local,
        conn.id,
        &shared.settings.node_id,
        cluster_name,
        route_name,
    );
    let (mut chain, closed) = crate::tcp::L4Chain::start(&l.chain, &rt, props);
    if closed.is_some() {
        drop(socket);
        chain.end(waystone_wasm::PeerType::Local);
        return;
    }
    let endpoint = target.and_then(|(_, _, port)| crate::routing::pick_endpoint_here(port));
    // Runs once the plugins let the connection through (a plugin may hold its new
    // connection until its root context resumes it).
    let connect = || async move {
        let Some(endpoint) = endpoint else {
            tracing::debug!(gateway = %gateway, listener, "TCP listener: no route or no healthy endpoint");
            return None;
        };
        match crate::hbone::client::connect_endpoint(endpoint, None).await {
            Ok(up) => Some((endpoint, up)),
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "TCP listener: upstream connect failed");
                None
            }
        }
    };
    crate::tcp::serve(socket, chain, connect, Some(drain)).await;
}

/// The HBONE server and waypoint for a connection on a waypoint listener of protocol HBONE,
/// when the data plane terminates HBONE; `None` serves plain HTTP/h2c.
fn hbone_listener(
    shared: &Shared,
    entry: &Entry,
) -> Option<(Arc<crate::hbone::server::Inbound>, ObjectKey)> {
    let inbound = shared.hbone.as_ref()?.inbound.clone()?;
    let Entry::Gateway { gateway, listener } = entry else {
        return None;
    };
    let rt = shared.config.load();
    let gw = rt.snapshot.gateway(gateway)?;
    let is_hbone = matches!(
        gw.role,
        waystone_model::snapshot::GatewayRole::Waypoint { .. }
    ) && gw
        .listeners
        .iter()
        .any(|l| &l.name == listener && l.protocol == "HBONE");
    is_hbone.then(|| (inbound, gateway.clone()))
}

/// Largest request head (HTTP/1 read buffer, h2 header list) a client may send.
pub const MAX_REQUEST_HEAD: usize = 64 << 10;
/// Most header fields in one HTTP/1 request.
pub const MAX_REQUEST_HEADERS: usize = 100;
/// Most concurrent streams on one h2 connection.
pub const MAX_H2_STREAMS: u32 = 256;

/// Runs hyper's connection tasks (h2 streams) on the worker's own thread.
#[derive(Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

thread_local! {
    /// This worker's handle on the current runtime config ([`worker_config`]).
    static WORKER_CONFIG: std::cell::RefCell<Option<std::rc::Rc<WorkerConfig>>> =
        const { std::cell::RefCell::new(None) };
}

/// The current runtime config, as an `Rc` this worker's requests share while the config
/// stays. `ArcSwap::load_full` on every request incremented and decremented the config's
/// reference count, which every worker writes, so the cache line moved between cores twice a
/// request; `load` only reads the shared pointer (and writes this thread's own debt slot).
fn worker_config(config: &ArcSwap<RuntimeConfig>) -> std::rc::Rc<WorkerConfig> {
    let now = config.load();
    WORKER_CONFIG.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(rc) = &*c
            && Arc::ptr_eq(&rc.0, &now)
        {
            return rc.clone();
        }
        let rc = std::rc::Rc::new(WorkerConfig(arc_swap::Guard::into_inner(now)));
        *c = Some(rc.clone());
        rc
    })
}

/// Drops this worker's handle on the config (run on each worker after a swap).
fn forget_worker_config() {
    WORKER_CONFIG.with(|c| c.borrow_mut().take());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_shares_one_handle_per_config_and_lets_go_of_it() {
        let config = ArcSwap::from_pointee(RuntimeConfig::empty());
        let first = worker_config(&config);
        assert!(std::rc::Rc::ptr_eq(&first, &worker_config(&config)));
        assert!(Arc::ptr_eq(&first.0, &config.load_full()));

        config.store(Arc::new(RuntimeConfig::empty()));
        let second = worker_config(&config);
        assert!(
            !Arc::ptr_eq(&first.0, &second.0),
            "a swap is seen at the next request"
        );
        assert!(Arc::ptr_eq(&second.0, &config.load_full()));

        // The old config lives only as long as the requests holding it; after the swap's
        // hook, the worker holds no config either.
        let old = Arc::downgrade(&first.0);
        drop(first);
        assert!(old.upgrade().is_none());
        let current = Arc::downgrade(&second.0);
        drop(second);
        forget_worker_config();
        config.store(Arc::new(RuntimeConfig::empty()));
        assert!(current.upgrade().is_none());
    }
}
