//! Where archives live on the share, and how a reader waits for one.
//!
//! Layout: `<share>/<namespace>/<pod>/<container>.zip`. The writer commits an archive by renaming
//! it into place (see [`crate::archive::pack`]), so a reader that sees the final name sees a
//! complete archive; temporary names start with a dot and are never matched.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
