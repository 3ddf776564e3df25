//! Jobs that complete together: QMP's `transaction` with `completion-mode: grouped`
//! (QEMU's job transactions; bitmaps.rst, "Grouped Completion Mode").
//!
//! ```text
//!   member finishes its work --> waiting --(every member finished)--> pending -> ...
//!                                   |
//!   any member fails or is cancelled: every member is cancelled; one still running
//!   stops, one waiting goes waiting -> aborting (BLOCK_JOB_CANCELLED)
//! ```
//!
//! So no member commits (a backup clearing its bitmap, say) unless all of them can: an
//! incremental backup of two disks either succeeds for both or leaves both bitmaps as
//! they were, and the next attempt copies everything again.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::Weak;

use tokio::sync::Notify;

use super::Job;

/// One group of jobs; see the module note.
#[derive(Debug, Default)]
pub struct CompletionGroup {
    state: Mutex<GroupState>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct GroupState {
    members: Vec<Weak<Job>>,
    /// Members that finished their work successfully and wait for the others.
    finished: usize,
    aborted: bool,
}

impl CompletionGroup {
    /// An empty group.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds `job` (before it starts).
    pub fn add(&self, job: &Arc<Job>) {
        self.lock().members.push(Arc::downgrade(job));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A member finished its work: waits until every member has, and returns true, or
    /// until the group aborts (or `job` itself is cancelled), and returns false.
    pub(crate) async fn finished_and_wait(&self, job: &Job) -> bool {
        {
            let mut state = self.lock();
            state.finished += 1;
        }
        self.changed.notify_waiters();
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let state = self.lock();
                if state.aborted || job.is_cancelled() {
                    return false;
                }
                if state.finished >= state.members.len() {
                    return true;
                }
            }
            tokio::select! {
                _ = changed => {}
                _ = job.cancelled() => {}
            }
        }
    }

    /// A member failed or was cancelled: every other member is cancelled (forcefully,
    /// as QEMU does), and waiting members wake up to abort.
    pub(crate) fn abort(&self, failed: &Job) {
        let members: Vec<Arc<Job>> = {
            let mut state = self.lock();
            if state.aborted {
                Vec::new()
            } else {
                state.aborted = true;
                state.members.iter().filter_map(Weak::upgrade).collect()
            }
        };
        for member in members.iter().filter(|m| !std::ptr::eq(m.as_ref(), failed)) {
            // A member past the point of cancelling (concluding) just finishes.
            let _ = member.cancel(true);
        }
        self.changed.notify_waiters();
    }
}
