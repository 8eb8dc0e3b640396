//! The CRIU settings of every container the shim creates, for its dumps and its restores:
//!
//! * `skip-in-flight`: a connection the kernel has not yet handed to the application (a
//!   kubelet probe or a client arriving during the freeze, still in a listening socket's
//!   queue) is dropped instead of failing the dump; its client retries, as after a lost SYN.
//! * `auto-dedup`: CRIU punches each page out of the unpacked image as it restores it, so
//!   memory-backed work space hands its pages straight to the restored process. Without it a
//!   restore briefly needs the checkpoint's size twice (the image in tmpfs and the process),
//!   and on a VM every page of the second copy is a fresh one from the host. The unpacked
//!   images are a private throwaway copy, removed after Start, so consuming them costs
//!   nothing; on a dump it does nothing (it only acts on a dump with a parent image, which
//!   runc's checkpoints here never have).
//!
//! * `tcp-close` and `file-locks`: a pod with established connections or held file locks is
//!   checkpointed instead of failing its dump. The pod's address changes with its node, so its
//!   connections to the outside are restored closed (the application sees them reset, and its
//!   clients reconnect); with our CRIU patch (scripts/criu/tcp-close-keeps-loopback.patch) a
//!   connection with both ends on the loopback, inside the pod, is carried whole. File locks
//!   are taken again by the restored processes.
//! * `address 127.0.0.1`: where a lazy dump's page server listens (post-copy). runc passes
//!   CRIU only its port, and CRIU would otherwise listen on every address, unauthenticated;
//!   the shim's page stream relays it to the clone. Nothing else reads it.
//!
//! A lazy restore (post-copy) gets a file of its own, these settings plus `lazy-pages`
//! ([`apply_lazy_restore`]), rewritten without it once the restore is done ([`settle`]), since
//! the container's later checkpoints read the same file.
//!
//! runc passes CRIU none of these options, but it hands CRIU the configuration file named by the
//! container's `org.criu.config` annotation (instead of `/etc/criu/runc.conf`), and CRIU's
//! file settings override runc's. So each bundle gets that annotation at Create, pointing to
//! a file holding the node's `runc.conf` (if any) plus these settings.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The annotation runc reads for a container's own CRIU configuration file.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// The node-wide file runc names when the annotation is absent.
pub const RUNC_CRIU_CONFIG: &str = "/etc/criu/runc.conf";
/// Our file, directly in the work directory: not under `criu/`, whose entries are a dump's
/// work units and go with garbage collection.
const CONFIG_FILE: &str = "criu.conf";
/// What podmigrate adds to the node's settings (see the module's documentation).
const SETTINGS: &str = "# podmigrate: drop connections not yet accepted instead of failing the dump\nskip-in-flight\n# podmigrate: connections to the outside are restored closed (the pod's address changes), those inside the pod whole\ntcp-close\n# podmigrate: file locks move with their processes\nfile-locks\n# podmigrate: free each restored page from the unpacked image at once\nauto-dedup\n# podmigrate: a lazy dump's page server listens on the loopback only\naddress 127.0.0.1\n";
/// What a lazy restore adds.
const LAZY_SETTINGS: &str =
    "# podmigrate: post-copy, the memory comes from the lazy-pages daemon\nlazy-pages\n";
/// Per-container files of lazy restores, in the work directory.
const LAZY_DIR: &str = "criu-lazy";

#[derive(Debug, thiserror::Error)]
pub enum CriuConfigError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the bundle spec {path}: {reason}")]
    Spec { path: PathBuf, reason: String },
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CriuConfigError + 'a {
    move |source| CriuConfigError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What [`apply`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Ours {
        config: PathBuf,
    },
    /// The spec already names a CRIU configuration, which is left alone.
    SpecHasOwnConfig(String),
}

