//! `waystone describe wasmplugin NAME`: where a plugin runs (gateways, waypoints, services,
//! with its position in each chain), its module, load state and last error, and its
//! conditions — the stored object joined with the config dump of what runs.

use serde_json::Value;

use super::{DEFAULT_NAMESPACE, resolve_kind};
use crate::args::DescribeArgs;
use crate::client::ApiClient;
use crate::table::{KUBECTL, Table};
use crate::{CliError, CliResult};

pub async fn run(client: &ApiClient, args: DescribeArgs) -> CliResult {
    let info = resolve_kind(&args.kind)?;
    if !matches!(info.kind, "WasmPlugin" | "TrafficExtension") {
        return Err(CliError::Failed(format!(
            "describe supports wasmplugin and trafficextension, not {}",
            info.kind
        )));
    }
    let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let object = client
        .get_or_not_found(info.kind, namespace, &args.name)
        .await?;
    let dump = client.all_config_dumps().await?;
    print!("{}", describe_plugin(&object, &dump));
    Ok(())
}

fn text(v: &Value, unset: &str) -> String {
    match v {
        Value::Null => unset.to_string(),
        Value::String(s) if s.is_empty() => unset.to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Where `plugin` (by config-dump name) sits: (kind, gateway, listener or service, port,
/// position/length).
fn attachments(dump: &Value, plugin: &str) -> Vec<[String; 5]> {
    let mut rows = Vec::new();
    let arr = |v: &Value| v.as_array().cloned().unwrap_or_default();
    for gw in arr(&dump["gateways"]) {
        let key = format!("{}/{}", text(&gw["namespace"], ""), text(&gw["name"], ""));
        let mut check = |kind: &str, at: String, port: &Value, chain: &Value| {
            let chain = arr(chain);
            if let Some(i) = chain.iter().position(|p| p["name"] == plugin) {
                rows.push([
                    kind.to_string(),
                    key.clone(),
                    at,
                    text(port, "-"),
                    format!("{}/{}", i + 1, chain.len()),
                ]);
            }
        };
        if gw["kind"] == "waypoint" {
            for svc in arr(&gw["services"]) {
                for p in arr(&svc["ports"]) {
                    check(
                        "Waypoint",
                        text(&svc["service"], "-"),
                        &p["port"],
                        &p["chain"],
                    );
                }
            }
        } else {
            for l in arr(&gw["listeners"]) {
                check("Gateway", text(&l["name"], "-"), &l["port"], &l["chain"]);
            }
        }
    }
    rows
}

/// kubectl-describe-like text for a WasmPlugin or TrafficExtension.
pub fn describe_plugin(object: &Value, dump: &Value) -> String {
    let meta = &object["metadata"];
    let name = text(&meta["name"], "");
    let namespace = text(&meta["namespace"], DEFAULT_NAMESPACE);
    let kind = text(&object["kind"], "WasmPlugin");
    let spec = &object["spec"];
    let status = &object["status"];
    let running = dump["plugins"].as_array().and_then(|ps| {
        ps.iter().find(|p| {
            p["kind"] == kind.as_str()
                && p["namespace"] == namespace.as_str()
                && p["resource"] == name.as_str()
        })
    });
    let loaded = status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "ModuleLoaded"));
    let field = |running_key: &str, fallback: &Value, unset: &str| match running {
        Some(p) if !p[running_key].is_null() => text(&p[running_key], unset),
        _ => text(fallback, unset),
    };
    let url = match running {
        Some(p) => text(&p["url"], "<unset>"),
        None => text(
            if spec["url"].is_null() {
                &spec["wasm"]["url"]
            } else {
                &spec["url"]
            },
            "<unset>",
        ),
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    line("Name", name.clone());
    line("Namespace", namespace.clone());
    line("Kind", kind.clone());
    line("Phase", field("phase", &spec["phase"], "UNSPECIFIED_PHASE"));
    line("Priority", field("priority", &spec["priority"], "<unset>"));
    line(
        "Fail Strategy",
        field("failStrategy", &spec["failStrategy"], "FAIL_CLOSE"),
    );
    out.push_str("Module:\n");
    let mut sub = |k: &str, v: String| out.push_str(&format!("  {:<14}{v}\n", format!("{k}:")));
    sub("URL", url);
    sub(
        "Digest",
        field("digest", &status["module"]["digest"], "<none>"),
    );
    let state = match (running, loaded) {
        (Some(p), _) => text(&p["state"], "Pending"),
        (None, Some(c)) => text(&c["reason"], "Pending"),
        (None, None) => "Pending".into(),
    };
    sub("State", state);
    let last_error = match running {
        Some(p) => text(&p["lastError"], "<none>"),
        None => match loaded {
            Some(c) if c["status"] == "False" => text(&c["message"], "<none>"),
            _ => "<none>".into(),
        },
    };
    sub("Last Error", last_error);
    out.push_str("Attached To:\n");
    let plugin_name = running
        .map(|p| text(&p["name"], ""))
        .unwrap_or_else(|| format!("{namespace}.{name}"));
    let rows = attachments(dump, &plugin_name);
    if rows.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(["KIND", "NAME", "LISTENER/SERVICE", "PORT", "POSITION"]);
        t.rows = rows.into_iter().map(Vec::from).collect();
        for l in t.render(KUBECTL).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out.push_str("Conditions:\n");
    let conds = status["conditions"].as_array().cloned().unwrap_or_default();
    if conds.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(["TYPE", "STATUS", "REASON", "MESSAGE"]);
        for c in conds {
            t.rows.push(vec![
                text(&c["type"], "-"),
                text(&c["status"], "-"),
                text(&c["reason"], "-"),
                text(&c["message"], ""),
            ]);
        }
        for l in t.render(KUBECTL).lines() {
            out.push_str(&format!("  {l}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn describes_where_a_plugin_runs() {
        let plugin = json!({"name": "default.auth", "kind": "WasmPlugin", "namespace": "default",
            "resource": "auth", "phase": "AUTHN", "priority": 10, "url": "oci://r/a:1",
            "digest": "sha256:abc", "failStrategy": "FAIL_OPEN", "state": "UpdateFailed",
            "lastError": "fetching oci://r/a:2: not found"});
        let other = json!({"name": "default.other"});
        let dump = json!({
            "gateways": [
                {"name": "gw", "namespace": "default", "kind": "gateway",
                 "listeners": [{"name": "http", "port": 80, "chain": [plugin]}]},
                {"name": "waypoint", "namespace": "default", "kind": "waypoint",
                 "services": [{"service": "default/reviews",
                               "ports": [{"port": 9080, "chain": [other, plugin]}]}]}
            ],
            "plugins": [plugin]
        });
        let object = json!({"kind": "WasmPlugin",
        "metadata": {"name": "auth", "namespace": "default"},
        "spec": {"url": "oci://r/a:2"},
        "status": {"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "attached"},
            {"type": "ModuleLoaded", "status": "False", "reason": "UpdateFailed", "message": "x"}
        ]}});
        assert_eq!(
            describe_plugin(&object, &dump),
            "Name:           auth\n\
             Namespace:      default\n\
             Kind:           WasmPlugin\n\
             Phase:          AUTHN\n\
             Priority:       10\n\
             Fail Strategy:  FAIL_OPEN\n\
             Module:\n\
            \x20 URL:          oci://r/a:1\n\
            \x20 Digest:       sha256:abc\n\
            \x20 State:        UpdateFailed\n\
            \x20 Last Error:   fetching oci://r/a:2: not found\n\
             Attached To:\n\
            \x20 KIND       NAME               LISTENER/SERVICE   PORT   POSITION\n\
            \x20 Gateway    default/gw         http               80     1/1\n\
            \x20 Waypoint   default/waypoint   default/reviews    9080   2/2\n\
             Conditions:\n\
            \x20 TYPE           STATUS   REASON         MESSAGE\n\
            \x20 Accepted       True     Accepted       attached\n\
            \x20 ModuleLoaded   False    UpdateFailed   x\n"
        );
    }
}
