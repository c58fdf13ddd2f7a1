//! The local API's client: finds `waystone up` through `<data-dir>/api.addr` and
//! `<data-dir>/api.token`, and speaks the JSON of `waystone_control::api`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;
use waystone_control::api::{
    ADDR_FILE, ApplyRequest, ApplyResponse, DeleteResponse, ErrorResponse, LabelRequest,
    LabelResponse, ListResponse, TOKEN_FILE,
};

/// Applies wait (bounded, server side) for the data plane; allow for that and a little more.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No address or token file, or nothing listening there.
    #[error("cannot reach the Waystone API (is 'waystone up' running with --data-dir {}?)", data_dir.display())]
    Unreachable { data_dir: PathBuf },
    /// The server refused the request; its message is one line.
    #[error("{message}")]
    Api { status: StatusCode, message: String },
    /// Anything else on the way: a timeout, a broken connection, an answer that is not ours.
    #[error("talking to the Waystone API at {addr}: {reason}")]
    Transport { addr: String, reason: String },
}

impl ClientError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::Api { status, .. } if *status == StatusCode::NOT_FOUND)
    }
}

#[derive(Debug, Clone)]
pub struct ApiClient {
    addr: String,
    token: String,
    data_dir: PathBuf,
    http: reqwest::Client,
    /// Set with `--kubeconfig`/`KUBECONFIG`: every call goes to that API server instead.
    kube: Option<KubeBackend>,
}

#[derive(Clone)]
struct KubeBackend(waystone_kube::client::KubeClient);

impl std::fmt::Debug for KubeBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeBackend")
    }
}

impl From<waystone_kube::client::CallError> for ClientError {
    fn from(e: waystone_kube::client::CallError) -> Self {
        match e.code.and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(status) => ClientError::Api {
                status,
                message: one_line(&e.message),
            },
            None => ClientError::Transport {
                addr: "the Kubernetes API server".into(),
                reason: one_line(&e.message),
            },
        }
    }
}

