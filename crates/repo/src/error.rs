//! Repository errors: what went wrong, in one line a user can act on.

use std::io;

/// A repository operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The backend could not read or write (a full disk, permissions, a dead server).
    #[error("{what}: {cause}")]
    Io {
        /// What was being done ("writing packs/ab/abcd.pack").
        what: String,
        /// The cause, part of the message (not a separate source, or reporters that
        /// print the chain would say it twice).
        cause: io::Error,
    },
    /// A repository file is damaged: it does not parse, or its content does not match
    /// its id or checksum. Never restored silently.
    #[error("damaged repository file {key}: {why}")]
    Damaged {
        /// The object's key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// Something asked for does not exist (a snapshot, a chunk, the repository).
    #[error("{0}")]
    NotFound(String),
    /// A request that cannot be honoured (a bad chunk size, a size mismatch).
    #[error("{0}")]
    Invalid(String),
}

/// The repository's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: impl Into<String>, cause: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause,
        }
    }

    pub(crate) fn damaged(key: &str, why: impl Into<String>) -> Self {
        Error::Damaged {
            key: key.to_string(),
            why: why.into(),
        }
    }
}
