//! Wasm module distribution: fetch modules from OCI registries (`oci://`), web servers
//! (`http://`, `https://`) and files (`file://`),
//! check their digests, keep them in a crash-safe on-disk cache, and push modules to registries.
//! See ARCHITECTURE.md for where this crate sits.

mod auth;
mod cache;
mod client;
mod error;
mod guard;
// Public for the fuzz targets (fuzz/): manifests and layers are what a hostile registry controls.
#[doc(hidden)]
pub mod manifest;
mod metrics;
mod push;
mod reference;
pub mod testing;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

pub use cache::CacheEntry;
pub use error::{FetchError, Op};
pub use metrics::{
    CONVERSION_BUCKETS_MS, ConversionResult, MetricsSnapshot, RemoteFetchResult, metrics,
    record_conversion, render_prometheus,
};
pub use push::{PushLayout, PushOptions, PushResult, push};

use cache::{Cache, IndexEntry};
use client::{NetPolicy, Session, Transport};
use manifest::{ArchiveError, LayerChoice, Manifest};
use reference::{OciRef, Source};

/// Istio's default module size limit.
pub const DEFAULT_MAX_MODULE_BYTES: u64 = 256 << 20;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for one HTTP request; several (retries, token, manifest, blob) fit in one fetch.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// First retry delay; each further retry waits twice as long.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_millis(500);
/// Retries after the first attempt for a retryable 5xx (500, 502-504, ...; not 501/505/511).
pub const DEFAULT_MAX_RETRIES: u32 = 5;

#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub cache_dir: PathBuf,
    /// `host:port` entries or `*`: plain HTTP (and unverified TLS) allowed only for these.
    pub insecure_registries: Vec<String>,
    pub max_module_bytes: u64,
    /// Overall limit for one `fetch`, waiting for a concurrent fetch of the same url included.
    pub timeout: Duration,
    /// Limit for each HTTP request inside a fetch.
    pub request_timeout: Duration,
    /// Delay before the first retry of a retryable 5xx answer; doubled for each next one.
    pub retry_base: Duration,
    /// Let an OCI registry send us to a token realm on a private or loopback address. Off by
    /// default: a hostile registry could otherwise use us to reach internal services.
    pub allow_private_realms: bool,
    /// Where registry credentials come from when a request carries no pull secret.
    pub docker_config: DockerConfig,
    /// A PEM file of CA certificates trusted for https, besides the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// The docker config file consulted for credentials when a request names no pull secret.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum DockerConfig {
    /// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`, read at each fetch (as
    /// the docker CLI does), so a later `docker login` takes effect without a restart.
    #[default]
    FromEnv,
    File(PathBuf),
    Disabled,
}

impl FetchConfig {
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            insecure_registries: Vec::new(),
            max_module_bytes: DEFAULT_MAX_MODULE_BYTES,
            timeout: DEFAULT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_base: DEFAULT_RETRY_BASE,
            allow_private_realms: false,
            docker_config: DockerConfig::FromEnv,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the cache when it holds the tag or pinned digest; no network then.
    #[default]
    IfNotPresent,
    /// Always resolve the manifest (unless the request pins a digest already cached); the
    /// module blob is still reused from the cache.
    Always,
}

#[derive(Clone)]
pub struct FetchRequest {
    /// `oci://host:port/repo:tag`, `oci://host/repo@sha256:...`, `file:///abs/path.wasm`,
    /// `https://host/path` (raw, gzip, tar or tar+gzip body); no scheme means `oci://`.
    pub url: String,
    /// Expected digest, lowercase hex (`sha256:` prefix tolerated). OCI: the manifest digest,
    /// as Istio compares it; file and http(s): the module digest (after un-gzip/un-tar).
    pub sha256: Option<String>,
    pub pull_policy: PullPolicy,
    /// Contents of a `.dockerconfigjson`. Never logged or echoed in errors.
    pub pull_secret: Option<Vec<u8>>,
}

