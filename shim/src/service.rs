//! The ttrpc Task service (containerd task API v2): a proxy in front of containerd's own runc
//! shim, which owns only two things, Checkpoint and Create-from-checkpoint.
//!
//! Every other RPC is forwarded unchanged, and the runc shim's answers (statuses included) come
//! back unchanged, so a `migrate` pod behaves exactly like a `runc` pod: exec, logs, stats, OOM
//! and exit events are all the runc shim's. One exception: a restored task's Wait, which the runc
//! shim never answers if the task never ran ([`crate::restored_wait`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use containerd_shim::{
    api::{self, Empty},
    protos::ttrpc::{self, context::Context},
    protos::types::mount::Mount,
    protos::TaskClient,
    ExitSignal, Task, TtrpcContext, TtrpcResult,
};
use tracing::{debug, info, warn};

use crate::checkpoint::{CheckpointError, CheckpointFailure, Checkpointer};
use crate::config::ShimConfig;
use crate::delegate::Delegate;
use crate::error::{describe_ttrpc_error, status};
use crate::handoff::{self, AfterKill, AtCreate};
use crate::identity::ContainerIdentity;
use crate::postcopy::{self, Streams};
use crate::reaper::MonitorReaper;
use crate::restored_wait::{RestoredWait, WaitAnswer};
use crate::{criu_config, init_skip, restore, runtime_options};

/// What we remember of each container the runc shim created for us.
struct Record {
    identity: ContainerIdentity,
    bundle: PathBuf,
    rootfs: Vec<Mount>,
    /// A restore's local copy, removed once the task has started.
    restore_dir: Option<PathBuf>,
    /// A restore to record once the task has started.
    restored: Option<Restored>,
    /// A task created from a checkpoint: its init's Waits are held until its Start is known.
    restored_wait: Option<Arc<RestoredWait>>,
}

/// A restore whose marker ([`restore::marker`]) is written once its Start succeeded.
struct Restored {
    marker: PathBuf,
    archive: PathBuf,
}

/// Task service of one shim process (one pod).
#[derive(Clone)]
pub struct TaskService {
    exit: Arc<ExitSignal>,
    delegate: Result<Delegate, String>,
    config: Arc<ShimConfig>,
    namespace: String,
    containers: Arc<Mutex<HashMap<String, Record>>>,
    /// Post-copy's page streams, served or fetched in the background.
    streams: Arc<Streams>,
}

fn forward_ctx(ctx: &TtrpcContext) -> Context {
    Context {
        metadata: ctx.metadata.clone(),
        timeout_nano: ctx.timeout_nano,
    }
}

impl TaskService {
    pub fn new(
        exit: Arc<ExitSignal>,
        delegate: Result<Delegate, String>,
        config: ShimConfig,
        namespace: String,
    ) -> Self {
        Self {
            exit,
            delegate,
            config: Arc::new(config),
            namespace,
            containers: Arc::default(),
            streams: Arc::default(),
        }
    }

    fn delegate(&self) -> TtrpcResult<&Delegate> {
        self.delegate
            .as_ref()
            .map_err(|e| status(ttrpc::Code::UNAVAILABLE, e))
    }

    /// Calls the runc shim, passing its status through untouched.
    fn forward<T>(
        &self,
        ctx: &TtrpcContext,
        call: impl FnOnce(&TaskClient, Context) -> ttrpc::Result<T>,
    ) -> TtrpcResult<T> {
        let delegate = self.delegate()?;
        call(delegate.client(), forward_ctx(ctx)).map_err(|e| match e {
            ttrpc::Error::RpcStatus(_) => e,
            other => status(
                ttrpc::Code::UNAVAILABLE,
                format!("runc shim at {}: {other}", delegate.address()),
            ),
        })
    }

    /// Ends the serving of container `id`'s memory, if it is served (post-copy's source), and
    /// waits until CRIU has let go of its processes.
    fn end_serving(&self, id: &str, why: &str) {
        if self.streams.is_running(id) {
            info!(
                id,
                why, "post-copy: ending the page stream before the source runs again"
            );
        }
        self.streams.stop(id);
    }

    /// Readies a Create for a lazy restore: the container's CRIU configuration says
    /// `lazy-pages`, and CRIU's restore works where the lazy-pages daemon opened its socket,
    /// in the images.
    fn prepare_lazy_restore(
        &self,
        req: &mut api::CreateTaskRequest,
        images: &Path,
    ) -> Result<(), String> {
        criu_config::apply_lazy_restore(
            Path::new(&req.bundle),
            &self.config.work_dir,
            &req.id,
            Path::new(criu_config::RUNC_CRIU_CONFIG),
        )
        .map_err(|e| e.to_string())?;
        let options =
            runtime_options::with_criu_work_path(req.options.clone().into_option(), images)
                .map_err(|e| e.to_string())?;
        req.options = Some(options).into();
        Ok(())
    }

