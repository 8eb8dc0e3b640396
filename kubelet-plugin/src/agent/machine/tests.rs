//! Every transition of the phase machine, each rollback, cancel in each phase, both timeouts,
//! the limits, and an agent restarted in each phase: on a fake API server and a fake
//! containerd, with the real share protocol on a temporary directory. No root, no cluster.
//!
//! The fake containerd plays the source's shim: its Checkpoint names the clone from the lease
//! (as the shim does) and commits an archive and its commit record.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::events::Event;
use podmigrate_checkpoint::share::{self, CommitRecord};
use podmigrate_vocabulary::*;
use serde_json::{json, Value};

use super::*;
use crate::agent::containerd::{AppContainer, ContainerdError, TaskState};
use crate::agent::limits::Limits;
use crate::agent::ports::{Cluster, ClusterError, DirShare, Runtime};
use crate::agent::timeouts::Timeouts;

const NS: &str = "shop";
const SOURCE: &str = "web-0";
const CLONE: &str = "web-0-mig";
const CLONE_UID: &str = "uid-clone";

// ---- the fake API server --------------------------------------------------------------------

#[derive(Default)]
struct FakeCluster {
    pods: Mutex<BTreeMap<(String, String), Value>>,
    events: Mutex<Vec<(String, String, String)>>,
    version: Mutex<u64>,
}

/// RFC 7386, as the API server applies a merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let object = target.as_object_mut().expect("an object");
            for (key, value) in fields {
                if value.is_null() {
                    object.remove(key);
                } else {
                    merge(object.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl FakeCluster {
    fn put(&self, pod: Value) {
        let key = (
            pod["metadata"]["namespace"].as_str().unwrap().to_string(),
            pod["metadata"]["name"].as_str().unwrap().to_string(),
        );
        let mut pod = pod;
        pod["metadata"]["resourceVersion"] = json!(self.bump().to_string());
        self.pods.lock().unwrap().insert(key, pod);
    }

    fn bump(&self) -> u64 {
        let mut v = self.version.lock().unwrap();
        *v += 1;
        *v
    }

    fn get(&self, name: &str) -> Option<Pod> {
        self.pods
            .lock()
            .unwrap()
            .get(&(NS.to_string(), name.to_string()))
            .map(|v| serde_json::from_value(v.clone()).unwrap())
    }

    /// Changes a pod as kubelet or a user would.
    fn edit(&self, name: &str, patch: Value) {
        let mut pods = self.pods.lock().unwrap();
        let pod = pods.get_mut(&(NS.to_string(), name.to_string())).unwrap();
        merge(pod, &patch);
        drop(pods);
        let v = self.bump();
        self.pods
            .lock()
            .unwrap()
            .get_mut(&(NS.to_string(), name.to_string()))
            .unwrap()["metadata"]["resourceVersion"] = json!(v.to_string());
    }

    fn events_with(&self, reason: &str) -> Vec<(String, String)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r, _)| r == reason)
            .map(|(pod, _, note)| (pod.clone(), note.clone()))
            .collect()
    }
}

impl Cluster for FakeCluster {
    async fn pod(&self, _namespace: &str, name: &str) -> Result<Option<Pod>, ClusterError> {
        Ok(self.get(name))
    }

    async fn namespace(&self, name: &str) -> Result<Option<Namespace>, ClusterError> {
        Ok(Some(
            serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
        ))
    }

    async fn clones(&self, of: Option<(&str, &str)>) -> Result<Vec<Pod>, ClusterError> {
        Ok(self
            .pods
            .lock()
            .unwrap()
            .values()
            .filter(|p| match (&p["metadata"]["labels"][CLONE_OF_LABEL], of) {
                (Value::String(source), Some((_, of))) => source == of,
                (Value::String(_), None) => true,
                _ => false,
            })
            .map(|p| serde_json::from_value(p.clone()).unwrap())
            .collect())
    }

