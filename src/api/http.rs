//! Minimal, strict HTTP/1.x message handling for the API front end: length-checked request
//! head parsing (request line, headers, `Content-Length`, keep-alive), and response
//! serialisation. The head's end is found by the shared incremental [`HeadScanner`]
//! ([`crate::http_head`], also used by the client's proxy port) under the same
//! [`MAX_HEAD_BYTES`] / [`MAX_HEADERS`] limits. Anything malformed becomes an [`ApiError`] with a
//! 4xx status, never a panic.

use serde::Serialize;

use super::errors::{ApiError, reason};
use crate::http_head::{HeadScanner, MAX_HEAD_BYTES, MAX_HEADERS, Scan, is_tchar};

/// Largest request body accepted (larger declared bodies get 413 without being read).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Request target as sent (path and optional query).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header names in lowercase, values trimmed (lossy UTF-8).
    pub headers: Vec<(String, String)>,
    pub content_length: usize,
    pub expect_continue: bool,
    /// Whether the connection may stay open after the response.
    pub keep_alive: bool,
}

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Request {
    pub fn method(&self) -> &str {
        &self.head.method
    }

    /// The path without the query string.
    pub fn path(&self) -> &str {
        let t = self.head.target.as_str();
        t.split_once('?').map(|(p, _)| p).unwrap_or(t)
    }

    /// The first header with this (lowercase) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }

    /// All values of this (lowercase) header name.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.head
            .headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a request head from the start of `buf` (a one-off scan; see [`parse_head_scanned`]).
/// `Ok(None)` = incomplete; `Ok(Some((head, len)))` = complete, `len` bytes consumed.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, ApiError> {
    parse_head_scanned(&mut HeadScanner::new(), buf)
}

/// [`parse_head`] for a buffer that grows between calls: `scanner` remembers how far `buf` was
/// already searched for the head's end, so each byte is scanned about once.
pub fn parse_head_scanned(
    scanner: &mut HeadScanner,
    buf: &[u8],
) -> Result<Option<(Head, usize)>, ApiError> {
    let end = match scanner.scan(buf, MAX_HEAD_BYTES) {
        Scan::Complete(end) => end.total_len,
        Scan::Incomplete => return Ok(None),
        Scan::TooLarge => return Err(too_large_head()),
    };
    let mut lines = buf[..end]
        .split(|b| *b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let (method, target, minor_version) = parse_request_line(request_line)?;

    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(ApiError::new(
                431,
                format!("too many header lines (at most {MAX_HEADERS})"),
            ));
        }
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or_else(|| ApiError::bad_request("malformed header line (no colon)"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.is_empty() || !name.iter().all(|b| is_tchar(*b)) {
            return Err(ApiError::bad_request("malformed header name"));
        }
        if value
            .iter()
            .any(|b| (*b < 0x20 && *b != b'\t') || *b == 0x7f)
        {
            return Err(ApiError::bad_request(
                "header value contains control characters",
            ));
        }
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        let value = String::from_utf8_lossy(value)
            .trim_matches([' ', '\t'])
            .to_string();
        headers.push((name, value));
    }

    if headers.iter().any(|(n, _)| n == "transfer-encoding") {
        return Err(ApiError::new(
            411,
            "chunked or encoded request bodies are not supported; send the body with Content-Length",
        ));
    }
    let mut content_length: Option<usize> = None;
    for (_, v) in headers.iter().filter(|(n, _)| n == "content-length") {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::bad_request("Content-Length is not a number"));
        }
        let n = match v.parse::<usize>() {
            Ok(n) if n <= MAX_BODY_BYTES => n,
            _ => return Err(body_too_large()),
        };
        if content_length.is_some_and(|c| c != n) {
            return Err(ApiError::bad_request("conflicting Content-Length headers"));
        }
        content_length = Some(n);
    }

    let mut expect_continue = false;
    if let Some((_, v)) = headers.iter().find(|(n, _)| n == "expect") {
        if v.eq_ignore_ascii_case("100-continue") {
            expect_continue = true;
        } else {
            return Err(ApiError::new(
                417,
                "only \"Expect: 100-continue\" is supported",
            ));
        }
    }

    let connection_has = |token: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let keep_alive = if minor_version == 1 {
        !connection_has("close")
    } else {
        connection_has("keep-alive")
    };

    Ok(Some((
        Head {
            method,
            target,
            minor_version,
            headers,
            content_length: content_length.unwrap_or(0),
            expect_continue,
            keep_alive,
        },
        end,
    )))
}

fn too_large_head() -> ApiError {
    ApiError::new(
        431,
        format!("request head is larger than {MAX_HEAD_BYTES} bytes"),
    )
}

