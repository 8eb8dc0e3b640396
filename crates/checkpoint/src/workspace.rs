//! Where a checkpoint is dumped and unpacked on a node: memory-backed space (tmpfs) when the
//! checkpoint fits there, the disk work directory otherwise.
//!
//! A checkpoint is written once and read once within seconds, all while the workload is frozen.
//! On a disk filesystem those writes pay for journaling and writeback of data that is deleted
//! moments later; in tmpfs they cost a memory copy. A migration often runs *because* a node is
//! short of memory, so memory is used only with room to spare, and the disk stays the fallback.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The default memory-backed work space: `/dev/shm` is a tmpfs on every mainstream distribution.
pub const DEFAULT_MEMORY_DIR: &str = "/dev/shm/podmigrate";

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// Fixed slack on top of a checkpoint's estimated size (CRIU's small images, the rootfs diff).
const SLACK_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WorkSpaceError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("memory work space {path} is unsafe: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

/// A node's two work spaces.
#[derive(Debug, Clone)]
pub struct WorkSpace {
    pub disk: PathBuf,
    /// `None` when memory-backed work space is switched off.
    pub memory: Option<PathBuf>,
}

/// The space chosen for one checkpoint, and why (for the logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    pub root: PathBuf,
    pub in_memory: bool,
    pub why: String,
}

/// What the memory side can take right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRoom {
    /// Free bytes in the tmpfs.
    pub fs_free: u64,
    pub mem_available: u64,
    pub mem_total: u64,
}

impl MemoryRoom {
    /// Whether `need` bytes fit with room to spare: an eighth more than the estimate (plus
    /// slack) in the filesystem, and the node keeps an eighth of its memory available after.
    pub fn fits(&self, need: u64) -> bool {
        let padded = need.saturating_add(need / 8).saturating_add(SLACK_BYTES);
        padded <= self.fs_free && padded.saturating_add(self.mem_total / 8) <= self.mem_available
    }
}

impl WorkSpace {
    /// The space for a checkpoint of about `need` bytes (`None`: unknown, so the disk).
    pub fn choose(&self, need: Option<u64>) -> Chosen {
        let disk = |why: String| Chosen {
            root: self.disk.clone(),
            in_memory: false,
            why,
        };
        let Some(memory) = &self.memory else {
            return disk("memory work space is off".into());
        };
        let Some(need) = need else {
            return disk("the checkpoint's size is unknown".into());
        };
        let room = match prepare_memory_dir(memory).and_then(|()| memory_room(memory)) {
            Ok(room) => room,
            Err(e) => return disk(e.to_string()),
        };
        if room.fits(need) {
            Chosen {
                root: memory.clone(),
                in_memory: true,
                why: format!(
                    "{} MiB fits ({} MiB free in {}, {} MiB of memory available)",
                    need >> 20,
                    room.fs_free >> 20,
                    memory.display(),
                    room.mem_available >> 20
                ),
            }
        } else {
            disk(format!(
                "{} MiB does not fit in memory with room to spare ({} MiB free in {}, {} MiB of {} MiB available)",
                need >> 20,
                room.fs_free >> 20,
                memory.display(),
                room.mem_available >> 20,
                room.mem_total >> 20
            ))
        }
    }
}

/// Creates the memory work space (root-only) or checks the one that is there: it lies in a
/// world-writable `/dev/shm`, where another user could have put a directory or link of theirs
/// to read checkpoints from.
pub fn prepare_memory_dir(dir: &Path) -> Result<(), WorkSpaceError> {
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(WorkSpaceError::Io {
                op: "creating",
                path: dir.to_path_buf(),
                source: e,
            })
        }
    }
    let meta = fs::symlink_metadata(dir).map_err(|e| WorkSpaceError::Io {
        op: "inspecting",
        path: dir.to_path_buf(),
        source: e,
    })?;
    let unsafe_because = |reason: String| WorkSpaceError::Unsafe {
        path: dir.to_path_buf(),
        reason,
    };
    if !meta.file_type().is_dir() {
        return Err(unsafe_because("it is not a directory".into()));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_because(format!(
            "it belongs to uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| {
            WorkSpaceError::Io {
                op: "restricting the mode of",
                path: dir.to_path_buf(),
                source: e,
            }
        })?;
    }
    Ok(())
}

