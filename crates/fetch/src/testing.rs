//! Test support: a real OCI registry (Debian's `docker-registry`, distribution 2.8) on a free
//! loopback port, for this crate's tests and for other crates' end-to-end tests.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(10);
const PORT_ATTEMPTS: usize = 5;

/// How to start a [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Every request needs these Basic credentials (bcrypt htpasswd).
    pub htpasswd: Option<(String, String)>,
    /// Serve HTTPS with this certificate chain and key (PEM) instead of plain HTTP.
    pub tls: Option<(String, String)>,
}

/// A running registry; dropping it kills the process and removes its storage.
pub struct Registry {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Anonymous pull and push.
    pub fn start() -> io::Result<Registry> {
        Self::start_with(RegistryOptions::default())
    }

    /// Every request needs Basic credentials `user:password` (bcrypt htpasswd).
    pub fn start_with_htpasswd(user: &str, password: &str) -> io::Result<Registry> {
        Self::start_with(RegistryOptions {
            htpasswd: Some((user.to_string(), password.to_string())),
            ..Default::default()
        })
    }

    pub fn start_with(opts: RegistryOptions) -> io::Result<Registry> {
        Self::spawn(&opts)
    }

    /// How many requests the registry answered whose request line starts with `method` and
    /// whose path contains `path_part` (from its access log), e.g. `("GET", "/manifests/")`.
    pub fn requests(&self, method: &str, path_part: &str) -> usize {
        let prefix = format!("\"{method} /");
        self.log()
            .lines()
            .filter_map(|l| l.find(&prefix).map(|i| &l[i + 1..]))
            .filter(|req| {
                req.split(' ')
                    .nth(1)
                    .is_some_and(|path| path.contains(path_part))
            })
            .count()
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `oci://127.0.0.1:PORT/<reference>`
    pub fn url(&self, reference: &str) -> String {
        format!("oci://{}/{reference}", self.host())
    }

    /// The registry's own log (stdout and stderr), for diagnosing a failing test.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Stops the process now (e.g. to prove a later fetch is served from the cache).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(opts: &RegistryOptions) -> io::Result<Registry> {
        let binary = find_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("waystone-registry-")
            .tempdir()?;
        let htpasswd_path = match &opts.htpasswd {
            Some((user, password)) => Some(write_htpasswd(dir.path(), user, password)?),
            None => None,
        };
        let tls_paths = match &opts.tls {
            Some((cert, key)) => {
                let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
                std::fs::write(&c, cert)?;
                std::fs::write(&k, key)?;
                Some((c, k))
            }
            None => None,
        };
        let mut last_log = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port()?;
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                config_yaml(
                    dir.path(),
                    addr,
                    htpasswd_path.as_deref(),
                    tls_paths.as_ref(),
                ),
            )?;
            let log_path = dir.path().join("registry.log");
            let log = std::fs::File::create(&log_path)?;
            let mut child = Command::new(&binary)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            match wait_ready(&mut child, addr) {
                Ok(()) => {
                    return Ok(Registry {
                        addr,
                        child: Some(child),
                        dir,
                    });
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // Someone took the port between our probe and the registry's bind: retry.
                    if last_log.contains("address already in use") {
                        continue;
                    }
                    return Err(io::Error::other(format!(
                        "docker-registry on {addr} did not become ready: {e}; log: {}",
                        tail(&last_log)
                    )));
                }
            }
        }
        Err(io::Error::other(format!(
            "docker-registry could not bind a free port after {PORT_ATTEMPTS} attempts; log: {}",
            tail(&last_log)
        )))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn find_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WAYSTONE_DOCKER_REGISTRY").map(PathBuf::from)
        && p.is_file()
    {
        return Ok(p);
    }
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("docker-registry"));
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "docker-registry not found: install the Debian package `docker-registry` \
         (apt-get install docker-registry) to run registry tests",
    ))
}

fn write_htpasswd(dir: &Path, user: &str, password: &str) -> io::Result<PathBuf> {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running htpasswd: {e} (install the Debian package `apache2-utils`)"),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "htpasswd -Bbn failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let path = dir.join("htpasswd");
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

fn config_yaml(
    dir: &Path,
    addr: SocketAddr,
    htpasswd: Option<&Path>,
    tls: Option<&(PathBuf, PathBuf)>,
) -> String {
    // The access log (one line per request) is what `requests` counts.
    let mut yaml = format!(
        "version: 0.1\n\
         log:\n  level: warn\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: {addr}\n  secret: waystone-test-registry\n",
        dir.join("data").display()
    );
    if let Some((cert, key)) = tls {
        yaml.push_str(&format!(
            "  tls:\n    certificate: {}\n    key: {}\n",
            cert.display(),
            key.display()
        ));
    }
    if let Some(path) = htpasswd {
        yaml.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: waystone-test\n    path: {}\n",
            path.display()
        ));
    }
    yaml
}

/// Binds port 0 and releases it; the registry then binds it (rarely racing someone else).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_ready(child: &mut Child, addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            return Err(io::Error::other(format!("exited early with {status}")));
        }
        if answers_http(addr) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer on GET /v2/ within {READY_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Any HTTP answer to GET /v2/ (200, or 401 with htpasswd; a TLS listener answers a plain
/// request with 400) means it is serving.
fn answers_http(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /v2/ HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    let mut got = 0;
    while got < buf.len() {
        match stream.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf[..got].starts_with(b"HTTP/1.")
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
