//! Drives the real `waystone` binary: `up`, `demo bookinfo`, the CLI, and
//! plain HTTP clients on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_waystone");

/// The binary under test: `WAYSTONE_BIN` (or `WAYSTONE_TEST_BIN`) when set — worktrees sharing
/// one target dir also share the uplifted `target/debug/waystone` — else cargo's.
pub fn bin() -> String {
    std::env::var("WAYSTONE_BIN")
        .or_else(|_| std::env::var("WAYSTONE_TEST_BIN"))
        .unwrap_or_else(|_| BIN.to_string())
}
pub const UPSTREAM_URL: &str = "oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0";

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn basic_auth_wasm() -> PathBuf {
    let path = std::env::var_os("WAYSTONE_BASIC_AUTH_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/wasm/basic_auth.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-plugins.sh first",
        path.display()
    );
    path
}

/// A loopback /24 of our own (127.X.Y.0), so parallel test processes never share ports.
pub fn private_loopback(salt: u8) -> [u8; 3] {
    let pid = std::process::id();
    [127, 100 + salt, (pid % 250) as u8 + 1]
}

/// A running `waystone up` with its own data directory.
pub struct Waystone {
    pub data_dir: PathBuf,
    pub entry: SocketAddr,
    pub gateway_ip: String,
    pub insecure: String,
    /// More `waystone up` flags (access logs, tracing).
    pub extra_args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    rust_log: String,
}

impl Waystone {
    pub fn start(data_dir: &Path, net: [u8; 3], insecure_registry: &str) -> Self {
        Self::start_with(data_dir, net, insecure_registry, &[])
    }

    /// As `start`, with `RUST_LOG` set to `rust_log` (e.g. to see plugins' debug lines).
    pub fn start_with_log(
        data_dir: &Path,
        net: [u8; 3],
        insecure_registry: &str,
        rust_log: &str,
    ) -> Self {
        Self::start_full(data_dir, net, insecure_registry, &[], rust_log)
    }

    /// As `start`, with more `waystone up` flags.
    pub fn start_with(
        data_dir: &Path,
        net: [u8; 3],
        insecure_registry: &str,
        extra_args: &[&str],
    ) -> Self {
        Self::start_full(data_dir, net, insecure_registry, extra_args, "info")
    }

    fn start_full(
        data_dir: &Path,
        net: [u8; 3],
        insecure_registry: &str,
        extra_args: &[&str],
        rust_log: &str,
    ) -> Self {
        let gateway_ip = format!("{}.{}.{}.1", net[0], net[1], net[2]);
        let entry: SocketAddr = format!("{}.{}.{}.200:15001", net[0], net[1], net[2])
            .parse()
            .unwrap();
        let mut w = Self {
            data_dir: data_dir.to_path_buf(),
            entry,
            gateway_ip,
            insecure: insecure_registry.to_string(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            child: None,
            log: data_dir.with_extension("up.log"),
            rust_log: rust_log.to_string(),
        };
        w.spawn();
        w
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.data_dir.join("api.addr"));
        // Appended, so a restart after a crash keeps the earlier run's log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        // A `--workers` among the extra flags replaces the default of 2; `RUST_LOG=...` sets
        // the log filter instead of being passed.
        let workers: &[&str] = if self.extra_args.iter().any(|a| a == "--workers") {
            &[]
        } else {
            &["--workers", "2"]
        };
        let log_filter = self
            .extra_args
            .iter()
            .find_map(|a| a.strip_prefix("RUST_LOG="))
            .unwrap_or(&self.rust_log)
            .to_string();
        let child = Command::new(bin())
            .args(["up", "--insecure-registry", &self.insecure])
            .args(["--gateway-address", &self.gateway_ip])
            .args(["--entry-address", &self.entry.to_string()])
            .args(workers)
            // A free port on this test's own loopback address: tests run side by side.
            .args(["--admin-address", &format!("{}:0", self.entry.ip())])
            .args(
                self.extra_args
                    .iter()
                    .filter(|a| !a.starts_with("RUST_LOG=")),
            )
            .env("WAYSTONE_DATA_DIR", &self.data_dir)
            .env("RUST_LOG", &log_filter)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn waystone up");
        self.child = Some(child);
        let addr_file = self.data_dir.join("api.addr");
        wait_until(
            Duration::from_secs(60),
            || addr_file.exists(),
            || self.log_text(),
        );
    }

    /// Stops with SIGTERM (graceful drain) and starts again on the same data directory.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    assert!(
                        status.success(),
                        "waystone up exited with {status}:\n{}",
                        self.log_text()
                    );
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!(
                        "waystone up did not stop within 20 s of SIGTERM:\n{}",
                        self.log_text()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The admin endpoint's address, from `<data-dir>/admin.addr`.
    pub fn admin(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.addr"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// `GET` on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let admin = self.admin();
        let (status, _, body) = http(&admin, path, &admin, &[]);
        (status, String::from_utf8(body).unwrap())
    }

    /// The `waystone up` process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("waystone up is running").id()
    }

    /// `kill -9`: no drain, no cleanup; then waits for the process to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `waystone up` again on the same data directory (after `stop` or `kill9`).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "waystone up is still running");
        self.spawn();
    }

    /// The process's open file descriptors.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_stdin(args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(bin())
            .args(args)
            .env("WAYSTONE_DATA_DIR", &self.data_dir)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "waystone {args:?} failed: {}\n--- up log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn apply(&self, yaml: &str) -> String {
        let out = self.cli_stdin(&["apply", "-f", "-"], Some(yaml));
        assert!(
            out.status.success(),
            "apply failed: {}\n--- up log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn get_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// The gateway's address from its status, as `$GATEWAY_HOST` in the docs.
    pub fn gateway_host(&self, name: &str) -> String {
        let gw = self.get_json(&["gateway", name]);
        gw["status"]["addresses"][0]["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no address in {gw}"))
            .to_string()
    }
}

