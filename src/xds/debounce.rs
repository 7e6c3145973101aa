//! Turning bursts of config changes into pushes (sans-IO core + its task).

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;

/// istiod's `PILOT_DEBOUNCE_AFTER` / `PILOT_DEBOUNCE_MAX`.
#[derive(Debug, Clone, Copy)]
pub struct DebounceConfig {
    /// Push after this long without a new change.
    pub quiet: Duration,
    /// ...but never later than this after the first change of a burst.
    pub max: Duration,
}

impl Default for DebounceConfig {
    fn default() -> Self {
        DebounceConfig { quiet: Duration::from_millis(100), max: Duration::from_millis(500) }
    }
}

/// A push the stream tasks should act on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PushTrigger {
    /// Increases by one per push.
    pub generation: u64,
    /// When the first change merged into this push happened.
    pub change_at: Instant,
    /// How many change events were merged.
    pub merged_changes: u64,
}

/// The debounce state machine: feed it changes and ticks, it says when to push.
///
/// A change that comes after a quiet period (nothing pending, no push for
/// `quiet`) is pushed at once: waiting gains nothing when no burst is under
/// way, and it had been a tenth of an endpoint change's latency at 10,000
/// proxies. Changes that follow a push within `quiet` are merged as istiod
/// merges them: pushed after `quiet` without a new one, or `max` after the
/// first.
#[derive(Debug)]
pub struct Debouncer {
    config: DebounceConfig,
    first: Option<Instant>,
    last: Option<Instant>,
    merged: u64,
    generation: u64,
    last_push: Option<Instant>,
    /// The pending change came after a quiet period: due at once.
    at_once: bool,
}

impl Debouncer {
    pub fn new(config: DebounceConfig) -> Self {
        Debouncer { config, first: None, last: None, merged: 0, generation: 0, last_push: None, at_once: false }
    }

    /// A change happened at `at`.
    pub fn on_change(&mut self, at: Instant) {
        if self.first.is_none() && self.last_push.is_none_or(|pushed| at >= pushed + self.config.quiet) {
            self.at_once = true;
        }
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        self.merged += 1;
    }

    /// When the pending push is due, if one is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        if self.at_once {
            return Some(first);
        }
        Some((last + self.config.quiet).min(first + self.config.max))
    }

    /// Fires the push if it is due at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<PushTrigger> {
        if now < self.deadline()? {
            return None;
        }
        self.generation += 1;
        let trigger = PushTrigger {
            generation: self.generation,
            change_at: self.first.take().expect("deadline implies a change"),
            merged_changes: std::mem::take(&mut self.merged),
        };
        self.last = None;
        self.last_push = Some(now);
        self.at_once = false;
        Some(trigger)
    }
}

/// The debouncer on a thread of its own (a one-thread runtime), so a push
/// is triggered when it is due and not when a runtime worker gets round to
/// it: under 100 changes a second at 10,000 proxies every worker has
/// thousands of stream tasks queued, and a debouncer among them had pushed
/// 0.2–1 s after a change it should have pushed at once (half of the
/// pushes; `meshpilot_debounce_seconds`). (The churn's p99 did not move
/// with it: there the fleet's own cycle on saturated cores is the wait.)
///
/// Stopping it (or dropping it) closes the push channel, which ends every stream.
pub struct DebouncerThread {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl DebouncerThread {
    pub fn spawn(
        config: DebounceConfig,
        changes: mpsc::UnboundedReceiver<Instant>,
        pushes: watch::Sender<Option<PushTrigger>>,
        metrics: std::sync::Arc<Metrics>,
    ) -> std::io::Result<DebouncerThread> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        std::thread::Builder::new().name("xds-debouncer".into()).spawn(move || {
            runtime.block_on(async move {
                tokio::select! {
                    _ = run_debouncer(config, changes, pushes, metrics) => {}
                    // Sent or dropped: either way, stop.
                    _ = stopped => {}
                }
            })
        })?;
        Ok(DebouncerThread { stop: Some(stop) })
    }

