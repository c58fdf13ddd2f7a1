//! HBONE, the ambient mesh's tunnel: mutual TLS 1.3 carrying HTTP/2 `CONNECT` streams whose
//! `:authority` is the original destination (`ip:port` or `name:port`).
//!
//! - [`server`]: the waypoint's `mesh` listener terminates HBONE; each CONNECT stream is served
//!   as HTTP through the destination service's plugin chain (the same handler as plain
//!   listeners), or relayed as TCP when that service port has no plugins.
//! - [`client`]: HBONE to endpoints and from the local mesh entry to waypoints, one pooled h2
//!   session per (worker, tunnel address) carrying many CONNECT streams.
//! - [`identity`]: SPIFFE certificates from files, reloaded on change; [`ca`]: a local CA.
//! - [`istio_ca`]: certificates from istiod's `IstioCertificateService`, renewed before expiry.

pub mod ca;
pub mod client;
pub(crate) mod entry;
pub mod identity;
pub mod istio_ca;
pub(crate) mod server;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

pub use client::{HboneClient, HboneStream};
pub use identity::{Identity, IdentityFiles, SpiffeId};
pub use istio_ca::{CaFailure, CaRotation, IstioCaClient, IstioCaOptions, RotationStatus};

/// The port HBONE is served on, by waypoints and by ztunnel in front of workloads.
pub const HBONE_PORT: u16 = 15008;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid HBONE identity: {what}: {reason}")]
    InvalidIdentity { what: String, reason: String },
    #[error("certificate authority: {0}")]
    Ca(String),
    #[error("HBONE connect to {tunnel} failed: {reason}")]
    Connect { tunnel: SocketAddr, reason: String },
    #[error("HBONE tunnel {tunnel} refused CONNECT {authority}: status {status}")]
    Refused {
        tunnel: SocketAddr,
        authority: String,
        status: u16,
    },
    #[error("Istio CA {address}: {failure}")]
    IstioCa {
        address: String,
        failure: istio_ca::CaFailure,
    },
}

/// Which endpoints are reached through HBONE rather than plain TCP.
///
/// In a cluster, ztunnel in front of a workload takes HBONE on `<pod ip>:15008`; the data plane
/// is told which endpoint addresses are behind such a ztunnel (`--hbone-endpoint`), since
/// EndpointSlices do not say it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HboneOutbound {
    /// Endpoints whose tunnel is at `<endpoint ip>:15008`.
    pub addresses: HashSet<IpAddr>,
    /// Endpoints with an explicit tunnel address (several workloads behind one port, tests).
    pub tunnels: HashMap<SocketAddr, SocketAddr>,
}

impl HboneOutbound {
    /// The tunnel address for `endpoint`, when it takes HBONE.
    pub fn tunnel_for(&self, endpoint: SocketAddr) -> Option<SocketAddr> {
        self.tunnels.get(&endpoint).copied().or_else(|| {
            self.addresses
                .contains(&endpoint.ip())
                .then(|| SocketAddr::new(endpoint.ip(), HBONE_PORT))
        })
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty() && self.tunnels.is_empty()
    }
}

/// HBONE settings of a data plane (`None` in `DataPlaneConfig`: plain HTTP/h2c everywhere).
#[derive(Debug, Clone)]
pub struct HboneConfig {
    pub identity: Arc<Identity>,
    /// Waypoint listeners of protocol `HBONE` terminate HBONE (else they stay plain HTTP/h2c).
    pub inbound: bool,
    /// The local mesh entry sends requests for waypoint-served services to the waypoint's
    /// listener over HBONE, instead of running the waypoint's chain in-process.
    pub entry: bool,
    pub outbound: HboneOutbound,
}

/// Facts about the HBONE stream a request arrived on, visible to the shared handler.
#[derive(Debug, Clone)]
pub(crate) struct Tunnel {
    /// The CONNECT `:authority`: the original destination.
    pub destination: String,
    pub peer: SpiffeId,
    pub local: SpiffeId,
    /// The original source (`forwarded: for=`), else the TLS peer.
    pub source: SocketAddr,
}

tokio::task_local! {
    static TUNNEL: Tunnel;
}

/// Runs `fut` (one request's handling) with `tunnel` visible to [`tunnel_destination`] and
/// [`annotate`]: a task-local keeps the handler's signature the same for every listener.
pub(crate) async fn with_tunnel<F: std::future::Future>(tunnel: Tunnel, fut: F) -> F::Output {
    TUNNEL.scope(tunnel, fut).await
}

/// The destination to route by when the request came through an HBONE stream.
pub(crate) fn tunnel_destination() -> Option<String> {
    TUNNEL.try_with(|t| t.destination.clone()).ok()
}

/// Adds the tunnel's identity facts to a request's plugin-visible properties.
pub(crate) fn annotate(props: &mut waystone_wasm::StreamProperties) {
    let _ = TUNNEL.try_with(|t| annotate_with(t, props));
}

/// Adds `t`'s identity facts to plugin-visible properties.
pub(crate) fn annotate_with(t: &Tunnel, props: &mut waystone_wasm::StreamProperties) {
    props.source = Some(t.source);
    props.mtls = Some(waystone_wasm::MtlsProperties {
        peer_principal: t.peer.to_string(),
        local_principal: t.local.to_string(),
        tls_version: "TLSv1.3".to_string(),
    });
}

/// Runs hyper's connection tasks on the worker's own thread (the handler's futures are not
/// `Send`: they hold plugin instances).
#[derive(Clone, Copy)]
pub(crate) struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}
