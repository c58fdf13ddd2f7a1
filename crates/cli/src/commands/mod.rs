//! One module per command; this one dispatches and holds what several share.

mod apply;
mod cache;
mod delete;
mod demo;
mod describe;
mod get;
mod kube;
mod label;
mod proxy_config;
mod push;
mod up;
mod waypoint;

use std::future::Future;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use waystone_control::api::ApplyResponse;
use waystone_model::{KindInfo, lookup_kind};

use crate::args::{CacheCommand, Command, DemoCommand, WaypointCommand};
use crate::client::ApiClient;
use crate::{CliError, CliResult};

pub(crate) const DEFAULT_NAMESPACE: &str = "default";

/// kubectl's way with several objects: report each failure as it happens,
/// carry on with the rest, and exit 1 at the end.
#[derive(Default)]
pub(crate) struct Failures(bool);

impl Failures {
    /// Prints `e`; an unreachable API ends the command at once.
    pub(crate) fn record(&mut self, e: crate::client::ClientError) -> CliResult {
        if matches!(e, crate::client::ClientError::Unreachable { .. }) {
            return Err(e.into());
        }
        eprintln!("error: {e}");
        self.0 = true;
        Ok(())
    }

    pub(crate) fn finish(self) -> CliResult {
        if self.0 {
            Err(CliError::Reported)
        } else {
            Ok(())
        }
    }
}

