//! Which writes a sync has made durable, for drivers over a page cache (`file`, and
//! `qcow2` over its file child).
//!
//! Two rules, both about never acknowledging a FLUSH whose data is not on disk:
//!
//! * **A flush returns only after a sync that started after its writes.** Writes are
//!   counted as they complete (a generation). A sync records the count it saw when it
//!   started; a caller whose writes are all inside that count may return once that sync
//!   succeeded, and otherwise starts a sync of its own. Syncs run one at a time, so
//!   concurrent flushes share one fdatasync instead of skipping it (a flag cleared
//!   before the sync let a second flush return while the first sync still ran).
//! * **A failed sync is never retried into a success.** On Linux a failed fdatasync
//!   may have dropped the dirty pages it was writing (they are marked clean, and the
//!   next fdatasync reports success without writing them). Nothing written since the
//!   last good sync can be trusted to be durable, and only the writer could write it
//!   again, so every later sync fails with the first failure's error (QEMU's file
//!   driver does the same). Reopening the image is the way out.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use tokio::sync::Mutex;

use crate::error::Error;
use crate::error::ErrorKind;
use crate::error::Result;

/// Write generations and the sync that covered them; see the module note.
#[derive(Debug, Default)]
pub struct SyncTracker {
    /// Writes completed (successfully or not: a failed write may have changed part of
    /// its range).
    written: AtomicU64,
    state: Mutex<SyncState>,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Every write counted up to this generation is durable.
    synced: u64,
    /// The first sync failure, repeated to every later caller.
    failure: Option<Failure>,
}

/// A sync failure, kept to be reported again (errors are not `Clone`).
#[derive(Debug, Clone)]
struct Failure {
    kind: ErrorKind,
    errno: Option<i32>,
    message: String,
}

impl Failure {
    fn new(err: &Error) -> Self {
        Self {
            kind: err.kind(),
            errno: err.os_errno(),
            message: err.to_string(),
        }
    }

    fn error(&self) -> Error {
        let message = format!(
            "an earlier flush failed ({}); data written before it may not be on disk, so \
             no later flush can succeed: close the image and check it",
            self.message
        );
        match self.errno {
            Some(errno) => Error::from_io(message, std::io::Error::from_raw_os_error(errno)),
            None => Error::new(self.kind, message),
        }
    }
}

impl SyncTracker {
    /// A tracker with nothing written.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a completed write (call it whether or not the write succeeded).
    pub fn wrote(&self) {
        self.written.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a write completed since the last good sync.
    pub fn has_unsynced_writes(&self) -> bool {
        // `try_lock` fails only while a sync runs, which means there are some.
        match self.state.try_lock() {
            Ok(state) => state.synced < self.written.load(Ordering::SeqCst),
            Err(_) => true,
        }
    }

    /// Records a sync that failed outside [`SyncTracker::sync`] (a FUA write's own
    /// fdatasync): later syncs fail too.
    pub async fn poison(&self, err: &Error) {
        let mut state = self.state.lock().await;
        state.failure.get_or_insert_with(|| Failure::new(err));
    }

    /// Makes every write counted before this call durable with `sync`, unless a sync
    /// that started after them already did. Fails for good once any sync failed.
    pub async fn sync<F>(&self, sync: impl FnOnce() -> F) -> Result<()>
    where
        F: Future<Output = Result<()>>,
    {
        let mine = self.written.load(Ordering::SeqCst);
        let mut state = self.state.lock().await;
        if let Some(failure) = &state.failure {
            return Err(failure.error());
        }
        if state.synced >= mine {
            return Ok(());
        }
        // Everything completed by now is covered by the sync about to start.
        let covers = self.written.load(Ordering::SeqCst);
        match sync().await {
            Ok(()) => {
                state.synced = covers;
                Ok(())
            }
            Err(err) => {
                state.failure = Some(Failure::new(&err));
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use super::*;

    fn eio() -> Error {
        Error::from_io("fdatasync", std::io::Error::from_raw_os_error(libc::EIO))
    }

    #[tokio::test]
    async fn a_sync_with_nothing_written_since_the_last_one_is_skipped() {
        let tracker = SyncTracker::new();
        let calls = AtomicU32::new(0);
        let count = || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        };
        tracker.sync(count).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        tracker.wrote();
        assert!(tracker.has_unsynced_writes());
        tracker.sync(count).await.unwrap();
        tracker.sync(count).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(!tracker.has_unsynced_writes());
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_for_the_running_sync_and_then_syncs_its_own_later_writes() {
        let tracker = Arc::new(SyncTracker::new());
        let calls = Arc::new(AtomicU32::new(0));
        let slow_sync = |calls: Arc<AtomicU32>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(600)).await;
            Ok(())
        };
        tracker.wrote();
        let first = {
            let (tracker, calls) = (tracker.clone(), calls.clone());
            tokio::spawn(async move { tracker.sync(|| slow_sync(calls)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        // Written while the first sync runs: that sync may not cover it.
        tracker.wrote();
        let started = tokio::time::Instant::now();
        tracker.sync(|| slow_sync(calls.clone())).await.unwrap();
        assert!(started.elapsed() >= std::time::Duration::from_millis(1190));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        first.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn callers_covered_by_a_running_sync_share_it() {
        let tracker = Arc::new(SyncTracker::new());
        let calls = Arc::new(AtomicU32::new(0));
        tracker.wrote();
        let mut waiters = Vec::new();
        for _ in 0..4 {
            let (tracker, calls) = (tracker.clone(), calls.clone());
            waiters.push(tokio::spawn(async move {
                tracker
                    .sync(|| async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok(())
                    })
                    .await
            }));
        }
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_sync_fails_every_later_one_with_its_errno() {
        let tracker = SyncTracker::new();
        tracker.wrote();
        let err = tracker.sync(|| async { Err(eio()) }).await.unwrap_err();
        assert_eq!(err.errno(), libc::EIO);
        tracker.wrote();
        let again = tracker.sync(|| async { Ok(()) }).await.unwrap_err();
        assert_eq!(again.errno(), libc::EIO);
        assert!(
            again.to_string().contains("an earlier flush failed"),
            "{again}"
        );
        // Even with nothing new written.
        assert!(tracker.sync(|| async { Ok(()) }).await.is_err());
    }

    #[tokio::test]
    async fn a_poisoned_tracker_fails_its_syncs() {
        let tracker = SyncTracker::new();
        tracker.poison(&eio()).await;
        assert!(tracker.sync(|| async { Ok(()) }).await.is_err());
    }
}
