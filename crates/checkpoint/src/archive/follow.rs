//! Packing CRIU's pages image while CRIU writes it, through a pipe.
//!
//! The pages image (`checkpoint/pages-1.img`, the first task's memory) is almost all of a
//! checkpoint. Before the dump, [`PagesPipe::create`] puts a named pipe (FIFO) at its path;
//! CRIU opens that path like any image file and splices the pages into it, and the packer reads
//! them from the other end. The pages never land on a local disk or tmpfs, and compression and
//! the share's writes run during the dump instead of after it. On this kind of VM, where first
//! touching fresh memory is slow, not writing a second copy of the process's memory is most of
//! the gain.
//!
//! The packer holds the pipe open for reading and writing, non-blocking: CRIU's `open` never
//! waits for a reader, and a closed writer end is not an end of file. The end is known from the
//! writer's `done` flag instead: once set, everything CRIU wrote is in the pipe, and the first
//! empty read after it ends the file. A packer that fails keeps draining until the writer is
//! done or failed, so CRIU never blocks on a full pipe with the process frozen.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::error::ArchiveError;
use super::pipeline::BufferPool;

/// Room for this many bytes in the pipe (the default is 64 KiB): fewer wake-ups for both ends.
/// Capped by the kernel at `/proc/sys/fs/pipe-max-size` (1 MiB unless raised).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// A named pipe in the checkpoint directory, standing where the writer will write a file.
#[derive(Debug)]
pub struct PagesPipe {
    /// Relative to the checkpoint directory, e.g. `checkpoint/pages-1.img`.
    name: String,
    path: PathBuf,
    file: File,
}

impl PagesPipe {
    /// Makes the pipe `dir/name` (mode 0600; its directory must exist) and opens it.
    pub fn create(dir: &Path, name: &str) -> Result<Self, ArchiveError> {
        let path = dir.join(name);
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| ArchiveError::BadInput {
                path: path.clone(),
                reason: "path contains a NUL byte".to_string(),
            })?;
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) } != 0 {
            return Err(ArchiveError::io("creating the pipe", &path)(
                io::Error::last_os_error(),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(ArchiveError::io("opening the pipe", &path))?;
        // Best effort: a smaller pipe only costs wake-ups.
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
        Ok(PagesPipe {
            name: name.to_string(),
            path,
            file,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mode and mtime (in nanoseconds) to record for the entry.
    pub(crate) fn mode_and_mtime(&self) -> Result<(u32, i64), ArchiveError> {
        let meta = self
            .file
            .metadata()
            .map_err(ArchiveError::io("reading metadata of", &self.path))?;
        Ok((
            meta.permissions().mode() & 0o777,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        ))
    }

    /// Removes the pipe from the directory once its content is read, so the directory holds
    /// only regular files again.
    pub(crate) fn unlink(&self) -> Result<(), ArchiveError> {
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(ArchiveError::io("removing the pipe", &self.path)(e))
            }
            _ => Ok(()),
        }
    }

    /// Reads what is in the pipe now into `buf` (up to its length); 0 when it is empty.
    fn read_now(&self, buf: &mut [u8]) -> Result<usize, ArchiveError> {
        loop {
            match (&self.file).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ArchiveError::io("reading", &self.path)(e)),
            }
        }
    }

    /// Waits up to `timeout` for data in the pipe.
    fn wait_readable(&self, timeout: Duration) {
        let mut fds = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fds, 1, ms) };
    }
}

/// The pages pipe being written during packing (CRIU's pages image during the dump), packed
/// first (entry 0) as it arrives; the rest of the checkpoint directory is packed once the
/// writer is done.
///
/// The writer sets `done` once it has finished writing the pipe and every other file of the
/// directory, or `failed` if it gave up, which abandons the archive.
pub struct Follow<'a> {
    pub pipe: &'a PagesPipe,
    pub done: &'a AtomicBool,
    pub failed: &'a AtomicBool,
    /// The longest wait for data before looking at the flags again.
    pub poll: Duration,
    /// Gives up (and fails the pack) when the writer has set neither flag by then.
    pub timeout: Duration,
}

impl Follow<'_> {
    /// The writer's state: done (`true`), still writing (`false`), failed or timed out (error).
    fn writer_done(&self, started: Instant) -> Result<bool, ArchiveError> {
        let stopped = |reason: String| ArchiveError::BadInput {
            path: self.pipe.path.clone(),
            reason,
        };
        if self.failed.load(Ordering::Acquire) {
            return Err(stopped("the writer failed; packing stopped".into()));
        }
        if started.elapsed() > self.timeout {
            return Err(stopped(format!(
                "still being written after {:?}; packing stopped",
                self.timeout
            )));
        }
        Ok(self.done.load(Ordering::Acquire))
    }

    /// After a failed pack: reads and drops whatever the writer still sends until it is done or
    /// failed (or the timeout passes), so it is never left blocked on a full pipe.
    pub(crate) fn drain(&self, started: Instant) {
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(false) = self.writer_done(started) {
            match self.pipe.read_now(&mut sink) {
                Ok(0) => self.pipe.wait_readable(self.poll),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    /// Reads the pipe until the writer is done and the pipe is empty, handing each full chunk
    /// (and the last, shorter one) to `submit(data, index, last)`. `Ok(false)`: `submit`
    /// refused a chunk (the pipeline stopped early).
    pub(crate) fn read_chunks(
        &self,
        started: Instant,
        chunk_size: usize,
        buffers: &BufferPool,
        submit: &mut dyn FnMut(Vec<u8>, usize, bool) -> bool,
    ) -> Result<bool, ArchiveError> {
        let mut index = 0usize;
        // One full chunk is held back until it is known whether it is the last.
        let mut held: Option<Vec<u8>> = None;
        let mut current = buffers.get(chunk_size);
        current.resize(chunk_size, 0);
        let mut filled = 0usize;
        loop {
            // Read before the pipe: `done` seen, then an empty pipe, means the end.
            let finished = self.writer_done(started)?;
            let n = self.pipe.read_now(&mut current[filled..])?;
            filled += n;
            if filled == chunk_size {
                let full = std::mem::replace(&mut current, buffers.get(chunk_size));
                current.resize(chunk_size, 0);
                filled = 0;
                if let Some(previous) = held.replace(full) {
                    if !submit(previous, index, false) {
                        return Ok(false);
                    }
                    index += 1;
                }
                continue;
            }
            if n > 0 {
                continue;
            }
            if !finished {
                self.pipe.wait_readable(self.poll);
                continue;
            }
            // The end: a shorter tail, or a file ending on a chunk boundary (or empty).
            current.truncate(filled);
            let last = match held.take() {
                Some(previous) if filled == 0 => previous,
                Some(previous) => {
                    if !submit(previous, index, false) {
                        return Ok(false);
                    }
                    index += 1;
                    current
                }
                None => current,
            };
            return Ok(submit(last, index, true));
        }
    }
}
