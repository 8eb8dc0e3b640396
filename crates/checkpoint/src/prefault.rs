//! Preparing the target's memory before the source is frozen.
//!
//! A restore writes the unpacked pages image into fresh memory (the memory-backed work space),
//! and first touching fresh memory costs the kernel (and, in a VM whose host takes freed memory
//! back, the host) page allocation and zeroing: about 2.8 s per GiB on this project's VMs. That
//! cost does not have to fall in the downtime. Before freezing the source, its agent announces
//! how large the main process's memory is; the clone's shim, already waiting for the archive,
//! reserves that much in its work space and says it is ready; the agent waits (bounded) for
//! that, then freezes. The unpack later writes the pages image into the reserved file.
//!
//! Both files live in the source pod's directory on the share, next to the lease, named by
//! [`crate::share`]: the expectation (the clone's uid and a byte count) and the ready mark (the
//! clone's uid). They only ever speed things up: a missing, stale or garbled file means no
//! reservation, never a failed migration.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::share::{expectation_path, is_reservation_name, ready_path};

#[derive(Debug, thiserror::Error)]
pub enum PrefaultError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PrefaultError + 'a {
    move |source| PrefaultError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What the source announces for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expectation {
    /// The clone the migration is for: a reservation is made only by that clone's shim.
    pub clone_pod_uid: String,
    /// About how large the container's pages image will be.
    pub bytes: u64,
    /// The migration asks for post-copy: a clone whose node can restore lazily reserves
    /// nothing (its pages arrive after it resumes) and says so at once.
    pub postcopy: bool,
}

/// What the clone's shim says when it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readiness {
    /// The clone's node can restore lazily (it has userfaultfd): post-copy is possible.
    pub userfaultfd: bool,
}

/// The word in an expectation asking for post-copy.
const POSTCOPY_WORD: &str = "postcopy";
/// The word in a ready mark saying the clone's node has userfaultfd.
const USERFAULTFD_WORD: &str = "userfaultfd";

/// Writes `path` atomically (temporary name, rename), mode 0600.
fn write_atomically(path: &Path, content: &str) -> Result<(), PrefaultError> {
    let temp = path.with_extension("tmp-write");
    fs::write(&temp, content)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&temp, fs::Permissions::from_mode(0o600))
        })
        .map_err(io_error("writing", &temp))?;
    fs::rename(&temp, path).map_err(io_error("renaming into place", path))
}

/// The source's side: announces what the clone's shim should reserve.
pub fn announce(
    pod_dir: &Path,
    container: &str,
    expectation: &Expectation,
) -> Result<(), PrefaultError> {
    let _ = fs::remove_file(ready_path(pod_dir, container));
    write_atomically(
        &expectation_path(pod_dir, container),
        &format!(
            "{} {}{}\n",
            expectation.clone_pod_uid,
            expectation.bytes,
            if expectation.postcopy {
                format!(" {POSTCOPY_WORD}")
            } else {
                String::new()
            }
        ),
    )
}

/// The announcement for `clone_pod_uid`, if there is one (another clone's is ignored).
pub fn expectation(pod_dir: &Path, container: &str, clone_pod_uid: &str) -> Option<Expectation> {
    let text = fs::read_to_string(expectation_path(pod_dir, container)).ok()?;
    let mut words = text.split_whitespace();
    let (uid, bytes) = (words.next()?, words.next()?);
    if uid.is_empty() || uid != clone_pod_uid {
        return None;
    }
    Some(Expectation {
        clone_pod_uid: uid.to_string(),
        bytes: bytes.parse().ok()?,
        postcopy: words.next() == Some(POSTCOPY_WORD),
    })
}

/// The target's side: says the reservation for `clone_pod_uid` is made (or, in post-copy,
/// not needed), and whether this node can restore lazily.
pub fn mark_ready(
    pod_dir: &Path,
    container: &str,
    clone_pod_uid: &str,
    readiness: Readiness,
) -> Result<(), PrefaultError> {
    let userfaultfd = if readiness.userfaultfd {
        format!(" {USERFAULTFD_WORD}")
    } else {
        String::new()
    };
    write_atomically(
        &ready_path(pod_dir, container),
        &format!("{clone_pod_uid}{userfaultfd}\n"),
    )
}

/// The clone's ready mark for `clone_pod_uid`, if it wrote one.
pub fn readiness(pod_dir: &Path, container: &str, clone_pod_uid: &str) -> Option<Readiness> {
    let text = fs::read_to_string(ready_path(pod_dir, container)).ok()?;
    let mut words = text.split_whitespace();
    if clone_pod_uid.is_empty() || words.next()? != clone_pod_uid {
        return None;
    }
    Some(Readiness {
        userfaultfd: words.any(|w| w == USERFAULTFD_WORD),
    })
}

