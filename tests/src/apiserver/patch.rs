//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), a strategic-merge-patch
//! subset, and server-side apply approximated as a strategic merge.
//!
//! Strategic merge is implemented for what controllers and kubelets send in practice: lists whose
//! upstream `patchMergeKey` is known by field name (see [`merge_key`]) are merged element-wise,
//! `finalizers` is merged as a set, `$patch: delete|replace|merge`, `$deleteFromPrimitiveList/<f>`
//! are honoured, `$setElementOrder/<f>` and `$retainKeys` are accepted and ignored. Every other
//! list is replaced, as upstream does for lists without a patch strategy. The merge key is chosen
//! by field name rather than by schema path; for the kinds served here the two agree.

use serde_json::{Map, Value};

use super::ApiError;

/// The PATCH flavours kube-apiserver accepts, by `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    Merge,
    Strategic,
    Json,
    Apply,
}

impl PatchKind {
    /// Maps a `Content-Type` (parameters such as `; charset=utf-8` ignored) to a patch flavour.
    pub(crate) fn from_content_type(content_type: &str) -> Option<Self> {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match mime.as_str() {
            "application/merge-patch+json" => Some(PatchKind::Merge),
            "application/strategic-merge-patch+json" => Some(PatchKind::Strategic),
            "application/json-patch+json" => Some(PatchKind::Json),
            "application/apply-patch+yaml" | "application/apply-patch+json" => {
                Some(PatchKind::Apply)
            }
            _ => None,
        }
    }
}

/// Parses a JSON body or answers 400 the way kube-apiserver does for undecodable patches.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(format!(
            "error decoding patch: {e} (the stand-in API server accepts JSON bodies only)"
        ))
    })
}

/// Applies a patch of `kind` to `target`, returning the patched document.
pub(crate) fn apply(kind: PatchKind, target: &Value, body: &[u8]) -> Result<Value, ApiError> {
    match kind {
        PatchKind::Merge => {
            let patch = parse_json(body)?;
            let mut doc = target.clone();
            json_patch::merge(&mut doc, &patch);
            Ok(doc)
        }
        PatchKind::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("error decoding json patch: {e}")))?;
            let mut doc = target.clone();
            json_patch::patch(&mut doc, &patch.0).map_err(|e| {
                ApiError::unprocessable(format!(
                    "the server rejected our request due to an error in our request: {e}"
                ))
            })?;
            Ok(doc)
        }
        PatchKind::Strategic | PatchKind::Apply => {
            let patch = parse_json(body)?;
            strategic_merge(target, &patch)
        }
    }
}

/// The upstream `patchMergeKey` for list fields with `patchStrategy: merge`, by field name.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "ports" => "containerPort",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "conditions" | "addresses" => "type",
        "ownerReferences" => "uid",
        "hostAliases" | "podIPs" | "hostIPs" => "ip",
        "readinessGates" => "conditionType",
        _ => return None,
    })
}

/// Primitive lists upstream merges as sets (`patchStrategy: merge` on `[]string`).
fn is_set_list(field: &str) -> bool {
    field == "finalizers"
}

/// Strategic merge of `patch` onto `target`.
pub(crate) fn strategic_merge(target: &Value, patch: &Value) -> Result<Value, ApiError> {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => Ok(Value::Object(merge_map(t, p)?)),
        (_, Value::Object(p)) => Ok(Value::Object(merge_map(&Map::new(), p)?)),
        (_, other) => Ok(other.clone()),
    }
}

