//! `waystone proxy-config GATEWAY [chains|routes|plugins|endpoints]`: istioctl's proxy-config,
//! read from the config dump of the running `waystone up` (`GET /v1/config_dump`), or with
//! `--kubeconfig`/`KUBECONFIG` from the gateway's data-plane pod (`/config_dump` on its admin
//! port, through the API server's pod proxy).

use serde_json::{Value, json};

use super::DEFAULT_NAMESPACE;
use crate::args::{ProxyConfigArgs, ProxyConfigOutput, ProxyConfigSection};
use crate::client::ApiClient;
use crate::table::{ISTIOCTL, Table};
use crate::{CliError, CliResult};

pub async fn run(client: &ApiClient, args: ProxyConfigArgs) -> CliResult {
    let namespace = args.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE);
    let dump = client.gateway_config_dump(namespace, &args.gateway).await?;
    print!(
        "{}",
        render(&dump, &args.gateway, namespace, args.section, args.output)?
    );
    Ok(())
}

/// The output for one gateway of `dump`.
pub fn render(
    dump: &Value,
    gateway: &str,
    namespace: &str,
    section: ProxyConfigSection,
    output: ProxyConfigOutput,
) -> CliResult<String> {
    let gw = find_gateway(dump, gateway, namespace)?;
    let data = match section {
        ProxyConfigSection::Chains => json!(chains(gw)),
        ProxyConfigSection::Routes => json!(routes(gw)),
        ProxyConfigSection::Plugins => json!(plugins(gw)),
        ProxyConfigSection::Endpoints => json!(endpoints(dump, gw)),
        ProxyConfigSection::All => gw.clone(),
    };
    Ok(match output {
        ProxyConfigOutput::Json => {
            let mut s = serde_json::to_string_pretty(&data)
                .map_err(|e| CliError::Failed(format!("rendering JSON: {e}")))?;
            s.push('\n');
            s
        }
        ProxyConfigOutput::Yaml => serde_saphyr::to_string(&data)
            .map_err(|e| CliError::Failed(format!("rendering YAML: {e}")))?,
        ProxyConfigOutput::Table => match section {
            ProxyConfigSection::Chains => chains_table(gw).render(ISTIOCTL),
            ProxyConfigSection::Routes => routes_table(gw).render(ISTIOCTL),
            ProxyConfigSection::Plugins => plugins_table(&plugins(gw)).render(ISTIOCTL),
            ProxyConfigSection::Endpoints => endpoints_table(dump, gw).render(ISTIOCTL),
            ProxyConfigSection::All => [
                chains_table(gw).render(ISTIOCTL),
                routes_table(gw).render(ISTIOCTL),
                plugins_table(&plugins(gw)).render(ISTIOCTL),
                endpoints_table(dump, gw).render(ISTIOCTL),
            ]
            .join("\n"),
        },
    })
}

pub(crate) fn find_gateway<'a>(
    dump: &'a Value,
    name: &str,
    namespace: &str,
) -> CliResult<&'a Value> {
    dump["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == name && g["namespace"] == namespace)
        .ok_or_else(|| {
            CliError::Failed(format!(
                "gateways.gateway.networking.k8s.io \"{name}\" not found in namespace \"{namespace}\" (or not running)"
            ))
        })
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn arr(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// One chain: where it runs (a listener, or a waypoint's service), its port, its plugins.
struct Chain<'a> {
    at: String,
    port: &'a Value,
    plugins: &'a Value,
}

fn chain_list(gw: &Value) -> Vec<Chain<'_>> {
    if gw["kind"] == "waypoint" {
        arr(&gw["services"])
            .flat_map(|svc| {
                arr(&svc["ports"]).map(move |p| Chain {
                    at: s(&svc["service"]),
                    port: &p["port"],
                    plugins: &p["chain"],
                })
            })
            .collect()
    } else {
        arr(&gw["listeners"])
            .map(|l| Chain {
                at: s(&l["name"]),
                port: &l["port"],
                plugins: &l["chain"],
            })
            .collect()
    }
}

