//! The real two-node Kubernetes cluster of `scripts/local-up-cluster.sh`, shared by every suite
//! that drives Kubernetes: stock kube-apiserver, scheduler, controller-manager, and a stock
//! kubelet, containerd (with our shim) and kube-proxy on each of node-a and node-b, with the
//! podmigrate agent running as its DaemonSet.
//!
//! [`KubeCluster::shared`] uses the cluster that is up (`scripts/test.sh` brings it up once for
//! all suites), or brings it up itself. Each test works in a namespace of its own
//! ([`KubeCluster::namespace`], deleted when dropped), so tests never see each other's pods;
//! tests that restart a node's components or change the agent take [`KubeCluster::exclusive`].
//!
//! The harness reaches a node's own paths on the host through the directories bound into the
//! node's mount namespace ([`KubeCluster::node_path`]), and a pod at its pod IP (the host routes
//! both pod CIDRs).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{json, Value};

use crate::cli::{CliProcess, CliRun};
use crate::counter::{counter_hit, http_get_addr, wait_counter_ready, Counter};
use crate::harness::unique_id;

pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
/// The image of the test app, built by scripts/images.sh and imported on both nodes.
pub const COUNTER_IMAGE: &str = "localhost/podmigrate/counter:dev";
/// Where the cluster keeps its state (scripts/local-up-cluster.sh's PODMIGRATE_CLUSTER_DIR).
pub const CLUSTER_DIR_ENV: &str = "PODMIGRATE_CLUSTER_DIR";
const DEFAULT_CLUSTER_DIR: &str = "/var/lib/podmigrate/cluster";
/// Which of the script's clusters (0-9; 0 by default); the others live in `<dir>-<index>`.
pub const CLUSTER_INDEX_ENV: &str = "PODMIGRATE_CLUSTER_INDEX";
/// The share as every node mounts it.
pub const SHARE_IN_NODE: &str = "/var/lib/podmigrate/share";
pub const AGENT_NAMESPACE: &str = "podmigrate-system";
pub const AGENT_DAEMONSET: &str = "podmigrate-agent";
/// The names podmigrate writes, as the suites check them.
pub use podmigrate_vocabulary::{CLONE_OF_LABEL, MIGRATABLE, PHASE, REASON, RUNTIME_CLASS};

/// The running cluster.
pub struct KubeCluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// kubectl, kubectl-migrate and the Kubernetes binaries.
    pub bin: PathBuf,
    pub client: kube::Client,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Leaves a cluster that answers alone; brings one up otherwise.
