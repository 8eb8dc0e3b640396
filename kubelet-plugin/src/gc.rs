//! Garbage collection as the agent and `podmigrate gc` run it: the library's plan
//! ([`podmigrate_checkpoint::gc`]) plus what the API server knows about migrations in flight,
//! and the agent's periodic round.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use podmigrate_checkpoint::gc::{self, GcPolicy, InFlight, Lease};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pod::{annotation, pod_name};
use podmigrate_vocabulary::{Phase, CLONE_OF_LABEL, PHASE};

/// Clones whose migration has not ended protect their source's share directory and their
/// checkpoint work unit (`checkpoints/<clone-uid>`), whatever the leases say; every clone that
/// still exists, ended or not, protects its restore markers.
pub async fn in_flight_from_api(kube: &kube::Client) -> Result<InFlight, kube::Error> {
    let clones = Api::<Pod>::all(kube.clone())
        .list(&ListParams::default().labels(CLONE_OF_LABEL))
        .await?
        .items;
    let mut in_flight = InFlight {
        source: "the API server (a clone of it has not finished)".into(),
        ..InFlight::default()
    };
    for clone in &clones {
        if let Some(uid) = &clone.metadata.uid {
            in_flight.pod_uids.insert(uid.clone());
        }
        let ended = annotation(clone, PHASE)
            .and_then(Phase::parse)
            .is_some_and(Phase::is_final);
        let source = clone
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CLONE_OF_LABEL));
        if ended {
            continue;
        }
        if let (Some(ns), Some(source)) = (&clone.metadata.namespace, source) {
            in_flight.pods.insert((ns.clone(), source.clone()));
        }
        if let Some(uid) = &clone.metadata.uid {
            in_flight.work_units.insert(format!("checkpoints/{uid}"));
        }
        tracing::debug!(clone = %pod_name(clone), "in flight: protected from gc");
    }
    Ok(in_flight)
}

/// The lease a migration holds on its source's share directory while the agent drives it.
/// How much longer than its completion timeout a migration's lease lasts: only a crashed
/// agent's lease expires.
pub const LEASE_MARGIN: Duration = Duration::from_secs(300);

pub fn lease_for(holder: String, clone_uid: &str, lifetime: Duration) -> Lease {
    let deadline = SystemTime::now() + lifetime;
    Lease {
        holder,
        deadline_unix_ms: deadline
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64,
        work_units: vec![format!("checkpoints/{clone_uid}")],
        page_stream: None,
    }
}

/// The agent's periodic GC.
#[derive(Debug, Clone)]
pub struct GcSchedule {
    /// Zero: never.
    pub every: Duration,
    pub policy: GcPolicy,
    pub share_root: PathBuf,
    pub work_dir: PathBuf,
}

/// Runs a GC round every `schedule.every` (the first one interval after start) until
/// cancelled. A round whose API server query fails is skipped: without it, a clone whose agent
/// has not written its lease yet could lose its archive.
pub async fn run_periodically(
    kube: kube::Client,
    schedule: Arc<GcSchedule>,
    shutdown: CancellationToken,
) {
    if schedule.every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(schedule.every) => {}
        }
        let in_flight =
            match tokio::time::timeout(Duration::from_secs(30), in_flight_from_api(&kube)).await {
                Ok(Ok(in_flight)) => in_flight,
                Ok(Err(e)) => {
                    warn!(error = %e, "gc round skipped: listing clones");
                    continue;
                }
                Err(_) => {
                    warn!("gc round skipped: listing clones timed out after 30s");
                    continue;
                }
            };
        let schedule = Arc::clone(&schedule);
        let round = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            gc::plan(
                Some(&schedule.share_root),
                Some(&schedule.work_dir),
                &schedule.policy,
                &in_flight,
                now,
            )
            .map(|plan| gc::execute(plan, now))
        })
        .await;
        match round {
            Ok(Ok(outcome)) => {
                for r in &outcome.removed {
                    info!(path = %r.path.display(), kind = r.kind.as_str(), bytes = r.bytes, reason = %r.reason, "gc removed");
                }
                for e in &outcome.errors {
                    warn!(error = %e, "gc");
                }
            }
            Ok(Err(e)) => warn!(error = %e, "gc round failed"),
            Err(e) => warn!(error = %e, "gc round panicked"),
        }
    }
}
