//! `waystone proxy --gateway NS/NAME`: one gateway's or waypoint's data plane, as a pod runs
//! it. It watches only its own Gateway (plus the routes, services, endpoints and plugins a
//! gateway may refer to), runs only that gateway, and loads only the plugins in its chains.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use serde_json::json;
use tokio::sync::watch;
use waystone_control::admin::{AdminState, LogControl};
use waystone_control::pipeline::Pipeline;
use waystone_model::snapshot::{GatewayRole, ObjectKey, Snapshot};
use waystone_model::translate;
use waystone_proxy::hbone::{
    CaRotation, HboneConfig, Identity, IdentityFiles, IstioCaClient, IstioCaOptions,
};
use waystone_proxy::{DataPlane, DataPlaneConfig};

use crate::Engines;
use crate::error::KubeError;
use crate::source::{KubeSource, Scope};

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub gateway: ObjectKey,
    pub gateway_address: IpAddr,
    /// A local mesh entry (ztunnel's stand-in), for waypoints tested without ztunnel.
    pub entry_address: Option<SocketAddr>,
    pub workers: usize,
    /// Written (JSON: gateway, address, listeners, admin) after every swap, for probes and tests.
    pub ready_file: Option<PathBuf>,
    /// The admin endpoint (`/ready`, `/config_dump`, `/stats/prometheus`, `/logging`, as in
    /// `waystone up`); `None`: none.
    pub admin_address: Option<SocketAddr>,
    /// How `/logging` changes this process's levels.
    pub log_control: Option<LogControl>,
    /// HBONE on the waypoint's `mesh` listener (`None`: plain HTTP/h2c).
    pub hbone: Option<ProxyHbone>,
}

/// Where a proxy's HBONE identity comes from, and which endpoints take HBONE.
#[derive(Debug, Clone)]
pub struct ProxyHbone {
    pub identity: ProxyIdentity,
    /// `--hbone-endpoint` values: `IP` or `ENDPOINT=TUNNEL`.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum ProxyIdentity {
    /// PEM files, reloaded when they change.
    Files {
        trust_domain: String,
        files: IdentityFiles,
    },
    /// Istio's CA, renewed before expiry.
    IstioCa(IstioCaOptions),
}