fn ensure_up(dir: &Path) -> std::result::Result<(), String> {
    let answers = Command::new(dir.join("bin/kubectl"))
        .args(["--kubeconfig"])
        .arg(dir.join("admin.kubeconfig"))
        .args(["get", "--raw", "/readyz"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if answers {
        return Ok(());
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/local-up-cluster.sh"))
        .arg("up")
        .env("PODMIGRATE_SKIP_BUILD", "1")
        .env(CLUSTER_DIR_ENV, dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running scripts/local-up-cluster.sh up: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        Err(format!(
            "scripts/local-up-cluster.sh up failed:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ))
    }
}

/// Why the cluster suites cannot run here, if they cannot.
pub fn skip_reason() -> Option<String> {
    if !crate::harness::is_root() {
        return Some("not root (the cluster runs kubelets, containerd, runc and CRIU)".into());
    }
    None
}

impl KubeCluster {
    /// The cluster that is up, or (once per process, if none answers) a fresh one from
    /// `scripts/local-up-cluster.sh up` with the binaries already built.
    pub async fn shared() -> Result<KubeCluster> {
        static UP: OnceLock<std::result::Result<(), String>> = OnceLock::new();
        let dir = std::env::var_os(CLUSTER_DIR_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| match std::env::var(CLUSTER_INDEX_ENV) {
                Ok(i) if !i.is_empty() && i != "0" => {
                    PathBuf::from(format!("{DEFAULT_CLUSTER_DIR}-{i}"))
                }
                _ => PathBuf::from(DEFAULT_CLUSTER_DIR),
            });
        let kubeconfig = dir.join("admin.kubeconfig");
        let bin = dir.join("bin");
        let dir_for_up = dir.clone();
        tokio::task::spawn_blocking(move || UP.get_or_init(|| ensure_up(&dir_for_up)).clone())
            .await?
            .map_err(anyhow::Error::msg)?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig)?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let client = kube::Client::try_from(config)?;
        Ok(KubeCluster {
            dir,
            kubeconfig,
            bin,
            client,
        })
    }

    /// For a test: the shared cluster, or `None` after reporting why this machine cannot run it
    /// ([`skip_reason`], then `extra_skip`); fails the test if the cluster cannot be had.
    pub async fn for_test(extra_skip: Option<String>) -> Option<KubeCluster> {
        if let Some(reason) = skip_reason().or(extra_skip) {
            crate::harness::skip(&reason);
            return None;
        }
        Some(
            KubeCluster::shared()
                .await
                .unwrap_or_else(|e| panic!("the cluster: {e:#}")),
        )
    }

    /// One test at a time for the tests that restart a node's components or reconfigure the
    /// agent; the others may run beside each other in their own namespaces.
    pub async fn exclusive() -> tokio::sync::RwLockWriteGuard<'static, ()> {
        CLUSTER_LOCK.write().await
    }

    /// A shared turn: runs beside other shared turns, never beside an exclusive one.
    pub async fn shared_turn() -> tokio::sync::RwLockReadGuard<'static, ()> {
        CLUSTER_LOCK.read().await
    }

    /// `kubectl` (ours, v1.37), with this cluster's kubeconfig and our binaries first on PATH
    /// (so `kubectl migrate` finds `kubectl-migrate`).
    pub fn kubectl_command(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", self.path_env());
        cmd
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// Runs `kubectl ARGS`; fails with its stderr unless it succeeds.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args)?;
        ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `kubectl ARGS` and returns what it did, whatever that was.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<Output> {
        self.kubectl_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running kubectl {}", args.join(" ")))
    }

    /// Runs `scripts/local-up-cluster.sh ARGS` (e.g. `kubelet node-b stop`).
    pub fn local_up(&self, args: &[&str]) -> Result<()> {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/local-up-cluster.sh"))
            .args(args)
            .env(CLUSTER_DIR_ENV, &self.dir)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "scripts/local-up-cluster.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// A node's own path `path` (e.g. `/var/lib/podmigrate/work`) as the host sees it.
    pub fn node_path(&self, node: &str, path: &str) -> PathBuf {
        self.dir
            .join("nodes")
            .join(node)
            .join("root")
            .join(path.trim_start_matches('/'))
    }

    /// The share, as the host sees it.
    pub fn share(&self) -> PathBuf {
        self.dir.join("share")
    }

    /// Where the archive of `namespace/pod`'s `container` is committed on the share, as the
    /// host sees it.
    pub fn archive(&self, namespace: &str, pod: &str, container: &str) -> PathBuf {
        podmigrate_checkpoint::share::archive_path(&self.share(), namespace, pod, container)
            .expect("valid names")
    }

    /// How the cluster's share reaches the nodes: `directory` or `smb` (PODMIGRATE_SHARE).
    pub fn share_kind(&self) -> String {
        std::fs::read_to_string(self.dir.join("share-kind"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }

    /// The filesystem type mounted at `path` as node `node` sees it (`findmnt` in its mount
    /// namespace).
    pub fn node_fstype(&self, node: &str, path: &str) -> Result<String> {
        let ns = self.dir.join("ns").join(format!("{node}.mnt"));
        let out = Command::new("nsenter")
            .arg(format!("--mount={}", ns.display()))
            .args(["--", "findmnt", "-n", "-o", "FSTYPE", path])
            .output()?;
        ensure!(
            out.status.success(),
            "findmnt {path} on {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// A node's containerd socket, as the host reaches it.
    pub fn containerd_socket(&self, node: &str) -> PathBuf {
        self.node_path(node, "/run/containerd/containerd.sock")
    }

    /// A fresh namespace for one test (deleted when the guard drops).
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let name = unique_id(prefix)
            .to_ascii_lowercase()
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-");
        let name: String = name.chars().take(50).collect();
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": name, "labels": { "podmigrate.io/test": "true" } }
        }))?;
        api.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        // The API server makes the namespace's default ServiceAccount shortly after.
        Ok(TestNamespace {
            name: name.clone(),
            pods: Api::namespaced(self.client.clone(), &name),
            client: self.client.clone(),
            kubeconfig: self.kubeconfig.clone(),
            kubectl: self.bin.join("kubectl"),
            path: self.path_env(),
        })
    }

    /// The agent pod on `node`.
    pub async fn agent_pod(&self, node: &str) -> Result<Pod> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), AGENT_NAMESPACE);
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await?;
        list.items
            .into_iter()
            .find(|p| {
                p.metadata.labels.as_ref().is_some_and(|l| {
                    l.get("app.kubernetes.io/component").map(String::as_str) == Some("agent")
                }) && p.metadata.deletion_timestamp.is_none()
            })
            .with_context(|| format!("no podmigrate agent pod on {node}"))
    }

    /// The agent's log on `node` (its current container's, at most `lines` lines).
    pub fn agent_log(&self, node: &str, lines: usize) -> String {
        let field = format!("--field-selector=spec.nodeName={node}");
        let log = self
            .kubectl(&[
                "-n",
                AGENT_NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=agent",
                &field,
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ])
            .and_then(|pod| {
                let tail = format!("--tail={lines}");
                self.kubectl(&[
                    "-n",
                    AGENT_NAMESPACE,
                    "logs",
                    pod.trim(),
                    "-c",
                    "agent",
                    &tail,
                ])
            });
        log.unwrap_or_else(|e| format!("(no agent log: {e:#})"))
    }

    /// What a failed test wants to see: nodes, agent pods, and each agent's last log lines.
    pub fn diagnostics(&self, lines: usize) -> String {
        let mut out = String::new();
        for args in [
            vec!["get", "nodes", "-o", "wide"],
            vec!["get", "pods", "-A", "-o", "wide"],
        ] {
            out.push_str(&self.kubectl(&args).unwrap_or_else(|e| format!("{e:#}\n")));
        }
        for node in [NODE_A, NODE_B] {
            out.push_str(&format!(
                "--- agent on {node}\n{}\n",
                self.agent_log(node, lines)
            ));
        }
        out
    }

    /// Waits until the agent DaemonSet has a ready pod on every node.
    pub fn wait_agents_ready(&self, timeout: Duration) -> Result<()> {
        self.kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "rollout",
            "status",
            &format!("daemonset/{AGENT_DAEMONSET}"),
            &format!("--timeout={}s", timeout.as_secs()),
        ])
        .map(drop)
    }

    /// Sets the agents' extra arguments (after `agent --log-format json`) and waits for the
    /// DaemonSet to roll out; `&[]` restores the shipped ones.
    pub fn set_agent_args(&self, extra: &[&str]) -> Result<()> {
        let mut args = vec!["agent", "--log-format", "json"];
        args.extend_from_slice(extra);
        let patch = json!([{
            "op": "replace",
            "path": "/spec/template/spec/containers/0/args",
            "value": args,
        }]);
        self.kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "patch",
            "daemonset",
            AGENT_DAEMONSET,
            "--type",
            "json",
            "-p",
            &patch.to_string(),
        ])?;
        self.wait_agents_ready(Duration::from_secs(120))
    }
}