/// Writes the configuration under `work_dir` and points the bundle's spec at it.
pub fn apply(
    bundle: &Path,
    work_dir: &Path,
    node_config: &Path,
) -> Result<Applied, CriuConfigError> {
    let mut applied = None;
    edit_annotations(bundle, |annotations| {
        if let Some(own) = annotations.get(CRIU_CONFIG_ANNOTATION) {
            applied = Some(Applied::SpecHasOwnConfig(own.to_string()));
            return Ok(false);
        }
        let config = write_config(work_dir, node_config)?;
        annotations.insert(
            CRIU_CONFIG_ANNOTATION.into(),
            serde_json::Value::String(config.display().to_string()),
        );
        applied = Some(Applied::Ours { config });
        Ok(true)
    })?;
    Ok(applied.expect("the spec's annotations were read"))
}

/// Points the bundle's spec at `config`, whatever it named before.
fn set_annotation(bundle: &Path, config: &Path) -> Result<(), CriuConfigError> {
    edit_annotations(bundle, |annotations| {
        annotations.insert(
            CRIU_CONFIG_ANNOTATION.into(),
            serde_json::Value::String(config.display().to_string()),
        );
        Ok(true)
    })
}

/// Reads the bundle's spec, hands `edit` its annotations, and writes the spec back when
/// `edit` says it changed them.
fn edit_annotations(
    bundle: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>) -> Result<bool, CriuConfigError>,
) -> Result<(), CriuConfigError> {
    let spec_path = bundle.join("config.json");
    let text = fs::read_to_string(&spec_path).map_err(io_err("reading", &spec_path))?;
    let mut spec: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CriuConfigError::Spec {
            path: spec_path.clone(),
            reason: e.to_string(),
        })?;
    let Some(object) = spec.as_object_mut() else {
        return Err(CriuConfigError::Spec {
            path: spec_path,
            reason: "not a JSON object".into(),
        });
    };
    let annotations = object
        .entry("annotations")
        .or_insert_with(|| serde_json::json!({}));
    let Some(annotations) = annotations.as_object_mut() else {
        return Err(CriuConfigError::Spec {
            path: spec_path,
            reason: "annotations is not an object".into(),
        });
    };
    if !edit(annotations)? {
        return Ok(());
    }
    let bytes = serde_json::to_vec(&spec).map_err(|e| CriuConfigError::Spec {
        path: spec_path.clone(),
        reason: e.to_string(),
    })?;
    replace_file(&spec_path, &bytes)
}

/// Points the bundle's spec at a configuration of its own for a lazy restore: the node's
/// settings, ours, and `lazy-pages`. Returns the file.
pub fn apply_lazy_restore(
    bundle: &Path,
    work_dir: &Path,
    id: &str,
    node_config: &Path,
) -> Result<PathBuf, CriuConfigError> {
    let path = lazy_config(work_dir, id);
    let dir = work_dir.join(LAZY_DIR);
    fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let text = format!("{}{LAZY_SETTINGS}", node_settings(node_config)?);
    replace_file(&path, text.as_bytes())?;
    set_annotation(bundle, &path)?;
    Ok(path)
}

/// Once a lazy restore is done, its container's file holds the plain settings again, for its
/// later checkpoints.
pub fn settle(work_dir: &Path, id: &str, node_config: &Path) -> Result<(), CriuConfigError> {
    let path = lazy_config(work_dir, id);
    if !path.exists() {
        return Ok(());
    }
    replace_file(&path, node_settings(node_config)?.as_bytes())
}

/// Removes a deleted container's own file, if it had one.
pub fn forget(work_dir: &Path, id: &str) {
    let _ = fs::remove_file(lazy_config(work_dir, id));
}

fn lazy_config(work_dir: &Path, id: &str) -> PathBuf {
    work_dir.join(LAZY_DIR).join(format!("{id}.conf"))
}

/// `<work_dir>/criu.conf`: the node's runc CRIU settings, then ours. A stable path, rewritten
/// whole each time, because a container keeps the annotation for its lifetime and each of its
/// checkpoints and restores reads the file.
fn write_config(work_dir: &Path, node_config: &Path) -> Result<PathBuf, CriuConfigError> {
    fs::create_dir_all(work_dir).map_err(io_err("creating", work_dir))?;
    let path = work_dir.join(CONFIG_FILE);
    replace_file(&path, node_settings(node_config)?.as_bytes())?;
    Ok(path)
}