impl FetchRequest {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            sha256: None,
            pull_policy: PullPolicy::IfNotPresent,
            pull_secret: None,
        }
    }
}

impl fmt::Debug for FetchRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FetchRequest")
            .field("url", &self.url)
            .field("sha256", &self.sha256)
            .field("pull_policy", &self.pull_policy)
            .field(
                "pull_secret",
                &self.pull_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct FetchedModule {
    pub bytes: Arc<Vec<u8>>,
    /// sha256 of the module bytes, `sha256:<hex>`.
    pub module_digest: String,
    /// OCI: the image manifest digest `sha256:<hex>` (the top-level one when an index was
    /// served); file: None.
    pub manifest_digest: Option<String>,
    /// True when the module bytes came from the on-disk cache instead of a download.
    pub cache_hit: bool,
    /// The requested url.
    pub source: String,
}

/// Lowercase hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Fetches modules; cheap to clone, shareable across tasks.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: FetchConfig,
    cache: Cache,
    transport: Transport,
    /// One async lock per url so concurrent fetches of it download once: later callers find
    /// the cache filled by the first.
    inflight: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

impl Fetcher {
    pub fn new(cfg: FetchConfig) -> Result<Self, FetchError> {
        let cache = Cache::open(&cfg.cache_dir, cfg.max_module_bytes)?;
        let policy = NetPolicy {
            retry_base: cfg.retry_base,
            max_retries: DEFAULT_MAX_RETRIES,
            request_timeout: cfg.request_timeout,
            allow_private_realms: cfg.allow_private_realms,
        };
        let roots = match &cfg.ca_file {
            Some(path) => load_ca_file(path)?,
            None => Vec::new(),
        };
        let transport =
            Transport::new(cfg.insecure_registries.clone(), cfg.timeout, policy, &roots)?;
        Ok(Self {
            inner: Arc::new(Inner {
                cfg,
                cache,
                transport,
                inflight: Mutex::default(),
            }),
        })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.inner.cfg
    }

    /// The modules in the on-disk cache, sorted by digest, with the urls that resolve to them.
    /// Blocking file I/O: call it off the async runtime's worker threads when on one.
    pub fn cache_entries(&self) -> Result<Vec<CacheEntry>, FetchError> {
        self.inner.cache.entries()
    }

    /// Removes the modules neither fetched nor served from the cache for `unused_for`, with the
    /// index entries pointing at them, plus temp files left by writers that died; returns the
    /// removed modules. Blocking file I/O, like `cache_entries`.
    pub fn prune_cache(&self, unused_for: Duration) -> Result<Vec<CacheEntry>, FetchError> {
        self.inner.cache.prune(unused_for)
    }

    pub async fn fetch(&self, req: &FetchRequest) -> Result<FetchedModule, FetchError> {
        let timeout = self.inner.cfg.timeout;
        let result = match tokio::time::timeout(timeout, self.fetch_inner(req)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                op: Op::Fetch,
                url: req.url.clone(),
                after: timeout,
            }),
        };
        count_fetch(req, &result);
        result
    }

    async fn fetch_inner(&self, req: &FetchRequest) -> Result<FetchedModule, FetchError> {
        let invalid = |reason: String| FetchError::InvalidUrl {
            op: Op::Fetch,
            url: req.url.clone(),
            reason,
        };
        let expected =
            match &req.sha256 {
                Some(s) => Some(reference::normalize_hex(s).ok_or_else(|| {
                    invalid(format!("expected sha256 {s:?} is not 64 hex digits"))
                })?),
                None => None,
            };
        match reference::parse(&req.url).map_err(invalid)? {
            Source::File(path) => self.fetch_file(req, path, expected).await,
            Source::Oci(oci) => self.fetch_oci(req, oci, expected).await,
            Source::Http(url) => self.fetch_http(req, url, expected).await,
        }
    }

    async fn fetch_file(
        &self,
        req: &FetchRequest,
        path: PathBuf,
        expected: Option<String>,
    ) -> Result<FetchedModule, FetchError> {
        let max = self.inner.cfg.max_module_bytes;
        let io_err = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                FetchError::FileNotFound {
                    op: Op::Fetch,
                    url: req.url.clone(),
                    path: path.clone(),
                }
            } else {
                FetchError::Io {
                    op: Op::Fetch,
                    url: req.url.clone(),
                    path: path.clone(),
                    source,
                }
            }
        };
        let file = tokio::fs::File::open(&path).await.map_err(io_err)?;
        let mut bytes = Vec::new();
        // One byte past the limit tells "too large" apart from "exactly the limit".
        file.take(max + 1)
            .read_to_end(&mut bytes)
            .await
            .map_err(io_err)?;
        if bytes.len() as u64 > max {
            return Err(FetchError::TooLarge {
                op: Op::Fetch,
                url: req.url.clone(),
                limit: max,
            });
        }
        check_wasm(&req.url, &bytes, max)?;
        let hex = sha256_hex(&bytes);
        if let Some(expected) = expected
            && expected != hex
        {
            return Err(FetchError::DigestMismatch {
                op: Op::Fetch,
                url: req.url.clone(),
                expected,
                actual: hex,
            });
        }
        Ok(FetchedModule {
            bytes: Arc::new(bytes),
            module_digest: format!("sha256:{hex}"),
            manifest_digest: None,
            cache_hit: false,
            source: req.url.clone(),
        })
    }

    /// `http(s)://`: the body is a module, a gzipped module, or a (gzipped) tar holding one.
    /// Cached like OCI modules, keyed by the url; `sha256` is the module digest.
    async fn fetch_http(
        &self,
        req: &FetchRequest,
        target: reqwest::Url,
        expected: Option<String>,
    ) -> Result<FetchedModule, FetchError> {
        let url = req.url.as_str();
        let cache = &self.inner.cache;
        let key = format!("{}{target}", cache::HTTP_KEY_PREFIX);
        let _inflight = self.lock_url(&key).await;

        // With a sha256 the cached module is either the expected content or not used.
        if req.pull_policy == PullPolicy::IfNotPresent || expected.is_some() {
            // The url's last download, unless it is not the module the caller now expects.
            let hit = match cache.lookup(&key).await {
                Some(entry)
                    if expected
                        .as_ref()
                        .is_none_or(|e| entry.module_digest == format!("sha256:{e}")) =>
                {
                    cache.load_module(&entry.module_digest).await
                }
                _ => None,
            };
            if let Some(bytes) = hit {
                tracing::debug!(url, "module cache hit");
                let module_digest = format!("sha256:{}", sha256_hex(&bytes));
                return Ok(FetchedModule {
                    bytes,
                    module_digest,
                    manifest_digest: None,
                    cache_hit: true,
                    source: url.to_string(),
                });
            }
        }

        let body = self.download_http(url, &target).await?;
        let max = self.inner.cfg.max_module_bytes;
        let owned_url = url.to_string();
        let module = tokio::task::spawn_blocking(move || unpack_http_body(&owned_url, body, max))
            .await
            .map_err(|e| FetchError::BadArchive {
                op: Op::Fetch,
                url: url.to_string(),
                reason: format!("unpacking task failed: {e}"),
            })??;
        check_wasm(url, &module, max)?;
        let hex = sha256_hex(&module);
        if let Some(expected) = expected
            && expected != hex
        {
            return Err(FetchError::DigestMismatch {
                op: Op::Fetch,
                url: url.to_string(),
                expected: format!("sha256:{expected}"),
                actual: format!("sha256:{hex}"),
            });
        }
        let module_digest = format!("sha256:{hex}");
        let bytes = Arc::new(module);
        match cache.store_module(&module_digest, bytes.clone()).await {
            Ok(()) => {
                let entry = IndexEntry {
                    key,
                    module_digest: module_digest.clone(),
                    // No manifest behind a plain download: the module digest stands in.
                    manifest_digest: module_digest.clone(),
                };
                if let Err(e) = cache.record(entry).await {
                    tracing::warn!(error = %e, "could not index module in cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not cache module"),
        }
        tracing::info!(url, %module_digest, size = bytes.len(), "fetched module");
        Ok(FetchedModule {
            bytes,
            module_digest,
            manifest_digest: None,
            cache_hit: false,
            source: url.to_string(),
        })
    }

    /// GET with the SSRF guard and 5xx retries; the body is bounded by the module limit plus
    /// room for archive headers.
    async fn download_http(&self, url: &str, target: &reqwest::Url) -> Result<Vec<u8>, FetchError> {
        if let Err(refusal) = guard::check_url(target, true).await {
            return Err(FetchError::Refused {
                op: Op::Fetch,
                url: url.to_string(),
                reason: refusal.reason(),
            });
        }
        let transport = &self.inner.transport;
        let client = transport.verified();
        let connect_err = |reason: String| FetchError::Connect {
            op: Op::Fetch,
            url: url.to_string(),
            endpoint: target.origin().ascii_serialization(),
            reason,
        };
        let (resp, attempts) =
            client::send_with_retry(transport.policy(), url, || client.get(target.clone()))
                .await
                .map_err(|e| {
                    let reason = error::root_cause(&e);
                    connect_err(if e.is_timeout() {
                        format!("timed out ({reason})")
                    } else {
                        client::tls_hint(reason)
                    })
                })?;
        if !resp.status().is_success() {
            return Err(FetchError::HttpStatus {
                op: Op::Fetch,
                url: url.to_string(),
                status: client::status_line(resp.status()),
                attempts,
            });
        }
        let max = self.inner.cfg.max_module_bytes;
        client::read_limited(resp, max.saturating_add(HTTP_ARCHIVE_SLACK))
            .await
            .map_err(|e| match e {
                client::ReadError::TooLarge => FetchError::TooLarge {
                    op: Op::Fetch,
                    url: url.to_string(),
                    limit: max,
                },
                client::ReadError::Http(reason) => connect_err(reason),
            })
    }

    async fn lock_url(&self, key: &str) -> InflightGuard {
        let lock = {
            let mut map = self
                .inner
                .inflight
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = lock.clone().lock_owned().await;
        InflightGuard {
            inner: self.inner.clone(),
            key: key.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    async fn fetch_oci(
        &self,
        req: &FetchRequest,
        oci: OciRef,
        expected: Option<String>,
    ) -> Result<FetchedModule, FetchError> {
        let url = req.url.as_str();
        let expected = expected.map(|h| format!("sha256:{h}"));
        // A url digest and a sha256 field that disagree can never both match.
        if let (Some(pinned), Some(exp)) = (&oci.digest, &expected)
            && pinned != exp
        {
            return Err(FetchError::DigestMismatch {
                op: Op::Fetch,
                url: url.to_string(),
                expected: exp.clone(),
                actual: pinned.clone(),
            });
        }
        let expected = expected.or_else(|| oci.digest.clone());
        let cache = &self.inner.cache;
        let _inflight = self.lock_url(&oci.to_string()).await;

        // A pinned digest names content that cannot change: whatever the policy, a module
        // cached for it is the one a re-pull would get.
        if req.pull_policy == PullPolicy::IfNotPresent || expected.is_some() {
            let key = match &expected {
                Some(d) => Some(oci.digest_key(d)),
                None => oci.tag_key(),
            };
            if let Some(key) = key
                && let Some(hit) = self.cached(url, &key).await
            {
                tracing::debug!(url, "module cache hit");
                return Ok(hit);
            }
        }

        let creds = match &req.pull_secret {
            Some(secret) => auth::credentials_for(secret, &oci.registry).map_err(|reason| {
                FetchError::BadPullSecret {
                    op: Op::Fetch,
                    url: url.to_string(),
                    reason,
                }
            })?,
            None => self.docker_config_credentials(&oci.registry).await,
        };
        let mut session =
            Session::open(Op::Fetch, url, &self.inner.transport, &oci, creds, "pull").await?;
        let (manifest_bytes, content_type) = session.get_manifest(oci.reference()).await?;
        let manifest_digest = client::sha256_digest(&manifest_bytes);
        if let Some(exp) = &expected
            && *exp != manifest_digest
        {
            return Err(FetchError::DigestMismatch {
                op: Op::Fetch,
                url: url.to_string(),
                expected: exp.clone(),
                actual: manifest_digest,
            });
        }

        // A re-resolved manifest we already have the module for: no blob download.
        if let Some(mut hit) = self.cached(url, &oci.digest_key(&manifest_digest)).await {
            self.remember_tag(&oci, &hit.module_digest, &manifest_digest)
                .await;
            hit.manifest_digest = Some(manifest_digest);
            return Ok(hit);
        }

        let bytes = self
            .module_from_manifest(&mut session, &manifest_bytes, &content_type)
            .await?;
        check_wasm(url, &bytes, self.inner.cfg.max_module_bytes)?;
        let module_digest = format!("sha256:{}", sha256_hex(&bytes));
        let bytes = Arc::new(bytes);
        match cache.store_module(&module_digest, bytes.clone()).await {
            Ok(()) => {
                let entry = IndexEntry {
                    key: oci.digest_key(&manifest_digest),
                    module_digest: module_digest.clone(),
                    manifest_digest: manifest_digest.clone(),
                };
                if let Err(e) = cache.record(entry).await {
                    tracing::warn!(error = %e, "could not index module in cache");
                }
                self.remember_tag(&oci, &module_digest, &manifest_digest)
                    .await;
            }
            Err(e) => tracing::warn!(error = %e, "could not cache module"),
        }
        tracing::info!(url, %module_digest, %manifest_digest, size = bytes.len(), "fetched module");
        Ok(FetchedModule {
            bytes,
            module_digest,
            manifest_digest: Some(manifest_digest),
            cache_hit: false,
            source: url.to_string(),
        })
    }

    /// The user's docker config entry for `registry`, if any. An unreadable or malformed file
    /// is logged (by path and reason, never content) and treated as holding no credentials:
    /// the registry may well be public.
    async fn docker_config_credentials(&self, registry: &str) -> Option<auth::Credentials> {
        let path = match &self.inner.cfg.docker_config {
            DockerConfig::Disabled => return None,
            DockerConfig::File(p) => p.clone(),
            DockerConfig::FromEnv => auth::default_docker_config()?,
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read docker config");
                return None;
            }
        };
        match auth::credentials_for(&bytes, registry) {
            Ok(Some(creds)) => {
                tracing::debug!(path = %path.display(), registry, "using credentials from docker config");
                Some(creds)
            }
            Ok(None) => None,
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "ignoring docker config");
                None
            }
        }
    }

    async fn cached(&self, url: &str, key: &str) -> Option<FetchedModule> {
        let entry = self.inner.cache.lookup(key).await?;
        let bytes = self.inner.cache.load_module(&entry.module_digest).await?;
        Some(FetchedModule {
            bytes,
            module_digest: entry.module_digest,
            manifest_digest: Some(entry.manifest_digest),
            cache_hit: true,
            source: url.to_string(),
        })
    }

    async fn remember_tag(&self, oci: &OciRef, module_digest: &str, manifest_digest: &str) {
        let Some(key) = oci.tag_key() else { return };
        let entry = IndexEntry {
            key,
            module_digest: module_digest.to_string(),
            manifest_digest: manifest_digest.to_string(),
        };
        if let Err(e) = self.inner.cache.record(entry).await {
            tracing::warn!(error = %e, "could not index tag in module cache");
        }
    }

    /// Finds the module behind an image manifest, or behind the first entry of an index that
    /// holds one.
    async fn module_from_manifest(
        &self,
        session: &mut Session,
        bytes: &[u8],
        content_type: &str,
    ) -> Result<Vec<u8>, FetchError> {
        let bad = |session: &Session, reason: String| FetchError::BadManifest {
            op: session.op(),
            url: session.url().to_string(),
            reason,
        };
        match manifest::parse(bytes, content_type).map_err(|r| bad(session, r))? {
            Manifest::Image { layers } => self.module_from_layers(session, &layers).await,
            Manifest::Index { manifests } => {
                let mut seen = Vec::new();
                for entry in &manifests {
                    let (child, child_type) = session.get_manifest(&entry.digest).await?;
                    let actual = client::sha256_digest(&child);
                    if actual != entry.digest {
                        return Err(FetchError::DigestMismatch {
                            op: session.op(),
                            url: session.url().to_string(),
                            expected: entry.digest.clone(),
                            actual,
                        });
                    }
                    // Nested indexes are not followed: Wasm images are at most one level deep.
                    let layers = match manifest::parse(&child, &child_type) {
                        Ok(Manifest::Image { layers }) => layers,
                        _ => {
                            seen.push(format!("{}: not an image manifest", entry.digest));
                            continue;
                        }
                    };
                    match self.module_from_layers(session, &layers).await {
                        Ok(module) => return Ok(module),
                        Err(
                            e @ (FetchError::NoWasmLayer { .. }
                            | FetchError::NotWasm { .. }
                            | FetchError::BadArchive { .. }),
                        ) => seen.push(format!("{}: {}", entry.digest, short_reason(&e))),
                        Err(e) => return Err(e),
                    }
                }
                Err(FetchError::NoWasmLayer {
                    op: session.op(),
                    url: session.url().to_string(),
                    media_types: if seen.is_empty() {
                        "index lists no manifests".into()
                    } else {
                        format!("index entries: {}", seen.join("; "))
                    },
                })
            }
        }
    }

    async fn module_from_layers(
        &self,
        session: &mut Session,
        layers: &[manifest::Descriptor],
    ) -> Result<Vec<u8>, FetchError> {
        let max = self.inner.cfg.max_module_bytes;
        let too_large = |session: &Session| FetchError::TooLarge {
            op: session.op(),
            url: session.url().to_string(),
            limit: max,
        };
        let choice = manifest::choose_layer(layers).ok_or_else(|| FetchError::NoWasmLayer {
            op: session.op(),
            url: session.url().to_string(),
            media_types: manifest::media_types(layers),
        })?;
        let desc = match &choice {
            LayerChoice::Raw(d) | LayerChoice::TarGzip(d) => d.clone(),
        };
        reference::parse_digest(&desc.digest).map_err(|reason| FetchError::BadManifest {
            op: session.op(),
            url: session.url().to_string(),
            reason,
        })?;
        if desc.size > max {
            return Err(too_large(session));
        }
        let blob = session.get_blob(&desc.digest, max).await?;
        match choice {
            LayerChoice::Raw(_) => Ok(blob),
            LayerChoice::TarGzip(_) => {
                // Room for the module plus whatever else the layer holds, but bounded.
                let decompressed_limit = max.saturating_mul(2).max(1 << 20);
                let extracted = tokio::task::spawn_blocking(move || {
                    manifest::extract_plugin(&blob, max, decompressed_limit)
                })
                .await
                .map_err(|e| FetchError::BadArchive {
                    op: session.op(),
                    url: session.url().to_string(),
                    reason: format!("extraction task failed: {e}"),
                })?;
                extracted.map_err(|e| match e {
                    ArchiveError::TooLarge => too_large(session),
                    ArchiveError::Bad(reason) => FetchError::BadArchive {
                        op: session.op(),
                        url: session.url().to_string(),
                        reason: format!("layer {}: {reason}", desc.digest),
                    },
                })
            }
        }
    }
}

/// Counts one fetch in Istio's metrics: a cache lookup for every remote module, and a remote
/// fetch (with its result) for every one that was not served from the cache. `file://` is
/// neither, and a request refused before any lookup (a malformed url or sha256) counts nothing.
fn count_fetch(req: &FetchRequest, result: &Result<FetchedModule, FetchError>) {
    let http = match reference::parse(&req.url) {
        Ok(Source::Oci(_)) => false,
        Ok(Source::Http(_)) => true,
        Ok(Source::File(_)) | Err(_) => return,
    };
    match result {
        Ok(m) if m.cache_hit => metrics::record_lookup(true),
        Ok(_) => {
            metrics::record_lookup(false);
            metrics::record_remote_fetch(RemoteFetchResult::Success);
        }
        Err(FetchError::InvalidUrl { .. }) => {}
        Err(e) => {
            metrics::record_lookup(false);
            let r = match RemoteFetchResult::of_error(e) {
                // A plain download has no manifest: Istio counts its failures as downloads.
                RemoteFetchResult::ManifestFailure if http => RemoteFetchResult::DownloadFailure,
                r => r,
            };
            metrics::record_remote_fetch(r);
        }
    }
}

fn load_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, FetchError> {
    let bad = |reason: String| FetchError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("not PEM certificates: {}", error::root_cause(&e))))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The part of an error line after `<op> <url>: `, for composing summaries.
