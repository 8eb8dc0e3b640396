//! An arrival: a container of a pod on this node is being created, and the pod may take the
//! place of a departed one (see [`crate::controller::place`]). It claims the oldest unclaimed
//! record in its place (a committed one first), waits while that one is still checkpointing,
//! and restores it once committed; a failed one makes it start fresh, with the reason in an
//! Event. Its init containers that run to their end are skipped: they ran in the departed pod,
//! and what they did is in its checkpoint. Where a pod in its place is still terminating without a record yet (a ReplicaSet or a
//! Job makes the replacement as soon as the pod is deleted, maybe before its containers are
//! stopped), it waits for that record, or for that pod to go.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::events::EventType;
use podmigrate_vocabulary::{Departure, REPLACES};
use serde_json::json;
use tracing::{info, warn};

use super::record::{self, Record};
use super::{proceed, Handoff, RECORD_TTL};
use crate::agent::machine::event;
use crate::agent::ports::Cluster;
use crate::controller::{controller_of, place, Place};
use crate::pod::{annotation, is_run_once_init, pod_name};
use crate::policy::not_opted_in;
use podmigrate_checkpoint::handoff::Answer;

/// How often a record still being written is looked at again.
const ARRIVAL_POLL: Duration = Duration::from_millis(500);
/// The longest a Create waits for a departure to be recorded or committed.
const ARRIVAL_WAIT: Duration = Duration::from_secs(5 * 60);

/// Which record to claim: committed ones first, then those still checkpointing, then failed
/// ones (claimed too, so the replacement says why it starts fresh); the oldest first.
fn claim_order(records: &[Record]) -> Vec<&Record> {
    let rank = |r: &Record| match r.state() {
        Some(Departure::Committed) => 0,
        Some(Departure::Checkpointing) => 1,
        _ => 2,
    };
    let mut open: Vec<&Record> = records
        .iter()
        .filter(|r| r.holder().is_none() && r.ages().0 < RECORD_TTL.as_secs() as i64)
        .collect();
    open.sort_by_key(|r| rank(r));
    open
}

impl Handoff {
    pub(super) async fn arrival(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
        container: &str,
    ) -> Answer {
        let agent = &self.agent;
        let (pod, namespace_object) = match self.asked_about(namespace, name, uid).await {
            Ok(read) => read,
            Err(answer) => return answer,
        };
        if let Some(refusal) = not_opted_in(&pod, namespace_object.as_ref(), namespace) {
            return proceed(refusal.to_string());
        }
        let Some(place) = place(&pod) else {
            return proceed(format!("pod {namespace}/{name} replaces no departed pod"));
        };
        let client = &agent.cluster.client;
        let until = Instant::now() + ARRIVAL_WAIT;
        loop {
            let records = match record::in_place(client, namespace, &place).await {
                Ok(records) => records,
                Err(e) => return proceed(format!("reading the departures in its place: {e}")),
            };
            let mut mine = records.iter().find(|r| r.holder() == Some(name)).cloned();
            if mine.is_none() {
                for candidate in claim_order(&records) {
                    match record::claim(client, candidate, name).await {
                        Ok(Some(claimed)) => {
                            mine = Some(claimed);
                            break;
                        }
                        Ok(None) => continue,
                        Err(e) => {
                            return proceed(format!("claiming a departure in its place: {e}"))
                        }
                    }
                }
            }
            match mine.as_ref().map(|r| (r, r.state())) {
                Some((r, Some(Departure::Committed))) => {
                    return self.restore(&pod, &place, r, container).await;
                }
                Some((r, Some(Departure::Failed))) => {
                    let why = format!(
                        "the checkpoint of {} failed: {}",
                        r.departed_pod(),
                        r.reason()
                    );
                    self.mark(&pod, r, EventType::Warning, "StartedFresh", &why)
                        .await;
                    return proceed(why);
                }
                Some(_) => {}
                None => {
                    if !self.departing_in_place(&pod, &place).await {
                        return proceed(format!(
                            "no pod departed from its place ({})",
                            place.describe
                        ));
                    }
                }
            }
            if Instant::now() > until {
                return proceed(format!(
                    "no departure in its place ({}) was committed within {ARRIVAL_WAIT:?}",
                    place.describe
                ));
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return proceed("the agent is stopping"),
                _ = tokio::time::sleep(ARRIVAL_POLL) => {}
            }
        }
    }

    async fn restore(&self, pod: &Pod, place: &Place, r: &Record, container: &str) -> Answer {
        let source = r.departed_pod().to_string();
        let skip = is_run_once_init(pod, container);
        if !skip && !r.containers().iter().any(|c| c == container) {
            return proceed(format!(
                "the departed pod {source} had no container {container}"
            ));
        }
        let note = format!(
            "restores the checkpoint of {source}, which left {} ({})",
            r.lease
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(podmigrate_vocabulary::DEPARTED_FROM_LABEL))
                .map(String::as_str)
                .unwrap_or("its node"),
            place.describe
        );
        self.mark(pod, r, EventType::Normal, "Replacing", &note)
            .await;
        if skip {
            return Answer::Skip { source };
        }
        Answer::Restore {
            source,
            departure: r.departure().to_string(),
        }
    }

    /// Once per pod (its first container to ask): the annotation naming the departed pod and
    /// the Event saying what happens.
    async fn mark(&self, pod: &Pod, r: &Record, kind: EventType, reason: &str, note: &str) {
        if annotation(pod, REPLACES).is_some() {
            return;
        }
        let patch = json!({"metadata": {"annotations": {REPLACES: r.departed_pod()}}});
        if let Err(e) = self.agent.cluster.patch(pod, patch).await {
            warn!(pod = %pod_name(pod), error = %e, "recording what the pod replaces");
        }
        info!(pod = %pod_name(pod), departed = %r.departed_pod(), %note, "{reason}");
        self.agent
            .cluster
            .event(pod, event(kind, reason, "Restore", note))
            .await;
    }

    /// Whether another pod in `place` is still terminating: its departure may not be recorded
    /// yet.
    async fn departing_in_place(&self, pod: &Pod, place: &Place) -> bool {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.agent.cluster.client.clone(), namespace);
        let Ok(pods) = api.list(&ListParams::default()).await else {
            return false;
        };
        pods.items.iter().any(|other| {
            other.metadata.uid != pod.metadata.uid
                && other.metadata.deletion_timestamp.is_some()
                && other.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && controller_of(other).is_some_and(|o| o.uid == place.owner.uid)
                && crate::controller::place(other).is_some_and(|p| p.label == place.label)
        })
    }
}
