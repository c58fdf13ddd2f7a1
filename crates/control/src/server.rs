//! The local API (see [`crate::api`]): loopback only, bearer token required.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::{Mutex, Notify, watch};
use waystone_model::TranslateOptions;

use crate::api::*;
use crate::objects::{self, ObjectError};
use crate::store::Store;

pub struct ApiState {
    pub store: Arc<Mutex<Store>>,
    pub changed: Arc<Notify>,
    pub applied: watch::Receiver<u64>,
    pub token: String,
    pub opts: TranslateOptions,
    /// How long a write waits for the data plane to take it before answering anyway.
    pub settle_timeout: Duration,
    /// The running configuration, as the admin endpoint's `/config_dump` shows it.
    pub config_dump: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route(
            "/v1/health",
            get(|| async { Json(serde_json::json!({"ok": true})) }),
        )
        .route("/v1/apply", post(apply))
        .route("/v1/objects/{kind}", get(list).delete(delete))
        .route("/v1/label", post(label))
        .route(
            "/v1/config_dump",
            get(|State(s): State<Arc<ApiState>>| async move { Json((s.config_dump)()) }),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), state.token.as_bytes()) {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong API token".into(),
        );
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorResponse { error: message })).into_response()
}

impl IntoResponse for ObjectError {
    fn into_response(self) -> Response {
        let status = match &self {
            ObjectError::Invalid(_) => StatusCode::BAD_REQUEST,
            ObjectError::NotFound(_) => StatusCode::NOT_FOUND,
            ObjectError::Conflict(_) => StatusCode::CONFLICT,
            ObjectError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

impl ApiState {
    /// Wakes the reconciler and waits (bounded) until the data plane runs `version`.
    async fn settle(&self, version: u64) -> bool {
        self.changed.notify_one();
        let mut applied = self.applied.clone();
        tokio::time::timeout(self.settle_timeout, applied.wait_for(|v| *v >= version))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn apply(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<ApplyResponse>, ObjectError> {
    let (mut results, version) = {
        let mut store = state.store.lock().await;
        objects::apply(
            &mut store,
            &req.manifests,
            &req.source,
            &req.default_namespace,
            &state.opts,
        )?
    };
    let settled = state.settle(version).await;
    // Tell the user at once when a plugin they applied is not running.
    let store = state.store.lock().await;
    for r in &mut results {
        if !settled {
            r.warnings
                .push("the change is stored but the data plane has not taken it yet".into());
            continue;
        }
        if r.kind != "WasmPlugin" && r.kind != "TrafficExtension" {
            continue;
        }
        if let Ok(Some(obj)) = store.get(&r.kind, &r.namespace, &r.name) {
            for c in obj
                .status()
                .and_then(|s| s.get("conditions"))
                .and_then(|c| c.as_array())
                .into_iter()
                .flatten()
            {
                if c.get("status").and_then(|s| s.as_str()) == Some("False") {
                    let msg = c.get("message").and_then(|m| m.as_str()).unwrap_or("");
                    let t = c.get("type").and_then(|m| m.as_str()).unwrap_or("");
                    r.warnings
                        .push(format!("{} {}/{}: {t}: {msg}", r.kind, r.namespace, r.name));
                }
            }
        }
    }
    Ok(Json(ApplyResponse { results }))
}

#[derive(Deserialize)]
struct ObjectQuery {
    namespace: Option<String>,
    name: Option<String>,
}

async fn list(
    State(state): State<Arc<ApiState>>,
    Path(kind): Path<String>,
    Query(q): Query<ObjectQuery>,
) -> Result<Json<ListResponse>, ObjectError> {
    let info = objects::canonical_kind(&kind)?;
    let namespace = if info.namespaced {
        q.namespace.filter(|n| !n.is_empty())
    } else {
        None
    };
    let store = state.store.lock().await;
    let items = match &q.name {
        Some(name) => {
            let obj = store.get(
                info.kind,
                namespace
                    .as_deref()
                    .unwrap_or(if info.namespaced { "default" } else { "" }),
                name,
            )?;
            vec![obj.ok_or_else(|| objects::not_found(info, name))?.to_json()]
        }
        None => store
            .list(Some(info.kind), namespace.as_deref())?
            .iter()
            .map(|o| o.to_json())
            .collect(),
    };
    Ok(Json(ListResponse { items }))
}

async fn delete(
    State(state): State<Arc<ApiState>>,
    Path(kind): Path<String>,
    Query(q): Query<ObjectQuery>,
) -> Result<Json<DeleteResponse>, ObjectError> {
    let name = q
        .name
        .ok_or_else(|| ObjectError::Invalid("delete needs a name".into()))?;
    let version = {
        let mut store = state.store.lock().await;
        objects::delete(
            &mut store,
            &kind,
            q.namespace.as_deref().unwrap_or("default"),
            &name,
        )?
    };
    state.settle(version).await;
    Ok(Json(DeleteResponse { deleted: true }))
}

async fn label(
    State(state): State<Arc<ApiState>>,
    Json(req): Json<LabelRequest>,
) -> Result<Json<LabelResponse>, ObjectError> {
    let (action, version) = {
        let mut store = state.store.lock().await;
        objects::label(&mut store, &req, &state.opts)?
    };
    state.settle(version).await;
    Ok(Json(LabelResponse { action }))
}
