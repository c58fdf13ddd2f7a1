#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ for a bounded time (default 30 s each), from a seed
# corpus made here. Exits non-zero when a target finds a crash (kept under
# target/fuzz/artifacts/<target>/). Builds with the pinned stable toolchain; see fuzz/README.md.
#
# Usage: scripts/fuzz.sh [seconds-per-target] [target ...]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$REPO"

seconds="${1:-30}"
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(host_calls header_map oci_manifest layer_archive resource_yaml)
[[ "$seconds" =~ ^[0-9]+$ ]] || die "seconds must be a whole number, not '$seconds'"

# libFuzzer is C++, built by libfuzzer-sys.
command -v c++ >/dev/null 2>&1 || ensure_packages g++

out="$REPO/target/fuzz"
export CARGO_TARGET_DIR="${WAYSTONE_FUZZ_TARGET_DIR:-$out/build}"
export RUSTC_WRAPPER="$REPO/fuzz/rustc-sancov.sh"
log "building fuzz targets (${targets[*]})"
(cd fuzz && cargo build --release --locked $(printf -- '--bin %s ' "${targets[@]}"))

# Seeds: small valid and hostile inputs, so each run starts past the trivial rejections.
seeds="$out/seeds"
mkdir -p "$seeds"
python3 - "$seeds" "$REPO" <<'PY'
import gzip, io, json, os, sys, tarfile
seeds, repo = sys.argv[1], sys.argv[2]
def put(target, name, data):
    d = os.path.join(seeds, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
def tar(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()
wasm = b"\0asm\x01\0\0\0"
R, S = tarfile.REGTYPE, tarfile.SYMTYPE
put("layer_archive", "plugin", tar([("plugin.wasm", wasm, R)]))
put("layer_archive", "plugin.gz", gzip.compress(tar([("plugin.wasm", wasm, R)])))
put("layer_archive", "traversal", tar([("../../plugin.wasm", wasm, R)]))
put("layer_archive", "absolute", tar([("/plugin.wasm", wasm, R)]))
put("layer_archive", "symlink", tar([("plugin.wasm", b"", S)]))
put("layer_archive", "two-modules", tar([("a.wasm", wasm, R), ("b.wasm", wasm, R)]))
put("layer_archive", "long-name", tar([("x/" * 80 + "plugin.wasm", wasm, R)]))
put("layer_archive", "gzip-bomb", gzip.compress(b"\0" * (8 << 20)))
put("layer_archive", "tar-bomb.gz", gzip.compress(tar([("f%d" % i, b"x" * 512, R) for i in range(2000)])))
digest = "sha256:" + "ab" * 32
layer = lambda mt: {"mediaType": mt, "digest": digest, "size": 8}
put("oci_manifest", "image", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": layer("application/vnd.module.wasm.config.v1+json"),
    "layers": [layer("application/vnd.module.wasm.content.layer.v1+wasm")]}).encode())
put("oci_manifest", "compat", json.dumps({"schemaVersion": 2, "layers": [layer("application/vnd.oci.image.layer.v1.tar+gzip")]}).encode())
put("oci_manifest", "index", json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [layer("application/vnd.oci.image.manifest.v1+json")]}).encode())
def smap(pairs):
    out = len(pairs).to_bytes(4, "little")
    for k, v in pairs:
        out += len(k).to_bytes(4, "little") + len(v).to_bytes(4, "little")
    for k, v in pairs:
        out += k + b"\0" + v + b"\0"
    return out
put("header_map", "two", smap([(b":path", b"/x"), (b"X-Up", b"v")]))
put("header_map", "empty-values", smap([(b"a", b""), (b"", b"b")]))
put("header_map", "lying-count", b"\xff\xff\xff\x7f" + smap([(b"a", b"b")])[4:])
put("host_calls", "calls", bytes([0x10, 12, 1, 2, 3, 0x10, 7, 0, 9, 11, 12, 0x2f, 5, 0x20, 14, 1, 2]))
put("host_calls", "lying-alloc", bytes([0x0f, 17, 0x10, 10, 2, 13, 14, 0x30, 24, 11, 10, 3, 4]))
for name in os.listdir(os.path.join(repo, "examples/walkthrough")):
    with open(os.path.join(repo, "examples/walkthrough", name), "rb") as f:
        put("resource_yaml", name, f.read())
put("resource_yaml", "aliases", b"a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\nd: [*c, *c, *c]\n")
PY

failed=()
for t in "${targets[@]}"; do
    corpus="$out/corpus/$t"
    artifacts="$out/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    log "fuzzing $t for ${seconds}s"
    if ! "$CARGO_TARGET_DIR/release/$t" "$corpus" "$seeds/$t" \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -max_len=8192 -len_control=0 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 2>"$out/$t.log"; then
        failed+=("$t")
        tail -40 "$out/$t.log" >&2
    fi
    grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "$out/$t.log" | sed "s/^/$t: /" >&2 || true
done
if [[ ${#failed[@]} -gt 0 ]]; then
    die "crashes in: ${failed[*]} (inputs under $out/artifacts/)"
fi
log "no crashes in ${targets[*]}"