    async fn patch(&self, pod: &Pod, patch: Value) -> Result<Pod, ClusterError> {
        let key = (
            pod.metadata.namespace.clone().unwrap(),
            pod.metadata.name.clone().unwrap(),
        );
        let v = self.bump();
        let mut pods = self.pods.lock().unwrap();
        let Some(current) = pods.get_mut(&key) else {
            return Err(ClusterError::Conflict { pod: key.1 });
        };
        if let Some(expected) = patch["metadata"]["resourceVersion"].as_str() {
            if current["metadata"]["resourceVersion"].as_str() != Some(expected) {
                return Err(ClusterError::Conflict { pod: key.1 });
            }
        }
        let mut patch = patch;
        patch["metadata"]["resourceVersion"] = json!(v.to_string());
        merge(current, &patch);
        let deleting = !current["metadata"]["deletionTimestamp"].is_null();
        let no_finalizers = current["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
        let out: Pod = serde_json::from_value(current.clone()).unwrap();
        if deleting && no_finalizers {
            pods.remove(&key);
        }
        Ok(out)
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        let key = (namespace.to_string(), name.to_string());
        let mut pods = self.pods.lock().unwrap();
        let Some(pod) = pods.get_mut(&key) else {
            return Ok(());
        };
        if pod["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            pod["metadata"]["deletionTimestamp"] = json!("2026-12-05T00:00:00Z");
        } else {
            pods.remove(&key);
        }
        Ok(())
    }

    async fn event(&self, pod: &Pod, event: Event) {
        self.events.lock().unwrap().push((
            pod.metadata.name.clone().unwrap_or_default(),
            event.reason,
            event.note.unwrap_or_default(),
        ));
    }
}

// ---- the fake containerd, playing the source's shim ----------------------------------------

struct FakeRuntime {
    share_root: std::path::PathBuf,
    tasks: Mutex<BTreeMap<String, TaskState>>,
    /// `Some(reason)`: every Checkpoint fails so.
    fail_checkpoint: Mutex<Option<String>>,
    /// The state of every task when each Checkpoint ran.
    checkpoints: Mutex<Vec<BTreeMap<String, TaskState>>>,
    killed: Mutex<Vec<String>>,
    /// Whether each Checkpoint's lease asked for a lazy (post-copy) dump.
    lazy: Mutex<Vec<bool>>,
}

impl FakeRuntime {
    fn new(share_root: &Path) -> Self {
        FakeRuntime {
            share_root: share_root.to_path_buf(),
            lazy: Mutex::default(),
            tasks: Mutex::new(
                [
                    ("id-web", TaskState::Running),
                    ("id-log", TaskState::Running),
                ]
                .into_iter()
                .map(|(id, s)| (id.to_string(), s))
                .collect(),
            ),
            fail_checkpoint: Mutex::new(None),
            checkpoints: Mutex::new(Vec::new()),
            killed: Mutex::new(Vec::new()),
        }
    }

    fn state(&self, id: &str) -> TaskState {
        self.tasks.lock().unwrap()[id]
    }

    fn set(&self, id: &str, state: TaskState) {
        self.tasks.lock().unwrap().insert(id.to_string(), state);
    }
}

impl Runtime for FakeRuntime {
    async fn app_containers(
        &self,
        _namespace: &str,
        pod: &str,
    ) -> Result<Vec<AppContainer>, ContainerdError> {
        if pod != SOURCE {
            return Ok(Vec::new());
        }
        Ok(["log", "web"]
            .into_iter()
            .map(|n| AppContainer {
                id: format!("id-{n}"),
                name: n.to_string(),
            })
            .collect())
    }

    async fn task_state(&self, id: &str) -> Result<TaskState, ContainerdError> {
        Ok(self.state(id))
    }

    async fn pause(&self, id: &str) -> Result<(), ContainerdError> {
        self.set(id, TaskState::Paused);
        Ok(())
    }

    async fn resume(&self, id: &str) -> Result<(), ContainerdError> {
        if self.state(id) == TaskState::Paused {
            self.set(id, TaskState::Running);
        }
        Ok(())
    }

    async fn kill(&self, id: &str, _signal: i32) -> Result<(), ContainerdError> {
        self.killed.lock().unwrap().push(id.to_string());
        self.set(id, TaskState::Stopped);
        Ok(())
    }

    async fn checkpoint(
        &self,
        id: &str,
        _image: &Path,
        _timeout: Duration,
    ) -> Result<(), ContainerdError> {
        self.checkpoints
            .lock()
            .unwrap()
            .push(self.tasks.lock().unwrap().clone());
        if let Some(reason) = self.fail_checkpoint.lock().unwrap().clone() {
            return Err(ContainerdError::Call {
                call: "Checkpoint",
                target: id.to_string(),
                code: containerd_client::tonic::Code::Internal,
                message: reason,
            });
        }
        let container = id.trim_start_matches("id-");
        let dir = share::pod_dir(&self.share_root, NS, SOURCE).unwrap();
        let pack_for =
            podmigrate_checkpoint::binding::clone_for_pack(&dir, std::time::SystemTime::now())
                .unwrap();
        let uid = pack_for
            .as_ref()
            .map(|p| p.clone_pod_uid.clone())
            .unwrap_or_default();
        self.lazy
            .lock()
            .unwrap()
            .push(pack_for.is_some_and(|p| p.page_stream.is_some()));
        let archive = share::archive_path(&self.share_root, NS, SOURCE, container).unwrap();
        std::fs::write(&archive, b"PK").unwrap();
        share::write_commit_record(
            &archive,
            &CommitRecord {
                clone_pod_uid: uid,
                manifest_sha256: format!("{container:0>64}"),
                archive_bytes: 1000,
                dump_ms: 5,
                diff_ms: 1,
                pack_ms: 1,
                committed_unix_ms: unix_millis(),
            },
        )
        .unwrap();
        Ok(())
    }