/// Whether this kernel lets this process make a userfaultfd, which a lazy (post-copy) restore
/// needs.
pub fn userfaultfd_available() -> bool {
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` is the descriptor just made, owned by nobody else.
    unsafe { libc::close(fd as libc::c_int) };
    true
}

/// Removes the announcements and ready marks of the migration to `clone_pod_uid`, whatever
/// its containers, once the checkpoint is taken or abandoned. A waiting clone takes the
/// withdrawal as the end of the migration and releases what it reserved.
pub fn withdraw(pod_dir: &Path, clone_pod_uid: &str) {
    let Ok(entries) = fs::read_dir(pod_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !is_reservation_name(&name) {
            continue;
        }
        let ours = fs::read_to_string(entry.path())
            .is_ok_and(|text| text.split_whitespace().next() == Some(clone_pod_uid));
        if ours {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The anonymous memory of process `pid` (`RssAnon`): what CRIU writes to its pages image.
pub fn process_memory(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Reserves `bytes` in directory `dir` (made if missing): a file with no name (`O_TMPFILE`),
/// allocated and written once (zeros), since allocating alone leaves tmpfs pages to be cleared,
/// and a VM's host to back them, at their first write, which would then still fall in the
/// downtime. Having no name, it is freed with its last descriptor, whatever becomes of the
/// process holding it; unpack gives it a name when it adopts it.
pub fn reserve(dir: &Path, bytes: u64) -> Result<File, PrefaultError> {
    fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .map_err(io_error("creating an unnamed file in", dir))?;
    let len = libc::off_t::try_from(bytes).unwrap_or(libc::off_t::MAX);
    // SAFETY: fallocate on a file we own.
    if len > 0 && unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) } != 0 {
        return Err(io_error("reserving memory in", dir)(
            io::Error::last_os_error(),
        ));
    }
    let zeros = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < bytes {
        let n = (bytes - offset).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset)
            .map_err(io_error("reserving memory in", dir))?;
        offset += n as u64;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_read_back_only_by_its_own_clone() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = Expectation {
            clone_pod_uid: "uid-a".into(),
            bytes: 1 << 30,
            postcopy: false,
        };
        announce(dir.path(), "counter", &wanted).unwrap();
        assert_eq!(expectation(dir.path(), "counter", "uid-a"), Some(wanted));
        assert_eq!(expectation(dir.path(), "counter", "uid-b"), None);
        assert_eq!(expectation(dir.path(), "other", "uid-a"), None);
        assert_eq!(readiness(dir.path(), "counter", "uid-a"), None);
        mark_ready(
            dir.path(),
            "counter",
            "uid-a",
            Readiness { userfaultfd: true },
        )
        .unwrap();
        assert_eq!(
            readiness(dir.path(), "counter", "uid-a"),
            Some(Readiness { userfaultfd: true })
        );
        assert_eq!(readiness(dir.path(), "counter", "uid-b"), None);
        mark_ready(
            dir.path(),
            "counter",
            "uid-a",
            Readiness { userfaultfd: false },
        )
        .unwrap();
        assert_eq!(
            readiness(dir.path(), "counter", "uid-a"),
            Some(Readiness { userfaultfd: false })
        );
        let other = Expectation {
            clone_pod_uid: "uid-b".into(),
            bytes: 1,
            postcopy: true,
        };
        announce(dir.path(), "sidecar", &other).unwrap();
        withdraw(dir.path(), "uid-a");
        assert_eq!(
            expectation(dir.path(), "sidecar", "uid-b"),
            Some(other),
            "another clone's stays"
        );
        withdraw(dir.path(), "uid-b");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left");
    }

    #[test]
    fn a_new_announcement_clears_an_old_ready_mark() {
        let dir = tempfile::tempdir().unwrap();
        mark_ready(
            dir.path(),
            "counter",
            "uid-a",
            Readiness { userfaultfd: false },
        )
        .unwrap();
        let expectation = Expectation {
            clone_pod_uid: "uid-a".into(),
            bytes: 4096,
            postcopy: false,
        };
        announce(dir.path(), "counter", &expectation).unwrap();
        assert_eq!(readiness(dir.path(), "counter", "uid-a"), None);
    }

    #[test]
    fn garbled_announcements_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["", "uid-a", "uid-a lots", " 4096", "uid-a -1"] {
            fs::write(expectation_path(dir.path(), "counter"), text).unwrap();
            assert_eq!(
                expectation(dir.path(), "counter", "uid-a"),
                None,
                "{text:?}"
            );
        }
        assert_eq!(expectation(dir.path(), "counter", ""), None);
    }

    #[test]
    fn a_reservation_has_the_size_asked_for_and_no_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = reserve(&dir.path().join("deep"), 3 << 20).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            file.metadata().unwrap().blocks() * 512 >= 3 << 20,
            "allocated, not sparse"
        );
        assert_eq!(
            fs::read_dir(dir.path().join("deep")).unwrap().count(),
            0,
            "no name"
        );
    }

    #[test]
    fn an_announcement_carries_the_postcopy_request() {
        let dir = tempfile::tempdir().unwrap();
        let wanted = Expectation {
            clone_pod_uid: "uid-a".into(),
            bytes: 4096,
            postcopy: true,
        };
        announce(dir.path(), "counter", &wanted).unwrap();
        assert_eq!(expectation(dir.path(), "counter", "uid-a"), Some(wanted));
    }

    #[test]
    fn this_process_has_anonymous_memory() {
        assert!(process_memory(std::process::id()).unwrap() > 0);
        assert_eq!(process_memory(u32::MAX), None);
    }
}
