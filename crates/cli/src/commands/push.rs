//! `waystone push FILE.wasm oci://REGISTRY/REPO:TAG`.

use waystone_fetch::{PushLayout, PushOptions, push};

use crate::args::{Layout, PushArgs};
use crate::{CliError, CliResult};

pub async fn run(args: PushArgs) -> CliResult {
    let wasm = tokio::fs::read(&args.file)
        .await
        .map_err(|e| CliError::Failed(format!("reading {}: {e}", args.file.display())))?;
    let opts = PushOptions {
        insecure: args.insecure,
        username: args.username,
        password: args.password,
        layout: match args.layout {
            Layout::Oci => PushLayout::Oci,
            Layout::Compat => PushLayout::Compat,
        },
    };
    let result = push(&wasm, &args.target, &opts)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    println!(
        "pushed {}",
        pushed_line(&args.target, &result.manifest_digest)
    );
    Ok(())
}

/// The target as typed, pinned to what was pushed: `oci://host/repo:tag@sha256:...`.
fn pushed_line(target: &str, manifest_digest: &str) -> String {
    let shown = if target.contains("://") {
        target.to_string()
    } else {
        format!("oci://{target}")
    };
    format!("{shown}@{manifest_digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pushed_reference() {
        assert_eq!(
            pushed_line("oci://localhost:5000/basic_auth:1.0", "sha256:ab"),
            "oci://localhost:5000/basic_auth:1.0@sha256:ab"
        );
        assert_eq!(
            pushed_line("localhost:5000/b:1", "sha256:ab"),
            "oci://localhost:5000/b:1@sha256:ab"
        );
    }
}
