//! The registry of one daemon's jobs: ids (QEMU's rules), creation, lookup, listing
//! and the event channel every job reports on.

use super::IoStatus;
use super::Job;
use super::JobError;
use super::JobEvent;
use super::JobOptions;
use super::JobState;
use super::JobStatus;
use super::JobType;
use super::Progress;
use crate::ratelimit::RateLimit;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use tokio::sync::Notify;
use tokio::sync::broadcast;

#[derive(Debug)]
pub(super) struct RegistryInner {
    pub(super) jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    pub(super) events: broadcast::Sender<JobEvent>,
}

/// All jobs of a daemon, and the channel their events go out on.
#[derive(Debug, Clone)]
pub struct JobRegistry {
    inner: Arc<RegistryInner>,
}

impl Default for JobRegistry {
    fn default() -> Self {
        Self::new()
    }
}

/// QEMU's id rules: a letter first, then letters, digits, `-`, `.`, `_`.
pub(super) fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl JobRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            inner: Arc::new(RegistryInner {
                jobs: Mutex::new(BTreeMap::new()),
                events,
            }),
        }
    }

    /// Receives every job event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.inner.events.subscribe()
    }

    /// Creates a job in state `created` (emitting JOB_STATUS_CHANGE).
    pub fn create(
        &self,
        id: &str,
        job_type: JobType,
        options: JobOptions,
    ) -> Result<Arc<Job>, JobError> {
        if !id_wellformed(id) {
            return Err(JobError::generic(format!("Invalid job ID '{id}'")));
        }
        let mut jobs = self.inner.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if jobs.contains_key(id) {
            return Err(JobError::generic(format!("Job ID '{id}' already in use")));
        }
        let job = Arc::new(Job {
            id: id.to_string(),
            job_type,
            state: Mutex::new(JobState {
                status: JobStatus::Undefined,
                pause_count: 0,
                user_paused: false,
                cancelled: false,
                force: false,
                io_status: IoStatus::Ok,
                error: None,
                auto_finalize: options.auto_finalize,
                auto_dismiss: options.auto_dismiss,
                finalize_requested: false,
                dismissed: false,
                busy: false,
            }),
            wake: Notify::new(),
            events: self.inner.events.clone(),
            rate: Arc::new(RateLimit::new(options.speed)),
            progress: Arc::new(Progress::default()),
            driver: Mutex::new(None),
            registry: Arc::downgrade(&self.inner),
            group: Mutex::new(None),
        });
        job.set_status(JobStatus::Created);
        jobs.insert(id.to_string(), job.clone());
        Ok(job)
    }

    /// Aborts a created job whose transaction failed before it started: aborting,
    /// concluded, null, as QEMU reports a transaction's prepared jobs on rollback.
    pub fn abort_unstarted(&self, job: &Arc<Job>) {
        job.set_status(JobStatus::Aborting);
        job.set_status(JobStatus::Concluded);
        job.set_status(JobStatus::Null);
        job.unregister();
    }

    /// Removes a job that never started (creation failed half-way): created -> null.
    pub fn discard(&self, job: &Arc<Job>) {
        job.set_status(JobStatus::Null);
        job.unregister();
    }

    /// The job with this id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Every job, by id.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.inner
            .jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
