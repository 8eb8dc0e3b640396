//! Protobuf types shared by the shim, the agent and the CLI.

/// `podmigrate.v1`: the archive manifest.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/podmigrate.v1.rs"));
}
