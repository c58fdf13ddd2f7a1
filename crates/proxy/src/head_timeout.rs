//! How long an HTTP/1.1 client may take to send a request head once its connection is idle
//! (no request in flight): 30 s by default, as hyper's `header_read_timeout` and nginx's
//! `client_header_timeout` bound it, so a client that trickles a head byte by byte
//! (slowloris) or parks an idle keep-alive connection does not hold a connection forever.
//!
//! hyper's own timer does this by arming a boxed `Sleep` on the worker's timer wheel for every
//! request head and dropping it when the head is complete: about 1,700 instructions and a
//! clock read a request (callgrind, `release` build: 34.73k to 33.07k instructions a request
//! without it). Here a request pays a few `Cell` writes instead: each connection has a
//! [`HeadWatch`], the worker's heartbeat ([`sweep`], once a second) reads the clock and closes
//! the connections that have been idle for the timeout, and the socket wrapper ([`WatchedIo`])
//! turns that into a read error, which ends the connection as hyper's timer did.
//!
//! A connection is idle from its accept, and from the end of each response (the response body
//! dropped by hyper, written or not) while no other request is in flight. Reading bytes does
//! not make it busy: a head that never completes still times out. HTTP/2 connections (prior
//! knowledge, their first bytes the h2 preface) are not watched, as hyper's timer only applied
//! to HTTP/1.1.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::handler::{Body, BoxError};

/// The default time to send a request head on an idle connection.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// How often [`sweep`] runs (the worker's heartbeat).
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

thread_local! {
    /// When this worker's clock started (its first sweep).
    static EPOCH: Cell<Option<Instant>> = const { Cell::new(None) };
    /// This worker's watched connections.
    static WATCHED: RefCell<Vec<Rc<HeadWatch>>> = const { RefCell::new(Vec::new()) };
}

/// One connection's state for the head timeout.
pub struct HeadWatch {
    timeout_ms: u64,
    in_flight: Cell<u32>,
    /// When the connection went idle, as of the first sweep after it did (see [`sweep_at`]).
    idle_since_ms: Cell<u64>,
    /// It went idle since the last sweep, which has not set `idle_since_ms` yet.
    went_idle: Cell<bool>,
    /// HTTP/2: not watched.
    exempt: Cell<bool>,
    /// Set by [`sweep`]: the next read fails.
    expired: Cell<bool>,
    /// The connection task's waker, from its latest read that found nothing to read.
    waker: RefCell<Option<Waker>>,
    /// Where it is in `WATCHED`.
    slot: Cell<usize>,
}

impl HeadWatch {
    /// Watches a connection accepted now, on this worker, until the returned guard drops.
    pub fn register(timeout: Duration) -> Registered {
        let watch = Rc::new(HeadWatch {
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            in_flight: Cell::new(0),
            idle_since_ms: Cell::new(0),
            went_idle: Cell::new(true),
            exempt: Cell::new(false),
            expired: Cell::new(false),
            waker: RefCell::new(None),
            slot: Cell::new(0),
        });
        WATCHED.with(|w| {
            let mut w = w.borrow_mut();
            watch.slot.set(w.len());
            w.push(watch.clone());
        });
        Registered(watch)
    }

    /// A request has started: the connection is busy until the returned guard drops (kept in
    /// the response body, see [`WatchedBody`]).
    pub fn begin(self: &Rc<Self>) -> InFlight {
        self.in_flight.set(self.in_flight.get() + 1);
        InFlight(self.clone())
    }

    fn overdue(&self, now_ms: u64) -> bool {
        !self.exempt.get()
            && !self.expired.get()
            && self.in_flight.get() == 0
            && now_ms.saturating_sub(self.idle_since_ms.get()) >= self.timeout_ms
    }

    fn expire(&self) {
        self.expired.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    fn park(&self, waker: &Waker) {
        let mut slot = self.waker.borrow_mut();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }
}

/// Stops watching the connection when dropped (the connection has ended).
pub struct Registered(Rc<HeadWatch>);

impl Registered {
    pub fn watch(&self) -> &Rc<HeadWatch> {
        &self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let slot = self.0.slot.get();
        // `try_with`: a connection dropped while the thread's locals are torn down has nothing
        // left to leave.
        let _ = WATCHED.try_with(|w| {
            let mut w = w.borrow_mut();
            if w.get(slot).is_some_and(|x| Rc::ptr_eq(x, &self.0)) {
                w.swap_remove(slot);
                if let Some(moved) = w.get(slot) {
                    moved.slot.set(slot);
                }
            }
        });
        self.0.waker.borrow_mut().take();
    }
}

/// One request in flight on a watched connection.
pub struct InFlight(Rc<HeadWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let n = self.0.in_flight.get().saturating_sub(1);
        self.0.in_flight.set(n);
        if n == 0 {
            self.0.went_idle.set(true);
        }
    }
}

/// Advances this worker's clock and closes the connections that have been idle too long.
/// Runs on the worker's heartbeat, once every [`SWEEP_EVERY`].
pub fn sweep() {
    let epoch = EPOCH.get().unwrap_or_else(|| {
        let now = Instant::now();
        EPOCH.set(Some(now));
        now
    });
    sweep_at(u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX));
}

