//! Inbound HBONE on a waypoint's `mesh` listener: TLS 1.3 with a required SPIFFE client
//! certificate, then HTTP/2 whose streams are `CONNECT <destination>`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;
use waystone_model::snapshot::{ObjectKey, PluginId, PortProtocol};

use super::identity::{Identity, SpiffeId};
use super::{LocalExec, Tunnel, client, with_tunnel};
use crate::handler::{Body, ConnInfo};
use crate::routing;
use crate::runtime::RuntimeConfig;

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a CONNECT stream carries, decided from its destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Plan {
    /// HTTP through the destination port's plugin chain (the shared handler).
    Http,
    /// A TCP port, or an HTTP port without HTTP plugins: bytes relayed to this endpoint,
    /// through the port's NETWORK plugins (if any).
    Tcp(SocketAddr, Vec<PluginId>),
}

/// Decides how the waypoint serves a CONNECT to `authority`, or the status refusing it.
pub(crate) fn plan(
    rt: &RuntimeConfig,
    waypoint: &ObjectKey,
    authority: &str,
) -> Result<Plan, (StatusCode, String)> {
    let snapshot = &rt.snapshot;
    let (service, port) = routing::resolve_service(snapshot, authority, &rt.default_namespace)
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("no service matches {authority:?}"),
            )
        })?;
    let gw = snapshot.gateway(waypoint).ok_or_else(|| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waypoint {waypoint} is being removed"),
        )
    })?;
    let served = gw
        .waypoint_services
        .iter()
        .find(|s| s.service == service.key)
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("service {} does not use waypoint {waypoint}", service.key),
            )
        })?;
    let port_chain = served.ports.iter().find(|p| p.port == port.port);
    if port_chain.is_some_and(|p| p.protocol == PortProtocol::Http && !p.chain.is_empty()) {
        return Ok(Plan::Http);
    }
    let network_chain = port_chain
        .map(|p| p.network_chain.clone())
        .unwrap_or_default();
    routing::pick_endpoint_here(port)
        .map(|endpoint| Plan::Tcp(endpoint, network_chain))
        .ok_or_else(|| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no healthy upstream for {}", service.key),
            )
        })
}

pub(crate) type HandleFn =
    Rc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>>>>>;

/// What one waypoint listener needs to serve HBONE.
pub(crate) struct Inbound {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub identity: Arc<Identity>,
    /// `node.id` for L4 plugins on relayed streams.
    pub node_id: String,
}

impl Inbound {
    pub fn new(identity: Arc<Identity>, node_id: String) -> Self {
        Self {
            acceptor: tokio_rustls::TlsAcceptor::from(identity.server_config()),
            identity,
            node_id,
        }
    }
}

/// Serves one accepted connection on an HBONE listener until it closes or the drain says so.
pub(crate) async fn serve(
    socket: TcpStream,
    conn: ConnInfo,
    inbound: Arc<Inbound>,
    waypoint: ObjectKey,
    config: Rc<dyn Fn() -> Arc<RuntimeConfig>>,
    handle: HandleFn,
    mut drain: watch::Receiver<u8>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.acceptor.accept(socket)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(peer = %conn.peer, error = %e, "HBONE handshake refused");
            return;
        }
        Err(_) => {
            tracing::debug!(peer = %conn.peer, "HBONE handshake timed out");
            return;
        }
    };
    // The verifier already required a SPIFFE identity in our trust domain.
    let Some(peer) = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| SpiffeId::from_cert(c).ok())
    else {
        return;
    };
    let local = inbound.identity.spiffe_id();
    let node_id: Rc<str> = Rc::from(inbound.node_id.as_str());
    let service = service_fn(move |req: Request<Incoming>| {
        let tunnel = Tunnel {
            destination: String::new(),
            peer: peer.clone(),
            local: local.clone(),
            source: forwarded_for(&req).unwrap_or(conn.peer),
        };
        let reply = accept_stream(
            req,
            tunnel,
            conn,
            &waypoint,
            &*config,
            handle.clone(),
            &node_id,
        );
        async move { Ok::<_, std::convert::Infallible>(reply) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(LocalExec);
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(64 << 10);
    let connection = builder.serve_connection(TokioIo::new(tls), service);
    tokio::pin!(connection);
    loop {
        tokio::select! {
            res = connection.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %conn.peer, error = %e, "HBONE connection ended with an error");
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

fn status(code: StatusCode, text: String) -> Response<Body> {
    tracing::debug!(status = code.as_u16(), reason = %text, "HBONE CONNECT refused");
    let mut r = Response::new(
        http_body_util::Full::new(bytes::Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = code;
    r
}

/// Answers one h2 stream: a CONNECT is accepted (200) and its bytes served on a local task.
fn accept_stream(
    req: Request<Incoming>,
    mut tunnel: Tunnel,
    conn: ConnInfo,
    waypoint: &ObjectKey,
    config: &dyn Fn() -> Arc<RuntimeConfig>,
    handle: HandleFn,
    node_id: &Rc<str>,
) -> Response<Body> {
    if req.method() != Method::CONNECT {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "HBONE carries CONNECT only".into(),
        );
    }
    let Some(authority) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return status(StatusCode::BAD_REQUEST, "CONNECT without :authority".into());
    };
    let rt = config();
    let plan = match plan(&rt, waypoint, &authority) {
        Ok(p) => p,
        Err((code, text)) => return status(code, text),
    };
    tunnel.destination = authority;
    let node_id = node_id.clone();
    tokio::task::spawn_local(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(peer = %conn.peer, error = %e, "HBONE stream did not upgrade");
                return;
            }
        };
        match plan {
            Plan::Http => serve_http(upgraded, tunnel, handle).await,
            Plan::Tcp(endpoint, chain) if chain.is_empty() => {
                let mut downstream = TokioIo::new(upgraded);
                match client::connect_endpoint(endpoint, Some(tunnel.source.ip())).await {
                    Ok(mut upstream) => {
                        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
                    }
                    Err(e) => {
                        tracing::debug!(%endpoint, error = %e, "HBONE relay: upstream connect failed")
                    }
                }
            }
            Plan::Tcp(endpoint, chain) => {
                relay_l4(
                    TokioIo::new(upgraded),
                    tunnel,
                    conn,
                    endpoint,
                    &chain,
                    &rt,
                    &node_id,
                )
                .await
            }
        }
    });
    Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    )
}

