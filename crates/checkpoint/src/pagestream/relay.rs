//! The relay proper: CRIU's plain socket on one side, the encrypted link to the other node on
//! the other, one thread per direction.
//!
//! - Outbound (plain -> encrypted): CRIU's bytes are cut into frames; when CRIU closes its
//!   side, the end-of-stream frame goes out and the encrypted socket's write side is shut.
//! - Inbound (encrypted -> plain): frames are checked and decrypted in order; the end-of-stream
//!   frame shuts CRIU's write side. Anything else ending the link is a loss.
//!
//! A failure in either direction aborts both: the encrypted socket is shut down entirely, so
//! the peer sees the link end without an end of stream, and CRIU's socket for reading only,
//! which wakes a thread blocked on it without telling CRIU anything. CRIU's socket is closed
//! by the caller, after it has dealt with the loss.
//!
//! On the target, outbound reads the daemon's requests one by one instead, to hold back its
//! close until the daemon has ended well (see [`super::criu`]); from that close on, inbound
//! has nothing more for the daemon and drops what the source still sends (its close status).

use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::thread;

use super::criu::{self, Verdict, CLOSE_STATUS, REQUEST_LEN};
use super::noise::{self, Opener, Sealer, Session, HEADER_LEN, MAX_CHUNK, MAX_MESSAGE};
use super::{Cancel, PageStreamError, Progress, StreamEnd};
use crate::bandwidth::TokenBucket;

/// Frames buffered ahead on the encrypted socket: fewer reads for small frames.
const READ_BUFFER: usize = 4 * (HEADER_LEN + MAX_MESSAGE);

/// The two sockets of a relay.
#[derive(Clone, Copy)]
pub(super) struct Ends<'a> {
    /// The local CRIU's socket.
    pub(super) plain: &'a TcpStream,
    pub(super) plain_addr: SocketAddr,
    /// The link to the other node, past the handshake.
    pub(super) secure: &'a TcpStream,
    pub(super) peer: SocketAddr,
}

/// Which node this half of the relay runs on, which decides which [`Progress`] counter each
/// direction feeds.
#[derive(Clone, Copy)]
pub(super) enum Side<'a> {
    /// Outbound carries pages to the target.
    Source,
    /// Outbound carries requests to the source; the daemon's close waits for its verdict.
    Target(&'a Verdict),
}

/// How a relay ended.
pub(super) struct Outcome {
    pub(super) result: Result<StreamEnd, PageStreamError>,
    /// The other node's end of stream arrived: it has sent all it ever will.
    pub(super) inbound_complete: bool,
}

/// How one direction ended without an error of its own.
enum Ended {
    /// Its end of stream went through.
    Clean,
    /// The other direction failed, or the relay was cancelled.
    Stopped,
}

/// What the two directions share.
struct Shared<'a> {
    ends: Ends<'a>,
    cancel: &'a Cancel,
    failed: AtomicBool,
    /// The target's daemon closed its session: nothing more goes to it.
    closing: AtomicBool,
    /// The failure that stopped the relay; those it caused in the other direction are dropped.
    first: Mutex<Option<PageStreamError>>,
}

impl Shared<'_> {
    fn stopping(&self) -> bool {
        self.failed.load(Ordering::SeqCst) || self.cancel.is_cancelled()
    }

    /// Stops both directions. The flag goes first: a thread woken by the shutdown reads it.
    fn abort(&self) {
        self.failed.store(true, Ordering::SeqCst);
        let _ = self.ends.secure.shutdown(Shutdown::Both);
        let _ = self.ends.plain.shutdown(Shutdown::Read);
    }

    /// Records how a direction ended; true if cleanly.
    fn settle(&self, ended: Result<Ended, PageStreamError>) -> bool {
        match ended {
            Ok(Ended::Clean) => true,
            Ok(Ended::Stopped) => false,
            Err(e) => {
                if !self.failed.swap(true, Ordering::SeqCst) {
                    *self.first.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                }
                self.abort();
                false
            }
        }
    }
}

/// Aborts the relay if its thread panics, so the other thread does not block forever.
struct AbortOnPanic<'a, 'b>(&'a Shared<'b>);

impl Drop for AbortOnPanic<'_, '_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.abort();
        }
    }
}

