//! The stock runc shim that runs our containers.
//!
//! Every ordinary container operation (create, start, exec, logs, OOM and exit events) is
//! containerd's own `containerd-shim-runc-v2`'s job; we stand in front of it, speak the same
//! task API, and forward. It publishes its events straight to containerd, with the same ids.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::shim::DeleteResponse;
use containerd_shim::protos::{ttrpc, TaskClient};

use crate::error::{Error, Result};

/// Environment variable through which our `start` tells our serving process where the
/// delegate listens.
pub const ENV_DELEGATE_ADDRESS: &str = "PODMIGRATE_DELEGATE_ADDRESS";

/// The shim-protocol flags containerd gave us (`containerd_shim::Flags` is not `Clone`).
#[derive(Debug, Clone, Default)]
pub struct ProtocolFlags {
    pub namespace: String,
    pub id: String,
    pub address: String,
    pub publish_binary: String,
    pub bundle: String,
    pub debug: bool,
}

impl From<&containerd_shim::Flags> for ProtocolFlags {
    fn from(f: &containerd_shim::Flags) -> Self {
        ProtocolFlags {
            namespace: f.namespace.clone(),
            id: f.id.clone(),
            address: f.address.clone(),
            publish_binary: f.publish_binary.clone(),
            bundle: f.bundle.clone(),
            debug: f.debug,
        }
    }
}

/// The shim-protocol arguments containerd gave us, to hand on unchanged.
fn protocol_args(flags: &ProtocolFlags, action: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "-namespace".into(),
        flags.namespace.clone().into(),
        "-address".into(),
        flags.address.clone().into(),
        "-publish-binary".into(),
        flags.publish_binary.clone().into(),
        "-id".into(),
        flags.id.clone().into(),
    ];
    if !flags.bundle.is_empty() {
        args.push("-bundle".into());
        args.push(flags.bundle.clone().into());
    }
    if flags.debug {
        args.push("-debug".into());
    }
    args.push(action.into());
    args
}

/// The delegate binary to run. A path (anything with a `/`) is used as is. A bare name is
/// looked up the way containerd looks up a shim: on `PATH`, then beside the containerd binary
/// that started us (`-publish-binary`), so we delegate to the same runc shim containerd would
/// run for a plain `runc` pod, also when it sits only next to containerd.
pub fn resolve(configured: &Path, flags: &ProtocolFlags) -> PathBuf {
    if configured.components().count() != 1 || configured.as_os_str().is_empty() {
        return configured.to_path_buf();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let beside_containerd = Path::new(&flags.publish_binary)
        .parent()
        .filter(|_| !flags.publish_binary.is_empty())
        .map(Path::to_path_buf);
    std::env::split_paths(&path)
        .chain(beside_containerd)
        .map(|dir| dir.join(configured))
        .find(|candidate| is_executable(candidate))
        .unwrap_or_else(|| configured.to_path_buf())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs the delegate's `start` in the bundle (our working directory) with the runtime options
/// containerd wrote to our stdin, and returns the address it serves.
///
/// For a pod's second container the delegate answers with the address of the shim already
/// serving the pod, exactly as it would under containerd directly.
pub fn start(binary: &Path, flags: &ProtocolFlags, runtime_options: &[u8]) -> Result<String> {
    let output = run(binary, &protocol_args(flags, "start"), runtime_options)?;
    let address = String::from_utf8_lossy(&output).trim().to_string();
    if !address.starts_with("unix://") && !address.starts_with('/') {
        return Err(Error::Delegate {
            binary: binary.to_path_buf(),
            action: "start",
            reason: format!("printed no socket address: {address:?}"),
        });
    }
    Ok(address)
}

/// Runs the delegate's `delete`: containerd's clean-up after a shim died, which must unmount
/// and remove what the delegate created.
pub fn delete(binary: &Path, flags: &ProtocolFlags) -> Result<DeleteResponse> {
    let output = run(binary, &protocol_args(flags, "delete"), &[])?;
    DeleteResponse::parse_from_bytes(&output).map_err(|e| Error::Delegate {
        binary: binary.to_path_buf(),
        action: "delete",
        reason: format!("unparsable response: {e}"),
    })
}

fn run(binary: &Path, args: &[OsString], stdin: &[u8]) -> Result<Vec<u8>> {
    let action = if args.last().is_some_and(|a| a == "delete") {
        "delete"
    } else {
        "start"
    };
    let fail = |reason: String| Error::Delegate {
        binary: binary.to_path_buf(),
        action,
        reason,
    };
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin)
        .map_err(|e| fail(format!("writing runtime options: {e}")))?;
    drop(input);
    // The delegate's `start` forks its server with our stdout as its own only until it is
    // ready, so reading to EOF and waiting cannot hang on the long-running server.
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .expect("stdout is piped")
        .read_to_end(&mut stdout)
        .map_err(|e| fail(format!("reading its output: {e}")))?;
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr is piped")
        .read_to_string(&mut stderr);
    let status = child
        .wait()
        .map_err(|e| fail(format!("waiting for it: {e}")))?;
    if !status.success() {
        let detail = if stderr.trim().is_empty() {
            String::from_utf8_lossy(&stdout).trim().to_string()
        } else {
            stderr.trim().to_string()
        };
        return Err(fail(format!("{status}: {detail}")));
    }
    Ok(stdout)
}

/// A connection to the delegate's task service.
#[derive(Clone)]
pub struct Delegate {
    address: String,
    client: TaskClient,
}

impl Delegate {
    pub fn connect(address: &str) -> Result<Self> {
        let client = ttrpc::Client::connect(address).map_err(|e| Error::DelegateConnect {
            address: address.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Delegate {
            address: address.to_string(),
            client: TaskClient::new(client),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn client(&self) -> &TaskClient {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn flags(publish_binary: &Path) -> ProtocolFlags {
        ProtocolFlags {
            publish_binary: publish_binary.display().to_string(),
            ..ProtocolFlags::default()
        }
    }

    #[test]
    fn a_path_is_used_as_is() {
        let f = flags(Path::new("/nowhere/containerd"));
        assert_eq!(
            resolve(Path::new("/opt/x/containerd-shim-runc-v2"), &f),
            PathBuf::from("/opt/x/containerd-shim-runc-v2")
        );
        assert_eq!(resolve(Path::new("./shim"), &f), PathBuf::from("./shim"));
    }

    /// Not on PATH (a name no one installs), but beside the containerd that started us.
    #[test]
    fn a_bare_name_falls_back_to_containerds_directory() {
        let dir = tempfile::tempdir().unwrap();
        let name = "containerd-shim-podmigrate-test-only-v2";
        let shim = dir.path().join(name);
        std::fs::write(&shim, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = flags(&dir.path().join("containerd"));
        assert_eq!(resolve(Path::new(name), &f), shim);
        // Unknown everywhere: the name is kept, so the spawn error names it.
        let f = flags(Path::new("/nowhere/containerd"));
        assert_eq!(resolve(Path::new(name), &f), PathBuf::from(name));
    }
}
