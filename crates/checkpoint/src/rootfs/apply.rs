//! Applying an untrusted `rootfs-diff.tar` and `deleted.files` to a new container's upper
//! directory (docs/security.md says what is refused and why).
//!
//! Two passes: the first reads every header and refuses the diff before anything is written
//! (traversal, devices, set-id bits and xattrs the image does not have, links that leave the
//! rootfs, entries under a link); the second writes with no-follow walks only, so even a link
//! that was already in the upper directory is never followed. If the second pass fails anyway,
//! an upper directory that was empty is emptied again.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;

use super::beneath::{
    file_type, is_whiteout, lstat_at, open_at, open_dir, open_root, safe_relative, split, WalkError,
};
use super::{io_err, DiffSummary, RootfsError};
use crate::layout::{DELETED_FILES, ROOTFS_DIFF_TAR};

/// No container's list of deleted paths comes near this.
const MAX_DELETED_LIST_BYTES: u64 = 16 << 20;
/// The kernel's limit on one xattr value (XATTR_SIZE_MAX).
const MAX_XATTR_BYTES: usize = 64 << 10;
const SCHILY_XATTR: &str = "SCHILY.xattr.";
/// PAX records that carry nothing but what a ustar/GNU header already may.
const PLAIN_PAX_KEYS: &[&str] = &[
    "path",
    "linkpath",
    "size",
    "uid",
    "gid",
    "uname",
    "gname",
    "mtime",
    "atime",
    "ctime",
    "comment",
    "charset",
    "hdrcharset",
];

/// The image's own layers (overlay `lowerdir`s, topmost first): what a diff may carry over
/// from them (set-id bits, xattrs) it must match exactly.
pub struct ImageLayers {
    dirs: Vec<(PathBuf, OwnedFd)>,
}

/// One file as the image has it.
struct InImage {
    parent: OwnedFd,
    name: std::ffi::OsString,
    stat: rustix::fs::Stat,
}

impl ImageLayers {
    pub fn open(lowerdirs: &[PathBuf]) -> Result<Self, RootfsError> {
        let dirs = lowerdirs
            .iter()
            .map(|d| Ok((d.clone(), open_root(d).map_err(io_err("opening", d))?)))
            .collect::<Result<_, RootfsError>>()?;
        Ok(ImageLayers { dirs })
    }

