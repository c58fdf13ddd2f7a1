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
use waystone_wasm::{EngineConfig, WasmEngine};

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
    /// Wall-clock budget of one plugin callback (epoch interruption), default 1 s.
    pub wasm_call_deadline: Duration,
    /// Linear memory cap of each plugin instance, default 64 MiB.
    pub wasm_memory_bytes: usize,
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
    let mut fetch_cfg = FetchConfig::new(opts.data_dir.join("cache"));
    fetch_cfg.insecure_registries = opts.insecure_registries.clone();
    let fetcher = Fetcher::new(fetch_cfg).context("starting the module fetcher")?;

    let dataplane = Arc::new(
        DataPlane::start(DataPlaneConfig {
            workers: opts.workers.max(1),
            gateway_address: opts.gateway_address,
            entry_address: Some(opts.entry_address),
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
    let reconciler = Reconciler::new(
        store.clone(),
        changed.clone(),
        applied_tx,
        dataplane.clone(),
        engine,
        fetcher,
        translate_opts.clone(),
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let reconcile_task = tokio::spawn(reconciler.run(stop_rx.clone()));

    // The first pass restores the stored configuration before the API opens.
    {
        let version = store.lock().await.current_version()?;
        let mut applied = applied_rx.clone();
        let _ = tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|v| *v >= version))
            .await;
    }

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
    dataplane.shutdown(Duration::from_secs(10)).await;
    let _ = api.await;
    let _ = reconcile_task.await;
    tracing::info!("stopped");
    Ok(())
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
