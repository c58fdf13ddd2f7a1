//! One HTTP request, from the listener that accepted it to the upstream and back.
//!
//! Phases, in order (Proxy-Wasm callbacks in brackets):
//! 1. pick the destination: a route (gateway) or a service from the authority (waypoint, mesh entry);
//! 2. request headers through the chain [`proxy_on_context_create`, `proxy_on_request_headers`];
//! 3. request body and trailers, streamed chunk by chunk through plugins that read them
//!    [`proxy_on_request_body`, `proxy_on_request_trailers`] while it goes upstream (`stream.rs`);
//! 4. pick an endpoint and forward;
//! 5. response headers, last plugin first [`proxy_on_response_headers`];
//! 6. response body and trailers, likewise [`proxy_on_response_body`, `proxy_on_response_trailers`];
//! 7. end of stream [`proxy_on_done`, `proxy_on_log`, `proxy_on_delete`].
//!
//! A local reply (from a plugin or from the proxy) skips to phase 5 with the reply.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use waystone_model::snapshot::{
    AccessLogFormat, GatewayConfig, GatewayRole, ObjectKey, PluginId, ServiceConfig,
    ServicePortConfig, Snapshot,
};
use waystone_wasm::{
    HeaderMap as WasmHeaders, HeaderSource, HttpStream, StreamData, StreamProperties,
};

use crate::chain::{ChainRun, Dir, Halt, LocalReply, Outcome, StreamReset};
use crate::metrics::{self, KeyMap, ResponseFlags};
use crate::observe::{
    AccessStart, CountingBody, Facts, InFlight, LocalDetails, ObservedBody, Observer, Pending,
    TraceStart,
};
use crate::routing::{self, RequestView};
use crate::runtime::RuntimeConfig;
use crate::stream::{self, ChannelBody, PumpError};
use crate::upstream::{Encoded, Outgoing};
use tokio::sync::{mpsc, oneshot};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Which listener a request came in on.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A gateway or waypoint listener.
    Gateway {
        gateway: ObjectKey,
        listener: String,
    },
    /// The local mesh entry: ztunnel's stand-in.
    Mesh,
}

/// Per-connection facts.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub id: u64,
}

/// Settings the handler needs besides the runtime config.
#[derive(Clone)]
pub struct HandlerSettings {
    pub max_buffered_body: usize,
    pub trailer_wait: std::time::Duration,
    pub node_id: Arc<str>,
    pub(crate) observer: Arc<Observer>,
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// Where a request goes after routing: a service port, and the plugin chain that applies.
struct Target<'a> {
    service: &'a ServiceConfig,
    port: &'a ServicePortConfig,
    chain: &'a [PluginId],
    /// The HTTPRoute rule that matched (gateway listeners only).
    route: Option<&'a waystone_model::snapshot::RouteConfig>,
    /// The gateway or waypoint that reports this request (none: straight from the mesh entry).
    gateway: Option<&'a GatewayConfig>,
}

