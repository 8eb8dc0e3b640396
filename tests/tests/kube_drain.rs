//! `kubectl drain` on a real Kubernetes (the cluster of `scripts/local-up-cluster.sh`, the agent
//! as its DaemonSet): opted-in pods depart, checkpointed before they stop, and the pods their
//! controllers make in their place restore them on the other node.
//!
//! * node-a drained: a StatefulSet's pod (the same name), a Deployment's pod (another name, the
//!   same ReplicaSet; two counters sharing an emptyDir, one holding a loopback connection, a lock
//!   and a client's connection from outside) and an Indexed Job's two pods come back on node-b
//!   and count on; the emptyDir's files, the loopback connection and the lock carry on, the
//!   client's connection ends; each Job index's pod that restored it completes (`GET /exit`)
//!   and the Job completes once; a Deployment's pod that did not opt in starts from zero;
//!   `Departed` and `Replacing` Events and `podmigrate.io/replaces` say what moved where, and no
//!   departure record is left;
//! * a pod deleted (`kubectl delete pod`, its grace period) whose checkpoint fails (node-a's
//!   checkpoint space full) stops as usual: its replacement starts fresh, a `DepartureFailed`
//!   Warning on it says why, and so does `StartedFresh` on the replacement if it claimed the
//!   failed departure.
//! * a StatefulSet's pod with an init container (it leaves a line in an emptyDir) and a native
//!   sidecar: drained, the replacement's sidecar and app container count on, and its init
//!   container completes without running again (the line is there once).
//!
//! Pods start on node-a because node-b is cordoned meanwhile; no pod is pinned to a node.
//! Cordoning disturbs every other test, so each test takes the cluster alone, and its cordons are
//! undone when it ends, failed or not. Needs root; skips otherwise, unless
//! `PODMIGRATE_E2E_REQUIRE` is set, in which case it fails.

use std::time::{Duration, Instant};

use podmigrate_e2e::cluster::{
    counter_controller, indexed_counter_job, roaming_counter_pod, KubeCluster, TestNamespace,
    MEMORY_IN_NODE, NODE_A, NODE_B, WORK_IN_NODE,
};
use podmigrate_e2e::counter::{hold_connection, wait_counter_ready, Counter};
use podmigrate_e2e::drain::{
    live_pods, wait_job_complete, wait_no_departure_records, wait_one_ready_on, Cordons,
    JOB_COMPLETION_INDEX,
};
use podmigrate_vocabulary::REPLACES;
use serde_json::json;
use tokio::io::AsyncReadExt;

/// Bound on pods coming up (a Job's new pods wait out its backoff first), Events, records (a
/// failed one stays a minute), and similar waits.
const WAIT: Duration = Duration::from_secs(150);
/// Bound on one `kubectl drain` or `kubectl delete pod`: the pods' grace periods, and more.
const STOP_TIMEOUT: Duration = Duration::from_secs(300);

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

async fn cluster() -> Option<KubeCluster> {
    KubeCluster::for_test(None).await
}

fn counter() -> Counter {
    Counter::new("counter", 8080, "/tmp/count")
}

/// The value of a `Result`; a failure panics with the cluster's diagnostics.
fn or_diagnose<T>(cluster: &KubeCluster, result: anyhow::Result<T>) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.diagnostics(60)))
}

/// The one pod of `app` (of identity `extra`, a label selector, if not empty) once it runs ready
/// on `node`: its name. Panics with the cluster's diagnostics otherwise.
async fn ready_on(
    cluster: &KubeCluster,
    ns: &TestNamespace,
    app: &str,
    extra: &str,
    node: &str,
) -> String {
    or_diagnose(cluster, wait_one_ready_on(ns, app, extra, node, WAIT).await)
}

/// Once the counter at `port` of `pod` answers, counts `times`: the counts.
async fn hits(ns: &TestNamespace, pod: &str, port: u16, times: usize) -> Vec<u64> {
    let ip = ns.pod_ip(pod).await.unwrap();
    wait_counter_ready(ip, port, WAIT).await.unwrap();
    let mut counts = Vec::new();
    for _ in 0..times {
        counts.push(ns.hit(pod, port).await.unwrap());
    }
    counts
}

