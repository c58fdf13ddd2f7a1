//! `waystone up`'s HBONE settings: where the process's SPIFFE identity comes from, and which
//! endpoints take HBONE.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use waystone_proxy::hbone::ca::LocalCa;
use waystone_proxy::hbone::{HboneConfig, HboneOutbound, Identity, IdentityFiles, SpiffeId};

/// How often identity files are checked for a rotation.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Lifetime of the local mesh's certificate, re-issued at every start.
const LOCAL_CERT_LIFETIME: Duration = Duration::from_secs(30 * 86_400);

/// HBONE options of `waystone up` (all off: plain HTTP/h2c, as before).
#[derive(Debug, Clone, Default)]
pub struct HboneOptions {
    /// Local mesh: a CA kept under `<data-dir>/hbone` issues this process's identity;
    /// waypoints terminate HBONE and the mesh entry sends HBONE to them.
    pub local: bool,
    /// Identity files (PEM): waypoints terminate HBONE with them, reloaded on change.
    pub files: Option<IdentityFiles>,
    /// `cluster.local` unless given.
    pub trust_domain: Option<String>,
    /// Endpoints reached through HBONE: `IP` (tunnel at `IP:15008`) or `ENDPOINT=TUNNEL`.
    pub endpoints: Vec<String>,
}

impl HboneOptions {
    pub fn enabled(&self) -> bool {
        self.local || self.files.is_some()
    }
}

/// Parses `--hbone-endpoint` values.
pub fn parse_endpoints(values: &[String]) -> anyhow::Result<HboneOutbound> {
    let mut out = HboneOutbound::default();
    for v in values {
        match v.split_once('=') {
            Some((ep, tunnel)) => {
                let ep: SocketAddr = ep
                    .parse()
                    .with_context(|| format!("--hbone-endpoint {v}: {ep:?} is not IP:PORT"))?;
                let tunnel: SocketAddr = tunnel
                    .parse()
                    .with_context(|| format!("--hbone-endpoint {v}: {tunnel:?} is not IP:PORT"))?;
                out.tunnels.insert(ep, tunnel);
            }
            None => {
                let ip: IpAddr = v.parse().with_context(|| {
                    format!("--hbone-endpoint {v}: not an IP or ENDPOINT=TUNNEL")
                })?;
                out.addresses.insert(ip);
            }
        }
    }
    Ok(out)
}

/// The data plane's HBONE settings, with the identity reloader started for file identities.
pub(crate) fn data_plane_hbone(
    opts: &HboneOptions,
    data_dir: &Path,
) -> anyhow::Result<Option<HboneConfig>> {
    if !opts.enabled() {
        return Ok(None);
    }
    let td = opts.trust_domain.as_deref().unwrap_or("cluster.local");
    let outbound = parse_endpoints(&opts.endpoints)?;
    let identity = match &opts.files {
        Some(files) => {
            let identity = Arc::new(
                Identity::from_files(td, files.clone())
                    .context("loading the HBONE identity files")?,
            );
            identity.spawn_reloader(RELOAD_EVERY);
            identity
        }
        None => {
            let dir = data_dir.join("hbone");
            let ca = LocalCa::load_or_create(&dir).context("the local mesh CA")?;
            let files = ca
                .issue_to_files(
                    &SpiffeId::new(td, "istio-system", "waystone"),
                    LOCAL_CERT_LIFETIME,
                    &dir,
                    "waystone",
                )
                .context("issuing the local mesh certificate")?;
            Arc::new(Identity::from_files(td, files).context("loading the local mesh identity")?)
        }
    };
    tracing::info!(identity = %identity.spiffe_id(), local = opts.local, "HBONE enabled");
    Ok(Some(HboneConfig {
        identity,
        inbound: true,
        entry: opts.local,
        outbound,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        let o =
            parse_endpoints(&["10.0.0.5".into(), "127.0.0.1:8080=127.0.0.1:15008".into()]).unwrap();
        assert_eq!(
            o.tunnel_for("10.0.0.5:9080".parse().unwrap()),
            Some("10.0.0.5:15008".parse().unwrap())
        );
        assert_eq!(
            o.tunnel_for("127.0.0.1:8080".parse().unwrap()),
            Some("127.0.0.1:15008".parse().unwrap())
        );
        assert_eq!(o.tunnel_for("127.0.0.1:8081".parse().unwrap()), None);
        assert!(parse_endpoints(&["nope".into()]).is_err());
    }
}
