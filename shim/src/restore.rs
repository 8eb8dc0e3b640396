//! Restore on Create: a clone's container gets the source container's committed archive,
//! verified and unpacked locally, its rootfs changes applied (the library's
//! [`Restore`] operation), and is created from the checkpoint so that Start resumes the process
//! instead of starting a fresh one. Here: whether a Create restores at all, the record that a
//! container was restored, and the operation's input from containerd's Create.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use containerd_shim::protos::types::mount::Mount;
use podmigrate_checkpoint::ops::restore::{Prepared, Restore, RestoreError};
use podmigrate_checkpoint::share;

use crate::config::{ShimConfig, ENV_ARCHIVE_WAIT};
use crate::identity::ContainerIdentity;
use crate::mounts::{lowerdirs, upperdir};
use crate::reaper::MonitorReaper;

mod error;

pub use error::{answer, code};

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
    match restored_before(work_dir, identity) {
        Some(marker) => CreatePlan::Restarted { source, marker },
        None => CreatePlan::Restore { source },
    }
}

/// The marker saying `identity` was restored on this node already, if it was.
pub fn restored_before(work_dir: &Path, identity: &ContainerIdentity) -> Option<PathBuf> {
    marker(work_dir, identity).filter(|marker| fs::symlink_metadata(marker).is_ok())
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

/// Finds, waits for, verifies and unpacks the source's archive, and applies its rootfs changes
/// to the new container's upper directory; see [`Restore`].
pub fn prepare(
    config: &ShimConfig,
    identity: &ContainerIdentity,
    source_pod: &str,
    rootfs: &[Mount],
) -> Result<Prepared, RestoreError> {
    Restore {
        share_root: &config.share_root,
        space: config.workspace(),
        archive_wait: config.archive_wait,
        archive_wait_setting: ENV_ARCHIVE_WAIT,
        key_file: config.key_file.as_deref(),
        namespace: &identity.namespace,
        pod: &identity.pod,
        pod_uid: &identity.pod_uid,
        container: &identity.container,
        container_id: &identity.id,
        source_pod,
        made_for: identity.departure.as_deref().unwrap_or(&identity.pod_uid),
        spec: identity.spec.as_deref(),
        upperdir: upperdir(rootfs),
        lowerdirs: lowerdirs(rootfs),
        reaper: &MonitorReaper,
    }
    .run()
}

/// Removes a restore's local copy.
pub fn discard(dir: &Path) {
    podmigrate_checkpoint::workspace::discard(dir);
}

#[cfg(test)]
mod tests;