fn sweep_at(now_ms: u64) {
    WATCHED.with(|w| {
        for watch in w.borrow().iter() {
            // A connection that went idle since the last sweep is idle from now on: not before
            // the moment it went idle, however late this sweep runs, so idle times only ever
            // err long and a connection is never closed before the whole timeout. A request
            // reads no clock.
            if watch.went_idle.replace(false) {
                watch.idle_since_ms.set(now_ms);
            }
            if watch.overdue(now_ms) {
                watch.expire();
            }
        }
    });
}

/// The connection's socket, failing its next read once the connection has timed out.
pub struct WatchedIo<T> {
    io: T,
    watch: Rc<HeadWatch>,
    /// How many of the first bytes read matched [`H2_PREFACE_START`]; `None` once decided.
    preface: Option<usize>,
}

impl<T> WatchedIo<T> {
    pub fn new(io: T, watch: Rc<HeadWatch>) -> Self {
        WatchedIo {
            io,
            watch,
            preface: Some(0),
        }
    }

    /// Follows the connection's first bytes: HTTP/2 once all of [`H2_PREFACE_START`] has come
    /// (a prefix alone decides nothing, or a client could trickle "P" to be let off).
    fn note_first_bytes(&mut self, got: &[u8]) {
        let Some(matched) = self.preface else {
            return;
        };
        let want = &H2_PREFACE_START[matched..];
        let n = got.len().min(want.len());
        self.preface = if got[..n] != want[..n] {
            None
        } else if matched + n == H2_PREFACE_START.len() {
            self.watch.exempt.set(true);
            None
        } else {
            Some(matched + n)
        };
    }
}

/// The start of the HTTP/2 connection preface ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.watch.expired.get() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no complete request head in time on an idle connection",
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        match &r {
            Poll::Pending => this.watch.park(cx.waker()),
            Poll::Ready(Ok(())) if this.preface.is_some() => {
                this.note_first_bytes(&buf.filled()[before..]);
            }
            _ => {}
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until hyper is done with it.
pub struct WatchedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl WatchedBody {
    pub fn new(inner: Body, in_flight: InFlight) -> Self {
        WatchedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl HttpBody for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_whole_h2_preface_start_lets_a_connection_off_the_head_timeout() {
        let exempt_after = |reads: &[&[u8]]| {
            let registered = HeadWatch::register(HEAD_TIMEOUT);
            let mut io = WatchedIo::new((), registered.watch().clone());
            for r in reads {
                io.note_first_bytes(r);
            }
            registered.watch().exempt.get()
        };
        assert!(exempt_after(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]));
        assert!(exempt_after(&[b"P", b"RI * HT", b"TP/2.0\r\n"]));
        assert!(!exempt_after(&[b"P"]), "a prefix decides nothing");
        assert!(!exempt_after(&[b"PRI * HTTP/2"]));
        assert!(!exempt_after(&[b"P", b"OST / HTTP/1.1\r\n"]));
        assert!(!exempt_after(&[b"GET / HTTP/1.1\r\n", b"PRI * HTTP/2.0"]));
    }

    fn watched() -> usize {
        WATCHED.with(|w| w.borrow().len())
    }

    #[test]
    fn an_idle_connection_expires_after_the_timeout_and_a_busy_one_does_not() {
        let t0 = 1_000;
        sweep_at(t0);
        let timeout = 30_000;
        let idle = HeadWatch::register(Duration::from_millis(timeout));
        let busy = HeadWatch::register(Duration::from_millis(timeout));
        let h2 = HeadWatch::register(Duration::from_millis(timeout));
        h2.watch().exempt.set(true);
        let request = busy.watch().begin();
        assert_eq!(watched(), 3);
        // A late sweep (5 s after the last one): the connections that went idle in between
        // are idle from it, so the timeout counts from there and nothing closes early.
        sweep_at(t0 + 5_000);
        assert_eq!(idle.watch().idle_since_ms.get(), t0 + 5_000);
        sweep_at(t0 + 5_000 + timeout - 1);
        assert!(!idle.watch().expired.get(), "closed before the timeout");
        sweep_at(t0 + 5_000 + timeout);
        assert!(idle.watch().expired.get());
        assert!(!busy.watch().expired.get(), "a request is in flight");
        assert!(!h2.watch().expired.get(), "HTTP/2 is not watched");
        // The request ends: idle from the next sweep.
        drop(request);
        let ended = t0 + 5_000 + timeout;
        assert!(busy.watch().went_idle.get());
        sweep_at(ended + 1_000);
        sweep_at(ended + 1_000 + timeout - 1);
        assert!(!busy.watch().expired.get());
        sweep_at(ended + 1_000 + timeout);
        assert!(busy.watch().expired.get());
        // Unregistering keeps the others' slots right.
        drop(idle);
        assert_eq!(watched(), 2);
        drop(h2);
        drop(busy);
        assert_eq!(watched(), 0);
    }
}
