//! A CRI client that plays kubelet: runtime.v1 over gRPC (the `k8s-cri` crate, tonic) on a
//! containerd unix socket, with helpers that build requests the way kubelet does (labels,
//! log directories, host-network namespace options) and call them in kubelet's order:
//!
//! * start: `RunPodSandbox` → `PodSandboxStatus` → per container `ImageStatus` →
//!   `CreateContainer` (image by id, like kubelet's `EnsureImageExists`) → `StartContainer`;
//! * stop: `StopContainer` (grace period) → `StopPodSandbox` → `RemoveContainer` →
//!   `RemovePodSandbox`.
//!
//! Every RPC is bounded ([`CriClient::rpc_timeout`]); errors keep the [`tonic::Status`]
//! (see [`is_not_found`]). All methods take `&self` (tonic clients are cheap clones).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

pub use api::{ContainerState, NamespaceMode, PodSandboxState};

/// Kubelet's pod and container labels.
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// Kubelet's container annotation counting restarts.
pub const RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";

/// Default bound on one RPC.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected CRI client (runtime and image services on one channel).
#[derive(Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
    log_root: PathBuf,
    /// Bound on each RPC (calls with their own timeout, like `StopContainer`, add theirs).
    pub rpc_timeout: Duration,
}

/// A pod sandbox this client ran, with the config kubelet keeps for `CreateContainer`.
#[derive(Debug, Clone)]
pub struct Pod {
    pub id: String,
    pub config: api::PodSandboxConfig,
    pub runtime_handler: String,
    /// `<log root>/<namespace>_<name>_<uid>`, like kubelet's `/var/log/pods/...`.
    pub log_directory: PathBuf,
}

impl Pod {
    fn meta(&self) -> &api::PodSandboxMetadata {
        self.config
            .metadata
            .as_ref()
            .expect("pods are built with metadata")
    }
    pub fn name(&self) -> &str {
        &self.meta().name
    }
    pub fn namespace(&self) -> &str {
        &self.meta().namespace
    }
    pub fn uid(&self) -> &str {
        &self.meta().uid
    }
    /// Where a container's log goes when its spec keeps the default `log_path`.
    pub fn container_log_path(&self, container_name: &str) -> PathBuf {
        self.log_directory.join(default_log_path(container_name))
    }
}

/// kubelet's relative container log path: `<container name>/<restart count>.log`.
pub fn default_log_path(container_name: &str) -> String {
    format!("{container_name}/0.log")
}

/// What to run in a container; see [`CriClient::create_container`].
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    pub name: String,
    /// Image reference as imported, e.g. [`crate::oci::BUSYBOX_IMAGE`].
    pub image: String,
    /// Overrides the image's Entrypoint (kubelet's `command`); empty keeps it.
    pub command: Vec<String>,
    /// Overrides the image's Cmd (kubelet's `args`); empty keeps it.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the pod's log directory; `None` for `<name>/0.log`.
    pub log_path: Option<String>,
    pub mounts: Vec<api::Mount>,
    pub privileged: bool,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

impl ContainerSpec {
    pub fn new(name: &str, image: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: image.to_owned(),
            ..ContainerSpec::default()
        }
    }
    pub fn command(mut self, command: &[&str]) -> Self {
        self.command = strings(command);
        self
    }
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = strings(args);
        self
    }
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }
    pub fn log_path(mut self, relative: &str) -> Self {
        self.log_path = Some(relative.to_owned());
        self
    }
    /// Bind-mounts `host_path` at `container_path`.
    pub fn mount(mut self, host_path: &Path, container_path: &str, readonly: bool) -> Self {
        self.mounts.push(api::Mount {
            host_path: host_path.to_string_lossy().into_owned(),
            container_path: container_path.to_owned(),
            readonly,
            ..api::Mount::default()
        });
        self
    }
}

/// What `ExecSync` returned.
#[derive(Debug, Clone)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

