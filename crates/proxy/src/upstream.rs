//! The worker's HTTP/1.1 client to upstream endpoints: connections kept alive and reused, and
//! the exchange itself, written for a proxy's hot path.
//!
//! One pool per worker thread, keyed by endpoint address: requests of a worker never wait on
//! another thread's connections, and checking one out is a lookup by a small key.
//!
//! The exchange runs in the request's own task: the head (and a body that is already there)
//! goes out in one write, the response head is parsed from the same read buffer its body then
//! comes from, and the response body is read from the socket when the downstream side polls
//! it. hyper's client connection ran a task per connection and passed every request, response
//! and body chunk through channels between the two tasks: three extra task wake-ups and about
//! a third of the proxy's instructions per request (BENCHMARKS.md). Only a request body still
//! streaming when the response head arrives moves to a task of its own (an early answer, or
//! both bodies streaming at once); that connection is then not reused.
//!
//! Framing follows RFC 9112 as hyper's client did: a request body is sent with the client's
//! `Content-Length`, else chunked (its trailers only if the `Trailer` header names them), GET,
//! HEAD and CONNECT without a known length send none; a response body is delimited by
//! `Transfer-Encoding: chunked`, else `Content-Length`, else the connection's close, and HEAD
//! responses, 204 and 304 have none; 1xx responses before the final one are skipped.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use sync_wrapper::SyncWrapper;
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf};
use tokio_util::either::Either;

use crate::handler::{Body, BoxError, is_hop_by_hop, is_te_trailers};
use crate::hbone::client::{Upstream, connect_endpoint};
use crate::metrics::KeyMap;

/// Idle connections kept per endpoint and worker; more are closed when their response ends.
const MAX_IDLE_PER_ENDPOINT: usize = 512;
/// The largest response head (status line and headers) read from an upstream, as Envoy's
/// default `max_response_headers_kb` (60 KiB) rounded up.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Header fields in a response head or a chunked body's trailers (Envoy's and hyper's 100).
const MAX_RESPONSE_HEADERS: usize = 100;
/// How many of a response's header names (and of their bytes) a pooled connection remembers
/// for the next response.
const NAMES_REMEMBERED: usize = 32;
const NAME_BYTES_REMEMBERED: usize = 1024;
/// The longest chunk-size line (size, extensions) accepted in a chunked response body.
const MAX_CHUNK_LINE: usize = 4096;
/// Request body bytes queued for the socket before the body is polled for more.
const MAX_QUEUED: usize = 64 * 1024;

thread_local! {
    static IDLE: RefCell<KeyMap<SocketAddr, Vec<Conn>>> = RefCell::default();
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{0}")]
    Connect(#[from] crate::hbone::HboneError),
    #[error("connection to {endpoint}: {source}")]
    Io {
        endpoint: SocketAddr,
        source: std::io::Error,
    },
    #[error("{endpoint} closed the connection before the response head")]
    Closed { endpoint: SocketAddr },
    #[error("invalid response from {endpoint}: {reason}")]
    Protocol {
        endpoint: SocketAddr,
        reason: &'static str,
    },
    #[error("request body: {0}")]
    RequestBody(BoxError),
}

/// Why a response body ended before its framing said it would.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamBodyError {
    #[error("reading the response body: {0}")]
    Io(#[from] std::io::Error),
    #[error("the upstream closed the connection before the response body ended")]
    Closed,
    #[error("invalid chunked response body: {0}")]
    Chunked(&'static str),
}

/// One upstream connection and what was read from it but not consumed yet.
struct Conn {
    io: Upstream,
    rbuf: BytesMut,
    /// The names of the last response's headers, in order (see [`parse_head`]).
    names: NameMemo,
}

/// A response's header names as the upstream wrote them and as parsed, in order.
#[derive(Default)]
struct NameMemo {
    /// The names' bytes, one after another.
    raw: Vec<u8>,
    /// Where each name ends in `raw`, the name parsed, and whether it is hop-by-hop.
    names: Vec<(u32, HeaderName, bool)>,
}

impl NameMemo {
    /// The `i`th name of a response whose names before it were just looked up here: the
    /// name remembered if the previous response had exactly `raw` there, else `raw` parsed
    /// and remembered in place of the `i`th name and every name after it. With the name,
    /// whether it is hop-by-hop ([`is_hop_by_hop`]).
    fn name(&mut self, i: usize, raw: &[u8]) -> Result<(HeaderName, bool), &'static str> {
        // Where the names before `i` end: they matched or were just remembered.
        let start = match i {
            0 => Some(0),
            _ => self.names.get(i - 1).map(|e| e.0 as usize),
        };
        if let (Some(start), Some((end, name, hop))) = (start, self.names.get(i))
            && self.raw.get(start..*end as usize) == Some(raw)
        {
            return Ok((name.clone(), *hop));
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| "invalid header name")?;
        let hop = is_hop_by_hop(name.as_str());
        if let Some(start) = start
            && i < NAMES_REMEMBERED
            && start + raw.len() <= NAME_BYTES_REMEMBERED
        {
            self.names.truncate(i);
            self.raw.truncate(start);
            self.raw.extend_from_slice(raw);
            self.names.push((self.raw.len() as u32, name.clone(), hop));
        }
        Ok((name, hop))
    }
}

/// A request going upstream, borrowed: its head as the client (or the plugins) left it, and
/// what the proxy changes on the way, applied while the head is encoded. The head itself is
/// left as it was: nothing is removed from or added to the map, and a chain's later callbacks
/// can still read it.
///
/// The changes, as Envoy's router makes them: hop-by-hop headers are not forwarded, except
/// `te: trailers` (an HTTP/1.1 upstream sends trailers only to a client that asked for them);
/// `Host` says the request's authority (the endpoint's address when there is none) in place of
/// the first `Host` the client sent; `x-forwarded-proto: http` is added when absent.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The request target, origin form (`/path?query`; empty is sent as `/`).
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// The request's authority, for `Host`.
    pub authority: &'a str,
    /// A `Trailer` header to declare: the names of the trailers a streamed body may end with.
    pub trailer: Option<HeaderValue>,
}

