//! A departure: a pod on this node is being deleted (or evicted) and one of its containers is
//! being stopped. If it departs, every container that runs for the pod's life (its app
//! containers and native sidecars) is frozen at one instant, checkpointed onto
//! the share (stop-and-copy: the pod is going, nothing could serve its memory later), and
//! stopped without running again; the record then says Committed, and the replacement
//! restores it. Everything must fit in the pod's grace period: what does not, or fails, is
//! thawed and stopped as Kubernetes would stop it, and the record says Failed, with the reason.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::events::EventType;
use podmigrate_vocabulary::{Departure, Phase, PHASE};
use tracing::{info, warn};

use super::replaced::replaced;
use super::{proceed, record, Handoff, RECORD_TTL};
use crate::agent::containerd::{AppContainer, TaskState};
use crate::agent::machine::event;
use crate::agent::ports::{Cluster, Share};
use crate::controller::{place, Place};
use crate::gc::lease_for;
use crate::pod::{annotation, long_running, pod_name};
use crate::policy::not_opted_in;
use podmigrate_checkpoint::handoff::Answer;

/// Less than this left of the grace period is not worth a freeze. (A departure that fails at
/// the very end of the grace period costs no stop its own: containerd gives the stop signal its
/// full timeout once the Kill is let through.)
const LEAST_BUDGET: Duration = Duration::from_secs(1);

