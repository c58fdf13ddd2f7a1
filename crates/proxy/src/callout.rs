//! The embedder side of Proxy-Wasm callouts: resolve the upstream a plugin named against the
//! snapshot, send the request from the worker, honour the timeout, and hand back what came
//! back in the host's plain types.
//!
//! Upstream names, as Envoy/Istio plugins write them: `outbound|9080||reviews.default.svc.cluster.local`
//! (Istio's cluster name; the subset is ignored), or a service host and port (`reviews:9080`,
//! `reviews.default:9080`, `reviews.default.svc.cluster.local:9080`).
//!
//! Failures are answered as Envoy's async client does: an unreachable upstream gets a local
//! `503` (body `upstream connect error or disconnect/reset before headers. reset reason:
//! connection failure`), a timeout a local `504` (body `upstream request timeout`); only a
//! stream broken after its headers arrived is delivered as a failure (no headers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use waystone_model::snapshot::Snapshot;
use waystone_wasm::{GrpcTarget, HeaderMap, HttpCallResponse, PendingCallout};

use crate::routing;

/// Largest callout response body kept (larger ones are a failure, as Envoy's buffer limit).
const MAX_CALLOUT_BODY: usize = 16 << 20;

type CalloutBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

thread_local! {
    static H1: Client<HttpConnector, CalloutBody> = client(false);
    static H2: Client<HttpConnector, CalloutBody> = client(true);
}

fn client(h2: bool) -> Client<HttpConnector, CalloutBody> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.set_nodelay(true);
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build(connector)
}

/// What callouts resolve their upstream names against: the snapshot the request runs with.
#[derive(Clone)]
pub struct Resolver {
    pub snapshot: Arc<Snapshot>,
    pub default_namespace: Arc<str>,
}

impl Resolver {
    /// The endpoints behind `upstream`, `None` when it names no service port.
    pub fn resolve(&self, upstream: &str) -> Option<Vec<SocketAddr>> {
        let authority = match upstream.strip_prefix("outbound|") {
            // outbound|PORT|SUBSET|FQDN
            Some(rest) => {
                let mut parts = rest.splitn(3, '|');
                let port = parts.next()?;
                let _subset = parts.next()?;
                let fqdn = parts.next()?;
                format!("{fqdn}:{port}")
            }
            None => upstream.to_string(),
        };
        let (_, port) =
            routing::resolve_service(&self.snapshot, &authority, &self.default_namespace)?;
        Some(port.endpoints.clone())
    }

    pub fn knows(&self, upstream: &str) -> bool {
        self.resolve(upstream).is_some()
    }

    fn pick(&self, upstream: &str) -> Option<SocketAddr> {
        let endpoints = self.resolve(upstream)?;
        if endpoints.is_empty() {
            return None;
        }
        let n = crate::routing::next_endpoint_pick();
        Some(endpoints[n % endpoints.len()])
    }
}

fn local(status: u16, body: &str) -> HttpCallResponse {
    let mut headers = HeaderMap::new();
    headers.add(":status", status.to_string());
    headers.add("content-length", body.len().to_string());
    headers.add("content-type", "text/plain");
    HttpCallResponse {
        headers,
        body: body.as_bytes().to_vec(),
        trailers: HeaderMap::new(),
    }
}

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";

fn to_http_headers(pairs: &[(String, Vec<u8>)]) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for (k, v) in pairs {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            out.append(name, value);
        }
    }
    out
}

fn from_http_headers(status: Option<http::StatusCode>, h: &http::HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(s) = status {
        out.add(":status", s.as_str());
    }
    for (k, v) in h {
        out.add(k.as_str(), v.as_bytes());
    }
    out
}

