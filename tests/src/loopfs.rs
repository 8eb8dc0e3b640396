//! A small ext4 filesystem on a loop device, mounted over a directory the nodes already use
//! (the share, a node's work space), so a test can fill it (ENOSPC), turn it read-only the way
//! a failing disk does (ext4 `errors=remount-ro` plus its `trigger_fs_error` switch), or
//! unmount it, at a moment of its choosing. Unmounted (lazily) and its image removed on drop.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::containerd::{find_in_path, run_bounded};

/// A mounted loop filesystem; see the module docs.
pub struct LoopFs {
    pub mountpoint: PathBuf,
    /// `loopN`, as `/sys/fs/ext4/<name>` knows it.
    pub device: String,
    image: PathBuf,
    mounted: bool,
}

/// Why loop filesystems cannot be made here, if they cannot.
pub fn skip_reason() -> Option<String> {
    for tool in ["mkfs.ext4", "mount", "umount", "losetup"] {
        if find_in_path(tool).is_none() {
            return Some(format!("`{tool}` not found"));
        }
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control: loop devices are unavailable".into());
    }
    None
}

fn run(cmd: &mut Command) -> Result<String> {
    let text = format!("{cmd:?}");
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "{text}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl LoopFs {
    /// Makes a `size_mib` ext4 image at `image` and mounts it over `mountpoint` (which must
    /// exist) with `errors=remount-ro`.
    pub fn mount_over(mountpoint: &Path, image: &Path, size_mib: u64) -> Result<LoopFs> {
        let file = fs::File::create(image)
            .with_context(|| format!("creating loop image {}", image.display()))?;
        file.set_len(size_mib << 20)?;
        drop(file);
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-m", "0"])
            .arg(image))?;
        run(Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(image)
            .arg(mountpoint))?;
        let source = run(Command::new("findmnt")
            .args(["-n", "-o", "SOURCE", "--mountpoint"])
            .arg(mountpoint))?;
        let device = source
            .lines()
            .last()
            .and_then(|l| l.rsplit('/').next())
            .filter(|d| d.starts_with("loop"))
            .with_context(|| format!("{} is mounted from {source:?}", mountpoint.display()))?
            .to_owned();
        // lost+found would look like a leftover to a test listing the share.
        let _ = fs::remove_dir(mountpoint.join("lost+found"));
        Ok(LoopFs {
            mountpoint: mountpoint.to_owned(),
            device,
            image: image.to_owned(),
            mounted: true,
        })
    }

    /// What a disk error does on a filesystem mounted `errors=remount-ro`: from now on every
    /// write, even through files already open, fails with EROFS.
    pub fn fail_read_only(&self) -> Result<()> {
        let switch = Path::new("/sys/fs/ext4")
            .join(&self.device)
            .join("trigger_fs_error");
        fs::write(&switch, "podmigrate fault test")
            .with_context(|| format!("writing {} (no ext4 error switch?)", switch.display()))
    }

    /// `umount -l`: the path shows the directory underneath from now on; open files keep
    /// writing to the detached filesystem.
    pub fn detach(&mut self) -> Result<()> {
        if self.mounted {
            run(Command::new("umount").arg("-l").arg(&self.mountpoint))?;
            self.mounted = false;
        }
        Ok(())
    }

    /// Whether the mount is read-only now (`ro`, or ext4's `emergency_ro` after an error).
    pub fn is_read_only(&self) -> bool {
        run(Command::new("findmnt")
            .args(["-n", "-o", "OPTIONS", "--mountpoint"])
            .arg(&self.mountpoint))
        .is_ok_and(|o| o.split(',').any(|opt| opt == "ro" || opt == "emergency_ro"))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            eprintln!("loop filesystem cleanup: {e:#}");
        }
        // `mount -o loop` sets autoclear: the device goes with the last reference.
        let _ = fs::remove_file(&self.image);
    }
}

/// A small tmpfs mounted over a directory (a node's memory work space), so that a checkpoint
/// does not fit there. Unmounted (lazily) on drop.
pub struct SmallTmpfs {
    pub mountpoint: PathBuf,
}

impl SmallTmpfs {
    pub fn mount_over(mountpoint: &Path, size_mib: u64) -> Result<SmallTmpfs> {
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(mountpoint))?;
        Ok(SmallTmpfs {
            mountpoint: mountpoint.to_owned(),
        })
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        if let Err(e) = run(Command::new("umount").arg("-l").arg(&self.mountpoint)) {
            eprintln!("tmpfs cleanup: {e:#}");
        }
        // The directory it covered may belong to a scratch directory dropped before us.
        let _ = fs::remove_dir(&self.mountpoint);
    }
}
