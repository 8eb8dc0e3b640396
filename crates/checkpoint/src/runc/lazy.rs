//! A lazy (post-copy) `runc checkpoint`, run in the background: CRIU dumps every image but the
//! lazy memory, says so on runc's status descriptor, then serves that memory from its page
//! server until the restoring side closes the session. runc returns only then.
//!
//! The page server listens on the port given here; its address comes from CRIU's
//! configuration file (runc's RPC passes CRIU only the port of a lazy page server, so without
//! `address` in that file it would listen on every address).

use std::fs;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use crate::reap::{ExitWatch, Reaper};

use super::{
    checkpoint_flags, create_dir, display_command, log_messages, remove_stale, spawn, tail_lines,
    with_criu_log, CheckpointOptions, Runc, RuncError, STDERR_TAIL_LINES,
};

/// A lazy checkpoint in progress.
pub struct LazyCheckpoint {
    id: String,
    command: String,
    child: Child,
    /// How runc's exit is learnt (see [`crate::reap`]).
    watch: Box<dyn ExitWatch>,
    /// runc's `--status-fd`: one byte once CRIU's page server listens, EOF if runc ends first.
    status: Option<std::io::PipeReader>,
    /// runc's own `--log`.
    log: PathBuf,
    /// CRIU's `dump.log`.
    criu_log: PathBuf,
}

impl Runc {
    /// Starts `runc checkpoint --lazy-pages` of `id` into `image_dir`, with CRIU's page server
    /// on `page_server_port` (see the module's documentation for its address).
    pub fn spawn_lazy_checkpoint(
        &self,
        id: &str,
        image_dir: &Path,
        work_dir: &Path,
        opts: &CheckpointOptions,
        page_server_port: u16,
        reaper: &dyn Reaper,
    ) -> Result<LazyCheckpoint, RuncError> {
        create_dir(id, image_dir)?;
        create_dir(id, work_dir)?;
        let log = work_dir.join("runc-checkpoint.log");
        let criu_log = work_dir.join("dump.log");
        remove_stale(&criu_log);
        let (status_reader, status_writer) = std::io::pipe().map_err(|source| RuncError::Io {
            id: id.to_owned(),
            context: "making the status pipe".into(),
            source,
        })?;
        let status_fd = status_writer.as_raw_fd();
        let mut cmd = self.command_with_log(&log);
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(image_dir)
            .arg("--work-path")
            .arg(work_dir)
            .arg("--lazy-pages")
            .arg("--page-server")
            .arg(format!("127.0.0.1:{page_server_port}"))
            .arg("--status-fd")
            .arg(status_fd.to_string());
        checkpoint_flags(&mut cmd, opts);
        cmd.arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec only fcntl(2), which is async-signal-safe, runs: it
        // lets runc inherit the status pipe's writing end, in the child only.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(status_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(status_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let command = display_command(&cmd);
        let watch = reaper.watch();
        let child = spawn(id, &command, &mut cmd)?;
        // Only runc holds the writing end now: its EOF means runc is done with it.
        drop(status_writer);
        Ok(LazyCheckpoint {
            id: id.to_owned(),
            command,
            child,
            watch,
            status: Some(status_reader),
            log,
            criu_log,
        })
    }
}

impl std::fmt::Debug for LazyCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyCheckpoint")
            .field("id", &self.id)
            .field("pid", &self.child.id())
            .finish_non_exhaustive()
    }
}

impl LazyCheckpoint {
    /// Waits until CRIU has written every image but the lazy memory and its page server
    /// listens. A runc that ends first is reaped, and its error (with CRIU's log) returned.
    pub fn wait_ready(&mut self) -> Result<(), RuncError> {
        let mut byte = [0u8; 1];
        let read = match self.status.take() {
            Some(mut status) => status.read(&mut byte),
            None => Ok(0),
        };
        match read {
            Ok(1) => Ok(()),
            _ => {
                let status = self.exit_status()?;
                Err(self.failure(status.to_string()))
            }
        }
    }

    /// Waits for runc to end: `Ok` once CRIU served the lazy memory and the restoring side
    /// closed the session properly.
    pub fn wait(mut self) -> Result<(), RuncError> {
        let status = self.exit_status()?;
        if status.success() {
            let _ = fs::remove_file(&self.log);
            return Ok(());
        }
        Err(self.failure(status.to_string()))
    }

    /// runc's exit, once it has ended.
    fn exit_status(&mut self) -> Result<std::process::ExitStatus, RuncError> {
        self.watch
            .wait(&mut self.child)
            .map_err(|source| RuncError::Io {
                id: self.id.clone(),
                context: "waiting for runc checkpoint".into(),
                source,
            })
    }

    fn failure(&self, status: String) -> RuncError {
        let messages = fs::read_to_string(&self.log)
            .map(|text| log_messages(&text))
            .unwrap_or_default();
        with_criu_log(
            RuncError::Failed {
                id: self.id.clone(),
                command: self.command.clone(),
                status,
                stderr: tail_lines(&messages, STDERR_TAIL_LINES),
                criu_log: None,
            },
            &self.criu_log,
        )
    }
}
