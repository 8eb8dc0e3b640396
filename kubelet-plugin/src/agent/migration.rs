//! One migration, driven by the agent on the source's node: claim the clone, freeze the
//! source, checkpoint every app container through our shim, follow the clone until it runs,
//! then delete the source (migrate mode) or let it run on (clone mode). Anything failing after
//! the freeze thaws the source where it stands: no state is lost.
//!
//! Progress is written on the clone as annotations (see [`podmigrate_vocabulary`]) and as Events on both
//! pods, so `kubectl describe`, `kubectl migrate` and `podmigrate status` all read the same
//! record, and a restarted agent knows where it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::Resource;
use podmigrate_checkpoint::{prefault, share};
use serde_json::json;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::containerd::{AppContainer, Containerd, TaskState};
use super::metrics::{Metrics, Outcome};
use super::policy::{self, Decision};
use super::reference::{annotation, clone_reference, pod_name};
use podmigrate_vocabulary::{
    Mode, Phase, ARCHIVE_BYTES, ARCHIVE_DIGEST, CLONE_OF_LABEL, FROZEN_AT, FROZEN_MS, KEEP_ARCHIVE,
    PHASE, PHASE_TIMINGS, REASON, SOURCE_NODE,
};

/// The agent's settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub share_root: PathBuf,
    pub work_dir: PathBuf,
    pub containerd_socket: PathBuf,
    /// Outbound migrations at once on this node (KubeVirt's parallelOutboundMigrationsPerNode).
    pub max_outbound: usize,
    /// How long one container's checkpoint (dump and pack) may take.
    pub checkpoint_timeout: Duration,
    /// How long the clone may take to run once the archives are committed.
    pub clone_timeout: Duration,
    /// How long to wait, before freezing, for the clone to reserve memory for the checkpoint
    /// (see `podmigrate_checkpoint::prefault`); it freezes anyway after that.
    pub prepare_wait: Duration,
    /// How often to look at the clone while waiting for it.
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Containerd(#[from] super::containerd::ContainerdError),
}

/// Shared by every reconciliation.
pub struct Agent {
    pub kube: kube::Client,
    pub containerd: Containerd,
    pub config: AgentConfig,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    slots: Arc<Semaphore>,
    /// Held from reading a clone's siblings to claiming it. The controller reconciles two
    /// clones at once; without this, two clones of one source made in the same instant could
    /// each see the other still Pending and both freeze and checkpoint the source.
    claims: tokio::sync::Mutex<()>,
}

