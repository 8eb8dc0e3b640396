//! Two (or more) Kubernetes nodes on one machine, each as it runs on a real cluster: its own
//! network namespace, its own containerd (with our shim behind the `migrate` handler, configured
//! as docs/containerd.md says), its own real `podmigrate agent` process and a test kubelet
//! ([`crate::kubelet`]), all sharing one API server (the in-process stand-in) and one share:
//! a plain directory, or ([`ShareBackend::Smb`]) a real SMB share served by a private smbd on
//! the host side of the nodes' links and mounted on each node through FUSE from inside its
//! network namespace ([`crate::smb`]).
//!
//! * **Network.** Each node gets a namespace `podmigrate-<tag>-<node>` (`ip netns add`; the tag
//!   is random, or [`NETNS_TAG_ENV`]) and a
//!   veth pair: `10.213.X.1/30` on the host side, `10.213.X.2/30` (the node's IP) as `eth0`
//!   inside, plus `lo`. Nothing else is routed: traffic only flows between the test (host side)
//!   and its own namespaces. containerd is started inside the namespace
//!   ([`ContainerdOptions::netns`]), so its shims and host-network pods are there: the counter
//!   on port 8080 of node-a and of node-b do not collide, and the test reaches each at its
//!   node's IP.
//! * **Agent.** The built `podmigrate` binary, `--log-format json agent`, in the host's network
//!   namespace (it talks to the stand-in on 127.0.0.1), with `NODE_NAME`, `KUBECONFIG`,
//!   `CONTAINERD_ADDRESS`, `PODMIGRATE_SHARE_ROOT`, `PODMIGRATE_WORK_DIR` (the node's own, which
//!   its shims use too) and its own `--metrics-addr`; logs go to `<node>/agent.log`.
//! * **CLI.** `kubectl migrate` is the same binary run as `kubectl-migrate` (a symlink), with
//!   `KUBECONFIG` pointing at the stand-in.
//!
//! Dropping a [`Cluster`] (also while unwinding from a failed assertion) stops the kubelets,
//! kills the agents, stops the containerds (which kill every container and shim), deletes the
//! namespaces and veths, stops the API server and removes the scratch directory.

use std::collections::BTreeSet;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{json, Value};

use crate::apiserver::{ApiServer, Kind, PodDeletion};
pub use crate::cli::{parse_summary, CliProcess, CliRun, Summary};
use crate::containerd::{
    build_shim, find_in_path, run_bounded, Containerd, ContainerdOptions, MIGRATE_HANDLER,
    SHIM_BINARY,
};
pub use crate::counter::{counter_hit, http_get_addr, wait_counter_ready, Counter};
use crate::cri::CriClient;
use crate::harness::{Scratch, KEEP_ENV};
use crate::kubelet::{Kubelet, KubeletOptions};
use crate::loopfs::LoopFs;
use crate::oci::{self, COUNTER_IMAGE};
use crate::smb::{SmbMount, SmbServer};

pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";
pub const NAMESPACE: &str = "default";
/// The CLI's binary name, and the name kubectl looks for to run `kubectl migrate`.
pub const CLI_BINARY: &str = "podmigrate";
pub const KUBECTL_PLUGIN: &str = "kubectl-migrate";
/// Prefix of every network namespace made here (scripts/demo.sh deletes leftovers by it).
pub const NETNS_PREFIX: &str = "podmigrate-";
/// The label a source must carry to be cloned.
pub const MIGRATABLE: &str = "podmigrate.io/migratable";
pub const CLONE_OF: &str = "podmigrate.io/clone-of";
pub const PHASE: &str = "podmigrate.io/phase";
pub const REASON: &str = "podmigrate.io/reason";

/// The binaries a cluster runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `podmigrate` (agent and CLI).
    pub cli: PathBuf,
    /// `containerd-shim-migrate-v2`.
    pub shim: PathBuf,
}

impl Binaries {
    /// For tests: `cargo build --workspace --bins` in the running test's profile (a no-op when
    /// fresh; see [`build_shim`]), so a suite never runs stale binaries. Once per process.
    pub fn build() -> Result<Binaries> {
        static BUILT: Mutex<Option<std::result::Result<Binaries, String>>> = Mutex::new(None);
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        let result = built.get_or_insert_with(|| Self::build_now().map_err(|e| format!("{e:#}")));
        result.clone().map_err(anyhow::Error::msg)
    }

