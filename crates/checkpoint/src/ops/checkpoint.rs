//! Checkpoint, around the container runtime's dump: pack the checkpoint directory onto the
//! share while the runtime dumps into it (CRIU writes its pages image into a pipe that the
//! packer reads, so the pages never land locally), add what CRIU does not save (the spec,
//! `config.dump`, the rootfs changes), and commit the archive with its record.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::archive::{
    self, ArchiveError, ArchiveKey, Follow, KeyError, PackOptions, PackSummary, PagesPipe, Source,
    Versions,
};
use crate::bandwidth::Bandwidth;
use crate::binding::{self, BindingError, PackFor};
use crate::layout::{ContainerConfig, LayoutError, CHECKPOINT_DIR, FIRST_PAGES_IMAGE, SPEC_DUMP};
use crate::rootfs::{self, RootfsError};
use crate::share::{self, ShareError};
use crate::volumes::{self, VolumeError};

/// The packer gives up on a dump that has not finished by then (containerd's own checkpoint
/// calls are bounded well below it).
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// One container's checkpoint, from its dump to its committed archive.
#[derive(Debug, Clone)]
pub struct Checkpoint<'a> {
    pub share_root: &'a Path,
    /// The node's archive key: with one, the archive is sealed, and never written plain.
    pub key_file: Option<&'a Path>,
    /// Who is checkpointed, as the archive records it; the clone it is made for is read from
    /// the agent's lease beside the archive.
    pub source: Source,
    pub versions: Versions,
    /// Cap on the bytes per second written onto the share.
    pub bandwidth: Bandwidth,
    /// The checkpoint directory, empty; the dump writes CRIU's images into its
    /// [`CHECKPOINT_DIR`].
    pub local_dir: &'a Path,
    /// The container's OCI spec, kept as [`SPEC_DUMP`].
    pub spec: &'a Path,
    /// The container's overlay upper directory (`None`: its rootfs is no overlay, and its
    /// changes are not carried).
    pub upperdir: Option<PathBuf>,
}

/// What failed around the dump, and on which path.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The node's archive key does not load.
    #[error("loading the archive key: {0}")]
    Key(KeyError),

    /// The pod or container name cannot name a path on the share.
    #[error("naming the archive: {0}")]
    ArchiveName(ShareError),

    /// The archive's directory on the share cannot be made.
    #[error("creating the archive's directory: {0}")]
    ArchiveDir(ShareError),

    /// The agent's leases beside the archive cannot be read.
    #[error("naming the clone the archive is for: {0}")]
    Leases(BindingError),

    /// A local file or directory of the checkpoint could not be made.
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    /// The pipe CRIU writes the pages into cannot be made.
    #[error("making the pages pipe: {0}")]
    PagesPipe(ArchiveError),

    /// `config.dump` cannot be written.
    #[error("writing config.dump: {0}")]
    ConfigDump(LayoutError),

    /// The overlay upper directory cannot be captured.
    #[error("capturing the rootfs changes: {0}")]
    RootfsDiff(RootfsError),

    /// An emptyDir volume cannot be captured.
    #[error("capturing the pod's emptyDir volumes: {0}")]
    Volumes(VolumeError),

    /// Packing the checkpoint onto the share failed.
    #[error("packing onto the share: {0}")]
    Pack(ArchiveError),

    /// The commit record beside the archive cannot be written.
    #[error("recording the commit: {0}")]
    CommitRecord(ShareError),
}

fn unix_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