pub async fn handle(
    mut req: Request<Incoming>,
    entry: &Entry,
    conn: ConnInfo,
    rt: std::rc::Rc<crate::runtime::WorkerConfig>,
    settings: &HandlerSettings,
) -> Response<Body> {
    let started = std::time::Instant::now();
    // Once per request, before either path below (with or without L7 telemetry).
    ensure_request_id(req.headers_mut());
    let authority = request_authority(&req);
    // Through HBONE the CONNECT authority, not the inner Host, names the destination.
    let destination = crate::hbone::tunnel_destination();
    let target = select_target(&req, destination.as_ref().unwrap_or(&authority), entry, &rt);
    let reporting = match &target {
        Ok(t) => t.gateway,
        Err(_) => reporting_gateway(entry, &authority, &rt),
    };
    let Some(gw) = reporting else {
        // Straight from the mesh entry to endpoints: ztunnel's path, which has no L7 telemetry.
        let mut facts = Facts::default();
        return match target {
            Ok(t) => {
                let req = req.map(|b| b.map_err(BoxError::from).boxed());
                proxy(req, authority, t, conn, &rt, settings, &mut facts).await
            }
            Err(reply) => reply_response(reply),
        };
    };
    let observer = &settings.observer;
    let service = target.as_ref().ok().map(|t| t.service);
    let labels = observer
        .labels
        .load()
        .get(&gw.key, service.map(|s| &s.key))
        .unwrap_or_else(|| metrics::label_set(gw, service));
    let format = observer.format_for(gw);
    let (mut parts, body) = req.into_parts();
    let grpc = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let start_time = std::time::SystemTime::now();
    let header_str = |headers: &http::HeaderMap, name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let path = |uri: &http::Uri| {
        uri.path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string()
    };
    let access = (format != AccessLogFormat::Off).then(|| {
        Box::new(AccessStart {
            method: parts.method.as_str().to_string(),
            path: path(&parts.uri),
            protocol: protocol_name(parts.version),
            x_forwarded_for: header_str(&parts.headers, "x-forwarded-for"),
            user_agent: header_str(&parts.headers, "user-agent"),
            request_id: header_str(&parts.headers, "x-request-id"),
            authority: authority.clone(),
            local: conn.local,
            peer: conn.peer,
        })
    });
    let trace = observer.tracing().then(|| {
        let incoming = header_str(&parts.headers, "traceparent")
            .and_then(|v| crate::trace::TraceParent::parse(&v));
        let context = crate::trace::TraceParent {
            trace_id: incoming.map_or_else(crate::trace::new_trace_id, |t| t.trace_id),
            span_id: crate::trace::new_span_id(),
            sampled: incoming.is_none_or(|t| t.sampled),
        };
        if let Ok(v) = HeaderValue::from_str(&context.header()) {
            parts.headers.insert("traceparent", v);
        }
        let name = match service {
            Some(s) => format!(
                "{}.{}.svc.cluster.local:{}/*",
                s.key.name,
                s.key.namespace,
                target.as_ref().map_or(0, |t| t.port.port)
            ),
            None => authority.clone(),
        };
        Box::new(TraceStart {
            context,
            parent: incoming.map(|t| t.span_id),
            name,
            method: parts.method.as_str().to_string(),
            path: path(&parts.uri),
        })
    });
    let request_bytes = (!body.is_end_stream()).then(|| Arc::new(AtomicU64::new(0)));
    let body: Body = match &request_bytes {
        Some(count) => CountingBody {
            inner: body,
            count: count.clone(),
        }
        .boxed(),
        None => body.map_err(BoxError::from).boxed(),
    };
    let req = Request::from_parts(parts, body);
    let facts = Facts {
        spans: trace.is_some().then(Default::default),
        detailed: access.is_some() || trace.is_some(),
        start_time: Some(start_time),
        ..Default::default()
    };
    let pending = Box::new(Pending {
        observer: observer.clone(),
        // Names only the access log and spans print: no allocation when both are off.
        gateway: if access.is_some() {
            gw.key.to_string()
        } else {
            String::new()
        },
        service_name: if trace.is_some() {
            format!("{}.{}", gw.key.name, gw.key.namespace)
        } else {
            String::new()
        },
        labels,
        format,
        code: 0,
        flags: ResponseFlags::None,
        details: std::borrow::Cow::Borrowed("via_upstream"),
        grpc,
        grpc_status: None,
        started,
        start_time,
        request_bytes,
        access,
        trace,
        plugin_spans: Vec::new(),
        upstream_host: None,
        cluster: None,
        route_name: None,
    });
    // Recorded as `DC` if the client goes away (and the server drops this future) first.
    let mut in_flight = InFlight::new(pending, facts);
    let mut response = match target {
        Ok(t) => proxy(req, authority, t, conn, &rt, settings, &mut in_flight.facts).await,
        Err(reply) => reply_response(reply),
    };
    let mut pending = in_flight.respond();
    if let Some(details) = response.extensions_mut().remove::<LocalDetails>() {
        pending.flags = ResponseFlags::from_details(&details.0);
        pending.details = std::borrow::Cow::Owned(details.0);
    }
    // A reset stream has no response: Envoy logs code 0.
    pending.code = if response.extensions().get::<StreamReset>().is_some() {
        0
    } else {
        response.status().as_u16()
    };
    pending.grpc_status = response
        .headers()
        .get(&GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, ObservedBody::wrap(body, pending))
}

/// The gateway that reports a request no destination was found for.
fn reporting_gateway<'a>(
    entry: &Entry,
    authority: &str,
    rt: &'a RuntimeConfig,
) -> Option<&'a GatewayConfig> {
    match entry {
        Entry::Gateway { gateway, .. } => rt.snapshot.gateway(gateway),
        Entry::Mesh => {
            let (service, _) =
                routing::resolve_service(&rt.snapshot, authority, &rt.default_namespace)?;
            rt.snapshot.gateway(service.waypoint.as_ref()?)
        }
    }
}

fn request_authority<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn select_target<'a, B>(
    req: &Request<B>,
    authority: &str,
    entry: &Entry,
    rt: &'a RuntimeConfig,
) -> Result<Target<'a>, LocalReply> {
    let snapshot = &rt.snapshot;
    match entry {
        Entry::Gateway { gateway, listener } => {
            let gw = snapshot.gateway(gateway).ok_or_else(|| {
                LocalReply::text(503, "gateway_removed", "gateway is being removed\n")
            })?;
            if let GatewayRole::Waypoint { .. } = gw.role {
                return waypoint_target(rt, gateway, authority);
            }
            let l = gw
                .listeners
                .iter()
                .find(|l| &l.name == listener)
                .ok_or_else(|| {
                    LocalReply::text(503, "listener_removed", "listener is being removed\n")
                })?;
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            let (host, _) = routing::split_authority(authority);
            let view = RequestView {
                method: req.method().as_str(),
                path,
                host,
                headers: req.headers(),
            };
            let route = routing::match_route(l, &view)
                .ok_or_else(|| LocalReply::text(404, "route_not_found", "no route matched\n"))?;
            let backend = routing::pick_backend_here(&route.backends)
                .ok_or_else(|| LocalReply::text(500, "no_backend", "route has no backend\n"))?;
            let service = snapshot.service(&backend.service).ok_or_else(|| {
                LocalReply::text(
                    500,
                    "backend_not_found",
                    format!("backend service {} not found\n", backend.service),
                )
            })?;
            let port = service
                .ports
                .iter()
                .find(|p| p.port == backend.port)
                .ok_or_else(|| {
                    LocalReply::text(
                        500,
                        "backend_port_not_found",
                        format!("service {} has no port {}\n", backend.service, backend.port),
                    )
                })?;
            Ok(Target {
                service,
                port,
                chain: &l.chain,
                route: Some(route),
                gateway: Some(gw),
            })
        }
        Entry::Mesh => {
            let (service, port) =
                routing::resolve_service(snapshot, authority, &rt.default_namespace)
                    .ok_or_else(|| unknown_destination(authority))?;
            match &service.waypoint {
                Some(waypoint) if snapshot.gateway(waypoint).is_some() => {
                    waypoint_target(rt, waypoint, authority)
                }
                _ => Ok(Target {
                    service,
                    port,
                    chain: &[],
                    route: None,
                    gateway: None,
                }),
            }
        }
    }
}

