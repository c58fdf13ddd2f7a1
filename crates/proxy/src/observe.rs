//! What the data plane records about each gateway/waypoint request: Istio's request metrics,
//! the access log line and the trace spans. A request is finished (and recorded) when its
//! response body has been sent, or dropped (`DC`: the client went away).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use waystone_model::snapshot::{AccessLogFormat, GatewayConfig};

use crate::access_log::{AccessLogSink, AccessRecord};
use crate::handler::{Body, BoxError};
use crate::metrics::{self, LabelSet, LabelTable, ResponseFlags};
use crate::trace::{AttrValue, PluginSpan, Span, SpanExporter, TraceParent};

/// Observability settings of the data plane.
#[derive(Debug, Clone, Default)]
pub struct ObservabilityConfig {
    /// Access log format of gateways without a `waystone.io/access-log` annotation.
    pub access_log: AccessLogFormat,
    /// Where access log lines go (`None`: stdout).
    pub access_log_file: Option<PathBuf>,
    /// OTLP/HTTP JSON collector (`http://host:port`); `None`: tracing off.
    pub otlp_endpoint: Option<String>,
}

/// The response's `response_code_details` when the proxy (or a plugin) answered it.
#[derive(Debug, Clone)]
pub struct LocalDetails(pub String);

pub(crate) struct Observer {
    pub labels: ArcSwap<LabelTable>,
    default_format: AccessLogFormat,
    access_log_file: Option<PathBuf>,
    sink: OnceLock<Option<AccessLogSink>>,
    exporter: Option<SpanExporter>,
}

impl Observer {
    pub fn new(cfg: &ObservabilityConfig) -> Result<Self, String> {
        let exporter = cfg
            .otlp_endpoint
            .as_deref()
            .map(SpanExporter::start)
            .transpose()?;
        Ok(Self {
            labels: ArcSwap::from_pointee(LabelTable::default()),
            default_format: cfg.access_log,
            access_log_file: cfg.access_log_file.clone(),
            sink: OnceLock::new(),
            exporter,
        })
    }

    pub fn tracing(&self) -> bool {
        self.exporter.is_some()
    }

    /// Started on first use, so a process that logs nothing has no writer thread.
    fn sink(&self) -> Option<&AccessLogSink> {
        self.sink
            .get_or_init(
                || match AccessLogSink::start(self.access_log_file.as_deref()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::error!(file = ?self.access_log_file, error = %e, "cannot open the access log; access logs are off");
                        None
                    }
                },
            )
            .as_ref()
    }

    pub fn format_for(&self, gw: &GatewayConfig) -> AccessLogFormat {
        gw.access_log.unwrap_or(self.default_format)
    }
}

/// Per-request facts gathered on the way (set by `proxy`).
#[derive(Default)]
pub(crate) struct Facts {
    pub upstream_host: Option<SocketAddr>,
    pub cluster: Option<String>,
    pub route_name: Option<String>,
    /// Whether the access log or a span will print names (cluster, route).
    pub detailed: bool,
    /// Plugin callbacks timed for child spans (tracing only).
    pub spans: Option<Rc<RefCell<Vec<PluginSpan>>>>,
    /// When the request started (wall clock), read once for the access log and spans, and
    /// handed to the plugins as `request.time`; `None` where there is no L7 telemetry.
    pub start_time: Option<SystemTime>,
}

