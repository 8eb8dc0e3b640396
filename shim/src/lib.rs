//! `containerd-shim-migrate-v2`: the containerd runtime shim (task API v2) of podmigrate.
//!
//! containerd launches one shim per pod (or per container outside Kubernetes) and talks to it
//! over ttrpc. The shim stands in front of containerd's own runc shim and forwards every Task
//! RPC to it, but two: Checkpoint, and Create for a clone's container, which it restores from
//! the source's checkpoint. A Kill and a Create also ask the node's agent whether the pod
//! departs or replaces a departed one ([`handoff`]). It is the only component that sees both containerd's runc options
//! (CRIU image/work paths) and the runc container itself.
//!
//! How the modules stand: [`shim`] (the protocol's `start` and `delete`) serves [`service`], the
//! Task RPCs, which asks [`checkpoint`], [`restore`] and the agent ([`handoff`]), skips an init container that ran already ([`init_skip`]), runs post-copy's page streams in
//! [`postcopy`], holds a restored task's Waits until its Start is known ([`restored_wait`]), and
//! ends a clone whose memory was lost with [`cgroup_kill`]; those share
//! nothing but the lower modules ([`mounts`], [`identity`], [`config`], [`delegate`],
//! [`error`], [`reaper`]), and nothing below `service` imports it.
//!
//! The protocol plumbing (flag parsing, daemonising, socket, signal handling, reaping) comes
//! from the `containerd-shim` crate, pinned at 0.11 because 0.12 speaks task API v3, which
//! containerd 1.6/1.7 reject.

pub mod cgroup_kill;
pub mod checkpoint;
pub mod config;
pub mod criu_config;
pub mod delegate;
pub mod error;
pub mod handoff;
pub mod identity;
pub mod init_skip;
pub mod logging;
pub mod mounts;
pub mod net_lock;
pub mod postcopy;
pub mod reaper;
pub mod restore;
pub mod restored_wait;
pub mod runtime_options;
pub mod service;
pub mod shim;

use std::ffi::OsString;

pub use error::{Error, Result};
pub use service::TaskService;
pub use shim::MigrateShim;

/// Runtime name under which containerd knows this shim (`ctr run --runtime`, CRI `runtime_type`
/// when not going through `runtime_path`). containerd maps `io.containerd.<name>.<version>` to the
/// binary `containerd-shim-<name>-<version>`, which is why the binary is named as it is.
pub const RUNTIME_ID: &str = "io.containerd.migrate.v2";

/// File name of the shim binary; also used as the prefix of every error message we return so
/// that an operator reading a containerd or kubelet error knows which component said it.
pub const BINARY_NAME: &str = "containerd-shim-migrate-v2";

/// Version reported by `-v` and by the `Connect` RPC.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs the shim with the arguments containerd passed (without `argv[0]`).
///
/// containerd invokes the same binary three ways: `... start` (spawn the long-running shim and
/// print its socket address), `... delete` (clean up after a dead shim), and, from our own
/// `start`, with `-socket` to serve ttrpc. `containerd_shim::run` dispatches those; this function
/// only adds what that crate leaves out: `-v`, `-info`, and `tracing`-based logging.
pub fn run(args: &[OsString]) -> Result<()> {
    let flags = containerd_shim::parse(args).map_err(Error::Flags)?;
    if flags.version {
        println!("{BINARY_NAME}:\n  Version: {VERSION}\n  Runtime: {RUNTIME_ID}");
        return Ok(());
    }
    if flags.info {
        // containerd 2.x runs `<shim> -info` to introspect runtime features and only logs a
        // debug message when that fails, so refusing is safe and honest.
        return Err(Error::Unsupported("-info"));
    }
    logging::init(logging::Mode::from_action(&flags.action), flags.debug)?;

    let config = containerd_shim::Config {
        // We install our own tracing subscriber (writing to the same `log` FIFO), which also
        // receives containerd-shim's own `log` records.
        no_setup_logger: true,
        ..Default::default()
    };
    // Exits the process with status 1 (message on stderr) if the shim protocol step fails.
    containerd_shim::run::<MigrateShim>(RUNTIME_ID, Some(config));
    Ok(())
}
