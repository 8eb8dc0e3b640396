//! The records of departures from this node, followed to their end: a committed one once the
//! pod that claimed it has created its containers (or once nobody claimed it in [`RECORD_TTL`]), a failed one a little
//! after it failed (its archives went when it failed). Its archives and share lease go, then the
//! record. A record still checkpointing that no departure in this agent is writing was left by
//! an agent that stopped mid-way: its pod is thawed, and the record fails.
//!
//! A controller over the records labelled with this node: each reconciliation looks once and
//! asks to be called again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use podmigrate_vocabulary::{Departure, DEPARTED_FROM_LABEL, REPLACES};
use tracing::{debug, info, warn};

use super::record::{self, Record};
use super::{Handoff, RECORD_TTL};
use crate::agent::ports::{Cluster, Share};
use crate::pod::annotation;

/// How often a record is looked at while its departure goes on.
const FOLLOW_POLL: Duration = Duration::from_secs(2);
/// How long a failed record stays, so a replacement still waiting for it reads why.
const FAILED_KEPT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("reading pod {pod}: {source}")]
    Pod {
        pod: String,
        source: crate::agent::ports::ClusterError,
    },
    #[error("removing departure record {record}: {source}")]
    Remove { record: String, source: kube::Error },
}

/// Whether `holder`, the pod that claimed the departure of `departed`, has created every
/// container (each runs, or ran) or is gone: either way the archives are no longer waited for.
async fn taken(
    handoff: &Handoff,
    namespace: &str,
    holder: &str,
    departed: &str,
) -> Result<bool, ReleaseError> {
    let pod = handoff
        .agent
        .cluster
        .pod(namespace, holder)
        .await
        .map_err(|source| ReleaseError::Pod {
            pod: format!("{namespace}/{holder}"),
            source,
        })?;
    let Some(pod) = pod else {
        return Ok(true);
    };
    if annotation(&pod, REPLACES) != Some(departed) {
        return Ok(false);
    }
    let statuses = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref());
    let wanted = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    // A container that runs, or ran and ended (a Job's), has been created: restored, or
    // started fresh, it needs the archive no more.
    Ok(statuses.is_some_and(|all| {
        all.len() == wanted
            && all.iter().all(|c| {
                c.state
                    .as_ref()
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some())
            })
    }))
}

async fn reconcile(lease: Arc<Lease>, handoff: Arc<Handoff>) -> Result<Action, ReleaseError> {
    let record = Record {
        lease: (*lease).clone(),
    };
    let namespace = lease.metadata.namespace.as_deref().unwrap_or_default();
    let departed = record.departed_pod().to_string();
    let uid = record.departure().to_string();
    let (age, since_change) = record.ages();
    let expired = age >= RECORD_TTL.as_secs() as i64;
    let done = match record.state() {
        Some(Departure::Committed) => match record.holder() {
            Some(holder) => expired || taken(&handoff, namespace, holder, &departed).await?,
            None => expired,
        },
        Some(Departure::Failed) => since_change >= FAILED_KEPT.as_secs() as i64,
        Some(Departure::Checkpointing) | None => {
            if handoff.departing(&uid) {
                false
            } else {
                abandon(&handoff, namespace, &departed, &uid).await;
                return Ok(Action::requeue(FOLLOW_POLL));
            }
        }
    };
    if !done {
        return Ok(Action::requeue(FOLLOW_POLL));
    }
    let agent = &handoff.agent;
    if let Err(e) = agent
        .share
        .release(namespace, &departed, &uid, &record.containers(), false)
    {
        warn!(departed = %format!("{namespace}/{departed}"), error = %e, "releasing a departure's archives; trying again");
        return Ok(Action::requeue(FOLLOW_POLL));
    }
    record::remove(&agent.cluster.client, &record)
        .await
        .map_err(|source| ReleaseError::Remove {
            record: format!("{namespace}/{}", record::name(&uid)),
            source,
        })?;
    info!(departed = %format!("{namespace}/{departed}"), holder = ?record.holder(), "departure released");
    Ok(Action::await_change())
}

/// A departure this agent no longer runs (it restarted mid-checkpoint): the pod, if still
/// here, is thawed, and the record fails, so the replacement starts fresh.
async fn abandon(handoff: &Handoff, namespace: &str, departed: &str, uid: &str) {
    let agent = &handoff.agent;
    if let Ok(containers) = agent.runtime.app_containers(namespace, departed).await {
        agent.thaw(&containers).await;
    }
    if let Err(e) = agent.share.release(namespace, departed, uid, &[], false) {
        warn!(error = %e, "removing an abandoned departure's lease");
    }
    let reason = "the agent stopped while it checkpointed the pod";
    if let Err(e) = record::set(
        &agent.cluster.client,
        namespace,
        uid,
        Departure::Failed,
        Some(reason),
    )
    .await
    {
        warn!(error = %e, "recording an abandoned departure");
    }
}

fn error_policy(lease: Arc<Lease>, error: &ReleaseError, _: Arc<Handoff>) -> Action {
    warn!(record = ?lease.metadata.name, %error, "following a departure; trying again");
    Action::requeue(Duration::from_secs(5))
}

/// Follows the records of departures from this node until `shutdown`.
pub async fn run(handoff: Arc<Handoff>) {
    let records: Api<Lease> = Api::all(handoff.agent.cluster.client.clone());
    let selector = format!("{DEPARTED_FROM_LABEL}={}", handoff.agent.config.node_name);
    let shutdown = handoff.shutdown.clone();
    Controller::new(records, watcher::Config::default().labels(&selector))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, Arc::clone(&handoff))
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "departure records");
            }
        })
        .await;
}
