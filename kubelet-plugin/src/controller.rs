//! A migrated pod's controller: which ones a migration can hand the clone over to, and how.
//!
//! A clone is created without its source's controller labels and owner, so no controller
//! counts it while it restores (vocabulary's `CONTROLLER_LABELS`). When the clone runs and the
//! source is retired, a ReplicaSet's pod (and so a Deployment's) is handed over: the clone
//! takes the source's `pod-template-hash` and owner reference, the source gives them up, then
//! goes. The ReplicaSet counts one pod throughout, so it creates no replacement and the clone
//! is not orphaned. Between the two patches it may count two; the source then carries the
//! lowest `pod-deletion-cost`, so a scale-down in that instant takes the source, which is
//! going anyway.
//!
//! Other controllers know their pods by more than labels: a StatefulSet by name and ordinal (a
//! clone of another name can never be its pod, and it would recreate the source's name beside
//! the clone), a Job by completion index and its tracking finalizer, a DaemonSet by node. A
//! migration of their pods is refused with the reason (see [`refusal`]).
//!
//! A pod that is deleted or evicted is not cloned: the pod its controller makes in its place
//! takes its checkpoint (the agent's `handoff`), and [`place`] is what the two have in common.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde_json::{json, Value};

use podmigrate_vocabulary::{CONTROLLER_LABELS, POD_DELETION_COST};

/// The pod's managing controller, if any.
pub fn controller_of(pod: &Pod) -> Option<&OwnerReference> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// Why migrating `pod` (whose name is `id`) cannot keep its controller whole, if it cannot.
pub fn refusal(pod: &Pod, id: &str) -> Option<String> {
    let owner = controller_of(pod)?;
    let why = match owner.kind.as_str() {
        "ReplicaSet" => return None,
        "StatefulSet" => "it would recreate the pod under its own name beside the clone; evicting the pod (kubectl drain) moves it into the pod the StatefulSet makes in its place",
        "DaemonSet" => "it runs one pod on each node, so the pod has nowhere to move",
        "Job" => "it knows its pods by completion index and would run this one's work again; evicting an Indexed Job's pod (kubectl drain) moves it into the pod the Job makes in its place",
        _ => "podmigrate hands over only a ReplicaSet's pods (and so a Deployment's)",
    };
    Some(format!(
        "cannot migrate pod {id}: it belongs to {} {}, and {why}; `--clone` copies it without taking its place",
        owner.kind, owner.name
    ))
}

/// A pod's place among its controller's pods: what the pod the controller makes in its place,
/// should it be deleted, has in common with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Place {
    pub owner: OwnerReference,
    /// Readable: `StatefulSet pod web-0 at revision web-5c7b9`, `ReplicaSet template 7d4b9`,
    /// `Job completion index 1`.
    pub describe: String,
    /// The same, as a label value (a digest: a pod name and a revision do not fit in one).
    pub label: String,
}

/// Kubernetes' annotation on an Indexed Job's pods.
const JOB_COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// A StatefulSet's pods carry the revision of the template they were made from.
const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The place of `pod` among its controller's pods, when its controller replaces a deleted pod
/// with one that can take its memory: a StatefulSet's pod of the same name and revision, a
/// ReplicaSet's pod of the same template, an Indexed Job's pod of the same completion index.
/// `None` for other pods: a DaemonSet's (its replacement stays on the node), a non-indexed
/// Job's (any pod may do any completion), a bare pod's (nothing replaces it).
pub fn place(pod: &Pod) -> Option<Place> {
    let owner = controller_of(pod)?;
    let label = |key: &str| pod.metadata.labels.as_ref()?.get(key).cloned();
    let describe = match owner.kind.as_str() {
        "StatefulSet" => format!(
            "StatefulSet pod {} at revision {}",
            pod.metadata.name.as_deref()?,
            label(CONTROLLER_REVISION_HASH)?
        ),
        "ReplicaSet" => format!("ReplicaSet template {}", label(POD_TEMPLATE_HASH)?),
        "Job" => format!(
            "Job completion index {}",
            pod.metadata
                .annotations
                .as_ref()?
                .get(JOB_COMPLETION_INDEX)?
        ),
        _ => return None,
    };
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{}\n{describe}", owner.uid));
    Some(Place {
        owner: owner.clone(),
        label: hex::encode(&digest[..20]),
        describe,
    })
}

/// The three patches that hand a ReplicaSet's pod over to its clone, in order: the source's
/// deletion cost, the clone's labels and owner, the source's release.
#[derive(Debug, Clone, PartialEq)]
pub struct Handover {
    pub owner: OwnerReference,
    pub source_cost: Value,
    pub clone: Value,
    pub source_release: Value,
}