fn chains(gw: &Value) -> Vec<Value> {
    let key = if gw["kind"] == "waypoint" {
        "service"
    } else {
        "listener"
    };
    chain_list(gw)
        .into_iter()
        .map(|c| json!({ key: c.at, "port": c.port, "chain": c.plugins }))
        .collect()
}

fn chains_table(gw: &Value) -> Table {
    let first = if gw["kind"] == "waypoint" {
        "SERVICE"
    } else {
        "LISTENER"
    };
    let mut t = Table::new([
        first,
        "PORT",
        "ORDER",
        "PLUGIN",
        "PHASE",
        "PRIORITY",
        "FAIL STRATEGY",
        "STATE",
    ]);
    for c in chain_list(gw) {
        let plugins: Vec<&Value> = arr(c.plugins).collect();
        if plugins.is_empty() {
            t.rows.push(vec![
                c.at.clone(),
                s(c.port),
                "-".into(),
                "<none>".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for (i, p) in plugins.iter().enumerate() {
            t.rows.push(vec![
                c.at.clone(),
                s(c.port),
                (i + 1).to_string(),
                s(&p["name"]),
                s(&p["phase"]),
                s(&p["priority"]),
                s(&p["failStrategy"]),
                s(&p["state"]),
            ]);
        }
    }
    t
}

fn routes(gw: &Value) -> Vec<Value> {
    if gw["kind"] == "waypoint" {
        return arr(&gw["services"])
            .map(|svc| json!({ "service": svc["service"], "ports": arr(&svc["ports"]).map(|p| p["port"].clone()).collect::<Vec<_>>() }))
            .collect();
    }
    arr(&gw["listeners"])
        .map(|l| json!({ "listener": l["name"], "port": l["port"], "address": l["address"], "routes": l["routes"] }))
        .collect()
}

fn match_text(m: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(p) = m["path"].as_str() {
        parts.push(p.to_string());
    }
    if let Some(method) = m["method"].as_str() {
        parts.push(format!("method={method}"));
    }
    for h in arr(&m["headers"]) {
        parts.push(format!("header:{}", s(h)));
    }
    for q in arr(&m["queryParams"]) {
        parts.push(format!("query:{}", s(q)));
    }
    if parts.is_empty() {
        "PathPrefix /".into()
    } else {
        parts.join(" ")
    }
}

fn routes_table(gw: &Value) -> Table {
    if gw["kind"] == "waypoint" {
        let mut t = Table::new(["SERVICE", "HOSTNAME", "PORTS"]);
        for svc in arr(&gw["services"]) {
            let name = s(&svc["service"]);
            let host = match name.split_once('/') {
                Some((ns, n)) => format!("{n}.{ns}.svc.cluster.local"),
                None => name.clone(),
            };
            let ports: Vec<String> = arr(&svc["ports"]).map(|p| s(&p["port"])).collect();
            t.rows.push(vec![name, host, ports.join(",")]);
        }
        return t;
    }
    let mut t = Table::new([
        "LISTENER",
        "ADDRESS",
        "ROUTE",
        "RULE",
        "HOSTNAMES",
        "MATCHES",
        "BACKENDS",
    ]);
    for l in arr(&gw["listeners"]) {
        for r in arr(&l["routes"]) {
            let hosts: Vec<String> = arr(&r["hostnames"]).map(s).collect();
            let matches: Vec<String> = arr(&r["matches"]).map(match_text).collect();
            let backends: Vec<String> = arr(&r["backends"])
                .map(|b| format!("{}:{}", s(&b["service"]), s(&b["port"])))
                .collect();
            t.rows.push(vec![
                s(&l["name"]),
                s(&l["address"]),
                s(&r["route"]),
                s(&r["rule"]),
                if hosts.is_empty() {
                    "*".into()
                } else {
                    hosts.join(",")
                },
                if matches.is_empty() {
                    "PathPrefix /".into()
                } else {
                    matches.join(", ")
                },
                backends.join(","),
            ]);
        }
    }
    t
}

/// Plugins of the gateway's chains, each once, in first-use order.
pub(crate) fn plugins(gw: &Value) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for c in chain_list(gw) {
        for p in arr(c.plugins) {
            if !out.iter().any(|o| o["name"] == p["name"]) {
                out.push(p.clone());
            }
        }
    }
    out
}

/// `sha256:` and the first 12 hex digits, as container tools shorten image ids.
pub(crate) fn short_digest(d: &Value) -> String {
    match d.as_str() {
        Some(d) => match d.strip_prefix("sha256:") {
            Some(hex) => format!("sha256:{}", &hex[..hex.len().min(12)]),
            None => d.to_string(),
        },
        None => "-".into(),
    }
}

fn plugins_table(plugins: &[Value]) -> Table {
    let mut t = Table::new([
        "NAME",
        "KIND",
        "PHASE",
        "PRIORITY",
        "URL",
        "DIGEST",
        "STATE",
        "LAST ERROR",
    ]);
    for p in plugins {
        t.rows.push(vec![
            s(&p["name"]),
            s(&p["kind"]),
            s(&p["phase"]),
            s(&p["priority"]),
            s(&p["url"]),
            short_digest(&p["digest"]),
            s(&p["state"]),
            s(&p["lastError"]),
        ]);
    }
    t
}

/// (service key, port) pairs the gateway sends to, in first-use order.
fn destinations(gw: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |svc: String, port: String| {
        if !out.contains(&(svc.clone(), port.clone())) {
            out.push((svc, port));
        }
    };
    if gw["kind"] == "waypoint" {
        for svc in arr(&gw["services"]) {
            for p in arr(&svc["ports"]) {
                add(s(&svc["service"]), s(&p["port"]));
            }
        }
    } else {
        for l in arr(&gw["listeners"]) {
            for r in arr(&l["routes"]) {
                for b in arr(&r["backends"]) {
                    add(s(&b["service"]), s(&b["port"]));
                }
            }
        }
    }
    out
}

fn endpoints(dump: &Value, gw: &Value) -> Vec<Value> {
    destinations(gw)
        .into_iter()
        .map(|(svc, port)| {
            let eps = service_port(dump, &svc, &port)
                .map(|p| p["endpoints"].clone())
                .unwrap_or(json!([]));
            json!({ "cluster": cluster_name(&svc, &port), "endpoints": eps })
        })
        .collect()
}

fn service_port<'a>(dump: &'a Value, svc: &str, port: &str) -> Option<&'a Value> {
    let (ns, name) = svc.split_once('/')?;
    arr(&dump["services"])
        .find(|s| s["name"] == name && s["namespace"] == ns)
        .and_then(|s| arr(&s["ports"]).find(|p| p["port"].as_u64() == port.parse().ok()))
}