/// Why `pod` does not depart, or its place among its controller's pods if it does.
pub(super) fn departs(
    pod: &Pod,
    namespace: Option<&Namespace>,
    namespace_name: &str,
) -> Result<Place, String> {
    let id = pod_name(pod);
    if pod.metadata.deletion_timestamp.is_none() {
        return Err(format!(
            "pod {id} is not being deleted (kubelet restarts or stops the container itself)"
        ));
    }
    if pod.metadata.deletion_grace_period_seconds == Some(0) {
        return Err(format!("pod {id} is deleted without a grace period"));
    }
    if let Some(refusal) = not_opted_in(pod, namespace, namespace_name) {
        return Err(refusal.to_string());
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if phase != Some("Running") {
        return Err(format!(
            "pod {id} is {}, not Running",
            phase.unwrap_or("in no phase")
        ));
    }
    place(pod).ok_or_else(|| {
        format!(
            "nothing replaces pod {id} with a pod that could take its checkpoint (only a \
             StatefulSet, a ReplicaSet or an Indexed Job does)"
        )
    })
}

/// What is left of `pod`'s grace period: its deletion timestamp is when kubelet's grace ends.
fn grace_left(pod: &Pod) -> Duration {
    let Some(deadline) = pod.metadata.deletion_timestamp.as_ref() else {
        return Duration::ZERO;
    };
    let left = deadline
        .0
        .duration_since(k8s_openapi::jiff::Timestamp::now());
    Duration::try_from(left).unwrap_or(Duration::ZERO)
}

impl Handoff {
    pub(super) async fn departure(&self, namespace: &str, name: &str, uid: &str) -> Answer {
        let agent = &self.agent;
        let (pod, namespace_object) = match self.asked_about(namespace, name, uid).await {
            Ok(read) => read,
            Err(answer) => return answer,
        };
        let place = match departs(&pod, namespace_object.as_ref(), namespace) {
            Ok(place) => place,
            Err(why) => return proceed(why),
        };
        // A migration of the pod froze it, or may at any moment: it ends with the pod.
        if let Ok(clones) = agent.cluster.clones(Some((namespace, name))).await {
            let in_flight = clones.iter().any(|c| {
                annotation(c, PHASE)
                    .and_then(Phase::parse)
                    .is_some_and(|p| !p.is_final())
            });
            if in_flight {
                return proceed(format!(
                    "pod {namespace}/{name} is being migrated; the migration ends with it"
                ));
            }
        }
        if let Err(why) = replaced(&agent.cluster.client, &pod, &place).await {
            return proceed(why);
        }
        let budget = grace_left(&pod);
        if budget < LEAST_BUDGET {
            return proceed(format!(
                "pod {namespace}/{name} has {budget:?} of its grace period left, too little for a checkpoint"
            ));
        }
        let deadline = Instant::now() + budget;
        let names = long_running(&pod);
        let containers = match self.running_containers(namespace, name, &names).await {
            Ok(containers) => containers,
            Err(why) => return proceed(why),
        };
        let client = &agent.cluster.client;
        if let Err(e) = record::open(client, &pod, &place, &agent.config.node_name, &names).await {
            return proceed(format!(
                "recording the departure of pod {namespace}/{name}: {e}"
            ));
        }
        info!(pod = %pod_name(&pod), place = %place.describe, ?budget, "departing: checkpointing before the pod stops");
        let note = format!(
            "checkpointing before the pod stops, so that the pod {} makes in its place ({}) restores it",
            place.owner.kind, place.describe
        );
        agent
            .cluster
            .event(
                &pod,
                event(EventType::Normal, "Departing", "Checkpoint", &note),
            )
            .await;
        let started = Instant::now();
        let outcome = self.checkpoint(&pod, &containers, &names, deadline).await;
        agent.discard_images(uid);
        match outcome {
            Ok(()) => {
                agent
                    .stop_frozen(&containers, "stopping the departed pod")
                    .await;
                let ms = started.elapsed().as_millis();
                if let Err(e) =
                    record::set(client, namespace, uid, Departure::Committed, None).await
                {
                    warn!(pod = %pod_name(&pod), error = %e, "recording the committed departure");
                }
                let note = format!(
                    "checkpointed in {ms} ms and stopped; the pod that takes its place restores it"
                );
                info!(pod = %pod_name(&pod), ms, "departed");
                agent
                    .cluster
                    .event(
                        &pod,
                        event(EventType::Normal, "Departed", "Checkpoint", &note),
                    )
                    .await;
                Answer::Departed
            }
            Err(reason) => {
                agent.thaw(&containers).await;
                if let Err(e) = agent.share.release(namespace, name, uid, &names, false) {
                    warn!(pod = %pod_name(&pod), error = %e, "removing a failed departure's archives");
                }
                if let Err(e) =
                    record::set(client, namespace, uid, Departure::Failed, Some(&reason)).await
                {
                    warn!(pod = %pod_name(&pod), error = %e, "recording the failed departure");
                }
                let note = format!(
                    "{reason}; the pod stops as usual and the pod that takes its place starts fresh"
                );
                warn!(pod = %pod_name(&pod), %reason, "the departure failed");
                agent
                    .cluster
                    .event(
                        &pod,
                        event(EventType::Warning, "DepartureFailed", "Checkpoint", &note),
                    )
                    .await;
                proceed(note)
            }
        }
    }

    /// The pod's running container for each name in its spec, or why not every one runs.
    async fn running_containers(
        &self,
        namespace: &str,
        name: &str,
        names: &[String],
    ) -> Result<Vec<AppContainer>, String> {
        let runtime = &self.agent.runtime;
        let listed = runtime
            .app_containers(namespace, name)
            .await
            .map_err(|e| format!("listing the containers of pod {namespace}/{name}: {e}"))?;
        let mut running = Vec::new();
        for wanted in names {
            let mut found = None;
            for c in listed.iter().filter(|c| &c.name == wanted) {
                if matches!(runtime.task_state(&c.id).await, Ok(TaskState::Running)) {
                    found = Some(c.clone());
                }
            }
            running.push(found.ok_or_else(|| {
                format!("container {wanted} of pod {namespace}/{name} is not running")
            })?);
        }
        Ok(running)
    }

    /// Freezes every container, then checkpoints each onto the share, by `deadline`.
    async fn checkpoint(
        &self,
        pod: &Pod,
        containers: &[AppContainer],
        names: &[String],
        deadline: Instant,
    ) -> Result<(), String> {
        let agent = &self.agent;
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        agent.share.clear_archives(namespace, name, names);
        // The archives are made for this departure (the lease names it), and GC leaves them
        // until a replacement has taken them or the record's time is up.
        let holder = format!(
            "agent on node {} for the departure of {}",
            agent.config.node_name,
            pod_name(pod)
        );
        agent
            .share
            .write_lease(namespace, name, uid, &lease_for(holder, uid, RECORD_TTL))
            .map_err(|e| format!("writing the departure's lease on the share: {e}"))?;
        for c in containers {
            agent
                .runtime
                .pause(&c.id)
                .await
                .map_err(|e| format!("freezing container {}: {e}", c.name))?;
        }
        for c in containers {
            let image = agent.image_dir(uid, &c.name);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the grace period of pod {} ran out before container {} was checkpointed",
                    pod_name(pod),
                    c.name
                ));
            }
            agent
                .runtime
                .checkpoint(&c.id, &image, false, left)
                .await
                .map_err(|e| format!("checkpointing container {}: {e}", c.name))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra: serde_json::Value) -> Pod {
        let mut pod = json!({
            "metadata": {
                "name": "web-0", "namespace": "shop", "uid": "u",
                "labels": {"podmigrate.io/migratable": "true", "controller-revision-hash": "web-5c7b9"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "web",
                                     "uid": "s", "controller": true}],
                "deletionTimestamp": "2026-12-05T10:00:00Z",
                "deletionGracePeriodSeconds": 30,
            },
            "spec": {"containers": [{"name": "app", "image": "counter"}]},
            "status": {"phase": "Running"},
        });
        merge(&mut pod, extra);
        serde_json::from_value(pod).unwrap()
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(into), serde_json::Value::Object(from)) => {
                for (k, v) in from {
                    if v.is_null() {
                        into.remove(&k);
                    } else {
                        merge(into.entry(k).or_insert(serde_json::Value::Null), v);
                    }
                }
            }
            (into, from) => *into = from,
        }
    }

    #[test]
    fn only_an_opted_in_running_pod_being_deleted_whose_controller_replaces_it_departs() {
        let place = departs(&pod(json!({})), None, "shop").unwrap();
        assert_eq!(place.owner.kind, "StatefulSet");
        let why = |extra| departs(&pod(extra), None, "shop").unwrap_err();
        assert!(why(json!({"metadata": {"deletionTimestamp": null}})).contains("not being deleted"));
        assert!(why(json!({"metadata": {"deletionGracePeriodSeconds": 0}}))
            .contains("without a grace period"));
        assert!(
            why(json!({"metadata": {"labels": {"podmigrate.io/migratable": null}}}))
                .contains("migratable"),
            "{}",
            why(json!({"metadata": {"labels": {"podmigrate.io/migratable": null}}}))
        );
        assert!(why(json!({"status": {"phase": "Pending"}})).contains("Pending, not Running"));
        assert!(why(
            json!({"metadata": {"ownerReferences": [{"apiVersion": "apps/v1",
            "kind": "DaemonSet", "name": "d", "uid": "d", "controller": true}]}})
        )
        .contains("nothing replaces pod shop/web-0"));
    }

    #[test]
    fn the_budget_is_what_is_left_of_the_grace_period() {
        let soon = k8s_openapi::jiff::Timestamp::now() + std::time::Duration::from_secs(20);
        let pod = pod(json!({"metadata": {"deletionTimestamp": soon.to_string()}}));
        let left = grace_left(&pod);
        assert!(
            left > Duration::from_secs(18) && left <= Duration::from_secs(20),
            "{left:?}"
        );
        assert_eq!(grace_left(&super::tests::pod(json!({}))), Duration::ZERO);
    }
}
