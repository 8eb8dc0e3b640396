//! One migration as a phase machine, driven by the agent on the source's node.
//!
//! ```text
//!   Pending ──claim──▶ Checkpointing ──▶ Transferring ──▶ Restoring ──▶ Running
//!      │                    │                 │               │ ▲
//!      │                    │                 │    post-copy  ▼ │ every page arrived
//!      │                    │                 │             PostCopy
//!      └─▶ Failed           └────────────┬────┴───────────────┴─┘
//!        (refused)                       ▼
//!                             RolledBack (the source thawed) / Failed (clone mode)
//! ```
//!
//! The phase is recorded on the clone (annotations, see [`podmigrate_vocabulary`]) with Events
//! on both pods, and each reconciliation advances it at most one step, then asks to be called
//! again: at once, after a delay, or when the clone changes (the controller's watch). So a
//! restarted agent resumes from the recorded phase, and `kubectl describe`, `kubectl migrate`
//! and `podmigrate status` all read the same record. The steps live in [`super::phases`], one
//! file each.
//!
//! The agent is the one owner of the source's freeze and thaw: it pauses the source before
//! the checkpoint, thaws it on every rollback (and in clone mode once the archives are
//! committed), and retires it once the clone runs. The shim's Checkpoint leaves the task as
//! it found it.
//!
//! A clone the agent claims carries its finalizer ([`FINALIZER`]) until the migration has
//! ended and its share files are released: a clone deleted mid-migration is rolled back, never
//! forgotten. Cancelling ([`CANCEL`], `kubectl migrate cancel`) rolls back the same way in any
//! phase before the source is deleted, and then deletes the clone.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Event, EventType};
use podmigrate_vocabulary::{
    Mode, Phase, CANCEL, CLONE_POD, FINALIZER, FROZEN_AT, FROZEN_MS, KEEP_ARCHIVE, MEMORY_BYTES,
    PHASE, PHASE_TIMINGS, PROGRESS, REASON, SOURCE_NODE, STARTED_AT,
};
use serde_json::json;
use tracing::{info, warn};

use super::containerd::{AppContainer, ContainerdError, TaskState};
use super::limits::Limits;
use super::metrics::{Metrics, Outcome};
use super::ports::{Cluster, ClusterError, Runtime, Share};
use super::timeouts::{self, Budget, Timeouts};
use crate::gc::{lease_for, LEASE_MARGIN};
use crate::pod::{annotation, clone_mode, pod_name, timings};
use podmigrate_checkpoint::gc::Lease;

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    /// Node-local work space (`<work>/checkpoints/<clone-uid>` holds what CRIU leaves).
    pub work_dir: std::path::PathBuf,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// How long to wait, before freezing, for the clone to reserve memory for the checkpoint
    /// (see `podmigrate_checkpoint::prefault`); it freezes anyway after that.
    pub prepare_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Containerd(#[from] ContainerdError),
}

/// How soon a release that could not remove a share file tries again.
const RELEASE_RETRY: Duration = Duration::from_secs(2);

/// When to look at a clone again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// At once: a step was taken and the next is due.
    Now,
    /// After a while (queued, waiting for a reservation, or a timeout to check).
    After(Duration),
    /// When the clone changes.
    OnChange,
}

/// Shared by every reconciliation.
pub struct Agent<C, R, S> {
    pub cluster: C,
    pub runtime: R,
    pub share: S,
    pub config: AgentConfig,
    pub metrics: Arc<Metrics>,
    /// Held from counting a clone's siblings and the cluster's migrations to claiming it. The
    /// controller reconciles two clones at once; without this, two clones made in the same
    /// instant could each see the other still Pending and both freeze the source.
    pub(super) claims: tokio::sync::Mutex<()>,
    /// The migrations this agent drives now, by clone uid (the in-flight gauge).
    in_flight: Mutex<BTreeSet<String>>,
}

/// How a migration ended, for the clone's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    Running,
    RolledBack(String),
    Failed(String),
    /// Rolled back on request: the clone is deleted once the record is written.
    Cancelled(String),
}

