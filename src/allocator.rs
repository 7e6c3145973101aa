//! Handing freed heap memory back to the kernel when the control plane goes
//! idle.
//!
//! The binary's allocator is mimalloc (`src/main.rs`; mimalloc 3, as
//! `libmimalloc-sys` builds it). mimalloc returns freed pages to the kernel
//! (`madvise(MADV_DONTNEED)`) only after a delay (a second), and it checks
//! that delay only when a thread hands a page back to an arena, allocates
//! on its slow path or collects. A tokio worker that has just served a
//! fleet's sync and then goes idle does none of these, so what it freed
//! stays resident: after 1,000 proxies synced, and even after all of them
//! had disconnected, the control plane's RSS did not come down
//! (docs/performance.md). Returning pages at once
//! (`MIMALLOC_PURGE_DELAY=0`) brought it down but took the 1,000-proxy sync
//! from 1.0–1.1 to 1.2–1.3 CPU-seconds.
//!
//! Instead, each `serve` worker runs a forced collection just before it
//! parks, at most once per [`RELEASE_INTERVAL`]: what it freed while busy
//! goes back to the kernel once it has nothing to do, and a busy worker pays
//! for at most one collection per interval. A collection on one thread
//! hands that thread's free pages to mimalloc's arenas and purges the
//! arenas, which also returns what other threads have already handed back
//! (pages other threads still hold wait for their own collection; a purge
//! another thread is running at that moment is not waited for). An idle
//! worker may not wake again for a keepalive interval, so `serve` also
//! collects once every [`IDLE_RELEASE_PERIOD`]
//! ([`release_freed_memory_periodically`]): what was freed after a burst's
//! last collection does not stay.

use std::time::Duration;

/// The shortest time between two collections on one worker thread.
pub const RELEASE_INTERVAL: Duration = Duration::from_millis(100);

/// How often `serve` collects even when no worker parks.
pub const IDLE_RELEASE_PERIOD: Duration = Duration::from_secs(1);

/// For tokio's `on_thread_park`: hands the calling thread's freed heap
/// memory, and what every thread has returned to mimalloc's arenas, back to
/// the kernel, unless this thread did so within [`RELEASE_INTERVAL`].
/// Without the `mimalloc` feature (the system allocator) it does nothing.
pub fn release_freed_memory() {
    #[cfg(feature = "mimalloc")]
    {
        use std::cell::Cell;
        use std::time::Instant;

        thread_local! {
            static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
        }
        LAST_RELEASE.with(|last| {
            let now = Instant::now();
            if last.get().is_some_and(|at| now.duration_since(at) < RELEASE_INTERVAL) {
                return;
            }
            last.set(Some(now));
            // SAFETY: `mi_collect` takes no pointers and may be called on any
            // thread at any time; on a thread whose heap mimalloc has not set
            // up (mimalloc not the global allocator) it returns at once.
            unsafe { libmimalloc_sys::mi_collect(true) };
        });
    }
}

/// Runs for as long as the runtime does (`serve` spawns it): calls
/// [`release_freed_memory`] every [`IDLE_RELEASE_PERIOD`].
pub async fn release_freed_memory_periodically() {
    let mut tick = tokio::time::interval(IDLE_RELEASE_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        release_freed_memory();
    }
}
