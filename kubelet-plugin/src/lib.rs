//! The kubelet-side half of podmigrate: the `podmigrate` CLI (also `kubectl-migrate`) and the
//! node agent it runs as `podmigrate agent`.
//!
//! [`pod`] reads what a pod says (its clone reference, mode and record) and [`policy`] decides
//! what may migrate; the CLI refuses early with the same rules the agent applies. [`gc`] is
//! the share's GC with the API server's view of what is in flight, run by both.

pub mod agent;
pub mod cli;
pub mod controller;
pub mod gc;
pub mod pod;
pub mod policy;