/// `GET /loopback` on the `-k` counter at 8080 of `pod`: (client port, server port, bytes).
async fn loopback(ns: &TestNamespace, pod: &str) -> (u16, u16, u64) {
    let answer = ns.get(pod, 8080, "/loopback").await.unwrap();
    let parts: Vec<&str> = answer.split(' ').collect();
    match parts[..] {
        [client, server, bytes] => (
            client.parse().unwrap(),
            server.parse().unwrap(),
            bytes.parse().unwrap(),
        ),
        _ => panic!("GET /loopback on {pod} answered {answer:?}"),
    }
}

/// The selector of an Indexed Job's pods of completion index `index`.
fn index_selector(index: usize) -> String {
    format!("{JOB_COMPLETION_INDEX}={index}")
}

/// A pod as it was: its name and uid (a StatefulSet's replacement has the same name).
struct Was {
    name: String,
    uid: String,
}

async fn was(ns: &TestNamespace, name: &str) -> Was {
    Was {
        name: name.to_owned(),
        uid: ns.uid_of(name).await.unwrap(),
    }
}

/// `source` departed and `replacement` (another pod, maybe of the same name) restored its
/// checkpoint: `Departed` on the one, `podmigrate.io/replaces` and a `Replacing` Event naming
/// the source on the other, no Warning on either.
async fn assert_replaced(ns: &TestNamespace, source: &Was, replacement: &str) {
    let uid = ns.uid_of(replacement).await.unwrap();
    assert_ne!(uid, source.uid, "{replacement} is still the source");
    ns.wait_events(&source.name, Some(&source.uid), "Departed", WAIT)
        .await
        .unwrap();
    assert_eq!(
        ns.annotation(replacement, REPLACES).await.as_deref(),
        Some(source.name.as_str()),
        "{replacement}'s {REPLACES}"
    );
    let replacing = ns
        .wait_events(replacement, Some(&uid), "Replacing", WAIT)
        .await
        .unwrap();
    assert!(
        replacing.iter().any(|n| n.contains(source.name.as_str())),
        "{replacement}'s Replacing Events do not name {}: {replacing:?}",
        source.name
    );
    for (pod, uid, reason) in [
        (source.name.as_str(), source.uid.as_str(), "DepartureFailed"),
        (replacement, uid.as_str(), "StartedFresh"),
    ] {
        let warned: Vec<_> = ns
            .events(pod, Some(reason))
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.involved_object.uid.as_deref() == Some(uid))
            .map(|e| e.message)
            .collect();
        assert!(warned.is_empty(), "{reason} on {pod}: {warned:?}");
    }
}

