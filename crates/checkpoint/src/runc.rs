//! runc: checkpoint, restore and lifecycle of runc containers.
//!
//! A small synchronous driver over the `runc` CLI (the shim and agent wrap calls in
//! `spawn_blocking`). Every call is bounded by [`Runc::with_timeout`]; every error names the
//! container, the command line and runc's own words, and for checkpoint/restore failures the
//! interesting part of CRIU's `dump.log` / `restore.log` from the work directory.
//!
//! Things worth knowing about runc + CRIU that shaped this driver:
//!
//! * `runc run -d` hands its own stdin/stdout/stderr to the container's init. If those are pipes
//!   the caller must drain them for the container's lifetime (a `Command::output()` would wait for
//!   EOF forever); if they are host files, CRIU cannot dump the container later ("Can't lookup
//!   mount=N for fd=1"), because the file's mount is not in the container's mount namespace.
//!   `/dev/null` is both safe and checkpointable, so that is what [`Runc::run_detached`] uses, and
//!   runc's own diagnostics go to a `--log` file instead of stderr.
//! * `runc restore` gives CRIU its own stdio for the restored task's pipes (`--inherit-fd`), so it
//!   too runs with `/dev/null` stdio and a `--log` file.
//! * On failure runc prints `criu failed: ... log file: <work-dir>/dump.log`; the log's
//!   `Error (...)` lines are what explains the failure, and they are usually not the last lines.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;

mod lazy;
pub use lazy::LazyCheckpoint;

/// The runc binary looked up on `PATH` when no explicit path is configured.
pub const DEFAULT_RUNC: &str = "runc";

/// How long one runc invocation may take unless [`Runc::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Lines of runc's stderr kept in an error.
const STDERR_TAIL_LINES: usize = 20;
/// Trailing lines of a CRIU log kept in an error.
const CRIU_LOG_TAIL_LINES: usize = 15;
/// `Error (...)` lines of a CRIU log kept in an error (the last ones).
const CRIU_LOG_ERROR_LINES: usize = 10;
/// How much of the end of a CRIU log is read (debug-level logs of big processes run to megabytes).
const CRIU_LOG_READ_LIMIT: u64 = 1 << 20;

/// A failed runc invocation.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// runc could not be started (not installed, not executable, ...).
    #[error("{}`{command}` could not be started: {source}", for_container(.id))]
    Spawn {
        id: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// runc ran and exited unsuccessfully.
    #[error("{}`{command}` failed ({status}): {stderr}{}", for_container(.id), criu_log_suffix(.criu_log))]
    Failed {
        id: String,
        command: String,
        status: String,
        /// The tail of runc's stderr (or of its `--log` messages for detached commands).
        stderr: String,
        /// The path and the interesting lines of CRIU's log, for checkpoint and restore.
        criu_log: Option<Box<CriuLogExcerpt>>,
    },
    /// runc did not exit within the driver's timeout and was killed.
    #[error("{}`{command}` did not finish within {timeout:?} and was killed", for_container(.id))]
    TimedOut {
        id: String,
        command: String,
        timeout: Duration,
    },
    /// runc succeeded but printed something this driver does not understand.
    #[error("{}`{command}` printed unexpected output ({reason}): {output:?}", for_container(.id))]
    BadOutput {
        id: String,
        command: String,
        reason: String,
        output: String,
    },
    /// Preparing for the command (directories, log files) failed.
    #[error("{}{context}: {source}", for_container(.id))]
    Io {
        id: String,
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RuncError {
    /// The container this error is about (empty for `runc --version`).
    pub fn container_id(&self) -> &str {
        match self {
            RuncError::Spawn { id, .. }
            | RuncError::Failed { id, .. }
            | RuncError::TimedOut { id, .. }
            | RuncError::BadOutput { id, .. }
            | RuncError::Io { id, .. } => id,
        }
    }

    /// Whether runc said the container does not exist (useful for idempotent cleanup).
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuncError::Failed { stderr, .. } if stderr.contains("does not exist"))
    }
}

fn for_container(id: &str) -> String {
    if id.is_empty() {
        String::new()
    } else {
        format!("container `{id}`: ")
    }
}

fn criu_log_suffix(log: &Option<Box<CriuLogExcerpt>>) -> String {
    log.as_ref().map(|l| format!("\n{l}")).unwrap_or_default()
}

