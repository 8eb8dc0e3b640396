//! The shim's checkpoint and restore for real: a private containerd with the CRI plugin runs the
//! counter app under the `migrate` handler (our shim in front of containerd's runc shim), the
//! source is checkpointed through containerd's own Tasks API (as the podmigrate agent does), and
//! a clone pod carrying `podmigrate.io/clone-pod` is restored from the archive on the share.
//!
//! * checkpoint through containerd's API: the archive is committed on the share, the CLI
//!   verifies and inspects it, the image path holds the checkpoint layout, the source carries on;
//! * a clone restores the process: its count and its files continue the source's;
//! * restore failures (missing archive, corrupt archive) fail StartContainer with a message
//!   naming pod, container, archive and reason, and leave nothing behind; `fallback: fresh`
//!   starts the container anew instead;
//! * a failed checkpoint leaves the source running, thawed, untouched;
//! * an archive made for one clone (the agent's lease names it) is refused by another clone of
//!   the same source and restored by its own;
//! * with `PODMIGRATE_KEY_FILE` the archive is sealed (refused without the key, by the library
//!   and `podmigrate verify`), a clone restores it, a plain archive is refused, and the key is
//!   in neither the archive nor the logs;
//! * a clone whose spec drops every capability, or runs as another user, refuses the root
//!   task's credentials in CRIU's images; the clone with the source's own spec restores.
//!
//! Each test runs its own containerd (host-network pods: every counter gets its own port).
//! Needs root, containerd, ctr, runc, CRIU, gcc and busybox-static; skips otherwise, unless
//! `PODMIGRATE_E2E_REQUIRE` is set, in which case it fails.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use podmigrate_checkpoint::archive;
use podmigrate_checkpoint::layout::{
    CHECKPOINT_DIR, CONFIG_DUMP, DELETED_FILES, ROOTFS_DIFF_TAR, SPEC_DUMP,
};
use podmigrate_e2e::containerd::{
    build_shim, cri_skip_reason, find_in_path, Containerd, ContainerdOptions, MIGRATE_HANDLER,
};
use podmigrate_e2e::cri::{ContainerSpec, ContainerState, CriClient, Pod};
use podmigrate_e2e::harness::{skip, unique_id, wait_for, Scratch};
use podmigrate_e2e::migrate::{
    build_cli, checkpoint_options, counter_hit, free_port, grpc_message, list_tree, podmigrate,
    wait_http_ready, TasksApi,
};
use podmigrate_e2e::oci::{self, COUNTER_IMAGE};

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(20);
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// The shim's settings (shim/src/config.rs) and the annotations it reads
/// (shim/src/identity.rs).
const ENV_SHARE_ROOT: &str = "PODMIGRATE_SHARE_ROOT";
const ENV_WORK_DIR: &str = "PODMIGRATE_WORK_DIR";
const ENV_MEMORY_DIR: &str = "PODMIGRATE_MEMORY_DIR";
const ENV_ARCHIVE_WAIT: &str = "PODMIGRATE_ARCHIVE_WAIT_SECONDS";
const CLONE_POD: &str = "podmigrate.io/clone-pod";
const FALLBACK: &str = "podmigrate.io/fallback";
const NODE_NAME: &str = "node-a";
const NAMESPACE: &str = "default";
const CONTAINER: &str = "counter";
/// The counter's count file inside the container (the image has none: only the rootfs diff
/// can bring it to a clone).
const COUNT_FILE: &str = "/tmp/count";

/// One node: a containerd whose shims see `share` and `work`, with the counter image imported.
/// Fields drop in order: clients, then containerd (which kills what runs), then the scratch dir.
struct Node {
    tasks: TasksApi,
    cri: CriClient,
    ctrd: Containerd,
    share: PathBuf,
    work: PathBuf,
    scratch: Scratch,
    /// The node's memory-backed work space (tmpfs).
    memory: Scratch,
}

/// How the node's share looks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Share {
    /// A directory, as on a real node.
    Dir,
    /// A regular file where the share root should be: no pod directory can be made under it
    /// (root ignores permission bits, not file types).
    RegularFile,
}

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

/// Whether the suite can run here; reports the skip (or fails, see `skip`) when not.
fn can_run() -> bool {
    let reason = cri_skip_reason().or_else(|| {
        find_in_path("criu")
            .is_none()
            .then(|| "`criu` not found (scripts/setup.sh installs it)".to_owned())
    });
    match reason {
        Some(reason) => {
            skip(&reason);
            false
        }
        None => true,
    }
}

async fn start_node(label: &str, archive_wait_seconds: u32, share_kind: Share) -> Node {
    start_node_with_env(label, archive_wait_seconds, share_kind, &[]).await
}

/// [`start_node`], with more of the shim's settings in containerd's environment.
async fn start_node_with_env(
    label: &str,
    archive_wait_seconds: u32,
    share_kind: Share,
    env: &[(&str, &str)],
) -> Node {
    let scratch = Scratch::new(&format!("podmigrate-e2e-{label}-")).expect("scratch directory");
    let share = scratch.path().join("share");
    let work = scratch.path().join("work");
    match share_kind {
        Share::Dir => fs::create_dir(&share).unwrap(),
        Share::RegularFile => fs::write(&share, "not a directory\n").unwrap(),
    }
    fs::create_dir(&work).unwrap();
    let memory =
        Scratch::in_memory(&format!("podmigrate-e2e-{label}-")).expect("memory work space");
    // Built (or found) before containerd starts: the first build may take a while.
    let image = oci::counter_image().expect("building the counter image");
    let mut opts = ContainerdOptions::named(label);
    opts.shim = build_shim().expect("building the shim for the migrate handler");
    // runc (run by the runc shim) finds CRIU on PATH: the patched one is in /usr/local/sbin.
    let path = format!(
        "/usr/local/sbin:/usr/local/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    opts.extra_env = vec![
        ("PATH".into(), path),
        (ENV_SHARE_ROOT.into(), share.display().to_string()),
        (ENV_WORK_DIR.into(), work.display().to_string()),
        (ENV_MEMORY_DIR.into(), memory.path().display().to_string()),
        (ENV_ARCHIVE_WAIT.into(), archive_wait_seconds.to_string()),
        ("NODE_NAME".into(), NODE_NAME.into()),
    ];
    opts.extra_env
        .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let ctrd = Containerd::start(opts).await.expect("starting containerd");
    ctrd.import(&image, IMPORT_TIMEOUT)
        .expect("importing the counter image");
    let cri = ctrd.cri().await.expect("CRI client");
    let tasks = TasksApi::connect(ctrd.address())
        .await
        .expect("containerd Tasks API client");
    Node {
        tasks,
        cri,
        ctrd,
        share,
        work,
        scratch,
        memory,
    }
}