fn short_reason(e: &FetchError) -> String {
    let s = e.to_string();
    match s.split_once(": ") {
        Some((_, rest)) => rest.to_string(),
        None => s,
    }
}

struct InflightGuard {
    inner: Arc<Inner>,
    key: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.guard = None;
        let mut map = self
            .inner
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Only the map and this guard hold the lock: nobody waits, so the entry can go.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.key);
        }
    }
}

/// Room for tar headers and padding around a module of the maximum size.
const HTTP_ARCHIVE_SLACK: u64 = 1 << 20;

/// Turns a downloaded body into the module: raw, gzip, tar or tar+gzip, told apart by their
/// magic bytes rather than by the url or Content-Type, which servers get wrong.
fn unpack_http_body(url: &str, body: Vec<u8>, max: u64) -> Result<Vec<u8>, FetchError> {
    let archive_err = |e: ArchiveError| match e {
        ArchiveError::TooLarge => FetchError::TooLarge {
            op: Op::Fetch,
            url: url.to_string(),
            limit: max,
        },
        ArchiveError::Bad(reason) => FetchError::BadArchive {
            op: Op::Fetch,
            url: url.to_string(),
            reason,
        },
    };
    let plain = if body.starts_with(&[0x1f, 0x8b]) {
        // Bounded so a gzip bomb stops early: a module plus tar overhead at most.
        manifest::gunzip_capped(&body, max.saturating_add(HTTP_ARCHIVE_SLACK))
            .map_err(archive_err)?
    } else {
        body
    };
    if manifest::is_tar(&plain) {
        return manifest::extract_single_wasm(&plain, max).map_err(archive_err);
    }
    Ok(plain)
}

pub(crate) fn check_wasm(url: &str, bytes: &[u8], max: u64) -> Result<(), FetchError> {
    if bytes.len() as u64 > max {
        return Err(FetchError::TooLarge {
            op: Op::Fetch,
            url: url.to_string(),
            limit: max,
        });
    }
    if bytes.len() < 8 {
        return Err(FetchError::NotWasm {
            op: Op::Fetch,
            url: url.to_string(),
            reason: format!("only {} bytes, a module has at least 8", bytes.len()),
        });
    }
    if &bytes[..4] != b"\0asm" {
        return Err(FetchError::NotWasm {
            op: Op::Fetch,
            url: url.to_string(),
            reason: "bad magic".into(),
        });
    }
    Ok(())
}