/// A request head ready for the wire, and how its body is framed.
pub struct Encoded {
    head: Bytes,
    framing: ReqFraming,
    head_only: bool,
    /// The trailers a chunked body sends (those its `Trailer` header declares).
    trailer_names: Vec<HeaderName>,
}

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

impl Outgoing<'_> {
    /// Encodes the request line and headers in one pass over the head, deciding the body's
    /// framing as hyper's client does.
    pub fn encode(&self, endpoint: SocketAddr, body: &Body) -> Encoded {
        let headers = self.headers;
        // `Transfer-Encoding` is hop-by-hop: the body's framing is decided here.
        let (framing, skip_cl, add) = if body.is_end_stream() {
            (ReqFraming::Length(0), false, None)
        } else if let Some(len) = content_length(headers) {
            (ReqFraming::Length(len), false, None)
        } else if let Some(len) = body.size_hint().exact() {
            (ReqFraming::Length(len), true, Some(Added::Length(len)))
        } else if matches!(*self.method, Method::GET | Method::HEAD | Method::CONNECT) {
            // As hyper: these almost never have a body, so one of unknown length is not sent.
            (ReqFraming::Length(0), false, None)
        } else {
            (ReqFraming::Chunked, true, Some(Added::Chunked))
        };
        // No authority from the client (or not one a header can carry): the endpoint names
        // itself, as an HTTP client would.
        let host: std::borrow::Cow<'_, str> =
            if !self.authority.is_empty() && valid_value(self.authority.as_bytes()) {
                self.authority.into()
            } else {
                endpoint.to_string().into()
            };
        let host = host.as_bytes();
        let mut out = Vec::with_capacity(256 + headers.len() * 48);
        out.extend_from_slice(self.method.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(if self.target.is_empty() {
            b"/"
        } else {
            self.target.as_bytes()
        });
        out.extend_from_slice(b" HTTP/1.1\r\n");
        let (mut te_trailers, mut saw_host, mut saw_xfp) = (false, false, false);
        for (name, value) in headers {
            if is_hop_by_hop(name.as_str()) {
                te_trailers |= is_te_trailers(name, value);
                continue;
            }
            if name == http::header::HOST {
                // One Host, where the client's first one was.
                if !saw_host {
                    saw_host = true;
                    put_line(&mut out, b"host", host);
                }
                continue;
            }
            if skip_cl && name == http::header::CONTENT_LENGTH {
                continue;
            }
            saw_xfp |= *name == X_FORWARDED_PROTO;
            put_field(&mut out, name, value);
        }
        if te_trailers {
            out.extend_from_slice(b"te: trailers\r\n");
        }
        if !saw_host {
            put_line(&mut out, b"host", host);
        }
        if !saw_xfp {
            out.extend_from_slice(b"x-forwarded-proto: http\r\n");
        }
        let mut trailer_names = Vec::new();
        if let Some(trailer) = &self.trailer {
            put_line(&mut out, b"trailer", trailer.as_bytes());
            if framing == ReqFraming::Chunked {
                trailer_names = trailer
                    .to_str()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| HeaderName::from_bytes(s.trim().as_bytes()).ok())
                    .collect();
            }
        }
        match add {
            Some(Added::Chunked) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
            Some(Added::Length(len)) => {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(len.to_string().as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            None => {}
        }
        out.extend_from_slice(b"\r\n");
        Encoded {
            head: Bytes::from(out),
            framing,
            head_only: *self.method == Method::HEAD,
            trailer_names,
        }
    }
}

/// The bytes `HeaderValue::from_str` accepts: visible ASCII, space and tab.
fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
}

