//! Checkpointing: wait (bounded) for the clone to reserve memory, then freeze every container
//! of the source at one instant and checkpoint each through the shim, which packs it onto the
//! share and writes its commit record. One step: the source is frozen only inside it.
//!
//! Entered with the source already frozen ([`FROZEN_AT`] recorded), the step was interrupted
//! (the agent restarted mid-checkpoint): it never checkpoints twice. It waits for the commit
//! records the shim still writes, while the archives grow, and rolls back once nothing moved
//! for the progress timeout.

use std::time::{Duration, Instant};

use podmigrate_vocabulary::{Phase, FROZEN_AT, PHASE, PHASE_TIMINGS, PROGRESS};
use serde_json::json;
use tracing::info;

use crate::agent::machine::{
    millis, progress, unix_millis, Agent, AgentError, Ending, Migration, Next,
};
use crate::agent::ports::{Cluster, Runtime, Share};
use crate::pod::pod_name;

/// How often an interrupted checkpoint is looked at.
const RECOVERY_POLL: Duration = Duration::from_secs(1);
/// How often the reservation is looked for before the freeze.
const PREPARE_POLL: Duration = Duration::from_millis(50);

impl<C: Cluster, R: Runtime, S: Share> Agent<C, R, S> {
    pub(in crate::agent) async fn checkpoint_step(
        &self,
        m: &Migration,
    ) -> Result<Next, AgentError> {
        if m.source.is_none() {
            return self
                .finish(
                    m,
                    Ending::Failed(format!(
                        "the source pod {}/{} is gone",
                        m.namespace, m.source_name
                    )),
                )
                .await;
        }
        if m.containers.len() != m.names.len() {
            let reason = format!(
                "containerd on node {} no longer has every container of {}/{}",
                self.config.node_name, m.namespace, m.source_name
            );
            return self.roll_back(m, Ending::RolledBack(reason)).await;
        }
        if millis(&m.clone, FROZEN_AT).is_some() {
            return self.resume_checkpoint(m).await;
        }
        // kubelet creates a pod's containers one after another, and a clone container's Create
        // returns only once it is restored: only the first can reserve before the freeze.
        let first = &m.names[0];
        let waited = Duration::from_millis(unix_millis().saturating_sub(m.started_at));
        let ready = self
            .share
            .is_ready(&m.namespace, &m.source_name, first, &m.uid);
        if !ready && waited < self.config.prepare_wait {
            return Ok(Next::After(PREPARE_POLL));
        }
        if ready {
            info!(clone = %pod_name(&m.clone), waited_ms = waited.as_millis() as u64, "the clone reserved memory for the checkpoint");
        } else if !self.config.prepare_wait.is_zero() {
            info!(clone = %pod_name(&m.clone), prepare_wait = ?self.config.prepare_wait, "the clone did not reserve memory in time; freezing anyway");
        }

        // Recorded before the freeze, so that a restarted agent knows the source may be frozen.
        let clone = self
            .annotate(&m.clone, json!({ FROZEN_AT: unix_millis().to_string() }))
            .await?;
        // Freeze every container first, so a multi-container pod is checkpointed at one
        // instant. (This line's timestamp is where the downtime starts; scripts/bench.sh reads it.)
        info!(clone = %pod_name(&clone), source = %format!("{}/{}", m.namespace, m.source_name), "freezing the source");
        for c in &m.containers {
            if let Err(e) = self.runtime.pause(&c.id).await {
                let reason = format!("freezing container {}: {e}", c.name);
                return self.roll_back(m, Ending::RolledBack(reason)).await;
            }
        }
        let started = Instant::now();
        for c in &m.containers {
            let image = self
                .config
                .work_dir
                .join("checkpoints")
                .join(&m.uid)
                .join(&c.name);
            let _ = std::fs::remove_dir_all(&image);
            if let Some(parent) = image.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            // The whole completion budget that is left: the dump cannot be interrupted safely
            // (CRIU holds the tasks), so a cancel takes effect once it ends.
            let left = m
                .budget
                .completion
                .saturating_sub(Duration::from_millis(
                    unix_millis().saturating_sub(m.started_at),
                ))
                .max(Duration::from_secs(1));
            if let Err(e) = self.runtime.checkpoint(&c.id, &image, left).await {
                let reason = format!("checkpointing container {}: {e}", c.name);
                return self.roll_back(m, Ending::RolledBack(reason)).await;
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        self.metrics
            .record_phase(Phase::Checkpointing, ms as f64 / 1000.0);
        self.annotate(
            &clone,
            json!({
                PHASE: Phase::Transferring.as_str(),
                PHASE_TIMINGS: json!({ "Checkpointing": ms }).to_string(),
                PROGRESS: format!("{}:committed", unix_millis()),
            }),
        )
        .await?;
        Ok(Next::Now)
    }

    /// The source was frozen by a step that did not end here: follow the shim's pack to its
    /// commit records, or roll back once it stops moving.
    async fn resume_checkpoint(&self, m: &Migration) -> Result<Next, AgentError> {
        let mut committed = 0;
        let mut checkpoint_ms = 0;
        for name in &m.names {
            if let Ok(Some(record)) =
                self.share
                    .commit_record(&m.namespace, &m.source_name, name, &m.uid)
            {
                committed += 1;
                checkpoint_ms += record.dump_ms + record.diff_ms + record.pack_ms;
            }
        }
        if committed == m.names.len() {
            info!(clone = %pod_name(&m.clone), "resuming after an interrupted checkpoint: every archive is committed");
            self.annotate(
                &m.clone,
                json!({
                    PHASE: Phase::Transferring.as_str(),
                    PHASE_TIMINGS: json!({ "Checkpointing": checkpoint_ms }).to_string(),
                    PROGRESS: format!("{}:committed", unix_millis()),
                }),
            )
            .await?;
            return Ok(Next::Now);
        }
        let bytes = self
            .share
            .packing_bytes(&m.namespace, &m.source_name, &m.names)
            .to_string();
        let now = unix_millis();
        match progress(&m.clone) {
            Some((since, mark)) if mark == bytes => {
                if Duration::from_millis(now.saturating_sub(since)) <= m.budget.progress {
                    return Ok(Next::After(RECOVERY_POLL));
                }
                let reason = format!(
                    "the checkpoint was interrupted (agent restarted) and no archive bytes moved for {}",
                    humantime::format_duration(m.budget.progress)
                );
                self.roll_back(m, Ending::RolledBack(reason)).await
            }
            // New bytes (or no mark yet): progress, from now.
            _ => {
                self.annotate(&m.clone, json!({ PROGRESS: format!("{now}:{bytes}") }))
                    .await?;
                Ok(Next::After(RECOVERY_POLL))
            }
        }
    }
}
