//! Tables as `kubectl get` prints them: the columns kubectl (or the CRD's printer columns)
//! shows for each kind, aligned the way Go's tabwriter aligns them, and kubectl's AGE.

use std::fmt::Write as _;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use waystone_model::KindInfo;

/// Rows of cells under upper-case headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// Go tabwriter settings: the minimum cell width (padding included) and the padding.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub min_width: usize,
    pub padding: usize,
}

/// kubectl's printers use `tabwriter.NewWriter(out, 6, 4, 3, ' ', 0)`.
pub const KUBECTL: Layout = Layout {
    min_width: 6,
    padding: 3,
};
/// istioctl's waypoint tables use `Init(out, 0, 8, 5, ' ', 0)`.
pub const ISTIOCTL: Layout = Layout {
    min_width: 0,
    padding: 5,
};

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Renders every line with a trailing newline. As with tabwriter, the last column is not
    /// padded: it ends the line.
    pub fn render(&self, layout: Layout) -> String {
        let columns = self.headers.len();
        let mut widths = vec![0usize; columns];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    let width = (widths[i] + layout.padding).max(layout.min_width);
                    let _ = write!(line, "{cell:<width$}");
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

/// What changes the columns of `get`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TableOptions {
    /// `-o wide`.
    pub wide: bool,
    /// `-A`: a NAMESPACE column first (namespaced kinds only).
    pub all_namespaces: bool,
    /// `--show-labels`: a LABELS column last.
    pub show_labels: bool,
    /// Print `kind/name` in the NAME column, as kubectl does when one `get` shows several kinds.
    pub qualify_names: bool,
}

/// The table `kubectl get KIND` prints for these objects, `now` being the time AGE counts to.
pub fn kind_table(
    info: &KindInfo,
    objects: &[Value],
    opts: TableOptions,
    now: OffsetDateTime,
) -> Table {
    let namespace_column = opts.all_namespaces && info.namespaced;
    let (columns, wide_columns) = columns(info);
    let mut headers: Vec<&str> = Vec::new();
    if namespace_column {
        headers.push("NAMESPACE");
    }
    headers.push("NAME");
    headers.extend(columns.iter().map(|c| c.0));
    headers.push("AGE");
    if opts.wide {
        headers.extend(wide_columns.iter().map(|c| c.0));
    }
    if opts.show_labels {
        headers.push("LABELS");
    }
    let mut table = Table::new(headers);
    for obj in objects {
        let mut row = Vec::new();
        if namespace_column {
            row.push(str_at(obj, &["metadata", "namespace"]).to_string());
        }
        let name = str_at(obj, &["metadata", "name"]);
        row.push(if opts.qualify_names {
            format!("{}/{name}", info.qualified())
        } else {
            name.to_string()
        });
        row.extend(columns.iter().map(|c| (c.1)(obj)));
        row.push(age(obj, now));
        if opts.wide {
            row.extend(wide_columns.iter().map(|c| (c.1)(obj)));
        }
        if opts.show_labels {
            row.push(labels_cell(obj));
        }
        table.rows.push(row);
    }
    table
}

