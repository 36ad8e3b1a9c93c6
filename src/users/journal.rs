//! The append-only journal beside the state file: one line per [`Change`], written in batches
//! that each end with a checksummed commit line, fsynced before any change of the batch is
//! acknowledged.
//!
//! Layout (`<state>.journal`, text, one record per line):
//!
//! ```text
//! H {"format":"ostp-journal","version":1,"snapshot_seq":41,"users":3}
//! R 42 {"op":"create","key":"…","name":null,"limit_bytes":null,"created_at":1700000000}
//! R 43 {"op":"counters","key":"…","bytes_up":10,"bytes_down":20,"connections":1,"last_seen":…}
//! C 43 9f0c2b1d4e5a6f70
//! ```
//!
//! The header names the snapshot the journal continues (its `journal_seq`) and how many users
//! that snapshot held. `R` lines carry consecutive sequence numbers; a `C` line closes a batch
//! with its last sequence number and an FNV-1a 64 checksum of the batch's `R` lines. Recovery
//! applies only complete, checksummed batches: a torn or garbled tail (crash mid-append, a
//! failed write) is ignored, and a batch that does not continue the sequence is an error
//! (a lost acknowledged change is never skipped silently).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Change, UsersError};

/// Version of the journal layout.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_NAME: &str = "ostp-journal";

/// The journal that belongs to `state`: `<state>.journal`.
pub fn path_for(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".journal");
    state.with_file_name(name)
}

/// The first line of a journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// The `journal_seq` of the snapshot this journal continues.
    pub snapshot_seq: u64,
    /// How many users that snapshot held.
    pub users: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderLine {
    format: String,
    version: u32,
    #[serde(flatten)]
    header: Header,
}

/// FNV-1a 64: detects torn and garbled batches (not an adversarial checksum).
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The header line of a fresh journal (newline included).
pub fn encode_header(header: Header) -> Vec<u8> {
    let line = HeaderLine {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        header,
    };
    let mut out = b"H ".to_vec();
    // A struct of strings and integers always serialises.
    out.extend(serde_json::to_vec(&line).unwrap_or_default());
    out.push(b'\n');
    out
}

/// One batch as appended: `R` lines numbered from `first_seq`, then the commit line.
pub fn encode_batch<'a>(
    first_seq: u64,
    changes: impl IntoIterator<Item = &'a Change>,
) -> Result<(Vec<u8>, u64), serde_json::Error> {
    let mut out = Vec::new();
    let mut seq = first_seq;
    for change in changes {
        out.extend_from_slice(format!("R {seq} ").as_bytes());
        serde_json::to_writer(&mut out, change)?;
        out.push(b'\n');
        seq += 1;
    }
    let last = seq - 1;
    let sum = fnv1a(FNV_OFFSET, &out);
    out.extend_from_slice(format!("C {last} {sum:016x}\n").as_bytes());
    Ok((out, last))
}

/// What recovery found in a journal.
#[derive(Debug, Default, PartialEq)]
pub struct Recovered {
    pub header: Option<Header>,
    /// Committed changes after `skip_through`, in order, with their sequence numbers.
    pub changes: Vec<(u64, Change)>,
    /// The last committed sequence number (`skip_through` if none followed it).
    pub last_seq: u64,
    /// Committed changes in the file, including those not returned.
    pub committed: usize,
    /// Bytes ignored: a torn tail or garbled, uncommitted batches.
    pub ignored_bytes: usize,
}

/// Parses a journal. Batches whose changes are all `≤ skip_through` (already in the snapshot)
/// are checked but not returned. `Ok(None)` when the file does not exist.
pub fn read(path: &Path, skip_through: u64) -> Result<Option<Recovered>, UsersError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(UsersError::StateUnreadable {
                path: path.to_path_buf(),
                problem: format!("cannot be read: {e}"),
            });
        }
    };
    parse(&bytes, skip_through)
        .map(Some)
        .map_err(|problem| UsersError::StateUnreadable {
            path: path.to_path_buf(),
            problem,
        })
}

/// Recovery proper (pure; see [`read`]).
pub fn parse(bytes: &[u8], skip_through: u64) -> Result<Recovered, String> {
    let mut out = Recovered {
        last_seq: skip_through,
        ..Recovered::default()
    };
    if bytes.is_empty() {
        return Ok(out);
    }
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    out.ignored_bytes = bytes.len() - complete;
    let mut lines = bytes[..complete].split_inclusive(|&b| b == b'\n');
    let header = lines
        .next()
        .and_then(parse_header)
        .ok_or("the journal does not start with a valid header line")?;
    if header.snapshot_seq > skip_through {
        return Err(format!(
            "the journal continues snapshot {} but the state file is at {skip_through}: \
             the state file is older than its journal (restored from a backup?)",
            header.snapshot_seq
        ));
    }
    out.header = Some(header);
    let mut expected = header.snapshot_seq + 1;
    let mut batch: Vec<(u64, Change)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut sum = FNV_OFFSET;
    for line in lines {
        let text = &line[..line.len() - 1];
        if text.is_empty() {
            continue;
        }
        if let Some(rec) = parse_record(text) {
            sum = fnv1a(sum, line);
            batch_bytes += line.len();
            batch.push(rec);
            continue;
        }
        let committed = parse_commit(text)
            .is_some_and(|(last, s)| s == sum && batch.last().is_some_and(|(seq, _)| *seq == last));
        if !committed {
            // Garbage, or a commit line that does not match: drop the batch so far.
            out.ignored_bytes += batch_bytes + line.len();
        } else {
            let first = batch[0].0;
            let contiguous = batch.windows(2).all(|w| w[1].0 == w[0].0 + 1);
            if first != expected || !contiguous {
                return Err(format!(
                    "a committed batch starts at change {first} where change {expected} was expected: \
                     acknowledged changes are missing"
                ));
            }
            expected = batch[batch.len() - 1].0 + 1;
            out.committed += batch.len();
            out.changes
                .extend(batch.drain(..).filter(|(seq, _)| *seq > skip_through));
        }
        batch.clear();
        batch_bytes = 0;
        sum = FNV_OFFSET;
    }
    out.ignored_bytes += batch_bytes;
    out.last_seq = (expected - 1).max(skip_through);
    Ok(out)
}

