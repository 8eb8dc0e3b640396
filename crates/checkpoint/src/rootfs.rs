//! The container's own changes to its filesystem, which CRIU does not save.
//!
//! On an overlay rootfs, everything the container wrote is in the upper directory: files and
//! directories become `rootfs-diff.tar`, and whiteouts (character devices 0:0, overlayfs's mark
//! for a deleted file) become the JSON list `deleted.files`, as CRI-O and containerd's CRI
//! checkpoints lay them out. Applying the diff writes the same into the new container's upper
//! directory before it is mounted.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::layout::{DELETED_FILES, ROOTFS_DIFF_TAR};

mod apply;
mod beneath;

pub use apply::{apply_diff, ImageLayers};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{tar}: entry {name:?}: {reason}")]
    BadEntry {
        tar: PathBuf,
        name: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    BadDeletedList { path: PathBuf, reason: String },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RootfsError + 'a {
    move |source| RootfsError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a capture found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffSummary {
    pub files: usize,
    pub deleted: Vec<String>,
    /// Sockets and fifos the container created: they cannot be carried in a tar, and CRIU
    /// recreates the ones its processes still use.
    pub skipped: Vec<String>,
}

fn is_whiteout(meta: &fs::Metadata) -> bool {
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Writes `rootfs-diff.tar` and `deleted.files` for `upperdir` into `checkpoint_dir`.
pub fn capture_diff(upperdir: &Path, checkpoint_dir: &Path) -> Result<DiffSummary, RootfsError> {
    let tar_path = checkpoint_dir.join(ROOTFS_DIFF_TAR);
    let file = File::create(&tar_path).map_err(io_err("creating", &tar_path))?;
    let mut builder = tar::Builder::new(io::BufWriter::new(file));
    builder.follow_symlinks(false);
    let mut summary = DiffSummary::default();
    for item in walkdir::WalkDir::new(upperdir)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
    {
        let item = item.map_err(|e| RootfsError::Io {
            op: "listing",
            path: e.path().unwrap_or(upperdir).to_path_buf(),
            source: e
                .into_io_error()
                .unwrap_or_else(|| io::Error::other("filesystem loop")),
        })?;
        let rel = item
            .path()
            .strip_prefix(upperdir)
            .expect("walkdir stays under its root");
        let meta = item
            .path()
            .symlink_metadata()
            .map_err(io_err("reading metadata of", item.path()))?;
        let in_container = format!("/{}", rel.display());
        let kind = meta.file_type();
        if is_whiteout(&meta) {
            summary.deleted.push(in_container);
        } else if kind.is_dir() || kind.is_file() || kind.is_symlink() {
            builder
                .append_path_with_name(item.path(), rel)
                .map_err(io_err("adding to rootfs-diff.tar", item.path()))?;
            if kind.is_file() {
                summary.files += 1;
            }
        } else {
            summary.skipped.push(in_container);
        }
    }
    builder
        .into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(io_err("writing", &tar_path))?;
    let deleted_path = checkpoint_dir.join(DELETED_FILES);
    let json = serde_json::to_vec(&summary.deleted).expect("a list of strings serialises");
    fs::write(&deleted_path, json).map_err(io_err("writing", &deleted_path))?;
    Ok(summary)
}

#[cfg(test)]
mod hostile_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn make_whiteout(path: &Path) -> io::Result<()> {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            path,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        )?;
        Ok(())
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_diff_round_trips_files_links_and_whiteouts() {
        let tmp = tempfile::tempdir().unwrap();
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("tmp/sub")).unwrap();
        fs::write(upper.join("tmp/count"), b"5\n").unwrap();
        fs::write(upper.join("tmp/sub/data"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("/tmp/count", upper.join("tmp/link")).unwrap();
        if is_root() {
            make_whiteout(&upper.join("tmp/gone")).unwrap();
        }
        let ck = tmp.path().join("ck");
        fs::create_dir(&ck).unwrap();
        let captured = capture_diff(&upper, &ck).unwrap();
        assert_eq!(captured.files, 2);
        assert_eq!(
            captured.deleted,
            if is_root() {
                vec!["/tmp/gone".to_string()]
            } else {
                vec![]
            }
        );

        let new_upper = tmp.path().join("new-upper");
        fs::create_dir(&new_upper).unwrap();
        let applied = apply_diff(&ck, &new_upper, &[]).unwrap();
        assert_eq!(applied.files, 2);
        assert_eq!(fs::read(new_upper.join("tmp/count")).unwrap(), b"5\n");
        assert_eq!(
            fs::read(new_upper.join("tmp/sub/data")).unwrap().len(),
            100_000
        );
        assert_eq!(
            fs::read_link(new_upper.join("tmp/link")).unwrap(),
            Path::new("/tmp/count")
        );
        if is_root() {
            assert!(is_whiteout(
                &fs::symlink_metadata(new_upper.join("tmp/gone")).unwrap()
            ));
        }
    }

    #[test]
    fn traversal_devices_and_setuid_in_a_diff_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let write_tar = |build: &dyn Fn(&mut tar::Builder<File>)| {
            let ck = tmp.path().join("ck");
            let _ = fs::remove_dir_all(&ck);
            fs::create_dir(&ck).unwrap();
            let mut b = tar::Builder::new(File::create(ck.join(ROOTFS_DIFF_TAR)).unwrap());
            build(&mut b);
            b.finish().unwrap();
            ck
        };
        let file_header = |mode: u32, kind: tar::EntryType| {
            let mut h = tar::Header::new_gnu();
            h.set_size(0);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_entry_type(kind);
            h
        };
        type BuildTar<'a> = Box<dyn Fn(&mut tar::Builder<File>) + 'a>;
        let cases: Vec<(&str, BuildTar)> = vec![
            (
                "'..'",
                Box::new(|b| {
                    let mut h = file_header(0o644, tar::EntryType::Regular);
                    // set_path refuses "..", so write the raw name.
                    h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
                    h.set_cksum();
                    b.append(&h, io::empty()).unwrap();
                }),
            ),
            (
                "device node",
                Box::new(|b| {
                    let mut h = file_header(0o644, tar::EntryType::Char);
                    b.append_data(&mut h, "dev/evil", io::empty()).unwrap();
                }),
            ),
            (
                "setuid",
                Box::new(|b| {
                    let mut h = file_header(0o4755, tar::EntryType::Regular);
                    b.append_data(&mut h, "bin/evil", io::empty()).unwrap();
                }),
            ),
        ];
        for (why, build) in cases {
            let ck = write_tar(&*build);
            let upper = tmp.path().join("upper");
            let _ = fs::remove_dir_all(&upper);
            fs::create_dir(&upper).unwrap();
            let err = apply_diff(&ck, &upper, &[]).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(!tmp.path().join("escape").exists());
        }

        // A symlink to the host, then a file "through" it: must not land on the host.
        let ck = write_tar(&|b| {
            let mut h = file_header(0o777, tar::EntryType::Symlink);
            b.append_link(&mut h, "hostdir", tmp.path()).unwrap();
            let mut f = file_header(0o644, tar::EntryType::Regular);
            b.append_data(&mut f, "hostdir/planted", io::empty())
                .unwrap();
        });
        let upper = tmp.path().join("upper2");
        fs::create_dir(&upper).unwrap();
        assert!(apply_diff(&ck, &upper, &[]).is_err());
        assert!(!tmp.path().join("planted").exists());
    }
}