fn counter_spec(port: u16) -> ContainerSpec {
    let port = port.to_string();
    ContainerSpec::new(CONTAINER, COUNTER_IMAGE).args(&["-p", &port, "-f", COUNT_FILE])
}

impl Node {
    /// containerd's content store: (digest, size) of every blob.
    fn content_blobs(&self) -> Vec<(String, u64)> {
        let dir = self
            .ctrd
            .root_dir()
            .join("io.containerd.content.v1.content/blobs/sha256");
        fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let size = e.metadata().ok()?.len();
                Some((e.file_name().to_string_lossy().into_owned(), size))
            })
            .collect()
    }

    /// `<share>/<ns>/<pod>/<container>.zip`.
    fn archive(&self, pod: &str) -> PathBuf {
        self.share
            .join(NAMESPACE)
            .join(pod)
            .join(format!("{CONTAINER}.zip"))
    }

    /// Starts a created (restored) container, waits for it to run, and checks the counter's
    /// next answer on `port` is `count`.
    async fn start_expecting(&self, id: &str, port: u16, count: u64, start: &str, what: &str) {
        self.cri
            .start_container(id)
            .await
            .unwrap_or_else(|e| panic!("{start}: {e:?}"));
        self.cri
            .wait_container_state(id, ContainerState::ContainerRunning, WAIT)
            .await
            .unwrap();
        assert_eq!(counter_hit(port).unwrap(), count, "{what}");
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A `migrate` pod sandbox named `name` in `default`, with pod `annotations`.
    async fn pod(&self, name: &str, annotations: &[(&str, &str)]) -> Pod {
        self.pod_with_uid(name, &unique_id("uid"), annotations)
            .await
    }

    /// [`Node::pod`] with the pod uid `uid` (the shim's `io.kubernetes.cri.sandbox-uid`).
    async fn pod_with_uid(&self, name: &str, uid: &str, annotations: &[(&str, &str)]) -> Pod {
        self.cri
            .run_pod_sandbox(name, NAMESPACE, uid, annotations, MIGRATE_HANDLER)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"))
    }

    /// Runs the counter in a new pod `name` on `port`, waits until it answers; returns the pod
    /// and the container id.
    async fn run_counter(&self, name: &str, port: u16) -> (Pod, String) {
        let pod = self.pod(name, &[]).await;
        let id = self
            .cri
            .run_container(&pod, &counter_spec(port))
            .await
            .unwrap_or_else(|e| panic!("running the counter in pod {name}: {e:?}"));
        self.cri
            .wait_container_state(&id, ContainerState::ContainerRunning, WAIT)
            .await
            .unwrap();
        wait_http_ready(port, WAIT).await.unwrap();
        (pod, id)
    }

    /// CreateContainer of the counter in `pod` (the shim's Create runs later, on StartContainer,
    /// when CRI creates the task).
    async fn create_counter(&self, pod: &Pod, port: u16) -> String {
        self.cri
            .create_container(pod, &counter_spec(port))
            .await
            .unwrap_or_else(|e| panic!("CreateContainer in pod {}: {e:?}", pod.name()))
    }

    async fn exec_cat(&self, id: &str, path: &str) -> Result<String> {
        let out = self.cri.exec_sync(id, &["cat", path], WAIT).await?;
        ensure!(
            out.exit_code == 0,
            "cat {path} in {id}: exit {} ({})",
            out.exit_code,
            out.stderr_str().trim()
        );
        Ok(out.stdout_str().trim().to_owned())
    }

    /// Nothing is left of any restore's local copy: no files under `<work>/restore`, no
    /// directory for `container_id`.
    fn assert_no_restore_residue(&self, container_id: &str) {
        let restore = self.work.join("restore");
        let files: Vec<_> = list_tree(&restore)
            .into_iter()
            .filter(|p| !restore.join(p).is_dir())
            .collect();
        assert!(
            files.is_empty(),
            "files left under {}: {files:?}",
            restore.display()
        );
        let own = restore.join(NAMESPACE).join(container_id);
        assert!(!own.exists(), "restore copy {} left behind", own.display());
    }

    /// Tears every pod down as kubelet would, and waits for their shims (ours and the runc
    /// shims behind them) to exit, which removes their sockets: the harness, killing the shims
    /// of pods left running, would leave the runc shims' sockets in /run/containerd/s.
    async fn teardown(&self) {
        let pods = self.cri.list_pod_sandboxes(&[]).await.unwrap();
        for pod in &pods {
            self.cri
                .teardown_pod(&pod.id, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("tearing down pod {}: {e:?}", pod.id));
        }
        let exited = wait_for(
            "the pods' shims to exit",
            WAIT,
            Duration::from_millis(50),
            || self.ctrd.shim_pids().is_empty().then_some(()),
        );
        assert!(
            exited.is_ok(),
            "shims left after every pod was removed: {:?}",
            self.ctrd.shim_processes()
        );
    }

    /// No CRIU work directory of a checkpoint is left.
    fn assert_no_criu_residue(&self) {
        let criu = self.work.join("criu");
        let left = list_tree(&criu);
        assert!(
            left.is_empty(),
            "CRIU work files left under {}: {left:?}",
            criu.display()
        );
    }
}

