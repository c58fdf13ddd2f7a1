//! The local API's wire types, shared by the server (this crate) and the CLI.
//!
//! HTTP/1.1 + JSON on a loopback address. Every request carries
//! `Authorization: Bearer <token>`; the address and token are written to
//! `<data-dir>/api.addr` and `<data-dir>/api.token` when `waystone up` starts.
//!
//! | method & path | body | answer |
//! |---|---|---|
//! | `GET /v1/health` | | `{"ok":true}` |
//! | `POST /v1/apply` | [`ApplyRequest`] | [`ApplyResponse`] |
//! | `GET /v1/objects/{Kind}?namespace=NS&name=N` | | [`ListResponse`] (404 when `name` is given and missing) |
//! | `DELETE /v1/objects/{Kind}?namespace=NS&name=N` | | [`DeleteResponse`] (404 when missing) |
//! | `POST /v1/label` | [`LabelRequest`] | [`LabelResponse`] |
//! | `GET /v1/config_dump` | | the running configuration (`crate::dump`), as the admin endpoint's `/config_dump` |
//!
//! `{Kind}` is the canonical kind (`WasmPlugin`, `Gateway`, `Service`, ...).
//! Errors are any non-2xx status with an [`ErrorResponse`] body whose message
//! is one line, ready to print after `error: `.

use serde::{Deserialize, Serialize};

pub const ADDR_FILE: &str = "api.addr";
pub const TOKEN_FILE: &str = "api.token";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyRequest {
    /// One or more YAML/JSON documents.
    pub manifests: String,
    /// Where they came from (a file name, or `-`), used in error messages.
    pub source: String,
    /// Namespace for namespaced objects that name none (`-n`, default `default`).
    pub default_namespace: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResponse {
    pub results: Vec<ApplyResult>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyResult {
    /// Canonical kind, e.g. `WasmPlugin`.
    pub kind: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    /// `created`, `configured` or `unchanged` (kubectl's words).
    pub action: String,
    /// Things the user should know (e.g. the module could not be fetched).
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListResponse {
    /// Full objects (`apiVersion`, `kind`, `metadata`, `spec`, `status`), sorted by namespace then name.
    pub items: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub deleted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelRequest {
    pub kind: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    /// Labels to set.
    #[serde(default)]
    pub set: std::collections::BTreeMap<String, String>,
    /// Labels to remove (`key-` on the command line).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Without it, changing an existing label's value is a 409 like kubectl's
    /// "'k' already has a value (v), and --overwrite is false".
    #[serde(default)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelResponse {
    /// `labeled`, or `not labeled` when nothing changed.
    pub action: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: String,
}
