//! `waystone controller` and `waystone proxy`: the two roles of Kubernetes mode.

use std::path::{Path, PathBuf};

use waystone_kube::{ControllerOptions, Engines, ProxyHbone, ProxyIdentity, ProxyOptions};
use waystone_model::snapshot::ObjectKey;
use waystone_proxy::hbone::{IdentityFiles, IstioCaClient, IstioCaOptions, SpiffeId};

use super::shutdown_signal;
use super::up::INSECURE_ENV;
use crate::args::{ControllerArgs, ProxyArgs, ProxyHboneArgs};
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
    opts.waypoint_istio_ca = args.waypoint_istio_ca;
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
        gateway: gateway.clone(),
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
        hbone: proxy_hbone(&args.hbone, &gateway)?,
    };
    runtime()?.block_on(async {
        let client = waystone_kube::connect(kubeconfig).await.map_err(failed)?;
        waystone_kube::run_proxy(client, engines, opts, shutdown_signal())
            .await
            .map_err(failed)
    })
}

/// `waystone proxy`'s HBONE identity: Istio's CA (`--istio-ca`), files (`--hbone-cert`), or
/// none (plain HTTP/h2c on every listener).
fn proxy_hbone(args: &ProxyHboneArgs, gateway: &ObjectKey) -> Result<Option<ProxyHbone>, CliError> {
    let identity = if args.istio_ca {
        let id = SpiffeId::new(
            &args.trust_domain,
            args.pod_namespace.as_deref().unwrap_or(&gateway.namespace),
            &args
                .service_account
                .clone()
                .unwrap_or_else(|| waystone_kube::controller::data_plane_name(&gateway.name)),
        );
        let mut opts = IstioCaOptions::new(id);
        opts.address = args.ca_address.clone();
        opts.tls_server_name = args.ca_server_name.clone();
        opts.root_cert = args.ca_root_cert.clone();
        opts.token_file = args.ca_token_file.clone();
        opts.cluster_id = args.cluster_id.clone();
        opts.cert_ttl = args.cert_ttl;
        opts.grace_ratio = args.cert_grace_ratio;
        // Checked here so that a typo fails at once rather than in the retry loop.
        IstioCaClient::new(opts.clone()).map_err(|e| CliError::Failed(e.to_string()))?;
        ProxyIdentity::IstioCa(opts)
    } else if let (Some(cert), Some(key), Some(roots)) =
        (&args.hbone_cert, &args.hbone_key, &args.hbone_roots)
    {
        ProxyIdentity::Files {
            trust_domain: args.trust_domain.clone(),
            files: IdentityFiles {
                cert_chain: cert.clone(),
                key: key.clone(),
                roots: roots.clone(),
            },
        }
    } else {
        if !args.hbone_endpoints.is_empty() {
            return Err(CliError::Failed(
                "--hbone-endpoint needs an HBONE identity: --istio-ca or --hbone-cert".into(),
            ));
        }
        return Ok(None);
    };
    Ok(Some(ProxyHbone {
        identity,
        endpoints: args.hbone_endpoints.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn hbone(args: &[&str]) -> Result<Option<ProxyHbone>, CliError> {
        let mut argv = vec!["waystone", "proxy", "--gateway", "apps/waypoint"];
        argv.extend_from_slice(args);
        let Command::Proxy(p) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        proxy_hbone(&p.hbone, &ObjectKey::new("apps", "waypoint"))
    }

    #[test]
    fn istio_ca_flags_name_the_pod_identity_and_the_ca() {
        let Some(ProxyHbone {
            identity: ProxyIdentity::IstioCa(o),
            ..
        }) = hbone(&["--istio-ca", "--ca-root-cert", "/r.pem", "--cert-ttl", "1h"]).unwrap()
        else {
            panic!("an Istio CA identity")
        };
        // The controller runs the proxy as ServiceAccount <gateway>-waystone in the
        // gateway's namespace.
        assert_eq!(
            o.id.to_string(),
            "spiffe://cluster.local/ns/apps/sa/waypoint-waystone"
        );
        assert_eq!(o.address, "istiod.istio-system.svc:15012");
        assert_eq!(
            o.token_file,
            PathBuf::from("/var/run/secrets/tokens/istio-token")
        );
        assert_eq!(o.root_cert, PathBuf::from("/r.pem"));
        assert_eq!(o.cert_ttl, std::time::Duration::from_secs(3600));
        assert_eq!(o.grace_ratio, 0.5);
        assert_eq!(o.cluster_id, "Kubernetes");

        let Some(ProxyHbone {
            identity: ProxyIdentity::IstioCa(o),
            ..
        }) = hbone(&[
            "--istio-ca",
            "--ca-address",
            "https://10.0.0.1:15012",
            "--service-account",
            "wp",
            "--pod-namespace",
            "mesh",
            "--trust-domain",
            "example.org",
            "--cert-grace-ratio",
            "0.8",
        ])
        .unwrap()
        else {
            panic!("an Istio CA identity")
        };
        assert_eq!(o.id.to_string(), "spiffe://example.org/ns/mesh/sa/wp");
        assert_eq!(o.grace_ratio, 0.8);

        let e = hbone(&["--istio-ca", "--cert-grace-ratio", "1.5"]).unwrap_err();
        assert!(e.to_string().contains("grace ratio 1.5"), "{e}");
        let e = hbone(&["--istio-ca", "--ca-address", "http://istiod:15010"]).unwrap_err();
        assert!(e.to_string().contains("istiod:15010"), "{e}");
    }

    #[test]
    fn file_flags_and_no_hbone() {
        assert!(hbone(&[]).unwrap().is_none());
        assert!(hbone(&["--hbone-endpoint", "10.0.0.5"]).is_err());
        let Some(ProxyHbone {
            identity: ProxyIdentity::Files { files, .. },
            endpoints,
        }) = hbone(&[
            "--hbone-cert",
            "c.pem",
            "--hbone-key",
            "k.pem",
            "--hbone-roots",
            "r.pem",
            "--hbone-endpoint",
            "10.0.0.5",
        ])
        .unwrap()
        else {
            panic!("a file identity")
        };
        assert_eq!(files.key, PathBuf::from("k.pem"));
        assert_eq!(endpoints, vec!["10.0.0.5".to_string()]);
    }
}
