//! `waystone up`: the control plane and data plane, until Ctrl-C or SIGTERM.

use std::path::Path;

use waystone_control::{UpOptions, run_up};

use super::shutdown_signal;
use crate::args::UpArgs;
use crate::{CliError, CliResult};

/// Envoy's (and Istio's) admin port.
const DEFAULT_ADMIN_ADDRESS: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 15000);

pub const INSECURE_ENV: &str = "WAYSTONE_INSECURE_REGISTRIES";

pub fn run(args: UpArgs, data_dir: &Path) -> CliResult {
    let opts = options(args, data_dir, std::env::var(INSECURE_ENV).ok().as_deref());
    tracing::debug!(?opts, "starting");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waystone-main")
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    rt.block_on(run_up(opts, shutdown_signal()))?;
    Ok(())
}

fn options(args: UpArgs, data_dir: &Path, insecure_env: Option<&str>) -> UpOptions {
    let mut insecure: Vec<String> = Vec::new();
    let from_env = insecure_env.unwrap_or_default().split(',').map(str::trim);
    for entry in args
        .insecure_registries
        .iter()
        .map(|s| s.trim())
        .chain(from_env)
    {
        if !entry.is_empty() && !insecure.iter().any(|e| e == entry) {
            insecure.push(entry.to_string());
        }
    }
    let workers = args
        .workers
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    UpOptions {
        insecure_registries: insecure,
        gateway_address: args.gateway_address,
        entry_address: args.entry_address,
        api_address: args.api_address,
        workers,
        hbone: waystone_control::hbone::HboneOptions {
            local: args.hbone,
            files: match (args.hbone_cert, args.hbone_key, args.hbone_roots) {
                (Some(cert_chain), Some(key), Some(roots)) => {
                    Some(waystone_proxy::hbone::IdentityFiles {
                        cert_chain,
                        key,
                        roots,
                    })
                }
                _ => None,
            },
            trust_domain: Some(args.trust_domain),
            endpoints: args.hbone_endpoints,
        },
        registry_ca: args.registry_ca,
        cache_max_unused: args.cache_max_unused,
        admin_address: Some(args.admin_address.unwrap_or(DEFAULT_ADMIN_ADDRESS)),
        // Only the default moves aside: an address the user asked for must be the one bound.
        admin_fallback: args.admin_address.is_none(),
        observability: waystone_proxy::ObservabilityConfig {
            access_log: waystone_model::snapshot::AccessLogFormat::parse(&args.access_log)
                .unwrap_or_default(),
            access_log_file: args.access_log_file,
            otlp_endpoint: args.otlp_endpoint,
        },
        log_control: crate::log_control(),
        wasm_call_deadline: args.wasm_call_deadline,
        wasm_memory_bytes: (args.wasm_memory_mib as usize) << 20,
        ..UpOptions::new(data_dir.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{Cli, Command};

    fn up_args(a: &[&str]) -> UpArgs {
        let Command::Up(up) = Cli::parse_args(["waystone", "up"].iter().chain(a))
            .unwrap()
            .command
        else {
            panic!()
        };
        up
    }

    #[test]
    fn insecure_registries_merge_flags_and_env() {
        let o = options(
            up_args(&["--insecure-registry", "a:1"]),
            Path::new("/d"),
            Some("b:2, a:1,,*"),
        );
        assert_eq!(o.insecure_registries, ["a:1", "b:2", "*"]);
        assert_eq!(o.data_dir, Path::new("/d"));
        let o = options(up_args(&[]), Path::new("/d"), None);
        assert!(o.insecure_registries.is_empty());
        assert!(o.workers >= 1);
        assert_eq!(
            options(up_args(&["--workers", "2"]), Path::new("/d"), None).workers,
            2
        );
        assert_eq!(o.registry_ca, None);
        assert_eq!(
            o.cache_max_unused,
            std::time::Duration::from_secs(24 * 3600)
        );
        let o = options(
            up_args(&["--registry-ca", "/etc/ca.pem", "--cache-max-unused", "90m"]),
            Path::new("/d"),
            None,
        );
        assert_eq!(o.registry_ca.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert_eq!(o.cache_max_unused, std::time::Duration::from_secs(5400));
        assert_eq!(o.wasm_call_deadline, std::time::Duration::from_secs(1));
        assert_eq!(o.wasm_memory_bytes, 64 << 20);
        let o = options(
            up_args(&["--wasm-call-deadline", "250ms", "--wasm-memory-mib", "16"]),
            Path::new("/d"),
            None,
        );
        assert_eq!(o.wasm_call_deadline, std::time::Duration::from_millis(250));
        assert_eq!(o.wasm_memory_bytes, 16 << 20);
        assert!(Cli::parse_args(["waystone", "up", "--wasm-call-deadline", "0s"]).is_err());
    }
}
