//! The shim's own settings.
//!
//! containerd hands a `runc`-typed runtime only runc's options, so podmigrate's settings come
//! from the environment, which shims inherit from containerd (set them in containerd's systemd
//! unit, see docs/containerd.md). Every setting has a default that works on a stock node.

use std::path::PathBuf;
use std::time::Duration;

use podmigrate_checkpoint::bandwidth::{Bandwidth, BandwidthError};
use podmigrate_checkpoint::share::{DEFAULT_SHARE_ROOT, DEFAULT_WORK_DIR};
use podmigrate_checkpoint::workspace::{WorkSpace, DEFAULT_MEMORY_DIR};

/// Where the share is mounted.
pub const ENV_SHARE_ROOT: &str = "PODMIGRATE_SHARE_ROOT";
/// Node-local work space for CRIU images and unpacked archives.
pub const ENV_WORK_DIR: &str = "PODMIGRATE_WORK_DIR";
/// How long a clone's Create waits for the source's archive, in seconds.
pub const ENV_ARCHIVE_WAIT: &str = "PODMIGRATE_ARCHIVE_WAIT_SECONDS";
/// The shim that runs containers for us.
pub const ENV_DELEGATE: &str = "PODMIGRATE_DELEGATE_SHIM";
/// Cap on the bytes per second one checkpoint writes onto the share, a Kubernetes quantity
/// (`64Mi`); unset or `0`: no cap. Like KubeVirt's `bandwidthPerMigration`.
pub const ENV_BANDWIDTH: &str = "PODMIGRATE_BANDWIDTH_PER_MIGRATION";
/// This node's name, recorded in archives (the agent's DaemonSet sets it from the downward API).
pub const ENV_NODE_NAME: &str = "NODE_NAME";
/// Memory-backed (tmpfs) work space, used when a checkpoint fits there with room to spare;
/// `off` keeps everything in `PODMIGRATE_WORK_DIR`.
pub const ENV_MEMORY_DIR: &str = "PODMIGRATE_MEMORY_DIR";
/// The cluster's archive key: when set, archives are sealed, and only sealed ones restore.
pub const ENV_KEY_FILE: &str = "PODMIGRATE_KEY_FILE";

/// kubelet gives a StartContainer two minutes by default; waiting longer would only turn our
/// clear error into its timeout.
pub const DEFAULT_ARCHIVE_WAIT: Duration = Duration::from_secs(90);
pub const DEFAULT_DELEGATE: &str = "containerd-shim-runc-v2";

#[derive(Debug, Clone)]
pub struct ShimConfig {
    pub share_root: PathBuf,
    pub work_dir: PathBuf,
    /// `None`: memory-backed work space is off.
    pub memory_dir: Option<PathBuf>,
    pub archive_wait: Duration,
    pub delegate: PathBuf,
    pub node_name: String,
    /// A malformed value fails each checkpoint with its error rather than packing uncapped.
    pub bandwidth: Result<Bandwidth, BandwidthError>,
    /// Read at each checkpoint and restore, so a rotated key applies to running shims.
    pub key_file: Option<PathBuf>,
}

impl ShimConfig {
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        ShimConfig {
            share_root: var(ENV_SHARE_ROOT)
                .unwrap_or_else(|| DEFAULT_SHARE_ROOT.into())
                .into(),
            work_dir: var(ENV_WORK_DIR)
                .unwrap_or_else(|| DEFAULT_WORK_DIR.into())
                .into(),
            memory_dir: match var(ENV_MEMORY_DIR).as_deref() {
                Some("off") => None,
                Some(dir) => Some(dir.into()),
                None => Some(DEFAULT_MEMORY_DIR.into()),
            },
            archive_wait: var(ENV_ARCHIVE_WAIT)
                .and_then(|v| v.parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(DEFAULT_ARCHIVE_WAIT),
            delegate: var(ENV_DELEGATE)
                .unwrap_or_else(|| DEFAULT_DELEGATE.into())
                .into(),
            node_name: var(ENV_NODE_NAME).unwrap_or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|h| h.trim().to_string())
                    .unwrap_or_default()
            }),
            bandwidth: var(ENV_BANDWIDTH)
                .map_or(Ok(Bandwidth::UNLIMITED), |v| Bandwidth::parse(&v)),
            key_file: var(ENV_KEY_FILE).map(PathBuf::from),
        }
    }
}

impl ShimConfig {
    /// Where checkpoints are dumped and unpacked.
    pub fn workspace(&self) -> WorkSpace {
        WorkSpace {
            disk: self.work_dir.clone(),
            memory: self.memory_dir.clone(),
        }
    }
}
