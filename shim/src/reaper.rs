//! The shim's [`Reaper`]: the `containerd-shim` crate reaps every child of this process on
//! SIGCHLD and announces each exit on its monitor, so a child's exit is learnt there, by a
//! subscription made before the child is spawned.

use std::collections::HashMap;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

use containerd_shim::monitor::{Subject, Topic};
use containerd_shim::synchronous::monitor::{monitor_subscribe, Subscription};
use podmigrate_checkpoint::reap::{ExitWatch, OwnChildren, Reaper};
use tracing::warn;

/// Learns of exits from containerd-shim's monitor.
#[derive(Debug, Clone, Copy, Default)]
pub struct MonitorReaper;

impl Reaper for MonitorReaper {
    fn watch(&self) -> Box<dyn ExitWatch> {
        match monitor_subscribe(Topic::Pid) {
            Ok(subscription) => Box::new(MonitorWatch {
                subscription,
                seen: HashMap::new(),
            }),
            Err(e) => {
                warn!(error = %e, "no exit monitor; waiting for children directly");
                Box::new(OwnChildren)
            }
        }
    }
}

/// Subscribed to the monitor until dropped.
struct MonitorWatch {
    subscription: Subscription,
    /// Exits announced while waiting for another child.
    seen: HashMap<i32, i32>,
}

impl ExitWatch for MonitorWatch {
    fn wait_timeout(
        &mut self,
        child: &mut Child,
        timeout: Duration,
    ) -> io::Result<Option<ExitStatus>> {
        let pid = child.id() as i32;
        // Exit codes as the monitor gives them: 128 + the signal for a killed child.
        let status = |code: i32| ExitStatus::from_raw((code & 0xff) << 8);
        if let Some(code) = self.seen.remove(&pid) {
            return Ok(Some(status(code)));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.subscription.rx.recv_timeout(left) {
                Ok(event) => match event.subject {
                    Subject::Pid(p) if p == pid => return Ok(Some(status(event.exit_code))),
                    Subject::Pid(p) => {
                        self.seen.insert(p, event.exit_code);
                    }
                    Subject::Exec(..) => {}
                },
                Err(RecvTimeoutError::Timeout) => {
                    // Reaped by std after all (no SIGCHLD handler runs yet)?
                    return match child.try_wait() {
                        Ok(found) => Ok(found),
                        Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Ok(None),
                        Err(e) => Err(e),
                    };
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(io::Error::other("the exit monitor went away"))
                }
            }
        }
    }
}
