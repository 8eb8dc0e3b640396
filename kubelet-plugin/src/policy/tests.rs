//! Every rule of [`decide`], over real `k8s-openapi` pods built from the JSON an API server
//! would return.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};

use super::*;
use crate::pod::clone_reference_raw;
use podmigrate_vocabulary::{CLONE_POD, MODE, SPEC_CLONE_POD_FIELD};

const SOURCE_NODE_NAME: &str = "node-a";
const TARGET_NODE: &str = "node-b";

fn running(name: &str) -> Value {
    json!({"name": name, "image": "x", "imageID": "", "ready": true, "restartCount": 0,
           "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}})
}

/// `shop/web-0` on node-a, Running, opted in by its own label.
fn source() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "web-0", "namespace": "shop", "uid": "uid-web-0",
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": "web", MIGRATABLE: "true"}
        },
        "spec": {
            "nodeName": SOURCE_NODE_NAME,
            "containers": [
                {"name": "web", "image": "nginx:1.27"},
                {"name": "log", "image": "busybox:1.36"}
            ]
        },
        "status": {"phase": "Running", "containerStatuses": [running("web"), running("log")]}
    })
}

/// A clone of `source` named `name`, made at `created` (minutes past 10:00), pinned to node-b.
fn clone_at(name: &str, source: &str, created: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "creationTimestamp": format!("2025-01-01T10:{created:02}:00Z"),
            "labels": {"app": "web"},
            "annotations": {CLONE_POD: source, MODE: "migrate", PHASE: "Pending"}
        },
        "spec": {
            "nodeName": TARGET_NODE,
            "runtimeClassName": RUNTIME_CLASS,
            "containers": [
                {"name": "web", "image": "nginx:1.27"},
                {"name": "log", "image": "busybox:1.36"}
            ]
        },
        "status": {"phase": "Pending"}
    })
}

fn clone() -> Value {
    clone_at("web-0-mig-abcde", "web-0", 0)
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a valid Pod")
}

fn namespace(labels: Value) -> Namespace {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": labels}
    }))
    .expect("a valid Namespace")
}

/// The usual call: source found, namespace without labels, no other clones.
fn decide_on(clone: Value, source: Value, node: &str) -> Decision {
    decide(
        &pod(clone),
        Some(&pod(source)),
        Some(&namespace(json!({}))),
        &[],
        node,
    )
}

