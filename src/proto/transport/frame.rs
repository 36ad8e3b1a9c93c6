//! Transport frame wire format: varints, a length-checked reader/writer, and frame parse/encode.
//!
//! A transport payload is a sequence of frames. Each frame starts with a type byte. Integers are
//! QUIC-style varints (the two top bits of the first byte give the length: 1, 2, 4 or 8 bytes,
//! big-endian, max 2^62-1). PADDING (type 0x00) extends to the end of the payload.
//! Parsing never panics: every read is bounds-checked and reports [`FrameError`].

use super::codes::{CloseReason, ResetReason};
use super::dest::Destination;

pub const FRAME_PADDING: u8 = 0x00;
pub const FRAME_PING: u8 = 0x01;
pub const FRAME_ACK: u8 = 0x02;
pub const FRAME_STREAM_OPEN: u8 = 0x03;
pub const FRAME_OPEN_OK: u8 = 0x04;
pub const FRAME_RESET_STREAM: u8 = 0x05;
pub const FRAME_MAX_DATA: u8 = 0x06;
pub const FRAME_MAX_STREAM_DATA: u8 = 0x07;
pub const FRAME_MAX_STREAMS: u8 = 0x08;
pub const FRAME_DATAGRAM: u8 = 0x09;
pub const FRAME_CLOSE: u8 = 0x0a;
pub const FRAME_SETTINGS: u8 = 0x0b;
/// DATAGRAM carrying a non-zero association id (0x09 is the same frame with association 0).
pub const FRAME_DATAGRAM_ASSOC: u8 = 0x0c;
/// STREAM frame; the low bit (0x11) marks FIN.
pub const FRAME_STREAM: u8 = 0x10;
pub const FRAME_STREAM_FIN: u8 = 0x11;

/// Which SOCKS5 UDP association of the client a datagram belongs to: the client picks it, the
/// server answers on it (one relay socket per association), so answers never cross associations.
/// 0 means "none given" (older clients).
pub type AssocId = u32;

/// Largest value a varint can carry.
pub const VARINT_MAX: u64 = (1 << 62) - 1;
/// Most ACK ranges accepted in one ACK frame (first range included).
pub const MAX_ACK_RANGES: usize = 64;
/// Longest CLOSE reason text.
pub const MAX_CLOSE_TEXT: usize = 64;

/// Why a payload could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    Truncated,
    UnknownFrameType(u8),
    InvalidAckRanges,
    TooManyAckRanges,
    InvalidDestination,
    ValueTooLarge,
    CloseTextTooLong,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Truncated => f.write_str("frame truncated"),
            FrameError::UnknownFrameType(t) => write!(f, "unknown frame type {t:#04x}"),
            FrameError::InvalidAckRanges => f.write_str("ACK ranges overlap or underflow"),
            FrameError::TooManyAckRanges => {
                write!(f, "more than {MAX_ACK_RANGES} ACK ranges")
            }
            FrameError::InvalidDestination => f.write_str("invalid destination"),
            FrameError::ValueTooLarge => f.write_str("value out of range"),
            FrameError::CloseTextTooLong => {
                write!(f, "CLOSE text longer than {MAX_CLOSE_TEXT} bytes")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// Bytes a varint encoding of `v` takes.
pub fn varint_len(v: u64) -> usize {
    if v < 1 << 6 {
        1
    } else if v < 1 << 14 {
        2
    } else if v < 1 << 30 {
        4
    } else {
        8
    }
}

/// Bounds-checked cursor over a received payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    pub fn u8(&mut self) -> Result<u8, FrameError> {
        let b = *self.buf.get(self.pos).ok_or(FrameError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    pub fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self.pos.checked_add(n).ok_or(FrameError::Truncated)?;
        let s = self.buf.get(self.pos..end).ok_or(FrameError::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    pub fn varint(&mut self) -> Result<u64, FrameError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for &b in self.bytes(len - 1)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    /// A varint that must fit in `usize` and be at most `max`.
    pub fn varint_usize(&mut self, max: usize) -> Result<usize, FrameError> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&v| v <= max)
            .ok_or(FrameError::ValueTooLarge)
    }
}

