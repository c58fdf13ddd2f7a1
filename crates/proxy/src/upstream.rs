//! The worker's HTTP/1.1 connections to upstream endpoints, kept alive and reused.
//!
//! One pool per worker thread, keyed by endpoint address: requests of a worker never wait on
//! another thread's connections, and checking one out is a lookup by a small key instead of
//! hyper-util's shared pool (a SipHash of the authority, a lock, a waiter channel and a task
//! per request to return the connection). A connection goes back to the pool as soon as the
//! response head arrives; it is taken again only once hyper says it is ready, which is when
//! the previous response's body has been read to its end.

use std::cell::RefCell;
use std::net::SocketAddr;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::handler::Body;
use crate::hbone::client::connect_endpoint;
use crate::metrics::KeyMap;

/// Idle connections kept per endpoint and worker; more are closed when their response ends.
const MAX_IDLE_PER_ENDPOINT: usize = 512;

thread_local! {
    static IDLE: RefCell<KeyMap<SocketAddr, Vec<SendRequest<Body>>>> = RefCell::default();
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(#[from] crate::hbone::HboneError),
    #[error("handshake with {endpoint} failed: {source}")]
    Handshake {
        endpoint: SocketAddr,
        source: hyper::Error,
    },
    #[error("{0}")]
    Request(#[from] hyper::Error),
}

/// Sends `req` (origin-form URI, `Host` set) to `endpoint` on a pooled connection, or a new
/// one. A pooled connection the upstream closed before the request went out gives the request
/// back, and the next one is tried, as hyper-util's client retries canceled requests.
pub async fn send(
    endpoint: SocketAddr,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, UpstreamError> {
    while let Some(mut conn) = checkout(endpoint) {
        match conn.try_send_request(req).await {
            Ok(resp) => {
                checkin(endpoint, conn);
                return Ok(resp);
            }
            Err(mut e) => match e.take_message() {
                Some(r) => req = r,
                None => return Err(e.into_error().into()),
            },
        }
    }
    let io = connect_endpoint(endpoint, None).await?;
    let (mut conn, driver) = http1::handshake(TokioIo::new(io))
        .await
        .map_err(|source| UpstreamError::Handshake { endpoint, source })?;
    tokio::spawn(async move {
        if let Err(err) = driver.await {
            tracing::debug!(%endpoint, error = %err, "upstream connection ended");
        }
    });
    let resp = conn.send_request(req).await?;
    checkin(endpoint, conn);
    Ok(resp)
}

/// A pooled connection to `endpoint` that can take a request now. Closed connections found on
/// the way are dropped; busy ones (a response body still streaming) stay for later.
fn checkout(endpoint: SocketAddr) -> Option<SendRequest<Body>> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(i) = list.iter().rposition(|c| c.is_ready() || c.is_closed()) {
            let conn = list.swap_remove(i);
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    })
}

fn checkin(endpoint: SocketAddr, conn: SendRequest<Body>) {
    if conn.is_closed() {
        return;
    }
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(endpoint).or_default();
        if list.len() >= MAX_IDLE_PER_ENDPOINT {
            list.retain(|c| !c.is_closed());
        }
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(conn);
        }
    });
}
