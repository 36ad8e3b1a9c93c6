//! The one incremental HTTP/1.x head scanner and the head limits shared by both HTTP parsers in
//! ostp: the Management API front end (`api::http`) and the client's local proxy port
//! (`tunnel::proxy_front`). [`HeadScanner`] finds the blank line that ends a request head in a
//! buffer that only grows, remembering how far it got, so a head trickled in byte by byte costs
//! O(n) scanning in total (not O(n²)).

/// Largest request head (request line + headers + the blank line) either parser accepts.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields either parser accepts in one head. Browsers send about 10–20 through the
/// proxy and API clients fewer; 100 (nginx, hyper's default) leaves room, and memory is bounded
/// by [`MAX_HEAD_BYTES`] anyway.
pub const MAX_HEADERS: usize = 100;

/// `token` characters of RFC 9110 (method and header names).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where a complete head ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadEnd {
    /// Length of the request line and header lines, each with its line end, without the blank
    /// line.
    pub head_len: usize,
    /// Length including the blank line: where the body (or the next request) starts.
    pub total_len: usize,
}

/// What [`HeadScanner::scan`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scan {
    Complete(HeadEnd),
    /// No end yet; call again after more bytes were appended.
    Incomplete,
    /// No head of at most `max_len` bytes can end in this buffer.
    TooLarge,
}

/// Remembers how far a growing buffer was scanned for the end of its head. Use one per buffer;
/// [`HeadScanner::reset`] when bytes are removed from the buffer's front. CRLF and bare LF line
/// ends are accepted.
#[derive(Debug, Default, Clone)]
pub struct HeadScanner {
    /// Bytes before this index were checked (except the last two, which need look-ahead).
    scanned: usize,
    /// Bytes examined in total (tests check that trickled heads cost O(n)).
    #[cfg(test)]
    examined: usize,
}

impl HeadScanner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets the progress (the buffer's front was consumed).
    pub fn reset(&mut self) {
        self.scanned = 0;
    }

    /// Looks for the end of the head at the start of `buf`, which must be the buffer of the last
    /// call with bytes appended (or anything after [`HeadScanner::reset`]). Only the first
    /// `max_len` bytes are ever examined.
    pub fn scan(&mut self, buf: &[u8], max_len: usize) -> Scan {
        let limit = buf.len().min(max_len);
        let window = &buf[..limit];
        // A terminator "\n\n" / "\n\r\n" starting at one of the last two checked bytes could not
        // be seen whole last time: look at them again.
        let start = self.scanned.saturating_sub(2).min(limit);
        for i in start..limit {
            #[cfg(test)]
            {
                self.examined += 1;
            }
            if window[i] != b'\n' {
                continue;
            }
            match (window.get(i + 1), window.get(i + 2)) {
                (Some(b'\n'), _) => return complete(i, 2),
                (Some(b'\r'), Some(b'\n')) => return complete(i, 3),
                _ => {}
            }
        }
        self.scanned = limit;
        if buf.len() >= max_len {
            Scan::TooLarge
        } else {
            Scan::Incomplete
        }
    }
}

fn complete(newline: usize, terminator: usize) -> Scan {
    Scan::Complete(HeadEnd {
        head_len: newline + 1,
        total_len: newline + terminator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_once(text: &[u8]) -> Scan {
        HeadScanner::new().scan(text, MAX_HEAD_BYTES)
    }

    #[test]
    fn finds_crlf_and_bare_lf_ends() {
        let end = |head_len, total_len| {
            Scan::Complete(HeadEnd {
                head_len,
                total_len,
            })
        };
        assert_eq!(
            scan_once(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"),
            end(22, 24)
        );
        assert_eq!(scan_once(b"GET / HTTP/1.1\nA: b\n\nbody"), end(20, 21));
        assert_eq!(scan_once(b"GET / HTTP/1.1\r\n\r\n"), end(16, 18));
        assert_eq!(scan_once(b"GET / HTTP/1.1\r\nA: b\r\n"), Scan::Incomplete);
        assert_eq!(scan_once(b""), Scan::Incomplete);
    }

    #[test]
    fn limit_is_exact() {
        let mut head = b"GET / HTTP/1.1\r\nX: ".to_vec();
        head.resize(MAX_HEAD_BYTES - 4, b'a');
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head.len(), MAX_HEAD_BYTES);
        assert!(matches!(scan_once(&head), Scan::Complete(e) if e.total_len == MAX_HEAD_BYTES));
        let mut over = head[..head.len() - 4].to_vec();
        over.extend_from_slice(b"a\r\n\r\n");
        assert_eq!(scan_once(&over), Scan::TooLarge);
        assert_eq!(scan_once(&over[..MAX_HEAD_BYTES]), Scan::TooLarge);
        assert_eq!(scan_once(&over[..MAX_HEAD_BYTES - 1]), Scan::Incomplete);
    }

    /// Every split of a head into two feeds finds the same end as one feed (the terminator may
    /// straddle the boundary), for both line-end styles.
    #[test]
    fn every_split_point_gives_the_same_end() {
        for text in [
            &b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"[..],
            b"GET / HTTP/1.1\nA: b\n\nrest",
        ] {
            let whole = scan_once(text);
            for cut in 0..=text.len() {
                let mut s = HeadScanner::new();
                let first = s.scan(&text[..cut], MAX_HEAD_BYTES);
                let got = if let Scan::Complete(_) = first {
                    first
                } else {
                    s.scan(text, MAX_HEAD_BYTES)
                };
                assert_eq!(got, whole, "cut at {cut}");
            }
        }
    }

    /// Regression (review bug H): a head trickled in one byte at a time is scanned in O(n)
    /// total; the former scanners restarted from the front on every read (O(n²)).
    #[test]
    fn trickled_head_costs_linear_scanning() {
        let mut head = b"GET /api/users HTTP/1.1\r\n".to_vec();
        while head.len() < MAX_HEAD_BYTES - 100 {
            head.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let mut s = HeadScanner::new();
        let mut found = None;
        for n in 1..=head.len() {
            if let Scan::Complete(end) = s.scan(&head[..n], MAX_HEAD_BYTES) {
                found = Some(end);
                break;
            }
        }
        assert_eq!(found.map(|e| e.total_len), Some(head.len()));
        // Each byte is examined at most three times (twice more as look-ahead context).
        assert!(
            s.examined <= 3 * head.len(),
            "examined {} bytes for a {}-byte head",
            s.examined,
            head.len()
        );
    }
}
