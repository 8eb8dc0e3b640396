//! The node agent (`podmigrate agent`, a DaemonSet): watches pods on its node and drives the
//! checkpoint of any pod that another pod asks to be a clone of.

pub mod containerd;
pub mod gc;
pub mod metrics;
pub mod migration;
pub mod policy;
pub mod reference;
pub mod watch;
