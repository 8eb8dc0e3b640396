//! Post-copy, the node's halves. The source's lazy dump leaves the private memory out of the
//! archive and keeps it, frozen, until the clone holds every page: [`Serve`] starts that dump
//! and serves the pages over the page stream ([`crate::pagestream`]). The clone restores at
//! once from the archive and fetches the memory on fault and in the background: [`Fetch`]
//! runs CRIU's lazy-pages daemon behind the stream's other end.
//!
//! Ending well takes both: the source's CRIU ends its dump only once the clone's daemon has
//! every page and closed the session. Every other ending fails on both sides: the source's
//! CRIU resumes the source (which still holds every page) and the clone, which can no longer
//! fetch its memory, is stopped by its caller before CRIU's daemon lets go of it (a released
//! userfaultfd would hand the process zero-filled pages).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::bandwidth::Bandwidth;
use crate::gc::PageStreamPlan;
use crate::pagestream::{
    Cancel, Client, PageStreamError, Progress, Secret, Server, StreamEnd, Ticket, Verdict, ABORT,
};
use crate::reap::{ExitWatch, Reaper};
use crate::runc::{self, LazyCheckpoint, Runc, RuncError};

/// How long the source waits for the clone to connect once its archive is committed: the clone
/// must unpack it and start restoring first.
pub const ACCEPT_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// How long the clone's daemon may take to open its socket for CRIU's restore.
const DAEMON_SOCKET_WAIT: Duration = Duration::from_secs(10);
/// How long the relay may outlast the dump it serves before it is stopped.
const RELAY_GRACE: Duration = Duration::from_secs(5);
/// The socket `criu lazy-pages` opens in its work directory for CRIU's restore.
pub const LAZY_PAGES_SOCKET: &str = "lazy-pages.socket";

/// The pipe size CRIU's page server asks for (4 MiB, its largest page pipe): without
/// CAP_SYS_RESOURCE it gets it only up to `fs.pipe-max-size`, and CRIU 4.1 ignores the refusal,
/// then fails with "splice: -1: Bad file descriptor". `scripts/setup.sh` raises the limit.
pub const PAGE_SERVER_PIPE_BYTES: u64 = 4 << 20;
/// Where the kernel's limit is read.
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

/// Why this node cannot serve a lazy dump's memory, if it cannot.
pub fn source_unfit() -> Option<String> {
    let limit = std::fs::read_to_string(PIPE_MAX_SIZE)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())?;
    (limit < PAGE_SERVER_PIPE_BYTES).then(|| {
        format!(
            "{PIPE_MAX_SIZE} is {limit}, below the {PAGE_SERVER_PIPE_BYTES} bytes CRIU's page server needs (sysctl fs.pipe-max-size={PAGE_SERVER_PIPE_BYTES})"
        )
    })
}

#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    /// The page stream failed: broken, refused, or not taken up in time.
    #[error(transparent)]
    Stream(#[from] PageStreamError),
    /// runc's lazy dump failed.
    #[error("the lazy dump failed: {0}")]
    Dump(RuncError),
    /// No free port for CRIU's page server on the loopback.
    #[error("choosing a port for CRIU's page server: {0}")]
    Port(std::io::Error),
    /// `criu lazy-pages` could not start.
    #[error("starting `criu lazy-pages` for {images}: {error}")]
    DaemonStart {
        images: PathBuf,
        error: std::io::Error,
    },
    /// `criu lazy-pages` did not open its socket in time.
    #[error("`criu lazy-pages` did not open {socket} within {waited:?}{log}")]
    DaemonSocket {
        socket: PathBuf,
        waited: Duration,
        log: String,
    },
    /// `criu lazy-pages` failed before the clone held every page.
    #[error("`criu lazy-pages` for {images} failed ({status}){log}")]
    Daemon {
        images: PathBuf,
        status: String,
        log: String,
    },
    /// Stopped on request.
    #[error("the page stream was cancelled")]
    Cancelled,
}

/// The source's side: a lazy dump of one container, and the page stream that serves it.
pub struct Serve<'a> {
    pub runc: &'a Runc,
    /// How runc's exit is learnt.
    pub reaper: &'a dyn Reaper,
    pub id: &'a str,
    /// Where CRIU writes its images (the checkpoint directory's `checkpoint/`).
    pub images: &'a Path,
    /// CRIU's work directory (its logs).
    pub work: &'a Path,
    pub options: &'a runc::CheckpointOptions,
    pub plan: &'a PageStreamPlan,
    /// Cap on the bytes per second streamed to the clone.
    pub bandwidth: Bandwidth,
    /// The lazy memory's size, measured at the freeze: the stream's progress counts toward it.
    pub total_bytes: u64,
}

/// A lazy dump whose images are written, with the stream that will serve its memory.
#[derive(Debug)]
pub struct Serving {
    dump: LazyCheckpoint,
    server: Server,
    criu: SocketAddr,
    ticket: Ticket,
}