    fn build_now() -> Result<Binaries> {
        // `build_shim` builds every binary of the workspace (as scripts/test.sh does), the CLI
        // included: one cargo run, one feature resolution, no rebuilt dependencies.
        let shim = build_shim()?;
        let cli = shim
            .parent()
            .context("the shim has no parent directory")?
            .join(CLI_BINARY);
        ensure!(cli.is_file(), "{} missing after cargo build", cli.display());
        Ok(Binaries { cli, shim })
    }

    /// For the demo: the binaries built beside the running executable
    /// (`cargo build --release --workspace` puts them all in `target/release`).
    pub fn beside_current_exe() -> Result<Binaries> {
        let exe = std::env::current_exe()?;
        let dir = exe.parent().context("the executable has no directory")?;
        let find = |name: &str| -> Result<PathBuf> {
            [dir.join(name), dir.join("..").join(name)]
                .into_iter()
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{name} not found beside {} (run `cargo build --release --workspace`)",
                        exe.display()
                    )
                })
        };
        Ok(Binaries {
            cli: find(CLI_BINARY)?,
            shim: find(SHIM_BINARY)?,
        })
    }
}

/// Why the two-node suite cannot run here, if it cannot: the CRI suite's needs plus CRIU and
/// iproute2.
pub fn skip_reason() -> Option<String> {
    if let Some(reason) = crate::containerd::cri_skip_reason() {
        return Some(reason);
    }
    for tool in ["criu", "ip"] {
        if find_in_path(tool).is_none() {
            return Some(format!("`{tool}` not found (scripts/setup.sh installs it)"));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// Runs `ip <args>`, bounded; fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = run_bounded(Command::new("ip").args(args), Duration::from_secs(15))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Third octets of `10.213.X.0/30` subnets handed out by this process.
static SUBNETS: Mutex<BTreeSet<u8>> = Mutex::new(BTreeSet::new());

/// A `10.213.X.0/30` nobody on this machine uses: not handed out here, and no interface has an
/// address in `10.213.X.0/24`.
fn allocate_subnet() -> Result<u8> {
    let out = run_bounded(
        Command::new("ip").args(["-4", "-o", "addr", "show"]),
        Duration::from_secs(15),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let used: BTreeSet<u8> = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("10.213."))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    let mut taken = SUBNETS.lock().unwrap_or_else(|e| e.into_inner());
    let x = (1..=254u8)
        .find(|x| !taken.contains(x) && !used.contains(x))
        .context("no free 10.213.X.0/30 subnet")?;
    taken.insert(x);
    Ok(x)
}

/// Lets a caller that must clean up after a `kill -9` (scripts/demo.sh) name the tag, so that
/// it deletes its own namespaces only; up to five ASCII letters or digits.
pub const NETNS_TAG_ENV: &str = "PODMIGRATE_NETNS_TAG";

/// A short tag unique on this machine for this process's namespaces and links:
/// [`NETNS_TAG_ENV`] for the first cluster of the process if set, random otherwise.
pub fn unique_tag() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    if let Ok(tag) = std::env::var(NETNS_TAG_ENV) {
        let valid = (1..=5).contains(&tag.len()) && tag.bytes().all(|b| b.is_ascii_alphanumeric());
        assert!(
            valid,
            "{NETNS_TAG_ENV}={tag:?} is not 1 to 5 ASCII letters or digits"
        );
        if COUNTER.fetch_add(1, Ordering::Relaxed) == 0 {
            return tag;
        }
    }
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!(
            "{:05x}",
            (std::process::id().wrapping_mul(2_654_435_761) ^ nanos ^ n) & 0xfffff
        );
        let taken = fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(&tag));
        if !taken && !Path::new(&format!("/sys/class/net/pm{tag}0")).exists() {
            return tag;
        }
    }
}

/// A node's network namespace and its veth pair; deleted on drop.
pub struct NetNs {
    pub name: String,
    /// The veth end on the host side.
    pub host_link: String,
    pub host_ip: Ipv4Addr,
    /// The node's IP (`eth0` inside the namespace).
    pub node_ip: Ipv4Addr,
    subnet: u8,
    deleted: bool,
}