pub fn run(command: Command, data_dir: &Path, kubeconfig: Option<&PathBuf>) -> CliResult {
    match command {
        Command::Up(a) => up::run(a, data_dir),
        Command::Demo(DemoCommand::Bookinfo(a)) => demo::run(a, data_dir),
        Command::Push(a) => block_on(push::run(a)),
        Command::Cache(CacheCommand::List) => cache::list(data_dir),
        Command::Cache(CacheCommand::Prune(a)) => cache::prune(data_dir, a),
        Command::Controller(a) => kube::controller(a, data_dir, kubeconfig),
        Command::Proxy(a) => kube::proxy(a, data_dir, kubeconfig),
        Command::Apply(a) => {
            block_on(async { apply::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::Get(a) => {
            block_on(async { get::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::Delete(a) => {
            block_on(async { delete::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::Label(a) => {
            block_on(async { label::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::ProxyConfig(a) => {
            block_on(async { proxy_config::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::Describe(a) => {
            block_on(async { describe::run(&connect(data_dir, kubeconfig).await?, a).await })
        }
        Command::Waypoint(w) => block_on(async {
            let client = connect(data_dir, kubeconfig).await?;
            match w {
                WaypointCommand::Apply(a) => waypoint::apply(&client, a).await,
                WaypointCommand::List(a) => waypoint::list(&client, a).await,
                WaypointCommand::Delete(a) => waypoint::delete(&client, a).await,
            }
        }),
    }
}

/// The local API of `waystone up`, or a Kubernetes API server when `--kubeconfig` or
/// `KUBECONFIG` names one.
async fn connect(data_dir: &Path, kubeconfig: Option<&PathBuf>) -> CliResult<ApiClient> {
    let from_env = std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty());
    if kubeconfig.is_some() || from_env {
        Ok(ApiClient::from_kubeconfig(kubeconfig).await?)
    } else {
        Ok(ApiClient::from_data_dir(data_dir)?)
    }
}

/// API commands are a few sequential requests: one thread is plenty.
fn block_on<F: Future<Output = CliResult>>(f: F) -> CliResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the async runtime: {e}")))?;
    rt.block_on(f)
}

/// Resolves a kind the way kubectl does, with kubectl's message when it can't.
pub(crate) fn resolve_kind(name: &str) -> CliResult<&'static KindInfo> {
    lookup_kind(name).ok_or_else(|| {
        CliError::Failed(format!(
            "the server doesn't have a resource type \"{name}\""
        ))
    })
}

/// `KIND/NAME` → (kind, name); None for a bare word.
pub(crate) fn split_kind_name(arg: &str) -> CliResult<Option<(&'static KindInfo, String)>> {
    match arg.split_once('/') {
        None => Ok(None),
        Some((kind, name)) if !kind.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Some((resolve_kind(kind)?, name.to_string())))
        }
        Some(_) => Err(CliError::Failed(format!(
            "arguments in resource/name form must have a single resource and name, not {arg:?}"
        ))),
    }
}

/// The namespace a namespaced kind lives in; `""` for cluster-scoped kinds, as the API wants.
pub(crate) fn namespace_for(info: &KindInfo, namespace: &str) -> String {
    if info.namespaced {
        namespace.to_string()
    } else {
        String::new()
    }
}

/// kubectl's lines for what an apply did; warnings go to stderr.
pub(crate) fn print_apply_results(resp: &ApplyResponse) {
    for r in &resp.results {
        let qualified =
            lookup_kind(&r.kind).map_or_else(|| r.kind.to_ascii_lowercase(), KindInfo::qualified);
        println!("{qualified}/{} {}", r.name, r.action);
        for w in &r.warnings {
            eprintln!("Warning: {w}");
        }
    }
}

/// One manifest source: its name (a path, or `-`) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub name: String,
    pub text: String,
}

/// Reads `-f` arguments: `-` is stdin, a directory gives its `.yaml`/`.yml`/`.json` files in
/// name order (not recursing, as kubectl without `-R`), anything else is a file.
pub(crate) fn read_sources(filenames: &[String]) -> CliResult<Vec<Source>> {
    let mut out = Vec::new();
    for f in filenames {
        if f == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Failed(format!("reading stdin: {e}")))?;
            out.push(Source {
                name: "-".into(),
                text,
            });
            continue;
        }
        let path = Path::new(f);
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                CliError::Failed(format!("the path \"{f}\" does not exist"))
            }
            _ => CliError::Failed(format!("reading {f}: {e}")),
        })?;
        if meta.is_dir() {
            let mut files = Vec::new();
            let entries = std::fs::read_dir(path)
                .map_err(|e| CliError::Failed(format!("reading directory {f}: {e}")))?;
            for entry in entries {
                let entry =
                    entry.map_err(|e| CliError::Failed(format!("reading directory {f}: {e}")))?;
                let p = entry.path();
                let manifest_ext = p
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
                if manifest_ext && p.is_file() {
                    files.push(p);
                }
            }
            files.sort();
            for p in files {
                let text = std::fs::read_to_string(&p)
                    .map_err(|e| CliError::Failed(format!("reading {}: {e}", p.display())))?;
                out.push(Source {
                    name: p.display().to_string(),
                    text,
                });
            }
        } else {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Failed(format!("reading {f}: {e}")))?;
            out.push(Source {
                name: f.clone(),
                text,
            });
        }
    }
    Ok(out)
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted"),
        () = term => tracing::info!("terminated"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_resolve_like_kubectl() {
        for (typed, kind) in [
            ("wasmplugin", "WasmPlugin"),
            ("wasmplugins", "WasmPlugin"),
            ("WasmPlugin", "WasmPlugin"),
            ("wasmplugins.extensions.istio.io", "WasmPlugin"),
            ("svc", "Service"),
            ("services", "Service"),
            ("gtw", "Gateway"),
            ("gateway.gateway.networking.k8s.io", "Gateway"),
            ("httproutes", "HTTPRoute"),
            ("ns", "Namespace"),
            ("endpointslice", "EndpointSlice"),
            ("gc", "GatewayClass"),
            ("secret", "Secret"),
            ("trafficextensions", "TrafficExtension"),
        ] {
            assert_eq!(resolve_kind(typed).unwrap().kind, kind, "{typed}");
        }
        match resolve_kind("pods") {
            Err(CliError::Failed(m)) => {
                assert_eq!(m, "the server doesn't have a resource type \"pods\"")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn kind_name_pairs() {
        let (k, n) = split_kind_name("svc/reviews").unwrap().unwrap();
        assert_eq!((k.kind, n.as_str()), ("Service", "reviews"));
        assert!(split_kind_name("reviews").unwrap().is_none());
        assert!(split_kind_name("svc/").is_err());
        assert!(split_kind_name("svc/a/b").is_err());
        assert!(split_kind_name("pods/x").is_err());
    }

    #[test]
    fn sources_from_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("b.yaml"), "b").unwrap();
        std::fs::write(d.join("a.json"), "a").unwrap();
        std::fs::write(d.join("c.yml"), "c").unwrap();
        std::fs::write(d.join("notes.txt"), "x").unwrap();
        std::fs::create_dir(d.join("sub.yaml")).unwrap();
        let got = read_sources(&[d.display().to_string()]).unwrap();
        let texts: Vec<&str> = got.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(texts, ["a", "b", "c"]);
        assert_eq!(got[0].name, d.join("a.json").display().to_string());

        let file = d.join("b.yaml").display().to_string();
        assert_eq!(
            read_sources(std::slice::from_ref(&file)).unwrap(),
            [Source {
                name: file.clone(),
                text: "b".into()
            }]
        );
        match read_sources(&["/no/such/file.yaml".into()]) {
            Err(CliError::Failed(m)) => {
                assert_eq!(m, "the path \"/no/such/file.yaml\" does not exist")
            }
            other => panic!("{other:?}"),
        }
    }
}
