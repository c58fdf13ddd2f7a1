//! Kubernetes mode against a real kube-apiserver (1.20, built from Debian's sources by
//! `scripts/kube-apiserver.sh`) and etcd on loopback, with the real Istio and Gateway API CRDs:
//! the walkthrough's manifests applied with kubectl, `waystone controller` and
//! `waystone proxy` processes, backends on loopback behind EndpointSlices.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use waystone_fetch::testing::Registry;

const GW_CREDS: &str = "Basic YWRtaW4zOmFkbWluMw==";
const SVC_CREDS: &str = "Basic MXQtaW4zOmFkbWluMw==";
const WAIT: Duration = Duration::from_secs(60);

/// The binary under test; `WAYSTONE_BIN` overrides it (a build directory shared by several
/// checkouts may hold another checkout's binary by the time the test runs).
fn bin() -> PathBuf {
    std::env::var_os("WAYSTONE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn kube_apiserver() -> PathBuf {
    let candidates = [
        std::env::var_os("WAYSTONE_KUBE_APISERVER").map(PathBuf::from),
        Some(PathBuf::from("/var/cache/waystone/kube-apiserver-1.20.2")),
        Some(repo_root().join("target/tools/kube-apiserver-1.20.2")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .expect("kube-apiserver is missing: run scripts/kube-apiserver.sh first")
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// etcd and kube-apiserver on free loopback ports, a kubeconfig with an admin token.
struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    port: u16,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    etcd_url: String,
}

impl Cluster {
    fn start(dir: &Path) -> Cluster {
        let run = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .current_dir(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&["openssl", "genrsa", "-out", "sa.key", "2048"]);
        run(&[
            "openssl", "rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub",
        ]);
        std::fs::write(
            dir.join("tokens.csv"),
            "admin-token,admin,admin-uid,system:masters\n",
        )
        .unwrap();
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Command::new("etcd")
            .args([
                "--data-dir",
                "etcd-data",
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ])
            .current_dir(dir)
            .stdout(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("etcd.err")).unwrap())
            .spawn()
            .expect("etcd (Debian etcd-server) must be installed");
        let port = free_port();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}}}]\nusers: [{{name: t, user: {{token: admin-token}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: t, namespace: default}}}}]\ncurrent-context: t\n"
            ),
        )
        .unwrap();
        let mut c = Cluster {
            dir: dir.to_path_buf(),
            kubeconfig,
            port,
            etcd: Some(etcd),
            apiserver: None,
            etcd_url,
        };
        c.start_apiserver();
        c
    }

    fn start_apiserver(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("apiserver.log"))
            .unwrap();
        let child = Command::new(kube_apiserver())
            .args([
                &format!("--etcd-servers={}", self.etcd_url),
                "--bind-address=127.0.0.1",
                &format!("--secure-port={}", self.port),
                "--cert-dir=certs",
                "--token-auth-file=tokens.csv",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-account-key-file=sa.pub",
                "--service-account-signing-key-file=sa.key",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
            ])
            .current_dir(&self.dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.apiserver = Some(child);
        wait_until(
            WAIT,
            || self.kubectl_ok(&["get", "--raw", "/readyz"]),
            || self.log(),
        );
    }

    fn stop_apiserver(&mut self) {
        kill(&mut self.apiserver);
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("apiserver.log")).unwrap_or_default();
        text.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    }

    fn kubectl_ok(&self, args: &[&str]) -> bool {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl must be installed");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn get_json(&self, what: &str) -> Option<Value> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["get", what, "-o", "json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Applies Istio's extension CRDs, the Gateway API's GatewayClass and Gateway, and the
    /// route CRDs `routes` (files in `crates/waystone/tests/crds`; `--validate=false`: a 1.20
    /// server does not know their CEL rules); waits until they serve, `route_kinds` included
    /// (as `kubectl get` names them).
    fn install_crds(&self, routes: &[&str], route_kinds: &str) {
        let crds = repo_root().join("crates/waystone/tests/crds");
        let mut args = vec!["apply".to_string(), "--validate=false".to_string()];
        let base = [
            "istio-extensions.yaml",
            "gw_gatewayclasses.yaml",
            "gw_gateways.yaml",
        ];
        for f in base.iter().chain(routes) {
            args.extend(["-f".to_string(), crds.join(f).display().to_string()]);
        }
        self.kubectl(&args.iter().map(String::as_str).collect::<Vec<_>>(), None);
        let kinds = format!("wasmplugins,trafficextensions,gateways,{route_kinds}");
        wait_until(
            WAIT,
            || self.kubectl_ok(&["get", &kinds]),
            || format!("CRDs not served: {kinds}"),
        );
    }

    /// The waystone CLI against this cluster.
    fn waystone(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "waystone {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        kill(&mut self.apiserver);
        kill(&mut self.etcd);
    }
}

/// A `waystone controller` or `waystone proxy` process with its log in a file.
struct Role {
    child: Option<Child>,
    log: PathBuf,
}