/// Relays until both directions end: outbound on a new thread, inbound on this one. `cap`
/// paces outbound.
pub(super) fn run(
    ends: Ends<'_>,
    session: Session,
    side: Side<'_>,
    cap: Option<TokenBucket>,
    progress: &Progress,
    cancel: &Cancel,
) -> Outcome {
    let failed = |result| Outcome {
        result: Err(result),
        inbound_complete: false,
    };
    if let Err(source) = ends.plain.set_nodelay(true) {
        return failed(PageStreamError::Io {
            op: "setting up the socket to CRIU at",
            addr: ends.plain_addr,
            source,
        });
    }
    let watches = cancel
        .watch(ends.secure, Shutdown::Both)
        .and_then(|secure| Ok((secure, cancel.watch(ends.plain, Shutdown::Read)?)));
    let _watches = match watches {
        Ok(watches) => watches,
        Err(source) => {
            return failed(PageStreamError::Io {
                op: "duplicating the socket to",
                addr: ends.peer,
                source,
            })
        }
    };
    let (outbound_count, inbound_count) = match side {
        Side::Source => (&progress.to_target, &progress.to_source),
        Side::Target(_) => (&progress.to_source, &progress.to_target),
    };
    let shared = Shared {
        ends,
        cancel,
        failed: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        first: Mutex::new(None),
    };
    let transport = &session.transport;
    let (outbound_clean, inbound_clean) = thread::scope(|scope| {
        let shared = &shared;
        let sealer = Sealer::new(transport, session.send_nonce);
        let sending = scope.spawn(move || {
            let _guard = AbortOnPanic(shared);
            shared.settle(match side {
                Side::Source => outbound(shared, sealer, cap, outbound_count),
                Side::Target(verdict) => requests(shared, sealer, verdict, outbound_count),
            })
        });
        let inbound_clean = {
            let _guard = AbortOnPanic(shared);
            let opener = Opener::new(transport, session.receive_nonce);
            shared.settle(inbound(shared, opener, inbound_count))
        };
        let outbound_clean = sending
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (outbound_clean, inbound_clean)
    });
    let first = shared
        .first
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    let result = match first {
        None if outbound_clean && inbound_clean => Ok(StreamEnd::Complete),
        _ if cancel.is_cancelled() => Ok(StreamEnd::Cancelled),
        Some(e) => Err(e),
        None => Err(PageStreamError::Lost {
            peer: ends.peer,
            reason: "the relay stopped with no recorded cause".to_string(),
        }),
    };
    Outcome {
        result,
        inbound_complete: inbound_clean,
    }
}

/// CRIU's bytes, framed and encrypted, to the other node.
fn outbound(
    shared: &Shared<'_>,
    mut sealer: Sealer<'_>,
    mut cap: Option<TokenBucket>,
    count: &AtomicU64,
) -> Result<Ended, PageStreamError> {
    let Ends {
        mut plain,
        plain_addr,
        mut secure,
        peer,
    } = shared.ends;
    let lost = |what: &str, e: &dyn std::fmt::Display| PageStreamError::Lost {
        peer,
        reason: format!("{what}: {e}"),
    };
    let mut chunk = vec![0u8; MAX_CHUNK];
    let mut frame = vec![0u8; HEADER_LEN + MAX_MESSAGE];
    loop {
        let n = match plain.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(PageStreamError::Io {
                    op: "reading from CRIU at",
                    addr: plain_addr,
                    source,
                })
            }
        };
        if n == 0 {
            // After an abort or a cancel, an end of file may be the shutdown's, not CRIU's.
            if shared.stopping() {
                return Ok(Ended::Stopped);
            }
            let len = sealer
                .seal(&[], &mut frame)
                .map_err(|e| lost("encrypting the end of stream", &e))?;
            secure
                .write_all(&frame[..len])
                .map_err(|e| lost("sending the end of stream", &e))?;
            secure
                .shutdown(Shutdown::Write)
                .map_err(|e| lost("closing the sending side", &e))?;
            return Ok(Ended::Clean);
        }
        if let Some(bucket) = cap.as_mut() {
            bucket.take(n as u64);
        }
        let len = sealer
            .seal(&chunk[..n], &mut frame)
            .map_err(|e| lost("encrypting a frame", &e))?;
        secure
            .write_all(&frame[..len])
            .map_err(|e| lost("sending", &e))?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The target's daemon's requests, one by one, to the source; its close only once the daemon