/// One claimed migration, as read at the start of a reconciliation.
pub(super) struct Migration {
    pub clone: Pod,
    pub source: Option<Pod>,
    pub namespace: String,
    pub source_name: String,
    pub uid: String,
    pub mode: Mode,
    /// The source's app containers by the clone's spec (the same names, by policy).
    pub names: Vec<String>,
    /// Those of them containerd has on this node.
    pub containers: Vec<AppContainer>,
    pub budget: Budget,
    pub started_at: u64,
}

impl Migration {
    /// The phase recorded on the clone when this reconciliation read it.
    pub(super) fn clone_phase(&self) -> Option<Phase> {
        annotation(&self.clone, PHASE).and_then(Phase::parse)
    }

    /// A migration that cannot go on, with enough of it read to end it: nothing is frozen by
    /// this agent, and the budget no longer counts.
    pub(super) fn ending(clone: Pod, source: Option<Pod>) -> Migration {
        Migration {
            source,
            namespace: clone.metadata.namespace.clone().unwrap_or_default(),
            source_name: annotation(&clone, CLONE_POD)
                .unwrap_or_default()
                .to_string(),
            uid: clone.metadata.uid.clone().unwrap_or_default(),
            mode: Mode::Migrate,
            names: spec_names(&clone),
            containers: Vec::new(),
            budget: Budget {
                completion: Duration::ZERO,
                progress: Duration::ZERO,
                why: String::new(),
            },
            started_at: unix_millis(),
            clone,
        }
    }
}

pub(super) fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub(super) fn millis(pod: &Pod, key: &str) -> Option<u64> {
    annotation(pod, key).and_then(|v| v.parse().ok())
}

/// The progress mark and when it was reached.
pub(super) fn progress(pod: &Pod) -> Option<(u64, &str)> {
    let (ms, mark) = annotation(pod, PROGRESS)?.split_once(':')?;
    Some((ms.parse().ok()?, mark))
}

