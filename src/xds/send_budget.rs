//! How many bytes of large responses are on their way to proxies at once.
//!
//! A fleet's sync is thousands of proxies each owed megabytes (clusters,
//! endpoints, virtual hosts). Handed to HTTP/2 all at once, every
//! connection's responses move a little at a time: every proxy is half
//! synced at once, each waits with its next request (a delta EDS
//! subscription names every cluster, ≈140 KB) half received in the
//! control plane's memory, and the kernel juggles ten thousand busy
//! sockets. With a budget, a large response ([`LARGE_RESPONSE_BYTES`] or
//! more) first takes its size in shares of [`SendBudget`] (at most a
//! quarter of the budget) before it is queued, and holds them until HTTP/2
//! asks for more after its last chunk, which it does once all but its send
//! buffer (hyper's 400 KiB) of the response is written. A stream that has
//! had a large response already (a proxy mid-sync, or a synced one a push
//! sends a large response) takes its share before any stream asking for
//! its first ([`Turn`]), each in the order they asked: proxies finish their
//! syncs one after another instead of all near the end (half of 10,000
//! synced by 17 s of 29, not 25). Small responses (an endpoint change, a
//! weight change's routes, replies) take none, though a stream's responses
//! keep their order: one queued behind a large one waits with it.
//!
//! A proxy that stops reading would hold its shares for as long as its
//! connection lives, so a share is let go after the hold limit whether or
//! not it was read (checked every quarter of the limit, so after 1 to 1.25
//! hold limits): a stalled proxy costs the others a quarter of the budget
//! for at most that long.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Responses this large or larger take a share of the budget.
pub const LARGE_RESPONSE_BYTES: usize = 64 * 1024;

/// How long a share is held at most.
pub const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// Whose turn comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// A stream that has had a large response already (a proxy mid-sync):
    /// before any new one, so proxies finish their syncs one after another
    /// instead of all of them at the end.
    Continuing = 0,
    /// A stream's first large response.
    First = 1,
}

/// A taken share; emptied when the share is let go overdue.
type ShareSlot = Mutex<Option<Grant>>;

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct SendBudget {
    inner: Arc<Budget>,
}

struct Budget {
    total: usize,
    queue: Mutex<Queue>,
    hold_limit: Duration,
    /// Shares taken, oldest first, to let go once overdue.
    held: Mutex<VecDeque<(Instant, Weak<ShareSlot>)>>,
    reaper: std::sync::Once,
    /// Shares let go because they were held too long.
    overdue: prometheus_client::metrics::counter::Counter,
}

struct Queue {
    available: usize,
    /// Who waits, by [`Turn`], each in the order they asked.
    waiting: [VecDeque<Waiter>; 2],
}

struct Waiter {
    bytes: usize,
    grant: oneshot::Sender<Grant>,
}

/// Bytes of the budget, given back when dropped.
struct Grant {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.give_back(self.bytes);
        }
    }
}

/// A large response's part of the budget; given back when dropped (or
/// when overdue, whichever is first).
pub struct SendShare {
    _grant: Arc<ShareSlot>,
}

impl SendBudget {
    /// A budget of `total_bytes` whose shares are held at most `hold_limit`.
    pub fn new(total_bytes: usize, hold_limit: Duration, overdue: prometheus_client::metrics::counter::Counter) -> SendBudget {
        let total = total_bytes.max(1);
        SendBudget {
            inner: Arc::new(Budget {
                total,
                queue: Mutex::new(Queue { available: total, waiting: [VecDeque::new(), VecDeque::new()] }),
                hold_limit,
                held: Mutex::new(VecDeque::new()),
                reaper: std::sync::Once::new(),
                overdue,
            }),
        }
    }

    /// Bytes no response holds now.
    pub fn available_bytes(&self) -> usize {
        self.inner.queue().available
    }

    /// Whether a response of `len` bytes must take a share.
    pub fn applies_to(len: usize) -> bool {
        len >= LARGE_RESPONSE_BYTES
    }

    /// The share a response of `len` bytes takes: its size, at most a quarter of the budget.
    fn share_of(&self, len: usize) -> usize {
        len.clamp(1, (self.inner.total / 4).max(1))
    }

