//! Runs the `bulk_http` example's server (compiled in from its source) over loopback: content is deterministic and matches
//! the documented formula, `/sum/N` agrees, uploads are counted and checksummed, keep-alive works.

#[allow(dead_code)]
use crate::support::bulk_http;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

struct Server {
    port: u16,
}

/// Runs the example's accept loop on a loopback listener in a background thread.
fn start() -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || bulk_http::serve(listener));
    Server { port }
}

fn splitmix64(k: u64) -> u64 {
    let mut z = k.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn expected_byte(i: u64) -> u8 {
    splitmix64(i / 8).to_le_bytes()[(i % 8) as usize]
}

fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sends one request and reads one response (head + Content-Length body).
fn exchange(stream: &mut TcpStream, request: &[u8]) -> (String, Vec<u8>) {
    stream.write_all(request).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut head = String::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap();
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).unwrap();
    assert!(reader.buffer().is_empty(), "no extra bytes after the body");
    (head, body)
}

#[test]
fn serves_deterministic_bytes_and_checksums() {
    let server = start();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let n = 1_000_003u64; // not a multiple of the 8-byte word or the 64 KiB chunk
    let (head, body) = exchange(
        &mut stream,
        format!("GET /bytes/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(body.len() as u64, n);
    for (i, &b) in body.iter().enumerate() {
        assert_eq!(b, expected_byte(i as u64), "byte {i}");
    }
    // Same connection (keep-alive): the checksum route agrees with our own FNV-1a.
    let (head, sum) = exchange(
        &mut stream,
        format!("GET /sum/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    );
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(
        String::from_utf8(sum).unwrap(),
        format!("fnv1a64={:016x}\n", fnv1a64(&body))
    );
    let (_, empty) = exchange(&mut stream, b"GET /bytes/0 HTTP/1.1\r\n\r\n");
    assert!(empty.is_empty());
}

#[test]
fn upload_is_counted_and_checksummed() {
    let server = start();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut request = format!(
        "POST /upload HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    let (head, reply) = exchange(&mut stream, &request);
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert_eq!(
        String::from_utf8(reply).unwrap(),
        format!("bytes={} fnv1a64={:016x}\n", body.len(), fnv1a64(&body))
    );
}

#[test]
fn index_page_unknown_route_and_close() {
    let server = start();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let (head, body) = exchange(&mut stream, b"GET / HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK"));
    assert!(!body.is_empty());
    let (head, _) = exchange(&mut stream, b"GET /nope HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = exchange(&mut stream, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(head.contains("Connection: close"), "{head}");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "server closed after Connection: close");
}
