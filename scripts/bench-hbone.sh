#!/usr/bin/env bash
# HBONE vs plain inbound, side by side in one run: the same waypoint chain (basic_auth + a
# property-reading plugin) reached over plain HTTP/1.1 on its listener and over HBONE (mTLS
# HTTP/2 CONNECT, HTTP/1.1 inside). Prints, per mode: sequential latency p50/p99 (1000
# requests on one connection), concurrent req/s (16 connections x 100 requests), and the cost
# of a new connection plus one request (200 rounds), then the HBONE/plain ratios.
# The measurement is the ignored test hbone_vs_plain_benchmark in crates/proxy/tests/hbone.rs.
#
# Usage: scripts/bench-hbone.sh [--release]
# Bounded: 2 x 2850 requests on loopback; a few seconds after the build (the test profile
# by default, whose dependencies are optimized; --release builds everything optimized).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

profile=()
[[ "${1:-}" == "--release" ]] && profile=(--release)
[[ -f target/wasm/basic_auth.wasm ]] || scripts/build-plugins.sh basic_auth
log "cargo test ${profile[*]} -p waystone-proxy --test hbone hbone_vs_plain_benchmark"
out=$(cargo test "${profile[@]}" --locked --quiet -p waystone-proxy --test hbone \
    -- --ignored --exact hbone_vs_plain_benchmark --nocapture 2>&1) || {
    printf '%s\n' "$out" >&2
    die "the benchmark failed"
}
printf '%s\n' "$out" | grep '^BENCH' | python3 -c '
import re, sys
rows = {}
for line in sys.stdin:
    m = re.match(r"BENCH (\w+): sequential p50 (\S+) p99 (\S+); \S+ concurrent (\d+) req/s; new connection \+ request (\S+)", line)
    if m:
        rows[m.group(1)] = m.groups()[1:]
def us(d):
    n, unit = re.match(r"([\d.]+)(\D+)", d).groups()
    return float(n) * {"ns": 1e-3, "µs": 1, "us": 1, "ms": 1e3, "s": 1e6}[unit]
if set(rows) != {"plain", "hbone"}:
    sys.exit("bench-hbone: the benchmark printed no plain/hbone lines")
print("%-12s%10s%10s%10s%18s" % ("", "p50 us", "p99 us", "req/s", "new conn+req us"))
for name in ("plain", "hbone"):
    p50, p99, rps, conn = rows[name]
    print("%-12s%10.0f%10.0f%10d%18.0f" % (name, us(p50), us(p99), int(rps), us(conn)))
p, h = rows["plain"], rows["hbone"]
print("hbone/plain: p50 x%.2f  p99 x%.2f  req/s x%.2f  new conn x%.2f" % (
    us(h[0]) / us(p[0]), us(h[1]) / us(p[1]), int(h[2]) / int(p[2]), us(h[3]) / us(p[3])))
'
