//! The agent's hands on its node: containerd's API, namespace `k8s.io`, where kubelet's CRI
//! calls put every pod's containers. A pod's app containers are found by the labels the CRI
//! plugin sets, and checkpointed through the task API, which reaches our shim.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    CheckpointTaskRequest, GetRequest, KillRequest, ListContainersRequest, PauseTaskRequest,
    ResumeTaskRequest,
};
use containerd_client::tonic::{self, Request};
use containerd_client::types::v1::Status;
use containerd_client::Client;
use podmigrate_proto::v1::RuncCheckpointOptions;
use podmigrate_vocabulary::RUNC_CHECKPOINT_OPTIONS_TYPE_URL;
use prost::Message;

/// The containerd namespace of kubelet's pods.
pub const K8S_NAMESPACE: &str = "k8s.io";
const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
/// `container` for app containers, `sandbox` for the pause container.
const LABEL_KIND: &str = "io.cri-containerd.kind";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connecting to containerd at {socket}: {reason}")]
    Connect { socket: PathBuf, reason: String },
    /// containerd answered with an error status: `code` says which kind (the shim's typed
    /// errors keep their own codes through containerd), `message` what failed.
    #[error("containerd {call} for {target}: {code:?}: {message}")]
    Call {
        call: &'static str,
        target: String,
        code: tonic::Code,
        message: String,
    },
    #[error("containerd {call} for {target} did not answer within {timeout:?} ({})", timeout_setting(.call))]
    Timeout {
        call: &'static str,
        target: String,
        timeout: Duration,
    },
}

/// Which setting bounds a containerd call, for its timeout error.
fn timeout_setting(call: &str) -> &'static str {
    if call == "Checkpoint" {
        "what was left of the agent's --completion-timeout-per-gib budget"
    } else {
        "the agent's 30s bound on quick containerd calls"
    }
}

/// A pod's app container as containerd knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppContainer {
    pub id: String,
    /// The container's name in the pod spec.
    pub name: String,
}

/// What a task is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    Running,
    Paused,
    Stopped,
    Other,
    /// containerd has the container but no task (never started, or deleted after exit).
    Absent,
}

#[derive(Clone)]
pub struct Containerd {
    client: std::sync::Arc<Client>,
    socket: PathBuf,
    /// Bound on the quick calls; a checkpoint gets its own, longer bound.
    call_timeout: Duration,
}

fn namespaced<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "containerd-namespace",
        K8S_NAMESPACE.parse().expect("a valid header value"),
    );
    request
}