/// A waypoint serves a service that uses it, running that service's chain for the port.
fn waypoint_target<'a>(
    rt: &'a RuntimeConfig,
    waypoint: &ObjectKey,
    authority: &str,
) -> Result<Target<'a>, LocalReply> {
    let snapshot = &rt.snapshot;
    let (service, port) = routing::resolve_service(snapshot, authority, &rt.default_namespace)
        .ok_or_else(|| unknown_destination(authority))?;
    let gw = snapshot.gateway(waypoint).ok_or_else(|| {
        LocalReply::text(
            503,
            "waypoint_not_found",
            format!("waypoint {waypoint} not found\n"),
        )
    })?;
    let served = gw
        .waypoint_services
        .iter()
        .find(|s| s.service == service.key)
        .ok_or_else(|| {
            LocalReply::text(
                404,
                "service_not_on_waypoint",
                format!("service {} does not use waypoint {waypoint}\n", service.key),
            )
        })?;
    let chain = served
        .ports
        .iter()
        .find(|p| p.port == port.port)
        .map(|p| p.chain.as_slice())
        .unwrap_or(&[]);
    Ok(Target {
        service,
        port,
        chain,
        route: None,
        gateway: Some(gw),
    })
}

fn unknown_destination(authority: &str) -> LocalReply {
    LocalReply::text(
        404,
        "unknown_destination",
        format!("no service matches {authority:?}\n"),
    )
}