fn refusal(decision: Decision) -> Refusal {
    match decision {
        Decision::Refuse { reason } => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn waiting(decision: Decision) -> WaitReason {
    match decision {
        Decision::Wait { reason } => reason,
        other => panic!("expected to wait, got {other:?}"),
    }
}

fn not_mine(decision: Decision) -> NotMineReason {
    match decision {
        Decision::NotMine { reason } => reason,
        other => panic!("expected not mine, got {other:?}"),
    }
}

fn checkpoint(mode: Mode) -> Decision {
    Decision::Checkpoint {
        source: "web-0".into(),
        containers: vec!["web".into(), "log".into()],
        mode,
    }
}

#[test]
fn a_ready_clone_is_checkpointed_by_the_source_node() {
    assert_eq!(
        decide_on(clone(), source(), SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );
    let mut c = clone();
    c["metadata"]["annotations"][MODE] = json!("clone");
    assert_eq!(
        decide_on(c.clone(), source(), SOURCE_NODE_NAME),
        checkpoint(Mode::Clone)
    );
    // No mode and no phase annotation: migrate, Pending.
    let annotations = c["metadata"]["annotations"].as_object_mut().unwrap();
    annotations.remove(MODE);
    annotations.remove(PHASE);
    assert_eq!(
        decide_on(c, source(), SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );
}

#[test]
fn a_pod_without_a_reference_is_not_a_clone() {
    let mut c = clone();
    c["metadata"]["annotations"] = json!({});
    assert_eq!(
        not_mine(decide_on(c, source(), SOURCE_NODE_NAME)),
        NotMineReason::NotAClone {
            pod: "shop/web-0-mig-abcde".into()
        }
    );
}

#[test]
fn a_source_on_another_node_is_that_nodes_business() {
    assert_eq!(
        not_mine(decide_on(clone(), source(), "node-c")),
        NotMineReason::SourceOnOtherNode {
            source: "shop/web-0".into(),
            node: SOURCE_NODE_NAME.into()
        }
    );
    // Even the clone's own node leaves it to the source's.
    assert!(matches!(
        decide_on(clone(), source(), TARGET_NODE),
        Decision::NotMine { .. }
    ));
}

#[test]
fn a_cross_namespace_reference_is_refused_once_by_the_clones_node() {
    let mut c = clone();
    c["metadata"]["annotations"][CLONE_POD] = json!("prod/web-0");
    let ns = namespace(json!({}));
    // The caller cannot look the source up: it passes none.
    let refused = refusal(decide(&pod(c.clone()), None, Some(&ns), &[], TARGET_NODE));
    assert_eq!(refused.event_reason(), "CrossNamespaceClone");
    assert!(matches!(
        refused,
        Refusal::Reference(ReferenceError::CrossNamespace { ref namespace, .. }) if namespace == "prod"
    ));
    assert_eq!(
        refused.to_string(),
        "pod shop/web-0-mig-abcde: clone reference \"prod/web-0\" names namespace \"prod\"; the \
         source must be in the clone's own namespace, named without one"
    );
    assert!(matches!(
        not_mine(decide(&pod(c), None, Some(&ns), &[], SOURCE_NODE_NAME)),
        NotMineReason::CloneOnOtherNode { .. }
    ));
}

#[test]
fn a_missing_source_is_refused_by_the_clones_node() {
    let ns = namespace(json!({}));
    let refused = refusal(decide(&pod(clone()), None, Some(&ns), &[], TARGET_NODE));
    assert_eq!(
        refused,
        Refusal::SourceMissing {
            source: "shop/web-0".into()
        }
    );
    assert_eq!(refused.to_string(), "source pod shop/web-0 does not exist");
    assert_eq!(
        not_mine(decide(
            &pod(clone()),
            None,
            Some(&ns),
            &[],
            SOURCE_NODE_NAME
        )),
        NotMineReason::CloneOnOtherNode {
            clone: "shop/web-0-mig-abcde".into(),
            node: TARGET_NODE.into()
        }
    );
}

#[test]
fn a_source_that_did_not_opt_in_is_refused() {
    let mut s = source();
    s["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(MIGRATABLE);
    let refused = refusal(decide_on(clone(), s.clone(), SOURCE_NODE_NAME));
    assert_eq!(
        refused,
        Refusal::NotOptedIn {
            source: "shop/web-0".into(),
            namespace: "shop".into(),
            pod_label: None
        }
    );
    assert_eq!(refused.event_reason(), "NotMigratable");
    assert_eq!(
        refused.to_string(),
        "source pod shop/web-0 is not migratable: label the pod or namespace shop \
         podmigrate.io/migratable=true to allow cloning its memory"
    );
    // No namespace object at all: the same.
    assert!(matches!(
        refusal(decide(
            &pod(clone()),
            Some(&pod(s)),
            None,
            &[],
            SOURCE_NODE_NAME
        )),
        Refusal::NotOptedIn { .. }
    ));
}

#[test]
fn a_namespace_label_opts_in_its_pods() {
    let mut s = source();
    s["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove(MIGRATABLE);
    let ns = namespace(json!({ MIGRATABLE: "true" }));
    assert_eq!(
        decide(
            &pod(clone()),
            Some(&pod(s.clone())),
            Some(&ns),
            &[],
            SOURCE_NODE_NAME
        ),
        checkpoint(Mode::Migrate)
    );
    // A label value other than "true" is no opt-in.
    let not_true = namespace(json!({ MIGRATABLE: "yes" }));
    assert!(matches!(
        refusal(decide(
            &pod(clone()),
            Some(&pod(s.clone())),
            Some(&not_true),
            &[],
            SOURCE_NODE_NAME
        )),
        Refusal::NotOptedIn { .. }
    ));
    // Another namespace's label says nothing about this one.
    let mut other: Namespace = ns.clone();
    other.metadata.name = Some("prod".into());
    assert!(matches!(
        refusal(decide(
            &pod(clone()),
            Some(&pod(s)),
            Some(&other),
            &[],
            SOURCE_NODE_NAME
        )),
        Refusal::NotOptedIn { .. }
    ));
}

#[test]
fn a_pods_own_label_overrides_its_namespace() {
    let mut s = source();
    s["metadata"]["labels"][MIGRATABLE] = json!("false");
    let ns = namespace(json!({ MIGRATABLE: "true" }));
    let refused = refusal(decide(
        &pod(clone()),
        Some(&pod(s)),
        Some(&ns),
        &[],
        SOURCE_NODE_NAME,
    ));
    assert_eq!(
        refused,
        Refusal::NotOptedIn {
            source: "shop/web-0".into(),
            namespace: "shop".into(),
            pod_label: Some("false".into())
        }
    );
    assert_eq!(
        refused.to_string(),
        "source pod shop/web-0 opts out of cloning (podmigrate.io/migratable=\"false\" overrides \
         namespace shop)"
    );
}

#[test]
fn the_earliest_of_two_clones_of_one_source_wins_in_either_order() {
    let first = clone_at("web-0-mig-first", "web-0", 0);
    let second = clone_at("web-0-mig-second", "web-0", 5);
    let both = [pod(first.clone()), pod(second.clone())];
    let ns = namespace(json!({}));
    let decide_for = |clone: &Value, others: &[Pod]| {
        decide(
            &pod(clone.clone()),
            Some(&pod(source())),
            Some(&ns),
            others,
            SOURCE_NODE_NAME,
        )
    };
    assert_eq!(
        refusal(decide_for(&second, &both)),
        Refusal::AnotherCloneInProgress {
            source: "shop/web-0".into(),
            other: "shop/web-0-mig-first".into()
        }
    );
    let reversed = [pod(second.clone()), pod(first.clone())];
    assert!(matches!(
        refusal(decide_for(&second, &reversed)),
        Refusal::AnotherCloneInProgress { .. }
    ));
    assert!(matches!(
        decide_for(&first, &both),
        Decision::Checkpoint { .. }
    ));
    assert!(matches!(
        decide_for(&first, &reversed),
        Decision::Checkpoint { .. }
    ));

    // Same creationTimestamp: the name decides.
    let twin_a = clone_at("web-0-mig-aaaaa", "web-0", 0);
    let twin_b = clone_at("web-0-mig-bbbbb", "web-0", 0);
    let twins = [pod(twin_b.clone()), pod(twin_a.clone())];
    assert!(matches!(
        decide_for(&twin_a, &twins),
        Decision::Checkpoint { .. }
    ));
    assert!(matches!(
        refusal(decide_for(&twin_b, &twins)),
        Refusal::AnotherCloneInProgress { ref other, .. } if other == "shop/web-0-mig-aaaaa"
    ));
}

#[test]
fn a_clone_under_way_blocks_even_an_earlier_one() {
    let early = clone_at("web-0-mig-early", "web-0", 0);
    let mut late = clone_at("web-0-mig-late", "web-0", 5);
    late["metadata"]["annotations"][PHASE] = json!("Checkpointing");
    let ns = namespace(json!({}));
    let refused = refusal(decide(
        &pod(early),
        Some(&pod(source())),
        Some(&ns),
        &[pod(late)],
        SOURCE_NODE_NAME,
    ));
    assert_eq!(
        refused.to_string(),
        "clone shop/web-0-mig-late of the same source pod shop/web-0 is already in progress"
    );
}

#[test]
fn finished_deleted_failed_or_unrelated_clones_do_not_block() {
    let ns = namespace(json!({}));
    let mut done = clone_at("web-0-mig-done", "web-0", 0);
    done["metadata"]["annotations"][PHASE] = json!("Running");
    let mut failed = clone_at("web-0-mig-failed", "web-0", 0);
    failed["metadata"]["annotations"][PHASE] = json!("Failed");
    let mut deleting = clone_at("web-0-mig-deleting", "web-0", 0);
    deleting["metadata"]["deletionTimestamp"] = json!("2025-01-01T11:00:00Z");
    let mut rejected = clone_at("web-0-mig-rejected", "web-0", 0);
    rejected["status"] = json!({"phase": "Failed", "reason": "NodeAffinity"});
    let other_source = clone_at("web-1-mig-other", "web-1", 0);
    let others: Vec<Pod> = [done, failed, deleting, rejected, other_source]
        .into_iter()
        .map(pod)
        .collect();
    let late = clone_at("web-0-mig-late", "web-0", 30);
    assert_eq!(
        decide(
            &pod(late),
            Some(&pod(source())),
            Some(&ns),
            &others,
            SOURCE_NODE_NAME
        ),
        checkpoint(Mode::Migrate)
    );
}

#[test]
fn a_source_being_deleted_is_refused() {
    let mut s = source();
    s["metadata"]["deletionTimestamp"] = json!("2025-01-01T11:00:00Z");
    s["metadata"]["deletionGracePeriodSeconds"] = json!(30);
    let refused = refusal(decide_on(clone(), s, SOURCE_NODE_NAME));
    assert_eq!(
        refused,
        Refusal::SourceDeleting {
            source: "shop/web-0".into()
        }
    );
    assert_eq!(
        refused.to_string(),
        "source pod shop/web-0 is being deleted"
    );
}

#[test]
fn a_clone_of_itself_is_refused() {
    let mut c = clone();
    c["metadata"]["annotations"][CLONE_POD] = json!("web-0-mig-abcde");
    // The caller looks the source up by name and finds the clone itself.
    let refused = refusal(decide_on(c.clone(), c, TARGET_NODE));
    assert_eq!(
        refused,
        Refusal::SelfReference {
            clone: "shop/web-0-mig-abcde".into()
        }
    );
    assert_eq!(refused.event_reason(), "SelfClone");
}

#[test]
fn an_unknown_mode_is_refused() {
    let mut c = clone();
    c["metadata"]["annotations"][MODE] = json!("teleport");
    let refused = refusal(decide_on(c, source(), SOURCE_NODE_NAME));
    assert!(
        matches!(refused, Refusal::UnknownMode(ModeError { ref value, .. }) if value == "teleport")
    );
    assert_eq!(
        refused.to_string(),
        "pod shop/web-0-mig-abcde: unknown podmigrate.io/mode \"teleport\" (expected \"migrate\" \
         or \"clone\")"
    );
}

#[test]
fn an_unknown_phase_is_refused() {
    let mut c = clone();
    c["metadata"]["annotations"][PHASE] = json!("Done");
    assert_eq!(
        refusal(decide_on(c, source(), SOURCE_NODE_NAME)),
        Refusal::UnknownPhase {
            clone: "shop/web-0-mig-abcde".into(),
            value: "Done".into()
        }
    );
}

#[test]
fn final_phases_are_left_alone_whatever_became_of_the_source() {
    for phase in [Phase::Running, Phase::Failed, Phase::RolledBack] {
        let mut c = clone();
        c["metadata"]["annotations"][PHASE] = json!(phase.as_str());
        let expected = WaitReason::Finished {
            clone: "shop/web-0-mig-abcde".into(),
            phase,
        };
        assert_eq!(
            waiting(decide_on(c.clone(), source(), SOURCE_NODE_NAME)),
            expected
        );
        // After a migration the source is gone on purpose: no "source missing" refusal.
        assert_eq!(
            waiting(decide(&pod(c), None, None, &[], TARGET_NODE)),
            expected
        );
    }
}

#[test]
fn restoring_is_the_shims_business() {
    let mut c = clone();
    c["metadata"]["annotations"][PHASE] = json!("Restoring");
    assert_eq!(
        waiting(decide_on(c, source(), SOURCE_NODE_NAME)),
        WaitReason::Restoring {
            clone: "shop/web-0-mig-abcde".into()
        }
    );
}

#[test]
fn a_restarted_agent_resumes_instead_of_checkpointing_twice() {
    for phase in [Phase::Checkpointing, Phase::Transferring] {
        let mut c = clone();
        c["metadata"]["annotations"][PHASE] = json!(phase.as_str());
        c["metadata"]["annotations"][SOURCE_NODE] = json!(SOURCE_NODE_NAME);
        let resume = Decision::Resume {
            source: "web-0".into(),
            phase,
        };
        assert_eq!(decide_on(c.clone(), source(), SOURCE_NODE_NAME), resume);
        // Even if the source is frozen and no longer looks Running, or is being deleted.
        let mut frozen = source();
        frozen["metadata"]["deletionTimestamp"] = json!("2025-01-01T11:00:00Z");
        assert_eq!(decide_on(c.clone(), frozen, SOURCE_NODE_NAME), resume);
        // Or gone: the recorded node still owns the rollback.
        assert_eq!(
            decide(&pod(c.clone()), None, None, &[], SOURCE_NODE_NAME),
            resume
        );
        assert_eq!(
            not_mine(decide_on(c.clone(), source(), TARGET_NODE)),
            NotMineReason::CheckpointedElsewhere {
                clone: "shop/web-0-mig-abcde".into(),
                node: SOURCE_NODE_NAME.into()
            }
        );
        // Without the record, the source's node is the one that checkpointed.
        c["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove(SOURCE_NODE);
        assert_eq!(decide_on(c.clone(), source(), SOURCE_NODE_NAME), resume);
        // Neither record nor source: the clone's node fails it.
        assert!(matches!(
            refusal(decide(&pod(c), None, None, &[], TARGET_NODE)),
            Refusal::SourceMissing { .. }
        ));
    }
}

#[test]
fn a_source_not_running_yet_is_waited_for() {
    let mut s = source();
    s["status"] = json!({"phase": "Pending"});
    assert_eq!(
        waiting(decide_on(clone(), s.clone(), SOURCE_NODE_NAME)),
        WaitReason::SourceNotRunning {
            source: "shop/web-0".into(),
            phase: "Pending".into()
        }
    );
    // Not even scheduled: the clone's node speaks for it, and waits too.
    s["spec"].as_object_mut().unwrap().remove("nodeName");
    assert!(matches!(
        waiting(decide_on(clone(), s, TARGET_NODE)),
        WaitReason::SourceNotRunning { .. }
    ));
}

#[test]
fn a_terminated_source_is_refused() {
    let mut s = source();
    s["status"] = json!({"phase": "Succeeded"});
    let refused = refusal(decide_on(clone(), s, SOURCE_NODE_NAME));
    assert_eq!(
        refused.to_string(),
        "source pod shop/web-0 has terminated (Succeeded): no running process to checkpoint"
    );
}

#[test]
fn a_container_that_is_not_running_is_waited_for() {
    let mut s = source();
    s["status"]["containerStatuses"][1] = json!({
        "name": "log", "image": "busybox:1.36", "imageID": "", "ready": false, "restartCount": 4,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}}
    });
    let reason = waiting(decide_on(clone(), s, SOURCE_NODE_NAME));
    assert_eq!(
        reason.to_string(),
        "container log of source pod shop/web-0 is not running (waiting: CrashLoopBackOff)"
    );
}

#[test]
fn a_source_without_app_containers_is_refused() {
    let mut s = source();
    s["spec"]["containers"] = json!([]);
    assert_eq!(
        refusal(decide_on(clone(), s, SOURCE_NODE_NAME)),
        Refusal::NoAppContainers {
            source: "shop/web-0".into()
        }
    );
}

#[test]
fn the_clones_containers_must_match_the_sources() {
    let mut c = clone();
    c["spec"]["containers"][1] = json!({"name": "sidecar", "image": "busybox:1.36"});
    let refused = refusal(decide_on(c, source(), SOURCE_NODE_NAME));
    assert_eq!(
        refused,
        Refusal::ContainersDiffer {
            source: "shop/web-0".into(),
            missing: vec!["log".into()],
            extra: vec!["sidecar".into()]
        }
    );
    assert_eq!(
        refused.to_string(),
        "the clone's containers do not match source pod shop/web-0's by name; missing from the \
         clone: log; not in the source: sidecar"
    );

    // Order does not matter; images do.
    let mut reordered = clone();
    let containers = reordered["spec"]["containers"].as_array_mut().unwrap();
    containers.reverse();
    assert_eq!(
        decide_on(reordered.clone(), source(), SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );
    reordered["spec"]["containers"][1]["image"] = json!("nginx:1.28");
    assert!(matches!(
        refusal(decide_on(reordered, source(), SOURCE_NODE_NAME)),
        Refusal::ImageDiffers { ref container, .. } if container == "web"
    ));
}

#[test]
fn both_pods_must_run_under_the_migrate_runtime() {
    let mut c = clone();
    c["spec"]
        .as_object_mut()
        .unwrap()
        .remove("runtimeClassName");
    let refused = refusal(decide_on(c, source(), SOURCE_NODE_NAME));
    assert_eq!(
        refused.to_string(),
        "clone shop/web-0-mig-abcde has runtimeClassName unset, not \"migrate\": its containers \
         would start fresh instead of being restored"
    );

    let mut s = source();
    s["spec"]["runtimeClassName"] = json!("kata");
    assert!(matches!(
        refusal(decide_on(clone(), s.clone(), SOURCE_NODE_NAME)),
        Refusal::SourceRuntimeClass { ref runtime_class, .. } if runtime_class == "kata"
    ));
    s["spec"]["runtimeClassName"] = json!(RUNTIME_CLASS);
    assert_eq!(
        decide_on(clone(), s, SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );
}

#[test]
fn daemonset_and_static_pods_are_refused() {
    let mut s = source();
    s["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "DaemonSet", "name": "log-agent", "uid": "u",
        "controller": true
    }]);
    assert_eq!(
        refusal(decide_on(clone(), s, SOURCE_NODE_NAME)),
        Refusal::DaemonSetPod {
            source: "shop/web-0".into(),
            daemon_set: "shop/log-agent".into()
        }
    );
    // A ReplicaSet owner is fine: the clone drops the label that would get it adopted.
    let mut s = source();
    s["metadata"]["ownerReferences"] = json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4", "uid": "u",
        "controller": true
    }]);
    assert_eq!(
        decide_on(clone(), s, SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );

    let mut s = source();
    s["metadata"]["annotations"] = json!({ MIRROR_POD_ANNOTATION: "abc" });
    assert!(matches!(
        refusal(decide_on(clone(), s, SOURCE_NODE_NAME)),
        Refusal::StaticPod { .. }
    ));
}

#[test]
fn a_clone_deleted_before_its_checkpoint_is_left_alone() {
    let mut c = clone();
    c["metadata"]["deletionTimestamp"] = json!("2025-01-01T11:00:00Z");
    assert_eq!(
        waiting(decide_on(c, source(), SOURCE_NODE_NAME)),
        WaitReason::CloneDeleting {
            clone: "shop/web-0-mig-abcde".into()
        }
    );
}

#[test]
fn a_clone_the_kubelet_rejected_is_refused() {
    let mut c = clone();
    c["status"] = json!({"phase": "Failed", "reason": "NodeAffinity",
                         "message": "Pod Predicate NodeAffinity failed"});
    assert_eq!(
        refusal(decide_on(c, source(), SOURCE_NODE_NAME)).to_string(),
        "clone shop/web-0-mig-abcde is Failed before its checkpoint (NodeAffinity): nothing to \
         restore into"
    );
}

#[test]
fn the_source_is_frozen_only_once_its_clone_has_a_node() {
    let mut c = clone();
    c["spec"].as_object_mut().unwrap().remove("nodeName");
    assert_eq!(
        waiting(decide_on(c.clone(), source(), SOURCE_NODE_NAME)),
        WaitReason::CloneNotScheduled {
            clone: "shop/web-0-mig-abcde".into()
        }
    );
    let mut s = source();
    s["spec"].as_object_mut().unwrap().remove("nodeName");
    s["status"] = json!({"phase": "Pending"});
    assert_eq!(
        waiting(decide_on(c, s, SOURCE_NODE_NAME)),
        WaitReason::Unscheduled {
            clone: "shop/web-0-mig-abcde".into()
        }
    );
}

#[test]
fn a_source_that_is_itself_still_being_restored_is_waited_for() {
    let mut s = source();
    s["metadata"]["annotations"] = json!({ CLONE_POD: "web-old", PHASE: "Restoring" });
    assert!(matches!(
        waiting(decide_on(clone(), s.clone(), SOURCE_NODE_NAME)),
        WaitReason::SourceMigrating {
            phase: Phase::Restoring,
            ..
        }
    ));
    // Once that migration finished, it may move again.
    s["metadata"]["annotations"][PHASE] = json!("Running");
    assert_eq!(
        decide_on(clone(), s, SOURCE_NODE_NAME),
        checkpoint(Mode::Migrate)
    );
}

#[test]
fn the_spec_field_counts_when_read_from_raw_json() {
    let mut raw = clone();
    raw["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(CLONE_POD);
    raw["spec"][SPEC_CLONE_POD_FIELD] = json!("web-0");
    let ns = namespace(json!({}));
    let typed = pod(raw.clone());
    assert!(matches!(
        decide(
            &typed,
            Some(&pod(source())),
            Some(&ns),
            &[],
            SOURCE_NODE_NAME
        ),
        Decision::NotMine {
            reason: NotMineReason::NotAClone { .. }
        }
    ));
    assert_eq!(
        decide_with_reference(
            &typed,
            clone_reference_raw(&raw),
            Some(&pod(source())),
            Some(&ns),
            &[],
            SOURCE_NODE_NAME
        ),
        checkpoint(Mode::Migrate)
    );
}

#[test]
fn every_refusal_is_one_line_naming_a_pod() {
    let refusals = [
        Refusal::Reference(ReferenceError::InvalidName {
            pod: "shop/c".into(),
            value: "Web".into(),
        }),
        Refusal::SelfReference {
            clone: "shop/c".into(),
        },
        Refusal::UnknownPhase {
            clone: "shop/c".into(),
            value: "x".into(),
        },
        Refusal::CloneFinished {
            clone: "shop/c".into(),
            phase: "Failed".into(),
            why: None,
        },
        Refusal::CloneRuntimeClass {
            clone: "shop/c".into(),
            runtime_class: Some("runc".into()),
        },
        Refusal::SourceFinished {
            source: "shop/s".into(),
            phase: "Failed".into(),
        },
        Refusal::StaticPod {
            source: "shop/s".into(),
        },
        Refusal::ImageDiffers {
            source: "shop/s".into(),
            container: "web".into(),
            source_image: "a".into(),
            clone_image: "b".into(),
        },
    ];
    for refusal in refusals {
        let message = refusal.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("shop/"), "{message}");
        assert!(!refusal.event_reason().contains(' '));
    }
}