/// What the access log needs from the request, captured only when it is on.
pub(crate) struct AccessStart {
    pub method: String,
    pub path: String,
    pub protocol: &'static str,
    pub x_forwarded_for: Option<String>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
    pub authority: String,
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

pub(crate) struct TraceStart {
    pub context: TraceParent,
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub method: String,
    pub path: String,
}

/// A request in flight, finished by [`ObservedBody`].
pub(crate) struct Pending {
    pub observer: Arc<Observer>,
    pub gateway: String,
    pub service_name: String,
    pub labels: LabelSet,
    pub format: AccessLogFormat,
    pub code: u16,
    pub flags: ResponseFlags,
    pub details: std::borrow::Cow<'static, str>,
    pub grpc: bool,
    pub grpc_status: Option<u16>,
    pub started: Instant,
    pub start_time: SystemTime,
    pub request_bytes: Option<Arc<AtomicU64>>,
    pub access: Option<Box<AccessStart>>,
    pub trace: Option<Box<TraceStart>>,
    pub plugin_spans: Vec<PluginSpan>,
    pub upstream_host: Option<SocketAddr>,
    pub cluster: Option<String>,
    pub route_name: Option<String>,
}

pub(crate) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn rfc3339_millis(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    dt.format(&fmt).unwrap_or_default()
}

impl Pending {
    fn finish(self: Box<Self>, bytes_sent: u64, disconnected: bool) {
        let duration = self.started.elapsed();
        let flags = if disconnected && self.flags == ResponseFlags::None {
            ResponseFlags::DownstreamDisconnect
        } else {
            self.flags
        };
        let request_bytes = self
            .request_bytes
            .as_ref()
            .map_or(0, |c| c.load(Ordering::Relaxed));
        metrics::record_request(&metrics::RequestSample {
            labels: &self.labels,
            code: self.code,
            flags,
            grpc: self.grpc,
            grpc_status: self.grpc_status,
            duration,
            request_bytes,
            response_bytes: bytes_sent,
        });
        if let Some(a) = &self.access {
            let record = AccessRecord {
                start_time: rfc3339_millis(self.start_time),
                method: a.method.clone(),
                path: a.path.clone(),
                protocol: a.protocol.to_string(),
                response_code: self.code,
                response_flags: flags.as_str(),
                response_code_details: self.details.to_string(),
                connection_termination_details: None,
                upstream_transport_failure_reason: None,
                bytes_received: request_bytes,
                bytes_sent,
                duration: duration.as_millis() as u64,
                upstream_service_time: None,
                x_forwarded_for: a.x_forwarded_for.clone(),
                user_agent: a.user_agent.clone(),
                request_id: a.request_id.clone(),
                authority: a.authority.clone(),
                upstream_host: self.upstream_host.map(|h| h.to_string()),
                upstream_cluster: self.cluster.clone(),
                upstream_local_address: None,
                downstream_local_address: a.local.to_string(),
                downstream_remote_address: a.peer.to_string(),
                requested_server_name: None,
                route_name: self.route_name.clone(),
                gateway: self.gateway.clone(),
            };
            if let (Some(line), Some(sink)) = (record.line(self.format), self.observer.sink()) {
                sink.write(line);
            }
        }
        if let (Some(t), Some(exporter)) = (&self.trace, &self.observer.exporter)
            && t.context.sampled
        {
            let end = self.start_time + duration;
            let service = self.service_name.clone();
            let mut spans = Vec::with_capacity(1 + self.plugin_spans.len());
            spans.push(Span {
                trace_id: t.context.trace_id,
                span_id: t.context.span_id,
                parent: t.parent,
                name: t.name.clone(),
                kind: 2,
                start_unix_nanos: unix_nanos(self.start_time),
                end_unix_nanos: unix_nanos(end),
                attributes: vec![
                    ("http.method", AttrValue::Str(t.method.clone())),
                    ("http.url", AttrValue::Str(t.path.clone())),
                    ("http.status_code", AttrValue::Int(i64::from(self.code))),
                    ("response_flags", AttrValue::Str(flags.as_str().into())),
                    (
                        "response_code_details",
                        AttrValue::Str(self.details.to_string()),
                    ),
                    (
                        "upstream_cluster",
                        AttrValue::Str(self.cluster.clone().unwrap_or_default()),
                    ),
                    ("component", AttrValue::Str("proxy".into())),
                ],
                error: self.code >= 500,
                service: service.clone(),
            });
            for p in &self.plugin_spans {
                spans.push(Span {
                    trace_id: t.context.trace_id,
                    span_id: crate::trace::new_span_id(),
                    parent: Some(t.context.span_id),
                    name: format!("wasm {} {}", p.plugin, p.callback),
                    kind: 1,
                    start_unix_nanos: p.start_unix_nanos,
                    end_unix_nanos: p.end_unix_nanos,
                    attributes: vec![
                        ("wasm.plugin", AttrValue::Str(p.plugin.to_string())),
                        ("wasm.callback", AttrValue::Str(p.callback.into())),
                        ("wasm.outcome", AttrValue::Str(p.outcome.into())),
                    ],
                    error: matches!(p.outcome, "trap" | "deadline" | "memory" | "error"),
                    service: service.clone(),
                });
            }
            exporter.send(spans);
        }
    }
}

/// A request whose response is not ready yet. Dropped unfinished (the client went away, so
/// the server dropped the handler), it records the request as Envoy does: response code 0,
/// `DC`, `downstream_remote_disconnect`, with whatever was known about the upstream.
pub(crate) struct InFlight {
    pending: Option<Box<Pending>>,
    pub facts: Facts,
}

impl InFlight {
    pub fn new(pending: Box<Pending>, facts: Facts) -> Self {
        Self {
            pending: Some(pending),
            facts,
        }
    }

    /// The response is ready: the request's facts go to its record, which the caller finishes.
    pub fn respond(mut self) -> Box<Pending> {
        let mut p = self
            .pending
            .take()
            .expect("an InFlight is responded to once");
        p.take_facts(&mut self.facts);
        p
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut p) = self.pending.take() {
            p.take_facts(&mut self.facts);
            p.code = 0;
            p.details = std::borrow::Cow::Borrowed("downstream_remote_disconnect");
            p.finish(0, true);
        }
    }
}

impl Pending {
    fn take_facts(&mut self, facts: &mut Facts) {
        self.plugin_spans = facts
            .spans
            .take()
            .map(|s| std::mem::take(&mut *s.borrow_mut()))
            .unwrap_or_default();
        self.upstream_host = facts.upstream_host;
        self.cluster = facts.cluster.take();
        self.route_name = facts.route_name.take();
    }
}

/// The response body, counted; records the request when it ends or is dropped.
pub(crate) struct ObservedBody {
    inner: Body,
    sent: u64,
    pending: Option<Box<Pending>>,
}

impl ObservedBody {
    /// Wraps `inner`; an already finished body is recorded at once.
    pub fn wrap(inner: Body, pending: Box<Pending>) -> Body {
        if inner.is_end_stream() {
            pending.finish(0, false);
            return inner;
        }
        use http_body_util::BodyExt as _;
        ObservedBody {
            inner,
            sent: 0,
            pending: Some(pending),
        }
        .boxed()
    }
}

impl HttpBody for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.sent += d.len() as u64;
                }
                if this.inner.is_end_stream()
                    && let Some(p) = this.pending.take()
                {
                    p.finish(this.sent, false);
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    p.finish(this.sent, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.finish(this.sent, true);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.sent, true);
        }
    }
}

/// Counts request body bytes as they stream through.
pub(crate) struct CountingBody<B> {
    pub inner: B,
    pub count: Arc<AtomicU64>,
}

impl<B> HttpBody for CountingBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
