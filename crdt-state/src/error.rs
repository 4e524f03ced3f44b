//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong in `crdt-state`. Each variant says what
/// happened and, where there is one, what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A manifest could not be accepted.
    #[error("{0}")]
    Manifest(#[from] crate::fleet::manifest::ManifestError),

    /// A change was refused by verification; nothing of it was applied.
    #[error("rejected change {hash} for document {doc}: {reason}")]
    Rejected {
        /// Document the change was meant for.
        doc: String,
        /// Hex hash of the change (or `?` when it could not be decoded).
        hash: String,
        /// Why it was refused.
        reason: String,
    },

    /// The store file could not be opened or read.
    #[error("store {path}: {reason}")]
    Store {
        /// Path of the store file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// A stored document could not be decoded.
    #[error("document {doc} in the store is corrupt: {reason}")]
    CorruptDocument {
        /// The document id.
        doc: String,
        /// The decoder's complaint.
        reason: String,
    },

    /// A bundle file could not be decoded or verified; nothing was imported.
    #[error("bundle refused: {0}")]
    Bundle(String),

    /// A certificate or identity file is invalid.
    #[error("identity: {0}")]
    Identity(String),

    /// The data directory is not in the state the operation needs.
    #[error("data dir {path}: {reason}")]
    DataDir {
        /// The data directory.
        path: PathBuf,
        /// What is wrong and what to do.
        reason: String,
    },

    /// The caller is not allowed to do this.
    #[error("not allowed: {0}")]
    NotAllowed(String),

    /// Something asked for does not exist.
    #[error("not found: {0}")]
    NotFound(String),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },

    /// Automerge refused an operation (a bug in Shoal if it ever shows).
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