/// A TCP port's NETWORK plugins on the tunnel's bytes, as a waypoint's Envoy runs them in
/// front of `tcp_proxy`.
async fn relay_l4(
    downstream: TokioIo<hyper::upgrade::Upgraded>,
    tunnel: Tunnel,
    conn: ConnInfo,
    endpoint: SocketAddr,
    chain: &[PluginId],
    rt: &RuntimeConfig,
    node_id: &str,
) {
    // The CONNECT authority is the original destination (service VIP:port); a name stays
    // the listener's own address.
    let destination = tunnel.destination.parse().unwrap_or(conn.local);
    let cluster_name =
        routing::resolve_service(&rt.snapshot, &tunnel.destination, &rt.default_namespace)
            .map(|(service, port)| {
                format!(
                    "outbound|{}||{}.{}.svc.cluster.local",
                    port.port, service.key.name, service.key.namespace
                )
            })
            .unwrap_or_default();
    let mut props = crate::tcp::properties(
        tunnel.source,
        destination,
        conn.id,
        node_id,
        cluster_name,
        String::new(),
    );
    super::annotate_with(&tunnel, &mut props);
    let (mut l4, closed) = crate::tcp::L4Chain::start(chain, rt, props);
    if closed.is_some() {
        drop(downstream);
        l4.end(waystone_wasm::PeerType::Local);
        return;
    }
    let source = tunnel.source.ip();
    let connect = || async move {
        match client::connect_endpoint(endpoint, Some(source)).await {
            Ok(upstream) => Some((endpoint, upstream)),
            Err(e) => {
                tracing::debug!(%endpoint, error = %e, "HBONE relay: upstream connect failed");
                None
            }
        }
    };
    crate::tcp::serve(downstream, l4, connect, None).await;
}

/// The tunnel's inner bytes as HTTP/1.1 or h2c, each request through the shared handler
/// with the tunnel's facts in scope.
async fn serve_http(io: hyper::upgrade::Upgraded, tunnel: Tunnel, handle: HandleFn) {
    let service = service_fn(move |req: Request<Incoming>| {
        let fut = with_tunnel(tunnel.clone(), handle(req));
        async move { crate::handler::into_service_result(fut.await) }
    });
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(30))
        .max_buf_size(64 << 10);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(64 << 10);
    if let Err(e) = builder.serve_connection(io, service).await {
        tracing::debug!(error = %e, "HBONE inner HTTP ended with an error");
    }
}

/// The original client from `forwarded: for=<ip>` (RFC 7239), as ztunnel sends it.
fn forwarded_for<B>(req: &Request<B>) -> Option<SocketAddr> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    value
        .split([',', ';'])
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("for"))
        .and_then(|(_, v)| {
            let v = v.trim_matches('"');
            v.parse::<SocketAddr>().ok().or_else(|| {
                v.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .ok()
                    .map(|ip| SocketAddr::new(ip, 0))
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_forms() {
        let req = |v: &str| Request::builder().header("forwarded", v).body(()).unwrap();
        assert_eq!(
            forwarded_for(&req("for=10.0.0.7")),
            Some("10.0.0.7:0".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(&req("proto=http;for=\"[2001:db8::1]:4711\"")),
            Some("[2001:db8::1]:4711".parse().unwrap())
        );
        assert_eq!(forwarded_for(&req("by=1.2.3.4")), None);
    }
}