type Column = (&'static str, fn(&Value) -> String);

/// Columns between NAME and AGE, and the ones `-o wide` adds after AGE.
fn columns(info: &KindInfo) -> (&'static [Column], &'static [Column]) {
    match info.kind {
        "Gateway" => (
            &[
                ("CLASS", gateway_class),
                ("ADDRESS", gateway_address),
                ("PROGRAMMED", gateway_programmed),
            ],
            &[],
        ),
        "GatewayClass" => (
            &[
                ("CONTROLLER", gatewayclass_controller),
                ("ACCEPTED", gatewayclass_accepted),
            ],
            &[("DESCRIPTION", gatewayclass_description)],
        ),
        "HTTPRoute" => (&[("HOSTNAMES", httproute_hostnames)], &[]),
        "Service" => (
            &[
                ("TYPE", service_type),
                ("CLUSTER-IP", service_cluster_ip),
                ("EXTERNAL-IP", service_external_ip),
                ("PORT(S)", service_ports),
            ],
            &[("SELECTOR", service_selector)],
        ),
        "Namespace" => (&[("STATUS", namespace_status)], &[]),
        "EndpointSlice" => (
            &[
                ("ADDRESSTYPE", slice_address_type),
                ("PORTS", slice_ports),
                ("ENDPOINTS", slice_endpoints),
            ],
            &[],
        ),
        "Secret" => (&[("TYPE", secret_type), ("DATA", secret_data)], &[]),
        // WasmPlugin, TrafficExtension: their CRDs print only NAME and AGE.
        _ => (&[], &[]),
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(key))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    at(v, path).and_then(Value::as_str).unwrap_or("")
}

fn condition_status(obj: &Value, kind: &str) -> Option<String> {
    at(obj, &["status", "conditions"])?
        .as_array()?
        .iter()
        .find(|c| c.get("type").and_then(Value::as_str) == Some(kind))
        .and_then(|c| c.get("status"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn gateway_class(obj: &Value) -> String {
    str_at(obj, &["spec", "gatewayClassName"]).to_string()
}

fn gateway_address(obj: &Value) -> String {
    at(obj, &["status", "addresses"])
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(|a| a.get("value"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

fn gateway_programmed(obj: &Value) -> String {
    condition_status(obj, "Programmed").unwrap_or_else(|| "Unknown".into())
}

fn gatewayclass_controller(obj: &Value) -> String {
    str_at(obj, &["spec", "controllerName"]).to_string()
}

fn gatewayclass_accepted(obj: &Value) -> String {
    condition_status(obj, "Accepted").unwrap_or_else(|| "Unknown".into())
}

fn gatewayclass_description(obj: &Value) -> String {
    str_at(obj, &["spec", "description"]).to_string()
}

/// CRD printer columns render arrays as JSON: `["bookinfo.example.com"]`.
fn httproute_hostnames(obj: &Value) -> String {
    match at(obj, &["spec", "hostnames"]) {
        Some(Value::Array(a)) if !a.is_empty() => Value::Array(a.clone()).to_string(),
        _ => String::new(),
    }
}

fn service_type(obj: &Value) -> String {
    match str_at(obj, &["spec", "type"]) {
        "" => "ClusterIP".into(),
        t => t.into(),
    }
}

fn service_cluster_ip(obj: &Value) -> String {
    match str_at(obj, &["spec", "clusterIP"]) {
        "" => "<none>".into(),
        ip => ip.into(),
    }
}

/// kubectl's rules: LoadBalancer shows its ingress addresses (or `<pending>`), ExternalName
/// its name, and any type its `externalIPs`.
fn service_external_ip(obj: &Value) -> String {
    let strings = |path: &[&str]| -> Vec<String> {
        at(obj, path)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let external = strings(&["spec", "externalIPs"]);
    match str_at(obj, &["spec", "type"]) {
        "LoadBalancer" => {
            let mut ips: Vec<String> = at(obj, &["status", "loadBalancer", "ingress"])
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            i.get("ip")
                                .or_else(|| i.get("hostname"))
                                .and_then(Value::as_str)
                        })
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default();
            ips.extend(external);
            if ips.is_empty() {
                "<pending>".into()
            } else {
                ips.join(",")
            }
        }
        "ExternalName" => str_at(obj, &["spec", "externalName"]).to_string(),
        _ if !external.is_empty() => external.join(","),
        _ => "<none>".into(),
    }
}

fn service_ports(obj: &Value) -> String {
    let Some(ports) = at(obj, &["spec", "ports"])
        .and_then(Value::as_array)
        .filter(|p| !p.is_empty())
    else {
        return "<none>".into();
    };
    ports
        .iter()
        .map(|p| {
            let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
            let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(node) => format!("{port}:{node}/{protocol}"),
                None => format!("{port}/{protocol}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn service_selector(obj: &Value) -> String {
    map_cell(at(obj, &["spec", "selector"]))
}

fn namespace_status(obj: &Value) -> String {
    match str_at(obj, &["status", "phase"]) {
        "" => "Active".into(),
        p => p.into(),
    }
}

fn slice_address_type(obj: &Value) -> String {
    str_at(obj, &["addressType"]).to_string()
}

/// Like kubectl: up to three items, then `+ N more...`; `<unset>` when there are none.
fn first_three(items: Vec<String>) -> String {
    if items.is_empty() {
        return "<unset>".into();
    }
    let shown = items.iter().take(3).cloned().collect::<Vec<_>>().join(",");
    if items.len() > 3 {
        format!("{shown} + {} more...", items.len() - 3)
    } else {
        shown
    }
}

fn slice_ports(obj: &Value) -> String {
    let ports = at(obj, &["ports"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    first_three(
        ports
            .iter()
            .map(|p| {
                p.get("port")
                    .and_then(Value::as_i64)
                    .map_or_else(|| "<unset>".into(), |n| n.to_string())
            })
            .collect(),
    )
}

fn slice_endpoints(obj: &Value) -> String {
    let endpoints = at(obj, &["endpoints"])
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    first_three(
        endpoints
            .iter()
            .flat_map(|e| {
                e.get("addresses")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect(),
    )
}

fn secret_type(obj: &Value) -> String {
    match str_at(obj, &["type"]) {
        "" => "Opaque".into(),
        t => t.into(),
    }
}

fn secret_data(obj: &Value) -> String {
    let keys = |field: &str| {
        obj.get(field)
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let mut all = keys("data");
    all.extend(keys("stringData"));
    all.sort();
    all.dedup();
    all.len().to_string()
}

fn map_cell(map: Option<&Value>) -> String {
    match map.and_then(Value::as_object) {
        Some(m) if !m.is_empty() => {
            let mut pairs: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            pairs.sort();
            pairs.join(",")
        }
        _ => "<none>".into(),
    }
}

fn labels_cell(obj: &Value) -> String {
    map_cell(at(obj, &["metadata", "labels"]))
}

/// AGE from `metadata.creationTimestamp`; `<unknown>` without one, as kubectl prints.
pub fn age(obj: &Value, now: OffsetDateTime) -> String {
    match OffsetDateTime::parse(str_at(obj, &["metadata", "creationTimestamp"]), &Rfc3339) {
        Ok(created) => human_duration((now - created).whole_seconds()),
        Err(_) => "<unknown>".into(),
    }
}

/// kubectl's `duration.HumanDuration`: exact seconds up to two minutes, then minutes and
/// seconds below ten minutes, minutes below three hours, hours and minutes below eight hours,
/// hours below two days, days and hours below eight days, days below two years, years and
/// days below eight years, then years. A clock up to a second behind counts as now.
pub fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".into();
    }
    if seconds < 0 {
        return "0s".into();
    }
    if seconds < 60 * 2 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 60 * 3 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        let d = hours / 24;
        return if h == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let d = (hours / 24) % 365;
        let y = hours / 24 / 365;
        return if d == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{d}d")
        };
    }
    format!("{}y", hours / 24 / 365)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;
    use waystone_model::lookup_kind;

    const NOW: OffsetDateTime = datetime!(2024-05-01 12:00:00 UTC);

    fn render(kind: &str, objects: &[Value], opts: TableOptions) -> String {
        kind_table(lookup_kind(kind).unwrap(), objects, opts, NOW).render(KUBECTL)
    }

    fn meta(name: &str, created: &str) -> Value {
        json!({"name": name, "namespace": "default", "creationTimestamp": created})
    }

    #[test]
    fn human_durations() {
        let cases = [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (59, "59s"),
            (119, "119s"),
            (120, "2m"),
            (125, "2m5s"),
            (599, "9m59s"),
            (600, "10m"),
            (3 * 3600 - 1, "179m"),
            (3 * 3600, "3h"),
            (3 * 3600 + 4 * 60 + 59, "3h4m"),
            (8 * 3600 - 1, "7h59m"),
            (8 * 3600, "8h"),
            (23 * 3600, "23h"),
            (47 * 3600 + 59 * 60, "47h"),
            (48 * 3600, "2d"),
            (51 * 3600, "2d3h"),
            (8 * 86400 - 1, "7d23h"),
            (8 * 86400, "8d"),
            (729 * 86400, "729d"),
            (730 * 86400, "2y"),
            (731 * 86400, "2y1d"),
            (8 * 365 * 86400, "8y"),
            (20 * 365 * 86400 + 86400, "20y"),
        ];
        for (secs, want) in cases {
            assert_eq!(human_duration(secs), want, "{secs}s");
        }
    }

    #[test]
    fn age_from_creation_timestamp() {
        let obj = json!({"metadata": meta("a", "2024-05-01T11:57:55Z")});
        assert_eq!(age(&obj, NOW), "2m5s");
        assert_eq!(age(&json!({"metadata": {"name": "a"}}), NOW), "<unknown>");
        assert_eq!(
            age(&json!({"metadata": meta("a", "yesterday")}), NOW),
            "<unknown>"
        );
    }

    #[test]
    fn tabwriter_alignment() {
        let mut t = Table::new(["NAME", "AGE"]);
        t.rows.push(vec!["ab".into(), "5s".into()]);
        // NAME is 4 wide + 3 padding = 7; the last column is never padded.
        assert_eq!(t.render(KUBECTL), "NAME   AGE\nab     5s\n");
        let mut t = Table::new(["A", "B", "C"]);
        t.rows.push(vec!["x".into(), "".into(), "z".into()]);
        // Minimum width 6 includes the padding.
        assert_eq!(t.render(KUBECTL), "A     B     C\nx           z\n");
        assert_eq!(t.render(ISTIOCTL), "A     B     C\nx           z\n");
    }

    #[test]
    fn wasmplugin_table() {
        let objs = [
            json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                   "metadata": meta("basic-auth-at-gateway", "2024-05-01T11:59:30Z"), "spec": {}}),
            json!({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                   "metadata": meta("basic-auth-at-waypoint", "2024-04-30T09:00:00Z"), "spec": {}}),
        ];
        assert_eq!(
            render("wasmplugin", &objs, TableOptions::default()),
            "NAME                     AGE\n\
             basic-auth-at-gateway    30s\n\
             basic-auth-at-waypoint   27h\n"
        );
        assert_eq!(
            render(
                "wasmplugin",
                &objs[..1],
                TableOptions {
                    all_namespaces: true,
                    ..Default::default()
                }
            ),
            "NAMESPACE   NAME                    AGE\n\
             default     basic-auth-at-gateway   30s\n"
        );
        let qualified = "trafficextension.extensions.istio.io/basic-auth-at-gateway";
        assert_eq!(
            render(
                "trafficextension",
                &objs[..1],
                TableOptions {
                    qualify_names: true,
                    ..Default::default()
                }
            ),
            format!("{:<61}AGE\n{qualified}   30s\n", "NAME")
        );
    }

    #[test]
    fn gateway_table() {
        let objs = [
            json!({"metadata": meta("bookinfo-gateway", "2024-05-01T11:00:00Z"),
                   "spec": {"gatewayClassName": "istio"},
                   "status": {"addresses": [{"type": "IPAddress", "value": "127.0.0.1"}, {"value": "127.0.0.2"}],
                              "conditions": [{"type": "Accepted", "status": "True"},
                                             {"type": "Programmed", "status": "True"}]}}),
            json!({"metadata": meta("waypoint", "2024-05-01T11:59:59Z"),
                   "spec": {"gatewayClassName": "istio-waypoint"}}),
        ];
        assert_eq!(
            render("gtw", &objs, TableOptions::default()),
            "NAME               CLASS            ADDRESS     PROGRAMMED   AGE\n\
             bookinfo-gateway   istio            127.0.0.1   True         60m\n\
             waypoint           istio-waypoint               Unknown      1s\n"
        );
        // Gateway's CRD has no wide columns.
        assert_eq!(
            render(
                "gateway",
                &objs[..1],
                TableOptions {
                    wide: true,
                    ..Default::default()
                }
            ),
            render("gateway", &objs[..1], TableOptions::default())
        );
    }

    #[test]
    fn httproute_table() {
        let objs = [
            json!({"metadata": meta("bookinfo", "2024-05-01T11:59:00Z"),
                   "spec": {"hostnames": ["bookinfo.example.com", "b.example.com"]}}),
            json!({"metadata": meta("reviews", "2024-05-01T11:59:00Z"), "spec": {}}),
        ];
        assert_eq!(
            render("httproute", &objs, TableOptions::default()),
            "NAME       HOSTNAMES                                  AGE\n\
             bookinfo   [\"bookinfo.example.com\",\"b.example.com\"]   60s\n\
             reviews                                               60s\n"
        );
    }

    #[test]
    fn service_table() {
        let objs = [
            json!({"metadata": meta("productpage", "2024-05-01T11:58:00Z"),
                   "spec": {"ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
                            "selector": {"app": "productpage"}}}),
            json!({"metadata": meta("lb", "2024-05-01T11:58:00Z"),
                   "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                            "ports": [{"port": 80, "nodePort": 30080}, {"port": 443, "protocol": "TCP"}]}}),
        ];
        assert_eq!(
            render("svc", &objs, TableOptions::default()),
            "NAME          TYPE           CLUSTER-IP   EXTERNAL-IP   PORT(S)                AGE\n\
             productpage   ClusterIP      <none>       <none>        9080/TCP               2m\n\
             lb            LoadBalancer   10.96.0.10   <pending>     80:30080/TCP,443/TCP   2m\n"
        );
        assert_eq!(
            render(
                "service",
                &objs[..1],
                TableOptions {
                    wide: true,
                    ..Default::default()
                }
            ),
            "NAME          TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)    AGE   SELECTOR\n\
             productpage   ClusterIP   <none>       <none>        9080/TCP   2m    app=productpage\n"
        );
    }

    #[test]
    fn namespace_table() {
        let objs = [
            json!({"metadata": {"name": "default", "creationTimestamp": "2024-04-29T12:00:00Z",
                                "labels": {"istio.io/use-waypoint": "waypoint"}}}),
            json!({"metadata": {"name": "gone", "creationTimestamp": "2024-05-01T11:59:58Z"},
                   "status": {"phase": "Terminating"}}),
        ];
        // Cluster-scoped: -A adds no NAMESPACE column.
        assert_eq!(
            render(
                "ns",
                &objs,
                TableOptions {
                    all_namespaces: true,
                    show_labels: true,
                    ..Default::default()
                }
            ),
            "NAME      STATUS        AGE   LABELS\n\
             default   Active        2d    istio.io/use-waypoint=waypoint\n\
             gone      Terminating   2s    <none>\n"
        );
    }

    #[test]
    fn endpointslice_table() {
        let objs = [
            json!({"metadata": meta("reviews-local", "2024-05-01T11:59:00Z"), "addressType": "IPv4",
                   "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": true}}],
                   "ports": [{"name": "http", "port": 40123, "protocol": "TCP"}]}),
            json!({"metadata": meta("many", "2024-05-01T11:59:00Z"), "addressType": "IPv4",
                   "endpoints": [{"addresses": ["10.0.0.1", "10.0.0.2"]}, {"addresses": ["10.0.0.3"]},
                                 {"addresses": ["10.0.0.4"]}, {"addresses": ["10.0.0.5"]}],
                   "ports": [{"name": "x"}]}),
            json!({"metadata": meta("empty", "2024-05-01T11:59:00Z"), "addressType": "IPv6"}),
        ];
        assert_eq!(
            render("endpointslice", &objs, TableOptions::default()),
            "NAME            ADDRESSTYPE   PORTS     ENDPOINTS                                AGE\n\
             reviews-local   IPv4          40123     127.0.0.1                                60s\n\
             many            IPv4          <unset>   10.0.0.1,10.0.0.2,10.0.0.3 + 2 more...   60s\n\
             empty           IPv6          <unset>   <unset>                                  60s\n"
        );
    }

    #[test]
    fn secret_table() {
        let objs = [
            json!({"metadata": meta("creds", "2024-05-01T11:59:50Z"), "type": "kubernetes.io/dockerconfigjson",
                   "data": {".dockerconfigjson": "e30="}}),
            json!({"metadata": meta("plain", "2024-05-01T11:59:50Z"),
                   "data": {"a": "YQ==", "b": "Yg=="}, "stringData": {"b": "x", "c": "y"}}),
        ];
        assert_eq!(
            render("secret", &objs, TableOptions::default()),
            "NAME    TYPE                             DATA   AGE\n\
             creds   kubernetes.io/dockerconfigjson   1      10s\n\
             plain   Opaque                           3      10s\n"
        );
    }

    #[test]
    fn gatewayclass_table() {
        let objs = [
            json!({"metadata": {"name": "istio", "creationTimestamp": "2024-05-01T09:00:00Z"},
                           "spec": {"controllerName": "istio.io/gateway-controller", "description": "The default Istio GatewayClass"},
                           "status": {"conditions": [{"type": "Accepted", "status": "True"}]}}),
        ];
        assert_eq!(
            render("gc", &objs, TableOptions::default()),
            "NAME    CONTROLLER                    ACCEPTED   AGE\n\
             istio   istio.io/gateway-controller   True       3h\n"
        );
        assert_eq!(
            render(
                "gatewayclass",
                &objs,
                TableOptions {
                    wide: true,
                    ..Default::default()
                }
            ),
            "NAME    CONTROLLER                    ACCEPTED   AGE   DESCRIPTION\n\
             istio   istio.io/gateway-controller   True       3h    The default Istio GatewayClass\n"
        );
    }
}
