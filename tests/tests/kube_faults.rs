//! Faults during a migration on the real cluster of `scripts/local-up-cluster.sh` (stock
//! Kubernetes, each node's containerd with our shim, the agent as its DaemonSet). Each test
//! injects one fault at a precise moment and checks that nothing is lost: the source still runs
//! and counts on from where it was (or the clone does, with continuity), the clone's phase
//! annotations and Events say what happened, the source was checkpointed at most once, and no
//! temporary archive or work directory is left behind.
//!
//! * the share turned read-only (ext4 `errors=remount-ro` after a disk error) mid-pack;
//! * the share unmounted (`umount -l`) on node-a mid-pack;
//! * the share full (a 24 MiB ext4) mid-pack;
//! * node-a's work disk full (a 24 MiB ext4) and its memory work space too small;
//! * CRIU SIGKILLed while it dumps the source;
//! * the target's restore failing (node-b's CRIU killed mid-restore);
//! * the source pod deleted while it is being checkpointed;
//! * node-a's agent killed at Pending, Transferring and Restoring; node-b's agent killed at
//!   Checkpointing and Restoring;
//! * node-b's containerd restarted while the clone's shim waits for the archive;
//! * two clones of one source created at once: one proceeds, the other is refused;
//! * post-copy: node-a's link cut while the clone fetches its memory (the clone is stopped,
//!   saying why, and cannot restart fresh; once node-a is back the migration rolls back and
//!   the source, which kept every page, counts on), and node-a's agent killed meanwhile (it is
//!   not in the page stream: the migration completes);
//! * the agent's loop: refused clones are marked and reported on both pods, a clone made by
//!   hand gets the label its source's agent needs.
//!
//! Migrations are post-copy, the default, but for the faults of packing the pages (the share
//! read-only, unmounted or full, the work disk full, CRIU killed mid-dump), which only
//! stop-and-copy puts in the archive. The target's restore failing is tested with each.
//!
//! Mounts are made inside the nodes' own mount namespaces (host mounts never reach a node).
//! Tests that change node-wide state take the cluster alone and put it back when they end,
//! failed or not. Needs root; skips otherwise, unless `PODMIGRATE_E2E_REQUIRE` is set.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use podmigrate_e2e::cli::{CliProcess, CliRun};
use podmigrate_e2e::cluster::{
    counter_pod, KubeCluster, TestNamespace, CLONE_OF_LABEL, MEMORY_IN_NODE, NODE_A, NODE_B, PHASE,
    REASON, SHARE_IN_NODE, WORK_IN_NODE,
};
use podmigrate_e2e::counter::Counter;

/// Bound on pods coming up, going away, and similar waits.
const WAIT: Duration = Duration::from_secs(60);
/// Bound on one `kubectl migrate`.
const CLI_TIMEOUT: Duration = Duration::from_secs(150);

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

async fn cluster() -> Option<KubeCluster> {
    KubeCluster::for_test(podmigrate_e2e::loopfs::skip_reason()).await
}

fn counter() -> Counter {
    Counter::new("counter", 8080, "/tmp/count")
}

/// Starts a one-counter pod on `node` and counts it up to `count`.
async fn run_counter(ns: &TestNamespace, name: &str, node: &str, counter: Counter, count: u64) {
    let port = counter.port;
    ns.start_counters(name, node, &[counter], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    for expected in 1..=count {
        assert_eq!(ns.hit(name, port).await.unwrap(), expected);
    }
}

/// `kubectl migrate <pod> --to node-b`, in the background (post-copy, the default).
fn spawn_migrate(ns: &TestNamespace, pod: &str) -> CliProcess {
    ns.spawn_kubectl_migrate(&[pod, "--to", NODE_B, "--timeout", "120s"])
        .unwrap()
}

/// `kubectl migrate <pod> --to node-b --transfer stop-and-copy`, in the background: for the
/// faults of packing the pages, which only stop-and-copy puts in the archive.
fn spawn_stop_and_copy(ns: &TestNamespace, pod: &str) -> CliProcess {
    ns.spawn_kubectl_migrate(&[
        pod,
        "--to",
        NODE_B,
        "--timeout",
        "120s",
        "--transfer",
        "stop-and-copy",
    ])
    .unwrap()
}

/// The notes of the Events on `pod` with reason `reason`.
async fn notes(ns: &TestNamespace, pod: &str, reason: &str) -> Vec<String> {
    ns.events(pod, Some(reason))
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.message.unwrap_or_default())
        .collect()
}

/// Checkpointing Events on the clone: one, never repeated.
async fn assert_checkpointing_once(ns: &TestNamespace, clone: &str) {
    let events = ns.events(clone, Some("Checkpointing")).await.unwrap();
    assert_eq!(events.len(), 1, "Checkpointing events of {clone}");
    assert_eq!(events[0].count.unwrap_or(1), 1, "Checkpointing of {clone}");
}

