#!/usr/bin/env bash
# RUSTC_WRAPPER for scripts/fuzz.sh: adds libFuzzer's coverage instrumentation (stable
# -C flags) and `--cfg fuzzing` to Waystone's own crates and the fuzz targets only, so the
# dependencies build uninstrumented and once.
set -euo pipefail
rustc="$1"
shift
crate=""
prev=""
for a in "$@"; do
    if [[ "$prev" == "--crate-name" ]]; then
        crate="$a"
        break
    fi
    prev="$a"
done
case "$crate" in
    waystone_wasm | waystone_fetch | waystone_model | host_calls | header_map | oci_manifest | layer_archive | resource_yaml)
        exec "$rustc" "$@" \
            -Cpasses=sancov-module \
            -Cllvm-args=-sanitizer-coverage-level=4 \
            -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
            -Cllvm-args=-sanitizer-coverage-pc-table \
            -Cllvm-args=-sanitizer-coverage-trace-compares \
            -Cdebug-assertions \
            -Coverflow-checks \
            --cfg fuzzing
        ;;
    *) exec "$rustc" "$@" ;;
esac