/// The entries of a tar file, by path, with their contents.
fn tar_entries(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut archive = tar::Archive::new(fs::File::open(path)?);
    let mut out = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        out.push((name, data));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// 1. Checkpoint through containerd's API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_through_containerds_tasks_api_commits_an_archive_and_keeps_the_source() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let cli = build_cli().expect("building the podmigrate CLI");
    let node = start_node("ckpt-api", 30, Share::Dir).await;
    let port = free_port();
    let (_pod, id) = node.run_counter("counter", port).await;
    for expected in 1..=3 {
        assert_eq!(
            counter_hit(port).unwrap(),
            expected,
            "GET / before checkpoint"
        );
    }
    step(t0, "source counting, 3");

    let image_path = node.scratch("ck-1");
    let blobs_before = node.content_blobs();
    node.tasks
        .checkpoint(&id, &checkpoint_options(&image_path, false))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=false) failed: {e:?}"));
    step(t0, "checkpointed");
    // No copy of the checkpoint in containerd's content store: for a runtime name under
    // `io.containerd.runc` (both stanzas the harness writes), containerd takes the image path
    // from the options and stores nothing. (Another name would make it tar a temp dir of its
    // own into the store, which fails when two checkpoints store the same bytes.)
    let new_blobs: Vec<(String, u64)> = node
        .content_blobs()
        .into_iter()
        .filter(|(digest, _)| !blobs_before.iter().any(|(d, _)| d == digest))
        .collect();
    assert!(
        new_blobs.is_empty(),
        "containerd {} stored checkpoint data in its content store: {new_blobs:?}",
        node.ctrd.version()
    );

    // The archive is committed under its final name, and only that.
    let archive_path = node.archive("counter");
    assert!(
        archive_path.is_file(),
        "no archive committed at {}; share holds {:?}",
        archive_path.display(),
        list_tree(&node.share)
    );
    let pod_dir = archive_path.parent().unwrap();
    let mut names: Vec<String> = fs::read_dir(pod_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [".counter.commit", "counter.zip"],
        "{} should hold only the committed archive and its commit record (no .counter.zip.tmp-*)",
        pod_dir.display()
    );
    // The commit record says what was committed (no clone named it here).
    let record = podmigrate_checkpoint::share::read_commit_record(&archive_path, "")
        .unwrap()
        .expect("a commit record for no clone");
    assert_eq!(
        record.archive_bytes,
        fs::metadata(&archive_path).unwrap().len()
    );
    assert_eq!(
        record.manifest_sha256,
        archive::open(&archive_path).unwrap().manifest_sha256
    );

    // The CLI accepts it and reads its source back.
    let archive_arg = archive_path.to_str().unwrap();
    let verify = podmigrate(&cli, &["verify", archive_arg]).unwrap();
    assert!(
        verify.status.success() && String::from_utf8_lossy(&verify.stdout).starts_with("ok "),
        "podmigrate verify {archive_arg}: {} stdout {:?} stderr {:?}",
        verify.status,
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let inspect = podmigrate(&cli, &["inspect", "--json", archive_arg]).unwrap();
    assert!(
        inspect.status.success(),
        "podmigrate inspect --json: {} {}",
        inspect.status,
        String::from_utf8_lossy(&inspect.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&inspect.stdout).expect("inspect --json prints JSON");
    let source = &manifest["source"];
    for (field, expected) in [
        ("pod", "counter"),
        ("namespace", NAMESPACE),
        ("container", CONTAINER),
        ("node", NODE_NAME),
        ("containerId", id.as_str()),
    ] {
        assert_eq!(
            source[field], expected,
            "manifest source.{field}; source is {source}"
        );
    }
    step(t0, "archive verified and inspected");

    // The counter fits in memory-backed work space: it was dumped there, the archive is the
    // only copy left, and the caller's image path stays empty.
    assert_eq!(
        list_tree(&image_path),
        Vec::<PathBuf>::new(),
        "the image path should stay empty when the dump fits in memory"
    );
    let in_memory = node.memory.path().join("checkpoints");
    let left: Vec<PathBuf> = list_tree(&in_memory)
        .into_iter()
        .filter(|p| !in_memory.join(p).is_dir())
        .collect();
    assert_eq!(
        left,
        Vec::<PathBuf>::new(),
        "the in-memory dump should be gone once the archive is committed"
    );
    // The archive holds the whole checkpoint directory, not just CRIU's images.
    let image_path = node.scratch("ck-1-unpacked");
    let unpack = podmigrate(&cli, &["unpack", archive_arg, image_path.to_str().unwrap()]).unwrap();
    assert!(
        unpack.status.success(),
        "podmigrate unpack: {}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let images = image_path.join(CHECKPOINT_DIR);
    assert!(
        images.join("inventory.img").is_file(),
        "{} holds no CRIU images: {:?}",
        images.display(),
        list_tree(&image_path)
    );
    for file in [SPEC_DUMP, CONFIG_DUMP, ROOTFS_DIFF_TAR, DELETED_FILES] {
        assert!(
            image_path.join(file).is_file(),
            "{file} missing from {}: {:?}",
            image_path.display(),
            list_tree(&image_path)
        );
    }
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(image_path.join(SPEC_DUMP)).unwrap()).unwrap();
    assert_eq!(
        spec["annotations"]["io.kubernetes.cri.container-name"], CONTAINER,
        "spec.dump is not the container's OCI spec"
    );
    // The rootfs diff carries the count file as it was when frozen.
    let diff = tar_entries(&image_path.join(ROOTFS_DIFF_TAR)).unwrap();
    let count = diff
        .iter()
        .find(|(name, _)| name.trim_start_matches('/') == COUNT_FILE.trim_start_matches('/'))
        .unwrap_or_else(|| {
            panic!(
                "{COUNT_FILE} missing from {ROOTFS_DIFF_TAR}: {:?}",
                diff.iter().map(|(n, _)| n).collect::<Vec<_>>()
            )
        });
    assert_eq!(String::from_utf8_lossy(&count.1).trim(), "3");
    node.assert_no_criu_residue();

    // exit=false: the source runs on, thawed, and counts on from where it was.
    let state = node.cri.container_state(&id).await.unwrap();
    assert_eq!(
        state,
        ContainerState::ContainerRunning,
        "source after checkpoint"
    );
    let task = node.tasks.status(&id).await.unwrap();
    assert_eq!(
        task,
        containerd_client::types::v1::Status::Running,
        "source task after an exit=false checkpoint"
    );
    assert_eq!(
        counter_hit(port).unwrap(),
        4,
        "the source should continue its count after the checkpoint"
    );
    assert_eq!(node.exec_cat(&id, COUNT_FILE).await.unwrap(), "4");
    step(t0, "source carries on: 4");
    node.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// 2. A clone restores the process

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_pod_restores_the_process_and_its_files() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let node = start_node("clone", 30, Share::Dir).await;
    let port = free_port();
    let (_source_pod, source_id) = node.run_counter("counter", port).await;
    for expected in 1..=5 {
        assert_eq!(counter_hit(port).unwrap(), expected, "GET / on the source");
    }
    assert_eq!(node.exec_cat(&source_id, COUNT_FILE).await.unwrap(), "5");
    step(t0, "source counting, 5");

    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&node.scratch("ck-2"), true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .expect("the source stops after an exit=true checkpoint");
    assert!(
        counter_hit(port).is_err(),
        "the stopped source still answers on port {port}"
    );
    assert!(node.archive("counter").is_file(), "no archive committed");
    step(t0, "checkpointed with exit; source exited");

    let clone_pod = node.pod("counter-clone", &[(CLONE_POD, "counter")]).await;
    let clone_id = node.create_counter(&clone_pod, port).await;
    node.cri
        .start_container(&clone_id)
        .await
        .unwrap_or_else(|e| panic!("StartContainer of the clone: {e:?}"));
    node.cri
        .wait_container_state(&clone_id, ContainerState::ContainerRunning, WAIT)
        .await
        .unwrap();
    step(t0, "clone started");

    // The count file came with the rootfs diff (the image has none), before any request.
    assert_eq!(
        node.exec_cat(&clone_id, COUNT_FILE).await.unwrap(),
        "5",
        "the clone's {COUNT_FILE} should be the source's"
    );
    // The restored process continues the count (a fresh one would answer 1).
    assert_eq!(
        counter_hit(port).unwrap(),
        6,
        "the clone should continue the source's count"
    );
    assert_eq!(node.exec_cat(&clone_id, COUNT_FILE).await.unwrap(), "6");
    // The local copy of the checkpoint is gone once the task started.
    node.assert_no_restore_residue(&clone_id);
    step(t0, "clone continues: 6");

    // The restored container stops like any other (the counter exits 0 on SIGTERM), its pods
    // go, and so does the pod's shim pair.
    node.cri
        .stop_container(&clone_id, Duration::from_secs(10))
        .await
        .unwrap();
    let stopped = node.cri.container_status(&clone_id).await.unwrap();
    assert_eq!(
        (stopped.state, stopped.exit_code),
        (ContainerState::ContainerExited as i32, 0),
        "the restored clone should exit 0 on SIGTERM: {stopped:?}"
    );
    node.teardown().await;
    node.assert_no_restore_residue(&clone_id);
    step(t0, "clone stopped, pods removed, shims gone");
}

// ---------------------------------------------------------------------------------------------
// 3. Restore failures

/// CreateContainer of the counter in `pod` succeeds, StartContainer (where CRI creates the task,
/// and so where the shim's Create runs) must fail; returns the container id and the message.
async fn expect_start_failure(node: &Node, pod: &Pod, port: u16) -> (String, String) {
    let id = node.create_counter(pod, port).await;
    let started = Instant::now();
    let err = node
        .cri
        .start_container(&id)
        .await
        .expect_err("StartContainer of a clone whose archive cannot be restored");
    let message = grpc_message(&err);
    eprintln!(
        "StartContainer of {} failed after {:?}: {message}",
        pod.name(),
        started.elapsed()
    );
    let state = node.cri.container_state(&id).await.unwrap();
    assert_ne!(
        state,
        ContainerState::ContainerRunning,
        "a clone whose restore failed runs anyway"
    );
    (id, message)
}

/// Where in `bytes` (an archive) each file entry's data lies: `(name, start, end)`, found by
/// walking the local headers and sizing each entry's data from the manifest.
fn entry_data_ranges(
    bytes: &[u8],
    manifest: &archive::ArchiveManifest,
) -> Vec<(String, usize, usize)> {
    let sizes: std::collections::HashMap<&str, u64> = manifest
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.compressed_size))
        .collect();
    let mut ranges = Vec::new();
    let mut at = 0;
    while at + 30 <= bytes.len() {
        if &bytes[at..at + 4] != b"PK\x03\x04" {
            at += 1;
            continue;
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
        let (name_len, extra_len) = (u16_at(at + 26), u16_at(at + 28));
        let name_end = at + 30 + name_len;
        let name = bytes
            .get(at + 30..name_end)
            .and_then(|n| std::str::from_utf8(n).ok());
        match name.and_then(|n| sizes.get(n).map(|s| (n, *s))) {
            Some((name, size)) if size > 0 => {
                let start = name_end + extra_len;
                let end = (start + size as usize).min(bytes.len());
                ranges.push((name.to_owned(), start, end));
                at = end;
            }
            _ => at += 1,
        }
    }
    ranges
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_failures_are_clear_and_leave_no_residue() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let node = start_node("restore-fail", 2, Share::Dir).await;

    // (a) No archive: the wait times out and says so.
    let missing_archive = node.archive("nosuchpod");
    let lost = node.pod("lost-clone", &[(CLONE_POD, "nosuchpod")]).await;
    let (lost_id, message) = expect_start_failure(&node, &lost, free_port()).await;
    for part in [
        "lost-clone",
        &format!("restoring {CONTAINER} of clone pod"),
        missing_archive.to_str().unwrap(),
        "timed out",
    ] {
        assert!(
            message.contains(part),
            "missing-archive error should mention {part:?}: {message}"
        );
    }
    node.assert_no_restore_residue(&lost_id);
    step(t0, "(a) missing archive: clear error");

    // (c) The same, with `fallback: fresh`: the container starts anew.
    let port = free_port();
    let fresh = node
        .pod(
            "fresh-clone",
            &[(CLONE_POD, "nosuchpod"), (FALLBACK, "fresh")],
        )
        .await;
    let fresh_id = node.create_counter(&fresh, port).await;
    node.cri
        .start_container(&fresh_id)
        .await
        .unwrap_or_else(|e| panic!("StartContainer with fallback fresh: {e:?}"));
    wait_http_ready(port, WAIT).await.unwrap();
    assert_eq!(
        counter_hit(port).unwrap(),
        1,
        "fallback fresh: the container starts anew"
    );
    node.assert_no_restore_residue(&fresh_id);
    step(t0, "(c) fallback fresh: counts from 1");

    // (b) A corrupt archive: one byte flipped inside an entry's data.
    let port = free_port();
    let (_source, source_id) = node.run_counter("counter", port).await;
    assert_eq!(counter_hit(port).unwrap(), 1);
    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&node.scratch("ck-3"), true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .unwrap();
    let archive_path = node.archive("counter");
    let manifest = archive::open(&archive_path)
        .expect("the committed archive opens")
        .manifest;
    let mut bytes = fs::read(&archive_path).unwrap();
    let ranges = entry_data_ranges(&bytes, &manifest);
    let middle = bytes.len() / 2;
    // The middle of the file, or the middle of the largest entry should it fall in a header.
    let (entry, flip) = ranges
        .iter()
        .find(|(_, start, end)| (*start..*end).contains(&middle))
        .map(|(name, _, _)| (name.clone(), middle))
        .or_else(|| {
            ranges
                .iter()
                .max_by_key(|(_, start, end)| end - start)
                .map(|(name, start, end)| (name.clone(), start + (end - start) / 2))
        })
        .expect("the archive has file entries with data");
    bytes[flip] ^= 0xff;
    fs::write(&archive_path, &bytes).unwrap();
    eprintln!(
        "flipped byte {flip} of {} ({} bytes), in entry {entry:?}",
        archive_path.display(),
        bytes.len()
    );

    let corrupt = node.pod("corrupt-clone", &[(CLONE_POD, "counter")]).await;
    let (corrupt_id, message) = expect_start_failure(&node, &corrupt, port).await;
    for part in [
        "corrupt-clone",
        &format!("restoring {CONTAINER} of clone pod"),
        archive_path.to_str().unwrap(),
        &format!("entry {entry:?}"),
    ] {
        assert!(
            message.contains(part),
            "corrupt-archive error should mention {part:?}: {message}"
        );
    }
    node.assert_no_restore_residue(&corrupt_id);
    assert!(
        counter_hit(port).is_err(),
        "nothing should serve port {port} after a failed restore"
    );
    step(t0, "(b) corrupt archive: clear error");
    node.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// 4. A failed checkpoint

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkpoint_leaves_the_source_running_untouched() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let node = start_node("ckpt-fail", 30, Share::RegularFile).await;
    let port = free_port();
    let (_pod, id) = node.run_counter("counter", port).await;
    for expected in 1..=2 {
        assert_eq!(counter_hit(port).unwrap(), expected);
    }

    let image_path = node.scratch("ck-4");
    let err = node
        .tasks
        .checkpoint(&id, &checkpoint_options(&image_path, true))
        .await
        .expect_err("a checkpoint whose archive cannot be written must fail");
    let message = grpc_message(&err);
    eprintln!("Tasks.Checkpoint failed as expected: {message}");
    let pod_dir = node.share.join(NAMESPACE).join("counter");
    for part in [
        "checkpointing pod default/counter container counter",
        pod_dir.to_str().unwrap(),
        "Not a directory",
    ] {
        assert!(
            message.contains(part),
            "failed-checkpoint error should mention {part:?}: {message}"
        );
    }
    step(t0, "checkpoint failed");

    // The source runs on, thawed, and counts on; exit=true was not acted upon.
    let state = node.cri.container_state(&id).await.unwrap();
    assert_eq!(
        state,
        ContainerState::ContainerRunning,
        "source after a failed checkpoint"
    );
    let task = node.tasks.status(&id).await.unwrap();
    assert_eq!(
        task,
        containerd_client::types::v1::Status::Running,
        "the source task must be thawed after a failed checkpoint"
    );
    assert_eq!(
        counter_hit(port).unwrap(),
        3,
        "the source should continue its count after a failed checkpoint"
    );
    // Nothing was committed, and the checkpoint's local files are gone.
    assert!(
        node.share.is_file() && fs::read_to_string(&node.share).unwrap() == "not a directory\n",
        "the share root was touched"
    );
    assert!(
        !image_path.exists(),
        "the failed checkpoint's image path {} was left behind: {:?}",
        image_path.display(),
        list_tree(&image_path)
    );
    node.assert_no_criu_residue();
    step(t0, "source untouched: 3");
    // Still a clean stop afterwards.
    node.cri
        .stop_container(&id, Duration::from_secs(10))
        .await
        .unwrap();
    let stopped = node.cri.container_status(&id).await.unwrap();
    assert_eq!(stopped.exit_code, 0, "{stopped:?}");
    node.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// 5. A tampered spec in the archive

/// Rewrites `spec.dump` and `config.dump` of a committed archive as an attacker with write
/// access to the share would: a host bind mount, every capability, a device and a smuggled
/// annotation. The manifest's source and versions are kept, so only the spec files differ.
fn tamper_spec(archive_path: &Path, scratch: &Path) {
    let dir = scratch.join("tampered");
    let verified = archive::unpack(archive_path, &dir, &Default::default()).unwrap();
    let all_caps = serde_json::json!([
        "CAP_SYS_ADMIN",
        "CAP_SYS_MODULE",
        "CAP_SYS_PTRACE",
        "CAP_SYS_RAWIO",
        "CAP_NET_ADMIN",
        "CAP_DAC_READ_SEARCH",
        "CAP_MKNOD",
        "CAP_CHOWN",
        "CAP_KILL",
        "CAP_SETUID",
        "CAP_SETGID"
    ]);
    let mut spec: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(SPEC_DUMP)).unwrap()).unwrap();
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "destination": "/host-etc", "type": "bind", "source": "/etc", "options": ["rbind", "rw"]
        }));
    for set in ["bounding", "effective", "permitted"] {
        spec["process"]["capabilities"][set] = all_caps.clone();
    }
    spec["linux"]["devices"] = serde_json::json!([{
        "path": "/dev/evil", "type": "c", "major": 1, "minor": 1, "fileMode": 438, "uid": 0, "gid": 0
    }]);
    spec["linux"]["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "rwm"}]);
    spec["annotations"]["podmigrate.io/smuggled"] = "yes".into();
    spec["process"]["args"] = serde_json::json!(["/bin/sh", "-c", "cat /host-etc/shadow"]);
    fs::write(dir.join(SPEC_DUMP), serde_json::to_vec(&spec).unwrap()).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join(CONFIG_DUMP)).unwrap()).unwrap();
    config["annotations"] = serde_json::json!({"podmigrate.io/smuggled": "yes"});
    config["privileged"] = true.into();
    fs::write(dir.join(CONFIG_DUMP), serde_json::to_vec(&config).unwrap()).unwrap();
    let options = archive::PackOptions {
        source: verified.manifest.source.clone().unwrap(),
        versions: verified.manifest.versions.clone().unwrap(),
        threads: 1,
        ..Default::default()
    };
    fs::remove_file(archive_path).unwrap();
    archive::pack(&dir, archive_path, &options).unwrap();
}

