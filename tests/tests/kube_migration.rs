//! podmigrate on a real Kubernetes: the cluster of `scripts/local-up-cluster.sh` (stock
//! kube-apiserver, scheduler, controller-manager, and a stock kubelet, containerd with our shim
//! and kube-proxy on each of node-a and node-b; the agent as its DaemonSet under the shipped
//! RBAC), driven with kube-rs and the real `kubectl` and `kubectl migrate`.
//!
//! * the tutorial: a counter on node-a counts to 5, `kubectl migrate counter --to node-b` ends
//!   with its summary line, node-b's clone answers 6 at its own pod IP, its count file came
//!   along, the source is gone; then `--clone` of the clone leaves both running, diverging;
//! * post-copy (the default) and stop-and-copy each carry 256 MiB of memory byte for byte;
//!   post-copy's clone answers before the memory has moved, and its archive holds next to none
//!   of it; neither leaves a copy of the checkpoint on a node or the share;
//! * a pod with two counters migrates whole;
//! * a pod holding a connection over its loopback, a file lock and a client's connection from
//!   outside migrates: the first two carry on, the same connection and the same lock, and the
//!   client's connection ends;
//! * a Deployment's pod is handed over: its clone is owned by the same ReplicaSet, which makes
//!   no other pod; a StatefulSet's pod is refused with the reason;
//! * emptyDir volumes, one on disk shared by two containers and one in memory, land in the
//!   clone's volumes of the same names;
//! * `kubectl migrate` refuses early, in one line, changing nothing: a pod not opted in, a
//!   missing node, the pod's own node, a pod that is not Running;
//! * a restored container that exits is restarted by kubelet fresh, never restored again;
//! * a clone pod deleted mid-restore, and node-b's kubelet restarted mid-migration, leave the
//!   source running (thawed) with an Event that says what happened;
//! * `kubectl migrate cancel` mid-restore, and a `kubectl migrate` that times out, thaw the
//!   source, remove the clone and sweep the archive;
//! * an archive corrupted on the share (while node-b's kubelet is briefly down, so node-b's shim
//!   only ever sees the corrupted archive) is refused by node-b's shim: the migration rolls
//!   back, the source counts on, the CLI gives the shim's reason;
//! * node-a's agent at `--max-outbound 1` with two migrations asked at once: one is queued
//!   (reason and one `Queued` Event) while the other runs, never both at once;
//! * the share is what the cluster was brought up with: a directory bound into each node, or
//!   (`PODMIGRATE_SHARE=smb`, as scripts/test.sh's containerd 1.6 rerun does) an SMB share
//!   mounted on each node through smbnetfs, so every test above also runs across SMB;
//! * the agent's ServiceAccount may do everything the agent does (Events repeated by kube's
//!   recorder are patched).
//!
//! Each test works in its own namespace. Tests that stop a kubelet take the cluster alone.
//! Needs root; skips otherwise, unless `PODMIGRATE_E2E_REQUIRE` is set, in which case it fails.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use kube::api::{Api, ListParams, PostParams};
use podmigrate_e2e::cli::{parse_summary, CliRun, Summary};
use podmigrate_e2e::cluster::{
    counter_controller, counter_pod, skip_reason, KubeCluster, TestNamespace, AGENT_NAMESPACE,
    NODE_A, NODE_B, PHASE, REASON,
};
use podmigrate_e2e::counter::{hold_connection, wait_counter_ready, Counter};
use podmigrate_e2e::harness::skip;
use tokio::io::AsyncReadExt;

/// Bound on pods coming up, going away, and similar waits.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on one `kubectl migrate`.
const CLI_TIMEOUT: Duration = Duration::from_secs(150);

async fn cluster() -> Option<KubeCluster> {
    KubeCluster::for_test(None).await
}

fn counter() -> Counter {
    Counter::new("counter", 8080, "/tmp/count")
}

/// The single clone of `source`.
async fn clone_name(ns: &TestNamespace, source: &str) -> String {
    let clones = ns.clones_of(source).await.unwrap();
    assert_eq!(clones.len(), 1, "clones of {source}: {clones:?}");
    clones[0].metadata.name.clone().unwrap()
}

fn assert_cli_ok(run: &CliRun, verb: &str, pod: &str, from: &str, to: &str) -> Summary {
    assert!(
        run.success,
        "kubectl migrate failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        run.code, run.stdout, run.stderr
    );
    let summary = parse_summary(run.last_line())
        .unwrap_or_else(|| panic!("unexpected last line {:?}", run.last_line()));
    assert_eq!(summary.verb, verb);
    assert_eq!(summary.pod, pod);
    assert_eq!((summary.from.as_str(), summary.to.as_str()), (from, to));
    assert!(
        summary.frozen_seconds <= summary.total_seconds + 0.05,
        "{summary:?}"
    );
    assert!(!summary.archived.starts_with("0 "), "{summary:?}");
    summary
}

