//! Restore on Create: a clone's container gets the source container's committed archive,
//! verified and unpacked locally, its rootfs changes applied, and is created from the
//! checkpoint so that Start resumes the process instead of starting a fresh one.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_shim::protos::types::mount::Mount;
use podmigrate_checkpoint::archive::{self, Reserved, UnpackOptions};
use podmigrate_checkpoint::layout::{CHECKPOINT_DIR, FIRST_PAGES_IMAGE};
use podmigrate_checkpoint::{criu, prefault, rootfs, share};
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::identity::ContainerIdentity;
use crate::mounts::{lowerdirs, upperdir};

mod error;

pub use error::{RestoreError, RestoreFailure};

/// An unpacked checkpoint, ready for the runc shim's Create.
#[derive(Debug)]
pub struct Prepared {
    /// The local copy; removed once the task has started (or failed to).
    pub dir: PathBuf,
    /// CRIU's images, for the Create request's `checkpoint` field.
    pub images: PathBuf,
    pub archive: PathBuf,
}

/// What Create does with a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatePlan<'a> {
    /// As asked: a sandbox, a container of a pod that is no clone, or a Create that already
    /// names a checkpoint.
    AsAsked,
    /// From the checkpoint of the same container of pod `source`.
    Restore { source: &'a str },
    /// A clone's container restored once already on this node (`marker` says so): this is
    /// kubelet restarting it after it exited, so it starts fresh like any restarted
    /// container. The archive is gone by now; waiting for it would only fail the Create.
    Restarted { source: &'a str, marker: PathBuf },
}

/// Decides how to create the container `identity`, under work directory `work_dir` (whose
/// restore markers say what was restored on this node). `checkpoint_given`: the Create
/// request already names a checkpoint.
pub fn plan<'a>(
    work_dir: &Path,
    identity: &'a ContainerIdentity,
    checkpoint_given: bool,
) -> CreatePlan<'a> {
    let source = match identity.clone_of.as_deref() {
        Some(source) if !identity.is_sandbox && !checkpoint_given => source,
        _ => return CreatePlan::AsAsked,
    };
    match marker(work_dir, identity) {
        Some(marker) if fs::symlink_metadata(&marker).is_ok() => {
            CreatePlan::Restarted { source, marker }
        }
        _ => CreatePlan::Restore { source },
    }
}

/// Where the fact that `identity` was restored on this node is recorded: keyed by the clone
/// pod's uid and the container's name, which a restarted container keeps. `None` without a
/// pod uid (outside Kubernetes): such a container is restored on every Create.
pub fn marker(work_dir: &Path, identity: &ContainerIdentity) -> Option<PathBuf> {
    share::restored_marker(work_dir, &identity.pod_uid, &identity.container).ok()
}

/// Records, durably, that the container `identity` was restored from `archive`: written once
/// its restore's Start succeeded, read by [`plan`] at every later Create.
pub fn mark_restored(
    marker: &Path,
    identity: &ContainerIdentity,
    archive: &Path,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = marker.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut file = File::create(marker)?;
    writeln!(
        file,
        "container {} restored from {}",
        identity.id,
        archive.display()
    )?;
    file.sync_all()
}

/// A clone container's unpacked checkpoint under work space `root`.
pub fn local_dir(root: &Path, identity: &ContainerIdentity) -> PathBuf {
    root.join("restore")
        .join(&identity.namespace)
        .join(&identity.id)
}

/// This node's CRIU version, asked once per shim ("" if unknown).
fn local_criu_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| criu::version(criu::DEFAULT_CRIU).unwrap_or_default())
}

/// Finds, waits for, verifies and unpacks the source's archive, and applies its rootfs changes
/// to the new container's upper directory.
pub fn prepare(
    config: &ShimConfig,
    identity: &ContainerIdentity,
    source_pod: &str,
    rootfs_mounts: &[Mount],
) -> Result<Prepared, RestoreError> {
    let fail = |archive: String| {
        move |failure| RestoreError {
            namespace: identity.namespace.clone(),
            pod: identity.pod.clone(),
            container: identity.container.clone(),
            archive,
            failure: Box::new(failure),
        }
    };
    let archive = share::archive_path(
        &config.share_root,
        &identity.namespace,
        source_pod,
        &identity.container,
    )
    .map_err(|e| {
        // What the path would be, had the names been fit for one.
        fail(format!(
            "{}/{}/{}/{}.zip",
            config.share_root.display(),
            identity.namespace,
            source_pod,
            identity.container
        ))(RestoreFailure::ArchiveName(e))
    })?;
    prepare_archive(config, identity, source_pod, rootfs_mounts, &archive)
        .map_err(fail(archive.display().to_string()))
}

