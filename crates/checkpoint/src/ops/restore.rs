//! Restore, up to the container runtime: wait for the source's archive on the share (reserving
//! memory for its pages meanwhile), verify and unpack it, check that it is this clone's to
//! restore, apply its rootfs changes to the new container's upper directory, and leave CRIU's
//! images ready for the runtime's create-from-checkpoint. A post-copy checkpoint also gets its
//! lazy-pages daemon started, ready for that restore.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::archive::{self, ArchiveError, ArchiveKey, KeyError, Reserved, Source, UnpackOptions};
use crate::binding::{self, CloneMismatch};
use crate::creds::{self, CredsError};
use crate::layout::{CHECKPOINT_DIR, FIRST_PAGES_IMAGE};
use crate::pagestream::{PageStreamError, Ticket};
use crate::reap::Reaper;
use crate::rootfs::{self, RootfsError};
use crate::share::{self, ShareError};
use crate::volumes::{self, VolumeError};
use crate::workspace::WorkSpace;
use crate::{criu, prefault};

use super::postcopy::{Fetch, Fetching, PostCopyError};

/// How often a waiting clone looks for the source's announcement (and for the archive).
const RESERVE_POLL: Duration = Duration::from_millis(50);

/// One clone container to restore from its source's archive.
#[derive(Clone)]
pub struct Restore<'a> {
    pub share_root: &'a Path,
    /// Where the checkpoint is unpacked: in memory when it fits.
    pub space: WorkSpace,
    /// How long to wait for the archive, and the setting that says so (a timeout names it).
    pub archive_wait: Duration,
    pub archive_wait_setting: &'static str,
    /// The node's archive key: with one, only sealed archives restore.
    pub key_file: Option<&'a Path>,
    /// The clone pod's namespace, name and uid.
    pub namespace: &'a str,
    pub pod: &'a str,
    pub pod_uid: &'a str,
    /// The container's name in the pod, and its runtime id.
    pub container: &'a str,
    pub container_id: &'a str,
    /// The pod the clone was made of, whose same-named container was checkpointed.
    pub source_pod: &'a str,
    /// The uid the archive must have been made for (see [`crate::binding`]): the clone's own,
    /// or, for a pod that replaces a departed one, the departure's (the departed pod's uid).
    pub made_for: &'a str,
    /// The OCI spec the clone runs with: the checkpoint's credentials must be within it.
    pub spec: Option<&'a Path>,
    /// The new container's overlay upper directory (`None`: its rootfs is no overlay), and the
    /// image's layers under it, topmost first.
    pub upperdir: Option<PathBuf>,
    pub lowerdirs: Vec<PathBuf>,
    /// How a post-copy restore's lazy-pages daemon is waited for.
    pub reaper: &'a dyn Reaper,
}

/// An unpacked checkpoint, ready for the runtime's create-from-checkpoint.
#[derive(Debug)]
pub struct Prepared {
    /// The local copy; to be removed once the task has started (or failed to), or, in
    /// post-copy, once its memory has arrived.
    pub dir: PathBuf,
    /// CRIU's images.
    pub images: PathBuf,
    pub archive: PathBuf,
    /// Post-copy: what fetches the memory the archive left out (see [`super::postcopy`]).
    pub fetching: Option<Fetching>,
}

/// A restore that failed, with everything an operator needs to act on it: kubelet shows this
/// message in the pod's events.
#[derive(Debug, thiserror::Error)]
#[error("restoring {container} of clone pod {namespace}/{pod} from {archive}: {failure}")]
pub struct RestoreError {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    pub archive: String,
    pub failure: Box<RestoreFailure>,
}

/// What failed; each names the path or the names it concerns.
#[derive(Debug, thiserror::Error)]
pub enum RestoreFailure {
    /// The clone's source (or its namespace or container) cannot name a path on the share.
    #[error("{0}")]
    ArchiveName(ShareError),

    /// The archive did not appear within the limit that `setting` sets.
    #[error("{error} ({setting})")]
    WaitTimedOut {
        error: ShareError,
        setting: &'static str,
    },

