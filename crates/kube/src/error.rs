//! Errors at this crate's boundary.

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("Kubernetes client configuration: {0}")]
    Config(String),
    #[error("kind {0} is not one Waystone reads")]
    UnknownKind(String),
    #[error("the API server does not serve {kind} (are the CRDs installed?): {source}")]
    Discovery {
        kind: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("no data-plane pod serves gateway {gateway}: {detail}")]
    NoDataPlane { gateway: String, detail: String },
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
}

impl KubeError {
    pub fn api(what: impl Into<String>, source: kube::Error) -> Self {
        KubeError::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }
}