fn cluster_name(svc: &str, port: &str) -> String {
    match svc.split_once('/') {
        Some((ns, name)) => format!("outbound|{port}||{name}.{ns}.svc.cluster.local"),
        None => svc.to_string(),
    }
}

fn endpoints_table(dump: &Value, gw: &Value) -> Table {
    let mut t = Table::new(["ENDPOINT", "STATUS", "CLUSTER"]);
    for (svc, port) in destinations(gw) {
        let cluster = cluster_name(&svc, &port);
        let eps: Vec<String> = service_port(dump, &svc, &port)
            .map(|p| arr(&p["endpoints"]).map(s).collect())
            .unwrap_or_default();
        if eps.is_empty() {
            t.rows
                .push(vec!["<none>".into(), "-".into(), cluster.clone()]);
        }
        for e in eps {
            t.rows.push(vec![e, "HEALTHY".into(), cluster.clone()]);
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump() -> Value {
        let plugin = json!({
            "name": "default.basic-auth-at-gateway", "kind": "WasmPlugin", "namespace": "default",
            "resource": "basic-auth-at-gateway", "phase": "AUTHN", "priority": null,
            "url": "oci://r/basic_auth:1", "sha256": null,
            "digest": "sha256:0123456789abcdef0123", "failStrategy": "FAIL_CLOSE",
            "state": "Loaded", "lastError": null
        });
        json!({
            "entry": {"address": "127.0.0.1:15001"},
            "gateways": [{
                "name": "bookinfo-gateway", "namespace": "default", "class": "istio",
                "kind": "gateway", "waypointFor": null, "accessLog": null, "generation": 1,
                "listeners": [{
                    "name": "http", "port": 80, "protocol": "HTTP", "hostname": null,
                    "address": "127.0.0.1:80",
                    "routes": [{
                        "route": "default/bookinfo", "rule": 0, "hostnames": [],
                        "matches": [
                            {"path": "Exact /productpage", "method": null, "headers": [], "queryParams": []},
                            {"path": "PathPrefix /static", "method": null, "headers": [], "queryParams": []}
                        ],
                        "backends": [{"service": "default/productpage", "port": 9080, "weight": 1}]
                    }],
                    "chain": [plugin]
                }],
                "services": []
            }],
            "services": [{
                "name": "productpage", "namespace": "default", "clusterIP": null, "waypoint": null,
                "ports": [{"name": "http", "port": 9080, "protocol": "TCP", "appProtocol": null,
                           "endpoints": ["127.0.0.1:9080"]}]
            }],
            "plugins": [plugin]
        })
    }

    fn table(section: ProxyConfigSection) -> String {
        render(
            &dump(),
            "bookinfo-gateway",
            "default",
            section,
            ProxyConfigOutput::Table,
        )
        .unwrap()
    }

    #[test]
    fn tables() {
        assert_eq!(
            table(ProxyConfigSection::Chains),
            "LISTENER     PORT     ORDER     PLUGIN                            PHASE     PRIORITY     FAIL STRATEGY     STATE\n\
             http         80       1         default.basic-auth-at-gateway     AUTHN     -            FAIL_CLOSE        Loaded\n"
        );
        assert_eq!(
            table(ProxyConfigSection::Routes),
            "LISTENER     ADDRESS          ROUTE                RULE     HOSTNAMES     MATCHES                                    BACKENDS\n\
             http         127.0.0.1:80     default/bookinfo     0        *             Exact /productpage, PathPrefix /static     default/productpage:9080\n"
        );
        assert_eq!(
            table(ProxyConfigSection::Plugins),
            "NAME                              KIND           PHASE     PRIORITY     URL                      DIGEST                  STATE      LAST ERROR\n\
             default.basic-auth-at-gateway     WasmPlugin     AUTHN     -            oci://r/basic_auth:1     sha256:0123456789ab     Loaded     -\n"
        );
        assert_eq!(
            table(ProxyConfigSection::Endpoints),
            "ENDPOINT           STATUS      CLUSTER\n\
             127.0.0.1:9080     HEALTHY     outbound|9080||productpage.default.svc.cluster.local\n"
        );
    }

    #[test]
    fn json_sections_and_missing_gateways() {
        let out = render(
            &dump(),
            "bookinfo-gateway",
            "default",
            ProxyConfigSection::Plugins,
            ProxyConfigOutput::Json,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v[0]["name"], "default.basic-auth-at-gateway");
        let yaml = render(
            &dump(),
            "bookinfo-gateway",
            "default",
            ProxyConfigSection::Endpoints,
            ProxyConfigOutput::Yaml,
        )
        .unwrap();
        assert!(yaml.contains("127.0.0.1:9080"), "{yaml}");
        match render(
            &dump(),
            "nope",
            "default",
            ProxyConfigSection::All,
            ProxyConfigOutput::Table,
        ) {
            Err(CliError::Failed(m)) => assert_eq!(
                m,
                "gateways.gateway.networking.k8s.io \"nope\" not found in namespace \"default\" (or not running)"
            ),
            other => panic!("{other:?}"),
        }
    }
}
