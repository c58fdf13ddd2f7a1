//! `waystone waypoint apply|list|delete`: istioctl's waypoint commands.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use waystone_control::api::{ApplyRequest, LabelRequest};

use super::{DEFAULT_NAMESPACE, Failures, print_apply_results};
use crate::args::{TrafficType, WaypointApplyArgs, WaypointDeleteArgs, WaypointListArgs};
use crate::client::ApiClient;
use crate::table::{ISTIOCTL, Table};
use crate::{CliError, CliResult};

pub(crate) const WAYPOINT_CLASS: &str = "istio-waypoint";
pub(crate) const USE_WAYPOINT: &str = "istio.io/use-waypoint";
const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
const REV: &str = "istio.io/rev";
const POLL: Duration = Duration::from_millis(200);

/// The Gateway istioctl composes for a waypoint.
pub(crate) fn waypoint_gateway(
    name: &str,
    namespace: &str,
    traffic: Option<TrafficType>,
) -> CliResult<Value> {
    if name == "none" {
        return Err(CliError::Failed(
            "invalid name provided for waypoint, 'none' is a reserved value".into(),
        ));
    }
    let mut metadata = json!({"name": name, "namespace": namespace});
    if let Some(t) = traffic {
        metadata["labels"] = json!({WAYPOINT_FOR: t.as_str()});
    }
    Ok(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": metadata,
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }))
}

fn is_waypoint(gw: &Value) -> bool {
    gw.pointer("/spec/gatewayClassName").and_then(Value::as_str) == Some(WAYPOINT_CLASS)
}

fn label<'a>(obj: &'a Value, key: &str) -> Option<&'a str> {
    obj.pointer("/metadata/labels")
        .and_then(|l| l.get(key))
        .and_then(Value::as_str)
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj.pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
}

fn programmed(gw: &Value) -> bool {
    condition(gw, "Programmed")
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        == Some("True")
}

pub async fn apply(client: &ApiClient, args: WaypointApplyArgs) -> CliResult {
    let ns = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let name = if args.name.is_empty() {
        "waypoint".to_string()
    } else {
        args.name
    };
    let gateway = waypoint_gateway(&name, &ns, args.for_traffic)?;

    let namespace_obj = client.get("Namespace", "", &ns).await?;
    if args.enroll_namespace && !args.overwrite {
        // As istioctl: an enrolled namespace is not moved to another waypoint without
        // --overwrite, and nothing is applied. Re-applying the same waypoint is fine.
        if let Some(current) = namespace_obj
            .as_ref()
            .and_then(|n| label(n, USE_WAYPOINT))
            .filter(|c| !c.is_empty())
            && current != name
        {
            eprintln!(
                "Warning: namespace ({ns}) already has an enrolled waypoint ({current}). \
                 Consider adding the --overwrite flag to your apply command."
            );
            return Ok(());
        }
    }
    // A Gateway of another class under this name is somebody's ingress: never turn it into a waypoint.
    if let Some(existing) = client.get("Gateway", &ns, &name).await?
        && !is_waypoint(&existing)
    {
        let class = existing
            .pointer("/spec/gatewayClassName")
            .and_then(Value::as_str)
            .unwrap_or("");
        return Err(CliError::Failed(format!(
            "gateway {ns}/{name} already exists with gatewayClassName {class:?}; it is not a waypoint"
        )));
    }

    let req = ApplyRequest {
        manifests: gateway.to_string(),
        source: "waypoint apply".into(),
        default_namespace: ns.clone(),
    };
    let resp = client.apply(&req).await?;
    for r in &resp.results {
        for w in &r.warnings {
            eprintln!("Warning: {w}");
        }
    }
    println!("waypoint {ns}/{name} applied");

    if args.wait {
        wait_programmed(client, &ns, &name, args.waypoint_timeout).await?;
        println!("waypoint {ns}/{name} is ready!");
    }

    if args.enroll_namespace {
        enroll(client, &ns, &name, namespace_obj.is_some()).await?;
        println!("namespace {ns} labeled with \"{USE_WAYPOINT}={name}\"");
    }
    Ok(())
}