fn merge_map(
    target: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Map<String, Value>, ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut out = patch.clone();
            out.remove("$patch");
            return Ok(strip_directives(out));
        }
        Some("delete") => return Ok(Map::new()),
        Some("merge") | None => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown patch type: {other:?} in map"
            )))
        }
    }
    let mut out = target.clone();
    for (key, pv) in patch {
        if key == "$patch" || key == "$retainKeys" || key.starts_with("$setElementOrder/") {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove: Vec<&Value> = pv
                .as_array()
                .map(|a| a.iter().collect())
                .unwrap_or_default();
            if let Some(Value::Array(list)) = out.get_mut(field) {
                list.retain(|v| !remove.contains(&v));
            }
            continue;
        }
        if key.starts_with('$') {
            return Err(ApiError::bad_request(format!(
                "unknown strategic merge patch directive: {key:?}"
            )));
        }
        if pv.is_null() {
            out.remove(key);
            continue;
        }
        let merged = match (out.get(key), pv) {
            (Some(Value::Object(t)), Value::Object(p)) => {
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    out.remove(key);
                    continue;
                }
                Value::Object(merge_map(t, p)?)
            }
            (_, Value::Object(p)) => {
                if p.get("$patch").and_then(Value::as_str) == Some("delete") {
                    out.remove(key);
                    continue;
                }
                Value::Object(merge_map(&Map::new(), p)?)
            }
            (Some(Value::Array(t)), Value::Array(p)) => merge_list(key, t, p)?,
            (None, Value::Array(p)) => merge_list(key, &[], p)?,
            (_, other) => other.clone(),
        };
        out.insert(key.clone(), merged);
    }
    Ok(out)
}

fn merge_list(field: &str, target: &[Value], patch: &[Value]) -> Result<Value, ApiError> {
    // `[{"$patch": "replace"}, ...]` replaces the whole list.
    let replace = patch
        .iter()
        .any(|v| v.get("$patch").and_then(Value::as_str) == Some("replace"));
    if replace {
        let kept = patch
            .iter()
            .filter(|v| v.get("$patch").is_none())
            .cloned()
            .map(strip_value)
            .collect();
        return Ok(Value::Array(kept));
    }
    if is_set_list(field) {
        let mut out = target.to_vec();
        for v in patch {
            if !out.contains(v) {
                out.push(v.clone());
            }
        }
        return Ok(Value::Array(out));
    }
    let Some(mk) = merge_key(field) else {
        return Ok(Value::Array(
            patch.iter().cloned().map(strip_value).collect(),
        ));
    };
    let mut out = target.to_vec();
    for pv in patch {
        let Some(pm) = pv.as_object() else {
            return Err(ApiError::bad_request(format!(
                "list {field:?} is merged by key {mk:?}, but an element is not an object"
            )));
        };
        let Some(key) = pm.get(mk) else {
            return Err(ApiError::bad_request(format!(
                "map: {pv} does not contain declared merge key: {mk}"
            )));
        };
        let pos = out.iter().position(|t| t.get(mk) == Some(key));
        let delete = pm.get("$patch").and_then(Value::as_str) == Some("delete");
        match (pos, delete) {
            (Some(i), true) => {
                out.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => {
                let base = out[i].as_object().cloned().unwrap_or_default();
                out[i] = Value::Object(merge_map(&base, pm)?);
            }
            (None, false) => out.push(Value::Object(merge_map(&Map::new(), pm)?)),
        }
    }
    Ok(Value::Array(out))
}

fn strip_directives(map: Map<String, Value>) -> Map<String, Value> {
    map.into_iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| (k, strip_value(v)))
        .collect()
}

fn strip_value(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(strip_directives(m)),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_value).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merges_containers_by_name_and_conditions_by_type() {
        let target = json!({
            "spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}]},
            "metadata": {"finalizers": ["f1"]}
        });
        let patch = json!({
            "spec": {"containers": [{"name": "b", "image": "z"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Init", "status": "True"}]},
            "metadata": {"finalizers": ["f2"]}
        });
        let out = strategic_merge(&target, &patch).expect("merge");
        assert_eq!(out["spec"]["containers"][0]["image"], "x");
        assert_eq!(out["spec"]["containers"][1]["image"], "z");
        assert_eq!(out["status"]["conditions"][0]["status"], "True");
        assert_eq!(
            out["status"]["conditions"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(out["metadata"]["finalizers"], json!(["f1", "f2"]));

        let del = json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]},
                         "$deleteFromPrimitiveList/x": [], "metadata": {"$deleteFromPrimitiveList/finalizers": ["f1"]}});
        let out = strategic_merge(&out, &del).expect("merge");
        assert_eq!(out["spec"]["containers"].as_array().map(Vec::len), Some(1));
        assert_eq!(out["metadata"]["finalizers"], json!(["f2"]));
    }

    #[test]
    fn content_types() {
        assert_eq!(
            PatchKind::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchKind::Merge)
        );
        assert_eq!(PatchKind::from_content_type("application/json"), None);
    }
}
