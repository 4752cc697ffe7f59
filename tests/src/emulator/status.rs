//! Kubernetes-shaped API errors: every failure leaves the emulator as a `Status` JSON body.

use serde_json::{Value, json};

use super::store::Res;

/// One API error, rendered as a `metav1.Status` with the matching HTTP code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
    pub retry_after: Option<u32>,
}

/// One field-level validation failure (`details.causes[]` of an Invalid status).
#[derive(Debug, Clone)]
pub struct FieldError {
    pub field: String,
    pub kind: FieldErrorKind,
    pub detail: String,
}

/// The `field.ErrorType`s the emulator reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldErrorKind {
    Required,
    Invalid,
    Duplicate,
    NotFound,
    NotSupported,
}

impl FieldError {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Required,
            detail: String::new(),
        }
    }
    pub fn invalid(field: impl Into<String>, value: &str, detail: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Invalid,
            detail: format!("{value:?}: {}", detail.into()),
        }
    }
    pub fn duplicate(field: impl Into<String>, value: &str) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::Duplicate,
            detail: format!("{value:?}"),
        }
    }
    pub fn not_found(field: impl Into<String>, value: &str) -> Self {
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotFound,
            detail: format!("{value:?}"),
        }
    }
    pub fn not_supported(field: impl Into<String>, value: &str, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
        Self {
            field: field.into(),
            kind: FieldErrorKind::NotSupported,
            detail: format!("{value:?}: supported values: {}", allowed.join(", ")),
        }
    }

    fn type_name(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid => "FieldValueInvalid",
            FieldErrorKind::Duplicate => "FieldValueDuplicate",
            FieldErrorKind::NotFound => "FieldValueNotFound",
            FieldErrorKind::NotSupported => "FieldValueNotSupported",
        }
    }

    fn summary(&self) -> String {
        let head = match self.kind {
            FieldErrorKind::Required => "Required value",
            FieldErrorKind::Invalid => "Invalid value",
            FieldErrorKind::Duplicate => "Duplicate value",
            FieldErrorKind::NotFound => "Not found",
            FieldErrorKind::NotSupported => "Unsupported value",
        };
        if self.detail.is_empty() {
            head.to_string()
        } else {
            format!("{head}: {}", self.detail)
        }
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    #[must_use]
    pub fn not_found(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", res.plural()),
        );
        e.details = Some(json!({"name": name, "kind": res.plural()}));
        e
    }

    #[must_use]
    pub fn namespace_not_found(ns: &str) -> Self {
        Self::not_found(Res::Namespaces, ns)
    }

    #[must_use]
    pub fn already_exists(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", res.plural()),
        );
        e.details = Some(json!({"name": name, "kind": res.plural()}));
        e
    }

    #[must_use]
    pub fn conflict(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                res.plural()
            ),
        );
        e.details = Some(json!({"name": name, "kind": res.plural()}));
        e
    }

    #[must_use]
    pub fn invalid(res: Res, name: &str, errors: &[FieldError]) -> Self {
        let parts: Vec<String> = errors
            .iter()
            .map(|f| format!("{}: {}", f.field, f.summary()))
            .collect();
        let joined = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|f| json!({"reason": f.type_name(), "message": f.summary(), "field": f.field}))
            .collect();
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {joined}", res.kind()),
        );
        e.details = Some(json!({"name": name, "kind": res.kind(), "causes": causes}));
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    #[must_use]
    pub fn unsupported_media_type(content_type: &str, accepted: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {accepted} (got {content_type:?}; this emulator speaks JSON only, no protobuf)"
            ),
        )
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        let mut e = Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {message}"),
        );
        e.details = Some(json!({"causes": [{"message": message}]}));
        e
    }

    #[must_use]
    pub fn page_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    /// An injected failure with the HTTP code a fault knob asked for.
    #[must_use]
    pub fn injected(code: u16, retry_after: Option<u32>) -> Self {
        let (reason, message) = match code {
            429 => (
                "TooManyRequests",
                "the server has received too many requests and has asked us to try again later",
            ),
            409 => (
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified (injected fault)",
            ),
            503 => (
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            ),
            504 => (
                "Timeout",
                "the server was unable to return a response in the time allotted",
            ),
            _ => ("InternalError", "Internal error occurred: injected fault"),
        };
        let mut e = Self::new(code, reason, message);
        e.retry_after = retry_after;
        if let Some(secs) = retry_after {
            e.details = Some(json!({"retryAfterSeconds": secs}));
        }
        e
    }

    /// The full `Status` object (with kind/apiVersion), as sent in HTTP bodies and watch ERROR events.
    #[must_use]
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v["code"] = json!(self.code);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_shape_matches_the_apiserver() {
        let v = ApiError::not_found(Res::Pods, "p1").to_status();
        assert_eq!(
            v,
            serde_json::from_str::<Value>(r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods \"p1\" not found","reason":"NotFound","details":{"name":"p1","kind":"pods"},"code":404}"#).unwrap()
        );
    }

    #[test]
    fn invalid_joins_several_causes() {
        let e = ApiError::invalid(
            Res::Pods,
            "p",
            &[
                FieldError::required("spec.containers[0].image"),
                FieldError::required("spec.containers[0].name"),
            ],
        );
        assert_eq!(e.code, 422);
        assert!(
            e.message
                .starts_with("Pod \"p\" is invalid: [spec.containers[0].image: Required value, ")
        );
        assert_eq!(
            e.to_status()["details"]["causes"][1]["field"],
            "spec.containers[0].name"
        );
    }
}
