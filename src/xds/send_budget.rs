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
//! buffer (hyper's 400 KiB) of the response is written. Responses take
//! shares in the order they asked. Small responses (an endpoint change, a
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

use tokio::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Responses this large or larger take a share of the budget.
pub const LARGE_RESPONSE_BYTES: usize = 64 * 1024;

/// How long a share is held at most.
pub const HOLD_LIMIT: Duration = Duration::from_secs(5);

/// A taken share's bytes; emptied when the share is let go overdue.
type ShareSlot = Mutex<Option<OwnedSemaphorePermit>>;

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct SendBudget {
    inner: Arc<Budget>,
}

struct Budget {
    semaphore: Arc<Semaphore>,
    total: u32,
    hold_limit: Duration,
    /// Shares taken, oldest first, to let go once overdue.
    held: Mutex<VecDeque<(Instant, Weak<ShareSlot>)>>,
    reaper: std::sync::Once,
    /// Shares let go because they were held too long.
    overdue: prometheus_client::metrics::counter::Counter,
}

/// A large response's part of the budget; given back when dropped (or
/// when overdue, whichever is first).
pub struct SendShare {
    _permit: Arc<ShareSlot>,
}

impl SendBudget {
    /// A budget of `total_bytes` (at most 4 GiB) whose shares are held at most `hold_limit`.
    pub fn new(total_bytes: usize, hold_limit: Duration, overdue: prometheus_client::metrics::counter::Counter) -> SendBudget {
        let total = total_bytes.clamp(1, u32::MAX as usize) as u32;
        SendBudget {
            inner: Arc::new(Budget {
                semaphore: Arc::new(Semaphore::new(total as usize)),
                total,
                hold_limit,
                held: Mutex::new(VecDeque::new()),
                reaper: std::sync::Once::new(),
                overdue,
            }),
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.inner.total as usize
    }

    /// Bytes no response holds now.
    pub fn available_bytes(&self) -> usize {
        self.inner.semaphore.available_permits()
    }

    /// Whether a response of `len` bytes must take a share.
    pub fn applies_to(len: usize) -> bool {
        len >= LARGE_RESPONSE_BYTES
    }

    /// The share a response of `len` bytes takes: its size, at most a quarter of the budget.
    fn share_of(&self, len: usize) -> u32 {
        let most = (self.inner.total / 4).max(1);
        len.clamp(1, most as usize) as u32
    }

    /// Waits until a response of `len` bytes's share is free, and takes it.
    pub async fn share(&self, len: usize) -> SendShare {
        let budget = &self.inner;
        budget.reaper.call_once(|| {
            tokio::spawn(release_overdue_shares(Arc::downgrade(&self.inner)));
        });
        let bytes = self.share_of(len);
        let permit = budget.semaphore.clone().acquire_many_owned(bytes).await.expect("the budget's semaphore is never closed");
        let slot = Arc::new(Mutex::new(Some(permit)));
        budget.held.lock().expect("held shares lock").push_back((Instant::now(), Arc::downgrade(&slot)));
        SendShare { _permit: slot }
    }

    /// Whether a response of `len` bytes would wait for its share now.
    pub fn would_wait(&self, len: usize) -> bool {
        self.inner.semaphore.available_permits() < self.share_of(len) as usize
    }
}

impl Budget {
    /// Lets go of every share taken before `now - hold_limit`, and forgets
    /// shares already given back. Returns how many it let go.
    fn release_overdue(&self, now: Instant) -> usize {
        let mut released = 0;
        let mut held = self.held.lock().expect("held shares lock");
        while let Some((taken, slot)) = held.front() {
            if let Some(slot) = slot.upgrade() {
                if now.saturating_duration_since(*taken) < self.hold_limit {
                    break;
                }
                if slot.lock().expect("share lock").take().is_some() {
                    released += 1;
                }
            }
            held.pop_front();
        }
        drop(held);
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
        let first = budget.share(600).await;
        let second = budget.share(600).await;
        let third = budget.share(600).await;
        assert_eq!(budget.available_bytes(), 600);
        assert!(!budget.would_wait(600));
        let fourth = budget.share(600).await;
        assert!(budget.would_wait(600));
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.share(600).await }
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
        let large = budget.share(5_000_000).await;
        assert_eq!(budget.available_bytes(), 750);
        let more: Vec<_> = futures::future::join_all((0..3).map(|_| budget.share(5_000_000))).await;
        assert_eq!(budget.available_bytes(), 0);
        drop((large, more));
        assert_eq!(budget.available_bytes(), 1000);
        // A budget too small to quarter still lets one response through.
        let tiny = budget_of(1);
        let share = tiny.share(64 * 1024).await;
        assert_eq!(tiny.available_bytes(), 0);
        drop(share);
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
        let stalled = budget.share(1000).await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.share(1000).await }
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
                drop(budget.share(10).await);
            }
        });
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(budget.inner.release_overdue(later), 0);
        assert!(budget.inner.held.lock().unwrap().is_empty());
        assert_eq!(budget.available_bytes(), 1000);
    }
}
