//! Pending: decide ([`crate::policy`]), then claim the migration, queue it behind the
//! limits, or refuse it. A claim records the phase Checkpointing, the budget's inputs and this
//! node on the clone with its finalizer, writes the lease, and announces the memory the clone
//! should reserve. Nothing is frozen yet.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::EventType;
use podmigrate_vocabulary::{
    Mode, Phase, CANCEL, FROZEN_AT, MEMORY_BYTES, PAGES, PHASE, PROGRESS, REASON, SOURCE_NODE,
    STARTED_AT, TRANSFER_CHOSEN,
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::agent::limits::queued_reason;
use crate::agent::machine::{
    event, finalizers_with, spec_names, unix_millis, Agent, AgentError, Ending, Migration, Next,
};
use crate::agent::metrics::Outcome;
use crate::agent::ports::{Cluster, ClusterError, Runtime, Share};
use crate::agent::timeouts;
use crate::pod::{annotation, clone_reference, is_valid_pod_name, pod_name};
use crate::policy::{self, Decision};

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    /// A clone not (or no longer) claimed by this node: what the policy says.
    pub(in crate::agent) async fn decide(&self, clone: &Pod) -> Result<Next, AgentError> {
        let namespace = clone.metadata.namespace.clone().unwrap_or_default();
        let guard = self.claims.lock().await;
        let reference = clone_reference(clone);
        let source_name = match &reference {
            Ok(Some(r)) => Some(r.source.clone()),
            _ => None,
        };
        let source = match &source_name {
            Some(name) => self.cluster.pod(&namespace, name).await?,
            None => None,
        };
        let ns_object = self.cluster.namespace(&namespace).await?;
        let siblings = match &source_name {
            Some(name) if is_valid_pod_name(name) => {
                self.cluster.clones(Some((&namespace, name))).await?
            }
            _ => Vec::new(),
        };
        let decision = policy::decide_with_reference(
            clone,
            reference,
            source.as_ref(),
            ns_object.as_ref(),
            &siblings,
            &self.config.node_name,
        );
        match decision {
            Decision::NotMine { .. } => Ok(Next::OnChange),
            Decision::Wait { reason } => {
                debug!(clone = %pod_name(clone), %reason, "waiting");
                Ok(match reason {
                    policy::WaitReason::Finished { .. } | policy::WaitReason::Restoring { .. } => {
                        Next::OnChange
                    }
                    _ => Next::After(Duration::from_secs(2)),
                })
            }
            Decision::Refuse { reason } => {
                drop(guard);
                self.refuse(clone, source.as_ref(), &reason).await?;
                Ok(Next::OnChange)
            }
            Decision::Resume { phase, .. } => {
                drop(guard);
                self.advance(clone.clone(), phase).await
            }
            // Cancelled before it was claimed: nothing is frozen, and the CLI deletes it.
            Decision::Checkpoint { .. } if annotation(clone, CANCEL).is_some() => {
                Ok(Next::OnChange)
            }
            Decision::Checkpoint {
                containers, mode, ..
            } => {
                let source = source.expect("a checkpoint decision has a source");
                let next = self.claim(clone, &source, &containers, mode).await;
                drop(guard);
                next
            }
        }
    }

    async fn refuse(
        &self,
        clone: &Pod,
        source: Option<&Pod>,
        reason: &policy::Refusal,
    ) -> Result<(), AgentError> {
        warn!(clone = %pod_name(clone), %reason, "refusing clone");
        self.annotate(
            clone,
            json!({ PHASE: Phase::Failed.as_str(), REASON: reason.to_string() }),
        )
        .await?;
        let note = reason.to_string();
        let refused = || event(EventType::Warning, reason.event_reason(), "Refuse", &note);
        self.cluster.event(clone, refused()).await;
        if let Some(source) = source {
            self.cluster.event(source, refused()).await;
        }
        self.metrics.record_outcome(Outcome::Refused);
        Ok(())
    }

    /// Claims the migration (under the claims lock), or queues it behind a limit.
    async fn claim(
        &self,
        clone: &Pod,
        source: &Pod,
        containers: &[String],
        mode: Mode,
    ) -> Result<Next, AgentError> {
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let source_name = source.metadata.name.clone().unwrap_or_default();
        let every_clone = self.cluster.clones(None).await?;
        if let Some(reason) = queued_reason(
            clone,
            &every_clone,
            &self.config.node_name,
            &self.config.limits,
        ) {
            // Announced once: a retry that finds the same limit adds no Event.
            if annotation(clone, REASON) != Some(reason.as_str()) {
                info!(clone = %pod_name(clone), %reason, "queued");
                self.annotate(clone, json!({ REASON: reason })).await?;
                self.cluster
                    .event(
                        clone,
                        event(EventType::Normal, "Queued", "Checkpoint", &reason),
                    )
                    .await;
            }
            return Ok(Next::After(Duration::from_secs(2)));
        }

        let found = self
            .runtime
            .app_containers(&namespace, &source_name)
            .await?;
        let mut targets = Vec::new();
        for name in containers {
            match found.iter().find(|c| &c.name == name) {
                Some(c) => targets.push(c.clone()),
                None => {
                    let reason = format!(
                        "container {name} of {namespace}/{source_name} is not known to containerd on node {}",
                        self.config.node_name
                    );
                    return self.end_unclaimed(clone, source, reason).await;
                }
            }
        }
        let mut memory = Vec::new();
        for c in &targets {
            memory.push(self.runtime.memory(&c.id).await);
        }
        let total: u64 = memory.iter().flatten().sum();
        let budget = match timeouts::budget(&self.config.timeouts, clone, total) {
            Ok(budget) => budget,
            Err(reason) => return self.end_unclaimed(clone, source, reason).await,
        };

        // Claim it: only one agent, once. The resourceVersion makes the patch fail if the
        // clone changed since it was read (another reconcile, or a restarted agent, got there).
        let now = unix_millis();
        let claim = self
            .cluster
            .patch(
                clone,
                json!({ "metadata": {
                    "resourceVersion": clone.metadata.resource_version,
                    "finalizers": finalizers_with(clone, true),
                    "annotations": {
                        PHASE: Phase::Checkpointing.as_str(),
                        SOURCE_NODE: self.config.node_name,
                        STARTED_AT: now.to_string(),
                        MEMORY_BYTES: total.to_string(),
                        PROGRESS: format!("{now}:0"),
                        FROZEN_AT: null,
                        TRANSFER_CHOSEN: null,
                        PAGES: null,
                        REASON: null,
                    }
                }}),
            )
            .await;
        let clone = match claim {
            Ok(claimed) => claimed,
            Err(ClusterError::Conflict { .. }) => return Ok(Next::Now),
            Err(e) => return Err(e.into()),
        };
        self.track(clone.metadata.uid.as_deref().unwrap_or_default());
        info!(clone = %pod_name(&clone), source = %pod_name(source), ?mode, memory_bytes = total, completion_timeout = ?budget.completion, progress_timeout = ?budget.progress, "migration started");
        let m = Migration {
            uid: clone.metadata.uid.clone().unwrap_or_default(),
            names: spec_names(&clone),
            clone,
            source: Some(source.clone()),
            namespace: namespace.clone(),
            source_name: source_name.clone(),
            mode,
            containers: targets.clone(),
            budget: budget.clone(),
            started_at: now,
        };
        let note = format!(
            "checkpointing {namespace}/{source_name} on node {} for clone {} ({})",
            self.config.node_name,
            m.clone.metadata.name.as_deref().unwrap_or_default(),
            mode.as_str()
        );
        self.tell(&m, EventType::Normal, "Checkpointing", "Checkpoint", &note)
            .await;

        // GC leaves the source's share directory and our work unit alone while this lease
        // lasts; it outlives the completion timeout, so only a crashed agent's lease expires.
        let lease = self.lease(&m);
        if let Err(reason) = self
            .share
            .write_lease(&namespace, &source_name, &m.uid, &lease)
        {
            return self
                .finish(&m, Ending::Failed(format!("{reason}; nothing was frozen")))
                .await;
        }
        // Old archives of this source must not be mistaken for this migration's.
        self.share
            .clear_archives(&namespace, &source_name, &m.names);
        // Every container is announced (the clone's answer says whether it can take post-copy);
        // one whose memory is unknown gets no reservation.
        let postcopy = super::checkpoint::asks_for_postcopy(&m.clone, mode);
        for (c, bytes) in targets.iter().zip(&memory) {
            if let Err(e) = self.share.announce(
                &namespace,
                &source_name,
                &c.name,
                &m.uid,
                (bytes.unwrap_or(0), postcopy),
            ) {
                warn!(clone = %pod_name(&m.clone), error = %e, "announcing the checkpoint's size");
            }
        }
        Ok(Next::Now)
    }

    /// Ends a migration that was never claimed (nothing frozen, no finalizer).
    async fn end_unclaimed(
        &self,
        clone: &Pod,
        source: &Pod,
        reason: String,
    ) -> Result<Next, AgentError> {
        let m = Migration::ending(clone.clone(), Some(source.clone()));
        self.finish(&m, Ending::Failed(reason)).await
    }
}
