//! `labelSelector` and `fieldSelector` query parameters.
//!
//! Label selectors implement the apimachinery grammar clients actually send: `k`, `!k`, `k=v`,
//! `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)` joined by commas (the numeric `gt`/`lt` forms
//! are rejected with 400). Field selectors support `=`, `==`, `!=` on the per-kind field labels
//! kube-apiserver registers (see [`field_value`]); an unsupported label is a 400, as upstream,
//! so an agent using a field the real server would refuse fails here too.

use serde_json::{Map, Value};

use super::{ApiError, Kind};

#[derive(Debug, Clone)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct LabelSelector(Vec<LabelReq>);

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn check_value(selector: &str, v: &str) -> Result<String, ApiError> {
    if v.chars().all(is_value_char) && v.len() <= 63 {
        Ok(v.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label value: {v:?} in selector {selector:?}"
        )))
    }
}

/// Splits on commas that are not inside a `( ... )` value set.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

fn parse_set(selector: &str, rest: &str) -> Result<Vec<String>, ApiError> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "unable to parse requirement: expected a parenthesized value set in {selector:?}"
            ))
        })?;
    inner
        .split(',')
        .map(|v| check_value(selector, v.trim()))
        .collect()
}

impl LabelSelector {
    pub(crate) fn parse(selector: &str) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if selector.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top_level(selector) {
            let part = part.trim();
            let bad = || {
                ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?} in label selector {selector:?}"
                ))
            };
            if let Some(key) = part.strip_prefix('!') {
                let key = key.trim();
                if key.is_empty() || !key.chars().all(is_key_char) {
                    return Err(bad());
                }
                reqs.push(LabelReq::NotExists(key.to_string()));
                continue;
            }
            let key_len = part.find(|c: char| !is_key_char(c)).unwrap_or(part.len());
            let (key, rest) = part.split_at(key_len);
            if key.is_empty() {
                return Err(bad());
            }
            let key = key.to_string();
            let rest = rest.trim_start();
            let req = if rest.is_empty() {
                LabelReq::Exists(key)
            } else if let Some(v) = rest.strip_prefix("!=") {
                LabelReq::NotEq(key, check_value(selector, v.trim())?)
            } else if let Some(v) = rest.strip_prefix("==") {
                LabelReq::Eq(key, check_value(selector, v.trim())?)
            } else if let Some(v) = rest.strip_prefix('=') {
                LabelReq::Eq(key, check_value(selector, v.trim())?)
            } else if let Some(v) = rest.strip_prefix("notin") {
                LabelReq::NotIn(key, parse_set(selector, v)?)
            } else if let Some(v) = rest.strip_prefix("in") {
                LabelReq::In(key, parse_set(selector, v)?)
            } else {
                return Err(bad());
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    pub(crate) fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            // As upstream: `!=` and `notin` also match objects without the label.
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
        })
    }
}

/// A parsed `fieldSelector`: `(label, wanted equal?, value)` terms, all of which must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub(crate) fn parse(kind: Kind, selector: &str) -> Result<Self, ApiError> {
        let mut terms = Vec::new();
        if selector.trim().is_empty() {
            return Ok(FieldSelector(terms));
        }
        for part in selector.split(',') {
            let part = part.trim();
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: {selector:?}; can't understand {part:?}"
                )));
            };
            let field = field.trim();
            // Probe the label against an empty object so unsupported labels fail up front.
            if field_value(kind, &Value::Null, field).is_none() {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            terms.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    pub(crate) fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let have = field_value(kind, obj, field).unwrap_or_default();
            (have == *want) == *eq
        })
    }
}

/// Both selectors of a LIST or WATCH.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selectors {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Selectors {
    pub(crate) fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.labels
            .matches(obj.pointer("/metadata/labels").and_then(Value::as_object))
            && self.fields.matches(kind, obj)
    }
}

