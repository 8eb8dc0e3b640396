//! The `containerd_shim::Shim` implementation: what `start` and `delete` do.

use std::{os::unix::fs::FileTypeExt, path::Path, sync::Arc};

use std::io::Read;

use containerd_shim::{
    publisher::RemotePublisher, Config, DeleteResponse, ExitSignal, Flags, StartOpts,
};
use tracing::{debug, info, warn};

use crate::config::ShimConfig;
use crate::delegate::{self, Delegate};
use crate::error::{Error, Result};
use crate::service::TaskService;

/// OCI annotations that put several containers into one shim, in priority order. Same list as
/// containerd's runc v2 shim: CRI sets the sandbox id on every container of a pod, so a pod
/// gets one shim and hence one place that can checkpoint all of its containers together.
pub const GROUP_ANNOTATIONS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];

/// Exit status containerd records for a task whose shim had to be cleaned up: SIGKILL, as the
/// Go shims report.
pub const KILLED_EXIT_STATUS: u32 = 128 + libc::SIGKILL as u32;

/// State of one invocation of the binary.
pub struct MigrateShim {
    exit: Arc<ExitSignal>,
    flags: delegate::ProtocolFlags,
    namespace: String,
    id: String,
    /// `-socket` of the serving process (`unix:///run/containerd/s/<hash>`); empty otherwise.
    socket: String,
    config: ShimConfig,
}

impl containerd_shim::Shim for MigrateShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self {
            exit: Arc::new(ExitSignal::default()),
            flags: args.into(),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            socket: args.socket.clone(),
            config: ShimConfig::from_env(),
        }
    }

    /// `start`: start the runc shim for this container's group, then re-exec ourselves as
    /// the long-running ttrpc server in front of it, and print our address.
    ///
    /// Our socket is derived from the group id with a suffix, so it never collides with the
    /// runc shim's, which containerd-shim derives the same way. If a shim for the same group
    /// already serves our socket, the child notices and exits, and the new container joins the
    /// existing pair.
    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = grouping_id(Path::new(containerd_shim::util::CONFIG_FILE_NAME), &opts.id)?;
        debug!(namespace = %opts.namespace, id = %opts.id, %grouping, "start");
        let mut runtime_options = Vec::new();
        std::io::stdin()
            .read_to_end(&mut runtime_options)
            .map_err(Error::Stdin)?;
        let delegate = delegate::resolve(&self.config.delegate, &self.flags);
        debug!(delegate = %delegate.display(), "delegate");
        // The runc shim's own options: unchanged from a runc-typed runtime, read from the
        // ConfigPath file for ours (containerd 1.6's CRI); see `runtime_options`.
        let runtime_options = crate::runtime_options::stdin_for_delegate(&runtime_options)
            .map_err(Error::RuntimeOptions)?;
        let delegate_address = delegate::start(&delegate, &self.flags, &runtime_options)?;
        let (pid, address) = containerd_shim::spawn(
            opts,
            &format!("{grouping}/podmigrate"),
            vec![(delegate::ENV_DELEGATE_ADDRESS, delegate_address.as_str())],
        )?;
        block_child_signals();
        info!(pid, %address, %delegate_address, %grouping, "shim started");
        Ok(address)
    }

    /// `delete`: containerd's cleanup after a shim died or a launch failed. The runc shim owns
    /// the container, its mounts and its state, so its own `delete` does the work.
    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let delegate = delegate::resolve(&self.config.delegate, &self.flags);
        match delegate::delete(&delegate, &self.flags) {
            Ok(response) => {
                info!(namespace = %self.namespace, id = %self.id, "delete: cleaned up by the runc shim");
                Ok(response)
            }
            Err(err) => {
                warn!(namespace = %self.namespace, id = %self.id, error = %err, "delete: the runc shim could not clean up");
                Ok(DeleteResponse {
                    pid: 0,
                    exit_status: KILLED_EXIT_STATUS,
                    exited_at: Some(containerd_shim::util::timestamp()?).into(),
                    ..Default::default()
                })
            }
        }
    }

    /// Blocks until `Shutdown`, then removes our socket.
    ///
    /// containerd-shim would remove it after we return, but it finds the path by reading
    /// `./address` in the bundle, which containerd may already have deleted by then (it cleans
    /// up as soon as the connection drops), leaking a socket in /run/containerd/s. Unlinking a
    /// listening socket's path is harmless: open connections keep working.
    fn wait(&mut self) {
        self.exit.wait();
        info!(namespace = %self.namespace, id = %self.id, "shim exiting");
        remove_socket(&self.socket);
    }

    fn create_task_service(&self, _publisher: RemotePublisher) -> Self::T {
        // The runc shim publishes the task events itself, straight to containerd.
        let delegate = std::env::var(delegate::ENV_DELEGATE_ADDRESS)
            .map_err(|_| {
                format!(
                    "{} is not set: the shim was not started by `start`",
                    delegate::ENV_DELEGATE_ADDRESS
                )
            })
            .and_then(|address| Delegate::connect(&address).map_err(|e| e.to_string()));
        if let Err(err) = &delegate {
            warn!(error = %err, "no runc shim to forward to");
        }
        TaskService::new(
            self.exit.clone(),
            delegate,
            self.config.clone(),
            self.namespace.clone(),
        )
    }
}

