//! The post-copy page stream: an authenticated, encrypted relay between CRIU's page server on
//! the source node and `criu lazy-pages` on the target node.
//!
//! In post-copy, `criu dump --lazy-pages` leaves the lazy memory out of the checkpoint and serves
//! it from a page server on the source's loopback; on the target, `criu lazy-pages` fetches it
//! after the restored process resumes. The two never talk directly: each node runs one half of
//! this relay, and only the relay's stream crosses the network.
//!
//! ```text
//!  source node                                            target node
//!  criu page server <-tcp-> Server  <=== Noise ===>  Client <-tcp-> criu lazy-pages
//!  (127.0.0.1:port)         (node ip:ephemeral)       (127.0.0.1:ephemeral)
//! ```
//!
//! - The [`Server`] listens on the source node's address and accepts exactly one connection
//!   that proves it holds this migration's [`Secret`]; only then does it connect to CRIU.
//! - The [`Client`] listens on the target's loopback for CRIU's one connection, connects to the
//!   source's server and relays.
//! - The source writes a [`Ticket`] (address, secret) into its checkpoint directory; it travels
//!   inside the archive, sealed when the node has an archive key, and the target reads it after
//!   unpacking.
//!
//! The link is Noise `NNpsk0_25519_AESGCM_SHA256` with the secret as the pre-shared key, plus a
//! key confirmation from the client, so a peer without the secret fails the handshake and a
//! replayed first message achieves nothing. On the wire every message is a big-endian `u16`
//! length and a Noise message; a frame whose plaintext is empty is a side's end of stream. A
//! link that ends any other way (closed without that frame, a frame that fails authentication,
//! a socket error, or TCP keepalive and `TCP_USER_TIMEOUT` declaring the peer dead after about
//! ten seconds) is lost: the client then hands the loss to its caller, which kills the restored
//! process, before it closes CRIU's socket, since a closed userfaultfd would fill the missing
//! pages with zeros.

#![warn(missing_docs)]

mod cancel;
mod criu;
mod noise;
mod relay;
#[cfg(test)]
mod tests;
mod ticket;

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use socket2::{SockRef, TcpKeepalive};
use tracing::{info, warn};

use crate::bandwidth::{Bandwidth, TokenBucket};

pub use cancel::Cancel;
pub use criu::{Verdict, ABORT};
pub use ticket::{Secret, Ticket, SECRET_LEN, TICKET_FILE};

/// How long a connection has to complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to CRIU's page server or to the source's server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on the link between nodes: the first probe after 5 s of silence, then one a
/// second, five in all.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_RETRIES: u32 = 5;
/// How long data sent between nodes may stay unacknowledged before the link counts as dead;
/// with keepalive, a dead link is noticed in about this long whether or not data is moving.
const USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting accept looks at its [`Cancel`].
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// What went wrong in a page stream. Each names what failed and where; none shows the secret.
#[derive(Debug, thiserror::Error)]
pub enum PageStreamError {
    /// A listener could not be bound.
    #[error("page stream: binding a listener on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
    /// Accepting a connection failed (not a peer's fault: the listener itself).
    #[error("page stream: accepting {what} on {addr}: {source}")]
    Accept {
        /// The connection awaited.
        what: &'static str,
        /// The listener's address.
        addr: SocketAddr,
        /// Why accepting failed.
        #[source]
        source: io::Error,
    },
    /// Nobody (or nobody with the secret) connected in time.
    #[error("page stream: no {what} on {addr} within {waited:?}")]
    AcceptDeadline {
        /// The connection awaited.
        what: &'static str,
        /// The listener's address.
        addr: SocketAddr,
        /// How long it waited.
        waited: Duration,
    },
    /// The Noise handshake with `peer` failed: wrong secret, not a page stream, or too slow.
    #[error("page stream: handshake with {peer} failed: {reason}")]
    Handshake {
        /// The other end of the connection.
        peer: SocketAddr,
        /// What went wrong, in words.
        reason: String,
    },
    /// Connecting to CRIU's page server or to the source's server failed.
    #[error("page stream: connecting to {what} at {addr}: {source}")]
    Connect {
        /// Whom it connected to.
        what: &'static str,
        /// Their address.
        addr: SocketAddr,
        /// Why connecting failed.
        #[source]
        source: io::Error,
    },
    /// The link to the other node ended without its end of stream.
    #[error("page stream: lost the link to {peer}: {reason}")]
    Lost {
        /// The other node's address.
        peer: SocketAddr,
        /// How the link ended, in words.
        reason: String,
    },
    /// The ticket file could not be written or read.
    #[error("page stream ticket {path}: {op}: {source}")]
    Ticket {
        /// What was being done: "opening", "parsing" and the like.
        op: &'static str,
        /// The ticket file.
        path: PathBuf,
        /// What failed (for "parsing", the JSON error, which never quotes the secret).
        #[source]
        source: io::Error,
    },
    /// A local socket failed: CRIU's side of the relay, or setting a socket up.
    #[error("page stream: {op} {addr}: {source}")]
    Io {
        /// What was being done, ending so that `addr` follows: "reading from CRIU at".
        op: &'static str,
        /// The socket's other end.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The system's random source failed to make a secret.
    #[error("page stream: generating a secret: the system random source failed")]
    Random,
}

/// Bytes relayed so far, readable from another thread while the relay runs.
#[derive(Debug, Default)]
pub struct Progress {
    to_target: AtomicU64,
    to_source: AtomicU64,
}

impl Progress {
    /// Bytes from the source's CRIU to the target's (the pages, mostly).
    pub fn to_target(&self) -> u64 {
        self.to_target.load(Ordering::Relaxed)
    }

