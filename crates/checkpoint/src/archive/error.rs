use std::io;
use std::path::PathBuf;

/// Everything that can go wrong packing, reading or unpacking an archive. Each variant names the
/// path (and entry) it concerns, because the message is often all an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path}: not a valid zip archive (missing, truncated or corrupt): {reason}")]
    NotZip { path: PathBuf, reason: String },
    #[error("{path}: not a podmigrate archive: no {entry} entry")]
    NoManifest { path: PathBuf, entry: &'static str },
    #[error("{path}: corrupt manifest: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("{path}: entry {name:?}: {reason}")]
    BadEntry {
        path: PathBuf,
        name: String,
        reason: String,
    },
    #[error(
        "{path}: entry {name:?}: SHA-256 mismatch (manifest says {expected}, content is {actual})"
    )]
    DigestMismatch {
        path: PathBuf,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{dir}: {name:?} is a {kind}; a checkpoint directory may hold only regular files and directories")]
    UnsupportedFile {
        dir: PathBuf,
        name: String,
        kind: &'static str,
    },
    #[error("{path}: {reason}")]
    BadInput { path: PathBuf, reason: String },
    #[error("{path}: destination exists and is not an empty directory")]
    DestinationNotEmpty { path: PathBuf },
    #[error("{path}: the archive is sealed (encrypted and authenticated) and this node has no archive key to open it; configure the cluster's key (PODMIGRATE_KEY_FILE, or --key-file)")]
    KeyRequired { path: PathBuf },
    #[error("{path}: the archive is not sealed, and a node with an archive key refuses unsealed archives (they could be forged)")]
    NotSealed { path: PathBuf },
    #[error("{path}: {what} failed authentication ({reason}); the archive is refused")]
    Unauthentic {
        path: PathBuf,
        what: String,
        reason: String,
    },
}

impl ArchiveError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| ArchiveError::Io { op, path, source }
    }

    pub(crate) fn bad_entry(
        path: impl Into<PathBuf>,
        name: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ArchiveError::BadEntry {
            path: path.into(),
            name: name.into(),
            reason: reason.into(),
        }
    }

    /// A sealed archive that did not authenticate.
    pub(crate) fn unauthentic(
        path: impl Into<PathBuf>,
        what: impl Into<String>,
        problem: super::seal::SealProblem,
    ) -> Self {
        use super::seal::SealProblem;
        let reason = match problem {
            SealProblem::Envelope(reason) => reason,
            SealProblem::OtherKey { archive, node } => {
                format!("sealed with another key: key id {archive}, this node's key id {node}")
            }
            SealProblem::Forged => {
                "altered or damaged since it was sealed, or sealed with another key".to_string()
            }
        };
        ArchiveError::Unauthentic {
            path: path.into(),
            what: what.into(),
            reason,
        }
    }

    pub(crate) fn bad_manifest(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        ArchiveError::BadManifest {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
