//! The job speed limit: bytes per second, with at most a 100 ms burst.
//!
//! A virtual clock, `ready_at`, says when the budget is paid back: a request may go
//! once `ready_at` has passed, and then pushes it forward by the time its bytes take at
//! the current speed (after dispatch, so the first chunk is free, as in QEMU). Taking
//! the budget is atomic ([`RateLimit::try_charge`]), so concurrent workers claim one
//! after another as QEMU's single copy loop does; a caller gives back what its request
//! did not use ([`RateLimit::refund`]: a copy claim shrinks to one block-status run,
//! or is skipped). Charging a whole chunk per claim, whatever it held, made a backup
//! a third slower than its speed.
//! Idle time earns credit for at most one slice of 100 ms, so the long-run rate is the
//! speed and a burst is at most one slice's worth plus one request. A speed of 0 means
//! unlimited. Changing the speed wakes every waiter, so `block-job-set-speed` takes
//! effect at once.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest stretch of idle time that earns sending credit.
pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct Budget {
    speed: u64,
    ready_at: Instant,
}

/// A shared speed limit.
#[derive(Debug)]
pub struct RateLimit {
    budget: Mutex<Budget>,
    changed: Notify,
}

impl RateLimit {
    /// A limit of `speed` bytes/s (0 = unlimited).
    pub fn new(speed: u64) -> Self {
        Self {
            budget: Mutex::new(Budget {
                speed,
                ready_at: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    /// The current limit in bytes/s.
    pub fn speed(&self) -> u64 {
        self.lock().speed
    }

    /// Changes the limit and wakes every waiter to re-evaluate.
    pub fn set_speed(&self, speed: u64) {
        {
            let mut b = self.lock();
            b.speed = speed;
            // The debt was run up at the old speed; start afresh.
            b.ready_at = Instant::now();
        }
        self.changed.notify_waiters();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Budget> {
        self.budget.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `bytes` may be dispatched, then charges them.
    pub async fn throttle(&self, bytes: u64) {
        while !self.try_charge(bytes) {
            self.ready().await;
        }
    }

    /// Charges `bytes` if the budget allows a request now; false (and nothing charged)
    /// if it does not, then wait with [`RateLimit::ready`] and try again.
    pub fn try_charge(&self, bytes: u64) -> bool {
        let mut b = self.lock();
        if b.speed == 0 {
            return true;
        }
        let now = Instant::now();
        if let Some(floor) = now.checked_sub(SLICE) {
            b.ready_at = b.ready_at.max(floor);
        }
        if b.ready_at > now {
            return false;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / b.speed as f64);
        b.ready_at += cost;
        true
    }

    /// Gives back `bytes` charged but not dispatched.
    pub fn refund(&self, bytes: u64) {
        let mut b = self.lock();
        if b.speed == 0 || bytes == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / b.speed as f64);
        b.ready_at = b.ready_at.checked_sub(cost).unwrap_or(b.ready_at);
    }

    /// Waits until the budget may allow another request; charges nothing (and several
    /// waiters may wake at once: take the budget with [`RateLimit::try_charge`]).
    pub async fn ready(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait_until = {
                let mut b = self.lock();
                if b.speed == 0 {
                    return;
                }
                let now = Instant::now();
                if let Some(floor) = now.checked_sub(SLICE) {
                    b.ready_at = b.ready_at.max(floor);
                }
                if b.ready_at <= now {
                    return;
                }
                b.ready_at
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wait_until) => {}
                _ = changed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn elapsed_for(limit: &RateLimit, chunks: u64, chunk: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..chunks {
            limit.throttle(chunk).await;
        }
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn long_runs_converge_on_the_speed() {
        // 10 MiB at 1 MiB/s in 64 KiB chunks: about 10 s, less the 100 ms of credit and the
        // last chunk, which goes without waiting for its own cost.
        let limit = RateLimit::new(1 << 20);
        let took = elapsed_for(&limit, 160, 64 << 10).await;
        assert!(
            took >= Duration::from_millis(9_500) && took <= Duration::from_millis(10_200),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_larger_than_a_slice_still_average_out() {
        // 1 MiB chunks at 1 MiB/s: one per second after the first.
        let limit = RateLimit::new(1 << 20);
        let took = elapsed_for(&limit, 5, 1 << 20).await;
        assert!(
            took >= Duration::from_millis(3_900) && took <= Duration::from_millis(4_200),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_means_unlimited() {
        let limit = RateLimit::new(0);
        assert_eq!(elapsed_for(&limit, 1000, 1 << 20).await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn raising_the_speed_wakes_a_sleeper() {
        let limit = std::sync::Arc::new(RateLimit::new(1024));
        limit.throttle(1 << 20).await; // overdraws: the next call would wait ~1000 s
        let sleeper = {
            let limit = limit.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                limit.throttle(1).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        limit.set_speed(0);
        let waited = sleeper.await.unwrap();
        assert!(waited < Duration::from_millis(100), "{waited:?}");
    }
}
