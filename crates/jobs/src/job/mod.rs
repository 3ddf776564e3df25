//! The generic job: QEMU's state machine, verbs, pause points, cancel, speed,
//! progress, error actions and events.
//!
//! ```text
//!   created --> running <--> paused
//!                  |  \
//!                  |   '--> aborting --> concluded --> null
//!                  v            ^   ^        ^
//!               waiting --> pending --------'  (finalize)
//! ```
//!
//! A [`Job`] is driven by a [`JobDriver`] (the backup job is one). The harness in
//! [`Job::start`] runs the driver's body, then walks the job through waiting, pending
//! (held there until `finalize` when auto-finalize is off), the driver's commit or
//! abort, its clean-up, the completion event, concluded, and null (held at concluded
//! until `dismiss` when auto-dismiss is off). Verbs check QEMU's table and answer with
//! QEMU's words. Every status change is a `JOB_STATUS_CHANGE` event on the registry's
//! broadcast channel.
//!
//! Pausing is cooperative: `pause` raises a counter and the body parks at its next
//! [`Job::pause_point`], reporting `paused` only once it is actually parked.
//!
//! Files: `mod.rs` the job and its harness; `status` the state machine, verb table and
//! policies; `event` the events; `registry` ids and the job list; `completion_group`
//! jobs of a grouped transaction, which finish or fail together.

mod completion_group;
mod event;
mod registry;
mod status;

pub use completion_group::CompletionGroup;
pub use event::JobEvent;
pub use registry::JobRegistry;
use registry::RegistryInner;
pub use status::ErrorAction;
pub use status::ErrorPolicy;
pub use status::IoOperation;
pub use status::IoStatus;
pub use status::JobStatus;
pub use status::JobType;
pub use status::JobVerb;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::Notify;
use tokio::sync::broadcast;

use crate::ratelimit::RateLimit;

/// A job's progress: work done (monotonic) and the estimated total.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    /// Adds `bytes` to the work done.
    pub fn add_done(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets the estimated total.
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
    }

    /// Lowers the estimated total (work found unnecessary).
    pub fn remove_work(&self, bytes: u64) {
        let _ = self
            .total
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(bytes))
            });
    }

    /// `(done, total)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

/// A refusal of a job command, in QEMU's words; the QMP class is in `class`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// QMP error class ("GenericError", "DeviceNotActive").
    pub class: &'static str,
    /// Human text.
    pub desc: String,
}

impl JobError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

impl std::error::Error for JobError {}

/// How a job's body ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobFailure {
    /// The job was cancelled.
    Cancelled,
    /// The job failed; the text goes into BLOCK_JOB_COMPLETED's `error`.
    Failed(String),
}

/// The work of one kind of job.
#[async_trait]
pub trait JobDriver: Send + Sync {
    /// The job's body. Returns when done, failed or cancelled; parks at
    /// [`Job::pause_point`] between steps.
    async fn run(&self, job: &Arc<Job>) -> Result<(), JobFailure>;

    /// Speed changes while running.
    fn set_speed(&self, _speed: u64) {}

    /// Called after a successful body, at finalization.
    async fn commit(&self, _job: &Arc<Job>) {}

    /// Called after a failed or cancelled body.
    async fn abort(&self, _job: &Arc<Job>) {}

    /// Called last in both cases (graph changes: removing filters, releasing nodes).
    async fn clean(&self, _job: &Arc<Job>) {}
}

/// Creation options common to all jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobOptions {
    /// Finalize without waiting for `job-finalize`.
    pub auto_finalize: bool,
    /// Disappear once concluded without waiting for `job-dismiss`.
    pub auto_dismiss: bool,
    /// Speed limit in bytes/s (0 = unlimited).
    pub speed: u64,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            auto_finalize: true,
            auto_dismiss: true,
            speed: 0,
        }
    }
}

#[derive(Debug)]
struct JobState {
    status: JobStatus,
    /// Pause requests outstanding (user pauses and error stops).
    pause_count: u32,
    /// Paused by a user or an error action; `resume` clears it.
    user_paused: bool,
    cancelled: bool,
    force: bool,
    io_status: IoStatus,
    error: Option<String>,
    auto_finalize: bool,
    auto_dismiss: bool,
    finalize_requested: bool,
    dismissed: bool,
    busy: bool,
}