/// The end of a rolled-back migration: the CLI failed naming `expect_in_reason`, the clone is
/// RolledBack with that reason, Events on both pods say so, the source was checkpointed at most
/// once, and its counter, still on node-a, answers `next`.
#[allow(clippy::too_many_arguments)]
async fn assert_rolled_back(
    cluster: &KubeCluster,
    ns: &TestNamespace,
    run: &CliRun,
    source: &str,
    clone: &str,
    port: u16,
    next: u64,
    expect_in_reason: &str,
) {
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = ns.annotation(clone, PHASE).await;
    let reason = ns.annotation(clone, REASON).await.unwrap_or_default();
    assert_eq!(phase.as_deref(), Some("RolledBack"), "reason: {reason}");
    assert!(
        reason.contains(expect_in_reason),
        "reason {reason:?} must name {expect_in_reason:?}"
    );
    assert!(!run.success, "kubectl migrate must fail");
    assert!(
        run.stderr.contains("rolled back") && run.stderr.contains(expect_in_reason),
        "{}",
        run.stderr
    );
    for pod in [clone, source] {
        let warned = notes(ns, pod, "RolledBack").await;
        assert!(
            warned.iter().any(|n| n.contains(expect_in_reason)),
            "RolledBack events of {pod}: {warned:?}"
        );
    }
    assert_checkpointing_once(ns, clone).await;
    assert!(cluster.checkpoint_attempts(&ns.name, source) <= 1);
    assert_eq!(ns.hit(source, port).await.unwrap(), next);
    assert_eq!(ns.hit(source, port).await.unwrap(), next + 1);
    assert_eq!(ns.node_of(source).await.as_deref(), Some(NODE_A));
    let pod = ns.get_pod(source).await.expect("the source pod stays");
    assert!(
        pod.metadata.deletion_timestamp.is_none(),
        "the source pod is not being deleted"
    );
}

/// Polls every millisecond (bounded) for a temporary archive (`.<container>.zip.tmp-*`) of at
/// least `min_bytes` in the share directory of `namespace/pod` as `node` sees it, in a thread so
/// the async side keeps running.
fn when_packing(
    cluster: &KubeCluster,
    node: &str,
    namespace: &str,
    pod: &str,
    min_bytes: u64,
) -> std::thread::JoinHandle<Option<PathBuf>> {
    let root = cluster.node_root(node).unwrap();
    let dir = root
        .join(SHARE_IN_NODE.trim_start_matches('/'))
        .join(namespace)
        .join(pod);
    std::thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < WAIT * 2 {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && name.contains(".zip.tmp-")
                    && entry.metadata().is_ok_and(|m| m.len() >= min_bytes)
                {
                    return Some(entry.path());
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    })
}

