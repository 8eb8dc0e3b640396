//! The Wait of a restored container's init process, held until its Start is known.
//!
//! A container created from a checkpoint has no process until its Start (runc restore). When
//! that restore fails, or the task is killed or deleted before it started, containerd's runc
//! shim never records an exit: the process never had a pid. Its Wait then never answers. CRI
//! calls Wait before Start, and its cleanup of a failed Start kills the task and waits for that
//! exit, so it waits out its one-minute deadline before it deletes the task; until then kubelet
//! cannot remove the clone. containerd 1.7 gets past it by chance of timing; 1.6 does not.
//!
//! So for a restored container the proxy holds every Wait of the init process until the Start
//! has an outcome. A Start that succeeded lets the Wait through to the runc shim, which answers
//! it when the process exits. A Start that failed, or a Kill or Delete before any Start, answers
//! it here, with [`NEVER_STARTED`]. No thread is spawned: each Wait waits in its own ttrpc
//! handler, as it would in the runc shim.

use std::sync::{Condvar, Mutex};
use std::time::SystemTime;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

/// The exit status a restored task that never ran reports: containerd's own status for an
/// exit it could not learn (`UnknownExitStatus`).
pub const NEVER_STARTED: u32 = 255;

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// No Start yet.
    Pending,
    /// Start was asked and has not answered.
    Starting,
    /// The restored processes run: the runc shim answers the Wait.
    Started,
    /// The task never ran, and never will.
    NeverStarted(api::WaitResponse),
}

/// What a held Wait does once it may go on.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitAnswer {
    /// Ask the runc shim.
    Forward,
    /// Answer with this.
    Answer(api::WaitResponse),
}

/// One restored container's Start outcome, as its Waits see it.
#[derive(Debug)]
pub struct RestoredWait {
    outcome: Mutex<Outcome>,
    changed: Condvar,
}

impl Default for RestoredWait {
    fn default() -> Self {
        Self {
            outcome: Mutex::new(Outcome::Pending),
            changed: Condvar::new(),
        }
    }
}

impl RestoredWait {
    /// Blocks until the Start has an outcome.
    pub fn wait(&self) -> WaitAnswer {
        let guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self
            .changed
            .wait_while(guard, |o| matches!(o, Outcome::Pending | Outcome::Starting))
            .unwrap_or_else(|p| p.into_inner());
        match &*guard {
            Outcome::NeverStarted(response) => WaitAnswer::Answer(response.clone()),
            _ => WaitAnswer::Forward,
        }
    }

    /// The Start was asked: its answer settles the outcome, whatever comes meanwhile.
    pub fn starting(&self) {
        self.settle(&[Outcome::Pending], Outcome::Starting);
    }

    /// The Start answered: held Waits go to the runc shim if it succeeded, and are answered
    /// with [`NEVER_STARTED`] if it failed.
    pub fn start_answered(&self, succeeded: bool) {
        let outcome = if succeeded {
            Outcome::Started
        } else {
            never_started()
        };
        self.settle(&[Outcome::Pending, Outcome::Starting], outcome);
    }

    /// The task was killed or deleted before any Start: it will never run.
    pub fn ended_unstarted(&self) {
        self.settle(&[Outcome::Pending], never_started());
    }

    fn settle(&self, from: &[Outcome], to: Outcome) {
        let mut guard = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if from.contains(&*guard) {
            *guard = to;
            self.changed.notify_all();
        }
    }
}

fn never_started() -> Outcome {
    Outcome::NeverStarted(api::WaitResponse {
        exit_status: NEVER_STARTED,
        exited_at: Some(Timestamp::from(SystemTime::now())).into(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn held_wait(gate: &Arc<RestoredWait>) -> std::thread::JoinHandle<WaitAnswer> {
        let gate = Arc::clone(gate);
        std::thread::spawn(move || gate.wait())
    }

    #[test]
    fn a_failed_start_answers_the_waits_held_before_it_and_those_after() {
        let gate = Arc::new(RestoredWait::default());
        let held = held_wait(&gate);
        gate.starting();
        gate.start_answered(false);
        for answer in [held.join().unwrap(), gate.wait()] {
            match answer {
                WaitAnswer::Answer(r) => assert_eq!(r.exit_status, NEVER_STARTED),
                other => panic!("expected an answer, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_task_killed_before_its_start_answers_its_waits() {
        let gate = Arc::new(RestoredWait::default());
        let held = held_wait(&gate);
        gate.ended_unstarted();
        assert!(matches!(held.join().unwrap(), WaitAnswer::Answer(_)));
    }

    #[test]
    fn a_kill_during_the_start_leaves_the_outcome_to_the_start() {
        let gate = Arc::new(RestoredWait::default());
        let held = held_wait(&gate);
        gate.starting();
        gate.ended_unstarted();
        gate.start_answered(true);
        gate.ended_unstarted();
        assert_eq!(held.join().unwrap(), WaitAnswer::Forward);
        assert_eq!(gate.wait(), WaitAnswer::Forward);
    }
}