/// How a migration ended, for the clone's record.
enum Ending {
    Running,
    RolledBack(String),
    Failed(String),
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What a restored clone's container says when it failed to come up.
fn clone_failure(pod: &Pod) -> Option<String> {
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
fn clone_running(pod: &Pod) -> bool {
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

impl Agent {
    pub fn new(
        kube: kube::Client,
        containerd: Containerd,
        config: AgentConfig,
        metrics: Arc<Metrics>,
        recorder: Recorder,
    ) -> Self {
        Agent {
            slots: Arc::new(Semaphore::new(config.max_outbound.max(1))),
            claims: tokio::sync::Mutex::new(()),
            kube,
            containerd,
            config,
            metrics,
            recorder,
        }
    }

    /// Looks at one clone and does what is due. Returns when to look again (`None`: only on
    /// change).
    pub async fn reconcile(self: &Arc<Self>, clone: &Pod) -> Result<Option<Duration>, AgentError> {
        let namespace = clone.metadata.namespace.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
        let claim_guard = self.claims.lock().await;
        // The controller hands over its cache's copy, which can trail our own last patch: a
        // change queued while the previous reconciliation ran is reconciled with the copy from
        // before that reconciliation's final patch, and a stale Checkpointing, Transferring or
        // Restoring would pass for an agent restart and undo a finished migration. Decide on
        // the API server's current object.
        let Some(current) = pods
            .get_opt(clone.metadata.name.as_deref().unwrap_or_default())
            .await?
        else {
            return Ok(None);
        };
        let clone = &current;
        let reference = clone_reference(clone);
        let source_name = match &reference {
            Ok(Some(r)) => Some(r.source.clone()),
            _ => None,
        };
        let source = match &source_name {
            Some(name) => pods.get_opt(name).await?,
            None => None,
        };
        let ns_object = Api::<Namespace>::all(self.kube.clone())
            .get_opt(&namespace)
            .await?;
        let siblings = match &source_name {
            Some(name) if super::reference::is_valid_pod_name(name) => {
                pods.list(&ListParams::default().labels(&format!("{CLONE_OF_LABEL}={name}")))
                    .await?
                    .items
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
        let claim_guard = match decision {
            Decision::Checkpoint { .. } => Some(claim_guard),
            _ => {
                drop(claim_guard);
                None
            }
        };
        match decision {
            Decision::NotMine { .. } => Ok(None),
            // A clone restoring from this node's checkpoint: a restarted agent must follow it
            // again, or the frozen source would wait forever. (The first agent is still inside
            // this clone's reconciliation, which kube's controller never runs twice at once.)
            Decision::Wait {
                reason: policy::WaitReason::Restoring { .. },
            } if annotation(clone, SOURCE_NODE) == Some(self.config.node_name.as_str()) => {
                let _permit = Arc::clone(&self.slots).acquire_owned().await;
                self.recover(clone, source.as_ref(), Phase::Restoring)
                    .await?;
                Ok(None)
            }
            Decision::Wait { reason } => {
                tracing::debug!(clone = %pod_name(clone), %reason, "waiting");
                Ok(match reason {
                    policy::WaitReason::Finished { .. } | policy::WaitReason::Restoring { .. } => {
                        None
                    }
                    _ => Some(Duration::from_secs(2)),
                })
            }
            Decision::Refuse { reason } => {
                self.refuse(clone, source.as_ref(), &reason).await?;
                Ok(None)
            }
            Decision::Checkpoint {
                containers, mode, ..
            } => {
                let source = source.expect("a checkpoint decision has a source");
                let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
                    drop(claim_guard);
                    let queued = policy::queued(
                        self.config.max_outbound,
                        &self.config.node_name,
                        annotation(clone, REASON),
                    );
                    if queued.announce {
                        info!(clone = %pod_name(clone), reason = %queued.reason, "queued");
                        self.patch_clone(clone, json!({ REASON: queued.reason }))
                            .await?;
                        self.event(
                            clone,
                            EventType::Normal,
                            "Queued",
                            "Checkpoint",
                            &queued.reason,
                        )
                        .await;
                    }
                    return Ok(Some(Duration::from_secs(2)));
                };
                let _permit = permit;
                self.migrate(clone, &source, &containers, mode, claim_guard)
                    .await?;
                Ok(None)
            }
            Decision::Resume { phase, .. } => {
                let _permit = Arc::clone(&self.slots).acquire_owned().await;
                self.recover(clone, source.as_ref(), phase).await?;
                Ok(None)
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
        self.patch_clone(
            clone,
            json!({ PHASE: Phase::Failed.as_str(), REASON: reason.to_string() }),
        )
        .await?;
        self.event(
            clone,
            EventType::Warning,
            reason.event_reason(),
            "Refuse",
            &reason.to_string(),
        )
        .await;
        if let Some(source) = source {
            self.event(
                source,
                EventType::Warning,
                reason.event_reason(),
                "Refuse",
                &reason.to_string(),
            )
            .await;
        }
        self.metrics.record_outcome(Outcome::Refused);
        Ok(())
    }

    /// Merge-patches annotations on the clone. `null` removes one.
    async fn patch_clone(
        &self,
        clone: &Pod,
        annotations: serde_json::Value,
    ) -> Result<Pod, kube::Error> {
        let pods: Api<Pod> = Api::namespaced(
            self.kube.clone(),
            clone.metadata.namespace.as_deref().unwrap_or_default(),
        );
        pods.patch(
            clone.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "annotations": annotations } })),
        )
        .await
    }

    /// Publishes an Event; a failure to record one is logged, never fatal.
    pub async fn event(&self, pod: &Pod, kind: EventType, reason: &str, action: &str, note: &str) {
        let event = Event {
            type_: kind,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: action.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pod.object_ref(&())).await {
            warn!(pod = %pod_name(pod), error = %e, "recording an event");
        }
    }

    /// Where a container's checkpoint directory goes on this node: keyed by the clone's uid,
    /// so a restarted agent finds it again and two migrations never share one.
    fn image_path(&self, clone: &Pod, container: &str) -> PathBuf {
        self.config
            .work_dir
            .join("checkpoints")
            .join(clone.metadata.uid.as_deref().unwrap_or("no-uid"))
            .join(container)
    }

    fn archive_path(&self, namespace: &str, source: &str, container: &str) -> Option<PathBuf> {
        share::archive_path(&self.config.share_root, namespace, source, container).ok()
    }

    async fn migrate(
        &self,
        clone: &Pod,
        source: &Pod,
        containers: &[String],
        mode: Mode,
        claim_guard: Option<tokio::sync::MutexGuard<'_, ()>>,
    ) -> Result<(), AgentError> {
        let _in_flight = self.metrics.in_flight();
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let source_name = source.metadata.name.clone().unwrap_or_default();
        let started = Instant::now();
        // Claim it: only one agent, once. The resourceVersion makes the patch fail if the clone
        // changed since we looked (another reconcile, or a restarted agent, got there first).
        let pods: Api<Pod> = Api::namespaced(self.kube.clone(), &namespace);
        let frozen_at = unix_millis();
        let claim = pods
            .patch(
                clone.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "metadata": {
                    "resourceVersion": clone.metadata.resource_version,
                    "annotations": {
                        PHASE: Phase::Checkpointing.as_str(),
                        SOURCE_NODE: self.config.node_name,
                        FROZEN_AT: frozen_at.to_string(),
                        REASON: null,
                    }
                }})),
            )
            .await;
        // Claimed (or lost): a sibling decided from now on sees this clone in progress.
        drop(claim_guard);
        let mut clone = match claim {
            Ok(claimed) => claimed,
            Err(kube::Error::Api(status)) if status.code == 409 => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        info!(clone = %pod_name(&clone), source = %pod_name(source), ?mode, "migration started");
        let note = format!(
            "checkpointing {}/{} on node {} for clone {} ({})",
            namespace,
            source_name,
            self.config.node_name,
            clone.metadata.name.as_deref().unwrap_or_default(),
            mode.as_str()
        );
        self.event(
            &clone,
            EventType::Normal,
            "Checkpointing",
            "Checkpoint",
            &note,
        )
        .await;
        self.event(
            source,
            EventType::Normal,
            "Checkpointing",
            "Checkpoint",
            &note,
        )
        .await;

        let found = self
            .containerd
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
                    return self
                        .finish(
                            &clone,
                            Some(source),
                            &[],
                            mode,
                            started,
                            Ending::Failed(reason),
                        )
                        .await;
                }
            }
        }
        // GC leaves the source's share directory and our work unit alone while this lease
        // lasts; it outlives every bounded wait below, so only a crashed agent's lease expires.
        let lifetime = self.config.checkpoint_timeout * targets.len().max(1) as u32
            + self.config.clone_timeout
            + Duration::from_secs(300);
        let holder = format!(
            "agent on node {} for clone {}",
            self.config.node_name,
            pod_name(&clone)
        );
        let lease = share::pod_dir(&self.config.share_root, &namespace, &source_name)
            .map_err(|e| e.to_string())
            .and_then(|dir| {
                let uid = clone.metadata.uid.as_deref().unwrap_or("no-uid");
                podmigrate_checkpoint::gc::write_lease(
                    &dir,
                    uid,
                    &super::gc::lease_for(holder, uid, lifetime),
                )
                .map_err(|e| e.to_string())
            });
        if let Err(reason) = lease {
            return self
                .finish(
                    &clone,
                    Some(source),
                    &[],
                    mode,
                    started,
                    Ending::Failed(format!("{reason}; nothing was frozen")),
                )
                .await;
        }
        // Old archives of this source must not be mistaken for this migration's.
        for c in &targets {
            if let Some(path) = self.archive_path(&namespace, &source_name, &c.name) {
                let _ = std::fs::remove_file(path);
            }
        }

        if let Ok(dir) = share::pod_dir(&self.config.share_root, &namespace, &source_name) {
            if self.prepare_clone(&clone, &dir, &targets).await {
                // The source is frozen from now, not from the claim: the wait is not downtime.
                let now = json!({ FROZEN_AT: unix_millis().to_string() });
                match self.patch_clone(&clone, now).await {
                    Ok(patched) => clone = patched,
                    Err(e) => {
                        warn!(clone = %pod_name(&clone), error = %e, "recording the freeze time")
                    }
                }
            }
        }

        // Freeze every container first, so a multi-container pod is checkpointed at one instant.
        // (This line's timestamp is where the downtime starts; scripts/bench.sh reads it.)
        info!(clone = %pod_name(&clone), source = %pod_name(source), "freezing the source");
        let mut frozen = Vec::new();
        for c in &targets {
            if let Err(e) = self.containerd.pause(&c.id).await {
                self.thaw(&frozen).await;
                let reason = format!("freezing container {}: {e}", c.name);
                return self
                    .finish(
                        &clone,
                        Some(source),
                        &[],
                        mode,
                        started,
                        Ending::Failed(reason),
                    )
                    .await;
            }
            frozen.push(c.clone());
        }
        let checkpoint_started = Instant::now();
        for c in &targets {
            let image = self.image_path(&clone, &c.name);
            let _ = std::fs::remove_dir_all(&image);
            if let Some(parent) = image.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            if let Err(e) = self
                .containerd
                .checkpoint(&c.id, &image, false, self.config.checkpoint_timeout)
                .await
            {
                self.thaw(&frozen).await;
                let reason = format!(
                    "checkpointing container {}: {e}; the source was resumed",
                    c.name
                );
                return self
                    .finish(
                        &clone,
                        Some(source),
                        &targets,
                        mode,
                        started,
                        Ending::RolledBack(reason),
                    )
                    .await;
            }
        }
        let checkpoint_seconds = checkpoint_started.elapsed().as_secs_f64();
        self.metrics
            .record_phase(Phase::Checkpointing, checkpoint_seconds);
        self.after_checkpoint(&clone, source, &targets, mode, started, checkpoint_seconds)
            .await
    }

    /// From committed archives to the end: record them, then follow the clone.
    async fn after_checkpoint(
        &self,
        clone: &Pod,
        source: &Pod,
        targets: &[AppContainer],
        mode: Mode,
        started: Instant,
        checkpoint_seconds: f64,
    ) -> Result<(), AgentError> {
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let source_name = source.metadata.name.clone().unwrap_or_default();
        let mut digests = Vec::new();
        let mut bytes = 0u64;
        let uid = clone.metadata.uid.as_deref().unwrap_or_default();
        for c in targets {
            let Some(path) = self.archive_path(&namespace, &source_name, &c.name) else {
                continue;
            };
            let record = match share::read_commit_record(&path, uid) {
                Ok(Some(record)) => Ok(record),
                Ok(None) => Err(format!(
                    "no commit record for clone {uid} beside {}",
                    path.display()
                )),
                Err(e) => Err(e.to_string()),
            };
            match record {
                Ok(record) => {
                    digests.push(format!("{}={}", c.name, record.manifest_sha256));
                    bytes += record.archive_bytes;
                }
                Err(e) => {
                    // Both modes froze the source; clone mode thaws it only further on.
                    self.thaw(targets).await;
                    let reason = format!("the commit of {}'s archive is unreadable: {e}", c.name);
                    return self
                        .finish(
                            clone,
                            Some(source),
                            targets,
                            mode,
                            started,
                            Ending::RolledBack(reason),
                        )
                        .await;
                }
            }
        }
        self.metrics.record_bytes(bytes);
        let transferring_started = Instant::now();
        let clone = self
            .patch_clone(
                clone,
                json!({
                    PHASE: Phase::Transferring.as_str(),
                    ARCHIVE_DIGEST: digests.join(","),
                    ARCHIVE_BYTES: bytes.to_string(),
                    PHASE_TIMINGS: json!({ "Checkpointing": (checkpoint_seconds * 1000.0) as u64 }).to_string(),
                }),
            )
            .await?;
        self.event(
            &clone,
            EventType::Normal,
            "Checkpointed",
            "Checkpoint",
            &format!(
                "{} archive(s) committed to the share, {bytes} bytes",
                targets.len()
            ),
        )
        .await;
        if mode == Mode::Clone {
            self.thaw(targets).await;
        }

        // The shim on the clone's node restores as soon as the archives are there.
        let clone = self
            .patch_clone(&clone, json!({ PHASE: Phase::Restoring.as_str() }))
            .await?;
        let ending = self.wait_for_clone(&clone).await?;
        let restoring_seconds = transferring_started.elapsed().as_secs_f64();
        self.metrics
            .record_phase(Phase::Restoring, restoring_seconds);
        let ending = match ending {
            Ending::Running => Ending::Running,
            Ending::Failed(reason) | Ending::RolledBack(reason) => {
                if mode == Mode::Migrate {
                    self.thaw(targets).await;
                    Ending::RolledBack(format!("{reason}; the source was resumed"))
                } else {
                    Ending::Failed(reason)
                }
            }
        };
        let clone = self
            .patch_clone(
                &clone,
                json!({ PHASE_TIMINGS: json!({
                    "Checkpointing": (checkpoint_seconds * 1000.0) as u64,
                    "Restoring": (restoring_seconds * 1000.0) as u64,
                }).to_string() }),
            )
            .await?;
        self.finish(&clone, Some(source), targets, mode, started, ending)
            .await
    }

    /// Follows the clone until its containers run, it fails, or the time runs out.
    async fn wait_for_clone(&self, clone: &Pod) -> Result<Ending, AgentError> {
        let pods: Api<Pod> = Api::namespaced(
            self.kube.clone(),
            clone.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let name = clone.metadata.name.clone().unwrap_or_default();
        let deadline = Instant::now() + self.config.clone_timeout;
        loop {
            match pods.get_opt(&name).await? {
                None => return Ok(Ending::Failed("the clone pod was deleted".to_string())),
                Some(pod) if pod.metadata.deletion_timestamp.is_some() => {
                    return Ok(Ending::Failed("the clone pod is being deleted".to_string()))
                }
                Some(pod) if clone_running(&pod) => return Ok(Ending::Running),
                Some(pod) => {
                    if let Some(reason) = clone_failure(&pod) {
                        return Ok(Ending::Failed(reason));
                    }
                }
            }
            if Instant::now() >= deadline {
                return Ok(Ending::Failed(format!(
                    "the clone did not run within {:?} (agent --clone-timeout)",
                    self.config.clone_timeout
                )));
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    /// Thaws containers, best effort: each failure is logged and the rest still thaw.
    async fn thaw(&self, containers: &[AppContainer]) {
        for c in containers {
            match self.containerd.task_state(&c.id).await {
                Ok(TaskState::Paused) => {
                    if let Err(e) = self.containerd.resume(&c.id).await {
                        warn!(container = %c.name, error = %e, "resuming the source");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(container = %c.name, error = %e, "reading the source's state"),
            }
        }
    }

    /// Writes the ending on the clone, emits Events, and cleans up.
    async fn finish(
        &self,
        clone: &Pod,
        source: Option<&Pod>,
        targets: &[AppContainer],
        mode: Mode,
        started: Instant,
        ending: Ending,
    ) -> Result<(), AgentError> {
        let total = started.elapsed();
        let frozen_ms = annotation(clone, FROZEN_AT)
            .and_then(|v| v.parse::<u64>().ok())
            .map(|at| unix_millis().saturating_sub(at));
        let clone_name = pod_name(clone);
        match &ending {
            Ending::Running => {
                let mut annotations = json!({ PHASE: Phase::Running.as_str(), REASON: null });
                if let (Mode::Migrate, Some(ms)) = (mode, frozen_ms) {
                    annotations[FROZEN_MS] = json!(ms.to_string());
                }
                self.patch_clone(clone, annotations).await?;
                let note = format!(
                    "clone {clone_name} is running, {:.1}s after the migration started",
                    total.as_secs_f64()
                );
                self.event(clone, EventType::Normal, "Migrated", "Restore", &note)
                    .await;
                if let Some(source) = source {
                    self.event(source, EventType::Normal, "Migrated", "Restore", &note)
                        .await;
                    if mode == Mode::Migrate {
                        self.retire_source(source, targets).await?;
                    }
                }
                self.metrics.record_outcome(Outcome::Succeeded);
                info!(clone = %clone_name, total_ms = total.as_millis() as u64, ?frozen_ms, "migration succeeded");
            }
            Ending::RolledBack(reason) | Ending::Failed(reason) => {
                let phase = if matches!(ending, Ending::RolledBack(_)) {
                    Phase::RolledBack
                } else {
                    Phase::Failed
                };
                self.patch_clone(clone, json!({ PHASE: phase.as_str(), REASON: reason }))
                    .await?;
                self.event(clone, EventType::Warning, phase.as_str(), "Migrate", reason)
                    .await;
                if let Some(source) = source {
                    self.event(
                        source,
                        EventType::Warning,
                        phase.as_str(),
                        "Migrate",
                        reason,
                    )
                    .await;
                }
                self.metrics.record_outcome(if phase == Phase::RolledBack {
                    Outcome::RolledBack
                } else {
                    Outcome::Failed
                });
                warn!(clone = %clone_name, %reason, %phase, "migration did not complete");
            }
        }
        let keep = annotation(clone, KEEP_ARCHIVE) == Some("true");
        if let Some(source) = source {
            self.clean_up(clone, source, targets, keep);
        }
        Ok(())
    }

    /// Migrate mode's last step: the source's processes die (frozen, they die as they thaw,
    /// without running again), then its pod goes.
    async fn retire_source(
        &self,
        source: &Pod,
        targets: &[AppContainer],
    ) -> Result<(), AgentError> {
        for c in targets {
            if let Err(e) = self.containerd.kill(&c.id, libc::SIGKILL).await {
                warn!(container = %c.name, error = %e, "stopping the migrated source");
            }
            let _ = self.containerd.resume(&c.id).await;
        }
        let pods: Api<Pod> = Api::namespaced(
            self.kube.clone(),
            source.metadata.namespace.as_deref().unwrap_or_default(),
        );
        match pods
            .delete(
                source.metadata.name.as_deref().unwrap_or_default(),
                &DeleteParams::default(),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Announces each container's memory so that the clone's shim can reserve it before the
    /// freeze, then waits (at most `prepare_wait`) until the first has: reserving is slow, and the
    /// source is not frozen yet. Only ever an optimization: it never fails the migration.
    /// Returns whether it waited.
    async fn prepare_clone(&self, clone: &Pod, pod_dir: &Path, targets: &[AppContainer]) -> bool {
        let uid = clone.metadata.uid.as_deref().unwrap_or_default();
        let mut announced = Vec::new();
        for c in targets {
            let Ok(Some(pid)) = self.containerd.task_pid(&c.id).await else {
                continue;
            };
            let Some(bytes) = prefault::process_memory(pid) else {
                continue;
            };
            let expectation = prefault::Expectation {
                clone_pod_uid: uid.to_string(),
                bytes,
            };
            match prefault::announce(pod_dir, &c.name, &expectation) {
                Ok(()) => announced.push(c.name.as_str()),
                Err(e) => {
                    warn!(clone = %pod_name(clone), error = %e, "announcing the checkpoint's size")
                }
            }
        }
        // kubelet creates a pod's containers one after another, and a clone container's Create
        // returns only once it is restored: only the first can reserve before the freeze (the
        // others find their archive committed and do not reserve).
        let first = clone
            .spec
            .as_ref()
            .and_then(|spec| {
                spec.containers
                    .iter()
                    .find(|c| announced.contains(&c.name.as_str()))
            })
            .map(|c| c.name.as_str());
        let Some(first) = first else {
            return false;
        };
        if self.config.prepare_wait.is_zero() {
            return false;
        }
        let started = Instant::now();
        loop {
            if prefault::is_ready(pod_dir, first, uid) {
                info!(clone = %pod_name(clone), waited_ms = started.elapsed().as_millis() as u64, "the clone reserved memory for the checkpoint");
                return true;
            }
            if started.elapsed() >= self.config.prepare_wait {
                info!(clone = %pod_name(clone), prepare_wait = ?self.config.prepare_wait, "the clone did not reserve memory in time; freezing anyway");
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes this migration's local checkpoint directories and, unless kept, its archives.
    fn clean_up(&self, clone: &Pod, source: &Pod, targets: &[AppContainer], keep_archive: bool) {
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let source_name = source.metadata.name.clone().unwrap_or_default();
        if let Some(uid) = clone.metadata.uid.as_deref() {
            let _ = std::fs::remove_dir_all(self.config.work_dir.join("checkpoints").join(uid));
            if let Ok(dir) = share::pod_dir(&self.config.share_root, &namespace, &source_name) {
                let _ = std::fs::remove_file(share::lease_path(&dir, uid));
                prefault::withdraw(&dir, uid);
            }
        }
        for c in targets {
            if let Some(path) = self.archive_path(&namespace, &source_name, &c.name) {
                let _ = std::fs::remove_file(share::commit_record_path(&path));
                if keep_archive {
                    // Kept on request: pinned, so GC leaves it too.
                    let pin = share::pin_path(&path);
                    if let Err(e) = std::fs::write(&pin, b"") {
                        warn!(pin = ?pin, error = %e, "pinning a kept archive");
                    }
                } else {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }

    /// After an agent restart mid-migration: never checkpoint twice. If every archive was
    /// committed, carry on following the clone; otherwise thaw the source and roll back.
    async fn recover(
        &self,
        clone: &Pod,
        source: Option<&Pod>,
        phase: Phase,
    ) -> Result<(), AgentError> {
        let started = Instant::now();
        let mode = super::reference::clone_mode(clone).unwrap_or(Mode::Migrate);
        let Some(source) = source else {
            let reason = format!("the agent restarted while {phase}, and the source pod is gone");
            return self
                .finish(clone, None, &[], mode, started, Ending::Failed(reason))
                .await;
        };
        let namespace = source.metadata.namespace.clone().unwrap_or_default();
        let source_name = source.metadata.name.clone().unwrap_or_default();
        let targets = self
            .containerd
            .app_containers(&namespace, &source_name)
            .await?;
        let committed = |targets: &[AppContainer]| {
            targets.iter().all(|c| {
                self.archive_path(&namespace, &source_name, &c.name)
                    .is_some_and(|p| {
                        matches!(
                            share::read_commit_record(
                                &p,
                                clone.metadata.uid.as_deref().unwrap_or_default()
                            ),
                            Ok(Some(_))
                        )
                    })
            })
        };
        // The shim may still be packing what the previous agent asked for.
        let deadline = Instant::now() + self.config.checkpoint_timeout.min(Duration::from_secs(60));
        while !committed(&targets) && Instant::now() < deadline && phase == Phase::Checkpointing {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if !targets.is_empty() && committed(&targets) {
            info!(clone = %pod_name(clone), %phase, "resuming after an agent restart: archives are committed");
            return self
                .after_checkpoint(clone, source, &targets, mode, started, 0.0)
                .await;
        }
        self.thaw(&targets).await;
        let reason = format!(
            "the agent restarted while {phase} before every archive was committed; the source was resumed"
        );
        self.finish(
            clone,
            Some(source),
            &targets,
            mode,
            started,
            Ending::RolledBack(reason),
        )
        .await
    }
}

/// Phase timings as the clone records them.
pub fn phase_timings(pod: &Pod) -> BTreeMap<String, u64> {
    annotation(pod, PHASE_TIMINGS)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_clone_runs_only_when_every_container_does() {
        let spec =
            json!({"containers": [{"name": "a", "image": "i"}, {"name": "b", "image": "i"}]});
        let running = json!({"running": {}});
        let waiting = json!({"waiting": {"reason": "ContainerCreating"}});
        let both = pod(json!({"spec": spec, "status": {"containerStatuses": [
            {"name": "a", "state": running, "ready": true, "restartCount": 0, "image": "i", "imageID": ""},
            {"name": "b", "state": running, "ready": true, "restartCount": 0, "image": "i", "imageID": ""}]}}));
        assert!(clone_running(&both));
        let one = pod(json!({"spec": spec, "status": {"containerStatuses": [
            {"name": "a", "state": running, "ready": true, "restartCount": 0, "image": "i", "imageID": ""},
            {"name": "b", "state": waiting, "ready": false, "restartCount": 0, "image": "i", "imageID": ""}]}}));
        assert!(!clone_running(&one));
        assert_eq!(clone_failure(&one), None);
    }

    #[test]
    fn restore_errors_and_exits_are_failures_with_their_message() {
        let failed = pod(
            json!({"spec": {"containers": [{"name": "a", "image": "i"}]},
            "status": {"containerStatuses": [{"name": "a", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"waiting": {"reason": "RunContainerError", "message": "restoring counter of clone pod default/c from /share/x.zip: SHA-256 mismatch"}}}]}}),
        );
        let reason = clone_failure(&failed).unwrap();
        assert!(
            reason.contains("RunContainerError") && reason.contains("SHA-256 mismatch"),
            "{reason}"
        );
        let exited = pod(
            json!({"spec": {"containers": [{"name": "a", "image": "i"}]},
            "status": {"containerStatuses": [{"name": "a", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                "state": {"terminated": {"exitCode": 137, "reason": "Error"}}}]}}),
        );
        assert!(clone_failure(&exited).unwrap().contains("137"));
        let pod_failed = pod(json!({"status": {"phase": "Failed", "reason": "NodeAffinity"}}));
        assert!(clone_failure(&pod_failed).unwrap().contains("NodeAffinity"));
    }
}