    /// Bytes from the target's CRIU to the source's (page requests).
    pub fn to_source(&self) -> u64 {
        self.to_source.load(Ordering::Relaxed)
    }
}

/// How a relay ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// Both sides closed cleanly: each CRIU closed its socket and each end of stream arrived.
    Complete,
    /// [`Cancel::cancel`] stopped it.
    Cancelled,
}

/// The source node's half: accepts the target's one authenticated connection and relays it to
/// CRIU's page server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    peer: Option<IpAddr>,
    secret: Secret,
    bandwidth: Bandwidth,
}

/// What the server waits for, in its errors.
const SERVER_AWAITS: &str = "authenticated connection from the target node";

impl Server {
    /// Binds `ip:0` (an ephemeral port; see [`Server::local_addr`]). `peer`: if `Some`,
    /// connections from any other address are closed at once (and logged). `bandwidth` caps
    /// the bytes per second from the source to the target.
    pub fn bind(
        ip: IpAddr,
        peer: Option<IpAddr>,
        secret: Secret,
        bandwidth: Bandwidth,
    ) -> Result<Server, PageStreamError> {
        let (listener, addr) = bind(SocketAddr::new(ip, 0))?;
        Ok(Server {
            listener,
            addr,
            peer,
            secret,
            bandwidth,
        })
    }

    /// The address the target connects to (for the [`Ticket`]).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts connections until one completes the handshake (a failed one is logged and
    /// closed, and the server keeps listening) or `accept_deadline` passes; a handshake begun
    /// before the deadline may finish. Then closes the listener, connects to CRIU's page server
    /// at `criu` and relays until both directions end. Bytes to the target pass through the
    /// bandwidth cap.
    ///
    /// Returns [`StreamEnd::Complete`] once the target sent its end of stream and CRIU closed
    /// its socket, [`StreamEnd::Cancelled`] if `cancel` fired first,
    /// [`PageStreamError::AcceptDeadline`] if no one authenticated in time, and
    /// [`PageStreamError::Lost`] if the target vanished.
    pub fn serve(
        self,
        criu: SocketAddr,
        accept_deadline: Duration,
        progress: &Progress,
        cancel: &Cancel,
    ) -> Result<StreamEnd, PageStreamError> {
        let Server {
            listener,
            addr,
            peer,
            secret,
            bandwidth,
        } = self;
        let deadline = Instant::now() + accept_deadline;
        let (secure, from, session) = loop {
            let Some((stream, from)) = accept_until(
                &listener,
                addr,
                SERVER_AWAITS,
                deadline,
                accept_deadline,
                cancel,
            )?
            else {
                return Ok(StreamEnd::Cancelled);
            };
            if let Some(expected) = peer {
                if from.ip().to_canonical() != expected.to_canonical() {
                    warn!(listen = %addr, %from, expected = %expected, "page stream: refused a connection from an unexpected address");
                    continue;
                }
            }
            match handshake(&stream, from, cancel, noise::respond, &secret) {
                Ok(session) => break (stream, from, session),
                Err(_) if cancel.is_cancelled() => return Ok(StreamEnd::Cancelled),
                Err(e) => {
                    warn!(listen = %addr, %from, error = %e, "page stream: refused a connection that failed the handshake");
                }
            }
        };
        drop(listener);
        info!(listen = %addr, peer = %from, "page stream: the target authenticated; connecting to CRIU's page server");
        let plain = connect(criu, "CRIU's page server")?;
        let started = Instant::now();
        let outcome = relay::run(
            relay::Ends {
                plain: &plain,
                plain_addr: criu,
                secure: &secure,
                peer: from,
            },
            session,
            relay::Side::Source,
            TokenBucket::for_bandwidth(bandwidth),
            progress,
            cancel,
        );
        log_end(&outcome.result, from, progress, started);
        if !matches!(outcome.result, Ok(StreamEnd::Complete)) {
            // Never a bare close: CRIU would take it for the clone's orderly end.
            let _ = (&plain).write_all(ABORT);
        }
        outcome.result
    }
}