impl ExecResult {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Whether `err` carries a gRPC `NotFound` status (e.g. the status of a removed container).
pub fn is_not_found(err: &anyhow::Error) -> bool {
    grpc_code(err) == Some(tonic::Code::NotFound)
}

/// The gRPC status code inside `err`, if it came from an RPC.
pub fn grpc_code(err: &anyhow::Error) -> Option<tonic::Code> {
    err.chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
        .map(tonic::Status::code)
}

async fn bounded<T>(
    what: &str,
    limit: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    match tokio::time::timeout(limit, call).await {
        Err(_) => bail!("CRI {what}: no answer within {limit:?}"),
        Ok(Err(status)) => Err(anyhow::Error::new(status).context(format!("CRI {what}"))),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

fn host_network_namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..api::NamespaceOption::default()
    }
}

fn to_map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A host-network pod sandbox config as kubelet builds it for `hostNetwork: true` (no hostname:
/// the pod shares the node's UTS namespace and runc refuses to set one; kubelet's labels, no DNS
/// config, no port mappings, no cgroup parent), logging to
/// `log_directory`. Tweak the returned value and pass it to
/// [`CriClient::run_pod_sandbox_with_config`] for anything unusual.
pub fn host_network_pod_config(
    name: &str,
    namespace: &str,
    uid: &str,
    annotations: &[(&str, &str)],
    log_directory: &Path,
) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: namespace.to_owned(),
            attempt: 0,
        }),
        log_directory: log_directory.to_string_lossy().into_owned(),
        labels: to_map(&[
            (POD_NAME_LABEL, name),
            (POD_NAMESPACE_LABEL, namespace),
            (POD_UID_LABEL, uid),
        ]),
        annotations: to_map(annotations),
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(host_network_namespaces()),
                ..api::LinuxSandboxSecurityContext::default()
            }),
            ..api::LinuxPodSandboxConfig::default()
        }),
        ..api::PodSandboxConfig::default()
    }
}