/// Sends an encoded request to `endpoint` on a pooled connection, or a new one. A request
/// without a body that fails on a reused connection before any byte of the answer (the
/// upstream closed it while it sat in the pool) is sent again on a new one.
pub async fn send(
    endpoint: SocketAddr,
    req: Encoded,
    body: Body,
) -> Result<Response<UpstreamBody>, UpstreamError> {
    let Encoded {
        head,
        framing,
        head_only,
        mut trailer_names,
    } = req;
    let mut body = (framing.sends_body()).then_some(body);
    loop {
        let (conn, reused) = match checkout(endpoint) {
            Some(conn) => (conn, true),
            None => {
                // Boxed: connecting (a TCP connect, or an HBONE tunnel's TLS handshake) is a
                // large future that keep-alive requests never poll; inline, every request's
                // future would carry and move its bytes.
                let io = Box::pin(connect_endpoint(endpoint, None)).await?;
                let rbuf = BytesMut::with_capacity(8 * 1024);
                let names = NameMemo::default();
                (Conn { io, rbuf, names }, false)
            }
        };
        // Only a request without a body is sent again: the trailer names went with the first.
        let replayable = reused && body.is_none();
        let writer = Writer::new(
            head.clone(),
            body.take(),
            &framing,
            std::mem::take(&mut trailer_names),
        );
        match exchange(endpoint, conn, writer, head_only).await {
            Ok(resp) => return Ok(resp),
            Err(Failure::BeforeAnswer(_)) if replayable => continue,
            Err(Failure::BeforeAnswer(e) | Failure::Other(e)) => return Err(e),
        }
    }
}

enum Failure {
    /// Nothing of a response arrived: a request that can be sent again may be.
    BeforeAnswer(UpstreamError),
    Other(UpstreamError),
}

/// How the request body is delimited on the wire.
#[derive(Clone, Copy, PartialEq, Debug)]
enum ReqFraming {
    Length(u64),
    Chunked,
}

impl ReqFraming {
    fn sends_body(&self) -> bool {
        *self != ReqFraming::Length(0)
    }
}

/// Writes a `name: value` line from bytes.
fn put_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes one `name: value` line of a head or of a chunked body's trailers.
fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    put_line(out, name.as_str().as_bytes(), value.as_bytes());
}

/// Whether the last transfer coding of `headers` is `chunked` (RFC 9112 §6.3).
fn ends_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

enum Added {
    Chunked,
    Length(u64),
}

/// The `Content-Length` of `headers` when every value (and every comma-separated item)
/// agrees; none when absent or inconsistent.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut found = None;
    for v in headers.get_all(http::header::CONTENT_LENGTH) {
        for item in v.as_bytes().split(|b| *b == b',') {
            let s = std::str::from_utf8(item.trim_ascii()).ok()?;
            let n: u64 = s.parse().ok()?;
            if found.is_some_and(|f| f != n) {
                return None;
            }
            found = Some(n);
        }
    }
    found
}

/// The request going out: queued bytes, then the body's frames as it yields them.
struct Writer {
    queue: VecDeque<Bytes>,
    queued: usize,
    body: Option<Body>,
    chunked: bool,
    /// Bytes of body still allowed by the declared `Content-Length`.
    remaining: u64,
    /// The trailer fields a chunked body may end with (named by the `Trailer` header).
    trailer_names: Vec<HeaderName>,
}

impl Writer {
    fn new(
        head: Bytes,
        body: Option<Body>,
        framing: &ReqFraming,
        trailer_names: Vec<HeaderName>,
    ) -> Self {
        let (chunked, remaining) = match *framing {
            ReqFraming::Chunked => (true, 0),
            ReqFraming::Length(n) => (false, n),
        };
        let mut queue = VecDeque::with_capacity(4);
        let queued = head.len();
        queue.push_back(head);
        Self {
            queue,
            queued,
            body,
            chunked,
            remaining,
            trailer_names,
        }
    }

    fn push(&mut self, b: Bytes) {
        self.queued += b.len();
        self.queue.push_back(b);
    }

