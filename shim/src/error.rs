//! Typed errors of the shim library, and how a failed Task RPC is answered: a ttrpc status
//! naming the shim.

use std::path::PathBuf;

use containerd_shim::protos::ttrpc;

use crate::BINARY_NAME;

/// Result alias for the shim library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong outside a Task RPC (those answer ttrpc statuses instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// containerd passed flags we (or containerd-shim's Go-style parser) cannot parse.
    #[error("invalid shim flags: {0}")]
    Flags(#[source] containerd_shim::Error),

    /// A shim protocol feature we deliberately do not offer yet.
    #[error("{0} is not implemented yet")]
    Unsupported(&'static str),

    /// The bundle's OCI spec could not be read; containerd always writes one before `start`.
    #[error("reading OCI spec {path}")]
    ReadSpec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The bundle's OCI spec is not valid JSON.
    #[error("parsing OCI spec {path}")]
    ParseSpec {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// The `log` FIFO containerd created in the bundle could not be opened.
    #[error("opening shim log {path}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A global tracing subscriber was already installed.
    #[error("installing the tracing subscriber: {0}")]
    Logging(String),

    /// The delegate runc shim failed one of the shim protocol's commands.
    #[error("{binary} {action}: {reason}")]
    Delegate {
        binary: PathBuf,
        action: &'static str,
        reason: String,
    },

    /// The delegate's socket did not answer.
    #[error("connecting to the runc shim at {address}: {reason}")]
    DelegateConnect { address: String, reason: String },

    /// Reading the runtime options containerd writes to `start`'s stdin.
    #[error("reading runtime options from stdin: {0}")]
    Stdin(#[source] std::io::Error),

    /// The runtime options containerd gave us cannot be turned into the runc shim's.
    #[error(transparent)]
    RuntimeOptions(#[from] crate::runtime_options::RuntimeOptionsError),

    /// Failure inside containerd-shim (spawning the daemon, writing the address file, ...).
    #[error(transparent)]
    Shim(#[from] containerd_shim::Error),
}

/// The `Shim` trait of containerd-shim wants its own error type back; keep our message (and
/// the cause chain, flattened) so containerd shows something useful.
impl From<Error> for containerd_shim::Error {
    fn from(err: Error) -> Self {
        match err {
            Error::Shim(inner) => inner,
            other => containerd_shim::Error::Other(chain(&other)),
        }
    }
}

/// Formats an error with all of its sources, `a: b: c`, like Go's wrapped errors read.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// A ttrpc status naming this shim, so an operator knows which component said it.
pub fn status(code: ttrpc::Code, message: impl std::fmt::Display) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, format!("{BINARY_NAME}: {message}")))
}

/// The message inside a ttrpc error, without the transport's wrapping.
pub fn describe_ttrpc_error(err: &ttrpc::Error) -> String {
    match err {
        ttrpc::Error::RpcStatus(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// The code of a failed call to the runc shim: its own status's, or UNAVAILABLE when it could
/// not be reached or did not answer.
pub fn delegate_code(err: &ttrpc::Error) -> ttrpc::Code {
    match err {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => ttrpc::Code::UNAVAILABLE,
    }
}
