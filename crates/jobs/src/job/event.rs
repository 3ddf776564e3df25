//! Job events, with QEMU's names and payloads (JOB_STATUS_CHANGE, BLOCK_JOB_*).

use super::ErrorAction;
use super::IoOperation;
use super::JobStatus;
use super::JobType;
use serde_json::Value;
use serde_json::json;

/// A job event, with exactly QEMU's payload.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// `JOB_STATUS_CHANGE {id, status}`.
    StatusChange {
        /// Job id.
        id: String,
        /// New status.
        status: JobStatus,
    },
    /// `BLOCK_JOB_COMPLETED {type, device, len, offset, speed, error?}`.
    Completed {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit in bytes/s.
        speed: u64,
        /// Failure text, only on failure.
        error: Option<String>,
    },
    /// `BLOCK_JOB_CANCELLED {type, device, len, offset, speed}`.
    Cancelled {
        /// Job type.
        job_type: JobType,
        /// Job id.
        device: String,
        /// Progress total.
        len: u64,
        /// Progress done.
        offset: u64,
        /// Speed limit in bytes/s.
        speed: u64,
    },
    /// `BLOCK_JOB_ERROR {device, operation, action}`.
    Error {
        /// Job id.
        device: String,
        /// Read (source) or write (target).
        operation: IoOperation,
        /// What the policy decided.
        action: ErrorAction,
    },
    /// `BLOCK_JOB_PENDING {type, id}` (only when auto-finalize is off).
    Pending {
        /// Job type.
        job_type: JobType,
        /// Job id.
        id: String,
    },
}

impl JobEvent {
    /// The QMP event name.
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::StatusChange { .. } => "JOB_STATUS_CHANGE",
            JobEvent::Completed { .. } => "BLOCK_JOB_COMPLETED",
            JobEvent::Cancelled { .. } => "BLOCK_JOB_CANCELLED",
            JobEvent::Error { .. } => "BLOCK_JOB_ERROR",
            JobEvent::Pending { .. } => "BLOCK_JOB_PENDING",
        }
    }

    /// The QMP `data` member.
    pub fn data(&self) -> Value {
        match self {
            JobEvent::StatusChange { id, status } => json!({"id": id, "status": status}),
            JobEvent::Completed {
                job_type,
                device,
                len,
                offset,
                speed,
                error,
            } => {
                let mut data = json!({"type": job_type, "device": device, "len": len,
                    "offset": offset, "speed": speed});
                if let Some(error) = error {
                    data["error"] = json!(error);
                }
                data
            }
            JobEvent::Cancelled {
                job_type,
                device,
                len,
                offset,
                speed,
            } => {
                json!({"type": job_type, "device": device, "len": len, "offset": offset,
                    "speed": speed})
            }
            JobEvent::Error {
                device,
                operation,
                action,
            } => {
                json!({"device": device, "operation": operation, "action": action})
            }
            JobEvent::Pending { job_type, id } => json!({"type": job_type, "id": id}),
        }
    }
}
