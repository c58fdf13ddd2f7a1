//! Bodies and trailers through a plugin chain frame by frame, as Envoy streams them: each data
//! frame reaches the body callbacks as it arrives (`end_of_stream` false until the last one,
//! and false on the last one when trailers follow), trailers reach the trailers callbacks, and
//! what the chain lets through is sent on at once through a bounded channel (backpressure: a
//! slow reader slows the writer). Only chains with a body or trailers callback come here; other
//! bodies pass untouched.
//!
//! HTTP/1.1 (hyper) writes trailers only when the message head declared their names in a
//! `trailer` header, and the head leaves before trailers are known. When a body of unknown
//! length may end with trailers, the head therefore waits briefly: until the body ends (the
//! trailers, as the plugins left them, are declared), or until the body stalls for
//! [`HEAD_STALL`] or more than [`HEAD_HOLD_BYTES`] would be held, whichever comes first; then
//! it leaves and the body streams. Trailers of a body that stalled before its end are
//! forwarded only if the sender declared them itself.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::{mpsc, oneshot};
use waystone_wasm::HeaderMap as WasmHeaders;

use crate::chain::{ChainRun, Dir, Halt, LocalReply, StreamReset};
use crate::handler::BoxError;

pub type FrameResult = Result<Frame<Bytes>, BoxError>;

/// Frames in flight between the chain and the side that reads them.
pub const CHANNEL_FRAMES: usize = 16;
/// How long a message head waits for more body while its trailers are not known yet (the
/// default of `DataPlaneConfig::trailer_wait`).
pub const HEAD_STALL: Duration = Duration::from_millis(20);
/// How much body a waiting head may hold back.
pub const HEAD_HOLD_BYTES: usize = 64 << 10;

/// The receiving end of a pump, as a body hyper can send.
pub struct ChannelBody {
    rx: mpsc::Receiver<FrameResult>,
}

impl ChannelBody {
    pub fn new(rx: mpsc::Receiver<FrameResult>) -> Self {
        Self { rx }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }

    /// The pump drops its sender as soon as it has sent the last frame (in the same poll of
    /// its task, on this worker), so an empty closed channel is the end. Saying so matters:
    /// hyper stops polling a body once a content-length is written, and the access log would
    /// otherwise take the drop for a client that went away (`DC`).
    fn is_end_stream(&self) -> bool {
        self.rx.is_closed() && self.rx.is_empty()
    }
}

/// A body whose first frame was already read (to see whether it came whole), put back.
pub struct Prepend<B> {
    first: Option<Frame<Bytes>>,
    inner: B,
}

impl<B> Prepend<B> {
    pub fn new(first: Option<Frame<Bytes>>, inner: B) -> Self {
        Self { first, inner }
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Prepend<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }
}

/// Why a pump stopped before the end of the body.
pub enum PumpError {
    /// A plugin answered the stream, or held more than the limit.
    Local(LocalReply),
    /// A plugin closed the stream.
    Reset(StreamReset),
    /// The body being read failed.
    Body(BoxError),
}

impl From<Halt> for PumpError {
    fn from(h: Halt) -> Self {
        match h {
            Halt::Reply(r) => PumpError::Local(r),
            Halt::Reset(r) => PumpError::Reset(r),
        }
    }
}

/// Tells the waiting message head which trailers it must declare (`None`: none known).
pub type HeadSignal = oneshot::Sender<Option<HeaderValue>>;

struct Sender {
    tx: mpsc::Sender<FrameResult>,
    /// Set while the head waits for the trailers' names.
    head: Option<HeadSignal>,
    held: usize,
    /// The reader went away: nothing more is sent (the pump still ends the chain's phase).
    closed: bool,
}

impl Sender {
    fn commit(&mut self, trailers: Option<HeaderValue>) {
        if let Some(head) = self.head.take() {
            let _ = head.send(trailers);
        }
    }

