//! Waiting for a child process when something else in this process may reap it.
//!
//! A containerd shim built on the `containerd-shim` crate reaps every child of its process as
//! soon as it exits (`waitpid(-1)` on SIGCHLD) and announces the exit on its monitor; `std`'s
//! own `Child::wait` would then find nothing to wait for. The post-copy operations spawn runc
//! and CRIU, so they learn of their exits through a [`Reaper`]: the shim's announces what its
//! monitor saw, [`OwnChildren`] waits as `std` does.

use std::io;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Watches for the exit of children spawned after [`Reaper::watch`].
pub trait ExitWatch: Send {
    /// The exit of `child`, if it ends within `timeout`.
    fn wait_timeout(
        &mut self,
        child: &mut Child,
        timeout: Duration,
    ) -> io::Result<Option<ExitStatus>>;

    /// The exit of `child`.
    fn wait(&mut self, child: &mut Child) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.wait_timeout(child, Duration::from_secs(3600))? {
                return Ok(status);
            }
        }
    }
}

/// How this process learns that its children ended.
pub trait Reaper: Sync {
    /// A watch for the exits of children spawned from now on.
    fn watch(&self) -> Box<dyn ExitWatch>;
}

/// A process that reaps its own children (`std`'s `Child::wait`).
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnChildren;

impl Reaper for OwnChildren {
    fn watch(&self) -> Box<dyn ExitWatch> {
        Box::new(OwnChildren)
    }
}

impl ExitWatch for OwnChildren {
    fn wait_timeout(
        &mut self,
        child: &mut Child,
        timeout: Duration,
    ) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(20)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_children_are_waited_for() {
        let mut watch = OwnChildren.watch();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(watch
            .wait_timeout(&mut sleeper, Duration::from_millis(50))
            .unwrap()
            .is_none());
        sleeper.kill().unwrap();
        assert!(!watch.wait(&mut sleeper).unwrap().success());
        let mut ok = std::process::Command::new("true").spawn().unwrap();
        assert!(watch.wait(&mut ok).unwrap().success());
    }
}