    /// Waits until a response of `len` bytes's share is free and it is
    /// `turn`'s turn, and takes it.
    pub async fn share(&self, len: usize, turn: Turn) -> SendShare {
        let budget = &self.inner;
        budget.reaper.call_once(|| {
            tokio::spawn(release_overdue_shares(Arc::downgrade(&self.inner)));
        });
        let bytes = self.share_of(len);
        let waiting = {
            let mut queue = budget.queue();
            if !queue.must_wait(bytes, turn) {
                queue.available -= bytes;
                None
            } else {
                let (grant, granted) = oneshot::channel();
                queue.waiting[turn as usize].push_back(Waiter { bytes, grant });
                Some(granted)
            }
        };
        let grant = match waiting {
            None => Grant { budget: Some(budget.clone()), bytes },
            // (A wait given up drops the receiver: a grant sent to it comes
            // back to the queue, or is dropped with it, giving its bytes back.)
            Some(granted) => granted.await.expect("the budget outlives its waiters"),
        };
        let slot = Arc::new(Mutex::new(Some(grant)));
        budget.held.lock().expect("held shares lock").push_back((Instant::now(), Arc::downgrade(&slot)));
        SendShare { _grant: slot }
    }

    /// Whether a response of `len` bytes would wait for its share now.
    pub fn would_wait(&self, len: usize, turn: Turn) -> bool {
        self.inner.queue().must_wait(self.share_of(len), turn)
    }
}

impl Queue {
    /// Whether `bytes` for `turn` must queue: someone of its turn or an
    /// earlier one waits already, or the bytes are not free.
    fn must_wait(&self, bytes: usize, turn: Turn) -> bool {
        self.waiting[..=turn as usize].iter().any(|w| !w.is_empty()) || self.available < bytes
    }
}

impl Budget {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // (Every change under the lock is one step: a poisoned queue is still consistent.)
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `bytes` are free again: they go to the waiters whose turn it is, in order.
    fn give_back(self: Arc<Self>, bytes: usize) {
        let mut queue = self.queue();
        queue.available += bytes;
        while let Some(class) = queue.waiting.iter().position(|w| !w.is_empty()) {
            let front = queue.waiting[class].front().expect("not empty");
            if front.grant.is_closed() {
                // Its wait was given up.
                queue.waiting[class].pop_front();
                continue;
            }
            if front.bytes > queue.available {
                break;
            }
            let waiter = queue.waiting[class].pop_front().expect("not empty");
            queue.available -= waiter.bytes;
            let grant = Grant { budget: Some(self.clone()), bytes: waiter.bytes };
            if let Err(mut unsent) = waiter.grant.send(grant) {
                // Given up just now: its bytes stay here (not dropped under the lock).
                unsent.budget = None;
                queue.available += unsent.bytes;
            }
        }
    }

    /// Lets go of every share taken before `now - hold_limit`, and forgets
    /// shares already given back. Returns how many it let go.
    fn release_overdue(&self, now: Instant) -> usize {
        // Grants, and slots whose last holder may be this walk (a share
        // dropped meanwhile): both given back after the lock, not under it.
        let (mut overdue, mut slots) = (Vec::new(), Vec::new());
        let mut held = self.held.lock().expect("held shares lock");
        while let Some((taken, slot)) = held.front() {
            if let Some(slot) = slot.upgrade() {
                if now.saturating_duration_since(*taken) < self.hold_limit {
                    break;
                }
                if let Some(grant) = slot.lock().expect("share lock").take() {
                    overdue.push(grant);
                }
                slots.push(slot);
            }
            held.pop_front();
        }
        drop(held);
        let released = overdue.len();
        drop((overdue, slots));
        self.overdue.inc_by(released as u64);
        released
    }
}

