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

# Third-party push tools for the interop tests: Debian skopeo, and the ORAS Python SDK
# (PyPI `oras`) in a venv under target/py-tools, so the system Python stays untouched.
# The tests find that venv themselves; WAYSTONE_ORAS_PYTHON overrides it.
ensure_interop_tools() {
    ensure_packages skopeo python3-venv
    local venv="$REPO/target/py-tools"
    if ! "$venv/bin/python" -c 'import oras.client' >/dev/null 2>&1; then
        log "creating $venv with PyPI oras"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check oras
    fi
    export WAYSTONE_ORAS_PYTHON="$venv/bin/python"
}
