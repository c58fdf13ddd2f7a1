//! Objects read from the API server → Waystone's resources.
//!
//! The model parses strictly (a typo is an error for users), but an API server adds fields
//! nobody wrote: `managedFields`, defaults from newer API versions, v1beta1 EndpointSlice
//! topology. They are normalized or dropped here, at this boundary only; the API server has
//! already validated the object against its schema, so a field the model does not know is a
//! field of a newer API, not a typo.

use serde_json::{Map, Value};
use waystone_model::{ParseError, Resource};

/// Reads one object as the API server returns it. `api_version`/`kind` fill in what list items
/// of built-in kinds leave out.
pub fn resource_from_api(
    mut value: Value,
    api_version: &str,
    kind: &str,
) -> Result<Resource, ParseError> {
    let Some(obj) = value.as_object_mut() else {
        return Resource::from_json(value);
    };
    obj.insert("apiVersion".into(), Value::String(api_version.to_string()));
    obj.insert("kind".into(), Value::String(kind.to_string()));
    if let Some(Value::Object(meta)) = obj.get_mut("metadata") {
        // Bookkeeping the model has no use for, and that changes on every write.
        meta.remove("managedFields");
        meta.remove("selfLink");
    }
    if kind == "EndpointSlice" && api_version == "discovery.k8s.io/v1beta1" {
        endpoint_slice_v1beta1_to_v1(obj);
    }
    // The model knows `discovery.k8s.io/v1` and the Gateway API's v1 (and v1beta1).
    if kind == "EndpointSlice" {
        obj.insert(
            "apiVersion".into(),
            Value::String("discovery.k8s.io/v1".into()),
        );
    }
    // Unknown fields are dropped one at a time, each named in the log; bounded so an object
    // the model cannot read at all still ends as an error.
    for _ in 0..32 {
        match Resource::from_json(value.clone()) {
            Ok(r) => return Ok(r),
            Err(e) => {
                let Some(path) = unknown_field_path(&e) else {
                    return Err(e);
                };
                if !remove_path(&mut value, &path) {
                    return Err(e);
                }
                tracing::debug!(kind, field = %path, "ignoring a field Waystone does not read");
            }
        }
    }
    Resource::from_json(value)
}

/// `spec.listeners[0].foo` when the error is serde's "unknown field `foo`".
fn unknown_field_path(e: &ParseError) -> Option<String> {
    let ParseError::Object(o) = e else {
        return None;
    };
    if !o.message.starts_with("unknown field") {
        return None;
    }
    let field = o.message.split('`').nth(1)?;
    // serde_path_to_error reports the path of the field itself.
    if o.path.is_empty() {
        Some(field.to_string())
    } else if o.path.ends_with(field) {
        Some(o.path.clone())
    } else {
        Some(format!("{}.{field}", o.path))
    }
}

/// Removes `a.b[2].c` from `value`; false when the path does not lead anywhere.
fn remove_path(value: &mut Value, path: &str) -> bool {
    let mut parts: Vec<(String, Option<usize>)> = Vec::new();
    for seg in path.split('.') {
        match seg.split_once('[') {
            Some((name, rest)) => {
                let idx = rest.trim_end_matches(']').parse().ok();
                parts.push((name.to_string(), idx));
            }
            None => parts.push((seg.to_string(), None)),
        }
    }
    let Some((last, last_idx)) = parts.pop() else {
        return false;
    };
    if last_idx.is_some() {
        return false;
    }
    let mut cur = value;
    for (name, idx) in parts {
        let Some(next) = cur.get_mut(&name) else {
            return false;
        };
        cur = match idx {
            Some(i) => match next.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            None => next,
        };
    }
    cur.as_object_mut()
        .is_some_and(|m: &mut Map<String, Value>| m.remove(&last).is_some())
}

/// v1beta1 keeps zone and node in `topology`; v1 has fields for them.
fn endpoint_slice_v1beta1_to_v1(obj: &mut Map<String, Value>) {
    let Some(Value::Array(endpoints)) = obj.get_mut("endpoints") else {
        return;
    };
    for ep in endpoints {
        let Some(ep) = ep.as_object_mut() else {
            continue;
        };
        if let Some(Value::Object(topology)) = ep.remove("topology") {
            if let Some(zone) = topology.get("topology.kubernetes.io/zone") {
                ep.entry("zone").or_insert_with(|| zone.clone());
            }
            if let Some(node) = topology.get("kubernetes.io/hostname") {
                ep.entry("nodeName").or_insert_with(|| node.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn server_fields_and_v1beta1_slices_are_read() {
        let slice = json!({
            "metadata": {
                "name": "reviews-1", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "reviews"},
                "managedFields": [{"manager": "kubectl"}],
                "resourceVersion": "7", "uid": "u"
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true},
                           "topology": {"kubernetes.io/hostname": "n1", "topology.kubernetes.io/zone": "z"}}],
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}]
        });
        let r = resource_from_api(slice, "discovery.k8s.io/v1beta1", "EndpointSlice").unwrap();
        let Resource::EndpointSlice(s) = r else {
            panic!("not a slice")
        };
        assert_eq!(s.endpoints[0].node_name.as_deref(), Some("n1"));
        assert_eq!(s.endpoints[0].zone.as_deref(), Some("z"));
        assert!(s.metadata.managed_fields.is_none());
    }

    #[test]
    fn fields_of_newer_apis_are_dropped_but_bad_values_still_fail() {
        let gw = json!({
            "metadata": {"name": "g", "namespace": "default"},
            "spec": {"gatewayClassName": "waystone", "defaultScope": "All",
                     "listeners": [{"name": "http", "port": 80, "protocol": "HTTP", "futureField": 1}]}
        });
        let r = resource_from_api(gw, "gateway.networking.k8s.io/v1", "Gateway").unwrap();
        let Resource::Gateway(g) = r else {
            panic!("not a gateway")
        };
        assert_eq!(g.spec.listeners[0].port, 80);
        let bad = json!({"metadata": {"name": "g"}, "spec": {"listeners": [{"name": "x", "port": "eighty", "protocol": "HTTP"}]}});
        let err = resource_from_api(bad, "gateway.networking.k8s.io/v1", "Gateway").unwrap_err();
        assert!(err.to_string().contains("spec.listeners[0].port"), "{err}");
    }

    #[test]
    fn tcp_routes_read_as_the_server_defaults_them() {
        let route = json!({
            "metadata": {"name": "echo", "namespace": "default", "generation": 2,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {
                "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}],
                "rules": [{"backendRefs": [{"kind": "Service", "name": "echo", "port": 9080, "weight": 1}]}]
            },
            "status": {"parents": [{"controllerName": "example.com/other",
                                    "parentRef": {"name": "elsewhere"}, "conditions": []}]}
        });
        let r = resource_from_api(route, "gateway.networking.k8s.io/v1alpha2", "TCPRoute").unwrap();
        let Resource::TcpRoute(t) = r else {
            panic!("not a TCPRoute")
        };
        assert_eq!(t.spec.rules[0].backend_refs[0].port, Some(9080));
        assert_eq!(t.spec.parent_refs[0].name, "gw");
        assert!(t.status.is_some());
    }
}
