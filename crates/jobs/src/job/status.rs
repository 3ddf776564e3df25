//! QEMU's job state machine and verb table, and the small enums jobs report:
//! types, I/O status, error policies and actions.

use serde::Serialize;

/// QEMU's `JobStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Not yet created (never observable).
    Undefined,
    /// Exists, not started.
    Created,
    /// Working.
    Running,
    /// Parked at a pause point.
    Paused,
    /// Ready to complete (mirror-style jobs only).
    Ready,
    /// Paused while ready.
    Standby,
    /// Own work done, waiting for the transaction.
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failing or cancelled.
    Aborting,
    /// Finished; waiting to be dismissed.
    Concluded,
    /// Gone.
    Null,
}

impl JobStatus {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// QEMU's transition table (job.c, `JobSTT`).
    pub fn can_become(self, to: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }
}

/// A command verb applied to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobVerb {
    /// `job-cancel`, `block-job-cancel`.
    Cancel,
    /// `job-pause`.
    Pause,
    /// `job-resume`.
    Resume,
    /// `block-job-set-speed`.
    SetSpeed,
    /// `job-complete`.
    Complete,
    /// `job-finalize`.
    Finalize,
    /// `job-dismiss`.
    Dismiss,
}

impl JobVerb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
        }
    }

    /// QEMU's verb table (job.c, `JobVerbTable`).
    pub fn allowed_in(self, status: JobStatus) -> bool {
        use JobStatus::*;
        match self {
            JobVerb::Cancel => {
                matches!(
                    status,
                    Created | Running | Paused | Ready | Standby | Waiting | Pending
                )
            }
            JobVerb::Pause | JobVerb::Resume | JobVerb::SetSpeed => {
                matches!(status, Created | Running | Paused | Ready | Standby)
            }
            JobVerb::Complete => matches!(status, Ready | Standby),
            JobVerb::Finalize => status == Pending,
            JobVerb::Dismiss => status == Concluded,
        }
    }
}

/// QEMU's `JobType` (the kinds Stillpoint has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobType {
    /// A backup job.
    Backup,
    /// `block-stream`: a backing chain's data copied into the top image.
    Stream,
    /// `blockdev-create`: formats an image; not a block job (no BLOCK_JOB_* events).
    Create,
}

impl JobType {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Backup => "backup",
            JobType::Stream => "stream",
            JobType::Create => "create",
        }
    }

    /// Whether it is a block job: listed by query-block-jobs, reported with
    /// BLOCK_JOB_COMPLETED / CANCELLED / PENDING events.
    pub fn is_block_job(self) -> bool {
        matches!(self, JobType::Backup | JobType::Stream)
    }
}

/// QEMU's `BlockDeviceIoStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoStatus {
    /// No error.
    Ok,
    /// Stopped on an I/O error.
    Failed,
    /// Stopped on ENOSPC.
    Nospace,
}

/// `on-source-error` / `on-target-error` (QEMU's `BlockdevOnError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorPolicy {
    /// Fail the job.
    #[default]
    Report,
    /// Report the error and retry.
    Ignore,
    /// Stop on ENOSPC, report anything else.
    Enospc,
    /// Pause the job until resumed, then retry.
    Stop,
    /// As `enospc` for jobs.
    Auto,
}

/// What was done about one error (QEMU's `BlockErrorAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorAction {
    /// Retried.
    Ignore,
    /// The job fails.
    Report,
    /// The job pauses.
    Stop,
}

/// Which side of a copy failed (QEMU's `IoOperationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IoOperation {
    /// Reading the source.
    Read,
    /// Writing the target.
    Write,
}