/// How often identity files are checked for a rotation.
const FILE_RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The data plane's HBONE settings. With Istio's CA, the first certificate is awaited (with
/// backoff, as istio-agent does: a waypoint without an identity cannot serve HBONE); the
/// returned rotation renews it for as long as it is kept. `None` when shut down meanwhile.
async fn start_hbone(
    hbone: &ProxyHbone,
    shutdown: &mut (impl std::future::Future<Output = ()> + Unpin),
) -> Result<Option<(HboneConfig, Option<CaRotation>)>, KubeError> {
    let outbound = waystone_control::hbone::parse_endpoints(&hbone.endpoints)
        .map_err(|e| KubeError::Config(format!("{e:#}")))?;
    let config = |identity| HboneConfig {
        identity,
        inbound: true,
        entry: false,
        outbound: outbound.clone(),
    };
    match &hbone.identity {
        ProxyIdentity::Files {
            trust_domain,
            files,
        } => {
            let identity = Arc::new(
                Identity::from_files(trust_domain, files.clone())
                    .map_err(|e| KubeError::Config(e.to_string()))?,
            );
            identity.spawn_reloader(FILE_RELOAD_EVERY);
            Ok(Some((config(identity), None)))
        }
        ProxyIdentity::IstioCa(opts) => {
            let mut backoff = opts.retry_initial;
            loop {
                let client = IstioCaClient::new(opts.clone())
                    .map_err(|e| KubeError::Config(e.to_string()))?;
                match CaRotation::start(client).await {
                    Ok(rotation) => {
                        let identity = rotation.identity().clone();
                        return Ok(Some((config(identity), Some(rotation))));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?backoff, "no HBONE certificate yet");
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut *shutdown => return Ok(None),
                }
                backoff = (backoff * 2).min(opts.retry_max);
            }
        }
    }
}

/// Keeps only `gateway` and the plugins its chains name.
pub fn narrow_to_gateway(mut s: Snapshot, gateway: &ObjectKey) -> Snapshot {
    s.gateways.retain(|g| g.key == *gateway);
    let mut used = std::collections::BTreeSet::new();
    for g in &s.gateways {
        for l in &g.listeners {
            used.extend(l.chain.iter().cloned());
        }
        if matches!(g.role, GatewayRole::Waypoint { .. }) {
            for ws in &g.waypoint_services {
                for p in &ws.ports {
                    used.extend(p.chain.iter().cloned());
                }
            }
        }
    }
    s.plugins.retain(|id, _| used.contains(id));
    s
}

pub async fn run_proxy(
    client: Client,
    engines: Engines,
    opts: ProxyOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), KubeError> {
    let mut shutdown = std::pin::pin!(shutdown);
    let (hbone, _rotation) = match &opts.hbone {
        Some(h) => match start_hbone(h, &mut shutdown).await? {
            Some((config, rotation)) => (Some(config), rotation),
            None => return Ok(()),
        },
        None => (None, None),
    };
    let dataplane = Arc::new(
        DataPlane::start(DataPlaneConfig {
            workers: opts.workers.max(1),
            gateway_address: opts.gateway_address,
            entry_address: opts.entry_address,
            hbone,
            ..Default::default()
        })
        .await
        .map_err(|e| KubeError::Config(e.to_string()))?,
    );
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reports = Arc::new(std::sync::Mutex::new(Default::default()));
    let admin_state = Arc::new(AdminState {
        dataplane: dataplane.clone(),
        ready: ready.clone(),
        reports: reports.clone(),
        sources: waystone_control::admin::standard_sources(engines.engine.clone()),
        process_filter: std::sync::Mutex::new(
            opts.log_control
                .as_ref()
                .map(|l| l.initial.clone())
                .unwrap_or_else(|| "info".into()),
        ),
        log: opts.log_control.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Open before the first sync, so `/ready` can say the configuration is not running yet.
    let admin = match opts.admin_address {
        Some(addr) => Some(
            waystone_control::admin::serve(addr, false, admin_state, stop_rx)
                .await
                .map_err(|e| KubeError::Config(e.to_string()))?,
        ),
        None => None,
    };
    let source = KubeSource::start(client, &Scope::Gateway(opts.gateway.clone())).await?;
    source.ready().await;
    tracing::info!(gateway = %opts.gateway, "proxy synced with the API server");
    let translate_opts = engines.translate.clone();
    let mut pipeline = Pipeline::new(engines.engine, engines.fetcher, engines.translate);
    let changed = source.changed();
    let mut retry = Duration::from_secs(2);
    loop {
        let objects = source.objects().await;
        let translation = translate(&objects, &translate_opts);
        let key = opts.gateway.clone();
        let built = pipeline
            .build_from(translation, |s| narrow_to_gateway(s, &key))
            .await;
        let found = built.runtime.snapshot.gateway(&opts.gateway).is_some();
        let plugin_reports = pipeline.plugin_reports(&built.runtime.snapshot);
        let bindings = dataplane.apply(built.runtime).await;
        *reports.lock().unwrap_or_else(|p| p.into_inner()) = plugin_reports;
        ready.store(true, std::sync::atomic::Ordering::Release);
        if !found {
            tracing::warn!(gateway = %opts.gateway, "the gateway does not exist or does not translate; serving nothing");
        }
        if let Some(path) = &opts.ready_file {
            let b = bindings.get(&opts.gateway);
            let listeners: serde_json::Map<String, serde_json::Value> = b
                .map(|b| {
                    b.listeners
                        .iter()
                        .map(|l| {
                            let v = match &l.result {
                                Ok(a) => json!(a.to_string()),
                                Err(e) => json!({ "error": e }),
                            };
                            (l.name.clone(), v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let body = json!({
                "gateway": opts.gateway.to_string(),
                "found": found,
                "address": b.map(|b| b.address.to_string()),
                "entry": dataplane.entry_address().map(|a| a.to_string()),
                "listeners": listeners,
                "plugins": dataplane.current().plugins.len(),
                "admin": admin.as_ref().map(|(a, _)| a.to_string()),
            });
            let tmp = path.with_extension("tmp");
            if std::fs::write(&tmp, body.to_string())
                .and_then(|_| std::fs::rename(&tmp, path))
                .is_err()
            {
                tracing::warn!(path = %path.display(), "cannot write the ready file");
            }
        }
        let wait = if built.failing {
            let d = retry;
            retry = (retry * 2).min(Duration::from_secs(60));
            d
        } else {
            retry = Duration::from_secs(2);
            Duration::from_secs(60)
        };
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = &mut shutdown => break,
        }
    }
    let _ = stop_tx.send(true);
    dataplane.shutdown(Duration::from_secs(10)).await;
    if let Some((_, task)) = admin {
        let _ = task.await;
    }
    Ok(())
}
