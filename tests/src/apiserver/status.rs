//! Errors as the API server reports them: a `metav1.Status` body with the HTTP code, reason and
//! message a real kube-apiserver would use, so that client code under test takes the same branches
//! (`kube::Error::Api(status)` with `status.code`/`status.reason`) as it would against a cluster.

use serde_json::{json, Map, Value};

use super::Kind;

/// A failed API call, carrying everything needed to render the `metav1.Status` response.
///
/// The in-process accessors of [`super::ApiServer`] return the same error the HTTP API would,
/// so a test can assert on `code`/`reason` without going through a client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code (also `Status.code`).
    pub code: u16,
    /// `Status.reason`, a Kubernetes `StatusReason` such as `NotFound` or `AlreadyExists`.
    pub reason: String,
    /// `Status.message`, worded like kube-apiserver's.
    pub message: String,
    /// `Status.details`, when kube-apiserver would send it.
    pub details: Option<Value>,
}

/// One entry of `Status.details.causes` for a 422 Invalid.
#[derive(Debug, Clone)]
pub(crate) struct Cause {
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueForbidden`, ...
    pub reason: &'static str,
    /// Field path, e.g. `spec.containers[0].image`.
    pub field: String,
    /// Human text, e.g. `Required value`.
    pub message: String,
}

impl Cause {
    pub(crate) fn required(field: impl Into<String>) -> Self {
        Cause {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, value: &str, why: &str) -> Self {
        Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {value:?}: {why}"),
        }
    }

    pub(crate) fn forbidden(field: impl Into<String>, why: &str) -> Self {
        Cause {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {why}"),
        }
    }
}

impl ApiError {
    fn new(code: u16, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: reason.to_string(),
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// `details` for errors about one named object: `{name, group?, kind: <plural>}`.
    fn object_details(kind: Kind, name: &str) -> Value {
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !kind.group().is_empty() {
            d.insert("group".into(), json!(kind.group()));
        }
        d.insert("kind".into(), json!(kind.plural()));
        Value::Object(d)
    }

    /// 404 for a missing object: `pods "x" not found`.
    pub fn not_found(kind: Kind, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", kind.qualified_plural()),
        )
        .with_details(Self::object_details(kind, name))
    }

    /// 404 for a path no resource is served at (kube-apiserver's generic text).
    pub fn no_such_path() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details(json!({}))
    }

    /// 409 for a create whose name is taken: `pods "x" already exists`.
    pub fn already_exists(kind: Kind, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", kind.qualified_plural()),
        )
        .with_details(Self::object_details(kind, name))
    }

    /// 409 for an optimistic-concurrency failure (stale `resourceVersion`).
    pub fn stale(kind: Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 409 Conflict: `Operation cannot be fulfilled on pods "x": <why>`.
    pub fn conflict(kind: Kind, name: &str, why: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: {why}",
                kind.qualified_plural()
            ),
        )
        .with_details(Self::object_details(kind, name))
    }

    /// 422 Invalid with field causes: `Pod "x" is invalid: spec.containers: Required value`.
    pub(crate) fn invalid(kind_name: &str, group: &str, name: &str, causes: &[Cause]) -> Self {
        let rendered: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = match rendered.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let mut d = Map::new();
        d.insert("name".into(), json!(name));
        if !group.is_empty() {
            d.insert("group".into(), json!(group));
        }
        d.insert("kind".into(), json!(kind_name));
        d.insert(
            "causes".into(),
            Value::Array(
                causes
                    .iter()
                    .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                    .collect(),
            ),
        );
        Self::new(
            422,
            "Invalid",
            format!("{kind_name} {name:?} is invalid: {joined}"),
        )
        .with_details(Value::Object(d))
    }

    /// 422 Invalid for an object of `kind`.
    pub(crate) fn invalid_object(kind: Kind, name: &str, causes: &[Cause]) -> Self {
        Self::invalid(kind.kind_name(), kind.group(), name, causes)
    }

    /// 422 without field causes (e.g. a JSON patch whose `test` op failed).
    pub fn unprocessable(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    /// 400 BadRequest: malformed body, patch, selector, or mismatched name/namespace.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 410 Expired: a watch or list asked for history the server no longer has.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method on the requested resource ({method})"),
        )
        .with_details(json!({}))
    }

    /// 415 UnsupportedMediaType for a PATCH with an unknown `Content-Type`.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml, application/strategic-merge-patch+json"
            ),
        )
    }

    /// 413 RequestEntityTooLarge.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            413,
            "RequestEntityTooLarge",
            format!("Request entity too large: limit is {limit}"),
        )
    }

    /// An error injected by a test ([`super::ApiServer::fail_requests`]): the reason follows the code
    /// the way kube-apiserver maps them, so kube's retry policy (429/503/504) reacts as in a cluster.
    pub fn injected(code: u16) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            409 => "Conflict",
            410 => "Expired",
            422 => "Invalid",
            429 => "TooManyRequests",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "InternalError",
        };
        Self::new(
            code,
            reason,
            format!("injected failure ({code} {reason}) from the test API server"),
        )
    }

    /// The `metav1.Status` body for this error.
    pub fn to_status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let (Some(details), Some(obj)) = (&self.details, s.as_object_mut()) {
            obj.insert("details".into(), details.clone());
        }
        s
    }
}