pub(super) fn has_finalizer(pod: &Pod) -> bool {
    pod.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// The finalizers of `pod` with ours added (`true`) or removed.
pub(super) fn finalizers_with(pod: &Pod, ours: bool) -> Vec<String> {
    let mut list: Vec<String> = pod
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if ours {
        list.push(FINALIZER.to_string());
    }
    list
}

/// Why the migration must stop now on request, if it must: a cancel, or the clone deleted.
fn stop_request(clone: &Pod) -> Option<String> {
    if let Some(who) = annotation(clone, CANCEL) {
        let who = if who.is_empty() { "someone" } else { who };
        return Some(format!("cancelled by {who}"));
    }
    clone
        .metadata
        .deletion_timestamp
        .is_some()
        .then(|| "the clone pod was deleted".to_string())
}

pub(super) fn event(kind: EventType, reason: &str, action: &str, note: &str) -> Event {
    Event {
        type_: kind,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: action.to_string(),
        secondary: None,
    }
}

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    pub fn new(
        cluster: C,
        runtime: R,
        share: S,
        config: AgentConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Agent {
            cluster,
            runtime,
            share,
            config,
            metrics,
            claims: tokio::sync::Mutex::new(()),
            in_flight: Mutex::new(BTreeSet::new()),
        }
    }

    /// Looks at one clone and takes at most one step.
    pub async fn reconcile(&self, clone: &Pod) -> Result<Next, AgentError> {
        let namespace = clone.metadata.namespace.clone().unwrap_or_default();
        let name = clone.metadata.name.clone().unwrap_or_default();
        // The controller hands over its cache's copy, which can trail our own last patch:
        // decide on the API server's current object.
        let Some(clone) = self.cluster.pod(&namespace, &name).await? else {
            return Ok(Next::OnChange);
        };
        let ours = annotation(&clone, SOURCE_NODE) == Some(self.config.node_name.as_str());
        match annotation(&clone, PHASE).and_then(Phase::parse) {
            Some(phase) if ours && !phase.is_final() && phase != Phase::Pending => {
                self.advance(clone, phase).await
            }
            Some(phase) if ours && phase.is_final() && has_finalizer(&clone) => {
                self.release(&clone).await
            }
            _ => self.decide(&clone).await,
        }
    }

    /// The next step of a claimed migration.
    pub(super) async fn advance(&self, clone: Pod, phase: Phase) -> Result<Next, AgentError> {
        let m = match self.migration(clone).await? {
            Ok(m) => m,
            Err((clone, reason)) => {
                let m = Migration::ending(clone, None);
                return self.finish(&m, Ending::Failed(reason)).await;
            }
        };
        // A migration this agent did not claim or step before: a predecessor did.
        if self.track(&m.uid) {
            info!(clone = %pod_name(&m.clone), %phase, "resuming after an agent restart");
        }
        if let Some(reason) = stop_request(&m.clone) {
            return self.roll_back(&m, Ending::Cancelled(reason)).await;
        }
        let elapsed = Duration::from_millis(unix_millis().saturating_sub(m.started_at));
        if elapsed > m.budget.completion {
            let reason = format!(
                "the migration did not complete within {} ({}) and was stopped in {phase}",
                humantime::format_duration(Duration::from_secs(m.budget.completion.as_secs())),
                m.budget.why
            );
            return self.roll_back(&m, Ending::RolledBack(reason)).await;
        }
        match phase {
            Phase::Checkpointing => self.checkpoint_step(&m).await,
            Phase::Transferring => self.transfer_step(&m).await,
            Phase::PostCopy => self.postcopy_step(&m).await,
            _ => self.restore_step(&m).await,
        }
    }

    /// Reads what a step needs; `Err` when the migration cannot go on (with why).
    async fn migration(&self, clone: Pod) -> Result<Result<Migration, (Pod, String)>, AgentError> {
        let namespace = clone.metadata.namespace.clone().unwrap_or_default();
        let Some(source_name) = annotation(&clone, CLONE_POD).map(str::to_string) else {
            return Ok(Err((
                clone,
                "the clone no longer names its source".to_string(),
            )));
        };
        let source = self.cluster.pod(&namespace, &source_name).await?;
        let names = spec_names(&clone);
        let containers = match &source {
            Some(_) => {
                let found = self
                    .runtime
                    .app_containers(&namespace, &source_name)
                    .await?;
                names
                    .iter()
                    .filter_map(|n| found.iter().find(|c| &c.name == n).cloned())
                    .collect()
            }
            None => Vec::new(),
        };
        let memory = millis(&clone, MEMORY_BYTES).unwrap_or(0);
        let budget = match timeouts::budget(&self.config.timeouts, &clone, memory) {
            Ok(budget) => budget,
            Err(reason) => return Ok(Err((clone, reason))),
        };
        Ok(Ok(Migration {
            source,
            namespace,
            source_name,
            uid: clone.metadata.uid.clone().unwrap_or_default(),
            mode: clone_mode(&clone).unwrap_or(Mode::Migrate),
            names,
            containers,
            budget,
            started_at: millis(&clone, STARTED_AT).unwrap_or_else(unix_millis),
            clone,
        }))
    }

    /// The lease of migration `m`: GC leaves the source's share directory and this node's
    /// work unit alone while it lasts.
    pub(super) fn lease(&self, m: &Migration) -> Lease {
        let holder = format!(
            "agent on node {} for clone {}",
            self.config.node_name,
            pod_name(&m.clone)
        );
        lease_for(holder, &m.uid, m.budget.completion + LEASE_MARGIN)
    }

    /// Merge-patches annotations on the clone. `null` removes one.
    pub(super) async fn annotate(
        &self,
        clone: &Pod,
        annotations: serde_json::Value,
    ) -> Result<Pod, AgentError> {
        Ok(self
            .cluster
            .patch(clone, json!({ "metadata": { "annotations": annotations } }))
            .await?)
    }

    /// Events on the clone and, when it still exists, the source.
    pub(super) async fn tell(
        &self,
        m: &Migration,
        kind: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        self.cluster
            .event(&m.clone, event(kind, reason, action, note))
            .await;
        if let Some(source) = &m.source {
            self.cluster
                .event(source, event(kind, reason, action, note))
                .await;
        }
    }

    /// Stops frozen containers for good: killed while frozen, they die as they thaw, without
    /// running again. Best effort: each failure is logged (as `what`) and the rest still stop.
    pub(super) async fn stop_frozen(&self, containers: &[AppContainer], what: &str) {
        for c in containers {
            if let Err(e) = self.runtime.kill(&c.id, libc::SIGKILL).await {
                warn!(container = %c.name, error = %e, "{what}");
            }
            let _ = self.runtime.resume(&c.id).await;
        }
    }

    /// Where CRIU leaves container `container`'s images in the checkpoint of migration (or
    /// departure) `uid`: `<work>/checkpoints/<uid>/<container>`, emptied, its parent made.
    pub(super) fn image_dir(&self, uid: &str, container: &str) -> std::path::PathBuf {
        let image = self.checkpoints_of(uid).join(container);
        let _ = std::fs::remove_dir_all(&image);
        if let Some(parent) = image.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        image
    }

    /// Removes what CRIU left for migration (or departure) `uid`.
    pub(super) fn discard_images(&self, uid: &str) {
        let _ = std::fs::remove_dir_all(self.checkpoints_of(uid));
    }

    fn checkpoints_of(&self, uid: &str) -> std::path::PathBuf {
        self.config.work_dir.join("checkpoints").join(uid)
    }

    /// Thaws the source's containers, best effort: each failure is logged and the rest still
    /// thaw. Only a paused task is resumed.
    pub(super) async fn thaw(&self, containers: &[AppContainer]) {
        for c in containers {
            match self.runtime.task_state(&c.id).await {
                Ok(TaskState::Paused) => {
                    if let Err(e) = self.runtime.resume(&c.id).await {
                        warn!(container = %c.name, error = %e, "resuming the source");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(container = %c.name, error = %e, "reading the source's state"),
            }
        }
    }

    /// Stops the migration where it stands: the source is thawed (it holds everything), then
    /// the migration ends with `ending`.
    pub(super) async fn roll_back(
        &self,
        m: &Migration,
        ending: Ending,
    ) -> Result<Next, AgentError> {
        self.thaw(&m.containers).await;
        let ending = match ending {
            Ending::RolledBack(reason) if m.source.is_some() => {
                Ending::RolledBack(format!("{reason}; the source was resumed"))
            }
            Ending::Cancelled(reason) if m.source.is_some() => {
                Ending::Cancelled(format!("{reason}; the source was resumed"))
            }
            other => other,
        };
        self.finish(m, ending).await
    }

    /// Writes the ending on the clone, emits Events, releases the share and the finalizer.
    pub(super) async fn finish(&self, m: &Migration, ending: Ending) -> Result<Next, AgentError> {
        let clone_name = pod_name(&m.clone);
        let total_ms = unix_millis().saturating_sub(m.started_at);
        let (phase, reason) = match &ending {
            Ending::Running => (Phase::Running, None),
            Ending::RolledBack(r) | Ending::Cancelled(r) => (Phase::RolledBack, Some(r.clone())),
            Ending::Failed(r) => (Phase::Failed, Some(r.clone())),
        };
        let mut annotations = json!({ PHASE: phase.as_str(), REASON: reason });
        let frozen_at = millis(&m.clone, FROZEN_AT);
        // Post-copy recorded its freeze when the clone began to run, before its memory moved.
        let postcopy_frozen =
            millis(&m.clone, FROZEN_MS).filter(|_| m.clone_phase() == Some(Phase::PostCopy));
        if let (Ending::Running, Mode::Migrate, Some(at), None) =
            (&ending, m.mode, frozen_at, postcopy_frozen)
        {
            annotations[FROZEN_MS] = json!(unix_millis().saturating_sub(at).to_string());
        }
        if let (Some(at), Some(checkpointing)) =
            (frozen_at, timings(&m.clone).get("Checkpointing").copied())
        {
            let since_freeze = unix_millis().saturating_sub(at);
            let resumed = postcopy_frozen.unwrap_or(since_freeze);
            let restoring = resumed.saturating_sub(checkpointing);
            self.metrics
                .record_phase(Phase::Restoring, restoring as f64 / 1000.0);
            let mut phase_timings = json!({
                "Checkpointing": checkpointing,
                "Restoring": restoring,
            });
            if postcopy_frozen.is_some() {
                phase_timings["PostCopy"] = json!(since_freeze.saturating_sub(resumed));
            }
            annotations[PHASE_TIMINGS] = json!(phase_timings.to_string());
        }
        let clone = self.annotate(&m.clone, annotations).await?;
        match &ending {
            Ending::Running => {
                let note = format!(
                    "clone {clone_name} is running, {:.1}s after the migration started",
                    total_ms as f64 / 1000.0
                );
                self.tell(m, EventType::Normal, "Migrated", "Restore", &note)
                    .await;
                self.metrics.record_outcome(Outcome::Succeeded);
                info!(clone = %clone_name, total_ms, frozen_ms = ?frozen_at.map(|at| unix_millis().saturating_sub(at)), "migration succeeded");
            }
            Ending::Cancelled(reason) => {
                self.tell(m, EventType::Warning, "Cancelled", "Cancel", reason)
                    .await;
                self.metrics.record_outcome(Outcome::RolledBack);
                warn!(clone = %clone_name, %reason, "migration cancelled");
            }
            Ending::RolledBack(reason) | Ending::Failed(reason) => {
                self.tell(m, EventType::Warning, phase.as_str(), "Migrate", reason)
                    .await;
                self.metrics.record_outcome(if phase == Phase::RolledBack {
                    Outcome::RolledBack
                } else {
                    Outcome::Failed
                });
                warn!(clone = %clone_name, %reason, %phase, "migration did not complete");
            }
        }
        if matches!(ending, Ending::Cancelled(_)) {
            self.cluster
                .delete(
                    &m.namespace,
                    m.clone.metadata.name.as_deref().unwrap_or_default(),
                )
                .await?;
        }
        self.release(&clone).await
    }

    /// The last step of every migration, ended or interrupted after it ended: its files on
    /// this node and the share go (the archives stay pinned when kept), then the finalizer.
    /// A share file that cannot go yet (on SMB, one the clone's shim still holds open) keeps
    /// the finalizer, and the release is tried again.
    pub(super) async fn release(&self, clone: &Pod) -> Result<Next, AgentError> {
        let namespace = clone.metadata.namespace.clone().unwrap_or_default();
        let uid = clone.metadata.uid.clone().unwrap_or_default();
        // Only a claimed migration (it carries the finalizer) has share files of its own: an
        // unclaimed one must not touch the archives an earlier migration of its source kept.
        let claimed = has_finalizer(clone);
        if let Some(source) = annotation(clone, CLONE_POD).filter(|_| claimed) {
            let keep = annotation(clone, KEEP_ARCHIVE) == Some("true");
            if let Err(e) = self
                .share
                .release(&namespace, source, &uid, &spec_names(clone), keep)
            {
                warn!(clone = %pod_name(clone), error = %e, "releasing the migration's share files; trying again");
                return Ok(Next::After(RELEASE_RETRY));
            }
        }
        if claimed && !uid.is_empty() {
            self.discard_images(&uid);
        }
        if claimed {
            let patch = json!({ "metadata": { "finalizers": finalizers_with(clone, false) } });
            match self.cluster.patch(clone, patch).await {
                Ok(_) => {}
                // Deleted meanwhile, finalizer and all: nothing is left to release.
                Err(ClusterError::Api {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.in_flight.lock().expect("in-flight set").remove(&uid);
        self.update_gauge();
        Ok(Next::OnChange)
    }

    /// Counts a migration as driven by this agent; true when it was not yet.
    pub(super) fn track(&self, uid: &str) -> bool {
        let added = self
            .in_flight
            .lock()
            .expect("in-flight set")
            .insert(uid.to_string());
        self.update_gauge();
        added
    }

    fn update_gauge(&self) {
        let n = self.in_flight.lock().expect("in-flight set").len();
        self.metrics.set_in_flight(n as i64);
    }
}

/// The app container names of a pod's spec.
pub(super) fn spec_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
