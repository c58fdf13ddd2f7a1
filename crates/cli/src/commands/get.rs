//! `waystone get KIND [NAME...]`: tables, YAML, JSON or names, as kubectl prints them.

use serde_json::{Value, json};
use time::OffsetDateTime;
use waystone_model::KindInfo;

use super::{DEFAULT_NAMESPACE, resolve_kind, split_kind_name};
use crate::args::{GetArgs, OutputFormat};
use crate::client::{ApiClient, ClientError};
use crate::table::{KUBECTL, TableOptions, kind_table};
use crate::{CliError, CliResult};

/// What to fetch: every object of a kind, or named objects (possibly of several kinds).
#[derive(Debug, PartialEq)]
enum Targets {
    All(&'static KindInfo),
    Named(Vec<(&'static KindInfo, String)>),
}

fn targets(kind: &str, names: &[String]) -> CliResult<Targets> {
    if let Some(first) = split_kind_name(kind)? {
        let mut all = vec![first];
        for arg in names {
            all.push(split_kind_name(arg)?.ok_or_else(|| {
                CliError::Failed("there is no need to specify a resource type as a separate argument when passing arguments in resource/name form".into())
            })?);
        }
        return Ok(Targets::Named(all));
    }
    let info = resolve_kind(kind)?;
    if names.is_empty() {
        Ok(Targets::All(info))
    } else {
        Ok(Targets::Named(
            names.iter().map(|n| (info, n.clone())).collect(),
        ))
    }
}

pub async fn run(client: &ApiClient, args: GetArgs) -> CliResult {
    let targets = targets(&args.kind, &args.names)?;
    let selector = args.selector.as_deref().map(Selector::parse).transpose()?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let single = matches!(&targets, Targets::Named(t) if t.len() == 1);

    // Objects grouped by kind, kinds in the order first asked for.
    let mut groups: Vec<(&'static KindInfo, Vec<Value>)> = Vec::new();
    let mut errors = Vec::new();
    match &targets {
        Targets::All(info) => {
            let ns = (info.namespaced && !args.all_namespaces).then_some(namespace.as_str());
            let mut items = client.list(info.kind, ns).await?;
            if let Some(sel) = &selector {
                items.retain(|o| sel.matches(o));
            }
            groups.push((info, items));
        }
        Targets::Named(named) => {
            if selector.is_some() {
                return Err(CliError::Failed(
                    "name cannot be provided when a selector is specified".into(),
                ));
            }
            if args.all_namespaces {
                return Err(CliError::Failed(
                    "a resource cannot be retrieved by name across all namespaces".into(),
                ));
            }
            for (info, name) in named {
                let ns = if info.namespaced {
                    namespace.as_str()
                } else {
                    ""
                };
                match client.get_or_not_found(info.kind, ns, name).await {
                    Ok(obj) => match groups.iter_mut().find(|(k, _)| k.kind == info.kind) {
                        Some((_, items)) => items.push(obj),
                        None => groups.push((info, vec![obj])),
                    },
                    Err(e) if e.is_not_found() => errors.push(e.to_string()),
                    Err(e @ ClientError::Unreachable { .. }) => return Err(e.into()),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
    }

    let out = render(
        &groups,
        args.output,
        single,
        &TableOptions {
            wide: args.output == Some(OutputFormat::Wide),
            all_namespaces: args.all_namespaces,
            show_labels: args.show_labels,
            qualify_names: groups.len() > 1,
        },
        OffsetDateTime::now_utc(),
    )?;
    print!("{}", out.stdout);
    let nothing = groups.iter().all(|(_, items)| items.is_empty());
    if nothing && errors.is_empty() && out.stdout.is_empty() {
        eprintln!(
            "{}",
            no_resources(&targets, args.all_namespaces, &namespace)
        );
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Reported)
    }
}

fn no_resources(targets: &Targets, all_namespaces: bool, namespace: &str) -> String {
    match targets {
        Targets::All(info) if info.namespaced && !all_namespaces => {
            format!("No resources found in {namespace} namespace.")
        }
        _ => "No resources found".into(),
    }
}

struct Rendered {
    stdout: String,
}

fn render(
    groups: &[(&'static KindInfo, Vec<Value>)],
    format: Option<OutputFormat>,
    single: bool,
    opts: &TableOptions,
    now: OffsetDateTime,
) -> CliResult<Rendered> {
    let objects: Vec<&Value> = groups.iter().flat_map(|(_, items)| items).collect();
    let document = || -> Value {
        match (single, objects.as_slice()) {
            (true, [one]) => (*one).clone(),
            _ => json!({
                "apiVersion": "v1",
                "items": objects.iter().map(|o| (*o).clone()).collect::<Vec<_>>(),
                "kind": "List",
                "metadata": {"resourceVersion": ""},
            }),
        }
    };
    let stdout = match format {
        // A single name that was not found prints nothing, not an empty List.
        Some(OutputFormat::Json | OutputFormat::Yaml) if single && objects.is_empty() => {
            String::new()
        }
        Some(OutputFormat::Json) => to_json(&document()),
        Some(OutputFormat::Yaml) => serde_saphyr::to_string(&document())
            .map_err(|e| CliError::Failed(format!("printing YAML: {e}")))?,
        Some(OutputFormat::Name) => groups
            .iter()
            .flat_map(|(info, items)| {
                items.iter().map(move |o| {
                    format!(
                        "{}/{}\n",
                        info.qualified(),
                        o.pointer("/metadata/name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                    )
                })
            })
            .collect(),
        None | Some(OutputFormat::Wide) => groups
            .iter()
            .filter(|(_, items)| !items.is_empty())
            .map(|(info, items)| kind_table(info, items, *opts, now).render(KUBECTL))
            .collect::<Vec<_>>()
            .join("\n"),
    };
    Ok(Rendered { stdout })
}

/// kubectl indents JSON by four spaces.
fn to_json(v: &Value) -> String {
    use serde::Serialize as _;
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut buf,
        serde_json::ser::PrettyFormatter::with_indent(b"    "),
    );
    // Serializing a Value into memory cannot fail.
    let _ = v.serialize(&mut ser);
    let mut s = String::from_utf8(buf).unwrap_or_default();
    s.push('\n');
    s
}

/// An equality-based label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selector(Vec<Term>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
}

impl Selector {
    pub(crate) fn parse(s: &str) -> CliResult<Selector> {
        let bad = |why: &str| CliError::Failed(format!("unable to parse requirement {s:?}: {why}"));
        let valid_key = |k: &str| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        };
        let mut terms = Vec::new();
        for raw in s.split(',').map(str::trim) {
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = raw.strip_prefix('!') {
                Term::NotExists(k.trim().into())
            } else {
                Term::Exists(raw.into())
            };
            let (key, value) = match &term {
                Term::Eq(k, v) | Term::NotEq(k, v) => (k, Some(v)),
                Term::Exists(k) | Term::NotExists(k) => (k, None),
            };
            if !valid_key(key) {
                return Err(bad(
                    "a label key is empty or has characters other than alphanumerics, '-', '_', '.' and '/'",
                ));
            }
            if value.is_some_and(|v| v.contains(['=', '!', ' ', '(', ')'])) {
                return Err(bad("only equality-based requirements are supported"));
            }
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::NotEq(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::NotExists(k) => get(k).is_none(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;
    use waystone_model::lookup_kind;

    const NOW: OffsetDateTime = datetime!(2024-05-01 12:00:00 UTC);

    fn plugin(name: &str) -> Value {
        json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
               "metadata": {"name": name, "namespace": "default", "creationTimestamp": "2024-05-01T11:59:00Z",
                            "labels": {"app": name}},
               "spec": {"url": "oci://r/x:1"}})
    }

    fn out(
        groups: &[(&'static KindInfo, Vec<Value>)],
        format: Option<OutputFormat>,
        single: bool,
    ) -> String {
        render(
            groups,
            format,
            single,
            &TableOptions {
                qualify_names: groups.len() > 1,
                ..Default::default()
            },
            NOW,
        )
        .unwrap()
        .stdout
    }

    #[test]
    fn target_forms() {
        let wp = lookup_kind("wasmplugin").unwrap();
        assert_eq!(targets("wasmplugins", &[]).unwrap(), Targets::All(wp));
        assert_eq!(
            targets("wasmplugin", &["a".into()]).unwrap(),
            Targets::Named(vec![(wp, "a".into())])
        );
        let svc = lookup_kind("svc").unwrap();
        assert_eq!(
            targets("wasmplugin/a", &["svc/b".into()]).unwrap(),
            Targets::Named(vec![(wp, "a".into()), (svc, "b".into())])
        );
        assert!(targets("wasmplugin/a", &["b".into()]).is_err());
        assert!(targets("deployment", &[]).is_err());
    }

    #[test]
    fn one_named_object_prints_as_itself() {
        let wp = lookup_kind("wasmplugin").unwrap();
        let groups = [(wp, vec![plugin("a")])];
        let json_out = out(&groups, Some(OutputFormat::Json), true);
        assert!(
            json_out.starts_with("{\n    \"apiVersion\": \"extensions.istio.io/v1alpha1\",\n"),
            "{json_out}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&json_out).unwrap(),
            plugin("a")
        );
        let yaml = out(&groups, Some(OutputFormat::Yaml), true);
        assert!(
            yaml.starts_with(
                "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata:\n"
            ),
            "{yaml}"
        );
        assert!(yaml.contains("  url: oci://r/x:1\n"), "{yaml}");
    }

    #[test]
    fn several_objects_print_as_a_list() {
        let wp = lookup_kind("wasmplugin").unwrap();
        let groups = [(wp, vec![plugin("a"), plugin("b")])];
        let v: Value =
            serde_json::from_str(&out(&groups, Some(OutputFormat::Json), false)).unwrap();
        assert_eq!(v["kind"], "List");
        assert_eq!(v["apiVersion"], "v1");
        assert_eq!(v["items"][1]["metadata"]["name"], "b");
        // A list query with one result is still a List.
        let v: Value = serde_json::from_str(&out(
            &[(wp, vec![plugin("a")])],
            Some(OutputFormat::Json),
            false,
        ))
        .unwrap();
        assert_eq!(v["kind"], "List");
        let yaml = out(&groups, Some(OutputFormat::Yaml), false);
        assert!(yaml.starts_with("apiVersion: v1\nitems:\n"), "{yaml}");
        assert!(yaml.contains("kind: List\n"), "{yaml}");
        // An empty list query still prints a List for machines.
        let v: Value =
            serde_json::from_str(&out(&[(wp, vec![])], Some(OutputFormat::Json), false)).unwrap();
        assert_eq!(v["items"], json!([]));
        assert_eq!(out(&[], Some(OutputFormat::Json), true), "");
    }

    #[test]
    fn names_and_tables() {
        let wp = lookup_kind("wasmplugin").unwrap();
        let ns = lookup_kind("ns").unwrap();
        let namespace = json!({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": "default", "creationTimestamp": "2024-05-01T11:00:00Z"}});
        let groups = [(wp, vec![plugin("a")]), (ns, vec![namespace])];
        assert_eq!(
            out(&groups, Some(OutputFormat::Name), false),
            "wasmplugin.extensions.istio.io/a\nnamespace/default\n"
        );
        assert_eq!(
            out(&groups, None, false),
            "NAME                               AGE\n\
             wasmplugin.extensions.istio.io/a   60s\n\
             \n\
             NAME                STATUS   AGE\n\
             namespace/default   Active   60m\n"
        );
        assert_eq!(
            out(&[(wp, vec![plugin("a")])], None, false),
            "NAME   AGE\na      60s\n"
        );
        assert_eq!(out(&[(wp, vec![])], None, false), "");
    }

    #[test]
    fn empty_messages() {
        let wp = lookup_kind("wasmplugin").unwrap();
        let ns = lookup_kind("ns").unwrap();
        assert_eq!(
            no_resources(&Targets::All(wp), false, "default"),
            "No resources found in default namespace."
        );
        assert_eq!(
            no_resources(&Targets::All(wp), true, "default"),
            "No resources found"
        );
        assert_eq!(
            no_resources(&Targets::All(ns), false, "default"),
            "No resources found"
        );
    }

    #[test]
    fn selectors() {
        let obj = plugin("reviews");
        let yes = [
            "app=reviews",
            "app==reviews",
            "app",
            "!version",
            "app!=ratings",
            "app=reviews,!x",
        ];
        let no = [
            "app=ratings",
            "!app",
            "version",
            "app!=reviews",
            "app=reviews,x",
        ];
        for s in yes {
            assert!(Selector::parse(s).unwrap().matches(&obj), "{s}");
        }
        for s in no {
            assert!(!Selector::parse(s).unwrap().matches(&obj), "{s}");
        }
        for bad in ["", "=x", "a b=c", "app in (a)"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
