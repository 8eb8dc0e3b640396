//! Helpers for suites that checkpoint and restore through our shim:
//!
//! * [`TasksApi`]: containerd's own Tasks API (`Checkpoint`, `Get`) over `containerd-client`,
//!   as the podmigrate agent calls it: `k8s.io` namespace, runc checkpoint options in an `Any`;
//! * the counter app's HTTP side ([`http_get`], [`wait_http_ready`]) on the host's loopback
//!   (host-network pods share the host's ports, so [`free_port`] picks them);
//! * the `podmigrate` CLI ([`build_cli`], [`podmigrate`]).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::{CheckpointTaskRequest, GetRequest};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::Request;
use containerd_client::types::v1::Status as TaskStatus;
use containerd_client::with_namespace;
use podmigrate_proto::v1::RuncCheckpointOptions;
use podmigrate_vocabulary::RUNC_CHECKPOINT_OPTIONS_TYPE_URL;
use prost::Message;

use crate::containerd::build_workspace_bins;
use crate::containerd::run_bounded;
use crate::harness::workspace_bin;
use crate::oci::K8S_NAMESPACE;

/// The CLI's binary name, as cargo builds it.
pub const CLI_BINARY: &str = "podmigrate";

/// Default bound on one containerd API call (a checkpoint dumps, packs and commits).
pub const TASKS_RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// A client of containerd's Tasks service, in the CRI plugin's `k8s.io` namespace.
#[derive(Clone)]
pub struct TasksApi {
    client: TasksClient<Channel>,
    /// Bound on each call.
    pub rpc_timeout: Duration,
}

/// Checkpoint options as the agent sends them: CRIU's images (and with our shim the whole
/// checkpoint directory) at `image_path`, the task stopped afterwards when `exit`.
pub fn checkpoint_options(image_path: &Path, exit: bool) -> RuncCheckpointOptions {
    RuncCheckpointOptions {
        exit,
        image_path: image_path.to_string_lossy().into_owned(),
        ..RuncCheckpointOptions::default()
    }
}

impl TasksApi {
    /// Connects to containerd's gRPC socket.
    pub async fn connect(socket: &Path) -> Result<TasksApi> {
        let channel =
            tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
                .await
                .with_context(|| format!("connecting to {} timed out", socket.display()))?
                .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(TasksApi {
            client: TasksClient::new(channel),
            rpc_timeout: TASKS_RPC_TIMEOUT,
        })
    }

    /// `Tasks.Checkpoint` of `container_id` with runc `options`. The error keeps containerd's
    /// [`tonic::Status`] (its message carries the shim's).
    pub async fn checkpoint(
        &self,
        container_id: &str,
        options: &RuncCheckpointOptions,
    ) -> Result<()> {
        let req = CheckpointTaskRequest {
            container_id: container_id.to_owned(),
            parent_checkpoint: String::new(),
            options: Some(prost_types::Any {
                type_url: RUNC_CHECKPOINT_OPTIONS_TYPE_URL.to_owned(),
                value: options.encode_to_vec(),
            }),
        };
        let mut client = self.client.clone();
        let call = client.checkpoint(with_namespace!(req, K8S_NAMESPACE));
        match tokio::time::timeout(self.rpc_timeout, call).await {
            Err(_) => bail!(
                "Tasks.Checkpoint of {container_id}: no answer within {:?}",
                self.rpc_timeout
            ),
            Ok(Err(status)) => {
                Err(anyhow::Error::new(status)
                    .context(format!("Tasks.Checkpoint of {container_id}")))
            }
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The task's status as containerd sees it (`Tasks.Get`): tells `Paused` from `Running`,
    /// which CRI does not.
    pub async fn status(&self, container_id: &str) -> Result<TaskStatus> {
        let req = GetRequest {
            container_id: container_id.to_owned(),
            exec_id: String::new(),
        };
        let mut client = self.client.clone();
        let call = client.get(with_namespace!(req, K8S_NAMESPACE));
        let resp = tokio::time::timeout(self.rpc_timeout, call)
            .await
            .with_context(|| format!("Tasks.Get of {container_id}: no answer"))?
            .with_context(|| format!("Tasks.Get of {container_id}"))?
            .into_inner();
        let process = resp.process.context("Tasks.Get answered no process")?;
        TaskStatus::try_from(process.status)
            .with_context(|| format!("unknown task status {}", process.status))
    }
}

/// The message of the gRPC status inside `err` (the whole chain when there is none).
pub fn grpc_message(err: &anyhow::Error) -> String {
    err.chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .map(|s| s.message().to_owned())
        .unwrap_or_else(|| format!("{err:#}"))
}

/// A port nobody listens on right now (host network: pods share the host's ports).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// `GET <path>` on `127.0.0.1:<port>` (one request per connection, as the counter answers);
/// returns the body of a 200 answer.
pub fn http_get(port: u16, path: &str) -> Result<String> {
    let addr = (Ipv4Addr::LOCALHOST, port).into();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream
        .read_to_string(&mut reply)
        .with_context(|| format!("reading the answer to GET {path} from port {port}"))?;
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP head in {reply:?}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(body.to_owned())
}

/// `GET /` on the counter: the new count.
pub fn counter_hit(port: u16) -> Result<u64> {
    let body = http_get(port, "/")?;
    body.trim()
        .parse()
        .with_context(|| format!("counter answered {body:?}, not a number"))
}

/// Polls `GET /healthz` until the counter answers `ok`.
pub async fn wait_http_ready(port: u16, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let last = match http_get(port, "/healthz") {
            Ok(body) if body == "ok\n" => return Ok(()),
            Ok(body) => format!("answered {body:?}"),
            Err(e) => format!("{e:#}"),
        };
        if start.elapsed() >= timeout {
            bail!("counter on port {port} not ready after {timeout:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Builds the `podmigrate` CLI with `cargo build -p podmigrate-kubelet-plugin` in the running
/// test's profile and returns its path. Runs cargo once per test process.
pub fn build_cli() -> Result<PathBuf> {
    static BUILT: std::sync::Mutex<Option<std::result::Result<PathBuf, String>>> =
        std::sync::Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let result = built.get_or_insert_with(|| build_cli_now().map_err(|e| format!("{e:#}")));
    result.clone().map_err(anyhow::Error::msg)
}

fn build_cli_now() -> Result<PathBuf> {
    // target/<profile>/deps/<test>-<hash> → target/<profile>/podmigrate.
    let profile_dir = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .context("test binary is not in target/<profile>/deps")?
        .to_owned();
    let profile = profile_dir
        .file_name()
        .and_then(|p| p.to_str())
        .unwrap_or("debug")
        .to_owned();
    build_workspace_bins(&profile, CLI_BINARY)?;
    workspace_bin(CLI_BINARY).with_context(|| {
        format!(
            "{} missing after cargo build",
            profile_dir.join(CLI_BINARY).display()
        )
    })
}

/// Runs the CLI (see [`build_cli`]) with `args`, bounded.
pub fn podmigrate(cli: &Path, args: &[&str]) -> Result<Output> {
    run_bounded(Command::new(cli).args(args), Duration::from_secs(60))
}

/// Every path under `dir` (relative, sorted); empty when `dir` is missing.
pub fn list_tree(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_owned());
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
