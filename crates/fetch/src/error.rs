use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What the failing operation was doing; the first word of every error line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Fetch,
    Push,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Fetch => "fetching",
            Op::Push => "pushing",
        })
    }
}

/// Every variant renders as one line: `<op> <url>: <reason>`.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{op} {url}: invalid module url: {reason}")]
    InvalidUrl { op: Op, url: String, reason: String },

    #[error("{op} {url}: sha256 mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        op: Op,
        url: String,
        expected: String,
        actual: String,
    },

    #[error("{op} {url}: registry {registry} is not listed as insecure; plain HTTP refused")]
    InsecureRefused {
        op: Op,
        url: String,
        registry: String,
    },

    /// `detail` says whether credentials were missing or rejected, never what they were.
    #[error("{op} {url}: {status} ({detail})")]
    Unauthorized {
        op: Op,
        url: String,
        status: String,
        detail: String,
    },

    #[error("{op} {url}: manifest has no Wasm layer (media types: {media_types})")]
    NoWasmLayer {
        op: Op,
        url: String,
        media_types: String,
    },

    #[error("{op} {url}: not a Wasm module ({reason})")]
    NotWasm { op: Op, url: String, reason: String },

    #[error("{op} {url}: module is larger than {limit} bytes")]
    TooLarge { op: Op, url: String, limit: u64 },

    #[error("{op} {url}: timed out after {after:?}")]
    Timeout {
        op: Op,
        url: String,
        after: Duration,
    },

    #[error("{op} {url}: cannot reach {endpoint}: {reason}")]
    Connect {
        op: Op,
        url: String,
        endpoint: String,
        reason: String,
    },

    #[error("{op} {url}: registry answered {status} to {what}{}", detail_suffix(.detail))]
    Registry {
        op: Op,
        url: String,
        what: String,
        status: String,
        detail: String,
    },

    /// An SSRF-guard refusal; nothing was sent to the refused address.
    #[error("{op} {url}: {reason}")]
    Refused { op: Op, url: String, reason: String },

    /// A plain `http(s)://` module server answered with a failure status (after retries).
    #[error("{op} {url}: server answered {status}{}", attempts_suffix(*.attempts))]
    HttpStatus {
        op: Op,
        url: String,
        status: String,
        attempts: u32,
    },

    #[error("{op} {url}: bad manifest: {reason}")]
    BadManifest { op: Op, url: String, reason: String },

    #[error("{op} {url}: bad layer archive: {reason}")]
    BadArchive { op: Op, url: String, reason: String },

    #[error("{op} {url}: bad pull secret: {reason}")]
    BadPullSecret { op: Op, url: String, reason: String },

    #[error("{op} {url}: file not found: {}", .path.display())]
    FileNotFound { op: Op, url: String, path: PathBuf },

    #[error("{op} {url}: reading {}: {source}", .path.display())]
    Io {
        op: Op,
        url: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("module cache {}: {source}", .path.display())]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("registry CA file {}: {reason}", .path.display())]
    CaFile { path: PathBuf, reason: String },

    #[error("building the HTTP client: {reason}")]
    Client { reason: String },
}

fn attempts_suffix(attempts: u32) -> String {
    if attempts > 1 {
        format!(" after {attempts} attempts")
    } else {
        String::new()
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

/// The innermost cause of a transport error: reqwest's own Display only says "error sending
/// request", the useful part ("Connection refused", a TLS alert) is at the bottom of the chain.
pub(crate) fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
