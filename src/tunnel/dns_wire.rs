//! A read-only view of DNS responses (RFC 1035 wire format), enough for split routing to learn
//! which addresses a name resolved to: the question name and the A/AAAA records of the answer
//! section that belong to it, CNAME chains inside the answer followed. Pure and total: any byte
//! string is either a [`DnsAnswer`] or a [`DnsError`], never a panic — compression pointers must
//! point backwards (no loops), every read is bounds-checked, and counts that lie are cut short
//! by the message's end.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name on the wire (RFC 1035 §3.1), labels and length bytes.
const MAX_NAME: usize = 255;
/// Answer records looked at at most (a lying count costs no more than this).
const MAX_RECORDS: usize = 128;
/// CNAME links followed at most.
const MAX_CHAIN: usize = 8;
const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Why a message is not a usable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// Shorter than its header, or a field runs past the end.
    Truncated,
    /// A query, not a response; or not a standard query's response.
    NotAResponse,
    /// A response, not a query; or not a standard query.
    NotAQuery,
    /// An error answer (NXDOMAIN, SERVFAIL, ...): nothing to learn.
    ErrorCode(u8),
    /// Not exactly one question.
    Questions(u16),
    /// A name that is too long, uses a reserved label type or a pointer that does not point
    /// backwards.
    BadName,
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated => write!(f, "truncated DNS message"),
            DnsError::NotAResponse => write!(f, "not a DNS response to a standard query"),
            DnsError::NotAQuery => write!(f, "not a standard DNS query"),
            DnsError::ErrorCode(c) => write!(f, "DNS error answer (rcode {c})"),
            DnsError::Questions(n) => write!(f, "{n} questions instead of one"),
            DnsError::BadName => write!(f, "malformed name"),
        }
    }
}

impl std::error::Error for DnsError {}

/// A domain name decoded from the wire: labels in wire form (length-prefixed), lower case, no
/// compression. Fixed size: no allocation.
#[derive(Clone, Copy)]
pub struct DnsName {
    wire: [u8; MAX_NAME],
    len: usize,
}

impl PartialEq for DnsName {
    fn eq(&self, other: &Self) -> bool {
        self.wire[..self.len] == other.wire[..other.len]
    }
}

impl Eq for DnsName {}

impl fmt::Debug for DnsName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = [0u8; MAX_NAME];
        match self.text(&mut text) {
            Some(t) => write!(f, "{t:?}"),
            None => write!(f, "{:?}", &self.wire[..self.len]),
        }
    }
}

impl DnsName {
    fn empty() -> DnsName {
        DnsName {
            wire: [0; MAX_NAME],
            len: 0,
        }
    }

    /// The dotted text form (`www.example.com`, no trailing dot, the root is `""`) written into
    /// `buf`, or `None` when a label holds a byte other than a letter, digit, `-` or `_` (such a
    /// name matches no `exclude.domains` entry).
    pub fn text<'b>(&self, buf: &'b mut [u8; MAX_NAME]) -> Option<&'b str> {
        let mut out = 0;
        let mut i = 0;
        while i < self.len {
            let n = usize::from(self.wire[i]);
            let label = self.wire.get(i + 1..i + 1 + n)?;
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            if out > 0 {
                *buf.get_mut(out)? = b'.';
                out += 1;
            }
            buf.get_mut(out..out + n)?.copy_from_slice(label);
            out += n;
            i += 1 + n;
        }
        std::str::from_utf8(&buf[..out]).ok()
    }
}

/// Compression pointers followed at most in one name (RFC 1035 sets no limit; real names use
/// one or two). Pointers must point backwards, so they cannot loop, but a chain of them could
/// otherwise cost thousands of hops per name.
const MAX_HOPS: u32 = 16;
/// Labels read at most in one name (255 bytes hold at most 127 of them).
const MAX_LABELS: u32 = 128;

