//! `waystone up`: the control plane and every gateway and waypoint in one process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Mutex, Notify, watch};
use waystone_fetch::{FetchConfig, Fetcher};
use waystone_model::TranslateOptions;
use waystone_proxy::{DataPlane, DataPlaneConfig};
use waystone_wasm::{CompiledCache, EngineConfig, WasmEngine};

use crate::admin::{ADMIN_ADDR_FILE, AdminState, LogControl, MetricSource};
use crate::api::{ADDR_FILE, TOKEN_FILE};
use crate::reconcile::Reconciler;
use crate::server::{ApiState, router};
use crate::store::{Store, Write};

/// Options of `waystone up`, filled by the CLI.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub data_dir: PathBuf,
    /// `host:port` entries, or `*`: registries that may be reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Where gateway listeners bind (reported in `status.addresses`).
    pub gateway_address: IpAddr,
    /// The local mesh entry listener (ztunnel's stand-in), default 127.0.0.1:15001.
    pub entry_address: SocketAddr,
    /// The local API, default 127.0.0.1:0 (a free port, written to `<data-dir>/api.addr`).
    pub api_address: SocketAddr,
    /// Data-plane worker threads, default the number of cores.
    pub workers: usize,
    /// HBONE on waypoints, the mesh entry and to endpoints (default: off).
    pub hbone: crate::hbone::HboneOptions,
    /// A PEM file of CA certificates trusted for https registries and module servers, besides
    /// the system's roots.
    pub registry_ca: Option<PathBuf>,
    /// Cached modules and compiled modules unused this long are purged (default 24 h).
    pub cache_max_unused: Duration,
    /// How often the purge runs (default hourly, as Istio's agent).
    pub cache_prune_interval: Duration,
    /// The admin endpoint (default 127.0.0.1:15000; port 0 picks a free one, written to
    /// `<data-dir>/admin.addr`); `None`: no admin endpoint.
    pub admin_address: Option<SocketAddr>,
    /// When `admin_address` is taken by another process, bind a free port on the same IP
    /// instead of failing (for the CLI's default address; several instances on one machine).
    pub admin_fallback: bool,
    /// Access logs and tracing of the data plane.
    pub observability: waystone_proxy::ObservabilityConfig,
    /// How `/logging` changes the process's log filter (`None`: it cannot).
    pub log_control: Option<LogControl>,
    /// Wall-clock budget of one plugin callback (epoch interruption), default 1 s.
    pub wasm_call_deadline: Duration,
    /// Linear memory cap of each plugin instance, default 64 MiB.
    pub wasm_memory_bytes: usize,
}

pub const DEFAULT_CACHE_MAX_UNUSED: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_CACHE_PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

impl UpOptions {
    /// The defaults of `waystone up` for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            insecure_registries: Vec::new(),
            gateway_address: IpAddr::from([127, 0, 0, 1]),
            entry_address: SocketAddr::from(([127, 0, 0, 1], 15001)),
            api_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            registry_ca: None,
            cache_max_unused: DEFAULT_CACHE_MAX_UNUSED,
            cache_prune_interval: DEFAULT_CACHE_PRUNE_INTERVAL,
            hbone: crate::hbone::HboneOptions::default(),
            // Library callers (tests) opt in; the CLI passes its default, 127.0.0.1:15000.
            admin_address: None,
            admin_fallback: false,
            observability: waystone_proxy::ObservabilityConfig::default(),
            log_control: None,
            wasm_call_deadline: EngineConfig::default().call_deadline,
            wasm_memory_bytes: EngineConfig::default().max_memory_bytes,
        }
    }
}

