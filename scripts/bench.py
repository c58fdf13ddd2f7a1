#!/usr/bin/env python3
"""Side-by-side proxy benchmark on loopback: direct, nginx, Envoy (+basic_auth),
Waystone (plain, +basic_auth, +5-plugin chain).

Prints a table per load shape with req/s, p50/p99 latency, proxy CPU per request
and peak RSS, the ratios the project's targets are stated in, and rewrites the
results section and the `target:` lines of BENCHMARKS.md from this run.

Everything runs on 127.0.0.1 with ports picked free; every process started here is
stopped here. Called by scripts/bench.sh, which installs the tools and builds.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

AUTH = "Basic " + base64.b64encode(b"ok:test").decode()
SMALL_PATH = "/small"
BIG_PATH = "/big"
BIG_BYTES = 64 * 1024
BASIC_AUTH_CONFIG = {
    "basic_auth_rules": [
        {"prefix": "/", "request_methods": ["GET", "POST"], "credentials": ["ok:test"]}
    ]
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {what} did not listen on 127.0.0.1:{port} within {timeout}s")


def wait_http(url: str, want: int, what: str, headers: dict | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:
                last = r.status
        except urllib.error.HTTPError as e:
            last = e.code
        except OSError as e:
            last = str(e)
        if last == want:
            return
        time.sleep(0.05)
    raise SystemExit(f"bench: {what}: {url} answered {last!r}, want {want} (waited {timeout}s)")


# --- process accounting -------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of `pid` and its descendants."""
    user = system = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def pin(pid: int, cpus: set[int]) -> None:
    """Moves every thread of `pid` and its descendants onto `cpus`."""
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


# CPUs the load generator runs on; None: wherever the scheduler puts it.
LOADGEN_CPUS: set[int] | None = None


def loadgen_affinity() -> None:
    if LOADGEN_CPUS is not None:
        os.sched_setaffinity(0, LOADGEN_CPUS)


def rss_kib(pid: int, key: str = "VmHWM") -> int:
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            continue
    return total


# --- the backend and the peers --------------------------------------------------


class Proc:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict | None = None):
        self.name = name
        self.log = log
        self.fh = open(log, "wb")
        self.p = subprocess.Popen(argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.fh.close()


def nginx_conf(work: Path, name: str, workers: int, body: str) -> Path:
    d = work / name
    (d / "logs").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  {body}
}}
""")
    return conf


def start_backend(work: Path, nginx: str) -> tuple[Proc, int, int]:
    h1, h2 = free_port(), free_port()
    root = work / "backend-root"
    root.mkdir(exist_ok=True)
    (root / "small").write_bytes(b"hello from the backend\n")
    (root / "big").write_bytes(b"x" * BIG_BYTES)
    conf = nginx_conf(work, "backend", 1, f"""
  server {{
    listen 127.0.0.1:{h1};
    listen 127.0.0.1:{h2} http2;
    root {root};
    default_type text/plain;
    location / {{ try_files $uri =404; }}
  }}
""")
    # Debian's nginx (1.22) speaks cleartext HTTP/2 only with prior knowledge on a
    # `listen ... http2` port, and nothing else there: one port per protocol.
    p = Proc("backend", [nginx, "-c", str(conf), "-e", str(work / "backend/logs/error.log")], work / "backend.log")
    wait_port(h1, p.p, "backend nginx")
    return p, h1, h2


def nginx_proxy_conf(work: Path, workers: int, backend: int) -> tuple[Path, int, int]:
    """nginx as a plain reverse proxy of `backend`: its config and its h1 and h2c ports."""
    port, port2 = free_port(), free_port()
    conf = nginx_conf(work, f"nginx-proxy-{workers}", workers, f"""
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    listen 127.0.0.1:{port2} http2;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }}
  }}