impl Serve<'_> {
    /// Binds the stream's listener on the source's address, starts the lazy dump and waits
    /// until CRIU has written every image but the lazy memory. The source must be frozen:
    /// nothing listens before the freeze.
    pub fn start(&self) -> Result<Serving, PostCopyError> {
        let secret = Secret::generate()?;
        let server = Server::bind(
            self.plan.listen,
            self.plan.peer,
            secret.clone(),
            self.bandwidth,
        )?;
        let criu = free_loopback_port().map_err(PostCopyError::Port)?;
        let mut dump = self
            .runc
            .spawn_lazy_checkpoint(
                self.id,
                self.images,
                self.work,
                self.options,
                criu.port(),
                self.reaper,
            )
            .map_err(PostCopyError::Dump)?;
        dump.wait_ready().map_err(PostCopyError::Dump)?;
        let ticket = Ticket {
            address: server.local_addr(),
            secret,
            total_bytes: self.total_bytes,
        };
        info!(container = self.id, stream = %ticket.address, criu = %criu, "lazy dump written; serving its memory once the clone connects");
        Ok(Serving {
            dump,
            server,
            criu,
            ticket,
        })
    }
}

impl Serving {
    /// Ends a lazy dump whose memory nobody will fetch (its checkpoint failed after the dump):
    /// CRIU's page server, still waiting for its one connection, is made to fail the dump,
    /// which lets go of the source's processes. Returns once runc has ended. Dropped instead,
    /// CRIU would wait on and hold them, and not even SIGKILL would end them.
    pub fn abandon(self) {
        abort_criu(self.criu);
        let _ = self.dump.wait();
    }

    /// What the clone needs to fetch the memory; it travels in the archive.
    pub fn ticket(&self) -> &Ticket {
        &self.ticket
    }

    /// Serves the memory until the clone holds every page and CRIU's dump ends well (`Ok`), or
    /// the stream breaks, is not taken up within `accept_deadline`, or is cancelled: then the
    /// source's CRIU is made to fail, which resumes the source's processes. `report` is called
    /// about twice a second with the bytes moved so far.
    pub fn serve(
        self,
        accept_deadline: Duration,
        cancel: &Cancel,
        mut report: impl FnMut(u64),
    ) -> Result<(), PostCopyError> {
        let Serving {
            dump,
            server,
            criu,
            ticket: _,
        } = self;
        let progress = Progress::default();
        let (relayed, dumped) = std::thread::scope(|scope| {
            let relay = scope.spawn(|| {
                let relayed = server.serve(criu, accept_deadline, &progress, cancel);
                if !matches!(relayed, Ok(StreamEnd::Complete)) {
                    // A CRIU that never saw the clone still waits in accept(): give it the
                    // abort itself. One that did was sent it by the relay; this finds no one.
                    abort_criu(criu);
                }
                relayed
            });
            let waiter = scope.spawn(|| dump.wait());
            let mut dump_ended = None;
            while !(relay.is_finished() && waiter.is_finished()) {
                if waiter.is_finished() {
                    // CRIU is done; so is the relay a moment later, unless CRIU failed on its
                    // own and nothing will come from it any more.
                    let since = *dump_ended.get_or_insert_with(Instant::now);
                    if since.elapsed() > RELAY_GRACE {
                        cancel.cancel();
                    }
                }
                report(progress.to_target());
                std::thread::sleep(Duration::from_millis(500));
            }
            report(progress.to_target());
            (
                relay.join().expect("the page stream relay panicked"),
                waiter.join().expect("the lazy dump's waiter panicked"),
            )
        });
        match (dumped, relayed) {
            // CRIU ends its dump well only after the clone's orderly close: every page is there.
            (Ok(()), _) => Ok(()),
            (Err(_), Err(e)) => Err(e.into()),
            (Err(_), Ok(StreamEnd::Cancelled)) => Err(PostCopyError::Cancelled),
            (Err(e), Ok(StreamEnd::Complete)) => Err(PostCopyError::Dump(e)),
        }
    }
}

/// A free TCP port on the loopback for CRIU's page server (free when asked: CRIU binds it
/// right after).
fn free_loopback_port() -> std::io::Result<SocketAddr> {
    let probe = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    probe.local_addr()
}

/// Makes a CRIU page server that waits for its one connection fail its dump.
fn abort_criu(criu: SocketAddr) {
    if let Ok(mut stream) = TcpStream::connect_timeout(&criu, Duration::from_secs(1)) {
        let _ = stream.write_all(ABORT);
    }
}

/// The clone's side: CRIU's lazy-pages daemon for one restored container, fed by the stream.
pub struct Fetch<'a> {
    /// The `criu` binary.
    pub criu: &'a Path,
    /// How the daemon's exit is learnt.
    pub reaper: &'a dyn Reaper,
    /// The unpacked images; also the daemon's work directory, where CRIU's restore finds its
    /// socket (the restore's work directory must be this one).
    pub images: &'a Path,
    pub ticket: Ticket,
}

/// A lazy-pages daemon waiting for CRIU's restore, with the stream's local end.
pub struct Fetching {
    daemon: Child,
    watch: Box<dyn ExitWatch>,
    client: Client,
    ticket: Ticket,
    images: PathBuf,
}

