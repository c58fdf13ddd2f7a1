//! Pushing a module to a registry as an OCI image, in Istio's "oci" or "compat" layout.

use std::fmt;
use std::time::Duration;

use serde_json::json;

use crate::auth::Credentials;
use crate::client::{NetPolicy, Session, Transport, sha256_digest};
use crate::error::{FetchError, Op};
use crate::manifest::{self, Descriptor};
use crate::reference::{self, Source};

const PUSH_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const PUSH_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PushLayout {
    /// Config `application/vnd.module.wasm.config.v1+json`, one layer
    /// `application/vnd.module.wasm.content.layer.v1+wasm` holding the raw module.
    #[default]
    Oci,
    /// One `application/vnd.oci.image.layer.v1.tar+gzip` layer holding `plugin.wasm`.
    Compat,
}

#[derive(Clone, Default)]
pub struct PushOptions {
    /// Allow plain HTTP (and unverified TLS) to the target registry.
    pub insecure: bool,
    pub username: Option<String>,
    pub password: Option<String>,
    pub layout: PushLayout,
}

impl fmt::Debug for PushOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushOptions")
            .field("insecure", &self.insecure)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("layout", &self.layout)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushResult {
    /// `sha256:<hex>` of the pushed manifest: what `FetchRequest::sha256` expects (as hex).
    pub manifest_digest: String,
    /// The pushed image pinned by digest: `oci://host:port/repo@sha256:<hex>`.
    pub reference: String,
}

/// Pushes `wasm` to `target` (`oci://host:port/repo:tag`; no tag means `latest`).
pub async fn push(wasm: &[u8], target: &str, opts: &PushOptions) -> Result<PushResult, FetchError> {
    let invalid = |reason: String| FetchError::InvalidUrl {
        op: Op::Push,
        url: target.to_string(),
        reason,
    };
    let oci = match reference::parse(target).map_err(invalid)? {
        Source::Oci(oci) => oci,
        Source::File(_) | Source::Http(_) => {
            return Err(invalid("push needs an oci:// target".into()));
        }
    };
    if oci.digest.is_some() {
        return Err(invalid(
            "push needs a tag, not a digest (the digest is computed)".into(),
        ));
    }
    if wasm.len() < 8 || &wasm[..4] != b"\0asm" {
        return Err(FetchError::NotWasm {
            op: Op::Push,
            url: target.to_string(),
            reason: "bad magic".into(),
        });
    }
    let creds = match (&opts.username, &opts.password) {
        (Some(username), Some(password)) => Some(Credentials {
            username: username.clone(),
            password: password.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(invalid(
                "username and password must be given together".into(),
            ));
        }
    };
    let image = build_image(wasm, opts.layout).map_err(|e| FetchError::BadArchive {
        op: Op::Push,
        url: target.to_string(),
        reason: format!("building the layer: {e}"),
    })?;

    let insecure = if opts.insecure {
        vec![oci.registry.clone()]
    } else {
        Vec::new()
    };
    // Pushes go to a registry the operator names on the command line, so a token realm on a
    // private address is expected; large uploads get a generous per-request timeout.
    let policy = NetPolicy {
        retry_base: crate::DEFAULT_RETRY_BASE,
        max_retries: crate::DEFAULT_MAX_RETRIES,
        request_timeout: PUSH_REQUEST_TIMEOUT,
        allow_private_realms: true,
    };
    let transport = Transport::new(insecure, PUSH_CONNECT_TIMEOUT, policy, &[])?;
    let mut session = Session::open(Op::Push, target, &transport, &oci, creds, "pull,push").await?;
    for (digest, bytes) in [
        (&image.config_digest, &image.config),
        (&image.layer_digest, &image.layer),
    ] {
        if session.blob_exists(digest).await? {
            tracing::debug!(target, digest, "blob already present");
            continue;
        }
        session.upload_blob(digest, bytes).await?;
    }
    let tag = oci.tag.as_deref().unwrap_or("latest");
    let manifest_digest = sha256_digest(&image.manifest);
    if let Some(served) = session
        .put_manifest(tag, manifest::OCI_MANIFEST, &image.manifest)
        .await?
        && served != manifest_digest
    {
        return Err(FetchError::DigestMismatch {
            op: Op::Push,
            url: target.to_string(),
            expected: manifest_digest,
            actual: served,
        });
    }
    let reference = format!("{}@{manifest_digest}", oci.repo_key());
    tracing::info!(target, %manifest_digest, "pushed module");
    Ok(PushResult {
        manifest_digest,
        reference,
    })
}

struct Image {
    config: Vec<u8>,
    config_digest: String,
    layer: Vec<u8>,
    layer_digest: String,
    manifest: Vec<u8>,
}

fn build_image(wasm: &[u8], layout: PushLayout) -> std::io::Result<Image> {
    let (config, config_type, layer, layer_type) = match layout {
        PushLayout::Oci => (
            b"{}".to_vec(),
            manifest::WASM_CONFIG,
            wasm.to_vec(),
            manifest::WASM_LAYER,
        ),
        PushLayout::Compat => {
            let layer = manifest::plugin_tar_gzip(wasm)?;
            // diff_ids name the uncompressed tar, as image configs require.
            let tar = flate2_decode(&layer)?;
            let config = json!({
                "architecture": "wasm",
                "os": "wasip1",
                "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]},
            });
            (
                serde_json::to_vec(&config).map_err(std::io::Error::other)?,
                manifest::OCI_CONFIG,
                layer,
                manifest::OCI_TAR_GZIP,
            )
        }
    };
    let config_desc = Descriptor {
        media_type: config_type.into(),
        digest: sha256_digest(&config),
        size: config.len() as u64,
    };
    let layer_desc = Descriptor {
        media_type: layer_type.into(),
        digest: sha256_digest(&layer),
        size: layer.len() as u64,
    };
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": manifest::OCI_MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
    });
    Ok(Image {
        manifest: serde_json::to_vec(&manifest).map_err(std::io::Error::other)?,
        config_digest: config_desc.digest,
        config,
        layer_digest: layer_desc.digest,
        layer,
    })
}

fn flate2_decode(gz: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz), &mut out)?;
    Ok(out)
}