    /// The topmost layer's `rel`, as overlayfs would show it; `None` if the image lacks it (or
    /// a layer deleted it, or hides it behind something that is not a directory).
    fn find(&self, rel: &Path) -> Option<InImage> {
        let (parent, name) = split(rel);
        for (_, dir) in &self.dirs {
            match open_dir(dir.as_fd(), parent, false) {
                Ok(Some(parent)) => match lstat_at(parent.as_fd(), name) {
                    Ok(Some(stat)) if is_whiteout(&stat) => return None,
                    Ok(Some(stat)) => {
                        return Some(InImage {
                            parent,
                            name: name.to_owned(),
                            stat,
                        })
                    }
                    Ok(None) => continue,
                    Err(_) => return None,
                },
                Ok(None) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// The value of xattr `name` on `rel` in the image, if it has one.
    fn xattr(&self, rel: &Path, name: &str) -> Option<Vec<u8>> {
        let found = self.find(rel)?;
        if !matches!(
            file_type(&found.stat),
            FileType::RegularFile | FileType::Directory
        ) {
            return None;
        }
        let fd = open_at(
            found.parent.as_fd(),
            &found.name,
            OFlags::RDONLY | OFlags::NONBLOCK,
            0,
        )
        .ok()?;
        let mut buf = vec![0u8; MAX_XATTR_BYTES];
        let len = rustix::fs::fgetxattr(&fd, name, &mut buf[..]).ok()?;
        buf.truncate(len);
        Some(buf)
    }
}

/// What one tar entry is, once checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    HardLink,
}

/// Applies `rootfs-diff.tar` and `deleted.files` from `checkpoint_dir` to `upperdir`, the upper
/// directory of the new container's overlay, before it is mounted. `lowerdirs` are the image's
/// layers, topmost first. Missing files mean the container changed nothing.
pub fn apply_diff(
    checkpoint_dir: &Path,
    upperdir: &Path,
    lowerdirs: &[PathBuf],
) -> Result<DiffSummary, RootfsError> {
    let image = ImageLayers::open(lowerdirs)?;
    let tar_path = checkpoint_dir.join(ROOTFS_DIFF_TAR);
    let tar_present = match fs::symlink_metadata(&tar_path) {
        Ok(m) if m.is_file() => true,
        Ok(_) => {
            return Err(RootfsError::BadEntry {
                tar: tar_path,
                name: String::new(),
                reason: "is not a regular file".to_string(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(io_err("opening", &tar_path)(e)),
    };
    let deleted = read_deleted_list(&checkpoint_dir.join(DELETED_FILES))?;

    // Pass 1: refuse before writing anything.
    let mut summary = DiffSummary::default();
    if tar_present {
        summary.files = check_tar(&tar_path, &image)?;
    }
    let deleted_path = checkpoint_dir.join(DELETED_FILES);

    // Pass 2: write, never following a link.
    let root = open_root(upperdir).map_err(io_err("opening", upperdir))?;
    let was_empty = fs::read_dir(upperdir)
        .map_err(io_err("listing", upperdir))?
        .next()
        .is_none();
    let written = (|| {
        if tar_present {
            write_tar(&tar_path, root.as_fd(), upperdir)?;
        }
        for (path, rel) in &deleted {
            make_whiteout(root.as_fd(), upperdir, rel).map_err(|reason| {
                RootfsError::BadDeletedList {
                    path: deleted_path.clone(),
                    reason: format!("{path:?}: {reason}"),
                }
            })?;
            summary.deleted.push(path.clone());
        }
        Ok(())
    })();
    if let Err(e) = written {
        if was_empty {
            empty_dir(upperdir);
        }
        return Err(e);
    }
    Ok(summary)
}

/// Removes everything in `dir` (std's remove_dir_all never follows links).
fn empty_dir(dir: &Path) {
    if let Ok(items) = fs::read_dir(dir) {
        for item in items.flatten() {
            let path = item.path();
            let _ = match item.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
        }
    }
}

fn read_deleted_list(path: &Path) -> Result<Vec<(String, PathBuf)>, RootfsError> {
    let bad = |reason: String| RootfsError::BadDeletedList {
        path: path.to_path_buf(),
        reason,
    };
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(file) => {
            file.take(MAX_DELETED_LIST_BYTES + 1)
                .read_to_end(&mut bytes)
                .map_err(io_err("reading", path))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("reading", path)(e)),
    }
    if bytes.len() as u64 > MAX_DELETED_LIST_BYTES {
        return Err(bad(format!(
            "larger than the {MAX_DELETED_LIST_BYTES}-byte limit"
        )));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let list: Vec<String> = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    list.into_iter()
        .map(|p| {
            // Paths are the container's, absolute; below the root only plain names.
            let rel = safe_relative(Path::new(p.trim_start_matches('/')))
                .filter(|_| !p.chars().any(char::is_control))
                .ok_or_else(|| bad(format!("{p:?} is not a path inside the container")))?;
            Ok((p, rel))
        })
        .collect()
}

/// The header fields pass 1 checks and pass 2 applies.
struct Header {
    rel: PathBuf,
    kind: Kind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    link: Option<PathBuf>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn read_header<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    bad: &dyn Fn(&str) -> RootfsError,
) -> Result<Header, RootfsError> {
    let rel = entry
        .path()
        .ok()
        .and_then(|p| safe_relative(&p))
        .ok_or_else(|| bad("absolute path or '..' component"))?;
    let header = entry.header();
    let kind = match header.entry_type() {
        t if t.is_file() => Kind::File,
        t if t.is_dir() => Kind::Dir,
        t if t.is_symlink() => Kind::Symlink,
        t if t.is_hard_link() => Kind::HardLink,
        t if t.is_character_special() || t.is_block_special() => {
            return Err(bad("device node (runc creates /dev from the pod's spec)"))
        }
        t if t.is_fifo() => return Err(bad("fifo (CRIU recreates the ones in use)")),
        _ => {
            return Err(bad(
                "only files, directories and symbolic links may be restored",
            ))
        }
    };
    let number = |v: io::Result<u64>, what: &str| -> Result<u32, RootfsError> {
        v.ok()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| bad(&format!("unreadable {what}")))
    };
    let mode = number(header.mode().map(u64::from), "mode")? & 0o7777;
    let uid = number(header.uid(), "owner")?;
    let gid = number(header.gid(), "group")?;
    let mtime = header
        .mtime()
        .ok()
        .and_then(|m| i64::try_from(m).ok())
        .ok_or_else(|| bad("unreadable mtime"))?;
    let link = match kind {
        Kind::Symlink | Kind::HardLink => Some(
            entry
                .link_name()
                .ok()
                .flatten()
                .map(|l| l.into_owned())
                .filter(|l| !l.as_os_str().is_empty())
                .ok_or_else(|| bad("link without a target"))?,
        ),
        _ => None,
    };
    let mut xattrs = Vec::new();
    if let Some(extensions) = entry
        .pax_extensions()
        .map_err(|_| bad("unreadable PAX header"))?
    {
        for extension in extensions {
            let extension = extension.map_err(|_| bad("unreadable PAX record"))?;
            let key = extension
                .key()
                .map_err(|_| bad("PAX record key is not UTF-8"))?;
            if let Some(name) = key.strip_prefix(SCHILY_XATTR) {
                xattrs.push((name.to_string(), extension.value_bytes().to_vec()));
            } else if !PLAIN_PAX_KEYS.contains(&key) {
                return Err(bad(&format!(
                    "PAX record {key:?} is not supported (xattrs, ACLs and sparse files are refused)"
                )));
            }
        }
    }
    Ok(Header {
        rel,
        kind,
        mode,
        uid,
        gid,
        mtime,
        link,
        xattrs,
    })
}

fn open_tar(tar_path: &Path) -> Result<tar::Archive<io::BufReader<File>>, RootfsError> {
    let file = File::open(tar_path).map_err(io_err("opening", tar_path))?;
    Ok(tar::Archive::new(io::BufReader::new(file)))
}

fn bad_entry(tar: &Path, raw_name: &[u8]) -> impl Fn(&str) -> RootfsError {
    let tar = tar.to_path_buf();
    let name = String::from_utf8_lossy(raw_name).into_owned();
    move |reason| RootfsError::BadEntry {
        tar: tar.clone(),
        name: name.clone(),
        reason: reason.to_string(),
    }
}

/// Pass 1: every header, no writes. Returns the number of regular files.
fn check_tar(tar_path: &Path, image: &ImageLayers) -> Result<usize, RootfsError> {
    let mut archive = open_tar(tar_path)?;
    let mut files = HashSet::new();
    let mut symlinks = HashSet::new();
    let mut count = 0;
    for entry in archive.entries().map_err(io_err("reading", tar_path))? {
        let mut entry = entry.map_err(io_err("reading", tar_path))?;
        let bad = bad_entry(tar_path, &entry.path_bytes());
        let h = read_header(&mut entry, &bad)?;
        for ancestor in h.rel.ancestors().skip(1) {
            if symlinks.contains(ancestor) {
                return Err(bad(&format!(
                    "lies under {}, a symbolic link earlier in this diff",
                    ancestor.display()
                )));
            }
            if files.contains(ancestor) {
                return Err(bad(&format!(
                    "lies under {}, a file earlier in this diff",
                    ancestor.display()
                )));
            }
        }
        let in_image = || image.find(&h.rel);
        let setid = h.mode & 0o6000;
        if setid != 0 {
            // setgid on a directory only passes its group on; anything else must be the
            // image's own set-id file, same bits and same owner.
            let harmless = h.kind == Kind::Dir && setid == 0o2000;
            let same_as_image = in_image().is_some_and(|f| {
                let image_kind = file_type(&f.stat);
                let matches_kind = match h.kind {
                    Kind::File => image_kind == FileType::RegularFile,
                    Kind::Dir => image_kind == FileType::Directory,
                    _ => false,
                };
                matches_kind
                    && f.stat.st_mode & setid == setid
                    && (setid & 0o4000 == 0 || f.stat.st_uid == h.uid)
                    && (setid & 0o2000 == 0 || f.stat.st_gid == h.gid)
            });
            if !harmless && !same_as_image {
                return Err(bad(
                    "setuid or setgid file that the image does not have with these bits and owner",
                ));
            }
        }
        for (name, value) in &h.xattrs {
            if !matches!(h.kind, Kind::File | Kind::Dir) {
                return Err(bad(&format!("xattr {name:?} on a link")));
            }
            if image.xattr(&h.rel, name).as_deref() != Some(value.as_slice()) {
                return Err(bad(&format!(
                    "xattr {name:?} is not on this file in the image with this value"
                )));
            }
        }
        match h.kind {
            Kind::Symlink => {
                let target = h.link.as_deref().expect("links have targets");
                if climbs_out(&h.rel, target) {
                    return Err(bad(&format!(
                        "symbolic link to {} climbs above the container's root",
                        target.display()
                    )));
                }
            }
            Kind::HardLink => {
                let target = h.link.as_deref().expect("links have targets");
                let target = safe_relative(target)
                    .ok_or_else(|| bad("hard link target is absolute or has a '..' component"))?;
                if !files.contains(&target) {
                    return Err(bad(&format!(
                        "hard link to {}, which is not a regular file earlier in this diff",
                        target.display()
                    )));
                }
            }
            _ => {}
        }
        symlinks.remove(&h.rel);
        files.remove(&h.rel);
        match h.kind {
            Kind::File => {
                count += 1;
                files.insert(h.rel);
            }
            Kind::HardLink => {
                files.insert(h.rel);
            }
            Kind::Symlink => {
                symlinks.insert(h.rel);
            }
            Kind::Dir => {}
        }
    }
    Ok(count)
}

/// Whether a relative symlink target, resolved from the link's own directory inside the
/// rootfs, would climb above its root. The kernel would stop it at the container's root, so
/// it is harmless to the host; but no honest container writes one, so it is refused.
/// Absolute targets are the container's own paths and are kept as they are.
fn climbs_out(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = link.components().count() as i64 - 1;
    for component in target.components() {
        match component {
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

/// Pass 2: writes each entry with no-follow walks.
fn write_tar(tar_path: &Path, root: BorrowedFd<'_>, upperdir: &Path) -> Result<(), RootfsError> {
    let mut archive = open_tar(tar_path)?;
    let mut dir_times = Vec::new();
    for entry in archive.entries().map_err(io_err("reading", tar_path))? {
        let mut entry = entry.map_err(io_err("reading", tar_path))?;
        let bad = bad_entry(tar_path, &entry.path_bytes());
        let h = read_header(&mut entry, &bad)?;
        let at = |what: &str| format!("{:?}: {what}", upperdir.join(&h.rel));
        let walk_err = |e: WalkError| bad(&format!("cannot be written: {}", e.describe()));
        let (parent_rel, name) = split(&h.rel);
        let parent = open_dir(root, parent_rel, true)
            .map_err(walk_err)?
            .expect("created");
        let existing = lstat_at(parent.as_fd(), name).map_err(io_err("reading", upperdir))?;
        if let Some(st) = &existing {
            let is_dir = file_type(st) == FileType::Directory;
            if is_dir && h.kind != Kind::Dir {
                return Err(bad("would replace a directory"));
            }
            if !is_dir {
                rustix::fs::unlinkat(&parent, name, AtFlags::empty())
                    .map_err(|e| bad(&at(&format!("removing: {e}"))))?;
            }
        }
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: h.mtime,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: h.mtime,
                tv_nsec: 0,
            },
        };
        let fail = |what: &str, e: Errno| bad(&at(&format!("{what}: {e}")));
        match h.kind {
            Kind::Dir => {
                if existing
                    .as_ref()
                    .is_none_or(|st| file_type(st) != FileType::Directory)
                {
                    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| fail("creating", e))?;
                }
                let fd = open_at(parent.as_fd(), name, OFlags::DIRECTORY | OFlags::RDONLY, 0)
                    .map_err(|e| bad(&at(&format!("opening: {e}"))))?;
                finish(&fd, &h, &fail)?;
                dir_times.push((h.rel.clone(), times));
            }
            Kind::File => {
                let fd = open_at(
                    parent.as_fd(),
                    name,
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    0o600,
                )
                .map_err(|e| bad(&at(&format!("creating: {e}"))))?;
                let mut file = File::from(fd);
                io::copy(&mut entry, &mut file).map_err(|e| bad(&at(&format!("writing: {e}"))))?;
                finish(&file, &h, &fail)?;
                rustix::fs::futimens(&file, &times).map_err(|e| fail("setting times", e))?;
            }
            Kind::Symlink => {
                let target = h.link.as_deref().expect("links have targets");
                rustix::fs::symlinkat(target, &parent, name).map_err(|e| fail("linking", e))?;
                rustix::fs::chownat(
                    &parent,
                    name,
                    Some(Uid::from_raw(h.uid)),
                    Some(Gid::from_raw(h.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(|e| fail("setting the owner", e))?;
                rustix::fs::utimensat(&parent, name, &times, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| fail("setting times", e))?;
            }
            Kind::HardLink => {
                let target = h
                    .link
                    .as_deref()
                    .and_then(safe_relative)
                    .expect("pass 1 checked it");
                let (target_parent, target_name) = split(&target);
                let target_dir = open_dir(root, target_parent, false)
                    .map_err(walk_err)?
                    .ok_or_else(|| bad("hard link target is missing"))?;
                match lstat_at(target_dir.as_fd(), target_name) {
                    Ok(Some(st)) if file_type(&st) == FileType::RegularFile => {}
                    _ => return Err(bad("hard link target is not a regular file")),
                }
                // No AT_SYMLINK_FOLLOW: the name itself is linked, never what it points to.
                rustix::fs::linkat(&target_dir, target_name, &parent, name, AtFlags::empty())
                    .map_err(|e| fail("linking", e))?;
            }
        }
    }
    // Directory times last: writing into them changed their mtimes.
    for (rel, times) in dir_times.iter().rev() {
        let (parent_rel, name) = split(rel);
        if let Ok(Some(parent)) = open_dir(root, parent_rel, false) {
            let _ = rustix::fs::utimensat(&parent, name, times, AtFlags::SYMLINK_NOFOLLOW);
        }
    }
    Ok(())
}

/// Owner, then mode (chown clears set-id bits), then the xattrs pass 1 allowed.
fn finish(
    fd: &impl AsFd,
    h: &Header,
    fail: &dyn Fn(&str, Errno) -> RootfsError,
) -> Result<(), RootfsError> {
    rustix::fs::fchown(fd, Some(Uid::from_raw(h.uid)), Some(Gid::from_raw(h.gid)))
        .map_err(|e| fail("setting the owner", e))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(h.mode)).map_err(|e| fail("setting the mode", e))?;
    for (name, value) in &h.xattrs {
        rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty())
            .map_err(|e| fail(&format!("setting xattr {name:?}"), e))?;
    }
    Ok(())
}

fn make_whiteout(root: BorrowedFd<'_>, upperdir: &Path, rel: &Path) -> Result<(), String> {
    let (parent_rel, name) = split(rel);
    let parent = open_dir(root, parent_rel, true)
        .map_err(|e| format!("cannot be deleted: {}", e.describe()))?
        .expect("created");
    match rustix::fs::mknodat(&parent, name, FileType::CharacterDevice, Mode::empty(), 0) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => match lstat_at(parent.as_fd(), name) {
            Ok(Some(st)) if is_whiteout(&st) => Ok(()),
            _ => Err(format!(
                "{:?} is also in rootfs-diff.tar",
                upperdir.join(rel)
            )),
        },
        Err(e) => Err(format!(
            "creating a whiteout at {:?}: {e}",
            upperdir.join(rel)
        )),
    }
}
