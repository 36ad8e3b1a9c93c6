//! Typed API errors and their JSON bodies: every error the API sends is
//! `{"error": "<what is wrong>"}` (subscribe errors add `"ok": false`) with a fitting status.

use std::fmt;

use serde::Serialize;

use super::http::Response;

/// An HTTP error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// For 405: the methods the path supports.
    pub allow: Option<&'static str>,
    /// For 401: the `WWW-Authenticate` challenge.
    pub www_authenticate: Option<&'static str>,
    /// Add `"ok": false` to the body (subscribe endpoint shape).
    pub ok_field: bool,
    /// For 429: seconds until a retry may succeed (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            allow: None,
            www_authenticate: None,
            ok_field: false,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    pub fn unauthorized(message: impl Into<String>, challenge: &'static str) -> ApiError {
        ApiError {
            www_authenticate: Some(challenge),
            ..ApiError::new(401, message)
        }
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(403, message)
    }

    /// 429 with `Retry-After: seconds`.
    pub fn too_many_requests(message: impl Into<String>, seconds: u32) -> ApiError {
        ApiError {
            retry_after: Some(seconds),
            ..ApiError::new(429, message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(404, message)
    }

    pub fn method_not_allowed(method: &str, allow: &'static str) -> ApiError {
        ApiError {
            allow: Some(allow),
            ..ApiError::new(
                405,
                format!("method {method} is not allowed here; allowed: {allow}"),
            )
        }
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, message)
    }

    /// Marks the error as coming from the subscribe endpoint (`"ok": false` in the body).
    pub fn for_subscribe(mut self) -> ApiError {
        self.ok_field = true;
        self
    }

    /// The JSON response for this error.
    pub fn to_response(&self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            ok: Option<bool>,
            error: &'a str,
        }
        let body = Body {
            ok: self.ok_field.then_some(false),
            error: &self.message,
        };
        let mut r = Response::json(self.status, &body);
        if let Some(allow) = self.allow {
            r.headers.push(("Allow", allow.to_string()));
        }
        if let Some(c) = self.www_authenticate {
            r.headers.push(("WWW-Authenticate", c.to_string()));
        }
        if let Some(s) = self.retry_after {
            r.headers.push(("Retry-After", s.to_string()));
        }
        r
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_json_with_headers() {
        let r = ApiError::method_not_allowed("PATCH", "GET, POST").to_response();
        assert_eq!(r.status, 405);
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(v["error"].as_str().unwrap().contains("PATCH"));
        assert!(v.get("ok").is_none());
        assert!(r.headers.contains(&("Allow", "GET, POST".to_string())));

        let r = ApiError::not_found("x").for_subscribe().to_response();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v, serde_json::json!({"ok": false, "error": "x"}));
    }
}
