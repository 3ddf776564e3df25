//! The block layer's one error type.
//!
//! Callers branch on [`ErrorKind`]; people read the message, which carries the context
//! (`node`, `offset`, `op`) in the words QEMU uses where a QMP client may show it. The
//! kind maps to a QMP error class ([`Error::qmp_class`]), an NBD error value
//! ([`Error::nbd_errno`]) and a POSIX errno ([`Error::errno`]), so every front end
//! reports the same failure the same way.

use std::fmt;
use std::io;

/// Result type of the block layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, for control flow. Sorted alphabetically.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The node or resource is in use by someone else.
    Busy,
    /// On-disk metadata is inconsistent.
    Corrupt,
    /// The request or option is malformed.
    InvalidArgument,
    /// An I/O error from below (the errno, if any, is in the source).
    Io,
    /// The target or host filesystem is full.
    NoSpace,
    /// A named node, file or object does not exist.
    NotFound,
    /// The request addresses bytes outside the device.
    OutOfBounds,
    /// The node is read-only, or the OS refused access.
    PermissionDenied,
    /// The operation or option is valid but not implemented here.
    Unsupported,
}

/// A block-layer error: a kind, a human message with context, and an optional cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

// The errno values the kinds map to, from libc (NBD's error codes use the same numbers).
use libc::EBUSY;
use libc::EINVAL;
use libc::EIO;
use libc::ENOENT;
use libc::ENOSPC;
use libc::ENOTSUP;
use libc::EPERM;

impl Error {
    /// An error of `kind` with a message (no underlying cause).
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An error caused by an OS error; the kind follows the errno (ENOSPC -> NoSpace...).
    pub fn from_io(message: impl Into<String>, err: io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::NoSpace,
            Some(libc::ENOENT) => ErrorKind::NotFound,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                ErrorKind::PermissionDenied
            }
            Some(libc::EINVAL) => ErrorKind::InvalidArgument,
            Some(libc::EOPNOTSUPP) => ErrorKind::Unsupported,
            Some(libc::EBUSY) => ErrorKind::Busy,
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            message: message.into(),
            source: Some(Box::new(err)),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// The kind, for callers that branch on the failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with more context (`"Could not open 'x'"` ...).
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The QMP error class (`qapi/error.json`) a monitor reports this as. QEMU uses
    /// GenericError for nearly every block-layer failure, including missing nodes.
    pub fn qmp_class(&self) -> &'static str {
        "GenericError"
    }

    /// The OS's errno, when an OS error caused this one.
    pub fn os_errno(&self) -> Option<i32> {
        self.source
            .as_ref()
            .and_then(|s| s.downcast_ref::<io::Error>())
            .and_then(io::Error::raw_os_error)
    }

    /// The POSIX errno this error stands for: the OS's own when there is one.
    pub fn errno(&self) -> i32 {
        if let Some(errno) = self.os_errno() {
            return errno;
        }
        match self.kind {
            ErrorKind::Busy => EBUSY,
            ErrorKind::Corrupt | ErrorKind::Io => EIO,
            ErrorKind::InvalidArgument | ErrorKind::OutOfBounds => EINVAL,
            ErrorKind::NoSpace => ENOSPC,
            ErrorKind::NotFound => ENOENT,
            ErrorKind::PermissionDenied => EPERM,
            ErrorKind::Unsupported => ENOTSUP,
        }
    }

    /// The error value an NBD server sends for this failure (NBD proto.md, "Error
    /// values"): only EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP and
    /// ESHUTDOWN exist on the wire, so everything else becomes EIO or EINVAL.
    pub fn nbd_errno(&self) -> u32 {
        match self.errno() {
            e @ (EPERM
            | EINVAL
            | ENOSPC
            | ENOTSUP
            | libc::ENOMEM
            | libc::EOVERFLOW
            | libc::ESHUTDOWN) => e as u32,
            libc::EACCES | libc::EROFS => EPERM as u32,
            libc::EDQUOT => ENOSPC as u32,
            _ => EIO as u32,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {}", io_message(source.as_ref()))?;
        }
        Ok(())
    }
}

/// An OS error's text without Rust's " (os error N)" suffix, as QEMU prints it
/// ("No space left on device"). The one place that knows Rust's format.
pub fn os_error_text(error: &dyn std::fmt::Display) -> String {
    let text = error.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn io_message(source: &(dyn std::error::Error + 'static)) -> String {
    os_error_text(source)
}

/// The cause is already part of the message (QMP and NBD clients see one string), so
/// it is not also exposed as `source()`, where error reporters would print it twice.
impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_errno_and_pick_a_kind() {
        let err = Error::from_io(
            "failed to write",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(err.kind(), ErrorKind::NoSpace);
        assert_eq!(err.errno(), libc::ENOSPC);
        assert_eq!(err.nbd_errno(), 28);
        assert_eq!(err.to_string(), "failed to write: No space left on device");
    }

    #[test]
    fn errnos_nbd_cannot_carry_become_eio_or_eperm() {
        let err = Error::from_io("x", io::Error::from_raw_os_error(libc::EBADF));
        assert_eq!(err.nbd_errno(), 5);
        let err = Error::from_io("x", io::Error::from_raw_os_error(libc::EROFS));
        assert_eq!(err.nbd_errno(), 1);
        assert_eq!(Error::new(ErrorKind::OutOfBounds, "x").nbd_errno(), 22);
        assert_eq!(Error::new(ErrorKind::Unsupported, "x").nbd_errno(), 95);
    }

    #[test]
    fn context_reads_like_qemu() {
        let err = Error::from_io(
            "Could not open 'x'",
            io::Error::from_raw_os_error(libc::ENOENT),
        )
        .context("Could not open 'x'");
        assert_eq!(
            err.to_string(),
            "Could not open 'x': Could not open 'x': No such file or directory"
        );
        assert_eq!(err.qmp_class(), "GenericError");
    }
}