impl Role {
    fn start(cluster: &Cluster, name: &str, args: &[&str]) -> Role {
        let log = cluster.dir.join(format!("{name}.log"));
        let child = Command::new(bin())
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .arg("--data-dir")
            .arg(cluster.dir.join(format!("{name}-data")))
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Role {
            child: Some(child),
            log,
        }
    }

    /// `waystone proxy --gateway NS/NAME` with its listeners on `address`, one worker, an
    /// admin port of its own and a ready file; `extra` adds flags.
    fn proxy(
        cluster: &Cluster,
        name: &str,
        gateway: &str,
        address: &str,
        ready: &Path,
        extra: &[&str],
    ) -> Role {
        let mut args = vec![
            "proxy",
            "--gateway",
            gateway,
            "--gateway-address",
            address,
            "--admin-address",
            "127.0.0.1:0",
            "--workers",
            "1",
            "--ready-file",
            ready.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Role::start(cluster, name, &args)
    }

    /// `waystone controller` for class `istio`, deploying the image `example.test/waystone:dev`
    /// (nothing runs it here).
    fn istio_controller(cluster: &Cluster) -> Role {
        Role::start(
            cluster,
            "controller",
            &[
                "controller",
                "--gateway-class",
                "istio",
                "--proxy-image",
                "example.test/waystone:dev",
            ],
        )
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A plain HTTP backend answering 200 and its name, one thread per connection.
fn backend(name: &'static str, ip: &str) -> SocketAddr {
    let listener = TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!("{name}\n");
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

fn service_yaml(name: &str, backend: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  ports: [{{name: http, port: 9080, targetPort: {p}}}]\n  selector: {{app: {name}}}\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}}}]\nports: [{{name: http, port: {p}, protocol: TCP}}]\n",
        p = backend.port(),
        ip = backend.ip()
    )
}

fn condition(obj: &Value, path: &str, kind: &str) -> Option<String> {
    obj.pointer(path)?
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| c["status"].as_str().unwrap_or("").to_string())
}

fn ready_file(path: &Path) -> Option<Value> {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    (v["found"] == true).then_some(v)
}

