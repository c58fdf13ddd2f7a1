//! Images pushed by third-party tools, fetched by Waystone: the ORAS Python SDK (PyPI `oras`)
//! and Debian's `skopeo` (copying an OCI layout directory built here, as Docker schema2 and
//! as OCI). `scripts/test.sh` installs both (see `ensure_interop_tools` in `scripts/lib.sh`).
//! A missing tool skips the test on a developer machine and fails it under `CI`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use support::*;
use waystone_fetch::FetchRequest;
use waystone_fetch::testing::Registry;

/// Whether a missing tool may skip the test: only outside CI.
fn missing(tool: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{tool} is required under CI: {why} (scripts/test.sh installs it)");
    }
    eprintln!("skipping: {tool} not available ({why}); run scripts/test.sh to install it");
}

/// A Python that can import `oras`: `WAYSTONE_ORAS_PYTHON`, else the venv `scripts/lib.sh`
/// makes under the repository's `target/`, else `python3`.
fn oras_python() -> Option<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = std::env::var_os("WAYSTONE_ORAS_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            repo.join("target/py-tools/bin/python"),
            PathBuf::from("python3"),
        ]);
    for python in candidates {
        let ok = Command::new(&python)
            .args(["-c", "import oras.client"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    None
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const ORAS_PUSH: &str = r#"
import sys, oras.client
host, target, path, media_type, config = sys.argv[1:6]
client = oras.client.OrasClient(hostname=host, insecure=True)
client.push(files=[f"{path}:{media_type}"], manifest_config=config, target=target,
            disable_path_validation=True)
"#;

#[tokio::test]
async fn oras_pushed_images_are_fetched() {
    let Some(python) = oras_python() else {
        return missing("PyPI oras", "no Python that imports oras.client");
    };
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = module("oras");
    let plugin = dir.path().join("plugin.wasm");
    std::fs::write(&plugin, &wasm).unwrap();
    let layer_tgz = dir.path().join("plugin.tar.gz");
    std::fs::write(&layer_tgz, tar_gz(&[("plugin.wasm", &wasm)])).unwrap();
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{}").unwrap();

    let cases = [
        // Istio's "oci" layout: the raw module as the wasm content layer.
        (
            "oras/oci:1",
            &plugin,
            "application/vnd.module.wasm.content.layer.v1+wasm",
            "application/vnd.module.wasm.config.v1+json",
        ),
        // The "compat" layout: a tar+gzip layer holding plugin.wasm.
        (
            "oras/compat:1",
            &layer_tgz,
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.oci.image.config.v1+json",
        ),
    ];
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    for (repo, file, layer_type, config_type) in cases {
        let target = format!("{}/{repo}", reg.host());
        run(Command::new(&python)
            .current_dir(dir.path())
            .args(["-c", ORAS_PUSH, &reg.host(), &target])
            .arg(file)
            .arg(layer_type)
            .arg(format!("{}:{config_type}", config.display())));
        let got = f.fetch(&FetchRequest::new(reg.url(repo))).await.unwrap();
        assert_eq!(*got.bytes, wasm, "{repo}");
        assert!(!got.cache_hit);
    }
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag`: a compat-style image
/// (an image config with the tar's diff_id, one tar+gzip layer holding plugin.wasm).
fn write_oci_layout(dir: &Path, tag: &str, wasm: &[u8]) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = digest(bytes);
        std::fs::write(blobs.join(d.trim_start_matches("sha256:")), bytes).unwrap();
    };
    let tar = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(wasm.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "plugin.wasm", wasm).unwrap();
        b.into_inner().unwrap()
    };
    let layer = gzip(&tar);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [digest(&tar)]},
        "config": {},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
    }))
    .unwrap();
    for b in [&layer, &config, &manifest] {
        put(b);
    }
    let mut entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    entry["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
    let index = json!({"schemaVersion": 2, "manifests": [entry]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[tokio::test]
async fn skopeo_copied_images_are_fetched_in_docker_and_oci_formats() {
    let skopeo_ok = Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !skopeo_ok {
        return missing("skopeo", "not on PATH (Debian package skopeo)");
    }
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let wasm = module("skopeo");
    write_oci_layout(&layout, "v1", &wasm);

    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), &[reg.host()]);
    for (format, repo, media_type) in [
        (
            "v2s2",
            "skopeo/docker:v1",
            "application/vnd.docker.distribution.manifest.v2+json",
        ),
        (
            "oci",
            "skopeo/oci:v1",
            "application/vnd.oci.image.manifest.v1+json",
        ),
    ] {
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--format",
                format,
            ])
            // No policy.json on a fresh machine: accept anything, this is a local test.
            .args(["--insecure-policy"])
            .arg(format!("oci:{}:v1", layout.display()))
            .arg(format!("docker://{}/{repo}", reg.host())));
        // The registry holds what skopeo wrote, in the format asked for.
        let manifest = reqwest::Client::new()
            .get(format!(
                "http://{}/v2/{}/manifests/v1",
                reg.host(),
                repo.trim_end_matches(":v1")
            ))
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            manifest.headers()["content-type"].to_str().unwrap(),
            media_type
        );
        let got = f.fetch(&FetchRequest::new(reg.url(repo))).await.unwrap();
        assert_eq!(*got.bytes, wasm, "{format}");
    }
}
