//! The ttrpc code a failed restore is answered with.

use std::io;

use containerd_shim::protos::ttrpc::{self, Code};
use podmigrate_checkpoint::archive::ArchiveError;
use podmigrate_checkpoint::creds::CredsError;
use podmigrate_checkpoint::ops::restore::{RestoreError, RestoreFailure};
use podmigrate_checkpoint::rootfs::RootfsError;
use podmigrate_checkpoint::volumes::VolumeError;

use crate::error::status;

/// A failed restore, as the Create RPC answers it.
pub fn answer(err: RestoreError) -> ttrpc::Error {
    status(code(&err.failure), err)
}

/// The ttrpc code the Create RPC answers a restore failure with.
///
/// An archive that is damaged is DATA_LOSS; one this clone may not trust (unsealed on a keyed
/// node, forged, another pod's or another clone's, with credentials beyond the clone's spec,
/// with a diff that reaches out) is PERMISSION_DENIED; one this node cannot restore (no key, an
/// older CRIU, no overlay) is FAILED_PRECONDITION.
pub fn code(failure: &RestoreFailure) -> Code {
    use RestoreFailure::*;
    match failure {
        ArchiveName(_) => Code::INVALID_ARGUMENT,
        WaitTimedOut { .. } => Code::DEADLINE_EXCEEDED,
        Abandoned => Code::CANCELLED,
        Wait(_) | WorkDir { .. } => Code::INTERNAL,
        Key(_) | CriuTooNew(_) | NotOverlay => Code::FAILED_PRECONDITION,
        Archive(e) => archive_code(e),
        NotTheSource { .. } | OtherClone(_) => Code::PERMISSION_DENIED,
        Credentials(e) => match e {
            CredsError::Exceeds { .. } => Code::PERMISSION_DENIED,
            CredsError::NoTasks { .. } | CredsError::Image { .. } => Code::DATA_LOSS,
            CredsError::Spec { .. } => Code::INVALID_ARGUMENT,
            CredsError::Io { .. } => Code::INTERNAL,
        },
        // The daemon or its ticket: this node's CRIU, or a damaged archive.
        Ticket(_) => Code::DATA_LOSS,
        PostCopy(_) => Code::FAILED_PRECONDITION,
        RootfsDiff(e) => match e {
            RootfsError::BadEntry { .. } | RootfsError::BadDeletedList { .. } => {
                Code::PERMISSION_DENIED
            }
            RootfsError::Io { .. } => Code::INTERNAL,
        },
        Volumes(e) => match e {
            VolumeError::Volume {
                source: RootfsError::BadEntry { .. } | RootfsError::BadDeletedList { .. },
                ..
            } => Code::PERMISSION_DENIED,
            VolumeError::Spec { .. } => Code::INVALID_ARGUMENT,
            VolumeError::Volume { .. } | VolumeError::Io { .. } => Code::INTERNAL,
        },
    }
}