""")
    return conf, port, port2


def start_nginx_proxy(work: Path, nginx: str, workers: int, backend: int) -> tuple[Proc, int, int]:
    conf, port, port2 = nginx_proxy_conf(work, workers, backend)
    p = Proc("nginx", [nginx, "-c", str(conf), "-e", str(work / f"nginx-proxy-{workers}/logs/error.log")],
             work / f"nginx-proxy-{workers}.log")
    wait_port(port, p.p, "nginx proxy")
    return p, port, port2


def start_bare_forwarder(work: Path, backend: int, wrap: list[str] | None = None,
                         timeout: float = 30.0) -> tuple[Proc, int]:
    """crates/proxy/examples/bare_forwarder.rs (built for production) in front of `backend`: the
    floor the proxy is measured against by callgrind-proxy.py and cpu-split.py."""
    port = free_port()
    bare = Path(__file__).resolve().parent.parent / "target/production/examples/bare_forwarder"
    p = Proc("bare", [*(wrap or []), str(bare), str(port), str(backend)], work / "bare.log")
    wait_port(port, p.p, "bare_forwarder", timeout=timeout)
    return p, port


def envoy_config(port: int, admin: int, backend: int, plugins: list[tuple[str, Path, dict]]) -> dict:
    http_filters = []
    for name, wasm, cfg in plugins:
        http_filters.append({
            "name": f"envoy.filters.http.wasm.{name}",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": name,
                    "root_id": "",
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": json.dumps(cfg),
                    },
                    "vm_config": {
                        "vm_id": name,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": str(wasm)}},
                    },
                },
            },
        })
    http_filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
                        }]},
                        "http_filters": http_filters,
                    },
                }]}],
            }],
            "clusters": [{
                "name": "backend",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "backend", "endpoints": [{"lb_endpoints": [{
                    "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend}}},
                }]}]},
            }],
        },
    }


def start_envoy(work: Path, envoy: str, name: str, workers: int, backend: int,
                plugins: list[tuple[str, Path, dict]]) -> tuple[Proc, int]:
    port, admin = free_port(), free_port()
    cfg = work / f"{name}.json"
    cfg.write_text(json.dumps(envoy_config(port, admin, backend, plugins)))
    p = Proc(name, [envoy, "-c", str(cfg), "--concurrency", str(workers), "--log-level", "warn",
                    "--base-id", str(port), "--disable-hot-restart"], work / f"{name}.log")
    wait_port(port, p.p, name, timeout=60)
    return p, port


def waystone_manifest(port: int, backend: int, plugins: list[tuple[str, Path, dict]]) -> str:
    docs = [f"""apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: {port}, protocol: HTTP}}
""", """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: bench}
spec:
  parentRefs: [{name: bench}]
  rules:
  - backendRefs: [{name: backend, port: 8080}]
""", """apiVersion: v1
kind: Service
metadata: {name: backend}
spec:
  ports: [{name: http, port: 8080}]
""", f"""apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: backend-1, labels: {{kubernetes.io/service-name: backend}}}}
addressType: IPv4
ports: [{{name: http, port: {backend}}}]
endpoints: [{{addresses: [127.0.0.1]}}]
"""]
    for i, (name, wasm, cfg) in enumerate(plugins):
        docs.append(f"""apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: {name}}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: bench}}]
  url: file://{wasm}
  phase: AUTHN
  priority: {100 - i}
  pluginConfig: {json.dumps(cfg)}