async fn wait_programmed(client: &ApiClient, ns: &str, name: &str, timeout: Duration) -> CliResult {
    let deadline = Instant::now() + timeout;
    loop {
        let gw = client.get("Gateway", ns, name).await?;
        if gw.as_ref().is_some_and(programmed) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = gw
                .as_ref()
                .and_then(|g| condition(g, "Programmed"))
                .and_then(|c| c.get("message"))
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(|m| format!(": {m}"))
                .unwrap_or_default();
            return Err(CliError::Failed(format!(
                "timed out after {}s while waiting for waypoint {ns}/{name} to be programmed{why}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// On one machine namespaces are implicit: enrolling one the store lacks creates it.
async fn enroll(client: &ApiClient, ns: &str, name: &str, exists: bool) -> CliResult {
    if exists {
        let req = LabelRequest {
            kind: "Namespace".into(),
            namespace: String::new(),
            name: ns.to_string(),
            set: BTreeMap::from([(USE_WAYPOINT.to_string(), name.to_string())]),
            remove: Vec::new(),
            overwrite: true,
        };
        client.label(&req).await?;
    } else {
        let namespace = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "labels": {USE_WAYPOINT: name}},
        });
        let req = ApplyRequest {
            manifests: namespace.to_string(),
            source: "waypoint apply --enroll-namespace".into(),
            default_namespace: ns.to_string(),
        };
        let resp = client.apply(&req).await?;
        if resp.results.iter().any(|r| !r.warnings.is_empty()) {
            print_apply_results(&resp);
        }
    }
    Ok(())
}

pub async fn list(client: &ApiClient, args: WaypointListArgs) -> CliResult {
    let ns = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let gateways = client
        .list("Gateway", (!args.all_namespaces).then_some(ns.as_str()))
        .await?;
    print!("{}", list_output(&gateways, args.all_namespaces));
    Ok(())
}

/// istioctl's waypoint table; waypoints sorted by namespace, then name.
fn list_output(gateways: &[Value], all_namespaces: bool) -> String {
    let mut waypoints: Vec<&Value> = gateways.iter().filter(|g| is_waypoint(g)).collect();
    if waypoints.is_empty() {
        return "No waypoints found.\n".into();
    }
    let key = |g: &Value, p: &str| {
        g.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    waypoints.sort_by_key(|g| (key(g, "/metadata/namespace"), key(g, "/metadata/name")));
    let mut headers = vec!["NAME", "REVISION", "TRAFFIC TYPE", "PROGRAMMED"];
    if all_namespaces {
        headers.insert(0, "NAMESPACE");
    }
    let mut table = Table::new(headers);
    for gw in waypoints {
        let mut row = Vec::new();
        if all_namespaces {
            row.push(key(gw, "/metadata/namespace"));
        }
        row.push(key(gw, "/metadata/name"));
        row.push(
            label(gw, REV)
                .filter(|r| !r.is_empty())
                .unwrap_or("default")
                .to_string(),
        );
        row.push(
            label(gw, WAYPOINT_FOR)
                .filter(|r| !r.is_empty())
                .unwrap_or("none")
                .to_string(),
        );
        row.push(
            condition(gw, "Programmed")
                .and_then(|c| c.get("status"))
                .and_then(Value::as_str)
                .unwrap_or("False")
                .to_string(),
        );
        table.rows.push(row);
    }
    table.render(ISTIOCTL)
}

pub async fn delete(client: &ApiClient, args: WaypointDeleteArgs) -> CliResult {
    let ns = args.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let gateways = client.list("Gateway", Some(&ns)).await?;
    let waypoints: Vec<String> = gateways
        .iter()
        .filter(|g| is_waypoint(g))
        .filter_map(|g| {
            g.pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect();
    let names = if args.all {
        waypoints.clone()
    } else {
        args.names
    };
    let mut failures = Failures::default();
    for name in names {
        // As istioctl: a name that is not a waypoint here is reported, not an error.
        if !waypoints.contains(&name) {
            println!("waypoint {ns}/{name} not found");
            continue;
        }
        match client.delete("Gateway", &ns, &name).await {
            Ok(()) => println!("waypoint {ns}/{name} deleted"),
            Err(e) if e.is_not_found() => println!("waypoint {ns}/{name} not found"),
            Err(e) => failures.record(e)?,
        }
    }
    failures.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_composition() {
        let gw = waypoint_gateway("waypoint", "default", None).unwrap();
        assert_eq!(
            gw,
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "default"},
                "spec": {"gatewayClassName": "istio-waypoint",
                         "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
            })
        );
        let gw = waypoint_gateway(
            "reviews-svc-waypoint",
            "bookinfo",
            Some(TrafficType::Service),
        )
        .unwrap();
        assert_eq!(
            gw["metadata"]["labels"],
            json!({"istio.io/waypoint-for": "service"})
        );
        assert_eq!(gw["metadata"]["namespace"], "bookinfo");
        match waypoint_gateway("none", "default", None) {
            Err(CliError::Failed(m)) => assert_eq!(
                m,
                "invalid name provided for waypoint, 'none' is a reserved value"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn composed_gateway_is_a_valid_resource() {
        let gw = waypoint_gateway("waypoint", "default", Some(TrafficType::All)).unwrap();
        let parsed = waystone_model::parse_manifests(&gw.to_string(), "waypoint apply").unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind_info().kind, "Gateway");
        assert_eq!(parsed[0].display_name(), "default/waypoint");
    }

    #[test]
    fn list_table() {
        let gw = |ns: &str, name: &str, class: &str, labels: Value, status: Value| {
            json!({"metadata": {"name": name, "namespace": ns, "labels": labels},
                   "spec": {"gatewayClassName": class}, "status": status})
        };
        let gateways = [
            gw(
                "default",
                "waypoint",
                "istio-waypoint",
                json!({}),
                json!({"conditions": [{"type": "Programmed", "status": "True"}]}),
            ),
            gw("default", "bookinfo-gateway", "istio", json!({}), json!({})),
            gw(
                "default",
                "reviews-svc-waypoint",
                "istio-waypoint",
                json!({"istio.io/waypoint-for": "service", "istio.io/rev": "canary"}),
                json!({}),
            ),
        ];
        assert_eq!(
            list_output(&gateways, false),
            "NAME                     REVISION     TRAFFIC TYPE     PROGRAMMED\n\
             reviews-svc-waypoint     canary       service          False\n\
             waypoint                 default      none             True\n"
        );
        assert_eq!(
            list_output(&gateways[..1], true),
            "NAMESPACE     NAME         REVISION     TRAFFIC TYPE     PROGRAMMED\n\
             default       waypoint     default      none             True\n"
        );
        assert_eq!(list_output(&gateways[1..2], false), "No waypoints found.\n");
    }

    #[test]
    fn programmed_condition() {
        assert!(programmed(
            &json!({"status": {"conditions": [{"type": "Programmed", "status": "True"}]}})
        ));
        assert!(!programmed(
            &json!({"status": {"conditions": [{"type": "Programmed", "status": "False"}]}})
        ));
        assert!(!programmed(
            &json!({"status": {"conditions": [{"type": "Accepted", "status": "True"}]}})
        ));
        assert!(!programmed(&json!({})));
    }
}