impl CriClient {
    /// Connects to the CRI services on the unix socket `socket`. Pod log directories go under
    /// `log_root`.
    pub async fn connect(socket: &Path, log_root: &Path) -> Result<CriClient> {
        let path = socket.to_owned();
        let channel = tokio::time::timeout(
            DEFAULT_RPC_TIMEOUT,
            Endpoint::from_static("http://localhost")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                })),
        )
        .await
        .with_context(|| format!("connecting to {} timed out", socket.display()))?
        .with_context(|| format!("connecting to {}", socket.display()))?;
        Ok(CriClient {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_owned(),
            log_root: log_root.to_owned(),
            rpc_timeout: DEFAULT_RPC_TIMEOUT,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_root(&self) -> &Path {
        &self.log_root
    }

    /// The raw runtime service client, for RPCs without a helper here.
    pub fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        self.runtime.clone()
    }

    /// The raw image service client.
    pub fn image_client(&self) -> ImageServiceClient<Channel> {
        self.images.clone()
    }

    pub async fn version(&self) -> Result<api::VersionResponse> {
        let req = api::VersionRequest {
            version: "v1".into(),
        };
        bounded(
            "Version",
            self.rpc_timeout,
            self.runtime.clone().version(req),
        )
        .await
    }

    /// `Status` (verbose): runtime and network conditions plus the plugin's config dump in
    /// `info["config"]`.
    pub async fn status(&self) -> Result<api::StatusResponse> {
        let req = api::StatusRequest { verbose: true };
        bounded("Status", self.rpc_timeout, self.runtime.clone().status(req)).await
    }

    /// `ImageStatus`: `Some(image)` when present.
    pub async fn image_status(&self, image: &str) -> Result<Option<api::Image>> {
        let req = api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.to_owned(),
                ..api::ImageSpec::default()
            }),
            verbose: false,
        };
        let resp = bounded(
            "ImageStatus",
            self.rpc_timeout,
            self.images.clone().image_status(req),
        )
        .await?;
        Ok(resp.image)
    }

    pub async fn list_images(&self) -> Result<Vec<api::Image>> {
        let req = api::ListImagesRequest { filter: None };
        let resp = bounded(
            "ListImages",
            self.rpc_timeout,
            self.images.clone().list_images(req),
        )
        .await?;
        Ok(resp.images)
    }

    /// Runs a host-network pod (see [`host_network_pod_config`]) with `runtime_handler`
    /// (`"runc"`, `"migrate"`, …), logging under `<log root>/<namespace>_<name>_<uid>`, then
    /// reads its status back like kubelet does.
    pub async fn run_pod_sandbox(
        &self,
        name: &str,
        namespace: &str,
        uid: &str,
        annotations: &[(&str, &str)],
        runtime_handler: &str,
    ) -> Result<Pod> {
        let log_directory = self.log_root.join(format!("{namespace}_{name}_{uid}"));
        let config = host_network_pod_config(name, namespace, uid, annotations, &log_directory);
        self.run_pod_sandbox_with_config(config, runtime_handler)
            .await
    }

    /// `RunPodSandbox` with a prepared config (its log directory is created first, as kubelet
    /// does), then `PodSandboxStatus`.
    pub async fn run_pod_sandbox_with_config(
        &self,
        config: api::PodSandboxConfig,
        runtime_handler: &str,
    ) -> Result<Pod> {
        let log_directory = PathBuf::from(&config.log_directory);
        if !config.log_directory.is_empty() {
            fs::create_dir_all(&log_directory)
                .with_context(|| format!("creating {}", log_directory.display()))?;
        }
        let req = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: runtime_handler.to_owned(),
        };
        // Starting the sandbox starts a shim and the pause container: allow more than one RPC.
        let resp = bounded(
            "RunPodSandbox",
            self.rpc_timeout * 2,
            self.runtime.clone().run_pod_sandbox(req),
        )
        .await?;
        let pod = Pod {
            id: resp.pod_sandbox_id,
            config,
            runtime_handler: runtime_handler.to_owned(),
            log_directory,
        };
        self.pod_sandbox_status(&pod.id).await?;
        Ok(pod)
    }

    /// `PodSandboxStatus` (verbose: `info["info"]` holds containerd's JSON).
    pub async fn pod_sandbox_status(&self, pod_id: &str) -> Result<api::PodSandboxStatusResponse> {
        let req = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: true,
        };
        bounded(
            "PodSandboxStatus",
            self.rpc_timeout,
            self.runtime.clone().pod_sandbox_status(req),
        )
        .await
    }

    /// The sandbox's state (`SandboxReady` / `SandboxNotready`).
    pub async fn pod_state(&self, pod_id: &str) -> Result<PodSandboxState> {
        let status = self
            .pod_sandbox_status(pod_id)
            .await?
            .status
            .context("PodSandboxStatus without status")?;
        PodSandboxState::try_from(status.state).context("unknown pod sandbox state")
    }

    /// Sandboxes matching all of `labels` (empty: all).
    pub async fn list_pod_sandboxes(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<api::PodSandbox>> {
        let req = api::ListPodSandboxRequest {
            filter: Some(api::PodSandboxFilter {
                label_selector: to_map(labels),
                ..api::PodSandboxFilter::default()
            }),
        };
        let resp = bounded(
            "ListPodSandbox",
            self.rpc_timeout,
            self.runtime.clone().list_pod_sandbox(req),
        )
        .await?;
        Ok(resp.items)
    }

    /// The CreateContainer config kubelet would build for `spec` in `pod`, with `image_ref`
    /// (the image id from `ImageStatus`) as the image.
    pub fn container_config(
        &self,
        pod: &Pod,
        spec: &ContainerSpec,
        image_ref: &str,
    ) -> api::ContainerConfig {
        let mut labels = to_map(&[
            (POD_NAME_LABEL, pod.name()),
            (POD_NAMESPACE_LABEL, pod.namespace()),
            (POD_UID_LABEL, pod.uid()),
            (CONTAINER_NAME_LABEL, &spec.name),
        ]);
        labels.extend(spec.labels.clone());
        let mut annotations = to_map(&[(RESTART_COUNT_ANNOTATION, "0")]);
        annotations.extend(spec.annotations.clone());
        let namespaces = pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_else(host_network_namespaces);
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: spec.name.clone(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: image_ref.to_owned(),
                user_specified_image: spec.image.clone(),
                ..api::ImageSpec::default()
            }),
            command: spec.command.clone(),
            args: spec.args.clone(),
            working_dir: spec.working_dir.clone(),
            envs: spec
                .env
                .iter()
                .map(|(key, value)| api::KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: spec.mounts.clone(),
            labels,
            annotations,
            log_path: spec
                .log_path
                .clone()
                .unwrap_or_else(|| default_log_path(&spec.name)),
            linux: Some(api::LinuxContainerConfig {
                security_context: Some(api::LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces),
                    privileged: spec.privileged,
                    ..api::LinuxContainerSecurityContext::default()
                }),
                ..api::LinuxContainerConfig::default()
            }),
            ..api::ContainerConfig::default()
        }
    }

    /// `ImageStatus` (the image must have been imported: nothing is pulled) then
    /// `CreateContainer` with the image id, as kubelet does. Returns the container id.
    pub async fn create_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String> {
        let image = self.image_status(&spec.image).await?.with_context(|| {
            format!(
                "image {} is not present in containerd (import it first: nothing is pulled)",
                spec.image
            )
        })?;
        let config = self.container_config(pod, spec, &image.id);
        self.create_container_with_config(pod, config).await
    }

    /// `CreateContainer` with a prepared config.
    pub async fn create_container_with_config(
        &self,
        pod: &Pod,
        config: api::ContainerConfig,
    ) -> Result<String> {
        let req = api::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        let resp = bounded(
            "CreateContainer",
            self.rpc_timeout,
            self.runtime.clone().create_container(req),
        )
        .await?;
        Ok(resp.container_id)
    }

    pub async fn start_container(&self, container_id: &str) -> Result<()> {
        let req = api::StartContainerRequest {
            container_id: container_id.to_owned(),
        };
        bounded(
            "StartContainer",
            self.rpc_timeout,
            self.runtime.clone().start_container(req),
        )
        .await?;
        Ok(())
    }

    /// `ImageStatus` + `CreateContainer` + `StartContainer`; returns the container id.
    pub async fn run_container(&self, pod: &Pod, spec: &ContainerSpec) -> Result<String> {
        let id = self.create_container(pod, spec).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// `ExecSync` of `cmd` in the container, bounded by `timeout` on both sides.
    pub async fn exec_sync(
        &self,
        container_id: &str,
        cmd: &[&str],
        timeout: Duration,
    ) -> Result<ExecResult> {
        let req = api::ExecSyncRequest {
            container_id: container_id.to_owned(),
            cmd: strings(cmd),
            timeout: timeout.as_secs().max(1) as i64,
        };
        let resp = bounded(
            "ExecSync",
            timeout + self.rpc_timeout,
            self.runtime.clone().exec_sync(req),
        )
        .await?;
        Ok(ExecResult {
            stdout: resp.stdout,
            stderr: resp.stderr,
            exit_code: resp.exit_code,
        })
    }

    /// `ContainerStatus` (verbose: `info["info"]` holds containerd's JSON, with the OCI
    /// `runtimeSpec`, the `pid`, the `sandboxID`, …).
    pub async fn container_status_response(
        &self,
        container_id: &str,
    ) -> Result<api::ContainerStatusResponse> {
        let req = api::ContainerStatusRequest {
            container_id: container_id.to_owned(),
            verbose: true,
        };
        bounded(
            "ContainerStatus",
            self.rpc_timeout,
            self.runtime.clone().container_status(req),
        )
        .await
    }

    pub async fn container_status(&self, container_id: &str) -> Result<api::ContainerStatus> {
        self.container_status_response(container_id)
            .await?
            .status
            .context("ContainerStatus without status")
    }

    /// containerd's verbose info about the container, parsed (`runtimeSpec`, `pid`, …).
    pub async fn container_info(&self, container_id: &str) -> Result<serde_json::Value> {
        let resp = self.container_status_response(container_id).await?;
        let info = resp
            .info
            .get("info")
            .context("ContainerStatus verbose info has no \"info\" key")?;
        serde_json::from_str(info).context("parsing ContainerStatus info")
    }

    pub async fn container_state(&self, container_id: &str) -> Result<ContainerState> {
        let status = self.container_status(container_id).await?;
        ContainerState::try_from(status.state).context("unknown container state")
    }

    /// Polls `ContainerStatus` until the container is in `state`; returns that status.
    pub async fn wait_container_state(
        &self,
        container_id: &str,
        state: ContainerState,
        timeout: Duration,
    ) -> Result<api::ContainerStatus> {
        let start = Instant::now();
        loop {
            let status = self.container_status(container_id).await?;
            if status.state == state as i32 {
                return Ok(status);
            }
            if start.elapsed() >= timeout {
                bail!(
                    "container {container_id} still {:?} (reason {:?}, message {:?}) after \
                     {timeout:?}, expected {state:?}",
                    ContainerState::try_from(status.state),
                    status.reason,
                    status.message
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `StopContainer`: the stop signal, then SIGKILL after `grace` (whole seconds).
    pub async fn stop_container(&self, container_id: &str, grace: Duration) -> Result<()> {
        let req = api::StopContainerRequest {
            container_id: container_id.to_owned(),
            timeout: grace.as_secs() as i64,
        };
        bounded(
            "StopContainer",
            grace + self.rpc_timeout,
            self.runtime.clone().stop_container(req),
        )
        .await?;
        Ok(())
    }

    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = api::RemoveContainerRequest {
            container_id: container_id.to_owned(),
        };
        bounded(
            "RemoveContainer",
            self.rpc_timeout,
            self.runtime.clone().remove_container(req),
        )
        .await?;
        Ok(())
    }

    /// Containers matching all of `labels` (empty: all), in any state.
    pub async fn list_containers(&self, labels: &[(&str, &str)]) -> Result<Vec<api::Container>> {
        self.list_containers_filtered(api::ContainerFilter {
            label_selector: to_map(labels),
            ..api::ContainerFilter::default()
        })
        .await
    }

    /// Containers of one pod sandbox.
    pub async fn list_pod_containers(&self, pod_id: &str) -> Result<Vec<api::Container>> {
        self.list_containers_filtered(api::ContainerFilter {
            pod_sandbox_id: pod_id.to_owned(),
            ..api::ContainerFilter::default()
        })
        .await
    }

    pub async fn list_containers_filtered(
        &self,
        filter: api::ContainerFilter,
    ) -> Result<Vec<api::Container>> {
        let req = api::ListContainersRequest {
            filter: Some(filter),
        };
        let resp = bounded(
            "ListContainers",
            self.rpc_timeout,
            self.runtime.clone().list_containers(req),
        )
        .await?;
        Ok(resp.containers)
    }

    pub async fn stop_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let req = api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        bounded(
            "StopPodSandbox",
            self.rpc_timeout * 2,
            self.runtime.clone().stop_pod_sandbox(req),
        )
        .await?;
        Ok(())
    }

    pub async fn remove_pod_sandbox(&self, pod_id: &str) -> Result<()> {
        let req = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        bounded(
            "RemovePodSandbox",
            self.rpc_timeout * 2,
            self.runtime.clone().remove_pod_sandbox(req),
        )
        .await?;
        Ok(())
    }

    /// Kubelet's pod teardown: `StopContainer` (with `grace`) for each running container,
    /// `StopPodSandbox`, `RemoveContainer` for each, `RemovePodSandbox`.
    pub async fn teardown_pod(&self, pod_id: &str, grace: Duration) -> Result<()> {
        let containers = self.list_pod_containers(pod_id).await?;
        for c in &containers {
            if c.state == ContainerState::ContainerRunning as i32 {
                self.stop_container(&c.id, grace).await?;
            }
        }
        self.stop_pod_sandbox(pod_id).await?;
        for c in &containers {
            self.remove_container(&c.id).await?;
        }
        self.remove_pod_sandbox(pod_id).await
    }
}

// ---------------------------------------------------------------------------------------------
// Container logs

/// One line of a CRI container log: `<RFC 3339 nano time> <stdout|stderr> <F|P> <text>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub timestamp: String,
    pub stream: String,
    /// `P`: the line continues in the next record of the same stream.
    pub partial: bool,
    pub text: String,
}

/// Parses CRI log text; malformed lines are skipped (a line being written may be cut short).
pub fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(4, ' ');
            let timestamp = parts.next()?;
            let stream = parts.next()?;
            let tag = parts.next()?;
            let text = parts.next().unwrap_or("");
            if !matches!(stream, "stdout" | "stderr") {
                return None;
            }
            let partial = match tag.split(':').next()? {
                "F" => false,
                "P" => true,
                _ => return None,
            };
            Some(LogLine {
                timestamp: timestamp.to_owned(),
                stream: stream.to_owned(),
                partial,
                text: text.to_owned(),
            })
        })
        .collect()
}

