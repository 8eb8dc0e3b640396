//! Faults during a migration, on the two-node set-up of `two_node_migration.rs` (real agents,
//! containerd, shims, CRIU; the API server stand-in; a test kubelet per node). Each test injects
//! one fault at a precise moment and checks that nothing is lost: the source still runs and
//! counts on from where it was (or the clone does, with continuity), the clone's phase
//! annotations and Events say what happened, the source was checkpointed at most once, and no
//! temporary archive or work directory is left behind.
//!
//! * the share turned read-only (ext4 `errors=remount-ro` after a disk error) mid-pack;
//! * the share unmounted (`umount -l`) mid-pack;
//! * the share full (a 24 MiB loop-mounted ext4) mid-pack;
//! * node-a's work disk full (a 24 MiB loop-mounted ext4) while CRIU dumps;
//! * CRIU SIGKILLed while it writes the source's page images;
//! * the target's restore failing (node-b's port is taken, so CRIU cannot restore the socket);
//! * the source pod deleted while it is being checkpointed;
//! * node-a's agent killed at Pending, Transferring and Restoring (Checkpointing: see
//!   `two_node_migration.rs`), node-b's agent killed at every phase;
//! * node-b's containerd restarted while the clone's shim waits for the archive;
//! * two clones of one source created at once: one proceeds, the other is refused.
//!
//! The tests take turns (one cluster at a time). Needs root, containerd, runc, CRIU, iproute2,
//! loop devices and mkfs.ext4; skips otherwise, unless `PODMIGRATE_E2E_REQUIRE` is set.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podmigrate_e2e::cri::POD_NAME_LABEL;
use podmigrate_e2e::harness::skip;
use podmigrate_e2e::nodes::{
    counter_hit, counter_pod, skip_reason, wait_counter_ready, Binaries, CliProcess, CliRun,
    Cluster, ClusterOptions, Counter, NODE_A, NODE_B, PHASE, REASON,
};

/// Bound on pods coming up, going away, and similar waits.
const WAIT: Duration = Duration::from_secs(45);
/// Bound on one `kubectl migrate`.
const CLI_TIMEOUT: Duration = Duration::from_secs(150);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

async fn turn() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    let reason = skip_reason().or_else(podmigrate_e2e::loopfs::skip_reason);
    if let Some(reason) = reason {
        skip(&reason);
        return None;
    }
    Some(SERIAL.lock().await)
}

/// Two nodes; a clone's shim waits at most 30 s for its archive, so a clone whose migration
/// failed gives up soon.
async fn start_cluster() -> Cluster {
    let binaries = Binaries::build().expect("building podmigrate and the shim");
    let mut opts = ClusterOptions::new(binaries);
    opts.archive_wait = Duration::from_secs(30);
    opts.verbose = false;
    Cluster::start(opts).await.expect("starting two nodes")
}