impl Checkpoint<'_> {
    /// Packs the checkpoint directory onto the share while `dump` (the runtime's dump, and
    /// whatever check its caller makes of it) writes CRIU's images into it, adds what CRIU does
    /// not save, and commits the archive. `dump` is handed the migration the lease names, if
    /// any; when its lease asks for post-copy (a page stream plan), the dump takes all but the
    /// lazy memory and leaves what the clone needs to fetch the rest in the checkpoint
    /// directory. The caller's error type carries both the dump's failures and this
    /// operation's.
    pub fn run<E: From<CheckpointError>>(
        &self,
        dump: impl FnOnce(Option<&PackFor>) -> Result<(), E>,
    ) -> Result<PackSummary, E> {
        let who = super::describe(
            &self.source.namespace,
            &self.source.pod,
            &self.source.container,
        );
        // Before anything is dumped: a node configured with a key never writes a plain archive.
        let key = match self.key_file {
            Some(path) => Some(Arc::new(
                ArchiveKey::load(path).map_err(CheckpointError::Key)?,
            )),
            None => None,
        };
        let archive_path = share::archive_path(
            self.share_root,
            &self.source.namespace,
            &self.source.pod,
            &self.source.container,
        )
        .map_err(CheckpointError::ArchiveName)?;
        share::create_archive_dir(self.share_root, &archive_path)
            .map_err(CheckpointError::ArchiveDir)?;
        // The clone this checkpoint is for, named by the agent's lease beside the archive
        // (none for a checkpoint taken without one, e.g. by `ctr`).
        let pod_dir = archive_path.parent().unwrap_or(&archive_path);
        let pack_for =
            binding::clone_for_pack(pod_dir, SystemTime::now()).map_err(CheckpointError::Leases)?;
        let clone_pod_uid = pack_for.as_ref().map(|p| p.clone_pod_uid.clone());
        let postcopy = pack_for.as_ref().is_some_and(|p| p.page_stream.is_some());
        info!(container = %who, clone_pod_uid = clone_pod_uid.as_deref().unwrap_or("-"), postcopy, "archive made for clone");
        let pack_options = PackOptions {
            source: Source {
                clone_pod_uid: clone_pod_uid.clone().unwrap_or_default(),
                ..self.source.clone()
            },
            versions: self.versions.clone(),
            bandwidth: self.bandwidth,
            key,
            ..PackOptions::default()
        };

        // The rest of the checkpoint directory follows once the dump and the extras are done.
        let images = self.local_dir.join(CHECKPOINT_DIR);
        fs::create_dir_all(&images).map_err(io_error("creating", &images))?;
        let pipe = PagesPipe::create(self.local_dir, FIRST_PAGES_IMAGE)
            .map_err(CheckpointError::PagesPipe)?;
        let (done, failed) = (AtomicBool::new(false), AtomicBool::new(false));
        let follow = Follow {
            pipe: &pipe,
            done: &done,
            failed: &failed,
            poll: Duration::from_millis(2),
            timeout: FOLLOW_TIMEOUT,
        };
        let pack_started = Instant::now();
        let (dumped, packed) = std::thread::scope(|scope| {
            let packer = scope.spawn(|| {
                archive::pack_following(self.local_dir, &archive_path, &pack_options, &follow)
            });
            let dumped = self.dump_and_extras(|| dump(pack_for.as_ref()), &who);
            match &dumped {
                Ok(_) => done.store(true, Ordering::Release),
                Err(_) => failed.store(true, Ordering::Release),
            }
            let packed = packer
                .join()
                .unwrap_or_else(|_| panic!("the packer of {who} panicked"));
            (dumped, packed)
        });
        let (dumped_in, extras_in) = dumped?;
        let summary = packed.map_err(CheckpointError::Pack)?;
        let pack_total = pack_started.elapsed();
        // What packing added after the dump and the extras: the rest overlapped the dump.
        let pack_after = pack_total.saturating_sub(dumped_in + extras_in);
        info!(
            container = %who,
            dump_ms = dumped_in.as_millis() as u64,
            diff_ms = extras_in.as_millis() as u64,
            pack_ms = pack_after.as_millis() as u64,
            pack_total_ms = pack_total.as_millis() as u64,
            throttled_ms = summary.throttled.as_millis() as u64,
            bandwidth = %pack_options.bandwidth,
            sealed_with = summary.sealed_with.as_deref().unwrap_or("-"),
            "dumped and packed"
        );
        // The agent reads what the commit took from this record, not from the archive.
        share::write_commit_record(
            &summary.archive,
            &share::CommitRecord {
                clone_pod_uid: clone_pod_uid.unwrap_or_default(),
                manifest_sha256: summary.manifest_sha256.clone(),
                archive_bytes: summary.archive_bytes,
                dump_ms: dumped_in.as_millis() as u64,
                diff_ms: extras_in.as_millis() as u64,
                pack_ms: pack_after.as_millis() as u64,
                committed_unix_ms: unix_millis() as u64,
            },
        )
        .map_err(CheckpointError::CommitRecord)?;
        Ok(summary)
    }

    /// The dump, then what CRIU does not save (the spec, the container's config, its rootfs
    /// changes, its emptyDir volumes). Returns how long each took.
    fn dump_and_extras<E: From<CheckpointError>>(
        &self,
        dump: impl FnOnce() -> Result<(), E>,
        who: &str,
    ) -> Result<(Duration, Duration), E> {
        let dump_started = Instant::now();
        dump()?;
        let dumped_in = dump_started.elapsed();
        let extras_started = Instant::now();
        fs::copy(self.spec, self.local_dir.join(SPEC_DUMP))
            .map_err(io_error("copying", self.spec))?;
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        ContainerConfig {
            id: self.source.container_id.clone(),
            name: self.source.container.clone(),
            rootfs_image_name: self.source.image.clone(),
            oci_runtime: "runc".into(),
            checkpointed_time: now,
            ..ContainerConfig::default()
        }
        .write_to(self.local_dir)
        .map_err(CheckpointError::ConfigDump)?;
        match &self.upperdir {
            Some(upper) => {
                let diff = rootfs::capture_diff(upper, self.local_dir)
                    .map_err(CheckpointError::RootfsDiff)?;
                if !diff.skipped.is_empty() {
                    warn!(container = %who, skipped = ?diff.skipped, "sockets and fifos are not carried in the rootfs diff");
                }
            }
            None => {
                warn!(container = %who, "rootfs is not an overlay: its changes are not carried")
            }
        }
        let carried =
            volumes::capture(self.spec, self.local_dir).map_err(CheckpointError::Volumes)?;
        if !carried.volumes.is_empty() {
            info!(container = %who, volumes = ?carried.volumes, "emptyDir volumes captured");
        }
        Ok((dumped_in, extras_started.elapsed()))
    }
}

/// A failure to `op` (create, copy) the file or directory `path`.
fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |error| CheckpointError::Io { op, path, error }
}

#[cfg(test)]
mod tests;