static CLUSTER_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What the fault suites do to a node: run commands in its mount namespace (where its own mounts
/// live: host mounts never propagate into a node), mount small filesystems over its paths, stop
/// and kill its agent, read its containerd's log (which carries the shims').
impl KubeCluster {
    /// The node's persistent mount namespace (scripts/local-up-cluster.sh's `$STATE/ns`).
    pub fn mount_namespace(&self, node: &str) -> PathBuf {
        self.dir.join("ns").join(format!("{node}.mnt"))
    }

    /// `program` run inside `node`'s mount namespace, where the node's paths are its own.
    pub fn node_command(&self, node: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.mount_namespace(node).display()))
            .args(["--", program])
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` in `node`'s mount namespace; fails with its stderr unless it succeeds.
    pub fn on_node(&self, node: &str, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("no command")?;
        let out = self
            .node_command(node, program)
            .args(rest)
            .output()
            .with_context(|| format!("running {} on {node}", args.join(" ")))?;
        ensure!(
            out.status.success(),
            "{} on {node}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The regular files under `dir` as `node` sees it (its own mounts included), absolute; none
    /// if `dir` does not exist.
    pub fn node_files(&self, node: &str, dir: &str) -> Vec<PathBuf> {
        let script = "[ ! -d \"$1\" ] || find \"$1\" -type f";
        self.on_node(node, &["sh", "-c", script, "sh", dir])
            .map(|out| out.lines().map(PathBuf::from).collect())
            .unwrap_or_default()
    }

    /// A `size_mib` tmpfs mounted over `path` in `node`'s mount namespace, until dropped.
    pub fn mount_tmpfs(&self, node: &str, path: &str, size_mib: u64) -> Result<NodeMount> {
        self.on_node(
            node,
            &[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0700"),
                "podmigrate-fault",
                path,
            ],
        )?;
        Ok(NodeMount {
            cluster_dir: self.dir.clone(),
            path: path.to_owned(),
            nodes: vec![node.to_owned()],
            device: None,
            image: None,
        })
    }

    /// A fresh `size_mib` ext4 (a loop device, `errors=remount-ro`) mounted over `path` in each
    /// of `nodes`' mount namespaces: one filesystem, so every node sees the same files (over
    /// the share, node-b sees what node-a writes). Until dropped.
    pub fn mount_ext4(&self, nodes: &[&str], path: &str, size_mib: u64) -> Result<NodeMount> {
        let dir = self.dir.join("faults");
        std::fs::create_dir_all(&dir)?;
        let image = dir.join(format!("{}.img", unique_id("ext4")));
        let file = std::fs::File::create(&image)
            .with_context(|| format!("creating {}", image.display()))?;
        file.set_len(size_mib << 20)?;
        drop(file);
        let mut mount = NodeMount {
            cluster_dir: self.dir.clone(),
            path: path.to_owned(),
            nodes: Vec::new(),
            device: None,
            image: Some(image.clone()),
        };
        let device = host_run(
            Command::new("losetup")
                .args(["--find", "--show"])
                .arg(&image),
        )?;
        let device = device.trim().to_owned();
        mount.device = Some(device.clone());
        host_run(Command::new("mkfs.ext4").args(["-q", "-F", "-m", "0", &device]))?;
        for node in nodes {
            self.on_node(node, &["mount", "-o", "errors=remount-ro", &device, path])?;
            mount.nodes.push((*node).to_owned());
        }
        // lost+found would look like a leftover to a test listing the share.
        self.on_node(nodes[0], &["rmdir", &format!("{path}/lost+found")])?;
        Ok(mount)
    }

    /// The log of `node`'s containerd, which carries its shims' lines.
    pub fn containerd_log(&self, node: &str) -> String {
        let path = self.dir.join("logs").join(format!("{node}-containerd.log"));
        String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
    }

    /// Checkpoint attempts node-a's shim made for `namespace/pod`, committed or failed.
    pub fn checkpoint_attempts(&self, namespace: &str, pod: &str) -> usize {
        let needle = format!("pod {namespace}/{pod} ");
        self.containerd_log(NODE_A)
            .lines()
            .filter(|l| l.contains(&needle))
            .filter(|l| {
                l.contains("dumped and packed")
                    || l.contains("checkpoint failed; the container keeps")
            })
            .count()
    }

    /// `ctr ARGS` against `node`'s containerd, in Kubernetes' namespace.
    pub fn ctr(&self, node: &str, args: &[&str]) -> Result<String> {
        host_run(
            Command::new("ctr")
                .arg("--address")
                .arg(self.containerd_socket(node))
                .args(["-n", "k8s.io"])
                .args(args),
        )
    }

    /// The ids of `node`'s containerd containers (sandboxes included) of pod `namespace/pod`.
    pub fn containers_of(&self, node: &str, namespace: &str, pod: &str) -> Result<Vec<String>> {
        let filter = format!(
            "labels.\"io.kubernetes.pod.namespace\"=={namespace},labels.\"io.kubernetes.pod.name\"=={pod}"
        );
        Ok(self
            .ctr(node, &["containers", "ls", "-q", &filter])?
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect())
    }

    /// The containerd id of the agent's container on `node`, and its process (a host pid: the
    /// nodes share the host's pid namespace).
    pub async fn agent_process(&self, node: &str) -> Result<(String, i32)> {
        let pod = self.agent_pod(node).await?;
        let id = pod
            .status
            .and_then(|s| s.container_statuses)
            .and_then(|cs| cs.into_iter().find(|c| c.name == "agent"))
            .and_then(|c| c.container_id)
            .and_then(|id| id.strip_prefix("containerd://").map(str::to_owned))
            .with_context(|| format!("the agent on {node} has no container yet"))?;
        let tasks = self.ctr(node, &["tasks", "ls"])?;
        let pid = tasks
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(id.as_str())).then(|| words.next()?.parse().ok())?
            })
            .with_context(|| format!("no task {id} on {node}: {tasks}"))?;
        Ok((id, pid))
    }

    /// Sends `signal` to the agent's process on `node` (SIGSTOP: it stays, doing nothing;
    /// SIGKILL: it dies at once, as in a crash, and kubelet starts it again); returns its
    /// container's id.
    pub async fn signal_agent(&self, node: &str, signal: i32) -> Result<String> {
        let (id, pid) = self.agent_process(node).await?;
        // SAFETY: kill(2) on the agent process of our own test cluster.
        let rc = unsafe { libc::kill(pid, signal) };
        ensure!(
            rc == 0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
        Ok(id)
    }

    /// Waits until `node` runs a ready agent in a container other than `old` (kubelet restarts
    /// a killed one; a pod in restart back-off is deleted, so the DaemonSet makes a fresh one).
    pub async fn wait_agent_back(&self, node: &str, old: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        let mut deleted = false;
        loop {
            if let Ok(pod) = self.agent_pod(node).await {
                let status = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref());
                let back = status.is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.ready
                            && c.container_id
                                .as_deref()
                                .is_some_and(|id| !id.ends_with(old))
                    })
                });
                if back {
                    return Ok(());
                }
                if !deleted && started.elapsed() > Duration::from_secs(5) {
                    let pods: Api<Pod> = Api::namespaced(self.client.clone(), AGENT_NAMESPACE);
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    pods.delete(&name, &DeleteParams::default().grace_period(0))
                        .await
                        .with_context(|| format!("deleting agent pod {name}"))?;
                    deleted = true;
                }
            }
            ensure!(
                started.elapsed() < timeout,
                "no agent back on {node} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `node`'s own filesystem tree, mounts included, as the host reaches it at once (through
    /// its containerd's `/proc/<pid>/root`): for polling a node path every millisecond.
    pub fn node_root(&self, node: &str) -> Result<PathBuf> {
        let pidfile = self.dir.join("pids").join(format!("{node}-containerd.pid"));
        let pid = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?;
        Ok(PathBuf::from(format!("/proc/{}/root", pid.trim())))
    }

    /// Processes named `comm` running in `node`'s mount namespace (the nodes share the host's
    /// pid namespace): (pid, command line).
    pub fn processes_on(&self, node: &str, comm: &str) -> Vec<(i32, String)> {
        use std::os::unix::fs::MetadataExt;
        let Ok(ns) = std::fs::metadata(self.mount_namespace(node)) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .filter(|pid| {
                std::fs::metadata(format!("/proc/{pid}/ns/mnt"))
                    .is_ok_and(|m| m.ino() == ns.ino() && m.dev() == ns.dev())
            })
            .map(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                (pid, cmdline)
            })
            .collect()
    }

    /// Waits (up to 15 s: a post-copy clone's copy goes once its last page arrived) until
    /// nothing of `namespace` is left behind (see [`Self::leftovers`]); fails listing what is.
    pub async fn assert_no_leftovers(&self, namespace: &str, uids: &[&str]) {
        let started = Instant::now();
        loop {
            let left = self.leftovers(namespace, uids);
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

    /// What a migration of `namespace`'s pods left behind on both nodes: files in the work
    /// space on disk and in memory (checkpoint images, restore copies; under `checkpoints/<uid>`
    /// for the disk checkpoints of the pods `uids`) and on the share. The restore markers of
    /// restored containers (`restored/`) are kept on purpose.
    pub fn leftovers(&self, namespace: &str, uids: &[&str]) -> Vec<PathBuf> {
        let mut dirs: Vec<String> = Vec::new();
        for space in [WORK_IN_NODE, MEMORY_IN_NODE] {
            dirs.push(format!("{space}/checkpoints/{namespace}"));
            dirs.push(format!("{space}/restore/{namespace}"));
            dirs.extend(uids.iter().map(|u| format!("{space}/checkpoints/{u}")));
        }
        let mut out = Vec::new();
        for node in [NODE_A, NODE_B] {
            for dir in &dirs {
                out.extend(
                    self.node_files(node, dir)
                        .into_iter()
                        .map(|f| Path::new(node).join(f.strip_prefix("/").unwrap_or(&f))),
                );
            }
            out.extend(
                self.node_files(node, &format!("{SHARE_IN_NODE}/{namespace}"))
                    .into_iter()
                    .map(|f| Path::new(node).join(f.strip_prefix("/").unwrap_or(&f))),
            );
        }
        out.sort();
        out.dedup();
        out
    }
}

/// A node's disk work space, and its memory-backed one.
pub const WORK_IN_NODE: &str = "/var/lib/podmigrate/work";
pub const MEMORY_IN_NODE: &str = "/dev/shm/podmigrate";

fn host_run(cmd: &mut Command) -> Result<String> {
    let text = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {text}"))?;
    ensure!(
        out.status.success(),
        "{text}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A filesystem mounted over a node path inside node mount namespaces
/// ([`KubeCluster::mount_tmpfs`], [`KubeCluster::mount_ext4`]); unmounted (lazily) in each of
/// them, and its loop device and image removed, when dropped, also when a test fails.
pub struct NodeMount {
    cluster_dir: PathBuf,
    pub path: String,
    nodes: Vec<String>,
    /// `/dev/loopN` of an ext4 one.
    pub device: Option<String>,
    image: Option<PathBuf>,
}

impl NodeMount {
    fn umount(&self, node: &str) -> Result<String> {
        host_run(
            Command::new("nsenter")
                .arg(format!(
                    "--mount={}",
                    self.cluster_dir
                        .join("ns")
                        .join(format!("{node}.mnt"))
                        .display()
                ))
                .args(["--", "umount", "-l", &self.path]),
        )
    }

    /// What a disk error does to an ext4 mounted `errors=remount-ro`: from now on every write,
    /// even through files already open, fails with EROFS, on every node.
    pub fn fail_read_only(&self) -> Result<()> {
        let device = self
            .device
            .as_deref()
            .context("not an ext4 on a loop device")?;
        let name = device.rsplit('/').next().unwrap_or(device);
        let switch = Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error");
        std::fs::write(&switch, "podmigrate fault test")
            .with_context(|| format!("writing {}", switch.display()))
    }

    /// Whether the filesystem is read-only now on `node` (`ro`, or ext4's `emergency_ro` after
    /// an error).
    pub fn is_read_only(&self, node: &str) -> bool {
        host_run(
            Command::new("nsenter")
                .arg(format!(
                    "--mount={}",
                    self.cluster_dir
                        .join("ns")
                        .join(format!("{node}.mnt"))
                        .display()
                ))
                .args([
                    "--",
                    "findmnt",
                    "-n",
                    "-o",
                    "OPTIONS",
                    "--mountpoint",
                    &self.path,
                ]),
        )
        .is_ok_and(|o| {
            o.lines()
                .last()
                .is_some_and(|l| l.split(',').any(|opt| opt == "ro" || opt == "emergency_ro"))
        })
    }

    /// `umount -l` on `node` only: there, the path shows what it covered from now on; files
    /// already open keep writing to the detached filesystem.
    pub fn detach(&mut self, node: &str) -> Result<()> {
        if let Some(i) = self.nodes.iter().position(|n| n == node) {
            self.umount(node)?;
            self.nodes.remove(i);
        }
        Ok(())
    }
}

impl Drop for NodeMount {
    fn drop(&mut self) {
        for node in std::mem::take(&mut self.nodes) {
            if let Err(e) = self.umount(&node) {
                eprintln!("unmounting {} on {node}: {e:#}", self.path);
            }
        }
        if let Some(device) = &self.device {
            // Lazily unmounted filesystems release the device once their last file closes.
            let _ = Command::new("losetup")
                .args(["-d", device])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if let Some(image) = &self.image {
            let _ = std::fs::remove_file(image);
        }
    }
}

/// One test's namespace; deleted (without waiting) when dropped.
pub struct TestNamespace {
    pub name: String,
    pub pods: Api<Pod>,
    pub client: kube::Client,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    path: String,
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if std::env::var_os(crate::harness::KEEP_ENV).is_some() {
            eprintln!(
                "keeping namespace {} ({})",
                self.name,
                crate::harness::KEEP_ENV
            );
            return;
        }
        let _ = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["delete", "namespace", &self.name, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl TestNamespace {
    /// Labels the namespace itself `podmigrate.io/migratable=true` (its pods opt in).
    pub async fn opt_in(&self) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let patch = json!({ "metadata": { "labels": { MIGRATABLE: "true" } } });
        api.patch(
            &self.name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?;
        Ok(())
    }

    pub async fn create_pod(&self, pod: &Pod) -> Result<Pod> {
        self.pods
            .create(&PostParams::default(), pod)
            .await
            .with_context(|| {
                format!(
                    "creating pod {}/{}",
                    self.name,
                    pod.metadata.name.as_deref().unwrap_or("?")
                )
            })
    }

    pub async fn get_pod(&self, name: &str) -> Option<Pod> {
        self.pods.get_opt(name).await.ok().flatten()
    }

    pub async fn annotation(&self, pod: &str, key: &str) -> Option<String> {
        self.get_pod(pod)
            .await?
            .metadata
            .annotations?
            .get(key)
            .cloned()
    }

    /// Waits until every container of `name` is running and ready; returns the pod.
    pub async fn wait_running(&self, name: &str, timeout: Duration) -> Result<Pod> {
        let started = Instant::now();
        loop {
            let pod = self.get_pod(name).await;
            if let Some(pod) = pod.as_ref().filter(|p| is_ready(p)) {
                return Ok(pod.clone());
            }
            if started.elapsed() >= timeout {
                bail!(
                    "pod {}/{name} not running and ready after {timeout:?}: {}",
                    self.name,
                    pod.map(|p| serde_json::to_string(&p.status).unwrap_or_default())
                        .unwrap_or_else(|| "gone".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until pod `name` no longer exists.
    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        let started = Instant::now();
        while self.pods.get_opt(name).await?.is_some() {
            ensure!(
                started.elapsed() < timeout,
                "pod {}/{name} still exists after {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// The pod's IP, once it has one.
    pub async fn pod_ip(&self, name: &str) -> Result<Ipv4Addr> {
        let pod = self
            .get_pod(name)
            .await
            .with_context(|| format!("pod {}/{name} does not exist", self.name))?;
        let ip = pod
            .status
            .and_then(|s| s.pod_ip)
            .with_context(|| format!("pod {}/{name} has no IP", self.name))?;
        ip.parse()
            .with_context(|| format!("pod {}/{name} has IP {ip:?}", self.name))
    }

    /// Whether `ip` lies in the pod CIDR of node `node`.
    pub async fn in_pod_cidr_of(&self, node: &str, ip: Ipv4Addr) -> Result<bool> {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        let cidr = nodes
            .get(node)
            .await?
            .spec
            .and_then(|s| s.pod_cidr)
            .with_context(|| format!("node {node} has no pod CIDR"))?;
        let (net, bits) = cidr
            .split_once('/')
            .with_context(|| format!("pod CIDR {cidr:?}"))?;
        let net: Ipv4Addr = net.parse()?;
        let bits: u32 = bits.parse()?;
        let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        Ok(u32::from(ip) & mask == u32::from(net) & mask)
    }

    pub async fn node_of(&self, name: &str) -> Option<String> {
        self.get_pod(name).await?.spec?.node_name
    }

    /// The pods labelled as clones of `source`.
    pub async fn clones_of(&self, source: &str) -> Result<Vec<Pod>> {
        Ok(self
            .pods
            .list(&ListParams::default().labels(&format!("{CLONE_OF_LABEL}={source}")))
            .await?
            .items)
    }

    /// The first clone of `source` once it exists: (name, uid).
    pub async fn wait_clone(&self, source: &str, timeout: Duration) -> Result<(String, String)> {
        let started = Instant::now();
        loop {
            if let Some(c) = self.clones_of(source).await?.first() {
                return Ok((
                    c.metadata.name.clone().unwrap_or_default(),
                    c.metadata.uid.clone().unwrap_or_default(),
                ));
            }
            ensure!(
                started.elapsed() < timeout,
                "no clone of {}/{source} within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until pod `pod`'s phase annotation is one of `phases`; returns it.
    pub async fn wait_phase(
        &self,
        pod: &str,
        phases: &[&str],
        timeout: Duration,
    ) -> Result<String> {
        let started = Instant::now();
        loop {
            let phase = self.annotation(pod, PHASE).await;
            if let Some(p) = phase.as_deref().filter(|p| phases.contains(p)) {
                return Ok(p.to_owned());
            }
            ensure!(
                started.elapsed() < timeout,
                "{}/{pod} did not reach {phases:?} within {timeout:?}: phase {phase:?}, reason {:?}",
                self.name,
                self.annotation(pod, REASON).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The uid of pod `name`.
    pub async fn uid_of(&self, name: &str) -> Option<String> {
        self.get_pod(name).await?.metadata.uid
    }

    /// The notes of the Events about pod `pod` with reason `reason` (any reason: `None`).
    pub async fn events(&self, pod: &str, reason: Option<&str>) -> Result<Vec<Event>> {
        let api: Api<Event> = Api::namespaced(self.client.clone(), &self.name);
        let list = api
            .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
            .await?;
        Ok(list
            .items
            .into_iter()
            .filter(|e| reason.is_none() || e.reason.as_deref() == reason)
            .collect())
    }

    /// Waits until at least one Event with `reason` is about pod `pod` (of uid `uid` when given:
    /// a StatefulSet's pods share their name); the notes of all of them.
    pub async fn wait_events(
        &self,
        pod: &str,
        uid: Option<&str>,
        reason: &str,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        let started = Instant::now();
        loop {
            let events = self.events(pod, None).await?;
            let notes: Vec<String> = events
                .iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .filter(|e| uid.is_none() || e.involved_object.uid.as_deref() == uid)
                .map(|e| e.message.clone().unwrap_or_default())
                .collect();
            if !notes.is_empty() {
                return Ok(notes);
            }
            if started.elapsed() >= timeout {
                let seen: Vec<_> = events
                    .iter()
                    .map(|e| (&e.reason, &e.involved_object.uid, &e.message))
                    .collect();
                bail!(
                    "no {reason} Event about pod {}/{pod} (uid {uid:?}) within {timeout:?}: {seen:?}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `kubectl apply` of `object` (any kind's JSON) in this namespace.
    pub fn apply(&self, object: &Value) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["apply", "-n", &self.name, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl apply")?;
        let written = child
            .stdin
            .take()
            .context("kubectl apply's stdin")?
            .write_all(object.to_string().as_bytes());
        let out = child.wait_with_output()?;
        written.context("writing to kubectl apply")?;
        ensure!(
            out.status.success(),
            "kubectl apply -n {} of {} {}: {}",
            self.name,
            object["kind"],
            object["metadata"]["name"],
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    pub async fn delete_pod(&self, name: &str) -> Result<()> {
        self.pods.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Creates a counter pod on `node` and waits until it runs and every counter answers at
    /// the pod's IP; returns that IP.
    pub async fn start_counters(
        &self,
        name: &str,
        node: &str,
        counters: &[Counter],
        timeout: Duration,
    ) -> Result<Ipv4Addr> {
        self.create_pod(&counter_pod(name, node, counters)).await?;
        self.wait_running(name, timeout).await?;
        let ip = self.pod_ip(name).await?;
        for c in counters {
            wait_counter_ready(ip, c.port, timeout).await?;
        }
        Ok(ip)
    }

    /// `GET /` on the counter at `port` of pod `name`: its next count.
    pub async fn hit(&self, name: &str, port: u16) -> Result<u64> {
        counter_hit(self.pod_ip(name).await?, port).await
    }

    /// `GET /checksum` on the counter at `port` of pod `name`: its ballast's hash.
    pub async fn checksum(&self, name: &str, port: u16) -> Result<String> {
        self.get(name, port, "/checksum").await
    }

    /// `GET <path>` on the counter at `port` of pod `name`: its answer, trimmed.
    pub async fn get(&self, name: &str, port: u16, path: &str) -> Result<String> {
        let ip = self.pod_ip(name).await?;
        Ok(http_get_addr((ip, port).into(), path)
            .await?
            .trim()
            .to_string())
    }

    /// `kubectl exec` in this namespace: what the command printed.
    pub fn exec(&self, pod: &str, container: &str, command: &[&str]) -> Result<String> {
        let out = Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .args(["-n", &self.name, "exec", pod, "-c", container, "--"])
            .args(command)
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "kubectl exec {pod} -c {container} -- {}: {}",
            command.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl migrate ARGS -n <this namespace>`, started.
    pub fn spawn_kubectl_migrate(&self, args: &[&str]) -> Result<CliProcess> {
        let child = tokio::process::Command::new(&self.kubectl)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("PATH", &self.path)
            .arg("migrate")
            .args(args)
            .args(["-n", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting kubectl migrate")?;
        Ok(CliProcess {
            child,
            started: Instant::now(),
        })
    }

    /// `kubectl migrate ARGS -n <this namespace>`, to its end (bounded).
    pub async fn kubectl_migrate(&self, args: &[&str], timeout: Duration) -> Result<CliRun> {
        self.spawn_kubectl_migrate(args)?.finish(timeout).await
    }
}

/// A migratable pod of counters (pod network, `migrate` RuntimeClass), scheduled onto `node`
/// through its hostname label, as the tutorial's manifest.
/// Whether every container of `pod` is ready and the pod has its IP.
pub fn is_ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    status.and_then(|s| s.pod_ip.as_ref()).is_some()
        && status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready))
}