/// The 413 answer for bodies over [`MAX_BODY_BYTES`].
pub fn body_too_large() -> ApiError {
    ApiError::new(
        413,
        format!("request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

fn parse_request_line(line: &[u8]) -> Result<(String, String, u8), ApiError> {
    let bad = || ApiError::bad_request("malformed request line (expected: METHOD /path HTTP/1.1)");
    let mut parts = line.split(|b| *b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if method.is_empty() || method.len() > 16 || !method.iter().all(|b| is_tchar(*b)) {
        return Err(bad());
    }
    if target.first() != Some(&b'/') || !target.iter().all(|b| (0x21..0x7f).contains(b)) {
        return Err(bad());
    }
    let minor = match version {
        b"HTTP/1.1" => 1,
        b"HTTP/1.0" => 0,
        v if v.len() == 8 && v.starts_with(b"HTTP/") => {
            return Err(ApiError::new(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported",
            ));
        }
        _ => return Err(bad()),
    };
    // All bytes were checked to be ASCII above.
    Ok((
        String::from_utf8_lossy(method).into_owned(),
        String::from_utf8_lossy(target).into_owned(),
        minor,
    ))
}

/// A response before serialisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response (`Content-Type: application/json`).
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                content_type: "application/json",
                headers: Vec::new(),
                body,
            },
            Err(e) => Response {
                status: 500,
                content_type: "application/json",
                headers: Vec::new(),
                body: {
                    log::error!("api: cannot encode a response: {e}");
                    br#"{"error":"internal error: cannot encode the response"}"#.to_vec()
                },
            },
        }
    }

    /// A plain-text response.
    pub fn text(status: u16, text: String) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: text.into_bytes(),
        }
    }

    /// The bytes on the wire (HTTP/1.1 status line, headers, body) without a `Connection`
    /// header: the front end adds it ([`with_connection`]), as it alone decides keep-alive.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
        );
        for (name, value) in &self.headers {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let mut out = Vec::with_capacity(head.len() + self.body.len());
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Puts `Connection: keep-alive` (or `close`) right after the status line of a complete response
/// that has no `Connection` header. Returns the bytes and whether the connection may stay open:
/// `false` when asked, or when `response` has no status line (then it is returned unchanged).
pub fn with_connection(response: Vec<u8>, keep_alive: bool) -> (Vec<u8>, bool) {
    let Some(line_end) = response.iter().position(|b| *b == b'\n') else {
        return (response, false);
    };
    let header: &[u8] = if keep_alive {
        b"Connection: keep-alive\r\n"
    } else {
        b"Connection: close\r\n"
    };
    let mut out = Vec::with_capacity(response.len() + header.len());
    out.extend_from_slice(&response[..=line_end]);
    out.extend_from_slice(header);
    out.extend_from_slice(&response[line_end + 1..]);
    (out, keep_alive)
}

/// A front-end error answer: the connection closes after it, and the answer says so.
pub fn closing_error(err: &ApiError) -> Vec<u8> {
    with_connection(err.to_response().to_bytes(), false).0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(Head, usize)>, ApiError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_complete_head() {
        let t = "POST /api/users?x=1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 5\r\nAuthorization:  Bearer t \r\n\r\nhello";
        let (h, len) = head(t).unwrap().unwrap();
        assert_eq!(&t[len..], "hello");
        assert_eq!(h.method, "POST");
        assert_eq!(h.target, "/api/users?x=1");
        assert_eq!(h.content_length, 5);
        assert_eq!(h.header("authorization"), Some("Bearer t"));
        assert!(h.keep_alive);
        let r = Request {
            head: h,
            body: vec![],
        };
        assert_eq!(r.path(), "/api/users");
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        assert_eq!(head("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(head(""), Ok(None));
        assert!(head("GET / HTTP/1.1\n\n").unwrap().is_some());
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |t: &str| head(t).unwrap().unwrap().0.keep_alive;
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn malformed_heads_get_4xx() {
        let status = |t: &[u8]| parse_head(t).unwrap_err().status;
        assert_eq!(status(b"GET /\r\n\r\n"), 400);
        assert_eq!(status(b"GET  / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET x HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"G\xffT / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\n\r\n"), 505);
        assert_eq!(status(b"GET / FTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n"), 400);
        assert_eq!(status(b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(&many), 431);
        assert_eq!(status(&vec![b'a'; MAX_HEAD_BYTES + 1]), 431);
    }

    #[test]
    fn response_bytes() {
        let r = Response::text(200, "hi\n".into());
        let s = String::from_utf8(r.to_bytes()).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Content-Length: 3\r\n"));
        assert!(!s.to_ascii_lowercase().contains("connection"));
        assert!(s.ends_with("\r\n\r\nhi\n"));
    }

    #[test]
    fn connection_header_is_inserted_after_the_status_line() {
        let r = Response::text(200, "hi\n".into()).to_bytes();
        let (out, ka) = with_connection(r.clone(), true);
        assert!(ka);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type"));
        assert!(s.ends_with("\r\n\r\nhi\n"));
        assert_eq!(s.len(), r.len() + "Connection: keep-alive\r\n".len());
        let (out, ka) = with_connection(r, false);
        assert!(!ka);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .contains("OK\r\nConnection: close\r\n")
        );
        assert_eq!(
            with_connection(b"junk".to_vec(), true),
            (b"junk".to_vec(), false)
        );
        let e = String::from_utf8(closing_error(&ApiError::bad_request("x"))).unwrap();
        assert!(e.starts_with("HTTP/1.1 400 Bad Request\r\nConnection: close\r\n"));
    }

    #[test]
    fn a_growing_buffer_is_parsed_once_complete() {
        let text = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nnext";
        let mut scanner = HeadScanner::new();
        for n in 0..text.len() - 4 {
            assert_eq!(
                parse_head_scanned(&mut scanner, &text[..n]),
                Ok(None),
                "{n}"
            );
        }
        let (h, len) = parse_head_scanned(&mut scanner, text).unwrap().unwrap();
        assert_eq!((h.target.as_str(), len), ("/x", text.len() - 4));
    }
}