    async fn send(&mut self, frame: Frame<Bytes>) {
        if self.closed {
            return;
        }
        if self.head.is_some() {
            let size = frame.data_ref().map_or(0, Bytes::len);
            self.held += size;
            if self.held <= HEAD_HOLD_BYTES {
                match self.tx.try_send(Ok(frame)) {
                    Ok(()) => return,
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.closed = true;
                        return;
                    }
                    Err(mpsc::error::TrySendError::Full(item)) => {
                        self.commit(None);
                        self.closed = self.tx.send(item).await.is_err();
                        return;
                    }
                }
            }
            self.commit(None);
        }
        self.closed = self.tx.send(Ok(frame)).await.is_err();
    }
}

/// Runs `body` through the chain's `dir` phase into `tx`. `head`, when set, is told once which
/// trailer names the message head must declare (see the module docs). Returns when the body
/// ended (its trailers included) or failed, or a plugin ended the stream.
pub async fn pump<B>(
    run: &mut ChainRun,
    dir: Dir,
    mut body: B,
    tx: mpsc::Sender<FrameResult>,
    limit: usize,
    head: Option<HeadSignal>,
    head_stall: Duration,
) -> Result<(), PumpError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut out = Sender {
        tx,
        head,
        held: 0,
        closed: false,
    };
    loop {
        // Events of the chain's contexts (callout answers, gRPC stream messages, other
        // contexts' actions) are delivered as they come, between body callbacks: a plugin that
        // paused mid-body may resume it (the held data flows on) or end the stream.
        let stall = out.head.is_some();
        let read = async {
            if stall {
                tokio::time::timeout(head_stall, body.frame()).await.ok()
            } else {
                Some(body.frame().await)
            }
        };
        let frame = tokio::select! {
            biased;
            event = run.event() => {
                let data = run.on_event(dir, event, limit).await?;
                if !data.is_empty() {
                    out.send(Frame::data(Bytes::from(data))).await;
                }
                continue;
            }
            read = read => match read {
                Some(f) => f,
                None => {
                    out.commit(None);
                    continue;
                }
            },
        };
        let frame = match frame {
            None => {
                // The end arrived on its own (chunked HTTP/1.1, h2 END_STREAM on an empty
                // frame): the body callbacks get an empty last chunk, as in Envoy.
                let data = run.body_chunk(dir, Vec::new(), true, limit).await?;
                if !data.is_empty() {
                    out.send(Frame::data(Bytes::from(data))).await;
                }
                out.commit(None);
                return Ok(());
            }
            Some(Err(err)) => {
                out.commit(None);
                return Err(PumpError::Body(err.into()));
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                let data = run.body_chunk(dir, data.to_vec(), eos, limit).await?;
                if !data.is_empty() {
                    out.send(Frame::data(Bytes::from(data))).await;
                }
                if eos {
                    out.commit(None);
                    return Ok(());
                }
            }
            Err(frame) => {
                let Ok(trailers) = frame.into_trailers() else {
                    continue;
                };
                let (data, trailers) = run.trailers(dir, trailers_to_wasm(&trailers)).await?;
                if !data.is_empty() {
                    out.send(Frame::data(Bytes::from(data))).await;
                }
                let trailers = wasm_to_trailers(&trailers);
                out.commit(declared_names(&trailers));
                if !trailers.is_empty() {
                    out.send(Frame::trailers(trailers)).await;
                }
                return Ok(());
            }
        }
    }
}

pub fn trailers_to_wasm(t: &http::HeaderMap) -> WasmHeaders {
    let mut out = WasmHeaders::with_capacity(t.len(), 0);
    for (k, v) in t {
        out.add_exact(k.as_str(), v.as_bytes());
    }
    out
}

fn wasm_to_trailers(t: &WasmHeaders) -> http::HeaderMap {
    let mut out = http::HeaderMap::new();
    for (k, v) in t.iter() {
        match (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            (Ok(name), Ok(value)) => {
                out.append(name, value);
            }
            _ => {
                tracing::warn!(trailer = %k, "dropping a trailer a plugin set with an invalid name or value")
            }
        }
    }
    out
}

/// The `trailer` header value naming every trailer, in order, once each.
fn declared_names(t: &http::HeaderMap) -> Option<HeaderValue> {
    if t.is_empty() {
        return None;
    }
    let names: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
    HeaderValue::from_str(&names.join(", ")).ok()
}