/// Reads the name at `pos` of `msg`: the name and the offset just past it where it started
/// (a pointer ends the name in place). Pointers must point before the label they replace and
/// at most [`MAX_HOPS`] are followed (and [`MAX_LABELS`] labels read), so decoding always ends
/// after a bounded amount of work, which is added to `steps` (one per label or pointer).
fn read_name(msg: &[u8], pos: usize, steps: &mut u32) -> Result<(DnsName, usize), DnsError> {
    let mut name = DnsName::empty();
    let mut at = pos;
    let mut end = None;
    let (mut hops, mut labels) = (0u32, 0u32);
    loop {
        *steps += 1;
        let len = *msg.get(at).ok_or(DnsError::Truncated)?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                return Ok((name, end.unwrap_or(at + 1)));
            }
            0x00 => {
                labels += 1;
                let n = usize::from(len);
                let label = msg.get(at + 1..at + 1 + n).ok_or(DnsError::Truncated)?;
                if name.len + 1 + n + 1 > MAX_NAME || labels > MAX_LABELS {
                    return Err(DnsError::BadName);
                }
                name.wire[name.len] = len;
                for (dst, src) in name.wire[name.len + 1..].iter_mut().zip(label) {
                    *dst = src.to_ascii_lowercase();
                }
                name.len += 1 + n;
                at += 1 + n;
            }
            0xC0 => {
                hops += 1;
                let low = *msg.get(at + 1).ok_or(DnsError::Truncated)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3F, low]));
                if target >= at || hops > MAX_HOPS {
                    // Forwards or onto itself (a possible loop), or a chain too long.
                    return Err(DnsError::BadName);
                }
                end.get_or_insert(at + 2);
                at = target;
            }
            _ => return Err(DnsError::BadName), // 0x40, 0x80: reserved label types
        }
    }
}

fn u16_at(msg: &[u8], at: usize) -> Result<u16, DnsError> {
    let b = msg.get(at..at + 2).ok_or(DnsError::Truncated)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn u32_at(msg: &[u8], at: usize) -> Result<u32, DnsError> {
    let b = msg.get(at..at + 4).ok_or(DnsError::Truncated)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// One resource record of the answer section.
#[derive(Clone, Copy)]
struct Record {
    owner: DnsName,
    rtype: u16,
    class: u16,
    ttl: u32,
    /// RDATA's range in the message.
    data: (usize, usize),
}

impl Record {
    const EMPTY: Record = Record {
        owner: DnsName {
            wire: [0; MAX_NAME],
            len: 0,
        },
        rtype: 0,
        class: 0,
        ttl: 0,
        data: (0, 0),
    };
}

/// Reads the record at `pos`: it and the offset past it.
fn read_record(msg: &[u8], pos: usize, steps: &mut u32) -> Result<(Record, usize), DnsError> {
    let (owner, at) = read_name(msg, pos, steps)?;
    let rtype = u16_at(msg, at)?;
    let class = u16_at(msg, at + 2)?;
    let ttl = u32_at(msg, at + 4)?;
    let rdlen = usize::from(u16_at(msg, at + 8)?);
    let start = at + 10;
    let end = start + rdlen;
    if end > msg.len() {
        return Err(DnsError::Truncated);
    }
    let record = Record {
        owner,
        rtype,
        class,
        ttl,
        data: (start, end),
    };
    Ok((record, end))
}

/// The header's ID, flags and question of a message with exactly one question, and the offset
/// past the question.
fn read_question(msg: &[u8], steps: &mut u32) -> Result<(u16, u16, DnsName, usize), DnsError> {
    if msg.len() < HEADER {
        return Err(DnsError::Truncated);
    }
    let id = u16_at(msg, 0)?;
    let flags = u16_at(msg, 2)?;
    let questions = u16_at(msg, 4)?;
    if questions != 1 {
        return Err(DnsError::Questions(questions));
    }
    let (question, at) = read_name(msg, HEADER, steps)?;
    let qtype_class_end = at + 4;
    if qtype_class_end > msg.len() {
        return Err(DnsError::Truncated);
    }
    Ok((id, flags, question, qtype_class_end))
}

/// A standard query (QR clear, opcode QUERY) with one question: what an application asked, so
/// that only an answer to it is believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsQuery {
    /// The header's ID, which the answer repeats.
    pub id: u16,
    /// The question's name.
    pub question: DnsName,
}

impl DnsQuery {
    /// Views `msg` as a standard query with one question.
    pub fn parse(msg: &[u8]) -> Result<DnsQuery, DnsError> {
        let (id, flags, question, _) = read_question(msg, &mut 0)?;
        if flags & 0x8000 != 0 || (flags >> 11) & 0xF != 0 {
            return Err(DnsError::NotAQuery);
        }
        Ok(DnsQuery { id, question })
    }
}

/// A DNS response's question and answer section.
pub struct DnsAnswer<'a> {
    msg: &'a [u8],
    id: u16,
    question: DnsName,
    /// Offset of the first answer record.
    answers_at: usize,
    /// ANCOUNT, capped at [`MAX_RECORDS`] (the message's end may cut it shorter).
    answer_count: usize,
}

