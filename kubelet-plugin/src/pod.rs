//! What a pod says to podmigrate: what it asks to be a clone of, and how, and what its clone
//! records (annotations, phase timings).
//!
//! A clone names its source with the [`CLONE_POD`] annotation. The proof of concept put the
//! same name in `spec.clonePod` instead; k8s-openapi's `PodSpec` silently drops fields it does
//! not know, so that field can only be read from a pod's raw JSON ([`clone_reference_raw`]).
//! The source must be in the clone's own namespace: a clone carries the source's memory,
//! and a namespace is the boundary of who may read it.

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use podmigrate_vocabulary::{Mode, CLONE_POD, MODE, SPEC_CLONE_POD_FIELD};

/// A pod's valid clone reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRef {
    /// The source pod's name, in the clone's namespace.
    pub source: String,
    /// True when only `spec.clonePod` named it (the annotation was absent).
    pub from_field: bool,
}

/// Why a pod's clone reference cannot be used. Each names the pod as `namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "pod {pod}: clone reference {value:?} names namespace {namespace:?}; the source must be \
         in the clone's own namespace, named without one"
    )]
    CrossNamespace {
        pod: String,
        value: String,
        namespace: String,
    },
    #[error("pod {pod}: clone reference {value:?} is not a valid pod name")]
    InvalidName { pod: String, value: String },
    #[error("pod {pod}: {what} must be a string naming the source pod")]
    NotAString { pod: String, what: String },
    #[error(
        "pod {pod}: annotation {CLONE_POD}={annotation:?} and spec.{SPEC_CLONE_POD_FIELD}={field:?} \
         name different sources"
    )]
    Conflict {
        pod: String,
        annotation: String,
        field: String,
    },
}

/// A `podmigrate.io/mode` value we do not know: refused rather than guessed, since guessing
/// `migrate` for a typo of `clone` would delete the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pod {pod}: unknown {MODE} {value:?} (expected \"migrate\" or \"clone\")")]
pub struct ModeError {
    pub pod: String,
    pub value: String,
}

/// The clone reference of a typed pod: the annotation only (the typed `PodSpec` has no
/// `clonePod`). `Ok(None)`: the pod is not a clone.
pub fn clone_reference(pod: &Pod) -> Result<Option<CloneRef>, ReferenceError> {
    let who = pod_name(pod);
    match annotation(pod, CLONE_POD) {
        None => Ok(None),
        Some(value) => parse_source(&who, value).map(|source| {
            Some(CloneRef {
                source,
                from_field: false,
            })
        }),
    }
}

/// The clone reference of a pod as raw JSON: the annotation, or `spec.clonePod` when the API
/// server kept it (a patched one, or a manifest before `podmigrate apply` translated it).
/// Both present must agree. An empty or null value counts as absent, as the shim reads it.
pub fn clone_reference_raw(pod: &Value) -> Result<Option<CloneRef>, ReferenceError> {
    let who = raw_pod_name(pod);
    let annotation = raw_string(
        pod.pointer(&format!(
            "/metadata/annotations/{}",
            escape_pointer(CLONE_POD)
        )),
        &who,
        || format!("annotation {CLONE_POD}"),
    )?;
    let field = raw_string(
        pod.pointer(&format!("/spec/{SPEC_CLONE_POD_FIELD}")),
        &who,
        || format!("spec.{SPEC_CLONE_POD_FIELD}"),
    )?;
    let (value, from_field) = match (annotation, field) {
        (None, None) => return Ok(None),
        (Some(a), Some(f)) if a != f => {
            return Err(ReferenceError::Conflict {
                pod: who,
                annotation: a.to_string(),
                field: f.to_string(),
            })
        }
        (Some(a), _) => (a, false),
        (None, Some(f)) => (f, true),
    };
    let source = parse_source(&who, value)?;
    Ok(Some(CloneRef { source, from_field }))
}

