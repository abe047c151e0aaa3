//! Errors at the HTTP edge: every refusal is a status plus a JSON body
//! `{"error": "...", "field": "..."}` (`field` only when one input field is at fault).

use crate::registry::RegistryError;
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

/// The JSON error body.
pub fn json_error_body(error: &str, field: Option<&str>) -> Bytes {
    // Serialising two strings cannot fail.
    Bytes::from(serde_json::to_vec(&ErrorBody { error, field }).unwrap_or_default())
}

/// An HTTP API error: status, message, optional field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// Status code.
    pub status: StatusCode,
    /// Message.
    pub error: String,
    /// Offending input field.
    pub field: Option<String>,
}

impl ApiError {
    /// An error without a field.
    pub fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: None,
        }
    }

    /// An error about one field.
    pub fn field(status: StatusCode, field: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
            field: Some(field.into()),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Bytes {
        json_error_body(&self.error, self.field.as_deref())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        let msg = e.to_string();
        match e {
            RegistryError::Invalid { field, .. } => {
                Self::field(StatusCode::BAD_REQUEST, field, msg)
            }
            RegistryError::TokenMismatch(_) => Self::field(StatusCode::FORBIDDEN, "token", msg),
            RegistryError::NotProvisioned(_) => Self::field(StatusCode::FORBIDDEN, "name", msg),
            RegistryError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, msg),
            RegistryError::Store(_) => {
                tracing::error!(error = %msg, "registry store failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "registry could not be saved; nothing was changed",
                )
            }
        }
    }
}