/// Bounds-checked cursor for building a payload. `put_*` return `None` when out of room
/// (the caller checks sizes first, so this is a safety net, not a control-flow path).
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    pub fn room(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn put_u8(&mut self, v: u8) -> Option<()> {
        *self.buf.get_mut(self.pos)? = v;
        self.pos += 1;
        Some(())
    }

    pub fn put_bytes(&mut self, data: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(data.len())?;
        self.buf.get_mut(self.pos..end)?.copy_from_slice(data);
        self.pos = end;
        Some(())
    }

    pub fn put_varint(&mut self, v: u64) -> Option<()> {
        debug_assert!(v <= VARINT_MAX);
        match varint_len(v) {
            1 => self.put_u8(v as u8),
            2 => self.put_bytes(&((v as u16) | 0x4000).to_be_bytes()),
            4 => self.put_bytes(&((v as u32) | 0x8000_0000).to_be_bytes()),
            _ => self.put_bytes(&(v | 0xc000_0000_0000_0000).to_be_bytes()),
        }
    }

    /// Reserves `n` bytes and returns them for the caller to fill (used to copy stream data
    /// straight from the send buffer).
    pub fn reserve(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get_mut(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
}

/// A parsed (and validated) ACK frame. Ranges are decoded lazily by [`AckFrame::ranges`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckFrame<'a> {
    pub largest: u64,
    pub delay_micros: u64,
    first_range: u64,
    extra: usize,
    raw: &'a [u8],
}

impl<'a> AckFrame<'a> {
    /// Inclusive `(smallest, largest)` packet-number ranges, highest first.
    pub fn ranges(&self) -> AckRanges<'a> {
        AckRanges {
            reader: Reader::new(self.raw),
            left: self.extra,
            first: Some((self.largest - self.first_range, self.largest)),
            smallest: self.largest - self.first_range,
        }
    }
}

/// Iterator over the ranges of an [`AckFrame`].
#[derive(Debug, Clone)]
pub struct AckRanges<'a> {
    reader: Reader<'a>,
    left: usize,
    first: Option<(u64, u64)>,
    smallest: u64,
}

impl Iterator for AckRanges<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let gap = self.reader.varint().ok()?;
        let len = self.reader.varint().ok()?;
        let hi = self.smallest.checked_sub(gap)?.checked_sub(2)?;
        let lo = hi.checked_sub(len)?;
        self.smallest = lo;
        Some((lo, hi))
    }
}

/// One decoded frame (borrowing data from the payload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Padding to the end of the payload.
    Padding,
    Ping,
    Ack(AckFrame<'a>),
    StreamOpen {
        id: u64,
        dest: Destination,
    },
    OpenOk {
        id: u64,
    },
    ResetStream {
        id: u64,
        reason: ResetReason,
        final_size: u64,
    },
    MaxData(u64),
    MaxStreamData {
        id: u64,
        max: u64,
    },
    MaxStreams(u64),
    Datagram {
        assoc: AssocId,
        dest: Destination,
        data: &'a [u8],
    },
    Close {
        reason: CloseReason,
        text: &'a [u8],
    },
    Settings {
        stream_window: u64,
        session_window: u64,
        max_streams: u64,
    },
    Stream {
        id: u64,
        offset: u64,
        data: &'a [u8],
        fin: bool,
    },
}

