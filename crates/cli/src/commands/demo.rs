//! `waystone demo bookinfo`: runs the bookinfo services and describes them to the mesh.

use std::path::Path;

use waystone_control::api::ApplyRequest;

use super::{print_apply_results, shutdown_signal};
use crate::args::BookinfoArgs;
use crate::client::ApiClient;
use crate::demo::{bookinfo_manifests, start_bookinfo};
use crate::{CliError, CliResult};

pub fn run(args: BookinfoArgs, data_dir: &Path) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    rt.block_on(async {
        let bookinfo = start_bookinfo(args.address)
            .await
            .map_err(|e| CliError::Failed(format!("starting bookinfo on {}: {e}", args.address)))?;
        let path = args
            .manifests
            .clone()
            .unwrap_or_else(|| data_dir.join("bookinfo.yaml"));
        let manifests = bookinfo_manifests(&args.namespace, &bookinfo);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| CliError::Failed(format!("creating {}: {e}", parent.display())))?;
        }
        std::fs::write(&path, &manifests)
            .map_err(|e| CliError::Failed(format!("writing {}: {e}", path.display())))?;
        for (service, addr) in bookinfo.services() {
            println!("{service} listening on {addr}");
        }
        if args.apply {
            let client = ApiClient::from_data_dir(data_dir)?;
            let req = ApplyRequest {
                manifests,
                source: path.display().to_string(),
                default_namespace: args.namespace.clone(),
            };
            print_apply_results(&client.apply(&req).await?);
        }
        println!("bookinfo ready: manifests at {}", path.display());
        shutdown_signal().await;
        bookinfo.shutdown().await;
        Ok(())
    })
}