/// One job: identity, state, progress and a speed limit.
pub struct Job {
    id: String,
    job_type: JobType,
    state: Mutex<JobState>,
    /// Wakes the body out of a pause or the harness out of pending/concluded waits.
    wake: Notify,
    events: broadcast::Sender<JobEvent>,
    rate: Arc<RateLimit>,
    progress: Arc<Progress>,
    driver: Mutex<Option<Arc<dyn JobDriver>>>,
    registry: std::sync::Weak<RegistryInner>,
    /// The jobs this one completes together with (grouped completion), if any.
    group: Mutex<Option<Arc<CompletionGroup>>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("state", &self.lock())
            .finish()
    }
}

/// `query-block-jobs` entry (QEMU's `BlockJobInfo`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BlockJobInfo {
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Job id.
    pub device: String,
    /// Progress total.
    pub len: u64,
    /// Progress done.
    pub offset: u64,
    /// Doing I/O right now.
    pub busy: bool,
    /// A pause is requested or in effect.
    pub paused: bool,
    /// Speed limit.
    pub speed: u64,
    /// I/O status.
    #[serde(rename = "io-status")]
    pub io_status: IoStatus,
    /// Ready to complete (never for backup).
    pub ready: bool,
    /// Current status.
    pub status: JobStatus,
    /// auto-finalize.
    #[serde(rename = "auto-finalize")]
    pub auto_finalize: bool,
    /// auto-dismiss.
    #[serde(rename = "auto-dismiss")]
    pub auto_dismiss: bool,
    /// Failure text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `query-jobs` entry (QEMU's `JobInfo`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Current status.
    pub status: JobStatus,
    /// Progress done.
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    /// Progress total.
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Failure text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Job {
    fn lock(&self) -> std::sync::MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job type.
    pub fn job_type(&self) -> JobType {
        self.job_type
    }

    /// Current status.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The speed limit shared with the job's copy engine.
    pub fn rate_limit(&self) -> &Arc<RateLimit> {
        &self.rate
    }

    /// The job's progress meter, shared with its copy engine.
    pub fn progress_meter(&self) -> &Arc<Progress> {
        &self.progress
    }

    /// `(done, total)`.
    pub fn progress(&self) -> (u64, u64) {
        self.progress.get()
    }

    /// Whether cancel was requested.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// Resolves once the job is cancelled.
    pub(crate) async fn cancelled(&self) {
        self.wait_for(|s| s.cancelled).await;
    }

    /// Makes the job a member of `group` (before it starts): it completes only when
    /// every member can, and a member failing cancels it.
    pub fn join_group(self: &Arc<Self>, group: &Arc<CompletionGroup>) {
        group.add(self);
        *self.group.lock().unwrap_or_else(|e| e.into_inner()) = Some(group.clone());
    }

    fn group(&self) -> Option<Arc<CompletionGroup>> {
        self.group.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether a pause is requested (the body should reach a pause point soon).
    pub fn pause_requested(&self) -> bool {
        let state = self.lock();
        state.pause_count > 0 && !state.cancelled
    }

    /// A future that resolves when a verb changes the job's state (pause, resume,
    /// cancel, speed); enable it before checking the condition it waits for.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Sets the "doing I/O" flag shown by `query-block-jobs`.
    pub fn set_busy(&self, busy: bool) {
        self.lock().busy = busy;
    }

    fn emit(&self, event: JobEvent) {
        let block_event = !matches!(event, JobEvent::StatusChange { .. });
        if block_event && !self.job_type.is_block_job() {
            return; // generic jobs report only JOB_STATUS_CHANGE
        }
        // No subscribers is fine: events are for whoever listens.
        let _ = self.events.send(event);
    }

    fn transition(&self, state: &mut JobState, to: JobStatus) {
        debug_assert!(state.status.can_become(to), "{:?} -> {to:?}", state.status);
        if !state.status.can_become(to) {
            tracing::error!(
                job = self.id,
                "invalid transition {:?} -> {to:?}",
                state.status
            );
        }
        state.status = to;
        self.emit(JobEvent::StatusChange {
            id: self.id.clone(),
            status: to,
        });
    }

    fn set_status(&self, to: JobStatus) {
        let mut state = self.lock();
        self.transition(&mut state, to);
    }

    fn check_verb(&self, state: &JobState, verb: JobVerb) -> Result<(), JobError> {
        if verb.allowed_in(state.status) {
            Ok(())
        } else {
            Err(JobError::generic(format!(
                "Job '{}' in state '{}' cannot accept command verb '{}'",
                self.id,
                state.status.as_str(),
                verb.as_str()
            )))
        }
    }

    /// `job-pause`.
    pub fn pause(&self) -> Result<(), JobError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Pause)?;
        if state.user_paused {
            return Err(JobError::generic("Job is already paused"));
        }
        state.user_paused = true;
        state.pause_count += 1;
        drop(state);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-resume`; also clears an error stop's io-status.
    pub fn resume(&self) -> Result<(), JobError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Resume)?;
        if !state.user_paused {
            return Err(JobError::generic("Can't resume a job that was not paused"));
        }
        state.user_paused = false;
        state.pause_count -= 1;
        state.io_status = IoStatus::Ok;
        drop(state);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-cancel`; a user pause is lifted so the body can see the cancel.
    pub fn cancel(&self, force: bool) -> Result<(), JobError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Cancel)?;
        if state.user_paused {
            state.user_paused = false;
            state.pause_count -= 1;
        }
        state.cancelled = true;
        state.force |= force;
        drop(state);
        self.wake.notify_waiters();
        Ok(())
    }

    /// Whether a user (or an error stop) has the job paused.
    pub fn is_user_paused(&self) -> bool {
        self.lock().user_paused
    }

    /// `block-job-set-speed`.
    pub fn set_speed(&self, speed: i64) -> Result<(), JobError> {
        {
            let state = self.lock();
            self.check_verb(&state, JobVerb::SetSpeed)?;
        }
        let speed = u64::try_from(speed)
            .map_err(|_| JobError::generic("Parameter 'speed' expects a non-negative value"))?;
        self.rate.set_speed(speed);
        if let Some(driver) = self
            .driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            driver.set_speed(speed);
        }
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-finalize`.
    pub fn finalize(&self) -> Result<(), JobError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Finalize)?;
        state.finalize_requested = true;
        drop(state);
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-dismiss`: a concluded job goes to null and out of the registry.
    pub fn dismiss(&self) -> Result<(), JobError> {
        let mut state = self.lock();
        self.check_verb(&state, JobVerb::Dismiss)?;
        state.dismissed = true;
        self.transition(&mut state, JobStatus::Null);
        drop(state);
        self.unregister();
        self.wake.notify_waiters();
        Ok(())
    }

    /// `job-complete`: backup jobs never become ready, so this always refuses.
    pub fn complete(&self) -> Result<(), JobError> {
        let state = self.lock();
        self.check_verb(&state, JobVerb::Complete)
    }

    fn unregister(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry
                .jobs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
        }
    }

    /// Parks the body while a pause is requested: reports `paused`, waits for resume or
    /// cancel, reports `running` again.
    pub async fn pause_point(&self) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut state = self.lock();
                let wants_pause = state.pause_count > 0 && !state.cancelled;
                match (state.status, wants_pause) {
                    (JobStatus::Running, true) => self.transition(&mut state, JobStatus::Paused),
                    (JobStatus::Paused, false) => {
                        self.transition(&mut state, JobStatus::Running);
                        return;
                    }
                    (_, false) => return,
                    (_, true) => {}
                }
            }
            woken.await;
        }
    }

    /// Applies an error policy to a failed copy: emits BLOCK_JOB_ERROR, and for `stop`
    /// sets the io-status and pauses the job (a resume retries).
    pub fn handle_error(
        &self,
        policy: ErrorPolicy,
        operation: IoOperation,
        errno: i32,
    ) -> ErrorAction {
        let action = match policy {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc | ErrorPolicy::Auto if errno == libc::ENOSPC => ErrorAction::Stop,
            ErrorPolicy::Enospc | ErrorPolicy::Auto => ErrorAction::Report,
        };
        self.emit(JobEvent::Error {
            device: self.id.clone(),
            operation,
            action,
        });
        if action == ErrorAction::Stop {
            let mut state = self.lock();
            state.io_status = if errno == libc::ENOSPC {
                IoStatus::Nospace
            } else {
                IoStatus::Failed
            };
            if !state.user_paused {
                state.user_paused = true;
                state.pause_count += 1;
            }
        }
        action
    }

    /// The `query-block-jobs` view.
    pub fn block_job_info(&self) -> BlockJobInfo {
        let (offset, len) = self.progress();
        let state = self.lock();
        BlockJobInfo {
            job_type: self.job_type,
            device: self.id.clone(),
            len,
            offset,
            busy: state.busy,
            paused: state.pause_count > 0,
            speed: self.rate.speed(),
            io_status: state.io_status,
            ready: false,
            status: state.status,
            auto_finalize: state.auto_finalize,
            auto_dismiss: state.auto_dismiss,
            error: state.error.clone(),
        }
    }

    /// The `query-jobs` view.
    pub fn job_info(&self) -> JobInfo {
        let (current, total) = self.progress();
        let state = self.lock();
        JobInfo {
            id: self.id.clone(),
            job_type: self.job_type,
            status: state.status,
            current_progress: current,
            total_progress: total,
            error: state.error.clone(),
        }
    }

    /// Starts the job's body on the runtime. The returned handle resolves when the job
    /// has concluded (and, with auto-dismiss, gone to null).
    pub fn start(self: &Arc<Self>, driver: Arc<dyn JobDriver>) -> tokio::task::JoinHandle<()> {
        *self.driver.lock().unwrap_or_else(|e| e.into_inner()) = Some(driver.clone());
        let job = self.clone();
        tokio::spawn(async move { job.run_to_end(driver).await })
    }

    /// Waits until `cond(state)` holds, re-checking on every wake.
    async fn wait_for(&self, cond: impl Fn(&JobState) -> bool) {
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if cond(&self.lock()) {
                return;
            }
            woken.await;
        }
    }

    async fn run_to_end(self: Arc<Self>, driver: Arc<dyn JobDriver>) {
        {
            let mut state = self.lock();
            if state.cancelled {
                // Cancelled before it ever ran: QEMU goes straight to null, no event.
                self.transition(&mut state, JobStatus::Aborting);
            } else {
                self.transition(&mut state, JobStatus::Running);
            }
        }
        let mut result = if self.status() == JobStatus::Aborting {
            Err(JobFailure::Cancelled)
        } else {
            let r = driver.run(&self).await;
            // A pause requested at the very end is moot; the job is leaving running.
            if self.status() == JobStatus::Paused {
                self.set_status(JobStatus::Running);
            }
            r
        };
        if result.is_ok() && self.is_cancelled() {
            result = Err(JobFailure::Cancelled);
        }
        let group = self.group();
        if result.is_ok() {
            self.set_status(JobStatus::Waiting);
            if let Some(group) = &group
                && !group.finished_and_wait(&self).await
            {
                result = Err(JobFailure::Cancelled);
            }
        }
        if result.is_ok() {
            self.set_status(JobStatus::Pending);
            let auto_finalize = self.lock().auto_finalize;
            if !auto_finalize {
                self.emit(JobEvent::Pending {
                    job_type: self.job_type,
                    id: self.id.clone(),
                });
                self.wait_for(|s| s.finalize_requested || s.cancelled).await;
                if self.is_cancelled() {
                    result = Err(JobFailure::Cancelled);
                }
            }
        }
        let (offset, len) = self.progress();
        let speed = self.rate.speed();
        match result {
            Ok(()) => {
                driver.commit(&self).await;
                driver.clean(&self).await;
                self.emit(JobEvent::Completed {
                    job_type: self.job_type,
                    device: self.id.clone(),
                    len,
                    offset,
                    speed,
                    error: None,
                });
            }
            Err(failure) => {
                // One member failing or cancelled cancels the whole group.
                if let Some(group) = &group {
                    group.abort(&self);
                }
                self.set_status(JobStatus::Aborting);
                driver.abort(&self).await;
                driver.clean(&self).await;
                let (offset, len) = self.progress();
                match failure {
                    JobFailure::Cancelled => {
                        self.lock().error = Some("Operation canceled".into());
                        self.emit(JobEvent::Cancelled {
                            job_type: self.job_type,
                            device: self.id.clone(),
                            len,
                            offset,
                            speed,
                        });
                    }
                    JobFailure::Failed(message) => {
                        self.lock().error = Some(message.clone());
                        self.emit(JobEvent::Completed {
                            job_type: self.job_type,
                            device: self.id.clone(),
                            len,
                            offset,
                            speed,
                            error: Some(message),
                        });
                    }
                }
            }
        }
        self.set_status(JobStatus::Concluded);
        if self.lock().auto_dismiss {
            self.set_status(JobStatus::Null);
            self.unregister();
        } else {
            self.wait_for(|s| s.dismissed).await;
        }
        *self.driver.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests;
