//! The node's halves of podmigrate's two operations, one file each, free of any container
//! runtime's types: the shim adapts them to containerd.

pub mod restore;
