//! The whole path on one machine, the way it runs on a cluster: two nodes (each its own network
//! namespace, containerd with our shim, real `podmigrate agent` process and test kubelet), one
//! API server (the in-process stand-in), one share directory, and the real `kubectl migrate`.
//!
//! * the tutorial: a counter on node-a counts to 5, `kubectl migrate counter --to node-b` ends
//!   with its summary line, node-b's clone answers 6 (its count file held 5: the rootfs diff
//!   came along), node-a's pod and containers are gone; then `--clone` of a fresh counter leaves
//!   both running, each counting on from the checkpoint's count on its own;
//! * the tutorial's migration again with the share on real SMB (a private smbd on the host side
//!   of the nodes' links, mounted on each node through FUSE from inside its namespace): 5 -> 6
//!   with its file, the archive crossed both links, node-a's pod is gone;
//! * a pod with two counters migrates whole: both continue;
//! * an archive corrupted on the share (while node-b's kubelet is briefly down, so node-b's shim
//!   only ever sees the corrupted archive) is refused by node-b's shim: the migration rolls
//!   back, node-a's counter is thawed and counts on, the CLI fails with the shim's reason;
//! * node-a's agent SIGKILLed mid-checkpoint and restarted: it resumes or rolls back, never
//!   checkpoints twice, and the counter lives on exactly once;
//! * node-a's agent at `--max-outbound 1` with two migrations asked at once: one is queued
//!   (reason and one `Queued` Event) while the other runs, never both at once, and both
//!   counters continue on node-b.
//!
//! The tests take turns (one cluster at a time: CRIU on two cores). Needs root, containerd,
//! runc, CRIU, iproute2, gcc and busybox-static; skips otherwise, unless
//! `PODMIGRATE_E2E_REQUIRE` is set, in which case it fails.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podmigrate_e2e::cri::POD_NAME_LABEL;
use podmigrate_e2e::harness::skip;
use podmigrate_e2e::nodes::{
    counter_hit, counter_pod, parse_summary, skip_reason, wait_counter_ready, Binaries, CliRun,
    Cluster, ClusterOptions, Counter, ShareBackend, NODE_A, NODE_B, PHASE, REASON,
};

/// Bound on pods coming up, going away, and similar waits.
const WAIT: Duration = Duration::from_secs(45);
/// Bound on one `kubectl migrate`.
const CLI_TIMEOUT: Duration = Duration::from_secs(150);

/// One cluster at a time (held across awaits: an async mutex).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

/// The skip check, then this test's turn.
async fn turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if let Some(reason) = skip_reason() {
        skip(&reason);
        return None;
    }
    Some(SERIAL.lock().await)
}

async fn start_cluster() -> Cluster {
    start_cluster_on(ShareBackend::Directory).await
}

async fn start_cluster_on(share: ShareBackend) -> Cluster {
    let binaries = Binaries::build().expect("building podmigrate and the shim");
    let mut options = ClusterOptions::new(binaries);
    options.share = share;
    Cluster::start(options).await.expect("starting two nodes")
}

