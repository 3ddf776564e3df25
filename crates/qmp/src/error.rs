//! QMP errors: a class (`GenericError`, `CommandNotFound`, `DeviceNotFound`...) and
//! QEMU's human description, converted from the block layer's and the jobs' errors.

use jobs::job::JobError;
use serde_json::Value;

/// A QMP error: class and human description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// QEMU's error class ("GenericError", "CommandNotFound", "DeviceNotActive").
    pub class: &'static str,
    /// Human text.
    pub desc: String,
}

impl QmpError {
    /// A GenericError.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

impl From<block::Error> for QmpError {
    fn from(e: block::Error) -> Self {
        Self {
            class: e.qmp_class(),
            desc: e.to_string(),
        }
    }
}

impl From<JobError> for QmpError {
    fn from(e: JobError) -> Self {
        Self {
            class: e.class,
            desc: e.desc,
        }
    }
}

/// What a command answers: its return value or a QMP error.
pub type Reply = Result<Value, QmpError>;