/// Blocks SIGCHLD and SIGPIPE for the rest of this `start` invocation.
///
/// containerd-shim's `bootstrap` registers signal-hook handlers for SIGCHLD and SIGPIPE in
/// every invocation, `start` included, and unregisters them as `start` returns. For a pod's
/// second container the server we just spawned exits at once (the pair already serves the
/// socket), and its SIGCHLD can arrive while that registration is being torn down: the handler
/// then writes to signal-hook's already-closed wake-up socket, which raises SIGPIPE, whose
/// handler does the same, forever. `start` spins at 100% CPU until containerd kills it
/// ("failed to start shim: start failed: : signal: killed") and the container fails to start.
/// Nothing after the spawn needs either signal (a write to a closed stdout then fails with
/// EPIPE instead), a pending SIGCHLD dies with this process, and children are unaffected (std
/// resets the signal mask of every child it spawns, and the spawning is done by now). `start`
/// runs no other threads, so masking this one suffices.
fn block_child_signals() {
    // SAFETY: sigemptyset/sigaddset initialise a local sigset_t; pthread_sigmask only changes
    // this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            warn!("could not block SIGCHLD and SIGPIPE; `start` may hang on exit");
        }
    }
}

/// Removes the unix socket named by a shim address, if it is one.
fn remove_socket(address: &str) {
    let Some(path) = address.strip_prefix("unix://") else {
        return;
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(err) = std::fs::remove_file(path) {
                warn!(path, %err, "removing shim socket");
            }
        }
        _ => {}
    }
}

/// Picks the id that decides which shim serves a container: the first group annotation in the
/// bundle's OCI spec, else the container id itself.
pub fn grouping_id(spec_path: &Path, id: &str) -> Result<String> {
    let raw = std::fs::read(spec_path).map_err(|source| Error::ReadSpec {
        path: spec_path.to_owned(),
        source,
    })?;
    let spec: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|source| Error::ParseSpec {
            path: spec_path.to_owned(),
            source,
        })?;
    let annotations = &spec["annotations"];
    Ok(GROUP_ANNOTATIONS
        .iter()
        .find_map(|key| annotations[*key].as_str().filter(|v| !v.is_empty()))
        .unwrap_or(id)
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(annotations: serde_json::Value) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        let spec = serde_json::json!({ "ociVersion": "1.1.0", "annotations": annotations });
        std::fs::write(file.path(), spec.to_string()).unwrap();
        file
    }

    #[test]
    fn grouping_defaults_to_container_id() {
        let spec = spec_with(serde_json::json!({}));
        assert_eq!(grouping_id(spec.path(), "c1").unwrap(), "c1");
    }

    #[test]
    fn grouping_follows_pod_sandbox() {
        let spec = spec_with(serde_json::json!({ "io.kubernetes.cri.sandbox-id": "pod1" }));
        assert_eq!(grouping_id(spec.path(), "c1").unwrap(), "pod1");
    }

    #[test]
    fn explicit_group_wins_over_sandbox() {
        let spec = spec_with(serde_json::json!({
            "io.kubernetes.cri.sandbox-id": "pod1",
            "io.containerd.runc.v2.group": "g",
        }));
        assert_eq!(grouping_id(spec.path(), "c1").unwrap(), "g");
    }

    #[test]
    fn missing_spec_is_a_typed_error() {
        let err = grouping_id(Path::new("/nonexistent/config.json"), "c1").unwrap_err();
        assert!(matches!(err, Error::ReadSpec { .. }), "{err:?}");
    }
}