/// The interesting part of a CRIU log file: its `Error` lines and its last lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriuLogExcerpt {
    pub path: PathBuf,
    /// The last `Error (...)` lines (CRIU's explanation is usually here, not at the very end).
    pub errors: Vec<String>,
    /// The last lines of the log.
    pub tail: Vec<String>,
}

impl CriuLogExcerpt {
    /// Reads the excerpt from `path`; `None` when the file does not exist or cannot be read.
    pub fn read(path: &Path) -> Option<CriuLogExcerpt> {
        let mut file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let start = len.saturating_sub(CRIU_LOG_READ_LIMIT);
        file.seek(SeekFrom::Start(start)).ok()?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.lines().collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0); // most likely cut in the middle
        }
        Some(Self::from_lines(path, &lines))
    }

    fn from_lines(path: &Path, lines: &[&str]) -> CriuLogExcerpt {
        let mut errors: Vec<String> = lines
            .iter()
            .rev()
            .filter(|l| l.contains("Error (") || l.contains("Error:"))
            .take(CRIU_LOG_ERROR_LINES)
            .map(|l| l.trim_end().to_owned())
            .collect();
        errors.reverse();
        let tail = lines[lines.len().saturating_sub(CRIU_LOG_TAIL_LINES)..]
            .iter()
            .map(|l| l.trim_end().to_owned())
            .collect();
        CriuLogExcerpt {
            path: path.to_owned(),
            errors,
            tail,
        }
    }
}

impl fmt::Display for CriuLogExcerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "CRIU log {}:", self.path.display())?;
        if !self.errors.is_empty() {
            writeln!(f, "  errors:")?;
            for line in &self.errors {
                writeln!(f, "    {line}")?;
            }
        }
        write!(f, "  last lines:")?;
        for line in &self.tail {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// What `runc --version` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncVersion {
    /// e.g. `1.1.5+ds1`
    pub version: String,
    pub commit: Option<String>,
    /// The OCI runtime-spec version runc implements, e.g. `1.0.2-dev`.
    pub spec: Option<String>,
}

impl RuncVersion {
    /// The numeric `(major, minor, patch)` of [`RuncVersion::version`].
    pub fn triple(&self) -> Option<(u32, u32, u32)> {
        let mut parts = self.version.split(['.', '-', '+', '~']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some((major, minor, patch))
    }
}

/// Parses `runc --version` output:
///
/// ```text
/// runc version 1.1.5+ds1
/// commit: 1.1.5+ds1-1+deb12u1
/// spec: 1.0.2-dev
/// go: go1.19.8
/// libseccomp: 2.5.4
/// ```
pub fn parse_version(output: &str) -> Option<RuncVersion> {
    let mut version = None;
    let mut commit = None;
    let mut spec = None;
    for line in output.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("runc version") {
            version = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("commit:") {
            commit = Some(rest.trim().to_owned()).filter(|s| !s.is_empty());
        } else if let Some(rest) = line.strip_prefix("spec:") {
            spec = Some(rest.trim().to_owned()).filter(|s| !s.is_empty());
        }
    }
    Some(RuncVersion {
        version: version?,
        commit,
        spec,
    })
}

/// A container's lifecycle status as `runc state` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
    #[serde(other)]
    Unknown,
}

/// `runc state <id>` output.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    #[serde(rename = "ociVersion", default)]
    pub oci_version: String,
    pub id: String,
    /// The init process's pid on the host (0 once stopped).
    #[serde(default)]
    pub pid: i32,
    pub status: ContainerStatus,
    pub bundle: PathBuf,
    #[serde(default)]
    pub rootfs: PathBuf,
    /// RFC 3339 creation time.
    #[serde(default)]
    pub created: String,
    #[serde(default)]
    pub owner: String,
    #[serde(default)]
    pub annotations: Option<HashMap<String, String>>,
}

/// How CRIU treats the container's cgroups (`--manage-cgroups-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupsMode {
    Soft,
    Full,
    Strict,
}

