//! The share protocol: every name on the share, and every record the nodes leave there for
//! each other. The shims, the agent, the CLI and GC all name share paths through this module
//! and no other.
//!
//! One directory per source pod, `<share>/<namespace>/<pod>/`, holds:
//!
//! | name | written by | read by | what |
//! |---|---|---|---|
//! | `<container>.zip` | source's shim (rename = commit) | clone's shim | the archive |
//! | `.<container>.zip.tmp-<pid>-<ns>` | source's shim | agent (progress), GC | an archive being packed |
//! | `.<container>.commit` | source's shim, after the commit | source's agent | [`CommitRecord`]: digest, bytes, timings |
//! | `.<container>.pages` | source's shim, in post-copy | source's agent | [`PagesRecord`]: the page stream's progress and end |
//! | `.lease-<clone-uid>.json` | source's agent | GC | [`crate::gc::Lease`]: a migration in flight |
//! | `.<container>.prepare` | source's agent | clone's shim | memory to reserve ([`crate::prefault`]) |
//! | `.<container>.prepared` | clone's shim | source's agent | the reservation is made (or not needed), and whether the clone's node has userfaultfd |
//! | `<container>.zip.keep`, `.keep` | agent, operator | GC | pins an archive, or the directory |
//!
//! The writer commits an archive by renaming it into place (see [`crate::archive::pack`]), so a
//! reader that sees the final name sees a complete archive; hidden names are never archives.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod commit;
mod pages;
pub use commit::{read_commit_record, write_commit_record, CommitRecord};
pub use pages::{read_pages_record, write_pages_record, PagesRecord, PagesState};

/// An archive's extension.
const ARCHIVE_SUFFIX: &str = ".zip";
/// Leases are hidden files with this prefix in a pod's share directory.
pub const LEASE_PREFIX: &str = ".lease-";
/// A pin: `<archive>.keep`, or this name in a pod directory or work unit.
pub const KEEP: &str = ".keep";
/// What follows an archive's name in its temporary names.
const TEMP_MARK: &str = ".tmp-";
const COMMIT_SUFFIX: &str = ".commit";
const PAGES_SUFFIX: &str = ".pages";
const PREPARE_SUFFIX: &str = ".prepare";
const PREPARED_SUFFIX: &str = ".prepared";

