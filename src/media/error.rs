//! What a purge reports, and why one fails.

use std::io;
use std::path::PathBuf;

use crate::fence::Fenced;

/// What one purge removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PurgeReport {
    /// Objects deleted: files and symlinks on disk, keys on S3.
    pub objects: u64,
    /// Bytes freed (sizes of deleted regular files or objects; links count 0).
    pub bytes: u64,
}

/// Why a purge failed.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    /// The `[media]` config cannot be used.
    #[error("invalid media config: {0}")]
    Config(String),
    /// `instance` or `chat_jid` would not give a safe prefix; nothing was touched.
    #[error("refused media prefix: {0}")]
    InvalidPrefix(String),
    /// A folder on the way to the chat's media is a symlink; nothing was touched.
    #[error("media folder {} goes through a symlink", path.display())]
    SymlinkInPath { path: PathBuf },
    /// The storage failed a listing or a delete, after the retry budget for retryable failures.
    #[error("media storage {op} failed after {}: {detail}", tries(*attempts))]
    Storage {
        op: &'static str,
        attempts: u32,
        /// Short, credential-free description (S3 error code, HTTP status, connection...).
        detail: String,
        retryable: bool,
        #[source]
        source: object_store::Error,
    },
    /// The fence refused the next batch; what was deleted before stays deleted.
    #[error("media purge stopped: {0}")]
    Fenced(Fenced),
    /// A disk operation failed, after the retry budget for retryable failures.
    #[error("media disk {op} of {} failed after {}: {source}", path.display(), tries(*attempts))]
    Disk {
        op: &'static str,
        path: PathBuf,
        attempts: u32,
        #[source]
        source: io::Error,
    },
}

impl MediaError {
    /// True when a later try may succeed (storage down, timeouts, partial batch failures).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Config(_)
            | Self::InvalidPrefix(_)
            | Self::SymlinkInPath { .. }
            | Self::Fenced(_) => false,
            Self::Storage { retryable, .. } => *retryable,
            Self::Disk { source, .. } => io_retryable(source),
        }
    }

    /// Short, public reason: no paths, URLs or credentials (it ends up in a result event).
    pub fn reason(&self) -> String {
        match self {
            Self::Config(_) => "media storage is misconfigured".into(),
            Self::InvalidPrefix(why) => format!("unsafe media prefix ({why})"),
            Self::SymlinkInPath { .. } => "media folder path goes through a symlink".into(),
            Self::Fenced(fenced) => fenced.to_string(),
            Self::Storage {
                op,
                attempts,
                detail,
                ..
            } => format!("storage {op} failed after {} ({detail})", tries(*attempts)),
            Self::Disk {
                op,
                attempts,
                source,
                ..
            } => format!(
                "disk {op} failed after {} ({})",
                tries(*attempts),
                source.kind()
            ),
        }
    }
}

fn tries(n: u32) -> String {
    if n == 1 {
        "1 try".into()
    } else {
        format!("{n} tries")
    }
}

fn io_retryable(e: &io::Error) -> bool {
    !matches!(
        e.kind(),
        io::ErrorKind::PermissionDenied
            | io::ErrorKind::ReadOnlyFilesystem
            | io::ErrorKind::InvalidInput
            | io::ErrorKind::InvalidFilename
            | io::ErrorKind::NotADirectory
    )
}