impl ApiClient {
    /// Reads the address and token `waystone up` wrote; does not connect yet.
    pub fn from_data_dir(data_dir: &Path) -> Result<Self, ClientError> {
        let unreachable = || ClientError::Unreachable {
            data_dir: data_dir.to_path_buf(),
        };
        let read = |file: &str| {
            std::fs::read_to_string(data_dir.join(file))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .ok_or_else(unreachable)
        };
        let addr = read(ADDR_FILE)?;
        let token = read(TOKEN_FILE)?;
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            // The API is on loopback: a proxy from the environment must not intercept it.
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Transport {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            addr,
            token,
            data_dir: data_dir.to_path_buf(),
            http,
            kube: None,
        })
    }

    /// A client of a Kubernetes API server: `kubeconfig`, else `KUBECONFIG` and the usual
    /// inference (in-cluster, `~/.kube/config`).
    pub async fn from_kubeconfig(kubeconfig: Option<&PathBuf>) -> Result<Self, ClientError> {
        let client =
            waystone_kube::connect(kubeconfig)
                .await
                .map_err(|e| ClientError::Transport {
                    addr: "the Kubernetes API server".into(),
                    reason: e.to_string(),
                })?;
        Ok(Self {
            addr: "the Kubernetes API server".into(),
            token: String::new(),
            data_dir: PathBuf::new(),
            http: reqwest::Client::new(),
            kube: Some(KubeBackend(waystone_kube::client::KubeClient::new(client))),
        })
    }

    pub async fn apply(&self, req: &ApplyRequest) -> Result<ApplyResponse, ClientError> {
        if let Some(k) = &self.kube {
            let applied =
                k.0.apply(&req.manifests, &req.source, &req.default_namespace)
                    .await?;
            return Ok(ApplyResponse {
                results: applied
                    .into_iter()
                    .map(|a| waystone_control::api::ApplyResult {
                        kind: a.kind,
                        namespace: a.namespace,
                        name: a.name,
                        action: a.action,
                        warnings: Vec::new(),
                    })
                    .collect(),
            });
        }
        self.send(self.http.post(self.url("/v1/apply")).json(req))
            .await
    }

    /// Objects of `kind` (canonical or anything kubectl accepts), in `namespace` or all.
    pub async fn list(
        &self,
        kind: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<Value>, ClientError> {
        if let Some(k) = &self.kube {
            return Ok(k.0.list(kind, namespace).await?);
        }
        let mut query = Vec::new();
        if let Some(ns) = namespace {
            query.push(("namespace", ns));
        }
        let resp: ListResponse = self
            .send(self.objects(reqwest::Method::GET, kind, &query))
            .await?;
        Ok(resp.items)
    }

    /// One object; `Ok(None)` when it does not exist.
    pub async fn get(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Value>, ClientError> {
        match self.get_or_not_found(kind, namespace, name).await {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One object; the server's NotFound error (`wasmplugins.extensions.istio.io "x" not found`)
    /// when it does not exist.
    pub async fn get_or_not_found(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ClientError> {
        if let Some(k) = &self.kube {
            return Ok(k.0.get(kind, namespace, name).await?);
        }
        let query = [("namespace", namespace), ("name", name)];
        let resp: ListResponse = self
            .send(self.objects(reqwest::Method::GET, kind, &query))
            .await?;
        resp.items
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Transport {
                addr: self.addr.clone(),
                reason: format!("the answer for {kind} {namespace}/{name} holds no object"),
            })
    }

    pub async fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<(), ClientError> {
        if let Some(k) = &self.kube {
            return Ok(k.0.delete(kind, namespace, name).await?);
        }
        let query = [("namespace", namespace), ("name", name)];
        let _: DeleteResponse = self
            .send(self.objects(reqwest::Method::DELETE, kind, &query))
            .await?;
        Ok(())
    }

    /// A request to `/v1/objects/{kind}` with the given query.
    fn objects(
        &self,
        method: reqwest::Method,
        kind: &str,
        query: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(&format!("/v1/objects/{kind}")))
            .query(query)
    }

    pub async fn label(&self, req: &LabelRequest) -> Result<LabelResponse, ClientError> {
        if let Some(k) = &self.kube {
            let changed =
                k.0.label(
                    &req.kind,
                    &req.namespace,
                    &req.name,
                    &req.set,
                    &req.remove,
                    req.overwrite,
                )
                .await?;
            let action = if changed { "labeled" } else { "not labeled" };
            return Ok(LabelResponse {
                action: action.into(),
            });
        }
        self.send(self.http.post(self.url("/v1/label")).json(req))
            .await
    }

    /// What `gateway`'s data plane runs: the local config dump, or in a cluster the dump of
    /// the gateway's data-plane pod (its admin port, through the API server's pod proxy).
    pub async fn gateway_config_dump(
        &self,
        namespace: &str,
        gateway: &str,
    ) -> Result<Value, ClientError> {
        match &self.kube {
            Some(k) => Ok(k
                .0
                .gateway_config_dump(&waystone_model::snapshot::ObjectKey::new(
                    namespace, gateway,
                ))
                .await?),
            None => self.config_dump().await,
        }
    }

    /// What every data plane runs: the local config dump, or in a cluster every gateway pod's,
    /// merged (a pod that cannot be read is reported on stderr and left out).
    pub async fn all_config_dumps(&self) -> Result<Value, ClientError> {
        match &self.kube {
            Some(k) => {
                let (dump, failures) = k.0.all_config_dumps().await?;
                for f in failures {
                    eprintln!("warning: {}", one_line(&f));
                }
                Ok(dump)
            }
            None => self.config_dump().await,
        }
    }

    /// What the data plane runs now (`GET /v1/config_dump`; see `waystone_control::dump`).
    pub async fn config_dump(&self) -> Result<Value, ClientError> {
        self.send(self.http.get(self.url("/v1/config_dump"))).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let transport = |e: &dyn std::fmt::Display| ClientError::Transport {
            addr: self.addr.clone(),
            reason: e.to_string(),
        };
        let resp = req.bearer_auth(&self.token).send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Unreachable {
                    data_dir: self.data_dir.clone(),
                }
            } else {
                transport(&e)
            }
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| transport(&e))?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| transport(&format!("unexpected answer: {e}")));
        }
        let message = match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(err) => err.error,
            Err(_) => format!(
                "the API answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        };
        Err(ClientError::Api {
            status,
            message: one_line(&message),
        })
    }
}

