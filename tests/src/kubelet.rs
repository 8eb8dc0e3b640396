//! A test kubelet: the part of kubelet a migration relies on, driving one node's containerd
//! through CRI for the pods the (stand-in) API server binds to that node.
//!
//! * **Watch.** Pods with `spec.nodeName == <node>` (kube's watcher with that field selector,
//!   as kubelet's own pod source), one worker task per pod uid.
//! * **Start**, in kubelet's order: `RunPodSandbox` (host network, the pod's annotations, handler
//!   = `spec.runtimeClassName` or `runc`), `PodSandboxStatus`, then per container `ImageStatus`,
//!   `CreateContainer` (image by id), `StartContainer`. Nothing is pulled: a missing image is
//!   `ErrImagePull`.
//! * **Status**, merge-patched on `pods/status` as kubelet's status manager writes it: `phase`
//!   (kubelet's `getPhase` rules), `conditions`, `hostIP`/`podIP` (host network: the node's IP),
//!   `startTime` and `containerStatuses` with `waiting` (`ContainerCreating`, or
//!   `CreateContainerError` / `RunContainerError` with the runtime's message), `running` or
//!   `terminated` (exit code, reason, times). Container state is polled while the pod runs.
//! * **Delete.** On a `deletionTimestamp` (graceful) or the pod vanishing (immediate deletion):
//!   `StopContainer` (the pod's grace period, capped), `StopPodSandbox`, `RemoveContainer`,
//!   `RemovePodSandbox` (found by the pod uid label, so a half-started pod goes too), then the
//!   final `DELETE` with `gracePeriodSeconds=0` and the uid as precondition, as kubelet
//!   confirms a graceful deletion.
//!
//! Simplified: a container that fails or exits is not restarted (no back-off, no
//! `CrashLoopBackOff`); no probes, volumes, init containers, resource limits or pod networking.
//!
//! Logs are JSON lines (`ts`, `level`, `node`, `pod`, `msg`, fields) in a file, optionally also
//! on stderr. Every CRI call is bounded; [`Kubelet::shutdown`] (or dropping it) stops every task.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cri::{self, ContainerSpec, ContainerState, CriClient, POD_UID_LABEL};

/// The runtime handler for pods without `runtimeClassName`.
pub const DEFAULT_HANDLER: &str = "runc";

/// How a [`Kubelet`] runs.
#[derive(Debug, Clone)]
pub struct KubeletOptions {
    pub node_name: String,
    /// Reported as `hostIP` and, host network, `podIP`.
    pub node_ip: Option<Ipv4Addr>,
    /// How often running containers' state is read.
    pub poll_interval: Duration,
    /// Bound on each CRI call (kubelet's `--runtime-request-timeout`, 2 minutes): a clone's
    /// `StartContainer` waits in our shim until the source's archive is on the share.
    pub runtime_request_timeout: Duration,
    /// Cap on the grace period given to `StopContainer`.
    pub max_stop_grace: Duration,
    /// JSON-lines log file.
    pub log_path: PathBuf,
    /// Also print log lines on stderr.
    pub echo: bool,
}

impl KubeletOptions {
    pub fn new(node_name: &str, log_path: &Path) -> KubeletOptions {
        KubeletOptions {
            node_name: node_name.to_owned(),
            node_ip: None,
            poll_interval: Duration::from_millis(300),
            runtime_request_timeout: Duration::from_secs(120),
            max_stop_grace: Duration::from_secs(2),
            log_path: log_path.to_owned(),
            echo: false,
        }
    }
}

/// JSON-lines logger shared by the kubelet's tasks.
#[derive(Clone)]
pub struct Log {
    node: String,
    file: Arc<Mutex<Option<File>>>,
    echo: bool,
}

impl Log {
    fn open(node: &str, path: &Path, echo: bool) -> Log {
        let file = OpenOptions::new().create(true).append(true).open(path).ok();
        Log {
            node: node.to_owned(),
            file: Arc::new(Mutex::new(file)),
            echo,
        }
    }

    pub fn write(&self, level: &str, pod: Option<&str>, msg: &str, fields: Value) {
        let ts = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut line = json!({ "ts": ts, "level": level, "node": self.node, "msg": msg });
        if let Some(pod) = pod {
            line["pod"] = json!(pod);
        }
        if let Value::Object(extra) = fields {
            for (k, v) in extra {
                line[k] = v;
            }
        }
        let text = line.to_string();
        if let Some(file) = self.file.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let _ = writeln!(file, "{text}");
        }
        if self.echo {
            eprintln!("kubelet {text}");
        }
    }

    fn info(&self, pod: &str, msg: &str, fields: Value) {
        self.write("info", Some(pod), msg, fields);
    }

    fn warn(&self, pod: &str, msg: &str, fields: Value) {
        self.write("warn", Some(pod), msg, fields);
    }
}

