//! Guest I/O first: the background pass gives way while the guest is busy.
//!
//! A guest write to an uncopied cluster must read that cluster's old data from the
//! source, and a guest read goes to the source too; both queue behind whatever
//! background reads are in flight. So while guest requests pass through the filter
//! (one in flight, or one ended less than [`QUIET`] ago), the background pass keeps at
//! most [`BUSY_DEPTH`] copies in flight instead of all its workers; once the guest has
//! been quiet for [`QUIET`], the workers go back to full depth. The backup slows down
//! only while the guest is busy.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

/// How long after its last request the guest counts as busy.
pub const QUIET: Duration = Duration::from_millis(2);

/// Background copies in flight while the guest is busy.
pub const BUSY_DEPTH: usize = 1;

/// While the guest is busy, background requests are the chunk size divided by this
/// (but at least a cluster).
pub const BUSY_CHUNK_DIVISOR: u64 = 4;

/// Guest requests seen by the filter, and the background copies in flight.
#[derive(Debug)]
pub struct GuestActivity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the last guest request ended, in nanoseconds since `epoch`.
    last_end: AtomicU64,
    /// Background copies (claim to target write) in flight.
    pub(super) background: AtomicUsize,
}

impl Default for GuestActivity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            background: AtomicUsize::new(0),
        }
    }
}

/// One guest request, counted while it lives.
#[derive(Debug)]
pub struct GuestRequest<'a>(&'a GuestActivity);

impl Drop for GuestRequest<'_> {
    fn drop(&mut self) {
        self.0.last_end.store(self.0.now(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl GuestActivity {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Counts a guest request until the returned guard is dropped.
    pub fn request(&self) -> GuestRequest<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        GuestRequest(self)
    }

    /// Whether a guest request is in flight or ended less than [`QUIET`] ago.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
            || self
                .now()
                .saturating_sub(self.last_end.load(Ordering::Relaxed))
                < QUIET.as_nanos() as u64
                && self.last_end.load(Ordering::Relaxed) != 0
    }

    /// Whether another background copy may start now.
    pub fn may_start_background(&self) -> bool {
        !self.busy() || self.background.load(Ordering::Relaxed) < BUSY_DEPTH
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_gives_way_only_while_the_guest_is_busy() {
        let guest = GuestActivity::default();
        assert!(!guest.busy(), "no guest request yet");
        guest.background.store(BUSY_DEPTH, Ordering::Relaxed);
        assert!(guest.may_start_background(), "an idle guest: full depth");
        let request = guest.request();
        assert!(guest.busy());
        assert!(!guest.may_start_background(), "busy guest, depth reached");
        guest.background.store(BUSY_DEPTH - 1, Ordering::Relaxed);
        assert!(guest.may_start_background(), "busy guest, below the depth");
        guest.background.store(BUSY_DEPTH, Ordering::Relaxed);
        drop(request);
        std::thread::sleep(QUIET * 5);
        assert!(!guest.busy(), "quiet for longer than QUIET");
        assert!(guest.may_start_background());
    }
}