/// The pod's `podmigrate.io/mode`; absent or empty means [`Mode::Migrate`].
pub fn clone_mode(pod: &Pod) -> Result<Mode, ModeError> {
    let value = annotation(pod, MODE);
    Mode::parse(value).ok_or_else(|| ModeError {
        pod: pod_name(pod),
        value: value.unwrap_or_default().to_string(),
    })
}

/// The containers that run for the pod's whole life, which a departure checkpoints: its native
/// sidecars (init containers with `restartPolicy: Always`), then its app containers.
pub fn long_running(pod: &Pod) -> Vec<String> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"))
        .chain(&spec.containers)
        .map(|c| c.name.clone())
        .collect()
}

/// Whether `container` is one of the pod's init containers that run to their end (not a
/// native sidecar).
pub fn is_run_once_init(pod: &Pod, container: &str) -> bool {
    pod.spec
        .iter()
        .flat_map(|s| s.init_containers.iter().flatten())
        .any(|c| c.name == container && c.restart_policy.as_deref() != Some("Always"))
}

/// Whether `name` can name a pod: a DNS-1123 subdomain (lowercase alphanumerics, '-' and
/// '.', alphanumeric at both ends of each dot-separated part, at most 253 characters), as
/// the API server checks it.
pub fn is_valid_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        })
}

/// `namespace/name` of a typed pod, for messages.
pub fn pod_name(pod: &Pod) -> String {
    qualified(
        pod.metadata.namespace.as_deref(),
        pod.metadata.name.as_deref(),
    )
}

/// An annotation's value; an empty value counts as absent (as for the shim).
pub fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

fn parse_source(who: &str, value: &str) -> Result<String, ReferenceError> {
    if let Some((namespace, _)) = value.split_once('/') {
        return Err(ReferenceError::CrossNamespace {
            pod: who.to_string(),
            value: value.to_string(),
            namespace: namespace.to_string(),
        });
    }
    if !is_valid_pod_name(value) {
        return Err(ReferenceError::InvalidName {
            pod: who.to_string(),
            value: value.to_string(),
        });
    }
    Ok(value.to_string())
}

fn raw_string<'a>(
    value: Option<&'a Value>,
    who: &str,
    what: impl FnOnce() -> String,
) -> Result<Option<&'a str>, ReferenceError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ReferenceError::NotAString {
            pod: who.to_string(),
            what: what(),
        }),
    }
}

/// `namespace/name` of a raw pod, for messages.
pub(crate) fn raw_pod_name(pod: &Value) -> String {
    let get = |key: &str| pod.pointer(key).and_then(Value::as_str);
    qualified(get("/metadata/namespace"), get("/metadata/name"))
}

fn qualified(namespace: Option<&str>, name: Option<&str>) -> String {
    let name = name.filter(|n| !n.is_empty()).unwrap_or("<unnamed>");
    match namespace.filter(|n| !n.is_empty()) {
        Some(namespace) => format!("{namespace}/{name}"),
        None => name.to_string(),
    }
}