fn archive_code(err: &ArchiveError) -> Code {
    use ArchiveError::*;
    match err {
        Io { source, .. } if source.kind() == io::ErrorKind::NotFound => Code::NOT_FOUND,
        Io { .. } | DestinationNotEmpty { .. } => Code::INTERNAL,
        KeyRequired { .. } => Code::FAILED_PRECONDITION,
        NotSealed { .. } | Unauthentic { .. } => Code::PERMISSION_DENIED,
        NotZip { .. }
        | NoManifest { .. }
        | BadManifest { .. }
        | BadEntry { .. }
        | DigestMismatch { .. }
        | UnsupportedFile { .. }
        | BadInput { .. } => Code::DATA_LOSS,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use podmigrate_checkpoint::archive::{KeyError, Source};
    use podmigrate_checkpoint::binding::CloneMismatch;
    use podmigrate_checkpoint::share::ShareError;

    use podmigrate_checkpoint::ops::postcopy::PostCopyError;

    use super::*;
    use crate::config::ENV_ARCHIVE_WAIT;

    const ARCHIVE: &str = "/share/team-a/db-0/db.zip";

    fn io_error(kind: io::ErrorKind) -> io::Error {
        io::Error::from(kind)
    }

    fn archive(err: fn(PathBuf) -> ArchiveError) -> RestoreFailure {
        RestoreFailure::Archive(err(ARCHIVE.into()))
    }

    fn pod(namespace: &str, pod: &str, container: &str) -> Source {
        Source {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
            ..Default::default()
        }
    }

    /// Every failure, the code it is answered with, and a path or name its message must keep.
    fn every_failure() -> Vec<(RestoreFailure, Code, &'static str)> {
        use RestoreFailure::*;
        let timeout = std::time::Duration::from_secs(90);
        vec![
            (
                PostCopy(PostCopyError::DaemonSocket {
                    socket: "/work/restore/ns/c1/checkpoint/lazy-pages.socket".into(),
                    waited: std::time::Duration::from_secs(10),
                    log: String::new(),
                }),
                Code::FAILED_PRECONDITION,
                "lazy-pages.socket",
            ),
            (
                ArchiveName(ShareError::BadName {
                    what: "pod",
                    value: "../etc".into(),
                }),
                Code::INVALID_ARGUMENT,
                "\"../etc\"",
            ),
            (
                WaitTimedOut {
                    error: ShareError::Timeout {
                        path: ARCHIVE.into(),
                        waited: timeout,
                        timeout,
                    },
                    setting: ENV_ARCHIVE_WAIT,
                },
                Code::DEADLINE_EXCEEDED,
                ENV_ARCHIVE_WAIT,
            ),
            (
                Wait(ShareError::Io {
                    op: "looking for",
                    path: ARCHIVE.into(),
                    source: io_error(io::ErrorKind::PermissionDenied),
                }),
                Code::INTERNAL,
                "looking for",
            ),
            (
                Key(KeyError::Invalid {
                    path: "/etc/podmigrate/key".into(),
                    reason: "too short".into(),
                }),
                Code::FAILED_PRECONDITION,
                "/etc/podmigrate/key",
            ),
            (
                archive(|path| ArchiveError::Io {
                    op: "opening",
                    path,
                    source: io_error(io::ErrorKind::NotFound),
                }),
                Code::NOT_FOUND,
                "opening",
            ),
            (
                archive(|path| ArchiveError::Io {
                    op: "reading",
                    path,
                    source: io_error(io::ErrorKind::Other),
                }),
                Code::INTERNAL,
                "reading",
            ),
            (
                archive(|path| ArchiveError::DestinationNotEmpty { path }),
                Code::INTERNAL,
                "not an empty directory",
            ),
            (
                archive(|path| ArchiveError::KeyRequired { path }),
                Code::FAILED_PRECONDITION,
                "no archive key",
            ),
            (
                archive(|path| ArchiveError::NotSealed { path }),
                Code::PERMISSION_DENIED,
                "is not sealed",
            ),
            (
                archive(|path| ArchiveError::Unauthentic {
                    path,
                    what: "the manifest".into(),
                    reason: "forged".into(),
                }),
                Code::PERMISSION_DENIED,
                "failed authentication",
            ),
            (
                archive(|path| ArchiveError::NotZip {
                    path,
                    reason: "truncated".into(),
                }),
                Code::DATA_LOSS,
                "not a valid zip archive",
            ),
            (
                archive(|path| ArchiveError::NoManifest {
                    path,
                    entry: "manifest.json",
                }),
                Code::DATA_LOSS,
                "manifest.json",
            ),
            (
                archive(|path| ArchiveError::BadManifest {
                    path,
                    reason: "bad json".into(),
                }),
                Code::DATA_LOSS,
                "corrupt manifest",
            ),
            (
                archive(|path| ArchiveError::BadEntry {
                    path,
                    name: "checkpoint/pages-1.img".into(),
                    reason: "truncated".into(),
                }),
                Code::DATA_LOSS,
                "entry \"checkpoint/pages-1.img\"",
            ),
            (
                archive(|path| ArchiveError::DigestMismatch {
                    path,
                    name: "checkpoint/pages-1.img".into(),
                    expected: "aa".into(),
                    actual: "bb".into(),
                }),
                Code::DATA_LOSS,
                "SHA-256 mismatch",
            ),
            (
                archive(|dir| ArchiveError::UnsupportedFile {
                    dir,
                    name: "sock".into(),
                    kind: "socket",
                }),
                Code::DATA_LOSS,
                "socket",
            ),
            (
                archive(|path| ArchiveError::BadInput {
                    path,
                    reason: "no such entry".into(),
                }),
                Code::DATA_LOSS,
                "no such entry",
            ),
            (
                CriuTooNew(
                    "the checkpoint was made by CRIU 99.0.0, newer than this node's CRIU 4.0"
                        .into(),
                ),
                Code::FAILED_PRECONDITION,
                "CRIU 99.0.0",
            ),
            (
                NotTheSource {
                    holds: Box::new(pod("team-a", "other", "db")),
                    wanted: Box::new(pod("team-a", "db-0", "db")),
                },
                Code::PERMISSION_DENIED,
                "the archive holds pod team-a/other container db, not the clone's source team-a/db-0 container db",
            ),
            (
                OtherClone(CloneMismatch {
                    made_for: "uid-2".into(),
                    this_pod: "uid-1".into(),
                }),
                Code::PERMISSION_DENIED,
                "uid-2",
            ),
            (
                Credentials(CredsError::Exceeds {
                    tid: "1".into(),
                    comm: "counter".into(),
                    spec: "/bundle/config.json".into(),
                    problems: "uid 0".into(),
                }),
                Code::PERMISSION_DENIED,
                "/bundle/config.json",
            ),
            (
                Credentials(CredsError::NoTasks {
                    dir: "/work/restore/c1/checkpoint".into(),
                }),
                Code::DATA_LOSS,
                "/work/restore/c1/checkpoint",
            ),
            (
                Credentials(CredsError::Image {
                    path: "/work/restore/c1/checkpoint/core-1.img".into(),
                    reason: "short".into(),
                }),
                Code::DATA_LOSS,
                "core-1.img",
            ),
            (
                Credentials(CredsError::Spec {
                    path: "/bundle/config.json".into(),
                    reason: "not JSON".into(),
                }),
                Code::INVALID_ARGUMENT,
                "/bundle/config.json",
            ),
            (
                Credentials(CredsError::Io {
                    path: "/work/restore/c1/checkpoint".into(),
                    source: io_error(io::ErrorKind::Other),
                }),
                Code::INTERNAL,
                "/work/restore/c1/checkpoint",
            ),
            (NotOverlay, Code::FAILED_PRECONDITION, "not an overlay"),
            (
                RootfsDiff(RootfsError::BadEntry {
                    tar: "/work/restore/c1/rootfs-diff.tar".into(),
                    name: "tmp/planted".into(),
                    reason: "lies under tmp, a symbolic link earlier in this diff".into(),
                }),
                Code::PERMISSION_DENIED,
                "tmp/planted",
            ),
            (
                RootfsDiff(RootfsError::BadDeletedList {
                    path: "/work/restore/c1/deleted.files".into(),
                    reason: "absolute path".into(),
                }),
                Code::PERMISSION_DENIED,
                "deleted.files",
            ),
            (
                RootfsDiff(RootfsError::Io {
                    op: "writing",
                    path: "/upper/tmp/count".into(),
                    source: io_error(io::ErrorKind::StorageFull),
                }),
                Code::INTERNAL,
                "/upper/tmp/count",
            ),
            (
                WorkDir {
                    op: "clearing",
                    path: "/work/restore/team-a/c1".into(),
                    error: io_error(io::ErrorKind::PermissionDenied),
                },
                Code::INTERNAL,
                "/work/restore/team-a/c1",
            ),
        ]
    }

    #[test]
    fn each_failure_has_its_code_and_names_the_clone_archive_and_path() {
        for (failure, code, named) in every_failure() {
            let err = RestoreError {
                namespace: "team-a".into(),
                pod: "db-0-clone".into(),
                container: "db".into(),
                archive: ARCHIVE.into(),
                failure: Box::new(failure),
            };
            assert_eq!(super::code(&err.failure), code, "{err}");
            let message = err.to_string();
            assert!(
                message.starts_with(&format!(
                    "restoring db of clone pod team-a/db-0-clone from {ARCHIVE}: "
                )),
                "{message}"
            );
            assert!(message.contains(named), "expected {named:?} in: {message}");
            assert!(!message.contains('\n'), "one line: {message}");
            match answer(err) {
                ttrpc::Error::RpcStatus(s) => {
                    assert_eq!(s.code(), code);
                    assert!(s.message.starts_with(crate::BINARY_NAME), "{}", s.message);
                    assert!(s.message.ends_with(&message), "{}", s.message);
                }
                other => panic!("not a status: {other:?}"),
            }
        }
    }
}
