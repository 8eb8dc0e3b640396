//! Protobuf types shared by the shim, the agent and the CLI.

/// `podmigrate.v1`: the archive manifest, and messages the runc shim decodes.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/podmigrate.v1.rs"));

    /// The type URL containerd's runc shim expects on an Any holding
    /// [`RuncCheckpointOptions`].
    pub const RUNC_CHECKPOINT_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.CheckpointOptions";
}

/// `criu`: the part of CRIU's image messages podmigrate reads (each task's credentials).
pub mod criu {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}
