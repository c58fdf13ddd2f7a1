#!/usr/bin/env bash
# The main job: the user's walkthrough ("Extend waypoints with WebAssembly
# plugins") for real, on this machine. Installs what it needs, builds Waystone
# and the basic_auth plugin, starts a local OCI registry, pushes the plugin,
# starts `waystone up` and the bookinfo demo, then runs every step of the
# walkthrough with the CLI, printing each command and each HTTP code.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

ensure_runtime_packages
scripts/build-plugins.sh basic_auth
log "cargo build --release"
cargo build --release --locked -p waystone
export PATH="$REPO/target/release:$PATH"
WAYSTONE=waystone

WORK="$(mktemp -d /tmp/waystone-walkthrough.XXXXXX)"
export WAYSTONE_DATA_DIR="$WORK/data"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { # wait_for DESCRIPTION COMMAND...
    local what=$1; shift
    for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    die "timed out waiting for $what"
}

# --- a real OCI registry on loopback ----------------------------------------
REGISTRY="127.0.0.1:$(free_port)"
mkdir -p "$WORK/registry"
cat >"$WORK/registry.yml" <<YAML
version: 0.1
storage:
  filesystem:
    rootdirectory: $WORK/registry
http:
  addr: $REGISTRY
YAML
docker-registry serve "$WORK/registry.yml" >"$WORK/registry.log" 2>&1 &
pids+=($!)
wait_for "the registry" curl -fs "http://$REGISTRY/v2/"

IMAGE="oci://$REGISTRY/istio-ecosystem/wasm-extensions/basic_auth:1.12.0"
run() { printf '\n$ %s\n' "$*"; "$@"; }
run "$WAYSTONE" push target/wasm/basic_auth.wasm "$IMAGE" --insecure

# --- the proxy and the demo backends ---------------------------------------
"$WAYSTONE" up --insecure-registry "$REGISTRY" >"$WORK/up.log" 2>&1 &
pids+=($!)
wait_for "waystone up" test -s "$WAYSTONE_DATA_DIR/api.addr"
"$WAYSTONE" demo bookinfo --apply >"$WORK/bookinfo.log" 2>&1 &
pids+=($!)
wait_for "the bookinfo demo" grep -q "bookinfo ready" "$WORK/bookinfo.log"
ENTRY=127.0.0.1:15001

# The docs' YAML, with only the url changed to the local registry.
manifest() { sed "s#oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0#$IMAGE#" "examples/walkthrough/$1"; }
# `kubectl exec deploy/sleep -- curl ...` inside the mesh becomes curl through the local mesh entry.
mesh_curl() { curl -s -o /dev/null -w "%{http_code}\n" -x "http://$ENTRY" "$@"; }
gw_curl() { curl -s -o /dev/null -w "%{http_code}\n" "$@"; }
show() { printf '\n$ %s\n' "$1"; }

echo "== Apply Wasm configuration at the gateway"
show "kubectl apply -f bookinfo-gateway.yaml"
manifest bookinfo-gateway.yaml | "$WAYSTONE" apply -f -
run "$WAYSTONE" get gateway
GATEWAY_HOST=$("$WAYSTONE" get gateway bookinfo-gateway -o jsonpath='{.status.addresses[0].value}' 2>/dev/null || true)
[[ -n "$GATEWAY_HOST" ]] || GATEWAY_HOST=$("$WAYSTONE" get gateway bookinfo-gateway -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["addresses"][0]["value"])')
show "kubectl apply -f basic-auth-at-gateway.yaml"
manifest basic-auth-at-gateway.yaml | "$WAYSTONE" apply -f -
show "curl -s -w \"%{http_code}\" -o /dev/null \"http://\$GATEWAY_HOST/productpage\""
gw_curl "http://$GATEWAY_HOST/productpage"
show "curl -s -o /dev/null -H \"Authorization: Basic YWRtaW4zOmFkbWluMw==\" -w \"%{http_code}\" \"http://\$GATEWAY_HOST/productpage\""
gw_curl -H "Authorization: Basic YWRtaW4zOmFkbWluMw==" "http://$GATEWAY_HOST/productpage"

echo; echo "== Apply Wasm configuration at the waypoint"
run "$WAYSTONE" waypoint apply --enroll-namespace --wait
show "curl -s -w \"%{http_code}\" -o /dev/null http://productpage:9080/productpage"
mesh_curl http://productpage:9080/productpage
run "$WAYSTONE" get gateway
show "kubectl apply -f basic-auth-at-waypoint.yaml"
manifest basic-auth-at-waypoint.yaml | "$WAYSTONE" apply -f -
run "$WAYSTONE" get wasmplugin
show "curl -s -w \"%{http_code}\" -o /dev/null http://productpage:9080/productpage"
mesh_curl http://productpage:9080/productpage
show "curl -s -w \"%{http_code}\" -o /dev/null -H \"Authorization: Basic YWRtaW4zOmFkbWluMw==\" http://productpage:9080/productpage"
mesh_curl -H "Authorization: Basic YWRtaW4zOmFkbWluMw==" http://productpage:9080/productpage

echo; echo "== Apply a WasmPlugin for one service through the waypoint"
show "kubectl apply -f basic-auth-for-service.yaml"
manifest basic-auth-for-service.yaml | "$WAYSTONE" apply -f -
show "curl -s -w \"%{http_code}\" -o /dev/null -H \"Authorization: Basic YWRtaW4zOmFkbWluMw==\" http://productpage:9080/productpage"
mesh_curl -H "Authorization: Basic YWRtaW4zOmFkbWluMw==" http://productpage:9080/productpage
show "curl -s -w \"%{http_code}\" -o /dev/null -H \"Authorization: Basic MXQtaW4zOmFkbWluMw==\" http://reviews:9080/reviews/1"
mesh_curl -H "Authorization: Basic MXQtaW4zOmFkbWluMw==" http://reviews:9080/reviews/1
show "curl -s -w \"%{http_code}\" -o /dev/null http://reviews:9080/reviews/1"
mesh_curl http://reviews:9080/reviews/1

echo; echo "== Cleanup"
run "$WAYSTONE" delete wasmplugin basic-auth-at-gateway basic-auth-at-waypoint basic-auth-for-service
run "$WAYSTONE" get wasmplugin || true
echo; echo "walkthrough complete"
