#!/usr/bin/env bash
# Builds the Proxy-Wasm plugins under plugins/ into target/wasm/<name>.wasm.
#
# Two routes:
#  - rustup with a wasm32 target installed (a machine with internet): the
#    normal `cargo build --target ...`.
#  - otherwise (machines that reach only Debian and crates.io, where
#    `rustup target add` cannot download): Debian's rustc-web/cargo-web build
#    std for wasm32 from rust-web-src with -Zbuild-std, linked by Debian's
#    wasm-ld. Missing packages are installed; nothing is installed when they
#    are present, so a repeat run costs only cargo's up-to-date check.
#
# Usage: scripts/build-plugins.sh [plugin ...]   (default: every plugin)
# A plugin is a directory under plugins/ (nested ones too, e.g. sdk/rust_v02);
# its module is target/wasm/<crate name>.wasm, the crate named as its directory.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLUGINS_DIR="$REPO/plugins"
OUT_DIR="$REPO/target/wasm"
export CARGO_TARGET_DIR="$REPO/target/plugins"

if [[ $# -gt 0 ]]; then
    plugins=("$@")
else
    plugins=(basic_auth noop misbehave)
fi

log() { printf 'build-plugins: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for p in "${plugins[@]}"; do
    [[ -f "$PLUGINS_DIR/$p/Cargo.toml" ]] || die "no plugin named '$p' (expected $PLUGINS_DIR/$p/Cargo.toml)"
done

# --- route 1: rustup with a wasm32 target ------------------------------------

rustup_target=""
if command -v rustup >/dev/null 2>&1; then
    # Run from the repo so rust-toolchain.toml picks the toolchain whose
    # targets are listed.
    installed="$(cd "$REPO" && rustup target list --installed 2>/dev/null || true)"
    for t in wasm32-unknown-unknown wasm32-wasip1; do
        if grep -qx "$t" <<<"$installed"; then
            rustup_target="$t"
            break
        fi
    done
fi

# --- route 2: Debian packages -------------------------------------------------

apt_updated=0
apt_update_once() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq
        apt_updated=1
    fi
}

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# Installs the packages not yet installed; refreshes the package lists only
# when something is missing and the current lists cannot provide it.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || die "packages ${missing[*]} are missing and installing them needs root"
    export DEBIAN_FRONTEND=noninteractive
    for p in "${missing[@]}"; do
        if ! apt-cache show "$p" >/dev/null 2>&1; then
            apt_update_once
            break
        fi
    done
    log "apt-get install ${missing[*]}"
    if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
        # Stale lists can name versions the mirror no longer has.
        [[ $apt_updated -eq 0 ]] || die "apt-get install ${missing[*]} failed"
        apt_update_once
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
    fi
}

build_cmd=()
artifact_dir=""
if [[ -n "$rustup_target" ]]; then
    log "using rustup's toolchain with target $rustup_target"
    build_cmd=(cargo build --release --locked --target "$rustup_target")
    artifact_dir="$CARGO_TARGET_DIR/$rustup_target/release"
else
    ensure_packages rustc-web cargo-web rust-web-src
    llvm_major="$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
    [[ -n "$llvm_major" ]] || die "cannot read the LLVM version from /usr/bin/rustc -vV"
    ensure_packages "lld-$llvm_major"
    linker="wasm-ld-$llvm_major"
    command -v "$linker" >/dev/null 2>&1 || die "$linker not found after installing lld-$llvm_major"
    log "using Debian's rustc $(/usr/bin/rustc -V | cut -d' ' -f2) with -Zbuild-std, linker $linker"
    # RUSTC must be explicit: Debian's cargo would otherwise run the rustup
    # proxy found first on PATH. RUSTC_BOOTSTRAP unlocks -Zbuild-std on a
    # stable compiler.
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc RUSTC_BOOTSTRAP=1
    export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER="$linker"
    # Panics already abort (profile); immediate-abort also drops std's panic
    # message formatting (a quarter of the module). Older compilers lack the
    # strategy: then the profile's plain abort stands.
    immediate_abort="-Zunstable-options -Cpanic=immediate-abort"
    # shellcheck disable=SC2086 # the flags are meant to split
    if /usr/bin/rustc $immediate_abort --print cfg --target wasm32-unknown-unknown >/dev/null 2>&1; then
        export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS="$immediate_abort"
    fi
    build_cmd=(/usr/bin/cargo build --release --locked
        -Zbuild-std=std,panic_abort --target wasm32-unknown-unknown)
    artifact_dir="$CARGO_TARGET_DIR/wasm32-unknown-unknown/release"
fi

mkdir -p "$OUT_DIR"
for p in "${plugins[@]}"; do
    log "building $p"
    (cd "$PLUGINS_DIR/$p" && "${build_cmd[@]}")
    name="$(basename "$p")"
    src="$artifact_dir/$name.wasm"
    [[ -f "$src" ]] || die "cargo did not produce $src"
    [[ "$(head -c4 "$src" | od -An -tx1 | tr -d ' \n')" == "0061736d" ]] || die "$src is not a wasm module"
    # cp only when changed, so an unchanged module keeps its mtime.
    cmp -s "$src" "$OUT_DIR/$name.wasm" 2>/dev/null || cp "$src" "$OUT_DIR/$name.wasm"
done

for p in "${plugins[@]}"; do
    f="$OUT_DIR/$(basename "$p").wasm"
    printf '%s  %8d bytes  sha256 %s\n' "${f#"$REPO"/}" "$(stat -c %s "$f")" "$(sha256sum "$f" | cut -d' ' -f1)"
done