    async fn memory(&self, _id: &str) -> Option<u64> {
        Some(64 << 20)
    }

    fn postcopy_unavailable(&self) -> Option<String> {
        None
    }
}

// ---- the world ------------------------------------------------------------------------------

fn running(name: &str) -> Value {
    json!({"name": name, "image": "x", "imageID": "", "ready": true, "restartCount": 0,
           "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}})
}

fn containers() -> Value {
    json!([{"name": "web", "image": "nginx:1.27"}, {"name": "log", "image": "busybox:1.36"}])
}

fn source_pod() -> Value {
    json!({
        "metadata": {"name": SOURCE, "namespace": NS, "uid": "uid-source",
                     "labels": {MIGRATABLE: "true"}},
        "spec": {"nodeName": "node-a", "runtimeClassName": RUNTIME_CLASS, "containers": containers()},
        "status": {"phase": "Running", "containerStatuses": [running("web"), running("log")]}
    })
}

fn clone_pod(name: &str, uid: &str, mode: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": NS, "uid": uid,
                     "labels": {CLONE_OF_LABEL: SOURCE},
                     "annotations": {CLONE_POD: SOURCE, MODE: mode}},
        "spec": {"nodeName": "node-b", "runtimeClassName": RUNTIME_CLASS, "containers": containers()},
        "status": {"phase": "Pending"}
    })
}

struct World {
    _share: tempfile::TempDir,
    work: tempfile::TempDir,
    agent: Agent<FakeCluster, FakeRuntime, DirShare>,
    share_root: std::path::PathBuf,
}

fn config(work: &Path) -> AgentConfig {
    AgentConfig {
        node_name: "node-a".into(),
        work_dir: work.to_path_buf(),
        limits: Limits::default(),
        timeouts: Timeouts::default(),
        prepare_wait: Duration::ZERO,
    }
}

impl World {
    fn new(mode: &str) -> World {
        let share = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let cluster = FakeCluster::default();
        cluster.put(source_pod());
        cluster.put(clone_pod(CLONE, CLONE_UID, mode));
        World {
            agent: Agent::new(
                cluster,
                FakeRuntime::new(share.path()),
                DirShare {
                    root: share.path().to_path_buf(),
                },
                config(work.path()),
                Arc::new(crate::agent::metrics::Metrics::default()),
            ),
            share_root: share.path().to_path_buf(),
            _share: share,
            work,
        }
    }

    fn cluster(&self) -> &FakeCluster {
        &self.agent.cluster
    }

    fn runtime(&self) -> &FakeRuntime {
        &self.agent.runtime
    }

    /// What a restarted agent is: the same world, no memory of it.
    fn restart_agent(&mut self) {
        let placeholder = Agent::new(
            FakeCluster::default(),
            FakeRuntime::new(&self.share_root),
            DirShare {
                root: self.share_root.clone(),
            },
            config(self.work.path()),
            Arc::new(crate::agent::metrics::Metrics::default()),
        );
        let old = std::mem::replace(&mut self.agent, placeholder);
        self.agent = Agent::new(
            old.cluster,
            old.runtime,
            old.share,
            old.config,
            Arc::new(crate::agent::metrics::Metrics::default()),
        );
    }

    fn clone(&self) -> Pod {
        self.cluster().get(CLONE).expect("the clone exists")
    }

    fn phase(&self) -> Option<String> {
        self.cluster()
            .get(CLONE)
            .and_then(|c| annotation(&c, PHASE).map(str::to_string))
    }

    fn reason(&self) -> String {
        annotation(&self.clone(), REASON)
            .unwrap_or_default()
            .to_string()
    }

    async fn step(&self) -> Next {
        let clone = self.cluster().get(CLONE).expect("the clone exists");
        self.agent.reconcile(&clone).await.expect("a step")
    }

    /// Steps until the phase is `phase` (at most `n` steps).
    async fn until(&self, phase: Phase, n: usize) {
        for _ in 0..n {
            if self.phase().as_deref() == Some(phase.as_str()) {
                return;
            }
            self.step().await;
        }
        assert_eq!(
            self.phase().as_deref(),
            Some(phase.as_str()),
            "reason: {:?}",
            self.cluster()
                .get(CLONE)
                .map(|c| annotation(&c, REASON).map(str::to_string))
        );
    }

