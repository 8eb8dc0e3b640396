//! What the phase machine needs from the world, as three traits: the Kubernetes API
//! ([`Cluster`]), the node's container runtime ([`Runtime`]) and the share ([`Share`]). The
//! agent runs on the real ones ([`KubeCluster`], [`Containerd`], [`DirShare`]); the machine's
//! unit tests run every transition on fakes, without root or a cluster.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, Recorder};
use kube::Resource;
use podmigrate_checkpoint::gc::Lease;
use podmigrate_checkpoint::prefault::Readiness;
use podmigrate_checkpoint::share::{self, CommitRecord, PagesRecord, ShareError};
use podmigrate_checkpoint::{gc, prefault};
use podmigrate_vocabulary::CLONE_OF_LABEL;
use tracing::warn;

use super::containerd::{AppContainer, Containerd, ContainerdError, TaskState};
use crate::pod::pod_name;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A guarded patch found the pod changed since it was read (HTTP 409).
    #[error("pod {pod} changed since it was read")]
    Conflict { pod: String },
    #[error("Kubernetes API, {what} {name}: {source}")]
    Api {
        what: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The Kubernetes API, as the machine uses it.
pub trait Cluster: Send + Sync + 'static {
    fn pod(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<Pod>, ClusterError>> + Send;
    fn namespace(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Namespace>, ClusterError>> + Send;
    /// Clones (pods with [`CLONE_OF_LABEL`]): of `source` in `namespace`, or every one in the
    /// cluster.
    fn clones(
        &self,
        of: Option<(&str, &str)>,
    ) -> impl Future<Output = Result<Vec<Pod>, ClusterError>> + Send;
    /// A JSON merge patch of `pod`; one carrying `metadata.resourceVersion` fails with
    /// [`ClusterError::Conflict`] if the pod changed since.
    fn patch(
        &self,
        pod: &Pod,
        patch: serde_json::Value,
    ) -> impl Future<Output = Result<Pod, ClusterError>> + Send;
    /// Deletes a pod; one already gone is no error.
    fn delete(
        &self,
        namespace: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), ClusterError>> + Send;
    /// Publishes an Event on `pod`; a failure is logged, never fatal.
    fn event(&self, pod: &Pod, event: Event) -> impl Future<Output = ()> + Send;
}

/// The node's container runtime, as the machine uses it.
pub trait Runtime: Send + Sync + 'static {
    fn app_containers(
        &self,
        namespace: &str,
        pod: &str,
    ) -> impl Future<Output = Result<Vec<AppContainer>, ContainerdError>> + Send;
    fn task_state(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<TaskState, ContainerdError>> + Send;
    fn pause(&self, id: &str) -> impl Future<Output = Result<(), ContainerdError>> + Send;
    fn resume(&self, id: &str) -> impl Future<Output = Result<(), ContainerdError>> + Send;
    fn kill(
        &self,
        id: &str,
        signal: i32,
    ) -> impl Future<Output = Result<(), ContainerdError>> + Send;
    /// Checkpoints a task through our shim (dump, pack, commit, commit record) and leaves it
    /// as it was.
    fn checkpoint(
        &self,
        id: &str,
        image: &Path,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), ContainerdError>> + Send;
    /// The anonymous memory of the container's main process: what its pages image will hold.
    fn memory(&self, id: &str) -> impl Future<Output = Option<u64>> + Send;
    /// Why this node cannot serve a post-copy migration's memory, if it cannot.
    fn postcopy_unavailable(&self) -> Option<String>;
}

/// The share, as the source's agent uses it: one source pod's directory (see
/// [`podmigrate_checkpoint::share`] for every name in it).
pub trait Share: Send + Sync + 'static {
    fn write_lease(
        &self,
        namespace: &str,
        source: &str,
        clone_uid: &str,
        lease: &Lease,
    ) -> Result<(), String>;
    /// Removes earlier archives of these containers, so none is mistaken for this migration's.
    fn clear_archives(&self, namespace: &str, source: &str, containers: &[String]);
    /// Tells the clone's shim how much memory to reserve for `container`, and whether the
    /// migration asks for post-copy.
    fn announce(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
        expectation: (u64, bool),
    ) -> Result<(), String>;
    /// What the clone's shim said once ready, if it did.
    fn readiness(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Option<Readiness>;
    /// The source's shim's record of a post-copy page stream.
    fn pages_record(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Result<Option<PagesRecord>, ShareError>;
    fn commit_record(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Result<Option<CommitRecord>, ShareError>;
    /// Bytes packed so far onto the share for these containers (archives being written).
    fn packing_bytes(&self, namespace: &str, source: &str, containers: &[String]) -> u64;
    /// Ends the migration's use of the share: its lease, reservations and commit records go;
    /// its archives go too, or stay pinned when `keep`. `Err` names the first file that could
    /// not go (one already gone is no error); the rest were still tried.
    fn release(
        &self,
        namespace: &str,
        source: &str,
        clone_uid: &str,
        containers: &[String],
        keep: bool,
    ) -> Result<(), String>;
}

/// [`Cluster`] on the API server.
pub struct KubeCluster {
    pub client: kube::Client,
    pub recorder: Recorder,
}

fn api_error(what: &'static str, name: &str) -> impl FnOnce(kube::Error) -> ClusterError {
    let name = name.to_string();
    move |source| ClusterError::Api { what, name, source }
}

impl Cluster for KubeCluster {
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ClusterError> {
        Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(api_error("reading pod", &format!("{namespace}/{name}")))
    }

    async fn namespace(&self, name: &str) -> Result<Option<Namespace>, ClusterError> {
        Api::<Namespace>::all(self.client.clone())
            .get_opt(name)
            .await
            .map_err(api_error("reading namespace", name))
    }

    async fn clones(&self, of: Option<(&str, &str)>) -> Result<Vec<Pod>, ClusterError> {
        let (api, params, what) = match of {
            Some((namespace, source)) => (
                Api::<Pod>::namespaced(self.client.clone(), namespace),
                ListParams::default().labels(&format!("{CLONE_OF_LABEL}={source}")),
                format!("{namespace}/{source}"),
            ),
            None => (
                Api::<Pod>::all(self.client.clone()),
                ListParams::default().labels(CLONE_OF_LABEL),
                "the cluster".to_string(),
            ),
        };
        Ok(api
            .list(&params)
            .await
            .map_err(api_error("listing the clones of", &what))?
            .items)
    }

    async fn patch(&self, pod: &Pod, patch: serde_json::Value) -> Result<Pod, ClusterError> {
        let name = pod_name(pod);
        Api::<Pod>::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or_default(),
        )
        .patch(
            pod.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(|e| match e {
            kube::Error::Api(status) if status.code == 409 => {
                ClusterError::Conflict { pod: name.clone() }
            }
            e => api_error("patching pod", &name)(e),
        })
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<(), ClusterError> {
        match Api::<Pod>::namespaced(self.client.clone(), namespace)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(api_error("deleting pod", &format!("{namespace}/{name}"))(e)),
        }
    }

    async fn event(&self, pod: &Pod, event: Event) {
        if let Err(e) = self.recorder.publish(&event, &pod.object_ref(&())).await {
            warn!(pod = %pod_name(pod), error = %e, "recording an event");
        }
    }
}

impl Runtime for Containerd {
    async fn app_containers(
        &self,
        namespace: &str,
        pod: &str,
    ) -> Result<Vec<AppContainer>, ContainerdError> {
        Containerd::app_containers(self, namespace, pod).await
    }

    async fn task_state(&self, id: &str) -> Result<TaskState, ContainerdError> {
        Containerd::task_state(self, id).await
    }

    async fn pause(&self, id: &str) -> Result<(), ContainerdError> {
        Containerd::pause(self, id).await
    }

    async fn resume(&self, id: &str) -> Result<(), ContainerdError> {
        Containerd::resume(self, id).await
    }

    async fn kill(&self, id: &str, signal: i32) -> Result<(), ContainerdError> {
        Containerd::kill(self, id, signal).await
    }

    async fn checkpoint(
        &self,
        id: &str,
        image: &Path,
        timeout: Duration,
    ) -> Result<(), ContainerdError> {
        Containerd::checkpoint(self, id, image, false, timeout).await
    }

    async fn memory(&self, id: &str) -> Option<u64> {
        let pid = self.task_pid(id).await.ok().flatten()?;
        prefault::process_memory(pid)
    }

    fn postcopy_unavailable(&self) -> Option<String> {
        podmigrate_checkpoint::ops::postcopy::source_unfit()
    }
}

/// [`Share`] on the share's mount point.
pub struct DirShare {
    pub root: PathBuf,
}

impl DirShare {
    fn pod_dir(&self, namespace: &str, source: &str) -> Result<PathBuf, ShareError> {
        share::pod_dir(&self.root, namespace, source)
    }

    fn archive(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
    ) -> Result<PathBuf, ShareError> {
        share::archive_path(&self.root, namespace, source, container)
    }
}

impl Share for DirShare {
    fn write_lease(
        &self,
        namespace: &str,
        source: &str,
        clone_uid: &str,
        lease: &Lease,
    ) -> Result<(), String> {
        let dir = self.pod_dir(namespace, source).map_err(|e| e.to_string())?;
        gc::write_lease(&dir, clone_uid, lease)
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn clear_archives(&self, namespace: &str, source: &str, containers: &[String]) {
        for c in containers {
            if let Ok(path) = self.archive(namespace, source, c) {
                let _ = std::fs::remove_file(share::commit_record_path(&path));
                let _ = std::fs::remove_file(path);
            }
        }
    }

    fn announce(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
        (bytes, postcopy): (u64, bool),
    ) -> Result<(), String> {
        let dir = self.pod_dir(namespace, source).map_err(|e| e.to_string())?;
        let expectation = prefault::Expectation {
            clone_pod_uid: clone_uid.to_string(),
            bytes,
            postcopy,
        };
        prefault::announce(&dir, container, &expectation).map_err(|e| e.to_string())
    }

    fn readiness(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Option<Readiness> {
        let dir = self.pod_dir(namespace, source).ok()?;
        prefault::readiness(&dir, container, clone_uid)
    }

    fn pages_record(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Result<Option<PagesRecord>, ShareError> {
        share::read_pages_record(&self.archive(namespace, source, container)?, clone_uid)
    }

    fn commit_record(
        &self,
        namespace: &str,
        source: &str,
        container: &str,
        clone_uid: &str,
    ) -> Result<Option<CommitRecord>, ShareError> {
        share::read_commit_record(&self.archive(namespace, source, container)?, clone_uid)
    }

    fn packing_bytes(&self, namespace: &str, source: &str, containers: &[String]) -> u64 {
        let Ok(dir) = self.pod_dir(namespace, source) else {
            return 0;
        };
        containers
            .iter()
            .map(|c| share::packing_bytes(&dir, c))
            .sum()
    }

    fn release(
        &self,
        namespace: &str,
        source: &str,
        clone_uid: &str,
        containers: &[String],
        keep: bool,
    ) -> Result<(), String> {
        let Ok(dir) = self.pod_dir(namespace, source) else {
            return Ok(());
        };
        let mut first_error = None;
        let mut remove = |path: &Path| match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                first_error.get_or_insert(format!("removing {}: {e}", path.display()));
            }
            _ => {}
        };
        if !clone_uid.is_empty() {
            remove(&share::lease_path(&dir, clone_uid));
            prefault::withdraw(&dir, clone_uid);
        }
        for c in containers {
            let Ok(path) = self.archive(namespace, source, c) else {
                continue;
            };
            remove(&share::commit_record_path(&path));
            remove(&share::pages_record_path(&path));
            if keep {
                // Kept on request: pinned, so GC leaves it too.
                let pin = share::pin_path(&path);
                if let Err(e) = std::fs::write(&pin, b"") {
                    warn!(pin = %pin.display(), error = %e, "pinning a kept archive");
                }
            } else {
                remove(&path);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
