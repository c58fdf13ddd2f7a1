//! `waystone up`: the control plane and data plane, until Ctrl-C or SIGTERM.

use std::path::Path;

use waystone_control::{UpOptions, run_up};

use super::shutdown_signal;
use crate::args::UpArgs;
use crate::{CliError, CliResult};

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
        data_dir: data_dir.to_path_buf(),
        insecure_registries: insecure,
        gateway_address: args.gateway_address,
        entry_address: args.entry_address,
        api_address: args.api_address,
        workers,
        wasm_call_deadline: args.wasm_call_deadline,
        wasm_memory_bytes: (args.wasm_memory_mib as usize) << 20,
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
