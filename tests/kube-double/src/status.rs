//! `metav1.Status` errors, as the API server returns them.

use serde_json::{Value, json};

/// One field error of an `Invalid` (422) status.
#[derive(Debug, Clone)]
pub struct Cause {
    pub reason: &'static str,
    pub field: String,
    pub message: String,
}

/// A failed request: HTTP code plus the `Status` body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    fn with_details(mut self, name: &str, group: &str, kind: &str) -> ApiError {
        let mut d = serde_json::Map::new();
        if !name.is_empty() {
            d.insert("name".into(), name.into());
        }
        if !group.is_empty() {
            d.insert("group".into(), group.into());
        }
        if !kind.is_empty() {
            d.insert("kind".into(), kind.into());
        }
        self.details = Value::Object(d);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "BadRequest", message)
    }

    /// `deployments.apps "x" not found`.
    pub fn not_found(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(group, plural)),
        )
        .with_details(name, group, plural)
    }

    pub fn path_not_found() -> ApiError {
        ApiError::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
        .with_details("", "", "")
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(group, plural)),
        )
        .with_details(name, group, plural)
    }

    /// Optimistic-concurrency failure (stale `resourceVersion`, failed precondition).
    pub fn conflict(group: &str, plural: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                qualified(group, plural)
            ),
        )
        .with_details(name, group, plural)
    }

    pub fn stale(group: &str, plural: &str, name: &str) -> ApiError {
        ApiError::conflict(
            group,
            plural,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// Server-side apply conflict between field managers.
    pub fn apply_conflicts(
        group: &str,
        plural: &str,
        name: &str,
        conflicts: &[(String, String, String)],
    ) -> ApiError {
        let n = conflicts.len();
        let mut message = format!(
            "Apply failed with {n} conflict{}: ",
            if n == 1 { "" } else { "s" }
        );
        let parts: Vec<String> = conflicts
            .iter()
            .map(|(mgr, api, field)| format!("conflict with \"{mgr}\" using {api}: {field}"))
            .collect();
        message.push_str(&parts.join("\n"));
        let mut e = ApiError::new(409, "Conflict", message).with_details(name, group, plural);
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(mgr, api, field)| {
                json!({"reason": "FieldManagerConflict",
                       "message": format!("conflict with \"{mgr}\" using {api}"),
                       "field": field})
            })
            .collect();
        e.details["causes"] = Value::Array(causes);
        e
    }

    /// 422 with field causes; `kind` is the Kind (e.g. `Deployment`), as the real server reports.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: &[Cause]) -> ApiError {
        let msgs: Vec<String> = causes
            .iter()
            .map(|c| {
                if c.field.is_empty() {
                    c.message.clone()
                } else {
                    format!("{}: {}", c.field, c.message)
                }
            })
            .collect();
        let joined = if msgs.len() == 1 {
            msgs[0].clone()
        } else {
            format!("[{}]", msgs.join(", "))
        };
        let qual = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let mut e = ApiError::new(
            422,
            "Invalid",
            format!("{qual} \"{name}\" is invalid: {joined}"),
        )
        .with_details(name, group, kind);
        e.details["causes"] = Value::Array(
            causes
                .iter()
                .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
                .collect(),
        );
        e
    }

    pub fn forbidden(group: &str, plural: &str, name: &str, why: &str) -> ApiError {
        ApiError::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: {why}",
                qualified(group, plural)
            ),
        )
        .with_details(name, group, plural)
    }

    pub fn method_not_allowed() -> ApiError {
        ApiError::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        )
        .with_details("", "", "")
    }

    pub fn unsupported_media_type(ct: &str) -> ApiError {
        ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"
            ),
        )
    }

    pub fn body(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            v["details"] = self.details.clone();
        }
        v
    }
}

/// `deployments.apps` / `configmaps`.
pub fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// Collects field errors for one object.
#[derive(Debug, Default)]
pub struct Errs(pub Vec<Cause>);

impl Errs {
    pub fn required(&mut self, field: impl Into<String>) {
        self.0.push(Cause {
            reason: "FieldValueRequired",
            field: field.into(),
            message: "Required value".into(),
        });
    }
    pub fn invalid(&mut self, field: impl Into<String>, value: &Value, detail: &str) {
        self.0.push(Cause {
            reason: "FieldValueInvalid",
            field: field.into(),
            message: format!("Invalid value: {}: {detail}", render(value)),
        });
    }
    pub fn duplicate(&mut self, field: impl Into<String>, value: &Value) {
        self.0.push(Cause {
            reason: "FieldValueDuplicate",
            field: field.into(),
            message: format!("Duplicate value: {}", render(value)),
        });
    }
    pub fn forbidden(&mut self, field: impl Into<String>, detail: &str) {
        self.0.push(Cause {
            reason: "FieldValueForbidden",
            field: field.into(),
            message: format!("Forbidden: {detail}"),
        });
    }
    pub fn not_supported(&mut self, field: impl Into<String>, value: &Value, supported: &[&str]) {
        let s: Vec<String> = supported.iter().map(|s| format!("\"{s}\"")).collect();
        self.0.push(Cause {
            reason: "FieldValueNotSupported",
            field: field.into(),
            message: format!(
                "Unsupported value: {}: supported values: {}",
                render(value),
                s.join(", ")
            ),
        });
    }
    pub fn not_found(&mut self, field: impl Into<String>, value: &Value) {
        self.0.push(Cause {
            reason: "FieldValueNotFound",
            field: field.into(),
            message: format!("Not found: {}", render(value)),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Object(_) | Value::Array(_) => crate::util::canonical_json(v),
        other => other.to_string(),
    }
}
