//! The server's token table: every registered session token to its session slot and packet
//! number, in one open-addressing array of 12-byte buckets sized for its load (Robin Hood
//! linear probing), not a power-of-two hash map (about 64 entries per idle session).

/// What a registered token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TokenEntry {
    /// Index in `ServerEndpoint::slots` (never [`FREE`]: sessions are capped far below).
    pub slot: u32,
    /// Low 16 bits of the packet number; the session's receive window (at most
    /// `packet::MAX_WINDOW` = 2^16 wide) restores the rest (`Session::rx_packet_number`).
    pub pn_low: u16,
}

/// The slot of an empty bucket.
const FREE: u32 = u32::MAX;

/// A token is kept as its high 48 bits: two registered tokens (PRF outputs) share them with
/// probability 2^-48 per pair (then the first registration wins, as for equal tokens, and the
/// other packet is lost once), and a datagram that is not ours matches one with about
/// 2^-48 per bucket compared (its AEAD then fails). 12 bytes a bucket, not 16.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Token bits 32..64 (they alone choose the home bucket).
    hi: u32,
    /// Token bits 16..32.
    mid: u16,
    pn_low: u16,
    slot: u32,
}

const EMPTY: Bucket = Bucket {
    hi: 0,
    mid: 0,
    pn_low: 0,
    slot: FREE,
};

/// The parts of `token` a bucket keeps.
fn key(token: u64) -> (u32, u16) {
    ((token >> 32) as u32, (token >> 16) as u16)
}

impl Bucket {
    fn new(token: u64, entry: TokenEntry) -> Bucket {
        let (hi, mid) = key(token);
        Bucket {
            hi,
            mid,
            pn_low: entry.pn_low,
            slot: entry.slot,
        }
    }

    fn is_free(&self) -> bool {
        self.slot == FREE
    }

    fn holds(&self, (hi, mid): (u32, u16)) -> bool {
        self.hi == hi && self.mid == mid
    }

    fn entry(&self) -> TokenEntry {
        TokenEntry {
            slot: self.slot,
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
/// about 3x the time they take at 60-80 %.
#[derive(Debug, Default)]
pub(super) struct TokenTable {
    buckets: Box<[Bucket]>,
    len: usize,
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

impl TokenTable {
    /// Number of registered tokens.
    pub fn len(&self) -> usize {
        self.len
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
        let mut i = home(key.0, self.buckets.len());
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
        debug_assert_ne!(entry.slot, FREE);
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
        let key = (carried.hi, carried.mid);
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

    fn resize(&mut self, buckets: usize) {
        let old = std::mem::replace(&mut self.buckets, vec![EMPTY; buckets].into_boxed_slice());
        self.len = 0;
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
    fn tokens_differing_only_in_their_low_16_bits_share_a_key_and_the_first_wins() {
        let mut table = TokenTable::default();
        let token = 0x1234_5678_9ABC_DEF0;
        table.insert(token, entry(1, 5));
        table.insert(token ^ 0xFFFF, entry(2, 6));
        assert_eq!(table.len(), 1);
        assert_eq!(table.get(token ^ 0x0F0F), Some(entry(1, 5)));
        // Any other of the 48 kept bits tells them apart.
        for bit in 16..64 {
            assert_eq!(table.get(token ^ (1 << bit)), None, "bit {bit}");
        }
        table.remove(token ^ 0xFFFF, entry(2, 6));
        assert_eq!(table.get(token), Some(entry(1, 5)));
    }

    #[test]
    fn a_bucket_is_12_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 12);
    }

    #[test]
    fn a_token_equal_to_the_empty_bucket_pattern_is_found() {
        let mut table = TokenTable::default();
        table.insert(0, entry(0, 0));
        assert_eq!(table.get(0), Some(entry(0, 0)));
        assert_eq!(table.get(1 << 16), None);
    }

    #[test]
    fn holds_64_000_tokens_in_under_1_mb_and_frees_them_all() {
        // 1,000 idle sessions register 64 tokens each: a power-of-two map with 7/8 load
        // needs 131,072 buckets of 17 bytes (2.2 MB) for them; 16-byte buckets took 1.31 MB.
        let mut table = TokenTable::default();
        let all: Vec<u64> = tokens(3).take(64_000).collect();
        for (i, &t) in all.iter().enumerate() {
            table.insert(t, entry(i as u32 / 64, i as u32 % 64));
        }
        assert_eq!(table.len(), 64_000);
        assert!(
            table.heap_bytes() <= 1_000_000,
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
}
