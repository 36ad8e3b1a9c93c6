//! Bearer-token authentication of API requests, compared in constant time.
//!
//! With an empty configured token the API is open: every request is accepted whatever its
//! `Authorization` header says (config.rs allows that only on a loopback bind). With a token
//! set, a request needs exactly one `Authorization: Bearer <token>` header (scheme
//! case-insensitive); anything else is 401 with `WWW-Authenticate: Bearer`. `GET /metrics`
//! also accepts the optional metrics token ([`check_head_any`]).

use super::errors::ApiError;
use super::http::{Head, Request};
use crate::keys;

const CHALLENGE: &str = "Bearer realm=\"ostp\"";
const CHALLENGE_INVALID: &str = "Bearer realm=\"ostp\", error=\"invalid_token\"";

/// Checks the request against the configured token.
pub fn check(request: &Request, token: &str) -> Result<(), ApiError> {
    check_head(&request.head, token)
}

/// Checks a request head against the configured token (the front end does this before it
/// reads the body or sends `100 Continue`).
pub fn check_head(head: &Head, token: &str) -> Result<(), ApiError> {
    check_head_any(head, token, "")
}

/// Checks a request head against `token` or, when not empty, a second token `also` (the
/// metrics token on `GET /metrics`). Both are compared, in constant time, whatever the first
/// comparison gave.
pub fn check_head_any(head: &Head, token: &str, also: &str) -> Result<(), ApiError> {
    if token.is_empty() {
        return Ok(());
    }
    let presented = presented_token(head)?.as_bytes();
    let first = keys::ct_eq(presented, token.as_bytes());
    let second = !also.is_empty() && keys::ct_eq(presented, also.as_bytes());
    if !(first | second) {
        return Err(ApiError::unauthorized("invalid token", CHALLENGE_INVALID));
    }
    Ok(())
}

/// The credentials of the one `Authorization: Bearer` header.
fn presented_token(head: &Head) -> Result<&str, ApiError> {
    let mut values = head
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization")
        .map(|(_, v)| v.as_str());
    let Some(value) = values.next() else {
        return Err(ApiError::unauthorized(
            "missing Authorization header; send \"Authorization: Bearer <token>\"",
            CHALLENGE,
        ));
    };
    if values.next().is_some() {
        return Err(ApiError::unauthorized(
            "more than one Authorization header",
            CHALLENGE,
        ));
    }
    let (scheme, credentials) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthorized(
            "the Authorization scheme must be Bearer",
            CHALLENGE,
        ));
    }
    let presented = credentials.trim_matches(' ');
    if presented.is_empty() {
        return Err(ApiError::unauthorized(
            "the Bearer token is empty",
            CHALLENGE,
        ));
    }
    Ok(presented)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::parse_head;

    fn req(headers: &str) -> Request {
        let text = format!("GET /api/users HTTP/1.1\r\n{headers}\r\n");
        Request {
            head: parse_head(text.as_bytes()).unwrap().unwrap().0,
            body: vec![],
        }
    }

    #[test]
    fn token_rules() {
        assert!(check(&req("Authorization: Bearer sekret\r\n"), "sekret").is_ok());
        assert!(check(&req("Authorization: bearer sekret\r\n"), "sekret").is_ok());
        for bad in [
            "",
            "Authorization: Bearer\r\n",
            "Authorization: Bearer \r\n",
            "Authorization: Basic sekret\r\n",
            "Authorization: sekret\r\n",
            "Authorization: Bearer sekre\r\n",
            "Authorization: Bearer sekret2\r\n",
            "Authorization: Bearer sekret\r\nAuthorization: Bearer sekret\r\n",
        ] {
            let e = check(&req(bad), "sekret").unwrap_err();
            assert_eq!(e.status, 401, "{bad:?}");
            assert!(e.www_authenticate.unwrap().starts_with("Bearer"));
            assert!(!e.message.contains("sekret"));
        }
    }

    #[test]
    fn a_second_token_is_accepted_only_where_offered() {
        let good = req("Authorization: Bearer scraper\r\n");
        assert!(check_head_any(&good.head, "sekret", "scraper").is_ok());
        assert!(check_head_any(&good.head, "sekret", "").is_err());
        assert_eq!(check(&good, "sekret").unwrap_err().status, 401);
        let api = req("Authorization: Bearer sekret\r\n");
        assert!(check_head_any(&api.head, "sekret", "scraper").is_ok());
        for bad in [
            "",
            "Authorization: Bearer \r\n",
            "Authorization: Bearer scrape\r\n",
        ] {
            let e = check_head_any(&req(bad).head, "sekret", "scraper").unwrap_err();
            assert_eq!(e.status, 401, "{bad:?}");
        }
    }

    #[test]
    fn open_api_ignores_the_header() {
        assert!(check(&req(""), "").is_ok());
        assert!(check(&req("Authorization: Bearer whatever\r\n"), "").is_ok());
        assert!(check(&req("Authorization: garbage\r\n"), "").is_ok());
    }
}