    /// Kills container `id` of a lazy restore whose memory can no longer arrive, with the
    /// reason as its termination message (kubelet shows it in the pod's status).
    fn clone_stopper(&self, id: &str, bundle: &Path) -> impl Fn(&str) + Send + Sync + 'static {
        let delegate = self.delegate.clone().ok();
        let id = id.to_string();
        let message_file = postcopy::termination_message_file(bundle);
        let stopped = std::sync::atomic::AtomicBool::new(false);
        move |reason: &str| {
            // The first reason is the cause; later ones (the daemon failing once its stream
            // was cut) are its consequences.
            if stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if let Some(file) = &message_file {
                let message = format!("podmigrate post-copy: {reason}; the clone was stopped, since its memory can no longer arrive");
                if let Err(e) = std::fs::write(file, message) {
                    warn!(file = %file.display(), error = %e, "writing the termination message");
                }
            }
            // First the tasks themselves: a lazy restore under way holds the runc shim's lock
            // until a page is served, which now never happens (see cgroup_kill).
            let killed = crate::cgroup_kill::kill_container_processes(&id);
            info!(id = %id, killed, "post-copy: the clone's processes were sent SIGKILL");
            let Some(delegate) = &delegate else { return };
            let kill = api::KillRequest {
                id: id.clone(),
                signal: libc::SIGKILL as u32,
                all: true,
                ..Default::default()
            };
            if let Err(e) = delegate.client().kill(Context::default(), &kill) {
                warn!(id = %id, error = %describe_ttrpc_error(&e), "stopping a clone whose memory was lost");
            }
        }
    }

    fn restored_wait(&self, id: &str) -> Option<Arc<RestoredWait>> {
        self.containers()
            .get(id)
            .and_then(|r| r.restored_wait.clone())
    }

    fn containers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long the caller waits for this request, when it said (ttrpc carries its deadline).
fn caller_timeout(ctx: &TtrpcContext) -> Option<std::time::Duration> {
    (ctx.timeout_nano > 0).then(|| std::time::Duration::from_nanos(ctx.timeout_nano as u64))
}

/// Expands to Task methods that forward to the runc shim.
macro_rules! forward {
    ($($method:ident($request:ty) -> $response:ty;)*) => {
        $(
            fn $method(&self, ctx: &TtrpcContext, req: $request) -> TtrpcResult<$response> {
                self.forward(ctx, |client, c| client.$method(c, &req))
            }
        )*
    };
}

impl Task for TaskService {
    forward! {
        state(api::StateRequest) -> api::StateResponse;
        pids(api::PidsRequest) -> api::PidsResponse;
        pause(api::PauseRequest) -> Empty;
        exec(api::ExecProcessRequest) -> Empty;
        resize_pty(api::ResizePtyRequest) -> Empty;
        close_io(api::CloseIORequest) -> Empty;
        update(api::UpdateTaskRequest) -> Empty;
        stats(api::StatsRequest) -> api::StatsResponse;
        connect(api::ConnectRequest) -> api::ConnectResponse;
    }

    /// A source whose memory is still being served to its clone is resumed only when the
    /// migration is given up (the agent rolls back): the serving ends first, which makes CRIU
    /// let go of the processes, so they run again.
    fn resume(&self, ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.end_serving(&req.id, "the source was resumed");
        self.forward(ctx, |client, c| client.resume(c, &req))
    }

    /// Killing a source whose memory is still being served ends the serving first: CRIU holds
    /// its processes until then, and they could not die.
    fn kill(&self, ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        if req.exec_id.is_empty() {
            // A pod that departs is checkpointed before it is stopped ([`handoff`]).
            let identity = self.containers().get(&req.id).map(|r| r.identity.clone());
            if let Some(identity) = identity {
                if handoff::before_kill(&self.config, &identity, req.signal, caller_timeout(ctx))
                    == AfterKill::Done
                {
                    return Ok(Empty::new());
                }
            }
            self.end_serving(&req.id, "the source was stopped");
            if let Some(gate) = self.restored_wait(&req.id) {
                gate.ended_unstarted();
            }
        }
        self.forward(ctx, |client, c| client.kill(c, &req))
    }

    /// A restored task's init is waited for only once its Start is known; see [`RestoredWait`].
    fn wait(&self, ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        if req.exec_id.is_empty() {
            if let Some(gate) = self.restored_wait(&req.id) {
                if let WaitAnswer::Answer(response) = gate.wait() {
                    info!(id = %req.id, exit_status = response.exit_status, "wait: the restored task never ran");
                    return Ok(response);
                }
            }
        }
        self.forward(ctx, |client, c| client.wait(c, &req))
    }