/// How `source`'s ReplicaSet hands it over to its clone; `None` when it has no ReplicaSet.
pub fn handover(source: &Pod) -> Option<Handover> {
    let owner = controller_of(source).filter(|o| o.kind == "ReplicaSet")?;
    let labels: BTreeMap<&str, &str> = source
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| CONTROLLER_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let released: BTreeMap<&str, Value> = labels.keys().map(|k| (*k, Value::Null)).collect();
    let others: Vec<&OwnerReference> = source
        .metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|r| r.controller != Some(true))
        .collect();
    Some(Handover {
        owner: owner.clone(),
        source_cost: json!({"metadata": {"annotations": {POD_DELETION_COST: i32::MIN.to_string()}}}),
        clone: json!({"metadata": {"labels": labels, "ownerReferences": [owner]}}),
        source_release: json!({"metadata": {"labels": released, "ownerReferences": others}}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(kind: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": "web-7d4b9-x2k4p",
                "namespace": "shop",
                "labels": {"app": "web", "pod-template-hash": "7d4b9"},
                "ownerReferences": [
                    {"apiVersion": "v1", "kind": "ConfigMap", "name": "keeper", "uid": "c"},
                    {"apiVersion": "apps/v1", "kind": kind, "name": "web-7d4b9", "uid": "u",
                     "controller": true, "blockOwnerDeletion": true},
                ],
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_replica_sets_pod_is_handed_over_and_others_are_refused_with_their_reason() {
        assert_eq!(refusal(&pod("ReplicaSet"), "shop/web"), None);
        let sts = refusal(&pod("StatefulSet"), "shop/web").unwrap();
        assert!(
            sts.starts_with("cannot migrate pod shop/web: it belongs to StatefulSet web-7d4b9, and it would recreate"),
            "{sts}"
        );
        for kind in ["DaemonSet", "Job", "CronJobLike"] {
            assert!(refusal(&pod(kind), "shop/web").unwrap().contains(kind));
        }
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        assert_eq!(refusal(&bare, "shop/b"), None);
        assert_eq!(handover(&bare), None);
        assert_eq!(handover(&pod("Job")), None);
    }

    #[test]
    fn a_replacement_shares_its_place_with_the_pod_it_replaces_and_nothing_else_does() {
        let rs = place(&pod("ReplicaSet")).unwrap();
        assert_eq!(rs.describe, "ReplicaSet template 7d4b9");
        assert_eq!(rs.label.len(), 40);
        let mut sibling = pod("ReplicaSet");
        sibling.metadata.name = Some("web-7d4b9-q9z8w".into());
        assert_eq!(place(&sibling), Some(rs.clone()));

        let mut sts = pod("StatefulSet");
        sts.metadata.name = Some("web-0".into());
        assert_eq!(place(&sts), None, "no revision label");
        sts.metadata
            .labels
            .get_or_insert_default()
            .insert(CONTROLLER_REVISION_HASH.into(), "web-5c7b9".into());
        let at = place(&sts).unwrap();
        assert_eq!(at.describe, "StatefulSet pod web-0 at revision web-5c7b9");
        let mut next_revision = sts.clone();
        next_revision
            .metadata
            .labels
            .get_or_insert_default()
            .insert(CONTROLLER_REVISION_HASH.into(), "web-66f1a".into());
        assert_ne!(place(&next_revision).unwrap().label, at.label);

        let mut job = pod("Job");
        assert_eq!(place(&job), None, "a Job that is not Indexed");
        job.metadata
            .annotations
            .get_or_insert_default()
            .insert(JOB_COMPLETION_INDEX.into(), "1".into());
        assert_eq!(place(&job).unwrap().describe, "Job completion index 1");
        assert_eq!(place(&pod("DaemonSet")), None);
        let bare: Pod = serde_json::from_value(json!({"metadata": {"name": "b"}})).unwrap();
        assert_eq!(place(&bare), None);
    }

    #[test]
    fn the_clone_takes_the_template_hash_and_owner_and_the_source_keeps_the_rest() {
        let h = handover(&pod("ReplicaSet")).unwrap();
        assert_eq!(
            h.source_cost["metadata"]["annotations"][POD_DELETION_COST],
            "-2147483648"
        );
        assert_eq!(
            h.clone["metadata"]["labels"],
            json!({"pod-template-hash": "7d4b9"})
        );
        assert_eq!(h.clone["metadata"]["ownerReferences"][0]["uid"], "u");
        assert_eq!(
            h.source_release["metadata"]["labels"],
            json!({"pod-template-hash": null})
        );
        assert_eq!(
            h.source_release["metadata"]["ownerReferences"],
            json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "keeper", "uid": "c"}])
        );
    }
}