    fn source_states(&self) -> (TaskState, TaskState) {
        (
            self.runtime().state("id-web"),
            self.runtime().state("id-log"),
        )
    }

    fn pod_dir_names(&self) -> Vec<String> {
        let dir = share::pod_dir(&self.share_root, NS, SOURCE).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn clone_runs(&self) {
        self.cluster().edit(
            CLONE,
            json!({"status": {"phase": "Running", "containerStatuses": [running("web"), running("log")]}}),
        );
    }

    /// The record of an ended migration: nothing of it left on the share, no finalizer.
    fn assert_released(&self) {
        assert_eq!(
            self.pod_dir_names(),
            Vec::<String>::new(),
            "share files left"
        );
        if let Some(clone) = self.cluster().get(CLONE) {
            assert!(!has_finalizer(&clone), "finalizer left");
        }
    }
}

const RUNNING: (TaskState, TaskState) = (TaskState::Running, TaskState::Running);
const PAUSED: (TaskState, TaskState) = (TaskState::Paused, TaskState::Paused);

// ---- the transitions ------------------------------------------------------------------------

#[tokio::test]
async fn a_migration_walks_every_phase_and_retires_the_source() {
    let w = World::new("migrate");
    // Pending → Checkpointing: claimed with its finalizer, lease written, nothing frozen.
    assert_eq!(w.step().await, Next::Now);
    assert_eq!(w.phase().as_deref(), Some("Checkpointing"));
    let clone = w.clone();
    assert!(has_finalizer(&clone));
    assert_eq!(annotation(&clone, SOURCE_NODE), Some("node-a"));
    assert_eq!(
        annotation(&clone, MEMORY_BYTES),
        Some(&*(128u64 << 20).to_string())
    );
    assert_eq!(w.source_states(), RUNNING);
    assert!(
        w.pod_dir_names().iter().any(|n| n.starts_with(".lease-")),
        "{:?}",
        w.pod_dir_names()
    );
    // Checkpointing → Transferring: frozen, both checkpointed while frozen, once each.
    assert_eq!(w.step().await, Next::Now);
    assert_eq!(w.phase().as_deref(), Some("Transferring"));
    let checkpoints = w.runtime().checkpoints.lock().unwrap().clone();
    assert_eq!(checkpoints.len(), 2);
    assert!(checkpoints
        .iter()
        .all(|s| s.values().all(|t| *t == TaskState::Paused)));
    assert!(annotation(&w.clone(), FROZEN_AT).is_some());
    // Transferring → Restoring: the commit records give digests and bytes.
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("Restoring"));
    let clone = w.clone();
    assert_eq!(annotation(&clone, ARCHIVE_BYTES), Some("2000"));
    assert!(annotation(&clone, ARCHIVE_DIGEST).unwrap().contains("web="));
    assert_eq!(w.source_states(), PAUSED);
    // Restoring waits for the clone (a watch event), with a timeout to check.
    assert!(matches!(w.step().await, Next::After(_)));
    assert_eq!(w.phase().as_deref(), Some("Restoring"));
    // The clone runs → Running: the source is killed and deleted, everything released.
    w.clone_runs();
    assert_eq!(w.step().await, Next::OnChange);
    assert_eq!(w.phase().as_deref(), Some("Running"));
    assert!(w.cluster().get(SOURCE).is_none(), "the source is deleted");
    assert_eq!(w.runtime().killed.lock().unwrap().len(), 2);
    assert!(annotation(&w.clone(), FROZEN_MS).is_some());
    assert!(timings(&w.clone()).contains_key("Restoring"));
    assert_eq!(w.cluster().events_with("Migrated").len(), 2);
    w.assert_released();
    // A finished migration is never started again.
    assert_eq!(w.step().await, Next::OnChange);
    assert_eq!(w.runtime().checkpoints.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn clone_mode_thaws_the_source_once_the_archives_are_committed_and_keeps_it() {
    let w = World::new("clone");
    w.until(Phase::Restoring, 4).await;
    assert_eq!(w.source_states(), RUNNING);
    w.clone_runs();
    w.until(Phase::Running, 2).await;
    assert!(
        w.cluster().get(SOURCE).is_some(),
        "clone mode keeps the source"
    );
    assert!(w.runtime().killed.lock().unwrap().is_empty());
    w.assert_released();
}

#[tokio::test]
async fn a_failed_checkpoint_rolls_back_and_thaws_the_source() {
    let w = World::new("migrate");
    *w.runtime().fail_checkpoint.lock().unwrap() = Some("CRIU: dump failed".into());
    w.until(Phase::RolledBack, 3).await;
    assert!(
        w.reason().contains("checkpointing container") && w.reason().contains("CRIU: dump failed"),
        "{}",
        w.reason()
    );
    assert!(w.reason().ends_with("the source was resumed"));
    assert_eq!(w.source_states(), RUNNING);
    assert!(w.cluster().get(SOURCE).is_some());
    assert_eq!(
        w.cluster().events_with("RolledBack").len(),
        2,
        "on the clone and the source"
    );
    w.assert_released();
}

#[tokio::test]
async fn a_clone_that_fails_to_restore_rolls_back_and_thaws_the_source() {
    let w = World::new("migrate");
    w.until(Phase::Restoring, 4).await;
    w.cluster().edit(
        CLONE,
        json!({"status": {"containerStatuses": [
        {"name": "web", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
         "state": {"waiting": {"reason": "RunContainerError", "message": "SHA-256 mismatch"}}}]}}),
    );
    w.until(Phase::RolledBack, 1).await;
    assert!(w.reason().contains("SHA-256 mismatch"), "{}", w.reason());
    assert_eq!(w.source_states(), RUNNING);
    w.assert_released();
}

#[tokio::test]
async fn a_missing_commit_record_rolls_back_in_transferring() {
    let w = World::new("migrate");
    w.until(Phase::Transferring, 3).await;
    let archive = share::archive_path(&w.share_root, NS, SOURCE, "web").unwrap();
    std::fs::remove_file(share::commit_record_path(&archive)).unwrap();
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("RolledBack"));
    assert!(w.reason().contains("no commit record"), "{}", w.reason());
    assert_eq!(w.source_states(), RUNNING);
    w.assert_released();
}

#[tokio::test]
async fn a_share_file_that_cannot_go_yet_keeps_the_finalizer_until_it_does() {
    let w = World::new("migrate");
    w.until(Phase::Restoring, 4).await;
    // Something the share refuses to remove (a directory where the archive was; on SMB, a
    // file the clone's shim still holds open).
    let archive = share::archive_path(&w.share_root, NS, SOURCE, "web").unwrap();
    std::fs::remove_file(&archive).unwrap();
    std::fs::create_dir(&archive).unwrap();
    w.clone_runs();
    assert_eq!(w.step().await, Next::After(RELEASE_RETRY));
    assert_eq!(w.phase().as_deref(), Some("Running"));
    assert!(
        has_finalizer(&w.clone()),
        "held until the share is released"
    );
    std::fs::remove_dir(&archive).unwrap();
    assert_eq!(w.step().await, Next::OnChange);
    w.assert_released();
}

// ---- cancel ---------------------------------------------------------------------------------

async fn cancel_in(phase: Phase) {
    let w = World::new("migrate");
    w.until(phase, 4).await;
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {CANCEL: "alice"}}}),
    );
    w.step().await;
    // The clone is deleted once the record is written, and its finalizer released.
    assert!(
        w.cluster().get(CLONE).is_none(),
        "the clone is removed in {phase}"
    );
    assert_eq!(
        w.source_states(),
        RUNNING,
        "the source runs on after a cancel in {phase}"
    );
    assert!(w.cluster().get(SOURCE).is_some());
    let events = w.cluster().events_with("Cancelled");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        events
            .iter()
            .all(|(_, note)| note.contains("cancelled by alice")),
        "{events:?}"
    );
    w.assert_released();
}

