//! The kubelet-side half of podmigrate: the `podmigrate` CLI (also `kubectl-migrate`) and,
//! later, the node agent it runs as `podmigrate agent`.

pub mod agent;
pub mod cli;
