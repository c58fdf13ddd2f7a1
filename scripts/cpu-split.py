#!/usr/bin/env python3
"""User and system CPU time per request of Waystone, without and with basic_auth (and of
nginx as the bench's plain reverse proxy, with `--nginx`).

Starts the bench backend and two `waystone up` (no plugin; basic_auth), then loads each in
turn with `wrk` (the bench's small body, 32 connections) and prints req/s and the proxy's
utime and stime per request from `/proc`. `--pin` puts the proxies on CPU 0 and `wrk` and
the backend on CPU 1, so the proxy has a core of its own:

    cargo build --profile production -p waystone && scripts/build-plugins.sh
    python3 scripts/cpu-split.py --workers 1 --pin      # or without --pin: cores shared
    python3 scripts/cpu-split.py --workers 2 --nginx    # the headline shape, nginx beside
    python3 scripts/cpu-split.py --nginx --bare         # and the floor (one thread): the
                                                        # bare_forwarder example, built for production
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench as b  # noqa: E402


ap = argparse.ArgumentParser()
ap.add_argument("--workers", type=int, default=1)
ap.add_argument("--pin", action="store_true")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--seconds", type=float, default=3)
ap.add_argument("--nginx", action="store_true", help="nginx as a plain reverse proxy too")
ap.add_argument("--bare", action="store_true",
                help="crates/proxy/examples/bare_forwarder.rs too (one thread, whatever --workers)")
args = ap.parse_args()

work = Path(tempfile.mkdtemp(prefix="waystone-cpu-split-"))
work.chmod(0o755)
procs = []
try:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    backend, port1, _ = b.start_backend(work, nginx)
    procs.append(backend)
    auth = [("basic-auth", REPO / "target/wasm/basic_auth.wasm", b.BASIC_AUTH_CONFIG)]
    proxies = {}
    for name, plugins in (("plain", []), ("basic_auth", auth)):
        p, port, _ = b.start_waystone(work, str(REPO / "target/production/waystone"), name,
                                      args.workers, port1, plugins)
        procs.append(p)
        proxies[name] = (p, port)
    if args.nginx:
        p, port, _ = b.start_nginx_proxy(work, nginx, args.workers, port1)
        procs.append(p)
        proxies["nginx"] = (p, port)
    if args.bare:
        p, port = b.start_bare_forwarder(work, port1)
        procs.append(p)
        proxies["bare"] = (p, port)
    if args.pin:
        for p, _ in proxies.values():
            b.pin(p.pid, {0})
        b.pin(backend.pid, {1})
        os.sched_setaffinity(0, {1})
    for _ in range(args.rounds):
        for name, (p, port) in proxies.items():
            u0, s0 = b.cpu_times(p.pid)
            r = b.run_wrk(port, b.SMALL_PATH, args.seconds, 32, {"authorization": b.AUTH})
            u1, s1 = b.cpu_times(p.pid)
            n = max(r.requests, 1)
            print(f"{name:10} {r.rps:8.0f} req/s  user {1e6 * (u1 - u0) / n:5.2f} us"
                  f"  sys {1e6 * (s1 - s0) / n:5.2f} us  non-2xx {r.errors}", flush=True)
finally:
    for p in reversed(procs):
        p.stop()
    shutil.rmtree(work, ignore_errors=True)