/// A running test kubelet; see the module docs.
pub struct Kubelet {
    node: String,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    log_path: PathBuf,
}

struct Ctx {
    kube: kube::Client,
    cri: CriClient,
    opts: KubeletOptions,
    log: Log,
}

/// What a pod worker knows of its pod: the latest object, and whether it is gone from the API.
#[derive(Clone)]
struct View {
    pod: Pod,
    gone: bool,
}

impl View {
    fn deleting(&self) -> bool {
        self.gone || self.pod.metadata.deletion_timestamp.is_some()
    }
}

struct Worker {
    view: watch::Sender<View>,
    task: JoinHandle<()>,
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .unwrap_or_else(|_| time::OffsetDateTime::now_utc())
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// CRI nanoseconds since the epoch as an RFC 3339 timestamp (whole seconds, as Kubernetes).
fn cri_time(nanos: i64) -> Option<String> {
    if nanos <= 0 {
        return None;
    }
    time::OffsetDateTime::from_unix_timestamp(nanos / 1_000_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// The message of a CRI error as kubelet shows it: the runtime's own words.
fn runtime_message(err: &anyhow::Error) -> String {
    err.chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .map(|s| s.message().to_owned())
        .unwrap_or_else(|| format!("{err:#}"))
}

impl Kubelet {
    /// Starts watching for `opts.node_name`'s pods. Call inside a Tokio runtime.
    pub fn start(kube: kube::Client, mut cri: CriClient, opts: KubeletOptions) -> Kubelet {
        cri.rpc_timeout = opts.runtime_request_timeout;
        let log = Log::open(&opts.node_name, &opts.log_path, opts.echo);
        log.write(
            "info",
            None,
            "kubelet starting",
            json!({ "containerd": cri.socket().display().to_string() }),
        );
        let stop = CancellationToken::new();
        let node = opts.node_name.clone();
        let log_path = opts.log_path.clone();
        let ctx = Arc::new(Ctx {
            kube,
            cri,
            opts,
            log,
        });
        let task = tokio::spawn(run(ctx, stop.clone()));
        Kubelet {
            node,
            stop,
            task: Some(task),
            log_path,
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Stops watching and every pod worker (containers are left as they are), bounded.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .is_err()
            {
                eprintln!("kubelet {}: did not stop within 20s", self.node);
            }
        }
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(ctx: Arc<Ctx>, stop: CancellationToken) {
    let pods: Api<Pod> = Api::all(ctx.kube.clone());
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.opts.node_name));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut workers: HashMap<String, Worker> = HashMap::new();
    let mut listed: Option<HashSet<String>> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            event = stream.next() => event,
        };
        match event {
            None => break,
            Some(Err(e)) => ctx.log.write(
                "warn",
                None,
                "watching pods",
                json!({ "error": e.to_string() }),
            ),
            Some(Ok(Event::Init)) => listed = Some(HashSet::new()),
            Some(Ok(Event::InitApply(pod))) => {
                if let Some(listed) = listed.as_mut() {
                    listed.insert(uid(&pod));
                }
                apply(&ctx, &stop, &mut workers, pod);
            }
            Some(Ok(Event::InitDone)) => {
                if let Some(listed) = listed.take() {
                    let missing: Vec<String> = workers
                        .keys()
                        .filter(|u| !listed.contains(*u))
                        .cloned()
                        .collect();
                    for u in missing {
                        gone(&mut workers, &u);
                    }
                }
            }
            Some(Ok(Event::Apply(pod))) => apply(&ctx, &stop, &mut workers, pod),
            Some(Ok(Event::Delete(pod))) => gone(&mut workers, &uid(&pod)),
        }
        workers.retain(|_, w| !w.task.is_finished());
    }
    // Workers watch `stop` too; give them a moment to leave their CRI calls.
    for (_, worker) in workers.drain() {
        let mut task = worker.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    ctx.log.write("info", None, "kubelet stopped", json!({}));
}

fn apply(
    ctx: &Arc<Ctx>,
    stop: &CancellationToken,
    workers: &mut HashMap<String, Worker>,
    pod: Pod,
) {
    let u = uid(&pod);
    if let Some(worker) = workers.get(&u) {
        if !worker.task.is_finished() {
            worker.view.send_replace(View { pod, gone: false });
            return;
        }
        // Its worker is done (the pod was torn down): nothing more happens to it here.
        return;
    }
    let (tx, rx) = watch::channel(View { pod, gone: false });
    let task = tokio::spawn(pod_worker(Arc::clone(ctx), rx, stop.child_token()));
    workers.insert(u, Worker { view: tx, task });
}

fn gone(workers: &mut HashMap<String, Worker>, u: &str) {
    if let Some(worker) = workers.get(u) {
        worker.view.send_modify(|v| v.gone = true);
    }
}

/// Resolves once the pod is being deleted (or gone); never when the watch ends first.
async fn deletion(rx: &mut watch::Receiver<View>) {
    loop {
        if rx.borrow_and_update().deleting() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn pod_worker(ctx: Arc<Ctx>, mut rx: watch::Receiver<View>, stop: CancellationToken) {
    let pod = rx.borrow().pod.clone();
    let name = key(&pod);
    if !rx.borrow().deleting() {
        let started = tokio::select! {
            _ = stop.cancelled() => return,
            _ = deletion(&mut rx) => None,
            state = start_pod(&ctx, &pod) => Some(state),
        };
        if let Some(mut state) = started {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = deletion(&mut rx) => break,
                    _ = tokio::time::sleep(ctx.opts.poll_interval) => {
                        if state.refresh(&ctx).await {
                            state.report(&ctx).await;
                        }
                    }
                }
            }
        }
    }
    let view = rx.borrow().clone();
    ctx.log.info(
        &name,
        "pod deleted: stopping its containers",
        json!({ "gone": view.gone }),
    );
    teardown(&ctx, &view.pod).await;
    if !view.gone {
        confirm_deletion(&ctx, &view.pod).await;
    }
}

/// One container as kubelet reports it.
#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        message: String,
        started_at: Option<String>,
        finished_at: Option<String>,
    },
}