/// The target node's half: accepts CRIU lazy-pages' one connection and relays it to the
/// source's [`Server`].
#[derive(Debug)]
pub struct Client {
    listener: TcpListener,
    addr: SocketAddr,
}

/// What the client waits for, in its errors.
const CLIENT_AWAITS: &str = "connection from CRIU lazy-pages";

impl Client {
    /// Binds `127.0.0.1:0`: CRIU lazy-pages is told to connect to [`Client::local_addr`].
    pub fn bind_local() -> Result<Client, PageStreamError> {
        let (listener, addr) = bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
        Ok(Client { listener, addr })
    }

    /// The address CRIU lazy-pages connects to, as if to the page server.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Accepts CRIU's one connection (within `accept_deadline`), then closes the listener,
    /// connects to `ticket.address`, authenticates with `ticket.secret` and relays until both
    /// directions end.
    ///
    /// If it fails while pages may still be missing (CRIU connected but the source's end of
    /// stream never arrived: the source unreachable, the handshake refused, the link lost), it
    /// calls `on_lost` with the error BEFORE closing CRIU's socket, then returns the error
    /// ([`PageStreamError::Lost`] for a link lost mid-stream). The caller kills the restored
    /// process there: once lazy-pages sees its socket close, the process's missing pages would
    /// read as zeros. `on_lost` is not called when `cancel` stopped the relay: whoever cancels
    /// decides the process's fate.
    ///
    /// The daemon's close of its session is answered here and passed on to the source only
    /// once `verdict` says the daemon ended well (see [`Verdict`]).
    pub fn fetch(
        self,
        ticket: &Ticket,
        accept_deadline: Duration,
        progress: &Progress,
        cancel: &Cancel,
        verdict: &Verdict,
        on_lost: impl FnOnce(&PageStreamError),
    ) -> Result<StreamEnd, PageStreamError> {
        let Client { listener, addr } = self;
        let deadline = Instant::now() + accept_deadline;
        let Some((plain, criu)) = accept_until(
            &listener,
            addr,
            CLIENT_AWAITS,
            deadline,
            accept_deadline,
            cancel,
        )?
        else {
            return Ok(StreamEnd::Cancelled);
        };
        drop(listener);
        info!(listen = %addr, source = %ticket.address, "page stream: CRIU lazy-pages connected; connecting to the source");
        let source = ticket.address;
        let started = Instant::now();
        let linked = connect(source, "the source node's page stream").and_then(|secure| {
            let session = handshake(&secure, source, cancel, noise::initiate, &ticket.secret)?;
            Ok((secure, session))
        });
        let (result, pages_complete) = match linked {
            Ok((secure, session)) => {
                info!(source = %source, "page stream: authenticated to the source");
                let outcome = relay::run(
                    relay::Ends {
                        plain: &plain,
                        plain_addr: criu,
                        secure: &secure,
                        peer: source,
                    },
                    session,
                    relay::Side::Target(verdict),
                    None,
                    progress,
                    cancel,
                );
                (outcome.result, outcome.inbound_complete)
            }
            Err(_) if cancel.is_cancelled() => (Ok(StreamEnd::Cancelled), false),
            Err(e) => (Err(e), false),
        };
        log_end(&result, source, progress, started);
        if let Err(e) = &result {
            // A daemon that ended well held every page: nothing is missing, whatever the link.
            if !pages_complete && !verdict.ended_well() {
                warn!(source = %source, error = %e, "page stream: pages may be missing; handing over before closing CRIU's socket");
                on_lost(e);
            }
        }
        drop(plain);
        result
    }
}