pub fn counter_pod(name: &str, node: &str, counters: &[Counter]) -> Pod {
    let containers: Vec<Value> = counters
        .iter()
        .map(|c| {
            let args = c.args();
            json!({
                "name": c.name,
                "image": COUNTER_IMAGE,
                "args": args,
                "ports": [{ "containerPort": c.port }],
                "readinessProbe": {
                    "httpGet": { "path": "/healthz", "port": c.port },
                    "periodSeconds": 1,
                },
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": { "app": name, MIGRATABLE: "true" },
        },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": node },
            "runtimeClassName": RUNTIME_CLASS,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 2,
            "containers": containers,
        }
    }))
    .expect("a valid Pod")
}

/// The grace period of [`roaming_counter_pod`]s: a departing pod's checkpoint must fit in it
/// (Kubernetes' default).
pub const DEPARTURE_GRACE_SECONDS: i64 = 30;

/// A pod of counters any node may run, to be a controller's template: [`counter_pod`]'s without
/// its node pinning, with a grace period a departure's checkpoint fits in
/// ([`DEPARTURE_GRACE_SECONDS`]); opted in (`migratable`) or not, the `migrate` RuntimeClass
/// either way. Its JSON, to be shaped further.
pub fn roaming_counter_pod(name: &str, counters: &[Counter], migratable: bool) -> Value {
    let mut pod = serde_json::to_value(counter_pod(name, NODE_A, counters)).expect("a pod");
    let spec = pod["spec"].as_object_mut().expect("a pod spec");
    spec.remove("nodeSelector");
    spec.insert(
        "terminationGracePeriodSeconds".into(),
        json!(DEPARTURE_GRACE_SECONDS),
    );
    if !migratable {
        pod["metadata"]["labels"]
            .as_object_mut()
            .expect("labels")
            .remove(MIGRATABLE);
    }
    pod
}