#[derive(Debug, Clone)]
struct ContainerRecord {
    name: String,
    image: String,
    image_id: String,
    id: Option<String>,
    state: State,
}

impl ContainerRecord {
    fn status(&self) -> Value {
        let state = match &self.state {
            State::Waiting { reason, message } => {
                let mut w = json!({ "reason": reason });
                if !message.is_empty() {
                    w["message"] = json!(message);
                }
                json!({ "waiting": w, "running": null, "terminated": null })
            }
            State::Running { started_at } => {
                json!({ "waiting": null, "running": { "startedAt": started_at }, "terminated": null })
            }
            State::Terminated {
                exit_code,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t = json!({ "exitCode": exit_code, "reason": reason });
                if !message.is_empty() {
                    t["message"] = json!(message);
                }
                if let Some(s) = started_at {
                    t["startedAt"] = json!(s);
                }
                if let Some(f) = finished_at {
                    t["finishedAt"] = json!(f);
                }
                json!({ "waiting": null, "running": null, "terminated": t })
            }
        };
        let running = matches!(self.state, State::Running { .. });
        let mut status = json!({
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": running,
            "started": running,
            "restartCount": 0,
            "state": state,
        });
        if let Some(id) = &self.id {
            status["containerID"] = json!(format!("containerd://{id}"));
        }
        status
    }
}

/// A started pod as this kubelet tracks it.
struct PodState {
    namespace: String,
    name: String,
    restart_policy: String,
    start_time: String,
    containers: Vec<ContainerRecord>,
    last_reported: Option<Value>,
}

