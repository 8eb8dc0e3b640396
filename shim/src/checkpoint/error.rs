//! What can fail in a checkpoint, and the ttrpc code each failure is answered with.

use std::io;
use std::path::PathBuf;

use containerd_shim::protos::protobuf;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::Status;
use podmigrate_checkpoint::bandwidth::BandwidthError;
use podmigrate_checkpoint::ops::checkpoint::CheckpointError as ArchiveFailure;
use podmigrate_checkpoint::ops::postcopy::PostCopyError;
use podmigrate_vocabulary::{BANDWIDTH, RUNC_CHECKPOINT_OPTIONS_TYPE_URL};

use crate::config::ENV_BANDWIDTH;
use crate::error::{delegate_code, describe_ttrpc_error, status};

/// A checkpoint that failed, naming the container; the container was left as it was.
#[derive(Debug, thiserror::Error)]
#[error("checkpointing {container}: {failure}")]
pub struct CheckpointError {
    /// `pod <namespace>/<pod> container <name>`, or `container <id>` for one this shim does
    /// not know.
    pub container: String,
    pub failure: Box<CheckpointFailure>,
}

impl CheckpointError {
    pub fn new(container: impl Into<String>, failure: CheckpointFailure) -> Self {
        CheckpointError {
            container: container.into(),
            failure: Box::new(failure),
        }
    }

    pub fn code(&self) -> Code {
        self.failure.code()
    }
}

impl From<CheckpointError> for ttrpc::Error {
    fn from(err: CheckpointError) -> Self {
        status(err.code(), err)
    }
}

