//! The on-disk layout of a checkpoint directory.
//!
//! It mirrors what CRI-O, containerd's CRI plugin and Podman write, so that checkpointctl and the
//! CRI runtimes recognise a podmigrate checkpoint: CRIU's images under `checkpoint/`, and beside
//! them what CRIU does not save.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// CRIU's image files.
pub const CHECKPOINT_DIR: &str = "checkpoint";
/// CRIU's pages image of the first task it dumps, the container's main process: most of a
/// checkpoint, packed while CRIU writes it and reserved ahead on the target.
pub const FIRST_PAGES_IMAGE: &str = "checkpoint/pages-1.img";
/// The container's metadata, as checkpointctl reads it.
pub const CONFIG_DUMP: &str = "config.dump";
/// The container's OCI runtime spec at checkpoint time.
pub const SPEC_DUMP: &str = "spec.dump";
/// The runtime's view of the container (status, exit code) at checkpoint time.
pub const STATUS_DUMP: &str = "status.dump";
/// Files the container added or changed in its rootfs, as a tar relative to the rootfs.
pub const ROOTFS_DIFF_TAR: &str = "rootfs-diff.tar";
/// Files the container deleted from its image, as a JSON list of paths (CRI-O's format).
pub const DELETED_FILES: &str = "deleted.files";
/// The archive manifest, stored as the last zip entry; never part of the checkpoint directory.
pub const MANIFEST_ENTRY: &str = "podmigrate.manifest.pb";

/// The fields of `config.dump` that checkpointctl shows. Unknown fields are kept by serde's
/// default of ignoring them on read; podmigrate writes only these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub rootfs_image: String,
    #[serde(default)]
    pub rootfs_image_ref: String,
    #[serde(default)]
    pub rootfs_image_name: String,
    #[serde(default, rename = "runtime")]
    pub oci_runtime: String,
    #[serde(default)]
    pub created_time: String,
    #[serde(default)]
    pub checkpointed_time: String,
}

/// Errors reading a checkpoint directory's metadata.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl ContainerConfig {
    /// Reads `config.dump` from a checkpoint directory; `Ok(None)` when there is none.
    pub fn read_from(checkpoint_dir: &Path) -> Result<Option<Self>, LayoutError> {
        let path = checkpoint_dir.join(CONFIG_DUMP);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LayoutError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LayoutError::Parse {
                path: path.display().to_string(),
                source,
            })
    }

    /// Writes `config.dump` into a checkpoint directory.
    pub fn write_to(&self, checkpoint_dir: &Path) -> Result<(), LayoutError> {
        let path = checkpoint_dir.join(CONFIG_DUMP);
        let json = serde_json::to_vec_pretty(self).expect("ContainerConfig always serialises");
        std::fs::write(&path, json).map_err(|source| LayoutError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_dump_round_trips_and_reads_checkpointctl_fields() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ContainerConfig::read_from(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join(CONFIG_DUMP),
            r#"{"id":"abc","name":"counter","rootfsImageName":"localhost/counter:1","runtime":"runc","extra":1}"#,
        )
        .unwrap();
        let config = ContainerConfig::read_from(dir.path()).unwrap().unwrap();
        assert_eq!(config.id, "abc");
        assert_eq!(config.rootfs_image_name, "localhost/counter:1");
        assert_eq!(config.oci_runtime, "runc");
        config.write_to(dir.path()).unwrap();
        assert_eq!(
            ContainerConfig::read_from(dir.path()).unwrap(),
            Some(config)
        );
    }
}
