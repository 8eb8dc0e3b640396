//! What the relay must know of CRIU's page server protocol to end a session truthfully.
//!
//! The lazy-pages daemon sends only fixed-size requests ([`REQUEST_LEN`] bytes: `u32 cmd,
//! u32 nr_pages, u64 vaddr, u64 dst_id`, in the host's byte order) and ends the session with
//! `PS_IOV_CLOSE`, waiting for a 4-byte status; the page server then waits for the end of the
//! connection and ends its dump well. Two of CRIU's habits would lie about the clone's pages:
//!
//! * the page server takes a connection that simply ends (no `PS_IOV_CLOSE`) as a finished
//!   session too, and the source's processes would then be killed: so the source's relay
//!   never just closes CRIU's socket when the stream did not end properly; it sends
//!   [`ABORT`], shorter than a request, which fails the dump (CRIU then resumes the source);
//! * the daemon sends `PS_IOV_CLOSE` even after it failed: so the target's relay answers the
//!   daemon's close itself, and passes it on to the source only once the daemon has exited
//!   well ([`Verdict`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

use super::Cancel;

/// The size of a lazy-pages request.
pub(super) const REQUEST_LEN: usize = 24;
/// `PS_IOV_CLOSE` and `PS_IOV_FORCE_CLOSE` (criu/include/page-xfer.h).
const CLOSE_COMMANDS: [u32; 2] = [0x1023, 0x1024];
/// The page server's answer to a close: status 0.
pub(super) const CLOSE_STATUS: [u8; 4] = [0; 4];
/// What makes a page server fail its session (fewer bytes than a request, then the end).
pub const ABORT: &[u8] = b"abort";

/// Whether a request ends the session.
pub(super) fn is_close(request: &[u8; REQUEST_LEN]) -> bool {
    let cmd = u32::from_ne_bytes([request[0], request[1], request[2], request[3]]);
    CLOSE_COMMANDS.contains(&cmd)
}

/// Whether the clone's lazy-pages daemon ended well, given once it has exited: only then does
/// the target's relay tell the source that the session is over.
#[derive(Debug, Default)]
pub struct Verdict {
    given: Mutex<Option<bool>>,
    changed: Condvar,
    /// The daemon closed its session (it sends its close only once it has every page).
    closed: AtomicBool,
}

impl Verdict {
    /// Records how the daemon ended.
    pub fn give(&self, ended_well: bool) {
        *self.given.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended_well);
        self.changed.notify_all();
    }

    /// Records that the daemon closed its session.
    pub(super) fn closed(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Whether the daemon closed its session and then ended well: it held every page.
    pub(super) fn ended_well(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
            && *self.given.lock().unwrap_or_else(PoisonError::into_inner) == Some(true)
    }

    /// Waits for the verdict; a cancelled relay gets none (`false`).
    pub(super) fn wait(&self, cancel: &Cancel) -> bool {
        let mut given = self.given.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(ended_well) = *given {
                return ended_well;
            }
            if cancel.is_cancelled() {
                return false;
            }
            given = self
                .changed
                .wait_timeout(given, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_requests_are_told_from_page_requests() {
        let mut request = [0u8; REQUEST_LEN];
        request[..4].copy_from_slice(&7u32.to_ne_bytes());
        assert!(!is_close(&request));
        request[..4].copy_from_slice(&0x1023u32.to_ne_bytes());
        assert!(is_close(&request));
        request[..4].copy_from_slice(&0x1024u32.to_ne_bytes());
        assert!(is_close(&request));
        assert!(ABORT.len() < REQUEST_LEN);
    }

    #[test]
    fn a_verdict_is_waited_for_unless_cancelled() {
        let verdict = Verdict::default();
        let cancel = Cancel::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                verdict.give(true);
            });
            assert!(verdict.wait(&cancel));
        });
        let never = Verdict::default();
        cancel.cancel();
        assert!(!never.wait(&cancel));
    }
}