    /// A clone pod's app container is created from its source's checkpoint; everything else,
    /// sandboxes included, is created as usual.
    fn create(
        &self,
        ctx: &TtrpcContext,
        mut req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let identity =
            ContainerIdentity::from_bundle(req.bundle.as_ref(), &req.id, &self.namespace)
                .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, crate::error::chain(&e)))?;
        // runc's own options for the runc shim, whatever runtime type containerd knows us by.
        req.options = crate::runtime_options::for_delegate(req.options.as_ref())
            .map_err(|e| {
                status(
                    ttrpc::Code::INVALID_ARGUMENT,
                    format!("creating {}: {e}", identity.describe()),
                )
            })?
            .into();
        // Without it a dump fails on a connection arriving during the freeze, and a restore
        // is slower: worth a warning, not a failed Create.
        match criu_config::apply(
            Path::new(&req.bundle),
            &self.config.work_dir,
            Path::new(criu_config::RUNC_CRIU_CONFIG),
        ) {
            Ok(applied) => debug!(container = %identity.describe(), ?applied, "CRIU configuration"),
            Err(e) => {
                warn!(container = %identity.describe(), error = %e, "creating without podmigrate's CRIU configuration")
            }
        }
        // A container that names no source may still replace a departed pod ([`handoff`]).
        let mut identity = identity;
        if handoff::at_create(&self.config, &mut identity, caller_timeout(ctx)) == AtCreate::Skip {
            if let Err(e) = init_skip::skip(Path::new(&req.bundle), &self.config.work_dir) {
                warn!(container = %identity.describe(), error = %e, "running the init container again");
            }
        }
        let mut restore_dir = None;
        let mut restored = None;
        let plan = restore::plan(&self.config.work_dir, &identity, !req.checkpoint.is_empty());
        if let restore::CreatePlan::Restarted { source, marker } = &plan {
            if let Some(reason) = postcopy::lost_reason(marker) {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    format!(
                        "creating {}: its post-copy restore lost its memory ({reason}), so it cannot start again",
                        identity.describe()
                    ),
                ));
            }
            info!(container = %identity.describe(), clone_of = %source, marker = %marker.display(), "restored once already on this node: a restarted container starts fresh");
        }
        let mut fetching = None;
        if let restore::CreatePlan::Restore { source } = plan {
            match restore::prepare(&self.config, &identity, source, &req.rootfs) {
                Ok(mut prepared) => {
                    info!(container = %identity.describe(), archive = %prepared.archive.display(), postcopy = prepared.fetching.is_some(), "creating from checkpoint");
                    if let Some(lazy) = prepared.fetching.take() {
                        if let Err(e) = self.prepare_lazy_restore(&mut req, &prepared.images) {
                            lazy.abandon();
                            restore::discard(&prepared.dir);
                            return Err(status(
                                ttrpc::Code::INTERNAL,
                                format!(
                                    "creating {} for a post-copy restore: {e}",
                                    identity.describe()
                                ),
                            ));
                        }
                        fetching = Some(lazy);
                    }
                    req.checkpoint = prepared.images.display().to_string();
                    restore_dir = Some(prepared.dir);
                    restored =
                        restore::marker(&self.config.work_dir, &identity).map(|marker| Restored {
                            marker,
                            archive: prepared.archive,
                        });
                }
                Err(err) if identity.fallback_fresh => {
                    warn!(container = %identity.describe(), error = %err, "podmigrate.io/fallback=fresh: starting the container anew");
                }
                Err(err) => return Err(restore::answer(err)),
            }
        }
        let restored_wait = (!req.checkpoint.is_empty()).then(Arc::default);
        let created = self.forward(ctx, |client, c| client.create(c, &req));
        match created {
            Ok(response) => {
                // The daemon needs the images until the last page: the stream removes them. (Taken
                // only then: a plain restore's copy goes once the task has started.)
                if let Some(fetching) = fetching {
                    if let Some(dir) = restore_dir.take() {
                        self.streams.fetch(
                            &req.id,
                            identity.describe(),
                            fetching,
                            dir,
                            restored.as_ref().map(|r| r.marker.clone()),
                            self.clone_stopper(&req.id, Path::new(&req.bundle)),
                        );
                    }
                }
                self.containers().insert(
                    req.id.clone(),
                    Record {
                        identity,
                        bundle: req.bundle.clone().into(),
                        rootfs: req.rootfs.clone(),
                        restore_dir,
                        restored,
                        restored_wait,
                    },
                );
                Ok(response)
            }
            Err(err) => {
                if let Some(fetching) = fetching {
                    fetching.abandon();
                }
                if let Some(dir) = restore_dir {
                    restore::discard(&dir);
                }
                Err(err)
            }
        }
    }

    /// A restored task's processes come back here (runc restore); its local copy of the
    /// checkpoint is no longer needed after that, whatever the outcome. Once it succeeded, the
    /// container is marked restored: if it exits and kubelet restarts it, it starts fresh.
    fn start(&self, ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let gate = req
            .exec_id
            .is_empty()
            .then(|| self.restored_wait(&req.id))
            .flatten();
        if let Some(gate) = &gate {
            gate.starting();
        }
        let result = self.forward(ctx, |client, c| client.start(c, &req));
        if let Some(gate) = &gate {
            gate.start_answered(result.is_ok());
        }
        if req.exec_id.is_empty() {
            if result.is_err() {
                // A lazy restore that failed fetches nothing: its daemon and stream go.
                self.streams.stop(&req.id);
            }
            // A lazy restore is done with its own CRIU configuration: later checkpoints of the
            // container must not read `lazy-pages`.
            if let Err(e) = criu_config::settle(
                &self.config.work_dir,
                &req.id,
                Path::new(criu_config::RUNC_CRIU_CONFIG),
            ) {
                warn!(id = %req.id, error = %e, "settling the CRIU configuration after a lazy restore");
            }
            let (dir, restored, identity) = match self.containers().get_mut(&req.id) {
                Some(r) => (
                    r.restore_dir.take(),
                    r.restored.take(),
                    Some(r.identity.clone()),
                ),
                None => (None, None, None),
            };
            if let Some(dir) = dir {
                restore::discard(&dir);
            }
            if let (Ok(_), Some(Restored { marker, archive }), Some(identity)) =
                (&result, restored, identity)
            {
                match restore::mark_restored(&marker, &identity, &archive) {
                    Ok(()) => {
                        info!(container = %identity.describe(), marker = %marker.display(), "restored; a restart of this container will start it fresh")
                    }
                    Err(e) => {
                        warn!(container = %identity.describe(), marker = %marker.display(), error = %e, "could not record the restore: a restart of this container would try to restore again")
                    }
                }
            }
        }
        result
    }

    fn delete(
        &self,
        ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        if req.exec_id.is_empty() {
            if let Some(gate) = self.restored_wait(&req.id) {
                gate.ended_unstarted();
            }
        }
        let response = self.forward(ctx, |client, c| client.delete(c, &req))?;
        if req.exec_id.is_empty() {
            self.streams.stop(&req.id);
            criu_config::forget(&self.config.work_dir, &req.id);
            if let Some(dir) = self
                .containers()
                .remove(&req.id)
                .and_then(|r| r.restore_dir)
            {
                restore::discard(&dir);
            }
        }
        Ok(response)
    }

    /// Dumps the container and commits its archive to the share; see [`Checkpointer`].
    fn checkpoint(
        &self,
        ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        let delegate = self.delegate()?;
        let (identity, bundle, rootfs) = {
            let containers = self.containers();
            let record = containers.get(&req.id).ok_or_else(|| {
                CheckpointError::new(
                    format!("container {}", req.id),
                    CheckpointFailure::NotManaged,
                )
            })?;
            (
                record.identity.clone(),
                record.bundle.clone(),
                record.rootfs.clone(),
            )
        };
        if identity.is_sandbox {
            return Err(
                CheckpointError::new(identity.describe(), CheckpointFailure::Sandbox).into(),
            );
        }
        let forward_ctx = forward_ctx(ctx);
        let (committed, postcopy) = Checkpointer {
            ctx: &forward_ctx,
            containerd_namespace: &self.namespace,
            reaper: &MonitorReaper,
            delegate,
            config: &self.config,
            identity: &identity,
            bundle: &bundle,
            rootfs: &rootfs,
        }
        .run(&req)?;
        if let Some(source) = postcopy {
            self.streams.serve(
                &req.id,
                identity.describe(),
                source.serving,
                committed.archive,
                source.clone_pod_uid,
            );
        }
        Ok(Empty::default())
    }

    /// containerd sends this when it no longer needs the shim. The runc shim exits once it
    /// hosts no tasks; so do we.
    fn shutdown(&self, ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        if let Ok(delegate) = self.delegate() {
            if let Err(e) = delegate.client().shutdown(forward_ctx(ctx), &req) {
                // Once it has exited the connection drops mid-call; that is its answer.
                info!(error = %describe_ttrpc_error(&e), "runc shim shutdown");
            }
        }
        if self.containers().is_empty() {
            info!(id = %req.id, "shutdown: no tasks hosted, exiting");
            self.exit.signal();
        }
        Ok(Empty::default())
    }
}