/// Binds a listener, naming the address in the error.
fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), PageStreamError> {
    let bind_err = |source| PageStreamError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    Ok((listener, local))
}

/// Accepts one connection on a non-blocking listener, polling so that `cancel` is seen within
/// [`ACCEPT_POLL`]. `None` when cancelled.
fn accept_until(
    listener: &TcpListener,
    addr: SocketAddr,
    what: &'static str,
    deadline: Instant,
    waited: Duration,
    cancel: &Cancel,
) -> Result<Option<(TcpStream, SocketAddr)>, PageStreamError> {
    let accept_err = |source| PageStreamError::Accept { what, addr, source };
    loop {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        match listener.accept() {
            Ok((stream, from)) => {
                // Not inherited on Linux, but the relay depends on blocking sockets.
                stream.set_nonblocking(false).map_err(accept_err)?;
                return Ok(Some((stream, from)));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => return Err(accept_err(e)),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(PageStreamError::AcceptDeadline { what, addr, waited });
        }
        // Under a second (ACCEPT_POLL), so the nanoseconds are the whole wait.
        let wait = (deadline - now).min(ACCEPT_POLL);
        let timeout = Timespec {
            tv_sec: 0,
            tv_nsec: wait.subsec_nanos().into(),
        };
        let mut fds = [PollFd::new(listener, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(accept_err(e.into())),
        }
    }
}

/// Connects with [`CONNECT_TIMEOUT`], `TCP_NODELAY` set.
fn connect(addr: SocketAddr, what: &'static str) -> Result<TcpStream, PageStreamError> {
    let connect_err = |source| PageStreamError::Connect { what, addr, source };
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(connect_err)?;
    stream.set_nodelay(true).map_err(connect_err)?;
    Ok(stream)
}

/// Sets up a socket between nodes: no Nagle delay, and a dead peer noticed in about ten
/// seconds whether data is moving (`TCP_USER_TIMEOUT`) or not (keepalive).
fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// Runs one side of the handshake on `stream` within [`HANDSHAKE_TIMEOUT`], stoppable by
/// `cancel`; the socket is set up for the link between nodes first.
fn handshake(
    stream: &TcpStream,
    peer: SocketAddr,
    cancel: &Cancel,
    side: fn(&mut noise::Deadlined<'_>, &Secret) -> Result<noise::Session, String>,
    secret: &Secret,
) -> Result<noise::Session, PageStreamError> {
    let failed = |reason: String| PageStreamError::Handshake { peer, reason };
    tune(stream).map_err(|e| failed(format!("setting up the socket: {e}")))?;
    let _watch = cancel
        .watch(stream, std::net::Shutdown::Both)
        .map_err(|e| failed(format!("duplicating the socket: {e}")))?;
    let mut io = noise::Deadlined::new(stream, Instant::now() + HANDSHAKE_TIMEOUT);
    let session = side(&mut io, secret).map_err(failed)?;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| failed(format!("clearing the socket's timeouts: {e}")))?;
    Ok(session)
}

/// Logs how a relay with `peer` ended.
fn log_end(
    result: &Result<StreamEnd, PageStreamError>,
    peer: SocketAddr,
    progress: &Progress,
    started: Instant,
) {
    let (to_target, to_source) = (progress.to_target(), progress.to_source());
    let elapsed = started.elapsed();
    match result {
        Ok(StreamEnd::Complete) => {
            info!(%peer, to_target, to_source, ?elapsed, "page stream: complete")
        }
        Ok(StreamEnd::Cancelled) => {
            info!(%peer, to_target, to_source, ?elapsed, "page stream: cancelled")
        }
        Err(e) => {
            warn!(%peer, to_target, to_source, ?elapsed, error = %e, "page stream: failed")
        }
    }
}