async fn proxy(
    req: Request<Body>,
    authority: String,
    target: Target<'_>,
    conn: ConnInfo,
    rt: &RuntimeConfig,
    settings: &HandlerSettings,
    facts: &mut Facts,
) -> Response<Body> {
    // The x-request-id is in place already (`handle`).
    let (parts, body) = req.into_parts();
    // Istio's cluster name, only for the access log, spans and plugins.
    let cluster_name = || {
        snapshot_name(&rt.snapshot, target.port, || {
            format!(
                "outbound|{}||{}.{}.svc.cluster.local",
                target.port.port, target.service.key.name, target.service.key.namespace
            )
        })
    };
    let route_name = |route| snapshot_name(&rt.snapshot, route, || route_name(route));
    if facts.detailed {
        facts.cluster = Some(cluster_name().to_string());
        if let Some(route) = target.route {
            facts.route_name = Some(route_name(route).to_string());
        }
    }

    if target.chain.is_empty() {
        // No plugins: stream straight through, no conversions.
        let Some(endpoint) = routing::pick_endpoint_here(target.port) else {
            return reply_response(no_endpoint(target.service));
        };
        facts.upstream_host = Some(endpoint);
        let upstream = Outgoing {
            method: &parts.method,
            target: request_target(&parts.uri),
            headers: &parts.headers,
            authority: &authority,
            trailer: None,
        }
        .encode(endpoint, &body);
        drop(parts);
        return match forward(endpoint, upstream, body).await {
            Ok(resp) => resp.map(|b| b.map_err(BoxError::from).boxed()),
            Err(reply) => reply_response(reply),
        };
    }

    let mut properties = StreamProperties {
        source: Some(conn.peer),
        destination: Some(conn.local),
        connection_id: conn.id,
        // `request.id` is read from the x-request-id the plugins see (set above when the
        // client sent none), as Envoy reads it from the request headers.
        request_id: None,
        protocol: protocol_name(parts.version),
        start_time: Some(facts.start_time.unwrap_or_else(std::time::SystemTime::now)),
        route_name: target.route.map(route_name).into(),
        cluster_name: cluster_name().into(),
        node_id: worker_copy(&settings.node_id).into(),
        ..Default::default()
    };
    crate::hbone::annotate(&mut properties);
    let version = parts.version;
    // The plugins get the client's head unconverted: reads by name are answered from it, and
    // it is converted only when one of them needs the whole map or changes it. It goes
    // upstream from here too when none did.
    let (head, te_trailers) = RequestHead::new(parts, authority);
    let head = Arc::new(head);
    let stream = HttpStream::from(StreamData {
        request_source: Some(head.clone()),
        properties,
        ..Default::default()
    });
    let mut run = ChainRun::new(stream);
    run.spans = facts.spans.clone();
    let request_eos = body.is_end_stream();
    // An HTTP/1.1 client gets response trailers only if it said it takes them (hyper's rule).
    let client_takes_trailers = version == http::Version::HTTP_2 || te_trailers;
    match run.request_headers(target.chain, rt, request_eos).await {
        Outcome::Continue => {}
        Outcome::Respond(reply) => return local_reply_through_chain(run, reply).await,
        Outcome::Reset(reset) => return reset_through_chain(run, reset),
    }

    let Some(endpoint) = routing::pick_endpoint_here(target.port) else {
        return local_reply_through_chain(run, no_endpoint(target.service)).await;
    };
    facts.upstream_host = Some(endpoint);
    // A head a plugin changed goes upstream as the plugins left it; an unchanged one (still
    // unconverted, or converted and left alone) as the client sent it, instead of parsing
    // every name and copying every value back.
    let edited = if run.stream.request_headers.is_modified() {
        match wasm_to_request(&run.stream.request_headers) {
            Ok(edited) => Some(edited),
            Err(reply) => return local_reply_through_chain(run, reply).await,
        }
    } else {
        None
    };
    let limit = settings.max_buffered_body;
    let wait = settings.trailer_wait;
    let forwarded = if request_eos || !run.wants_stream(Dir::Request) {
        let upstream = edited
            .as_ref()
            .unwrap_or(&head)
            .outgoing(None)
            .encode(endpoint, &body);
        match run
            .while_waiting(std::pin::pin!(forward(endpoint, upstream, body)))
            .await
        {
            Ok(r) => r,
            Err(halt) => return halt_through_chain(run, halt).await,
        }
    } else {
        // The body goes upstream chunk by chunk as the request plugins let it through.
        let (tx, rx) = mpsc::channel(stream::CHANNEL_FRAMES);
        let upstream_body = ChannelBody::new(rx).boxed();
        // The upstream is HTTP/1.1: a body that may end with trailers makes the head wait
        // briefly for their names (stream.rs).
        let (head_tx, head_rx) = if body.size_hint().exact().is_none() {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        let head = head.clone();
        let send = async move {
            let trailer = match head_rx {
                Some(rx) => rx.await.ok().flatten(),
                None => None,
            };
            let upstream = edited
                .as_ref()
                .unwrap_or(&head)
                .outgoing(trailer)
                .encode(endpoint, &upstream_body);
            forward(endpoint, upstream, upstream_body).await
        };
        tokio::pin!(send);
        let mut forwarded = None;
        let pumped = {
            let pump = stream::pump(&mut run, Dir::Request, body, tx, limit, head_tx, wait);
            tokio::pin!(pump);
            loop {
                tokio::select! {
                    r = &mut pump => break r,
                    r = &mut send, if forwarded.is_none() => forwarded = Some(r),
                }
            }
        };
        // The request body has ended: the chain's contexts still get their events while the
        // upstream answers. A failed pump ends the request: the upstream exchange is dropped.
        if pumped.is_ok() && forwarded.is_none() {
            match run.while_waiting(send.as_mut()).await {
                Ok(r) => forwarded = Some(r),
                Err(halt) => return halt_through_chain(run, halt).await,
            }
        }
        match pumped {
            Err(PumpError::Local(reply)) => {
                return local_reply_through_chain(run, reply).await;
            }
            Err(PumpError::Reset(reset)) => return reset_through_chain(run, reset),
            Err(PumpError::Body(err)) => {
                tracing::debug!(error = %err, "request body failed");
                let reply = LocalReply::text(
                    400,
                    "downstream_body_error",
                    "could not read the request body\n",
                );
                return local_reply_through_chain(run, reply).await;
            }
            _ => {}
        }
        match forwarded {
            Some(r) => r,
            None => Err(LocalReply::text(
                503,
                "upstream_reset",
                "upstream request ended early\n",
            )),
        }
    };
    let response = match forwarded {
        Ok(r) => r,
        Err(reply) => return local_reply_through_chain(run, reply).await,
    };

    let (mut rparts, rbody) = response.into_parts();
    run.stream.properties.response_code = Some(rparts.status.as_u16());
    // The plugins get the upstream's head unconverted: it is converted only if one of them
    // looks at it, up to the last callback (`proxy_on_log`), and handed back after that.
    let head = Arc::new(UpstreamHead {
        status: rparts.status,
        count: 1 + rparts.headers.len() - rbody.head_hop_by_hop(),
        headers: std::mem::take(&mut rparts.headers),
    });
    run.stream.response_source = Some(head.clone());
    let response_eos = rbody.is_end_stream();
    match run.response_headers(response_eos).await {
        Outcome::Continue => {}
        Outcome::Respond(reply) => {
            run.finish();
            return reply_response(reply);
        }
        Outcome::Reset(reset) => return reset_through_chain(run, reset),
    }
    // As for the request: an unchanged head goes out as the upstream sent it.
    let response_head = |run: &mut ChainRun, mut rparts: http::response::Parts, body: Body| {
        rparts.headers = UpstreamHead::take_back(run, head);
        if run.stream.response_headers.is_modified() {
            wasm_to_response(&run.stream.response_headers, body)
        } else {
            Response::from_parts(rparts, body)
        }
    };
    // Callouts and gRPC streams in flight keep the chain until the body ends, so their
    // events still reach the plugins (Envoy cancels them only when the stream ends).
    if response_eos || !(run.wants_stream(Dir::Response) || run.has_callouts()) {
        run.finish();
        return response_head(&mut run, rparts, rbody.map_err(BoxError::from).boxed());
    }
    // A small response usually arrives whole with its head. Then its body goes through the
    // body callbacks here and leaves with the head in one write, instead of the head first
    // and the body from a task through a channel (two writes, two wake-ups).
    let mut rbody = rbody;
    let mut first = None;
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(&mut rbody).poll_frame(&mut cx) {
        std::task::Poll::Pending => {}
        std::task::Poll::Ready(Some(Ok(frame))) if !(frame.is_data() && rbody.is_end_stream()) => {
            first = Some(frame);
        }
        std::task::Poll::Ready(Some(Err(_))) => {
            run.finish();
            return reply_response(LocalReply::text(
                502,
                "upstream_body_error",
                "upstream response body failed\n",
            ));
        }
        std::task::Poll::Ready(whole) => {
            let data = whole
                .and_then(|f| f.ok())
                .and_then(|f| f.into_data().ok())
                .unwrap_or_default();
            let len = data.len();
            let out = match run
                .body_chunk(Dir::Response, data.to_vec(), true, limit)
                .await
            {
                Ok(out) => out,
                Err(Halt::Reply(reply)) => {
                    run.finish();
                    return reply_response(reply);
                }
                Err(Halt::Reset(reset)) => return reset_through_chain(run, reset),
            };
            let changed = out.len() != len;
            let out_len = out.len();
            run.finish_after_body();
            let mut response = response_head(&mut run, rparts, full(out));
            if changed
                && response
                    .headers()
                    .contains_key(http::header::CONTENT_LENGTH)
            {
                response
                    .headers_mut()
                    .insert(http::header::CONTENT_LENGTH, HeaderValue::from(out_len));
            }
            return response;
        }
    }
    let rbody = stream::Prepend::new(first, rbody);
    let declare = client_takes_trailers
        && version != http::Version::HTTP_2
        && !rparts.headers.contains_key(http::header::CONTENT_LENGTH);
    // The response headers leave now; the body follows chunk by chunk through the response
    // plugins, on a task of this worker that owns the chain until the body ends.
    let (tx, rx) = mpsc::channel(stream::CHANNEL_FRAMES);
    // The body callbacks and the last ones run after the head has left: they see it converted.
    run.stream.convert_response_headers();
    let mut response = response_head(&mut run, rparts, ChannelBody::new(rx).boxed());
    let (head_tx, head_rx) = if declare {
        let (t, r) = oneshot::channel();
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    tokio::task::spawn_local(async move {
        let mut run = run;
        let result = stream::pump(
            &mut run,
            Dir::Response,
            rbody,
            tx.clone(),
            limit,
            head_tx,
            wait,
        )
        .await;
        let err: Option<BoxError> = match result {
            Ok(()) => None,
            // The headers have left: like Envoy, the stream is reset.
            Err(PumpError::Local(reply)) => {
                tracing::debug!(status = reply.status, details = %reply.details, "response ended by the chain after its headers");
                Some(reply.details.into())
            }
            Err(PumpError::Reset(reset)) => Some(reset.into()),
            Err(PumpError::Body(err)) => Some(err),
        };
        if let Some(err) = err {
            let _ = tx.send(Err(err)).await;
        }
        run.finish();
    });
    if let Some(rx) = head_rx
        && let Ok(Some(names)) = rx.await
    {
        response.headers_mut().insert(http::header::TRAILER, names);
    }
    response
}

/// A local reply still passes the response callbacks of the plugins that saw the request.
async fn local_reply_through_chain(mut run: ChainRun, reply: LocalReply) -> Response<Body> {
    if run.is_empty() {
        return reply_response(reply);
    }
    run.stream.properties.response_code = Some(reply.status);
    let mut headers = WasmHeaders::default();
    headers.add(":status", reply.status.to_string().as_bytes());
    for (k, v) in &reply.headers {
        headers.add(&k.to_ascii_lowercase(), v.clone());
    }
    headers.add("content-length", reply.body.len().to_string().as_bytes());
    run.stream.response_headers = headers;
    run.stream.response_source = None;
    let eos = reply.body.is_empty();
    let response = match run.response_headers(eos).await {
        Outcome::Respond(again) => reply_response(again),
        Outcome::Reset(reset) => return reset_through_chain(run, reset),
        Outcome::Continue => {
            let mut r = wasm_to_response(&run.stream.response_headers, full(reply.body));
            r.extensions_mut().insert(LocalDetails(reply.details));
            r
        }
    };
    run.finish();
    response
}

async fn halt_through_chain(run: ChainRun, halt: Halt) -> Response<Body> {
    match halt {
        Halt::Reply(reply) => local_reply_through_chain(run, reply).await,
        Halt::Reset(reset) => reset_through_chain(run, reset),
    }
}

/// A plugin closed the stream: the chain ends and the listener resets the stream instead of
/// answering it ([`into_service_result`]).
fn reset_through_chain(mut run: ChainRun, reset: StreamReset) -> Response<Body> {
    tracing::debug!(plugin = %reset.plugin, "stream reset by a plugin");
    run.finish();
    let mut response = Response::new(full(Vec::new()));
    response
        .extensions_mut()
        .insert(LocalDetails(StreamReset::DETAILS.to_string()));
    response.extensions_mut().insert(reset);
    response
}

/// What a listener's service returns for a handled request: the response, or an error for a
/// stream a plugin reset (hyper then closes an HTTP/1.1 connection without a response, or
/// sends RST_STREAM on h2, as Envoy's `resetStream()`).
pub fn into_service_result(mut response: Response<Body>) -> Result<Response<Body>, StreamReset> {
    match response.extensions_mut().remove::<StreamReset>() {
        Some(reset) => Err(reset),
        None => Ok(response),
    }
}

fn no_endpoint(service: &ServiceConfig) -> LocalReply {
    LocalReply::text(
        503,
        "no_healthy_upstream",
        format!("no healthy upstream for {}\n", service.key),
    )
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never| match never {})
        .boxed()
}

pub fn reply_response(reply: LocalReply) -> Response<Body> {
    tracing::debug!(status = reply.status, details = %reply.details, "local reply");
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    for (k, v) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            builder = builder.header(name, value);
        }
    }
    let mut response = builder.body(full(reply.body)).unwrap_or_else(|_| {
        let mut r = Response::new(full(Vec::new()));
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    });
    response
        .extensions_mut()
        .insert(LocalDetails(reply.details));
    response
}

fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// The route's name in logs, spans and the `route_name` property: `namespace/name/rule`.
fn route_name(route: &waystone_model::snapshot::RouteConfig) -> String {
    format!("{}/{}", route.route, route.rule_index)
}

thread_local! {
    /// Names derived from one snapshot's objects (cluster and route names), formatted once per
    /// worker and snapshot instead of on every request. Keyed by the object's address, which
    /// is stable and unique while the snapshot it belongs to is held here.
    static SNAPSHOT_NAMES: RefCell<SnapshotNames> = RefCell::default();
}

/// The snapshot the names belong to (held, so no address is reused), and the names.
type SnapshotNames = (Option<Arc<Snapshot>>, KeyMap<usize, Arc<str>>);

fn snapshot_name<T>(
    snapshot: &Arc<Snapshot>,
    object: &T,
    make: impl FnOnce() -> String,
) -> Arc<str> {
    SNAPSHOT_NAMES.with(|cache| {
        let mut cache = cache.borrow_mut();
        let (held, names) = &mut *cache;
        if !held.as_ref().is_some_and(|h| Arc::ptr_eq(h, snapshot)) {
            *held = Some(snapshot.clone());
            names.clear();
        }
        names
            .entry(object as *const T as usize)
            .or_insert_with(|| Arc::from(make()))
            .clone()
    })
}

