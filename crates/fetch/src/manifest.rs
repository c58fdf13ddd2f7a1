//! Manifest shapes, the choice of the layer that holds the module, and `plugin.wasm` extraction.

use std::io::{self, Read};
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_TAR_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Raw-module layer types: Istio's, plus the CNCF Wasm artifact ones (a single raw layer that
/// Istio rejects but that is unambiguous).
const RAW_WASM_LAYERS: &[&str] = &[
    WASM_LAYER,
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/wasm",
];
const TAR_GZIP_LAYERS: &[&str] = &[OCI_TAR_GZIP, DOCKER_TAR_GZIP];

const PLUGIN_ENTRY: &str = "plugin.wasm";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

#[derive(Debug, Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

#[derive(Debug)]
pub enum Manifest {
    Image { layers: Vec<Descriptor> },
    Index { manifests: Vec<Descriptor> },
}

pub fn parse(bytes: &[u8], content_type: &str) -> Result<Manifest, String> {
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err(format!(
            "schemaVersion {:?} is not supported (need 2)",
            raw.schema_version
        ));
    }
    // The body's mediaType is authoritative; registries may serve a generic Content-Type.
    let media_type = raw
        .media_type
        .as_deref()
        .unwrap_or(content_type.split(';').next().unwrap_or("").trim());
    let is_index = match media_type {
        OCI_INDEX | DOCKER_LIST => true,
        OCI_MANIFEST | DOCKER_MANIFEST => false,
        // OCI allows omitting mediaType: decide by shape.
        _ => raw.manifests.is_some() && raw.layers.is_none(),
    };
    if is_index {
        Ok(Manifest::Index {
            manifests: raw.manifests.unwrap_or_default(),
        })
    } else {
        let layers = raw
            .layers
            .ok_or_else(|| format!("manifest ({media_type}) has no layers"))?;
        Ok(Manifest::Image { layers })
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum LayerChoice {
    Raw(Descriptor),
    TarGzip(Descriptor),
}

/// A raw Wasm layer wins; otherwise the last tar+gzip layer, which must hold `plugin.wasm`.
pub fn choose_layer(layers: &[Descriptor]) -> Option<LayerChoice> {
    if let Some(d) = layers
        .iter()
        .find(|d| RAW_WASM_LAYERS.contains(&d.media_type.as_str()))
    {
        return Some(LayerChoice::Raw(d.clone()));
    }
    layers
        .iter()
        .rev()
        .find(|d| TAR_GZIP_LAYERS.contains(&d.media_type.as_str()))
        .map(|d| LayerChoice::TarGzip(d.clone()))
}

pub fn media_types(layers: &[Descriptor]) -> String {
    if layers.is_empty() {
        return "none".into();
    }
    layers
        .iter()
        .map(|d| d.media_type.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

#[derive(Debug, PartialEq, Eq)]
pub enum ArchiveError {
    /// `plugin.wasm` itself exceeds the module limit.
    TooLarge,
    Bad(String),
}

/// Reads `plugin.wasm` out of a tar+gzip layer held in memory, never touching the disk.
///
/// The decompressed stream is capped at `decompressed_limit` (gzip bombs stop there) and the
/// entry at `module_limit`. Entries that would escape the layer root reject the whole layer.
pub fn extract_plugin(
    gz: &[u8],
    module_limit: u64,
    decompressed_limit: u64,
) -> Result<Vec<u8>, ArchiveError> {
    let decoder = flate2::read::GzDecoder::new(gz);
    let capped = CappedReader {
        inner: decoder,
        remaining: decompressed_limit,
    };
    let mut archive = tar::Archive::new(capped);
    let entries = archive
        .entries()
        .map_err(|e| bad("reading tar", &e, decompressed_limit))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad("reading tar entry", &e, decompressed_limit))?;
        let raw_path = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_path).into_owned();
        let path = Path::new(&name);
        let escapes = path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        });
        if escapes {
            return Err(ArchiveError::Bad(format!(
                "entry {name:?} escapes the layer root"
            )));
        }
        let normal: Vec<_> = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .collect();
        if normal.len() != 1 || normal[0].as_os_str() != PLUGIN_ENTRY {
            continue;
        }
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(ArchiveError::Bad(format!(
                "entry {name:?} is not a regular file ({kind:?})"
            )));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| bad("reading tar header", &e, decompressed_limit))?;
        if size > module_limit {
            return Err(ArchiveError::TooLarge);
        }
        let mut out = Vec::with_capacity(size as usize);
        entry
            .take(module_limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| bad("reading plugin.wasm", &e, decompressed_limit))?;
        if out.len() as u64 > module_limit {
            return Err(ArchiveError::TooLarge);
        }
        return Ok(out);
    }
    Err(ArchiveError::Bad(format!("layer holds no {PLUGIN_ENTRY}")))
}

fn bad(what: &str, e: &io::Error, limit: u64) -> ArchiveError {
    if is_cap_error(e) {
        ArchiveError::Bad(format!("layer decompresses to more than {limit} bytes"))
    } else {
        ArchiveError::Bad(format!("{what}: {e}"))
    }
}

