//! CRI, as kubelet calls it, against a real private containerd (CRI plugin enabled, our own
//! pause image, no CNI): for each runtime handler, a host-network pod runs a container, which is
//! exec'd into, whose logs are read, and which is stopped and removed with its pod, checking
//! what each step makes observable.
//!
//! Handlers: `runc`, and `migrate` (our shim): a `migrate` pod must behave exactly like a
//! `runc` pod.
//!
//! Needs root, containerd, ctr, runc, gcc and busybox-static; skips otherwise, unless
//! `PODMIGRATE_E2E_REQUIRE` is set, in which case it fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use podmigrate_e2e::containerd::{
    build_shim, cri_skip_reason, Containerd, ContainerdOptions, MIGRATE_HANDLER, RUNC_HANDLER,
    SHIM_BINARY,
};
use podmigrate_e2e::cri::{
    self, is_not_found, ContainerSpec, ContainerState, CriClient, PodSandboxState,
    CONTAINER_NAME_LABEL, POD_UID_LABEL,
};
use podmigrate_e2e::harness::{skip, unique_id};
use podmigrate_e2e::oci::{self, BUSYBOX_IMAGE, COUNTER_IMAGE, PAUSE_IMAGE};

/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(20);
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Counts on stdout and into /tmp/count five times a second; exits 3 on SIGTERM.
const TICKER: &str = "trap 'echo stopping; exit 3' TERM; echo started >&2; i=0; \
                      while true; do i=$((i+1)); echo \"tick $i\"; echo $i > /tmp/count; \
                      sleep 0.2; done";

fn handlers() -> Vec<&'static str> {
    vec![RUNC_HANDLER, MIGRATE_HANDLER]
}

/// Starts a containerd named `name`, building our shim first when `migrate` is in `handlers`.
async fn start_containerd(name: &str, handlers: &[&str]) -> Containerd {
    let mut opts = ContainerdOptions::named(name);
    if handlers.contains(&MIGRATE_HANDLER) {
        opts.shim = build_shim().expect("building the shim for the migrate handler");
    }
    Containerd::start(opts).await.expect("starting containerd")
}

fn step(t0: Instant, what: &str) {
    eprintln!("[{:>7.2?}] {what}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pod_lifecycle_as_kubelet_calls_it() {
    if let Some(reason) = cri_skip_reason() {
        skip(&reason);
        return;
    }
    let started = Instant::now();
    let handlers = handlers();
    let ctrd = start_containerd("cri-lifecycle", &handlers).await;
    step(started, "containerd up, pause image imported");
    ctrd.import(&oci::busybox_image().unwrap(), IMPORT_TIMEOUT)
        .expect("importing busybox");
    let cri = ctrd.cri().await.expect("CRI client");

    let version = cri.version().await.unwrap();
    assert_eq!(version.runtime_name, "containerd");
    assert_eq!(version.runtime_api_version, "v1");
    // No CNI config: the runtime is ready, the network is not (host-network pods need none).
    let conditions = cri.status().await.unwrap().status.unwrap().conditions;
    let condition = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.r#type == kind)
            .map(|c| c.status)
    };
    assert_eq!(condition("RuntimeReady"), Some(true), "{conditions:?}");
    assert_eq!(condition("NetworkReady"), Some(false), "{conditions:?}");
    // Images kubelet would see: ours, by the names we gave them.
    for image in [PAUSE_IMAGE, BUSYBOX_IMAGE] {
        let status = cri.image_status(image).await.unwrap();
        let status = status.unwrap_or_else(|| panic!("{image} not visible to CRI"));
        assert!(status.repo_tags.iter().any(|t| t == image), "{status:?}");
    }
    assert!(cri
        .image_status("localhost/podmigrate/absent:1")
        .await
        .unwrap()
        .is_none());

    for handler in &handlers {
        if let Err(e) = pod_lifecycle(&ctrd, &cri, handler, started).await {
            panic!("handler {handler}: {e:?}");
        }
    }

    // Nothing left behind: no shims, no runc containers, no mounts.
    ensure_nothing_left(&ctrd).await.unwrap();
    let mut ctrd = ctrd;
    let problems = ctrd.shutdown();
    assert!(problems.is_empty(), "cleanup problems: {problems:?}");
    eprintln!("CRI lifecycle passed in {:?}", started.elapsed());
}

