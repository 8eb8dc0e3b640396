//! The steps of the phase machine ([`super::machine`]), one file per phase, in the order a
//! migration takes them.

mod checkpoint;
mod claim;
mod postcopy;
pub(super) mod restore;
mod transfer;
