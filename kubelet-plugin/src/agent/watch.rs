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
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{watcher, WatchStreamExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::containerd::Containerd;
use super::machine::{event, Agent, AgentError, Next};
use super::ports::{Cluster, DirShare, KubeCluster};
use crate::pod::{annotation, clone_reference_raw, pod_name};
use podmigrate_vocabulary::{Phase, CLONE_OF_LABEL, PHASE, REASON};

/// The agent on the real Kubernetes API, containerd and share.
pub type LiveAgent = Agent<KubeCluster, Containerd, DirShare>;

async fn reconcile(clone: Arc<Pod>, agent: Arc<LiveAgent>) -> Result<Action, AgentError> {
    Ok(match agent.reconcile(&clone).await? {
        Next::Now => Action::requeue(Duration::ZERO),
        Next::After(after) => Action::requeue(after),
        Next::OnChange => Action::await_change(),
    })
}

fn error_policy(clone: Arc<Pod>, error: &AgentError, _agent: Arc<LiveAgent>) -> Action {
    warn!(clone = %pod_name(&clone), %error, "reconciliation failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs until `shutdown` fires; a step in progress is finished first (the controller drains
/// its reconcilers), and the next agent resumes from the recorded phase.
pub async fn run(agent: Arc<LiveAgent>, shutdown: CancellationToken) {
    let clones: Api<Pod> = Api::all(agent.cluster.client.clone());
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

/// Labels clones on this node that carry the annotation but not the label, and answers clones
/// that name their source only in `spec.clonePod`.
///
/// Pods are read raw here (a typed `Pod` drops fields it does not know), so the field of the
/// original proof of concept is seen where a patched API server keeps it. Such a clone cannot
/// be restored: the runtime reads the clone reference from the pod's annotations when the pod
/// starts, which is before any agent could add one, and a clone that silently started fresh
/// would, in migrate mode, cost the source its state. So it is refused, with the way out
/// (`podmigrate apply` moves the field into the annotation before the pod exists).
async fn label_hand_made_clones(agent: Arc<LiveAgent>, shutdown: CancellationToken) {
    let resource = ApiResource::erase::<Pod>(&());
    let pods: Api<DynamicObject> = Api::all_with(agent.cluster.client.clone(), &resource);
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
        let object = match next {
            Ok(Some(object)) => object,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "watching this node's pods");
                continue;
            }
        };
        let Ok(raw) = serde_json::to_value(&object) else {
            continue;
        };
        let Ok(Some(reference)) = clone_reference_raw(&raw) else {
            continue;
        };
        let Ok(pod) = serde_json::from_value::<Pod>(raw) else {
            continue;
        };
        let labelled = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(CLONE_OF_LABEL));
        let phase = annotation(&pod, PHASE);
        if (labelled && !reference.from_field) || phase.is_some_and(|p| p != "Pending") {
            continue;
        }
        if !crate::pod::is_valid_pod_name(&reference.source) {
            continue;
        }
        let mut patch = json!({ "metadata": { "labels": { CLONE_OF_LABEL: reference.source } } });
        let refusal = reference.from_field.then(|| {
            format!(
                "pod {} names its source only in spec.clonePod; the runtime reads the clone reference \
                 from the podmigrate.io/clone-pod annotation when the pod starts, so create it with \
                 `podmigrate apply -f` (which moves the field into the annotation)",
                pod_name(&pod)
            )
        });
        if let Some(reason) = &refusal {
            patch["metadata"]["annotations"] =
                json!({ PHASE: Phase::Failed.as_str(), REASON: reason });
        }
        let api: Api<Pod> = Api::namespaced(
            agent.cluster.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        );
        match api
            .patch(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) if refusal.is_some() => {
                warn!(clone = %pod_name(&pod), "refused a clone named only in spec.clonePod");
                let note = refusal.as_deref().unwrap_or_default();
                let refused = event(
                    kube::runtime::events::EventType::Warning,
                    "CloneFieldOnly",
                    "Refuse",
                    note,
                );
                agent.cluster.event(&pod, refused).await;
            }
            Ok(_) => info!(clone = %pod_name(&pod), "labelled a clone made by hand"),
            Err(e) => warn!(clone = %pod_name(&pod), error = %e, "labelling a clone"),
        }
    }
}