/// Starts a counter pod on `node` and waits until every counter answers.
async fn run_counters(cluster: &Cluster, name: &str, node: &str, counters: &[Counter]) {
    cluster
        .create_pod(&counter_pod(name, node, counters))
        .await
        .unwrap();
    cluster
        .wait_running(name, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    for c in counters {
        wait_counter_ready(cluster.node(node).ip, c.port, WAIT)
            .await
            .unwrap();
    }
}

/// The single clone of `source`.
async fn clone_name(cluster: &Cluster, source: &str) -> String {
    let clones = cluster.clones_of(source).await.unwrap();
    assert_eq!(clones.len(), 1, "clones of {source}: {clones:?}");
    clones[0].metadata.name.clone().unwrap()
}

fn assert_cli_ok(run: &CliRun, verb: &str, pod: &str) {
    assert!(
        run.success,
        "kubectl migrate failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        run.code, run.stdout, run.stderr
    );
    let summary = parse_summary(run.last_line())
        .unwrap_or_else(|| panic!("unexpected last line {:?}", run.last_line()));
    assert_eq!(summary.verb, verb);
    assert_eq!(summary.pod, format!("default/{pod}"));
    assert_eq!(
        (summary.from.as_str(), summary.to.as_str()),
        (NODE_A, NODE_B)
    );
    assert!(
        summary.total_seconds > 0.0 && summary.total_seconds <= run.elapsed.as_secs_f64() + 0.1,
        "{summary:?} vs {:?}",
        run.elapsed
    );
    // The CLI prints the total with one decimal and the frozen time with two: allow the
    // total's rounding (seen: total 0.6 s, frozen 0.61 s for a 606 ms migration).
    assert!(
        summary.frozen_seconds <= summary.total_seconds + 0.05,
        "{summary:?}"
    );
    assert!(!summary.moved.starts_with("0 "), "{summary:?}");
}

/// Waits until node `node` has no containers and no sandboxes of pod `pod` any more.
async fn wait_no_containers(cluster: &Cluster, node: &str, pod: &str) {
    let cri = &cluster.node(node).cri;
    let started = Instant::now();
    loop {
        let containers = cri.list_containers(&[(POD_NAME_LABEL, pod)]).await.unwrap();
        let sandboxes = cri
            .list_pod_sandboxes(&[(POD_NAME_LABEL, pod)])
            .await
            .unwrap();
        if containers.is_empty() && sandboxes.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "node {node} still has {} containers and {} sandboxes of pod {pod}",
            containers.len(),
            sandboxes.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_migrates_to_node_b_then_a_clone_diverges() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);
    step(t0, &format!("nodes up: {NODE_A} at {a}, {NODE_B} at {b}"));

    // a. The counter on node-a counts to 5.
    run_counters(
        &cluster,
        "counter",
        NODE_A,
        &[Counter::new("counter", 8080, "/tmp/count")],
    )
    .await;
    for expected in 1..=5 {
        assert_eq!(counter_hit(a, 8080).await.unwrap(), expected);
    }
    assert!(
        counter_hit(b, 8080).await.is_err(),
        "node-b must not answer on 8080 yet: the nodes' networks are separate"
    );
    step(t0, "counter on node-a counted to 5");

    // b. kubectl migrate counter --to node-b
    let run = cluster
        .kubectl_migrate(
            &["counter", "--to", NODE_B, "--timeout", "120s"],
            CLI_TIMEOUT,
        )
        .await
        .unwrap();
    eprint!("{}", run.stdout);
    assert_cli_ok(&run, "migrated", "counter");
    step(t0, "kubectl migrate succeeded");

    // c. node-b's clone: its count file came through the rootfs diff, its count through memory.
    let clone = clone_name(&cluster, "counter").await;
    assert_eq!(
        cluster.annotation(&clone, PHASE).as_deref(),
        Some("Running")
    );
    let pod = cluster.wait_running(&clone, WAIT).await.unwrap();
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(NODE_B));
    let id = cluster.container_id(&clone, "counter").unwrap();
    assert_eq!(
        cluster.cat(NODE_B, &id, "/tmp/count").await.unwrap().trim(),
        "5",
        "the clone's /tmp/count must hold the source's last count before any request"
    );
    assert_eq!(counter_hit(b, 8080).await.unwrap(), 6);
    assert_eq!(
        cluster.cat(NODE_B, &id, "/tmp/count").await.unwrap().trim(),
        "6"
    );
    // Before the freeze node-b reserved memory for the pages image, and node-a waited for it.
    let b_log = std::fs::read_to_string(cluster.node(NODE_B).containerd.log_path()).unwrap();
    assert!(
        b_log.contains("memory reserved for the pages image"),
        "node-b's shim did not reserve memory ahead"
    );
    assert!(
        cluster
            .node(NODE_A)
            .agent
            .log_text()
            .contains("the clone reserved memory for the checkpoint"),
        "node-a's agent did not wait for the reservation"
    );
    step(t0, "node-b's clone answered 6");

    // d. node-a's pod is gone: from the API server, and its containers from node-a.
    cluster.wait_gone("counter", WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_A, "counter").await;
    assert!(counter_hit(a, 8080).await.is_err());
    assert!(
        !cluster.archive("counter", "counter").exists(),
        "the archive is removed after a successful restore"
    );
    step(t0, "node-a's pod and containers are gone");

    // e. --clone of a fresh source: both run on, diverging from the checkpoint's count.
    run_counters(
        &cluster,
        "twin",
        NODE_A,
        &[Counter::new("counter", 8081, "/tmp/count")],
    )
    .await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(a, 8081).await.unwrap(), expected);
    }
    let run = cluster
        .kubectl_migrate(
            &["twin", "--to", NODE_B, "--clone", "--timeout", "120s"],
            CLI_TIMEOUT,
        )
        .await
        .unwrap();
    eprint!("{}", run.stdout);
    assert_cli_ok(&run, "cloned", "twin");
    let twin_clone = clone_name(&cluster, "twin").await;
    cluster.wait_running(&twin_clone, WAIT).await.unwrap();
    cluster.wait_running("twin", WAIT).await.unwrap();
    assert_eq!(counter_hit(a, 8081).await.unwrap(), 4);
    assert_eq!(counter_hit(b, 8081).await.unwrap(), 4);
    assert_eq!(counter_hit(b, 8081).await.unwrap(), 5);
    assert_eq!(counter_hit(b, 8081).await.unwrap(), 6);
    assert_eq!(counter_hit(a, 8081).await.unwrap(), 5);
    let twin_id = cluster.container_id(&twin_clone, "counter").unwrap();
    assert_eq!(
        cluster
            .cat(NODE_B, &twin_id, "/tmp/count")
            .await
            .unwrap()
            .trim(),
        "6"
    );
    assert!(
        cluster.get_pod("twin").is_some(),
        "clone mode keeps the source"
    );
    // The first clone is untouched by all this.
    assert_eq!(counter_hit(b, 8080).await.unwrap(), 7);
    step(t0, "clone and source count on independently");
    cluster.shutdown().await;
    step(t0, "torn down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_two_container_pod_migrates_whole() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);
    let counters = [
        Counter::new("left", 8082, "/tmp/left"),
        Counter::new("right", 8083, "/tmp/right"),
    ];
    run_counters(&cluster, "pair", NODE_A, &counters).await;
    for expected in 1..=2 {
        assert_eq!(counter_hit(a, 8082).await.unwrap(), expected);
    }
    for expected in 1..=3 {
        assert_eq!(counter_hit(a, 8083).await.unwrap(), expected);
    }
    step(t0, "pair on node-a: left at 2, right at 3");

    let run = cluster
        .kubectl_migrate(&["pair", "--to", NODE_B, "--timeout", "120s"], CLI_TIMEOUT)
        .await
        .unwrap();
    eprint!("{}", run.stdout);
    assert_cli_ok(&run, "migrated", "pair");
    let clone = clone_name(&cluster, "pair").await;
    cluster.wait_running(&clone, WAIT).await.unwrap();
    for (container, file, count) in [("left", "/tmp/left", "2"), ("right", "/tmp/right", "3")] {
        let id = cluster.container_id(&clone, container).unwrap();
        assert_eq!(
            cluster.cat(NODE_B, &id, file).await.unwrap().trim(),
            count,
            "{container}"
        );
    }
    assert_eq!(counter_hit(b, 8082).await.unwrap(), 3);
    assert_eq!(counter_hit(b, 8083).await.unwrap(), 4);
    cluster.wait_gone("pair", WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_A, "pair").await;
    step(t0, "both containers continue on node-b");
    cluster.shutdown().await;
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
                        eprintln!("corrupted {} at byte {offset} of {len}", path.display());
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupt_archive_is_refused_and_the_source_rolls_back() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let a = cluster.node(NODE_A).ip;
    // Ballast, so the archive's middle lies deep in the memory pages' data.
    run_counters(
        &cluster,
        "fragile",
        NODE_A,
        &[Counter::new("counter", 8084, "/tmp/count").ballast(8)],
    )
    .await;
    assert_eq!(counter_hit(a, 8084).await.unwrap(), 1);
    assert_eq!(counter_hit(a, 8084).await.unwrap(), 2);

    // node-b's kubelet is down for a moment (as while it pulls an image), so the archive is
    // committed, and corrupted "in flight", before node-b's shim looks for it: no race.
    cluster.stop_kubelet(NODE_B).await;
    let corrupter = corrupt_when_committed(cluster.archive("fragile", "counter"), WAIT);
    let cli = cluster
        .spawn_kubectl_migrate(&["fragile", "--to", NODE_B, "--timeout", "120s"])
        .unwrap();
    let corrupted = tokio::task::spawn_blocking(move || corrupter.join().unwrap())
        .await
        .unwrap();
    assert!(corrupted, "the archive was not committed within {WAIT:?}");
    cluster.start_kubelet(NODE_B);
    step(
        t0,
        "archive committed and corrupted; node-b's kubelet starts the clone",
    );
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    step(t0, "kubectl migrate returned");
    eprint!("{}{}", run.stdout, run.stderr);
    assert!(!run.success, "a corrupt archive must fail the migration");
    assert_eq!(run.code, Some(1));
    let stderr = run.stderr.trim();
    assert!(
        stderr.starts_with("podmigrate: error: migration of default/fragile rolled back: ")
            && stderr.contains("RunContainerError")
            && stderr.contains(
                "containerd-shim-migrate-v2: restoring counter of clone pod default/fragile-mig-"
            )
            && stderr.contains("entry \"checkpoint/pages-")
            && stderr.contains("the source was resumed"),
        "the CLI must give node-b's shim's reason: {stderr}"
    );

    let clone = clone_name(&cluster, "fragile").await;
    assert_eq!(
        cluster.annotation(&clone, PHASE).as_deref(),
        Some("RolledBack")
    );
    let reason = cluster.annotation(&clone, REASON).unwrap_or_default();
    assert!(reason.contains("fragile/counter.zip"), "{reason}");
    // node-b's kubelet reported the refused start as kubelet does.
    let clone_status = cluster.api.get_pod("default", &clone).unwrap()["status"].clone();
    assert_eq!(
        clone_status["containerStatuses"][0]["state"]["waiting"]["reason"], "RunContainerError",
        "{clone_status}"
    );
    assert!(counter_hit(cluster.node(NODE_B).ip, 8084).await.is_err());
    // node-a's counter was thawed and counts on; the source pod stays.
    assert_eq!(counter_hit(a, 8084).await.unwrap(), 3);
    assert_eq!(counter_hit(a, 8084).await.unwrap(), 4);
    assert!(cluster.get_pod("fragile").is_some());
    cluster.wait_running("fragile", WAIT).await.unwrap();
    step(t0, "node-a's counter counts on after the rollback");
    cluster.shutdown().await;
}

