//! Guest I/O first: the background pass gives way while the guest is busy.
//!
//! A guest write to an uncopied cluster must read that cluster's old data from the
//! source, and a guest read goes to the source too; both queue behind whatever
//! background reads are in flight. So while guest requests pass through the filter
//! (one in flight, or one ended less than [`QUIET`] ago), the background pass changes
//! how it runs:
//!
//! * at most [`BUSY_DEPTH`] background copy is in flight instead of all the workers;
//! * after each one the slot stays taken for [`BUSY_PAUSE_RATIO`] times as long as the
//!   copy took (owed until it adds up to [`MIN_PAUSE`]): a duty cycle, so the guest
//!   has the disk to itself at least half of the time instead of queueing behind
//!   back-to-back background requests. A copy into the repository pauses
//!   [`REPOSITORY_BUSY_PAUSE_RATIO`] times as long: its copy ends when the chunk is
//!   handed over, before the chunk is hashed, compressed, sealed and written, work
//!   the copy's own time does not show.
//!
//! Flushes count as guest requests too. A flush waits for the old data of the writes
//! held since the last one and then for the disk's cache flush; uncounted, it left the
//! background at full depth for as long as it ran, and waited behind it.
//!
//! Once the guest has been quiet for [`QUIET`], the workers go back to full depth and
//! no pauses: the backup slows down only while the guest is busy, and it never stops
//! (a guest that never pauses still leaves it half of the disk's time).
//!
//! Two more pieces make the guest's requests cheap in the first place: a write over
//! part of a cluster saves only its own range's old data (`fragments`), and the
//! background reads the source without readahead (`read_uncached`), so the host does
//! not queue megabytes of read-ahead in front of the guest; while the guest is busy,
//! with `O_DIRECT`, so a chunk is one request to the disk even where the page cache
//! holds scattered pages of it (a buffered read makes one request per gap), and
//! submitted through io_uring for a file, so the read does not hold the file's inode
//! lock while the device works (the guest's buffered writes need it; see the file
//! driver's `async_direct`).
//!
//! Measured (`bench/RESULTS.md`, 1 GiB, QD1 guest that never pauses, in process): the
//! pause brought the write p99 during a backup from 4-6x its p99 alone to 2-3x, and
//! the guest got about five times as many requests done; the backup under that guest
//! took about 9.5 s instead of 2.8 s (1.4 s idle, unchanged). Smaller background
//! requests while busy (a quarter of the chunk) bought nothing once the pause was
//! there and made the backup slower still, so requests keep their size.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

/// How long after its last request the guest counts as busy.
pub const QUIET: Duration = Duration::from_millis(2);

/// Background copies in flight while the guest is busy.
pub const BUSY_DEPTH: usize = 1;

/// While the guest is busy, a background copy is followed by a pause this many times
/// as long as the copy took.
pub const BUSY_PAUSE_RATIO: u32 = 1;

/// [`BUSY_PAUSE_RATIO`] for a target that takes chunks whole and encodes them after
/// the copy ends (the repository node). With 1, a QD1 guest's 4 KiB write p99 during
/// a 4 GiB backup into the repository was 629 and 1536 us against 452 and 500 us
/// during one into a raw file (whose copies wait for their target writes, and took
/// 110-149 s against 33-35 s); with 3, 440 and 474 us against 705 and 441 us, the
/// backup taking 61-66 s (`bench/RESULTS.md`, issue 16).
pub const REPOSITORY_BUSY_PAUSE_RATIO: u32 = 3;

/// The shortest pause taken; shorter ones are owed until they add up to it.
pub const MIN_PAUSE: Duration = Duration::from_millis(1);

/// Guest requests seen by the filter, and the background copies in flight.
#[derive(Debug)]
pub struct GuestActivity {
    epoch: Instant,
    in_flight: AtomicUsize,
    /// When the last guest request ended, in nanoseconds since `epoch`.
    last_end: AtomicU64,
    /// Background copies (claim to target write) in flight.
    pub(super) background: AtomicUsize,
    /// Pause owed by background copies while the guest is busy, in nanoseconds.
    pause_owed: AtomicU64,
    /// Whether the guest has flushed since the job started.
    flushed: AtomicBool,
}

impl Default for GuestActivity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            background: AtomicUsize::new(0),
            pause_owed: AtomicU64::new(0),
            flushed: AtomicBool::new(false),
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

    /// Notes that the guest flushes.
    pub fn note_flush(&self) {
        self.flushed.store(true, Ordering::Relaxed);
    }

    /// Whether the guest has flushed since the job started: a guest that flushed
    /// once (a journalling filesystem, a database) will flush again.
    pub fn has_flushed(&self) -> bool {
        self.flushed.load(Ordering::Relaxed)
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

    /// How long a background copy that took `took` keeps its slot after it ends: while
    /// the guest is busy, `ratio` times as long ([`BUSY_PAUSE_RATIO`], or
    /// [`REPOSITORY_BUSY_PAUSE_RATIO`]), owed until it adds up to [`MIN_PAUSE`] (a copy
    /// of zeros takes microseconds, and a timer sleeps a millisecond at least); nothing
    /// while the guest is quiet.
    pub fn pause_after(&self, took: Duration, ratio: u32) -> Option<Duration> {
        if !self.busy() {
            self.pause_owed.store(0, Ordering::Relaxed);
            return None;
        }
        let owed = (took * ratio).as_nanos() as u64;
        let total = self.pause_owed.fetch_add(owed, Ordering::Relaxed) + owed;
        if total < MIN_PAUSE.as_nanos() as u64 {
            return None;
        }
        self.pause_owed.store(0, Ordering::Relaxed);
        Some(Duration::from_nanos(total))
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
        assert_eq!(
            guest.pause_after(Duration::from_millis(3), BUSY_PAUSE_RATIO),
            None,
            "no pause when quiet"
        );
        let _request = guest.request();
        assert_eq!(
            guest.pause_after(Duration::from_millis(3), BUSY_PAUSE_RATIO),
            Some(Duration::from_millis(3) * BUSY_PAUSE_RATIO)
        );
        assert_eq!(
            guest.pause_after(Duration::from_millis(3), REPOSITORY_BUSY_PAUSE_RATIO),
            Some(Duration::from_millis(3) * REPOSITORY_BUSY_PAUSE_RATIO)
        );
        // Short copies owe their pauses until they add up to MIN_PAUSE.
        let short = MIN_PAUSE / (3 * BUSY_PAUSE_RATIO);
        assert_eq!(guest.pause_after(short, BUSY_PAUSE_RATIO), None);
        assert_eq!(guest.pause_after(short, BUSY_PAUSE_RATIO), None);
        let owed = guest
            .pause_after(short * 2, BUSY_PAUSE_RATIO)
            .expect("owed pauses add up");
        assert_eq!(owed, short * 4 * BUSY_PAUSE_RATIO);
    }
}