fn ensure_request_id(headers: &mut http::HeaderMap) {
    // One hash of the name for the lookup and the insertion.
    let http::header::Entry::Vacant(slot) = headers.entry(&X_REQUEST_ID) else {
        return;
    };
    let n = next_request_number();
    let r: u64 = rand::random();
    let id = request_id_text(r, n);
    // Only hex digits and dashes: always a valid header value.
    if let Ok(v) = HeaderValue::from_bytes(&id) {
        slot.insert(v);
    }
}

/// How many request numbers a worker takes from [`REQUEST_IDS`] at a time.
const REQUEST_ID_BLOCK: u64 = 1 << 16;

thread_local! {
    /// This worker's next request number and the end of its block.
    static REQUEST_ID_RANGE: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A number no other request of this process gets. Workers take blocks of the process-wide
/// counter, so a request writes no cache line the other workers write too (an atomic add on
/// a shared counter for every request made the cores take that line from each other).
fn next_request_number() -> u64 {
    REQUEST_ID_RANGE.with(|range| {
        let (mut next, mut end) = range.get();
        if next == end {
            next = REQUEST_IDS.fetch_add(REQUEST_ID_BLOCK, Ordering::Relaxed);
            end = next + REQUEST_ID_BLOCK;
        }
        range.set((next + 1, end));
        next
    })
}

/// This worker's own copy of `shared` (the process's node id), so that handing it to each
/// request's plugins writes a reference count only this worker uses.
fn worker_copy(shared: &Arc<str>) -> Arc<str> {
    thread_local! {
        static COPY: RefCell<Option<(Arc<str>, Arc<str>)>> = const { RefCell::new(None) };
    }
    COPY.with(|c| {
        let mut c = c.borrow_mut();
        match &*c {
            Some((source, copy)) if Arc::ptr_eq(source, shared) => copy.clone(),
            _ => {
                let copy = Arc::<str>::from(&**shared);
                *c = Some((shared.clone(), copy.clone()));
                copy
            }
        }
    })
}

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");
/// Looked up by a constant name: a `&str` key is parsed and validated on every lookup.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// A UUID-shaped id (version 4, variant a) of 64 random bits and a 60-bit counter, written
/// by hand: `format!` costs several thousand instructions on every request.
fn request_id_text(r: u64, n: u64) -> [u8; 36] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut put = |at: usize, digits: usize, v: u64| {
        for i in 0..digits {
            out[at + i] = HEX[((v >> (4 * (digits - 1 - i))) & 0xf) as usize];
        }
    };
    put(0, 8, r >> 32);
    put(9, 4, (r >> 16) & 0xffff);
    put(14, 4, 0x4000 | (r & 0xfff));
    put(19, 4, 0xa000 | ((n >> 48) & 0xfff));
    put(24, 12, n & 0xffff_ffff_ffff);
    out
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// Whether `name` is hop-by-hop. Most names are ruled out by their length alone: this runs
/// for every header of every request and response.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    matches!(name.len(), 2 | 7 | 10 | 16 | 17) && HOP_BY_HOP.contains(&name)
}

/// A request's head as it came from the client, unconverted for the plugins
/// (`StreamData::request_source`): the pseudo-headers come from the request line and its
/// authority, the headers from the parsed map without `host` (folded into `:authority`, as
/// Envoy does) and without hop-by-hop ones (`te: trailers` excepted).
#[derive(Debug)]
struct RequestHead {
    method: http::Method,
    uri: http::Uri,
    authority: String,
    headers: http::HeaderMap,
    /// Entries of the converted map.
    count: usize,
}

impl RequestHead {
    /// Also says whether the client takes trailers (`te: trailers`), noted in the same pass.
    fn new(parts: http::request::Parts, authority: String) -> (Self, bool) {
        let (mut dropped, mut takes_trailers) = (0, false);
        for (name, value) in &parts.headers {
            takes_trailers |= is_te_trailers(name, value);
            dropped += usize::from(!shown_to_plugins(name, value));
        }
        let head = RequestHead {
            count: 4 + parts.headers.len() - dropped,
            method: parts.method,
            uri: parts.uri,
            authority,
            headers: parts.headers,
        };
        (head, takes_trailers)
    }

    /// The request as it goes upstream.
    fn outgoing(&self, trailer: Option<HeaderValue>) -> Outgoing<'_> {
        Outgoing {
            method: &self.method,
            target: request_target(&self.uri),
            headers: &self.headers,
            authority: &self.authority,
            trailer,
        }
    }
}

fn is_trailers(v: &[u8]) -> bool {
    v.eq_ignore_ascii_case(b"trailers")
}

