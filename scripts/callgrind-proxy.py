#!/usr/bin/env python3
"""Instructions per request of the whole proxy as built for production, under callgrind.

Starts the bench backend (nginx) and `waystone up` (1 worker) under valgrind with
instrumentation off, applies the bench manifest (no plugin, or basic_auth), warms up, then
counts exactly N keep-alive requests and dumps the profile:

    cargo build --profile production -p waystone
    python3 scripts/callgrind-proxy.py plain 1000   # or: auth 1000, or nginx 1000 (the peer)
    python3 scripts/callgrind-proxy.py bare 1000    # the floor: crates/proxy/examples/bare_forwarder.rs
                                                    # (cargo build --profile production
                                                    #  -p waystone-proxy --example bare_forwarder)
    python3 scripts/callgrind-proxy.py auth 300 big # the bench's 64 KiB body instead of the small one
    python3 scripts/callgrind-proxy.py auth 1000 cache  # also simulate the caches and branch
                                                        # predictors: misses per request
    callgrind_annotate /tmp/waystone-cg.plain.out.1 | grep 'PROGRAM TOTALS'   # / N

WAYSTONE_BIN=path/to/waystone profiles another build (e.g. two `release` builds side by side, which
take minutes to build instead of the production build's quarter hour).

Instruction counts do not move with the load of a shared machine, unlike req/s. With a plugin,
the proxy writes a perf map (WAYSTONE_WASM_PERFMAP=1) and the script prints the instructions per
request spent in guest code, by Wasm function (callgrind alone sees bare JIT addresses).
"""
import bisect
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench as b  # noqa: E402


def guest_functions(profile: str, perf_map: Path, n: int) -> None:
    """Instructions per request in JIT code, named from wasmtime's perf map."""
    syms = []
    for line in perf_map.read_text().splitlines():
        addr, size, name = line.split(" ", 2)
        syms.append((int(addr, 16), int(size, 16), name))
    syms.sort()
    starts = [s[0] for s in syms]
    text = subprocess.run(["callgrind_annotate", "--show=Ir", "--threshold=100", "--auto=no", profile],
                          capture_output=True, text=True, check=True).stdout
    by_name: dict[str, int] = {}
    for m in re.finditer(r"^\s*([\d,]+) \(.*?\)\s+\?\?\?:0x([0-9a-f]+)", text, re.M):
        ir, addr = int(m.group(1).replace(",", "")), int(m.group(2), 16)
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < syms[i][0] + syms[i][1]:
            by_name[syms[i][2]] = by_name.get(syms[i][2], 0) + ir
    print(f"guest code: {sum(by_name.values()) / n:,.0f} instructions per request")
    for name, ir in sorted(by_name.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {ir / n:8,.0f}  {name}")
    perf_map.unlink(missing_ok=True)


mode, n = sys.argv[1], int(sys.argv[2])
big = "big" in sys.argv[3:]
cache = "cache" in sys.argv[3:]
path = b.BIG_PATH if big else b.SMALL_PATH
waystone = os.environ.get("WAYSTONE_BIN") or str(REPO / "target/production/waystone")
work = Path(tempfile.mkdtemp(prefix="waystone-cg-"))
work.chmod(0o755)
procs = []
try:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    backend, port1, _ = b.start_backend(work, nginx)
    procs.append(backend)
    out = f"/tmp/waystone-cg.{mode}{'.big' if big else ''}.out"
    valgrind = ["valgrind", "--tool=callgrind", "--smc-check=all-non-file", f"--callgrind-out-file={out}",
                "--instr-atstart=no", *(["--cache-sim=yes", "--branch-sim=yes"] if cache else [])]
    if mode == "nginx":
        # The peer, counted the same way: nginx as the bench's plain reverse proxy, one process.
        conf, port, _ = b.nginx_proxy_conf(work, 1, port1)
        conf.write_text(conf.read_text().replace("master_process on;", "master_process off;"))
        p = b.Proc("nginx", [*valgrind, nginx, "-c", str(conf)], work / "nginx.log")
        procs.append(p)
        b.wait_port(port, p.p, "nginx", timeout=120)
    elif mode == "bare":
        p, port = b.start_bare_forwarder(work, port1, wrap=valgrind, timeout=120)
        procs.append(p)
    else:
        plugins = [("basic-auth", REPO / "target/wasm/basic_auth.wasm", b.BASIC_AUTH_CONFIG)] if mode == "auth" else []
        p, port, _ = b.start_waystone(work, waystone, "ws", 1, port1, plugins, wrap=valgrind,
                                      env={"WAYSTONE_WASM_PERFMAP": "1"}, timeout=120)
        procs.append(p)

    def run(k: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(k):
            c.request("GET", path, headers={"authorization": b.AUTH})
            r = c.getresponse()
            r.read()
            assert r.status == 200, r.status
        c.close()

    ctl = lambda *a: subprocess.run(["callgrind_control", *a, str(p.pid)], check=True, capture_output=True)
    run(50)
    ctl("-i", "on")
    run(20)
    ctl("-z")
    run(n)
    ctl("-d")
    print(f"profile of {n} requests: {out}.1")
    if cache:
        totals = subprocess.run(["callgrind_annotate", "--auto=no", "--threshold=100", f"{out}.1"],
                                capture_output=True, text=True, check=True).stdout
        events = re.search(r"^Events shown:\s+(.*)$", totals, re.M).group(1).split()
        values = re.search(r"^\s*(.*?)\s+PROGRAM TOTALS", totals, re.M).group(1)
        values = [int(v.replace(",", "")) for v in re.findall(r"([\d,]+) \(", values)]
        print("per request: " + "  ".join(f"{e} {v / n:,.0f}" for e, v in zip(events, values)))
    if mode == "auth":
        guest_functions(f"{out}.1", Path(f"/tmp/perf-{p.pid}.map"), n)
finally:
    for p in procs:
        p.stop()
    shutil.rmtree(work, ignore_errors=True)