impl NetNs {
    /// `ip netns add <name>`, a veth pair `<host_link>` ↔ `eth0` in a fresh `10.213.X.0/30`.
    pub fn create(name: &str, host_link: &str) -> Result<NetNs> {
        ensure!(host_link.len() <= 15, "link name {host_link} is too long");
        let subnet = allocate_subnet()?;
        let host_ip = Ipv4Addr::new(10, 213, subnet, 1);
        let node_ip = Ipv4Addr::new(10, 213, subnet, 2);
        ip(&["netns", "add", name])?;
        let mut ns = NetNs {
            name: name.to_owned(),
            host_link: host_link.to_owned(),
            host_ip,
            node_ip,
            subnet,
            deleted: false,
        };
        let peer = format!("{host_link}p");
        let result = (|| {
            ip(&[
                "link", "add", host_link, "type", "veth", "peer", "name", &peer,
            ])?;
            ip(&["link", "set", &peer, "netns", name])?;
            ip(&["-n", name, "link", "set", &peer, "name", "eth0"])?;
            ip(&[
                "-n",
                name,
                "addr",
                "add",
                &format!("{node_ip}/30"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", name, "link", "set", "eth0", "up"])?;
            ip(&["-n", name, "link", "set", "lo", "up"])?;
            ip(&["addr", "add", &format!("{host_ip}/30"), "dev", host_link])?;
            ip(&["link", "set", host_link, "up"])
        })();
        if let Err(e) = result {
            ns.delete();
            return Err(e);
        }
        Ok(ns)
    }

    /// Deletes the namespace and the host-side link (idempotent).
    pub fn delete(&mut self) {
        if self.deleted {
            return;
        }
        self.deleted = true;
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("netns cleanup: {e:#}");
        }
        // Usually gone with its peer's namespace already.
        if Path::new("/sys/class/net").join(&self.host_link).exists() {
            let _ = ip(&["link", "del", &self.host_link]);
        }
        SUBNETS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.subnet);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        self.delete();
    }
}

// ---------------------------------------------------------------------------------------------
// The agent process

/// A port on 127.0.0.1 nobody listens on right now.
pub fn free_local_port() -> Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// One node's `podmigrate agent`, restartable; killed on drop.
pub struct AgentProcess {
    pub node: String,
    pub metrics_addr: SocketAddr,
    pub log_path: PathBuf,
    binary: PathBuf,
    env: Vec<(String, String)>,
    args: Vec<String>,
    child: Option<Child>,
    /// How many times it was started.
    pub starts: u32,
}

impl AgentProcess {
    pub fn spawn(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "agent of {} already runs", self.node);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("opening {}", self.log_path.display()))?;
        let child = Command::new(&self.binary)
            .args(&self.args)
            .env_remove("RUST_LOG")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {}", self.binary.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it still runs (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// SIGKILL, as a node crash or an OOM kill would end it, and reap it.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (the agent finishes a migration under way), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Waits until `/healthz` answers on the metrics address.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            ensure!(
                self.is_running(),
                "the agent of {} exited; its log:\n{}",
                self.node,
                self.log_tail(40)
            );
            let addr = self.metrics_addr;
            if let Ok(body) = http_get_addr(addr, "/healthz").await {
                if body.trim() == "ok" {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the agent of {} did not answer /healthz on {addr} within {timeout:?}; its log:\n{}",
                    self.node,
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log_text(), n)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Nodes and the cluster

/// One node. Fields drop in order: kubelet, agent, CRI client, containerd, share mount,
/// namespace.
pub struct Node {
    pub kubelet: Option<Kubelet>,
    pub agent: AgentProcess,
    pub cri: CriClient,
    pub containerd: Containerd,
    /// The node's FUSE mount of the SMB share ([`ShareBackend::Smb`]).
    pub share_mount: Option<SmbMount>,
    pub netns: NetNs,
    /// The share as this node sees it (its agent's and shims' `PODMIGRATE_SHARE_ROOT`).
    pub share: PathBuf,
    pub name: String,
    /// The node's IP, where its host-network pods listen.
    pub ip: Ipv4Addr,
    /// Node-local work space of its agent and shims.
    pub work: PathBuf,
    /// Its shims' memory-backed work space (`PODMIGRATE_MEMORY_DIR`, on tmpfs).
    pub memory: Scratch,
    /// How its kubelet runs (for [`Cluster::start_kubelet`]).
    pub kubelet_options: KubeletOptions,
}

/// What the nodes share their archives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShareBackend {
    /// One directory of the host, seen by every node as it is.
    #[default]
    Directory,
    /// A private smbd on the host side of the nodes' links, mounted on each node through FUSE
    /// from inside its network namespace ([`crate::smb`]).
    Smb,
}

