//! Checkpointing: wait (bounded) for the clone to be ready (its memory reserved, or, in
//! post-copy, its answer whether it can restore lazily), choose the transfer, then freeze every
//! container of the source at one instant and checkpoint each through the shim, which packs it
//! onto the share and writes its commit record. One step: the source is frozen only inside it.
//! In post-copy the lease tells the shim so, and where to serve the memory the archives leave
//! out; the source then stays frozen after this step, until the clone holds every page.
//!
//! Entered with the source already frozen ([`FROZEN_AT`] recorded), the step was interrupted
//! (the agent restarted mid-checkpoint): it never checkpoints twice. It waits for the commit
//! records the shim still writes, while the archives grow, and rolls back once nothing moved
//! for the progress timeout.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::EventType;
use podmigrate_checkpoint::gc::PageStreamPlan;
use podmigrate_checkpoint::prefault::Readiness;
use podmigrate_vocabulary::{
    Mode, Phase, Transfer, FROZEN_AT, PHASE, PHASE_TIMINGS, PROGRESS, TRANSFER, TRANSFER_CHOSEN,
};
use serde_json::json;
use tracing::info;

use crate::agent::machine::{
    millis, progress, unix_millis, Agent, AgentError, Ending, Migration, Next,
};
use crate::agent::ports::{Cluster, Runtime, Share};
use crate::pod::{annotation, pod_name};

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
        let readiness = self
            .share
            .readiness(&m.namespace, &m.source_name, first, &m.uid);
        if readiness.is_none() && waited < self.config.prepare_wait {
            return Ok(Next::After(PREPARE_POLL));
        }
        if readiness.is_some() {
            info!(clone = %pod_name(&m.clone), waited_ms = waited.as_millis() as u64, "the clone is ready for the checkpoint");
        } else if !self.config.prepare_wait.is_zero() {
            info!(clone = %pod_name(&m.clone), prepare_wait = ?self.config.prepare_wait, "the clone did not say it was ready in time; freezing anyway");
        }
        let (transfer, fallback) = self.choose_transfer(m, readiness);
        if let Some(why) = &fallback {
            let note = format!("stop-and-copy instead of post-copy: {why}");
            info!(clone = %pod_name(&m.clone), %why, "stop-and-copy instead of post-copy");
            self.tell(m, EventType::Normal, "StopAndCopy", "Checkpoint", &note)
                .await;
        }
        if transfer == Transfer::PostCopy {
            if let Err(reason) = self.plan_page_stream(m) {
                return self.roll_back(m, Ending::RolledBack(reason)).await;
            }
        }

        let clone = self
            .annotate(
                &m.clone,
                json!({
                    FROZEN_AT: unix_millis().to_string(),
                    TRANSFER_CHOSEN: transfer.as_str(),
                }),
            )
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
            let image = self.image_dir(&m.uid, &c.name);
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
    /// Post-copy where asked (the default) and possible; otherwise stop-and-copy, with why
    /// post-copy was not taken when it was asked for.
    fn choose_transfer(
        &self,
        m: &Migration,
        readiness: Option<Readiness>,
    ) -> (Transfer, Option<String>) {
        if !asks_for_postcopy(&m.clone, m.mode) {
            return (Transfer::StopAndCopy, None);
        }
        let why = match readiness {
            None => Some(
                "the clone's node did not say before the freeze whether it can restore lazily"
                    .to_string(),
            ),
            Some(Readiness { userfaultfd: false }) => Some(format!(
                "the clone's node {} has no userfaultfd, which a lazy restore needs",
                node_of(&m.clone).unwrap_or("?")
            )),
            Some(_) => self.runtime.postcopy_unavailable().map(|why| {
                format!(
                    "node {} cannot serve the memory: {why}",
                    self.config.node_name
                )
            }),
        }
        .or_else(|| {
            host_ip(m.source.as_ref())
                .is_none()
                .then(|| "the source pod has no host IP to serve its memory from".to_string())
        });
        match why {
            Some(why) => (Transfer::StopAndCopy, Some(why)),
            None => (Transfer::PostCopy, None),
        }
    }

    /// Tells the source's shim, through the lease, to dump lazily and where to serve the
    /// memory: the source node's address, for the clone's node's only.
    fn plan_page_stream(&self, m: &Migration) -> Result<(), String> {
        let listen = host_ip(m.source.as_ref())
            .ok_or_else(|| "the source pod has no host IP".to_string())?;
        let mut lease = self.lease(m);
        lease.page_stream = Some(PageStreamPlan {
            listen,
            peer: host_ip(Some(&m.clone)),
        });
        self.share
            .write_lease(&m.namespace, &m.source_name, &m.uid, &lease)
            .map_err(|e| format!("writing the post-copy plan into the lease: {e}"))
    }

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

/// Whether the clone asks for post-copy: its `podmigrate.io/transfer` (absent: post-copy), in
/// migrate mode only (a clone's source thaws once its archive is committed, so its memory
/// cannot stay behind).
pub(in crate::agent) fn asks_for_postcopy(clone: &Pod, mode: Mode) -> bool {
    mode == Mode::Migrate
        && Transfer::parse(annotation(clone, TRANSFER)) == Some(Transfer::PostCopy)
}

/// The address of the node a pod runs on, as its status reports it.
fn host_ip(pod: Option<&Pod>) -> Option<IpAddr> {
    pod?.status.as_ref()?.host_ip.as_deref()?.parse().ok()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}
