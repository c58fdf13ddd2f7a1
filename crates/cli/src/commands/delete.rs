//! `waystone delete KIND NAME... | -f FILE`: deletes what it can, reports each missing object.

use waystone_model::{KindInfo, parse_manifests};

use super::{
    DEFAULT_NAMESPACE, Failures, namespace_for, read_sources, resolve_kind, split_kind_name,
};
use crate::args::DeleteArgs;
use crate::client::ApiClient;
use crate::{CliError, CliResult};

pub async fn run(client: &ApiClient, args: DeleteArgs) -> CliResult {
    let namespace = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let targets = if args.filenames.is_empty() {
        by_name(
            args.kind.as_deref().unwrap_or_default(),
            &args.names,
            &namespace,
        )?
    } else {
        from_files(&args.filenames, &namespace)?
    };
    let mut failures = Failures::default();
    for (info, ns, name) in targets {
        match client.delete(info.kind, &ns, &name).await {
            Ok(()) => println!("{} \"{name}\" deleted", info.qualified()),
            Err(e) => failures.record(e)?,
        }
    }
    failures.finish()
}

type Target = (&'static KindInfo, String, String);

fn by_name(kind: &str, names: &[String], namespace: &str) -> CliResult<Vec<Target>> {
    if let Some((info, name)) = split_kind_name(kind)? {
        let mut targets = vec![(info, namespace_for(info, namespace), name)];
        for arg in names {
            let (info, name) = split_kind_name(arg)?.ok_or_else(|| {
                CliError::Failed("there is no need to specify a resource type as a separate argument when passing arguments in resource/name form".into())
            })?;
            targets.push((info, namespace_for(info, namespace), name));
        }
        return Ok(targets);
    }
    let info = resolve_kind(kind)?;
    if names.is_empty() {
        return Err(CliError::Failed(
            "resource(s) were provided, but no name was specified".into(),
        ));
    }
    Ok(names
        .iter()
        .map(|n| (info, namespace_for(info, namespace), n.clone()))
        .collect())
}

fn from_files(filenames: &[String], namespace: &str) -> CliResult<Vec<Target>> {
    let mut targets = Vec::new();
    for source in read_sources(filenames)? {
        let objects = parse_manifests(&source.text, &source.name)
            .map_err(|e| CliError::Failed(e.to_string()))?;
        for obj in objects {
            let info = obj.kind_info();
            let ns = obj
                .meta()
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| namespace.to_string());
            targets.push((info, namespace_for(info, &ns), obj.meta().name.clone()));
        }
    }
    if targets.is_empty() {
        return Err(CliError::Failed("no objects passed to delete".into()));
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[Target]) -> Vec<(&str, &str, &str)> {
        v.iter()
            .map(|(i, ns, n)| (i.kind, ns.as_str(), n.as_str()))
            .collect()
    }

    #[test]
    fn targets_by_name() {
        let t = by_name("wasmplugin", &["a".into(), "b".into()], "ns1").unwrap();
        assert_eq!(
            names(&t),
            [("WasmPlugin", "ns1", "a"), ("WasmPlugin", "ns1", "b")]
        );
        let t = by_name("svc/reviews", &["ns/default".into()], "x").unwrap();
        assert_eq!(
            names(&t),
            [("Service", "x", "reviews"), ("Namespace", "", "default")]
        );
        assert!(by_name("svc/reviews", &["other".into()], "x").is_err());
        assert!(by_name("svc", &[], "x").is_err());
    }

    #[test]
    fn targets_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(
            &f,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: reviews\nspec:\n  ports:\n  - port: 9080\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: bookinfo\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: ratings\n  namespace: other\nspec:\n  ports:\n  - port: 9080\n",
        )
        .unwrap();
        let t = from_files(&[f.display().to_string()], "default").unwrap();
        assert_eq!(
            names(&t),
            [
                ("Service", "default", "reviews"),
                ("Namespace", "", "bookinfo"),
                ("Service", "other", "ratings")
            ]
        );
    }
}