/// Default mount point of the share on every node.
pub const DEFAULT_SHARE_ROOT: &str = "/var/lib/podmigrate/share";
/// Default node-local work space (CRIU images, unpacked archives).
pub const DEFAULT_WORK_DIR: &str = "/var/lib/podmigrate/work";
/// The work directory's restore markers: `<work>/restored/<pod-uid>/<container>`, one per
/// clone container restored on this node (see [`restored_marker`]).
pub const RESTORED_DIR: &str = "restored";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("{what} {value:?} cannot name a path (empty, '.', '..' or contains '/')")]
    BadName { what: &'static str, value: String },
    #[error("timed out after {waited:?} waiting for archive {path} (limit {timeout:?})")]
    Timeout {
        path: PathBuf,
        waited: Duration,
        timeout: Duration,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stopped waiting for archive {path}: {reason}")]
    Cancelled { path: PathBuf, reason: String },
}

/// Kubernetes names are DNS labels/subdomains, but the values come from annotations, so check
/// they cannot walk out of the share.
fn component<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ShareError> {
    if value.is_empty()
        || value == "."
        || value == ".."
        || value.contains('/')
        || value.contains('\0')
    {
        return Err(ShareError::BadName {
            what,
            value: value.to_string(),
        });
    }
    Ok(value)
}

/// The directory of one pod's archives (and of the leases of its migrations).
pub fn pod_dir(share_root: &Path, namespace: &str, pod: &str) -> Result<PathBuf, ShareError> {
    Ok(share_root
        .join(component("namespace", namespace)?)
        .join(component("pod", pod)?))
}

/// The archive of one container of one pod.
pub fn archive_path(
    share_root: &Path,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<PathBuf, ShareError> {
    Ok(pod_dir(share_root, namespace, pod)?
        .join(format!("{}.zip", component("container", container)?)))
}

/// Whether a file name in a pod directory is a (committed) archive.
pub fn is_archive_name(name: &str) -> bool {
    name.ends_with(ARCHIVE_SUFFIX) && !name.starts_with('.')
}

/// A hidden name beside `archive`, unique to this process and moment, to pack it under.
pub fn temp_archive_path(archive: &Path) -> Option<PathBuf> {
    let file_name = archive.file_name()?.to_str()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    Some(archive.with_file_name(format!(
        ".{file_name}{TEMP_MARK}{}-{nanos:09}",
        std::process::id()
    )))
}

/// Whether a file name is an archive being packed (or an interrupted pack's leftover).
pub fn is_temp_archive_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(&format!("{ARCHIVE_SUFFIX}{TEMP_MARK}"))
}

/// Bytes written so far to the archives of `container` being packed in `pod_dir` (0 when none
/// is): the agent's measure of a checkpoint's progress.
pub fn packing_bytes(pod_dir: &Path, container: &str) -> u64 {
    let prefix = format!(".{container}{ARCHIVE_SUFFIX}{TEMP_MARK}");
    std::fs::read_dir(pod_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Writes the JSON record `record` (`what` names it in errors) at `path`, atomically
/// (temporary name, rename), mode 0600.
fn write_record<T: serde::Serialize>(
    path: PathBuf,
    what: &'static str,
    record: &T,
) -> Result<PathBuf, ShareError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = PathBuf::from(temp);
    let body = serde_json::to_vec(record).expect("a share record serializes");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .and_then(|mut file| file.write_all(&body))
        .map_err(|source| ShareError::Io {
            op: what,
            path: temp.clone(),
            source,
        })?;
    std::fs::rename(&temp, &path).map_err(|source| ShareError::Io {
        op: what,
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Reads the JSON record at `path` (`what` names it in errors); `None` when there is none.
fn read_record<T: serde::de::DeserializeOwned>(
    path: PathBuf,
    what: &'static str,
) -> Result<Option<T>, ShareError> {
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ShareError::Io {
                op: what,
                path,
                source,
            })
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ShareError::Io {
            op: what,
            path,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
}

/// The commit record of `archive` (see [`CommitRecord`]).
pub fn commit_record_path(archive: &Path) -> PathBuf {
    record_path(archive, COMMIT_SUFFIX)
}

/// `.<container><suffix>` beside `archive`: a record the shim keeps of it.
fn record_path(archive: &Path, suffix: &str) -> PathBuf {
    let stem = archive
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = stem.strip_suffix(ARCHIVE_SUFFIX).unwrap_or(&stem);
    archive.with_file_name(format!(".{stem}{suffix}"))
}

/// The page stream record of `archive` (see [`PagesRecord`]).
pub fn pages_record_path(archive: &Path) -> PathBuf {
    record_path(archive, PAGES_SUFFIX)
}

/// Whether a file name is a scratch record of a migration (a commit or page stream record, a
/// reservation handshake), which GC removes by the age limit of temporary files.
pub fn is_scratch_name(name: &str) -> bool {
    name.starts_with('.')
        && [COMMIT_SUFFIX, PAGES_SUFFIX, PREPARE_SUFFIX, PREPARED_SUFFIX]
            .iter()
            .any(|suffix| name.ends_with(suffix))
}

/// The lease of the migration to the clone with uid `clone_uid`, in the source's `pod_dir`.
pub fn lease_path(pod_dir: &Path, clone_uid: &str) -> PathBuf {
    pod_dir.join(format!("{LEASE_PREFIX}{clone_uid}.json"))
}

/// The temporary name a lease is written under before its rename.
pub fn lease_temp_path(pod_dir: &Path, clone_uid: &str) -> PathBuf {
    pod_dir.join(format!(".{LEASE_PREFIX}{clone_uid}.json.tmp"))
}

/// The clone uid a lease's file name holds, if `name` is a lease's.
pub fn lease_clone_uid(name: &str) -> Option<&str> {
    name.strip_prefix(LEASE_PREFIX)?.strip_suffix(".json")
}

/// The pin that keeps `archive` from GC.
pub fn pin_path(archive: &Path) -> PathBuf {
    let mut pin = archive.as_os_str().to_owned();
    pin.push(KEEP);
    PathBuf::from(pin)
}

/// The memory the source's agent announces for `container`'s clone to reserve.
pub fn expectation_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!(".{container}{PREPARE_SUFFIX}"))
}

/// The clone's shim's answer: the reservation for `container` is made.
pub fn ready_path(pod_dir: &Path, container: &str) -> PathBuf {
    pod_dir.join(format!(".{container}{PREPARED_SUFFIX}"))
}

/// Whether a file name is one of the reservation handshake's.
pub fn is_reservation_name(name: &str) -> bool {
    name.starts_with('.') && (name.ends_with(PREPARE_SUFFIX) || name.ends_with(PREPARED_SUFFIX))
}

/// The restore markers of the pod with uid `pod_uid`, relative to the work directory: one
/// unit for gc, which keeps it while the pod exists.
pub fn restored_unit(pod_uid: &str) -> Result<PathBuf, ShareError> {
    Ok(Path::new(RESTORED_DIR).join(component("pod uid", pod_uid)?))
}

/// The marker that says container `container` of the pod with uid `pod_uid` was restored on
/// this node, under work directory `work_dir`. Kubelet never reuses a pod uid, and restarts a
/// container under the same uid and name: a later Create of that container starts it fresh.
pub fn restored_marker(
    work_dir: &Path,
    pod_uid: &str,
    container: &str,
) -> Result<PathBuf, ShareError> {
    Ok(work_dir
        .join(restored_unit(pod_uid)?)
        .join(component("container", container)?))
}

/// Creates the directories between the share root and `archive` (namespace, then pod), mode
/// 0700: archives are 0600 and only root on the nodes reads them, so other users need not
/// even see which pods were checkpointed. Directories that exist are left as they are.
pub fn create_archive_dir(share_root: &Path, archive: &Path) -> Result<(), ShareError> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = archive.parent().unwrap_or(share_root);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|source| ShareError::Io {
            op: "creating",
            path: parent.to_path_buf(),
            source,
        })
}

/// Waits until `path` exists, polling, for at most `timeout`. `progress` is called about every
/// `progress_every` with the time waited so far, so a long wait shows in the logs; returning
/// `Err(reason)` from it cancels the wait.
pub fn wait_for_archive(
    path: &Path,
    timeout: Duration,
    progress_every: Duration,
    mut progress: impl FnMut(Duration) -> Result<(), String>,
) -> Result<(), ShareError> {
    let started = Instant::now();
    let mut next_report = progress_every;
    loop {
        match std::fs::metadata(path) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(ShareError::Io {
                    op: "checking",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let waited = started.elapsed();
        if waited >= timeout {
            return Err(ShareError::Timeout {
                path: path.to_path_buf(),
                waited,
                timeout,
            });
        }
        if waited >= next_report {
            next_report += progress_every;
            progress(waited).map_err(|reason| ShareError::Cancelled {
                path: path.to_path_buf(),
                reason,
            })?;
        }
        std::thread::sleep(Duration::from_millis(50).min(timeout - waited));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_are_namespaced_and_refuse_traversal() {
        let root = Path::new("/share");
        assert_eq!(
            archive_path(root, "default", "counter", "app").unwrap(),
            Path::new("/share/default/counter/app.zip")
        );
        for (ns, pod, c) in [
            ("..", "p", "c"),
            ("ns", "a/b", "c"),
            ("ns", "p", ""),
            ("ns", ".", "c"),
        ] {
            assert!(archive_path(root, ns, pod, c).is_err(), "{ns}/{pod}/{c}");
        }
    }

    #[test]
    fn restore_markers_are_per_pod_uid_and_container_and_refuse_traversal() {
        let work = Path::new("/work");
        assert_eq!(
            restored_marker(work, "uid-1", "app").unwrap(),
            Path::new("/work/restored/uid-1/app")
        );
        assert_eq!(restored_unit("uid-1").unwrap(), Path::new("restored/uid-1"));
        for (uid, c) in [("", "app"), ("..", "app"), ("uid-1", "a/b"), ("uid-1", ".")] {
            assert!(restored_marker(work, uid, c).is_err(), "{uid}/{c}");
        }
    }

    #[test]
    fn every_name_in_a_pod_directory_is_told_apart() {
        let archive = Path::new("/share/ns/pod/app.zip");
        let temp = temp_archive_path(archive).unwrap();
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name(&temp).starts_with(".app.zip.tmp-"), "{temp:?}");
        assert_eq!(temp.parent(), archive.parent());
        let record = commit_record_path(archive);
        assert_eq!(record, Path::new("/share/ns/pod/.app.commit"));
        let lease = lease_path(Path::new("/share/ns/pod"), "uid-1");
        assert_eq!(lease_clone_uid(&name(&lease)), Some("uid-1"));
        assert_eq!(pin_path(archive), Path::new("/share/ns/pod/app.zip.keep"));
        let pod = Path::new("/share/ns/pod");
        let (prepare, prepared) = (expectation_path(pod, "app"), ready_path(pod, "app"));
        for (path, archive_, temp_, scratch, reservation) in [
            (archive.to_path_buf(), true, false, false, false),
            (temp, false, true, false, false),
            (record, false, false, true, false),
            (lease, false, false, false, false),
            (prepare, false, false, true, true),
            (prepared, false, false, true, true),
            (pin_path(archive), false, false, false, false),
        ] {
            let n = name(&path);
            assert_eq!(is_archive_name(&n), archive_, "{n}");
            assert_eq!(is_temp_archive_name(&n), temp_, "{n}");
            assert_eq!(is_scratch_name(&n), scratch, "{n}");
            assert_eq!(is_reservation_name(&n), reservation, "{n}");
        }
    }

    #[test]
    fn packing_bytes_sums_the_containers_temporary_archives_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".app.zip.tmp-1-000000001"), [0u8; 300]).unwrap();
        std::fs::write(dir.path().join(".other.zip.tmp-1-000000001"), [0u8; 50]).unwrap();
        std::fs::write(dir.path().join("app.zip"), [0u8; 7]).unwrap();
        assert_eq!(packing_bytes(dir.path(), "app"), 300);
        assert_eq!(packing_bytes(dir.path(), "none"), 0);
    }

    #[test]
    fn archive_directories_are_per_namespace_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let share = tempfile::tempdir().unwrap();
        let archive = archive_path(share.path(), "team-a", "counter", "app").unwrap();
        create_archive_dir(share.path(), &archive).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&share.path().join("team-a")), 0o700);
        assert_eq!(mode(&share.path().join("team-a/counter")), 0o700);
        // Idempotent: a second checkpoint of the same pod finds them there.
        create_archive_dir(share.path(), &archive).unwrap();
    }

    #[test]
    fn waiting_finds_a_late_archive_and_times_out_on_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.zip");
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                std::fs::write(path, b"x").unwrap();
            })
        };
        let mut reports = 0;
        wait_for_archive(
            &path,
            Duration::from_secs(5),
            Duration::from_millis(50),
            |_| {
                reports += 1;
                Ok(())
            },
        )
        .unwrap();
        writer.join().unwrap();
        assert!(reports >= 1);

        let err = wait_for_archive(
            &dir.path().join("never.zip"),
            Duration::from_millis(150),
            Duration::from_secs(1),
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("timed out") && err.to_string().contains("never.zip"),
            "{err}"
        );

        let err = wait_for_archive(
            &dir.path().join("never.zip"),
            Duration::from_secs(5),
            Duration::from_millis(20),
            |_| Err("container deleted".into()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("container deleted"), "{err}");
    }
}
