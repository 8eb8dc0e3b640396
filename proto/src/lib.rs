//! Protobuf types shared by the shim, the agent and the CLI.

/// `podmigrate.v1`: the archive manifest, and messages the runc shim decodes.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/podmigrate.v1.rs"));
    // Its type URL on an Any: podmigrate_vocabulary::RUNC_CHECKPOINT_OPTIONS_TYPE_URL.
}

/// `criu`: the part of CRIU's image messages podmigrate reads (each task's credentials).
pub mod criu {
    include!(concat!(env!("OUT_DIR"), "/criu.rs"));
}