/// What failed, and on which path.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointFailure {
    /// No container of this id was created through this shim.
    #[error("it is not managed by this shim")]
    NotManaged,

    /// Pause containers hold no state of the pod's.
    #[error("it is a pod sandbox; only app containers are checkpointed")]
    Sandbox,

    /// The request's options are of another type than runc's `CheckpointOptions`.
    #[error(
        "reading checkpoint options: options of type {type_url:?}; only \
         {RUNC_CHECKPOINT_OPTIONS_TYPE_URL} is understood"
    )]
    OptionsType { type_url: String },

    /// The request's runc `CheckpointOptions` do not decode.
    #[error("reading checkpoint options ({type_url}): {error}")]
    OptionsUnreadable {
        type_url: String,
        error: protobuf::Error,
    },

    /// The node's bandwidth setting is malformed.
    #[error("reading {ENV_BANDWIDTH}: {0}")]
    NodeBandwidth(BandwidthError),

    /// The pod's bandwidth annotation is malformed.
    #[error("reading annotation {BANDWIDTH}: {0}")]
    PodBandwidth(BandwidthError),

    /// The task is neither running nor paused.
    #[error("checking the task state: the task is {status:?}; only a running or paused container can be checkpointed")]
    TaskState { status: Status },

    /// The directory the checkpoint is to be written to holds something already.
    #[error("preparing the checkpoint directory: {dir} exists and is not empty")]
    DirNotEmpty { dir: PathBuf },

    /// The runc shim failed a call (`step`) other than the dump, or could not be reached.
    #[error("{step}: {}", describe_ttrpc_error(.error))]
    Delegate {
        step: &'static str,
        error: ttrpc::Error,
    },

    /// CRIU's dump failed (through the runc shim); `criu` holds its log's last error lines.
    #[error("dumping with CRIU: {}", with_criu_lines(.error, .criu))]
    Dump { error: ttrpc::Error, criu: String },

    /// Post-copy's lazy dump (runc itself) or its page stream could not start; `criu` holds
    /// CRIU's last error lines.
    #[error("dumping lazily for post-copy: {error}{}", if .criu.is_empty() { String::new() } else { format!("; CRIU: {}", .criu) })]
    LazyDump {
        error: Box<PostCopyError>,
        criu: String,
    },

    /// The container's main process was gone once dumped: it was stopped meanwhile.
    #[error("checking the container after the dump: its process {pid} is gone ({error}): it was stopped during the checkpoint")]
    Stopped { pid: u32, error: io::Error },

    /// The container was asked to stop while it was frozen; its restore would only die.
    #[error("checking the container after the dump: it was asked to stop during the checkpoint ({signal} pending), so the checkpoint would restore a dying process")]
    StopPending { signal: &'static str },

    /// A local directory of the checkpoint could not be made.
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// The dump's options do not encode.
    #[error("encoding checkpoint options: {0}")]
    EncodeOptions(protobuf::Error),

    /// Making the archive around the dump failed (see
    /// [`podmigrate_checkpoint::ops::checkpoint`]).
    #[error("{0}")]
    Archive(#[from] ArchiveFailure),
}

impl CheckpointFailure {
    /// The ttrpc code the Checkpoint RPC answers this failure with.
    pub fn code(&self) -> Code {
        use CheckpointFailure::*;
        match self {
            NotManaged => Code::NOT_FOUND,
            OptionsType { .. }
            | OptionsUnreadable { .. }
            | PodBandwidth(_)
            | Archive(ArchiveFailure::ArchiveName(_)) => Code::INVALID_ARGUMENT,
            DirNotEmpty { .. } => Code::ALREADY_EXISTS,
            // The node's own settings, or the task's state, do not allow a checkpoint.
            Sandbox
            | TaskState { .. }
            | Stopped { .. }
            | StopPending { .. }
            | NodeBandwidth(_)
            | Archive(ArchiveFailure::Key(_)) => Code::FAILED_PRECONDITION,
            // The runc shim's own verdict, or UNAVAILABLE when it could not be reached.
            Delegate { error, .. } => delegate_code(error),
            Dump { error, .. } => match error {
                ttrpc::Error::RpcStatus(_) => Code::INTERNAL,
                _ => Code::UNAVAILABLE,
            },
            // A share or local disk that fails, the packer, a file of the checkpoint.
            Io { .. } | EncodeOptions(_) | Archive(_) | LazyDump { .. } => Code::INTERNAL,
        }
    }
}

fn with_criu_lines(error: &ttrpc::Error, criu: &str) -> String {
    let reason = describe_ttrpc_error(error);
    if criu.is_empty() {
        reason
    } else {
        format!("{reason}; CRIU: {criu}")
    }
}

#[cfg(test)]
mod tests {
    use podmigrate_checkpoint::archive::{ArchiveError, KeyError};
    use podmigrate_checkpoint::binding::BindingError;
    use podmigrate_checkpoint::layout::LayoutError;
    use podmigrate_checkpoint::rootfs::RootfsError;
    use podmigrate_checkpoint::share::ShareError;

    use super::*;

    const CONTAINER: &str = "pod team-a/db-0 container db";

    fn io_error() -> io::Error {
        io::Error::from(io::ErrorKind::NotADirectory)
    }

    fn runc_says(code: Code, message: &str) -> ttrpc::Error {
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }

    fn bandwidth_error() -> BandwidthError {
        podmigrate_checkpoint::bandwidth::Bandwidth::parse("lots").unwrap_err()
    }

    fn share_io(path: &str) -> ShareError {
        ShareError::Io {
            op: "creating",
            path: path.into(),
            source: io_error(),
        }
    }

    /// Every failure, the code it is answered with, and a path or name its message must keep.
    fn every_failure() -> Vec<(CheckpointFailure, Code, &'static str)> {
        use CheckpointFailure::*;
        let archive_error = |path: &str| ArchiveError::Io {
            op: "writing",
            path: path.into(),
            source: io_error(),
        };
        vec![
            (NotManaged, Code::NOT_FOUND, "not managed"),
            (Sandbox, Code::FAILED_PRECONDITION, "pod sandbox"),
            (
                OptionsType {
                    type_url: "runtimeoptions.v1.Options".into(),
                },
                Code::INVALID_ARGUMENT,
                "runtimeoptions.v1.Options",
            ),
            (
                OptionsUnreadable {
                    type_url: RUNC_CHECKPOINT_OPTIONS_TYPE_URL.into(),
                    error: protobuf::Error::from(io_error()),
                },
                Code::INVALID_ARGUMENT,
                RUNC_CHECKPOINT_OPTIONS_TYPE_URL,
            ),
            (
                NodeBandwidth(bandwidth_error()),
                Code::FAILED_PRECONDITION,
                ENV_BANDWIDTH,
            ),
            (
                PodBandwidth(bandwidth_error()),
                Code::INVALID_ARGUMENT,
                BANDWIDTH,
            ),
            (
                TaskState {
                    status: Status::STOPPED,
                },
                Code::FAILED_PRECONDITION,
                "STOPPED",
            ),
            (
                DirNotEmpty {
                    dir: "/var/lib/x/ck".into(),
                },
                Code::ALREADY_EXISTS,
                "/var/lib/x/ck",
            ),
            (
                Delegate {
                    step: "pausing",
                    error: runc_says(Code::NOT_FOUND, "container c1 not found"),
                },
                Code::NOT_FOUND,
                "container c1 not found",
            ),
            (
                Delegate {
                    step: "pausing",
                    error: ttrpc::Error::RemoteClosed,
                },
                Code::UNAVAILABLE,
                "pausing",
            ),
            (
                Dump {
                    error: runc_says(Code::UNKNOWN, "runc checkpoint failed"),
                    criu: "Error (criu/sk-inet.c:199): inet: Connected TCP socket".into(),
                },
                Code::INTERNAL,
                "criu/sk-inet.c:199",
            ),
            (
                Dump {
                    error: ttrpc::Error::RemoteClosed,
                    criu: String::new(),
                },
                Code::UNAVAILABLE,
                "dumping with CRIU",
            ),
            (
                LazyDump {
                    error: Box::new(PostCopyError::Cancelled),
                    criu: "Error (criu/page-xfer.c:1209): Can't read pagemap from socket".into(),
                },
                Code::INTERNAL,
                "page-xfer.c:1209",
            ),
            (
                Stopped {
                    pid: 4242,
                    error: io_error(),
                },
                Code::FAILED_PRECONDITION,
                "4242",
            ),
            (
                StopPending { signal: "SIGTERM" },
                Code::FAILED_PRECONDITION,
                "SIGTERM",
            ),
            (
                Io {
                    op: "creating",
                    path: "/work/criu/c1-1".into(),
                    error: io_error(),
                },
                Code::INTERNAL,
                "/work/criu/c1-1",
            ),
            (
                Archive(ArchiveFailure::Key(KeyError::Invalid {
                    path: "/etc/podmigrate/key".into(),
                    reason: "too short".into(),
                })),
                Code::FAILED_PRECONDITION,
                "/etc/podmigrate/key",
            ),
            (
                EncodeOptions(protobuf::Error::from(io_error())),
                Code::INTERNAL,
                "encoding checkpoint options",
            ),
            (
                Archive(ArchiveFailure::ArchiveName(ShareError::BadName {
                    what: "pod",
                    value: "..".into(),
                })),
                Code::INVALID_ARGUMENT,
                "\"..\"",
            ),
            (
                Archive(ArchiveFailure::ArchiveDir(share_io("/share/team-a/db-0"))),
                Code::INTERNAL,
                "/share/team-a/db-0",
            ),
            (
                Archive(ArchiveFailure::Leases(BindingError::ReadLeases {
                    path: "/share/team-a/db-0".into(),
                    source: io_error(),
                })),
                Code::INTERNAL,
                "/share/team-a/db-0",
            ),
            (
                Archive(ArchiveFailure::PagesPipe(archive_error(
                    "/work/ck/checkpoint/pages-1.img",
                ))),
                Code::INTERNAL,
                "/work/ck/checkpoint/pages-1.img",
            ),
            (
                Archive(ArchiveFailure::ConfigDump(LayoutError::Write {
                    path: "/work/ck/config.dump".into(),
                    source: io_error(),
                })),
                Code::INTERNAL,
                "/work/ck/config.dump",
            ),
            (
                Archive(ArchiveFailure::RootfsDiff(RootfsError::Io {
                    op: "reading",
                    path: "/upper/etc".into(),
                    source: io_error(),
                })),
                Code::INTERNAL,
                "/upper/etc",
            ),
            (
                Archive(ArchiveFailure::Pack(archive_error(
                    "/share/team-a/db-0/.db.zip.tmp-1",
                ))),
                Code::INTERNAL,
                "/share/team-a/db-0/.db.zip.tmp-1",
            ),
            (
                Archive(ArchiveFailure::CommitRecord(share_io(
                    "/share/team-a/db-0/.db.commit",
                ))),
                Code::INTERNAL,
                "/share/team-a/db-0/.db.commit",
            ),
        ]
    }

    #[test]
    fn each_failure_has_its_code_and_names_the_container_and_path() {
        for (failure, code, named) in every_failure() {
            let err = CheckpointError::new(CONTAINER, failure);
            assert_eq!(err.code(), code, "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!("checkpointing {CONTAINER}: ")),
                "{message}"
            );
            assert!(message.contains(named), "expected {named:?} in: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
            match ttrpc::Error::from(err) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code);
                    assert!(s.message.starts_with(crate::BINARY_NAME), "{}", s.message);
                    assert!(s.message.ends_with(&message), "{}", s.message);
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }

    #[test]
    fn a_dump_failure_carries_criu_s_own_lines_when_there_are_any() {
        let dump = |criu: &str| CheckpointFailure::Dump {
            error: runc_says(Code::UNKNOWN, "runc checkpoint failed"),
            criu: criu.into(),
        };
        assert_eq!(
            dump("").to_string(),
            "dumping with CRIU: runc checkpoint failed"
        );
        assert_eq!(
            dump("(00.4) Error: Dumping FAILED.").to_string(),
            "dumping with CRIU: runc checkpoint failed; CRIU: (00.4) Error: Dumping FAILED."
        );
    }
}
