//! Which clone an archive was made for.
//!
//! The source's agent writes a lease, `<share>/<ns>/<source>/.lease-<clone-uid>.json`, naming
//! the clone pod before it freezes the source. At pack time the shim records that uid in the
//! manifest (`Source.clone_pod_uid`); at restore the clone's shim compares it with its own pod's
//! uid, so that a clone still waiting for its source's archive never restores one committed
//! for a later migration of the same source. An archive that records no clone (a checkpoint
//! taken by hand, with `ctr` or through containerd's API, without an agent's lease) stays
//! restorable by any clone of its source.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::gc::{Lease, PageStreamPlan};
use crate::share::lease_clone_uid;

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("reading the leases in {path}: {source}")]
    ReadLeases { path: PathBuf, source: io::Error },
}

/// The migration a checkpoint is made for, as its lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackFor {
    pub clone_pod_uid: String,
    /// Post-copy: where the page stream runs (see [`PageStreamPlan`]).
    pub page_stream: Option<PageStreamPlan>,
}

/// The migration a checkpoint of the pod whose share directory is `pod_dir` is made for: the
/// clone uid named by its live lease, with the lease's page stream plan, or `None` when it has
/// no lease (the directory may not exist yet).
///
/// Expired and unreadable leases are ignored. Should several live leases be found (an agent
/// that crashed mid-migration and never came back leaves one until its deadline), the newest
/// one (by modification time) names the clone: the agent writes it just before it freezes the
/// source for the migration being packed now.
pub fn clone_for_pack(pod_dir: &Path, now: SystemTime) -> Result<Option<PackFor>, BindingError> {
    let err = |source| BindingError::ReadLeases {
        path: pod_dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(pod_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let mut live: Vec<(SystemTime, String, Option<PageStreamPlan>)> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(uid) = lease_clone_uid(&name).filter(|uid| !uid.is_empty()) else {
            continue;
        };
        let path = entry.path();
        // symlink_metadata: a link is not a lease the agent wrote.
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => meta,
            _ => continue,
        };
        let lease = fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Lease>(&bytes).ok());
        match lease {
            Some(lease) if lease.deadline_unix_ms > now_ms => live.push((
                meta.modified().unwrap_or(UNIX_EPOCH),
                uid.to_string(),
                lease.page_stream,
            )),
            Some(_) => {}
            None => {
                warn!(lease = %path.display(), "unreadable lease ignored when naming the clone an archive is made for")
            }
        }
    }
    live.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    if live.len() > 1 {
        warn!(
            pod_dir = %pod_dir.display(),
            clones = ?live.iter().map(|(_, uid, _)| uid.as_str()).collect::<Vec<_>>(),
            "several live leases; the archive is made for the newest"
        );
    }
    Ok(live.pop().map(|(_, clone_pod_uid, page_stream)| PackFor {
        clone_pod_uid,
        page_stream,
    }))
}

/// Why a clone may not restore an archive made for another clone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the archive was made for clone pod uid {made_for}, not for this pod (uid {this_pod}): \
     it belongs to another migration of the same source"
)]
pub struct CloneMismatch {
    pub made_for: String,
    /// This pod's uid ("none" when the runtime gave it none).
    pub this_pod: String,
}