/// Free space of the tmpfs at `dir` and the node's memory. Fails if `dir` is not memory-backed.
pub fn memory_room(dir: &Path) -> Result<MemoryRoom, WorkSpaceError> {
    let io_err = |op, source| WorkSpaceError::Io {
        op,
        path: dir.to_path_buf(),
        source,
    };
    let c_path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("naming", io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io_err("statfs on", io::Error::last_os_error()));
    }
    let fs_type = st.f_type as i64;
    if fs_type != TMPFS_MAGIC && fs_type != RAMFS_MAGIC {
        return Err(WorkSpaceError::Unsafe {
            path: dir.to_path_buf(),
            reason: format!("it is not on tmpfs (filesystem type {fs_type:#x})"),
        });
    }
    let meminfo = fs::read_to_string("/proc/meminfo").map_err(|e| WorkSpaceError::Io {
        op: "reading",
        path: "/proc/meminfo".into(),
        source: e,
    })?;
    let (mem_total, mem_available) = parse_meminfo(&meminfo);
    Ok(MemoryRoom {
        fs_free: (st.f_bavail as u64).saturating_mul(st.f_bsize as u64),
        mem_available,
        mem_total,
    })
}

/// `MemTotal` and `MemAvailable` in bytes (0 when missing).
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal"), field("MemAvailable"))
}

/// Memory charged to the cgroup of process `pid` (cgroup v2 `memory.current`, or v1
/// `memory.usage_in_bytes`): an upper bound for what CRIU will write, since it also counts
/// page cache that a dump does not carry.
pub fn cgroup_memory(pid: u32) -> Option<u64> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    cgroup_memory_file(&cgroups)
        .and_then(|file| fs::read_to_string(file).ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The memory usage file for a `/proc/<pid>/cgroup` listing.
fn cgroup_memory_file(cgroups: &str) -> Option<PathBuf> {
    let relative = |path: &str| path.trim_start_matches('/').to_string();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            return Some(
                Path::new("/sys/fs/cgroup/memory")
                    .join(relative(path))
                    .join("memory.usage_in_bytes"),
            );
        }
    }
    let unified = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(
        Path::new("/sys/fs/cgroup")
            .join(relative(unified))
            .join("memory.current"),
    )
}