impl<'a> DnsAnswer<'a> {
    /// Views `msg` as a successful response (QR set, opcode QUERY, rcode NOERROR) to one
    /// question. A truncated (TC) answer is accepted: its complete records still count.
    pub fn parse(msg: &'a [u8]) -> Result<DnsAnswer<'a>, DnsError> {
        if msg.len() < HEADER {
            return Err(DnsError::Truncated);
        }
        let flags = u16_at(msg, 2)?;
        if flags & 0x8000 == 0 || (flags >> 11) & 0xF != 0 {
            return Err(DnsError::NotAResponse);
        }
        let rcode = (flags & 0xF) as u8;
        if rcode != 0 {
            return Err(DnsError::ErrorCode(rcode));
        }
        let (id, _, question, answers_at) = read_question(msg, &mut 0)?;
        Ok(DnsAnswer {
            msg,
            id,
            question,
            answers_at,
            answer_count: usize::from(u16_at(msg, 6)?).min(MAX_RECORDS),
        })
    }

    /// The header's ID (the query's).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The question's name.
    pub fn question(&self) -> &DnsName {
        &self.question
    }

    /// Calls `found(address, ttl)` for each A/AAAA record (class IN) of the question's name or
    /// of a name it is a CNAME of (in the answer section, at most [`MAX_CHAIN`] links); a TTL is
    /// the smallest along its chain. Records after a malformed one are not looked at.
    pub fn addresses(&self, found: impl FnMut(IpAddr, u32)) {
        self.addresses_counted(found, &mut 0);
    }

    /// [`Self::addresses`], adding the name-decoding steps taken to `steps`. The answer
    /// section is read once (at most [`MAX_RECORDS`] records, each name at most [`MAX_HOPS`]
    /// pointers and [`MAX_LABELS`] labels), and the CNAME chain is walked over what was read.
    fn addresses_counted(&self, mut found: impl FnMut(IpAddr, u32), steps: &mut u32) {
        let mut records = [Record::EMPTY; MAX_RECORDS];
        let mut count = 0;
        let mut at = self.answers_at;
        while count < self.answer_count {
            let Ok((record, next)) = read_record(self.msg, at, steps) else {
                break;
            };
            records[count] = record;
            count += 1;
            at = next;
        }
        let records = &records[..count];
        let mut target = self.question;
        let mut chain_ttl = u32::MAX;
        for _ in 0..=MAX_CHAIN {
            let mut next = None;
            for r in records {
                if r.class != CLASS_IN || r.owner != target {
                    continue;
                }
                let data = self.msg.get(r.data.0..r.data.1).unwrap_or_default();
                let ttl = r.ttl.min(chain_ttl);
                match (r.rtype, data.len()) {
                    (TYPE_A, 4) => {
                        let a: [u8; 4] = data.try_into().unwrap_or_default();
                        found(IpAddr::V4(Ipv4Addr::from(a)), ttl);
                    }
                    (TYPE_AAAA, 16) => {
                        let a: [u8; 16] = data.try_into().unwrap_or_default();
                        found(IpAddr::V6(Ipv6Addr::from(a)), ttl);
                    }
                    (TYPE_CNAME, _) if next.is_none() => {
                        // The CNAME's target: a name inside RDATA (pointers may leave it).
                        if let Ok((alias, end)) = read_name(self.msg, r.data.0, steps) {
                            if end <= r.data.1 {
                                next = Some((alias, r.ttl));
                            }
                        }
                    }
                    _ => {}
                }
            }
            match next {
                Some((alias, ttl)) if alias != target => {
                    target = alias;
                    chain_ttl = chain_ttl.min(ttl);
                }
                _ => return,
            }
        }
    }
}

/// Longest DNS-over-TCP message [`TcpFramer`] keeps whole; longer ones (zone transfers, not
/// answers to applications' lookups) are skipped, so a connection buffers at most this much.
pub const MAX_TCP_MESSAGE: usize = 16 * 1024;

/// Splits a DNS-over-TCP byte stream (RFC 1035 §4.2.2: a 2-byte length before each message)
/// into messages: bytes are fed in as they pass, whole messages come out. Bounded: a message
/// longer than the framer's maximum passes unbuffered; the buffer is allocated with exactly the
/// announced length when the message's first byte arrives and freed when it is complete, so an
/// idle connection (or one that sent only a length) holds no buffer.
#[derive(Debug)]
pub struct TcpFramer {
    /// Longest message kept whole.
    max: usize,
    /// The length prefix read so far.
    head: [u8; 2],
    head_len: usize,
    /// The message's bytes so far.
    buf: Vec<u8>,
    /// Bytes of an overlong message still to pass unbuffered.
    skip: usize,
}

impl Default for TcpFramer {
    fn default() -> Self {
        TcpFramer::new(MAX_TCP_MESSAGE)
    }
}

impl TcpFramer {
    /// A framer keeping messages of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        TcpFramer {
            max,
            head: [0; 2],
            head_len: 0,
            buf: Vec::new(),
            skip: 0,
        }
    }

    /// Takes the next bytes of the stream (any split); `each` gets every message they complete.
    pub fn feed(&mut self, mut bytes: &[u8], mut each: impl FnMut(&[u8])) {
        while let Some((&first, rest)) = bytes.split_first() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.head_len < 2 {
                self.head[self.head_len] = first;
                self.head_len += 1;
                bytes = rest;
                let len = usize::from(u16::from_be_bytes(self.head));
                if self.head_len == 2 && (len == 0 || len > self.max) {
                    // An empty message, or one too long to keep: let it pass.
                    self.skip = len;
                    self.head_len = 0;
                }
                continue;
            }
            let want = usize::from(u16::from_be_bytes(self.head));
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(want);
            }
            let n = (want - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() == want {
                each(&self.buf);
                self.buf = Vec::new();
                self.head_len = 0;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds DNS messages for tests.
    pub(crate) struct Builder {
        pub(crate) msg: Vec<u8>,
    }

    impl Builder {
        /// A NOERROR response header for one question `name`, `answers` records announced.
        pub(crate) fn response(name: &str, answers: u16) -> Builder {
            let mut msg = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
            msg.extend_from_slice(&answers.to_be_bytes());
            msg.extend_from_slice(&[0, 0, 0, 0]);
            let mut b = Builder { msg };
            b.name(name);
            b.msg.extend_from_slice(&[0, 1, 0, 1]);
            b
        }

        pub(crate) fn name(&mut self, name: &str) -> &mut Self {
            for label in name.split('.').filter(|l| !l.is_empty()) {
                self.msg.push(label.len() as u8);
                self.msg.extend_from_slice(label.as_bytes());
            }
            self.msg.push(0);
            self
        }

        /// A record owned by the question (a pointer to offset 12).
        pub(crate) fn record_q(&mut self, rtype: u16, ttl: u32, data: &[u8]) -> &mut Self {
            self.msg.extend_from_slice(&[0xC0, 12]);
            self.rest(rtype, ttl, data)
        }

        pub(crate) fn record(
            &mut self,
            owner: &str,
            rtype: u16,
            ttl: u32,
            data: &[u8],
        ) -> &mut Self {
            self.name(owner);
            self.rest(rtype, ttl, data)
        }

        fn rest(&mut self, rtype: u16, ttl: u32, data: &[u8]) -> &mut Self {
            self.msg.extend_from_slice(&rtype.to_be_bytes());
            self.msg.extend_from_slice(&CLASS_IN.to_be_bytes());
            self.msg.extend_from_slice(&ttl.to_be_bytes());
            self.msg
                .extend_from_slice(&(data.len() as u16).to_be_bytes());
            self.msg.extend_from_slice(data);
            self
        }
    }

    pub(crate) fn wire_name(name: &str) -> Vec<u8> {
        let mut b = Builder { msg: Vec::new() };
        b.name(name);
        b.msg
    }

    fn collect(msg: &[u8]) -> Result<(String, Vec<(IpAddr, u32)>), DnsError> {
        let a = DnsAnswer::parse(msg)?;
        let mut text = [0u8; MAX_NAME];
        let name = a.question().text(&mut text).unwrap_or("?").to_string();
        let mut out = Vec::new();
        a.addresses(|ip, ttl| out.push((ip, ttl)));
        Ok((name, out))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_and_aaaa_of_the_question_are_found_with_their_ttls() {
        let mut b = Builder::response("WWW.Example.com", 3);
        b.record_q(TYPE_A, 300, &[93, 184, 216, 34])
            .record_q(TYPE_AAAA, 60, &ip_bytes("2001:db8::1"))
            .record("other.example", TYPE_A, 5, &[1, 2, 3, 4]);
        let (name, addrs) = collect(&b.msg).unwrap();
        assert_eq!(name, "www.example.com", "lower-cased, dotted");
        assert_eq!(
            addrs,
            vec![(ip("93.184.216.34"), 300), (ip("2001:db8::1"), 60)],
            "another name's address is not the question's"
        );
    }

    fn ip_bytes(s: &str) -> Vec<u8> {
        match ip(s) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    #[test]
    fn cname_chains_are_followed_and_ttls_are_the_chains_minimum() {
        // www.example.com CNAME edge.cdn.net (ttl 30), edge.cdn.net CNAME e1.cdn.net (ttl 600,
        // written with a pointer into the previous RDATA), e1.cdn.net A (ttl 120).
        let mut b = Builder::response("www.example.com", 4);
        let cname1 = wire_name("edge.cdn.net");
        let edge_at = b.msg.len() + 2 + 10;
        b.record_q(TYPE_CNAME, 30, &cname1);
        let mut rdata = vec![2, b'e', b'1'];
        rdata.extend_from_slice(&[0xC0 | (edge_at >> 8) as u8, (edge_at + 5) as u8]); // "cdn.net"
        b.msg.extend_from_slice(&[0xC0, edge_at as u8]);
        b.rest(TYPE_CNAME, 600, &rdata);
        b.record("e1.cdn.net", TYPE_A, 120, &[10, 0, 0, 1]);
        // A record of an unrelated name in the same answer: not taken.
        b.record("evil.net", TYPE_A, 9, &[6, 6, 6, 6]);
        let (_, addrs) = collect(&b.msg).unwrap();
        assert_eq!(addrs, vec![(ip("10.0.0.1"), 30)]);
    }

    #[test]
    fn cname_loops_and_long_chains_end() {
        let mut b = Builder::response("a.test", 2);
        b.record("a.test", TYPE_CNAME, 60, &wire_name("b.test"))
            .record("b.test", TYPE_CNAME, 60, &wire_name("a.test"));
        assert_eq!(collect(&b.msg).unwrap().1, vec![]);
        let mut b = Builder::response("n0.test", 20);
        for i in 0..20 {
            b.record(
                &format!("n{i}.test"),
                TYPE_CNAME,
                60,
                &wire_name(&format!("n{}.test", i + 1)),
            );
        }
        b.record("n20.test", TYPE_A, 60, &[1, 1, 1, 1]);
        assert_eq!(collect(&b.msg).unwrap().1, vec![], "beyond MAX_CHAIN links");
    }

    #[test]
    fn queries_error_answers_and_odd_questions_are_refused() {
        let mut q = Builder::response("example.com", 0).msg;
        q[2] = 0x01; // QR clear: a query
        assert_eq!(collect(&q).err(), Some(DnsError::NotAResponse));
        let mut nx = Builder::response("example.com", 0).msg;
        nx[3] = 0x83;
        assert_eq!(collect(&nx).err(), Some(DnsError::ErrorCode(3)));
        let mut two = Builder::response("example.com", 0).msg;
        two[5] = 2;
        assert_eq!(collect(&two).err(), Some(DnsError::Questions(2)));
        assert_eq!(collect(&[0x81; 11]).err(), Some(DnsError::Truncated));
    }

    #[test]
    fn pointers_must_point_backwards() {
        let mut b = Builder::response("x.test", 1);
        // A record whose owner is a pointer to itself.
        let at = b.msg.len();
        b.msg.extend_from_slice(&[0xC0, at as u8]);
        b.rest(TYPE_A, 60, &[1, 2, 3, 4]);
        assert_eq!(collect(&b.msg).unwrap().1, vec![]);
        assert_eq!(read_name(&b.msg, at, &mut 0).err(), Some(DnsError::BadName));
        // Two pointers to each other, and a pointer forwards.
        let msg = [0xC0, 2, 0xC0, 0];
        assert_eq!(read_name(&msg, 2, &mut 0).err(), Some(DnsError::BadName));
        assert_eq!(read_name(&msg, 0, &mut 0).err(), Some(DnsError::BadName));
        // Reserved label types.
        assert_eq!(
            read_name(&[0x40, 0], 0, &mut 0).err(),
            Some(DnsError::BadName)
        );
    }

    #[test]
    fn lying_counts_and_truncation_keep_what_is_complete() {
        let mut b = Builder::response("example.com", 500);
        b.record_q(TYPE_A, 60, &[1, 2, 3, 4]);
        let full = b.msg.clone();
        b.record_q(TYPE_A, 60, &[5, 6, 7, 8]);
        let cut = &b.msg[..b.msg.len() - 2];
        assert_eq!(collect(&full).unwrap().1, vec![(ip("1.2.3.4"), 60)]);
        assert_eq!(collect(cut).unwrap().1, vec![(ip("1.2.3.4"), 60)]);
        // A short RDATA for its type is skipped, not misread.
        let mut b = Builder::response("example.com", 2);
        b.record_q(TYPE_A, 60, &[1, 2, 3])
            .record_q(TYPE_A, 7, &[9, 9, 9, 9]);
        assert_eq!(collect(&b.msg).unwrap().1, vec![(ip("9.9.9.9"), 7)]);
    }

    #[test]
    fn names_too_long_or_with_odd_bytes() {
        let mut long = String::new();
        for _ in 0..5 {
            long += &"a".repeat(63);
            long.push('.');
        }
        let b = Builder::response(&long, 0);
        assert_eq!(collect(&b.msg).err(), Some(DnsError::BadName));
        let mut b = Builder::response("x", 0);
        b.msg[13] = b'.'; // the label "." : no text form
        let a = DnsAnswer::parse(&b.msg).unwrap();
        assert!(a.question().text(&mut [0; MAX_NAME]).is_none());
        let root = Builder::response("", 0);
        let a = DnsAnswer::parse(&root.msg).unwrap();
        assert_eq!(a.question().text(&mut [0; MAX_NAME]), Some(""));
    }

    #[test]
    fn tcp_messages_are_found_in_any_split_and_overlong_ones_skipped() {
        let mut b = Builder::response("example.com", 1);
        b.record_q(TYPE_A, 60, &[1, 2, 3, 4]);
        let msg = b.msg.clone();
        let mut stream = Vec::new();
        for m in [&msg[..], &[0u8; MAX_TCP_MESSAGE + 1][..], &msg[..]] {
            stream.extend_from_slice(&(m.len() as u16).to_be_bytes());
            stream.extend_from_slice(m);
        }
        stream.extend_from_slice(&[0, 0]); // an empty message
        stream.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        stream.extend_from_slice(&msg);
        for split in [1, 2, 3, 7, 100, stream.len()] {
            let mut f = TcpFramer::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(split) {
                f.feed(chunk, |m| got.push(m.to_vec()));
            }
            assert_eq!(got, vec![msg.clone(); 3], "split {split}");
            assert!(f.buf.capacity() <= 2 + MAX_TCP_MESSAGE);
        }
    }

    /// Most name-decoding steps one answer can take: every record's owner and each CNAME
    /// link's target, each at most a step per pointer and per label plus its end.
    const WORK_BOUND: u32 = (MAX_RECORDS + MAX_CHAIN + 1) as u32 * (MAX_HOPS + MAX_LABELS + 1);

    /// A response to `x.test` whose first record's RDATA holds `hops` pointers, each to the one
    /// before (the first to the question), followed by `records` records owned by the last.
    fn pointer_chain(hops: usize, records: u16) -> (Vec<u8>, usize) {
        let mut b = Builder::response("x.test", records + 1);
        b.msg.extend_from_slice(&[0xC0, 12]);
        let rdata_at = b.msg.len() + 10;
        let mut rdata = Vec::new();
        let mut prev = 12usize;
        for i in 0..hops {
            rdata.extend_from_slice(&[0xC0 | (prev >> 8) as u8, prev as u8]);
            prev = rdata_at + 2 * i;
        }
        b.rest(99, 60, &rdata);
        for _ in 0..records {
            b.msg
                .extend_from_slice(&[0xC0 | (prev >> 8) as u8, prev as u8]);
            b.rest(TYPE_A, 60, &[10, 0, 0, 9]);
        }
        (b.msg, prev)
    }

    #[test]
    fn a_long_pointer_chain_costs_a_bounded_amount_of_work() {
        // 6,800 backward pointers in a 16 KB answer, and 127 records whose owner is the chain's
        // end: without a cap on hops, each owner took 6,800 steps, on each CNAME pass.
        let (msg, last) = pointer_chain(6_800, 127);
        assert!(msg.len() < 16 * 1024);
        assert_eq!(
            read_name(&msg, last, &mut 0).err(),
            Some(DnsError::BadName),
            "too many hops"
        );
        let a = DnsAnswer::parse(&msg).unwrap();
        let mut steps = 0;
        a.addresses_counted(|_, _| {}, &mut steps);
        assert!(steps <= WORK_BOUND, "{steps} steps");
        // A chain of MAX_HOPS pointers is a name (x.test), and every record may use it: still
        // within the bound.
        let (msg, last) = pointer_chain(MAX_HOPS as usize - 1, MAX_RECORDS as u16 - 1);
        let mut steps = 0;
        let (name, _) = read_name(&msg, last, &mut steps).unwrap();
        assert_eq!(name, DnsAnswer::parse(&msg).unwrap().question);
        let mut found = 0;
        let mut steps = 0;
        DnsAnswer::parse(&msg)
            .unwrap()
            .addresses_counted(|_, _| found += 1, &mut steps);
        assert_eq!(found, MAX_RECORDS - 1);
        assert!(steps <= WORK_BOUND, "{steps} steps");
        // One pointer more (the owner's own, to a chain of MAX_HOPS): not a name.
        let (msg, last) = pointer_chain(MAX_HOPS as usize, 1);
        assert!(read_name(&msg, last, &mut 0).is_ok());
        let mut found = 0;
        DnsAnswer::parse(&msg).unwrap().addresses(|_, _| found += 1);
        assert_eq!(found, 0);
    }

    #[test]
    fn queries_are_read_with_their_id_and_question() {
        let mut q = Builder::response("WWW.Example.com", 0).msg;
        q[2] = 0x01; // QR clear, RD
        let query = DnsQuery::parse(&q).unwrap();
        assert_eq!(query.id, 0x1234);
        let answer = Builder::response("www.example.com", 0);
        assert_eq!(
            query.question,
            *DnsAnswer::parse(&answer.msg).unwrap().question()
        );
        assert_eq!(DnsAnswer::parse(&answer.msg).unwrap().id(), 0x1234);
        assert_eq!(
            DnsQuery::parse(&answer.msg).err(),
            Some(DnsError::NotAQuery)
        );
        q[2] = 0x01 | (2 << 3); // opcode STATUS
        assert_eq!(DnsQuery::parse(&q).err(), Some(DnsError::NotAQuery));
    }

    #[test]
    fn the_tcp_framer_holds_exactly_one_message_and_nothing_between_messages() {
        let mut f = TcpFramer::default();
        let mut got = Vec::new();
        f.feed(&[0, 100], |m| got.push(m.to_vec()));
        assert_eq!(f.buf.capacity(), 0, "a length and silence: no buffer");
        f.feed(&[7], |m| got.push(m.to_vec()));
        assert_eq!(f.buf.capacity(), 100, "exactly the announced length");
        f.feed(&[7; 99], |m| got.push(m.to_vec()));
        assert_eq!(got, vec![vec![7u8; 100]]);
        assert_eq!(f.buf.capacity(), 0, "freed after the message");
    }

    /// A small xorshift, so the fuzz loop is reproducible without a dependency.
    pub(crate) fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut b = Builder::response("www.example.com", 3);
        b.record_q(TYPE_CNAME, 30, &[3, b'c', b'd', b'n', 0xC0, 16])
            .record("cdn.example.com", TYPE_A, 60, &[1, 2, 3, 4])
            .record_q(TYPE_AAAA, 60, &[0; 16]);
        let seed_msg = b.msg.clone();
        assert!(!collect(&seed_msg).unwrap().0.is_empty());
        let mut found = 0usize;
        for round in 0..20_000 {
            let msg: Vec<u8> = if round % 4 == 0 {
                let len = (rng(&mut seed) % 300) as usize;
                (0..len).map(|_| rng(&mut seed) as u8).collect()
            } else {
                let mut m = seed_msg.clone();
                for _ in 0..=(rng(&mut seed) % 6) {
                    let i = (rng(&mut seed) as usize) % m.len();
                    match rng(&mut seed) % 4 {
                        0 => m[i] = rng(&mut seed) as u8,
                        1 => m[i] = 0xC0 | (rng(&mut seed) as u8 & 0x3F),
                        2 => m.truncate(i),
                        _ => m.insert(i, rng(&mut seed) as u8),
                    }
                    if m.is_empty() {
                        break;
                    }
                }
                m
            };
            if let Ok(a) = DnsAnswer::parse(&msg) {
                let _ = a.question().text(&mut [0; MAX_NAME]);
                a.addresses(|_, _| found += 1);
            }
        }
        assert!(found > 0, "some mutants still carry addresses");
    }
}
