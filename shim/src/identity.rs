//! Who a container is, read from the annotations the CRI plugin writes into its OCI spec.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
// podmigrate's own pod annotations, passed through by the CRI plugin's `pod_annotations`.
pub use podmigrate_vocabulary::{BANDWIDTH, CLONE_POD, FALLBACK};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerIdentity {
    /// The containerd task id.
    pub id: String,
    /// Kubernetes namespace (containerd namespace outside Kubernetes).
    pub namespace: String,
    /// Pod name (the container id outside Kubernetes).
    pub pod: String,
    pub pod_uid: String,
    /// Container name within the pod (the container id outside Kubernetes).
    pub container: String,
    pub image: String,
    /// A pod sandbox (pause) container: never checkpointed or restored.
    pub is_sandbox: bool,
    pub clone_of: Option<String>,
    pub fallback_fresh: bool,
    /// For a pod that replaces a departed one (the agent said so at Create, see
    /// [`crate::handoff`]): the departure whose archives it restores (the departed pod's uid).
    pub departure: Option<String>,
    /// The pod's [`BANDWIDTH`] annotation, unparsed.
    pub bandwidth: Option<String>,
    /// The OCI spec the container runs with (its bundle's `config.json`), when read from one:
    /// a restore checks the checkpoint's credentials against it.
    pub spec: Option<PathBuf>,
}

impl ContainerIdentity {
    /// Reads `config.json` in `bundle`.
    pub fn from_bundle(bundle: &Path, id: &str, containerd_namespace: &str) -> Result<Self> {
        let spec_path = bundle.join("config.json");
        let raw = std::fs::read(&spec_path).map_err(|source| Error::ReadSpec {
            path: spec_path.clone(),
            source,
        })?;
        #[derive(serde::Deserialize)]
        struct Spec {
            #[serde(default)]
            annotations: HashMap<String, String>,
        }
        let spec: Spec = serde_json::from_slice(&raw).map_err(|source| Error::ParseSpec {
            path: spec_path,
            source,
        })?;
        Ok(ContainerIdentity {
            spec: Some(bundle.join("config.json")),
            ..Self::from_annotations(&spec.annotations, id, containerd_namespace)
        })
    }

    pub fn from_annotations(
        annotations: &HashMap<String, String>,
        id: &str,
        containerd_namespace: &str,
    ) -> Self {
        let get = |key: &str| annotations.get(key).filter(|v| !v.is_empty()).cloned();
        ContainerIdentity {
            id: id.to_string(),
            namespace: get(SANDBOX_NAMESPACE).unwrap_or_else(|| containerd_namespace.to_string()),
            pod: get(SANDBOX_NAME).unwrap_or_else(|| id.to_string()),
            pod_uid: get(SANDBOX_UID).unwrap_or_default(),
            container: get(CONTAINER_NAME).unwrap_or_else(|| id.to_string()),
            image: get(IMAGE_NAME).unwrap_or_default(),
            is_sandbox: get(CONTAINER_TYPE).as_deref() == Some("sandbox"),
            clone_of: get(CLONE_POD),
            fallback_fresh: get(FALLBACK).as_deref() == Some("fresh"),
            departure: None,
            bandwidth: get(BANDWIDTH),
            spec: None,
        }
    }

    /// `pod <namespace>/<pod> container <name>`, for messages.
    pub fn describe(&self) -> String {
        podmigrate_checkpoint::ops::describe(&self.namespace, &self.pod, &self.container)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_annotations_name_the_pod_container_and_clone_source() {
        let id = ContainerIdentity::from_annotations(
            &annotations(&[
                (CONTAINER_TYPE, "container"),
                (SANDBOX_NAMESPACE, "default"),
                (SANDBOX_NAME, "counter-clone"),
                (CONTAINER_NAME, "app"),
                (CLONE_POD, "counter"),
                (FALLBACK, "fresh"),
                (BANDWIDTH, "16Mi"),
            ]),
            "c1",
            "k8s.io",
        );
        assert_eq!(id.namespace, "default");
        assert_eq!(id.pod, "counter-clone");
        assert_eq!(id.container, "app");
        assert_eq!(id.clone_of.as_deref(), Some("counter"));
        assert!(id.fallback_fresh && !id.is_sandbox);
        assert_eq!(id.bandwidth.as_deref(), Some("16Mi"));
    }

    #[test]
    fn sandboxes_and_plain_containers_are_recognised() {
        let sandbox = ContainerIdentity::from_annotations(
            &annotations(&[(CONTAINER_TYPE, "sandbox"), (CLONE_POD, "counter")]),
            "s1",
            "k8s.io",
        );
        assert!(sandbox.is_sandbox);
        let plain = ContainerIdentity::from_annotations(&HashMap::new(), "c9", "default");
        assert_eq!(
            (
                plain.namespace.as_str(),
                plain.pod.as_str(),
                plain.container.as_str()
            ),
            ("default", "c9", "c9")
        );
        assert_eq!(plain.clone_of, None);
    }
}
