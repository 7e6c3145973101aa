//! A stream's responses on their way to its HTTP/2 body: a bounded queue
//! with one sender (the stream's task) and one receiver (the body).
//!
//! Not tokio's `mpsc`: every stream has one, and tokio's allocates a 32-slot
//! block and cache-line-padded state up front, about 1 KB (heaptrack, 1,000
//! streams); this is a mutex around a `VecDeque` and two wakers, about 250
//! bytes once it has held its capacity.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

/// A queue that holds at most `capacity` items (at least one).
pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Mutex::new(State {
        queue: VecDeque::new(),
        capacity: capacity.max(1),
        receiver: None,
        sender: None,
        sender_gone: false,
        receiver_gone: false,
    }));
    (Sender { shared: shared.clone() }, Receiver { shared })
}

struct State<T> {
    queue: VecDeque<T>,
    capacity: usize,
    /// The receiver, waiting for an item.
    receiver: Option<Waker>,
    /// The sender, waiting for room.
    sender: Option<Waker>,
    sender_gone: bool,
    receiver_gone: bool,
}

fn lock<T>(shared: &Mutex<State<T>>) -> MutexGuard<'_, State<T>> {
    // (Every change under the lock is a single step: a poisoned state is still consistent.)
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// Queues `item` (the caller checked for room) and wakes a waiting receiver.
fn push<T>(mut state: MutexGuard<'_, State<T>>, item: T) {
    state.queue.push_back(item);
    let receiver = state.receiver.take();
    drop(state);
    wake(receiver);
}

/// Remembers `cx`'s waker in `slot` (not cloned again if it is the same).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Why [`Sender::try_send`] gave its item back.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    /// The receiver is gone.
    Closed(T),
}

pub struct Sender<T> {
    shared: Arc<Mutex<State<T>>>,
}

impl<T> Sender<T> {
    /// Queues `item` if there is room and a receiver.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let state = lock(&self.shared);
        if state.receiver_gone {
            return Err(TrySendError::Closed(item));
        }
        if state.queue.len() >= state.capacity {
            return Err(TrySendError::Full(item));
        }
        push(state, item);
        Ok(())
    }

    /// Queues `item` once there is room; gives it back if the receiver goes.
    pub async fn send(&self, item: T) -> Result<(), T> {
        let mut item = Some(item);
        std::future::poll_fn(|cx| {
            let it = item.take().expect("not polled after it completed");
            let mut state = lock(&self.shared);
            if state.receiver_gone {
                return Poll::Ready(Err(it));
            }
            if state.queue.len() >= state.capacity {
                register(&mut state.sender, cx);
                item = Some(it);
                return Poll::Pending;
            }
            push(state, it);
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Resolves once the receiver is gone (the stream's body dropped: the
    /// proxy went away), for a sender waiting on something else meanwhile.
    pub async fn closed(&self) {
        std::future::poll_fn(|cx| {
            let mut state = lock(&self.shared);
            if state.receiver_gone {
                return Poll::Ready(());
            }
            register(&mut state.sender, cx);
            Poll::Pending
        })
        .await
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.sender_gone = true;
        let receiver = state.receiver.take();
        // A send given up while it waited (a timeout) left its waker: not
        // kept, it would keep the stream's finished task allocated.
        let stale = state.sender.take();
        drop(state);
        drop(stale);
        wake(receiver);
    }
}

/// The items in the order sent; ends once the sender is gone and the queue is empty.
pub struct Receiver<T> {
    shared: Arc<Mutex<State<T>>>,
}

impl<T> futures::Stream for Receiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut state = lock(&self.shared);
        if let Some(item) = state.queue.pop_front() {
            let sender = state.sender.take();
            drop(state);
            wake(sender);
            return Poll::Ready(Some(item));
        }
        if state.sender_gone {
            return Poll::Ready(None);
        }
        register(&mut state.receiver, cx);
        Poll::Pending
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        let mut state = lock(&self.shared);
        state.receiver_gone = true;
        let queued = std::mem::take(&mut state.queue);
        let sender = state.sender.take();
        let stale = state.receiver.take();
        drop(state);
        drop((queued, stale));
        wake(sender);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_stream_ends_after_the_sender() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.send(2).await.unwrap();
        assert_eq!(tx.try_send(3), Err(TrySendError::Full(3)));
        drop(tx);
        assert_eq!(rx.next().await, Some(1));
        assert_eq!(rx.next().await, Some(2));
        assert_eq!(rx.next().await, None);
    }

    #[tokio::test]
    async fn a_full_queue_holds_the_sender_until_the_receiver_takes_one() {
        let (tx, mut rx) = channel(1);
        tx.try_send(1).unwrap();
        let sending = tokio::spawn(async move {
            tx.send(2).await.unwrap();
            tx
        });
        // The receiver waits for the sender's item and wakes it by taking one.
        assert_eq!(rx.next().await, Some(1));
        assert_eq!(rx.next().await, Some(2));
        let tx = sending.await.unwrap();
        drop(tx);
        assert_eq!(rx.next().await, None);
    }

    #[tokio::test]
    async fn a_gone_receiver_closes_the_queue_and_frees_a_waiting_sender() {
        let (tx, rx) = channel(1);
        tx.try_send(1).unwrap();
        let sending = tokio::spawn(async move { (tx.send(2).await, tx) });
        tokio::task::yield_now().await;
        drop(rx);
        let (sent, tx) = sending.await.unwrap();
        assert_eq!(sent, Err(2));
        assert_eq!(tx.try_send(3), Err(TrySendError::Closed(3)));
    }

    #[tokio::test]
    async fn a_send_given_up_leaves_no_waker_behind_the_gone_sender() {
        let (tx, _rx) = channel(1);
        tx.try_send(1).unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(1), tx.send(2)).await;
        assert!(waited.is_err(), "the queue is full");
        let shared = tx.shared.clone();
        assert!(lock(&shared).sender.is_some());
        drop(tx);
        assert!(lock(&shared).sender.is_none());
    }

    #[tokio::test]
    async fn closed_resolves_when_the_receiver_goes_and_not_before() {
        let (tx, mut rx) = channel::<u32>(2);
        tx.try_send(1).unwrap();
        let waiting = tokio::spawn(async move {
            tx.closed().await;
            tx
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // Taking an item wakes the sender (a wake, not a close).
        assert_eq!(rx.next().await, Some(1));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(rx);
        let tx = waiting.await.unwrap();
        assert_eq!(tx.try_send(2), Err(TrySendError::Closed(2)));
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send() {
        let (tx, mut rx) = channel::<u32>(4);
        let receiving = tokio::spawn(async move { rx.next().await });
        tokio::task::yield_now().await;
        tx.try_send(7).unwrap();
        assert_eq!(receiving.await.unwrap(), Some(7));
    }
}
