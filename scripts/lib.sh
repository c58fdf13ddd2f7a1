# Shared helpers for the project's scripts (sourced, not run).

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

log() { printf '%s [%ss]: %s\n' "$(basename "$0")" "$SECONDS" "$*" >&2; }
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
    ensure_python_h2
}

# The third-party HBONE client of the proxy tests (crates/proxy/tests/hbone_client.py)
# uses Python's h2 package.
ensure_python_h2() {
    python3 -c 'import h2' 2>/dev/null && return 0
    ensure_packages python3 python3-pip
    log "pip install h2"
    python3 -m pip install --quiet 'h2>=4,<5' 2>/dev/null \
        || python3 -m pip install --quiet --break-system-packages 'h2>=4,<5'
}

# Kubernetes mode's tests: Debian's etcd and kubectl-compatible API server.
# No registry ships kube-apiserver, so it is built from Debian's kubernetes
# source package (1.20.2, vendored) and cached where the machine keeps it.
KUBE_VERSION=1.20.2
KUBE_CACHE_DIRS=("/var/cache/waystone" "$REPO/target/tools")

ensure_kube_test_packages() {
    ensure_packages etcd-server openssl ca-certificates
    command -v kubectl >/dev/null 2>&1 || ensure_packages kubernetes-client
}

# Prints the path of a kube-apiserver binary, building it (about 4.5 min on
# two cores) only when no cache directory holds one.
ensure_kube_apiserver() {
    local name="kube-apiserver-$KUBE_VERSION" d
    for d in "${KUBE_CACHE_DIRS[@]}"; do
        if [[ -x "$d/$name" ]]; then
            echo "$d/$name"
            return 0
        fi
    done
    [[ $EUID -eq 0 ]] || die "building kube-apiserver needs root (apt-get source and build dependencies)"
    local src_list=/etc/apt/sources.list.d/waystone-deb-src.sources
    if [[ ! -f $src_list ]]; then
        log "adding deb-src entries for bookworm (kubernetes source package)"
        cat >"$src_list" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
        apt-get update -qq
    fi
    ensure_packages golang-1.19-go golang-github-modern-go-reflect2-dev rsync dpkg-dev make
    local work
    work="$(mktemp -d /var/tmp/waystone-kube-build.XXXXXX)"
    log "building kube-apiserver $KUBE_VERSION from Debian sources in $work"
    (
        cd "$work"
        apt-get source --download-only "kubernetes=$KUBE_VERSION*" >/dev/null 2>&1 ||
            apt-get source --download-only kubernetes >/dev/null
        dpkg-source --no-check -x ./kubernetes_*.dsc src >/dev/null
        cd src
        # The vendored reflect2 1.0.1 breaks on Go >= 1.18; Debian's packaged
        # one is fixed.
        rm -rf vendor/github.com/modern-go/reflect2
        mkdir -p vendor/github.com/modern-go/reflect2
        cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
            /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
            vendor/github.com/modern-go/reflect2/ 2>/dev/null || true
        PATH=/usr/lib/go-1.19/bin:$PATH GOPROXY=off GOFLAGS= GOCACHE="$work/gocache" \
            make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 ||
            { tail -40 "$work/build.log" >&2; exit 1; }
    ) || die "kube-apiserver build failed (log in $work/build.log)"
    local bin="$work/src/_output/bin/kube-apiserver"
    [[ -x $bin ]] || bin="$(find "$work/src/_output" -name kube-apiserver -type f | head -1)"
    [[ -x $bin ]] || die "kube-apiserver binary not found after the build"
    local stored=""
    for d in "${KUBE_CACHE_DIRS[@]}"; do
        if mkdir -p "$d" 2>/dev/null && cp "$bin" "$d/$name.tmp" && mv "$d/$name.tmp" "$d/$name"; then
            stored="${stored:-$d/$name}"
        fi
    done
    rm -rf "$work"
    [[ -n $stored ]] || die "could not store the kube-apiserver binary in ${KUBE_CACHE_DIRS[*]}"
    echo "$stored"
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
