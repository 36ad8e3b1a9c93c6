//! A tiny DNS responder for split-routing tests: real DNS messages (RFC 1035), one question, each
//! name answered by a CNAME to `edge.cdn-example.net` and that name's A record (a chain the client
//! must follow), TTL 300; names not in the table get NXDOMAIN. Plus a query builder and a
//! who-am-I server pair (TCP over HTTP, UDP) that answers with the address it was reached from.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};

/// A DNS query for `name`'s A record.
pub fn query(name: &str, id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    push_name(&mut q, name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn push_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// The question's name (lower case) and the offset past the question.
fn question(q: &[u8]) -> Option<(String, usize)> {
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let n = usize::from(*q.get(at)?);
        if n == 0 {
            return Some((labels.join(".").to_ascii_lowercase(), at + 5));
        }
        labels.push(String::from_utf8_lossy(q.get(at + 1..at + 1 + n)?).into_owned());
        at += 1 + n;
    }
}

/// The answer to `q` from `table` (name → address).
pub fn answer(q: &[u8], table: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let (name, end) = question(q)?;
    let mut a = q.get(..2)?.to_vec();
    let Some(ip) = table.get(&name) else {
        a.extend_from_slice(&[0x81, 0x83, 0, 1, 0, 0, 0, 0, 0, 0]);
        a.extend_from_slice(q.get(12..end)?);
        return Some(a);
    };
    a.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
    a.extend_from_slice(q.get(12..end)?);
    // name CNAME edge.cdn-example.net (owner: a pointer to the question).
    let mut target = Vec::new();
    push_name(&mut target, "edge.cdn-example.net");
    a.extend_from_slice(&[0xC0, 12, 0, 5, 0, 1, 0, 0, 1, 44]);
    a.extend_from_slice(&(target.len() as u16).to_be_bytes());
    let target_at = a.len();
    a.extend_from_slice(&target);
    // edge.cdn-example.net A ip (owner: a pointer into the CNAME's RDATA).
    a.extend_from_slice(&[0xC0, target_at as u8, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4]);
    a.extend_from_slice(&ip.octets());
    Some(a)
}

/// Answers queries on `sock` from `table` until the process ends; `whoami.test` is answered
/// with the (IPv4) address the query came from.
pub fn serve_udp(sock: UdpSocket, table: HashMap<String, Ipv4Addr>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut table = table;
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let IpAddr::V4(v4) = from.ip() {
                table.insert("whoami.test".to_string(), v4);
            }
            if let Some(a) = answer(&buf[..n], &table) {
                let _ = sock.send_to(&a, from);
            }
        }
    });
}

/// Answers DNS over TCP (length-prefixed messages) on `listener` from `table`.
pub fn serve_tcp(listener: TcpListener, table: HashMap<String, Ipv4Addr>) {
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            let mut len = [0u8; 2];
            while s.read_exact(&mut len).is_ok() {
                let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut q).is_err() {
                    break;
                }
                let Some(a) = answer(&q, &table) else { break };
                let mut out = (a.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(&a);
                // Two writes: the client must frame answers across reads.
                let _ = s.write_all(&out[..3]).and_then(|()| s.write_all(&out[3..]));
            }
        }
    });
}

/// A TCP server (any request, an HTTP/1.0 answer) and a UDP server on `ip`, both answering with
/// the IP address they were reached from; their ports.
pub fn start_whoami(ip: IpAddr) -> (u16, u16) {
    let tcp = TcpListener::bind((ip, 0)).unwrap();
    let udp = UdpSocket::bind((ip, 0)).unwrap();
    let ports = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        for s in tcp.incoming() {
            let Ok(mut s) = s else { continue };
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{peer}",
                peer.len()
            );
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(from.ip().to_string().as_bytes(), from);
        }
    });
    ports
}
