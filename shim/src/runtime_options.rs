//! The runtime options our delegate, containerd's runc shim, gets.
//!
//! containerd hands a shim its runtime options twice: marshalled on stdin of `start`, and in
//! every `CreateTaskRequest`. What they hold depends on the CRI `runtime_type`:
//!
//! - `io.containerd.runc.v2` (with `runtime_path` naming our binary, containerd 1.7+): the CRI
//!   plugin decodes the `options` table into runc's `Options` (`containerd.runc.v1.Options`).
//!   They are the runc shim's own and go to it unchanged.
//! - any other type, e.g. `io.containerd.runc.migrate.v2` (containerd 1.6.20, whose CRI does
//!   not apply `runtime_path`, see docs/containerd.md): the CRI plugin sends
//!   `runtimeoptions.v1.Options`, which carries only a `ConfigPath`, or nothing when the
//!   handler has no `options` table. The runc shim cannot read that (1.6's fails
//!   `start` on an Any type it does not know and panics in `Create`), so the runc options are
//!   read from the TOML file at `ConfigPath`, whose keys are those of the runc `options` table
//!   (`BinaryName`, `Root`, `SystemdCgroup`, ...), and sent to the runc shim as runc `Options`.
//!   No `ConfigPath` (or no options): the runc shim gets none and uses its defaults.

use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::shim::oci::Options as RuncOptions;
use serde::Deserialize;

/// The type URL of containerd's runc `Options` (runc-typed runtimes).
pub const RUNC_OPTIONS_TYPE_URL: &str = "containerd.runc.v1.Options";
/// The type URL of the CRI plugin's `runtimeoptions.v1.Options` (every other runtime type).
pub const CRI_RUNTIME_OPTIONS_TYPE_URL: &str = "runtimeoptions.v1.Options";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeOptionsError {
    #[error("decoding the runtime options on stdin: {0}")]
    DecodeAny(String),
    #[error("decoding runtime options of type {type_url}: {reason}")]
    Decode { type_url: String, reason: String },
    #[error(
        "runtime options of type {0} are not understood: expected {RUNC_OPTIONS_TYPE_URL} \
         (runtime_type io.containerd.runc.v2) or {CRI_RUNTIME_OPTIONS_TYPE_URL} (any other \
         runtime_type, with ConfigPath naming a TOML file of runc options)"
    )]
    UnknownType(String),
    #[error("reading the runc options file {path} (the runtime's ConfigPath): {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the runc options file {path} (the runtime's ConfigPath): {reason}")]
    ParseFile { path: PathBuf, reason: String },
    #[error("encoding runc options: {0}")]
    Encode(String),
}

/// containerd's `runtimeoptions.v1.Options`, as the CRI plugin fills it from the `options`
/// table of a runtime whose type is not runc's.
#[derive(Clone, PartialEq, prost::Message)]
struct CriRuntimeOptions {
    /// `TypeUrl` in the table: what the config file holds, for the shim to interpret.
    #[prost(string, tag = "1")]
    type_url: String,
    /// `ConfigPath` in the table.
    #[prost(string, tag = "2")]
    config_path: String,
}

/// The runc options file: the keys of a runc-typed runtime's `options` table in containerd's
/// CRI config (runc's `Options` message, field names as Go spells them). Unknown keys are an
/// error, so a misspelt one is not silently ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct RuncOptionsFile {
    #[serde(default)]
    pub no_pivot_root: bool,
    #[serde(default)]
    pub no_new_keyring: bool,
    #[serde(default)]
    pub shim_cgroup: String,
    #[serde(default)]
    pub io_uid: u32,
    #[serde(default)]
    pub io_gid: u32,
    #[serde(default)]
    pub binary_name: String,
    #[serde(default)]
    pub root: String,
    #[serde(default)]
    pub systemd_cgroup: bool,
    #[serde(default)]
    pub criu_image_path: String,
    #[serde(default)]
    pub criu_work_path: String,
}