    /// Takes what the body has ready into the queue (up to [`MAX_QUEUED`]).
    fn pull_body(&mut self, cx: &mut Context<'_>) -> Result<(), WriteError> {
        while self.queued < MAX_QUEUED {
            let Some(body) = self.body.as_mut() else {
                return Ok(());
            };
            let frame = match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(None) => {
                    self.end(None);
                    return Ok(());
                }
                Poll::Ready(Some(Err(e))) => return Err(WriteError::Body(e)),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    if !data.is_empty() {
                        if self.chunked {
                            self.push(Bytes::from(format!("{:x}\r\n", data.len())));
                            self.push(data);
                            self.push(Bytes::from_static(b"\r\n"));
                        } else {
                            // More than declared would corrupt the connection's framing.
                            let len = data.len() as u64;
                            if len > self.remaining {
                                return Err(WriteError::Body(
                                    "request body longer than its content-length".into(),
                                ));
                            }
                            self.remaining -= len;
                            self.push(data);
                        }
                    }
                    if self.body.as_ref().is_some_and(|b| b.is_end_stream()) {
                        self.end(None);
                    }
                }
                Err(frame) => self.end(frame.into_trailers().ok()),
            }
        }
        Ok(())
    }

    fn end(&mut self, trailers: Option<HeaderMap>) {
        self.body = None;
        if !self.chunked {
            return;
        }
        let mut last = b"0\r\n".to_vec();
        if let Some(trailers) = trailers {
            for (name, value) in &trailers {
                if self.trailer_names.contains(name) {
                    put_field(&mut last, name, value);
                }
            }
        }
        last.extend_from_slice(b"\r\n");
        self.push(Bytes::from(last));
    }

    fn done(&self) -> bool {
        self.queue.is_empty() && self.body.is_none()
    }

    /// Writes until everything is out (`Ready(Ok)`), or the socket or the body must wait.
    fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            self.pull_body(cx)?;
            if self.queue.is_empty() {
                ready!(Pin::new(&mut *io).poll_flush(cx))?;
                return if self.body.is_none() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            let n = {
                let mut slices = [IoSlice::new(&[]); 8];
                let mut k = 0;
                for (slot, b) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = IoSlice::new(b);
                    k += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
            };
            if n == 0 {
                return Poll::Ready(Err(WriteError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.queued -= n;
            let mut n = n;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if n >= front.len() {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
    }
}

/// Why writing the request stopped: the connection, or the request body itself.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("request body: {0}")]
    Body(BoxError),
}

/// A parsed response head, before its body.
struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    /// Which of the headers that decide framing and keep-alive are present, noted while
    /// parsing so that a response without them costs no lookups.
    has_transfer_encoding: bool,
    has_content_length: bool,
    has_connection: bool,
    /// How many of the entries have a hop-by-hop name.
    hop_by_hop: usize,
}

/// Writes the request and reads the response head; the body is left to [`UpstreamBody`].
async fn exchange(
    endpoint: SocketAddr,
    mut conn: Conn,
    mut writer: Writer,
    head_only: bool,
) -> Result<Response<UpstreamBody>, Failure> {
    let mut write_error = None;
    let mut answered = false;
    let head = std::future::poll_fn(|cx| {
        if write_error.is_none() && !writer.done() {
            match writer.poll_write(&mut conn.io, cx) {
                Poll::Ready(Err(WriteError::Body(e))) => {
                    return Poll::Ready(Err(Failure::Other(UpstreamError::RequestBody(e))));
                }
                // The upstream may have answered and closed its side: read what it said.
                Poll::Ready(Err(WriteError::Io(e))) => write_error = Some(e),
                _ => {}
            }
        }
        loop {
            if !conn.rbuf.is_empty() {
                answered = true;
                match parse_head(&mut conn.rbuf, &mut conn.names) {
                    // Upgrade is a hop-by-hop header the proxy does not forward.
                    Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Poll::Ready(Err(Failure::Other(UpstreamError::Protocol {
                            endpoint,
                            reason: "unrequested 101 Switching Protocols",
                        })));
                    }
                    Ok(Some(head)) if head.status.is_informational() => continue,
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) if conn.rbuf.len() >= MAX_RESPONSE_HEAD => {
                        return Poll::Ready(Err(Failure::Other(UpstreamError::Protocol {
                            endpoint,
                            reason: "response head too large",
                        })));
                    }
                    Ok(None) => {}
                    Err(reason) => {
                        return Poll::Ready(Err(Failure::Other(UpstreamError::Protocol {
                            endpoint,
                            reason,
                        })));
                    }
                }
            }
            let e = match ready!(read_buf(&mut conn.io, cx, &mut conn.rbuf, 8 * 1024)) {
                Ok(0) => match write_error.take() {
                    Some(source) => UpstreamError::Io { endpoint, source },
                    None => UpstreamError::Closed { endpoint },
                },
                Ok(_) => continue,
                Err(source) => UpstreamError::Io { endpoint, source },
            };
            return Poll::Ready(Err(if answered {
                Failure::Other(e)
            } else {
                Failure::BeforeAnswer(e)
            }));
        }
    })
    .await?;

    let framing = if head_only
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED
    {
        RespFraming::Done
    } else if head.has_transfer_encoding {
        if ends_chunked(&head.headers) {
            RespFraming::Chunked(Chunk::Size)
        } else {
            RespFraming::Close
        }
    } else if head.has_content_length {
        match content_length(&head.headers) {
            Some(n) => RespFraming::Length(n),
            None => {
                return Err(Failure::Other(UpstreamError::Protocol {
                    endpoint,
                    reason: "invalid content-length",
                }));
            }
        }
    } else {
        RespFraming::Close
    };
    let keep_alive = framing != RespFraming::Close
        && keeps_alive(head.version, &head.headers, head.has_connection);
    let (reader, writer_task, reusable) = if writer.done() && write_error.is_none() {
        (Either::Left(conn.io), None, keep_alive)
    } else if write_error.is_some() {
        (Either::Left(conn.io), None, false)
    } else {
        // The answer came before the request body ended: the body goes on from a task of this
        // worker while the response is read; the connection is closed after both.
        let (read, mut write) = tokio::io::split(conn.io);
        let task = tokio::task::spawn_local(async move {
            let res = std::future::poll_fn(|cx| writer.poll_write(&mut write, cx)).await;
            if let Err(e) = res {
                tracing::debug!(%endpoint, error = %e, "request body after the response head");
            }
        });
        (Either::Right(read), Some(task), false)
    };
    let mut body = UpstreamBody {
        reader: SyncWrapper::new(Some(reader)),
        rbuf: conn.rbuf,
        names: conn.names,
        framing,
        endpoint,
        reusable,
        writer: writer_task,
        head_hop_by_hop: head.hop_by_hop,
    };
    if body.framing == RespFraming::Done || body.framing == RespFraming::Length(0) {
        body.framing = RespFraming::Done;
        body.finish();
    }
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    Ok(response)
}