async fn join<T: Send + 'static>(handle: std::thread::JoinHandle<T>) -> T {
    tokio::task::spawn_blocking(move || handle.join().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_share_turning_read_only_mid_pack_rolls_back() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("ro").await.unwrap();
    // One ext4 over the share on both nodes: node-b sees what node-a writes.
    let share = cluster
        .mount_ext4(&[NODE_A, NODE_B], SHARE_IN_NODE, 256)
        .unwrap();
    run_counter(&ns, "ro", NODE_A, counter().ballast(96), 3).await;
    step(t0, "counter at 3 on node-a; the share is a 256 MiB ext4");
    let packing = when_packing(&cluster, NODE_A, &ns.name, "ro", 1 << 20);
    let cli = spawn_stop_and_copy(&ns, "ro");
    let temp = join(packing).await.expect("no temporary archive appeared");
    share.fail_read_only().unwrap();
    assert!(share.is_read_only(NODE_A));
    step(
        t0,
        &format!("share read-only while {} was written", temp.display()),
    );
    let (clone, _) = ns.wait_clone("ro", WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &ns,
        &run,
        "ro",
        &clone,
        8080,
        4,
        "Read-only file system",
    )
    .await;
    let archive = format!("{SHARE_IN_NODE}/{}/ro/counter.zip", ns.name);
    assert!(cluster.node_files(NODE_A, &archive).is_empty());
    step(t0, "rolled back; node-a's counter counts on");
    // A read-only share keeps its partial file (nothing can remove it); all else is clean.
    let uid = ns.uid_of("ro").await.unwrap();
    let left: Vec<_> = cluster
        .leftovers(&ns.name, &[&uid])
        .into_iter()
        .filter(|p| {
            !p.to_string_lossy()
                .contains(SHARE_IN_NODE.trim_start_matches('/'))
        })
        .collect();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_share_unmounted_mid_pack_rolls_back() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("gone").await.unwrap();
    // On node-a only: node-b keeps the share underneath, which the detached filesystem never
    // reaches. (node-b so never answers node-a's size announcement: the agent freezes after
    // --prepare-wait.)
    let mut share = cluster.mount_ext4(&[NODE_A], SHARE_IN_NODE, 256).unwrap();
    run_counter(&ns, "gone", NODE_A, counter().ballast(96), 2).await;
    let packing = when_packing(&cluster, NODE_A, &ns.name, "gone", 1 << 20);
    let cli = spawn_stop_and_copy(&ns, "gone");
    let temp = join(packing).await.expect("no temporary archive appeared");
    share.detach(NODE_A).unwrap();
    step(
        t0,
        &format!("share unmounted while {} was written", temp.display()),
    );
    let (clone, _) = ns.wait_clone("gone", WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    // The pack may finish on the detached filesystem; the archive is then not on the share.
    assert_rolled_back(&cluster, &ns, &run, "gone", &clone, 8080, 3, "counter").await;
    let archive = format!("{SHARE_IN_NODE}/{}/gone/counter.zip", ns.name);
    for node in [NODE_A, NODE_B] {
        assert!(cluster.node_files(node, &archive).is_empty());
    }
    let uid = ns.uid_of("gone").await.unwrap();
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    step(t0, "rolled back; node-a's counter counts on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_share_rolls_back_and_leaves_no_partial_archive() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("full").await.unwrap();
    let _share = cluster
        .mount_ext4(&[NODE_A, NODE_B], SHARE_IN_NODE, 24)
        .unwrap();
    // 30% of 96 MiB is incompressible: more than 24 MiB.
    run_counter(&ns, "full", NODE_A, counter().ballast(96), 2).await;
    step(t0, "counter at 2 on node-a; the share is a 24 MiB ext4");
    let run = spawn_stop_and_copy(&ns, "full")
        .finish(CLI_TIMEOUT)
        .await
        .unwrap();
    let (clone, _) = ns.wait_clone("full", WAIT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &ns,
        &run,
        "full",
        &clone,
        8080,
        3,
        "No space left on device",
    )
    .await;
    let uid = ns.uid_of("full").await.unwrap();
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    step(t0, "rolled back; no partial archive on the share");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_work_disk_fails_the_dump_and_rolls_back() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("cramped").await.unwrap();
    let _work = cluster.mount_ext4(&[NODE_A], WORK_IN_NODE, 24).unwrap();
    // Nor does the checkpoint fit in memory-backed work space, so the shim takes the disk.
    let _memory = cluster.mount_tmpfs(NODE_A, MEMORY_IN_NODE, 16).unwrap();
    // The pages go straight from CRIU to the share, so the disk must be full for CRIU's
    // other images to fail.
    let filler = format!("{WORK_IN_NODE}/filler");
    let _ = cluster.on_node(
        NODE_A,
        &["sh", "-c", &format!("cat /dev/zero >{filler}; sync")],
    );
    run_counter(&ns, "cramped", NODE_A, counter().ballast(64), 2).await;
    step(
        t0,
        "counter at 2 on node-a; node-a's work space is a full 24 MiB ext4 (and 16 MiB of tmpfs)",
    );
    let run = spawn_stop_and_copy(&ns, "cramped")
        .finish(CLI_TIMEOUT)
        .await
        .unwrap();
    let (clone, _) = ns.wait_clone("cramped", WAIT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &ns,
        &run,
        "cramped",
        &clone,
        8080,
        3,
        "checkpointing container counter",
    )
    .await;
    cluster.on_node(NODE_A, &["rm", "-f", &filler]).unwrap();
    let uid = ns.uid_of("cramped").await.unwrap();
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    step(t0, "rolled back; node-a's work space is clean again");
}

/// Kills (SIGKILL) the first `criu` on `node` whose command line contains `verb` once it has
/// run `after`; returns its pid.
async fn kill_criu(cluster: &KubeCluster, node: &str, verb: &str, after: Duration) -> i32 {
    let started = Instant::now();
    let mut seen: Option<(i32, Instant)> = None;
    loop {
        let criu: Vec<i32> = cluster
            .processes_on(node, "criu")
            .into_iter()
            .filter(|(_, cmdline)| cmdline.split(' ').any(|w| w == verb))
            .map(|(pid, _)| pid)
            .collect();
        match seen {
            Some((pid, since)) if criu.contains(&pid) && since.elapsed() >= after => {
                // SAFETY: kill(2) on a CRIU of our own test cluster's node.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return pid;
            }
            Some((pid, _)) if criu.contains(&pid) => {}
            _ => seen = criu.first().map(|&pid| (pid, Instant::now())),
        }
        assert!(started.elapsed() < WAIT * 2, "no CRIU {verb} on {node}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[ignore = "open: in about 1 run of 6 the source, thawed and with CRIU's network lock removed, does not answer within 5 s after its CRIU was SIGKILLed mid-dump (3 of 18 runs on 2026-12-05: 2 of 14 runs of this test alone, 1 of 4 runs of the suite); the cause is not found yet"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn criu_killed_mid_dump_leaves_the_source_running() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("dumped").await.unwrap();
    run_counter(&ns, "dumped", NODE_A, counter().ballast(256), 3).await;
    let packing = when_packing(&cluster, NODE_A, &ns.name, "dumped", 1 << 20);
    let cli = spawn_stop_and_copy(&ns, "dumped");
    let (clone, _) = ns.wait_clone("dumped", WAIT).await.unwrap();
    // CRIU (run by runc under node-a's runc shim) is writing page images, which the shim packs
    // onto the share as they come: kill it then. (Killed earlier, while it injects its
    // parasite into the task, CRIU can leave the task itself broken: no shim can undo that.)
    join(packing)
        .await
        .expect("the pages never reached the share");
    let killed = kill_criu(&cluster, NODE_A, "dump", Duration::ZERO).await;
    step(t0, &format!("killed CRIU {killed} mid-dump"));
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &ns,
        &run,
        "dumped",
        &clone,
        8080,
        4,
        "checkpointing container counter",
    )
    .await;
    let uid = ns.uid_of("dumped").await.unwrap();
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    step(t0, "rolled back; node-a's counter counts on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_restore_on_the_target_rolls_back() {
    let Some(cluster) = cluster().await else {
        return;
    };
    // Alone: any CRIU restoring on node-b is this test's.
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("blocked").await.unwrap();
    // Post-copy (the default: the clone's lazy-pages daemon is running when its CRIU dies), then
    // stop-and-copy.
    for (pod, stop_and_copy) in [("blocked", false), ("copied", true)] {
        run_counter(&ns, pod, NODE_A, counter().ballast(128), 3).await;
        // Every pod has its own network namespace, so no other pod can take the clone's port:
        // node-b's CRIU is killed while it restores instead, which fails the restore (runc's
        // Start).
        let cli = if stop_and_copy {
            spawn_stop_and_copy(&ns, pod)
        } else {
            spawn_migrate(&ns, pod)
        };
        let (clone, _) = ns.wait_clone(pod, WAIT).await.unwrap();
        let killed = kill_criu(&cluster, NODE_B, "restore", Duration::from_millis(50)).await;
        step(
            t0,
            &format!("{pod}: killed node-b's CRIU {killed} mid-restore"),
        );
        let run = cli.finish(CLI_TIMEOUT).await.unwrap();
        assert_rolled_back(
            &cluster,
            &ns,
            &run,
            pod,
            &clone,
            8080,
            4,
            "RunContainerError",
        )
        .await;
        assert_eq!(cluster.checkpoint_attempts(&ns.name, pod), 1);
        let uid = ns.uid_of(pod).await.unwrap();
        cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
        step(t0, &format!("{pod}: rolled back; the counter counts on"));
    }
}

/// Waits until `node` has no containers and no sandboxes of pod `namespace/pod` any more.
async fn wait_no_containers(cluster: &KubeCluster, node: &str, namespace: &str, pod: &str) {
    let started = Instant::now();
    loop {
        let left = cluster.containers_of(node, namespace, pod).unwrap();
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "node {node} still has containers of pod {namespace}/{pod}: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_deleted_mid_checkpoint_ends_the_migration_cleanly() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("doomed").await.unwrap();
    run_counter(&ns, "doomed", NODE_A, counter().ballast(128), 3).await;
    let uid = ns.uid_of("doomed").await.unwrap();
    let cli = spawn_migrate(&ns, "doomed");
    let (clone, _) = ns.wait_clone("doomed", WAIT).await.unwrap();
    // The checkpoint has started once its directory exists, in memory or on disk.
    let root = cluster.node_root(NODE_A).unwrap();
    let dirs = [
        root.join(MEMORY_IN_NODE.trim_start_matches('/'))
            .join("checkpoints")
            .join(&ns.name)
            .join("doomed"),
        root.join(WORK_IN_NODE.trim_start_matches('/'))
            .join("checkpoints")
            .join(&uid),
    ];
    let started = Instant::now();
    while !dirs
        .iter()
        .any(|d| std::fs::read_dir(d).is_ok_and(|mut entries| entries.next().is_some()))
    {
        assert!(started.elapsed() < WAIT, "the checkpoint did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    ns.delete_pod("doomed").await.unwrap();
    step(t0, "deleted the source pod while it was being checkpointed");
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = ns
        .wait_phase(&clone, &["Running", "Failed", "RolledBack"], WAIT)
        .await
        .unwrap();
    let reason = ns.annotation(&clone, REASON).await.unwrap_or_default();
    step(t0, &format!("migration ended {phase}: {reason}"));
    assert!(cluster.checkpoint_attempts(&ns.name, "doomed") <= 1);
    assert_checkpointing_once(&ns, &clone).await;
    // The source pod goes as asked, its containers with it.
    ns.wait_gone("doomed", WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_A, &ns.name, "doomed").await;
    if phase == "Running" {
        // The checkpoint was taken before the source went: the clone carries its state.
        assert!(run.success, "{}", run.stderr);
        assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);
    } else {
        assert!(!run.success);
    }
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
}

/// A successful migration's end: the clone Running on node-b answers `next`, the source is
/// gone from node-a, it was checkpointed once, nothing is left behind.
async fn assert_migrated(
    cluster: &KubeCluster,
    ns: &TestNamespace,
    run: &CliRun,
    source: &str,
    clone: &str,
    port: u16,
    next: u64,
) {
    eprint!("{}{}", run.stdout, run.stderr);
    assert!(run.success, "kubectl migrate failed: {}", run.stderr);
    assert_eq!(
        ns.annotation(clone, PHASE).await.as_deref(),
        Some("Running")
    );
    assert_checkpointing_once(ns, clone).await;
    assert_eq!(notes(ns, clone, "Migrated").await.len(), 1);
    assert_eq!(cluster.checkpoint_attempts(&ns.name, source), 1);
    ns.wait_running(clone, WAIT).await.unwrap();
    assert_eq!(ns.node_of(clone).await.as_deref(), Some(NODE_B));
    assert_eq!(ns.hit(clone, port).await.unwrap(), next);
    let uid = ns.uid_of(source).await;
    ns.wait_gone(source, WAIT).await.unwrap();
    wait_no_containers(cluster, NODE_A, &ns.name, source).await;
    let uids: Vec<&str> = uid.iter().map(String::as_str).collect();
    cluster.assert_no_leftovers(&ns.name, &uids).await;
}

/// Starts node `node`'s kubelet again when dropped, if it is stopped (also when a test fails).
struct KubeletBack<'a>(&'a KubeCluster, &'static str);

impl Drop for KubeletBack<'_> {
    fn drop(&mut self) {
        let _ = self.0.local_up(&["kubelet", self.1, "start"]);
    }
}

/// Puts a node's agent back when dropped: a stopped one (SIGSTOP) is killed, so kubelet
/// starts it afresh, and a fresh pod is made if it does not come back soon.
struct AgentBack<'a>(&'a KubeCluster, &'static str);

impl Drop for AgentBack<'_> {
    fn drop(&mut self) {
        let (cluster, node) = (self.0, self.1);
        let _ = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    if let Ok((id, pid)) = cluster.agent_process(node).await {
                        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .unwrap_or_default();
                        if state.contains(") T ") {
                            // SAFETY: kill(2) on our own cluster's stopped agent.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                            let _ = cluster.wait_agent_back(node, &id, WAIT).await;
                        }
                    }
                    let _ = cluster.wait_agents_ready(WAIT);
                })
            })
            .join()
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_agent_killed_at_each_phase_loses_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let _agent = AgentBack(&cluster, NODE_A);
    let t0 = Instant::now();
    let ns = cluster.namespace("srcagent").await.unwrap();

    // Pending: the agent is down (stopped) when the clone is made; it dies, kubelet starts it
    // again, and it checkpoints once it is back.
    run_counter(&ns, "p1", NODE_A, counter(), 2).await;
    let old = cluster.signal_agent(NODE_A, libc::SIGSTOP).await.unwrap();
    let cli = spawn_migrate(&ns, "p1");
    let (clone, _) = ns.wait_clone("p1", WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // `kubectl migrate` creates the clone Pending; no agent has moved it on.
    assert_eq!(
        ns.annotation(&clone, PHASE).await.as_deref(),
        Some("Pending"),
        "nobody acted yet"
    );
    cluster.signal_agent(NODE_A, libc::SIGKILL).await.unwrap();
    cluster.wait_agent_back(NODE_A, &old, WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_migrated(&cluster, &ns, &run, "p1", &clone, 8080, 3).await;
    step(t0, "killed at Pending: migrated once the agent was back");

    // Transferring and Restoring: node-b's kubelet is held back, so the migration waits in
    // Restoring until it runs again.
    for (pod, at) in [("p2", "Transferring"), ("p3", "Restoring")] {
        run_counter(&ns, pod, NODE_A, counter(), 2).await;
        cluster.local_up(&["kubelet", NODE_B, "stop"]).unwrap();
        let kubelet = KubeletBack(&cluster, NODE_B);
        let cli = spawn_migrate(&ns, pod);
        let (clone, _) = ns.wait_clone(pod, WAIT).await.unwrap();
        let seen = ns
            .wait_phase(&clone, &[at, "Restoring"], CLI_TIMEOUT)
            .await
            .unwrap();
        let old = cluster.signal_agent(NODE_A, libc::SIGKILL).await.unwrap();
        step(
            t0,
            &format!("killed node-a's agent at {seen} (aimed at {at})"),
        );
        cluster.wait_agent_back(NODE_A, &old, WAIT).await.unwrap();
        drop(kubelet);
        let run = cli.finish(CLI_TIMEOUT).await.unwrap();
        assert_migrated(&cluster, &ns, &run, pod, &clone, 8080, 3).await;
        assert!(
            cluster
                .agent_log(NODE_A, 2000)
                .contains("resuming after an agent restart"),
            "{}",
            cluster.agent_log(NODE_A, 50)
        );
        step(
            t0,
            &format!("killed at {seen}: migrated, checkpointed once"),
        );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_target_agent_killed_at_each_phase_changes_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let _agent = AgentBack(&cluster, NODE_B);
    let t0 = Instant::now();
    let ns = cluster.namespace("dstagent").await.unwrap();
    // Ballast, so that each phase lasts: node-b's kubelet must run to start the killed agent
    // again, so the phases are caught as they pass.
    run_counter(&ns, "steady", NODE_A, counter().ballast(256), 3).await;
    let cli = spawn_migrate(&ns, "steady");
    let (clone, _) = ns.wait_clone("steady", WAIT).await.unwrap();
    for at in ["Checkpointing", "Restoring"] {
        ns.wait_phase(&clone, &[at], CLI_TIMEOUT).await.unwrap();
        let old = cluster.signal_agent(NODE_B, libc::SIGKILL).await.unwrap();
        step(t0, &format!("node-b's agent killed at {at}"));
        cluster.wait_agent_back(NODE_B, &old, WAIT).await.unwrap();
    }
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_migrated(&cluster, &ns, &run, "steady", &clone, 8080, 4).await;
    step(t0, "migrated as if nothing happened");
}

/// Starts node `node`'s containerd again when dropped, if it is stopped.
struct ContainerdBack<'a>(&'a KubeCluster, &'static str);

impl Drop for ContainerdBack<'_> {
    fn drop(&mut self) {
        let _ = self.0.local_up(&["containerd", self.1, "start"]);
    }
}

#[ignore = "open: the agent rolls back on the RunContainerError of kubelet's first Create (broken by the restart, before any archive existed), and kubelet's retry may restore meanwhile; the fix is for the clone's shim to report a restore failure through the share protocol, so the agent stops reading kubelet's transient errors as the restore's"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_restarted_while_the_clone_waits_leaks_nothing() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let _agent = AgentBack(&cluster, NODE_A);
    let t0 = Instant::now();
    let ns = cluster.namespace("waiter").await.unwrap();
    run_counter(&ns, "waiter", NODE_A, counter(), 3).await;
    // node-a's agent is down: the clone's shim on node-b waits for an archive that is not there.
    let old = cluster.signal_agent(NODE_A, libc::SIGSTOP).await.unwrap();
    let cli = spawn_migrate(&ns, "waiter");
    let (clone, _) = ns.wait_clone("waiter", WAIT).await.unwrap();
    let started = Instant::now();
    let needle = format!("pod {}/{clone} ", ns.name);
    while !cluster
        .containerd_log(NODE_B)
        .lines()
        .any(|l| l.contains(&needle) && l.contains("waiting for the source's archive"))
    {
        assert!(started.elapsed() < WAIT, "node-b's shim never waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let _back = ContainerdBack(&cluster, NODE_B);
        cluster.local_up(&["containerd", NODE_B, "stop"]).unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    step(
        t0,
        "node-b's containerd restarted while the clone's shim waited",
    );
    cluster.signal_agent(NODE_A, libc::SIGKILL).await.unwrap();
    cluster.wait_agent_back(NODE_A, &old, WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = ns.annotation(&clone, PHASE).await.unwrap_or_default();
    step(
        t0,
        &format!(
            "migration ended {phase}: {:?}",
            ns.annotation(&clone, REASON).await
        ),
    );
    assert!(cluster.checkpoint_attempts(&ns.name, "waiter") <= 1);
    if phase == "Running" {
        assert_migrated(&cluster, &ns, &run, "waiter", &clone, 8080, 4).await;
    } else {
        assert_eq!(phase, "RolledBack");
        assert_eq!(ns.hit("waiter", 8080).await.unwrap(), 4);
        // Kubelet retries the Create that containerd's restart broke (attempt 1), which may
        // restore the archive the agent, back again, made meanwhile; but the agent has rolled
        // back on attempt 0's RunContainerError and deletes the clone: its containers go, in
        // containerd and in runc, and only the source counts on.
        let ids = cluster.containers_of(NODE_B, &ns.name, &clone).unwrap();
        ns.wait_gone(&clone, WAIT).await.unwrap();
        wait_no_containers(&cluster, NODE_B, &ns.name, &clone).await;
        let uid = ns.uid_of("waiter").await.unwrap();
        cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
        let runc_root = cluster.node_path(NODE_B, "/run/containerd/runc/k8s.io");
        let runc_ids: Vec<String> = std::fs::read_dir(&runc_root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for id in &ids {
            assert!(
                !runc_ids.contains(id),
                "container {id} of {clone} still exists in runc: leaked"
            );
        }
        assert_eq!(ns.hit("waiter", 8080).await.unwrap(), 5);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clones_of_one_source_at_once_only_one_proceeds() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("twice").await.unwrap();
    run_counter(&ns, "twice", NODE_A, counter(), 3).await;
    let first = spawn_migrate(&ns, "twice");
    let second = spawn_migrate(&ns, "twice");
    let (first, second) = tokio::join!(first.finish(CLI_TIMEOUT), second.finish(CLI_TIMEOUT));
    let runs = [first.unwrap(), second.unwrap()];
    for run in &runs {
        eprint!("{}{}", run.stdout, run.stderr);
    }
    let clones = ns.clones_of("twice").await.unwrap();
    assert_eq!(clones.len(), 2, "{clones:?}");
    let names: Vec<String> = clones
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let mut phases = Vec::new();
    for n in &names {
        phases.push(ns.annotation(n, PHASE).await);
    }
    step(t0, &format!("clones {names:?} ended {phases:?}"));
    let winner = phases
        .iter()
        .position(|p| p.as_deref() == Some("Running"))
        .expect("one clone runs");
    let loser = 1 - winner;
    assert_eq!(phases[loser].as_deref(), Some("Failed"));
    let reason = ns
        .annotation(&names[loser], REASON)
        .await
        .unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "clone {0}/{1} of the same source pod {0}/twice is already in progress",
            ns.name, names[winner]
        )),
        "{reason}"
    );
    assert_eq!(notes(&ns, &names[loser], "CloneInProgress").await.len(), 1);
    assert!(notes(&ns, &names[loser], "Checkpointing").await.is_empty());
    assert_eq!(runs.iter().filter(|r| r.success).count(), 1);
    assert_eq!(cluster.checkpoint_attempts(&ns.name, "twice"), 1);
    ns.wait_running(&names[winner], WAIT).await.unwrap();
    assert_eq!(ns.hit(&names[winner], 8080).await.unwrap(), 4);
    ns.wait_gone("twice", WAIT).await.unwrap();
    step(t0, "one clone runs, counting on; the other was refused");
}

/// Waits for an Event with `reason` on pod `pod`; returns the notes.
async fn wait_event(ns: &TestNamespace, pod: &str, reason: &str) -> Vec<String> {
    let started = Instant::now();
    loop {
        let found = notes(ns, pod, reason).await;
        if !found.is_empty() {
            return found;
        }
        assert!(started.elapsed() < WAIT, "no {reason} Event on {pod}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The agents' watch, decide, patch and Event loop: a clone of a pod that did not opt in is marked Failed
/// and reported on both pods; a clone made by hand (the annotation only) is labelled, then
/// refused because its source does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_clones_are_marked_and_reported_and_hand_made_clones_labelled() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _turn = KubeCluster::shared_turn().await;
    let ns = cluster.namespace("loop").await.unwrap();
    // A source that did not opt in, and a clone of it as `kubectl migrate` builds one (the CLI
    // itself refuses such a pod, so the clone is made here).
    let mut private = counter_pod("private", NODE_A, &[counter()]);
    private
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .remove("podmigrate.io/migratable");
    ns.create_pod(&private).await.unwrap();
    ns.wait_running("private", WAIT).await.unwrap();
    let source = ns.get_pod("private").await.unwrap();
    let clone = podmigrate_kubelet_plugin::cli::clone_pod::build_clone_pod(
        &source,
        NODE_B,
        "private-clone",
        podmigrate_vocabulary::Mode::Migrate,
        false,
    );
    ns.create_pod(&clone).await.unwrap();
    ns.wait_phase("private-clone", &["Failed"], WAIT)
        .await
        .unwrap();
    let reason = ns
        .annotation("private-clone", REASON)
        .await
        .unwrap_or_default();
    assert!(
        reason.contains("podmigrate.io/migratable"),
        "reason: {reason}"
    );
    for pod in ["private", "private-clone"] {
        wait_event(&ns, pod, "NotMigratable").await;
    }
    // The source was never touched: still there, not deleted, counting from 1.
    let source = ns.get_pod("private").await.unwrap();
    assert!(source.metadata.deletion_timestamp.is_none());
    assert_eq!(ns.hit("private", 8080).await.unwrap(), 1);

    // A clone made by hand, annotation only, on node-a: the agent labels it, and the labelled
    // clone then reaches the controller (and is refused: its source does not exist).
    let by_hand: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "by-hand",
                     "annotations": {"podmigrate.io/clone-pod": "nobody"}},
        "spec": {"nodeSelector": {"kubernetes.io/hostname": NODE_A},
                 "runtimeClassName": "migrate",
                 "terminationGracePeriodSeconds": 2,
                 "containers": [{"name": "counter",
                                 "image": podmigrate_e2e::cluster::COUNTER_IMAGE}]}
    }))
    .unwrap();
    ns.create_pod(&by_hand).await.unwrap();
    ns.wait_phase("by-hand", &["Failed"], WAIT).await.unwrap();
    let handled = ns.get_pod("by-hand").await.unwrap();
    assert_eq!(
        handled
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(CLONE_OF_LABEL))
            .map(String::as_str),
        Some("nobody")
    );
    let reason = ns.annotation("by-hand", REASON).await.unwrap_or_default();
    assert!(reason.contains("does not exist"), "{reason}");
}

// ---- post-copy ------------------------------------------------------------------------------

/// Puts node `node`'s network link back when dropped (also when a test fails).
struct LinkBack<'a>(&'a KubeCluster, &'static str);

impl Drop for LinkBack<'_> {
    fn drop(&mut self) {
        let _ = self.0.local_up(&["link", self.1, "up"]);
    }
}