#[tokio::test]
async fn cancel_while_checkpointing_rolls_back() {
    cancel_in(Phase::Checkpointing).await;
}

#[tokio::test]
async fn cancel_while_transferring_rolls_back() {
    cancel_in(Phase::Transferring).await;
}

#[tokio::test]
async fn cancel_while_restoring_rolls_back() {
    cancel_in(Phase::Restoring).await;
}

#[tokio::test]
async fn deleting_the_clone_mid_restore_rolls_back_through_the_finalizer() {
    let w = World::new("migrate");
    w.until(Phase::Restoring, 4).await;
    w.cluster().delete(NS, CLONE).await.unwrap();
    assert!(w.cluster().get(CLONE).is_some(), "held by the finalizer");
    w.step().await;
    assert!(w.cluster().get(CLONE).is_none(), "gone once rolled back");
    assert_eq!(w.source_states(), RUNNING);
    let events = w.cluster().events_with("Cancelled");
    assert!(
        events
            .iter()
            .any(|(pod, note)| pod == SOURCE && note.contains("the clone pod was deleted")),
        "{events:?}"
    );
    w.assert_released();
}

// ---- timeouts -------------------------------------------------------------------------------

#[tokio::test]
async fn the_completion_timeout_scales_with_memory_and_rolls_back_with_why() {
    let w = World::new("migrate");
    w.until(Phase::Restoring, 4).await;
    // 128 MiB counts as 1 GiB: 800 s. Started 801 s ago.
    let past = unix_millis() - 801_000;
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {STARTED_AT: past.to_string()}}}),
    );
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("RolledBack"));
    let reason = w.reason();
    assert!(
        reason.contains("did not complete within 13m 20s") && reason.contains("1.00 GiB"),
        "{reason}"
    );
    assert_eq!(w.source_states(), RUNNING);
    w.assert_released();
}

