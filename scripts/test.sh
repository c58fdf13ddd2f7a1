#!/usr/bin/env bash
# The test command: installs what the tests use, builds once, runs every suite
# (formatting and lints, unit, integration and end-to-end tests, the plugins'
# own tests). Idempotent; safe to re-run.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

ensure_runtime_packages
ensure_interop_tools
scripts/build-plugins.sh
# The SDK test plugins and Envoy, for the differential tests (docs/differential.md).
scripts/build-sdk-plugins.sh
# Kubernetes mode's tests: etcd, kubectl, and kube-apiserver built from Debian's sources once.
ensure_kube_test_packages
WAYSTONE_KUBE_APISERVER="$(ensure_kube_apiserver)"
export WAYSTONE_KUBE_APISERVER

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# A one-shot CI build gains nothing from the incremental cache (3-4 GB).
if [[ "${CI:-}" == true ]]; then
    export CARGO_INCREMENTAL=0
fi
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "plugin unit tests"
for p in plugins/*/; do
    # plugins/sdk/ holds the SDK test plugins: no unit tests, built above.
    [[ -f "$p/Cargo.toml" ]] || continue
    (cd "$p" && CARGO_TARGET_DIR="$REPO/target/plugins-host" cargo test --locked --quiet)
done

log "workspace tests (unit, integration, end-to-end)"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
else
    cargo test --workspace --locked --no-fail-fast
fi

# Bounded fuzzing of what attackers control (fuzz/README.md); WAYSTONE_FUZZ_SECONDS=0 skips.
fuzz_seconds="${WAYSTONE_FUZZ_SECONDS:-20}"
if [[ "$fuzz_seconds" != 0 ]]; then
    log "fuzz targets, ${fuzz_seconds}s each"
    scripts/fuzz.sh "$fuzz_seconds"
fi
