//! The node agent (`podmigrate agent`, a DaemonSet): watches clone pods and, for those whose
//! source runs on its node, drives the migration as a phase machine.
//!
//! Read top-down: [`watch`] (the controller) → [`machine`] (the phases, their record and
//! their endings) → [`phases`] (one step per phase) → [`ports`] (the Kubernetes API,
//! containerd and the share behind traits; the share's names are
//! `podmigrate_checkpoint::share`'s).
//!
//! Beside the migrations, [`handoff`] answers the node's shims when a pod is deleted or
//! evicted (its departure leaves a checkpoint) and when the pod that replaces it is created
//! (its arrival restores it).

pub mod containerd;
pub mod handoff;
pub mod limits;
pub mod machine;
pub mod metrics;
mod phases;
pub mod ports;
pub mod timeouts;
pub mod watch;