#[test]
fn cluster_walkthrough_status_data_planes_and_api_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path());
    cluster.install_crds(&["gw_httproutes.yaml"], "httproutes");

    // The module in a real OCI registry, as users ship it.
    let registry = Registry::start().expect("start docker-registry");
    let image = format!(
        "oci://{}/istio-ecosystem/wasm-extensions/basic_auth:1.12.0",
        registry.host()
    );
    let push = Command::new(bin())
        .args([
            "push",
            basic_auth_wasm().to_str().unwrap(),
            &image,
            "--insecure",
        ])
        .env("WAYSTONE_DATA_DIR", dir.path().join("push"))
        .output()
        .unwrap();
    assert!(
        push.status.success(),
        "{}",
        String::from_utf8_lossy(&push.stderr)
    );

    let net = private_loopback(50);
    let ip = |last: u8| format!("{}.{}.{}.{last}", net[0], net[1], net[2]);
    let productpage = backend("productpage", &ip(100));
    let reviews = backend("reviews", &ip(101));
    cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "{}---\n{}",
            service_yaml("productpage", productpage),
            service_yaml("reviews", reviews)
        )),
    );
    let out = cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&example("bookinfo-gateway.yaml", &image)),
    );
    assert!(
        out.contains("gateway.gateway.networking.k8s.io/bookinfo-gateway created"),
        "{out}"
    );

    let reg = registry.host();
    let mut controller = Role::start(
        &cluster,
        "controller",
        &[
            "controller",
            "--gateway-class",
            "istio",
            "--gateway-class",
            "istio-waypoint",
            "--insecure-registry",
            &reg,
            "--proxy-image",
            "example.test/waystone:dev",
        ],
    );
    let gw_ready = dir.path().join("gw.ready");
    let gw_addr = ip(1);
    let _gw_proxy = Role::proxy(
        &cluster,
        "gw-proxy",
        "default/bookinfo-gateway",
        &gw_addr,
        &gw_ready,
        &["--insecure-registry", &reg],
    );
    wait_until(
        WAIT,
        || ready_file(&gw_ready).is_some_and(|v| v["listeners"]["http"].is_string()),
        || _gw_proxy.log(),
    );
    let host = ready_file(&gw_ready).unwrap()["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        gateway_get(&host, "/productpage", None),
        200,
        "no plugin yet"
    );

    // Step 2 with kubectl: the plugin at the gateway.
    let out = cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&example("basic-auth-at-gateway.yaml", &image)),
    );
    assert!(
        out.contains("wasmplugin.extensions.istio.io/basic-auth-at-gateway created"),
        "{out}"
    );
    wait_until(
        WAIT,
        || gateway_get(&host, "/productpage", None) == 401,
        || _gw_proxy.log(),
    );
    assert_eq!(gateway_get(&host, "/productpage", Some(GW_CREDS)), 200);

    // Status written by the controller.
    let status_of = |what: &str| cluster.get_json(what).unwrap_or(Value::Null);
    wait_until(
        WAIT,
        || {
            condition(
                &status_of("wasmplugin/basic-auth-at-gateway"),
                "/status/conditions",
                "ModuleLoaded",
            )
            .as_deref()
                == Some("True")
        },
        || controller.log(),
    );
    let gw = status_of("gateway/bookinfo-gateway");
    wait_until(
        WAIT,
        || {
            let gw = status_of("gateway/bookinfo-gateway");
            condition(&gw, "/status/conditions", "Programmed").as_deref() == Some("True")
        },
        || format!("{gw:#}"),
    );
    let gw = status_of("gateway/bookinfo-gateway");
    assert_eq!(
        condition(&gw, "/status/conditions", "Accepted").as_deref(),
        Some("True")
    );
    assert!(
        gw["status"]["addresses"][0]["value"]
            .as_str()
            .unwrap()
            .starts_with("10.0.0."),
        "{gw:#}"
    );
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 1);
    let route = status_of("httproute/bookinfo");
    assert_eq!(
        condition(&route, "/status/parents/0/conditions", "Accepted").as_deref(),
        Some("True"),
        "{route:#}"
    );
    assert_eq!(
        condition(&route, "/status/parents/0/conditions", "ResolvedRefs").as_deref(),
        Some("True"),
        "{route:#}"
    );
    assert_eq!(
        route["status"]["parents"][0]["controllerName"],
        "waystone.io/gateway-controller"
    );

    // The data plane the controller owns for the gateway.
    let deploy = status_of("deployment/bookinfo-gateway-waystone");
    let uid = gw["metadata"]["uid"].as_str().unwrap();
    assert_eq!(
        deploy["metadata"]["ownerReferences"][0]["uid"], uid,
        "{deploy:#}"
    );
    assert_eq!(deploy["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        "example.test/waystone:dev"
    );
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["args"][2],
        "default/bookinfo-gateway"
    );
    assert!(
        cluster
            .get_json("service/bookinfo-gateway-waystone")
            .is_some()
    );
    assert!(
        cluster
            .get_json("serviceaccount/bookinfo-gateway-waystone")
            .is_some()
    );

    // Step 4 with the waystone CLI against the cluster: a waypoint, then a plugin on it.
    let out = cluster.waystone(&["waypoint", "apply", "--enroll-namespace"]);
    assert!(
        out.contains("waypoint default/waypoint applied") || out.contains("waypoint"),
        "{out}"
    );
    let wp_ready = dir.path().join("wp.ready");
    let entry = format!("{}:15001", ip(200));
    let _wp_proxy = Role::proxy(
        &cluster,
        "wp-proxy",
        "default/waypoint",
        &ip(2),
        &wp_ready,
        &["--entry-address", &entry, "--insecure-registry", &reg],
    );
    let entry: SocketAddr = entry.parse().unwrap();
    wait_until(WAIT, || ready_file(&wp_ready).is_some(), || _wp_proxy.log());
    wait_until(
        WAIT,
        || mesh_get(entry, "productpage:9080", "/productpage", None) == 200,
        || _wp_proxy.log(),
    );
    let applied = apply_with_cli(&cluster, &example("basic-auth-at-waypoint.yaml", &image));
    assert!(
        applied.contains("wasmplugin.extensions.istio.io/basic-auth-at-waypoint created"),
        "{applied}"
    );
    wait_until(
        WAIT,
        || mesh_get(entry, "productpage:9080", "/productpage", None) == 401,
        || _wp_proxy.log(),
    );
    assert_eq!(
        mesh_get(entry, "productpage:9080", "/productpage", Some(GW_CREDS)),
        200
    );
    let listed = cluster.waystone(&["get", "wasmplugin"]);
    assert!(
        listed.contains("basic-auth-at-waypoint") && listed.contains("basic-auth-at-gateway"),
        "{listed}"
    );
    wait_until(
        WAIT,
        || cluster.get_json("deployment/waypoint-waystone").is_some(),
        || controller.log(),
    );

    // TrafficExtension, the newer API, on a service behind the waypoint.
    // This 1.20 server stores an empty string in a custom resource as null and then rejects
    // it ("group: Invalid value: null"), so the core group is left implicit, which means the
    // same thing.
    let te = example("basic-auth-for-service-te.yaml", &image).replace("      group: \"\"\n", "");
    assert!(!te.contains("group: \"\""), "{te}");
    cluster.kubectl(&["apply", "-f", "-"], Some(&te));
    wait_until(
        WAIT,
        || mesh_get(entry, "reviews:9080", "/reviews/1", None) == 401,
        || _wp_proxy.log(),
    );
    assert_eq!(
        mesh_get(entry, "reviews:9080", "/reviews/1", Some(SVC_CREDS)),
        200
    );
    wait_until(
        WAIT,
        || {
            condition(
                &status_of("trafficextension/basic-auth-for-service-te"),
                "/status/conditions",
                "ModuleLoaded",
            )
            .as_deref()
                == Some("True")
        },
        || controller.log(),
    );

    // The API server goes away and comes back: nothing that serves changes.
    cluster.stop_apiserver();
    assert_eq!(gateway_get(&host, "/productpage", None), 401);
    assert_eq!(gateway_get(&host, "/productpage", Some(GW_CREDS)), 200);
    assert_eq!(
        mesh_get(entry, "productpage:9080", "/productpage", None),
        401
    );
    cluster.start_apiserver();
    assert_eq!(gateway_get(&host, "/productpage", None), 401);
    assert_eq!(
        mesh_get(entry, "reviews:9080", "/reviews/1", Some(SVC_CREDS)),
        200
    );
    // ... and the watches resume: a change after the restart reaches the data plane.
    cluster.kubectl(&["delete", "wasmplugin", "basic-auth-at-gateway"], None);
    wait_until(
        WAIT,
        || gateway_get(&host, "/productpage", None) == 200,
        || _gw_proxy.log(),
    );
    assert!(controller.running(), "{}", controller.log());

    // Deleting the waypoint removes the data plane the controller made for it.
    cluster.waystone(&["delete", "gateway", "waypoint"]);
    wait_until(
        WAIT,
        || {
            cluster.get_json("deployment/waypoint-waystone").is_none()
                && cluster.get_json("service/waypoint-waystone").is_none()
        },
        || controller.log(),
    );
    assert!(
        cluster
            .get_json("deployment/bookinfo-gateway-waystone")
            .is_some()
    );
}