/// The `CapEff:` line of a `/proc/<pid>/status`.
fn cap_eff(status: &str) -> String {
    status
        .lines()
        .find(|l| l.starts_with("CapEff:"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_spec_in_the_archive_changes_nothing_the_clone_gets() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let node = start_node("tamper", 30, Share::Dir).await;
    let port = free_port();
    let (_source_pod, source_id) = node.run_counter("counter", port).await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(port).unwrap(), expected);
    }
    let source_caps = cap_eff(&node.exec_cat(&source_id, "/proc/1/status").await.unwrap());
    assert!(!source_caps.is_empty());
    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&node.scratch("ck-t"), true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .unwrap();
    tamper_spec(&node.archive("counter"), node.scratch.path());
    step(
        t0,
        "source checkpointed; archive's spec.dump and config.dump tampered",
    );

    let clone_pod = node.pod("counter-clone", &[(CLONE_POD, "counter")]).await;
    let clone_id = node.create_counter(&clone_pod, port).await;
    node.start_expecting(
        &clone_id,
        port,
        4,
        "StartContainer of the clone",
        "the clone restores the process",
    )
    .await;
    step(t0, "clone restored from the tampered archive");

    // The spec runc ran the clone with is the clone pod's, from containerd.
    let bundle = node
        .ctrd
        .state_dir()
        .join("io.containerd.runtime.v2.task/k8s.io")
        .join(&clone_id)
        .join("config.json");
    let used: serde_json::Value = serde_json::from_slice(&fs::read(&bundle).unwrap()).unwrap();
    let text = used.to_string();
    for smuggled in [
        "/host-etc",
        "/dev/evil",
        "podmigrate.io/smuggled",
        "CAP_SYS_ADMIN",
        "CAP_SYS_MODULE",
        "cat /host-etc/shadow",
    ] {
        assert!(
            !text.contains(smuggled),
            "{smuggled} reached the clone's runtime spec {}",
            bundle.display()
        );
    }
    assert_eq!(
        used["annotations"][CLONE_POD], "counter",
        "the clone's own annotations are there"
    );

    // And inside: no host mount, no device, the source's capabilities.
    let mountinfo = node.exec_cat(&clone_id, "/proc/1/mountinfo").await.unwrap();
    assert!(!mountinfo.contains("/host-etc"), "{mountinfo}");
    assert!(node.exec_cat(&clone_id, "/dev/evil").await.is_err());
    assert!(node.exec_cat(&clone_id, "/host-etc/shadow").await.is_err());
    let clone_caps = cap_eff(&node.exec_cat(&clone_id, "/proc/1/status").await.unwrap());
    assert_eq!(clone_caps, source_caps, "restored process capabilities");
    let exec_caps = cap_eff(&node.exec_cat(&clone_id, "/proc/self/status").await.unwrap());
    assert_eq!(exec_caps, source_caps, "exec'd process capabilities");
    step(
        t0,
        "no mount, device, capability or annotation from the archive's spec",
    );

    node.teardown().await;
    node.assert_no_restore_residue(&clone_id);
}