fn pseudo<'a>(pairs: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// Sends one `proxy_http_call` over HTTP/1.1 and waits for the whole answer (bounded by the
/// plugin's timeout; 0 = none). `None` = the stream broke after its headers.
pub async fn http_call(resolver: &Resolver, call: PendingCallout) -> Option<HttpCallResponse> {
    let Some(endpoint) = resolver.pick(&call.upstream) else {
        // The upstream was known when the call was made (else BadArgument), but the config
        // changed or it has no endpoints: what Envoy answers for no healthy upstream.
        return Some(local(503, "no healthy upstream"));
    };
    let method = pseudo(&call.headers, ":method").unwrap_or("GET");
    let path = pseudo(&call.headers, ":path").unwrap_or("/");
    let authority = pseudo(&call.headers, ":authority").unwrap_or("");
    let mut req = Request::new(
        Full::new(Bytes::from(call.body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *req.method_mut() = http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::GET);
    *req.uri_mut() = match format!("http://{endpoint}{path}").parse() {
        Ok(u) => u,
        Err(_) => return Some(local(400, "bad request path")),
    };
    *req.headers_mut() = to_http_headers(&call.headers);
    if let Ok(v) = HeaderValue::from_str(authority) {
        req.headers_mut().insert(http::header::HOST, v);
    }
    let exchange = async move {
        let fut = H1.with(|c| c.request(req));
        let resp = match fut.await {
            Ok(r) => r,
            Err(err) => {
                tracing::debug!(error = %err, upstream = %call.upstream, "callout failed to connect");
                return Some(local(503, CONNECT_FAILURE));
            }
        };
        let (parts, body) = resp.into_parts();
        let collected = http_body_util::Limited::new(body, MAX_CALLOUT_BODY)
            .collect()
            .await
            .ok()?;
        let trailers = collected
            .trailers()
            .map(|t| from_http_headers(None, t))
            .unwrap_or_default();
        Some(HttpCallResponse {
            headers: from_http_headers(Some(parts.status), &parts.headers),
            body: collected.to_bytes().to_vec(),
            trailers,
        })
    };
    if call.timeout.is_zero() {
        return exchange.await;
    }
    match tokio::time::timeout(call.timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Some(local(504, "upstream request timeout")),
    }
}

/// What a unary gRPC call produced, in the order the plugin is told.
pub struct GrpcOutcome {
    pub initial_metadata: Option<HeaderMap>,
    pub messages: Vec<Vec<u8>>,
    pub trailing_metadata: Option<HeaderMap>,
    pub status: u32,
    pub message: String,
}

impl GrpcOutcome {
    fn failed(status: u32, message: &str) -> Self {
        GrpcOutcome {
            initial_metadata: None,
            messages: Vec::new(),
            trailing_metadata: None,
            status,
            message: message.into(),
        }
    }
}

const GRPC_UNAVAILABLE: u32 = 14;
const GRPC_DEADLINE_EXCEEDED: u32 = 4;
const GRPC_INTERNAL: u32 = 13;

/// Sends one unary `proxy_grpc_call` over h2 (prior knowledge) and splits the answer into
/// metadata, length-prefixed messages and status.
pub async fn grpc_call(
    resolver: &Resolver,
    call: GrpcTarget,
    message: Vec<u8>,
    timeout: Duration,
) -> GrpcOutcome {
    let Some(endpoint) = resolver.pick(&call.upstream) else {
        return GrpcOutcome::failed(GRPC_UNAVAILABLE, "no healthy upstream");
    };
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    let mut req = Request::new(
        Full::new(Bytes::from(framed))
            .map_err(|never| match never {})
            .boxed(),
    );
    *req.method_mut() = http::Method::POST;
    let uri = format!("http://{endpoint}/{}/{}", call.service, call.method);
    *req.uri_mut() = match uri.parse() {
        Ok(u) => u,
        Err(_) => return GrpcOutcome::failed(GRPC_INTERNAL, "bad service or method name"),
    };
    *req.version_mut() = http::Version::HTTP_2;
    let mut headers = to_http_headers(&call.initial_metadata);
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    if !timeout.is_zero()
        && let Ok(v) = HeaderValue::from_str(&format!("{}m", timeout.as_millis()))
    {
        headers.insert("grpc-timeout", v);
    }
    *req.headers_mut() = headers;
    let exchange = async move {
        let fut = H2.with(|c| c.request(req));
        let resp = match fut.await {
            Ok(r) => r,
            Err(err) => {
                return GrpcOutcome::failed(GRPC_UNAVAILABLE, &format!("connect failed: {err}"));
            }
        };
        let (parts, body) = resp.into_parts();
        let initial = from_http_headers(None, &parts.headers);
        let Ok(collected) = http_body_util::Limited::new(body, MAX_CALLOUT_BODY)
            .collect()
            .await
        else {
            return GrpcOutcome::failed(GRPC_INTERNAL, "response stream broke");
        };
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        let mut messages = Vec::new();
        let mut rest = &data[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let Some(msg) = rest.get(5..5 + len) else {
                break;
            };
            messages.push(msg.to_vec());
            rest = &rest[5 + len..];
        }
        // A trailers-only answer carries the status in its headers.
        let status_from = trailers.as_ref().unwrap_or(&parts.headers);
        let status = status_from
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(if parts.status.is_success() {
                GRPC_INTERNAL
            } else {
                GRPC_UNAVAILABLE
            });
        let message = status_from
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        GrpcOutcome {
            initial_metadata: Some(initial),
            messages,
            trailing_metadata: trailers.map(|t| from_http_headers(None, &t)),
            status,
            message,
        }
    };
    if timeout.is_zero() {
        return exchange.await;
    }
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => GrpcOutcome::failed(GRPC_DEADLINE_EXCEEDED, "deadline exceeded"),
    }
}

/// What an open gRPC stream tells the plugin as it happens; its end (trailing metadata and
/// status) comes as the stream task's [`GrpcOutcome`].
pub enum GrpcStreamEvent {
    InitialMetadata(HeaderMap),
    Message(Vec<u8>),
}

/// What the plugin asks of an open stream (`proxy_grpc_send`, `proxy_grpc_close`).
pub enum GrpcStreamInput {
    Message {
        message: Vec<u8>,
        end_of_stream: bool,
    },
    /// Half-close: nothing more will be sent.
    Close,
}

/// Where a stream's events go: (filter index of the owning context, token, event).
pub type GrpcEvents = crate::local_channel::Sender<(usize, u32, GrpcStreamEvent)>;

/// A request body fed message by message by the plugin.
struct StreamRequestBody(tokio::sync::mpsc::UnboundedReceiver<Bytes>);

impl hyper::body::Body for StreamRequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn frame_message(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// Applies one plugin request to the stream's sending side; false once the plugin side is gone.
fn on_input(
    cmd: Option<GrpcStreamInput>,
    body_tx: &mut Option<tokio::sync::mpsc::UnboundedSender<Bytes>>,
) -> bool {
    match cmd {
        Some(GrpcStreamInput::Message {
            message,
            end_of_stream,
        }) => {
            if let Some(tx) = body_tx.as_ref() {
                let _ = tx.send(frame_message(&message));
            }
            if end_of_stream {
                *body_tx = None;
            }
            true
        }
        Some(GrpcStreamInput::Close) => {
            *body_tx = None;
            true
        }
        None => false,
    }
}

/// Carries one `proxy_grpc_stream` over h2: sends what the plugin sends as it asks (half-close
/// on `end_of_stream` or `proxy_grpc_close`), reports initial metadata and each message through
/// `events` as they arrive, and returns the trailing metadata and close status. Dropping the
/// task (cancel, or the owning context ended) resets the h2 stream.
pub async fn grpc_stream(
    resolver: &Resolver,
    call: GrpcTarget,
    mut input: tokio::sync::mpsc::UnboundedReceiver<GrpcStreamInput>,
    events: GrpcEvents,
    owner: usize,
    token: u32,
) -> GrpcOutcome {
    let Some(endpoint) = resolver.pick(&call.upstream) else {
        return GrpcOutcome::failed(GRPC_UNAVAILABLE, "no healthy upstream");
    };
    let (body_tx, body_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut body_tx = Some(body_tx);
    let mut input_open = true;
    let mut req = Request::new(StreamRequestBody(body_rx).boxed());
    *req.method_mut() = http::Method::POST;
    let uri = format!("http://{endpoint}/{}/{}", call.service, call.method);
    *req.uri_mut() = match uri.parse() {
        Ok(u) => u,
        Err(_) => return GrpcOutcome::failed(GRPC_INTERNAL, "bad service or method name"),
    };
    *req.version_mut() = http::Version::HTTP_2;
    let mut headers = to_http_headers(&call.initial_metadata);
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("te", HeaderValue::from_static("trailers"));
    *req.headers_mut() = headers;
    let response = H2.with(|c| c.request(req));
    tokio::pin!(response);
    let response = loop {
        tokio::select! {
            r = &mut response => break r,
            cmd = input.recv(), if input_open => input_open = on_input(cmd, &mut body_tx),
        }
    };
    let response = match response {
        Ok(r) => r,
        Err(err) => {
            return GrpcOutcome::failed(GRPC_UNAVAILABLE, &format!("connect failed: {err}"));
        }
    };
    let (parts, mut body) = response.into_parts();
    let mut trailing: Option<http::HeaderMap> = None;
    if !hyper::body::Body::is_end_stream(&body) {
        let _ = events.send((
            owner,
            token,
            GrpcStreamEvent::InitialMetadata(from_http_headers(None, &parts.headers)),
        ));
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                cmd = input.recv(), if input_open => {
                    input_open = on_input(cmd, &mut body_tx);
                    continue;
                }
            };
            match frame {
                None => break,
                Some(Err(_)) => return GrpcOutcome::failed(GRPC_INTERNAL, "response stream broke"),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        buf.extend_from_slice(&data);
                        while buf.len() >= 5 {
                            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                            if buf.len() < 5 + len {
                                break;
                            }
                            if len > MAX_CALLOUT_BODY {
                                return GrpcOutcome::failed(GRPC_INTERNAL, "message too large");
                            }
                            let message = buf[5..5 + len].to_vec();
                            buf.drain(..5 + len);
                            let _ = events.send((owner, token, GrpcStreamEvent::Message(message)));
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            trailing = Some(t);
                        }
                    }
                },
            }
        }
    }
    // A trailers-only answer carries the status in its headers.
    let status_from = trailing.as_ref().unwrap_or(&parts.headers);
    let status = status_from
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(GRPC_INTERNAL);
    let message = status_from
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    GrpcOutcome {
        initial_metadata: None,
        messages: Vec::new(),
        trailing_metadata: Some(from_http_headers(None, status_from)),
        status,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use waystone_model::snapshot::{ObjectKey, ServiceConfig, ServicePortConfig};

    #[test]
    fn upstream_name_forms() {
        let endpoint: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut snapshot = Snapshot::empty();
        snapshot.services.push(ServiceConfig {
            key: ObjectKey::new("default", "reviews"),
            cluster_ip: None,
            ports: vec![ServicePortConfig {
                name: Some("http".into()),
                port: 9080,
                protocol: "TCP".into(),
                app_protocol: None,
                endpoints: vec![endpoint],
            }],
            waypoint: None,
            labels: BTreeMap::new(),
        });
        let r = Resolver {
            snapshot: Arc::new(snapshot),
            default_namespace: "default".into(),
        };
        for name in [
            "reviews:9080",
            "reviews.default:9080",
            "reviews.default.svc.cluster.local:9080",
            "outbound|9080||reviews.default.svc.cluster.local",
            "outbound|9080|v1|reviews.default.svc.cluster.local",
        ] {
            assert_eq!(r.resolve(name), Some(vec![endpoint]), "{name}");
        }
        for name in [
            "reviews:9999",
            "ratings:9080",
            "outbound|9080",
            "outbound|x||reviews",
        ] {
            assert!(!r.knows(name), "{name}");
        }
    }
}
