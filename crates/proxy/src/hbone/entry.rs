//! The local mesh entry speaking HBONE (`waystone up --hbone`): a request for a service that
//! uses a waypoint goes to that waypoint's `mesh` listener as a CONNECT stream, as ztunnel
//! would send it, instead of running the waypoint's chain in-process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use waystone_model::snapshot::ObjectKey;

use super::client;
use crate::handler::{Body, BoxError, ConnInfo};
use crate::routing;
use crate::runtime::RuntimeConfig;

/// Where this process's waypoints terminate HBONE, by waypoint.
#[derive(Debug, Default)]
pub(crate) struct WaypointListeners(Mutex<HashMap<ObjectKey, SocketAddr>>);

impl WaypointListeners {
    pub fn set(&self, waypoint: ObjectKey, addr: SocketAddr) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(waypoint, addr);
    }

    /// Forgets `waypoint`'s listener if it is the one at `addr` (a listener closing).
    pub fn remove(&self, waypoint: &ObjectKey, addr: SocketAddr) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(waypoint) == Some(&addr) {
            map.remove(waypoint);
        }
    }

    fn get(&self, waypoint: &ObjectKey) -> Option<SocketAddr> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(waypoint)
            .copied()
    }
}

/// The waypoint tunnel and CONNECT authority for an entry request, when its service uses a
/// waypoint that serves HBONE here. The authority is the cluster IP when the service has one
/// (what ztunnel sends), else its FQDN.
pub(crate) fn tunnel_target<B>(
    rt: &RuntimeConfig,
    listeners: &WaypointListeners,
    req: &Request<B>,
) -> Option<(SocketAddr, String)> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(http::header::HOST)?.to_str().ok())?;
    let (service, port) = routing::resolve_service(&rt.snapshot, authority, &rt.default_namespace)?;
    let waypoint = service.waypoint.as_ref()?;
    let tunnel = listeners.get(waypoint)?;
    let destination = match &service.cluster_ip {
        Some(ip) if ip.parse::<std::net::IpAddr>().is_ok() => {
            SocketAddr::new(ip.parse().ok()?, port.port).to_string()
        }
        _ => format!(
            "{}.{}.svc.cluster.local:{}",
            service.key.name, service.key.namespace, port.port
        ),
    };
    Some((tunnel, destination))
}

/// Sends `req` as HTTP/1.1 over a fresh CONNECT stream (one h2 stream on the worker's pooled
/// session), as ztunnel opens one stream per captured connection.
pub(crate) async fn forward(
    req: Request<Incoming>,
    conn: ConnInfo,
    tunnel: SocketAddr,
    destination: String,
) -> Response<Body> {
    match try_forward(req, conn, tunnel, &destination).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%tunnel, %destination, error = %e, "mesh entry: HBONE to the waypoint failed");
            let mut r = Response::new(
                http_body_util::Full::new(bytes::Bytes::from(format!(
                    "upstream connect error: {e}\n"
                )))
                .map_err(|never| match never {})
                .boxed(),
            );
            *r.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            r
        }
    }
}

async fn try_forward(
    mut req: Request<Incoming>,
    conn: ConnInfo,
    tunnel: SocketAddr,
    destination: &str,
) -> Result<Response<Body>, String> {
    let outbound = client::worker_outbound().ok_or("HBONE is not set up on this worker")?;
    let stream = outbound
        .client
        .connect(tunnel, destination, Some(conn.peer.ip()))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP over the tunnel: {e}"))?;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    // Origin form on the wire; the authority moves to Host as a client would send it.
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = path.parse().map_err(|e| format!("request path: {e}"))?;
    *req.version_mut() = http::Version::HTTP_11;
    if let Ok(v) = HeaderValue::from_str(&host) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let response = sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP over the tunnel: {e}"))?;
    Ok(response.map(|b| b.map_err(BoxError::from).boxed()))
}
