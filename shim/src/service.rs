//! The ttrpc Task service (containerd task API v2) that containerd drives the shim through.
//!
//! Skeleton stage: only `Connect` and `Shutdown` are served, because containerd needs them to
//! tear a shim down cleanly. Every other RPC answers ttrpc `UNIMPLEMENTED` with a message naming
//! this shim, which containerd turns into `errdefs.ErrNotImplemented` ("... not implemented").
//!
//! We override every method on purpose: the generated trait defaults answer `NOT_FOUND` ("is
//! not supported"), and containerd reads `NOT_FOUND` as "already gone", e.g. it treats a
//! failed `Delete` as success. That would be the shim pretending.

use std::sync::Arc;

use containerd_shim::{
    api::{self, Empty},
    protos::ttrpc,
    ExitSignal, Task, TtrpcContext, TtrpcResult,
};
use tracing::{info, warn};

use crate::{BINARY_NAME, VERSION};

/// Builds the status every not-yet-served RPC returns.
pub fn unimplemented_status(rpc: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(
        ttrpc::Code::UNIMPLEMENTED,
        format!("{BINARY_NAME}: {rpc} is not implemented yet"),
    ))
}

/// Task service of one shim process (one pod, or one container outside Kubernetes).
#[derive(Clone)]
pub struct TaskService {
    /// Signalled by `Shutdown`; `MigrateShim::wait` blocks on it, then the process exits.
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

/// Expands to Task methods that log and answer `UNIMPLEMENTED`.
macro_rules! not_yet {
    ($($method:ident($request:ty) -> $response:ty = $rpc:literal;)*) => {
        $(
            fn $method(&self, _ctx: &TtrpcContext, req: $request) -> TtrpcResult<$response> {
                warn!(rpc = $rpc, id = %req.id, "task RPC not implemented yet");
                Err(unimplemented_status($rpc))
            }
        )*
    };
}

impl Task for TaskService {
    not_yet! {
        state(api::StateRequest) -> api::StateResponse = "State";
        create(api::CreateTaskRequest) -> api::CreateTaskResponse = "Create";
        start(api::StartRequest) -> api::StartResponse = "Start";
        delete(api::DeleteRequest) -> api::DeleteResponse = "Delete";
        pids(api::PidsRequest) -> api::PidsResponse = "Pids";
        pause(api::PauseRequest) -> Empty = "Pause";
        resume(api::ResumeRequest) -> Empty = "Resume";
        checkpoint(api::CheckpointTaskRequest) -> Empty = "Checkpoint";
        kill(api::KillRequest) -> Empty = "Kill";
        exec(api::ExecProcessRequest) -> Empty = "Exec";
        resize_pty(api::ResizePtyRequest) -> Empty = "ResizePty";
        close_io(api::CloseIORequest) -> Empty = "CloseIO";
        update(api::UpdateTaskRequest) -> Empty = "Update";
        wait(api::WaitRequest) -> api::WaitResponse = "Wait";
        stats(api::StatsRequest) -> api::StatsResponse = "Stats";
    }

    /// containerd asks for the shim's pid (and the task's, which we never have: 0, as the Go
    /// runc shim answers for a container it does not know).
    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        info!(id = %req.id, "connect");
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: 0,
            version: VERSION.to_string(),
            ..Default::default()
        })
    }

    /// containerd sends this when it no longer needs the shim (also after a failed `Create`).
    /// A shim must exit only once it hosts no tasks; this one never hosts any, so it always
    /// exits. Without this, every failed launch would leak a shim process.
    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        info!(id = %req.id, "shutdown: no tasks hosted, exiting");
        self.exit.signal();
        Ok(Empty::default())
    }
}