fn apply_with_cli(cluster: &Cluster, yaml: &str) -> String {
    let mut child = Command::new(bin())
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The subset of Helm's template language the chart uses: `{{ .Values.a.b }}`,
/// `{{ .Release.Name }}`, `{{ . }}`, `{{- range .Values.list }} ... {{- end }}`, and the
/// `{{-`/`-}}` whitespace trims. Anything else is an error, so the chart cannot drift past what
/// this test checks.
mod chart {
    use serde_json::Value;

    enum Node {
        Text(String),
        Expr(String),
        Range(String, Vec<Node>),
    }

    fn lex(src: &str) -> Vec<(bool, String)> {
        // (is_action, text) with trims applied.
        let mut out: Vec<(bool, String)> = Vec::new();
        let mut rest = src;
        let mut trim_next = false;
        while let Some(start) = rest.find("{{") {
            let mut text = rest[..start].to_string();
            if trim_next {
                text = text.trim_start().to_string();
            }
            let end = rest[start..].find("}}").expect("unclosed {{") + start;
            let mut action = &rest[start + 2..end];
            if let Some(a) = action.strip_prefix('-') {
                text = text.trim_end().to_string();
                action = a;
            }
            trim_next = false;
            if let Some(a) = action.strip_suffix('-') {
                trim_next = true;
                action = a;
            }
            out.push((false, text));
            out.push((true, action.trim().to_string()));
            rest = &rest[end + 2..];
        }
        let tail = if trim_next { rest.trim_start() } else { rest };
        out.push((false, tail.to_string()));
        out
    }

    fn parse(tokens: &mut std::vec::IntoIter<(bool, String)>) -> Vec<Node> {
        let mut nodes = Vec::new();
        while let Some((action, text)) = tokens.next() {
            if !action {
                nodes.push(Node::Text(text));
            } else if text == "end" {
                return nodes;
            } else if let Some(path) = text.strip_prefix("range ") {
                let body = parse(tokens);
                nodes.push(Node::Range(path.trim().to_string(), body));
            } else {
                nodes.push(Node::Expr(text));
            }
        }
        nodes
    }

    fn lookup<'a>(path: &str, root: &'a Value, dot: &'a Value) -> &'a Value {
        if path == "." {
            return dot;
        }
        let mut cur = root;
        for part in path.trim_start_matches('.').split('.') {
            cur = cur
                .get(part)
                .unwrap_or_else(|| panic!("template refers to {path}, which is not set"));
        }
        cur
    }

    fn eval(nodes: &[Node], root: &Value, dot: &Value, out: &mut String) {
        for n in nodes {
            match n {
                Node::Text(t) => out.push_str(t),
                Node::Expr(e) => {
                    assert!(
                        e == "." || e.starts_with(".Values.") || e.starts_with(".Release."),
                        "unsupported template action {{{{ {e} }}}}"
                    );
                    match lookup(e, root, dot) {
                        Value::String(s) => out.push_str(s),
                        other => out.push_str(&other.to_string()),
                    }
                }
                Node::Range(path, body) => {
                    let items = lookup(path, root, dot)
                        .as_array()
                        .unwrap_or_else(|| panic!("range over {path}, which is not a list"));
                    for item in items {
                        eval(body, root, item, out);
                    }
                }
            }
        }
    }

    pub fn render(template: &str, root: &Value) -> String {
        let mut tokens = lex(template).into_iter();
        let nodes = parse(&mut tokens);
        let mut out = String::new();
        eval(&nodes, root, root, &mut out);
        out
    }
}

#[test]
fn helm_chart_renders_and_validates_against_the_api_server() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let chart = repo_root().join("deploy/helm/waystone");
    // Istio's CRDs first, as in a cluster that already runs Istio; then the Gateway API's.
    cluster.install_crds(
        &["gw_httproutes.yaml", "gw_tcproutes.yaml"],
        "httproutes,tcproutes",
    );
    // The chart's CRDs install over Istio's unchanged: same objects, nothing to reconcile.
    let ours = chart.join("crds/extensions.istio.io.yaml");
    let out = cluster.kubectl(
        &["apply", "--validate=false", "-f", ours.to_str().unwrap()],
        None,
    );
    assert!(
        out.contains("wasmplugins.extensions.istio.io") && !out.contains("error"),
        "{out}"
    );
    wait_until(
        WAIT,
        || cluster.kubectl_ok(&["get", "wasmplugins,gateways"]),
        || "CRDs not served".into(),
    );

    let values_text = std::fs::read_to_string(chart.join("values.yaml")).unwrap();
    let values: Value = serde_saphyr::from_str(&values_text).unwrap();
    let root = serde_json::json!({
        "Values": values,
        "Release": {"Name": "waystone", "Namespace": "waystone-system"},
    });
    let mut rendered = String::new();
    let mut templates: Vec<_> = std::fs::read_dir(chart.join("templates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    templates.sort();
    for t in templates {
        let text = chart::render(&std::fs::read_to_string(&t).unwrap(), &root);
        assert!(!text.contains("{{"), "{}: unrendered action", t.display());
        rendered.push_str("---\n");
        rendered.push_str(&text);
        rendered.push('\n');
    }
    assert!(
        rendered.contains("- --gateway-class=istio-waypoint"),
        "{rendered}"
    );
    assert!(
        rendered.contains("name: system:serviceaccounts:default"),
        "{rendered}"
    );
    cluster.kubectl(&["create", "namespace", "waystone-system"], None);
    let out = cluster.kubectl(&["apply", "--dry-run=server", "-f", "-"], Some(&rendered));
    for expected in [
        "serviceaccount/waystone-controller created (server dry run)",
        "deployment.apps/waystone-controller created (server dry run)",
        "clusterrole.rbac.authorization.k8s.io/waystone-controller created (server dry run)",
        "clusterrolebinding.rbac.authorization.k8s.io/waystone-proxy created (server dry run)",
        "gatewayclass.gateway.networking.k8s.io/waystone created (server dry run)",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }

    // Least privilege, checked by the API server itself: the controller's account may write
    // status and Deployments but not read every Secret; a data plane may only read.
    cluster.kubectl(&["apply", "-f", "-"], Some(&rendered));
    let can = |sa: &str, verb: &str, resource: &str| {
        let who = format!("--as=system:serviceaccount:{sa}");
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(["auth", "can-i", verb, &who, "-A"])
            .args(match resource.split_once('/') {
                Some((r, sub)) => vec![r.to_string(), format!("--subresource={sub}")],
                None => vec![resource.to_string()],
            })
            .output()
            .unwrap()
            .stdout
            .starts_with(b"yes")
    };
    let ctl = "waystone-system:waystone-controller";
    let proxy = "default:bookinfo-gateway-waystone";
    assert!(can(
        ctl,
        "patch",
        "gateways.gateway.networking.k8s.io/status"
    ));
    assert!(can(
        ctl,
        "patch",
        "tcproutes.gateway.networking.k8s.io/status"
    ));
    assert!(can(ctl, "watch", "tcproutes.gateway.networking.k8s.io"));
    assert!(can(proxy, "watch", "tcproutes.gateway.networking.k8s.io"));
    assert!(can(ctl, "create", "deployments.apps"));
    assert!(can(ctl, "get", "secrets"));
    assert!(!can(ctl, "list", "secrets"));
    assert!(!can(ctl, "patch", "wasmplugins.extensions.istio.io"));
    assert!(can(proxy, "watch", "wasmplugins.extensions.istio.io"));
    assert!(!can(
        proxy,
        "patch",
        "gateways.gateway.networking.k8s.io/status"
    ));
    assert!(!can(proxy, "list", "secrets"));
    assert!(!can(proxy, "create", "deployments.apps"));
}

/// A Pod object standing for the gateway's data-plane pod (no kubelet runs here), labelled as
/// the controller's Deployment labels its pods, its admin port the one the local
/// `waystone proxy` bound; with `status` (phase Running, Ready, `pod_ip`) set through the
/// status subresource when `pod_ip` is given.
fn data_plane_pod(cluster: &Cluster, name: &str, admin_port: u16, pod_ip: Option<&str>) {
    cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{gateway.networking.k8s.io/gateway-name: bookinfo-gateway, app.kubernetes.io/managed-by: waystone}}\nspec:\n  containers:\n  - name: waystone\n    image: example.test/waystone:dev\n    ports: [{{name: admin, containerPort: {admin_port}}}]\n"
        )),
    );
    if let Some(ip) = pod_ip {
        let status = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{ip}\",\"podIPs\":[{{\"ip\":\"{ip}\"}}],\"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\"}}]}}}}"
        );
        cluster.kubectl(
            &[
                "patch",
                "pod",
                name,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
            None,
        );
    }
}

