//! A pod's emptyDir volumes, which travel with its checkpoint.
//!
//! kubelet makes each emptyDir a directory of its own on the node
//! (`<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/<volume>`, a tmpfs there for
//! `medium: Memory`) and binds it into the containers that mount it. The pod's scratch data
//! lives there, outside the rootfs, and CRIU saves none of it (an open file there must even
//! exist, at its size, for the restore to succeed). So a checkpoint carries each emptyDir its
//! container mounts whole, as `volumes/<volume>/` beside the rootfs diff and in the same format,
//! and a restore writes it into the clone's emptyDir of the same name with the same checks
//! (nothing lands outside the volume; no device, no set-id file).
//!
//! Containers of one pod that share an emptyDir each carry it, captured at the same freeze. The
//! first one restored fills the clone's volume; the others find it filled and leave it alone,
//! since their own copy is the same and the first container may already have written to it.
//! Other volumes (configMap, secret, projected, PVCs) are mounted by kubelet on the target as
//! on the source; they are shared storage or the API's, and are not carried.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::rootfs::{self, RootfsError};

/// Where a checkpoint directory holds its emptyDir volumes, one directory each.
pub const VOLUMES_DIR: &str = "volumes";
/// The path component kubelet puts emptyDir volumes under.
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("reading the OCI spec {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
    #[error("emptyDir volume {volume} ({path}): {source}")]
    Volume {
        volume: String,
        path: PathBuf,
        source: RootfsError,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The emptyDir volumes a container mounts: volume name to its directory on the node.
pub fn empty_dirs(spec: &Path) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    #[derive(serde::Deserialize)]
    struct Mount {
        #[serde(default)]
        source: Option<PathBuf>,
    }
    #[derive(serde::Deserialize)]
    struct Spec {
        #[serde(default)]
        mounts: Vec<Mount>,
    }
    let bad = |reason: String| VolumeError::Spec {
        path: spec.to_path_buf(),
        reason,
    };
    let raw = fs::read(spec).map_err(|e| bad(e.to_string()))?;
    let parsed: Spec = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;
    Ok(parsed
        .mounts
        .into_iter()
        .filter_map(|m| m.source)
        .filter_map(|source| Some((empty_dir_name(&source)?, source)))
        .collect())
}

/// The volume name of an emptyDir's own directory (not of a subPath inside it, which kubelet
/// binds from elsewhere).
fn empty_dir_name(source: &Path) -> Option<String> {
    let parts: Vec<Component<'_>> = source.components().collect();
    let [.., Component::Normal(volumes), Component::Normal(plugin), Component::Normal(name)] =
        parts.as_slice()
    else {
        return None;
    };
    (*volumes == "volumes" && *plugin == EMPTY_DIR_PLUGIN)
        .then(|| name.to_str().map(str::to_string))
        .flatten()
}

/// A capture or an application of `volume`, whose directory is `dir`, that failed.
fn failed<'a>(volume: &'a str, dir: &'a Path) -> impl FnOnce(RootfsError) -> VolumeError + 'a {
    move |source| VolumeError::Volume {
        volume: volume.to_string(),
        path: dir.to_path_buf(),
        source,
    }
}

/// What a capture or a restore did with the volumes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Carried {
    /// Volumes written, with their file counts.
    pub volumes: BTreeMap<String, usize>,
    /// Volumes the clone already had filled (another container of the pod restored them).
    pub already_filled: Vec<String>,
}

/// Captures every emptyDir the container with `spec` mounts into `checkpoint_dir`.
pub fn capture(spec: &Path, checkpoint_dir: &Path) -> Result<Carried, VolumeError> {
    let mut carried = Carried::default();
    for (volume, dir) in empty_dirs(spec)? {
        let into = checkpoint_dir.join(VOLUMES_DIR).join(&volume);
        fs::create_dir_all(&into).map_err(|source| VolumeError::Io {
            op: "creating",
            path: into.clone(),
            source,
        })?;
        let summary = rootfs::capture_diff(&dir, &into).map_err(failed(&volume, &dir))?;
        carried.volumes.insert(volume, summary.files);
    }
    Ok(carried)
}