fn parse_header(line: &[u8]) -> Option<Header> {
    let json = line.strip_prefix(b"H ")?;
    let h: HeaderLine = serde_json::from_slice(json).ok()?;
    (h.format == FORMAT_NAME && h.version == FORMAT_VERSION).then_some(h.header)
}

fn parse_record(text: &[u8]) -> Option<(u64, Change)> {
    let rest = text.strip_prefix(b"R ")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let seq = std::str::from_utf8(&rest[..space]).ok()?.parse().ok()?;
    let change: Change = serde_json::from_slice(&rest[space + 1..]).ok()?;
    Some((seq, change))
}

fn parse_commit(text: &[u8]) -> Option<(u64, u64)> {
    let rest = std::str::from_utf8(text.strip_prefix(b"C ")?).ok()?;
    let (last, sum) = rest.split_once(' ')?;
    Some((last.parse().ok()?, u64::from_str_radix(sum, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(k: &str) -> Change {
        Change::Create {
            key: k.into(),
            name: None,
            limit_bytes: Some(5),
            created_at: 1,
            settings: Default::default(),
        }
    }

    fn journal(snapshot_seq: u64, batches: &[&[Change]]) -> Vec<u8> {
        let mut out = encode_header(Header {
            snapshot_seq,
            users: 0,
        });
        let mut seq = snapshot_seq + 1;
        for b in batches {
            let (bytes, last) = encode_batch(seq, b.iter()).unwrap();
            out.extend(bytes);
            seq = last + 1;
        }
        out
    }

    const A: &str = "aaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbb";

    #[test]
    fn round_trip_and_skip_what_the_snapshot_holds() {
        let del = Change::Delete { key: A.into() };
        let j = journal(10, &[&[create(A), create(B)], std::slice::from_ref(&del)]);
        let r = parse(&j, 10).unwrap();
        assert_eq!(
            r.changes,
            vec![(11, create(A)), (12, create(B)), (13, del.clone())]
        );
        assert_eq!((r.last_seq, r.ignored_bytes), (13, 0));
        // A snapshot written at 12 (crash before the journal was replaced): only 13 is new.
        let r = parse(&j, 12).unwrap();
        assert_eq!((r.changes, r.last_seq), (vec![(13, del)], 13));
    }

    #[test]
    fn a_torn_last_record_is_ignored_at_every_cut() {
        let full = journal(
            0,
            &[
                &[create(A)],
                &[
                    create(B),
                    Change::Reset {
                        key: A.into(),
                        at: None,
                    },
                ],
            ],
        );
        let first_batch_end = journal(0, &[&[create(A)]]).len();
        for cut in first_batch_end..full.len() {
            let r = parse(&full[..cut], 0).unwrap();
            assert_eq!(r.changes, vec![(1, create(A))], "cut at {cut}");
            assert_eq!(r.last_seq, 1);
            assert_eq!(r.ignored_bytes, cut - first_batch_end, "cut at {cut}");
        }
        assert_eq!(parse(&full, 0).unwrap().changes.len(), 3);
    }

    #[test]
    fn a_garbled_uncommitted_batch_is_dropped_and_later_batches_still_apply() {
        let mut j = journal(0, &[&[create(A)]]);
        j.extend_from_slice(b"R 2 {\"op\":\"create\",\"ke\0\0\0\0\0\n");
        j.extend_from_slice(b"\0\0\0\0\0\0\0\0\n");
        let (next, _) = encode_batch(2, [&create(B)]).unwrap();
        j.extend(next);
        let r = parse(&j, 0).unwrap();
        assert_eq!(r.changes, vec![(1, create(A)), (2, create(B))]);
        assert!(r.ignored_bytes > 0);
        // A record whose bytes changed after it was committed fails the checksum.
        let mut j = journal(0, &[&[create(A)], &[create(B)]]);
        let at = j.len() - 40;
        j[at] ^= 1;
        let r = parse(&j, 0).unwrap();
        assert_eq!(r.changes, vec![(1, create(A))]);
    }

    #[test]
    fn a_gap_in_committed_changes_is_an_error() {
        let mut j = journal(0, &[&[create(A)]]);
        let (later, _) = encode_batch(5, [&create(B)]).unwrap();
        j.extend(later);
        assert!(parse(&j, 0).unwrap_err().contains("missing"));
        // The journal is newer than the state file beside it.
        let j = journal(7, &[&[create(A)]]);
        assert!(parse(&j, 3).unwrap_err().contains("older than its journal"));
        // No header.
        let (only, _) = encode_batch(1, [&create(A)]).unwrap();
        assert!(parse(&only, 0).is_err());
    }
}