/// Reads and parses a container log file (missing file: no lines).
pub fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(parse_log(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Whole messages (partial records joined) of `stream` (`None`: both).
pub fn log_messages(lines: &[LogLine], stream: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending: HashMap<&str, String> = HashMap::new();
    for line in lines {
        if stream.is_some_and(|s| s != line.stream) {
            continue;
        }
        let buf = pending.entry(line.stream.as_str()).or_default();
        buf.push_str(&line.text);
        if !line.partial {
            out.push(std::mem::take(buf));
        }
    }
    out
}

/// Polls the log at `path` until `done` accepts its messages (both streams); returns them.
pub async fn wait_for_log(
    path: &Path,
    timeout: Duration,
    mut done: impl FnMut(&[String]) -> bool,
) -> Result<Vec<String>> {
    let start = Instant::now();
    loop {
        let messages = log_messages(&read_log(path)?, None);
        if done(&messages) {
            return Ok(messages);
        }
        if start.elapsed() >= timeout {
            bail!(
                "log {} not as expected after {timeout:?}; last lines: {:?}",
                path.display(),
                &messages[messages.len().saturating_sub(10)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse_and_join() {
        let text = "2024-05-01T10:00:00.000000001Z stdout F tick 1\n\
                    2024-05-01T10:00:00.000000002Z stderr P half \n\
                    2024-05-01T10:00:00.000000003Z stdout F \n\
                    2024-05-01T10:00:00.000000004Z stderr F line\n\
                    garbage\n\
                    2024-05-01T10:00:00.000000005Z stdout F with  two spaces";
        let lines = parse_log(text);
        assert_eq!(lines.len(), 5);
        assert_eq!(lines[0].text, "tick 1");
        assert!(lines[1].partial);
        assert_eq!(lines[2].text, "");
        assert_eq!(
            log_messages(&lines, Some("stdout")),
            ["tick 1", "", "with  two spaces"]
        );
        assert_eq!(log_messages(&lines, Some("stderr")), ["half line"]);
    }

    #[test]
    fn host_network_config_has_kubelet_labels() {
        let config = host_network_pod_config(
            "p",
            "ns",
            "u-1",
            &[("podmigrate.io/x", "1")],
            Path::new("/logs/ns_p_u-1"),
        );
        assert_eq!(config.labels[POD_UID_LABEL], "u-1");
        assert_eq!(config.annotations["podmigrate.io/x"], "1");
        let ns = config
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(ns.network, NamespaceMode::Node as i32);
    }
}