/// Drains node-a of a StatefulSet's pod, a Deployment's pod with an emptyDir and what it holds,
/// an Indexed Job's two pods, and a Deployment's pod that did not opt in: all come back on
/// node-b, the opted-in ones where they were (memory, files, the connection inside the pod).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_moves_controller_owned_pods_with_their_state() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("drain").await.unwrap();
    let mut cordons = Cordons::new(&cluster);
    cordons.cordon(NODE_B).unwrap();

    // Two counters sharing an emptyDir, their count files in it; the first holds a loopback
    // connection, a lock on a file in it, and the connections that ask.
    let shop_counters = [
        Counter::new("first", 8080, "/data/first").keep(),
        Counter::new("second", 8081, "/data/second"),
    ];
    let mut shop = roaming_counter_pod("shop", &shop_counters, true);
    shop["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    for container in 0..2 {
        shop["spec"]["containers"][container]["volumeMounts"] =
            json!([{"name": "data", "mountPath": "/data"}]);
    }
    let web = roaming_counter_pod("web", &[counter()], true);
    let batch = roaming_counter_pod("batch", &[counter()], true);
    let plain = roaming_counter_pod("plain", &[counter()], false);
    for object in [
        counter_controller("StatefulSet", "web", &web),
        counter_controller("Deployment", "shop", &shop),
        indexed_counter_job("batch", &batch, 2),
        counter_controller("Deployment", "plain", &plain),
    ] {
        ns.apply(&object).unwrap();
    }
    let web = ready_on(&cluster, &ns, "web", "", NODE_A).await;
    assert_eq!(web, "web-0");
    let web = was(&ns, &web).await;
    let shop = ready_on(&cluster, &ns, "shop", "", NODE_A).await;
    let shop = was(&ns, &shop).await;
    let mut batch = Vec::new();
    for index in 0..2 {
        let pod = ready_on(&cluster, &ns, "batch", &index_selector(index), NODE_A).await;
        batch.push(was(&ns, &pod).await);
    }
    let plain = ready_on(&cluster, &ns, "plain", "", NODE_A).await;
    let plain = was(&ns, &plain).await;
    step(
        t0,
        "a StatefulSet, two Deployments and an Indexed Job run on node-a",
    );

    for pod in [&web, &batch[0], &batch[1], &plain] {
        assert_eq!(
            hits(&ns, &pod.name, 8080, 3).await,
            [1, 2, 3],
            "{}",
            pod.name
        );
    }
    assert_eq!(hits(&ns, &shop.name, 8080, 3).await, [1, 2, 3]);
    assert_eq!(hits(&ns, &shop.name, 8081, 1).await, [1]);
    let inside = loopback(&ns, &shop.name).await;
    assert_eq!(ns.get(&shop.name, 8080, "/lock").await.unwrap(), "held");
    ns.exec(
        &shop.name,
        "second",
        &["sh", "-c", "echo scratch > /data/note"],
    )
    .unwrap();
    let shop_ip = ns.pod_ip(&shop.name).await.unwrap();
    let mut outside = hold_connection((shop_ip, 8080).into()).await.unwrap();
    step(
        t0,
        "each counts to 3; shop holds a loopback connection, a lock and a client's connection",
    );

    cordons.uncordon(NODE_B).unwrap();
    let drained = or_diagnose(&cluster, cordons.drain(NODE_A, STOP_TIMEOUT));
    assert!(
        drained.contains("drained"),
        "kubectl drain printed {drained:?}"
    );
    step(
        t0,
        "kubectl drain node-a --ignore-daemonsets --delete-emptydir-data succeeded",
    );

    // The StatefulSet's pod: the same name, on node-b, counting on.
    let now = ready_on(&cluster, &ns, "web", "", NODE_B).await;
    assert_eq!(now, "web-0");
    assert_eq!(hits(&ns, &now, 8080, 1).await, [4], "web-0 counts on");
    assert_replaced(&ns, &web, &now).await;
    step(t0, "web-0 counts on on node-b");

    // The Deployment's pod: another name of the same ReplicaSet, with its emptyDir, its
    // loopback connection and its lock.
    let now = ready_on(&cluster, &ns, "shop", "", NODE_B).await;
    assert_ne!(now, shop.name);
    assert_replaced(&ns, &shop, &now).await;
    let cat = |file: &str| {
        ns.exec(&now, "second", &["cat", file])
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(cat("/data/note"), "scratch");
    // Written by the second counter at its first count, before the departure.
    assert_eq!(cat("/data/second"), "1");
    let carried = loopback(&ns, &now).await;
    assert_eq!(
        (carried.0, carried.1),
        (inside.0, inside.1),
        "the same loopback connection"
    );
    assert_eq!(carried.2, inside.2 + 1);
    assert_eq!(ns.get(&now, 8080, "/lock").await.unwrap(), "held");
    assert_eq!(
        hits(&ns, &now, 8080, 1).await,
        [4],
        "shop's first counts on"
    );
    assert_eq!(
        hits(&ns, &now, 8081, 1).await,
        [2],
        "shop's second counts on"
    );
    assert_eq!(cat("/data/first"), "4");
    // The client outside sees its connection end, as after any server's restart.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, outside.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection from outside is still open");
    step(
        t0,
        "shop's replacement counts on with its emptyDir, connection and lock",
    );

    // The Job's pods: each index's new pod on node-b counts on, then ends; the Job completes
    // once, each index by the pod that restored it.
    let mut finished = Vec::new();
    for (index, source) in batch.iter().enumerate() {
        let now = ready_on(&cluster, &ns, "batch", &index_selector(index), NODE_B).await;
        assert_replaced(&ns, source, &now).await;
        assert_eq!(
            hits(&ns, &now, 8080, 1).await,
            [4],
            "index {index} counts on"
        );
        assert_eq!(ns.get(&now, 8080, "/exit").await.unwrap(), "bye");
        finished.push(now);
    }
    let status = or_diagnose(&cluster, wait_job_complete(&ns, "batch", WAIT).await);
    assert_eq!(status.succeeded, Some(2), "{status:?}");
    let mut succeeded: Vec<String> = live_pods(&ns, "batch", "")
        .await
        .unwrap()
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        .filter_map(|p| p.metadata.name)
        .collect();
    succeeded.sort();
    finished.sort();
    assert_eq!(
        succeeded, finished,
        "each index done once, by its replacement"
    );
    step(
        t0,
        "the Job's indexes counted on on node-b and the Job completed once",
    );

    // The pod that did not opt in starts from zero, and nothing departed.
    let now = ready_on(&cluster, &ns, "plain", "", NODE_B).await;
    assert_ne!(now, plain.name);
    assert_eq!(hits(&ns, &now, 8080, 1).await, [1], "plain starts fresh");
    assert!(ns
        .events(&plain.name, Some("Departing"))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(ns.annotation(&now, REPLACES).await, None);
    assert!(ns.events(&now, Some("Replacing")).await.unwrap().is_empty());
    step(t0, "plain's replacement started from zero");

    or_diagnose(&cluster, wait_no_departure_records(&ns, WAIT).await);
    step(t0, "no departure record is left");
}

/// A pod deleted with its grace period whose checkpoint cannot be written (node-a's checkpoint
/// space on disk is full, its memory-backed one too small for the pod) stops as usual; its
/// replacement starts fresh, and the Events say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_departure_whose_checkpoint_fails_starts_the_replacement_fresh_with_the_reason() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("frail").await.unwrap();
    let mut cordons = Cordons::new(&cluster);
    cordons.cordon(NODE_B).unwrap();
    let pod = roaming_counter_pod("frail", &[counter().ballast(64)], true);
    ns.apply(&counter_controller("StatefulSet", "frail", &pod))
        .unwrap();
    let name = ready_on(&cluster, &ns, "frail", "", NODE_A).await;
    assert_eq!(name, "frail-0");
    let source = was(&ns, &name).await;
    assert_eq!(hits(&ns, &name, 8080, 2).await, [1, 2]);

    // The dump goes to memory-backed work space only where the pod's memory fits; on disk, its
    // pages go to the share, but CRIU's other images cannot be written.
    let checkpoints = format!("{WORK_IN_NODE}/checkpoints");
    for dir in [checkpoints.as_str(), MEMORY_IN_NODE] {
        cluster
            .on_node(NODE_A, &["mkdir", "-p", "-m", "0700", dir])
            .unwrap();
    }
    let _disk = cluster.mount_tmpfs(NODE_A, &checkpoints, 1).unwrap();
    let _memory = cluster.mount_tmpfs(NODE_A, MEMORY_IN_NODE, 16).unwrap();
    // Fails once the tmpfs is full, as it should.
    let _ = cluster.on_node(
        NODE_A,
        &["sh", "-c", &format!("cat /dev/zero >{checkpoints}/filler")],
    );
    step(
        t0,
        "frail-0 at 2 on node-a; node-a's checkpoint space is a full 1 MiB tmpfs (and 16 MiB in memory)",
    );

    // The replacement goes to node-b.
    cordons.uncordon(NODE_B).unwrap();
    cordons.cordon(NODE_A).unwrap();
    let timeout = format!("--timeout={}s", STOP_TIMEOUT.as_secs());
    or_diagnose(
        &cluster,
        cluster.kubectl(&["-n", &ns.name, "delete", "pod", &name, &timeout]),
    );
    step(t0, "kubectl delete pod frail-0 returned");

    let now = ready_on(&cluster, &ns, "frail", "", NODE_B).await;
    assert_eq!(now, "frail-0");
    let uid = ns.uid_of(&now).await.unwrap();
    assert_ne!(uid, source.uid);
    assert_eq!(
        hits(&ns, &now, 8080, 1).await,
        [1],
        "the replacement starts fresh"
    );
    ns.wait_events(&name, Some(&source.uid), "Departing", WAIT)
        .await
        .unwrap();
    let failed = ns
        .wait_events(&name, Some(&source.uid), "DepartureFailed", WAIT)
        .await
        .unwrap();
    assert!(
        failed
            .iter()
            .any(|n| n.contains("checkpointing container counter") && n.contains("starts fresh")),
        "{failed:?}"
    );
    step(
        t0,
        "frail-0 started fresh on node-b; DepartureFailed says why",
    );

    // The replacement may have claimed the failed departure (it is kept a while for that): then
    // it says so too.
    if ns.annotation(&now, REPLACES).await.as_deref() == Some(name.as_str()) {
        let fresh = ns
            .wait_events(&now, Some(&uid), "StartedFresh", WAIT)
            .await
            .unwrap();
        assert!(
            fresh
                .iter()
                .any(|n| n.contains("the checkpoint of frail-0 failed")),
            "{fresh:?}"
        );
        step(
            t0,
            "the replacement claimed the failed departure; StartedFresh says why",
        );
    } else {
        step(t0, "the replacement did not claim the failed departure");
    }
    let restored: Vec<_> = ns
        .events(&now, Some("Replacing"))
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.involved_object.uid.as_deref() == Some(uid.as_str()))
        .map(|e| e.message)
        .collect();
    assert!(restored.is_empty(), "{restored:?}");

    or_diagnose(&cluster, wait_no_departure_records(&ns, WAIT).await);
    step(t0, "no departure record is left");
}