/// Decodes the next frame. On `Padding` the reader is advanced to the end.
pub fn parse_frame<'a>(r: &mut Reader<'a>) -> Result<Frame<'a>, FrameError> {
    let ty = r.u8()?;
    let frame = match ty {
        FRAME_PADDING => {
            let rest = r.remaining();
            r.bytes(rest)?;
            Frame::Padding
        }
        FRAME_PING => Frame::Ping,
        FRAME_ACK => Frame::Ack(parse_ack(r)?),
        FRAME_STREAM_OPEN => Frame::StreamOpen {
            id: r.varint()?,
            dest: Destination::parse(r)?,
        },
        FRAME_OPEN_OK => Frame::OpenOk { id: r.varint()? },
        FRAME_RESET_STREAM => Frame::ResetStream {
            id: r.varint()?,
            reason: ResetReason::from_code(r.u8()?),
            final_size: r.varint()?,
        },
        FRAME_MAX_DATA => Frame::MaxData(r.varint()?),
        FRAME_MAX_STREAM_DATA => Frame::MaxStreamData {
            id: r.varint()?,
            max: r.varint()?,
        },
        FRAME_MAX_STREAMS => Frame::MaxStreams(r.varint()?),
        FRAME_DATAGRAM | FRAME_DATAGRAM_ASSOC => {
            let assoc = if ty == FRAME_DATAGRAM_ASSOC {
                AssocId::try_from(r.varint()?).map_err(|_| FrameError::ValueTooLarge)?
            } else {
                0
            };
            let dest = Destination::parse(r)?;
            let len = r.varint_usize(usize::MAX)?;
            Frame::Datagram {
                assoc,
                dest,
                data: r.bytes(len)?,
            }
        }
        FRAME_CLOSE => {
            let reason = CloseReason::from_code(r.u8()?);
            let len = r
                .varint_usize(MAX_CLOSE_TEXT)
                .map_err(|_| FrameError::CloseTextTooLong)?;
            Frame::Close {
                reason,
                text: r.bytes(len)?,
            }
        }
        FRAME_SETTINGS => Frame::Settings {
            stream_window: r.varint()?,
            session_window: r.varint()?,
            max_streams: r.varint()?,
        },
        FRAME_STREAM | FRAME_STREAM_FIN => {
            let id = r.varint()?;
            let offset = r.varint()?;
            let len = r.varint_usize(usize::MAX)?;
            let data = r.bytes(len)?;
            if offset + len as u64 > VARINT_MAX {
                return Err(FrameError::ValueTooLarge);
            }
            Frame::Stream {
                id,
                offset,
                data,
                fin: ty == FRAME_STREAM_FIN,
            }
        }
        other => return Err(FrameError::UnknownFrameType(other)),
    };
    Ok(frame)
}

fn parse_ack<'a>(r: &mut Reader<'a>) -> Result<AckFrame<'a>, FrameError> {
    let largest = r.varint()?;
    let delay_micros = r.varint()?;
    let extra = r.varint()?;
    if extra >= MAX_ACK_RANGES as u64 {
        return Err(FrameError::TooManyAckRanges);
    }
    let first_range = r.varint()?;
    let mut smallest = largest
        .checked_sub(first_range)
        .ok_or(FrameError::InvalidAckRanges)?;
    let start = r.pos;
    for _ in 0..extra {
        let gap = r.varint()?;
        let len = r.varint()?;
        let hi = smallest
            .checked_sub(gap)
            .and_then(|v| v.checked_sub(2))
            .ok_or(FrameError::InvalidAckRanges)?;
        smallest = hi.checked_sub(len).ok_or(FrameError::InvalidAckRanges)?;
    }
    Ok(AckFrame {
        largest,
        delay_micros,
        first_range,
        extra: extra as usize,
        raw: &r.buf[start..r.pos],
    })
}

