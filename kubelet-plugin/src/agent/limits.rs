//! How many migrations may run at once: out of one node (`--max-outbound`, KubeVirt's
//! parallelOutboundMigrationsPerNode), into one node (`--max-inbound`), and in the whole
//! cluster (`--max-cluster`, KubeVirt's parallelMigrationsPerCluster). Counted from the clones
//! the API server holds, so a restarted agent counts the same.

use k8s_openapi::api::core::v1::Pod;
use podmigrate_vocabulary::{Phase, PHASE, SOURCE_NODE};

use crate::pod::annotation;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_outbound: usize,
    pub max_inbound: usize,
    pub max_cluster: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_outbound: 2,
            max_inbound: 2,
            max_cluster: 5,
        }
    }
}

/// Whether a clone's migration holds a slot: claimed and not yet ended.
pub fn in_flight(clone: &Pod) -> bool {
    annotation(clone, PHASE)
        .and_then(Phase::parse)
        .is_some_and(|p| {
            matches!(
                p,
                Phase::Checkpointing | Phase::Transferring | Phase::Restoring | Phase::PostCopy
            )
        })
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// Why `clone` must wait, given every clone in the cluster, when a limit is reached; its
/// source runs on `this_node`. The reason is the clone's queued reason, word for word.
pub fn queued_reason(
    clone: &Pod,
    clones: &[Pod],
    this_node: &str,
    limits: &Limits,
) -> Option<String> {
    let uid = clone.metadata.uid.as_deref();
    let running: Vec<&Pod> = clones
        .iter()
        .filter(|c| c.metadata.uid.as_deref() != uid && in_flight(c))
        .collect();
    let outbound = running
        .iter()
        .filter(|c| annotation(c, SOURCE_NODE) == Some(this_node))
        .count();
    if outbound >= limits.max_outbound {
        return Some(format!(
            "queued: {} outbound migration(s) already run on node {this_node} (--max-outbound)",
            limits.max_outbound
        ));
    }
    if let Some(target) = node_of(clone) {
        let inbound = running
            .iter()
            .filter(|c| node_of(c) == Some(target))
            .count();
        if inbound >= limits.max_inbound {
            return Some(format!(
                "queued: {} inbound migration(s) already run to node {target} (--max-inbound)",
                limits.max_inbound
            ));
        }
    }
    if running.len() >= limits.max_cluster {
        return Some(format!(
            "queued: {} migration(s) already run in the cluster (--max-cluster)",
            limits.max_cluster
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone(uid: &str, node: &str, source_node: &str, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"uid": uid, "name": uid, "annotations": {PHASE: phase, SOURCE_NODE: source_node}},
            "spec": {"nodeName": node, "containers": []}
        }))
        .unwrap()
    }

    #[test]
    fn each_limit_queues_with_its_own_reason_and_only_running_migrations_count() {
        let limits = Limits {
            max_outbound: 1,
            max_inbound: 1,
            max_cluster: 2,
        };
        let me = clone("me", "node-b", "", "Pending");
        // A finished and a pending clone hold nothing.
        let idle = [
            clone("a", "node-b", "node-a", "Running"),
            clone("b", "node-b", "node-a", "Pending"),
        ];
        assert_eq!(queued_reason(&me, &idle, "node-a", &limits), None);
        let out = [clone("a", "node-c", "node-a", "Checkpointing")];
        assert!(queued_reason(&me, &out, "node-a", &limits)
            .unwrap()
            .contains("outbound"));
        let into = [clone("a", "node-b", "node-c", "Restoring")];
        let reason = queued_reason(&me, &into, "node-a", &limits).unwrap();
        assert!(
            reason.contains("inbound") && reason.contains("node-b"),
            "{reason}"
        );
        let cluster = [
            clone("a", "node-c", "node-d", "Transferring"),
            clone("b", "node-d", "node-c", "Restoring"),
        ];
        assert!(queued_reason(&me, &cluster, "node-a", &limits)
            .unwrap()
            .contains("--max-cluster"));
        // Its own record never counts against it.
        let itself = [clone("me", "node-b", "node-a", "Checkpointing")];
        assert_eq!(queued_reason(&me, &itself, "node-a", &limits), None);
    }
}