/// Un-gzips a whole body held in memory, failing once it would exceed `limit` bytes.
pub fn gunzip_capped(gz: &[u8], limit: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut capped = CappedReader {
        inner: flate2::read::GzDecoder::new(gz),
        remaining: limit,
    };
    let mut out = Vec::new();
    capped
        .read_to_end(&mut out)
        .map_err(|e| bad("un-gzipping", &e, limit))?;
    Ok(out)
}

/// A POSIX/GNU tar starts with a 512-byte header carrying `ustar` at offset 257.
pub fn is_tar(bytes: &[u8]) -> bool {
    bytes.len() >= 512 && &bytes[257..262] == b"ustar"
}

/// Reads the one `.wasm` entry of an (already decompressed) tar. Every entry is looked at:
/// one that would escape the archive root, a `.wasm` that is not a regular file, or a second
/// `.wasm` rejects the archive, so which module is served never depends on entry order.
pub fn extract_single_wasm(tar_bytes: &[u8], module_limit: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut archive = tar::Archive::new(tar_bytes);
    let entries = archive
        .entries()
        .map_err(|e| ArchiveError::Bad(format!("reading tar: {e}")))?;
    let mut found: Option<(String, Vec<u8>)> = None;
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::Bad(format!("reading tar entry: {e}")))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let escapes = Path::new(&name).components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        });
        if escapes {
            return Err(ArchiveError::Bad(format!(
                "entry {name:?} escapes the archive root"
            )));
        }
        if !name.to_ascii_lowercase().ends_with(".wasm") {
            continue;
        }
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(ArchiveError::Bad(format!(
                "entry {name:?} is not a regular file ({kind:?})"
            )));
        }
        if let Some((first, _)) = &found {
            return Err(ArchiveError::Bad(format!(
                "archive holds more than one .wasm module ({first:?}, {name:?})"
            )));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| ArchiveError::Bad(format!("reading tar header: {e}")))?;
        if size > module_limit {
            return Err(ArchiveError::TooLarge);
        }
        let mut out = Vec::with_capacity(size as usize);
        (&mut entry)
            .take(module_limit + 1)
            .read_to_end(&mut out)
            .map_err(|e| ArchiveError::Bad(format!("reading {name:?}: {e}")))?;
        if out.len() as u64 > module_limit {
            return Err(ArchiveError::TooLarge);
        }
        found = Some((name, out));
    }
    found
        .map(|(_, module)| module)
        .ok_or_else(|| ArchiveError::Bad("archive holds no .wasm module".into()))
}

const CAP_MESSAGE: &str = "decompression limit reached";

fn is_cap_error(e: &io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains(CAP_MESSAGE) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Fails (rather than ending the stream, which tar would take as a truncated archive) once
/// more than the allowed bytes have been produced.
struct CappedReader<R> {
    inner: R,
    remaining: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 {
            // Exactly at the cap is fine only if the stream really ends here.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(io::Error::other(CAP_MESSAGE)),
            };
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Builds the one-entry `plugin.wasm` tar+gzip used by the compat push layout; deterministic
/// (zero mtimes) so re-pushing the same module produces the same blob.
pub fn plugin_tar_gzip(wasm: &[u8]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_path(PLUGIN_ENTRY)?;
    header.set_size(wasm.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    builder.append(&header, wasm)?;
    let tar_bytes = builder.into_inner()?;
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    io::Write::write_all(&mut gz, &tar_bytes)?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(mt: &str, n: u8) -> Descriptor {
        Descriptor {
            media_type: mt.into(),
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            size: 1,
        }
    }

    #[test]
    fn raw_layer_wins_then_last_tar_gzip() {
        let layers = vec![
            desc(OCI_TAR_GZIP, 1),
            desc(WASM_LAYER, 2),
            desc(OCI_TAR_GZIP, 3),
        ];
        assert_eq!(
            choose_layer(&layers),
            Some(LayerChoice::Raw(desc(WASM_LAYER, 2)))
        );
        let layers = vec![
            desc(DOCKER_TAR_GZIP, 1),
            desc(DOCKER_TAR_GZIP, 2),
            desc("x", 3),
        ];
        assert_eq!(
            choose_layer(&layers),
            Some(LayerChoice::TarGzip(desc(DOCKER_TAR_GZIP, 2)))
        );
        assert_eq!(
            choose_layer(&[desc("application/vnd.oci.image.layer.v1.tar", 1)]),
            None
        );
    }

    #[test]
    fn parse_kinds() {
        let idx = br#"{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:00","size":1}]}"#;
        assert!(matches!(
            parse(idx, "application/json").unwrap(),
            Manifest::Index { .. }
        ));
        let img = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(parse(img, "").unwrap(), Manifest::Image { .. }));
        assert!(parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, "").is_err());
    }

    #[test]
    fn extract_roundtrip_and_limits() {
        let wasm = b"\0asm\x01\0\0\0hello".to_vec();
        let gz = plugin_tar_gzip(&wasm).unwrap();
        assert_eq!(extract_plugin(&gz, 1 << 20, 1 << 20).unwrap(), wasm);
        assert_eq!(extract_plugin(&gz, 4, 1 << 20), Err(ArchiveError::TooLarge));
        match extract_plugin(&gz, 1 << 20, 100) {
            Err(ArchiveError::Bad(m)) => {
                assert!(m.contains("decompresses to more than 100"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