    /// Looking for the archive on the share failed.
    #[error("{0}")]
    Wait(ShareError),

    /// The source withdrew its announcement without committing an archive: the migration was
    /// cancelled or rolled back while this clone waited.
    #[error(
        "the source ended the migration (cancelled or rolled back) before committing its archive"
    )]
    Abandoned,

    /// The node's archive key does not load.
    #[error("{0}")]
    Key(KeyError),

    /// The archive does not open, verify or unpack.
    #[error("{0}")]
    Archive(ArchiveError),

    /// This node's CRIU is older than the one that made the checkpoint.
    #[error("{0}")]
    CriuTooNew(String),

    /// The archive is another pod's or another container's.
    #[error(
        "the archive holds pod {}/{} container {}, not the clone's source {}/{} container {}",
        .holds.namespace, .holds.pod, .holds.container,
        .wanted.namespace, .wanted.pod, .wanted.container
    )]
    NotTheSource {
        holds: Box<Source>,
        wanted: Box<Source>,
    },

    /// The archive was made for another migration's clone.
    #[error("{0}")]
    OtherClone(CloneMismatch),

    /// The checkpoint's tasks hold credentials the clone's spec does not allow.
    #[error("{0}")]
    Credentials(CredsError),

    /// The new container has no overlay upper directory to apply the source's changes to.
    #[error("the new container's rootfs is not an overlay mount, so the source's file changes cannot be applied")]
    NotOverlay,

    /// The source's rootfs changes do not apply.
    #[error("applying the rootfs changes: {0}")]
    RootfsDiff(RootfsError),

    /// The source's emptyDir volumes do not apply.
    #[error("filling the clone's emptyDir volumes: {0}")]
    Volumes(VolumeError),

    /// The local copy's directory cannot be cleared or made.
    #[error("{op} {path}: {error}")]
    WorkDir {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// The checkpoint is post-copy, and its page stream ticket does not read.
    #[error("{0}")]
    Ticket(PageStreamError),

    /// The checkpoint is post-copy, and its memory cannot be fetched on this node.
    #[error("{0}")]
    PostCopy(PostCopyError),
}

/// A clone container's unpacked checkpoint under work space `root`.
pub fn local_dir(root: &Path, namespace: &str, container_id: &str) -> PathBuf {
    root.join("restore").join(namespace).join(container_id)
}

/// This node's CRIU version, asked once per process ("" if unknown).
pub fn local_criu_version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| criu::version(criu::DEFAULT_CRIU).unwrap_or_default())
}

