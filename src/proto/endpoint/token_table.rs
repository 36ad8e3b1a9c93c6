//! The server's token table: every registered session token to its session slot and packet
//! number, in one open-addressing array of 8-byte buckets sized for its load (Robin Hood
//! linear probing), not a power-of-two hash map (about 64 entries per idle session).

/// What a registered token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenEntry {
    /// Index in `ServerEndpoint::slots`, below [`MAX_SLOTS`].
    pub slot: u32,
    /// Low 16 bits of the packet number; the session's receive window (at most
    /// `packet::MAX_WINDOW` = 2^16 wide) restores the rest (`Session::rx_packet_number`).
    pub pn_low: u16,
}

/// The slot of an empty bucket.
const FREE: u16 = u16::MAX;

/// Session slots a bucket can name (`0..MAX_SLOTS`): the endpoint holds at most this many
/// datagram sessions at once.
pub(super) const MAX_SLOTS: usize = FREE as usize;

/// A token is kept as its high 32 bits: two registered tokens (PRF outputs) share them with
/// probability 2^-32 per pair (then the first registration wins, as for equal tokens, and the
/// other packet is lost once: with the 64,000 tokens of 1,000 idle sessions, one token in
/// 67,000 is shadowed), and a datagram that is not ours matches one with about 2^-32 per
/// bucket compared (its AEAD then fails). 8 bytes a bucket (was 12 with 48 key bits and a
/// 32-bit slot: 0.33 KB more per idle session).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Token bits 32..64 (they also choose the home bucket).
    hi: u32,
    pn_low: u16,
    slot: u16,
}

const EMPTY: Bucket = Bucket {
    hi: 0,
    pn_low: 0,
    slot: FREE,
};

/// The part of `token` a bucket keeps.
fn key(token: u64) -> u32 {
    (token >> 32) as u32
}

impl Bucket {
    fn new(token: u64, entry: TokenEntry) -> Bucket {
        debug_assert!((entry.slot as usize) < MAX_SLOTS);
        Bucket {
            hi: key(token),
            pn_low: entry.pn_low,
            slot: entry.slot as u16,
        }
    }

    fn is_free(&self) -> bool {
        self.slot == FREE
    }

    fn holds(&self, hi: u32) -> bool {
        self.hi == hi
    }

    fn entry(&self) -> TokenEntry {
        TokenEntry {
            slot: u32::from(self.slot),
            pn_low: self.pn_low,
        }
    }
}

/// Smallest non-empty table.
const MIN_BUCKETS: usize = 16;

/// A set of tokens with their entries. Grows when more than 80 % of the buckets are full,
/// shrinks when fewer than 30 % are, and after either holds its entries at 60 % load (a
/// power-of-two map can be half empty). Higher loads make the clusters that an insertion or a
/// removal shifts long: at 70-85 % a received packet's lookup, insertion and removal took
/// about 3x the time they take at 60-80 %. Once a burst of new sessions is over, the endpoint
/// [compacts](TokenTable::compact) it to [`COMPACT_LOAD`]: the growth to 60 % otherwise leaves
/// a third more buckets than entries behind (1,000 idle sessions: 0.2 MB).
#[derive(Debug, Default)]
pub(super) struct TokenTable {
    buckets: Box<[Bucket]>,
    len: usize,
    /// Resizes so far (wrapping): how the endpoint tells a table that stopped growing.
    resizes: u32,
}

/// The bucket where a token's probe starts: a range reduction of its high 32 bits (`hi`) to
/// any table size. Registered tokens are PRF outputs, uniform without mixing; a peer can choose
/// only the tokens it looks up, and a lookup stops within the run it lands in (Robin Hood order).
fn home(hi: u32, buckets: usize) -> usize {
    // `buckets` < 2^32, so the product fits and the result is below `buckets`.
    ((u64::from(hi) * buckets as u64) >> 32) as usize
}