/// `te: trailers`, the one hop-by-hop header Envoy forwards (an HTTP/1.1 upstream sends
/// trailers only to a client that asked for them).
pub(crate) fn is_te_trailers(name: &HeaderName, value: &HeaderValue) -> bool {
    name == http::header::TE && is_trailers(value.as_bytes())
}

/// Whether plugins see a request header: Envoy folds `host` into `:authority` and keeps no
/// hop-by-hop header but `te: trailers`.
fn shown_to_plugins(name: &HeaderName, value: &HeaderValue) -> bool {
    name != http::header::HOST && (!is_hop_by_hop(name.as_str()) || is_te_trailers(name, value))
}

impl HeaderSource for RequestHead {
    fn count(&self) -> usize {
        self.count
    }

    fn fill(&self, h: &mut WasmHeaders) {
        h.add_exact(":authority", &self.authority);
        h.add_exact(":path", request_target(&self.uri));
        h.add_exact(":method", self.method.as_str());
        h.add_exact(":scheme", self.uri.scheme_str().unwrap_or("http"));
        for (name, value) in &self.headers {
            if shown_to_plugins(name, value) {
                // hyper's names are lowercase already.
                h.add_exact(name.as_str(), value.as_bytes());
            }
        }
    }

    fn first_value(&self, name: &[u8], out: &mut Vec<u8>) -> Option<bool> {
        // Names are compared without regard to case, as the converted map compares them.
        let is = |a: &[u8], b: &[u8]| a.len() == b.len() && a.eq_ignore_ascii_case(b);
        let value: Option<&[u8]> = if name.first() == Some(&b':') {
            if is(name, b":path") {
                Some(request_target(&self.uri).as_bytes())
            } else if is(name, b":method") {
                Some(self.method.as_str().as_bytes())
            } else if is(name, b":authority") {
                Some(self.authority.as_bytes())
            } else if is(name, b":scheme") {
                Some(self.uri.scheme_str().unwrap_or("http").as_bytes())
            } else {
                None
            }
        } else if is(name, b"te") {
            self.headers
                .get_all(http::header::TE)
                .iter()
                .map(HeaderValue::as_bytes)
                .find(|v| is_trailers(v))
        } else if is(name, b"host") || HOP_BY_HOP.iter().any(|h| is(name, h.as_bytes())) {
            None
        } else {
            // A walk over the few names beats parsing and hashing the key for the map's
            // index; the first match is the first value (the map yields a name's values
            // together, where the name first came).
            self.headers
                .iter()
                .find(|(k, _)| is(k.as_str().as_bytes(), name))
                .map(|(_, v)| v.as_bytes())
        };
        if let Some(v) = value {
            out.extend_from_slice(v);
        }
        Some(value.is_some())
    }
}

/// The head a plugin changed, as it goes upstream (never handed back to the plugins, so it
/// has no count).
fn wasm_to_request(h: &WasmHeaders) -> Result<RequestHead, LocalReply> {
    let bad = |what: &str| {
        LocalReply::text(
            500,
            "wasm_bad_headers",
            format!("plugin left an invalid {what}\n"),
        )
    };
    let method = h
        .get(":method")
        .and_then(|m| http::Method::from_bytes(m).ok())
        .ok_or_else(|| bad(":method"))?;
    let path = h
        .get(":path")
        .and_then(|p| std::str::from_utf8(p).ok())
        .ok_or_else(|| bad(":path"))?;
    let authority = h
        .get(":authority")
        .and_then(|a| std::str::from_utf8(a).ok())
        .unwrap_or("")
        .to_string();
    let mut headers = http::HeaderMap::new();
    for (k, v) in h.iter() {
        if k.starts_with(':') {
            continue;
        }
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                tracing::warn!(header = %k, "dropping a header a plugin set with an invalid name or value")
            }
        }
    }
    Ok(RequestHead {
        method,
        uri: path_uri(path),
        authority,
        headers,
        count: 0,
    })
}

/// The upstream's response head while the response plugins run: what they see as the
/// response headers (`:status` first, hop-by-hop headers left out), converted only if one of
/// them looks.
#[derive(Debug)]
struct UpstreamHead {
    status: StatusCode,
    /// What the plugins are told: `:status` and the entries whose names are not hop-by-hop
    /// (counted by the upstream parser).
    count: usize,
    headers: http::HeaderMap,
}

impl HeaderSource for UpstreamHead {
    fn count(&self) -> usize {
        self.count
    }

    fn fill(&self, into: &mut WasmHeaders) {
        into.add_exact(":status", self.status.as_str());
        for (name, value) in &self.headers {
            if is_hop_by_hop(name.as_str()) {
                continue;
            }
            into.add_exact(name.as_str(), value.as_bytes());
        }
    }
}

impl UpstreamHead {
    /// The headers back from the run, which no longer offers them to its plugins (converted,
    /// they stay in its stream).
    fn take_back(run: &mut ChainRun, head: Arc<UpstreamHead>) -> http::HeaderMap {
        run.stream.response_source = None;
        match Arc::try_unwrap(head) {
            Ok(head) => head.headers,
            Err(shared) => shared.headers.clone(),
        }
    }
}