/// Writes the volumes carried in `checkpoint_dir` into the same-named emptyDirs of the
/// container with `spec`. A volume the checkpoint does not hold stays empty, as kubelet made
/// it.
pub fn restore(checkpoint_dir: &Path, spec: &Path) -> Result<Carried, VolumeError> {
    let mut carried = Carried::default();
    for (volume, dir) in empty_dirs(spec)? {
        let from = checkpoint_dir.join(VOLUMES_DIR).join(&volume);
        if !from.is_dir() {
            continue;
        }
        let filled = fs::read_dir(&dir)
            .map_err(|source| VolumeError::Io {
                op: "listing",
                path: dir.clone(),
                source,
            })?
            .next()
            .is_some();
        if filled {
            carried.already_filled.push(volume);
            continue;
        }
        let summary = rootfs::apply_diff(&from, &dir, &[]).map_err(failed(&volume, &dir))?;
        carried.volumes.insert(volume, summary.files);
    }
    Ok(carried)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(dir: &Path, sources: &[&Path]) -> PathBuf {
        let mounts: Vec<_> = sources
            .iter()
            .map(|s| serde_json::json!({"destination": "/data", "type": "bind", "source": s}))
            .collect();
        let path = dir.join("config.json");
        fs::write(&path, serde_json::json!({ "mounts": mounts }).to_string()).unwrap();
        path
    }

    fn volume(pods: &Path, uid: &str, name: &str) -> PathBuf {
        let dir = pods
            .join(uid)
            .join("volumes")
            .join(EMPTY_DIR_PLUGIN)
            .join(name);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn only_an_empty_dirs_own_directory_is_an_empty_dir() {
        assert_eq!(
            empty_dir_name(Path::new(
                "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/scratch"
            )),
            Some("scratch".to_string())
        );
        for other in [
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/conf",
            "/var/lib/kubelet/pods/u/volume-subpaths/scratch/app/0",
            "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/scratch/sub",
            "/proc",
        ] {
            assert_eq!(empty_dir_name(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn an_empty_dir_travels_and_a_filled_one_is_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let pods = tmp.path().join("pods");
        let source = volume(&pods, "src", "scratch");
        fs::create_dir(source.join("run")).unwrap();
        fs::write(source.join("run/state"), vec![3u8; 70_000]).unwrap();
        std::os::unix::fs::symlink("state", source.join("run/latest")).unwrap();
        let config = volume(&pods, "src", "ignored");
        fs::write(config.join("x"), "x").unwrap();
        let src_spec_dir = tmp.path().join("src-bundle");
        fs::create_dir(&src_spec_dir).unwrap();
        let src_spec = spec_with(&src_spec_dir, &[&source, Path::new("/etc/hosts")]);

        let ck = tmp.path().join("ck");
        fs::create_dir(&ck).unwrap();
        let captured = capture(&src_spec, &ck).unwrap();
        assert_eq!(captured.volumes, BTreeMap::from([("scratch".into(), 1)]));

        let clone = volume(&pods, "clone", "scratch");
        let clone_spec_dir = tmp.path().join("clone-bundle");
        fs::create_dir(&clone_spec_dir).unwrap();
        let clone_spec = spec_with(&clone_spec_dir, &[&clone]);
        let restored = restore(&ck, &clone_spec).unwrap();
        assert_eq!(restored.volumes, BTreeMap::from([("scratch".into(), 1)]));
        assert_eq!(fs::read(clone.join("run/state")).unwrap().len(), 70_000);
        assert_eq!(
            fs::read_link(clone.join("run/latest")).unwrap(),
            Path::new("state")
        );
        assert!(!clone.join("x").exists());

        // A second container of the same pod: the volume is filled, and stays as it is.
        fs::write(clone.join("run/state"), b"newer").unwrap();
        let again = restore(&ck, &clone_spec).unwrap();
        assert_eq!(again.already_filled, vec!["scratch".to_string()]);
        assert_eq!(fs::read(clone.join("run/state")).unwrap(), b"newer");
    }

    #[test]
    fn a_hostile_volume_lands_nowhere_outside_it() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("ck");
        let carried = ck.join(VOLUMES_DIR).join("scratch");
        fs::create_dir_all(&carried).unwrap();
        let mut b = tar::Builder::new(
            fs::File::create(carried.join(crate::layout::ROOTFS_DIFF_TAR)).unwrap(),
        );
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, "out", tmp.path()).unwrap();
        let mut f = tar::Header::new_gnu();
        f.set_mode(0o644);
        f.set_size(0);
        b.append_data(&mut f, "out/planted", io::empty()).unwrap();
        b.finish().unwrap();
        drop(b);
        let clone = volume(&tmp.path().join("pods"), "clone", "scratch");
        let spec = spec_with(tmp.path(), &[&clone]);
        let err = restore(&ck, &spec).unwrap_err();
        assert!(err.to_string().contains("emptyDir volume scratch"), "{err}");
        assert!(!tmp.path().join("planted").exists());
    }
}