/// Starts a one-counter pod on `node` and counts it up to `count`.
async fn run_counter(cluster: &Cluster, name: &str, node: &str, counter: Counter, count: u64) {
    let port = counter.port;
    cluster
        .create_pod(&counter_pod(name, node, &[counter]))
        .await
        .unwrap();
    cluster
        .wait_running(name, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let ip = cluster.node(node).ip;
    wait_counter_ready(ip, port, WAIT).await.unwrap();
    for expected in 1..=count {
        assert_eq!(counter_hit(ip, port).await.unwrap(), expected);
    }
}

/// `kubectl migrate <pod> --to node-b`, in the background.
fn spawn_migrate(cluster: &Cluster, pod: &str) -> CliProcess {
    cluster
        .spawn_kubectl_migrate(&[pod, "--to", NODE_B, "--timeout", "120s"])
        .unwrap()
}

/// The first clone of `source` once it exists: (name, uid).
async fn wait_clone(cluster: &Cluster, source: &str) -> (String, String) {
    let started = Instant::now();
    loop {
        if let Some(c) = cluster.clones_of(source).await.unwrap().first() {
            return (
                c.metadata.name.clone().unwrap(),
                c.metadata.uid.clone().unwrap(),
            );
        }
        assert!(
            started.elapsed() < WAIT,
            "no clone of {source} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the clone's phase annotation is `phase` (re-checked on every API write).
async fn wait_phase(cluster: &Cluster, clone: &str, phases: &[&str], timeout: Duration) -> String {
    let key = PHASE.replace('/', "~1");
    let found = cluster
        .api
        .wait_for_pod("default", clone, timeout, |p| {
            p.and_then(|p| p.pointer(&format!("/metadata/annotations/{key}")))
                .and_then(|v| v.as_str())
                .is_some_and(|v| phases.contains(&v))
        })
        .await;
    match found {
        Ok(Some(_)) => cluster.annotation(clone, PHASE).unwrap_or_default(),
        _ => panic!(
            "clone {clone} did not reach {phases:?} within {timeout:?}: phase {:?}, reason {:?}\n{}",
            cluster.annotation(clone, PHASE),
            cluster.annotation(clone, REASON),
            cluster.diagnostics(40)
        ),
    }
}

/// Checkpoint attempts node-a's shim made for `pod`: committed or failed.
fn checkpoint_attempts(cluster: &Cluster, pod: &str) -> usize {
    let needle = format!("default/{pod}");
    cluster
        .node(NODE_A)
        .containerd
        .log_text()
        .lines()
        .filter(|l| l.contains(&needle))
        .filter(|l| {
            l.contains("dumped and packed") || l.contains("checkpoint failed; the container keeps")
        })
        .count()
}

/// Files under `dir` (recursively), relative names.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap_or(&path).to_owned());
            }
        }
    }
    out
}

/// What a migration leaves behind in node-local work space, on disk and in memory (checkpoint
/// images, CRIU's work directories, restore copies) and on the share (archives, temporary
/// archives). The CRIU configuration of its containers (`criu/podmigrate.conf`) is the node's, kept on
/// purpose.
fn leftovers(cluster: &Cluster) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for node in [NODE_A, NODE_B] {
        for space in [&cluster.node(node).work, cluster.node(node).memory.path()] {
            out.extend(
                files_under(space)
                    .into_iter()
                    .filter(|p| p != Path::new("criu/podmigrate.conf"))
                    .map(|p| space.join(p)),
            );
        }
    }
    out.extend(
        files_under(&cluster.share)
            .into_iter()
            .map(|p| cluster.share.join(p)),
    );
    out
}