impl Cluster {
    /// The waystone CLI against this cluster, expected to fail: its stderr.
    fn waystone_err(&self, args: &[&str]) -> String {
        let out = Command::new(bin())
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "waystone {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }
}

#[test]
fn proxy_config_reads_the_data_plane_pod_and_a_bad_annotation_shows_on_status() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    cluster.install_crds(&["gw_httproutes.yaml"], "httproutes");
    let net = private_loopback(60);
    let ip = |last: u8| format!("{}.{}.{}.{last}", net[0], net[1], net[2]);
    let productpage = backend("productpage", &ip(100));
    cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&service_yaml("productpage", productpage)),
    );
    let url = format!("file://{}", basic_auth_wasm().display());
    // A value the annotation does not know: the Gateway must still serve, and say why its
    // access log follows the default.
    let gateway_yaml = example("bookinfo-gateway.yaml", &url).replacen(
        "metadata:\n  name: bookinfo-gateway\n",
        "metadata:\n  name: bookinfo-gateway\n  annotations:\n    waystone.io/access-log: verbose\n",
        1,
    );
    cluster.kubectl(&["apply", "-f", "-"], Some(&gateway_yaml));
    cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&example("basic-auth-at-gateway.yaml", &url)),
    );
    let controller = Role::istio_controller(&cluster);
    let ready = dir.path().join("gw.ready");
    let proxy = Role::proxy(
        &cluster,
        "gw-proxy",
        "default/bookinfo-gateway",
        &ip(1),
        &ready,
        &[],
    );
    wait_until(
        WAIT,
        || ready_file(&ready).is_some_and(|v| v["plugins"] == 1),
        || proxy.log(),
    );
    let info = ready_file(&ready).unwrap();
    let host = info["address"].as_str().unwrap().to_string();
    let admin: SocketAddr = info["admin"].as_str().unwrap().parse().unwrap();
    assert_eq!(gateway_get(&host, "/productpage", None), 401);
    assert_eq!(gateway_get(&host, "/productpage", Some(GW_CREDS)), 200);

    // The proxy role's own admin endpoint, as `waystone up` serves it.
    let admin_get = |path: &str| {
        let (status, _, body) = http(&admin.to_string(), path, "localhost", &[]);
        (status, String::from_utf8_lossy(&body).to_string())
    };
    assert_eq!(admin_get("/ready"), (200, "LIVE\n".to_string()));
    assert_eq!(admin_get("/healthz").0, 200);
    let (_, stats) = admin_get("/stats/prometheus");
    let requests: Vec<&str> = stats
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .collect();
    assert_eq!(requests.len(), 2, "{stats}");
    for code in ["401", "200"] {
        assert!(
            requests
                .iter()
                .any(|l| l.contains(&format!("response_code=\"{code}\"")) && l.ends_with(" 1")),
            "{requests:?}"
        );
    }
    let (status, levels) = admin_get("/logging?level=debug");
    assert_eq!(status, 200, "{levels}");
    assert!(levels.starts_with("process: debug\n"), "{levels}");

    // The controller reports the annotation on the Gateway; Programmed is unaffected.
    let gateway = || cluster.get_json("gateway/bookinfo-gateway").unwrap();
    wait_until(
        WAIT,
        || {
            let gw = gateway();
            condition(&gw, "/status/conditions", "Accepted").as_deref() == Some("False")
                && condition(&gw, "/status/conditions", "Programmed").as_deref() == Some("True")
        },
        || format!("{:#}\n{}", gateway(), controller.log()),
    );
    let accepted = gateway()["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
        .unwrap();
    assert_eq!(accepted["reason"], "Invalid");
    assert_eq!(
        accepted["message"],
        "metadata.annotations[waystone.io/access-log]: unknown value \"verbose\" (allowed: off, text, json); the rest of the gateway is served"
    );

    // The controller's Deployment declares the admin port and probes /ready on it.
    let deploy = cluster
        .get_json("deployment/bookinfo-gateway-waystone")
        .unwrap();
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "admin" && p["containerPort"] == 15000),
        "{container:#}"
    );
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");

    // No data-plane pod yet (nothing runs the Deployment here): the error names the gateway.
    let err = cluster.waystone_err(&["proxy-config", "bookinfo-gateway", "chains"]);
    // (The kube client warns first that this kubeconfig skips TLS verification.)
    assert_eq!(
        err.lines().last().unwrap(),
        "error: no data-plane pod serves gateway default/bookinfo-gateway: no pod has the labels \
         gateway.networking.k8s.io/gateway-name=bookinfo-gateway,app.kubernetes.io/managed-by=waystone"
    );
    data_plane_pod(&cluster, "bookinfo-gateway-waystone-a", admin.port(), None);
    let err = cluster.waystone_err(&["proxy-config", "bookinfo-gateway", "chains"]);
    assert!(
        err.contains(
            "none of its pods is running and ready: bookinfo-gateway-waystone-a (Pending)"
        ),
        "{err}"
    );
    // The API server refuses to proxy to a loopback pod IP (its proxy guard against loopback
    // and link-local addresses): the error says so.
    cluster.kubectl(
        &[
            "patch",
            "pod",
            "bookinfo-gateway-waystone-a",
            "--subresource=status",
            "--type=merge",
            "-p",
            "{\"status\":{\"phase\":\"Running\",\"podIP\":\"127.0.0.1\",\"podIPs\":[{\"ip\":\"127.0.0.1\"}],\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\"}]}}",
        ],
        None,
    );
    let err = cluster.waystone_err(&["proxy-config", "bookinfo-gateway", "chains"]);
    assert!(err.contains("address not allowed"), "{err}");
    cluster.kubectl(
        &[
            "delete",
            "pod",
            "bookinfo-gateway-waystone-a",
            "--grace-period=0",
            "--force",
        ],
        None,
    );
    // 0.0.0.0 passes that guard on this 1.20 server, and Linux delivers a connection to it on
    // this host: the API server's own pod proxy reaches the local `waystone proxy`.
    data_plane_pod(
        &cluster,
        "bookinfo-gateway-waystone-b",
        admin.port(),
        Some("0.0.0.0"),
    );

    let plugins: Value = serde_json::from_str(&cluster.waystone(&[
        "proxy-config",
        "bookinfo-gateway",
        "plugins",
        "-o",
        "json",
    ]))
    .unwrap();
    let digest = plugins[0]["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "{plugins:#}");
    assert_eq!(plugins[0]["state"], "Loaded", "{plugins:#}");
    assert_eq!(plugins[0]["url"], url.as_str(), "{plugins:#}");
    assert_eq!(
        cluster.waystone(&[
            "proxy-config",
            "bookinfo-gateway",
            "chains",
            "-n",
            "default"
        ]),
        BOOKINFO_GATEWAY_CHAINS
    );
    let routes = cluster.waystone(&["proxy-config", "bookinfo-gateway", "routes"]);
    let rows: Vec<Vec<&str>> = routes
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["LISTENER", "ADDRESS", "ROUTE"], "{routes}");
    assert_eq!(
        rows[1][..3],
        ["http", &format!("{host}:80"), "default/bookinfo"],
        "{routes}"
    );
    assert_one_loaded_plugin(
        &cluster.waystone(&["proxy-config", "bookinfo-gateway", "plugins"]),
        "default.basic-auth-at-gateway",
        &url,
        &digest,
    );
    let endpoints = cluster.waystone(&["proxy-config", "bookinfo-gateway", "endpoints"]);
    assert!(endpoints.contains(&productpage.to_string()), "{endpoints}");
    // The gateway's own dump is what the admin port serves.
    let yaml = cluster.waystone(&["proxy-config", "bookinfo-gateway", "-o", "yaml"]);
    assert!(
        yaml.contains("accessLog: null"),
        "the process default: {yaml}"
    );

    let describe = cluster.waystone(&["describe", "wasmplugin", "basic-auth-at-gateway"]);
    assert_describe_loaded_plugin(
        &describe,
        "basic-auth-at-gateway",
        &url,
        &digest,
        "  KIND      NAME                       LISTENER/SERVICE   PORT   POSITION\n\
        \x20 Gateway   default/bookinfo-gateway   http               80     1/1\n",
    );
}

