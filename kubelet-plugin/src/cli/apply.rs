//! `podmigrate apply`: accept the proof of concept's manifests on a stock API server.
//!
//! The proof of concept named a clone's source in `spec.clonePod`, a field only its patched
//! API server knew; a stock one drops unknown fields (or, with strict field validation,
//! rejects the pod). So before a manifest is sent, each Pod's `spec.clonePod` becomes the
//! [`CLONE_POD`] annotation, which every component reads. Everything else passes through as
//! written.

use serde_json::{Map, Value};

use crate::pod::{clone_reference_raw, raw_pod_name, ModeError, ReferenceError};
use podmigrate_vocabulary::{
    Mode, CLONE_OF_LABEL, CLONE_POD, MODE, RUNTIME_CLASS, SPEC_CLONE_POD_FIELD,
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("manifest is not valid YAML: {0}")]
    Yaml(#[from] serde_saphyr::Error),
    #[error("could not write the manifests as YAML: {0}")]
    Render(#[from] serde_saphyr::SerializeError),
    /// Cross-namespace, invalid, or annotation and field disagreeing.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(transparent)]
    Mode(#[from] ModeError),
    #[error("pod {pod}: {what} must be a map")]
    NotAMap { pod: String, what: &'static str },
}

/// Translate one manifest document. A Pod with `spec.clonePod` loses the field and gains the
/// annotation (and `runtimeClassName: migrate` when it names no runtime class: the proof of
/// concept needed none, and without ours the clone would start fresh). A `v1` `List` has its
/// items translated. Anything else is returned as it came. The flag says whether anything
/// changed.
pub fn translate_manifest(doc: Value) -> Result<(Value, bool), ApplyError> {
    match doc.get("kind").and_then(Value::as_str) {
        Some("Pod") if is_core_v1(&doc) => translate_pod(doc),
        Some("List") if is_core_v1(&doc) && doc.get("items").is_some_and(Value::is_array) => {
            let mut doc = doc;
            let mut translated = false;
            if let Some(Value::Array(items)) = doc.get_mut("items") {
                for item in items.iter_mut() {
                    let (new, changed) = translate_manifest(item.take())?;
                    *item = new;
                    translated |= changed;
                }
            }
            Ok((doc, translated))
        }
        _ => Ok((doc, false)),
    }
}

/// The documents of a manifest file: a stream of YAML documents separated by `---` (empty
/// ones skipped), or of JSON objects, as kubectl accepts them.
pub fn parse_manifests(text: &str) -> Result<Vec<Value>, ApplyError> {
    if text.trim_start().starts_with('{') {
        let json: Result<Vec<Value>, _> = serde_json::Deserializer::from_str(text)
            .into_iter::<Value>()
            .collect();
        // JSON-looking YAML (a flow mapping) is still YAML: let the YAML parser judge it.
        if let Ok(docs) = json {
            return Ok(docs);
        }
    }
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|doc| !doc.is_null()).collect())
}

/// [`parse_manifests`], then [`translate_manifest`] on each document, in order.
pub fn translate_manifests(text: &str) -> Result<Vec<(Value, bool)>, ApplyError> {
    parse_manifests(text)?
        .into_iter()
        .map(translate_manifest)
        .collect()
}

/// The documents as one YAML stream, e.g. for `--dry-run`.
pub fn to_yaml(docs: &[Value]) -> Result<String, ApplyError> {
    Ok(serde_saphyr::to_string_multiple(docs)?)
}

fn is_core_v1(doc: &Value) -> bool {
    matches!(
        doc.get("apiVersion").and_then(Value::as_str),
        None | Some("v1")
    )
}

fn translate_pod(mut doc: Value) -> Result<(Value, bool), ApplyError> {
    // Checked first: refuses a cross-namespace or invalid value, and a field and annotation
    // that disagree.
    let reference = clone_reference_raw(&doc)?;
    if reference.is_some() {
        check_mode(&doc)?;
    }
    let pod = raw_pod_name(&doc);
    let Some(spec) = doc.get_mut("spec").and_then(Value::as_object_mut) else {
        return Ok((doc, false));
    };
    let translated = spec.remove(SPEC_CLONE_POD_FIELD).is_some();
    let Some(reference) = reference else {
        // No reference, or an empty or null field: nothing to carry over.
        return Ok((doc, translated));
    };
    if translated && !spec.contains_key("runtimeClassName") {
        spec.insert("runtimeClassName".into(), RUNTIME_CLASS.into());
    }
    let metadata = object_entry(&mut doc, "metadata", &pod, "metadata")?;
    if translated {
        let annotations = object_entry(metadata, "annotations", &pod, "metadata.annotations")?;
        annotations
            .as_object_mut()
            .expect("checked above")
            .insert(CLONE_POD.into(), reference.source.clone().into());
    }
    // How the source's agent finds the clone: annotations cannot be selected.
    let labels = object_entry(metadata, "labels", &pod, "metadata.labels")?;
    labels
        .as_object_mut()
        .expect("checked above")
        .insert(CLONE_OF_LABEL.into(), reference.source.into());
    Ok((doc, translated))
}

/// A typo in the mode is caught before anything is created.
fn check_mode(doc: &Value) -> Result<(), ModeError> {
    let value = doc
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(MODE));
    let parsed = match value {
        None | Some(Value::Null) => Mode::parse(None),
        Some(Value::String(s)) => Mode::parse(Some(s)),
        Some(_) => None,
    };
    match parsed {
        Some(_) => Ok(()),
        None => Err(ModeError {
            pod: raw_pod_name(doc),
            value: value.map(value_text).unwrap_or_default(),
        }),
    }
}

fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `parent[key]`, made an empty map if absent or null.
fn object_entry<'a>(
    parent: &'a mut Value,
    key: &str,
    pod: &str,
    what: &'static str,
) -> Result<&'a mut Value, ApplyError> {
    let not_a_map = || ApplyError::NotAMap {
        pod: pod.to_string(),
        what,
    };
    let map = parent.as_object_mut().ok_or_else(not_a_map)?;
    let entry = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    if entry.is_object() {
        Ok(entry)
    } else {
        Err(not_a_map())
    }
}

/// `podmigrate apply -f pod.yaml`: like `kubectl create -f`, for Pods, with `spec.clonePod`
/// moved into the annotation first (a stock API server would drop the field).
#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The manifest (YAML or JSON, one or more documents); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: std::path::PathBuf,
    /// Namespace for documents that name none.
    #[arg(short, long, default_value = "default", env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Print the translated manifests instead of creating them.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: ApplyArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let docs = translate_manifests(&text).with_context(|| format!("{}", args.file.display()))?;
    if args.dry_run {
        let values: Vec<Value> = docs.into_iter().map(|(doc, _)| doc).collect();
        print!("{}", to_yaml(&values)?);
        return Ok(());
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            let kube = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
            for (doc, translated) in docs {
                if doc.get("kind").and_then(Value::as_str) != Some("Pod") {
                    anyhow::bail!(
                        "{}: only Pods can be applied here, not {}",
                        args.file.display(),
                        doc.get("kind")
                            .and_then(Value::as_str)
                            .unwrap_or("a document without kind")
                    );
                }
                let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(doc)
                    .with_context(|| format!("{}: not a valid Pod", args.file.display()))?;
                let namespace = pod
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| args.namespace.clone());
                let name = pod.metadata.name.clone().unwrap_or_default();
                kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(kube.clone(), &namespace)
                    .create(&kube::api::PostParams::default(), &pod)
                    .await
                    .with_context(|| format!("creating pod {namespace}/{name}"))?;
                println!(
                    "pod/{name} created{}",
                    if translated {
                        " (spec.clonePod moved to the podmigrate.io/clone-pod annotation)"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const POC_CLONE: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-clone
  namespace: shop
  labels:
    app: web
spec:
  clonePod: web-0
  nodeName: node-b
  containers:
    - name: web
      image: nginx:1.27
      ports:
        - containerPort: 80
"#;

    #[test]
    fn the_spec_field_becomes_the_annotation() {
        let docs = translate_manifests(POC_CLONE).unwrap();
        assert_eq!(docs.len(), 1);
        let (pod, translated) = &docs[0];
        assert!(translated);
        assert_eq!(
            *pod,
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "web-clone",
                    "namespace": "shop",
                    "labels": {"app": "web", CLONE_OF_LABEL: "web-0"},
                    "annotations": {CLONE_POD: "web-0"}
                },
                "spec": {
                    "nodeName": "node-b",
                    "runtimeClassName": "migrate",
                    "containers": [{"name": "web", "image": "nginx:1.27",
                                    "ports": [{"containerPort": 80}]}]
                }
            })
        );
        // What we send is a Pod the typed API accepts, and a clone by its annotation.
        let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone()).unwrap();
        let reference = crate::pod::clone_reference(&typed).unwrap();
        assert_eq!(reference.unwrap().source, "web-0");
    }

    #[test]
    fn existing_annotations_and_runtime_class_are_kept() {
        let text = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-clone
  annotations:
    podmigrate.io/mode: clone
    note: "true"
spec:
  clonePod: web-0
  runtimeClassName: migrate-debug
  containers: [{name: web, image: nginx}]
"#;
        let (pod, translated) = translate_manifests(text).unwrap().remove(0);
        assert!(translated);
        assert_eq!(
            pod["metadata"]["annotations"],
            json!({"podmigrate.io/mode": "clone", "note": "true", CLONE_POD: "web-0"})
        );
        assert_eq!(pod["spec"]["runtimeClassName"], "migrate-debug");
        assert!(pod["spec"].get(SPEC_CLONE_POD_FIELD).is_none());
    }

    #[test]
    fn agreeing_field_and_annotation_are_fine_disagreeing_ones_refused() {
        let agree = r#"
kind: Pod
apiVersion: v1
metadata: {name: c, namespace: shop, annotations: {podmigrate.io/clone-pod: web-0}}
spec: {clonePod: web-0, containers: [{name: web, image: nginx}]}
"#;
        let (pod, translated) = translate_manifests(agree).unwrap().remove(0);
        assert!(translated);
        assert_eq!(pod["metadata"]["annotations"][CLONE_POD], "web-0");

        let disagree = agree.replace("clonePod: web-0", "clonePod: web-1");
        let err = translate_manifests(&disagree).unwrap_err();
        assert!(matches!(
            err,
            ApplyError::Reference(ReferenceError::Conflict { .. })
        ));
        assert_eq!(
            err.to_string(),
            "pod shop/c: annotation podmigrate.io/clone-pod=\"web-0\" and spec.clonePod=\"web-1\" \
             name different sources"
        );
    }

    #[test]
    fn a_namespace_qualified_source_is_refused() {
        let text = POC_CLONE.replace("clonePod: web-0", "clonePod: prod/web-0");
        let err = translate_manifests(&text).unwrap_err();
        assert!(matches!(
            err,
            ApplyError::Reference(ReferenceError::CrossNamespace { .. })
        ));
        assert!(err.to_string().starts_with("pod shop/web-clone: "), "{err}");
    }

    #[test]
    fn an_unknown_mode_is_refused_before_anything_is_sent() {
        let text = POC_CLONE.replace(
            "  labels:\n",
            "  annotations:\n    podmigrate.io/mode: teleport\n  labels:\n",
        );
        let err = translate_manifests(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod shop/web-clone: unknown podmigrate.io/mode \"teleport\" (expected \"migrate\" or \
             \"clone\")"
        );
    }

    #[test]
    fn other_documents_pass_through_unchanged() {
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    podmigrate.io/migratable: "true"
---
{POC_CLONE}
---
# a comment-only document
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  template:
    spec:
      clonePod: not-ours-to-touch
      containers: [{{name: web, image: nginx}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: plain
spec:
  containers: [{{name: web, image: nginx}}]
"#
        );
        let docs = translate_manifests(&text).unwrap();
        let flags: Vec<bool> = docs.iter().map(|(_, t)| *t).collect();
        assert_eq!(flags, [false, true, false, false]);
        assert_eq!(
            docs[0].0["metadata"]["labels"]["podmigrate.io/migratable"],
            json!("true")
        );
        assert_eq!(
            docs[2].0["spec"]["template"]["spec"]["clonePod"],
            "not-ours-to-touch"
        );
        assert_eq!(docs[2].0["spec"]["replicas"], json!(2));
        assert!(docs[3].0["metadata"].get("annotations").is_none());
    }

    #[test]
    fn list_items_are_translated() {
        let list = json!({
            "apiVersion": "v1",
            "kind": "List",
            "items": [
                {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}},
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "c", "annotations": null},
                 "spec": {"clonePod": "web-0", "containers": []}}
            ]
        });
        let (list, translated) = translate_manifest(list).unwrap();
        assert!(translated);
        assert_eq!(
            list["items"][1]["metadata"]["annotations"],
            json!({ CLONE_POD: "web-0" })
        );
        assert_eq!(
            list["items"][0],
            json!({"apiVersion": "v1", "kind": "Service",
                                            "metadata": {"name": "web"}})
        );
    }

    #[test]
    fn json_manifests_are_read_too() {
        let text = r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "c"},
                      "spec": {"clonePod": "web-0", "containers": []}}
                     {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}"#;
        let docs = translate_manifests(text).unwrap();
        assert_eq!(docs.len(), 2);
        assert!(docs[0].1);
        assert_eq!(docs[0].0["metadata"]["annotations"][CLONE_POD], "web-0");
        assert!(!docs[1].1);
        // A YAML flow mapping that is not JSON is still read, as YAML.
        let flow = "{apiVersion: v1, kind: Pod, metadata: {name: c}, spec: {clonePod: web-0}}";
        assert!(translate_manifests(flow).unwrap()[0].1);
    }

    #[test]
    fn an_empty_field_is_dropped_without_making_a_clone() {
        let text = POC_CLONE.replace("clonePod: web-0", "clonePod: null");
        let (pod, translated) = translate_manifests(&text).unwrap().remove(0);
        assert!(translated);
        assert!(pod["spec"].get(SPEC_CLONE_POD_FIELD).is_none());
        assert!(pod["metadata"].get("annotations").is_none());
        assert!(pod["spec"].get("runtimeClassName").is_none());
    }

    #[test]
    fn bad_yaml_and_bad_shapes_are_errors() {
        assert!(matches!(
            translate_manifests("kind: Pod\n  metadata: [oops\n"),
            Err(ApplyError::Yaml(_))
        ));
        let text = POC_CLONE.replace("  labels:\n    app: web\n", "  annotations: [a]\n");
        let err = translate_manifests(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "pod shop/web-clone: metadata.annotations must be a map"
        );
    }

    #[test]
    fn yaml_output_reads_back_the_same() {
        let docs: Vec<Value> = translate_manifests(&format!("{POC_CLONE}\n---\n{POC_CLONE}"))
            .unwrap()
            .into_iter()
            .map(|(doc, _)| doc)
            .collect();
        let yaml = to_yaml(&docs).unwrap();
        assert_eq!(parse_manifests(&yaml).unwrap(), docs);
        // Strings that look like other scalars stay strings.
        let tricky = vec![json!({"a": "true", "b": "80", "c": "null", "d": "2025-01-01"})];
        assert_eq!(parse_manifests(&to_yaml(&tricky).unwrap()).unwrap(), tricky);
    }
}