/// Waits (bounded) until nothing is left behind; fails listing what is.
async fn assert_no_leftovers(cluster: &Cluster) {
    let started = Instant::now();
    loop {
        let left = leftovers(cluster);
        if left.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "left behind: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The end of a rolled-back migration: the CLI failed naming `expect_in_reason`, the clone is
/// RolledBack with that reason, Events on both pods say so, the source was checkpointed at most
/// once, and its counter, still on node-a, answers `next`.
async fn assert_rolled_back(
    cluster: &Cluster,
    run: &CliRun,
    source: &str,
    clone: &str,
    port: u16,
    next: u64,
    expect_in_reason: &str,
) {
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = cluster.annotation(clone, PHASE);
    let reason = cluster.annotation(clone, REASON).unwrap_or_default();
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
        let warned = cluster.events(pod, "RolledBack");
        assert!(
            warned.iter().any(|n| n.contains(expect_in_reason)),
            "RolledBack events of {pod}: {warned:?}"
        );
    }
    assert_eq!(cluster.events(clone, "Checkpointing").len(), 1);
    assert!(checkpoint_attempts(cluster, source) <= 1);
    let a = cluster.node(NODE_A).ip;
    assert_eq!(counter_hit(a, port).await.unwrap(), next);
    assert_eq!(counter_hit(a, port).await.unwrap(), next + 1);
    assert!(cluster.get_pod(source).is_some(), "the source pod stays");
    assert!(
        cluster
            .get_pod(source)
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none(),
        "the source pod is not being deleted"
    );
}

/// Polls every millisecond (bounded) for a temporary archive (`.<container>.zip.tmp-*`) in
/// `dir` of at least `min_bytes`, in a thread so the async side keeps running.
fn when_packing(dir: PathBuf, min_bytes: u64) -> std::thread::JoinHandle<Option<PathBuf>> {
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
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let share = cluster.share.clone();
    cluster.mount_loop(&share, 256).unwrap();
    run_counter(
        &cluster,
        "ro",
        NODE_A,
        Counter::new("counter", 8090, "/tmp/count").ballast(96),
        3,
    )
    .await;
    step(t0, "counter at 3 on node-a; the share is a 256 MiB ext4");
    let packing = when_packing(share.join("default").join("ro"), 1 << 20);
    let cli = spawn_migrate(&cluster, "ro");
    let temp = join(packing).await.expect("no temporary archive appeared");
    cluster.loops[0].fail_read_only().unwrap();
    assert!(cluster.loops[0].is_read_only());
    step(
        t0,
        &format!("share read-only while {} was written", temp.display()),
    );
    let (clone, _) = wait_clone(&cluster, "ro").await;
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &run,
        "ro",
        &clone,
        8090,
        4,
        "Read-only file system",
    )
    .await;
    assert!(!cluster.archive("ro", "counter").exists());
    step(t0, "rolled back; node-a's counter counts on");
    // A read-only share keeps its partial file (nothing can remove it); all else is clean.
    let left: Vec<_> = leftovers(&cluster)
        .into_iter()
        .filter(|p| !p.starts_with(&share))
        .collect();
    assert!(left.is_empty(), "left behind: {left:#?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_share_unmounted_mid_pack_rolls_back() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let share = cluster.share.clone();
    cluster.mount_loop(&share, 256).unwrap();
    run_counter(
        &cluster,
        "gone",
        NODE_A,
        Counter::new("counter", 8091, "/tmp/count").ballast(96),
        2,
    )
    .await;
    let packing = when_packing(share.join("default").join("gone"), 1 << 20);
    let cli = spawn_migrate(&cluster, "gone");
    let temp = join(packing).await.expect("no temporary archive appeared");
    cluster.loops[0].detach().unwrap();
    step(
        t0,
        &format!("share unmounted while {} was written", temp.display()),
    );
    let (clone, _) = wait_clone(&cluster, "gone").await;
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    // The pack may finish on the detached filesystem; the archive is then not on the share.
    assert_rolled_back(&cluster, &run, "gone", &clone, 8091, 3, "counter").await;
    assert!(!cluster.archive("gone", "counter").exists());
    assert_no_leftovers(&cluster).await;
    step(t0, "rolled back; node-a's counter counts on");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_share_rolls_back_and_leaves_no_partial_archive() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let share = cluster.share.clone();
    cluster.mount_loop(&share, 24).unwrap();
    // 30% of 96 MiB is incompressible: more than 24 MiB.
    run_counter(
        &cluster,
        "full",
        NODE_A,
        Counter::new("counter", 8092, "/tmp/count").ballast(96),
        2,
    )
    .await;
    step(t0, "counter at 2 on node-a; the share is a 24 MiB ext4");
    let run = spawn_migrate(&cluster, "full")
        .finish(CLI_TIMEOUT)
        .await
        .unwrap();
    let (clone, _) = wait_clone(&cluster, "full").await;
    assert_rolled_back(
        &cluster,
        &run,
        "full",
        &clone,
        8092,
        3,
        "No space left on device",
    )
    .await;
    assert_no_leftovers(&cluster).await;
    step(t0, "rolled back; no partial archive on the share");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_work_disk_fails_the_dump_and_rolls_back() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    let work = cluster.node(NODE_A).work.clone();
    cluster.mount_loop(&work, 24).unwrap();
    // Nor does the checkpoint fit in memory-backed work space, so the shim takes the disk.
    let memory = cluster.node(NODE_A).memory.path().to_path_buf();
    cluster.mount_small_tmpfs(&memory, 16).unwrap();
    // The pages go straight from CRIU to the share, so the disk must be full for CRIU's
    // other images to fail.
    let filler = work.join("filler");
    fill_up(&filler);
    run_counter(
        &cluster,
        "cramped",
        NODE_A,
        Counter::new("counter", 8093, "/tmp/count").ballast(64),
        2,
    )
    .await;
    step(
        t0,
        "counter at 2 on node-a; node-a's work space is a 24 MiB ext4 (and 16 MiB of tmpfs)",
    );
    let run = spawn_migrate(&cluster, "cramped")
        .finish(CLI_TIMEOUT)
        .await
        .unwrap();
    let (clone, _) = wait_clone(&cluster, "cramped").await;
    assert_rolled_back(
        &cluster,
        &run,
        "cramped",
        &clone,
        8093,
        3,
        "checkpointing container counter",
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    assert_no_leftovers(&cluster).await;
    step(t0, "rolled back; node-a's work space is clean again");
    cluster.shutdown().await;
}

/// Writes `path` until its filesystem has no room left.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5au8; 64 << 10];
    loop {
        match file.write(&block) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Smaller writes take the last partial block.
    while let Ok(n) = file.write(&block[..512]) {
        if n == 0 {
            break;
        }
    }
    let _ = file.sync_all();
}

/// Pids of processes named `comm` whose ancestors include one of `roots`.
fn descendants_named(roots: &[i32], comm: &str) -> Vec<i32> {
    let parent = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        rest.split(' ').nth(1)?.parse().ok()
    };
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .filter(|&pid| {
            let mut p = pid;
            for _ in 0..32 {
                match parent(p) {
                    Some(pp) if roots.contains(&pp) => return true,
                    Some(pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn criu_killed_mid_dump_leaves_the_source_running() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    run_counter(
        &cluster,
        "dumped",
        NODE_A,
        Counter::new("counter", 8094, "/tmp/count").ballast(128),
        3,
    )
    .await;
    let cli = spawn_migrate(&cluster, "dumped");
    let (clone, uid) = wait_clone(&cluster, "dumped").await;
    // CRIU (run by runc under node-a's runc shim) is writing page images: kill it.
    let started = Instant::now();
    let killed = loop {
        let writing_pages = cluster
            .dump_dirs(NODE_A, "dumped", &uid, "counter")
            .iter()
            .any(|dir| {
                std::fs::read_dir(dir.join("checkpoint"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("pages-"))
            });
        if writing_pages {
            let shims = cluster.node(NODE_A).containerd.shim_pids();
            let criu = descendants_named(&shims, "criu");
            if !criu.is_empty() {
                for &pid in &criu {
                    // SAFETY: kill(2) on a CRIU our node-a's shims started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                break criu;
            }
        }
        assert!(started.elapsed() < WAIT, "CRIU never wrote pages");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    step(t0, &format!("killed CRIU {killed:?} mid-dump"));
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_rolled_back(
        &cluster,
        &run,
        "dumped",
        &clone,
        8094,
        4,
        "checkpointing container counter",
    )
    .await;
    assert_no_leftovers(&cluster).await;
    step(t0, "rolled back; node-a's counter counts on");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_restore_on_the_target_rolls_back() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    run_counter(
        &cluster,
        "blocked",
        NODE_A,
        Counter::new("counter", 8095, "/tmp/count"),
        3,
    )
    .await;
    // Something else already listens on node-b's 8095: CRIU cannot restore the socket.
    run_counter(
        &cluster,
        "squatter",
        NODE_B,
        Counter::new("counter", 8095, "/tmp/count"),
        1,
    )
    .await;
    step(t0, "counter at 3 on node-a; node-b's port 8095 is taken");
    let run = spawn_migrate(&cluster, "blocked")
        .finish(CLI_TIMEOUT)
        .await
        .unwrap();
    let (clone, _) = wait_clone(&cluster, "blocked").await;
    assert_rolled_back(
        &cluster,
        &run,
        "blocked",
        &clone,
        8095,
        4,
        "RunContainerError",
    )
    .await;
    assert_eq!(checkpoint_attempts(&cluster, "blocked"), 1);
    // The squatter is untouched.
    assert_eq!(counter_hit(cluster.node(NODE_B).ip, 8095).await.unwrap(), 2);
    assert_no_leftovers(&cluster).await;
    step(t0, "rolled back; both counters count on");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_deleted_mid_checkpoint_ends_the_migration_cleanly() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    run_counter(
        &cluster,
        "doomed",
        NODE_A,
        Counter::new("counter", 8096, "/tmp/count").ballast(128),
        3,
    )
    .await;
    let cli = spawn_migrate(&cluster, "doomed");
    let (clone, uid) = wait_clone(&cluster, "doomed").await;
    let started = Instant::now();
    while cluster
        .dump_dirs(NODE_A, "doomed", &uid, "counter")
        .is_empty()
    {
        assert!(started.elapsed() < WAIT, "the checkpoint did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster
        .pods()
        .delete("doomed", &Default::default())
        .await
        .unwrap();
    step(t0, "deleted the source pod while it was being checkpointed");
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = wait_phase(&cluster, &clone, &["Running", "Failed", "RolledBack"], WAIT).await;
    let reason = cluster.annotation(&clone, REASON).unwrap_or_default();
    step(t0, &format!("migration ended {phase}: {reason}"));
    assert!(checkpoint_attempts(&cluster, "doomed") <= 1);
    assert_eq!(cluster.events(&clone, "Checkpointing").len(), 1);
    // The source pod goes as asked, its containers with it.
    cluster.wait_gone("doomed", WAIT).await.unwrap();
    wait_no_containers(&cluster, NODE_A, "doomed").await;
    if phase == "Running" {
        // The checkpoint was taken before the source went: the clone carries its state.
        assert!(run.success, "{}", run.stderr);
        assert_eq!(counter_hit(cluster.node(NODE_B).ip, 8096).await.unwrap(), 4);
    } else {
        assert!(!run.success);
        assert!(counter_hit(cluster.node(NODE_A).ip, 8096).await.is_err());
    }
    assert_no_leftovers(&cluster).await;
    cluster.shutdown().await;
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

/// A successful migration's end: the clone Running on node-b answers `next`, the source is
/// gone from node-a, it was checkpointed once, nothing is left behind.
async fn assert_migrated(
    cluster: &Cluster,
    run: &CliRun,
    source: &str,
    clone: &str,
    port: u16,
    next: u64,
) {
    eprint!("{}{}", run.stdout, run.stderr);
    assert!(run.success, "kubectl migrate failed: {}", run.stderr);
    assert_eq!(cluster.annotation(clone, PHASE).as_deref(), Some("Running"));
    assert_eq!(cluster.events(clone, "Checkpointing").len(), 1);
    assert_eq!(cluster.events(clone, "Migrated").len(), 1);
    assert_eq!(checkpoint_attempts(cluster, source), 1);
    assert_eq!(
        counter_hit(cluster.node(NODE_B).ip, port).await.unwrap(),
        next
    );
    cluster.wait_gone(source, WAIT).await.unwrap();
    wait_no_containers(cluster, NODE_A, source).await;
    assert_no_leftovers(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_agent_killed_at_each_phase_loses_nothing() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;

    // Pending: the agent is down when the clone is made; it checkpoints once it is back.
    run_counter(
        &cluster,
        "p1",
        NODE_A,
        Counter::new("counter", 8097, "/tmp/count"),
        2,
    )
    .await;
    cluster.node_mut(NODE_A).agent.kill_hard();
    let cli = spawn_migrate(&cluster, "p1");
    let (clone, _) = wait_clone(&cluster, "p1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // `kubectl migrate` creates the clone Pending; no agent has moved it on.
    assert_eq!(
        cluster.annotation(&clone, PHASE).as_deref(),
        Some("Pending"),
        "nobody acted yet"
    );
    let agent = &mut cluster.node_mut(NODE_A).agent;
    agent.spawn().unwrap();
    agent.wait_healthy(WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_migrated(&cluster, &run, "p1", &clone, 8097, 3).await;
    // node-b's kubelet is stopped below, which a kubelet may be only while it runs no pods.
    cluster
        .pods()
        .delete(&clone, &Default::default())
        .await
        .unwrap();
    cluster.wait_gone(&clone, WAIT).await.unwrap();
    step(t0, "killed at Pending: migrated once the agent was back");

    // Transferring and Restoring: node-b's kubelet is held back, so the migration waits in
    // Restoring until it runs again.
    for (pod, port, at) in [("p2", 8098, "Transferring"), ("p3", 8099, "Restoring")] {
        run_counter(
            &cluster,
            pod,
            NODE_A,
            Counter::new("counter", port, "/tmp/count"),
            2,
        )
        .await;
        cluster.stop_kubelet(NODE_B).await;
        let cli = spawn_migrate(&cluster, pod);
        let (clone, _) = wait_clone(&cluster, pod).await;
        let seen = wait_phase(&cluster, &clone, &[at, "Restoring"], CLI_TIMEOUT).await;
        cluster.node_mut(NODE_A).agent.kill_hard();
        step(
            t0,
            &format!("killed node-a's agent at {seen} (aimed at {at})"),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let agent = &mut cluster.node_mut(NODE_A).agent;
        agent.spawn().unwrap();
        agent.wait_healthy(WAIT).await.unwrap();
        cluster.start_kubelet(NODE_B);
        let run = cli.finish(CLI_TIMEOUT).await.unwrap();
        assert_migrated(&cluster, &run, pod, &clone, port, 3).await;
        assert!(
            cluster
                .node(NODE_A)
                .agent
                .log_text()
                .matches("resuming after an agent restart")
                .count()
                >= 1
        );
        step(
            t0,
            &format!("killed at {seen}: migrated, checkpointed once"),
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_target_agent_killed_at_each_phase_changes_nothing() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    run_counter(
        &cluster,
        "steady",
        NODE_A,
        Counter::new("counter", 8100, "/tmp/count").ballast(64),
        3,
    )
    .await;
    cluster.stop_kubelet(NODE_B).await;
    let cli = spawn_migrate(&cluster, "steady");
    let (clone, _) = wait_clone(&cluster, "steady").await;
    for at in ["Checkpointing", "Restoring"] {
        wait_phase(&cluster, &clone, &[at], CLI_TIMEOUT).await;
        let agent = &mut cluster.node_mut(NODE_B).agent;
        agent.kill_hard();
        agent.spawn().unwrap();
        agent.wait_healthy(WAIT).await.unwrap();
        step(t0, &format!("node-b's agent killed and restarted at {at}"));
    }
    cluster.start_kubelet(NODE_B);
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    assert_migrated(&cluster, &run, "steady", &clone, 8100, 4).await;
    step(t0, "migrated as if nothing happened");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn containerd_restarted_while_the_clone_waits_leaks_nothing() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let mut cluster = start_cluster().await;
    run_counter(
        &cluster,
        "waiter",
        NODE_A,
        Counter::new("counter", 8101, "/tmp/count"),
        3,
    )
    .await;
    // node-a's agent is down: the clone's shim on node-b waits for an archive that is not there.
    cluster.node_mut(NODE_A).agent.kill_hard();
    let cli = spawn_migrate(&cluster, "waiter");
    let (clone, _) = wait_clone(&cluster, "waiter").await;
    let started = Instant::now();
    while !cluster
        .node(NODE_B)
        .containerd
        .log_text()
        .contains("waiting for the source's archive")
    {
        assert!(started.elapsed() < WAIT, "node-b's shim never waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.node_mut(NODE_B).containerd.restart().await.unwrap();
    step(
        t0,
        "node-b's containerd restarted while the clone's shim waited",
    );
    let agent = &mut cluster.node_mut(NODE_A).agent;
    agent.spawn().unwrap();
    agent.wait_healthy(WAIT).await.unwrap();
    let run = cli.finish(CLI_TIMEOUT).await.unwrap();
    eprint!("{}{}", run.stdout, run.stderr);
    let phase = cluster.annotation(&clone, PHASE).unwrap_or_default();
    step(
        t0,
        &format!(
            "migration ended {phase}: {:?}",
            cluster.annotation(&clone, REASON)
        ),
    );
    assert!(checkpoint_attempts(&cluster, "waiter") <= 1);
    if phase == "Running" {
        assert_migrated(&cluster, &run, "waiter", &clone, 8101, 4).await;
    } else {
        assert_eq!(phase, "RolledBack");
        assert_eq!(counter_hit(cluster.node(NODE_A).ip, 8101).await.unwrap(), 4);
        // The clone's shim gave up: no task was created behind containerd's back, no
        // restore copy is left, and the port on node-b is free.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_no_leftovers(&cluster).await;
        let runc_root = cluster.node(NODE_B).containerd.runc_root().join("k8s.io");
        let clone_containers = cluster
            .node(NODE_B)
            .cri
            .list_containers(&[(POD_NAME_LABEL, clone.as_str())])
            .await
            .unwrap();
        let known: Vec<String> = clone_containers.iter().map(|c| c.id.clone()).collect();
        let runc_ids: Vec<String> = std::fs::read_dir(&runc_root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        for id in &known {
            assert!(
                !runc_ids.contains(id),
                "container {id} of {clone} exists in runc: leaked"
            );
        }
        assert!(counter_hit(cluster.node(NODE_B).ip, 8101).await.is_err());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_clones_of_one_source_at_once_only_one_proceeds() {
    let Some(_turn) = turn().await else { return };
    let t0 = Instant::now();
    let cluster = start_cluster().await;
    run_counter(
        &cluster,
        "twice",
        NODE_A,
        Counter::new("counter", 8102, "/tmp/count"),
        3,
    )
    .await;
    let first = spawn_migrate(&cluster, "twice");
    let second = spawn_migrate(&cluster, "twice");
    let (first, second) = tokio::join!(first.finish(CLI_TIMEOUT), second.finish(CLI_TIMEOUT));
    let runs = [first.unwrap(), second.unwrap()];
    for run in &runs {
        eprint!("{}{}", run.stdout, run.stderr);
    }
    let clones = cluster.clones_of("twice").await.unwrap();
    assert_eq!(clones.len(), 2, "{clones:?}");
    let names: Vec<String> = clones
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    let phases: Vec<Option<String>> = names.iter().map(|n| cluster.annotation(n, PHASE)).collect();
    step(t0, &format!("clones {names:?} ended {phases:?}"));
    let winner = phases
        .iter()
        .position(|p| p.as_deref() == Some("Running"))
        .expect("one clone runs");
    let loser = 1 - winner;
    assert_eq!(phases[loser].as_deref(), Some("Failed"));
    let reason = cluster
        .annotation(&names[loser], REASON)
        .unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "clone default/{} of the same source pod default/twice is already in progress",
            names[winner]
        )),
        "{reason}"
    );
    assert_eq!(cluster.events(&names[loser], "CloneInProgress").len(), 1);
    assert!(cluster.events(&names[loser], "Checkpointing").is_empty());
    assert_eq!(runs.iter().filter(|r| r.success).count(), 1);
    assert_eq!(checkpoint_attempts(&cluster, "twice"), 1);
    assert_eq!(counter_hit(cluster.node(NODE_B).ip, 8102).await.unwrap(), 4);
    cluster.wait_gone("twice", WAIT).await.unwrap();
    step(t0, "one clone runs, counting on; the other was refused");
    cluster.shutdown().await;
}