/// has ended well, then the end of stream.
fn requests(
    shared: &Shared<'_>,
    mut sealer: Sealer<'_>,
    verdict: &Verdict,
    count: &AtomicU64,
) -> Result<Ended, PageStreamError> {
    let Ends {
        mut plain,
        plain_addr,
        mut secure,
        peer,
    } = shared.ends;
    let lost = |what: &str, e: &dyn std::fmt::Display| PageStreamError::Lost {
        peer,
        reason: format!("{what}: {e}"),
    };
    let mut request = [0u8; REQUEST_LEN];
    let mut frame = vec![0u8; HEADER_LEN + MAX_MESSAGE];
    loop {
        if let Err(source) = plain.read_exact(&mut request) {
            if shared.stopping() {
                return Ok(Ended::Stopped);
            }
            return Err(PageStreamError::Io {
                op: if source.kind() == io::ErrorKind::UnexpectedEof {
                    "CRIU lazy-pages left without closing its session at"
                } else {
                    "reading from CRIU at"
                },
                addr: plain_addr,
                source,
            });
        }
        let close = criu::is_close(&request);
        if close {
            // The daemon's session is over whatever happens next; the source's is not yet.
            shared.closing.store(true, Ordering::SeqCst);
            verdict.closed();
            plain
                .write_all(&CLOSE_STATUS)
                .map_err(|source| PageStreamError::Io {
                    op: "answering CRIU lazy-pages' close at",
                    addr: plain_addr,
                    source,
                })?;
            if !verdict.wait(shared.cancel) {
                if shared.stopping() {
                    return Ok(Ended::Stopped);
                }
                return Err(PageStreamError::Lost {
                    peer,
                    reason: "CRIU lazy-pages did not end well: the clone may lack pages"
                        .to_string(),
                });
            }
        }
        let len = sealer
            .seal(&request, &mut frame)
            .map_err(|e| lost("encrypting a request", &e))?;
        secure
            .write_all(&frame[..len])
            .map_err(|e| lost("sending", &e))?;
        count.fetch_add(REQUEST_LEN as u64, Ordering::Relaxed);
        if close {
            let len = sealer
                .seal(&[], &mut frame)
                .map_err(|e| lost("encrypting the end of stream", &e))?;
            secure
                .write_all(&frame[..len])
                .map_err(|e| lost("sending the end of stream", &e))?;
            secure
                .shutdown(Shutdown::Write)
                .map_err(|e| lost("closing the sending side", &e))?;
            return Ok(Ended::Clean);
        }
    }
}

/// The other node's frames, checked and decrypted, to CRIU.
fn inbound(
    shared: &Shared<'_>,
    mut opener: Opener<'_>,
    count: &AtomicU64,
) -> Result<Ended, PageStreamError> {
    let Ends {
        mut plain,
        plain_addr,
        secure,
        peer,
    } = shared.ends;
    let lost = |reason: String| PageStreamError::Lost { peer, reason };
    let mut reader = BufReader::with_capacity(READ_BUFFER, secure);
    let mut message = vec![0u8; MAX_MESSAGE];
    let mut data = vec![0u8; MAX_MESSAGE];
    loop {
        let len = match noise::read_frame(&mut reader, &mut message) {
            Ok(Some(len)) => len,
            Ok(None) if shared.stopping() => return Ok(Ended::Stopped),
            Ok(None) => {
                return Err(lost(
                    "the connection closed without an end of stream".to_string(),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(lost(
                    "the connection closed in the middle of a frame".to_string(),
                ))
            }
            Err(e) => return Err(lost(format!("receiving: {e}"))),
        };
        let n = opener.open(&message[..len], &mut data).map_err(|_| {
            lost("a frame failed authentication: altered, forged or out of order".to_string())
        })?;
        if n == 0 {
            if shared.closing.load(Ordering::SeqCst) {
                return Ok(Ended::Clean);
            }
            match plain.shutdown(Shutdown::Write) {
                // CRIU closed its socket already: nothing left to tell it.
                Err(e) if e.kind() != io::ErrorKind::NotConnected => {
                    return Err(PageStreamError::Io {
                        op: "closing the sending side of the socket to CRIU at",
                        addr: plain_addr,
                        source: e,
                    })
                }
                _ => return Ok(Ended::Clean),
            }
        }
        if !shared.closing.load(Ordering::SeqCst) {
            plain
                .write_all(&data[..n])
                .map_err(|source| PageStreamError::Io {
                    op: "writing to CRIU at",
                    addr: plain_addr,
                    source,
                })?;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}