#[tokio::test]
async fn the_progress_timeout_rolls_back_a_clone_that_stands_still() {
    let w = World::new("migrate");
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {PROGRESS_TIMEOUT: "5s"}}}),
    );
    w.until(Phase::Restoring, 4).await;
    // A change of the clone's containers is progress: the clock restarts.
    w.step().await;
    let (since, mark) = progress(&w.clone())
        .map(|(s, m)| (s, m.to_string()))
        .unwrap();
    w.cluster().edit(
        CLONE,
        json!({"status": {"containerStatuses": [
        {"name": "web", "image": "x", "imageID": "", "ready": false, "restartCount": 0,
         "state": {"waiting": {"reason": "ContainerCreating"}}}]}}),
    );
    w.step().await;
    assert_ne!(progress(&w.clone()).unwrap().1, mark);
    assert_eq!(w.phase().as_deref(), Some("Restoring"));
    // Then nothing moves for longer than 5 s.
    let stale = format!("{}:{}", since - 6_000, progress(&w.clone()).unwrap().1);
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {PROGRESS: stale}}}),
    );
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("RolledBack"));
    assert!(w.reason().contains("no progress for"), "{}", w.reason());
    assert_eq!(w.source_states(), RUNNING);
}

#[tokio::test]
async fn a_timeout_annotation_that_is_not_a_duration_fails_before_the_freeze() {
    let w = World::new("migrate");
    // An archive an earlier migration of this source kept.
    let kept = share::archive_path(&w.share_root, NS, SOURCE, "web").unwrap();
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::write(&kept, b"PK").unwrap();
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {COMPLETION_TIMEOUT_PER_GIB: "forever"}}}),
    );
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("Failed"));
    assert!(
        w.reason().contains(COMPLETION_TIMEOUT_PER_GIB),
        "{}",
        w.reason()
    );
    assert!(w.runtime().checkpoints.lock().unwrap().is_empty());
    assert_eq!(w.source_states(), RUNNING);
    assert!(kept.exists(), "an unclaimed migration touches no archive");
}

// ---- limits ---------------------------------------------------------------------------------

#[tokio::test]
async fn each_limit_queues_a_clone_with_one_event_until_a_slot_frees() {
    for (other_node, other_source_node, limit) in [
        ("node-c", "node-a", "--max-outbound"),
        ("node-b", "node-c", "--max-inbound"),
        ("node-d", "node-c", "--max-cluster"),
    ] {
        let mut w = World::new("migrate");
        let mut limits = Limits {
            max_outbound: 5,
            max_inbound: 5,
            max_cluster: 5,
        };
        match limit {
            "--max-outbound" => limits.max_outbound = 1,
            "--max-inbound" => limits.max_inbound = 1,
            _ => limits.max_cluster = 1,
        }
        w.restart_agent();
        w.agent.config.limits = limits;
        let mut other = clone_pod("other", "uid-other", "migrate");
        other["metadata"]["labels"][CLONE_OF_LABEL] = json!("elsewhere");
        other["spec"]["nodeName"] = json!(other_node);
        other["metadata"]["annotations"][PHASE] = json!("Restoring");
        other["metadata"]["annotations"][SOURCE_NODE] = json!(other_source_node);
        w.cluster().put(other);
        assert_eq!(w.step().await, Next::After(Duration::from_secs(2)));
        assert_eq!(w.step().await, Next::After(Duration::from_secs(2)));
        assert_eq!(w.phase(), None, "still Pending under {limit}");
        assert!(w.reason().contains(limit), "{}", w.reason());
        assert_eq!(
            w.cluster().events_with("Queued").len(),
            1,
            "announced once under {limit}"
        );
        // The other migration ends: this one goes.
        w.cluster().edit(
            "other",
            json!({"metadata": {"annotations": {PHASE: "Running"}}}),
        );
        w.step().await;
        assert_eq!(w.phase().as_deref(), Some("Checkpointing"), "under {limit}");
    }
}

// ---- an agent restarted in each phase -------------------------------------------------------

