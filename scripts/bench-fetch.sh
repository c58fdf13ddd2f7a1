#!/usr/bin/env bash
# Cold (fetch from a local registry + cranelift compile) and warm (module cache + compiled-module
# cache, as after a restart) plugin load times, for basic_auth.wasm and a generated >= 10 MB
# module. Needs docker-registry (installed like the tests' runtime packages) and the plugins.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"
ensure_runtime_packages
[[ -f target/wasm/basic_auth.wasm ]] || scripts/build-plugins.sh
cargo run --quiet --release -p waystone-control --example bench_fetch -- "$REPO/target/wasm/basic_auth.wasm"