impl CgroupsMode {
    /// The mode named `value` (`soft`, `full`, `strict`); `None` for runc's default (empty)
    /// or a name runc does not know.
    pub fn parse(value: &str) -> Option<CgroupsMode> {
        [CgroupsMode::Soft, CgroupsMode::Full, CgroupsMode::Strict]
            .into_iter()
            .find(|mode| mode.as_str() == value)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CgroupsMode::Soft => "soft",
            CgroupsMode::Full => "full",
            CgroupsMode::Strict => "strict",
        }
    }
}

/// Options for [`Runc::checkpoint`]; `Default` is all off (the container stops after the dump).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// `--leave-running`: keep the container running after the dump.
    pub leave_running: bool,
    /// `--tcp-established`: dump established TCP connections (restore needs it too).
    pub tcp_established: bool,
    /// `--file-locks`: dump file locks (restore needs it too).
    pub file_locks: bool,
    /// `--ext-unix-sk`: allow unix sockets connected to peers outside the container.
    pub ext_unix_sk: bool,
    /// `--shell-job`: the container was started from a terminal session.
    pub shell_job: bool,
    /// `--manage-cgroups-mode`; runc's default (soft) when `None`.
    pub manage_cgroups_mode: Option<CgroupsMode>,
}

/// Options for [`Runc::restore_detached_with`]; must match what the checkpoint was taken with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    pub tcp_established: bool,
    pub file_locks: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub manage_cgroups_mode: Option<CgroupsMode>,
    /// `--no-pivot`: needed when the rootfs is on a ramdisk (initramfs), where `pivot_root` fails.
    pub no_pivot: bool,
}

impl From<&CheckpointOptions> for RestoreOptions {
    fn from(o: &CheckpointOptions) -> Self {
        RestoreOptions {
            tcp_established: o.tcp_established,
            file_locks: o.file_locks,
            ext_unix_sk: o.ext_unix_sk,
            shell_job: o.shell_job,
            manage_cgroups_mode: o.manage_cgroups_mode,
            no_pivot: false,
        }
    }
}

/// Where a detached container's stdio goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ContainerStdio {
    /// `/dev/null` for all three: the only choice CRIU can checkpoint without extra plumbing.
    #[default]
    Null,
    /// Append stdout and stderr to host files (stdin is `/dev/null`). Handy for debugging, but
    /// CRIU cannot dump such a container: the files' mount is outside its mount namespace.
    Files { stdout: PathBuf, stderr: PathBuf },
}

/// A driver for one runc installation and state directory (`runc --root`).
#[derive(Debug, Clone)]
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
    criu: Option<PathBuf>,
    timeout: Duration,
}

