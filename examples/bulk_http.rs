//! A tiny std-only HTTP/1.1 server for tests and benchmarks (one thread per connection,
//! keep-alive supported).
//!
//! Routes:
//! - `GET /`          — a small page (for time-to-first-byte measurements).
//! - `GET /bytes/N`   — N bytes of deterministic pseudo-random content: byte `i` is byte `i % 8`
//!   (little-endian) of `splitmix64(i / 8)`. Incompressible, cheap to generate and to verify.
//! - `GET /sum/N`     — `fnv1a64=<16 hex digits>\n`: the FNV-1a 64 checksum of `/bytes/N`.
//! - `POST /upload`   — reads a `Content-Length` body, answers `bytes=<n> fnv1a64=<hex>\n`.
//!
//! Usage: `cargo run --release --example bulk_http -- --listen 127.0.0.1:0`
//! The first line on stdout is the bound port (useful with port 0).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

const CHUNK: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;

/// splitmix64 finaliser: content word `k` of every `/bytes/N` response.
fn splitmix64(k: u64) -> u64 {
    let mut z = k.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `buf` with content bytes starting at absolute offset `offset`.
fn fill_content(offset: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        *byte = splitmix64(pos / 8).to_le_bytes()[(pos % 8) as usize];
    }
}

/// Faster fill for 8-aligned offsets (the common case: chunks of 64 KiB).
fn fill_content_fast(offset: u64, buf: &mut [u8]) {
    if offset % 8 != 0 {
        fill_content(offset, buf);
        return;
    }
    let mut word = offset / 8;
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&splitmix64(word).to_le_bytes());
        word += 1;
    }
    let rest = chunks.into_remainder();
    let tail = splitmix64(word).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&tail[..n]);
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;

fn fnv1a64_update(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn content_checksum(len: u64) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut hash = FNV_OFFSET;
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        fill_content_fast(offset, &mut buf[..n]);
        hash = fnv1a64_update(hash, &buf[..n]);
        offset += n as u64;
    }
    hash
}

struct Request {
    method: String,
    path: String,
    content_length: Option<u64>,
    chunked: bool,
    keep_alive: bool,
}

/// Reads one request head; `Ok(None)` on a clean EOF before any byte.
fn read_head(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    let mut total = 0usize;
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    total += line.len();
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let version = parts.next().unwrap_or("HTTP/1.0").to_owned();
    let mut request = Request {
        method,
        path,
        content_length: None,
        chunked: false,
        keep_alive: version == "HTTP/1.1",
    };
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        total += n;
        if n == 0 || total > MAX_HEAD {
            return Err(std::io::Error::other("bad request head"));
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            return Ok(Some(request));
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "content-length" => request.content_length = value.parse().ok(),
                "transfer-encoding" => request.chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => {
                    let v = value.to_ascii_lowercase();
                    if v.contains("close") {
                        request.keep_alive = false;
                    } else if v.contains("keep-alive") {
                        request.keep_alive = true;
                    }
                }
                _ => {}
            }
        }
    }
}

fn respond_text(
    stream: &mut TcpStream,
    status: &str,
    body: &str,
    keep_alive: bool,
) -> std::io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

fn serve_bytes(stream: &mut TcpStream, len: u64, keep_alive: bool) -> std::io::Result<()> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\nConnection: {connection}\r\n\r\n"
    )?;
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        fill_content_fast(offset, &mut buf[..n]);
        stream.write_all(&buf[..n])?;
        offset += n as u64;
    }
    stream.flush()
}

fn handle(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::with_capacity(CHUNK, stream);
    while let Some(request) = read_head(&mut reader)? {
        let keep_alive = request.keep_alive;
        let path = request.path.as_str();
        match (request.method.as_str(), path) {
            ("GET", "/") => respond_text(
                &mut writer,
                "200 OK",
                "ostp bulk_http test server\n",
                keep_alive,
            )?,
            ("GET", p) if p.starts_with("/bytes/") => match p["/bytes/".len()..].parse::<u64>() {
                Ok(len) => serve_bytes(&mut writer, len, keep_alive)?,
                Err(_) => respond_text(&mut writer, "400 Bad Request", "bad length\n", false)?,
            },
            ("GET", p) if p.starts_with("/sum/") => match p["/sum/".len()..].parse::<u64>() {
                Ok(len) => {
                    let body = format!("fnv1a64={:016x}\n", content_checksum(len));
                    respond_text(&mut writer, "200 OK", &body, keep_alive)?;
                }
                Err(_) => respond_text(&mut writer, "400 Bad Request", "bad length\n", false)?,
            },
            ("POST", "/upload") => {
                let Some(len) = request.content_length.filter(|_| !request.chunked) else {
                    respond_text(
                        &mut writer,
                        "411 Length Required",
                        "need Content-Length\n",
                        false,
                    )?;
                    return Ok(());
                };
                let mut hash = FNV_OFFSET;
                let mut remaining = len;
                let mut buf = vec![0u8; CHUNK];
                while remaining > 0 {
                    let want = remaining.min(CHUNK as u64) as usize;
                    let n = reader.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(std::io::Error::other("upload truncated"));
                    }
                    hash = fnv1a64_update(hash, &buf[..n]);
                    remaining -= n as u64;
                }
                let body = format!("bytes={len} fnv1a64={hash:016x}\n");
                respond_text(&mut writer, "200 OK", &body, keep_alive)?;
            }
            _ => respond_text(&mut writer, "404 Not Found", "not found\n", keep_alive)?,
        }
        if !keep_alive {
            break;
        }
    }
    Ok(())
}

fn main() {
    let mut listen = "127.0.0.1:0".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen = args.next().expect("--listen needs an address"),
            "--help" | "-h" => {
                eprintln!(
                    "usage: bulk_http [--listen 127.0.0.1:PORT]   (first stdout line: bound port)"
                );
                return;
            }
            other => {
                eprintln!("bulk_http: unknown argument {other:?}");
                std::process::exit(2);
            }
        }
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("bulk_http: cannot bind {listen}: {e}");
        std::process::exit(1);
    });
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    println!("{port}");
    let _ = std::io::stdout().flush();
    serve(listener);
}

/// Accepts connections forever, one thread each.
pub fn serve(listener: TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    let _ = handle(stream);
                });
            }
            Err(e) => eprintln!("bulk_http: accept failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_fill_matches_reference() {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 1000];
        for offset in [0u64, 8, 3, 65_536, 1_000_001] {
            fill_content(offset, &mut a);
            fill_content_fast(offset, &mut b);
            assert_eq!(a, b, "offset {offset}");
        }
        let mut whole = vec![0u8; 100];
        fill_content(0, &mut whole);
        assert_eq!(fnv1a64_update(FNV_OFFSET, &whole), content_checksum(100));
    }
}
