//! The object lifecycle: what `apply`, `delete` and `label` do to the store,
//! with Kubernetes' bookkeeping (uid, creationTimestamp, resourceVersion,
//! generation) and the rule that a change which does not translate is refused.

use std::collections::{BTreeMap, BTreeSet};

use waystone_model::{Resource, lookup_kind, parse_manifests, translate::TranslateOptions};

use crate::api::{ApplyResult, LabelRequest};
use crate::store::{Store, StoreError, Write};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Bad input: the message is ready for the user.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn key_of(r: &Resource) -> (&'static str, String, String) {
    (
        r.kind_info().kind,
        r.meta().namespace.clone().unwrap_or_default(),
        r.meta().name.clone(),
    )
}

/// The parts of an object a user writes: a re-apply of the same is `unchanged`.
fn user_view(r: &Resource) -> serde_json::Value {
    let mut v = r.to_json();
    if let Some(obj) = v.as_object_mut() {
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for k in [
                "creationTimestamp",
                "resourceVersion",
                "generation",
                "uid",
                "managedFields",
            ] {
                meta.remove(k);
            }
        }
    }
    v
}

/// Parses, validates and stores `manifests` as one atomic change.
pub fn apply(
    store: &mut Store,
    manifests: &str,
    source: &str,
    default_namespace: &str,
    opts: &TranslateOptions,
) -> Result<(Vec<ApplyResult>, u64), ObjectError> {
    let mut parsed =
        parse_manifests(manifests, source).map_err(|e| ObjectError::Invalid(e.to_string()))?;
    if parsed.is_empty() {
        return Err(ObjectError::Invalid(format!(
            "{source}: no objects passed to apply"
        )));
    }
    for r in &mut parsed {
        r.set_default_namespace(default_namespace);
        // What the server owns is never taken from the user.
        r.set_status(None);
        r.validate()
            .map_err(|e| ObjectError::Invalid(e.to_string()))?;
        fold_string_data(r);
    }
    let mut seen = BTreeSet::new();
    for r in &parsed {
        if !seen.insert(key_of(r)) {
            let (k, ns, n) = key_of(r);
            return Err(ObjectError::Invalid(format!(
                "{source}: {k} {ns}/{n} appears twice"
            )));
        }
    }

    let version = store.current_version()? + 1;
    let now = now_rfc3339();
    let mut writes = Vec::new();
    let mut results = Vec::new();
    let mut namespaces: BTreeSet<String> = BTreeSet::new();
    for mut r in parsed {
        let (kind, ns, name) = key_of(&r);
        if r.kind_info().namespaced {
            namespaces.insert(ns.clone());
        }
        let existing = store.get(kind, &ns, &name)?;
        check_resource_version(&r, existing.as_ref(), source)?;
        let action = match &existing {
            None => {
                let m = r.meta_mut();
                m.uid = Some(new_uid());
                m.creation_timestamp = Some(now.clone());
                m.generation = Some(1);
                m.resource_version = Some(version.to_string());
                "created"
            }
            Some(old) if user_view(old) == user_view(&r) => {
                results.push(result(&r, "unchanged"));
                continue;
            }
            Some(old) => {
                let generation = old.meta().generation.unwrap_or(1);
                let spec_changed = old.spec_json() != r.spec_json();
                let m = r.meta_mut();
                m.uid = old.meta().uid.clone();
                m.creation_timestamp = old.meta().creation_timestamp.clone();
                m.generation = Some(if spec_changed {
                    generation + 1
                } else {
                    generation
                });
                m.resource_version = Some(version.to_string());
                r.set_status(old.status().cloned());
                "configured"
            }
        };
        results.push(result(&r, action));
        writes.push(Write::Put(Box::new(r)));
    }
    // On one machine namespaces are implicit: create the ones objects land in.
    for ns in namespaces {
        if store.get("Namespace", "", &ns)?.is_none()
            && !writes.iter().any(|w| matches!(w, Write::Put(r) if r.kind_info().kind == "Namespace" && r.meta().name == ns))
        {
            writes.push(Write::Put(Box::new(new_namespace(&ns, version, &now))));
        }
    }
    if writes.is_empty() {
        return Ok((results, store.current_version()?));
    }
    refuse_untranslatable(store, &writes, opts)?;
    store.commit(&writes, version)?;
    Ok((results, version))
}