impl Containerd {
    pub async fn connect(socket: &Path) -> Result<Self, ContainerdError> {
        let client = Client::from_path(socket)
            .await
            .map_err(|e| ContainerdError::Connect {
                socket: socket.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(Containerd {
            client: std::sync::Arc::new(client),
            socket: socket.to_path_buf(),
            call_timeout: Duration::from_secs(30),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn bounded<T>(
        &self,
        call: &'static str,
        target: &str,
        timeout: Duration,
        future: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ContainerdError> {
        match tokio::time::timeout(timeout, future).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(ContainerdError::Call {
                call,
                target: target.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(ContainerdError::Timeout {
                call,
                target: target.to_string(),
                timeout,
            }),
        }
    }

    /// The app containers of a pod (never its sandbox), by the CRI plugin's labels.
    pub async fn app_containers(
        &self,
        namespace: &str,
        pod: &str,
    ) -> Result<Vec<AppContainer>, ContainerdError> {
        let filter = format!(
            "labels.\"{LABEL_POD_NAMESPACE}\"=={namespace},labels.\"{LABEL_POD_NAME}\"=={pod},labels.\"{LABEL_KIND}\"==container"
        );
        let target = format!("pod {namespace}/{pod}");
        let listed = self
            .bounded(
                "ListContainers",
                &target,
                self.call_timeout,
                self.client
                    .containers()
                    .list(namespaced(ListContainersRequest {
                        filters: vec![filter],
                    })),
            )
            .await?;
        let mut containers: Vec<AppContainer> = listed
            .containers
            .into_iter()
            .filter_map(|c| {
                let name = c.labels.get(LABEL_CONTAINER_NAME)?.clone();
                Some(AppContainer { id: c.id, name })
            })
            .collect();
        containers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        Ok(containers)
    }

    pub async fn task_state(&self, id: &str) -> Result<TaskState, ContainerdError> {
        let request = namespaced(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        });
        match tokio::time::timeout(self.call_timeout, self.client.tasks().get(request)).await {
            Ok(Ok(response)) => Ok(match response.into_inner().process.map(|p| p.status) {
                Some(s) if s == Status::Running as i32 => TaskState::Running,
                Some(s) if s == Status::Paused as i32 => TaskState::Paused,
                Some(s) if s == Status::Stopped as i32 => TaskState::Stopped,
                Some(_) => TaskState::Other,
                None => TaskState::Absent,
            }),
            Ok(Err(status)) if status.code() == tonic::Code::NotFound => Ok(TaskState::Absent),
            Ok(Err(status)) => Err(ContainerdError::Call {
                call: "GetTask",
                target: id.to_string(),
                code: status.code(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(ContainerdError::Timeout {
                call: "GetTask",
                target: id.to_string(),
                timeout: self.call_timeout,
            }),
        }
    }

    /// The pid of a container's main process, if it has a task.
    pub async fn task_pid(&self, id: &str) -> Result<Option<u32>, ContainerdError> {
        let request = namespaced(GetRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        });
        match self
            .bounded(
                "GetTask",
                id,
                self.call_timeout,
                self.client.tasks().get(request),
            )
            .await
        {
            Ok(response) => Ok(response.process.map(|p| p.pid).filter(|&pid| pid > 0)),
            Err(ContainerdError::Call {
                code: tonic::Code::NotFound,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn pause(&self, id: &str) -> Result<(), ContainerdError> {
        let request = namespaced(PauseTaskRequest {
            container_id: id.to_string(),
        });
        self.bounded(
            "Pause",
            id,
            self.call_timeout,
            self.client.tasks().pause(request),
        )
        .await
        .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<(), ContainerdError> {
        let request = namespaced(ResumeTaskRequest {
            container_id: id.to_string(),
        });
        self.bounded(
            "Resume",
            id,
            self.call_timeout,
            self.client.tasks().resume(request),
        )
        .await
        .map(drop)
    }

    /// Signals every process of the task.
    pub async fn kill(&self, id: &str, signal: i32) -> Result<(), ContainerdError> {
        let request = namespaced(KillRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
            signal: signal as u32,
            all: true,
        });
        self.bounded(
            "Kill",
            id,
            self.call_timeout,
            self.client.tasks().kill(request),
        )
        .await
        .map(drop)
    }

    /// Checkpoints a task through our shim, which dumps it into `image_path` (the whole
    /// checkpoint directory) and commits the archive to the share. With `exit`, the task stops
    /// once the archive is committed; without, it is left as it was (running, or paused).
    pub async fn checkpoint(
        &self,
        id: &str,
        image_path: &Path,
        exit: bool,
        timeout: Duration,
    ) -> Result<(), ContainerdError> {
        let options = RuncCheckpointOptions {
            exit,
            image_path: image_path.display().to_string(),
            ..RuncCheckpointOptions::default()
        };
        let request = namespaced(CheckpointTaskRequest {
            container_id: id.to_string(),
            parent_checkpoint: String::new(),
            options: Some(prost_types::Any {
                type_url: RUNC_CHECKPOINT_OPTIONS_TYPE_URL.to_string(),
                value: options.encode_to_vec(),
            }),
        });
        self.bounded(
            "Checkpoint",
            id,
            timeout,
            self.client.tasks().checkpoint(request),
        )
        .await
        .map(drop)
    }
}
