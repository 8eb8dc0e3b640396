//! The shim's side of the handoff protocol ([`podmigrate_checkpoint::handoff`]): a container's
//! Kill asks the node's agent whether its pod is departing (and waits while the agent
//! checkpoints it), and a container's Create asks whether its pod replaces a departed one.
//!
//! Whatever goes wrong in asking (no agent, an agent that answers badly or too late), the
//! container is killed, or created fresh, as it would be without podmigrate: a pod is never
//! kept from stopping, and never kept from starting, by a question.

use std::time::Duration;

use podmigrate_checkpoint::handoff::{self, Answer, Ask};
use tracing::{info, warn};

use crate::config::ShimConfig;
use crate::identity::ContainerIdentity;

/// How long a Kill waits for the agent at most. The agent bounds a departure by the pod's own
/// termination grace period; this only covers an agent that hangs.
const DEPART_WAIT: Duration = Duration::from_secs(15 * 60);
/// How long a Create waits for the agent at most; the agent bounds its own wait for a
/// departure that is still checkpointing.
const ARRIVE_WAIT: Duration = Duration::from_secs(10 * 60);

/// What a Kill does once the agent has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterKill {
    /// Forward the Kill, as asked.
    Forward,
    /// The pod departed: the agent stopped its containers already.
    Done,
}

/// How long to wait for the agent: at most `most`, and less than the caller (containerd, for
/// kubelet) waits for this request, `caller` when it said (ttrpc's timeout).
fn wait(most: Duration, caller: Option<Duration>) -> Duration {
    match caller {
        Some(caller) => most.min(caller.saturating_sub(Duration::from_secs(2))),
        None => most,
    }
    .max(Duration::from_secs(1))
}

/// Asks, before the Kill of `identity`'s main process with `signal`, whether its pod departs.
/// SIGKILL is never held: it is kubelet's last word, and the agent's own. `caller`: how long the
/// caller waits for the Kill, if it said.
pub fn before_kill(
    config: &ShimConfig,
    identity: &ContainerIdentity,
    signal: u32,
    caller: Option<Duration>,
) -> AfterKill {
    if signal == libc::SIGKILL as u32 || identity.is_sandbox || identity.pod_uid.is_empty() {
        return AfterKill::Forward;
    }
    let question = Ask::Depart {
        namespace: identity.namespace.clone(),
        pod: identity.pod.clone(),
        uid: identity.pod_uid.clone(),
    };
    match handoff::ask(&config.work_dir, &question, wait(DEPART_WAIT, caller)) {
        Ok(Answer::Departed) => {
            info!(container = %identity.describe(), "the pod departed: checkpointed for its replacement, and stopped");
            AfterKill::Done
        }
        Ok(Answer::Proceed { why }) => {
            info!(container = %identity.describe(), %why, signal, "stopping as asked");
            AfterKill::Forward
        }
        Ok(other) => {
            warn!(container = %identity.describe(), answer = ?other, "the agent answered a Kill's question with a Create's; stopping as asked");
            AfterKill::Forward
        }
        Err(e) if e.no_agent() => AfterKill::Forward,
        Err(e) => {
            warn!(container = %identity.describe(), error = %e, "stopping as asked");
            AfterKill::Forward
        }
    }
}

/// What a Create does once the agent has answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtCreate {
    /// Create it (from the departed pod's checkpoint when `identity` now names it).
    Create,
    /// An init container that ran in the departed pod: it ends at once ([`crate::init_skip`]).
    Skip,
}

/// Asks, before the Create of `identity` (a container that names no source), whether its pod
/// replaces a departed one (a container restored before on this node does not ask); if so, `identity` restores that pod's checkpoint, or starts fresh
/// should the restore fail. `caller`: how long the caller waits for the Create, if it said.
pub fn at_create(
    config: &ShimConfig,
    identity: &mut ContainerIdentity,
    caller: Option<Duration>,
) -> AtCreate {
    if identity.is_sandbox || identity.clone_of.is_some() || identity.pod_uid.is_empty() {
        return AtCreate::Create;
    }
    // Restored once already on this node: kubelet restarts it, and it starts fresh.
    if crate::restore::restored_before(&config.work_dir, identity).is_some() {
        return AtCreate::Create;
    }
    let question = Ask::Arrive {
        namespace: identity.namespace.clone(),
        pod: identity.pod.clone(),
        uid: identity.pod_uid.clone(),
        container: identity.container.clone(),
    };
    match handoff::ask(&config.work_dir, &question, wait(ARRIVE_WAIT, caller)) {
        Ok(Answer::Restore { source, departure }) => {
            info!(container = %identity.describe(), departed = %source, %departure, "replaces a departed pod: restoring its checkpoint");
            identity.clone_of = Some(source);
            identity.departure = Some(departure);
            identity.fallback_fresh = true;
        }
        Ok(Answer::Skip { source }) => {
            info!(container = %identity.describe(), departed = %source, "an init container that ran in the departed pod: skipped");
            return AtCreate::Skip;
        }
        Ok(Answer::Proceed { why }) => {
            tracing::debug!(container = %identity.describe(), %why, "created fresh");
        }
        Ok(other) => {
            warn!(container = %identity.describe(), answer = ?other, "the agent answered a Create's question with a Kill's; created fresh");
        }
        Err(e) if e.no_agent() => {}
        Err(e) => {
            warn!(container = %identity.describe(), error = %e, "created fresh");
        }
    }
    AtCreate::Create
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_waited_for_less_than_the_caller_waits() {
        let most = Duration::from_secs(900);
        assert_eq!(wait(most, None), most);
        assert_eq!(
            wait(most, Some(Duration::from_secs(150))),
            Duration::from_secs(148)
        );
        assert_eq!(wait(most, Some(Duration::ZERO)), Duration::from_secs(1));
    }
}