fn str_at(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn bool_at(obj: &Value, pointer: &str) -> String {
    obj.pointer(pointer)
        .and_then(Value::as_bool)
        .unwrap_or(false)
        .to_string()
}

/// The value of a field label on `obj`, or `None` when kube-apiserver does not support that label
/// for this kind. Absent fields read as `""` (or `false`), as upstream: `spec.nodeName=` selects
/// unscheduled pods.
pub(crate) fn field_value(kind: Kind, obj: &Value, field: &str) -> Option<String> {
    let v = match (kind, field) {
        (_, "metadata.name") => str_at(obj, "/metadata/name"),
        (_, "metadata.namespace") => str_at(obj, "/metadata/namespace"),
        (Kind::Pod, "spec.nodeName") => str_at(obj, "/spec/nodeName"),
        (Kind::Pod, "spec.restartPolicy") => str_at(obj, "/spec/restartPolicy"),
        (Kind::Pod, "spec.schedulerName") => str_at(obj, "/spec/schedulerName"),
        (Kind::Pod, "spec.serviceAccountName") => str_at(obj, "/spec/serviceAccountName"),
        (Kind::Pod, "spec.hostNetwork") => bool_at(obj, "/spec/hostNetwork"),
        (Kind::Pod, "status.phase") => str_at(obj, "/status/phase"),
        (Kind::Pod, "status.podIP") => str_at(obj, "/status/podIP"),
        (Kind::Pod, "status.nominatedNodeName") => str_at(obj, "/status/nominatedNodeName"),
        (Kind::Namespace, "status.phase") => str_at(obj, "/status/phase"),
        (Kind::Node, "spec.unschedulable") => bool_at(obj, "/spec/unschedulable"),
        (Kind::Event, f) => match f {
            "involvedObject.kind" => str_at(obj, "/involvedObject/kind"),
            "involvedObject.namespace" => str_at(obj, "/involvedObject/namespace"),
            "involvedObject.name" => str_at(obj, "/involvedObject/name"),
            "involvedObject.uid" => str_at(obj, "/involvedObject/uid"),
            "involvedObject.apiVersion" => str_at(obj, "/involvedObject/apiVersion"),
            "involvedObject.resourceVersion" => str_at(obj, "/involvedObject/resourceVersion"),
            "involvedObject.fieldPath" => str_at(obj, "/involvedObject/fieldPath"),
            "reason" => str_at(obj, "/reason"),
            "reportingComponent" => str_at(obj, "/reportingComponent"),
            "source" => str_at(obj, "/source/component"),
            "type" => str_at(obj, "/type"),
            _ => return None,
        },
        (Kind::EventsV1Event, f) => match f {
            "regarding.kind" => str_at(obj, "/regarding/kind"),
            "regarding.namespace" => str_at(obj, "/regarding/namespace"),
            "regarding.name" => str_at(obj, "/regarding/name"),
            "regarding.uid" => str_at(obj, "/regarding/uid"),
            "regarding.apiVersion" => str_at(obj, "/regarding/apiVersion"),
            "reason" => str_at(obj, "/reason"),
            "reportingController" => str_at(obj, "/reportingController"),
            "type" => str_at(obj, "/type"),
            _ => return None,
        },
        _ => return None,
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn label_grammar() {
        let l = labels(json!({"app": "web", "tier": "fe"}));
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches(Some(&l)));
        assert_eq!(m("app=web"), Ok(true));
        assert_eq!(m("app==web,tier=fe"), Ok(true));
        assert_eq!(m("app!=web"), Ok(false));
        assert_eq!(m("app in (db, web),!missing"), Ok(true));
        assert_eq!(m("tier notin (fe)"), Ok(false));
        assert_eq!(m("missing notin (x)"), Ok(true));
        assert_eq!(m("app"), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(m("app > 3").is_err());
        assert!(m("app in web").is_err());
    }

    #[test]
    fn field_labels() {
        let pod = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let m = |s: &str| FieldSelector::parse(Kind::Pod, s).map(|f| f.matches(Kind::Pod, &pod));
        assert_eq!(m("spec.nodeName=n1,metadata.name=p"), Ok(true));
        assert_eq!(m("status.phase="), Ok(true));
        assert_eq!(m("spec.nodeName!=n1"), Ok(false));
        assert!(m("spec.bogus=1").is_err());
        assert!(FieldSelector::parse(Kind::Node, "spec.nodeName=x").is_err());
    }
}