/// Whether the pod with uid `this_pod` may restore an archive made for `made_for` (the
/// manifest's `clone_pod_uid`; empty when the archive records no clone).
pub fn check_restore(made_for: &str, this_pod: &str) -> Result<(), CloneMismatch> {
    if made_for.is_empty() || made_for == this_pod {
        return Ok(());
    }
    Err(CloneMismatch {
        made_for: made_for.to_string(),
        this_pod: if this_pod.is_empty() {
            "none".to_string()
        } else {
            this_pod.to_string()
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::gc::write_lease;
    use crate::share::lease_path;

    fn lease(deadline: SystemTime) -> Lease {
        Lease {
            holder: "agent on node-a for clone default/counter-x".into(),
            deadline_unix_ms: deadline.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64,
            work_units: vec![],
            page_stream: None,
        }
    }

    fn set_mtime(path: &Path, t: SystemTime) {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn no_directory_or_no_lease_records_no_clone() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        assert_eq!(
            clone_for_pack(&tmp.path().join("absent"), now).unwrap(),
            None
        );
        fs::write(tmp.path().join("counter.zip"), b"x").unwrap();
        fs::write(tmp.path().join("..lease-tmp.json.tmp"), b"{").unwrap();
        assert_eq!(clone_for_pack(tmp.path(), now).unwrap(), None);
    }

    #[test]
    fn the_live_lease_names_the_clone_and_expired_or_broken_ones_do_not() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        write_lease(tmp.path(), "old-uid", &lease(now - Duration::from_secs(1))).unwrap();
        fs::write(tmp.path().join(".lease-garbage.json"), b"not json").unwrap();
        assert_eq!(clone_for_pack(tmp.path(), now).unwrap(), None);
        write_lease(tmp.path(), "uid-b", &lease(now + Duration::from_secs(600))).unwrap();
        assert_eq!(
            clone_for_pack(tmp.path(), now)
                .unwrap()
                .map(|p| p.clone_pod_uid)
                .as_deref(),
            Some("uid-b")
        );
    }

    #[test]
    fn of_several_live_leases_the_newest_names_the_clone() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let later = now + Duration::from_secs(600);
        write_lease(tmp.path(), "uid-new", &lease(later)).unwrap();
        write_lease(tmp.path(), "uid-old", &lease(later)).unwrap();
        set_mtime(
            &lease_path(tmp.path(), "uid-old"),
            now - Duration::from_secs(60),
        );
        set_mtime(&lease_path(tmp.path(), "uid-new"), now);
        assert_eq!(
            clone_for_pack(tmp.path(), now)
                .unwrap()
                .map(|p| p.clone_pod_uid)
                .as_deref(),
            Some("uid-new")
        );
    }

    #[test]
    fn a_lease_carries_its_page_stream_plan() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let plan = PageStreamPlan {
            listen: "10.0.0.2".parse().unwrap(),
            peer: Some("10.0.0.3".parse().unwrap()),
        };
        let mut postcopy = lease(now + Duration::from_secs(600));
        postcopy.page_stream = Some(plan.clone());
        write_lease(tmp.path(), "uid-p", &postcopy).unwrap();
        assert_eq!(
            clone_for_pack(tmp.path(), now).unwrap(),
            Some(PackFor {
                clone_pod_uid: "uid-p".into(),
                page_stream: Some(plan)
            })
        );
    }

    #[test]
    fn a_linked_lease_is_not_a_lease() {
        let tmp = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let elsewhere = tmp.path().join("elsewhere.json");
        fs::write(
            &elsewhere,
            serde_json::to_vec(&lease(now + Duration::from_secs(600))).unwrap(),
        )
        .unwrap();
        let dir = tmp.path().join("pod");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.join(".lease-linked.json")).unwrap();
        assert_eq!(clone_for_pack(&dir, now).unwrap(), None);
    }

    #[test]
    fn an_unreadable_share_directory_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("share-is-a-file");
        fs::write(&file, b"x").unwrap();
        let err = clone_for_pack(&file, SystemTime::now())
            .unwrap_err()
            .to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
    }

    #[test]
    fn a_clone_restores_only_an_archive_made_for_it_or_for_no_one() {
        assert_eq!(check_restore("", "uid-a"), Ok(()));
        assert_eq!(check_restore("", ""), Ok(()));
        assert_eq!(check_restore("uid-a", "uid-a"), Ok(()));
        let err = check_restore("uid-b", "uid-a").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the archive was made for clone pod uid uid-b, not for this pod (uid uid-a): \
             it belongs to another migration of the same source"
        );
        // A pod the runtime gave no uid cannot prove it is the clone an archive names.
        assert_eq!(check_restore("uid-b", "").unwrap_err().this_pod, "none");
    }
}
