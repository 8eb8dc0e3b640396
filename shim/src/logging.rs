//! Where the shim's `tracing` output goes, which depends on how containerd invoked us.
//!
//! containerd (1.6/1.7 and 2.x on Linux) creates a FIFO named `log` in the bundle directory,
//! which is our working directory, holds it open for reading, and copies whatever arrives
//! there into its own log. That is the only channel that reaches an operator from the
//! long-running shim, whose stderr containerd-shim points at /dev/null.
//!
//! Two invocations need care:
//! * `start`: containerd reads stdout *and stderr combined* as the socket address, so any
//!   stray line on either would break the launch. We log to the FIFO or nowhere.
//! * `delete`: containerd has usually closed the FIFO by then, but it captures stderr and logs
//!   it as "cleanup warnings", so stderr is the right place.

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::{FileTypeExt, OpenOptionsExt},
    path::Path,
    sync::Mutex,
};

use tracing_subscriber::{fmt::writer::BoxMakeWriter, EnvFilter};

use crate::error::{Error, Result};

/// Name of the FIFO containerd creates in the bundle directory.
pub const LOG_FIFO: &str = "log";

/// How the binary was invoked, as far as logging cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `start`: never write to stdout or stderr.
    Start,
    /// `delete`: stderr.
    Delete,
    /// Serving ttrpc (no action word): the FIFO, else stderr.
    Serve,
}

impl Mode {
    /// Maps containerd-shim's parsed action word to a logging mode. containerd-shim treats any
    /// unknown word as "serve", so do we.
    pub fn from_action(action: &str) -> Self {
        match action {
            "start" => Mode::Start,
            "delete" => Mode::Delete,
            _ => Mode::Serve,
        }
    }
}

/// Installs the global `tracing` subscriber (and a `log` bridge, so containerd-shim's own
/// `log` records come out the same way).
///
/// The level follows `RUST_LOG` (the variable containerd-shim's logger also honours), else
/// `debug` when containerd passed `-debug` (it does when its own level is debug), else `warn`
/// for `delete` (containerd re-logs all of its stderr as "cleanup warnings") and `info`
/// without ttrpc's per-connection chatter for the rest.
pub fn init(mode: Mode, debug: bool) -> Result<()> {
    let default_directives = match (debug, mode) {
        (true, _) => "debug",
        (false, Mode::Delete) => "warn",
        (false, _) => "info,ttrpc=warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_directives));
    let writer = match mode {
        Mode::Delete => BoxMakeWriter::new(io::stderr),
        Mode::Start | Mode::Serve => match open_fifo(Path::new(LOG_FIFO))? {
            Some(fifo) => BoxMakeWriter::new(Mutex::new(fifo)),
            None if mode == Mode::Start => BoxMakeWriter::new(io::sink),
            None => BoxMakeWriter::new(io::stderr),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .try_init()
        .map_err(|e| Error::Logging(e.to_string()))
}

/// Opens containerd's log FIFO for writing, if there is one with a reader on the other end.
///
/// Non-blocking on purpose, twice over: opening a FIFO without a reader would otherwise hang
/// (we get `ENXIO` and log elsewhere), and a full pipe should cost us log lines, not stall a
/// Task RPC while containerd is busy.
pub fn open_fifo(path: &Path) -> Result<Option<File>> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => {}
        // Missing or not a FIFO (e.g. someone running the binary by hand): not ours to write.
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(Error::OpenLog {
                path: path.to_owned(),
                source,
            })
        }
    }
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(source) => Err(Error::OpenLog {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{ffi::CString, io::Read, os::unix::ffi::OsStrExt};

    fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn action_words_map_to_modes() {
        assert_eq!(Mode::from_action("start"), Mode::Start);
        assert_eq!(Mode::from_action("delete"), Mode::Delete);
        assert_eq!(Mode::from_action(""), Mode::Serve);
    }

    #[test]
    fn missing_or_regular_log_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_fifo(&dir.path().join("log")).unwrap().is_none());
        std::fs::write(dir.path().join("log"), b"").unwrap();
        assert!(open_fifo(&dir.path().join("log")).unwrap().is_none());
    }

    #[test]
    fn fifo_without_reader_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        mkfifo(&path);
        assert!(open_fifo(&path).unwrap().is_none());
    }

    #[test]
    fn fifo_with_reader_is_written() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        mkfifo(&path);
        // Like containerd: the reader holds the FIFO open read-write and non-blocking.
        let mut reader = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        let mut writer = open_fifo(&path).unwrap().expect("fifo has a reader");
        writer.write_all(b"hello\n").unwrap();
        let mut buf = [0u8; 6];
        reader.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello\n");
    }
}