fn wasm_to_response(h: &WasmHeaders, body: Body) -> Response<Body> {
    let status = h
        .get(":status")
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    for (k, v) in h.iter() {
        if k.starts_with(':') {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// The origin-form target of `uri` (`/path?query`), as an absolute-form or authority-form
/// request is forwarded: its path and query, `/` when it has none.
fn request_target(uri: &http::Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// A plugin's `:path` as the upstream request target.
fn path_uri(path: &str) -> http::Uri {
    http::Uri::try_from(path).unwrap_or_else(|_| http::Uri::from_static("/"))
}

async fn forward(
    endpoint: SocketAddr,
    req: Encoded,
    body: Body,
) -> Result<Response<crate::upstream::UpstreamBody>, LocalReply> {
    crate::upstream::send(endpoint, req, body)
        .await
        .map_err(|err| {
            tracing::debug!(error = %err, "upstream request failed");
            LocalReply::text(
                503,
                "upstream_connect_error",
                format!("upstream connect error: {err}\n"),
            )
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::{
        HOP_BY_HOP, REQUEST_ID_BLOCK, X_REQUEST_ID, ensure_request_id, is_hop_by_hop,
        next_request_number, request_id_text, request_target, worker_copy,
    };

    #[test]
    fn a_request_without_an_id_gets_one_and_a_client_id_is_kept() {
        let mut headers = http::HeaderMap::new();
        ensure_request_id(&mut headers);
        let given = headers.get(&X_REQUEST_ID).expect("an id").to_str().unwrap();
        assert_eq!(given.len(), 36, "{given}");
        assert_eq!(&given[14..15], "4", "UUID version 4: {given}");
        ensure_request_id(&mut headers);
        let mut other = http::HeaderMap::new();
        ensure_request_id(&mut other);
        assert_ne!(other.get(&X_REQUEST_ID), headers.get(&X_REQUEST_ID));

        let mut client = http::HeaderMap::new();
        client.insert("x-request-id", "from-the-client".parse().unwrap());
        ensure_request_id(&mut client);
        let ids: Vec<_> = client.get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(ids, ["from-the-client"]);
        assert_eq!(headers.get_all(&X_REQUEST_ID).iter().count(), 1, "set once");
    }

    #[test]
    fn request_numbers_are_unique_across_workers_and_blocks() {
        // More than one block per thread, so each takes a second block while the others
        // take theirs.
        let per_thread = REQUEST_ID_BLOCK as usize + 10;
        let threads: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|_| next_request_number())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn worker_copy_is_a_separate_allocation_that_follows_its_source() {
        let a: Arc<str> = Arc::from("node-a");
        let copy = worker_copy(&a);
        assert_eq!(&*copy, "node-a");
        assert!(!Arc::ptr_eq(&copy, &a));
        assert!(Arc::ptr_eq(&copy, &worker_copy(&a)), "one copy per worker");
        let b: Arc<str> = Arc::from("node-b");
        assert_eq!(&*worker_copy(&b), "node-b");
    }

    #[test]
    fn an_unconverted_request_head_answers_as_its_converted_map_would() {
        use waystone_wasm::{HeaderMap as WasmHeaders, HeaderSource};
        let mut req = http::Request::builder()
            .method("POST")
            .uri("http://svc.example/a/b?c=d")
            .body(())
            .unwrap();
        for (n, v) in [
            ("host", "svc.example"),
            ("x-multi", "one"),
            ("connection", "keep-alive"),
            ("te", "gzip"),
            ("te", "Trailers"),
            ("authorization", "Basic dTpw"),
            ("x-multi", "two"),
            ("keep-alive", "timeout=5"),
            ("x-empty", ""),
        ] {
            req.headers_mut()
                .append(n, http::HeaderValue::from_static(v));
        }
        let (parts, ()) = req.into_parts();
        let (head, te_trailers) = super::RequestHead::new(parts, "svc.example:80".into());
        assert!(te_trailers);
        let mut map = WasmHeaders::default();
        head.fill(&mut map);
        assert_eq!(head.count(), map.len());
        assert_eq!(
            map.len(),
            9,
            "4 pseudo-headers, x-multi twice, te, authorization, x-empty"
        );
        for name in [
            ":authority",
            ":path",
            ":method",
            ":scheme",
            ":status",
            "host",
            "x-multi",
            "te",
            "connection",
            "keep-alive",
            "authorization",
            "x-empty",
            "x-missing",
            "bad name",
            // Names compare without regard to case, as in the converted map.
            "Authorization",
            "X-MULTI",
            ":Path",
            "Host",
            "Connection",
            "TE",
        ] {
            let mut got = Vec::new();
            let found = head.first_value(name.as_bytes(), &mut got);
            assert_eq!(found, Some(map.get(name).is_some()), "{name}");
            assert_eq!(got, map.get(name).unwrap_or_default(), "{name}");
        }
        assert_eq!(map.get(":path"), Some(&b"/a/b?c=d"[..]));
        assert_eq!(map.get("te"), Some(&b"Trailers"[..]));
    }

    #[test]
    fn the_upstream_gets_the_origin_form_of_any_request_target() {
        for (target, want) in [
            ("/a/b?c=d", "/a/b?c=d"),
            ("http://example.com:8080/a?b", "/a?b"),
            ("http://example.com", "/"),
            ("*", "*"),
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(request_target(&uri), want, "{target}");
        }
    }

    #[test]
    fn the_length_filter_lets_every_hop_by_hop_name_through() {
        for name in HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in [
            "host",
            "content-length",
            "connectio",
            "te2",
            "trailers",
            "x-upgrade",
        ] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4_shaped() {
        for (r, n) in [
            (0u64, 0u64),
            (u64::MAX, u64::MAX),
            (0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321),
        ] {
            let want = format!(
                "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                (r >> 32) as u32,
                (r >> 16) as u16,
                r & 0xfff,
                (n >> 48) & 0xfff,
                n & 0xffff_ffff_ffff
            );
            assert_eq!(std::str::from_utf8(&request_id_text(r, n)).unwrap(), want);
        }
    }
}