/// The node's runc CRIU settings, then ours.
fn node_settings(node_config: &Path) -> Result<String, CriuConfigError> {
    let mut text = match fs::read_to_string(node_config) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err("reading", node_config)(e)),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(SETTINGS);
    Ok(text)
}

/// Replaces `path` atomically, so a concurrent reader sees the old or the new file, whole.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), CriuConfigError> {
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut file = fs::File::create(&temp).map_err(io_err("creating", &temp))?;
    file.write_all(bytes).map_err(io_err("writing", &temp))?;
    drop(file);
    fs::rename(&temp, path).map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_err("replacing", path)(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(spec: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), spec).unwrap();
        dir
    }

    #[test]
    fn adds_the_annotation_and_keeps_the_nodes_settings() {
        let b = bundle(
            r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-name":"app"},"process":{"args":["x"]}}"#,
        );
        let work = tempfile::tempdir().unwrap();
        let node = work.path().join("runc.conf");
        fs::write(&node, "tcp-established").unwrap();
        let done = apply(b.path(), work.path(), &node).unwrap();
        let config = work.path().join(CONFIG_FILE);
        assert_eq!(
            done,
            Applied::Ours {
                config: config.clone()
            }
        );
        assert_eq!(
            fs::read_to_string(&config).unwrap(),
            format!("tcp-established\n{SETTINGS}")
        );
        let spec: serde_json::Value =
            serde_json::from_slice(&fs::read(b.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(
            spec["annotations"][CRIU_CONFIG_ANNOTATION],
            config.display().to_string()
        );
        assert_eq!(
            spec["annotations"]["io.kubernetes.cri.container-name"],
            "app"
        );
        assert_eq!(spec["process"]["args"][0], "x");
    }

    #[test]
    fn without_a_node_config_or_annotations() {
        let b = bundle(r#"{"ociVersion":"1.0.2"}"#);
        let work = tempfile::tempdir().unwrap();
        apply(b.path(), work.path(), &work.path().join("absent.conf")).unwrap();
        let text = fs::read_to_string(work.path().join(CONFIG_FILE)).unwrap();
        assert!(text == SETTINGS, "{text}");
    }

    #[test]
    fn a_lazy_restore_gets_a_file_of_its_own_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("bundle");
        fs::create_dir(&bundle).unwrap();
        fs::write(bundle.join("config.json"), r#"{"ociVersion":"1.0.2"}"#).unwrap();
        let work = dir.path().join("work");
        let node = dir.path().join("runc.conf");
        apply(&bundle, &work, &node).unwrap();
        let file = apply_lazy_restore(&bundle, &work, "c1", &node).unwrap();
        let spec = fs::read_to_string(bundle.join("config.json")).unwrap();
        assert!(spec.contains(&file.display().to_string()), "{spec}");
        let text = fs::read_to_string(&file).unwrap();
        assert!(
            text.contains("\nlazy-pages\n") && text.contains("address 127.0.0.1"),
            "{text}"
        );
        settle(&work, "c1", &node).unwrap();
        let text = fs::read_to_string(&file).unwrap();
        assert!(
            !text.contains("lazy-pages") && text.contains("skip-in-flight"),
            "{text}"
        );
        forget(&work, "c1");
        assert!(!file.exists());
    }

    #[test]
    fn a_spec_with_its_own_criu_config_is_left_alone() {
        let spec = r#"{"annotations":{"org.criu.config":"/etc/mine.conf"}}"#;
        let b = bundle(spec);
        let work = tempfile::tempdir().unwrap();
        let done = apply(b.path(), work.path(), Path::new(RUNC_CRIU_CONFIG)).unwrap();
        assert_eq!(done, Applied::SpecHasOwnConfig("\"/etc/mine.conf\"".into()));
        assert_eq!(
            fs::read_to_string(b.path().join("config.json")).unwrap(),
            spec
        );
    }

    #[test]
    fn a_broken_spec_is_an_error_naming_it() {
        let b = bundle("{not json");
        let work = tempfile::tempdir().unwrap();
        let err = apply(b.path(), work.path(), Path::new(RUNC_CRIU_CONFIG)).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
