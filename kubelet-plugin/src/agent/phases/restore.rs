//! Restoring: the clone's shim restores from the committed archives; the source's agent follows
//! the clone through the controller's watch. It runs: the source is retired (migrate mode) and
//! the migration is Running, or, in post-copy, the migration goes on to PostCopy while the
//! rest of the memory streams in. It fails: the source is thawed and the migration rolled back.
//! It makes no progress (its containers' states stay the same) for the progress timeout: the
//! same.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::EventType;
use podmigrate_vocabulary::{
    Mode, Phase, Transfer, FROZEN_AT, FROZEN_MS, PHASE, PROGRESS, TRANSFER_CHOSEN,
};
use serde_json::json;
use tracing::info;

use crate::agent::machine::{
    millis, progress, unix_millis, Agent, AgentError, Ending, Migration, Next,
};
use crate::agent::ports::{Cluster, Runtime, Share};
use crate::controller;
use crate::pod::{annotation, pod_name};

/// What a restored clone's container says when it failed to come up.
pub(in crate::agent) fn clone_failure(pod: &Pod) -> Option<String> {
    const FATAL_WAITING: [&str; 6] = [
        "CreateContainerError",
        "RunContainerError",
        "CreateContainerConfigError",
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
    ];
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() == Some("Failed") {
        return Some(format!(
            "clone pod failed: {}",
            status
                .message
                .clone()
                .or(status.reason.clone())
                .unwrap_or_default()
        ));
    }
    for cs in status.container_statuses.iter().flatten() {
        let state = cs.state.as_ref()?;
        if let Some(waiting) = &state.waiting {
            let reason = waiting.reason.as_deref().unwrap_or_default();
            if FATAL_WAITING.contains(&reason) {
                return Some(format!(
                    "container {}: {reason}: {}",
                    cs.name,
                    waiting.message.as_deref().unwrap_or_default()
                ));
            }
        }
        if let Some(terminated) = &state.terminated {
            return Some(format!(
                "container {} exited with code {}: {}",
                cs.name,
                terminated.exit_code,
                terminated
                    .message
                    .as_deref()
                    .or(terminated.reason.as_deref())
                    .unwrap_or_default()
            ));
        }
    }
    None
}

/// Whether every app container of the clone runs.
pub(in crate::agent) fn clone_running(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    spec.containers.iter().all(|c| {
        statuses
            .into_iter()
            .flatten()
            .any(|cs| cs.name == c.name && cs.state.as_ref().is_some_and(|s| s.running.is_some()))
    })
}

/// A short mark of where the clone stands (its phase, node, and each container's state): a
/// new mark is progress.
pub(in crate::agent) fn status_mark(pod: &Pod) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .hash(&mut hasher);
    if let Some(status) = &pod.status {
        status.phase.hash(&mut hasher);
        for cs in status.container_statuses.iter().flatten() {
            cs.name.hash(&mut hasher);
            serde_json::to_string(&cs.state)
                .unwrap_or_default()
                .hash(&mut hasher);
            cs.restart_count.hash(&mut hasher);
        }
    }
    format!("{:016x}", hasher.finish())
}

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    pub(in crate::agent) async fn restore_step(&self, m: &Migration) -> Result<Next, AgentError> {
        if clone_running(&m.clone) {
            if annotation(&m.clone, TRANSFER_CHOSEN) == Some(Transfer::PostCopy.as_str()) {
                return self.enter_postcopy(m).await;
            }
            if m.mode == Mode::Migrate {
                self.retire_source(m).await?;
            }
            return self.finish(m, Ending::Running).await;
        }
        if let Some(reason) = clone_failure(&m.clone) {
            return match m.mode {
                Mode::Migrate => self.roll_back(m, Ending::RolledBack(reason)).await,
                Mode::Clone => self.finish(m, Ending::Failed(reason)).await,
            };
        }
        let now = unix_millis();
        let mark = status_mark(&m.clone);
        let since = match progress(&m.clone) {
            Some((since, old)) if old == mark => since,
            _ => {
                self.annotate(&m.clone, json!({ PROGRESS: format!("{now}:{mark}") }))
                    .await?;
                now
            }
        };
        let stalled = Duration::from_millis(now.saturating_sub(since));
        if stalled > m.budget.progress {
            let reason = format!(
                "the clone made no progress for {} (progress timeout)",
                humantime::format_duration(Duration::from_secs(stalled.as_secs()))
            );
            return self.roll_back(m, Ending::RolledBack(reason)).await;
        }
        let completion_left = m
            .budget
            .completion
            .saturating_sub(Duration::from_millis(now.saturating_sub(m.started_at)));
        let progress_left = m.budget.progress.saturating_sub(stalled);
        Ok(Next::After(
            completion_left.min(progress_left) + Duration::from_millis(100),
        ))
    }

    /// The clone runs while its memory streams in: the app's downtime ends here, the source
    /// stays frozen until the clone holds every page.
    async fn enter_postcopy(&self, m: &Migration) -> Result<Next, AgentError> {
        let now = unix_millis();
        let frozen_ms = millis(&m.clone, FROZEN_AT).map(|at| now.saturating_sub(at).to_string());
        let clone = self
            .annotate(
                &m.clone,
                json!({
                    PHASE: Phase::PostCopy.as_str(),
                    FROZEN_MS: frozen_ms,
                    PROGRESS: format!("{now}:0"),
                }),
            )
            .await?;
        let note = format!(
            "clone {} runs; the rest of its memory streams from the frozen source",
            pod_name(&clone)
        );
        self.tell(m, EventType::Normal, "PostCopy", "Restore", &note)
            .await;
        Ok(Next::Now)
    }

    /// Migrate mode's last step: the source's processes die (frozen, they die as they thaw,
    /// without running again), its ReplicaSet, if any, takes the clone in its place, then its
    /// pod goes.
    pub(in crate::agent) async fn retire_source(&self, m: &Migration) -> Result<(), AgentError> {
        self.stop_frozen(&m.containers, "stopping the migrated source")
            .await;
        if let Some(source) = &m.source {
            self.hand_over(m, source).await?;
            self.cluster.delete(&m.namespace, &m.source_name).await?;
        }
        Ok(())
    }

    /// The source's ReplicaSet owns the clone from now on, and no longer the source
    /// ([`crate::controller`]).
    async fn hand_over(&self, m: &Migration, source: &Pod) -> Result<(), AgentError> {
        let Some(h) = controller::handover(source) else {
            return Ok(());
        };
        self.cluster.patch(source, h.source_cost).await?;
        self.cluster.patch(&m.clone, h.clone).await?;
        self.cluster.patch(source, h.source_release).await?;
        let note = format!(
            "{} {} owns clone {} in place of {}",
            h.owner.kind,
            h.owner.name,
            pod_name(&m.clone),
            m.source_name
        );
        info!(namespace = %m.namespace, %note, "handed over");
        self.tell(m, EventType::Normal, "HandedOver", "Restore", &note)
            .await;
        Ok(())
    }
}
