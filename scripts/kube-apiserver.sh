#!/usr/bin/env bash
# Ensures etcd and a kube-apiserver binary exist (building the latter from
# Debian's sources once) and prints the kube-apiserver path. Idempotent.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_kube_test_packages
ensure_kube_apiserver