/// Removes a checkpoint's local directory, with whatever CRIU mounted inside it: a CRIU killed
/// while it restores leaves its cgroup yard (`.criu.cgyard.*`, a tmpfs with the cgroup
/// hierarchies) mounted in its work directory, where no plain removal gets through. Those
/// mounts are detached first, deepest first. Best effort: what cannot go stays.
pub fn discard(dir: &Path) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for point in mounts_under(&mountinfo, dir) {
        if let Ok(c) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// The mount points strictly under `dir` in a `/proc/self/mountinfo` text, deepest first.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point != dir && point.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// mountinfo writes a space, tab, newline and backslash in a path as `\ooo` (octal).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let code =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_mounts_criu_left_in_a_directory_are_found_deepest_first() {
        let info = "\
36 25 0:32 / /dev/shm rw - tmpfs tmpfs rw
90 36 0:50 / /dev/shm/podmigrate/restore/ns/c1/checkpoint/.criu.cgyard.XIxijK rw - tmpfs none rw
91 90 0:51 / /dev/shm/podmigrate/restore/ns/c1/checkpoint/.criu.cgyard.XIxijK/blkio rw - cgroup none rw,blkio
92 36 0:52 / /dev/shm/podmigrate/restore/ns/c10/x rw - tmpfs none rw
93 36 0:53 / /dev/shm/podmigrate/restore/ns/c1/with\\040space rw - tmpfs none rw
";
        let dir = Path::new("/dev/shm/podmigrate/restore/ns/c1");
        assert_eq!(
            super::mounts_under(info, dir),
            [
                PathBuf::from(
                    "/dev/shm/podmigrate/restore/ns/c1/checkpoint/.criu.cgyard.XIxijK/blkio"
                ),
                PathBuf::from("/dev/shm/podmigrate/restore/ns/c1/checkpoint/.criu.cgyard.XIxijK"),
                PathBuf::from("/dev/shm/podmigrate/restore/ns/c1/with space"),
            ]
        );
    }

    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn fits_only_with_room_in_the_filesystem_and_in_memory() {
        let room = MemoryRoom {
            fs_free: 12 * GIB,
            mem_available: 20 * GIB,
            mem_total: 24 * GIB,
        };
        assert!(room.fits(GIB));
        assert!(room.fits(10 * GIB));
        // 16 GiB + 1/8 is more than the tmpfs has free.
        assert!(!room.fits(16 * GIB));
        let tight = MemoryRoom {
            mem_available: 4 * GIB,
            ..room
        };
        // 1 GiB + 1/8 + 64 MiB, plus 3 GiB (an eighth of 24) kept available: over 4 GiB.
        assert!(!tight.fits(GIB));
        assert!(tight.fits(512 << 20));
    }

    #[test]
    fn reads_total_and_available_memory() {
        let text =
            "MemTotal:       24568412 kB\nMemFree:        1000 kB\nMemAvailable:   22000000 kB\n";
        assert_eq!(parse_meminfo(text), (24_568_412 * 1024, 22_000_000 * 1024));
        assert_eq!(parse_meminfo("nothing here"), (0, 0));
    }

    #[test]
    fn finds_the_memory_file_of_cgroup_v2_and_v1() {
        assert_eq!(
            cgroup_memory_file("0::/k8s.io/abc\n"),
            Some(PathBuf::from("/sys/fs/cgroup/k8s.io/abc/memory.current"))
        );
        assert_eq!(
            cgroup_memory_file("12:cpu,cpuacct:/x\n7:memory:/kubepods/pod1/c1\n0::/\n"),
            Some(PathBuf::from(
                "/sys/fs/cgroup/memory/kubepods/pod1/c1/memory.usage_in_bytes"
            ))
        );
        assert_eq!(cgroup_memory_file(""), None);
    }

    #[test]
    fn this_process_has_a_measurable_cgroup() {
        assert!(cgroup_memory(std::process::id()).is_some_and(|b| b > 0));
    }

    #[test]
    fn unknown_size_or_switched_off_means_disk() {
        let dir = tempfile::tempdir().unwrap();
        let off = WorkSpace {
            disk: dir.path().into(),
            memory: None,
        };
        let chosen = off.choose(Some(1 << 20));
        assert!(!chosen.in_memory);
        assert_eq!(chosen.root, dir.path());
        let on = WorkSpace {
            disk: dir.path().into(),
            memory: Some(dir.path().join("mem")),
        };
        assert!(!on.choose(None).in_memory);
    }

    #[test]
    fn a_directory_not_on_tmpfs_is_not_memory() {
        // The test tree lives on disk here; /dev/shm is tmpfs.
        let disk = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let ws = WorkSpace {
            disk: disk.path().into(),
            memory: Some(disk.path().join("mem")),
        };
        let chosen = ws.choose(Some(1 << 20));
        assert!(!chosen.in_memory, "{chosen:?}");
        assert!(chosen.why.contains("not on tmpfs"), "{}", chosen.why);
    }

    #[test]
    fn a_small_checkpoint_goes_to_dev_shm() {
        let mem = Path::new("/dev/shm").join(format!("podmigrate-test-{}", std::process::id()));
        let ws = WorkSpace {
            disk: "/nonexistent".into(),
            memory: Some(mem.clone()),
        };
        let chosen = ws.choose(Some(1 << 20));
        let mode = fs::metadata(&mem).map(|m| m.permissions().mode() & 0o777);
        let _ = fs::remove_dir(&mem);
        assert!(chosen.in_memory, "{chosen:?}");
        assert_eq!(chosen.root, mem);
        assert_eq!(mode.unwrap(), 0o700);
    }

    #[test]
    fn a_symlink_or_foreign_directory_is_refused() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        let err = prepare_memory_dir(&link).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipping the foreign-owner case: giving a directory away needs root");
            return;
        }
        let foreign = dir.path().join("foreign");
        fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
        let err = prepare_memory_dir(&foreign).unwrap_err();
        assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
    }
}
