//! Drives the Task service over a real ttrpc socket (no containerd, no root needed): every RPC
//! but Connect/Shutdown must answer UNIMPLEMENTED, and Shutdown must release the exit signal.

use std::{
    sync::{mpsc, Arc},
    time::Duration,
};

use containerd_shim::ExitSignal;
use containerd_shim_migrate::{TaskService, BINARY_NAME};
use containerd_shim_protos::{
    api,
    shim::shim_ttrpc::{create_task, TaskClient},
    ttrpc::{self, context, Client, Code, Server},
};

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

fn assert_unimplemented<T: std::fmt::Debug>(rpc: &str, result: ttrpc::Result<T>) {
    match result {
        Err(ttrpc::Error::RpcStatus(status)) => {
            assert_eq!(status.code(), Code::UNIMPLEMENTED, "{rpc}: {status:?}");
            assert_eq!(
                status.message(),
                format!("{BINARY_NAME}: {rpc} is not implemented yet")
            );
        }
        other => panic!("{rpc}: expected UNIMPLEMENTED, got {other:?}"),
    }
}

#[test]
fn task_rpcs_answer_unimplemented_and_shutdown_exits() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix://{}", dir.path().join("shim.sock").display());

    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(TaskService::new(exit.clone()));
    let mut server = Server::new()
        .bind(&address)
        .unwrap()
        .register_service(create_task(service));
    server.start().unwrap();

    let client = TaskClient::new(Client::connect(&address).unwrap());
    let id = "c1".to_string();

    assert_unimplemented(
        "State",
        client.state(
            ctx(),
            &api::StateRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Create",
        client.create(
            ctx(),
            &api::CreateTaskRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Start",
        client.start(
            ctx(),
            &api::StartRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Delete",
        client.delete(
            ctx(),
            &api::DeleteRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Pids",
        client.pids(
            ctx(),
            &api::PidsRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Pause",
        client.pause(
            ctx(),
            &api::PauseRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Resume",
        client.resume(
            ctx(),
            &api::ResumeRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Checkpoint",
        client.checkpoint(
            ctx(),
            &api::CheckpointTaskRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Kill",
        client.kill(
            ctx(),
            &api::KillRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Exec",
        client.exec(
            ctx(),
            &api::ExecProcessRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "ResizePty",
        client.resize_pty(
            ctx(),
            &api::ResizePtyRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "CloseIO",
        client.close_io(
            ctx(),
            &api::CloseIORequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Update",
        client.update(
            ctx(),
            &api::UpdateTaskRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Wait",
        client.wait(
            ctx(),
            &api::WaitRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );
    assert_unimplemented(
        "Stats",
        client.stats(
            ctx(),
            &api::StatsRequest {
                id: id.clone(),
                ..Default::default()
            },
        ),
    );

    let connected = client
        .connect(
            ctx(),
            &api::ConnectRequest {
                id: id.clone(),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(connected.shim_pid, std::process::id());
    assert_eq!(connected.task_pid, 0);

    // Shutdown must release whoever waits on the exit signal (MigrateShim::wait in the binary).
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = exit.clone();
    std::thread::spawn(move || {
        waiter.wait();
        done_tx.send(()).unwrap();
    });
    client
        .shutdown(
            ctx(),
            &api::ShutdownRequest {
                id,
                ..Default::default()
            },
        )
        .unwrap();
    done_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("Shutdown did not signal exit");
    server.shutdown();
}