impl Restore<'_> {
    /// Finds, waits for, verifies and unpacks the source's archive, and applies its rootfs
    /// changes to the new container's upper directory. A refusal leaves nothing behind.
    pub fn run(&self) -> Result<Prepared, RestoreError> {
        let fail = |archive: String| {
            move |failure| RestoreError {
                namespace: self.namespace.to_string(),
                pod: self.pod.to_string(),
                container: self.container.to_string(),
                archive,
                failure: Box::new(failure),
            }
        };
        let archive = share::archive_path(
            self.share_root,
            self.namespace,
            self.source_pod,
            self.container,
        )
        .map_err(|e| {
            // What the path would be, had the names been fit for one.
            fail(format!(
                "{}/{}/{}/{}.zip",
                self.share_root.display(),
                self.namespace,
                self.source_pod,
                self.container
            ))(RestoreFailure::ArchiveName(e))
        })?;
        self.prepare(&archive)
            .map_err(fail(archive.display().to_string()))
    }

    fn describe(&self) -> String {
        super::describe(self.namespace, self.pod, self.container)
    }

    fn prepare(&self, archive: &Path) -> Result<Prepared, RestoreFailure> {
        let started = Instant::now();
        let who = self.describe();
        info!(container = %who, archive = %archive.display(), timeout_s = self.archive_wait.as_secs_f64(), "waiting for the source's archive");
        let pod_dir = archive.parent().unwrap_or(self.share_root).to_path_buf();
        // None: the source has not announced its size yet; Some(None): nothing was reserved.
        let mut reservation: Option<Option<File>> = None;
        let mut next_report = Duration::from_secs(5);
        let waited = share::wait_for_archive(archive, self.archive_wait, RESERVE_POLL, |waited| {
            match &reservation {
                None => reservation = self.reserve_ahead(&pod_dir),
                // The source withdraws its announcement when the migration ends. Without an
                // archive that means it was abandoned (cancelled, rolled back): waiting on would
                // hold up the clone's deletion until the wait runs out, as kubelet tears nothing
                // down while this Create runs. Whatever was reserved goes with the error.
                Some(_)
                    if prefault::expectation(&pod_dir, self.container, self.pod_uid).is_none() =>
                {
                    // Committed just before the withdrawal: the next look finds it.
                    if archive.exists() {
                        return Ok(());
                    }
                    info!(container = %who, "the source withdrew its announcement before committing an archive: the migration was abandoned");
                    return Err(RestoreFailure::Abandoned.to_string());
                }
                Some(_) => {}
            }
            if waited >= next_report {
                next_report += Duration::from_secs(5);
                info!(container = %who, archive = %archive.display(), waited_s = waited.as_secs(), "still waiting for the source's archive");
            }
            Ok(())
        });
        // Unnamed: whatever unpack does not adopt is freed when it is dropped, on every path.
        let reserved = reservation.flatten();
        waited.map_err(|error| match error {
            ShareError::Timeout { .. } => RestoreFailure::WaitTimedOut {
                error,
                setting: self.archive_wait_setting,
            },
            // Only the withdrawal above cancels the wait.
            ShareError::Cancelled { .. } => RestoreFailure::Abandoned,
            error => RestoreFailure::Wait(error),
        })?;

        let key = match self.key_file {
            Some(path) => Some(Arc::new(
                ArchiveKey::load(path).map_err(RestoreFailure::Key)?,
            )),
            None => None,
        };
        let opened =
            archive::open_with_key(archive, key.as_deref()).map_err(RestoreFailure::Archive)?;
        // The unpacked checkpoint is as large as the archive's content: in memory if it fits.
        let content_bytes: u64 = opened.manifest.entries.iter().map(|e| e.size).sum();
        // The reservation already holds its share of that.
        let reserved_bytes = reserved
            .as_ref()
            .and_then(|file| file.metadata().ok())
            .map_or(0, |meta| meta.len());
        let space = self
            .space
            .choose(Some(content_bytes.saturating_sub(reserved_bytes)));
        info!(container = %who, in_memory = space.in_memory, root = %space.root.display(), why = %space.why, "restore work space");
        let dir = local_dir(&space.root, self.namespace, self.container_id);
        let result = (|| {
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(work_dir("clearing", &dir))?;
            }
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(work_dir("creating", parent))?;
            }
            let unpack_started = Instant::now();
            let options = UnpackOptions {
                key,
                reserved: reserved.map(|file| Reserved::new(FIRST_PAGES_IMAGE, file)),
                ..UnpackOptions::default()
            };
            let verified =
                archive::unpack_opened(opened, &dir, &options).map_err(RestoreFailure::Archive)?;
            let made_by = verified.manifest.versions.clone().unwrap_or_default().criu;
            if let Some(refusal) = criu::restore_refusal(&made_by, local_criu_version()) {
                return Err(RestoreFailure::CriuTooNew(refusal));
            }
            let holds = verified.manifest.source.unwrap_or_default();
            if holds.namespace != self.namespace
                || holds.pod != self.source_pod
                || holds.container != self.container
            {
                return Err(RestoreFailure::NotTheSource {
                    holds: Box::new(holds),
                    wanted: Box::new(Source {
                        namespace: self.namespace.to_string(),
                        pod: self.source_pod.to_string(),
                        container: self.container.to_string(),
                        ..Default::default()
                    }),
                });
            }
            binding::check_restore(&holds.clone_pod_uid, self.made_for)
                .map_err(RestoreFailure::OtherClone)?;
            if let Some(spec) = self.spec {
                let tasks = creds::check(&dir.join(CHECKPOINT_DIR), spec)
                    .map_err(RestoreFailure::Credentials)?;
                info!(container = %who, tasks, "the checkpoint's credentials are within the clone's spec");
            }
            let upper = self.upperdir.as_ref().ok_or(RestoreFailure::NotOverlay)?;
            rootfs::apply_diff(&dir, upper, &self.lowerdirs).map_err(RestoreFailure::RootfsDiff)?;
            if let Some(spec) = self.spec {
                let carried = volumes::restore(&dir, spec).map_err(RestoreFailure::Volumes)?;
                if !carried.volumes.is_empty() || !carried.already_filled.is_empty() {
                    info!(container = %who, volumes = ?carried.volumes, already_filled = ?carried.already_filled, "emptyDir volumes filled from the checkpoint");
                }
            }
            info!(
                container = %who,
                archive = %archive.display(),
                bytes = verified.archive_bytes,
                unpack_ms = unpack_started.elapsed().as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "checkpoint unpacked for restore"
            );
            Ok(())
        })();
        let fetching = result.and_then(|()| self.start_fetching(&dir));
        match fetching {
            Ok(fetching) => Ok(Prepared {
                images: dir.join(CHECKPOINT_DIR),
                dir,
                archive: archive.to_path_buf(),
                fetching,
            }),
            Err(failure) => {
                let _ = fs::remove_dir_all(&dir);
                Err(failure)
            }
        }
    }

    /// For a post-copy checkpoint (it carries a page stream ticket), starts CRIU's lazy-pages
    /// daemon on its images, so the restore can begin.
    fn start_fetching(&self, dir: &Path) -> Result<Option<Fetching>, RestoreFailure> {
        let Some(ticket) = Ticket::read_from(dir).map_err(RestoreFailure::Ticket)? else {
            return Ok(None);
        };
        info!(container = %self.describe(), source = %ticket.address, total_bytes = ticket.total_bytes, "post-copy: the memory will be fetched from the source");
        Fetch {
            criu: Path::new(criu::DEFAULT_CRIU),
            reaper: self.reaper,
            images: &dir.join(CHECKPOINT_DIR),
            ticket,
        }
        .start()
        .map(Some)
        .map_err(RestoreFailure::PostCopy)
    }

    /// Reserves memory for the pages image once the source has announced its size (see
    /// [`prefault`]), then tells the source it may freeze, and whether this node can restore
    /// lazily. `None` while there is no announcement for this clone yet; `Some(None)` when
    /// nothing was reserved: in post-copy on a node with userfaultfd, whose pages arrive after
    /// the restore, nothing is.
    fn reserve_ahead(&self, pod_dir: &Path) -> Option<Option<File>> {
        let expected = prefault::expectation(pod_dir, self.container, self.pod_uid)?;
        let who = self.describe();
        let readiness = prefault::Readiness {
            userfaultfd: prefault::userfaultfd_available(),
        };
        let space = self.space.choose(Some(expected.bytes));
        let mut reserved = None;
        if expected.postcopy && readiness.userfaultfd {
            info!(container = %who, "post-copy: no memory reserved, the pages arrive after the restore");
        } else if space.in_memory {
            // Beside the restore directories: unpack links the file there, on the same tmpfs.
            let dir = space.root.join("restore");
            let started = Instant::now();
            match prefault::reserve(&dir, expected.bytes) {
                Ok(file) => {
                    info!(container = %who, bytes = expected.bytes, reserve_ms = started.elapsed().as_millis() as u64, "memory reserved for the pages image");
                    reserved = Some(file);
                }
                Err(e) => {
                    warn!(container = %who, error = %e, "no memory reserved for the pages image")
                }
            }
        } else {
            info!(container = %who, bytes = expected.bytes, why = %space.why, "no memory reserved: the pages image will not be in memory");
        }
        if let Err(e) = prefault::mark_ready(pod_dir, self.container, self.pod_uid, readiness) {
            warn!(container = %who, error = %e, "could not tell the source the clone is ready");
        }
        Some(reserved)
    }
}

/// A failure to clear or create the local copy's directory `path`.
fn work_dir(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RestoreFailure {
    let path = path.to_path_buf();
    move |error| RestoreFailure::WorkDir { op, path, error }
}