// ---------------------------------------------------------------------------------------------
// 6. The clone an archive is made for

/// The agent's lease for clone `clone_uid` on the source pod's share directory, as the agent
/// writes it before it freezes the source.
fn write_lease(node: &Node, source_pod: &str, clone_uid: &str) {
    let deadline = std::time::SystemTime::now() + Duration::from_secs(600);
    podmigrate_checkpoint::gc::write_lease(
        &node.share.join(NAMESPACE).join(source_pod),
        clone_uid,
        &podmigrate_checkpoint::gc::Lease {
            holder: format!("the test, for clone uid {clone_uid}"),
            deadline_unix_ms: deadline
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
            work_units: Vec::new(),
            page_stream: None,
        },
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_made_for_another_clone_is_refused_and_its_own_clone_restores_it() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let cli = build_cli().expect("building the podmigrate CLI");
    let node = start_node("bound", 30, Share::Dir).await;
    let port = free_port();
    let (_source, source_id) = node.run_counter("counter", port).await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(port).unwrap(), expected);
    }
    let clone_uid = unique_id("clone-uid");
    write_lease(&node, "counter", &clone_uid);
    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&node.scratch("ck-b"), true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .unwrap();
    let archive_path = node.archive("counter");
    let inspect = podmigrate(&cli, &["inspect", "--json", archive_path.to_str().unwrap()]).unwrap();
    assert!(inspect.status.success(), "{inspect:?}");
    let manifest: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(
        manifest["source"]["clonePodUid"],
        clone_uid.as_str(),
        "the manifest names the clone of the lease: {}",
        manifest["source"]
    );
    step(
        t0,
        "checkpointed with a lease: the archive is made for that clone",
    );

    // A later clone of the same source (another uid) is refused, and nothing is left.
    let other_uid = unique_id("other-uid");
    let other = node
        .pod_with_uid("counter-late", &other_uid, &[(CLONE_POD, "counter")])
        .await;
    let (other_id, message) = expect_start_failure(&node, &other, port).await;
    for part in [
        format!("restoring {CONTAINER} of clone pod {NAMESPACE}/counter-late"),
        archive_path.display().to_string(),
        format!("made for clone pod uid {clone_uid}"),
        format!("(uid {other_uid})"),
    ] {
        assert!(message.contains(&part), "expected {part:?} in: {message}");
    }
    assert!(!message.contains('\n'), "one line: {message}");
    node.assert_no_restore_residue(&other_id);
    assert!(
        archive_path.is_file(),
        "the refused archive stays for its clone"
    );
    step(t0, "another clone's restore refused");

    // The clone it was made for restores it and counts on.
    let own = node
        .pod_with_uid("counter-clone", &clone_uid, &[(CLONE_POD, "counter")])
        .await;
    let own_id = node.create_counter(&own, port).await;
    node.start_expecting(
        &own_id,
        port,
        4,
        "StartContainer of the clone the archive is for",
        "the clone continues the count",
    )
    .await;
    node.assert_no_restore_residue(&own_id);
    step(t0, "its own clone restored: 4");
    node.teardown().await;
}