""")
    return "---\n".join(docs)


def start_waystone(work: Path, waystone: str, name: str, workers: int, backend: int,
                   plugins: list[tuple[str, Path, dict]], wrap: list[str] | None = None,
                   env: dict | None = None, timeout: float = 30.0) -> tuple[Proc, int, Path]:
    """`waystone up` (under `wrap`, e.g. valgrind, with `env` added) serving the bench manifest."""
    port = free_port()
    data = work / name
    data.mkdir()
    env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_RUST_LOG", "warn"), **(env or {}))
    p = Proc(name, [*(wrap or []), waystone, "up", "--data-dir", str(data), "--workers", str(workers),
                    "--gateway-address", "127.0.0.1", "--entry-address", "127.0.0.1:0",
                    "--api-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0"], work / f"{name}.log", env=env)
    deadline = time.monotonic() + timeout
    while not (data / "api.addr").exists():
        if p.p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {name} did not start; see {work / (name + '.log')}")
        time.sleep(0.05)
    manifest = work / f"{name}.yaml"
    manifest.write_text(waystone_manifest(port, backend, plugins))
    out = subprocess.run([waystone, "apply", "-f", str(manifest), "--data-dir", str(data)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"bench: applying {manifest} to {name}: {out.stderr or out.stdout}")
    wait_port(port, p.p, name, timeout)
    return p, port, data


# --- load generators ---------------------------------------------------------------


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us_per_req: float = 0.0
    rss_mib: float = 0.0


def parse_wrk_latency(value: str, unit: str) -> float:
    v = float(value)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def run_wrk(port: int, path: str, seconds: float, conns: int, headers: dict) -> Result:
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, preexec_fn=loadgen_affinity).stdout
    pct = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    def lat(s: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
        return parse_wrk_latency(m.group(1), m.group(2))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Result(rps, lat(pct["50"]), lat(pct["99"]), reqs, errors)


def run_h2load(port: int, path: str, seconds: float, conns: int, headers: dict, work: Path) -> Result:
    log = work / "h2load.log"
    log.unlink(missing_ok=True)
    argv = ["h2load", "-t1", f"-c{conns}", "-m8", f"-D{int(max(1, seconds))}", "--log-file", str(log)]
    for k, v in headers.items():
        argv += ["-H", f"{k}: {v}"]
    argv.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, preexec_fn=loadgen_affinity).stdout
    m = re.search(r"finished in ([\d.]+)(s|ms), ([\d.]+) req/s", out)
    rps = float(m.group(3))
    m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    done, ok, failed, errored = (int(x) for x in m.groups())
    lat = []
    for line in log.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            lat.append(int(parts[2]) / 1000.0)  # microseconds -> ms
    lat.sort()
    def q(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    # h2load counts a request "succeeded" only with a 2xx/3xx status.
    return Result(rps, q(0.50), q(0.99), done, done - ok)


# --- the run --------------------------------------------------------------------------


@dataclass
class Shape:
    proto: str
    path: str
    workers: int

    @property
    def label(self) -> str:
        body = "64KiB" if self.path == BIG_PATH else "small"
        return f"{self.proto} {body} body, {self.workers} worker{'s' if self.workers > 1 else ''}"


@dataclass
class Target:
    name: str
    results: dict = field(default_factory=dict)  # shape label -> Result
    rss_mib: float = 0.0


def load(shape: Shape, port: int, seconds: float, conns: int, headers: dict, work: Path) -> Result:
    if shape.proto == "h1":
        return run_wrk(port, shape.path, seconds, conns, headers)
    return run_h2load(port, shape.path, seconds, max(1, conns // 8), headers, work)


def measure(target: Target, proc: Proc | None, ports: tuple[int, int], shapes: list[Shape], seconds: float,
            conns: int, work: Path) -> None:
    headers = {"authorization": AUTH}
    for shape in shapes:
        port = ports[0] if shape.proto == "h1" else ports[1]
        # Warm up connections, instances and caches outside the measured window.
        load(shape, port, 1, conns, headers, work)
        before = cpu_seconds(proc.pid) if proc else 0.0
        r = load(shape, port, seconds, conns, headers, work)
        if proc:
            r.cpu_us_per_req = (cpu_seconds(proc.pid) - before) * 1e6 / max(1, r.requests)
        target.results[shape.label] = r
        if r.errors:
            # A run that got errors measured something else (often a fast error
            # path): the report marks it and the targets refuse it.
            print(f"bench: WARNING: {target.name} / {shape.label}: {r.errors} of {r.requests} requests failed",
                  file=sys.stderr)
        print(f"  {target.name:<22} {shape.label:<28} {r.rps:>10.0f} req/s  p50 {r.p50_ms:6.2f} ms"
              f"  p99 {r.p99_ms:6.2f} ms  cpu {r.cpu_us_per_req:6.1f} us/req  errors {r.errors}",
              flush=True)
    if proc:
        target.rss_mib = rss_kib(proc.pid) / 1024


def distinct_modules(src: Path, n: int, out: Path) -> list[Path]:
    """n copies of a module made distinct by a custom section, so each is its own
    module to both proxies (own digest, own compilation), with the same code."""
    data = src.read_bytes()
    paths = []
    for i in range(n):
        name = b"bench-copy"
        payload = len(name).to_bytes(1, "little") + name + f"{i}".encode()
        section = b"\x00" + bytes([len(payload)]) + payload
        p = out / f"{src.stem}-{i}.wasm"
        p.write_bytes(data + section)
        paths.append(p)
    return paths


def apply_latency(waystone: str, data: Path, port: int, wasm: Path, work: Path, rounds: int) -> list[float]:
    """Time from `waystone apply` of a changed WasmPlugin (cached module, new
    config) until a request sees the new behaviour, in ms."""
    times = []
    for i in range(rounds):
        user = f"user{i}"
        cfg = {"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET"],
                                     "credentials": [f"{user}:pw"]}]}
        manifest = work / "apply-latency.yaml"
        manifest.write_text(f"""apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: p0}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: bench}}]
  url: file://{wasm}
  phase: AUTHN
  priority: 100
  pluginConfig: {json.dumps(cfg)}
