//! An unbounded channel between tasks of one worker thread.
//!
//! Every request with plugins owns two of these (actions aimed at its contexts, gRPC stream
//! events), and almost all of them never carry a message. `tokio::sync::mpsc` allocates an
//! `Arc` and a 32-slot block up front (several KiB for these message types); this one is a
//! single small `Rc` until the first message arrives.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Shared<T> {
    queue: RefCell<VecDeque<T>>,
    waker: Cell<Option<Waker>>,
    senders: Cell<usize>,
    receiver_alive: Cell<bool>,
}

pub struct Sender<T>(Rc<Shared<T>>);

pub struct Receiver<T>(Rc<Shared<T>>);

/// The receiver is gone: the message comes back.
#[derive(Debug)]
pub struct Closed<T>(pub T);

/// Nothing is queued; `closed` when no sender is left either.
#[derive(Debug, PartialEq, Eq)]
pub struct Empty {
    pub closed: bool,
}

pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Rc::new(Shared {
        queue: RefCell::new(VecDeque::new()),
        waker: Cell::new(None),
        senders: Cell::new(1),
        receiver_alive: Cell::new(true),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Sender<T> {
    pub fn send(&self, value: T) -> Result<(), Closed<T>> {
        if !self.0.receiver_alive.get() {
            return Err(Closed(value));
        }
        self.0.queue.borrow_mut().push_back(value);
        if let Some(w) = self.0.waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.senders.set(self.0.senders.get() + 1);
        Self(self.0.clone())
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let left = self.0.senders.get() - 1;
        self.0.senders.set(left);
        if left == 0
            && let Some(w) = self.0.waker.take()
        {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    pub fn try_recv(&mut self) -> Result<T, Empty> {
        self.0.queue.borrow_mut().pop_front().ok_or(Empty {
            closed: self.0.senders.get() == 0,
        })
    }

    /// The next message; `None` once every sender is gone and the queue is empty.
    ///
    /// Dropping the future before it is ready withdraws its waker: a `select!` that took
    /// another branch leaves nothing behind for a later send or sender drop to wake. (A stale
    /// waker here is the waiting task's own: waking it while it runs costs that task a whole
    /// extra poll, for a connection task one more pass through hyper's dispatcher.)
    pub fn recv(&mut self) -> Recv<'_, T> {
        Recv(self)
    }
}

/// The future of [`Receiver::recv`].
pub struct Recv<'a, T>(&'a mut Receiver<T>);

impl<T> Future for Recv<'_, T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let rx = &mut *self.get_mut().0;
        match rx.try_recv() {
            Ok(v) => Poll::Ready(Some(v)),
            Err(Empty { closed: true }) => Poll::Ready(None),
            Err(Empty { closed: false }) => {
                rx.0.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

impl<T> Drop for Recv<'_, T> {
    fn drop(&mut self) {
        self.0.0.waker.take();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.receiver_alive.set(false);
        self.0.queue.borrow_mut().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn delivers_in_order_and_ends_when_senders_are_gone() {
        let (tx, mut rx) = channel();
        let tx2 = tx.clone();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                let recv = tokio::task::spawn_local(async move {
                    let mut got = Vec::new();
                    while let Some(v) = rx.recv().await {
                        got.push(v);
                    }
                    got
                });
                tokio::task::yield_now().await;
                tx.send(1).unwrap();
                tokio::task::yield_now().await;
                tx2.send(2).unwrap();
                tx2.send(3).unwrap();
                drop(tx);
                drop(tx2);
                assert_eq!(recv.await.unwrap(), vec![1, 2, 3]);
            })
            .await;
    }

    #[test]
    fn a_dropped_recv_leaves_no_waker_behind() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let count = std::sync::Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let wakes = || count.0.load(std::sync::atomic::Ordering::SeqCst);

        let (tx, mut rx) = channel::<u8>();
        let tx2 = tx.clone();
        // Pending, then dropped (the other branch of a select! won): sends and sender drops
        // afterwards wake nobody.
        {
            let mut fut = std::pin::pin!(rx.recv());
            assert_eq!(fut.as_mut().poll(&mut cx), Poll::Pending);
        }
        tx.send(1).unwrap();
        drop(tx);
        assert_eq!(wakes(), 0);
        assert_eq!(rx.try_recv().unwrap(), 1);

        // While it waits, a send and the last sender's drop do wake it.
        {
            let mut fut = std::pin::pin!(rx.recv());
            assert_eq!(fut.as_mut().poll(&mut cx), Poll::Pending);
            tx2.send(2).unwrap();
            assert_eq!(wakes(), 1);
            assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(Some(2)));
        }
        let mut fut = std::pin::pin!(rx.recv());
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Pending);
        drop(tx2);
        assert_eq!(wakes(), 2);
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(None));
    }

    #[test]
    fn try_recv_says_empty_or_closed_and_send_fails_without_receiver() {
        let (tx, mut rx) = channel::<u8>();
        assert_eq!(rx.try_recv().unwrap_err(), Empty { closed: false });
        tx.send(7).unwrap();
        assert_eq!(rx.try_recv().unwrap(), 7);
        drop(tx);
        assert_eq!(rx.try_recv().unwrap_err(), Empty { closed: true });
        let (tx, rx) = channel::<u8>();
        drop(rx);
        assert_eq!(tx.send(9).unwrap_err().0, 9);
    }
}