/// Encodes an ACK frame from inclusive ranges given highest first. Writes as many ranges as
/// fit (at least the first); returns `None` if not even the first range fits.
pub fn encode_ack(
    w: &mut Writer<'_>,
    delay_micros: u64,
    ranges: impl Iterator<Item = (u64, u64)> + Clone,
    max_ranges: usize,
) -> Option<()> {
    let max_ranges = max_ranges.clamp(1, MAX_ACK_RANGES);
    let mut iter = ranges.clone();
    let (lo0, hi0) = iter.next()?;
    // Count ranges that fit, computing the size first so the header is exact.
    let mut size = 1 + varint_len(hi0) + varint_len(delay_micros) + varint_len(hi0 - lo0);
    let mut count = 1usize;
    let mut prev_lo = lo0;
    for (lo, hi) in iter {
        if count >= max_ranges {
            break;
        }
        let gap = prev_lo - hi - 2;
        let add = varint_len(gap) + varint_len(hi - lo);
        if size + varint_len(count as u64) + add > w.room() {
            break;
        }
        size += add;
        count += 1;
        prev_lo = lo;
    }
    if size + varint_len(count as u64 - 1) > w.room() {
        return None;
    }
    w.put_u8(FRAME_ACK)?;
    w.put_varint(hi0)?;
    w.put_varint(delay_micros)?;
    w.put_varint(count as u64 - 1)?;
    w.put_varint(hi0 - lo0)?;
    let mut prev_lo = lo0;
    for (lo, hi) in ranges.skip(1).take(count - 1) {
        w.put_varint(prev_lo - hi - 2)?;
        w.put_varint(hi - lo)?;
        prev_lo = lo;
    }
    Some(())
}

/// Size of a STREAM frame header.
pub fn stream_header_len(id: u64, offset: u64, len: usize) -> usize {
    1 + varint_len(id) + varint_len(offset) + varint_len(len as u64)
}

/// Writes a STREAM frame header; the caller then writes exactly `len` data bytes.
pub fn encode_stream_header(
    w: &mut Writer<'_>,
    id: u64,
    offset: u64,
    len: usize,
    fin: bool,
) -> Option<()> {
    w.put_u8(if fin { FRAME_STREAM_FIN } else { FRAME_STREAM })?;
    w.put_varint(id)?;
    w.put_varint(offset)?;
    w.put_varint(len as u64)
}

/// Encodes every non-ACK, non-STREAM frame (used by the transport and by tests).
pub fn encode_frame(w: &mut Writer<'_>, frame: &Frame<'_>) -> Option<()> {
    match frame {
        Frame::Padding => {
            while w.room() > 0 {
                w.put_u8(FRAME_PADDING)?;
            }
            Some(())
        }
        Frame::Ping => w.put_u8(FRAME_PING),
        Frame::Ack(ack) => encode_ack(w, ack.delay_micros, ack.ranges(), MAX_ACK_RANGES),
        Frame::StreamOpen { id, dest } => {
            if w.room() < 1 + varint_len(*id) + dest.encoded_len() {
                return None;
            }
            w.put_u8(FRAME_STREAM_OPEN)?;
            w.put_varint(*id)?;
            dest.encode(w)
        }
        Frame::OpenOk { id } => {
            w.put_u8(FRAME_OPEN_OK)?;
            w.put_varint(*id)
        }
        Frame::ResetStream {
            id,
            reason,
            final_size,
        } => {
            w.put_u8(FRAME_RESET_STREAM)?;
            w.put_varint(*id)?;
            w.put_u8(reason.code())?;
            w.put_varint(*final_size)
        }
        Frame::MaxData(v) => {
            w.put_u8(FRAME_MAX_DATA)?;
            w.put_varint(*v)
        }
        Frame::MaxStreamData { id, max } => {
            w.put_u8(FRAME_MAX_STREAM_DATA)?;
            w.put_varint(*id)?;
            w.put_varint(*max)
        }
        Frame::MaxStreams(v) => {
            w.put_u8(FRAME_MAX_STREAMS)?;
            w.put_varint(*v)
        }
        Frame::Datagram { assoc, dest, data } => {
            if w.room() < datagram_frame_len(*assoc, dest, data.len()) {
                return None;
            }
            if *assoc == 0 {
                w.put_u8(FRAME_DATAGRAM)?;
            } else {
                w.put_u8(FRAME_DATAGRAM_ASSOC)?;
                w.put_varint(u64::from(*assoc))?;
            }
            dest.encode(w)?;
            w.put_varint(data.len() as u64)?;
            w.put_bytes(data)
        }
        Frame::Close { reason, text } => {
            let text = &text[..text.len().min(MAX_CLOSE_TEXT)];
            w.put_u8(FRAME_CLOSE)?;
            w.put_u8(reason.code())?;
            w.put_varint(text.len() as u64)?;
            w.put_bytes(text)
        }
        Frame::Settings {
            stream_window,
            session_window,
            max_streams,
        } => {
            w.put_u8(FRAME_SETTINGS)?;
            w.put_varint(*stream_window)?;
            w.put_varint(*session_window)?;
            w.put_varint(*max_streams)
        }
        Frame::Stream {
            id,
            offset,
            data,
            fin,
        } => {
            if w.room() < stream_header_len(*id, *offset, data.len()) + data.len() {
                return None;
            }
            encode_stream_header(w, *id, *offset, data.len(), *fin)?;
            w.put_bytes(data)
        }
    }
}