/// How to start a [`Cluster`].
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: Vec<String>,
    pub share: ShareBackend,
    pub binaries: Binaries,
    /// How long a clone's Create waits for its archive (`PODMIGRATE_ARCHIVE_WAIT_SECONDS`).
    pub archive_wait: Duration,
    /// The agents' `--checkpoint-timeout`.
    pub checkpoint_timeout: Duration,
    /// The agents' `--clone-timeout`.
    pub clone_timeout: Duration,
    /// containerd's `--log-level` (debug also brings the shims' logs into containerd's log).
    pub containerd_log_level: String,
    /// Kubelet log lines on stderr too.
    pub echo_kubelet: bool,
    /// Print each step of the bring-up on stdout (`    <node>: <step>`).
    pub verbose: bool,
    /// More arguments for every agent's `agent` subcommand (e.g. `--max-outbound 1`).
    pub agent_args: Vec<String>,
}

impl ClusterOptions {
    pub fn new(binaries: Binaries) -> ClusterOptions {
        ClusterOptions {
            nodes: vec![NODE_A.into(), NODE_B.into()],
            share: ShareBackend::Directory,
            binaries,
            archive_wait: Duration::from_secs(60),
            checkpoint_timeout: Duration::from_secs(120),
            clone_timeout: Duration::from_secs(90),
            containerd_log_level: "debug".into(),
            echo_kubelet: false,
            verbose: true,
            agent_args: Vec::new(),
        }
    }
}

/// A migratable host-network pod of counters, pinned to `node`, under the `migrate`
/// RuntimeClass, as the tutorial's manifest.
pub fn counter_pod(name: &str, node: &str, counters: &[Counter]) -> Pod {
    let containers: Vec<Value> = counters
        .iter()
        .map(|c| {
            let args = c.args();
            json!({ "name": c.name, "image": COUNTER_IMAGE, "args": args })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": { "app": name, MIGRATABLE: "true" },
        },
        "spec": {
            "nodeName": node,
            "runtimeClassName": MIGRATE_HANDLER,
            "hostNetwork": true,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 2,
            "containers": containers,
        }
    }))
    .expect("a valid Pod")
}

/// The whole two-node set-up; see the module docs. Fields drop in order.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub api: ApiServer,
    /// The SMB server ([`ShareBackend::Smb`]); stopped after every node's mount is gone.
    pub smb: Option<SmbServer>,
    /// The share as the host sees it: the shared directory itself, or the SMB server's
    /// directory. Each node's own view is [`Node::share`].
    pub share: PathBuf,
    pub kubeconfig: PathBuf,
    /// `<scratch>/bin/kubectl-migrate` → the CLI.
    pub kubectl_migrate: PathBuf,
    pub binaries: Binaries,
    pub tag: String,
    /// Loop filesystems mounted over the share or a work space ([`Cluster::mount_loop`]).
    pub loops: Vec<LoopFs>,
    /// Small tmpfs mounts over nodes' memory work spaces ([`Cluster::mount_small_tmpfs`]).
    tmpfs: Vec<crate::loopfs::SmallTmpfs>,
    scratch: Scratch,
}