/// Runs until `shutdown` resolves (the CLI passes Ctrl-C/SIGTERM), then drains and returns.
pub async fn run_up(
    opts: UpOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if !opts.api_address.ip().is_loopback() {
        anyhow::bail!(
            "the local API must listen on a loopback address, not {}",
            opts.api_address
        );
    }
    std::fs::create_dir_all(&opts.data_dir)
        .with_context(|| format!("creating data directory {}", opts.data_dir.display()))?;
    let store_path = opts.data_dir.join("store.db");
    let mut store = Store::open(&store_path)?;
    ensure_namespaces(&mut store)?;
    let store = Arc::new(Mutex::new(store));

    let engine = WasmEngine::new(EngineConfig {
        max_memory_bytes: opts.wasm_memory_bytes,
        call_deadline: opts.wasm_call_deadline,
    })
    .context("starting the Wasm engine")?;
    let cache_dir = crate::paths::cache_dir(&opts.data_dir);
    let mut fetch_cfg = FetchConfig::new(cache_dir.clone());
    fetch_cfg.insecure_registries = opts.insecure_registries.clone();
    fetch_cfg.ca_file = opts.registry_ca.clone();
    let fetcher = Fetcher::new(fetch_cfg).context("starting the module fetcher")?;
    // Without a usable disk cache every start compiles again; slower, not wrong.
    let compiled_cache =
        match CompiledCache::open(&crate::paths::compiled_cache_dir(&opts.data_dir)) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "compiled modules will not be cached on disk");
                None
            }
        };

    let dataplane = Arc::new(
        DataPlane::start(DataPlaneConfig {
            workers: opts.workers.max(1),
            gateway_address: opts.gateway_address,
            entry_address: Some(opts.entry_address),
            hbone: crate::hbone::data_plane_hbone(&opts.hbone, &opts.data_dir)?,
            observability: opts.observability.clone(),
            ..Default::default()
        })
        .await?,
    );

    let changed = Arc::new(Notify::new());
    let (applied_tx, applied_rx) = watch::channel(0u64);
    let translate_opts = TranslateOptions {
        host_env: std::env::vars().collect(),
        ..Default::default()
    };
    let custom_metrics_engine = engine.clone();
    let mut reconciler = Reconciler::new(
        store.clone(),
        changed.clone(),
        applied_tx,
        dataplane.clone(),
        engine,
        fetcher.clone(),
        translate_opts.clone(),
    );
    reconciler.set_compiled_cache(compiled_cache.clone());
    let reports = reconciler.reports.clone();
    let (stop_tx, stop_rx) = watch::channel(false);

    let sources: Vec<MetricSource> = crate::admin::standard_sources(custom_metrics_engine);
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin_state = Arc::new(AdminState {
        dataplane: dataplane.clone(),
        ready: ready.clone(),
        reports,
        sources,
        process_filter: std::sync::Mutex::new(
            opts.log_control
                .as_ref()
                .map(|l| l.initial.clone())
                .unwrap_or_else(|| "info".into()),
        ),
        log: opts.log_control.clone(),
    });
    // The admin endpoint opens first, so `/ready` can say the configuration is not running yet.
    let admin = match opts.admin_address {
        Some(addr) => {
            let (bound, task) = crate::admin::serve(
                addr,
                opts.admin_fallback,
                admin_state.clone(),
                stop_rx.clone(),
            )
            .await?;
            std::fs::write(opts.data_dir.join(ADMIN_ADDR_FILE), bound.to_string())?;
            Some(task)
        }
        None => None,
    };

    let reconcile_task = tokio::spawn(reconciler.run(stop_rx.clone()));
    let prune_task = tokio::spawn(prune_periodically(
        fetcher,
        compiled_cache,
        opts.cache_prune_interval,
        opts.cache_max_unused,
        stop_rx.clone(),
    ));

    // The first pass restores the stored configuration before the API opens.
    {
        let version = store.lock().await.current_version()?;
        let mut applied = applied_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|v| *v >= version))
            .await;
    }
    ready.store(true, std::sync::atomic::Ordering::Release);

    let token = hex::encode(rand::random::<[u8; 24]>());
    let listener = tokio::net::TcpListener::bind(opts.api_address)
        .await
        .with_context(|| format!("binding the local API on {}", opts.api_address))?;
    let api_addr = listener.local_addr()?;
    write_private(&opts.data_dir.join(TOKEN_FILE), &token)?;
    std::fs::write(opts.data_dir.join(ADDR_FILE), api_addr.to_string())?;
    let state = Arc::new(ApiState {
        store: store.clone(),
        changed: changed.clone(),
        applied: applied_rx,
        token,
        opts: translate_opts,
        settle_timeout: Duration::from_secs(60),
        config_dump: {
            let admin = admin_state.clone();
            Arc::new(move || admin.dump())
        },
    });
    let mut api_stop = stop_rx.clone();
    let api = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move {
                let _ = api_stop.changed().await;
            })
            .await
    });
    tracing::info!(
        api = %api_addr,
        entry = %opts.entry_address,
        data_dir = %opts.data_dir.display(),
        "waystone is up"
    );

    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let _ = std::fs::remove_file(opts.data_dir.join(ADDR_FILE));
    let _ = std::fs::remove_file(opts.data_dir.join(ADMIN_ADDR_FILE));
    dataplane.shutdown(Duration::from_secs(10)).await;
    let _ = api.await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    let _ = reconcile_task.await;
    let _ = prune_task.await;
    tracing::info!("stopped");
    Ok(())
}

/// Purges modules and compiled modules unused for `max_unused`, every `interval` (the first
/// purge one interval after start), until `stop` fires.
async fn prune_periodically(
    fetcher: Fetcher,
    compiled: Option<CompiledCache>,
    interval: Duration,
    max_unused: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => return,
        }
        let fetcher = fetcher.clone();
        let compiled = compiled.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            let modules = fetcher.prune_cache(max_unused);
            let compiled = compiled.map(|c| c.prune(max_unused));
            (modules, compiled)
        })
        .await;
        match pruned {
            Ok((modules, compiled)) => {
                match modules {
                    Ok(removed) if !removed.is_empty() => {
                        tracing::info!(
                            removed = removed.len(),
                            ?max_unused,
                            "purged unused modules from the cache"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "purging the module cache failed"),
                }
                match compiled {
                    Some(Ok(removed)) if !removed.is_empty() => {
                        tracing::info!(
                            removed = removed.len(),
                            ?max_unused,
                            "purged unused compiled modules"
                        )
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "purging compiled modules failed"),
                    _ => {}
                }
            }
            Err(e) => tracing::warn!(error = %e, "cache purge task failed"),
        }
    }
}

/// A fresh store looks like a new cluster: `default` and `istio-system` exist.
fn ensure_namespaces(store: &mut Store) -> anyhow::Result<()> {
    let mut writes = Vec::new();
    let version = store.current_version()? + 1;
    let now = crate::objects::now_rfc3339();
    for ns in ["default", "istio-system"] {
        if store.get("Namespace", "", ns)?.is_none() {
            writes.push(Write::Put(Box::new(crate::objects::new_namespace(
                ns, version, &now,
            ))));
        }
    }
    if !writes.is_empty() {
        store.commit(&writes, version)?;
    }
    Ok(())
}

fn write_private(path: &std::path::Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
