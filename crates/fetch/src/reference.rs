//! Module urls: `oci://host[:port]/repo[:tag][@sha256:hex]`, `file:///abs/path`, or an OCI
//! reference without a scheme.

use std::fmt;
use std::path::PathBuf;

/// Docker Hub's name in references and pull secrets, and the host its API is served from.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Oci(OciRef),
    File(PathBuf),
    /// A plain `http://` or `https://` download.
    Http(reqwest::Url),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OciRef {
    /// `host[:port]` as written (Docker Hub normalised to `docker.io`).
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<hex>` when the url pins a manifest digest.
    pub digest: Option<String>,
}

impl OciRef {
    /// Host the distribution API is reached at.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// What to put after `/manifests/`: the digest wins over the tag, as in `docker pull`.
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `oci://host/repo` — the cache key part shared by every tag and digest of the repository.
    pub fn repo_key(&self) -> String {
        format!("oci://{}/{}", self.registry, self.repository)
    }

    pub fn tag_key(&self) -> Option<String> {
        match (&self.tag, &self.digest) {
            (Some(tag), None) => Some(format!("{}:{tag}", self.repo_key())),
            (None, None) => Some(format!("{}:latest", self.repo_key())),
            _ => None,
        }
    }

    pub fn digest_key(&self, manifest_digest: &str) -> String {
        format!("{}@{manifest_digest}", self.repo_key())
    }
}

impl fmt::Display for OciRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

pub(crate) fn parse(url: &str) -> Result<Source, String> {
    let url = url.trim();
    if let Some(rest) = url.strip_prefix("file://") {
        let path = PathBuf::from(rest);
        if !path.is_absolute() {
            return Err("file:// urls need an absolute path (file:///abs/path.wasm)".into());
        }
        return Ok(Source::File(path));
    }
    if let Some((scheme, _)) = url.split_once("://") {
        match scheme.to_ascii_lowercase().as_str() {
            "oci" => {}
            "http" | "https" => {
                let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
                if parsed.host_str().is_none_or(str::is_empty) {
                    return Err("http(s) url has no host".into());
                }
                return Ok(Source::Http(parsed));
            }
            _ => {
                return Err(format!(
                    "unsupported scheme {scheme}:// (supported: oci://, file://, http://, https://)"
                ));
            }
        }
    }
    let rest = url.strip_prefix("oci://").unwrap_or(url);
    parse_oci(rest).map(Source::Oci)
}

fn parse_oci(rest: &str) -> Result<OciRef, String> {
    if rest.is_empty() {
        return Err("empty reference".into());
    }
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => (name, Some(parse_digest(digest)?)),
        None => (rest, None),
    };
    // A tag is the part after the last ':' only when no '/' follows it (else it is a port).
    let (name, tag) = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => (&name[..i], Some(&name[i + 1..])),
        _ => (name, None),
    };
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, repo))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), repo.to_string())
        }
        Some(_) => (DOCKER_HUB.to_string(), name.to_string()),
        None => (DOCKER_HUB.to_string(), format!("library/{name}")),
    };
    let registry = match registry.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => registry,
    };
    validate_repository(&repository)?;
    Ok(OciRef {
        registry,
        repository,
        tag: tag.map(str::to_string),
        digest,
    })
}

/// Accepts `sha256:<64 hex>`, lowercasing the hex.
pub(crate) fn parse_digest(s: &str) -> Result<String, String> {
    let hex = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {s:?} is not sha256:<hex>"))?;
    normalize_hex(hex)
        .map(|h| format!("sha256:{h}"))
        .ok_or_else(|| format!("digest {s:?} is not sha256 followed by 64 hex digits"))
}

/// An expected sha256 as given by users: bare hex or `sha256:<hex>`, any case.
pub(crate) fn normalize_hex(s: &str) -> Option<String> {
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
        && !tag.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}"))
    }
}

fn validate_repository(repo: &str) -> Result<(), String> {
    let ok = !repo.is_empty()
        && repo.split('/').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'.'
                        || b == b'_'
                        || b == b'-'
                })
                && part != ".."
                && part != "."
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid repository {repo:?} (lowercase letters, digits, '.', '_', '-', '/')"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oci(s: &str) -> OciRef {
        match parse(s).unwrap() {
            Source::Oci(r) => r,
            other => panic!("expected oci, got {other:?}"),
        }
    }

    #[test]
    fn host_port_repo_tag() {
        let r = oci("oci://127.0.0.1:5000/wasm/basic_auth:1.0");
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "wasm/basic_auth");
        assert_eq!(r.tag.as_deref(), Some("1.0"));
        assert_eq!(r.reference(), "1.0");
        assert_eq!(
            r.tag_key().unwrap(),
            "oci://127.0.0.1:5000/wasm/basic_auth:1.0"
        );
    }

    #[test]
    fn digest_and_no_scheme() {
        let hex = "A".repeat(64);
        let r = oci(&format!("localhost:5000/x@sha256:{hex}"));
        assert_eq!(
            r.digest.as_deref(),
            Some(&*format!("sha256:{}", "a".repeat(64)))
        );
        assert_eq!(r.tag, None);
        assert_eq!(r.tag_key(), None);
        assert_eq!(r.reference(), format!("sha256:{}", "a".repeat(64)));
    }

    #[test]
    fn docker_hub_defaults() {
        let r = oci("oci://nginx");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/nginx");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.reference(), "latest");
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse("ftp://x/y").is_err());
        assert!(parse("https://").is_err());
        assert!(parse("file://relative.wasm").is_err());
        assert!(parse("oci://host:5000/Repo:1").is_err());
        assert!(parse("oci://host:5000/repo@sha256:abc").is_err());
        assert!(parse("oci://host:5000/../x:1").is_err());
        assert!(parse("oci://host:5000/repo:bad tag").is_err());
    }

    #[test]
    fn http_urls() {
        for u in [
            "http://127.0.0.1:8080/m.wasm",
            "HTTPS://example.com/a/b.tar.gz?x=1",
        ] {
            assert!(matches!(parse(u).unwrap(), Source::Http(_)), "{u}");
        }
    }

    #[test]
    fn file_url() {
        assert_eq!(
            parse("file:///tmp/a.wasm").unwrap(),
            Source::File("/tmp/a.wasm".into())
        );
    }
}
