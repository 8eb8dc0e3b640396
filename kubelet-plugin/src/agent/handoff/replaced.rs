//! Whether a deleted pod's controller will make a pod in its place: not when the controller is
//! gone or being deleted itself, a StatefulSet scales below the pod's ordinal, a ReplicaSet
//! already has its replicas without the pod (it scales down), or a Job has ended or is
//! suspended. A pod whose checkpoint nobody takes costs a freeze and a record until
//! [`super::RECORD_TTL`]; where it cannot be told, the pod departs.

use std::fmt::Debug;

use k8s_openapi::api::apps::v1::{ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::serde::de::DeserializeOwned;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ListParams};
use kube::Resource;

use crate::controller::{controller_of, Place};
use crate::pod::pod_name;

/// The pod's controller `owner`, unless it is gone, another of the name, or being deleted.
async fn live<K>(
    client: &kube::Client,
    namespace: &str,
    owner: &OwnerReference,
) -> Result<Option<K>, String>
where
    K: Resource<Scope = NamespaceResourceScope> + Clone + Debug + DeserializeOwned,
    <K as Resource>::DynamicType: Default,
{
    let found = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(&owner.name)
        .await
        .map_err(|e| format!("reading {} {}: {e}", owner.kind, owner.name))?;
    Ok(found.filter(|k| {
        let meta = k.meta();
        meta.uid.as_deref() == Some(owner.uid.as_str()) && meta.deletion_timestamp.is_none()
    }))
}

/// The ordinal a StatefulSet's pod carries at the end of its name.
fn ordinal(pod: &Pod) -> Option<i32> {
    pod.metadata
        .name
        .as_deref()?
        .rsplit('-')
        .next()?
        .parse()
        .ok()
}

/// The pods of ReplicaSet `owner` other than `pod` that were made before `pod` was deleted and
/// are not being deleted: a replacement is made after the deletion, so it is never among them.
fn older_siblings(pods: &[Pod], pod: &Pod, owner: &OwnerReference) -> usize {
    let deleted_at = pod
        .metadata
        .deletion_timestamp
        .as_ref()
        .map(|t| t.0.as_second() - pod.metadata.deletion_grace_period_seconds.unwrap_or(0))
        .unwrap_or(i64::MAX);
    pods.iter()
        .filter(|p| p.metadata.uid != pod.metadata.uid)
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| controller_of(p).is_some_and(|o| o.uid == owner.uid))
        .filter(|p| {
            p.metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| t.0.as_second() < deleted_at)
        })
        .count()
}

/// `Ok` when `pod`'s controller (of `place`) will make a pod in its place; why not otherwise.
pub(super) async fn replaced(
    client: &kube::Client,
    pod: &Pod,
    place: &Place,
) -> Result<(), String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let owner = &place.owner;
    let not = |why: String| Err(format!("{why}, so nothing replaces pod {}", pod_name(pod)));
    let gone = || {
        not(format!(
            "{} {} is gone or being deleted",
            owner.kind, owner.name
        ))
    };
    match owner.kind.as_str() {
        "StatefulSet" => {
            let Some(set) = live::<StatefulSet>(client, namespace, owner).await? else {
                return gone();
            };
            let replicas = set.spec.replicas.unwrap_or(1);
            if ordinal(pod).is_some_and(|o| o >= replicas) {
                return not(format!(
                    "StatefulSet {} scales down to {replicas}",
                    owner.name
                ));
            }
        }
        "ReplicaSet" => {
            let Some(set) = live::<ReplicaSet>(client, namespace, owner).await? else {
                return gone();
            };
            let replicas = set.spec.replicas.unwrap_or(1);
            let pods = Api::<Pod>::namespaced(client.clone(), namespace)
                .list(&ListParams::default())
                .await
                .map_err(|e| format!("listing the pods of namespace {namespace}: {e}"))?;
            if older_siblings(&pods.items, pod, owner) as i32 >= replicas {
                return not(format!(
                    "ReplicaSet {} scales down to {replicas}",
                    owner.name
                ));
            }
        }
        "Job" => {
            let Some(job) = live::<Job>(client, namespace, owner).await? else {
                return gone();
            };
            if job.spec.as_ref().and_then(|s| s.suspend) == Some(true) {
                return not(format!("Job {} is suspended", owner.name));
            }
            let ended = job
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| {
                    matches!(
                        c.type_.as_str(),
                        "Complete" | "Failed" | "FailureTarget" | "SuccessCriteriaMet"
                    ) && c.status == "True"
                });
            if ended {
                return not(format!("Job {} is ending", owner.name));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, created: &str, deleted: Option<&str>) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name, "uid": name, "creationTimestamp": created,
                "deletionTimestamp": deleted, "deletionGracePeriodSeconds": deleted.map(|_| 30),
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1",
                                     "uid": "rs", "controller": true}],
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_replica_set_scales_down_when_its_older_pods_are_enough_without_the_deleted_one() {
        // Deleted at 10:00:00 (its deletion timestamp is 30 s later).
        let leaving = pod(
            "leaving",
            "2026-12-05T09:00:00Z",
            Some("2026-12-05T10:00:30Z"),
        );
        let owner = controller_of(&leaving).unwrap().clone();
        let older = pod("older", "2026-12-05T09:30:00Z", None);
        let replacement = pod("replacement", "2026-12-05T10:00:00Z", None);
        let terminating = pod(
            "terminating",
            "2026-12-05T09:10:00Z",
            Some("2026-12-05T10:00:40Z"),
        );
        let all = [leaving.clone(), older, replacement, terminating];
        assert_eq!(older_siblings(&all, &leaving, &owner), 1);
        let mut sts = leaving.clone();
        sts.metadata.name = Some("db-2".into());
        assert_eq!(ordinal(&sts), Some(2));
    }
}