/// Whether the upstream keeps the connection open; `has_connection` false (no `Connection`
/// header, as noted while parsing) leaves the version's default without a lookup.
fn keeps_alive(version: Version, headers: &HeaderMap, has_connection: bool) -> bool {
    let has = |token: &[u8]| {
        has_connection
            && headers
                .get_all(http::header::CONNECTION)
                .iter()
                .flat_map(|v| v.as_bytes().split(|b| *b == b','))
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
    };
    match version {
        Version::HTTP_11 => !has(b"close"),
        _ => has(b"keep-alive"),
    }
}

/// Parses a complete response head at the start of `buf` and consumes it; `None` when more
/// bytes are needed. Header values are slices of the head's bytes, not copies.
///
/// `names` holds the previous response's header names on this connection: an upstream
/// answers with the same names in the same order response after response, so a name with
/// the same bytes as its predecessor is reused instead of validated, lowercased and looked
/// up again.
fn parse_head(buf: &mut BytesMut, names: &mut NameMemo) -> Result<Option<Head>, &'static str> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_RESPONSE_HEADERS];
    let (len, code, minor, count) = {
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err("too many response headers"),
            Err(_) => return Err("malformed response head"),
        };
        let base = buf.as_ptr() as usize;
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            *span = (
                name as u32,
                (name + h.name.len()) as u32,
                value as u32,
                (value + h.value.len()) as u32,
            );
        }
        (len, resp.code, resp.version, resp.headers.len())
    };
    let status = code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or("invalid status code")?;
    let version = if minor == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let bytes = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(count);
    let (mut te, mut cl, mut connection) = (false, false, false);
    let mut hop_by_hop = 0;
    for (i, &(n0, n1, v0, v1)) in spans[..count].iter().enumerate() {
        let (name, hop) = names.name(i, &bytes[n0 as usize..n1 as usize])?;
        hop_by_hop += usize::from(hop);
        te |= name == http::header::TRANSFER_ENCODING;
        cl |= name == http::header::CONTENT_LENGTH;
        connection |= name == http::header::CONNECTION;
        let value = HeaderValue::from_maybe_shared(bytes.slice(v0 as usize..v1 as usize))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        status,
        version,
        headers,
        has_transfer_encoding: te,
        has_content_length: cl,
        has_connection: connection,
        hop_by_hop,
    }))
}

/// Reads into `buf`'s spare capacity (at least `want` bytes of it).
fn read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<std::io::Result<usize>> {
    if buf.capacity() - buf.len() < want / 2 {
        buf.reserve(want);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), cx, buf)
}

/// How the response body is delimited, and where in it the reader is.
#[derive(Clone, Copy, PartialEq, Debug)]
enum RespFraming {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Chunk {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// The connection whole (it may go back to the pool), or its read half while the request
/// body is still written from the other.
type Reader = Either<Upstream, ReadHalf<Upstream>>;

/// A response body read straight from its upstream connection, which goes back to the pool
/// the moment the body's last byte is read.
pub struct UpstreamBody {
    /// Only touched through `&mut self`: the wrapper makes the body `Sync` (as `BoxBody`
    /// requires) although an HBONE stream is not.
    reader: SyncWrapper<Option<Reader>>,
    rbuf: BytesMut,
    names: NameMemo,
    framing: RespFraming,
    endpoint: SocketAddr,
    reusable: bool,
    /// The request body still being written (see [`exchange`]); stopped with the response.
    writer: Option<tokio::task::JoinHandle<()>>,
    /// How many entries of the response head have a hop-by-hop name.
    head_hop_by_hop: usize,
}

impl UpstreamBody {
    /// How many entries of the response head this body follows have a hop-by-hop name
    /// (counted while parsing, so the plugins' header count costs no pass over the names).
    pub fn head_hop_by_hop(&self) -> usize {
        self.head_hop_by_hop
    }