#[tokio::test]
async fn an_agent_restarted_in_each_phase_resumes_from_the_record() {
    for phase in [Phase::Checkpointing, Phase::Transferring, Phase::Restoring] {
        let mut w = World::new("migrate");
        w.until(phase, 4).await;
        w.restart_agent();
        w.until(Phase::Restoring, 3).await;
        w.clone_runs();
        w.until(Phase::Running, 2).await;
        assert_eq!(
            w.runtime().checkpoints.lock().unwrap().len(),
            2,
            "checkpointed once when restarted in {phase}"
        );
        assert!(w.cluster().get(SOURCE).is_none());
        w.assert_released();
    }
}

#[tokio::test]
async fn an_agent_restarted_mid_checkpoint_never_checkpoints_twice() {
    // The source frozen, the checkpoint asked, then the agent gone: the shim commits.
    let mut w = World::new("migrate");
    w.until(Phase::Checkpointing, 1).await;
    let frozen = unix_millis().to_string();
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {FROZEN_AT: frozen}}}),
    );
    w.runtime().pause("id-web").await.unwrap();
    w.runtime().pause("id-log").await.unwrap();
    w.restart_agent();
    // Nothing committed yet, and the pack is not stalled: it waits.
    assert_eq!(w.step().await, Next::After(Duration::from_secs(1)));
    assert_eq!(w.phase().as_deref(), Some("Checkpointing"));
    for c in ["web", "log"] {
        w.runtime()
            .checkpoint(
                &format!("id-{c}"),
                Path::new("/unused"),
                Duration::from_secs(1),
            )
            .await
            .unwrap();
    }
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("Transferring"));
    assert_eq!(
        w.runtime().checkpoints.lock().unwrap().len(),
        2,
        "only the shim's own"
    );
    assert_eq!(w.source_states(), PAUSED);

    // Had the pack stopped moving for the progress timeout, it would roll back instead.
    let mut w = World::new("migrate");
    w.until(Phase::Checkpointing, 1).await;
    let long_ago = unix_millis() - 200_000;
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {
        FROZEN_AT: long_ago.to_string(), PROGRESS: format!("{long_ago}:0")}}}),
    );
    w.runtime().pause("id-web").await.unwrap();
    w.runtime().pause("id-log").await.unwrap();
    w.restart_agent();
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("RolledBack"));
    assert!(w.reason().contains("interrupted"), "{}", w.reason());
    assert_eq!(w.source_states(), RUNNING);
    assert!(w.runtime().checkpoints.lock().unwrap().is_empty());
    w.assert_released();
}

#[tokio::test]
async fn an_agent_restarted_after_the_ending_releases_what_is_left() {
    let w = World::new("migrate");
    w.until(Phase::Restoring, 4).await;
    // Ended, but the agent died before releasing.
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {PHASE: "RolledBack"}}}),
    );
    assert!(has_finalizer(&w.clone()));
    assert!(!w.pod_dir_names().is_empty());
    assert_eq!(w.step().await, Next::OnChange);
    w.assert_released();
}

// ---- post-copy ------------------------------------------------------------------------------

impl World {
    /// Both pods report the address of their node, as kubelet does once it runs them.
    fn with_host_ips(self) -> World {
        self.cluster()
            .edit(SOURCE, json!({"status": {"hostIP": "10.214.0.2"}}));
        self.cluster()
            .edit(CLONE, json!({"status": {"hostIP": "10.214.0.3"}}));
        self
    }

    /// The clone's shim is ready for every container, saying whether its node has userfaultfd.
    fn clone_ready(&self, userfaultfd: bool) {
        let dir = share::pod_dir(&self.share_root, NS, SOURCE).unwrap();
        for c in ["web", "log"] {
            podmigrate_checkpoint::prefault::mark_ready(
                &dir,
                c,
                CLONE_UID,
                podmigrate_checkpoint::prefault::Readiness { userfaultfd },
            )
            .unwrap();
        }
    }

    /// The source's shim records container `c`'s page stream.
    fn pages(&self, c: &str, state: share::PagesState, moved_bytes: u64) {
        let archive = share::archive_path(&self.share_root, NS, SOURCE, c).unwrap();
        share::write_pages_record(
            &archive,
            &share::PagesRecord {
                clone_pod_uid: CLONE_UID.into(),
                state,
                moved_bytes,
                total_bytes: 100,
                reason: if state == share::PagesState::Failed {
                    "the page stream was lost".into()
                } else {
                    String::new()
                },
                updated_unix_ms: unix_millis(),
            },
        )
        .unwrap();
    }

    /// Claimed, frozen, checkpointed lazily, restored: the clone runs in PostCopy.
    async fn walk_into_postcopy(&self) {
        self.step().await;
        self.clone_ready(true);
        self.until(Phase::Restoring, 3).await;
        assert_eq!(*self.runtime().lazy.lock().unwrap(), vec![true, true]);
        assert_eq!(
            annotation(&self.clone(), TRANSFER_CHOSEN),
            Some(Transfer::PostCopy.as_str())
        );
        self.clone_runs();
        assert_eq!(self.step().await, Next::Now);
        assert_eq!(self.phase().as_deref(), Some("PostCopy"));
    }
}