/// The pod template of `pod` (a Pod's JSON): its labels and spec.
fn template_of(pod: &Value) -> Value {
    json!({
        "metadata": {"labels": pod["metadata"]["labels"]},
        "spec": pod["spec"],
    })
}

/// An `apps/v1` `Deployment` or `StatefulSet` named `name` of one pod shaped as `pod` (a Pod's
/// JSON, e.g. [`counter_pod`]'s or [`roaming_counter_pod`]'s), selecting its pods by their
/// `app` label. A StatefulSet's `serviceName` is `name` (no such Service is needed).
pub fn counter_controller(kind: &str, name: &str, pod: &Value) -> Value {
    assert!(
        matches!(kind, "Deployment" | "StatefulSet"),
        "not an apps/v1 controller of one pod: {kind}"
    );
    let mut spec = json!({
        "replicas": 1,
        "selector": {"matchLabels": {"app": pod["metadata"]["labels"]["app"]}},
        "template": template_of(pod),
    });
    if kind == "StatefulSet" {
        spec["serviceName"] = json!(name);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// An Indexed `batch/v1` Job named `name` of `completions` pods shaped as `pod`, all run at once,
/// each done when its container exits 0 (a counter's `GET /exit`): `restartPolicy: Never`, and
/// a `backoffLimit` that evictions (a Job counts an evicted pod as failed) do not reach.
pub fn indexed_counter_job(name: &str, pod: &Value, completions: i32) -> Value {
    let mut template = template_of(pod);
    template["spec"]["restartPolicy"] = json!("Never");
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "backoffLimit": 4 * completions + 4,
            "template": template,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_pods_are_migratable_and_placed_by_hostname() {
        let pod = counter_pod(
            "c",
            NODE_A,
            &[Counter::new("counter", 8080, "/tmp/count").ballast(64)],
        );
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.node_selector.unwrap()["kubernetes.io/hostname"],
            NODE_A
        );
        assert_eq!(spec.runtime_class_name.as_deref(), Some("migrate"));
        assert_eq!(
            spec.containers[0].args.as_deref().unwrap(),
            ["-p", "8080", "-f", "/tmp/count", "-m", "64"]
        );
        assert_eq!(pod.metadata.labels.unwrap()[MIGRATABLE], "true");
    }

    #[test]
    fn roaming_pods_run_anywhere_opted_in_or_not() {
        let counters = [Counter::new("counter", 8080, "/tmp/count")];
        let pod: Pod = serde_json::from_value(roaming_counter_pod("r", &counters, true)).unwrap();
        let spec = pod.spec.unwrap();
        assert!(spec.node_selector.is_none());
        assert_eq!(
            spec.termination_grace_period_seconds,
            Some(DEPARTURE_GRACE_SECONDS)
        );
        assert_eq!(pod.metadata.labels.unwrap()[MIGRATABLE], "true");
        let plain: Pod =
            serde_json::from_value(roaming_counter_pod("p", &counters, false)).unwrap();
        let labels = plain.metadata.labels.unwrap();
        assert!(!labels.contains_key(MIGRATABLE) && labels["app"] == "p");
        assert_eq!(
            plain.spec.unwrap().runtime_class_name.as_deref(),
            Some(RUNTIME_CLASS)
        );
    }

    #[test]
    fn controllers_of_counter_pods_are_valid_objects() {
        use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
        use k8s_openapi::api::batch::v1::Job;
        let pod = roaming_counter_pod("w", &[Counter::new("counter", 8080, "/tmp/count")], true);
        let set: StatefulSet =
            serde_json::from_value(counter_controller("StatefulSet", "w", &pod)).unwrap();
        let spec = set.spec;
        assert_eq!(spec.service_name.as_deref(), Some("w"));
        assert_eq!(spec.selector.match_labels.unwrap()["app"], "w");
        let template = spec.template.metadata.unwrap().labels.unwrap();
        assert_eq!(template[MIGRATABLE], "true");
        let deployment: Deployment =
            serde_json::from_value(counter_controller("Deployment", "w", &pod)).unwrap();
        assert_eq!(deployment.spec.replicas, Some(1));
        let job: Job = serde_json::from_value(indexed_counter_job("w", &pod, 2)).unwrap();
        let spec = job.spec.unwrap();
        assert_eq!(spec.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((spec.completions, spec.parallelism), (Some(2), Some(2)));
        assert!(spec.backoff_limit.unwrap() > 2);
        let pod_spec = spec.template.spec.unwrap();
        assert_eq!(pod_spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod_spec.runtime_class_name.as_deref(), Some(RUNTIME_CLASS));
    }
}