    /// The body has ended: the connection goes back to the pool if it can carry another
    /// exchange (keep-alive, the request fully written, nothing unexpected read).
    fn finish(&mut self) {
        self.framing = RespFraming::Done;
        if let Some(task) = self.writer.take() {
            task.abort();
        }
        if let Some(Either::Left(io)) = self.reader.get_mut().take()
            && self.reusable
            && self.rbuf.is_empty()
        {
            let rbuf = std::mem::take(&mut self.rbuf);
            let names = std::mem::take(&mut self.names);
            checkin(self.endpoint, Conn { io, rbuf, names });
        }
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<std::io::Result<usize>> {
        match self.reader.get_mut().as_mut() {
            Some(r) => read_buf(r, cx, &mut self.rbuf, want),
            None => Poll::Ready(Ok(0)),
        }
    }

    /// Reads more of a body whose framing says more is coming: the connection's end is an
    /// error here.
    fn poll_more(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<Result<(), UpstreamBodyError>> {
        Poll::Ready(match ready!(self.poll_fill(cx, want)) {
            Ok(0) => Err(UpstreamBodyError::Closed),
            Ok(_) => Ok(()),
            Err(e) => Err(e.into()),
        })
    }

    fn fail(
        &mut self,
        e: UpstreamBodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        self.reusable = false;
        self.finish();
        Poll::Ready(Some(Err(e)))
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(task) = self.writer.take() {
            task.abort();
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamBodyError>>> {
        let this = self.get_mut();
        loop {
            match this.framing {
                RespFraming::Done => return Poll::Ready(None),
                RespFraming::Length(remaining) => {
                    if this.rbuf.is_empty() {
                        let want = remaining.clamp(8 * 1024, 64 * 1024) as usize;
                        if let Err(e) = ready!(this.poll_more(cx, want)) {
                            return this.fail(e);
                        }
                    }
                    let take = remaining.min(this.rbuf.len() as u64);
                    let data = this.rbuf.split_to(take as usize).freeze();
                    let left = remaining - take;
                    if left == 0 {
                        this.finish();
                    } else {
                        this.framing = RespFraming::Length(left);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                RespFraming::Close => {
                    if this.rbuf.is_empty() {
                        match ready!(this.poll_fill(cx, 16 * 1024)) {
                            Ok(0) => {
                                this.finish();
                                return Poll::Ready(None);
                            }
                            Ok(_) => {}
                            Err(e) => return this.fail(e.into()),
                        }
                    }
                    let data = this.rbuf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                RespFraming::Chunked(state) => match chunk_step(state, &mut this.rbuf) {
                    Ok(Step::Data(data, next)) => {
                        this.framing = RespFraming::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Step::Next(next)) => this.framing = RespFraming::Chunked(next),
                    Ok(Step::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Ok(Step::NeedMore) => {
                        if let Err(e) = ready!(this.poll_more(cx, 16 * 1024)) {
                            return this.fail(e);
                        }
                    }
                    Err(reason) => return this.fail(UpstreamBodyError::Chunked(reason)),
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == RespFraming::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            RespFraming::Length(n) => SizeHint::with_exact(n),
            RespFraming::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

enum Step {
    Data(Bytes, Chunk),
    Next(Chunk),
    End(Option<HeaderMap>),
    NeedMore,
}

/// One step of the chunked decoder over what `buf` holds.
fn chunk_step(state: Chunk, buf: &mut BytesMut) -> Result<Step, &'static str> {
    match state {
        Chunk::Size => {
            let Some(eol) = find_crlf(buf) else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err("chunk-size line too long")
                } else {
                    Ok(Step::NeedMore)
                };
            };
            let line = &buf[..eol];
            let size = line
                .split(|b| *b == b';')
                .next()
                .unwrap_or_default()
                .trim_ascii();
            if size.is_empty() || size.len() > 16 {
                return Err("invalid chunk size");
            }
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or("invalid chunk size")?;
            buf.advance(eol + 2);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = left.min(buf.len() as u64);
            let data = buf.split_to(take as usize).freeze();
            let next = if take == left {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - take)
            };
            Ok(Step::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &buf[..2] != b"\r\n" {
                return Err("chunk data not followed by CRLF");
            }
            buf.advance(2);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut slots = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
            match httparse::parse_headers(buf, &mut slots) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for h in fields {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| "invalid trailer name")?;
                        let value = HeaderValue::from_bytes(h.value)
                            .map_err(|_| "invalid trailer value")?;
                        trailers.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() > MAX_RESPONSE_HEAD => {
                    Err("trailers too large")
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(_) => Err("malformed trailers"),
            }
        }
    }
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A pooled connection to `endpoint` that is still open. One the upstream closed (or that
/// has bytes nobody asked for) is dropped on the way.
fn checkout(endpoint: SocketAddr) -> Option<Conn> {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.get_mut(&endpoint)?;
        while let Some(mut conn) = list.pop() {
            // Readiness is cached by the runtime: an open, quiet connection answers Pending
            // without a system call.
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if read_buf(&mut conn.io, &mut cx, &mut conn.rbuf, 1024).is_pending() {
                return Some(conn);
            }
        }
        None
    })
}

fn checkin(endpoint: SocketAddr, conn: Conn) {
    IDLE.with(|idle| {
        let mut idle = idle.borrow_mut();
        let list = idle.entry(endpoint).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(conn);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>), &'static str> {
        let mut buf = BytesMut::from(wire);
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        loop {
            match chunk_step(state, &mut buf)? {
                Step::Data(d, next) => {
                    out.extend_from_slice(&d);
                    state = next;
                }
                Step::Next(next) => state = next,
                Step::End(t) => return Ok((out, t)),
                Step::NeedMore => return Err("needs more"),
            }
        }
    }

    fn body_of(bytes: &'static [u8]) -> Body {
        use http_body_util::BodyExt;
        http_body_util::Full::new(Bytes::from_static(bytes))
            .map_err(|never| match never {})
            .boxed()
    }

    fn empty_body() -> Body {
        use http_body_util::BodyExt;
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed()
    }

    /// A body whose length is not known up front (open while its sender lives).
    fn streamed_body() -> (tokio::sync::mpsc::Sender<crate::stream::FrameResult>, Body) {
        use http_body_util::BodyExt;
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (tx, crate::stream::ChannelBody::new(rx).boxed())
    }

    fn head_lines(e: &Encoded) -> Vec<String> {
        let text = std::str::from_utf8(&e.head).unwrap();
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
        text.trim_end().split("\r\n").map(str::to_string).collect()
    }

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    const ENDPOINT: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);

    #[test]
    fn the_encoded_head_makes_the_routers_changes_and_leaves_the_rest_in_order() {
        let headers = map(&[
            ("x-first", "1"),
            ("connection", "keep-alive, x-first"),
            ("host", "client.example"),
            ("te", "trailers"),
            ("x-multi", "a"),
            ("keep-alive", "timeout=5"),
            ("host", "second.example"),
            ("x-multi", "b"),
            ("upgrade", "websocket"),
            ("x-last", "z"),
        ]);
        let method = Method::GET;
        let out = Outgoing {
            method: &method,
            target: "/p?q=1",
            headers: &headers,
            authority: "svc.example:80",
            trailer: None,
        };
        let e = out.encode(ENDPOINT, &empty_body());
        assert_eq!(
            head_lines(&e),
            [
                "GET /p?q=1 HTTP/1.1",
                "x-first: 1",
                "host: svc.example:80",
                "x-multi: a",
                "x-multi: b",
                "x-last: z",
                "te: trailers",
                "x-forwarded-proto: http",
            ]
        );
        assert_eq!(e.framing, ReqFraming::Length(0));
        assert!(!e.head_only);
        // The head itself is untouched: a chain's later callbacks still read it.
        assert_eq!(headers.get_all("host").iter().count(), 2);
        assert!(headers.contains_key("connection"));
    }

    #[test]
    fn host_falls_back_to_the_endpoint_and_a_client_forwarded_proto_is_kept() {
        let headers = map(&[("x-forwarded-proto", "https"), ("te", "gzip")]);
        let method = Method::HEAD;
        for authority in ["", "bad\u{7f}host", "caf\u{e9}.example"] {
            let e = Outgoing {
                method: &method,
                target: "",
                headers: &headers,
                authority,
                trailer: None,
            }
            .encode(ENDPOINT, &empty_body());
            assert_eq!(
                head_lines(&e),
                [
                    "HEAD / HTTP/1.1",
                    "x-forwarded-proto: https",
                    "host: 127.0.0.1:8080"
                ],
                "{authority:?}"
            );
            assert!(e.head_only);
        }
    }

    #[test]
    fn the_body_framing_follows_the_length_the_client_or_the_body_gives() {
        let post = Method::POST;
        let encode = |headers: &HeaderMap, body: &Body, trailer: Option<HeaderValue>| {
            Outgoing {
                method: &post,
                target: "/",
                headers,
                authority: "a",
                trailer,
            }
            .encode(ENDPOINT, body)
        };
        // The client's Content-Length stands (and a Transfer-Encoding never goes upstream).
        let h = map(&[("content-length", "5"), ("transfer-encoding", "identity")]);
        let (_tx, streamed) = streamed_body();
        let e = encode(&h, &streamed, None);
        assert_eq!(e.framing, ReqFraming::Length(5));
        assert_eq!(
            head_lines(&e)[1..],
            ["content-length: 5", "host: a", "x-forwarded-proto: http"]
        );
        // No usable length from the client: the body's own, in place of theirs.
        let h = map(&[("content-length", "5"), ("content-length", "6")]);
        let e = encode(&h, &body_of(b"hello world"), None);
        assert_eq!(e.framing, ReqFraming::Length(11));
        assert_eq!(
            head_lines(&e)[1..],
            ["host: a", "x-forwarded-proto: http", "content-length: 11"]
        );
        // Unknown length: chunked, with the trailers its Trailer header declares.
        let e = encode(
            &HeaderMap::new(),
            &streamed,
            Some(HeaderValue::from_static("grpc-status, x-sum")),
        );
        assert_eq!(e.framing, ReqFraming::Chunked);
        assert_eq!(
            head_lines(&e)[1..],
            [
                "host: a",
                "x-forwarded-proto: http",
                "trailer: grpc-status, x-sum",
                "transfer-encoding: chunked"
            ]
        );
        assert_eq!(e.trailer_names, ["grpc-status", "x-sum"]);
        // A GET body of unknown length is not sent.
        let get = Method::GET;
        let e = Outgoing {
            method: &get,
            target: "/",
            headers: &HeaderMap::new(),
            authority: "a",
            trailer: None,
        }
        .encode(ENDPOINT, &streamed);
        assert_eq!(e.framing, ReqFraming::Length(0));
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, t) = decode(b"5;x=y\r\nhello\r\n1\r\n!\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello!");
        assert!(t.is_none());
        let (body, t) = decode(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-a: b\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        let t = t.unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-a"], "b");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        assert_eq!(decode(b"zz\r\n"), Err("invalid chunk size"));
        assert_eq!(
            decode(b"3\r\nabcX\r\n"),
            Err("chunk data not followed by CRLF")
        );
        assert_eq!(decode(b"\r\n"), Err("invalid chunk size"));
        assert_eq!(decode(b"11111111111111111\r\n"), Err("invalid chunk size"));
        assert_eq!(decode(b"3\r\nab"), Err("needs more"));
    }

    #[test]
    fn content_length_values_must_agree() {
        let mut h = HeaderMap::new();
        h.append("content-length", HeaderValue::from_static("5"));
        assert_eq!(content_length(&h), Some(5));
        h.append("content-length", HeaderValue::from_static("5, 5"));
        assert_eq!(content_length(&h), Some(5));
        h.append("content-length", HeaderValue::from_static("6"));
        assert_eq!(content_length(&h), None);
        let mut h = HeaderMap::new();
        h.append("content-length", HeaderValue::from_static("-1"));
        assert_eq!(content_length(&h), None);
    }

    #[test]
    fn response_heads_parse_and_skip_nothing_they_should_keep() {
        let mut buf = BytesMut::from(&b"HTTP/1.0 200 OK\r\nA: 1\r\na: 2\r\n\r\nbody"[..]);
        let mut names = NameMemo::default();
        let head = parse_head(&mut buf, &mut names).unwrap().unwrap();
        assert_eq!(head.status, 200);
        assert_eq!(head.version, Version::HTTP_10);
        assert_eq!(head.headers.get_all("a").iter().count(), 2);
        assert!(!head.has_content_length && !head.has_connection);
        assert_eq!(&buf[..], b"body");
        let mut partial = BytesMut::from(&b"HTTP/1.1 200 OK\r\nA: 1\r\n"[..]);
        assert!(parse_head(&mut partial, &mut names).unwrap().is_none());
        assert!(!keeps_alive(Version::HTTP_10, &HeaderMap::new(), true));
        let mut close = HeaderMap::new();
        close.insert("connection", HeaderValue::from_static("Keep-Alive, Close"));
        assert!(!keeps_alive(Version::HTTP_11, &close, true));
        assert!(keeps_alive(Version::HTTP_11, &HeaderMap::new(), true));
    }

    /// Names remembered from the previous response are reused only where they match, and
    /// whatever the next response carries is parsed and validated as if nothing were kept.
    #[test]
    fn remembered_header_names_never_change_what_is_parsed() {
        let mut names = NameMemo::default();
        let mut parse = |head: &str| {
            let mut buf = BytesMut::from(head.as_bytes());
            parse_head(&mut buf, &mut names).map(|h| h.unwrap())
        };
        let first =
            parse("HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-A: 1\r\nConnection: close\r\n\r\n")
                .unwrap();
        assert!(first.has_content_length && first.has_connection && !first.has_transfer_encoding);
        assert_eq!(first.hop_by_hop, 1, "connection");
        // Same names, other case, one changed and one added: every name is what parsing gives.
        let second = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nX-B: 2\r\nCONNECTION: close\r\nX-A: 3\r\n\r\n",
        )
        .unwrap();
        let got: Vec<_> = second
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-length", "0"),
                ("x-b", "2"),
                ("connection", "close"),
                ("x-a", "3")
            ]
        );
        // The same head again: every name is reused, and what is parsed is the same.
        let again = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nX-B: 2\r\nCONNECTION: close\r\nX-A: 3\r\n\r\n",
        )
        .unwrap();
        assert_eq!(again.headers, second.headers);
        assert!(again.has_content_length && again.has_connection);
        assert_eq!(
            (second.hop_by_hop, again.hop_by_hop),
            (1, 1),
            "parsed, then remembered"
        );
        // Fewer names, then a malformed head: refused as without a memo.
        let third = parse("HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert!(third.has_transfer_encoding && !third.has_content_length && !third.has_connection);
        assert_eq!(third.headers.len(), 1);
        assert_eq!(third.hop_by_hop, 1, "transfer-encoding");
        let many = parse(
            "HTTP/1.1 200 OK\r\nKeep-Alive: 5\r\nX-A: 1\r\nTrailer: x\r\nUpgrade: h2c\r\n\
             Proxy-Connection: close\r\nTE: trailers\r\nConnection: te\r\nServer: s\r\n\r\n",
        )
        .unwrap();
        assert_eq!(many.hop_by_hop, 6);
        assert!(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding\x01: chunked\r\n\r\n").is_err());
        // What is remembered: the last good head's names, as written.
        assert_eq!(names.names.len(), 8, "the last good head's names");
        assert_eq!(names.names[0].1, "keep-alive");
        assert_eq!(
            names.names.iter().filter(|n| n.2).count(),
            6,
            "remembered as hop-by-hop"
        );
    }

    #[test]
    fn a_name_memo_reuses_only_exact_bytes_at_the_same_place() {
        let mut memo = NameMemo::default();
        for raw in [&b"Server"[..], b"X-Custom", b"Date"] {
            memo.name(memo.names.len(), raw).unwrap();
        }
        assert_eq!(memo.raw, b"ServerX-CustomDate");
        // Same bytes at the same place: the remembered name, nothing rewritten.
        assert_eq!(
            memo.name(1, b"X-Custom").unwrap(),
            (HeaderName::from_static("x-custom"), false)
        );
        assert_eq!(memo.raw, b"ServerX-CustomDate");
        // Other bytes: parsed, and the memo from there on replaced.
        assert_eq!(
            memo.name(1, b"x-custom").unwrap(),
            (HeaderName::from_static("x-custom"), false)
        );
        assert_eq!(memo.raw, b"Serverx-custom");
        assert_eq!(memo.names.len(), 2);
        assert!(memo.name(2, b"bad name").is_err());
        assert_eq!(memo.names.len(), 2);
    }
}