/// A StatefulSet's pod with an init container that leaves a line in an emptyDir and a native
/// sidecar counter: drained, its replacement restores the sidecar and the app counter, and its
/// init container, which ran in the departed pod, completes without running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_departed_pods_init_containers_do_not_run_again_and_its_sidecar_counts_on() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("sidecar").await.unwrap();
    let mut cordons = Cordons::new(&cluster);
    cordons.cordon(NODE_B).unwrap();
    let mut pod = roaming_counter_pod(
        "side",
        &[Counter::new("counter", 8080, "/data/count")],
        true,
    );
    let data = json!([{"name": "data", "mountPath": "/data"}]);
    pod["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    pod["spec"]["containers"][0]["volumeMounts"] = data.clone();
    let image = pod["spec"]["containers"][0]["image"].clone();
    pod["spec"]["initContainers"] = json!([
        {"name": "setup", "image": image, "volumeMounts": data,
         "command": ["sh", "-c", "echo ran >> /data/init-runs"]},
        {"name": "helper", "image": image, "restartPolicy": "Always",
         "args": ["-p", "8081", "-f", "/tmp/count"]},
    ]);
    ns.apply(&counter_controller("StatefulSet", "side", &pod))
        .unwrap();
    let source = ready_on(&cluster, &ns, "side", "", NODE_A).await;
    let source = was(&ns, &source).await;
    assert_eq!(hits(&ns, &source.name, 8080, 3).await, [1, 2, 3]);
    assert_eq!(hits(&ns, &source.name, 8081, 2).await, [1, 2]);
    step(
        t0,
        "side-0 on node-a: its init container ran, counter at 3, sidecar at 2",
    );

    cordons.uncordon(NODE_B).unwrap();
    or_diagnose(&cluster, cordons.drain(NODE_A, STOP_TIMEOUT));
    let now = ready_on(&cluster, &ns, "side", "", NODE_B).await;
    assert_eq!(now, "side-0");
    assert_replaced(&ns, &source, &now).await;
    assert_eq!(hits(&ns, &now, 8080, 1).await, [4]);
    assert_eq!(hits(&ns, &now, 8081, 1).await, [3], "the sidecar counts on");
    let runs = ns
        .exec(&now, "counter", &["cat", "/data/init-runs"])
        .unwrap();
    assert_eq!(runs.trim(), "ran", "the init container ran once, on node-a");
    let replacement = ns.get_pod(&now).await.unwrap();
    let setup = replacement
        .status
        .and_then(|s| s.init_container_statuses)
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.name == "setup")
        .and_then(|c| c.state)
        .and_then(|s| s.terminated)
        .expect("the init container's status");
    assert_eq!(setup.exit_code, 0, "{setup:?}");
    step(
        t0,
        "side-0 on node-b: counter at 4, sidecar at 3, init container skipped",
    );
    or_diagnose(&cluster, wait_no_departure_records(&ns, WAIT).await);
}