impl std::fmt::Debug for Fetching {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetching")
            .field("daemon", &self.daemon.id())
            .field("source", &self.ticket.address)
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

impl Fetch<'_> {
    /// Binds the stream's local end and starts `criu lazy-pages` on it; returns once the
    /// daemon's socket is open, so CRIU's restore can start.
    pub fn start(self) -> Result<Fetching, PostCopyError> {
        let client = Client::bind_local()?;
        let local = client.local_addr();
        let socket = self.images.join(LAZY_PAGES_SOCKET);
        let _ = std::fs::remove_file(&socket);
        let mut watch = self.reaper.watch();
        let mut daemon = Command::new(self.criu)
            .arg("lazy-pages")
            .arg("--page-server")
            .arg("--address")
            .arg(local.ip().to_string())
            .arg("--port")
            .arg(local.port().to_string())
            .arg("--images-dir")
            .arg(self.images)
            .arg("--work-dir")
            .arg(self.images)
            .arg("--log-file")
            .arg(daemon_log(self.images))
            .arg("-v2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| PostCopyError::DaemonStart {
                images: self.images.to_path_buf(),
                error,
            })?;
        let started = Instant::now();
        while !socket.exists() {
            let exited = watch
                .wait_timeout(&mut daemon, Duration::from_millis(5))
                .ok()
                .flatten();
            if exited.is_some() || started.elapsed() > DAEMON_SOCKET_WAIT {
                let _ = daemon.kill();
                let _ = watch.wait(&mut daemon);
                return Err(PostCopyError::DaemonSocket {
                    socket,
                    waited: started.elapsed(),
                    log: log_errors(&daemon_log(self.images)),
                });
            }
        }
        Ok(Fetching {
            daemon,
            watch,
            client,
            ticket: self.ticket,
            images: self.images.to_path_buf(),
        })
    }
}

impl Fetching {
    /// Stops the daemon of a restore that will not happen.
    pub fn abandon(mut self) {
        let _ = self.daemon.kill();
        let _ = self.watch.wait(&mut self.daemon);
    }

    /// Relays the daemon's requests to the source until the clone holds every page (`Ok`).
    /// When the stream is lost, or the daemon fails, `stop_clone` is called, at once and
    /// before the daemon lets go of the restored process: the clone cannot finish without its
    /// memory, and must not run on with zero-filled pages. `report` is called about twice a
    /// second with the bytes received so far.
    pub fn fetch(
        mut self,
        accept_deadline: Duration,
        cancel: &Cancel,
        stop_clone: impl Fn(&str) + Sync,
        mut report: impl FnMut(u64),
    ) -> Result<(), PostCopyError> {
        let progress = Progress::default();
        let client = self.client;
        let ticket = &self.ticket;
        let daemon = &mut self.daemon;
        let watch = &mut self.watch;
        let images = &self.images;
        let stop_clone = &stop_clone;
        let verdict = Verdict::default();
        let (relayed, exited) = std::thread::scope(|scope| {
            let relay = scope.spawn(|| {
                client.fetch(
                    ticket,
                    accept_deadline,
                    &progress,
                    cancel,
                    &verdict,
                    |error| stop_clone(&format!("the page stream was lost: {error}")),
                )
            });
            let exited = loop {
                match watch.wait_timeout(daemon, Duration::from_millis(500)) {
                    Ok(Some(status)) => break Ok(status),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                if cancel.is_cancelled() {
                    let _ = daemon.kill();
                }
                report(progress.to_target());
            };
            let failed = !matches!(&exited, Ok(status) if status.success());
            verdict.give(!failed);
            if failed {
                let why = match &exited {
                    Ok(status) => format!("`criu lazy-pages` ended ({status})"),
                    Err(e) => format!("waiting for `criu lazy-pages`: {e}"),
                };
                stop_clone(&why);
                cancel.cancel();
            }
            report(progress.to_target());
            (
                relay.join().expect("the page stream relay panicked"),
                exited,
            )
        });
        let status = exited.map_err(|error| PostCopyError::Daemon {
            images: self.images.clone(),
            status: error.to_string(),
            log: String::new(),
        })?;
        if !status.success() {
            return Err(match relayed {
                Err(e) => e.into(),
                Ok(_) if cancel.is_cancelled() && status.code().is_none() => {
                    PostCopyError::Cancelled
                }
                Ok(_) => PostCopyError::Daemon {
                    images: images.clone(),
                    status: status.to_string(),
                    log: log_errors(&daemon_log(images)),
                },
            });
        }
        match relayed? {
            StreamEnd::Complete => Ok(()),
            StreamEnd::Cancelled => Err(PostCopyError::Cancelled),
        }
    }
}

/// The daemon's log, beside its images.
fn daemon_log(images: &Path) -> PathBuf {
    images.join("lazy-pages.log")
}

/// `: <the last error lines of a CRIU log>`, or nothing.
fn log_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error"))
        .collect();
    if errors.is_empty() {
        return String::new();
    }
    warn!(log = %log.display(), "criu lazy-pages reported errors");
    format!(": {}", errors[errors.len().saturating_sub(3)..].join(" | "))
}