impl PodState {
    fn new(pod: &Pod) -> PodState {
        let spec = pod.spec.clone().unwrap_or_default();
        PodState {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            restart_policy: spec.restart_policy.unwrap_or_else(|| "Always".into()),
            start_time: now(),
            containers: spec
                .containers
                .iter()
                .map(|c| ContainerRecord {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    image_id: String::new(),
                    id: None,
                    state: State::Waiting {
                        reason: "ContainerCreating".into(),
                        message: String::new(),
                    },
                })
                .collect(),
            last_reported: None,
        }
    }

    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// kubelet's `getPhase` for pods without init containers.
    fn phase(&self) -> &'static str {
        let mut waiting = 0;
        let mut running = 0;
        let mut stopped = 0;
        let mut succeeded = 0;
        for c in &self.containers {
            match &c.state {
                State::Waiting { .. } => waiting += 1,
                State::Running { .. } => running += 1,
                State::Terminated { exit_code, .. } => {
                    stopped += 1;
                    if *exit_code == 0 {
                        succeeded += 1;
                    }
                }
            }
        }
        if waiting > 0 {
            "Pending"
        } else if running > 0 {
            "Running"
        } else if stopped > 0 {
            match self.restart_policy.as_str() {
                "Always" => "Running",
                _ if stopped == succeeded => "Succeeded",
                "Never" => "Failed",
                _ => "Running",
            }
        } else {
            "Pending"
        }
    }

    fn status(&self, node_ip: Option<Ipv4Addr>) -> Value {
        let all_running = self
            .containers
            .iter()
            .all(|c| matches!(c.state, State::Running { .. }));
        let ready = if all_running { "True" } else { "False" };
        let condition = |kind: &str, status: &str| {
            let mut c =
                json!({ "type": kind, "status": status, "lastTransitionTime": self.start_time });
            if status == "False" {
                c["reason"] = json!("ContainersNotReady");
            }
            c
        };
        let mut status = json!({
            "phase": self.phase(),
            "startTime": self.start_time,
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": self.containers.iter().map(ContainerRecord::status).collect::<Vec<_>>(),
        });
        if let Some(ip) = node_ip {
            status["hostIP"] = json!(ip.to_string());
            status["hostIPs"] = json!([{ "ip": ip.to_string() }]);
            status["podIP"] = json!(ip.to_string());
            status["podIPs"] = json!([{ "ip": ip.to_string() }]);
        }
        status
    }

    /// Writes the status if it changed since the last report.
    async fn report(&mut self, ctx: &Ctx) {
        let status = self.status(ctx.opts.node_ip);
        if self.last_reported.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(ctx.kube.clone(), &self.namespace);
        match api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            Ok(_) => {
                let states: BTreeMap<&str, String> = self
                    .containers
                    .iter()
                    .map(|c| (c.name.as_str(), describe(&c.state)))
                    .collect();
                ctx.log.info(
                    &self.key(),
                    "status updated",
                    json!({ "phase": self.phase(), "containers": states }),
                );
                self.last_reported = Some(status);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => ctx.log.warn(
                &self.key(),
                "updating the pod status",
                json!({ "error": e.to_string() }),
            ),
        }
    }

    /// Reads every running container's state; true when something changed.
    async fn refresh(&mut self, ctx: &Ctx) -> bool {
        let mut changed = false;
        for c in &mut self.containers {
            // Only a running container changes by itself; one that failed to start stays
            // waiting with the start error (no restarts here), as kubelet first reports it.
            let Some(id) = c.id.clone() else { continue };
            if !matches!(c.state, State::Running { .. }) {
                continue;
            }
            let new = match ctx.cri.container_status(&id).await {
                Ok(status) => match ContainerState::try_from(status.state) {
                    Ok(ContainerState::ContainerRunning) => State::Running {
                        started_at: cri_time(status.started_at).unwrap_or_else(now),
                    },
                    Ok(ContainerState::ContainerExited) => State::Terminated {
                        exit_code: status.exit_code,
                        reason: if status.reason.is_empty() {
                            if status.exit_code == 0 {
                                "Completed".into()
                            } else {
                                "Error".into()
                            }
                        } else {
                            status.reason.clone()
                        },
                        message: status.message.clone(),
                        started_at: cri_time(status.started_at),
                        finished_at: cri_time(status.finished_at),
                    },
                    _ => State::Waiting {
                        reason: "ContainerStatusUnknown".into(),
                        message: String::new(),
                    },
                },
                Err(e) if cri::is_not_found(&e) => State::Terminated {
                    exit_code: 137,
                    reason: "ContainerStatusUnknown".into(),
                    message: "The container could not be located when the pod was terminated"
                        .into(),
                    started_at: None,
                    finished_at: None,
                },
                Err(e) => {
                    ctx.log.warn(
                        &format!("{}/{}", self.namespace, self.name),
                        "ContainerStatus",
                        json!({ "container": c.name, "error": format!("{e:#}") }),
                    );
                    continue;
                }
            };
            // A running container's start time is set once.
            let same = match (&c.state, &new) {
                (State::Running { .. }, State::Running { .. }) => true,
                (a, b) => a == b,
            };
            if !same {
                ctx.log.info(
                    &format!("{}/{}", self.namespace, self.name),
                    "container state changed",
                    json!({ "container": c.name, "from": describe(&c.state), "to": describe(&new) }),
                );
                c.state = new;
                changed = true;
            }
        }
        changed
    }
}