impl Drop for Waystone {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `waystone demo bookinfo --apply`, running until dropped.
pub struct Bookinfo {
    child: Child,
}

impl Bookinfo {
    pub fn start(w: &Waystone, address: &str) -> Self {
        let mut child = Command::new(bin())
            .args(["demo", "bookinfo", "--apply", "--address", address])
            .env("WAYSTONE_DATA_DIR", &w.data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("bookinfo ready") => break,
                Some(Ok(_)) => continue,
                _ => panic!("demo bookinfo exited before it was ready"),
            }
        }
        // Keep draining its stdout so it never blocks.
        std::thread::spawn(move || for _ in lines {});
        Self { child }
    }
}

impl Drop for Bookinfo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out; context:\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, headers, body).
pub fn http(
    addr: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a full response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let hdrs = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, hdrs, raw[split + 4..].to_vec())
}

/// `curl http://$GATEWAY_HOST/path`
pub fn gateway_get(host: &str, path: &str, auth: Option<&str>) -> u16 {
    let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
    http(&format!("{host}:80"), path, host, &h).0
}

/// `curl http://service:9080/path` from inside the mesh: through the local mesh entry.
pub fn mesh_get(entry: SocketAddr, url_authority: &str, path: &str, auth: Option<&str>) -> u16 {
    let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
    http(
        &entry.to_string(),
        &format!("http://{url_authority}{path}"),
        url_authority,
        &h,
    )
    .0
}

pub fn example(name: &str, image: &str) -> String {
    let text =
        std::fs::read_to_string(repo_root().join("examples/walkthrough").join(name)).unwrap();
    if text.contains("kind: WasmPlugin") {
        assert!(
            text.contains(UPSTREAM_URL),
            "{name} should hold the docs' url"
        );
    }
    text.replace(UPSTREAM_URL, image)
}

pub fn push(w: &Waystone, wasm: &Path, image: &str) {
    w.ok(&["push", wasm.to_str().unwrap(), image, "--insecure"]);
}

/// A TCP echo server on `ip`: echoes every byte, then ends its side after the client's end.
pub fn echo_backend(ip: &str) -> SocketAddr {
    let listener = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// A client connection with a read deadline, so a proxy that never answers fails the test.
pub fn tcp_connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Everything until the peer ends the stream.
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the proxy ended the stream in time");
    out
}

/// `proxy-config bookinfo-gateway chains` once `basic-auth-at-gateway` is loaded on it, from
/// either source (`waystone up` or a cluster).
pub const BOOKINFO_GATEWAY_CHAINS: &str = "LISTENER     PORT     ORDER     PLUGIN                            PHASE     PRIORITY     FAIL STRATEGY     STATE\n\
     http         80       1         default.basic-auth-at-gateway     AUTHN     -            FAIL_CLOSE        Loaded\n";

/// `proxy-config GW plugins` (table form): the header and one loaded AUTHN WasmPlugin, its
/// digest shortened as the table shortens it.
pub fn assert_one_loaded_plugin(table: &str, name: &str, url: &str, digest: &str) {
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec![
                "NAME", "KIND", "PHASE", "PRIORITY", "URL", "DIGEST", "STATE", "LAST", "ERROR"
            ],
            vec![
                name,
                "WasmPlugin",
                "AUTHN",
                "-",
                url,
                &digest[..19],
                "Loaded",
                "-"
            ],
        ],
        "{table}"
    );
}

/// `describe wasmplugin NAME` up to its conditions for a loaded AUTHN FAIL_CLOSE plugin;
/// `attached` is the "Attached To" table, indented.
pub fn assert_describe_loaded_plugin(
    describe: &str,
    name: &str,
    url: &str,
    digest: &str,
    attached: &str,
) {
    let expected = format!(
        "Name:           {name}\n\
         Namespace:      default\n\
         Kind:           WasmPlugin\n\
         Phase:          AUTHN\n\
         Priority:       <unset>\n\
         Fail Strategy:  FAIL_CLOSE\n\
         Module:\n\
        \x20 URL:          {url}\n\
        \x20 Digest:       {digest}\n\
        \x20 State:        Loaded\n\
        \x20 Last Error:   <none>\n\
         Attached To:\n\
         {attached}\
         Conditions:\n"
    );
    assert!(
        describe.starts_with(&expected),
        "got:\n{describe}\nwanted:\n{expected}"
    );
}

/// Gateway `tcp-gateway` (class `istio`) with a `TCP` listener `echo` on port 7000, a TCPRoute
/// `echo` to Service `echo` port `service_port`, and the `type: NETWORK` WasmPlugin
/// `tcp-echo-l4` (FAIL_CLOSE) from `wasm` with `config` as its pluginConfig.
pub fn tcp_gateway_yaml(wasm: &str, config: &str, service_port: u16) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: tcp-gateway}}
spec:
  gatewayClassName: istio
  listeners: [{{name: echo, port: 7000, protocol: TCP}}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {{name: echo}}
spec:
  parentRefs: [{{name: tcp-gateway}}]
  rules:
  - backendRefs: [{{name: echo, port: {service_port}}}]
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: tcp-echo-l4}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: tcp-gateway}}]
  url: file://{wasm}
  type: NETWORK
  failStrategy: FAIL_CLOSE
  pluginConfig: {config}
"#
    )
}