/// Encoded size of a DATAGRAM frame.
pub fn datagram_frame_len(assoc: AssocId, dest: &Destination, len: usize) -> usize {
    let assoc_len = if assoc == 0 {
        0
    } else {
        varint_len(u64::from(assoc))
    };
    1 + assoc_len + dest.encoded_len() + varint_len(len as u64) + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip_and_boundaries() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, VARINT_MAX] {
            let mut buf = [0u8; 8];
            let mut w = Writer::new(&mut buf);
            w.put_varint(v).unwrap();
            assert_eq!(w.len(), varint_len(v));
            let n = w.len();
            let mut r = Reader::new(&buf[..n]);
            assert_eq!(r.varint().unwrap(), v);
            assert!(r.is_empty());
        }
        assert_eq!(Reader::new(&[0x40]).varint(), Err(FrameError::Truncated));
    }

    #[test]
    fn ack_ranges_roundtrip() {
        let ranges = [(90, 100), (50, 60), (10, 10), (0, 5)];
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        encode_ack(&mut w, 1234, ranges.iter().copied(), 64).unwrap();
        let n = w.len();
        let mut r = Reader::new(&buf[..n]);
        match parse_frame(&mut r).unwrap() {
            Frame::Ack(ack) => {
                assert_eq!(ack.largest, 100);
                assert_eq!(ack.delay_micros, 1234);
                assert_eq!(ack.ranges().collect::<Vec<_>>(), ranges);
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn ack_truncates_to_room() {
        let ranges: Vec<(u64, u64)> = (0..50u64).rev().map(|i| (i * 10, i * 10 + 1)).collect();
        let mut buf = [0u8; 20];
        let mut w = Writer::new(&mut buf);
        encode_ack(&mut w, 0, ranges.iter().copied(), 64).unwrap();
        let n = w.len();
        let mut r = Reader::new(&buf[..n]);
        let Frame::Ack(ack) = parse_frame(&mut r).unwrap() else {
            panic!()
        };
        let got: Vec<_> = ack.ranges().collect();
        assert!(got.len() > 1 && got.len() < 50);
        assert_eq!(got, &ranges[..got.len()]);
    }

    #[test]
    fn malformed_ack_rejected() {
        // largest 5, first range 6 -> underflow
        let mut r = Reader::new(&[FRAME_ACK, 5, 0, 0, 6]);
        assert_eq!(parse_frame(&mut r), Err(FrameError::InvalidAckRanges));
        // gap underflow
        let mut r = Reader::new(&[FRAME_ACK, 5, 0, 1, 0, 10, 0]);
        assert_eq!(parse_frame(&mut r), Err(FrameError::InvalidAckRanges));
        let mut r = Reader::new(&[FRAME_ACK, 5, 0, 0x40, 100]);
        assert_eq!(parse_frame(&mut r), Err(FrameError::TooManyAckRanges));
    }

    #[test]
    fn all_frames_roundtrip() {
        let dest = Destination::domain("example.org", 443).unwrap();
        let frames = [
            Frame::Ping,
            Frame::StreamOpen {
                id: 4,
                dest: dest.clone(),
            },
            Frame::OpenOk { id: 4 },
            Frame::ResetStream {
                id: 8,
                reason: ResetReason::Timeout,
                final_size: 99999,
            },
            Frame::MaxData(1 << 40),
            Frame::MaxStreamData { id: 2, max: 77 },
            Frame::MaxStreams(100),
            Frame::Datagram {
                assoc: 0,
                dest: dest.clone(),
                data: b"dns?",
            },
            Frame::Datagram {
                assoc: 7,
                dest: dest.clone(),
                data: b"dns?",
            },
            Frame::Datagram {
                assoc: AssocId::MAX,
                dest,
                data: b"",
            },
            Frame::Close {
                reason: CloseReason::LimitReached,
                text: b"quota",
            },
            Frame::Settings {
                stream_window: 1 << 20,
                session_window: 1 << 22,
                max_streams: 128,
            },
            Frame::Stream {
                id: 0,
                offset: 1 << 33,
                data: b"hello",
                fin: true,
            },
            Frame::Padding,
        ];
        let mut buf = [0u8; 300];
        let mut w = Writer::new(&mut buf);
        for f in &frames {
            encode_frame(&mut w, f).unwrap();
        }
        let mut r = Reader::new(&buf);
        for f in &frames {
            assert_eq!(&parse_frame(&mut r).unwrap(), f);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn datagram_association_id_wire_form() {
        let dest = Destination::Addr("1.2.3.4:53".parse().unwrap());
        let encode = |assoc| {
            let mut buf = [0u8; 64];
            let mut w = Writer::new(&mut buf);
            let f = Frame::Datagram {
                assoc,
                dest: dest.clone(),
                data: b"q",
            };
            encode_frame(&mut w, &f).unwrap();
            assert_eq!(w.len(), datagram_frame_len(assoc, &dest, 1));
            let n = w.len();
            buf[..n].to_vec()
        };
        // Association 0 is the original 0x09 frame, byte for byte (older peers).
        let legacy = encode(0);
        assert_eq!(legacy[0], FRAME_DATAGRAM);
        let tagged = encode(300);
        assert_eq!(tagged[0], FRAME_DATAGRAM_ASSOC);
        assert_eq!(&tagged[1..3], &[0x41, 0x2c]); // varint 300
        assert_eq!(&tagged[3..], &legacy[1..]);
        // An id beyond 32 bits is refused.
        let mut buf = [0u8; 64];
        let mut w = Writer::new(&mut buf);
        w.put_u8(FRAME_DATAGRAM_ASSOC).unwrap();
        w.put_varint(1 << 32).unwrap();
        dest.encode(&mut w).unwrap();
        w.put_varint(0).unwrap();
        let n = w.len();
        assert_eq!(
            parse_frame(&mut Reader::new(&buf[..n])),
            Err(FrameError::ValueTooLarge)
        );
    }

    #[test]
    fn truncated_and_unknown_frames_error() {
        assert_eq!(
            parse_frame(&mut Reader::new(&[0x7f])),
            Err(FrameError::UnknownFrameType(0x7f))
        );
        assert_eq!(
            parse_frame(&mut Reader::new(&[FRAME_STREAM, 0, 0, 5, 1, 2])),
            Err(FrameError::Truncated)
        );
        assert_eq!(
            parse_frame(&mut Reader::new(&[FRAME_CLOSE, 0, 65])),
            Err(FrameError::CloseTextTooLong)
        );
    }
}