/// [`prepare`], once the archive's path is known.
fn prepare_archive(
    config: &ShimConfig,
    identity: &ContainerIdentity,
    source_pod: &str,
    rootfs_mounts: &[Mount],
    archive: &Path,
) -> Result<Prepared, RestoreFailure> {
    let started = Instant::now();
    info!(container = %identity.describe(), archive = %archive.display(), timeout_s = config.archive_wait.as_secs_f64(), "waiting for the source's archive");
    let pod_dir = archive.parent().unwrap_or(&config.share_root).to_path_buf();
    // None: the source has not announced its size yet; Some(None): nothing was reserved.
    let mut reservation: Option<Option<File>> = None;
    let mut next_report = Duration::from_secs(5);
    let waited = share::wait_for_archive(archive, config.archive_wait, RESERVE_POLL, |waited| {
        match &reservation {
            None => reservation = reserve_ahead(config, identity, &pod_dir),
            // The source withdraws its announcement when the migration ends: without an
            // archive, that means it was abandoned, and the memory is given back at once.
            Some(Some(_))
                if prefault::expectation(&pod_dir, &identity.container, &identity.pod_uid)
                    .is_none() =>
            {
                info!(container = %identity.describe(), "the source withdrew its announcement; reserved memory released");
                reservation = Some(None);
            }
            Some(_) => {}
        }
        if waited >= next_report {
            next_report += Duration::from_secs(5);
            info!(container = %identity.describe(), archive = %archive.display(), waited_s = waited.as_secs(), "still waiting for the source's archive");
        }
        Ok(())
    });
    // Unnamed: whatever unpack does not adopt is freed when it is dropped, on every path.
    let reserved = reservation.flatten();
    waited.map_err(|e| match e {
        share::ShareError::Timeout { .. } => RestoreFailure::WaitTimedOut(e),
        e => RestoreFailure::Wait(e),
    })?;

    let key = match &config.key_file {
        Some(path) => Some(std::sync::Arc::new(
            archive::ArchiveKey::load(path).map_err(RestoreFailure::Key)?,
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
    let space = config
        .workspace()
        .choose(Some(content_bytes.saturating_sub(reserved_bytes)));
    info!(container = %identity.describe(), in_memory = space.in_memory, root = %space.root.display(), why = %space.why, "restore work space");
    let dir = local_dir(&space.root, identity);
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
        if holds.namespace != identity.namespace
            || holds.pod != source_pod
            || holds.container != identity.container
        {
            return Err(RestoreFailure::NotTheSource {
                holds: Box::new(holds),
                wanted: Box::new(archive::Source {
                    namespace: identity.namespace.clone(),
                    pod: source_pod.to_string(),
                    container: identity.container.clone(),
                    ..Default::default()
                }),
            });
        }
        podmigrate_checkpoint::binding::check_restore(&holds.clone_pod_uid, &identity.pod_uid)
            .map_err(RestoreFailure::OtherClone)?;
        if let Some(spec) = &identity.spec {
            let tasks = podmigrate_checkpoint::creds::check(&dir.join(CHECKPOINT_DIR), spec)
                .map_err(RestoreFailure::Credentials)?;
            info!(container = %identity.describe(), tasks, "the checkpoint's credentials are within the clone's spec");
        }
        let upper = upperdir(rootfs_mounts).ok_or(RestoreFailure::NotOverlay)?;
        rootfs::apply_diff(&dir, &upper, &lowerdirs(rootfs_mounts))
            .map_err(RestoreFailure::RootfsDiff)?;
        info!(
            container = %identity.describe(),
            archive = %archive.display(),
            bytes = verified.archive_bytes,
            unpack_ms = unpack_started.elapsed().as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "checkpoint unpacked for restore"
        );
        Ok(())
    })();
    match result {
        Ok(()) => Ok(Prepared {
            images: dir.join(CHECKPOINT_DIR),
            dir,
            archive: archive.to_path_buf(),
        }),
        Err(failure) => {
            let _ = fs::remove_dir_all(&dir);
            Err(failure)
        }
    }
}

/// A failure to clear or create the local copy's directory `path`.
fn work_dir(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RestoreFailure {
    let path = path.to_path_buf();
    move |error| RestoreFailure::WorkDir { op, path, error }
}

/// How often a waiting clone looks for the source's announcement (and for the archive).
const RESERVE_POLL: Duration = Duration::from_millis(50);

/// Reserves memory for the pages image once the source has announced its size (see
/// `podmigrate_checkpoint::prefault`), then tells the source it may freeze. `None` while
/// there is no announcement for this clone yet; `Some(None)` when nothing was reserved.
fn reserve_ahead(
    config: &ShimConfig,
    identity: &ContainerIdentity,
    pod_dir: &Path,
) -> Option<Option<File>> {
    let expected = prefault::expectation(pod_dir, &identity.container, &identity.pod_uid)?;
    let space = config.workspace().choose(Some(expected.bytes));
    let mut reserved = None;
    if space.in_memory {
        // Beside the restore directories: unpack links the file there, on the same tmpfs.
        let dir = space.root.join("restore");
        let started = Instant::now();
        match prefault::reserve(&dir, expected.bytes) {
            Ok(file) => {
                info!(container = %identity.describe(), bytes = expected.bytes, reserve_ms = started.elapsed().as_millis() as u64, "memory reserved for the pages image");
                reserved = Some(file);
            }
            Err(e) => {
                warn!(container = %identity.describe(), error = %e, "no memory reserved for the pages image")
            }
        }
    } else {
        info!(container = %identity.describe(), bytes = expected.bytes, why = %space.why, "no memory reserved: the pages image will not be in memory");
    }
    if let Err(e) = prefault::mark_ready(pod_dir, &identity.container, &identity.pod_uid) {
        warn!(container = %identity.describe(), error = %e, "could not tell the source the clone is ready");
    }
    Some(reserved)
}

/// Removes a restore's local copy.
pub fn discard(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}

#[cfg(test)]
mod tests;