impl RuncOptionsFile {
    pub fn parse(text: &str, path: &Path) -> Result<Self, RuntimeOptionsError> {
        toml::from_str(text).map_err(|e| RuntimeOptionsError::ParseFile {
            path: path.to_owned(),
            reason: e.to_string().trim().to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, RuntimeOptionsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| RuntimeOptionsError::ReadFile {
                path: path.to_owned(),
                source,
            })?;
        Self::parse(&text, path)
    }

    pub fn to_runc_options(&self) -> RuncOptions {
        RuncOptions {
            no_pivot_root: self.no_pivot_root,
            no_new_keyring: self.no_new_keyring,
            shim_cgroup: self.shim_cgroup.clone(),
            io_uid: self.io_uid,
            io_gid: self.io_gid,
            binary_name: self.binary_name.clone(),
            root: self.root.clone(),
            systemd_cgroup: self.systemd_cgroup,
            criu_image_path: self.criu_image_path.clone(),
            criu_work_path: self.criu_work_path.clone(),
            ..Default::default()
        }
    }
}

/// A type URL without the `type.googleapis.com/`-style prefix some encoders add.
fn bare_type_url(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// The options to hand the runc shim for what containerd sent us (see the module docs).
pub fn for_delegate(options: Option<&Any>) -> Result<Option<Any>, RuntimeOptionsError> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(None);
    };
    match bare_type_url(&any.type_url) {
        RUNC_OPTIONS_TYPE_URL => Ok(Some(any.clone())),
        CRI_RUNTIME_OPTIONS_TYPE_URL => {
            let cri = <CriRuntimeOptions as prost::Message>::decode(any.value.as_slice()).map_err(
                |e| RuntimeOptionsError::Decode {
                    type_url: any.type_url.clone(),
                    reason: e.to_string(),
                },
            )?;
            if cri.config_path.is_empty() {
                return Ok(None);
            }
            let runc = RuncOptionsFile::load(Path::new(&cri.config_path))?.to_runc_options();
            Ok(Some(Any {
                type_url: RUNC_OPTIONS_TYPE_URL.to_string(),
                value: runc
                    .write_to_bytes()
                    .map_err(|e| RuntimeOptionsError::Encode(e.to_string()))?,
                ..Default::default()
            }))
        }
        _ => Err(RuntimeOptionsError::UnknownType(any.type_url.clone())),
    }
}

/// The runc options of [`for_delegate`] (`options`) with CRIU's work path set to `work`: a lazy
/// restore's CRIU must work where its lazy-pages daemon opened its socket.
pub fn with_criu_work_path(options: Option<Any>, work: &Path) -> Result<Any, RuntimeOptionsError> {
    let mut runc = match &options {
        Some(any) => {
            RuncOptions::parse_from_bytes(&any.value).map_err(|e| RuntimeOptionsError::Decode {
                type_url: any.type_url.clone(),
                reason: e.to_string(),
            })?
        }
        None => RuncOptions::default(),
    };
    runc.criu_work_path = work.display().to_string();
    Ok(Any {
        type_url: RUNC_OPTIONS_TYPE_URL.to_string(),
        value: runc
            .write_to_bytes()
            .map_err(|e| RuntimeOptionsError::Encode(e.to_string()))?,
        ..Default::default()
    })
}