/// RFC 6901: annotation keys contain '/', which a JSON pointer must escape.
fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Phase timings as the clone records them (milliseconds by phase name).
pub fn timings(pod: &Pod) -> std::collections::BTreeMap<String, u64> {
    annotation(pod, podmigrate_vocabulary::PHASE_TIMINGS)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).expect("a valid Pod")
    }

    fn with_annotations(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web-clone", "namespace": "shop", "annotations": annotations},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        })
    }

    #[test]
    fn a_pod_without_the_annotation_is_not_a_clone() {
        let raw = with_annotations(json!({"other": "x"}));
        assert_eq!(clone_reference(&pod(raw.clone())), Ok(None));
        assert_eq!(clone_reference_raw(&raw), Ok(None));
        let empty = with_annotations(json!({ CLONE_POD: "" }));
        assert_eq!(clone_reference(&pod(empty.clone())), Ok(None));
        assert_eq!(clone_reference_raw(&empty), Ok(None));
    }

    #[test]
    fn the_annotation_names_the_source() {
        let raw = with_annotations(json!({ CLONE_POD: "web-0" }));
        let expected = Some(CloneRef {
            source: "web-0".into(),
            from_field: false,
        });
        assert_eq!(clone_reference(&pod(raw.clone())), Ok(expected.clone()));
        assert_eq!(clone_reference_raw(&raw), Ok(expected));
    }

    #[test]
    fn the_spec_field_names_the_source_in_raw_json_only() {
        let mut raw = with_annotations(json!({}));
        raw["spec"][SPEC_CLONE_POD_FIELD] = json!("web-0");
        assert_eq!(
            clone_reference_raw(&raw),
            Ok(Some(CloneRef {
                source: "web-0".into(),
                from_field: true
            }))
        );
        // The typed PodSpec drops the unknown field: this is why the raw reader exists.
        assert_eq!(clone_reference(&pod(raw)), Ok(None));
    }

    #[test]
    fn field_and_annotation_must_agree() {
        let mut raw = with_annotations(json!({ CLONE_POD: "web-0" }));
        raw["spec"][SPEC_CLONE_POD_FIELD] = json!("web-0");
        assert_eq!(
            clone_reference_raw(&raw).unwrap().unwrap(),
            CloneRef {
                source: "web-0".into(),
                from_field: false
            }
        );
        raw["spec"][SPEC_CLONE_POD_FIELD] = json!("web-1");
        let err = clone_reference_raw(&raw).unwrap_err();
        assert!(matches!(err, ReferenceError::Conflict { .. }));
        assert!(err.to_string().starts_with("pod shop/web-clone: "), "{err}");
    }

    #[test]
    fn a_namespace_qualified_reference_is_cross_namespace() {
        let raw = with_annotations(json!({ CLONE_POD: "other/web-0" }));
        let err = clone_reference(&pod(raw.clone())).unwrap_err();
        assert_eq!(
            err,
            ReferenceError::CrossNamespace {
                pod: "shop/web-clone".into(),
                value: "other/web-0".into(),
                namespace: "other".into()
            }
        );
        assert_eq!(clone_reference_raw(&raw), Err(err));
        // Even the clone's own namespace: the reference is a bare name, one spelling only.
        let own = with_annotations(json!({ CLONE_POD: "shop/web-0" }));
        assert!(matches!(
            clone_reference(&pod(own)),
            Err(ReferenceError::CrossNamespace { .. })
        ));
    }

    #[test]
    fn invalid_names_and_non_strings_are_refused() {
        for bad in ["Web", "web_0", "-web", "web-", "a..b"] {
            let raw = with_annotations(json!({ CLONE_POD: bad }));
            assert!(
                matches!(
                    clone_reference(&pod(raw)),
                    Err(ReferenceError::InvalidName { .. })
                ),
                "{bad}"
            );
        }
        let mut raw = with_annotations(json!({}));
        raw["spec"][SPEC_CLONE_POD_FIELD] = json!(42);
        assert!(matches!(
            clone_reference_raw(&raw),
            Err(ReferenceError::NotAString { .. })
        ));
    }

    #[test]
    fn mode_defaults_to_migrate_and_refuses_unknown_values() {
        let none = pod(with_annotations(json!({})));
        assert_eq!(clone_mode(&none), Ok(Mode::Migrate));
        let clone = pod(with_annotations(json!({ MODE: "clone" })));
        assert_eq!(clone_mode(&clone), Ok(Mode::Clone));
        let bad = pod(with_annotations(json!({ MODE: "Clone" })));
        let err = clone_mode(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod shop/web-clone: unknown podmigrate.io/mode \"Clone\" (expected \"migrate\" or \"clone\")"
        );
    }

    #[test]
    fn pod_names_follow_dns_1123_subdomains() {
        assert!(is_valid_pod_name("web-0"));
        assert!(is_valid_pod_name("web.shop-1"));
        assert!(is_valid_pod_name(&"a".repeat(253)));
        assert!(!is_valid_pod_name(&"a".repeat(254)));
        assert!(!is_valid_pod_name(""));
        assert!(!is_valid_pod_name(".web"));
    }
}
