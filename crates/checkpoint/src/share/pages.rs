//! The page stream record: in post-copy, the source's shim says how much of the lazy memory the
//! clone holds, and how the stream ended. Written beside the archive, rewritten as the pages
//! move; the source's agent reads it to follow the migration and to retire the source only once
//! the clone holds every page.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{pages_record_path, read_record, write_record, ShareError};

/// Where a page stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PagesState {
    /// The source serves pages; the clone may not have connected yet.
    Streaming,
    /// The clone holds every page: the source may go.
    Complete,
    /// The stream broke before the clone held every page; the source still holds them all.
    Failed,
}

/// One container's page stream, as its source's shim sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesRecord {
    /// The clone the stream serves: a record for another clone is a leftover.
    pub clone_pod_uid: String,
    pub state: PagesState,
    /// Bytes sent to the clone so far (pages and CRIU's headers).
    pub moved_bytes: u64,
    /// The lazy memory's size, as measured at the freeze.
    pub total_bytes: u64,
    /// Why a failed stream failed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// When the record was written, Unix milliseconds.
    pub updated_unix_ms: u64,
}

/// Writes `record` beside `archive`, atomically (temporary name, rename), mode 0600.
pub fn write_pages_record(archive: &Path, record: &PagesRecord) -> Result<PathBuf, ShareError> {
    write_record(
        pages_record_path(archive),
        "writing the page stream record",
        record,
    )
}

/// The page stream record of `archive` for clone `clone_pod_uid`: `None` when there is none
/// yet, or when it belongs to another migration.
pub fn read_pages_record(
    archive: &Path,
    clone_pod_uid: &str,
) -> Result<Option<PagesRecord>, ShareError> {
    let record: Option<PagesRecord> =
        read_record(pages_record_path(archive), "reading the page stream record")?;
    Ok(record.filter(|r| r.clone_pod_uid == clone_pod_uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_for_its_clone_only() {
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("app.zip");
        assert_eq!(read_pages_record(&archive, "uid-1").unwrap(), None);
        let record = PagesRecord {
            clone_pod_uid: "uid-1".into(),
            state: PagesState::Failed,
            moved_bytes: 10,
            total_bytes: 20,
            reason: "the clone's node went away".into(),
            updated_unix_ms: 1,
        };
        let path = write_pages_record(&archive, &record).unwrap();
        assert_eq!(path, dir.path().join(".app.pages"));
        assert_eq!(read_pages_record(&archive, "uid-1").unwrap(), Some(record));
        assert_eq!(read_pages_record(&archive, "uid-2").unwrap(), None);
        assert!(crate::share::is_scratch_name(".app.pages"));
    }
}
