//! What the agent watches, and how events become reconciliations.
//!
//! Two streams: every clone in the cluster, found by the [`CLONE_OF_LABEL`] label (the source's
//! node must see clones pinned to other nodes, and annotations cannot be selected by the API
//! server); and this node's own pods (field selector `spec.nodeName`), where a clone made by
//! hand with only the annotation gets the label, so its source's agent sees it too.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::migration::{Agent, AgentError};
use super::reference::{clone_reference, pod_name};
use super::vocabulary::CLONE_OF_LABEL;

async fn reconcile(clone: Arc<Pod>, agent: Arc<Agent>) -> Result<Action, AgentError> {
    Ok(match agent.reconcile(&clone).await? {
        Some(after) => Action::requeue(after),
        None => Action::await_change(),
    })
}

fn error_policy(clone: Arc<Pod>, error: &AgentError, _agent: Arc<Agent>) -> Action {
    warn!(clone = %pod_name(&clone), %error, "reconciliation failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs until `shutdown` fires; a migration in progress is finished first (the controller
/// drains its reconcilers), so no source is left frozen by an orderly stop.
pub async fn run(agent: Arc<Agent>, shutdown: CancellationToken) {
    let clones: Api<Pod> = Api::all(agent.kube.clone());
    let controller = Controller::new(clones, watcher::Config::default().labels(CLONE_OF_LABEL))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(reconcile, error_policy, Arc::clone(&agent))
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => debug!(clone = %object.name, "reconciled"),
                Err(e) => debug!(error = %e, "controller"),
            }
        });
    let labeler = label_hand_made_clones(Arc::clone(&agent), shutdown.clone());
    info!(node = %agent.config.node_name, "agent watching pods");
    tokio::join!(controller, labeler);
    info!("agent stopped");
}

/// Labels clones on this node that carry the annotation but not the label.
async fn label_hand_made_clones(agent: Arc<Agent>, shutdown: CancellationToken) {
    let pods: Api<Pod> = Api::all(agent.kube.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", agent.config.node_name));
    let mut stream = watcher(pods, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.try_next() => next,
        };
        let pod = match next {
            Ok(Some(pod)) => pod,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "watching this node's pods");
                continue;
            }
        };
        let labelled = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CLONE_OF_LABEL));
        let Ok(Some(reference)) = clone_reference(&pod) else {
            continue;
        };
        if labelled || !super::reference::is_valid_pod_name(&reference.source) {
            continue;
        }
        let api: Api<Pod> = Api::namespaced(
            agent.kube.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        let patch = json!({ "metadata": { "labels": { CLONE_OF_LABEL: reference.source } } });
        match api
            .patch(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => info!(clone = %pod_name(&pod), "labelled a clone made by hand"),
            Err(e) => warn!(clone = %pod_name(&pod), error = %e, "labelling a clone"),
        }
    }
}