impl Cluster {
    /// Brings up the API server, then every node: namespace, containerd (pause and counter
    /// images imported), agent (healthy), kubelet.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        let scratch = Scratch::new("podmigrate-2node-")?;
        let root = scratch.path().to_owned();
        let share = root.join("share");
        fs::create_dir_all(&share)?;
        let api = ApiServer::builder()
            .pod_deletion(PodDeletion::Graceful)
            .start()
            .await;
        let kubeconfig = root.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)?;
        fs::create_dir_all(root.join("bin"))?;
        let kubectl_migrate = root.join("bin").join(KUBECTL_PLUGIN);
        std::os::unix::fs::symlink(&opts.binaries.cli, &kubectl_migrate)?;
        let image = oci::counter_image().context("building the counter image")?;
        let tag = unique_tag();
        // Every node's namespace first: an SMB server listens on all their links.
        let mut namespaces = Vec::new();
        for (index, name) in opts.nodes.iter().enumerate() {
            namespaces.push(
                NetNs::create(
                    &format!("{NETNS_PREFIX}{tag}-{name}"),
                    &format!("pm{tag}{index}"),
                )
                .with_context(|| format!("creating node {name}'s network namespace"))?,
            );
        }
        let smb = match opts.share {
            ShareBackend::Directory => None,
            ShareBackend::Smb => {
                let addrs: Vec<Ipv4Addr> = namespaces.iter().map(|n| n.host_ip).collect();
                let server = SmbServer::start(&root.join("smbd"), &addrs)
                    .context("starting the SMB server")?;
                if opts.verbose {
                    println!(
                        "    smbd pid {} serving [{}] from {} on {addrs:?}",
                        server.pid().unwrap_or_default(),
                        crate::smb::SHARE_NAME,
                        server.data.display()
                    );
                }
                Some(server)
            }
        };
        let share = smb.as_ref().map_or(share, |s| s.data.clone());
        let mut cluster = Cluster {
            nodes: Vec::new(),
            api,
            smb,
            share,
            kubeconfig,
            kubectl_migrate,
            binaries: opts.binaries.clone(),
            tag,
            loops: Vec::new(),
            tmpfs: Vec::new(),
            scratch,
        };
        for (name, netns) in opts.nodes.iter().zip(namespaces) {
            let node = cluster
                .start_node(name, netns, &opts, &image)
                .await
                .with_context(|| format!("starting node {name}"))?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    async fn start_node(
        &self,
        name: &str,
        netns: NetNs,
        opts: &ClusterOptions,
        image: &oci::Image,
    ) -> Result<Node> {
        let started = Instant::now();
        let say = |what: &str| {
            if opts.verbose {
                println!(
                    "    {name}: {what} ({:.1}s)",
                    started.elapsed().as_secs_f64()
                );
            }
        };
        let dir = self.scratch.path().join(name);
        let work = dir.join("work");
        fs::create_dir_all(&work)?;
        let memory = Scratch::in_memory(&format!("podmigrate-{name}-"))?;
        let ip = netns.node_ip;
        say(&format!(
            "network namespace {} with IP {ip} (veth {} on the host, {})",
            netns.name, netns.host_link, netns.host_ip
        ));
        let share_mount = match &self.smb {
            None => None,
            Some(server) => {
                let mount = SmbMount::start(&dir, &netns.name, server, netns.host_ip)?;
                say(&format!(
                    "SMB share //{}/{} mounted at {} (smbnetfs in the node's namespace)",
                    netns.host_ip,
                    crate::smb::SHARE_NAME,
                    mount.share_root.display()
                ));
                Some(mount)
            }
        };
        let share = share_mount
            .as_ref()
            .map_or_else(|| self.share.clone(), |m| m.share_root.clone());

        let mut copts = ContainerdOptions::named(name);
        copts.shim = opts.binaries.shim.clone();
        copts.netns = Some(netns.name.clone());
        copts.log_level = opts.containerd_log_level.clone();
        // runc (under the runc shim) runs `criu` from PATH: the patched one is in /usr/local/sbin.
        let path = format!(
            "/usr/local/sbin:/usr/local/bin:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        copts.extra_env = vec![
            ("PATH".into(), path),
            ("PODMIGRATE_SHARE_ROOT".into(), share.display().to_string()),
            ("PODMIGRATE_WORK_DIR".into(), work.display().to_string()),
            (
                "PODMIGRATE_MEMORY_DIR".into(),
                memory.path().display().to_string(),
            ),
            (
                "PODMIGRATE_ARCHIVE_WAIT_SECONDS".into(),
                opts.archive_wait.as_secs().to_string(),
            ),
            ("NODE_NAME".into(), name.into()),
        ];
        let containerd = Containerd::start(copts).await?;
        containerd
            .import(image, Duration::from_secs(60))
            .context("importing the counter image")?;
        let cri = containerd.cri().await?;
        say(&format!(
            "containerd {} in that namespace, runtime handler migrate = {}",
            containerd.address().display(),
            opts.binaries.shim.display()
        ));

        self.api
            .add_node(name)
            .map_err(|e| anyhow::anyhow!("adding node {name}: {e}"))?;
        let ip_text = ip.to_string();
        self.api
            .modify(Kind::Node, None, name, |node| {
                node["status"]["addresses"] = json!([
                    { "type": "InternalIP", "address": ip_text },
                    { "type": "Hostname", "address": name },
                ]);
            })
            .map_err(|e| anyhow::anyhow!("setting node {name}'s address: {e}"))?;

        let metrics_addr: SocketAddr = (Ipv4Addr::LOCALHOST, free_local_port()?).into();
        let mut agent = AgentProcess {
            node: name.to_owned(),
            metrics_addr,
            log_path: dir.join("agent.log"),
            binary: opts.binaries.cli.clone(),
            env: vec![
                ("NODE_NAME".into(), name.into()),
                ("KUBECONFIG".into(), self.kubeconfig.display().to_string()),
                (
                    "CONTAINERD_ADDRESS".into(),
                    containerd.address().display().to_string(),
                ),
                ("PODMIGRATE_SHARE_ROOT".into(), share.display().to_string()),
                ("PODMIGRATE_WORK_DIR".into(), work.display().to_string()),
                ("RUST_LOG".into(), "info".into()),
            ],
            args: vec![
                "--log-format".into(),
                "json".into(),
                "agent".into(),
                "--metrics-addr".into(),
                metrics_addr.to_string(),
                "--checkpoint-timeout".into(),
                format!("{}s", opts.checkpoint_timeout.as_secs()),
                "--clone-timeout".into(),
                format!("{}s", opts.clone_timeout.as_secs()),
            ]
            .into_iter()
            .chain(opts.agent_args.iter().cloned())
            .collect(),
            child: None,
            starts: 0,
        };
        agent.spawn()?;
        agent.wait_healthy(Duration::from_secs(30)).await?;
        say(&format!(
            "podmigrate agent pid {} (metrics on {metrics_addr}, log {})",
            agent.pid().unwrap_or_default(),
            agent.log_path.display()
        ));

        let mut kopts = KubeletOptions::new(name, &dir.join("kubelet.log"));
        kopts.node_ip = Some(ip);
        kopts.echo = opts.echo_kubelet;
        let kubelet = Kubelet::start(self.api.client(), cri.clone(), kopts.clone());
        say("test kubelet watching the API server for its pods");
        Ok(Node {
            kubelet_options: kopts,
            kubelet: Some(kubelet),
            agent,
            cri,
            containerd,
            share_mount,
            netns,
            share,
            name: name.to_owned(),
            ip,
            work,
            memory,
        })
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Stops a node's kubelet (bounded): its pods keep running, new ones wait.
    pub async fn stop_kubelet(&mut self, node: &str) {
        if let Some(kubelet) = self.node_mut(node).kubelet.take() {
            kubelet.shutdown().await;
        }
    }

    /// Starts a node's kubelet again. It starts the node's pods it finds not started yet; it
    /// does not adopt pods a previous kubelet ran (those would be started a second time), so
    /// stop a kubelet only while its node runs no pods.
    pub fn start_kubelet(&mut self, node: &str) {
        let client = self.api.client();
        let node = self.node_mut(node);
        if node.kubelet.is_none() {
            node.kubelet = Some(Kubelet::start(
                client,
                node.cri.clone(),
                node.kubelet_options.clone(),
            ));
        }
    }

    /// Mounts a fresh `size_mib` ext4 over `dir` (the share, or a node's work space), before
    /// anything is written there; unmounted before the scratch directory goes.
    pub fn mount_loop(&mut self, dir: &Path, size_mib: u64) -> Result<&LoopFs> {
        let image = self
            .scratch
            .path()
            .join(format!("loop-{}.img", self.loops.len()));
        let fs = LoopFs::mount_over(dir, &image, size_mib)
            .with_context(|| format!("mounting a {size_mib} MiB ext4 over {}", dir.display()))?;
        self.loops.push(fs);
        Ok(self.loops.last().expect("just pushed"))
    }

    /// The checkpoint directories of node `node`'s dump of `container` for clone `uid` of
    /// `pod` that exist now: the agent's image path on disk, or the shim's directory in
    /// memory-backed work space (where a dump that fits goes).
    pub fn dump_dirs(&self, node: &str, pod: &str, uid: &str, container: &str) -> Vec<PathBuf> {
        let node = self.node(node);
        let mut dirs = vec![node.work.join("checkpoints").join(uid).join(container)];
        let in_memory = node
            .memory
            .path()
            .join("checkpoints")
            .join(NAMESPACE)
            .join(pod);
        let prefix = format!("{container}-");
        dirs.extend(
            fs::read_dir(&in_memory)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path()),
        );
        dirs.retain(|d| d.is_dir());
        dirs
    }

    /// A `size_mib` tmpfs over `dir` until the cluster shuts down.
    pub fn mount_small_tmpfs(&mut self, dir: &Path, size_mib: u64) -> Result<()> {
        let fs = crate::loopfs::SmallTmpfs::mount_over(dir, size_mib)
            .with_context(|| format!("mounting a {size_mib} MiB tmpfs over {}", dir.display()))?;
        self.tmpfs.push(fs);
        Ok(())
    }

    pub fn scratch(&self) -> &Path {
        self.scratch.path()
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.api.client(), NAMESPACE)
    }

    /// `<share>/default/<pod>/<container>.zip`.
    pub fn archive(&self, pod: &str, container: &str) -> PathBuf {
        self.share
            .join(NAMESPACE)
            .join(pod)
            .join(format!("{container}.zip"))
    }

    pub async fn create_pod(&self, pod: &Pod) -> Result<Pod> {
        self.pods()
            .create(&PostParams::default(), pod)
            .await
            .context("creating the pod")
    }

    /// Annotation `key` of pod `pod` in `default`, as stored.
    pub fn annotation(&self, pod: &str, key: &str) -> Option<String> {
        self.api
            .get_pod(NAMESPACE, pod)?
            .pointer(&format!(
                "/metadata/annotations/{}",
                key.replace('~', "~0").replace('/', "~1")
            ))?
            .as_str()
            .map(str::to_owned)
    }

    /// The notes of the Events (core/v1 and events.k8s.io/v1) about pod `pod` with `reason`.
    pub fn events(&self, pod: &str, reason: &str) -> Vec<String> {
        self.api
            .events()
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .filter(|e| e["regarding"]["name"] == pod || e["involvedObject"]["name"] == pod)
            .map(|e| {
                e["note"]
                    .as_str()
                    .or(e["message"].as_str())
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    }

    /// The pod as stored, typed.
    pub fn get_pod(&self, name: &str) -> Option<Pod> {
        self.api
            .get_pod(NAMESPACE, name)
            .and_then(|v| serde_json::from_value(v).ok())
    }

    /// Waits until the pod's phase is Running and every container runs.
    pub async fn wait_running(&self, name: &str, timeout: Duration) -> Result<Pod> {
        let found = self
            .api
            .wait_for_pod(NAMESPACE, name, timeout, |pod| {
                pod.is_some_and(|p| {
                    let statuses = p["status"]["containerStatuses"].as_array();
                    p["status"]["phase"] == "Running"
                        && statuses.is_some_and(|s| {
                            !s.is_empty() && s.iter().all(|c| c["state"]["running"].is_object())
                        })
                })
            })
            .await;
        match found {
            Ok(Some(pod)) => Ok(serde_json::from_value(pod)?),
            _ => bail!(
                "pod {name} not running within {timeout:?}; it is {}",
                self.api
                    .get_pod(NAMESPACE, name)
                    .map(|p| p["status"].to_string())
                    .unwrap_or_else(|| "absent".into())
            ),
        }
    }

    /// Waits until the pod is gone from the API server.
    pub async fn wait_gone(&self, name: &str, timeout: Duration) -> Result<()> {
        self.api
            .wait_for_pod(NAMESPACE, name, timeout, |p| p.is_none())
            .await
            .map(drop)
            .map_err(|_| anyhow::anyhow!("pod {name} still exists after {timeout:?}"))
    }

    /// The clones of `source` (label `podmigrate.io/clone-of`), oldest first.
    pub async fn clones_of(&self, source: &str) -> Result<Vec<Pod>> {
        let mut clones = self
            .pods()
            .list(&ListParams::default().labels(&format!("{CLONE_OF}={source}")))
            .await?
            .items;
        clones.sort_by_key(|c| c.metadata.creation_timestamp.clone().map(|t| t.0));
        Ok(clones)
    }

    /// Starts `kubectl migrate <args>` (the real CLI, run as the kubectl plugin) with
    /// `KUBECONFIG` pointing at the stand-in; see [`CliProcess::finish`].
    pub fn spawn_kubectl_migrate(&self, args: &[&str]) -> Result<CliProcess> {
        let started = Instant::now();
        let child = tokio::process::Command::new(&self.kubectl_migrate)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("RUST_LOG")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning kubectl-migrate")?;
        Ok(CliProcess { child, started })
    }

    /// Runs `kubectl migrate <args>` to completion, bounded.
    pub async fn kubectl_migrate(&self, args: &[&str], timeout: Duration) -> Result<CliRun> {
        self.spawn_kubectl_migrate(args)?.finish(timeout).await
    }

    /// The containerd id of a pod's container, from the status its kubelet reported.
    pub fn container_id(&self, pod: &str, container: &str) -> Option<String> {
        let pod = self.api.get_pod(NAMESPACE, pod)?;
        pod["status"]["containerStatuses"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == container)?["containerID"]
            .as_str()?
            .strip_prefix("containerd://")
            .map(str::to_owned)
    }

    /// `cat <path>` in a container through CRI `ExecSync` on its node.
    pub async fn cat(&self, node: &str, container_id: &str, path: &str) -> Result<String> {
        let out = self
            .node(node)
            .cri
            .exec_sync(container_id, &["cat", path], Duration::from_secs(10))
            .await?;
        ensure!(
            out.exit_code == 0,
            "cat {path}: exit {}: {}",
            out.exit_code,
            out.stderr_str().trim()
        );
        Ok(out.stdout_str())
    }

    /// Logs of every agent, kubelet and containerd, for a failure report.
    pub fn diagnostics(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            out.push_str(&format!(
                "---- {} agent (last {lines} lines) ----\n{}\n",
                node.name,
                node.agent.log_tail(lines)
            ));
            if let Some(kubelet) = &node.kubelet {
                out.push_str(&format!(
                    "---- {} kubelet (last {lines} lines) ----\n{}\n",
                    node.name,
                    tail(&kubelet.log_text(), lines)
                ));
            }
            out.push_str(&format!(
                "---- {} containerd (last {lines} lines) ----\n{}\n",
                node.name,
                node.containerd.log_tail(lines)
            ));
        }
        out
    }

    /// Deletes every pod (gracefully, as `kubectl delete pod`) and waits, bounded, until the
    /// kubelets have torn them down and confirmed it.
    pub async fn delete_all_pods(&self, timeout: Duration) -> Result<()> {
        let pods = self.pods();
        for pod in pods.list(&ListParams::default()).await?.items {
            let name = pod.metadata.name.unwrap_or_default();
            if let Err(e) = pods.delete(&name, &DeleteParams::default()).await {
                if !matches!(&e, kube::Error::Api(s) if s.code == 404) {
                    return Err(e).with_context(|| format!("deleting pod {name}"));
                }
            }
        }
        self.api
            .wait_until(timeout, |api| api.pods().is_empty())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "pods left after {timeout:?}: {:?}",
                    self.api
                        .pods()
                        .iter()
                        .map(|p| p["metadata"]["name"].to_string())
                        .collect::<Vec<_>>()
                )
            })
    }

    /// Orderly stop: every pod deleted through the kubelets, kubelets stopped (bounded), then
    /// everything else as on drop.
    pub async fn shutdown(mut self) {
        if let Err(e) = self.delete_all_pods(Duration::from_secs(30)).await {
            eprintln!("shutdown: {e:#}");
        }
        for node in &mut self.nodes {
            if let Some(kubelet) = node.kubelet.take() {
                kubelet.shutdown().await;
            }
        }
        for node in &mut self.nodes {
            node.agent.stop(Duration::from_secs(5));
        }
        let nodes = std::mem::take(&mut self.nodes);
        // containerd's shutdown blocks (it waits for processes): off the async workers.
        let _ = tokio::task::spawn_blocking(move || drop(nodes)).await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics(60));
            if std::env::var_os(KEEP_ENV).is_some() {
                eprintln!("scratch directory: {}", self.scratch.path().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_pods_are_migratable_and_pinned() {
        let pod = counter_pod(
            "c",
            NODE_A,
            &[Counter::new("counter", 8080, "/tmp/count").ballast(64)],
        );
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some(NODE_A));
        assert_eq!(spec.runtime_class_name.as_deref(), Some("migrate"));
        assert_eq!(
            spec.containers[0].args.as_deref().unwrap(),
            ["-p", "8080", "-f", "/tmp/count", "-m", "64"]
        );
        assert_eq!(pod.metadata.labels.unwrap()[MIGRATABLE], "true");
    }
}