/// A failed `kubectl migrate`: exactly one line on stderr, containing `what`.
fn assert_refused(run: &CliRun, what: &str) {
    assert!(!run.success, "kubectl migrate succeeded: {}", run.stdout);
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "not one line: {:?}", run.stderr);
    assert!(lines[0].contains(what), "{:?} lacks {what:?}", lines[0]);
}

/// Megabytes in "256.0 MiB" (or GiB), as the CLI prints a byte count.
fn mib(amount: &str) -> f64 {
    let (number, unit) = amount.split_once(' ').unwrap();
    let number: f64 = number.parse().unwrap();
    match unit {
        "GiB" => number * 1024.0,
        "MiB" => number,
        "KiB" => number / 1024.0,
        _ => 0.0,
    }
}

/// Both transfers carry 256 MiB of memory byte for byte; post-copy resumes the clone before
/// the memory has moved, then streams it, and its archive holds next to none of it.
#[tokio::test(flavor = "multi_thread")]
async fn both_transfers_carry_the_memory_byte_for_byte() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("transfers").await.unwrap();
    let big = || counter().ballast(256);
    for (pod, transfer) in [("pc", "postcopy"), ("sc", "stop-and-copy")] {
        ns.start_counters(pod, NODE_A, &[big()], WAIT)
            .await
            .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.diagnostics(20)));
        assert_eq!(ns.hit(pod, 8080).await.unwrap(), 1);
        let before = ns.checksum(pod, 8080).await.unwrap();
        let uid = ns.uid_of(pod).await.unwrap();
        let run = ns
            .kubectl_migrate(&[pod, "--to", NODE_B, "--transfer", transfer], CLI_TIMEOUT)
            .await
            .unwrap();
        if !run.success {
            panic!("{run:?}\n{}", cluster.diagnostics(40));
        }
        let summary = assert_cli_ok(
            &run,
            "migrated",
            &format!("{}/{pod}", ns.name),
            NODE_A,
            NODE_B,
        );
        assert_eq!(summary.transfer, transfer, "{}", run.stdout);
        let clone = clone_name(&ns, pod).await;
        assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 2);
        assert_eq!(
            ns.checksum(&clone, 8080).await.unwrap(),
            before,
            "{transfer}"
        );
        ns.wait_gone(pod, WAIT).await.unwrap();
        let archived = mib(&summary.archived);
        match transfer {
            "postcopy" => {
                let streamed = mib(summary.streamed.as_deref().expect("post-copy streams"));
                assert!(streamed >= 250.0, "{}", run.stdout);
                assert!(archived < 64.0, "{}", run.stdout);
                assert!(run.stdout.contains("PostCopy"), "{}", run.stdout);
                let pages = ns.annotation(&clone, "podmigrate.io/pages").await.unwrap();
                assert!(pages.contains('/'), "{pages}");
                assert_eq!(ns.events(&clone, Some("PostCopy")).await.unwrap().len(), 1);
            }
            _ => {
                assert_eq!(summary.streamed, None, "{}", run.stdout);
                assert!(archived > 64.0, "{}", run.stdout);
            }
        }
        // Neither node keeps a copy of the checkpoint, nor does the share.
        cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn counter_migrates_to_node_b_then_a_clone_diverges() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("tutorial").await.unwrap();
    ns.start_counters("counter", NODE_A, &[counter()], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.diagnostics(20)));
    for expected in 1..=5 {
        assert_eq!(ns.hit("counter", 8080).await.unwrap(), expected);
    }

    let run = ns
        .kubectl_migrate(&["counter", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    let pod = format!("{}/counter", ns.name);
    if !run.success {
        panic!("{run:?}\n{}", cluster.diagnostics(40));
    }
    let summary = assert_cli_ok(&run, "migrated", &pod, NODE_A, NODE_B);
    // Post-copy is the default: the clone resumed before its memory had all moved.
    assert_eq!(summary.transfer, "postcopy", "{}", run.stdout);
    assert!(summary.streamed.is_some(), "{}", run.stdout);
    let clone = clone_name(&ns, "counter").await;
    assert_eq!(ns.node_of(&clone).await.as_deref(), Some(NODE_B));
    ns.wait_running(&clone, WAIT).await.unwrap();
    // Its own pod IP on node-b's pod network, and the count goes on.
    let ip = ns.pod_ip(&clone).await.unwrap();
    assert!(ns.in_pod_cidr_of(NODE_B, ip).await.unwrap(), "{ip}");
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 6);
    // The count file in the container's filesystem came along (the rootfs diff).
    let file = ns.exec(&clone, "counter", &["cat", "/tmp/count"]).unwrap();
    assert_eq!(file.trim(), "6");
    ns.wait_gone("counter", WAIT).await.unwrap();

    // --clone: both keep running, each counting on from the checkpoint.
    let run = ns
        .kubectl_migrate(&[&clone, "--to", NODE_A, "--clone"], CLI_TIMEOUT)
        .await
        .unwrap();
    let summary = assert_cli_ok(
        &run,
        "cloned",
        &format!("{}/{clone}", ns.name),
        NODE_B,
        NODE_A,
    );
    // A clone's source runs on: its memory cannot stay behind, so it is copied first.
    assert_eq!(summary.transfer, "stop-and-copy", "{}", run.stdout);
    let second = clone_name(&ns, &clone).await;
    ns.wait_running(&second, WAIT).await.unwrap();
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 7);
    assert_eq!(ns.hit(&second, 8080).await.unwrap(), 7);
    assert_eq!(ns.hit(&second, 8080).await.unwrap(), 8);
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 8);

    // The agent reported each step as Events (accepted under the shipped RBAC).
    let reasons: Vec<String> = ns
        .events(&clone, None)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    for reason in ["Checkpointing", "Checkpointed", "Migrated"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} Event on {clone}: {reasons:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_container_pod_migrates_whole() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("two").await.unwrap();
    let counters = [
        Counter::new("first", 8080, "/tmp/first"),
        Counter::new("second", 8081, "/tmp/second"),
    ];
    ns.start_counters("pair", NODE_A, &counters, WAIT)
        .await
        .unwrap();
    for _ in 0..3 {
        ns.hit("pair", 8080).await.unwrap();
    }
    ns.hit("pair", 8081).await.unwrap();
    let run = ns
        .kubectl_migrate(&["pair", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    assert_cli_ok(
        &run,
        "migrated",
        &format!("{}/pair", ns.name),
        NODE_A,
        NODE_B,
    );
    let clone = clone_name(&ns, "pair").await;
    ns.wait_running(&clone, WAIT).await.unwrap();
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);
    assert_eq!(ns.hit(&clone, 8081).await.unwrap(), 2);
    ns.wait_gone("pair", WAIT).await.unwrap();
}

/// What an application holds moves with it: a connection inside the pod (both ends on its
/// loopback) carries on, the same connection, and so does its file lock; a client's connection
/// from outside does not fail the checkpoint, and ends (the pod's address changed).
#[tokio::test(flavor = "multi_thread")]
async fn connections_and_locks_migrate_with_the_pod() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("held").await.unwrap();
    let ip = ns
        .start_counters("held", NODE_A, &[counter().keep()], WAIT)
        .await
        .unwrap();
    let before = ns.get("held", 8080, "/loopback").await.unwrap();
    assert_eq!(ns.get("held", 8080, "/lock").await.unwrap(), "held");
    let mut outside = hold_connection((ip, 8080).into()).await.unwrap();
    assert_eq!(ns.hit("held", 8080).await.unwrap(), 1);
    let run = ns
        .kubectl_migrate(&["held", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    if !run.success {
        panic!("{run:?}\n{}", cluster.diagnostics(40));
    }
    assert_cli_ok(
        &run,
        "migrated",
        &format!("{}/held", ns.name),
        NODE_A,
        NODE_B,
    );
    let clone = clone_name(&ns, "held").await;
    ns.wait_running(&clone, WAIT).await.unwrap();
    // The same two ports, and the second byte through them.
    let after = ns.get(&clone, 8080, "/loopback").await.unwrap();
    let ports = |answer: &str| answer.rsplit_once(' ').map(|(p, _)| p.to_string());
    assert_eq!(ports(&after), ports(&before), "{before} / {after}");
    assert!(after.ends_with(" 2"), "{after}");
    assert_eq!(ns.get(&clone, 8080, "/lock").await.unwrap(), "held");
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 2);
    // The client outside sees its connection end, as after any server's restart.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, outside.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection from outside is still open");
    ns.wait_gone("held", WAIT).await.unwrap();
}

/// emptyDir volumes travel with the pod: a disk-backed one that two containers share (each keeps
/// its count file there, one also holds a lock on a file there) and a memory-backed one, each
/// land in the clone's volume of the same name, and the counts go on from them.
#[tokio::test(flavor = "multi_thread")]
async fn empty_dir_volumes_travel_with_the_pod() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("scratch").await.unwrap();
    let counters = [
        Counter::new("first", 8080, "/data/first").keep(),
        Counter::new("second", 8081, "/data/second"),
    ];
    let mut pod = serde_json::to_value(counter_pod("scratch", NODE_A, &counters)).unwrap();
    pod["spec"]["volumes"] = serde_json::json!([
        {"name": "data", "emptyDir": {}},
        {"name": "ram", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]);
    pod["spec"]["containers"][0]["volumeMounts"] = serde_json::json!([
        {"name": "data", "mountPath": "/data"},
        {"name": "ram", "mountPath": "/ram"},
    ]);
    pod["spec"]["containers"][1]["volumeMounts"] =
        serde_json::json!([{"name": "data", "mountPath": "/data"}]);
    ns.create_pod(&serde_json::from_value(pod).unwrap())
        .await
        .unwrap();
    ns.wait_running("scratch", WAIT).await.unwrap();
    let ip = ns.pod_ip("scratch").await.unwrap();
    for c in &counters {
        wait_counter_ready(ip, c.port, WAIT).await.unwrap();
    }
    for _ in 0..3 {
        ns.hit("scratch", 8080).await.unwrap();
    }
    ns.hit("scratch", 8081).await.unwrap();
    ns.exec(
        "scratch",
        "first",
        &["sh", "-c", "echo kept in memory > /ram/note"],
    )
    .unwrap();
    let run = ns
        .kubectl_migrate(&["scratch", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    if !run.success {
        panic!("{run:?}\n{}", cluster.diagnostics(40));
    }
    let clone = clone_name(&ns, "scratch").await;
    ns.wait_running(&clone, WAIT).await.unwrap();
    let cat = |container: &str, file: &str| {
        ns.exec(&clone, container, &["cat", file])
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(cat("first", "/data/first"), "3");
    assert_eq!(cat("second", "/data/second"), "1");
    assert_eq!(cat("first", "/ram/note"), "kept in memory");
    assert_eq!(ns.get(&clone, 8080, "/lock").await.unwrap(), "held");
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);
    assert_eq!(ns.hit(&clone, 8081).await.unwrap(), 2);
    assert_eq!(cat("second", "/data/first"), "4");
    ns.wait_gone("scratch", WAIT).await.unwrap();
}

/// An `apps/v1` controller `kind` named `name` of one counter pod on node-a, labelled
/// `app: <name>`.
fn pinned_controller(kind: &str, name: &str) -> serde_json::Value {
    let pod = serde_json::to_value(counter_pod(name, NODE_A, &[counter()])).unwrap();
    counter_controller(kind, name, &pod)
}

/// A Deployment's pod migrates into its ReplicaSet's hands: the clone takes the source's place,
/// owned by the same ReplicaSet, which makes no replacement, and the count goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployments_pod_is_handed_over_to_its_replica_set() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("deploy").await.unwrap();
    let deployment: Deployment =
        serde_json::from_value(pinned_controller("Deployment", "web")).unwrap();
    Api::<Deployment>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let web_pods = || async {
        ns.pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
    };
    let started = Instant::now();
    let source = loop {
        if let Some(pod) = web_pods().await.into_iter().next() {
            break pod;
        }
        assert!(started.elapsed() < WAIT, "the Deployment made no pod");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let source_name = source.metadata.name.clone().unwrap();
    let owner = source.metadata.owner_references.clone().unwrap()[0].clone();
    assert_eq!(owner.kind, "ReplicaSet");
    ns.wait_running(&source_name, WAIT).await.unwrap();
    let ip = ns.pod_ip(&source_name).await.unwrap();
    wait_counter_ready(ip, 8080, WAIT).await.unwrap();
    for _ in 0..3 {
        ns.hit(&source_name, 8080).await.unwrap();
    }
    let run = ns
        .kubectl_migrate(&[&source_name, "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    if !run.success {
        panic!("{run:?}\n{}", cluster.diagnostics(40));
    }
    let clone = clone_name(&ns, &source_name).await;
    ns.wait_gone(&source_name, WAIT).await.unwrap();
    let owned = ns.get_pod(&clone).await.unwrap().metadata;
    assert_eq!(owned.owner_references.unwrap()[0].uid, owner.uid);
    assert!(owned.labels.unwrap().contains_key("pod-template-hash"));
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);
    // The ReplicaSet counts the clone as its one pod: it makes no other.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let names: Vec<String> = web_pods()
        .await
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, vec![clone.clone()]);
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 5);
}

/// A StatefulSet's pod is refused in one line: its StatefulSet would recreate it under its own
/// name beside the clone.
#[tokio::test(flavor = "multi_thread")]
async fn a_stateful_sets_pod_is_refused_with_the_reason() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("sts").await.unwrap();
    let set: StatefulSet = serde_json::from_value(pinned_controller("StatefulSet", "db")).unwrap();
    Api::<StatefulSet>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &set)
        .await
        .unwrap();
    ns.wait_running("db-0", WAIT).await.unwrap();
    let run = ns
        .kubectl_migrate(&["db-0", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    assert_refused(&run, "it belongs to StatefulSet db");
    assert!(ns.clones_of("db-0").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_migrate_refuses_early_in_one_line_and_changes_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("refuse").await.unwrap();
    // Not opted in: the same counter without the label.
    let mut shy = counter_pod("shy", NODE_A, &[counter()]);
    shy.metadata
        .labels
        .as_mut()
        .unwrap()
        .remove("podmigrate.io/migratable");
    ns.create_pod(&shy).await.unwrap();
    ns.start_counters("ok", NODE_A, &[counter()], WAIT)
        .await
        .unwrap();
    ns.wait_running("shy", WAIT).await.unwrap();
    // Pending: no node carries this label.
    let mut stuck = counter_pod("stuck", NODE_A, &[counter()]);
    stuck
        .spec
        .as_mut()
        .unwrap()
        .node_selector
        .as_mut()
        .unwrap()
        .insert("podmigrate.io/no-such-node".into(), "true".into());
    ns.create_pod(&stuck).await.unwrap();

    let cases: [(&[&str], &str); 5] = [
        (&["shy", "--to", NODE_B], "is not migratable"),
        (&["ok", "--to", "node-z"], "cannot migrate pod"),
        (&["ok", "--to", "node-z"], "no such node"),
        (&["ok", "--to", NODE_A], "already runs on node node-a"),
        (&["stuck", "--to", NODE_B], "is Pending, not Running"),
    ];
    for (args, what) in cases {
        let started = Instant::now();
        let run = ns.kubectl_migrate(args, CLI_TIMEOUT).await.unwrap();
        assert_refused(&run, what);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "refusing {args:?} took {:?}",
            started.elapsed()
        );
    }
    // Nothing was created, and the pods run on as they were.
    let pods = ns.pods.list(&Default::default()).await.unwrap();
    assert_eq!(
        pods.items.len(),
        3,
        "{:?}",
        pods.items
            .iter()
            .map(|p| &p.metadata.name)
            .collect::<Vec<_>>()
    );
    assert_eq!(ns.hit("ok", 8080).await.unwrap(), 1);
    assert_eq!(ns.hit("shy", 8080).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restored_container_that_exits_restarts_fresh_and_never_restores_again() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("restart").await.unwrap();
    ns.start_counters("counter", NODE_A, &[counter()], WAIT)
        .await
        .unwrap();
    for _ in 0..3 {
        ns.hit("counter", 8080).await.unwrap();
    }
    let run = ns
        .kubectl_migrate(&["counter", "--to", NODE_B], CLI_TIMEOUT)
        .await
        .unwrap();
    assert_cli_ok(
        &run,
        "migrated",
        &format!("{}/counter", ns.name),
        NODE_A,
        NODE_B,
    );
    let clone = clone_name(&ns, "counter").await;
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);

    // The restored process exits (SIGTERM to the container's PID 1); restartPolicy Always.
    ns.exec(&clone, "counter", &["kill", "1"]).unwrap();
    let started = Instant::now();
    loop {
        let pod = ns.get_pod(&clone).await.unwrap();
        let status = &pod.status.unwrap().container_statuses.unwrap()[0];
        if status.restart_count >= 1 && status.ready {
            break;
        }
        // Well under the shim's 90 s archive wait: a restart that waited for an archive fails.
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the container did not come back: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Fresh, like any restarted container: its count starts again, its filesystem is new.
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 1);
}

/// Starts a migration of a counter with `ballast_mib` of memory and waits until the clone
/// reaches `phase`; returns the clone's name and the migration under way.
async fn migration_reaching(
    ns: &TestNamespace,
    ballast_mib: u32,
    phase: &str,
) -> (String, podmigrate_e2e::cli::CliProcess) {
    ns.start_counters("counter", NODE_A, &[counter().ballast(ballast_mib)], WAIT)
        .await
        .unwrap();
    for _ in 0..5 {
        ns.hit("counter", 8080).await.unwrap();
    }
    let cli = ns
        .spawn_kubectl_migrate(&["counter", "--to", NODE_B])
        .unwrap();
    let started = Instant::now();
    loop {
        if let Ok(clones) = ns.clones_of("counter").await {
            if let Some(clone) = clones.first() {
                let name = clone.metadata.name.clone().unwrap();
                let at = clone
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(PHASE))
                    .cloned();
                if at.as_deref() == Some(phase) {
                    return (name, cli);
                }
            }
        }
        assert!(started.elapsed() < WAIT, "the clone never reached {phase}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The source `counter` still runs on node-a, thawed: it answers the next count.
async fn assert_source_runs_on(ns: &TestNamespace, expected: u64) {
    let started = Instant::now();
    loop {
        match ns.hit("counter", 8080).await {
            Ok(n) => {
                assert_eq!(n, expected);
                break;
            }
            Err(e) => assert!(
                started.elapsed() < WAIT,
                "the source never answered again: {e:#}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(ns.node_of("counter").await.as_deref(), Some(NODE_A));
}

/// Waits for an Event on the source whose note contains `what`.
async fn wait_source_event(ns: &TestNamespace, what: &str) {
    let started = Instant::now();
    loop {
        let events = ns.events("counter", None).await.unwrap();
        if events
            .iter()
            .any(|e| e.message.as_deref().is_some_and(|m| m.contains(what)))
        {
            return;
        }
        let notes: Vec<_> = events.iter().map(|e| (&e.reason, &e.message)).collect();
        assert!(
            started.elapsed() < WAIT,
            "no Event saying {what:?}: {notes:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// After a cancelled or abandoned migration: the clone is gone and so are its archives. (Over
/// SMB a removed file the clone's shim held open stays visible until that handle closes, just
/// after the clone's containers stop.)
async fn assert_swept(cluster: &KubeCluster, ns: &TestNamespace, clone: &str) {
    ns.wait_gone(clone, WAIT).await.unwrap();
    let archive = cluster.archive(&ns.name, "counter", "counter");
    let started = Instant::now();
    while archive.exists() {
        assert!(started.elapsed() < WAIT, "{} left", archive.display());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_migrate_cancel_mid_restore_thaws_the_source_and_removes_the_clone() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("cancel").await.unwrap();
    let (clone, cli) = migration_reaching(&ns, 256, "Restoring").await;
    let cancel = ns
        .kubectl_migrate(&["cancel", "counter"], WAIT)
        .await
        .unwrap();
    assert!(cancel.success, "{cancel:?}");
    assert!(
        cancel
            .stdout
            .contains(&format!("migration to {}/{clone} cancelled", ns.name)),
        "{cancel:?}"
    );
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert!(!run.success, "{run:?}");
    assert_source_runs_on(&ns, 6).await;
    // Who cancelled, on the source: the admin kubeconfig's user.
    wait_source_event(&ns, "cancelled by").await;
    assert_swept(&cluster, &ns, &clone).await;
    // Nothing left to cancel: one line saying so.
    let again = ns
        .kubectl_migrate(&["cancel", "counter"], WAIT)
        .await
        .unwrap();
    assert!(
        !again.success && again.stderr.contains("no migration of pod"),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kubectl_migrate_that_times_out_cancels_its_migration() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("cli-timeout").await.unwrap();
    ns.start_counters("counter", NODE_A, &[counter().ballast(256)], WAIT)
        .await
        .unwrap();
    for _ in 0..5 {
        ns.hit("counter", 8080).await.unwrap();
    }
    let run = ns
        .kubectl_migrate(&["counter", "--to", NODE_B, "--timeout", "1s"], CLI_TIMEOUT)
        .await
        .unwrap();
    assert!(!run.success, "{run:?}");
    assert!(
        run.stderr.contains("did not finish within 1s") && run.stderr.contains("cancelled"),
        "{run:?}"
    );
    let clone = run
        .stdout
        .split(" as ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the CLI names the clone")
        .to_string();
    assert_source_runs_on(&ns, 6).await;
    assert_swept(&cluster, &ns, &clone).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clone_deleted_mid_restore_leaves_the_source_running() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("delmid").await.unwrap();
    let (clone, cli) = migration_reaching(&ns, 256, "Restoring").await;
    ns.delete_pod(&clone).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert!(!run.success, "{run:?}");
    assert_source_runs_on(&ns, 6).await;
    wait_source_event(&ns, "deleted").await;
    ns.wait_gone(&clone, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn node_b_kubelet_restarted_mid_migration_loses_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let ns = cluster.namespace("kubelet").await.unwrap();
    let (clone, cli) = migration_reaching(&ns, 256, "Restoring").await;
    cluster.local_up(&["kubelet", NODE_B, "stop"]).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.local_up(&["kubelet", NODE_B, "start"]).unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    // Either the migration completed once node-b's kubelet was back, or it rolled back: the
    // counter lives on exactly once, with its count.
    if run.success {
        ns.wait_running(&clone, WAIT).await.unwrap();
        assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 6);
        ns.wait_gone("counter", WAIT).await.unwrap();
    } else {
        assert_source_runs_on(&ns, 6).await;
        wait_source_event(&ns, "clone").await;
    }
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "node/node-b",
            "--timeout=60s",
        ])
        .unwrap();
}

/// Flips one byte in the middle of `path` as soon as it appears (polling every millisecond),
/// for at most `limit`. Returns whether it did.
fn corrupt_when_committed(path: PathBuf, limit: Duration) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) {
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                let offset = len / 2;
                let mut byte = [0u8; 1];
                if file.read_exact_at(&mut byte, offset).is_ok() {
                    byte[0] ^= 0xff;
                    if file.write_all_at(&byte, offset).is_ok() {
                        let _ = file.sync_all();
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_archive_is_refused_and_the_source_rolls_back() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let ns = cluster.namespace("corrupt").await.unwrap();
    // Ballast, so the archive's middle lies deep in the memory pages' data.
    ns.start_counters("fragile", NODE_A, &[counter().ballast(8)], WAIT)
        .await
        .unwrap();
    assert_eq!(ns.hit("fragile", 8080).await.unwrap(), 1);
    assert_eq!(ns.hit("fragile", 8080).await.unwrap(), 2);

    // node-b's kubelet is down for a moment (as while it pulls an image), so the archive is
    // committed, and corrupted "in flight", before node-b's shim looks for it: no race.
    cluster.local_up(&["kubelet", NODE_B, "stop"]).unwrap();
    let corrupter = corrupt_when_committed(cluster.archive(&ns.name, "fragile", "counter"), WAIT);
    let cli = ns
        .spawn_kubectl_migrate(&["fragile", "--to", NODE_B, "--timeout", "120s"])
        .unwrap();
    let corrupted = tokio::task::spawn_blocking(move || corrupter.join().unwrap())
        .await
        .unwrap();
    cluster.local_up(&["kubelet", NODE_B, "start"]).unwrap();
    assert!(corrupted, "the archive was not committed within {WAIT:?}");
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert!(
        !run.success,
        "a corrupt archive must fail the migration: {run:?}"
    );
    let stderr = run.stderr.trim();
    assert!(
        stderr.starts_with(&format!(
            "podmigrate: error: migration of {}/fragile rolled back: ",
            ns.name
        )) && stderr.contains("entry \"checkpoint/pages-")
            && stderr.contains("the source was resumed"),
        "the CLI must give node-b's shim's reason: {stderr}"
    );
    let clone = clone_name(&ns, "fragile").await;
    assert_eq!(
        ns.annotation(&clone, PHASE).await.as_deref(),
        Some("RolledBack")
    );
    let reason = ns.annotation(&clone, REASON).await.unwrap_or_default();
    assert!(reason.contains("fragile/counter.zip"), "{reason}");
    // The source was thawed and counts on.
    assert_eq!(ns.hit("fragile", 8080).await.unwrap(), 3);
    assert_eq!(ns.node_of("fragile").await.as_deref(), Some(NODE_A));
    cluster
        .kubectl(&[
            "wait",
            "--for=condition=Ready",
            "node/node-b",
            "--timeout=60s",
        ])
        .unwrap();
}

/// Puts the shipped agent arguments back when dropped (also when a test fails).
struct AgentArgs<'a>(&'a KubeCluster);

impl Drop for AgentArgs<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_agent_args(&[]) {
            eprintln!("restoring the agent's arguments: {e:#}");
        }
    }
}

/// The phases in which a migration holds one of its source node's `--max-outbound` slots.
const IN_FLIGHT: [&str; 3] = ["Checkpointing", "Transferring", "Restoring"];

#[tokio::test(flavor = "multi_thread")]
async fn at_max_outbound_one_a_second_migration_is_queued_until_the_first_ends() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    cluster.set_agent_args(&["--max-outbound", "1"]).unwrap();
    let _restore = AgentArgs(&cluster);
    let ns = cluster.namespace("queue").await.unwrap();
    // Some ballast, so that each migration holds its slot for a while.
    let sources = [("first", 2u64), ("second", 3)];
    for (name, count) in sources {
        ns.start_counters(name, NODE_A, &[counter().ballast(64)], WAIT)
            .await
            .unwrap();
        for expected in 1..=count {
            assert_eq!(ns.hit(name, 8080).await.unwrap(), expected);
        }
    }
    let runs = sources.map(|(name, _)| {
        ns.spawn_kubectl_migrate(&[name, "--to", NODE_B, "--timeout", "140s"])
            .unwrap()
    });
    let queued_reason =
        format!("queued: 1 outbound migration(s) already run on node {NODE_A} (--max-outbound)");
    let mut clones: [Option<String>; 2] = [None, None];
    let mut seen_queued: Vec<(usize, String)> = Vec::new();
    let mut both_in_flight = Vec::new();
    let [run_first, run_second] = runs;
    let finished = tokio::spawn(async move {
        let first = run_first.finish(CLI_TIMEOUT).await.unwrap();
        let second = run_second.finish(CLI_TIMEOUT).await.unwrap();
        (first, second)
    });
    while !finished.is_finished() {
        for (i, (source, _)) in sources.iter().enumerate() {
            if clones[i].is_none() {
                clones[i] = ns
                    .clones_of(source)
                    .await
                    .unwrap()
                    .first()
                    .and_then(|c| c.metadata.name.clone());
            }
        }
        if let [Some(c0), Some(c1)] = &clones {
            let mut phases = [String::new(), String::new()];
            let mut reasons = [String::new(), String::new()];
            for (i, c) in [c0, c1].into_iter().enumerate() {
                phases[i] = ns.annotation(c, PHASE).await.unwrap_or_default();
                reasons[i] = ns.annotation(c, REASON).await.unwrap_or_default();
            }
            for i in 0..2 {
                let seen = (i, phases[1 - i].clone());
                if reasons[i] == queued_reason
                    && matches!(phases[i].as_str(), "Pending" | "")
                    && seen_queued.last() != Some(&seen)
                {
                    seen_queued.push(seen);
                }
            }
            if phases.iter().all(|p| IN_FLIGHT.contains(&p.as_str())) {
                both_in_flight.push(phases.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (run_first, run_second) = finished.await.unwrap();
    for (run, source) in [(&run_first, "first"), (&run_second, "second")] {
        assert_cli_ok(
            run,
            "migrated",
            &format!("{}/{source}", ns.name),
            NODE_A,
            NODE_B,
        );
    }
    assert!(
        both_in_flight.is_empty(),
        "both migrations held a slot at once: {both_in_flight:?}"
    );
    let names = clones.map(|c| c.expect("both clones were seen"));
    let mut queued_events = Vec::new();
    for name in &names {
        let notes: Vec<String> = ns
            .events(name, Some("Queued"))
            .await
            .unwrap()
            .into_iter()
            .filter_map(|e| e.message)
            .collect();
        queued_events.push(notes);
    }
    // Exactly one of them was queued, announced once, with the reason naming the setting,
    // while the other one ran.
    let queued: Vec<usize> = (0..2).filter(|&i| !queued_events[i].is_empty()).collect();
    assert_eq!(queued.len(), 1, "Queued events: {queued_events:?}");
    let waiter = queued[0];
    assert_eq!(queued_events[waiter], std::slice::from_ref(&queued_reason));
    assert!(
        seen_queued
            .iter()
            .any(|(i, other)| *i == waiter && IN_FLIGHT.contains(&other.as_str())),
        "{} was never seen queued while the other was in flight: {seen_queued:?}",
        names[waiter]
    );
    // Each was checkpointed once, and both counters continue on node-b.
    for (i, (source, count)) in sources.into_iter().enumerate() {
        let checkpoints = ns.events(&names[i], Some("Checkpointing")).await.unwrap();
        assert_eq!(checkpoints.len(), 1, "{}", names[i]);
        assert_eq!(checkpoints[0].count.unwrap_or(1), 1, "{}", names[i]);
        ns.wait_running(&names[i], WAIT).await.unwrap();
        assert_eq!(
            ns.hit(&names[i], 8080).await.unwrap(),
            count + 1,
            "{source}"
        );
        ns.wait_gone(source, WAIT).await.unwrap();
    }
}

#[test]
fn every_node_mounts_the_share_the_cluster_was_brought_up_with() {
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(KubeCluster::shared()).unwrap();
    let kind = cluster.share_kind();
    for node in [NODE_A, NODE_B] {
        let fstype = cluster
            .node_fstype(node, podmigrate_e2e::cluster::SHARE_IN_NODE)
            .unwrap();
        match kind.as_str() {
            "smb" => assert_eq!(fstype, "fuse.smbnetfs", "{node}"),
            "directory" => assert!(!fstype.starts_with("fuse"), "{node}: {fstype}"),
            other => panic!("the cluster's share kind is {other:?}"),
        }
    }
}

/// A clone's Create waits for the archive inside kubelet's CreateContainer call: the shim's
/// wait must end (with its own reason) before kubelet's runtime request timeout cancels the
/// call with a bare "context deadline exceeded". Checked against the live kubelet's config.
#[test]
fn the_shims_archive_wait_ends_within_kubelets_runtime_request_timeout() {
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(KubeCluster::shared()).unwrap();
    for node in [NODE_A, NODE_B] {
        let configz = cluster
            .kubectl(&[
                "get",
                "--raw",
                &format!("/api/v1/nodes/{node}/proxy/configz"),
            ])
            .unwrap();
        let config: serde_json::Value = serde_json::from_str(&configz).unwrap();
        let timeout = config["kubeletconfig"]["runtimeRequestTimeout"]
            .as_str()
            .unwrap_or_else(|| panic!("no runtimeRequestTimeout in {configz}"));
        let timeout = humantime::parse_duration(timeout).unwrap();
        let wait = containerd_shim_migrate::config::DEFAULT_ARCHIVE_WAIT;
        assert!(
            wait + Duration::from_secs(20) <= timeout,
            "{node}: the shim waits {wait:?} for an archive, kubelet gives Create {timeout:?}"
        );
    }
}

#[test]
fn the_agents_service_account_may_do_what_the_agent_does() {
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cluster = rt.block_on(KubeCluster::shared()).unwrap();
    let agent = format!("--as=system:serviceaccount:{AGENT_NAMESPACE}:podmigrate-agent");
    let allowed = [
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
        ("patch", "pods"),
        ("delete", "pods"),
        ("get", "namespaces"),
        ("create", "events"),
        // kube's event recorder patches an Event when the same one repeats.
        ("patch", "events"),
        ("create", "events.events.k8s.io"),
        ("patch", "events.events.k8s.io"),
        // A departure's record, and whether its controller replaces the pod.
        ("create", "leases.coordination.k8s.io"),
        ("update", "leases.coordination.k8s.io"),
        ("delete", "leases.coordination.k8s.io"),
        ("watch", "leases.coordination.k8s.io"),
        ("get", "statefulsets.apps"),
        ("get", "replicasets.apps"),
        ("get", "jobs.batch"),
    ];
    for (verb, resource) in allowed {
        let out = cluster
            .kubectl_output(&["auth", "can-i", verb, resource, "-A", &agent])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "yes",
            "the agent may not {verb} {resource}"
        );
    }
    for (verb, resource) in [
        ("create", "pods"),
        ("get", "secrets"),
        ("delete", "nodes"),
        ("update", "statefulsets.apps"),
        ("delete", "jobs.batch"),
    ] {
        let out = cluster
            .kubectl_output(&["auth", "can-i", verb, resource, "-A", &agent])
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "no",
            "the agent may {verb} {resource}"
        );
    }
}