/// Errors are printed as one line after `error: `.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_mean_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = ApiClient::from_data_dir(dir.path()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the Waystone API (is 'waystone up' running with --data-dir {}?)",
                dir.path().display()
            )
        );
        std::fs::write(dir.path().join(ADDR_FILE), "127.0.0.1:1\n").unwrap();
        assert!(matches!(
            ApiClient::from_data_dir(dir.path()),
            Err(ClientError::Unreachable { .. })
        ));
    }

    #[tokio::test]
    async fn refused_connection_means_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        // A port that was just free: nothing listens there any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(dir.path().join(ADDR_FILE), format!("127.0.0.1:{port}")).unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "t").unwrap();
        let client = ApiClient::from_data_dir(dir.path()).unwrap();
        let err = client.list("Service", None).await.unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    }

    /// A stand-in API: checks the token, knows one Service, answers errors as the server does.
    async fn fake_api(dir: &Path) {
        use http_body_util::Full;
        use hyper::{Request, Response, body::Incoming};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        std::fs::write(
            dir.join(ADDR_FILE),
            listener.local_addr().unwrap().to_string(),
        )
        .unwrap();
        std::fs::write(dir.join(TOKEN_FILE), "secret\n").unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let authorized = req
                            .headers()
                            .get("authorization")
                            .is_some_and(|v| v == "Bearer secret");
                        let query = req.uri().query().unwrap_or("").to_string();
                        let (status, body) = if !authorized {
                            (401, r#"{"error":"missing or wrong API token"}"#.to_string())
                        } else if query.contains("name=reviews") {
                            (
                                200,
                                r#"{"items":[{"kind":"Service","metadata":{"name":"reviews"}}]}"#
                                    .to_string(),
                            )
                        } else if query.contains("name=") {
                            (
                                404,
                                "{\"error\":\"services \\\"nope\\\" not found\"}".to_string(),
                            )
                        } else {
                            (500, "not json\n at all".to_string())
                        };
                        let mut resp = Response::new(Full::new(bytes::Bytes::from(body)));
                        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                });
            }
        });
    }

    #[tokio::test]
    async fn answers_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        fake_api(dir.path()).await;
        let client = ApiClient::from_data_dir(dir.path()).unwrap();
        let found = client
            .get("Service", "default", "reviews")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(found["metadata"]["name"], "reviews");
        assert!(
            client
                .get("Service", "default", "nope")
                .await
                .unwrap()
                .is_none()
        );
        let err = client
            .get_or_not_found("Service", "default", "nope")
            .await
            .unwrap_err();
        assert!(err.is_not_found());
        assert_eq!(err.to_string(), "services \"nope\" not found");
        let err = client.list("Service", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "the API answered 500 Internal Server Error: not json at all"
        );

        std::fs::write(dir.path().join(TOKEN_FILE), "wrong").unwrap();
        let client = ApiClient::from_data_dir(dir.path()).unwrap();
        let err = client.list("Service", None).await.unwrap_err();
        assert_eq!(err.to_string(), "missing or wrong API token");
    }

    #[test]
    fn messages_become_one_line() {
        assert_eq!(one_line("a\n  b\tc "), "a b c");
    }
}
