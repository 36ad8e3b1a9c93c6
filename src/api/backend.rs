//! The tiny_http side of the API: a `tiny_http::Server` on a private Unix socket (in a fresh
//! 0700 directory, so only this process's relays reach it), served by a fixed pool of worker
//! threads that run [`routes::handle`]. Only the front end ([`super::front`]) talks to it, and
//! only with requests it has already validated and bounded (see that module for why tiny_http
//! is not exposed to the network directly). [`relay`] checks that each response is complete and
//! framed by `Content-Length`, so the front end may keep the client's connection open after it.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::errors::ApiError;
use super::http::{Head, MAX_BODY_BYTES, Request, Response};
use super::{ApiContext, routes};
use crate::http_head::{HeadScanner, Scan};
use crate::keys;

/// How long a relay waits on the backend (handlers include an fsync).
const RELAY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest response read back from the backend.
const MAX_RESPONSE_BYTES: u64 = 256 * 1024 * 1024;
/// Largest response head accepted from the backend (tiny_http sends a few hundred bytes).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The running tiny_http server and its workers.
pub struct Backend {
    server: Arc<tiny_http::Server>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Backend {
    /// Binds the private socket and starts `workers` tiny_http worker threads.
    pub fn start(ctx: Arc<ApiContext>, workers: usize) -> io::Result<Backend> {
        let dir = private_dir()?;
        let socket = dir.join("api.sock");
        let listener = UnixListener::bind(&socket)?;
        let server =
            Arc::new(tiny_http::Server::from_listener(listener, None).map_err(io::Error::other)?);
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for i in 0..workers.max(1) {
            let server = server.clone();
            let stop = stop.clone();
            let ctx = ctx.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("ostp-api-worker-{i}"))
                    .spawn(move || serve(&server, &stop, &ctx))?,
            );
        }
        Ok(Backend {
            server,
            stop,
            workers: handles,
            dir,
            socket,
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Stops the workers and removes the socket directory.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for _ in 0..self.workers.len() {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Removes `ostp-api-*` directories in `parent` left behind by servers that were killed
/// (`kill -9` cannot clean up): only those whose `api.sock` exists but refuses connections.
/// Live servers' directories (and half-created ones without a socket yet) are kept.
fn remove_stale_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("ostp-api-") {
            continue;
        }
        let socket = entry.path().join("api.sock");
        if !socket.exists() {
            continue;
        }
        if let Err(e) = UnixStream::connect(&socket) {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn private_dir() -> io::Result<PathBuf> {
    remove_stale_dirs(&std::env::temp_dir());
    let mut b = [0u8; 8];
    keys::fill_random(&mut b).map_err(io::Error::other)?;
    let dir = std::env::temp_dir().join(format!("ostp-api-{}", keys::to_hex(&b)));
    std::fs::create_dir(&dir)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(dir)
}

fn serve(server: &tiny_http::Server, stop: &AtomicBool, ctx: &ApiContext) {
    while !stop.load(Ordering::SeqCst) {
        let rq = match server.recv_timeout(Duration::from_millis(500)) {
            Ok(Some(rq)) => rq,
            Ok(None) => continue,
            Err(e) => {
                if !stop.load(Ordering::SeqCst) {
                    log::error!("api: the tiny_http server failed: {e}");
                }
                return;
            }
        };
        answer(rq, ctx);
    }
}

fn answer(mut rq: tiny_http::Request, ctx: &ApiContext) {
    let headers: Vec<(String, String)> = rq
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_ascii_lowercase(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let mut body = Vec::new();
    let read = rq
        .as_reader()
        .take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut body);
    let response = match read {
        Err(e) => ApiError::bad_request(format!("cannot read the request body: {e}")).to_response(),
        Ok(_) if body.len() > MAX_BODY_BYTES => super::http::body_too_large().to_response(),
        Ok(_) => {
            let request = Request {
                head: Head {
                    method: rq.method().as_str().to_string(),
                    target: rq.url().to_string(),
                    minor_version: 1,
                    headers,
                    content_length: body.len(),
                    expect_continue: false,
                    keep_alive: false,
                },
                body,
            };
            let response = routes::handle(ctx, &request);
            let (method, path) = (request.method(), request.path());
            ctx.metrics.count_request(method, path, response.status);
            response
        }
    };
    let _ = rq.respond(to_tiny(response));
}

fn to_tiny(r: Response) -> tiny_http::Response<io::Cursor<Vec<u8>>> {
    // Always Content-Length (never chunked): simpler for every client, and the body is in
    // memory anyway.
    let mut out = tiny_http::Response::from_data(r.body)
        .with_status_code(r.status)
        .with_chunked_threshold(usize::MAX);
    let header = |name: &str, value: &str| tiny_http::Header::from_bytes(name, value).ok();
    if let Some(h) = header("Content-Type", r.content_type) {
        out.add_header(h);
    }
    if let Some(h) = header("Cache-Control", "no-store") {
        out.add_header(h);
    }
    for (name, value) in &r.headers {
        if let Some(h) = header(name, value) {
            out.add_header(h);
        }
    }
    out
}

/// Headers the front end does not pass on (hop-by-hop, or re-written by the relay).
const DROPPED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "expect",
    "transfer-encoding",
    "content-length",
    "te",
    "upgrade",
    "proxy-connection",
];

/// The validated request as bytes for tiny_http (HTTP/1.1, `Connection: close`).
pub fn encode_request(request: &Request) -> Vec<u8> {
    let mut out = format!(
        "{} {} HTTP/1.1\r\n",
        request.head.method, request.head.target
    );
    for (name, value) in &request.head.headers {
        if DROPPED_HEADERS.contains(&name.as_str()) || !value.is_ascii() {
            continue;
        }
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        request.body.len()
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&request.body);
    bytes
}

/// Passes one request to the backend at `socket` and returns its complete response, framed by
/// `Content-Length` and without a `Connection` header (the front end adds that).
pub fn relay(socket: &Path, request: &Request) -> Vec<u8> {
    match try_relay(socket, request) {
        Ok(bytes) if bytes.is_empty() => unavailable("the API backend closed the connection"),
        Ok(bytes) => match check_framing(&bytes, request.method() == "HEAD") {
            Ok(()) => bytes,
            Err(what) => unavailable(&format!("the API backend sent a bad response: {what}")),
        },
        Err(e) => unavailable(&format!("the API backend failed: {e}")),
    }
}

fn unavailable(detail: &str) -> Vec<u8> {
    log::error!("api: {detail}");
    ApiError::new(
        503,
        "the API is temporarily unavailable; see the server log",
    )
    .to_response()
    .to_bytes()
}

/// Checks that `response` is exactly one response whose length the client can tell from its
/// head (`Content-Length`; no body after HEAD or for 1xx/204/304) and that has no `Connection`
/// header, so a keep-alive client reads exactly these bytes as one answer.
fn check_framing(response: &[u8], head_request: bool) -> Result<(), &'static str> {
    let end = match HeadScanner::new().scan(response, MAX_RESPONSE_HEAD) {
        Scan::Complete(end) => end,
        Scan::Incomplete => return Err("incomplete head"),
        Scan::TooLarge => return Err("head too large"),
    };
    let head = std::str::from_utf8(&response[..end.head_len]).map_err(|_| "head not UTF-8")?;
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or("bad status line")?;
    let mut content_length = None;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("bad header line")?;
        let name = name.trim();
        if name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err("unexpected Connection or Transfer-Encoding header");
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.trim().parse().map_err(|_| "bad Content-Length")?;
            if content_length.replace(n).is_some_and(|m| m != n) {
                return Err("conflicting Content-Length");
            }
        }
    }
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let body = match (no_body, content_length) {
        (true, _) => 0,
        (false, Some(n)) => n,
        (false, None) => return Err("no Content-Length"),
    };
    if response.len() != end.total_len + body {
        return Err("length differs from Content-Length");
    }
    Ok(())
}

fn try_relay(socket: &Path, request: &Request) -> io::Result<Vec<u8>> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(RELAY_TIMEOUT))?;
    s.set_write_timeout(Some(RELAY_TIMEOUT))?;
    s.write_all(&encode_request(request))?;
    let mut out = Vec::new();
    s.take(MAX_RESPONSE_BYTES).read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_dirs_are_removed_live_ones_kept() {
        let parent = std::env::temp_dir().join(format!("ostp-stale-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        std::fs::create_dir_all(&parent).unwrap();
        let stale = parent.join("ostp-api-stale");
        let live = parent.join("ostp-api-live");
        let half = parent.join("ostp-api-half");
        for d in [&stale, &live, &half] {
            std::fs::create_dir(d).unwrap();
        }
        drop(UnixListener::bind(stale.join("api.sock")).unwrap());
        let _keep = UnixListener::bind(live.join("api.sock")).unwrap();
        remove_stale_dirs(&parent);
        assert!(!stale.exists(), "a dead server's directory must go");
        assert!(live.exists(), "a live server's directory must stay");
        assert!(half.exists(), "a directory without a socket yet must stay");
        let _ = std::fs::remove_dir_all(&parent);
    }
    use crate::api::http::parse_head;

    #[test]
    fn relayed_responses_must_be_framed() {
        let ok = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(check_framing(ok, false), Ok(()));
        assert!(
            check_framing(&ok[..ok.len() - 1], false).is_err(),
            "short body"
        );
        let mut long = ok.to_vec();
        long.push(b'x');
        assert!(check_framing(&long, false).is_err(), "extra bytes");
        assert_eq!(
            check_framing(&ok[..ok.len() - 2], true),
            Ok(()),
            "HEAD: no body"
        );
        assert!(check_framing(b"HTTP/1.1 200 OK\r\n\r\n{}", false).is_err());
        assert!(check_framing(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", false).is_err());
        let close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert!(check_framing(close, false).is_err());
        assert_eq!(
            check_framing(b"HTTP/1.1 204 No Content\r\n\r\n", false),
            Ok(())
        );
        assert!(check_framing(b"garbage\r\n\r\n", false).is_err());
        assert_eq!(check_framing(&unavailable("test"), false), Ok(()));
    }

    #[test]
    fn relayed_requests_drop_hop_by_hop_headers() {
        let text = "POST /api/users HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\nAuthorization: Bearer t\r\nX-Odd: caf\u{e9}\r\nContent-Length: 2\r\n\r\n";
        let head = parse_head(text.as_bytes()).unwrap().unwrap().0;
        let req = Request {
            head,
            body: b"{}".to_vec(),
        };
        let out = String::from_utf8(encode_request(&req)).unwrap();
        assert_eq!(
            out,
            "POST /api/users HTTP/1.1\r\nauthorization: Bearer t\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
    }
}