fn describe(state: &State) -> String {
    match state {
        State::Waiting { reason, .. } => format!("waiting ({reason})"),
        State::Running { .. } => "running".into(),
        State::Terminated {
            exit_code, reason, ..
        } => format!("terminated ({reason}, exit {exit_code})"),
    }
}

/// kubelet's SyncPod for a new pod: sandbox, then each container in order; failures are
/// recorded in the container's status and the next container is still started.
async fn start_pod(ctx: &Ctx, pod: &Pod) -> PodState {
    let mut state = PodState::new(pod);
    let name = state.key();
    state.report(ctx).await;
    let spec = pod.spec.clone().unwrap_or_default();
    let handler = spec
        .runtime_class_name
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| DEFAULT_HANDLER.into());
    let annotations: Vec<(String, String)> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let annotation_refs: Vec<(&str, &str)> = annotations
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    ctx.log
        .info(&name, "RunPodSandbox", json!({ "handler": handler }));
    let sandbox = match ctx
        .cri
        .run_pod_sandbox(
            &state.name,
            &state.namespace,
            &uid(pod),
            &annotation_refs,
            &handler,
        )
        .await
    {
        Ok(sandbox) => sandbox,
        Err(e) => {
            // kubelet reports FailedCreatePodSandBox as an event; containers stay waiting.
            let message = runtime_message(&e);
            ctx.log
                .warn(&name, "RunPodSandbox failed", json!({ "error": message }));
            for c in &mut state.containers {
                c.state = State::Waiting {
                    reason: "ContainerCreating".into(),
                    message: format!("FailedCreatePodSandBox: {message}"),
                };
            }
            state.report(ctx).await;
            return state;
        }
    };
    for (index, container) in spec.containers.iter().enumerate() {
        let image = container.image.clone().unwrap_or_default();
        let mut cspec = ContainerSpec::new(&container.name, &image);
        cspec.command = container.command.clone().unwrap_or_default();
        cspec.args = container.args.clone().unwrap_or_default();
        cspec.working_dir = container.working_dir.clone().unwrap_or_default();
        cspec.env = container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
            .collect();
        let fail = |state: &mut PodState, reason: &str, message: String| {
            state.containers[index].state = State::Waiting {
                reason: reason.into(),
                message,
            };
        };
        let found = match ctx.cri.image_status(&image).await {
            Ok(Some(found)) => found,
            Ok(None) => {
                fail(
                    &mut state,
                    "ErrImagePull",
                    format!(
                        "image {image} is not present on node {} and nothing is pulled",
                        ctx.opts.node_name
                    ),
                );
                state.report(ctx).await;
                continue;
            }
            Err(e) => {
                fail(&mut state, "ErrImagePull", runtime_message(&e));
                state.report(ctx).await;
                continue;
            }
        };
        state.containers[index].image_id = found.id.clone();
        let config = ctx.cri.container_config(&sandbox, &cspec, &found.id);
        let id = match ctx.cri.create_container_with_config(&sandbox, config).await {
            Ok(id) => id,
            Err(e) => {
                let message = runtime_message(&e);
                ctx.log.warn(
                    &name,
                    "CreateContainer failed",
                    json!({ "container": container.name, "error": message }),
                );
                fail(&mut state, "CreateContainerError", message);
                state.report(ctx).await;
                continue;
            }
        };
        state.containers[index].id = Some(id.clone());
        ctx.log.info(
            &name,
            "StartContainer",
            json!({ "container": container.name, "id": id }),
        );
        match ctx.cri.start_container(&id).await {
            Ok(()) => {
                state.containers[index].state = State::Running { started_at: now() };
                ctx.log.info(
                    &name,
                    "container started",
                    json!({ "container": container.name }),
                );
            }
            Err(e) => {
                let message = runtime_message(&e);
                ctx.log.warn(
                    &name,
                    "StartContainer failed",
                    json!({ "container": container.name, "error": message }),
                );
                fail(&mut state, "RunContainerError", message);
            }
        }
        state.report(ctx).await;
    }
    state
}

