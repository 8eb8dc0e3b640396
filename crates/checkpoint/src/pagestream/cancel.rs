//! Stopping a page stream from another thread.

use std::fmt;
use std::io;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Stops a page stream from another thread: [`Cancel::cancel`] shuts down the sockets the
/// stream is using, so blocked reads and writes return at once, and a waiting accept returns
/// within 100 ms. Clones share the same state.
#[derive(Clone, Default)]
pub struct Cancel(Arc<Inner>);

#[derive(Default)]
struct Inner {
    cancelled: AtomicBool,
    watched: Mutex<Watched>,
}

/// The sockets to shut down on cancel, each under the id of the [`Watch`] that removes it.
#[derive(Default)]
struct Watched {
    next_id: u64,
    sockets: Vec<(u64, TcpStream, Shutdown)>,
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cancel")
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Cancel {
    /// A cancel that has not fired.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Stops the stream: marks it cancelled, then shuts down every socket it is using. Later
    /// calls do nothing.
    pub fn cancel(&self) {
        // Set before taking the lock, so a `watch` that takes it afterwards sees the flag.
        if self.0.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        for (_, socket, how) in &self.watched().sockets {
            let _ = socket.shutdown(*how);
        }
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::SeqCst)
    }

    /// Shuts `stream` down (`how`) on cancel while the returned guard lives; at once if
    /// already cancelled.
    pub(super) fn watch(&self, stream: &TcpStream, how: Shutdown) -> io::Result<Watch<'_>> {
        let copy = stream.try_clone()?;
        let mut watched = self.watched();
        let id = watched.next_id;
        watched.next_id += 1;
        if self.is_cancelled() {
            let _ = copy.shutdown(how);
        }
        watched.sockets.push((id, copy, how));
        Ok(Watch { cancel: self, id })
    }

    fn watched(&self) -> MutexGuard<'_, Watched> {
        // The list stays consistent whatever panicked while holding it.
        self.0
            .watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps a socket under a [`Cancel`]; dropping it forgets the socket (and closes the
/// duplicate descriptor the cancel held).
pub(super) struct Watch<'a> {
    cancel: &'a Cancel,
    id: u64,
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.cancel
            .watched()
            .sockets
            .retain(|(id, _, _)| *id != self.id);
    }
}
