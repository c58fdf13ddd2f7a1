//! Kubernetes mode: the API server as a config source for the same translation and swap the
//! embedded store uses, and the two roles a cluster runs — `controller` (status, data-plane
//! Deployments) and `proxy --gateway NS/NAME` (one gateway's data plane). See ARCHITECTURE.md.

pub mod admin;
pub mod client;
pub mod controller;
pub mod convert;
mod error;
pub mod mesh_identity;
pub mod proxy;
pub mod source;

use std::path::{Path, PathBuf};

pub use controller::{ControllerOptions, run_controller};
pub use error::KubeError;
pub use proxy::{ProxyHbone, ProxyIdentity, ProxyOptions, run_proxy};
use waystone_fetch::{FetchConfig, Fetcher};
use waystone_model::TranslateOptions;
use waystone_wasm::{EngineConfig, WasmEngine};

/// The field manager Waystone's writes carry (server-side apply, status).
pub const FIELD_MANAGER: &str = "waystone";

/// What loads plugins in either role.
pub struct Engines {
    pub engine: WasmEngine,
    pub fetcher: Fetcher,
    pub translate: TranslateOptions,
}

impl Engines {
    /// One Wasm engine and a fetcher caching under `<data_dir>/cache`.
    pub fn new(data_dir: &Path, insecure_registries: Vec<String>) -> Result<Self, KubeError> {
        let engine = WasmEngine::new(EngineConfig::default())
            .map_err(|e| KubeError::Config(format!("starting the Wasm engine: {e}")))?;
        let mut cfg = FetchConfig::new(data_dir.join("cache"));
        cfg.insecure_registries = insecure_registries;
        let fetcher = Fetcher::new(cfg)
            .map_err(|e| KubeError::Config(format!("starting the module fetcher: {e}")))?;
        Ok(Self {
            engine,
            fetcher,
            translate: TranslateOptions {
                host_env: std::env::vars().collect(),
                ..Default::default()
            },
        })
    }
}

/// A client from `kubeconfig` (a path), else `KUBECONFIG`, else the in-cluster service account,
/// else `~/.kube/config`.
pub async fn connect(kubeconfig: Option<&PathBuf>) -> Result<kube::Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| KubeError::Config(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| KubeError::Config(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| KubeError::Config(e.to_string()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
}