// ---------------------------------------------------------------------------------------------
// 7. A cluster key

/// The forms a key's bytes could leak in: raw, base64, hex.
fn key_forms(raw: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use base64ct::Encoding as _;
    vec![
        ("raw", raw.to_vec()),
        ("base64", base64ct::Base64::encode_string(raw).into_bytes()),
        (
            "hex",
            raw.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                .into_bytes(),
        ),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_key_the_shim_seals_archives_restores_them_and_refuses_plain_ones() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let cli = build_cli().expect("building the podmigrate CLI");
    // The key as an operator makes it: base64 from a Secret, installed raw with `podmigrate key
    // install`, outside the share.
    let keys = Scratch::new("podmigrate-e2e-keys-").unwrap();
    let mut raw = [0u8; 32];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut raw)
        .unwrap();
    let secret = keys.path().join("secret-key");
    {
        use base64ct::Encoding as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .unwrap();
        std::io::Write::write_all(&mut f, base64ct::Base64::encode_string(&raw).as_bytes())
            .unwrap();
    }
    let key_file = keys.path().join("keys/archive.key");
    let install = podmigrate(
        &cli,
        &[
            "key",
            "install",
            "--from",
            secret.to_str().unwrap(),
            "--to",
            key_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    assert!(
        install.status.success(),
        "podmigrate key install: {install:?}"
    );
    assert_eq!(fs::read(&key_file).unwrap(), raw, "installed raw");
    let key = archive::ArchiveKey::load(&key_file).unwrap();
    let node = start_node_with_env(
        "sealed",
        30,
        Share::Dir,
        &[("PODMIGRATE_KEY_FILE", key_file.to_str().unwrap())],
    )
    .await;
    let port = free_port();
    let (_source, source_id) = node.run_counter("counter", port).await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(port).unwrap(), expected);
    }
    let image_path = node.scratch("ck-s");
    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&image_path, true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .unwrap();
    let archive_path = node.archive("counter");
    let archive_arg = archive_path.to_str().unwrap();
    step(t0, "checkpointed on a node with a key");
    // The dump was made in memory-backed work space; the forged plain archive below is packed
    // from the sealed one's content.
    archive::unpack(
        &archive_path,
        &image_path,
        &archive::UnpackOptions {
            key: Some(std::sync::Arc::new(
                archive::ArchiveKey::load(&key_file).unwrap(),
            )),
            ..Default::default()
        },
    )
    .expect("unpacking the sealed archive with the key");

    // Sealed: refused without the key, by the library and the CLI; accepted with it.
    let plain_err = match archive::open(&archive_path) {
        Ok(_) => panic!("the plain reader opened a sealed archive"),
        Err(e) => e.to_string(),
    };
    assert!(plain_err.contains("no archive key"), "{plain_err}");
    let opened = archive::open_with_key(&archive_path, Some(&key)).unwrap();
    assert_eq!(opened.sealed_with(), Some(key.id()));
    let verify = podmigrate(&cli, &["verify", archive_arg]).unwrap();
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(
        !verify.status.success() && stderr.contains("no archive key"),
        "verify without the key: {} {stderr}",
        verify.status
    );
    let verify = podmigrate(
        &cli,
        &[
            "verify",
            "--key-file",
            key_file.to_str().unwrap(),
            archive_arg,
        ],
    )
    .unwrap();
    assert!(
        verify.status.success() && String::from_utf8_lossy(&verify.stdout).starts_with("ok "),
        "verify with the key: {verify:?}"
    );
    step(
        t0,
        "sealed: verify refuses it without the key, accepts it with it",
    );

    // The clone restores it and counts on.
    let clone = node.pod("counter-clone", &[(CLONE_POD, "counter")]).await;
    let clone_id = node.create_counter(&clone, port).await;
    node.start_expecting(
        &clone_id,
        port,
        4,
        "StartContainer of the clone on the keyed node",
        "the clone continues the count",
    )
    .await;
    node.assert_no_restore_residue(&clone_id);
    step(t0, "clone restored from the sealed archive: 4");

    // A plain archive of the same checkpoint, as anyone who can write to the share could
    // leave it, is refused by the keyed node.
    let plain_path = node.archive("forged");
    fs::create_dir_all(plain_path.parent().unwrap()).unwrap();
    let packed = archive::pack(
        &image_path,
        &plain_path,
        &archive::PackOptions {
            source: archive::Source {
                namespace: NAMESPACE.into(),
                pod: "forged".into(),
                container: CONTAINER.into(),
                ..Default::default()
            },
            threads: 1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(packed.sealed_with, None);
    let port2 = free_port();
    let forged = node.pod("forged-clone", &[(CLONE_POD, "forged")]).await;
    let (forged_id, message) = expect_start_failure(&node, &forged, port2).await;
    for part in [
        format!("restoring {CONTAINER} of clone pod {NAMESPACE}/forged-clone"),
        plain_path.display().to_string(),
        "is not sealed".to_string(),
    ] {
        assert!(message.contains(&part), "expected {part:?} in: {message}");
    }
    node.assert_no_restore_residue(&forged_id);
    step(t0, "a plain archive is refused on the keyed node");

    // The key never shows: not in the archive, not in containerd's or the shims' logs.
    node.teardown().await;
    let archive_bytes = fs::read(&archive_path).unwrap();
    let logs = node.ctrd.log_text().into_bytes();
    assert!(
        contains(&logs, b"dumped and packed"),
        "containerd's log holds the shims' lines"
    );
    for (form, bytes) in key_forms(&raw) {
        assert!(
            !contains(&archive_bytes, &bytes),
            "the key ({form}) is in the archive"
        );
        assert!(
            !contains(&logs, &bytes),
            "the key ({form}) is in containerd's log"
        );
    }
    step(t0, "the key appears in neither the archive nor the logs");
}

// ---------------------------------------------------------------------------------------------
// 8. CRIU's credentials vs the clone's spec

/// CreateContainer of the counter in `pod` with a tightened security context: every
/// capability dropped, and `run_as_user` if given.
async fn create_tightened_counter(node: &Node, pod: &Pod, port: u16, user: Option<i64>) -> String {
    use k8s_cri::v1 as api;
    let spec = counter_spec(port);
    let image = node
        .cri
        .image_status(&spec.image)
        .await
        .unwrap()
        .expect("the counter image is imported");
    let mut config = node.cri.container_config(pod, &spec, &image.id);
    let security = config
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .expect("a security context");
    security.capabilities = Some(api::Capability {
        drop_capabilities: vec!["ALL".into()],
        ..Default::default()
    });
    security.run_as_user = user.map(|value| api::Int64Value { value });
    node.cri
        .create_container_with_config(pod, config)
        .await
        .unwrap_or_else(|e| panic!("CreateContainer in pod {}: {e:?}", pod.name()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_whose_spec_is_tighter_than_the_checkpoints_credentials_is_refused() {
    if !can_run() {
        return;
    }
    let t0 = Instant::now();
    let node = start_node("creds", 30, Share::Dir).await;
    let port = free_port();
    let (_source, source_id) = node.run_counter("counter", port).await;
    for expected in 1..=3 {
        assert_eq!(counter_hit(port).unwrap(), expected);
    }
    let source_caps = cap_eff(&node.exec_cat(&source_id, "/proc/1/status").await.unwrap());
    node.tasks
        .checkpoint(&source_id, &checkpoint_options(&node.scratch("ck-c"), true))
        .await
        .unwrap_or_else(|e| panic!("Tasks.Checkpoint (exit=true) failed: {e:?}"));
    node.cri
        .wait_container_state(&source_id, ContainerState::ContainerExited, WAIT)
        .await
        .unwrap();
    let archive_path = node.archive("counter");
    step(t0, &format!("source (root, {source_caps}) checkpointed"));

    // (a) Every capability dropped: the root task's capabilities exceed the clone's.
    let no_caps = node.pod("counter-nocaps", &[(CLONE_POD, "counter")]).await;
    let id = create_tightened_counter(&node, &no_caps, port, None).await;
    let err = node
        .cri
        .start_container(&id)
        .await
        .expect_err("a clone without capabilities must refuse the root task's");
    let message = grpc_message(&err);
    eprintln!("(a) {message}");
    for part in [
        format!("restoring {CONTAINER} of clone pod {NAMESPACE}/counter-nocaps"),
        archive_path.display().to_string(),
        "has credentials the clone's spec".to_string(),
        "bounding capabilities CAP_CHOWN".to_string(),
        "effective capabilities CAP_CHOWN".to_string(),
    ] {
        assert!(message.contains(&part), "expected {part:?} in: {message}");
    }
    node.assert_no_restore_residue(&id);
    assert!(counter_hit(port).is_err(), "nothing restored on {port}");
    step(t0, "(a) capabilities dropped: refused");

    // (b) Also another user: the task's uid 0 is named.
    let user = node.pod("counter-user", &[(CLONE_POD, "counter")]).await;
    let id = create_tightened_counter(&node, &user, port, Some(1000)).await;
    let err = node
        .cri
        .start_container(&id)
        .await
        .expect_err("a clone running as 1000 must refuse a root task");
    let message = grpc_message(&err);
    eprintln!("(b) {message}");
    assert!(
        message.contains("uid 0, not the spec's user 1000 (and no CAP_SETUID)"),
        "{message}"
    );
    node.assert_no_restore_residue(&id);
    step(t0, "(b) run as 1000: refused");

    // (c) The clone with the source's own spec restores the same archive.
    let clone = node.pod("counter-clone", &[(CLONE_POD, "counter")]).await;
    let clone_id = node.create_counter(&clone, port).await;
    node.start_expecting(
        &clone_id,
        port,
        4,
        "StartContainer of the clone with the source's spec",
        "the clone continues the count",
    )
    .await;
    assert!(
        node.ctrd
            .log_text()
            .contains("the checkpoint's credentials are within the clone's spec"),
        "the shim checked the credentials"
    );
    step(t0, "(c) the source's own spec: restored, 4");
    node.teardown().await;
}