""")
        header = {"authorization": "Basic " + base64.b64encode(f"{user}:pw".encode()).decode()}
        t0 = time.perf_counter()
        subprocess.run([waystone, "apply", "-f", str(manifest), "--data-dir", str(data)],
                       capture_output=True, check=True)
        wait_http(f"http://127.0.0.1:{port}{SMALL_PATH}", 200, "apply latency", header, timeout=10)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) // 1024
    return f"{model}, {os.cpu_count()} cores, {mem} MiB RAM, Linux {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--waystone", required=True)
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    ap.add_argument("--wasm-dir", required=True, type=Path)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=9,
                    help="extra interleaved runs of the headline shape; the target lines use their medians")
    ap.add_argument("--report", type=Path)
    ap.add_argument("--micro", type=Path, help="criterion estimates.json of the basic_auth per-request bench")
    ap.add_argument("--cached-module-ms", type=float,
                    help="basic_auth ready from the module and compiled-module caches (scripts/bench-fetch.sh), ms")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="waystone-bench-"))
    # nginx workers run as an unprivileged user and must read the backend's files.
    work.chmod(0o755)
    procs: list[Proc] = []
    basic_auth = args.wasm_dir.resolve() / "basic_auth.wasm"
    noop = args.wasm_dir.resolve() / "noop.wasm"
    auth_plugin = [("basic-auth", basic_auth, BASIC_AUTH_CONFIG)]
    chain5 = auth_plugin + [(f"noop-{i}", noop, {}) for i in range(4)]
    workers = [int(w) for w in args.workers.split(",")]
    shapes_for = lambda w: [Shape(p, b, w) for p in ("h1", "h2") for b in (SMALL_PATH, BIG_PATH)]
    targets: dict[str, Target] = {}
    headline: dict[str, list[Result]] = {}
    pinned: dict[str, list[Result]] = {}
    extra: dict[str, float] = {}
    print(f"bench: {machine()}; {args.seconds:g} s per run, {args.conns} connections (h2: {max(1, args.conns // 8)} x 8 streams)")
    try:
        backend, b1, b2 = start_backend(work, args.nginx)
        procs.append(backend)
        t = targets.setdefault("direct", Target("direct"))
        # The backend is the same single-worker nginx for every target, so
        # "direct" does not vary with the proxies' worker count: measure it once.
        measure(t, None, (b1, b2), shapes_for(workers[0]), args.seconds, args.conns, work)
        for w in workers[1:]:
            for s in shapes_for(w):
                t.results[s.label] = t.results[Shape(s.proto, s.path, workers[0]).label]

        def run_target(name: str, start) -> None:
            t = targets.setdefault(name, Target(name))
            for w in workers:
                proc, *ports = start(w)
                if len(ports) == 1:
                    ports = ports * 2
                procs.append(proc)
                try:
                    measure(t, proc, tuple(ports), shapes_for(w), args.seconds, args.conns, work)
                finally:
                    proc.stop()

        run_target("nginx", lambda w: start_nginx_proxy(work, args.nginx, w, b1))
        run_target("envoy", lambda w: start_envoy(work, args.envoy, f"envoy-plain-{w}", w, b1, []))
        run_target("envoy+basic_auth",
                   lambda w: start_envoy(work, args.envoy, f"envoy-auth-{w}", w, b1, auth_plugin))
        run_target("waystone",
                   lambda w: start_waystone(work, args.waystone, f"waystone-plain-{w}", w, b1, [])[:2])
        run_target("waystone+basic_auth",
                   lambda w: start_waystone(work, args.waystone, f"waystone-auth-{w}", w, b1, auth_plugin)[:2])
        run_target("waystone+5 plugins",
                   lambda w: start_waystone(work, args.waystone, f"waystone-chain5-{w}", w, b1, chain5)[:2])

        # The headline shape again, in interleaved rounds with the four peers of the req/s and
        # p99 targets started side by side: each of those target lines takes the median of the
        # rounds' ratios, so one unlucky 5 s window of a shared machine does not decide a ratio.
        # The peers run in the order that puts the two sides of every target ratio next to each
        # other (envoy+basic_auth | waystone+basic_auth | waystone | nginx), so each ratio of a
        # round compares runs seconds apart, never with a third peer between them.
        w = max(workers)
        head = Shape("h1", SMALL_PATH, w)
        starters = {
            "envoy+basic_auth": lambda: start_envoy(work, args.envoy, "envoy-auth-rounds", w, b1, auth_plugin),
            "waystone+basic_auth": lambda: start_waystone(work, args.waystone, "waystone-auth-rounds", w, b1,
                                                          auth_plugin)[:2],
            "waystone": lambda: start_waystone(work, args.waystone, "waystone-plain-rounds", w, b1, [])[:2],
            "nginx": lambda: start_nginx_proxy(work, args.nginx, w, b1)[:2],
        }
        running = {}
        if args.rounds > 0:
            for name, start in starters.items():
                proc, port = start()
                procs.append(proc)
                running[name] = (proc, port)
        for i in range(args.rounds):
            print(f"  headline round {i + 1} of {args.rounds}", flush=True)
            for name, (proc, port) in round_order(running, i):
                t = Target(name)
                measure(t, proc, (port, port), [head], args.seconds, args.conns, work)
                headline.setdefault(name, []).append(t.results[head.label])
        pinned = pinned_rounds(running, backend, head, args.rounds, args.seconds, args.conns, work)
        for proc, _ in running.values():
            proc.stop()

        # Memory with 10 distinct plugins loaded, both proxies, 2 workers, after traffic.
        ten = [(f"p{i}", m, BASIC_AUTH_CONFIG) for i, m in
               enumerate(distinct_modules(basic_auth, 10, work))]
        w = max(workers)
        for name, start in (("envoy", lambda: start_envoy(work, args.envoy, "envoy-ten", w, b1, ten)),
                            ("waystone", lambda: start_waystone(work, args.waystone, "waystone-ten", w, b1, ten)[:2])):
            proc, port = start()
            procs.append(proc)
            run_wrk(port, SMALL_PATH, 2, args.conns, {"authorization": AUTH})
            extra[f"rss_10_plugins_{name}_mib"] = rss_kib(proc.pid, "VmRSS") / 1024
            proc.stop()
        print(f"  10 distinct plugins, {w} workers: RSS envoy {extra['rss_10_plugins_envoy_mib']:.1f} MiB,"
              f" waystone {extra['rss_10_plugins_waystone_mib']:.1f} MiB")

        # Applying a WasmPlugin change (cached module): time until a request sees it.
        proc, port, data = start_waystone(work, args.waystone, "waystone-apply", 2, b1,
                                          [("p0", basic_auth, BASIC_AUTH_CONFIG)])
        procs.append(proc)
        lat = apply_latency(args.waystone, data, port, basic_auth, work, 20)
        extra["apply_to_effect_ms_median"] = statistics.median(lat)
        extra["apply_to_effect_ms_max"] = max(lat)
        print(f"  apply -> effect (cached module, new config), 20 rounds: median {statistics.median(lat):.1f} ms,"
              f" max {max(lat):.1f} ms")
        proc.stop()
    finally:
        for p in procs:
            p.stop()

    if args.cached_module_ms is not None:
        extra["cached_module_ready_ms"] = args.cached_module_ms
    if args.micro and args.micro.exists():
        est = json.loads(args.micro.read_text())
        extra["wasm_overhead_basic_auth_us"] = est["median"]["point_estimate"] / 1000.0

    lines = report(targets, workers, extra, headline, pinned)
    print("\n".join(lines))
    if args.report:
        write_report(args.report, lines, targets_lines(targets, workers, extra, headline, pinned))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def pinned_rounds(running: dict, backend: Proc, head: Shape, rounds: int, seconds: float, conns: int,
                  work: Path) -> dict[str, list[Result]]:
    """The headline rounds with each proxy alone on one CPU and wrk and the backend on the others.

    Sharing both cores, wrk and the backend take ~27 µs of CPU per request whatever the proxy,
    which caps every req/s ratio near 1; pinned, the proxy's own cost per request decides its
    req/s, as on a machine where the proxy has cores of its own.
    """
    global LOADGEN_CPUS
    out: dict[str, list[Result]] = {}
    all_cpus = os.sched_getaffinity(0)
    if rounds <= 0 or len(all_cpus) < 2:
        return out
    proxy_cpus = {min(all_cpus)}
    LOADGEN_CPUS = all_cpus - proxy_cpus
    pin(backend.pid, LOADGEN_CPUS)
    try:
        for i in range(rounds):
            print(f"  pinned round {i + 1} of {rounds}: proxy on CPU {min(proxy_cpus)},"
                  f" wrk and backend on {sorted(LOADGEN_CPUS)}", flush=True)
            for name, (proc, port) in round_order(running, i):
                pin(proc.pid, proxy_cpus)
                t = Target(name)
                measure(t, proc, (port, port), [head], seconds, conns, work)
                out.setdefault(name, []).append(t.results[head.label])
                pin(proc.pid, all_cpus)
    finally:
        LOADGEN_CPUS = None
        pin(backend.pid, all_cpus)
    return out


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# The ratios the target lines take from the rounds: (numerator, denominator, Result field).
RATIO_PAIRS = [
    ("waystone+basic_auth", "envoy+basic_auth", "rps"),
    ("waystone+basic_auth", "envoy+basic_auth", "p99_ms"),
    ("waystone+basic_auth", "waystone", "rps"),
    ("waystone", "nginx", "rps"),
]


def round_order(running: dict, i: int) -> list:
    """The peers in the order round `i` measures them: reversed every other round, so a
    peer's place in the round (after which peer, how far into it the machine's speed
    drifted) is not the same in every round."""
    order = list(running.items())
    return order if i % 2 == 0 else order[::-1]


def round_ratios(rounds: dict, a: str, b: str, field: str) -> list[float]:
    """`a`'s `field` over `b`'s, round by round."""
    return [ratio(getattr(x, field), getattr(y, field)) for x, y in zip(rounds[a], rounds[b])]


def paired_ratio(rounds: dict, a: str, b: str, field: str) -> float:
    """The median over rounds of `a`'s `field` over `b`'s in the same round. The two ran
    seconds apart (a round of four peers takes about 25 s), so a change of the machine's speed
    between rounds (which moves every peer of a round alike) cancels, where the ratio of the
    two medians keeps it."""
    return statistics.median(round_ratios(rounds, a, b, field))


def median_result(runs: list[Result]) -> Result:
    """Per field, the median over interleaved runs of one peer."""
    return Result(rps=statistics.median(r.rps for r in runs), p50_ms=statistics.median(r.p50_ms for r in runs),
                  p99_ms=statistics.median(r.p99_ms for r in runs), requests=sum(r.requests for r in runs),
                  errors=sum(r.errors for r in runs),
                  cpu_us_per_req=statistics.median(r.cpu_us_per_req for r in runs))


def targets_lines(targets: dict, workers: list[int], extra: dict, headline: dict, pinned: dict) -> list[str]:
    # The headline shape: HTTP/1.1, small body, the most workers measured; the median of its
    # rounds' ratios when there were rounds.
    w = max(workers)
    key = Shape("h1", SMALL_PATH, w).label

    def shared(a: str, b: str, field: str) -> float:
        if a in headline and b in headline:
            return paired_ratio(headline, a, b, field)
        return ratio(getattr(targets[a].results[key], field), getattr(targets[b].results[key], field))

    out = []

    def line(name: str, value: float, op: str, goal: float, fmt: str = "{:.2f}") -> None:
        ok = {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]
        shown = fmt.format(value)
        if shown == fmt.format(goal):
            # Within rounding of the goal: one more digit, so a miss does not read as the goal.
            shown = re.sub(r"\.(\d+)f", lambda m: f".{int(m.group(1)) + 1}f", fmt).format(value)
        out.append(f"target: {name} = {shown} (goal {op} {fmt.format(goal)}) {'met' if ok else 'missed'}")

    def pair(name: str, a: str, b: str, field: str, op: str, goal: float, with_pinned: bool = True) -> None:
        """The line of the shared rounds, then (when there were pinned rounds) its pinned twin."""
        line(name, shared(a, b, field), op, goal)
        if pinned and with_pinned:
            line(name + ", proxy pinned to its own core", paired_ratio(pinned, a, b, field), op, goal)

    pair("waystone+basic_auth / envoy+basic_auth req/s", "waystone+basic_auth", "envoy+basic_auth", "rps", ">=", 2.0)
    pair("waystone+basic_auth p99 / envoy+basic_auth p99", "waystone+basic_auth", "envoy+basic_auth", "p99_ms", "<", 1.0)
    pair("waystone+basic_auth / waystone req/s", "waystone+basic_auth", "waystone", "rps", ">=", 0.9)
    pair("waystone / nginx req/s", "waystone", "nginx", "rps", ">=", 1.0, with_pinned=False)
    if "wasm_overhead_basic_auth_us" in extra:
        line("basic_auth per-request Wasm overhead (criterion median, us)", extra["wasm_overhead_basic_auth_us"], "<=", 2.0)
    line("RSS with 10 plugins, waystone / envoy", ratio(extra["rss_10_plugins_waystone_mib"], extra["rss_10_plugins_envoy_mib"]), "<=", 1 / 3)
    line("WasmPlugin change to effect (median ms)", extra["apply_to_effect_ms_median"], "<=", 100.0, "{:.1f}")
    if "cached_module_ready_ms" in extra:
        line("cached module ready (ms)", extra["cached_module_ready_ms"], "<=", 5.0, "{:.1f}")
    return out


def report(targets: dict, workers: list[int], extra: dict, headline: dict, pinned: dict) -> list[str]:
    lines = []
    key = Shape("h1", SMALL_PATH, max(workers)).label
    for title, rounds in ((f"{key}: {{n}} interleaved rounds (the target lines use the median of the rounds' ratios)",
                           headline),
                          (f"{key}, proxy pinned to one CPU, wrk and backend to the others: {{n}} rounds", pinned)):
        if not rounds:
            continue
        n = len(next(iter(rounds.values())))
        lines.append(f"\n### {title.format(n=n)}\n")
        lines.append("| target | req/s per round | median req/s | p99 ms per round | median p99 ms | median CPU µs/req |")
        lines.append("|---|---|---:|---|---:|---:|")
        for name, runs in rounds.items():
            m = median_result(runs)
            lines.append(f"| {name} | {' / '.join(f'{x.rps:.0f}' for x in runs)} | {m.rps:.0f} | "
                         f"{' / '.join(f'{x.p99_ms:.2f}' for x in runs)} | {m.p99_ms:.2f} | {m.cpu_us_per_req:.1f} |")
        lines.append("")
        for a, b, field in RATIO_PAIRS:
            if a in rounds and b in rounds:
                each = round_ratios(rounds, a, b, field)
                lines.append(f"- {a} / {b} {field} per round: {' / '.join(f'{v:.2f}' for v in each)}; "
                             f"median {statistics.median(each):.2f} (ratio of the medians "
                             f"{ratio(getattr(median_result(rounds[a]), field), getattr(median_result(rounds[b]), field)):.2f})")
    for w in workers:
        for proto in ("h1", "h2"):
            for path in (SMALL_PATH, BIG_PATH):
                key = Shape(proto, path, w).label
                lines.append(f"\n### {key}\n")
                lines.append("| target | req/s | p50 ms | p99 ms | proxy CPU µs/req | peak RSS MiB | vs direct | vs nginx | vs envoy+basic_auth | errors |")
                lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
                for name, t in targets.items():
                    r = t.results.get(key)
                    if r is None:
                        continue
                    direct = targets["direct"].results[key].rps
                    ngx = targets["nginx"].results[key].rps
                    env = targets["envoy+basic_auth"].results[key].rps
                    lines.append(f"| {name} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
                                 f"{r.cpu_us_per_req:.1f} | {t.rss_mib:.1f} | {ratio(r.rps, direct):.2f} | "
                                 f"{ratio(r.rps, ngx):.2f} | {ratio(r.rps, env):.2f} | {r.errors} |")
    lines.append("")
    for k, v in extra.items():
        lines.append(f"- {k}: {v:.2f}")
    return lines


BEGIN, END = "<!-- bench:targets:begin -->", "<!-- bench:targets:end -->"


def write_report(path: Path, lines: list[str], target_lines: list[str]) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = BEGIN + "\n" + "\n".join(target_lines) + "\n" + END
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Targets (from the latest run)\n\n" + block + "\n"
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = text.rstrip() + f"\n\n## Run of {stamp}\n\nMachine: {machine()}.\n" + "\n".join(lines) + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