async fn pod_lifecycle(
    ctrd: &Containerd,
    cri: &CriClient,
    handler: &str,
    t0: Instant,
) -> Result<()> {
    let uid = unique_id("uid");
    let name = format!("ticker-{handler}");

    // RunPodSandbox: a host-network pod with a podmigrate annotation.
    let pod = cri
        .run_pod_sandbox(
            &name,
            "default",
            &uid,
            &[("podmigrate.io/test", "lifecycle"), ("other.io/x", "1")],
            handler,
        )
        .await?;
    step(t0, &format!("[{handler}] pod {} ready", &pod.id[..12]));
    let status = cri.pod_sandbox_status(&pod.id).await?;
    let sandbox = status.status.context("no sandbox status")?;
    ensure!(
        sandbox.state == PodSandboxState::SandboxReady as i32,
        "{sandbox:?}"
    );
    ensure!(sandbox.runtime_handler == handler, "{sandbox:?}");
    let ns = sandbox
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .context("no namespace options in sandbox status")?;
    ensure!(ns.network == cri::NamespaceMode::Node as i32, "{ns:?}");
    let info: serde_json::Value =
        serde_json::from_str(status.info.get("info").context("no verbose sandbox info")?)?;
    ensure!(
        info["image"] == PAUSE_IMAGE,
        "sandbox image: {}",
        info["image"]
    );
    ensure!(
        info["runtimeHandler"] == handler,
        "{}",
        info["runtimeHandler"]
    );

    // ImageStatus + CreateContainer: the ticker.
    let spec = ContainerSpec::new("ticker", BUSYBOX_IMAGE)
        .command(&["/bin/sh", "-c"])
        .args(&[TICKER])
        .env("TICKER_HANDLER", handler)
        .annotation("podmigrate.io/container", "ticker");
    let id = cri.create_container(&pod, &spec).await?;
    let created = cri.container_status(&id).await?;
    ensure!(
        created.state == ContainerState::ContainerCreated as i32,
        "{created:?}"
    );
    ensure!(created.image_ref.starts_with("sha256:"), "{created:?}");

    // The OCI spec: host network (the sandbox has no network namespace of its own and the
    // container joins the sandbox's, i.e. the host's), CRI's annotations, and the pod
    // annotations copied only by the migrate handler's `pod_annotations`.
    let sandbox_spec = &info["runtimeSpec"];
    ensure!(
        !sandbox_spec["linux"]["namespaces"]
            .as_array()
            .context("no namespaces in the sandbox's runtimeSpec")?
            .iter()
            .any(|n| n["type"] == "network"),
        "host-network sandbox has a network namespace: {}",
        sandbox_spec["linux"]["namespaces"]
    );
    let spec_json = cri.container_info(&id).await?["runtimeSpec"].clone();
    let netns = spec_json["linux"]["namespaces"]
        .as_array()
        .context("no namespaces in runtimeSpec")?
        .iter()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str())
        .context("container does not join the sandbox's network namespace")?
        .to_owned();
    ensure!(
        std::fs::read_link(&netns)? == std::fs::read_link("/proc/self/ns/net")?,
        "container's network namespace {netns} is not the host's"
    );
    ensure!(spec_json["process"]["env"]
        .as_array()
        .is_some_and(|e| e.iter().any(|v| v == &format!("TICKER_HANDLER={handler}"))));
    let annotations = &spec_json["annotations"];
    ensure!(
        annotations["io.kubernetes.cri.container-type"] == "container",
        "{annotations}"
    );
    ensure!(
        annotations["io.kubernetes.cri.sandbox-id"] == pod.id.as_str(),
        "{annotations}"
    );
    // Container annotations reach CRI's status, not the OCI spec (no `container_annotations`).
    ensure!(
        created
            .annotations
            .get("podmigrate.io/container")
            .map(String::as_str)
            == Some("ticker"),
        "{created:?}"
    );
    let copied = annotations["podmigrate.io/test"] == "lifecycle";
    ensure!(
        copied == (handler == MIGRATE_HANDLER),
        "pod annotation copied: {copied} for handler {handler}: {annotations}"
    );
    ensure!(annotations.get("other.io/x").is_none(), "{annotations}");

    // StartContainer.
    cri.start_container(&id).await?;
    let running = cri
        .wait_container_state(&id, ContainerState::ContainerRunning, WAIT)
        .await?;
    ensure!(running.started_at > 0, "{running:?}");
    step(t0, &format!("[{handler}] container {} running", &id[..12]));
    // One shim for the pod, of the handler's binary (ours may run a runc shim as its delegate).
    let shims = ctrd.shim_processes();
    let named = |name: &str| {
        shims
            .iter()
            .filter(|(_, bin)| bin.file_name().is_some_and(|n| n == name))
            .count()
    };
    let (ours, runc_shims) = (named(SHIM_BINARY), named("containerd-shim-runc-v2"));
    ensure!(
        if handler == MIGRATE_HANDLER {
            ours == 1 && runc_shims <= 1
        } else {
            ours == 0 && runc_shims == 1
        },
        "unexpected shims for handler {handler}: {shims:?}"
    );
    // The handler's runc options reached the runc shim (for `migrate` on containerd 1.6 by way
    // of the ConfigPath file our shim reads): runc keeps the container's state under our Root.
    let state_dir = ctrd.runc_root().join(oci::K8S_NAMESPACE).join(&id);
    ensure!(
        state_dir.join("state.json").is_file(),
        "[{handler}] no runc state at {} (runc options not applied?)",
        state_dir.display()
    );

    // ExecSync: the count file rises.
    let deadline = Instant::now() + WAIT;
    let count = loop {
        let out = cri.exec_sync(&id, &["cat", "/tmp/count"], WAIT).await?;
        let n = out.stdout_str().trim().parse::<u64>().ok();
        if out.exit_code == 0 && n.is_some_and(|n| n >= 3) {
            break n.unwrap_or_default();
        }
        ensure!(Instant::now() < deadline, "count never reached 3: {out:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = cri
        .exec_sync(&id, &["sh", "-c", "echo out; echo err >&2; exit 7"], WAIT)
        .await?;
    ensure!(
        (
            out.exit_code,
            out.stdout_str().as_str(),
            out.stderr_str().as_str()
        ) == (7, "out\n", "err\n"),
        "{out:?}"
    );
    step(t0, &format!("[{handler}] exec: count {count}"));

    // Logs: the container's file in the pod's log directory, CRI format.
    let log_path = PathBuf::from(&running.log_path);
    ensure!(log_path == pod.container_log_path("ticker"), "{log_path:?}");
    let messages = cri::wait_for_log(&log_path, WAIT, |m| m.iter().any(|l| l == "tick 3")).await?;
    let lines = cri::read_log(&log_path)?;
    let stdout = cri::log_messages(&lines, Some("stdout"));
    ensure!(
        stdout
            .iter()
            .take(3)
            .eq(["tick 1", "tick 2", "tick 3"].iter()),
        "{stdout:?}"
    );
    ensure!(
        cri::log_messages(&lines, Some("stderr")) == ["started"],
        "{messages:?}"
    );
    ensure!(lines
        .iter()
        .all(|l| l.timestamp.ends_with('Z') || l.timestamp.contains('+')));

    // ListContainers by kubelet's labels.
    let listed = cri
        .list_containers(&[(POD_UID_LABEL, &uid), (CONTAINER_NAME_LABEL, "ticker")])
        .await?;
    ensure!(
        listed.len() == 1
            && listed[0].id == id
            && listed[0].state == ContainerState::ContainerRunning as i32,
        "{listed:?}"
    );
    ensure!(cri
        .list_containers(&[(POD_UID_LABEL, "no-such-uid")])
        .await?
        .is_empty());

    // StopContainer: SIGTERM, which the trap turns into exit 3, well within the grace period.
    let stop_started = Instant::now();
    cri.stop_container(&id, Duration::from_secs(10)).await?;
    let stopped = cri.container_status(&id).await?;
    ensure!(
        stopped.state == ContainerState::ContainerExited as i32,
        "{stopped:?}"
    );
    ensure!(
        stopped.exit_code == 3,
        "exit code {} ({stopped:?})",
        stopped.exit_code
    );
    ensure!(stopped.reason == "Error", "{stopped:?}");
    ensure!(stopped.finished_at >= stopped.started_at, "{stopped:?}");
    ensure!(
        stop_started.elapsed() < Duration::from_secs(8),
        "stop took {:?}: SIGTERM not delivered?",
        stop_started.elapsed()
    );
    cri::wait_for_log(&log_path, WAIT, |m| {
        m.last().is_some_and(|l| l == "stopping")
    })
    .await?;
    step(
        t0,
        &format!("[{handler}] container stopped with exit code 3"),
    );

    // RemoveContainer.
    cri.remove_container(&id).await?;
    let gone = cri
        .container_status(&id)
        .await
        .expect_err("status of a removed container");
    ensure!(is_not_found(&gone), "{gone:?}");
    ensure!(cri
        .list_containers(&[(POD_UID_LABEL, &uid)])
        .await?
        .is_empty());

    // StopPodSandbox, RemovePodSandbox.
    cri.stop_pod_sandbox(&pod.id).await?;
    ensure!(cri.pod_state(&pod.id).await? == PodSandboxState::SandboxNotready);
    cri.remove_pod_sandbox(&pod.id).await?;
    let gone = cri
        .pod_sandbox_status(&pod.id)
        .await
        .expect_err("status of a removed pod");
    ensure!(is_not_found(&gone), "{gone:?}");
    ensure!(cri
        .list_pod_sandboxes(&[(POD_UID_LABEL, &uid)])
        .await?
        .is_empty());
    ensure_nothing_left(ctrd).await?;
    step(t0, &format!("[{handler}] pod removed"));
    Ok(())
}

/// After pods are removed: their shim has exited, runc knows no container, nothing is mounted.
async fn ensure_nothing_left(ctrd: &Containerd) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let shims = ctrd.shim_pids();
        let runc_state: Vec<_> = std::fs::read_dir(ctrd.runc_root().join(oci::K8S_NAMESPACE))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        let mounts = ctrd.mounts();
        if shims.is_empty() && runc_state.is_empty() && mounts.is_empty() {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "left behind: shims {shims:?}, runc containers {runc_state:?}, mounts {mounts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port nobody listens on right now (host network: the pod shares the host's ports).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

fn http_get(port: u16, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no HTTP head")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_owned())
}

/// The counter test app in a host-network pod, run by a second containerd (so two run side by
/// side when the tests run in parallel): served on the host's loopback, exec'd into, stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counter_app_serves_from_a_host_network_pod() {
    if let Some(reason) = cri_skip_reason() {
        skip(&reason);
        return;
    }
    let started = Instant::now();
    // Built (or found) before containerd starts: the first build may take a while.
    let image = oci::counter_image().expect("building the counter image");
    let handlers = handlers();
    let ctrd = start_containerd("cri-counter", &handlers).await;
    ctrd.import(&image, IMPORT_TIMEOUT)
        .expect("importing the counter image");
    let cri = ctrd.cri().await.expect("CRI client");
    for handler in &handlers {
        if let Err(e) = counter_pod(&cri, handler, started).await {
            panic!("handler {handler}: {e:?}");
        }
    }
    ensure_nothing_left(&ctrd).await.unwrap();
    eprintln!("counter pod passed in {:?}", started.elapsed());
}

async fn counter_pod(cri: &CriClient, handler: &str, t0: Instant) -> Result<()> {
    let uid = unique_id("uid");
    let pod = cri
        .run_pod_sandbox(&format!("counter-{handler}"), "default", &uid, &[], handler)
        .await?;
    let port = free_port();
    let port_arg = port.to_string();
    let spec =
        ContainerSpec::new("counter", COUNTER_IMAGE).args(&["-p", &port_arg, "-f", "/tmp/count"]);
    let id = cri.run_container(&pod, &spec).await?;
    let running = cri
        .wait_container_state(&id, ContainerState::ContainerRunning, WAIT)
        .await?;
    let log_path = PathBuf::from(&running.log_path);
    let ready = format!("listening on 0.0.0.0:{port}");
    cri::wait_for_log(&log_path, WAIT, |m| m.iter().any(|l| l.contains(&ready))).await?;
    step(t0, &format!("[{handler}] counter listening on {port}"));

    // From the host (same network namespace), then from inside with busybox wget.
    ensure!(http_get(port, "/")? == "1\n");
    ensure!(http_get(port, "/healthz")? == "ok\n");
    let url = format!("http://127.0.0.1:{port}/");
    let out = cri.exec_sync(&id, &["wget", "-qO-", &url], WAIT).await?;
    ensure!(out.exit_code == 0 && out.stdout_str() == "2\n", "{out:?}");
    let out = cri.exec_sync(&id, &["cat", "/tmp/count"], WAIT).await?;
    ensure!(out.stdout_str().trim() == "2", "{out:?}");

    // The counter exits 0 at once on SIGTERM.
    cri.stop_container(&id, Duration::from_secs(10)).await?;
    let stopped = cri.container_status(&id).await?;
    ensure!(
        stopped.state == ContainerState::ContainerExited as i32 && stopped.exit_code == 0,
        "{stopped:?}"
    );
    ensure!(stopped.reason == "Completed", "{stopped:?}");
    cri.teardown_pod(&pod.id, Duration::from_secs(10)).await?;
    step(t0, &format!("[{handler}] counter pod torn down"));
    Ok(())
}

/// Whether `pid` is gone (or a zombie waiting for init).
fn process_gone(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// What a running pod holds on the host, for checking it is gone.
struct PodFootprint {
    pids: Vec<i64>,
    shim_sockets: Vec<PathBuf>,
}

/// Runs a pod with a sleeping busybox container and records its processes and shim socket.
async fn abandoned_pod(ctrd: &Containerd, name: &str) -> Result<PodFootprint> {
    ctrd.import(&oci::busybox_image()?, IMPORT_TIMEOUT)?;
    let cri = ctrd.cri().await?;
    let pod = cri
        .run_pod_sandbox(name, "default", &unique_id("uid"), &[], RUNC_HANDLER)
        .await?;
    let spec = ContainerSpec::new("sleeper", BUSYBOX_IMAGE).command(&["sleep", "1000"]);
    let id = cri.run_container(&pod, &spec).await?;
    cri.wait_container_state(&id, ContainerState::ContainerRunning, WAIT)
        .await?;
    let sandbox_info: serde_json::Value =
        serde_json::from_str(&cri.pod_sandbox_status(&pod.id).await?.info["info"])?;
    let container_pid = cri.container_info(&id).await?["pid"].as_i64();
    let mut pids: Vec<i64> = [container_pid, sandbox_info["pid"].as_i64()]
        .into_iter()
        .map(|p| p.context("no pid in verbose info"))
        .collect::<Result<_>>()?;
    let shims = ctrd.shim_pids();
    ensure!(shims.len() == 1, "one shim per pod: {shims:?}");
    pids.extend(shims.iter().map(|p| i64::from(*p)));
    let shim_sockets: Vec<PathBuf> = std::fs::read_dir(
        ctrd.state_dir()
            .join("io.containerd.runtime.v2.task/k8s.io"),
    )?
    .flatten()
    .filter_map(|b| std::fs::read_to_string(b.path().join("address")).ok())
    .map(|a| a.trim().trim_start_matches("unix://").into())
    .collect();
    ensure!(
        !shim_sockets.is_empty() && shim_sockets.iter().all(|s| s.exists()),
        "{shim_sockets:?}"
    );
    ensure!(!ctrd.mounts().is_empty(), "a running pod has mounts");
    Ok(PodFootprint { pids, shim_sockets })
}

/// Two containerds run side by side (as the two-node suite needs), and dropping one with a pod
/// still running (as a failed test does) removes all of that one — containerd, shim and
/// container processes, mounts, shim sockets, temp dir — and nothing of the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containerds_side_by_side_and_drop_cleans_up() {
    if let Some(reason) = cri_skip_reason() {
        skip(&reason);
        return;
    }
    let (a, b) = tokio::join!(
        start_containerd("node-a", &[RUNC_HANDLER]),
        start_containerd("node-b", &[RUNC_HANDLER])
    );
    let (pod_a, pod_b) = tokio::join!(abandoned_pod(&a, "on-a"), abandoned_pod(&b, "on-b"));
    let (pod_a, pod_b) = (pod_a.unwrap(), pod_b.unwrap());
    assert_ne!(pod_a.shim_sockets, pod_b.shim_sockets);
    let dir_a = a.dir().to_owned();

    drop(a);

    assert!(!dir_a.exists(), "{} left behind", dir_a.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mountinfo.contains(dir_a.to_str().unwrap()),
        "mounts left under {}",
        dir_a.display()
    );
    for socket in &pod_a.shim_sockets {
        assert!(!socket.exists(), "shim socket {} left", socket.display());
    }
    for &pid in &pod_a.pids {
        assert!(process_gone(pid), "process {pid} of node-a still running");
    }
    // node-b is untouched: its pod still runs and its CRI still answers.
    for &pid in &pod_b.pids {
        assert!(
            !process_gone(pid),
            "process {pid} of node-b died with node-a"
        );
    }
    assert!(pod_b.shim_sockets.iter().all(|s| s.exists()));
    let cri_b = b.cri().await.unwrap();
    let running = cri_b
        .list_containers(&[(CONTAINER_NAME_LABEL, "sleeper")])
        .await
        .unwrap();
    assert_eq!(running.len(), 1, "{running:?}");
    assert_eq!(running[0].state, ContainerState::ContainerRunning as i32);

    drop(cri_b);
    drop(b);
    for &pid in &pod_b.pids {
        assert!(process_gone(pid), "process {pid} of node-b still running");
    }
}
