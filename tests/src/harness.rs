//! Plumbing for the end-to-end suites: deciding whether a suite can run here, bounded waits,
//! cleanup that survives panics, and finding the workspace's own binaries.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use podmigrate_checkpoint::{criu, runc::Runc};

/// Set to keep a failed suite's scratch directory for inspection.
pub const KEEP_ENV: &str = "PODMIGRATE_E2E_KEEP";

/// Set (as scripts/test.sh does) to make a suite that cannot run here fail instead of skip.
pub const REQUIRE_ENV: &str = "PODMIGRATE_E2E_REQUIRE";

/// Reports why a suite cannot run: prints `skipped: <reason>` and returns, so the caller can
/// `return`; panics instead when `PODMIGRATE_E2E_REQUIRE` is set, so CI cannot pass by skipping.
pub fn skip(reason: &str) {
    if std::env::var_os(REQUIRE_ENV).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{REQUIRE_ENV} is set but this suite cannot run here: {reason}");
    }
    eprintln!("skipped: {reason}");
}

/// Whether this process runs with effective uid 0 (read from `/proc/self/status`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Why a runc + CRIU suite cannot run on this machine, or `None` when it can. Needs root, a runc
/// that answers `--version`, a CRIU whose `criu check` passes, busybox-static and tar.
pub fn runc_criu_skip_reason(runc: &Runc) -> Option<String> {
    if !is_root() {
        return Some("not running as root (runc and CRIU need it)".into());
    }
    if let Err(e) = runc.version() {
        return Some(format!("runc unusable: {e}"));
    }
    if let Err(e) = criu::version(criu::DEFAULT_CRIU) {
        return Some(format!("criu unusable: {e}"));
    }
    if let Err(e) = criu::check(criu::DEFAULT_CRIU) {
        return Some(format!("`criu check` fails here: {e}"));
    }
    if !Path::new(crate::bundle::BUSYBOX).is_file() {
        return Some(format!(
            "{} missing (busybox-static)",
            crate::bundle::BUSYBOX
        ));
    }
    if std::process::Command::new("tar")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some("tar missing".into());
    }
    None
}

/// A container id no other test run on this machine uses: `<prefix>-<pid>-<time>-<n>`.
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `probe` every `every` until it returns `Some`, for at most `timeout`; the error names
/// `what` and how long it waited.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(every);
    }
}

/// Reads a counter file holding one decimal number; `None` while it is missing, empty or
/// half-written.
pub fn read_counter(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Force-deletes its containers when dropped, also while unwinding from a failed assertion.
pub struct ContainerGuard {
    runc: Runc,
    ids: Vec<String>,
}

impl ContainerGuard {
    pub fn new(runc: &Runc) -> ContainerGuard {
        ContainerGuard {
            runc: runc.clone(),
            ids: Vec::new(),
        }
    }

    /// Registers a container id for cleanup (before starting it, so a half-started one goes too).
    pub fn track(&mut self, id: &str) {
        self.ids.push(id.to_owned());
    }

    /// Deletes all tracked containers now; the first real error (not "does not exist") is returned.
    pub fn cleanup(&mut self) -> Result<()> {
        let mut first_error = None;
        for id in self.ids.drain(..).rev() {
            if let Err(e) = self.runc.delete_force(&id) {
                if !e.is_not_found() && first_error.is_none() {
                    first_error = Some(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("cleanup: {e}");
        }
    }
}

/// A scratch directory removed on drop, unless the test is panicking and
/// `PODMIGRATE_E2E_KEEP` is set, in which case its path is printed and it is kept.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(prefix: &str) -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .context("creating a scratch directory")?;
        Ok(Scratch { dir: Some(dir) })
    }

    /// A scratch directory on tmpfs (`/dev/shm`), for a node's memory-backed work space.
    pub fn in_memory(prefix: &str) -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in("/dev/shm")
            .context("creating a scratch directory in /dev/shm")?;
        // The shim accepts only a private memory work space.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .context("restricting the memory scratch directory")?;
        Ok(Scratch { dir: Some(dir) })
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present until drop").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if thread::panicking() && std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("kept scratch directory {}", dir.keep().display());
        }
    }
}

/// A binary of this workspace built in the same profile as the running test
/// (`target/<profile>/<name>`), if it has been built.
pub fn workspace_bin(name: &str) -> Option<PathBuf> {
    // The test runs as target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let candidate = profile_dir.join(name);
    candidate.is_file().then_some(candidate)
}

/// Every regular file under `dir`, by path relative to `dir`, with its contents.
pub fn tree_contents(dir: &Path) -> Result<BTreeMap<PathBuf, Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) -> Result<()> {
        for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            let kind = entry.file_type()?;
            if kind.is_dir() {
                walk(root, &path, out)?;
            } else if kind.is_file() {
                let bytes =
                    fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                out.insert(path.strip_prefix(root)?.to_owned(), bytes);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_for_is_bounded() {
        let start = Instant::now();
        let err = wait_for(
            "never",
            Duration::from_millis(50),
            Duration::from_millis(5),
            || None::<()>,
        )
        .unwrap_err();
        assert!(err.to_string().contains("waiting for never"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let mut n = 0;
        let got = wait_for(
            "third try",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                n += 1;
                (n == 3).then_some(n)
            },
        )
        .unwrap();
        assert_eq!(got, 3);
    }

    #[test]
    fn counters_parse_only_whole_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("count");
        assert_eq!(read_counter(&path), None);
        fs::write(&path, "").unwrap();
        assert_eq!(read_counter(&path), None);
        fs::write(&path, "42\n").unwrap();
        assert_eq!(read_counter(&path), Some(42));
    }

    #[test]
    fn unique_ids_differ() {
        assert_ne!(unique_id("c"), unique_id("c"));
    }

    #[test]
    fn tree_contents_lists_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::write(dir.path().join("a/b/f"), "x").unwrap();
        fs::write(dir.path().join("top"), "y").unwrap();
        let tree = tree_contents(dir.path()).unwrap();
        assert_eq!(tree.len(), 2);
        assert_eq!(tree[Path::new("a/b/f")], b"x");
    }
}