/// A one-counter pod on `node` with `ballast_mib` of memory and its migrations capped at
/// `cap` per second (`podmigrate.io/bandwidth-per-migration`), so that its memory takes a
/// while to stream; counted up to `count`.
async fn run_capped_counter(
    ns: &TestNamespace,
    name: &str,
    ballast_mib: u32,
    cap: &str,
    count: u64,
) {
    let mut pod = counter_pod(name, NODE_A, &[counter().ballast(ballast_mib)]);
    pod.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert("podmigrate.io/bandwidth-per-migration".into(), cap.into());
    ns.create_pod(&pod).await.unwrap();
    ns.wait_running(name, WAIT).await.unwrap();
    let ip = ns.pod_ip(name).await.unwrap();
    podmigrate_e2e::counter::wait_counter_ready(ip, 8080, WAIT)
        .await
        .unwrap();
    for expected in 1..=count {
        assert_eq!(ns.hit(name, 8080).await.unwrap(), expected);
    }
}

/// Every message kubelet shows for the containers of `pod` (terminated, last terminated,
/// waiting).
async fn container_messages(ns: &TestNamespace, pod: &str) -> Vec<String> {
    let Some(pod) = ns.get_pod(pod).await else {
        return Vec::new();
    };
    let mut messages = Vec::new();
    for cs in pod
        .status
        .and_then(|s| s.container_statuses)
        .into_iter()
        .flatten()
    {
        for state in [cs.state, cs.last_state].into_iter().flatten() {
            messages.extend(state.terminated.and_then(|t| t.message));
            messages.extend(state.waiting.and_then(|w| w.message));
        }
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postcopy_with_the_link_cut_mid_stream_the_clone_stops_and_the_source_runs_on() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let t0 = Instant::now();
    let ns = cluster.namespace("linkcut").await.unwrap();
    // 128 MiB at 16 MiB/s: the memory streams for about 8 s after the clone resumes.
    run_capped_counter(&ns, "cut", 128, "16Mi", 3).await;
    let cli = spawn_migrate(&ns, "cut");
    let (clone, _) = ns.wait_clone("cut", WAIT).await.unwrap();
    ns.wait_phase(&clone, &["PostCopy"], CLI_TIMEOUT)
        .await
        .unwrap();
    cluster.local_up(&["link", NODE_A, "down"]).unwrap();
    let link = LinkBack(&cluster, NODE_A);
    step(t0, "node-a's link cut while the clone fetches its memory");
    // node-b notices the dead link (TCP keepalive and user timeout, about 10 s) and stops the
    // clone, saying why; a restart is refused rather than run fresh.
    let started = Instant::now();
    let said = loop {
        let messages = container_messages(&ns, &clone).await;
        if let Some(m) = messages.iter().find(|m| m.contains("post-copy")) {
            break m.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(45),
            "the clone was not stopped: {messages:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(said.contains("memory"), "{said}");
    step(t0, &format!("the clone stopped: {said}"));
    drop(link);
    step(t0, "node-a's link back");
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    assert!(!run.success, "kubectl migrate must fail");
    assert!(run.stderr.contains("page stream"), "{}", run.stderr);
    // The source kept every page: it counts on from where it was, on node-a.
    assert_eq!(ns.hit("cut", 8080).await.unwrap(), 4);
    assert_eq!(ns.node_of("cut").await.as_deref(), Some(NODE_A));
    let warned = notes(&ns, "cut", "RolledBack").await;
    assert!(
        warned.iter().any(|n| n.contains("page stream")),
        "RolledBack events of the source: {warned:?}"
    );
    ns.wait_gone(&clone, WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_B, &ns.name, &clone).await;
    let uid = ns.uid_of("cut").await.unwrap();
    cluster.assert_no_leftovers(&ns.name, &[&uid]).await;
    step(t0, "rolled back; node-a's counter counts on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postcopy_goes_on_while_the_source_agent_is_killed() {
    let Some(cluster) = cluster().await else {
        return;
    };
    let _alone = KubeCluster::exclusive().await;
    let _agent = AgentBack(&cluster, NODE_A);
    let t0 = Instant::now();
    let ns = cluster.namespace("pcagent").await.unwrap();
    run_capped_counter(&ns, "pc", 128, "16Mi", 3).await;
    let before = ns.checksum("pc", 8080).await.unwrap();
    let cli = spawn_migrate(&ns, "pc");
    let (clone, _) = ns.wait_clone("pc", WAIT).await.unwrap();
    ns.wait_phase(&clone, &["PostCopy"], CLI_TIMEOUT)
        .await
        .unwrap();
    let old = cluster.signal_agent(NODE_A, libc::SIGKILL).await.unwrap();
    step(t0, "node-a's agent killed in PostCopy");
    // The clone answers meanwhile: its memory comes from node-a's shim, not its agent.
    assert_eq!(ns.hit(&clone, 8080).await.unwrap(), 4);
    cluster.wait_agent_back(NODE_A, &old, WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_migrated(&cluster, &ns, &run, "pc", &clone, 8080, 5).await;
    assert_eq!(ns.checksum(&clone, 8080).await.unwrap(), before);
    step(t0, "migrated; the memory is byte for byte the source's");
}
