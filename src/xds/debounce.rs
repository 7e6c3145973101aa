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
#[derive(Debug)]
pub struct Debouncer {
    config: DebounceConfig,
    first: Option<Instant>,
    last: Option<Instant>,
    merged: u64,
    generation: u64,
}

impl Debouncer {
    pub fn new(config: DebounceConfig) -> Self {
        Debouncer { config, first: None, last: None, merged: 0, generation: 0 }
    }

    /// A change happened at `at`.
    pub fn on_change(&mut self, at: Instant) {
        self.first = Some(self.first.map_or(at, |f| f.min(at)));
        self.last = Some(self.last.map_or(at, |l| l.max(at)));
        self.merged += 1;
    }

    /// When the pending push is due, if one is pending.
    pub fn deadline(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
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
        Some(trigger)
    }
}

/// Runs the debouncer: reads change events, publishes push triggers.
pub async fn run_debouncer(
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
    fn fires_after_quiet_period() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig { quiet: ms(100), max: ms(1000) });
        assert_eq!(d.deadline(), None);
        d.on_change(t0);
        d.on_change(t0 + ms(50));
        assert_eq!(d.deadline(), Some(t0 + ms(150)));
        assert_eq!(d.poll(t0 + ms(149)), None);
        let p = d.poll(t0 + ms(150)).unwrap();
        assert_eq!((p.generation, p.change_at, p.merged_changes), (1, t0, 2));
        assert_eq!(d.deadline(), None, "nothing pending after a push");
    }

    #[test]
    fn a_steady_stream_of_changes_is_capped_by_max() {
        let t0 = Instant::now();
        let mut d = Debouncer::new(DebounceConfig { quiet: ms(100), max: ms(1000) });
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