/// Buckets needed to hold `len` entries at 60 % load.
fn buckets_for(len: usize) -> usize {
    (len * 10 / 6 + 1).max(MIN_BUCKETS)
}

/// Load, in percent, that [`TokenTable::compact`] leaves: below the 80 % that makes the table
/// grow, so a few more sessions (20 per 1,000 held) still fit without a resize.
pub(super) const COMPACT_LOAD: usize = 78;
/// [`TokenTable::compact`] resizes only a table at most this full (percent): the rebuild
/// moves every entry, so it is worth it only when it frees a sixth of the buckets or more.
const COMPACT_BELOW: usize = 65;

impl TokenTable {
    /// Number of registered tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Resizes so far (wrapping; any change means the table grew, shrank or was compacted).
    pub fn resizes(&self) -> u32 {
        self.resizes
    }

    /// Heap bytes held by the table (memory accounting, tests).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.buckets)
    }

    fn next(&self, i: usize) -> usize {
        if i + 1 == self.buckets.len() {
            0
        } else {
            i + 1
        }
    }

    /// How far bucket `i` is from the home of a token whose high 32 bits are `hi` (it holds one).
    fn distance(&self, i: usize, hi: u32) -> usize {
        let home = home(hi, self.buckets.len());
        if i >= home {
            i - home
        } else {
            i + self.buckets.len() - home
        }
    }

    /// Index of the bucket holding `token`'s key. Stops at an empty bucket or at one closer to
    /// its home than `token` would be there (Robin Hood order), so misses are as short as hits.
    fn find(&self, token: u64) -> Option<usize> {
        if self.buckets.is_empty() {
            return None;
        }
        let key = key(token);
        let mut i = home(key, self.buckets.len());
        let mut dist = 0;
        loop {
            let bucket = self.buckets[i];
            if bucket.is_free() || self.distance(i, bucket.hi) < dist {
                return None;
            }
            if bucket.holds(key) {
                return Some(i);
            }
            dist += 1;
            i = self.next(i);
        }
    }

    /// The entry registered for `token`.
    pub fn get(&self, token: u64) -> Option<TokenEntry> {
        self.find(token).map(|i| self.buckets[i].entry())
    }

    /// Registers `token` unless its key is registered already (the first registration wins).
    pub fn insert(&mut self, token: u64, entry: TokenEntry) {
        if (self.len + 1) * 5 > self.buckets.len() * 4 {
            if self.find(token).is_some() {
                return;
            }
            self.resize(buckets_for(self.len + 1));
        }
        self.place(Bucket::new(token, entry));
    }

    /// Puts `carried` into its Robin Hood position (unless its key is there already).
    fn place(&mut self, mut carried: Bucket) {
        let key = carried.hi;
        let mut i = home(carried.hi, self.buckets.len());
        let mut dist = 0;
        let mut displaced = false;
        loop {
            let bucket = self.buckets[i];
            if bucket.is_free() {
                self.buckets[i] = carried;
                self.len += 1;
                return;
            }
            if !displaced && bucket.holds(key) {
                return;
            }
            let theirs = self.distance(i, bucket.hi);
            if theirs < dist {
                // Past this point `key` cannot be registered (a lookup would stop here).
                self.buckets[i] = carried;
                carried = bucket;
                dist = theirs;
                displaced = true;
            }
            dist += 1;
            i = self.next(i);
        }
    }

    /// Unregisters `token` if it stands for `entry` (a token another session registered first
    /// stays).
    pub fn remove(&mut self, token: u64, entry: TokenEntry) {
        let Some(mut i) = self.find(token) else {
            return;
        };
        if self.buckets[i].entry() != entry {
            return;
        }
        // Backward shift: pull the rest of the run one bucket closer to home.
        loop {
            let n = self.next(i);
            let following = self.buckets[n];
            if following.is_free() || self.distance(n, following.hi) == 0 {
                break;
            }
            self.buckets[i] = following;
            i = n;
        }
        self.buckets[i] = EMPTY;
        self.len -= 1;
        if self.len * 10 < self.buckets.len() * 3
            && (self.buckets.len() > MIN_BUCKETS || self.len == 0)
        {
            self.resize(if self.len == 0 {
                0
            } else {
                buckets_for(self.len)
            });
        }
    }

    /// Gives back the slack a growth left (a table at most [`COMPACT_BELOW`] % full is rebuilt
    /// at [`COMPACT_LOAD`] %). Meant for after a burst of new sessions: a table that keeps
    /// growing or shrinking resizes itself. Returns whether it was rebuilt.
    pub fn compact(&mut self) -> bool {
        let buckets = self.buckets.len();
        if self.len == 0 || self.len * 100 > buckets * COMPACT_BELOW {
            return false;
        }
        let target = (self.len * 100 / COMPACT_LOAD + 1).max(MIN_BUCKETS);
        if target >= buckets {
            return false;
        }
        self.resize(target);
        true
    }

    fn resize(&mut self, buckets: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; buckets].into_boxed_slice());
        self.len = 0;
        self.resizes = self.resizes.wrapping_add(1);
        for bucket in old.iter().filter(|b| !b.is_free()) {
            self.place(*bucket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(slot: u32, pn: u32) -> TokenEntry {
        TokenEntry {
            slot,
            pn_low: pn as u16,
        }
    }

    /// A deterministic token stream (splitmix64).
    fn tokens(seed: u64) -> impl Iterator<Item = u64> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    }

    #[test]
    fn matches_a_hash_map_through_inserts_and_removes() {
        let mut table = TokenTable::default();
        let mut model = HashMap::new();
        let all: Vec<u64> = tokens(7).take(4000).collect();
        // Interleave: insert a token, and remove the one inserted 1,000 steps before (a
        // sliding window), with some removals asking for the wrong entry.
        for (i, &t) in all.iter().enumerate() {
            let e = entry(i as u32 % 97, i as u32);
            table.insert(t, e);
            model.entry(t).or_insert(e);
            if i >= 1000 {
                let old = all[i - 1000];
                let wrong = i % 5 == 0;
                let asked = if wrong {
                    entry(1_000_000, 0)
                } else {
                    entry((i - 1000) as u32 % 97, (i - 1000) as u32)
                };
                table.remove(old, asked);
                if model.get(&old) == Some(&asked) {
                    model.remove(&old);
                }
            }
            assert_eq!(table.len(), model.len());
        }
        for &t in &all {
            assert_eq!(table.get(t), model.get(&t).copied());
        }
        for t in tokens(99).take(1000) {
            assert_eq!(table.get(t), None);
        }
    }

    #[test]
    fn the_first_registration_of_a_token_wins() {
        let mut table = TokenTable::default();
        table.insert(42, entry(1, 5));
        table.insert(42, entry(2, 6));
        assert_eq!(table.get(42), Some(entry(1, 5)));
        table.remove(42, entry(2, 6));
        assert_eq!(table.get(42), Some(entry(1, 5)));
        table.remove(42, entry(1, 5));
        assert_eq!(table.get(42), None);
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn tokens_differing_only_in_their_low_32_bits_share_a_key_and_the_first_wins() {
        let mut table = TokenTable::default();
        let token = 0x1234_5678_9ABC_DEF0;
        table.insert(token, entry(1, 5));
        table.insert(token ^ 0xFFFF_FFFF, entry(2, 6));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(token ^ 0x0F0F_0F0F), Some(entry(1, 5)));
        // Any other of the 32 kept bits tells them apart.
        for bit in 32..64 {
            assert_eq!(table.get(token ^ (1 << bit)), None, "bit {bit}");
        }
        table.remove(token ^ 0xFFFF_FFFF, entry(2, 6));
        assert_eq!(table.get(token), Some(entry(1, 5)));
    }

    #[test]
    fn a_bucket_is_8_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
    }

    #[test]
    fn the_highest_slot_round_trips() {
        let mut table = TokenTable::default();
        let last = MAX_SLOTS as u32 - 1;
        table.insert(7 << 32, entry(last, 0xFFFF));
        assert_eq!(table.get(7 << 32), Some(entry(last, 0xFFFF)));
    }

    #[test]
    fn a_token_equal_to_the_empty_bucket_pattern_is_found() {
        let mut table = TokenTable::default();
        table.insert(0, entry(0, 0));
        assert_eq!(table.get(0), Some(entry(0, 0)));
        assert_eq!(table.get(1 << 32), None);
    }

    #[test]
    fn holds_64_000_tokens_in_under_0_66_mb_once_compacted_and_frees_them_all() {
        // 1,000 idle sessions register 64 tokens each: a power-of-two map with 7/8 load
        // needs 131,072 buckets of 17 bytes (2.2 MB) for them; 16-byte buckets took 1.31 MB,
        // 12-byte ones 0.98-1.31 MB (78 % or 60 % full, depending on when the last growth was).
        let mut table = TokenTable::default();
        let all: Vec<u64> = tokens(3).take(64_000).collect();
        for (i, &t) in all.iter().enumerate() {
            table.insert(t, entry(i as u32 / 64, i as u32 % 64));
        }
        assert_eq!(table.len(), 64_000);
        assert!(
            table.heap_bytes() <= 880_000,
            "{} bytes",
            table.heap_bytes()
        );
        // Grown to 60 % load at 49,152 entries... and compacted only when that slack is there.
        let grown = table.heap_bytes();
        let compacted = table.compact();
        assert_eq!(compacted, grown > 64_000 * 8 * 100 / COMPACT_BELOW);
        assert!(
            table.heap_bytes() <= 660_000,
            "{} bytes",
            table.heap_bytes()
        );
        for (i, &t) in all.iter().enumerate() {
            assert_eq!(table.get(t), Some(entry(i as u32 / 64, i as u32 % 64)));
        }
        for (i, &t) in all.iter().enumerate() {
            table.remove(t, entry(i as u32 / 64, i as u32 % 64));
        }
        assert_eq!(table.len(), 0);
        assert_eq!(table.heap_bytes(), 0);
    }

    #[test]
    fn compaction_rebuilds_a_table_grown_past_its_contents_and_keeps_every_entry() {
        let mut table = TokenTable::default();
        let all: Vec<u64> = tokens(11).take(10_000).collect();
        for (i, &t) in all.iter().enumerate() {
            table.insert(t, entry(i as u32 % 500, i as u32));
        }
        // Half of them go (a burst of sessions that ended): 30-60 % full, no shrink yet.
        for (i, &t) in all.iter().enumerate().take(5_000) {
            table.remove(t, entry(i as u32 % 500, i as u32));
        }
        let before = table.heap_bytes();
        assert!(table.len() * 100 <= before / 8 * COMPACT_BELOW);
        assert!(table.compact());
        let buckets = table.heap_bytes() / 8;
        assert!(buckets < before / 8);
        assert!(
            (COMPACT_LOAD - 1..=COMPACT_LOAD).contains(&(table.len() * 100 / buckets)),
            "{} of {buckets}",
            table.len()
        );
        // Nothing more to give back; a compacted table still grows when it must.
        assert!(!table.compact());
        for (i, &t) in all.iter().enumerate() {
            let expected = (i >= 5_000).then(|| entry(i as u32 % 500, i as u32));
            assert_eq!(table.get(t), expected);
        }
        for t in tokens(12).take(500) {
            table.insert(t, entry(1, 1));
        }
        assert_eq!(table.len(), 5_500);
        assert!(table.len() * 100 <= table.heap_bytes() / 8 * 80);
        assert!(!TokenTable::default().compact());
    }
}