/// Optimistic concurrency as in Kubernetes: an apply that names a `metadata.resourceVersion`
/// only lands on that version of the object; a writer that read an older one gets 409 and must
/// re-read. Without a resourceVersion the apply wins, as `kubectl apply` does. (Creating an
/// object with one set is let through: the version is server-owned and replaced.)
fn check_resource_version(
    r: &Resource,
    existing: Option<&Resource>,
    source: &str,
) -> Result<(), ObjectError> {
    let (Some(given), Some(old)) = (
        r.meta()
            .resource_version
            .as_deref()
            .filter(|v| !v.is_empty()),
        existing,
    ) else {
        return Ok(());
    };
    if old.meta().resource_version.as_deref() == Some(given) {
        return Ok(());
    }
    let info = r.kind_info();
    let resource = if info.group.is_empty() {
        info.plural.to_string()
    } else {
        format!("{}.{}", info.plural, info.group)
    };
    Err(ObjectError::Conflict(format!(
        "error when applying patch to {} {}/{} from {source:?} (resourceVersion {given}, stored {}): \
         Operation cannot be fulfilled on {resource} \"{}\": the object has been modified; \
         please apply your changes to the latest version and try again",
        info.kind,
        r.meta().namespace.as_deref().unwrap_or(""),
        r.meta().name,
        old.meta().resource_version.as_deref().unwrap_or("none"),
        r.meta().name,
    )))
}

/// As the API server does: a Secret's `stringData` is write-only, merged into `data`
/// (base64, winning over the same key) and never stored or shown.
fn fold_string_data(r: &mut Resource) {
    use base64::Engine as _;
    let Resource::Secret(secret) = r else {
        return;
    };
    for (k, v) in std::mem::take(&mut secret.string_data) {
        secret
            .data
            .insert(k, base64::engine::general_purpose::STANDARD.encode(v));
    }
}

fn result(r: &Resource, action: &str) -> ApplyResult {
    ApplyResult {
        kind: r.kind_info().kind.to_string(),
        namespace: r.meta().namespace.clone().unwrap_or_default(),
        name: r.meta().name.clone(),
        action: action.to_string(),
        warnings: Vec::new(),
    }
}

pub fn new_namespace(name: &str, version: u64, now: &str) -> Resource {
    let mut ns = Resource::from_json(serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}
    }))
    .expect("a bare Namespace is valid");
    let m = ns.meta_mut();
    m.uid = Some(new_uid());
    m.creation_timestamp = Some(now.to_string());
    m.generation = Some(1);
    m.resource_version = Some(version.to_string());
    ns
}

/// A change whose own objects do not translate is refused; the running config stays.
fn refuse_untranslatable(
    store: &Store,
    writes: &[Write],
    opts: &TranslateOptions,
) -> Result<(), ObjectError> {
    let mut objects: BTreeMap<(&'static str, String, String), Resource> = store
        .list(None, None)?
        .into_iter()
        .map(|r| (key_of(&r), r))
        .collect();
    let mut touched = BTreeSet::new();
    for w in writes {
        match w {
            Write::Put(r) => {
                touched.insert(key_of(r));
                objects.insert(key_of(r), (**r).clone());
            }
            Write::Delete {
                kind,
                namespace,
                name,
            } => {
                objects.remove(&(*kind, namespace.clone(), name.clone()));
            }
        }
    }
    let all: Vec<Resource> = objects.into_values().collect();
    let translation = waystone_model::translate::translate(&all, opts);
    let errors: Vec<String> = translation
        .errors
        .iter()
        .filter(|e| touched.contains(&(e.kind, e.key.namespace.clone(), e.key.name.clone())))
        .map(|e| format!("{} {}: {}", e.kind, e.key, e.message))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ObjectError::Invalid(errors.join("; ")))
    }
}

/// Resolves a kind name the way kubectl does, or says it is unknown.
pub fn canonical_kind(kind: &str) -> Result<&'static waystone_model::KindInfo, ObjectError> {
    lookup_kind(kind).ok_or_else(|| {
        ObjectError::Invalid(format!(
            "the server doesn't have a resource type \"{kind}\""
        ))
    })
}

pub fn not_found(info: &waystone_model::KindInfo, name: &str) -> ObjectError {
    let plural = if info.group.is_empty() {
        info.plural.to_string()
    } else {
        format!("{}.{}", info.plural, info.group)
    };
    ObjectError::NotFound(format!("{plural} \"{name}\" not found"))
}

