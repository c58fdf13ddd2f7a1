//! `waystone controller` and `waystone proxy`: the two roles of Kubernetes mode.

use std::path::{Path, PathBuf};

use waystone_kube::{ControllerOptions, Engines, ProxyOptions};
use waystone_model::snapshot::ObjectKey;

use super::shutdown_signal;
use super::up::INSECURE_ENV;
use crate::args::{ControllerArgs, ProxyArgs};
use crate::{CliError, CliResult};

fn insecure(flags: &[String]) -> Vec<String> {
    let env = std::env::var(INSECURE_ENV).unwrap_or_default();
    let mut out: Vec<String> = Vec::new();
    for e in flags
        .iter()
        .map(|s| s.trim())
        .chain(env.split(',').map(str::trim))
    {
        if !e.is_empty() && !out.iter().any(|o| o == e) {
            out.push(e.to_string());
        }
    }
    out
}

fn runtime() -> CliResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waystone-main")
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))
}

fn failed(e: waystone_kube::KubeError) -> CliError {
    CliError::Failed(crate::client::one_line(&e.to_string()))
}

pub fn controller(
    args: ControllerArgs,
    data_dir: &Path,
    kubeconfig: Option<&PathBuf>,
) -> CliResult {
    let mut opts = ControllerOptions::default();
    if !args.gateway_classes.is_empty() {
        opts.classes = args.gateway_classes;
    }
    if let Some(image) = args.proxy_image {
        opts.proxy_image = image;
    }
    opts.deploy = !args.no_deploy;
    let engines = Engines::new(data_dir, insecure(&args.insecure_registries)).map_err(failed)?;
    runtime()?.block_on(async {
        let client = waystone_kube::connect(kubeconfig).await.map_err(failed)?;
        waystone_kube::run_controller(client, engines, opts, shutdown_signal())
            .await
            .map_err(failed)
    })
}

pub fn proxy(args: ProxyArgs, data_dir: &Path, kubeconfig: Option<&PathBuf>) -> CliResult {
    let gateway = match args.gateway.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            ObjectKey::new(ns, name)
        }
        _ => {
            return Err(CliError::Failed(format!(
                "--gateway must be NAMESPACE/NAME, not {:?}",
                args.gateway
            )));
        }
    };
    let engines = Engines::new(data_dir, insecure(&args.insecure_registries)).map_err(failed)?;
    let opts = ProxyOptions {
        gateway,
        gateway_address: args.gateway_address,
        entry_address: args.entry_address,
        workers: args.workers.map(usize::from).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        ready_file: args.ready_file,
        admin_address: Some(args.admin_address),
        log_control: crate::log_control(),
    };
    runtime()?.block_on(async {
        let client = waystone_kube::connect(kubeconfig).await.map_err(failed)?;
        waystone_kube::run_proxy(client, engines, opts, shutdown_signal())
            .await
            .map_err(failed)
    })
}