/// The source's checkpoint directory the agent asked the shim for:
/// `<work>/checkpoints/<clone uid>/<container>/checkpoint` (CRIU's images).
fn criu_images_dir(work: &Path, clone_uid: &str, container: &str) -> PathBuf {
    work.join("checkpoints")
        .join(clone_uid)
        .join(container)
        .join("checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_checkpoint_never_checkpoints_twice() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);
    // Ballast, so the checkpoint (dump and pack) takes a while.
    run_counters(
        &cluster,
        "heavy",
        NODE_A,
        &[Counter::new("counter", 8085, "/tmp/count").ballast(128)],
    )
    .await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(a, 8085).await.unwrap(), expected);
    }
    step(t0, "heavy counter on node-a at 3");

    let cli = cluster
        .spawn_kubectl_migrate(&["heavy", "--to", NODE_B, "--timeout", "140s"])
        .unwrap();
    // Wait for CRIU to be writing the source's images, then kill node-a's agent.
    let started = Instant::now();
    let (clone, images) = loop {
        let clones = cluster.clones_of("heavy").await.unwrap();
        if let Some(c) = clones.first() {
            let name = c.metadata.name.clone().unwrap();
            let uid = c.metadata.uid.clone().unwrap();
            // On disk (the agent's image path) or in memory-backed work space.
            let dumps = cluster.dump_dirs(NODE_A, "heavy", &uid, "counter");
            if cluster.annotation(&name, PHASE).as_deref() == Some("Checkpointing")
                && !dumps.is_empty()
            {
                break (name, dumps[0].join("checkpoint"));
            }
        }
        assert!(
            started.elapsed() < WAIT,
            "the checkpoint did not start within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    cluster.node_mut(NODE_A).agent.kill_hard();
    let committed_at_kill = cluster.archive("heavy", "counter").exists();
    step(
        t0,
        &format!(
            "killed node-a's agent while checkpointing {clone} (CRIU images at {}, archive committed: {committed_at_kill})",
            images.display()
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let agent = &mut cluster.node_mut(NODE_A).agent;
    agent.spawn().unwrap();
    agent.wait_healthy(WAIT).await.unwrap();
    step(t0, "node-a's agent restarted");

    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = cluster.annotation(&clone, PHASE).unwrap_or_default();
    step(t0, &format!("migration ended {phase}"));
    assert!(
        phase == "Running" || phase == "RolledBack",
        "final phase {phase:?}; reason {:?}",
        cluster.annotation(&clone, REASON)
    );

    // Never a second checkpoint: one Checkpointing event, one dump in node-a's shim.
    let checkpoint_events = cluster.events(&clone, "Checkpointing").len();
    assert_eq!(checkpoint_events, 1, "Checkpointing events for {clone}");
    let dumps = cluster
        .node(NODE_A)
        .containerd
        .log_text()
        .lines()
        .filter(|l| l.contains("dumped and packed") && l.contains("default/heavy"))
        .count();
    assert_eq!(dumps, 1, "CRIU dumps of default/heavy on node-a");

    if phase == "Running" {
        assert_cli_ok(&run, "migrated", "heavy");
        assert!(
            cluster
                .node(NODE_A)
                .agent
                .log_text()
                .contains("resuming after an agent restart"),
            "the restarted agent must say it resumed"
        );
        cluster.wait_gone("heavy", WAIT).await.unwrap();
        wait_no_containers(&cluster, NODE_A, "heavy").await;
        assert_eq!(counter_hit(b, 8085).await.unwrap(), 4);
        step(t0, "resumed: the clone on node-b counts on");
    } else {
        assert!(!run.success);
        assert!(run.stderr.contains("rolled back"), "{}", run.stderr);
        assert!(cluster.get_pod("heavy").is_some());
        assert_eq!(counter_hit(a, 8085).await.unwrap(), 4);
        step(t0, "rolled back: the source on node-a counts on");
    }
    cluster.shutdown().await;
}

/// The phases in which a migration holds one of its source node's `--max-outbound` slots.
const IN_FLIGHT: [&str; 3] = ["Checkpointing", "Transferring", "Restoring"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_max_outbound_one_a_second_migration_is_queued_until_the_first_ends() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let binaries = Binaries::build().expect("building podmigrate and the shim");
    let mut options = ClusterOptions::new(binaries);
    options.agent_args = vec!["--max-outbound".into(), "1".into()];
    let cluster = Cluster::start(options).await.expect("starting two nodes");
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);
    // Some ballast, so that each migration holds its slot for a while.
    let sources = [("first", 8086u16, 2u64), ("second", 8087, 3)];
    for (name, port, count) in sources {
        run_counters(
            &cluster,
            name,
            NODE_A,
            &[Counter::new("counter", port, "/tmp/count").ballast(32)],
        )
        .await;
        for expected in 1..=count {
            assert_eq!(counter_hit(a, port).await.unwrap(), expected);
        }
    }
    step(
        t0,
        "first at 2 and second at 3 on node-a (agent --max-outbound 1)",
    );

    let runs = sources.map(|(name, _, _)| {
        cluster
            .spawn_kubectl_migrate(&[name, "--to", NODE_B, "--timeout", "140s"])
            .unwrap()
    });
    // Watch both clones' phases and reasons until both CLIs have returned.
    let queued_reason =
        format!("queued: 1 outbound migration(s) already run on node {NODE_A} (--max-outbound)");
    let mut clones: [Option<String>; 2] = [None, None];
    // (clone queued, the other clone's phase) whenever that pair changed while a queued
    // reason was shown.
    let mut seen_queued: Vec<(usize, String)> = Vec::new();
    let mut both_in_flight = Vec::new();
    let [run_first, run_second] = runs;
    let finished = tokio::spawn(async move {
        let first = run_first.finish(CLI_TIMEOUT).await.unwrap();
        let second = run_second.finish(CLI_TIMEOUT).await.unwrap();
        (first, second)
    });
    while !finished.is_finished() {
        for (i, (source, _, _)) in sources.iter().enumerate() {
            if clones[i].is_none() {
                clones[i] = cluster
                    .clones_of(source)
                    .await
                    .unwrap()
                    .first()
                    .and_then(|c| c.metadata.name.clone());
            }
        }
        if let [Some(c0), Some(c1)] = &clones {
            let phases = [c0, c1].map(|c| cluster.annotation(c, PHASE).unwrap_or_default());
            let reasons = [c0, c1].map(|c| cluster.annotation(c, REASON).unwrap_or_default());
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
    eprint!("{}{}", run_first.stdout, run_second.stdout);
    assert_cli_ok(&run_first, "migrated", "first");
    assert_cli_ok(&run_second, "migrated", "second");
    step(t0, "both migrations ended");

    assert!(
        both_in_flight.is_empty(),
        "both migrations held a slot at once: {both_in_flight:?}"
    );
    let names = clones.map(|c| c.expect("both clones were seen"));
    let queued_events = names.clone().map(|c| cluster.events(&c, "Queued"));
    eprintln!("Queued events: {queued_events:?}; queued while the other was: {seen_queued:?}");
    // Exactly one of them was queued, announced once, with the reason naming the setting.
    let queued: Vec<usize> = (0..2).filter(|&i| !queued_events[i].is_empty()).collect();
    assert_eq!(queued.len(), 1, "Queued events: {queued_events:?}");
    let (waiter, runner) = (queued[0], 1 - queued[0]);
    assert_eq!(queued_events[waiter], [queued_reason.clone()]);
    // ... while the other one ran.
    assert!(
        seen_queued
            .iter()
            .any(|(i, other)| *i == waiter && IN_FLIGHT.contains(&other.as_str())),
        "{} was never seen queued while {} was in flight: {seen_queued:?}",
        names[waiter],
        names[runner]
    );
    assert!(seen_queued.iter().all(|(i, _)| *i == waiter));
    // Each was checkpointed once, the queued one only after waiting, and node-a's shim made
    // each archive for its clone (named by the agent's lease; node-b's shim checked it).
    let shim_log = cluster.node(NODE_A).containerd.log_text();
    for name in &names {
        assert_eq!(cluster.events(name, "Checkpointing").len(), 1, "{name}");
        assert_eq!(cluster.annotation(name, PHASE).as_deref(), Some("Running"));
        let uid = cluster.get_pod(name).unwrap().metadata.uid.unwrap();
        assert!(
            shim_log
                .lines()
                .any(|l| l.contains("archive made for clone") && l.contains(&uid)),
            "node-a's shim did not record clone uid {uid} of {name}"
        );
    }

    // Both counters continue on node-b; the sources are gone.
    for (i, (source, port, count)) in sources.into_iter().enumerate() {
        cluster.wait_running(&names[i], WAIT).await.unwrap();
        assert_eq!(counter_hit(b, port).await.unwrap(), count + 1, "{source}");
        cluster.wait_gone(source, WAIT).await.unwrap();
    }
    step(
        t0,
        &format!(
            "{} was queued while {} ran; both continue on node-b",
            names[waiter], names[runner]
        ),
    );
    cluster.shutdown().await;
}

#[test]
fn criu_images_live_under_the_clone_uid() {
    assert_eq!(
        criu_images_dir(Path::new("/w"), "u1", "c"),
        Path::new("/w/checkpoints/u1/c/checkpoint")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_migrates_over_an_smb_share() {
    let Some(_turn) = turn().await else { return };
    if let Some(reason) = podmigrate_e2e::smb::skip_reason() {
        podmigrate_e2e::harness::skip(&reason);
        return;
    }
    let t0 = Instant::now();
    let cluster = start_cluster_on(ShareBackend::Smb).await;
    let (a, b) = (cluster.node(NODE_A).ip, cluster.node(NODE_B).ip);
    for node in [NODE_A, NODE_B] {
        let share = &cluster.node(node).share;
        assert!(
            share.starts_with(&cluster.node(node).share_mount.as_ref().unwrap().mountpoint),
            "{node} must see the share through its own mount, not {}",
            share.display()
        );
    }
    step(t0, "nodes up, each with its own SMB mount");

    run_counters(
        &cluster,
        "counter",
        NODE_A,
        &[Counter::new("counter", 8080, "/tmp/count")],
    )
    .await;
    for expected in 1..=5 {
        assert_eq!(counter_hit(a, 8080).await.unwrap(), expected);
    }
    let run = cluster
        .kubectl_migrate(
            &["counter", "--to", NODE_B, "--timeout", "120s"],
            CLI_TIMEOUT,
        )
        .await
        .unwrap();
    eprint!("{}", run.stdout);
    assert_cli_ok(&run, "migrated", "counter");
    step(t0, "kubectl migrate succeeded over SMB");

    let clone = clone_name(&cluster, "counter").await;
    let pod = cluster.wait_running(&clone, WAIT).await.unwrap();
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some(NODE_B));
    let id = cluster.container_id(&clone, "counter").unwrap();
    assert_eq!(
        cluster.cat(NODE_B, &id, "/tmp/count").await.unwrap().trim(),
        "5"
    );
    assert_eq!(counter_hit(b, 8080).await.unwrap(), 6);
    cluster.wait_gone("counter", WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_A, "counter").await;
    assert!(counter_hit(a, 8080).await.is_err());
    // The archive went through node-a's mount to the server and back out through node-b's:
    // node-b's shim logged the archive under its own mount's path.
    let b_share = cluster.node(NODE_B).share.display().to_string();
    assert!(
        cluster
            .node(NODE_B)
            .containerd
            .log_text()
            .contains(&b_share),
        "node-b's containerd log never mentions its share {b_share}"
    );
    assert!(
        !cluster.archive("counter", "counter").exists(),
        "the archive is removed from the server after a successful restore"
    );
    step(t0, "node-b's clone answered 6; node-a's pod is gone");
    cluster.shutdown().await;
    step(t0, "torn down");
}
