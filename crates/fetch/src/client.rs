//! The distribution API client: transport choice (HTTPS, or plain HTTP for insecure registries),
//! authentication (anonymous, Basic, Bearer token flow) and bounded, digest-checked reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use sha2::{Digest, Sha256};

use crate::auth::{Challenge, Credentials, TokenResponse, parse_challenge};
use crate::error::{FetchError, Op, root_cause};
use crate::guard::{self, GuardedResolver};
use crate::reference::OciRef;

pub(crate) const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests are small; a larger one is either hostile or not a manifest.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Scheme {
    Https,
    Http,
}

/// Retry, timeout and destination rules shared by every request of a transport.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NetPolicy {
    pub retry_base: Duration,
    pub max_retries: u32,
    pub request_timeout: Duration,
    pub allow_private_realms: bool,
}

/// 5xx answers worth another try: 501, 505 and 511 describe the request or the network
/// setup, which the same request again cannot change.
pub(crate) fn is_retryable(status: StatusCode) -> bool {
    status.is_server_error() && !matches!(status.as_u16(), 501 | 505 | 511)
}

/// Sends `build()` and retries retryable 5xx answers with doubling backoff; the last answer
/// is returned whatever its status, with the number of attempts made. Each attempt gets `request_timeout`; the caller's overall
/// timeout bounds the whole loop.
pub(crate) async fn send_with_retry<F>(
    policy: &NetPolicy,
    what: &str,
    build: F,
) -> Result<(Response, u32), reqwest::Error>
where
    F: Fn() -> RequestBuilder,
{
    let mut attempt = 0;
    loop {
        let resp = build().timeout(policy.request_timeout).send().await?;
        if attempt >= policy.max_retries || !is_retryable(resp.status()) {
            return Ok((resp, attempt + 1));
        }
        let delay = policy.retry_base.saturating_mul(1 << attempt.min(16));
        tracing::warn!(what, status = %resp.status(), attempt = attempt + 1, ?delay, "retrying");
        drop(resp);
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// Shared HTTP clients plus the insecure-registry policy; cloned cheaply into sessions.
#[derive(Clone)]
pub(crate) struct Transport {
    verified: reqwest::Client,
    /// Accepts any certificate; used only for registries listed as insecure.
    unverified: reqwest::Client,
    insecure: Arc<Vec<String>>,
    /// Scheme found to work for each insecure registry, so the HTTPS probe runs once.
    schemes: Arc<Mutex<HashMap<String, Scheme>>>,
    policy: NetPolicy,
}

impl Transport {
    /// `extra_roots` are trusted besides the system's (and the bundled Mozilla) roots.
    pub fn new(
        insecure: Vec<String>,
        connect_timeout: Duration,
        policy: NetPolicy,
        extra_roots: &[reqwest::Certificate],
    ) -> Result<Self, FetchError> {
        let build = |accept_invalid: bool| {
            let mut builder = reqwest::Client::builder();
            for root in extra_roots {
                builder = builder.add_root_certificate(root.clone());
            }
            builder
                .user_agent(concat!("waystone-fetch/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(connect_timeout)
                .redirect(reqwest::redirect::Policy::custom(|attempt| {
                    if attempt.previous().len() >= 5 {
                        return attempt.error("too many redirects");
                    }
                    match guard::check_literal(attempt.url()) {
                        Ok(()) => attempt.follow(),
                        Err(refusal) => attempt.error(refusal.reason()),
                    }
                }))
                .dns_resolver(Arc::new(GuardedResolver))
                .danger_accept_invalid_certs(accept_invalid)
                .build()
                .map_err(|e| FetchError::Client {
                    reason: root_cause(&e),
                })
        };
        Ok(Self {
            verified: build(false)?,
            unverified: build(true)?,
            insecure: Arc::new(insecure),
            schemes: Arc::default(),
            policy,
        })
    }

    pub fn policy(&self) -> &NetPolicy {
        &self.policy
    }

    /// The certificate-checking client, for plain `https://` module downloads.
    pub fn verified(&self) -> &reqwest::Client {
        &self.verified
    }

    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure.iter().any(|r| r == "*" || r == registry)
    }
}

/// One authenticated conversation with one repository of one registry.
pub(crate) struct Session {
    op: Op,
    url: String,
    registry: String,
    repository: String,
    base: String,
    scheme: Scheme,
    insecure: bool,
    http: reqwest::Client,
    /// Certificate-checking client: token realms and plain-HTTP probes.
    verified: reqwest::Client,
    creds: Option<Credentials>,
    scope: String,
    authorization: Option<String>,
    policy: NetPolicy,
}

impl Session {
    pub async fn open(
        op: Op,
        url: &str,
        transport: &Transport,
        oci: &OciRef,
        creds: Option<Credentials>,
        actions: &str,
    ) -> Result<Self, FetchError> {
        let host = oci.api_host().to_string();
        // The registry itself may be private (an in-cluster registry is normal); only
        // link-local and metadata destinations are refused.
        let probe_url = reqwest::Url::parse(&format!("https://{host}/")).ok();
        if let Some(probe_url) = probe_url
            && let Err(refusal) = guard::check_url(&probe_url, true).await
        {
            return Err(FetchError::Refused {
                op,
                url: url.to_string(),
                reason: refusal.reason(),
            });
        }
        let insecure = transport.is_insecure(&oci.registry);
        let scheme = if insecure {
            let known = transport
                .schemes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&host)
                .copied();
            let scheme = match known {
                Some(s) => s,
                None => probe_scheme(&transport.unverified, &host).await,
            };
            transport
                .schemes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(host.clone(), scheme);
            scheme
        } else {
            Scheme::Https
        };
        let base = match scheme {
            Scheme::Https => format!("https://{host}"),
            Scheme::Http => format!("http://{host}"),
        };
        Ok(Self {
            op,
            url: url.to_string(),
            registry: oci.registry.clone(),
            repository: oci.repository.clone(),
            base,
            scheme,
            insecure,
            http: if insecure {
                transport.unverified.clone()
            } else {
                transport.verified.clone()
            },
            verified: transport.verified.clone(),
            creds,
            scope: format!("repository:{}:{actions}", oci.repository),
            authorization: None,
            policy: transport.policy,
        })
    }

    pub fn op(&self) -> Op {
        self.op
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn repo_url(&self, rest: &str) -> String {
        format!("{}/v2/{}/{rest}", self.base, self.repository)
    }

    /// Sends a request built by `build`, answering one 401 challenge by authenticating.
    async fn send<F>(&mut self, what: &str, build: F) -> Result<Response, FetchError>
    where
        F: Fn(&reqwest::Client) -> RequestBuilder,
    {
        let resp = self.send_once(&build).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(parse_challenge);
        let had_auth = self.authorization.is_some();
        match challenge {
            Some(challenge) => self.authenticate(challenge).await?,
            None => return Err(self.unauthorized(what, had_auth)),
        }
        let resp = self.send_once(&build).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(self.unauthorized(what, true));
        }
        Ok(resp)
    }

    async fn send_once<F>(&self, build: &F) -> Result<Response, FetchError>
    where
        F: Fn(&reqwest::Client) -> RequestBuilder,
    {
        let sent = send_with_retry(&self.policy, &self.url, || {
            let req = build(&self.http);
            match &self.authorization {
                Some(auth) => req.header(AUTHORIZATION, auth),
                None => req,
            }
        })
        .await
        .map(|(resp, _)| resp);
        match sent {
            Ok(resp) => Ok(resp),
            Err(e) => Err(self.transport_error(&e).await),
        }
    }

    fn unauthorized(&self, what: &str, had_credentials: bool) -> FetchError {
        let detail = if had_credentials && self.creds.is_some() {
            format!("credentials for {} rejected", self.registry)
        } else if had_credentials {
            format!("token for {} rejected for {what}", self.registry)
        } else {
            format!("no credentials for {}", self.registry)
        };
        FetchError::Unauthorized {
            op: self.op,
            url: self.url.clone(),
            status: "401 Unauthorized".into(),
            detail,
        }
    }

    async fn authenticate(&mut self, challenge: Challenge) -> Result<(), FetchError> {
        match challenge {
            Challenge::Basic => match &self.creds {
                Some(c) => {
                    self.authorization = Some(c.basic_header());
                    Ok(())
                }
                None => Err(self.unauthorized("", false)),
            },
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let token = self.fetch_token(&realm, service, scope).await?;
                self.authorization = Some(format!("Bearer {token}"));
                Ok(())
            }
            Challenge::Other(scheme) => Err(FetchError::Unauthorized {
                op: self.op,
                url: self.url.clone(),
                status: "401 Unauthorized".into(),
                detail: format!(
                    "unsupported authentication scheme {scheme} from {}",
                    self.registry
                ),
            }),
        }
    }

    /// The distribution token flow: GET realm?service=..&scope=.. (with Basic credentials when
    /// we have them), answer `{"token"|"access_token": ...}`.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<String>,
        challenge_scope: Option<String>,
    ) -> Result<String, FetchError> {
        let fail = |detail: String| FetchError::Unauthorized {
            op: self.op,
            url: self.url.clone(),
            status: "401 Unauthorized".into(),
            detail,
        };
        let realm_url = reqwest::Url::parse(realm)
            .map_err(|_| fail(format!("token realm {realm:?} is not a url")))?;
        match realm_url.scheme() {
            "https" => {}
            // Credentials would travel in clear text: only where the registry itself is insecure.
            "http" if self.insecure => {}
            other => {
                return Err(fail(format!(
                    "token realm {realm} uses {other}; only https is allowed for registry {}",
                    self.registry
                )));
            }
        }
        // The realm comes from whoever answers as the registry: without this check a hostile
        // registry could make us send credentials to, or probe, internal services.
        if let Err(refusal) = guard::check_url(&realm_url, self.policy.allow_private_realms).await {
            return Err(FetchError::Refused {
                op: self.op,
                url: self.url.clone(),
                reason: format!("token realm {realm}: {}", refusal.reason()),
            });
        }
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(service) = service {
            query.push(("service", service));
        }
        query.push(("scope", self.scope.clone()));
        if let Some(s) = challenge_scope.filter(|s| *s != self.scope) {
            query.push(("scope", s));
        }
        // The insecure allowance covers the registry itself, not a token service elsewhere.
        let realm_is_registry = realm_url
            .host_str()
            .zip(realm_url.port_or_known_default())
            .is_some_and(|(host, port)| {
                self.base.ends_with(&format!("//{host}:{port}"))
                    || self.base.ends_with(&format!("//{host}"))
            });
        let client = if self.insecure && realm_is_registry {
            &self.http
        } else {
            &self.verified
        };
        let sent = send_with_retry(&self.policy, realm, || {
            let req = client.get(realm_url.clone()).query(&query);
            match &self.creds {
                Some(c) => req.header(AUTHORIZATION, c.basic_header()),
                None => req,
            }
        })
        .await
        .map(|(resp, _)| resp);
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                return Err(FetchError::Connect {
                    op: self.op,
                    url: self.url.clone(),
                    endpoint: format!("token service {realm}"),
                    reason: root_cause(&e),
                });
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let who = if self.creds.is_some() {
                "credentials rejected"
            } else {
                "no credentials"
            };
            return Err(fail(format!(
                "token service {realm} answered {} for {} ({who})",
                status_line(status),
                self.registry
            )));
        }
        let body = read_limited(resp, 1 << 20)
            .await
            .map_err(|e| fail(format!("reading token from {realm}: {e}")))?;
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|_| {
            fail(format!(
                "token service {realm} answered something that is not a token"
            ))
        })?;
        parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| fail(format!("token service {realm} returned no token")))
    }

    async fn transport_error(&self, e: &reqwest::Error) -> FetchError {
        let reason = root_cause(e);
        if e.is_timeout() {
            return FetchError::Connect {
                op: self.op,
                url: self.url.clone(),
                endpoint: self.base.clone(),
                reason: format!("timed out ({reason})"),
            };
        }
        // An HTTPS attempt that fails while a registry answers plain HTTP means one that should
        // have been listed as insecure: say so instead of reporting a TLS error. A TLS server
        // answers a plain request too (Go's says 400 "HTTP request to an HTTPS server"); that
        // is a certificate problem, reported as such below.
        if self.scheme == Scheme::Https && !self.insecure && e.is_connect() {
            let host = self.base.trim_start_matches("https://");
            let probe = self
                .verified
                .get(format!("http://{host}/v2/"))
                .timeout(PROBE_TIMEOUT)
                .send()
                .await;
            let registry_answered = probe
                .is_ok_and(|r| r.status().is_success() || r.status() == StatusCode::UNAUTHORIZED);
            if registry_answered {
                return FetchError::InsecureRefused {
                    op: self.op,
                    url: self.url.clone(),
                    registry: self.registry.clone(),
                };
            }
        }
        FetchError::Connect {
            op: self.op,
            url: self.url.clone(),
            endpoint: self.base.clone(),
            reason: tls_hint(reason),
        }
    }

    async fn registry_error(&self, what: &str, resp: Response) -> FetchError {
        let status = status_line(resp.status());
        let detail = match read_limited(resp, 64 << 10).await {
            Ok(body) => error_detail(&body),
            Err(_) => String::new(),
        };
        FetchError::Registry {
            op: self.op,
            url: self.url.clone(),
            what: what.to_string(),
            status,
            detail,
        }
    }

    /// GET a manifest; returns its bytes exactly as served and the Content-Type.
    pub async fn get_manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), FetchError> {
        let what = format!("GET manifest {reference}");
        let url = self.repo_url(&format!("manifests/{reference}"));
        let resp = self
            .send(&what, |c| c.get(&url).header("Accept", MANIFEST_ACCEPT))
            .await?;
        if !resp.status().is_success() {
            return Err(self.registry_error(&what, resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = read_limited(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => FetchError::BadManifest {
                    op: self.op,
                    url: self.url.clone(),
                    reason: format!(
                        "manifest {reference} is larger than {MAX_MANIFEST_BYTES} bytes"
                    ),
                },
                ReadError::Http(reason) => self.read_failed(&what, reason),
            })?;
        Ok((body, content_type))
    }

    fn read_failed(&self, what: &str, reason: String) -> FetchError {
        FetchError::Connect {
            op: self.op,
            url: self.url.clone(),
            endpoint: self.base.clone(),
            reason: format!("{what}: {reason}"),
        }
    }

    /// GET a blob, refusing more than `limit` bytes and checking it hashes to `digest`.
    pub async fn get_blob(&mut self, digest: &str, limit: u64) -> Result<Vec<u8>, FetchError> {
        let what = format!("GET blob {digest}");
        let url = self.repo_url(&format!("blobs/{digest}"));
        let resp = self.send(&what, |c| c.get(&url)).await?;
        if !resp.status().is_success() {
            return Err(self.registry_error(&what, resp).await);
        }
        let body = read_limited(resp, limit).await.map_err(|e| match e {
            ReadError::TooLarge => FetchError::TooLarge {
                op: self.op,
                url: self.url.clone(),
                limit,
            },
            ReadError::Http(reason) => self.read_failed(&what, reason),
        })?;
        let actual = format!("sha256:{}", crate::sha256_hex(&body));
        if actual != digest {
            return Err(FetchError::DigestMismatch {
                op: self.op,
                url: self.url.clone(),
                expected: digest.to_string(),
                actual,
            });
        }
        Ok(body)
    }

    pub async fn blob_exists(&mut self, digest: &str) -> Result<bool, FetchError> {
        let what = format!("HEAD blob {digest}");
        let url = self.repo_url(&format!("blobs/{digest}"));
        let resp = self.send(&what, |c| c.head(&url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.registry_error(&what, resp).await),
        }
    }

    /// Monolithic upload: POST an upload session, PUT the whole blob to its location.
    pub async fn upload_blob(&mut self, digest: &str, bytes: &[u8]) -> Result<(), FetchError> {
        let what = format!("POST blob upload for {digest}");
        let url = self.repo_url("blobs/uploads/");
        let resp = self
            .send(&what, |c| c.post(&url).header(CONTENT_LENGTH, 0))
            .await?;
        if resp.status() != StatusCode::ACCEPTED {
            return Err(self.registry_error(&what, resp).await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| FetchError::Registry {
                op: self.op,
                url: self.url.clone(),
                what: what.clone(),
                status: status_line(resp.status()),
                detail: "no Location header".into(),
            })?;
        let base = reqwest::Url::parse(&format!("{}/", self.base))
            .map_err(|e| self.read_failed(&what, e.to_string()))?;
        let mut put_url = base
            .join(location)
            .map_err(|_| self.read_failed(&what, format!("bad upload location {location:?}")))?;
        put_url.query_pairs_mut().append_pair("digest", digest);
        let what = format!("PUT blob {digest}");
        let body = bytes.to_vec();
        let resp = self
            .send(&what, |c| {
                c.request(Method::PUT, put_url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.registry_error(&what, resp).await);
        }
        Ok(())
    }

    pub async fn put_manifest(
        &mut self,
        reference: &str,
        media_type: &str,
        manifest: &[u8],
    ) -> Result<Option<String>, FetchError> {
        let what = format!("PUT manifest {reference}");
        let url = self.repo_url(&format!("manifests/{reference}"));
        let body = manifest.to_vec();
        let resp = self
            .send(&what, |c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(self.registry_error(&what, resp).await);
        }
        Ok(resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string))
    }
}

/// Plain HTTP is used for an insecure registry only when HTTPS (even unverified) does not work.
async fn probe_scheme(unverified: &reqwest::Client, host: &str) -> Scheme {
    let https = unverified
        .get(format!("https://{host}/v2/"))
        .timeout(PROBE_TIMEOUT)
        .send()
        .await;
    match https {
        Ok(_) => Scheme::Https,
        Err(_) => Scheme::Http,
    }
}

#[derive(Debug)]
pub(crate) enum ReadError {
    TooLarge,
    Http(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::TooLarge => f.write_str("body too large"),
            ReadError::Http(reason) => f.write_str(reason),
        }
    }
}

/// Reads a body chunk by chunk so a lying or missing Content-Length cannot make us buffer more
/// than `limit` bytes.
pub(crate) async fn read_limited(mut resp: Response, limit: u64) -> Result<Vec<u8>, ReadError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(ReadError::TooLarge);
    }
    let mut out = Vec::with_capacity(resp.content_length().unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ReadError::Http(root_cause(&e)))?
    {
        if out.len() as u64 + chunk.len() as u64 > limit {
            return Err(ReadError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Names a certificate failure as a TLS problem and says what fixes it.
pub(crate) fn tls_hint(reason: String) -> String {
    if reason.contains("certificate") {
        format!(
            "TLS handshake failed: {reason} (trust the server's CA with --registry-ca, or list \
             the registry as insecure)"
        )
    } else {
        reason
    }
}

pub(crate) fn status_line(s: StatusCode) -> String {
    match s.canonical_reason() {
        Some(r) => format!("{} {r}", s.as_u16()),
        None => s.as_u16().to_string(),
    }
}

/// The first `errors[].message` of a distribution error body, else nothing.
fn error_detail(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let Some(first) = v.get("errors").and_then(|e| e.get(0)) else {
        return String::new();
    };
    let code = first.get("code").and_then(|c| c.as_str()).unwrap_or("");
    let msg = first.get("message").and_then(|c| c.as_str()).unwrap_or("");
    let s = match (code, msg) {
        ("", m) => m.to_string(),
        (c, "") => c.to_string(),
        (c, m) => format!("{c}: {m}"),
    };
    s.chars().take(200).collect()
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_statuses() {
        for code in [500, 502, 503, 504, 507, 599] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [200, 301, 404, 429, 501, 505, 511] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
