//! The commit record: what the source's shim knows once an archive is committed (its manifest
//! digest, its size, what the checkpoint took), written beside the archive so the source's agent
//! reads it instead of opening the archive again.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{commit_record_path, read_record, write_record, ShareError};

/// One committed archive, as its shim saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// The clone the archive was made for (empty when none was named): a record for another
    /// clone is a leftover, never this migration's.
    pub clone_pod_uid: String,
    /// SHA-256 of the archive's manifest, hex.
    pub manifest_sha256: String,
    /// The archive's size on the share.
    pub archive_bytes: u64,
    /// CRIU's dump, pages packed onto the share as they came.
    pub dump_ms: u64,
    /// The rootfs diff and the rest of the checkpoint directory.
    pub diff_ms: u64,
    /// What packing added once the dump was done.
    pub pack_ms: u64,
    /// When the archive was committed, Unix milliseconds.
    pub committed_unix_ms: u64,
}

/// Writes `record` beside `archive`, atomically (temporary name, rename), mode 0600.
pub fn write_commit_record(archive: &Path, record: &CommitRecord) -> Result<PathBuf, ShareError> {
    write_record(
        commit_record_path(archive),
        "writing the commit record",
        record,
    )
}

/// The commit record of `archive` made for clone `clone_pod_uid`: `None` when there is none,
/// or when it belongs to another migration.
pub fn read_commit_record(
    archive: &Path,
    clone_pod_uid: &str,
) -> Result<Option<CommitRecord>, ShareError> {
    let record: Option<CommitRecord> =
        read_record(commit_record_path(archive), "reading the commit record")?;
    Ok(record.filter(|r| r.clone_pod_uid == clone_pod_uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uid: &str) -> CommitRecord {
        CommitRecord {
            clone_pod_uid: uid.into(),
            manifest_sha256: "ab".repeat(32),
            archive_bytes: 4096,
            dump_ms: 10,
            diff_ms: 2,
            pack_ms: 1,
            committed_unix_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn a_record_round_trips_for_its_clone_only() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("app.zip");
        assert_eq!(read_commit_record(&archive, "uid-1").unwrap(), None);
        let path = write_commit_record(&archive, &record("uid-1")).unwrap();
        assert_eq!(path, dir.path().join(".app.commit"));
        assert_eq!(
            read_commit_record(&archive, "uid-1").unwrap(),
            Some(record("uid-1"))
        );
        // Another migration's record is a leftover.
        assert_eq!(read_commit_record(&archive, "uid-2").unwrap(), None);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Nothing else is left beside it.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_garbled_record_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("app.zip");
        std::fs::write(commit_record_path(&archive), b"{").unwrap();
        let err = read_commit_record(&archive, "uid-1").unwrap_err();
        assert!(err.to_string().contains(".app.commit"), "{err}");
    }
}