/// Runs while the budget exists: lets overdue shares go, a few times per hold limit.
async fn release_overdue_shares(budget: Weak<Budget>) {
    let period = match budget.upgrade() {
        Some(b) => (b.hold_limit / 4).max(Duration::from_millis(10)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(budget) = budget.upgrade() else { return };
        budget.release_overdue(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: usize, hold: Duration) -> SendBudget {
        SendBudget::new(total, hold, Default::default())
    }

    fn budget_of(total: usize) -> SendBudget {
        budget(total, Duration::from_secs(60))
    }

    #[tokio::test]
    async fn a_share_waits_until_earlier_ones_are_given_back() {
        let budget = budget(2400, Duration::from_secs(60));
        let first = budget.share(600, Turn::First).await;
        let second = budget.share(600, Turn::First).await;
        let third = budget.share(600, Turn::First).await;
        assert_eq!(budget.available_bytes(), 600);
        assert!(!budget.would_wait(600, Turn::First));
        let fourth = budget.share(600, Turn::First).await;
        assert!(budget.would_wait(600, Turn::First));
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.share(600, Turn::First).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no 600 bytes are free while four shares hold all 2,400");
        drop(first);
        let fifth = waiting.await.unwrap();
        assert_eq!(budget.available_bytes(), 0);
        drop((second, third, fourth, fifth));
        assert_eq!(budget.available_bytes(), 2400);
    }

    #[tokio::test]
    async fn a_response_takes_at_most_a_quarter_of_the_budget() {
        let budget = budget(1000, Duration::from_secs(60));
        let large = budget.share(5_000_000, Turn::First).await;
        assert_eq!(budget.available_bytes(), 750);
        let more: Vec<_> = futures::future::join_all((0..3).map(|_| budget.share(5_000_000, Turn::First))).await;
        assert_eq!(budget.available_bytes(), 0);
        drop((large, more));
        assert_eq!(budget.available_bytes(), 1000);
        // A budget too small to quarter still lets one response through.
        let tiny = budget_of(1);
        let share = tiny.share(64 * 1024, Turn::First).await;
        assert_eq!(tiny.available_bytes(), 0);
        drop(share);
    }

    /// Spawns a wait for a share and lets it reach the queue.
    async fn queued(budget: &SendBudget, len: usize, turn: Turn) -> tokio::task::JoinHandle<SendShare> {
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.share(len, turn).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        waiting
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_stream_mid_sync_goes_before_new_ones_and_each_turn_in_order() {
        // (A budget of one byte: one share at a time.)
        let budget = budget_of(1);
        let held = budget.share(1, Turn::First).await;
        let first_a = queued(&budget, 1, Turn::First).await;
        let first_b = queued(&budget, 1, Turn::First).await;
        let continuing = queued(&budget, 1, Turn::Continuing).await;
        assert!(budget.would_wait(1, Turn::Continuing));
        drop(held);
        // The continuing stream, though it asked last.
        let share = tokio::time::timeout(Duration::from_secs(5), continuing).await.expect("the continuing stream's turn came first").unwrap();
        tokio::task::yield_now().await;
        assert!(!first_a.is_finished() && !first_b.is_finished());
        drop(share);
        let in_time = Duration::from_secs(5);
        let share = tokio::time::timeout(in_time, first_a).await.expect("new streams in the order they asked").unwrap();
        tokio::task::yield_now().await;
        assert!(!first_b.is_finished(), "new streams in the order they asked");
        drop(share);
        drop(tokio::time::timeout(in_time, first_b).await.expect("the last one's turn").unwrap());
        assert_eq!(budget.available_bytes(), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_given_up_loses_no_bytes_and_holds_up_nobody() {
        let budget = budget(4, Duration::from_secs(60));
        let held: Vec<_> = futures::future::join_all((0..4).map(|_| budget.share(1, Turn::First))).await;
        let given_up = queued(&budget, 1, Turn::First).await;
        let next = queued(&budget, 1, Turn::First).await;
        given_up.abort();
        let _ = given_up.await;
        drop(held);
        drop(next.await.unwrap());
        assert_eq!(budget.available_bytes(), 4);
        // A wait given up after its share was granted, before it was taken:
        // the grant goes back with the dropped wait.
        let held = budget.share(1, Turn::First).await;
        let all: Vec<_> = futures::future::join_all((0..3).map(|_| budget.share(1, Turn::First))).await;
        let mut racing = Box::pin(budget.share(1, Turn::First));
        assert!(futures::poll!(racing.as_mut()).is_pending());
        drop(held);
        drop(racing);
        drop(all);
        assert_eq!(budget.available_bytes(), 4);
    }

    #[test]
    fn only_large_responses_take_a_share() {
        assert!(!SendBudget::applies_to(LARGE_RESPONSE_BYTES - 1));
        assert!(SendBudget::applies_to(LARGE_RESPONSE_BYTES));
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_held_past_the_hold_limit_is_let_go() {
        let overdue = prometheus_client::metrics::counter::Counter::default();
        // (A budget of one byte: one response at a time.)
        let budget = SendBudget::new(1, Duration::from_secs(5), overdue.clone());
        // A proxy that never reads: its response's share is never dropped.
        let stalled = budget.share(1000, Turn::First).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.share(1000, Turn::First).await }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(!waiting.is_finished(), "within the hold limit the stalled share still counts");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let next = tokio::time::timeout(Duration::from_secs(1), waiting).await.expect("the overdue share was let go").unwrap();
        assert_eq!(overdue.get(), 1);
        // Dropping the overdue share later gives nothing back twice.
        drop(stalled);
        assert_eq!(budget.available_bytes(), 0);
        drop(next);
        assert_eq!(budget.available_bytes(), 1);
    }

    #[test]
    fn shares_given_back_are_forgotten_and_not_counted_overdue() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let budget = budget(1000, Duration::from_secs(5));
        rt.block_on(async {
            for _ in 0..100 {
                drop(budget.share(10, Turn::First).await);
            }
        });
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(budget.inner.release_overdue(later), 0);
        assert!(budget.inner.held.lock().unwrap().is_empty());
        assert_eq!(budget.available_bytes(), 1000);
    }
}
