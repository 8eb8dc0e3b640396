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
use crate::counter::{counter_hit, wait_counter_ready, Counter};
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
pub use podmigrate_kubelet_plugin::agent::vocabulary::{
    CLONE_OF_LABEL, MIGRATABLE, PHASE, REASON, RUNTIME_CLASS,
};

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
        let selector = "app.kubernetes.io/component=agent".to_string();
        let field = format!("--field-selector=spec.nodeName={node}");
        let tail = format!("--tail={lines}");
        self.kubectl(&[
            "-n",
            AGENT_NAMESPACE,
            "logs",
            "-l",
            &selector,
            &field,
            &tail,
        ])
        .unwrap_or_else(|e| format!("(no agent log: {e:#})"))
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
            if let Some(pod) = &pod {
                let status = pod.status.as_ref();
                let ready = status
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready));
                let has_ip = status.and_then(|s| s.pod_ip.as_ref()).is_some();
                if ready && has_ip {
                    return Ok(pod.clone());
                }
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
pub fn counter_pod(name: &str, node: &str, counters: &[Counter]) -> Pod {
    let containers: Vec<Value> = counters
        .iter()
        .map(|c| {
            let mut args = vec![
                "-p".to_owned(),
                c.port.to_string(),
                "-f".to_owned(),
                c.file.clone(),
            ];
            if let Some(mib) = c.ballast_mib {
                args.extend(["-m".to_owned(), mib.to_string()]);
            }
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
}
