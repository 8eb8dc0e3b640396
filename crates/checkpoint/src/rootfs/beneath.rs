//! Path walks that never follow a symbolic link and never leave the directory they start from.
//!
//! A diff is applied on the host, as root, into a directory whose contents an archive chose:
//! any symbolic link in it (planted by an earlier tar entry, or already there) must stay a
//! name, never a way out. Every lookup here goes one component at a time through `openat2`
//! with `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`, so the kernel refuses a link or a `..` instead
//! of a string check trying to predict it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat2, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

pub(crate) const RESOLVE: ResolveFlags = ResolveFlags::NO_SYMLINKS
    .union(ResolveFlags::BENEATH)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::CLOEXEC)
    .union(OFlags::NOFOLLOW);

/// Why a walk stopped: the component in the way and what it is.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// A symbolic link where a directory was needed.
    Symlink(PathBuf),
    /// Something other than a directory where a directory was needed.
    NotADirectory(PathBuf),
    Io(PathBuf, io::Error),
}

impl WalkError {
    pub(crate) fn describe(&self) -> String {
        match self {
            // Debug quoting: a name from the archive may hold a newline.
            WalkError::Symlink(at) => {
                format!("{at:?} is a symbolic link; nothing is ever written through one")
            }
            WalkError::NotADirectory(at) => format!("{at:?} is not a directory"),
            WalkError::Io(at, e) => format!("{at:?}: {e}"),
        }
    }
}

/// A relative path made only of normal components, or `None`.
pub(crate) fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::RootDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Splits a safe relative path into its parent (possibly empty) and last name.
pub(crate) fn split(rel: &Path) -> (&Path, &OsStr) {
    (
        rel.parent().unwrap_or(Path::new("")),
        rel.file_name()
            .expect("a safe relative path ends in a name"),
    )
}

/// Opens a directory the caller named (its own path may contain links: it is ours, not the
/// archive's), refusing only a link as its last component.
pub(crate) fn open_root(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(path, DIR_FLAGS, Mode::empty())?)
}

/// Opens `rel` under `root` as a directory, creating missing components (mode 0755) when
/// `create`; `Ok(None)` when it is missing and not `create`.
pub(crate) fn open_dir(
    root: BorrowedFd<'_>,
    rel: &Path,
    create: bool,
) -> Result<Option<OwnedFd>, WalkError> {
    let mut walked = PathBuf::new();
    let mut current = openat2(root, ".", DIR_FLAGS, Mode::empty(), RESOLVE)
        .map_err(|e| WalkError::Io(PathBuf::from("."), e.into()))?;
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(WalkError::Io(
                rel.to_path_buf(),
                io::Error::other("not a plain relative path"),
            ));
        };
        walked.push(name);
        current = loop {
            match openat2(&current, name, DIR_FLAGS, Mode::empty(), RESOLVE) {
                Ok(fd) => break fd,
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(&current, name, Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => continue,
                        Err(e) => return Err(WalkError::Io(walked, e.into())),
                    }
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(Errno::LOOP) => return Err(WalkError::Symlink(walked)),
                Err(Errno::NOTDIR) => {
                    // O_DIRECTORY|O_NOFOLLOW on a link gives ENOTDIR on some kernels: name it.
                    return Err(match lstat_at(current.as_fd(), name) {
                        Ok(Some(st)) if is_symlink(&st) => WalkError::Symlink(walked),
                        _ => WalkError::NotADirectory(walked),
                    });
                }
                Err(e) => return Err(WalkError::Io(walked, e.into())),
            }
        };
    }
    Ok(Some(current))
}

/// `lstat` of one name in a directory; `Ok(None)` if it does not exist.
pub(crate) fn lstat_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(crate) fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

pub(crate) fn is_symlink(st: &Stat) -> bool {
    file_type(st) == FileType::Symlink
}

/// overlayfs marks a deleted name with a 0:0 character device.
pub(crate) fn is_whiteout(st: &Stat) -> bool {
    file_type(st) == FileType::CharacterDevice && st.st_rdev == 0
}

/// Opens one name in `dir` without following it.
pub(crate) fn open_at(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    flags: OFlags,
    mode: u32,
) -> io::Result<OwnedFd> {
    Ok(openat2(
        dir,
        name,
        flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::from_raw_mode(mode),
        RESOLVE,
    )?)
}
