//! HBONE client: CONNECT streams over pooled mutual-TLS h2 sessions, and the upstream
//! connector that sends HBONE-capable endpoints' traffic through them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::identity::Identity;
use super::{HboneError, HboneOutbound};

const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One CONNECT stream: a byte pipe to the destination behind the tunnel.
pub struct HboneStream {
    io: TokioIo<Upgraded>,
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Opens CONNECT streams, keeping one h2 session per tunnel address and reusing it for
/// every stream until the peer closes it.
pub struct HboneClient {
    identity: Arc<Identity>,
    tls: tokio_rustls::TlsConnector,
    sessions: Mutex<HashMap<SocketAddr, SendRequest<Empty<Bytes>>>>,
    dialed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for HboneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneClient")
            .field("identity", &self.identity)
            .finish()
    }
}

impl HboneClient {
    pub fn new(identity: Arc<Identity>) -> Self {
        let tls = tokio_rustls::TlsConnector::from(identity.client_config());
        Self {
            identity,
            tls,
            sessions: Mutex::new(HashMap::new()),
            dialed: Default::default(),
        }
    }

    /// How many TLS sessions this client has opened (pooling makes this small).
    pub fn sessions_dialed(&self) -> u64 {
        self.dialed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Opens a CONNECT stream to `authority` (the original destination, `ip:port` or
    /// `name:port`) through the HBONE server at `tunnel`. `source` is sent as `forwarded:
    /// for=` so the far side knows the original client.
    pub async fn connect(
        &self,
        tunnel: SocketAddr,
        authority: &str,
        source: Option<IpAddr>,
    ) -> Result<HboneStream, HboneError> {
        let connect_err = |reason: String| HboneError::Connect { tunnel, reason };
        let mut sender = self.session(tunnel).await?;
        if sender.ready().await.is_err() {
            // The pooled session went away between checks: one fresh session.
            self.forget(tunnel);
            sender = self.session(tunnel).await?;
            sender
                .ready()
                .await
                .map_err(|e| connect_err(format!("h2 session not ready: {e}")))?;
        }
        let mut req = Request::builder().method(Method::CONNECT).uri(authority);
        if let Some(ip) = source {
            let value = match ip {
                IpAddr::V4(v4) => format!("for={v4}"),
                IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
            };
            req = req.header("forwarded", value);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| connect_err(format!("invalid authority {authority:?}: {e}")))?;
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| connect_err(format!("CONNECT {authority}: {e}")))?;
        if !response.status().is_success() {
            return Err(HboneError::Refused {
                tunnel,
                authority: authority.to_string(),
                status: response.status().as_u16(),
            });
        }
        let upgraded = hyper::upgrade::on(response)
            .await
            .map_err(|e| connect_err(format!("CONNECT {authority} did not upgrade: {e}")))?;
        Ok(HboneStream {
            io: TokioIo::new(upgraded),
        })
    }

    fn forget(&self, tunnel: SocketAddr) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tunnel);
    }

    async fn session(&self, tunnel: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tunnel)
            .filter(|s| !s.is_closed())
        {
            return Ok(s.clone());
        }
        let sender = tokio::time::timeout(CONNECT_TIMEOUT, self.dial(tunnel))
            .await
            .map_err(|_| HboneError::Connect {
                tunnel,
                reason: format!("no session within {CONNECT_TIMEOUT:?}"),
            })??;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        // A concurrent dial may have won; keep one session per tunnel.
        match sessions.get(&tunnel).filter(|s| !s.is_closed()) {
            Some(existing) => Ok(existing.clone()),
            None => {
                sessions.insert(tunnel, sender.clone());
                Ok(sender)
            }
        }
    }

    async fn dial(&self, tunnel: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        let err = |reason: String| HboneError::Connect { tunnel, reason };
        let tcp = TcpStream::connect(tunnel)
            .await
            .map_err(|e| err(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::IpAddress(tunnel.ip().into());
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| err(format!("TLS handshake: {e}")))?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(std::time::Duration::from_secs(30))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| err(format!("h2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%tunnel, error = %e, "HBONE session ended");
            }
        });
        self.dialed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(sender)
    }
}

/// An upstream connection: plain TCP, or a CONNECT stream for HBONE endpoints.
pub enum Upstream {
    Tcp(TcpStream),
    Hbone(HboneStream),
}

impl AsyncRead for Upstream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Hbone(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A worker's outbound HBONE state: which endpoints take HBONE, and its session pool.
pub(crate) struct WorkerOutbound {
    pub client: HboneClient,
    pub routes: HboneOutbound,
}

thread_local! {
    /// Set once per worker thread when the data plane has HBONE; the connector reads it so
    /// the handler's upstream client needs no new parameters.
    static OUTBOUND: RefCell<Option<Arc<WorkerOutbound>>> = const { RefCell::new(None) };
}

/// Installs this worker thread's outbound HBONE state.
pub(crate) fn install(outbound: Arc<WorkerOutbound>) {
    OUTBOUND.with(|o| *o.borrow_mut() = Some(outbound));
}

pub(crate) fn worker_outbound() -> Option<Arc<WorkerOutbound>> {
    OUTBOUND.with(|o| o.borrow().clone())
}

/// Opens an upstream byte stream to `endpoint`: through HBONE when it takes HBONE.
pub async fn connect_endpoint(
    endpoint: SocketAddr,
    source: Option<IpAddr>,
) -> Result<Upstream, HboneError> {
    if let Some(o) = worker_outbound()
        && let Some(tunnel) = o.routes.tunnel_for(endpoint)
    {
        return o
            .client
            .connect(tunnel, &endpoint.to_string(), source)
            .await
            .map(Upstream::Hbone);
    }
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(endpoint))
        .await
        .map_err(|_| HboneError::Connect {
            tunnel: endpoint,
            reason: "timed out".into(),
        })?
        .map_err(|e| HboneError::Connect {
            tunnel: endpoint,
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(Upstream::Tcp(tcp))
}
