//! The clone pod `podmigrate migrate` creates: the source's spec, pinned to the target node,
//! under our RuntimeClass, annotated with what to clone and how.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use podmigrate_vocabulary::{
    Mode, Phase, CLONE_OF_LABEL, CLONE_POD, CONTROLLER_LABELS, KEEP_ARCHIVE, MODE, PHASE, PREFIX,
    RUNTIME_CLASS,
};

/// kubectl's copy of the object that created the source: wrong for the clone, and large.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Kubernetes' `generateName` alphabet: no vowels (no accidental words), no look-alikes.
const SUFFIX_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
const SUFFIX_LEN: usize = 5;
/// A DNS-1123 label's limit: the pod's hostname is its name, cut there by the kubelet.
const MAX_NAME: usize = 63;

/// The clone of `source` named `clone_name`, to run on `target_node`.
///
/// Metadata is rebuilt from name, namespace, labels and annotations only, so everything the
/// API server or a controller generated for the source (uid, resourceVersion,
/// creationTimestamp, generation, managedFields, ownerReferences, finalizers, deletion
/// fields, generateName) is left behind: a clone must not be adopted or held by the
/// source's controllers.
///
/// The clone is pinned with `spec.nodeName`, as `kubectl debug --copy-to --same-node` pins
/// its copy, rather than with node affinity: a pod created with a node name bypasses the
/// scheduler, so the clone lands exactly on the target, at once, instead of wherever and
/// whenever the scheduler sees fit. The kubelet still admits it against nodeSelector,
/// affinity and resources, which stay as the source had them: a target that breaks them
/// fails the clone with the kubelet's reason rather than silently running the workload where
/// it must not. The one exception is pinning by node name (`kubernetes.io/hostname` in the
/// nodeSelector or in a required node affinity term, or a `metadata.name` field term): that
/// names the source's node, which is exactly what a migration changes, so it is retargeted
/// to the target ([`retarget_node_pinning`]).
///
/// Init containers are dropped: they ran on the source, and what they left in its containers'
/// filesystems and memory travels in the checkpoint. Run again on the clone, they would only
/// wait in vain for an archive (the shim cannot tell an init container from an app container).
/// Native sidecars go with them: a clone runs without them. (A pod that departs, evicted or
/// deleted, carries its sidecars and skips its init containers; operations.md.)
///
/// Also dropped from the spec: ephemeral containers (the API refuses them on create),
/// scheduling gates (refused together with a node name), and priority and preemption policy
/// (the Priority admission plugin recomputes them from priorityClassName and refuses a pod
/// whose values differ, e.g. after the class changed).
pub fn build_clone_pod(
    source: &Pod,
    target_node: &str,
    clone_name: &str,
    mode: Mode,
    keep_archive: bool,
) -> Pod {
    let mut labels: BTreeMap<String, String> = source
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(key, _)| !CONTROLLER_LABELS.contains(&key.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut annotations: BTreeMap<String, String> = source
        .metadata
        .annotations
        .iter()
        .flatten()
        .filter(|(key, _)| key.as_str() != LAST_APPLIED && !key.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let source_name = source.metadata.name.clone().unwrap_or_default();
    // How the source's agent finds the clone (annotations cannot be selected).
    labels.insert(CLONE_OF_LABEL.into(), source_name.clone());
    annotations.insert(CLONE_POD.into(), source_name);
    annotations.insert(MODE.into(), mode.as_str().into());
    annotations.insert(PHASE.into(), Phase::Pending.as_str().into());
    if keep_archive {
        annotations.insert(KEEP_ARCHIVE.into(), "true".into());
    }

    let mut spec = source.spec.clone().unwrap_or_default();
    spec.node_name = Some(target_node.to_string());
    spec.runtime_class_name = Some(RUNTIME_CLASS.to_string());
    spec.init_containers = None;
    spec.ephemeral_containers = None;
    spec.scheduling_gates = None;
    spec.priority = None;
    spec.preemption_policy = None;
    retarget_node_pinning(&mut spec, target_node);

    Pod {
        metadata: ObjectMeta {
            name: Some(clone_name.to_string()),
            namespace: source.metadata.namespace.clone(),
            labels: (!labels.is_empty()).then_some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The well-known label every kubelet sets to its node's name.
pub(crate) const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// The node field a required node affinity term can select on.
const NODE_NAME_FIELD: &str = "metadata.name";

/// Makes a pod pinned to its node by name pinned to `target` instead: the hostname key of
/// the nodeSelector, and the `In` hostname expressions and `metadata.name` field terms of the
/// required node affinity. Every other constraint is left as it was.
fn retarget_node_pinning(spec: &mut k8s_openapi::api::core::v1::PodSpec, target: &str) {
    if let Some(value) = spec
        .node_selector
        .as_mut()
        .and_then(|s| s.get_mut(HOSTNAME_LABEL))
    {
        *value = target.to_owned();
    }
    let terms = spec
        .affinity
        .as_mut()
        .and_then(|a| a.node_affinity.as_mut())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_mut()
        })
        .map(|r| &mut r.node_selector_terms);
    for term in terms.into_iter().flatten() {
        let expressions = term.match_expressions.iter_mut().flatten();
        let fields = term.match_fields.iter_mut().flatten();
        for requirement in expressions
            .filter(|r| r.key == HOSTNAME_LABEL)
            .chain(fields.filter(|r| r.key == NODE_NAME_FIELD))
            .filter(|r| r.operator == "In")
        {
            requirement.values = Some(vec![target.to_owned()]);
        }
    }
}

/// `<source>-mig-<5 random characters>`: tells at a glance what the clone is of, never
/// collides with another migration of the same source, and is a valid DNS-1123 label (the
/// source part is cut so the whole fits 63 characters, and its dots become dashes).
pub fn default_clone_name(source_name: &str) -> String {
    let mut rng = fastrand::Rng::new();
    let suffix: String = (0..SUFFIX_LEN)
        .map(|_| SUFFIX_ALPHABET[rng.usize(..SUFFIX_ALPHABET.len())] as char)
        .collect();
    clone_name_with_suffix(source_name, &suffix)
}

fn clone_name_with_suffix(source_name: &str, suffix: &str) -> String {
    let tail = format!("-mig-{suffix}");
    let stem: String = source_name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    let stem = stem.trim_start_matches('-');
    let stem = stem[..stem.len().min(MAX_NAME - tail.len())].trim_end_matches('-');
    let stem = if stem.is_empty() { "pod" } else { stem };
    format!("{stem}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinning_to_the_source_node_by_name_moves_to_the_target() {
        let source: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": "ns" },
            "spec": {
                "nodeName": "node-a",
                "nodeSelector": { "kubernetes.io/hostname": "node-a", "disk": "ssd" },
                "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        { "matchExpressions": [
                            { "key": "kubernetes.io/hostname", "operator": "In", "values": ["node-a"] },
                            { "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-c"] },
                            { "key": "zone", "operator": "In", "values": ["z1"] }
                        ] },
                        { "matchFields": [
                            { "key": "metadata.name", "operator": "In", "values": ["node-a"] }
                        ] }
                    ]
                } } },
                "containers": [{ "name": "c", "image": "i" }]
            }
        }))
        .unwrap();
        let clone = build_clone_pod(&source, "node-b", "p-mig-x", Mode::Migrate, false);
        let spec = clone.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-b"));
        let selector = spec.node_selector.unwrap();
        assert_eq!(selector["kubernetes.io/hostname"], "node-b");
        assert_eq!(selector["disk"], "ssd", "other constraints stay");
        let terms = spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms;
        let expressions = terms[0].match_expressions.as_ref().unwrap();
        assert_eq!(
            expressions[0].values.as_deref(),
            Some(&["node-b".to_owned()][..])
        );
        assert_eq!(
            expressions[1].values.as_deref(),
            Some(&["node-c".to_owned()][..])
        );
        assert_eq!(
            expressions[2].values.as_deref(),
            Some(&["z1".to_owned()][..])
        );
        let fields = terms[1].match_fields.as_ref().unwrap();
        assert_eq!(
            fields[0].values.as_deref(),
            Some(&["node-b".to_owned()][..])
        );
    }
    use crate::pod::is_valid_pod_name;
    use podmigrate_vocabulary::{MIGRATABLE, REASON, SOURCE_NODE};
    use serde_json::json;

    /// A Deployment's pod as the API server returns it.
    fn source() -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "web-7d4b9c-x2x7q",
                "generateName": "web-7d4b9c-",
                "namespace": "shop",
                "uid": "0d5c1a6e-1111-2222-3333-444455556666",
                "resourceVersion": "81234",
                "generation": 1,
                "creationTimestamp": "2025-01-01T00:00:00Z",
                "deletionTimestamp": "2025-01-01T01:00:00Z",
                "deletionGracePeriodSeconds": 30,
                "finalizers": ["example.com/keep"],
                "labels": {
                    "app": "web",
                    "pod-template-hash": "7d4b9c",
                    "controller-revision-hash": "web-5f6",
                    MIGRATABLE: "true"
                },
                "annotations": {
                    "prometheus.io/scrape": "true",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    CLONE_POD: "web-old",
                    PHASE: "Running",
                    REASON: "earlier",
                    SOURCE_NODE: "node-z"
                },
                "ownerReferences": [{
                    "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c",
                    "uid": "u", "controller": true, "blockOwnerDeletion": true
                }],
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]
            },
            "spec": {
                "nodeName": "node-a",
                "runtimeClassName": "runc",
                "priorityClassName": "high",
                "priority": 1000,
                "preemptionPolicy": "PreemptLowerPriority",
                "schedulingGates": [{"name": "example.com/gate"}],
                "nodeSelector": {"disk": "ssd"},
                "serviceAccountName": "web",
                "initContainers": [{"name": "setup", "image": "busybox:1.36"}],
                "containers": [{"name": "web", "image": "nginx:1.27",
                                "ports": [{"containerPort": 80}]}],
                "ephemeralContainers": [{"name": "debugger", "image": "busybox:1.36"}]
            },
            "status": {"phase": "Running", "podIP": "10.0.0.7"}
        }))
        .expect("a valid Pod")
    }

    fn clone() -> Pod {
        build_clone_pod(&source(), "node-b", "web-mig-bcdfg", Mode::Migrate, false)
    }

    #[test]
    fn generated_metadata_and_status_are_left_behind() {
        let pod = clone();
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("web-mig-bcdfg"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.generate_name, None);
        assert_eq!(meta.uid, None);
        assert_eq!(meta.resource_version, None);
        assert_eq!(meta.generation, None);
        assert_eq!(meta.creation_timestamp, None);
        assert_eq!(meta.deletion_timestamp, None);
        assert_eq!(meta.deletion_grace_period_seconds, None);
        assert_eq!(meta.finalizers, None);
        assert_eq!(meta.owner_references, None);
        assert_eq!(meta.managed_fields, None);
        assert_eq!(pod.status, None);
    }

    #[test]
    fn controller_labels_go_and_the_rest_stay() {
        let labels = clone().metadata.labels.unwrap();
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            vec![
                ("app".to_string(), "web".to_string()),
                (CLONE_OF_LABEL.to_string(), "web-7d4b9c-x2x7q".to_string()),
                (MIGRATABLE.to_string(), "true".to_string()),
            ]
        );
    }

    #[test]
    fn annotations_keep_the_users_and_carry_ours() {
        let annotations = clone().metadata.annotations.unwrap();
        let expected: BTreeMap<String, String> = [
            ("prometheus.io/scrape", "true"),
            (CLONE_POD, "web-7d4b9c-x2x7q"),
            (MODE, "migrate"),
            (PHASE, "Pending"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(annotations, expected);

        let kept = build_clone_pod(&source(), "node-b", "c", Mode::Clone, true);
        let annotations = kept.metadata.annotations.unwrap();
        assert_eq!(annotations[MODE], "clone");
        assert_eq!(annotations[KEEP_ARCHIVE], "true");
    }

    #[test]
    fn the_spec_is_pinned_to_the_target_under_our_runtime() {
        let spec = clone().spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-b"));
        assert_eq!(spec.runtime_class_name.as_deref(), Some(RUNTIME_CLASS));
        assert_eq!(spec.ephemeral_containers, None);
        assert_eq!(spec.scheduling_gates, None);
        assert_eq!(spec.priority, None);
        assert_eq!(spec.preemption_policy, None);
        // What the workload is stays as it was.
        let source_spec = source().spec.unwrap();
        assert_eq!(spec.containers, source_spec.containers);
        assert_eq!(
            spec.init_containers, None,
            "init containers ran on the source"
        );
        assert_eq!(spec.node_selector, source_spec.node_selector);
        assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
        assert_eq!(spec.service_account_name.as_deref(), Some("web"));
    }

    #[test]
    fn the_clone_serializes_as_a_pod_to_create() {
        let value = serde_json::to_value(clone()).unwrap();
        assert_eq!(value["apiVersion"], "v1");
        assert_eq!(value["kind"], "Pod");
        assert!(value.get("status").is_none());
        assert!(value["metadata"].get("uid").is_none());
    }

    #[test]
    fn default_names_are_short_valid_and_say_what_they_clone() {
        assert_eq!(clone_name_with_suffix("web-0", "bcdfg"), "web-0-mig-bcdfg");
        assert_eq!(
            clone_name_with_suffix("web.shop.v2", "bcdfg"),
            "web-shop-v2-mig-bcdfg"
        );
        // Cut to 63, never ending the stem on a dash.
        let long = format!("{}-{}", "a".repeat(52), "b".repeat(40));
        let name = clone_name_with_suffix(&long, "bcdfg");
        assert_eq!(name, format!("{}-mig-bcdfg", "a".repeat(52)));
        assert_eq!(clone_name_with_suffix("---", "bcdfg"), "pod-mig-bcdfg");

        let names: Vec<String> = (0..50)
            .map(|_| default_clone_name(&"x".repeat(100)))
            .collect();
        for name in &names {
            assert_eq!(name.len(), MAX_NAME, "{name}");
            assert!(is_valid_pod_name(name), "{name}");
            let suffix = name.rsplit('-').next().unwrap();
            assert_eq!(suffix.len(), SUFFIX_LEN);
            assert!(suffix.bytes().all(|b| SUFFIX_ALPHABET.contains(&b)));
        }
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        assert!(distinct.len() > 45, "{distinct:?}");
    }
}