/// Stops and removes everything CRI has for the pod's uid: containers, then sandboxes.
async fn teardown(ctx: &Ctx, pod: &Pod) {
    let name = key(pod);
    let u = uid(pod);
    let grace = pod
        .metadata
        .deletion_grace_period_seconds
        .or(pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds))
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(ctx.opts.max_stop_grace)
        .min(ctx.opts.max_stop_grace);
    let mut cri = ctx.cri.clone();
    cri.rpc_timeout = Duration::from_secs(30);
    let warn = |what: &str, e: anyhow::Error| {
        ctx.log
            .warn(&name, what, json!({ "error": format!("{e:#}") }));
    };
    let containers = cri
        .list_containers(&[(POD_UID_LABEL, &u)])
        .await
        .unwrap_or_else(|e| {
            warn("ListContainers", e);
            Vec::new()
        });
    let sandboxes = cri
        .list_pod_sandboxes(&[(POD_UID_LABEL, &u)])
        .await
        .unwrap_or_else(|e| {
            warn("ListPodSandbox", e);
            Vec::new()
        });
    for c in &containers {
        if c.state == ContainerState::ContainerRunning as i32 {
            if let Err(e) = cri.stop_container(&c.id, grace).await {
                warn("StopContainer", e);
            }
        }
    }
    for s in &sandboxes {
        if let Err(e) = cri.stop_pod_sandbox(&s.id).await {
            warn("StopPodSandbox", e);
        }
    }
    for c in &containers {
        if let Err(e) = cri.remove_container(&c.id).await {
            if !cri::is_not_found(&e) {
                warn("RemoveContainer", e);
            }
        }
    }
    for s in &sandboxes {
        if let Err(e) = cri.remove_pod_sandbox(&s.id).await {
            if !cri::is_not_found(&e) {
                warn("RemovePodSandbox", e);
            }
        }
    }
    ctx.log.info(
        &name,
        "pod torn down",
        json!({ "containers": containers.len(), "sandboxes": sandboxes.len() }),
    );
}

/// kubelet's last word on a gracefully deleted pod: DELETE with grace 0, for this uid only.
async fn confirm_deletion(ctx: &Ctx, pod: &Pod) {
    let name = key(pod);
    let api: Api<Pod> = Api::namespaced(
        ctx.kube.clone(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
    );
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api
        .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
        .await
    {
        Ok(_) => ctx.log.info(&name, "deletion confirmed", json!({})),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => ctx.log.warn(
            &name,
            "confirming the deletion",
            json!({ "error": e.to_string() }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_state(policy: &str, states: Vec<State>) -> PodState {
        PodState {
            namespace: "ns".into(),
            name: "p".into(),
            restart_policy: policy.into(),
            start_time: now(),
            containers: states
                .into_iter()
                .enumerate()
                .map(|(i, state)| ContainerRecord {
                    name: format!("c{i}"),
                    image: "i".into(),
                    image_id: String::new(),
                    id: None,
                    state,
                })
                .collect(),
            last_reported: None,
        }
    }

    fn waiting(reason: &str) -> State {
        State::Waiting {
            reason: reason.into(),
            message: "m".into(),
        }
    }

    fn running() -> State {
        State::Running { started_at: now() }
    }

    fn exited(code: i32) -> State {
        State::Terminated {
            exit_code: code,
            reason: "Error".into(),
            message: String::new(),
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn phases_follow_kubelet() {
        assert_eq!(
            pod_state("Always", vec![running(), waiting("ContainerCreating")]).phase(),
            "Pending"
        );
        assert_eq!(
            pod_state("Always", vec![running(), running()]).phase(),
            "Running"
        );
        assert_eq!(pod_state("Always", vec![exited(137)]).phase(), "Running");
        assert_eq!(pod_state("Never", vec![exited(1)]).phase(), "Failed");
        assert_eq!(pod_state("Never", vec![exited(0)]).phase(), "Succeeded");
        assert_eq!(pod_state("OnFailure", vec![exited(1)]).phase(), "Running");
    }

    #[test]
    fn a_start_error_is_a_waiting_reason_with_the_message() {
        let state = pod_state("Always", vec![waiting("RunContainerError")]);
        let status = state.status(Some(Ipv4Addr::new(10, 0, 0, 2)));
        let c = &status["containerStatuses"][0];
        assert_eq!(c["state"]["waiting"]["reason"], "RunContainerError");
        assert_eq!(c["state"]["waiting"]["message"], "m");
        // Merge patches must clear the other states explicitly.
        assert!(c["state"]["running"].is_null() && c["state"].get("running").is_some());
        assert_eq!(status["podIP"], "10.0.0.2");
        assert_eq!(status["conditions"][3]["status"], "False");
    }
}
