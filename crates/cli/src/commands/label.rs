//! `waystone label KIND NAME k=v k-`: kubectl's label command.

use std::collections::BTreeMap;

use waystone_control::api::LabelRequest;

use super::{DEFAULT_NAMESPACE, Failures, namespace_for, resolve_kind, split_kind_name};
use crate::args::LabelArgs;
use crate::client::ApiClient;
use crate::{CliError, CliResult};

/// Names and label changes, told apart as kubectl does: `k=v` sets, `k-` removes, the rest
/// are names.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LabelChanges {
    pub names: Vec<String>,
    pub set: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

pub(crate) fn parse_label_args(args: &[String]) -> Result<LabelChanges, String> {
    let mut out = LabelChanges::default();
    for arg in args {
        if let Some((key, value)) = arg.split_once('=') {
            if key.is_empty() || value.contains('=') {
                return Err(format!("invalid label spec: {arg}"));
            }
            if let Some(old) = out.set.insert(key.to_string(), value.to_string())
                && old != value
            {
                return Err(format!(
                    "label {key:?} is given two values: {old:?} and {value:?}"
                ));
            }
        } else if let Some(key) = arg.strip_suffix('-') {
            if key.is_empty() || key.ends_with('-') {
                return Err(format!("invalid label spec: {arg}"));
            }
            out.remove.push(key.to_string());
        } else {
            out.names.push(arg.clone());
        }
    }
    if let Some(k) = out.remove.iter().find(|k| out.set.contains_key(*k)) {
        return Err(format!(
            "can not both modify and remove label {k:?} in the same command"
        ));
    }
    if out.set.is_empty() && out.remove.is_empty() {
        return Err("at least one label update is required".into());
    }
    Ok(out)
}

pub async fn run(client: &ApiClient, args: LabelArgs) -> CliResult {
    let changes = parse_label_args(&args.args).map_err(CliError::Failed)?;
    let namespace = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let targets = match split_kind_name(&args.kind)? {
        Some((info, name)) => {
            if !changes.names.is_empty() {
                return Err(CliError::Failed(
                    "there is no need to specify a resource type as a separate argument when passing arguments in resource/name form".into(),
                ));
            }
            vec![(info, name)]
        }
        None => {
            let info = resolve_kind(&args.kind)?;
            if changes.names.is_empty() {
                return Err(CliError::Failed("one or more resources must be specified as <resource> <name> or <resource>/<name>".into()));
            }
            changes.names.iter().map(|n| (info, n.clone())).collect()
        }
    };
    let mut failures = Failures::default();
    for (info, name) in targets {
        let req = LabelRequest {
            kind: info.kind.to_string(),
            namespace: namespace_for(info, &namespace),
            name: name.clone(),
            set: changes.set.clone(),
            remove: changes.remove.clone(),
            overwrite: args.overwrite,
        };
        match client.label(&req).await {
            Ok(resp) => println!(
                "{}/{name} {}",
                info.qualified(),
                action_word(&resp.action, &changes)
            ),
            Err(e) => failures.record(e)?,
        }
    }
    failures.finish()
}

/// kubectl says `unlabeled` when the change only removed labels.
fn action_word(server: &str, changes: &LabelChanges) -> String {
    if server == "labeled" && changes.set.is_empty() {
        "unlabeled".into()
    } else {
        server.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sets_removals_and_names() {
        let c = parse_label_args(&args(&[
            "reviews",
            "istio.io/use-waypoint=reviews-svc-waypoint",
            "old-",
            "ratings",
            "empty=",
        ]))
        .unwrap();
        assert_eq!(c.names, ["reviews", "ratings"]);
        assert_eq!(
            c.set.get("istio.io/use-waypoint").map(String::as_str),
            Some("reviews-svc-waypoint")
        );
        assert_eq!(c.set.get("empty").map(String::as_str), Some(""));
        assert_eq!(c.remove, ["old"]);
    }

    #[test]
    fn bad_forms() {
        for (a, want) in [
            (&["x", "=v"][..], "invalid label spec: =v"),
            (&["x", "a=b=c"], "invalid label spec: a=b=c"),
            (&["x", "-"], "invalid label spec: -"),
            (&["x", "a--"], "invalid label spec: a--"),
            (&["x"], "at least one label update is required"),
            (
                &["x", "a=1", "a-"],
                "can not both modify and remove label \"a\" in the same command",
            ),
            (
                &["x", "a=1", "a=2"],
                "label \"a\" is given two values: \"1\" and \"2\"",
            ),
        ] {
            assert_eq!(parse_label_args(&args(a)).unwrap_err(), want, "{a:?}");
        }
        assert!(parse_label_args(&args(&["x", "a=1", "a=1"])).is_ok());
    }

    #[test]
    fn action_words() {
        let set = parse_label_args(&args(&["x", "a=1"])).unwrap();
        let remove = parse_label_args(&args(&["x", "a-"])).unwrap();
        assert_eq!(action_word("labeled", &set), "labeled");
        assert_eq!(action_word("labeled", &remove), "unlabeled");
        assert_eq!(action_word("not labeled", &remove), "not labeled");
    }
}