pub fn delete(
    store: &mut Store,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<u64, ObjectError> {
    let info = canonical_kind(kind)?;
    let namespace = if info.namespaced { namespace } else { "" };
    if store.get(info.kind, namespace, name)?.is_none() {
        return Err(not_found(info, name));
    }
    let version = store.current_version()? + 1;
    store.commit(
        &[Write::Delete {
            kind: info.kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        }],
        version,
    )?;
    Ok(version)
}

pub fn label(
    store: &mut Store,
    req: &LabelRequest,
    opts: &TranslateOptions,
) -> Result<(String, u64), ObjectError> {
    let info = canonical_kind(&req.kind)?;
    let namespace = if info.namespaced {
        req.namespace.as_str()
    } else {
        ""
    };
    let Some(mut obj) = store.get(info.kind, namespace, &req.name)? else {
        return Err(not_found(info, &req.name));
    };
    let mut changed = false;
    {
        let labels = &mut obj.meta_mut().labels;
        for (k, v) in &req.set {
            validate_label(k, v)?;
            match labels.get(k) {
                Some(old) if old == v => {}
                Some(old) if !req.overwrite => {
                    return Err(ObjectError::Conflict(format!(
                        "'{k}' already has a value ({old}), and --overwrite is false"
                    )));
                }
                _ => {
                    labels.insert(k.clone(), v.clone());
                    changed = true;
                }
            }
        }
        for k in &req.remove {
            changed |= labels.remove(k).is_some();
        }
    }
    if !changed {
        return Ok(("not labeled".into(), store.current_version()?));
    }
    let version = store.current_version()? + 1;
    obj.meta_mut().resource_version = Some(version.to_string());
    let writes = [Write::Put(Box::new(obj))];
    refuse_untranslatable(store, &writes, opts)?;
    store.commit(&writes, version)?;
    Ok(("labeled".into(), version))
}

fn validate_label(key: &str, value: &str) -> Result<(), ObjectError> {
    let name = key.rsplit('/').next().unwrap_or(key);
    let ok_chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let edges = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
    };
    if name.is_empty() || name.len() > 63 || !ok_chars(name) || !edges(name) {
        return Err(ObjectError::Invalid(format!("invalid label key {key:?}")));
    }
    if value.len() > 63 || (!value.is_empty() && (!ok_chars(value) || !edges(value))) {
        return Err(ObjectError::Invalid(format!(
            "invalid label value {value:?} for {key:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(rv: Option<&str>, port: u16) -> String {
        let rv = rv
            .map(|v| format!("\n  resourceVersion: \"{v}\""))
            .unwrap_or_default();
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: s{rv}\nspec:\n  ports: [{{port: {port}}}]\n"
        )
    }

    #[test]
    fn secret_string_data_is_stored_as_data_like_the_api_server() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {a: eA==, b: eA==}\nstringData: {b: hello}\n";
        apply(
            &mut store,
            yaml,
            "s.yaml",
            "default",
            &TranslateOptions::default(),
        )
        .unwrap();
        let stored = store
            .get("Secret", "default", "s")
            .unwrap()
            .unwrap()
            .to_json();
        assert_eq!(
            stored["data"],
            serde_json::json!({"a": "eA==", "b": "aGVsbG8="})
        );
        assert!(stored.get("stringData").is_none(), "{stored}");
        // Re-applying the same manifest changes nothing.
        let (r, _) = apply(
            &mut store,
            yaml,
            "s.yaml",
            "default",
            &TranslateOptions::default(),
        )
        .unwrap();
        assert_eq!(r[0].action, "unchanged");
    }

    #[test]
    fn a_stale_resource_version_is_a_conflict_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let opts = TranslateOptions::default();
        let (_, v1) = apply(&mut store, &service(None, 80), "a.yaml", "default", &opts).unwrap();
        let (r, v2) = apply(&mut store, &service(None, 81), "a.yaml", "default", &opts).unwrap();
        assert_eq!(r[0].action, "configured");
        assert!(v2 > v1);

        let err = apply(
            &mut store,
            &service(Some(&v1.to_string()), 82),
            "stale.yaml",
            "default",
            &opts,
        )
        .unwrap_err();
        let ObjectError::Conflict(msg) = &err else {
            panic!("{err:?}")
        };
        assert!(
            msg.contains("Operation cannot be fulfilled on services \"s\"")
                && msg.contains("the object has been modified")
                && msg.contains("stale.yaml"),
            "{msg}"
        );
        let stored = store.get("Service", "default", "s").unwrap().unwrap();
        assert_eq!(
            stored.meta().resource_version.as_deref(),
            Some(&*v2.to_string())
        );
        assert!(stored.spec_json().to_string().contains("81"));

        // The current version lands, and bumps it.
        let (r, v3) = apply(
            &mut store,
            &service(Some(&v2.to_string()), 82),
            "fresh.yaml",
            "default",
            &opts,
        )
        .unwrap();
        assert_eq!((r[0].action.as_str(), v3), ("configured", v2 + 1));
    }
}