    /// Ends the debouncer: its push channel closes.
    pub fn stop(&mut self) {
        self.stop.take();
    }
}

/// Runs the debouncer: reads change events, publishes push triggers.
async fn run_debouncer(
    config: DebounceConfig,
    mut changes: mpsc::UnboundedReceiver<Instant>,
    pushes: watch::Sender<Option<PushTrigger>>,
    metrics: std::sync::Arc<Metrics>,
) {
    let mut debouncer = Debouncer::new(config);
    loop {
        let deadline = debouncer.deadline();
        tokio::select! {
            change = changes.recv() => match change {
                Some(at) => {
                    metrics.config_changes.inc();
                    debouncer.on_change(at);
                }
                None => return,
            },
            _ = async { tokio::time::sleep_until(deadline.expect("guarded").into()).await }, if deadline.is_some() => {}
        }
        if let Some(trigger) = debouncer.poll(Instant::now()) {
            metrics.push_triggers.inc();
            metrics.config_generation.set(trigger.generation as i64);
            metrics.debounce_seconds.observe(trigger.change_at.elapsed().as_secs_f64());
            tracing::debug!(generation = trigger.generation, merged = trigger.merged_changes, "push");
            pushes.send_replace(Some(trigger));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_change_after_quiet_is_pushed_at_once_and_what_follows_is_merged() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig { quiet: ms(100), max: ms(1000) });
        assert_eq!(d.deadline(), None);
        d.on_change(t0);
        assert_eq!(d.deadline(), Some(t0), "nothing under way: no wait");
        let p = d.poll(t0).unwrap();
        assert_eq!((p.generation, p.change_at, p.merged_changes), (1, t0, 1));
        assert_eq!(d.deadline(), None, "nothing pending after a push");
        // A burst right after it is merged: pushed after quiet.
        d.on_change(t0 + ms(10));
        d.on_change(t0 + ms(60));
        assert_eq!(d.deadline(), Some(t0 + ms(160)));
        assert_eq!(d.poll(t0 + ms(159)), None);
        let p = d.poll(t0 + ms(160)).unwrap();
        assert_eq!((p.generation, p.change_at, p.merged_changes), (2, t0 + ms(10), 2));
        // Quiet again: the next change goes at once.
        d.on_change(t0 + ms(300));
        assert_eq!(d.poll(t0 + ms(300)).map(|p| p.generation), Some(3));
    }

    #[test]
    fn the_thread_pushes_a_change_on_its_own_runtime_and_stopping_it_ends_the_pushes() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let (tx, rx) = mpsc::unbounded_channel();
        let (push_tx, mut pushes) = watch::channel(None);
        let mut thread = DebouncerThread::spawn(DebounceConfig { quiet: ms(100), max: ms(500) }, rx, push_tx, metrics).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let at = Instant::now();
        tx.send(at).unwrap();
        let pushed = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), pushes.changed()).await });
        assert!(matches!(pushed, Ok(Ok(()))), "{pushed:?}");
        let trigger = *pushes.borrow_and_update();
        assert_eq!(trigger.map(|t| (t.generation, t.change_at)), Some((1, at)), "a change after quiet is pushed at once");
        thread.stop();
        let ended = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), pushes.changed()).await });
        assert!(matches!(ended, Ok(Err(_))), "stopping closes the push channel: {ended:?}");
    }

    #[test]
    fn a_steady_stream_of_changes_is_capped_by_max() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig { quiet: ms(100), max: ms(1000) });
        // A push a moment ago: what follows is a burst.
        d.on_change(t0 - ms(1));
        d.poll(t0 - ms(1)).unwrap();
        let mut fired = None;
        for i in 0..30 {
            let now = t0 + ms(i * 50);
            d.on_change(now);
            if let Some(p) = d.poll(now) {
                fired = Some((now, p));
                break;
            }
        }
        let (at, p) = fired.expect("max wait forces a push");
        assert_eq!(at, t0 + ms(1000));
        assert_eq!(p.merged_changes, 21);
    }
}