#[tokio::test]
async fn a_postcopy_clone_runs_first_and_the_source_goes_once_every_page_arrived() {
    let w = World::new("migrate").with_host_ips();
    w.walk_into_postcopy().await;
    // The freeze ended when the clone began to run; the source stays frozen meanwhile.
    assert!(annotation(&w.clone(), FROZEN_MS).is_some());
    assert_eq!(w.cluster().events_with("PostCopy").len(), 2);
    assert!(matches!(w.step().await, Next::After(_)));
    assert_eq!(w.source_states(), PAUSED);
    assert!(w.cluster().get(SOURCE).is_some());
    // Progress, as the shim records it, reaches the clone's annotation.
    w.pages("web", share::PagesState::Streaming, 30);
    w.pages("log", share::PagesState::Complete, 100);
    w.step().await;
    assert_eq!(annotation(&w.clone(), PAGES), Some("130/200"));
    assert_eq!(w.phase().as_deref(), Some("PostCopy"));
    // Every page arrived: the source goes, the migration is Running.
    w.pages("web", share::PagesState::Complete, 100);
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("Running"));
    assert!(w.cluster().get(SOURCE).is_none(), "the source is deleted");
    assert!(timings(&w.clone()).contains_key("PostCopy"));
    w.assert_released();
}

#[tokio::test]
async fn a_broken_page_stream_deletes_the_clone_and_thaws_the_source() {
    let w = World::new("migrate").with_host_ips();
    w.walk_into_postcopy().await;
    w.pages("web", share::PagesState::Failed, 30);
    w.step().await;
    assert!(w.cluster().get(CLONE).is_none(), "the clone is deleted");
    let told = w.cluster().events_with("RolledBack");
    assert_eq!(told.len(), 2, "{told:?}");
    let reason = &told[0].1;
    assert!(
        reason.contains("page stream of container web failed")
            && reason.contains("the clone was deleted")
            && reason.contains("the source was resumed"),
        "{reason}"
    );
    assert_eq!(w.source_states(), RUNNING);
    assert!(w.cluster().get(SOURCE).is_some());
    assert_eq!(w.pod_dir_names(), Vec::<String>::new(), "share files left");
}

#[tokio::test]
async fn a_postcopy_clone_that_stops_makes_the_migration_roll_back() {
    let w = World::new("migrate").with_host_ips();
    w.walk_into_postcopy().await;
    // The clone's shim stops the container when its memory can no longer arrive.
    w.cluster().edit(
        CLONE,
        json!({"status": {"containerStatuses": [running("log"), {"name": "web", "image": "x",
            "imageID": "", "ready": false, "restartCount": 0, "state": {"terminated": {
            "exitCode": 137, "message": "podmigrate post-copy: the page stream was lost"}}}]}}),
    );
    w.step().await;
    assert!(w.cluster().get(CLONE).is_none(), "the clone is deleted");
    let told = w.cluster().events_with("RolledBack");
    assert!(told[0].1.contains("page stream was lost"), "{told:?}");
    assert_eq!(w.source_states(), RUNNING);
}

#[tokio::test]
async fn without_userfaultfd_on_the_clones_node_the_memory_is_copied_first() {
    let w = World::new("migrate").with_host_ips();
    w.step().await;
    w.clone_ready(false);
    w.until(Phase::Restoring, 3).await;
    assert_eq!(*w.runtime().lazy.lock().unwrap(), vec![false, false]);
    assert_eq!(
        annotation(&w.clone(), TRANSFER_CHOSEN),
        Some(Transfer::StopAndCopy.as_str())
    );
    let told = w.cluster().events_with("StopAndCopy");
    assert_eq!(told.len(), 2, "{told:?}");
    assert!(told[0].1.contains("userfaultfd"), "{told:?}");
    w.clone_runs();
    w.step().await;
    assert_eq!(w.phase().as_deref(), Some("Running"));
}

#[tokio::test]
async fn stop_and_copy_asked_for_is_taken_without_an_event() {
    let w = World::new("migrate").with_host_ips();
    w.cluster().edit(
        CLONE,
        json!({"metadata": {"annotations": {TRANSFER: "stop-and-copy"}}}),
    );
    w.step().await;
    w.clone_ready(true);
    w.until(Phase::Restoring, 3).await;
    assert_eq!(*w.runtime().lazy.lock().unwrap(), vec![false, false]);
    assert!(w.cluster().events_with("StopAndCopy").is_empty());
}