/// L4 in Kubernetes mode: a Gateway listener of protocol TCP, a TCPRoute (the experimental
/// channel's v1alpha2 CRD) and a `type: NETWORK` WasmPlugin applied with kubectl; a local
/// `waystone proxy` carries real bytes through the plugin, the controller writes the route's
/// parent status and counts it on the listener, and deleting the route stops the traffic.
#[test]
fn tcp_route_status_and_network_plugin_in_kubernetes_mode() {
    let wasm = repo_root().join("target/wasm/rust_tcp.wasm");
    assert!(
        wasm.exists(),
        "{} is missing: run scripts/build-sdk-plugins.sh rust",
        wasm.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    // The standard channel's HTTPRoute too: Waystone requires it; TCPRoute is the addition.
    cluster.install_crds(
        &["gw_httproutes.yaml", "gw_tcproutes.yaml"],
        "httproutes,tcproutes",
    );
    let net = private_loopback(70);
    let ip = |last: u8| format!("{}.{}.{}.{last}", net[0], net[1], net[2]);
    let echo = echo_backend(&ip(100));
    let foreign_parent = r#"{"parentRef": {"name": "elsewhere"}, "controllerName": "example.com/other", "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "theirs", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}"#;
    let l4 = tcp_gateway_yaml(
        &wasm.display().to_string(),
        r#"{rewrite_from: "ping", rewrite_to: "PONG"}"#,
        9080,
    );
    cluster.kubectl(
        &["apply", "-f", "-"],
        Some(&format!("{}---\n{l4}", service_yaml("echo", echo))),
    );
    let add_to_route = |path: &str, value: &str| {
        let patch = format!(r#"[{{"op": "add", "path": "{path}", "value": {value}}}]"#);
        cluster.kubectl(
            &["patch", "tcproute", "echo", "--type=json", "-p", &patch],
            None,
        );
    };
    // A second parent, served by another controller, whose status entry must be kept.
    add_to_route("/spec/parentRefs/-", r#"{"name": "elsewhere"}"#);
    cluster.kubectl(
        &[
            "patch",
            "tcproute",
            "echo",
            "--subresource=status",
            "--type=merge",
            "-p",
            &format!(r#"{{"status": {{"parents": [{foreign_parent}]}}}}"#),
        ],
        None,
    );

    let mut controller = Role::istio_controller(&cluster);
    let ready = dir.path().join("gw.ready");
    let proxy = Role::proxy(
        &cluster,
        "gw-proxy",
        "default/tcp-gateway",
        &ip(1),
        &ready,
        &[],
    );
    wait_until(
        WAIT,
        || {
            ready_file(&ready)
                .is_some_and(|v| v["listeners"]["echo"].is_string() && v["plugins"] == 1)
        },
        || proxy.log(),
    );
    let addr = ready_file(&ready).unwrap()["listeners"]["echo"]
        .as_str()
        .unwrap()
        .to_string();

    // Bytes through the NETWORK plugin (rewritten on the way in) to the echo and back.
    let mut s = tcp_connect(&addr);
    s.write_all(b"ping\n").unwrap();
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"PONG\n", "{}", proxy.log());
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"");

    // The controller's status: the route accepted with its backend resolved, the other
    // controller's entry kept, and the route counted on the TCP listener.
    let route = || cluster.get_json("tcproute/echo").unwrap_or(Value::Null);
    let ours = |r: &Value| {
        r.pointer("/status/parents")
            .and_then(Value::as_array)
            .and_then(|ps| {
                ps.iter()
                    .find(|p| p["controllerName"] == "waystone.io/gateway-controller")
                    .cloned()
            })
    };
    wait_until(
        WAIT,
        || {
            ours(&route()).is_some_and(|p| {
                condition(&p, "/conditions", "Accepted").as_deref() == Some("True")
                    && condition(&p, "/conditions", "ResolvedRefs").as_deref() == Some("True")
            })
        },
        || format!("{:#}\n{}", route(), controller.log()),
    );
    let r = route();
    let parents = r["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{r:#}");
    assert!(
        parents
            .iter()
            .any(|p| p["controllerName"] == "example.com/other"
                && p["conditions"][0]["message"] == "theirs"),
        "{r:#}"
    );
    assert_eq!(ours(&r).unwrap()["parentRef"]["name"], "tcp-gateway");
    let gateway = || {
        cluster
            .get_json("gateway/tcp-gateway")
            .unwrap_or(Value::Null)
    };
    wait_until(
        WAIT,
        || gateway()["status"]["listeners"][0]["attachedRoutes"] == 1,
        || format!("{:#}\n{}", gateway(), controller.log()),
    );
    assert_eq!(
        gateway()["status"]["listeners"][0]["supportedKinds"][0]["kind"],
        "TCPRoute"
    );

    // A backend that does not exist: ResolvedRefs goes False, naming it.
    add_to_route(
        "/spec/rules/0/backendRefs/-",
        r#"{"name": "gone", "port": 9080}"#,
    );
    wait_until(
        WAIT,
        || {
            ours(&route()).is_some_and(|p| {
                let c = p["conditions"].as_array().cloned().unwrap_or_default();
                c.iter().any(|c| {
                    c["type"] == "ResolvedRefs"
                        && c["status"] == "False"
                        && c["reason"] == "BackendNotFound"
                        && c["message"] == "backend service(s) not found: default/gone"
                })
            })
        },
        || format!("{:#}\n{}", route(), controller.log()),
    );

    // Deleting the route stops the traffic: the listener closes new connections unanswered.
    cluster.kubectl(&["delete", "tcproute", "echo"], None);
    wait_until(
        WAIT,
        || {
            // Closed or reset before any reply; a live route answers "PONG".
            let mut s = tcp_connect(&addr);
            let _ = s.write_all(b"ping\n");
            let mut reply = [0u8; 5];
            !matches!(s.read(&mut reply), Ok(n) if n > 0)
        },
        || proxy.log(),
    );
    wait_until(
        WAIT,
        || gateway()["status"]["listeners"][0]["attachedRoutes"] == 0,
        || format!("{:#}\n{}", gateway(), controller.log()),
    );
    assert!(controller.running(), "{}", controller.log());
}