/// [`for_delegate`] for the marshalled Any on `start`'s stdin; empty stays empty.
pub fn stdin_for_delegate(stdin: &[u8]) -> Result<Vec<u8>, RuntimeOptionsError> {
    if stdin.is_empty() {
        return Ok(Vec::new());
    }
    let any =
        Any::parse_from_bytes(stdin).map_err(|e| RuntimeOptionsError::DecodeAny(e.to_string()))?;
    match for_delegate(Some(&any))? {
        Some(options) => options
            .write_to_bytes()
            .map_err(|e| RuntimeOptionsError::Encode(e.to_string())),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cri_options(config_path: &str) -> Any {
        Any {
            type_url: CRI_RUNTIME_OPTIONS_TYPE_URL.into(),
            value: prost::Message::encode_to_vec(&CriRuntimeOptions {
                type_url: String::new(),
                config_path: config_path.into(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_lazy_restore_keeps_the_runc_options_and_sets_the_work_path() {
        let runc = RuncOptions {
            binary_name: "/usr/sbin/runc".into(),
            ..Default::default()
        };
        let any = Any {
            type_url: RUNC_OPTIONS_TYPE_URL.into(),
            value: runc.write_to_bytes().unwrap(),
            ..Default::default()
        };
        let set = with_criu_work_path(Some(any), Path::new("/w/images")).unwrap();
        let got = RuncOptions::parse_from_bytes(&set.value).unwrap();
        assert_eq!(got.binary_name, "/usr/sbin/runc");
        assert_eq!(got.criu_work_path, "/w/images");
        let none = with_criu_work_path(None, Path::new("/w/images")).unwrap();
        assert_eq!(
            RuncOptions::parse_from_bytes(&none.value)
                .unwrap()
                .criu_work_path,
            "/w/images"
        );
    }

    #[test]
    fn runc_options_pass_unchanged() {
        let runc = RuncOptions {
            binary_name: "/usr/sbin/runc".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = Any {
            type_url: RUNC_OPTIONS_TYPE_URL.into(),
            value: runc.write_to_bytes().unwrap(),
            ..Default::default()
        };
        assert_eq!(for_delegate(Some(&any)).unwrap(), Some(any.clone()));
        let stdin = any.write_to_bytes().unwrap();
        assert_eq!(stdin_for_delegate(&stdin).unwrap(), stdin);
    }

    #[test]
    fn nothing_stays_nothing() {
        assert_eq!(for_delegate(None).unwrap(), None);
        assert_eq!(for_delegate(Some(&Any::new())).unwrap(), None);
        assert!(stdin_for_delegate(&[]).unwrap().is_empty());
        // A CRI options message without a ConfigPath: the runc shim's defaults.
        assert_eq!(for_delegate(Some(&cri_options(""))).unwrap(), None);
    }

    #[test]
    fn cri_runtime_options_become_runc_options_from_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runc.toml");
        std::fs::write(
            &file,
            "BinaryName = \"/usr/sbin/runc\"\nRoot = \"/run/x/runc\"\nSystemdCgroup = true\n\
             IoUid = 7\nCriuWorkPath = \"/w\"\n",
        )
        .unwrap();
        let any = cri_options(file.to_str().unwrap());
        let stdin = stdin_for_delegate(&any.write_to_bytes().unwrap()).unwrap();
        let out = Any::parse_from_bytes(&stdin).unwrap();
        assert_eq!(out.type_url, RUNC_OPTIONS_TYPE_URL);
        let runc = RuncOptions::parse_from_bytes(&out.value).unwrap();
        assert_eq!(runc.binary_name, "/usr/sbin/runc");
        assert_eq!(runc.root, "/run/x/runc");
        assert!(runc.systemd_cgroup);
        assert_eq!(runc.io_uid, 7);
        assert_eq!(runc.criu_work_path, "/w");
        assert!(!runc.no_pivot_root);
    }

    #[test]
    fn bad_inputs_name_what_failed() {
        let err = for_delegate(Some(&cri_options("/nonexistent/podmigrate-runc.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/podmigrate-runc.toml"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runc.toml");
        std::fs::write(&file, "BinaryNme = \"runc\"\n").unwrap();
        let err = for_delegate(Some(&cri_options(file.to_str().unwrap())))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("BinaryNme") && err.contains("runc.toml"),
            "{err}"
        );

        let other = Any {
            type_url: "io.containerd.runsc.v1.options".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        let err = for_delegate(Some(&other)).unwrap_err().to_string();
        assert!(err.contains("io.containerd.runsc.v1.options"), "{err}");

        let err = stdin_for_delegate(&[0xff, 0xff]).unwrap_err().to_string();
        assert!(err.contains("stdin"), "{err}");
    }
}