impl Runc {
    /// A driver for `runc` on `PATH` keeping container state under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Runc {
        Runc {
            binary: PathBuf::from(DEFAULT_RUNC),
            root: root.into(),
            criu: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Uses this runc binary instead of `runc` on `PATH`.
    pub fn with_binary(mut self, binary: impl Into<PathBuf>) -> Runc {
        self.binary = binary.into();
        self
    }

    /// Makes runc use this CRIU binary (`runc --criu`) instead of `criu` on `PATH`.
    pub fn with_criu(mut self, criu: impl Into<PathBuf>) -> Runc {
        self.criu = Some(criu.into());
        self
    }

    /// Bounds every runc invocation; a command still running after this is killed.
    pub fn with_timeout(mut self, timeout: Duration) -> Runc {
        self.timeout = timeout;
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The state directory (`runc --root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `runc --version`.
    pub fn version(&self) -> Result<RuncVersion, RuncError> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--version");
        let out = self.capture("", cmd)?;
        parse_version(&out.stdout).ok_or_else(|| RuncError::BadOutput {
            id: String::new(),
            command: out.command,
            reason: "no `runc version` line".into(),
            output: out.stdout,
        })
    }

    /// `runc run -d <id>` from `bundle`, with `/dev/null` stdio (see the module docs for why).
    pub fn run_detached(&self, id: &str, bundle: &Path) -> Result<(), RuncError> {
        self.run_detached_with(id, bundle, &ContainerStdio::Null)
    }

    /// `runc run -d <id>` from `bundle` with the given stdio for the container.
    pub fn run_detached_with(
        &self,
        id: &str,
        bundle: &Path,
        stdio: &ContainerStdio,
    ) -> Result<(), RuncError> {
        let (stdout, stderr) = match stdio {
            ContainerStdio::Null => (Stdio::null(), Stdio::null()),
            ContainerStdio::Files { stdout, stderr } => (
                Stdio::from(append(id, stdout)?),
                Stdio::from(append(id, stderr)?),
            ),
        };
        let log = self.op_log(id, "run")?;
        let mut cmd = self.command_with_log(&log);
        cmd.arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg(id);
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        self.detached(id, cmd, &log, None)
    }

    /// `runc state <id>`.
    pub fn state(&self, id: &str) -> Result<ContainerState, RuncError> {
        let mut cmd = self.command();
        cmd.arg("state").arg(id);
        let out = self.capture(id, cmd)?;
        serde_json::from_str(&out.stdout).map_err(|e| RuncError::BadOutput {
            id: id.to_owned(),
            command: out.command,
            reason: format!("not runc state JSON: {e}"),
            output: out.stdout,
        })
    }

    /// `runc checkpoint` of `id` into `image_dir` (CRIU images), with CRIU's `dump.log` and
    /// runc's bookkeeping in `work_dir`. Both directories are created if missing.
    pub fn checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
        opts: &CheckpointOptions,
    ) -> Result<(), RuncError> {
        create_dir(id, image_dir)?;
        create_dir(id, work_dir)?;
        let mut cmd = self.command();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(image_dir)
            .arg("--work-path")
            .arg(work_dir);
        checkpoint_flags(&mut cmd, opts);
        cmd.arg(id);
        let default_log = work_dir.join("dump.log");
        remove_stale(&default_log);
        match self.capture(id, cmd) {
            Ok(_) => Ok(()),
            Err(e) => Err(with_criu_log(e, &default_log)),
        }
    }

    /// `runc restore -d` of `id` from `bundle` and the CRIU images in `image_dir`, with default
    /// [`RestoreOptions`].
    pub fn restore_detached(
        &self,
        id: &str,
        bundle: &Path,
        image_dir: &Path,
        work_dir: &Path,
    ) -> Result<(), RuncError> {
        self.restore_detached_with(id, bundle, image_dir, work_dir, &RestoreOptions::default())
    }

    /// `runc restore -d` with explicit options (they must match the checkpoint's).
    pub fn restore_detached_with(
        &self,
        id: &str,
        bundle: &Path,
        image_dir: &Path,
        work_dir: &Path,
        opts: &RestoreOptions,
    ) -> Result<(), RuncError> {
        create_dir(id, work_dir)?;
        let criu_log = work_dir.join("restore.log");
        remove_stale(&criu_log);
        let log = work_dir.join("runc-restore.log");
        let mut cmd = self.command_with_log(&log);
        cmd.arg("restore")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--image-path")
            .arg(image_dir)
            .arg("--work-path")
            .arg(work_dir);
        flag(&mut cmd, opts.tcp_established, "--tcp-established");
        flag(&mut cmd, opts.file_locks, "--file-locks");
        flag(&mut cmd, opts.ext_unix_sk, "--ext-unix-sk");
        flag(&mut cmd, opts.shell_job, "--shell-job");
        flag(&mut cmd, opts.no_pivot, "--no-pivot");
        if let Some(mode) = opts.manage_cgroups_mode {
            cmd.arg("--manage-cgroups-mode").arg(mode.as_str());
        }
        cmd.arg(id);
        // The restored tasks' stdio came from descriptors.json; runc's own goes to CRIU for
        // inherited pipes, so keep it off any pipe nobody drains.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.detached(id, cmd, &log, Some(&criu_log))
    }

    /// `runc kill <id> <signal>`; `signal` as runc takes it: `KILL`, `SIGTERM`, `9`, ...
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("kill").arg(id).arg(signal);
        self.capture(id, cmd).map(drop)
    }

    /// `runc delete --force <id>`: kills the container if it still runs and removes its state.
    /// Fails with [`RuncError::is_not_found`] when there is no such container.
    pub fn delete_force(&self, id: &str) -> Result<(), RuncError> {
        let mut cmd = self.command();
        cmd.arg("delete").arg("--force").arg(id);
        self.capture(id, cmd).map(drop)
    }

    /// `runc --root <root> [--criu <criu>] --log-format json`: JSON messages on stderr (or in the
    /// `--log` file) are flattened into errors by [`log_messages`].
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        if let Some(criu) = &self.criu {
            cmd.arg("--criu").arg(criu);
        }
        cmd.arg("--log-format").arg("json");
        cmd
    }

    fn command_with_log(&self, log: &Path) -> Command {
        let mut cmd = self.command();
        cmd.arg("--log").arg(log);
        cmd
    }

    /// A fresh (truncated) log file for a detached operation, next to the state directory.
    fn op_log(&self, id: &str, op: &str) -> Result<PathBuf, RuncError> {
        create_dir(id, &self.root)?;
        // runc only treats directories under --root as containers, so a file here is harmless.
        let log = self.root.join(format!("{id}.{op}.log"));
        File::create(&log).map_err(|source| RuncError::Io {
            id: id.to_owned(),
            context: format!("creating runc log {}", log.display()),
            source,
        })?;
        Ok(log)
    }

    /// Runs a command whose stdout/stderr are captured, within the timeout.
    fn capture(&self, id: &str, mut cmd: Command) -> Result<Captured, RuncError> {
        let command = display_command(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = spawn(id, &command, &mut cmd)?;
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().map(|s| drain(s, 0, tx.clone()));
        let stderr = child.stderr.take().map(|s| drain(s, 1, tx.clone()));
        drop(tx);
        let status = wait_bounded(&mut child, self.timeout);
        let Some(status) = status else {
            return Err(RuncError::TimedOut {
                id: id.to_owned(),
                command,
                timeout: self.timeout,
            });
        };
        // runc has exited; a grandchild could still hold the pipes, so do not wait forever.
        let mut outputs = [Vec::new(), Vec::new()];
        let deadline = Instant::now() + Duration::from_secs(5);
        let expected = stdout.is_some() as usize + stderr.is_some() as usize;
        for _ in 0..expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((which, bytes)) => outputs[which] = bytes,
                Err(_) => break,
            }
        }
        let [stdout, stderr] = outputs.map(|b| String::from_utf8_lossy(&b).into_owned());
        if !status.success() {
            return Err(RuncError::Failed {
                id: id.to_owned(),
                command,
                status: status.to_string(),
                stderr: tail_lines(
                    &log_messages(if stderr.trim().is_empty() {
                        &stdout
                    } else {
                        &stderr
                    }),
                    STDERR_TAIL_LINES,
                ),
                criu_log: None,
            });
        }
        Ok(Captured { command, stdout })
    }

    /// Runs a detached runc command (no pipes) within the timeout; errors come from its `--log`.
    fn detached(
        &self,
        id: &str,
        mut cmd: Command,
        log: &Path,
        criu_log: Option<&Path>,
    ) -> Result<(), RuncError> {
        let command = display_command(&cmd);
        let mut child = spawn(id, &command, &mut cmd)?;
        let Some(status) = wait_bounded(&mut child, self.timeout) else {
            return Err(RuncError::TimedOut {
                id: id.to_owned(),
                command,
                timeout: self.timeout,
            });
        };
        let messages = fs::read_to_string(log)
            .map(|text| log_messages(&text))
            .unwrap_or_default();
        if status.success() {
            let _ = fs::remove_file(log);
            return Ok(());
        }
        let err = RuncError::Failed {
            id: id.to_owned(),
            command,
            status: status.to_string(),
            stderr: tail_lines(&messages, STDERR_TAIL_LINES),
            criu_log: None,
        };
        Err(match criu_log {
            Some(default) => with_criu_log(err, default),
            None => err,
        })
    }
}

#[derive(Debug)]
struct Captured {
    command: String,
    stdout: String,
}

fn spawn(id: &str, command: &str, cmd: &mut Command) -> Result<Child, RuncError> {
    cmd.spawn().map_err(|source| RuncError::Spawn {
        id: id.to_owned(),
        command: command.to_owned(),
        source,
    })
}

fn drain(
    mut reader: impl Read + Send + 'static,
    which: usize,
    tx: mpsc::Sender<(usize, Vec<u8>)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        let _ = tx.send((which, bytes));
    })
}

/// Waits for `child` up to `timeout`; kills and reaps it and returns `None` on timeout.
fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return child.wait().ok(),
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// Removes a CRIU log left by an earlier run in the same work directory, so that an error never
/// quotes a log this run did not write.
fn remove_stale(log: &Path) {
    let _ = fs::remove_file(log);
}

/// The flags of a `runc checkpoint` with `opts`.
fn checkpoint_flags(cmd: &mut Command, opts: &CheckpointOptions) {
    flag(cmd, opts.leave_running, "--leave-running");
    flag(cmd, opts.tcp_established, "--tcp-established");
    flag(cmd, opts.file_locks, "--file-locks");
    flag(cmd, opts.ext_unix_sk, "--ext-unix-sk");
    flag(cmd, opts.shell_job, "--shell-job");
    if let Some(mode) = opts.manage_cgroups_mode {
        cmd.arg("--manage-cgroups-mode").arg(mode.as_str());
    }
}

fn flag(cmd: &mut Command, on: bool, name: &str) {
    if on {
        cmd.arg(name);
    }
}

fn create_dir(id: &str, dir: &Path) -> Result<(), RuncError> {
    fs::create_dir_all(dir).map_err(|source| RuncError::Io {
        id: id.to_owned(),
        context: format!("creating {}", dir.display()),
        source,
    })
}

fn append(id: &str, path: &Path) -> Result<File, RuncError> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| RuncError::Io {
            id: id.to_owned(),
            context: format!("opening {} for container output", path.display()),
            source,
        })
}

/// Attaches the CRIU log excerpt to a `Failed` error: the log runc named in its message
/// (`log file: <path>`), else `default` when that exists.
fn with_criu_log(err: RuncError, default: &Path) -> RuncError {
    match err {
        RuncError::Failed {
            id,
            command,
            status,
            stderr,
            criu_log: None,
        } => {
            let named = named_log_file(&stderr);
            let criu_log = named
                .as_deref()
                .and_then(CriuLogExcerpt::read)
                .or_else(|| CriuLogExcerpt::read(default))
                .map(Box::new);
            RuncError::Failed {
                id,
                command,
                status,
                stderr,
                criu_log,
            }
        }
        other => other,
    }
}

/// The path in runc's `criu failed: type NOTIFY errno 0\nlog file: /work/dump.log` message
/// (the newline may be a literal `\n` inside a quoted logrus field).
fn named_log_file(stderr: &str) -> Option<PathBuf> {
    let (_, rest) = stderr.rsplit_once("log file: ")?;
    let path: String = rest
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '"' && *c != '\\')
        .collect();
    (!path.is_empty()).then(|| PathBuf::from(path))
}

/// The messages of a runc `--log-format json` log, one per line; non-JSON lines as they are.
fn log_messages(text: &str) -> String {
    #[derive(Deserialize)]
    struct Entry {
        #[serde(default)]
        level: String,
        #[serde(default)]
        msg: String,
    }
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| match serde_json::from_str::<Entry>(line) {
            Ok(e) => format!("{}: {}", e.level, e.msg),
            Err(_) => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The last `n` non-empty lines of `text`, joined with newlines.
pub(crate) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The command line as a shell would show it (arguments with spaces are quoted).
fn display_command(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(char::is_whitespace) {
                format!("'{s}'")
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_RUNC: &str = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8\nlibseccomp: 2.5.4\n";

    #[test]
    fn parses_debian_runc_version() {
        let v = parse_version(DEBIAN_RUNC).unwrap();
        assert_eq!(v.version, "1.1.5+ds1");
        assert_eq!(v.commit.as_deref(), Some("1.1.5+ds1-1+deb12u1"));
        assert_eq!(v.spec.as_deref(), Some("1.0.2-dev"));
        assert_eq!(v.triple(), Some((1, 1, 5)));
    }

    #[test]
    fn parses_upstream_runc_version() {
        let out =
            "runc version 1.2.0-rc.1\ncommit: v1.2.0-rc.1-0-g275e6d85\nspec: 1.2.0\ngo: go1.22.4\n";
        let v = parse_version(out).unwrap();
        assert_eq!(v.version, "1.2.0-rc.1");
        assert_eq!(v.triple(), Some((1, 2, 0)));
        let bare = parse_version("runc version 1.1.12\n").unwrap();
        assert_eq!(bare.commit, None);
        assert_eq!(bare.spec, None);
    }

    #[test]
    fn rejects_output_without_runc_version() {
        assert_eq!(parse_version(""), None);
        assert_eq!(parse_version("commit: abc\nspec: 1.0\n"), None);
        assert_eq!(parse_version("runc version\n"), None);
    }

    #[test]
    fn parses_runc_state() {
        let json = r#"{
          "ociVersion": "1.0.2-dev", "id": "c1", "pid": 10294, "status": "running",
          "bundle": "/tmp/b", "rootfs": "/tmp/b/rootfs",
          "created": "2026-11-21T07:47:23.078920633Z", "owner": ""
        }"#;
        let s: ContainerState = serde_json::from_str(json).unwrap();
        assert_eq!(s.id, "c1");
        assert_eq!(s.pid, 10294);
        assert_eq!(s.status, ContainerStatus::Running);
        assert_eq!(s.rootfs, PathBuf::from("/tmp/b/rootfs"));
        let odd: ContainerState =
            serde_json::from_str(r#"{"id":"c2","status":"frozen","bundle":"/b"}"#).unwrap();
        assert_eq!(odd.status, ContainerStatus::Unknown);
    }

    #[test]
    fn finds_criu_log_named_by_runc() {
        let stderr = r#"time="2026-11-21T07:47:25Z" level=error msg="criu failed: type NOTIFY errno 0\nlog file: /tmp/exp/work/dump.log""#;
        assert_eq!(
            named_log_file(stderr),
            Some(PathBuf::from("/tmp/exp/work/dump.log"))
        );
        let plain = "criu failed: type RESTORE errno 0\nlog file: /w/restore.log\n";
        assert_eq!(named_log_file(plain), Some(PathBuf::from("/w/restore.log")));
        assert_eq!(named_log_file("container does not exist"), None);
    }

    #[test]
    fn criu_log_excerpt_keeps_errors_and_tail() {
        let mut lines = vec!["(00.000001) start"];
        lines.push("(00.051647) Error (criu/files-reg.c:1790): Can't lookup mount=27 for fd=1");
        lines.extend(std::iter::repeat_n("(00.06) noise", 40));
        lines.push("(00.118843) Error (criu/cr-dump.c:2111): Dumping FAILED.");
        let ex = CriuLogExcerpt::from_lines(Path::new("/w/dump.log"), &lines);
        assert_eq!(ex.errors.len(), 2);
        assert!(ex.errors[0].contains("Can't lookup mount=27"));
        assert_eq!(ex.tail.len(), CRIU_LOG_TAIL_LINES);
        assert!(ex.tail.last().unwrap().contains("Dumping FAILED"));
        let shown = ex.to_string();
        assert!(shown.starts_with("CRIU log /w/dump.log:"), "{shown}");
        assert!(shown.contains("Can't lookup mount=27"), "{shown}");
    }

    #[test]
    fn json_log_messages_are_flattened() {
        let log =
            "{\"level\":\"error\",\"msg\":\"container does not exist\",\"time\":\"t\"}\nplain\n";
        assert_eq!(log_messages(log), "error: container does not exist\nplain");
    }

    #[test]
    fn errors_name_container_and_command() {
        let runc = Runc::new("/nonexistent-root").with_binary("/nonexistent/runc");
        let err = runc.state("c-42").unwrap_err();
        assert!(matches!(err, RuncError::Spawn { .. }), "{err}");
        let shown = err.to_string();
        assert!(shown.contains("container `c-42`"), "{shown}");
        assert!(
            shown.contains(
                "/nonexistent/runc --root /nonexistent-root --log-format json state c-42"
            ),
            "{shown}"
        );
        assert_eq!(err.container_id(), "c-42");
    }

    #[test]
    fn failed_command_reports_status_and_stderr() {
        // `sh -c` stands in for runc: a non-zero exit with a message on stderr.
        let runc = Runc::new("/tmp").with_binary("/bin/sh");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "echo 'container does not exist' >&2; exit 1"]);
        let err = runc.capture("gone", cmd).unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(err.to_string().contains("exit status: 1"), "{err}");
    }

    #[test]
    fn hung_command_times_out() {
        let runc = Runc::new("/tmp").with_timeout(Duration::from_millis(200));
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30"]);
        let started = Instant::now();
        let err = runc.capture("slow", cmd).unwrap_err();
        assert!(matches!(err, RuncError::TimedOut { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
