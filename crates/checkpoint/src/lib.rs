//! The checkpoint side of podmigrate, shared by the shim and the agent: the archive format that
//! carries a checkpoint across the share, and the drivers for the CRIU/runc stack that makes one.

pub mod archive;
pub mod bandwidth;
pub mod binding;
pub mod creds;
pub mod criu;
pub mod gc;
pub mod handoff;
pub mod layout;
pub mod ops;
pub mod pagestream;
pub mod prefault;
pub mod reap;
pub mod rootfs;
pub mod runc;
pub mod share;
pub mod volumes;
pub mod workspace;
