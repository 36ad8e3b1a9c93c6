//! Maps for protocol-internal ids (session tokens, user numbers, stream ids, and tuples of
//! them): a fast, deterministic hash map (no per-process random key, so simulations replay
//! identically from a seed), and a sorted map for ids issued in increasing order (no hash slack).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Multiplier of each word's mixing step (FxHash's 64-bit constant).
const WORD_K: u64 = 0x517C_C1B7_2722_0A95;

/// Hasher for keys that are already uniformly random (PRF tokens) or small counters: each word
/// is folded in with a rotate-xor-multiply (so tuple keys such as `(session, stream)` mix their
/// fields in order: `(1, 2)` and `(2, 1)` differ), then one multiply-xorshift spreads the high
/// bits into the low ones. No per-process key is needed because attackers cannot choose the keys
/// (tokens are PRF outputs; stream ids are sequential and bounded by the stream limits).
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(26) ^ word).wrapping_mul(WORD_K);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

/// A map from ids issued in increasing order (session ids) to values, as one sorted `Vec`:
/// inserting the newest id appends, a lookup is a binary search, a removal leaves a tombstone
/// (shifting the entries after it cost 42 µs per removal at 65,535 sessions, 1.5 s for a
/// shutdown that closes them oldest first), and the tombstones are swept out in one pass once
/// they outnumber the live entries (amortised O(1) per removal). It holds its entries without a
/// hash map's slack (a power-of-two table with up to 1/8 empty is half empty just past a power
/// of two: 1,001 sessions took 2,048 buckets), and gives back room when it empties. Ids may also
/// arrive out of order (then the insertion shifts).
#[derive(Debug, Clone)]
pub(crate) struct SortedIdMap<K, V> {
    /// Sorted by key; `None` is a removed entry's tombstone.
    entries: Vec<(K, Option<V>)>,
    live: usize,
}

impl<K, V> Default for SortedIdMap<K, V> {
    fn default() -> Self {
        SortedIdMap {
            entries: Vec::new(),
            live: 0,
        }
    }
}

impl<K: Ord + Copy, V> SortedIdMap<K, V> {
    fn find(&self, key: &K) -> Result<usize, usize> {
        match self.entries.last() {
            // The common case, a new id: past every entry.
            Some((last, _)) if last < key => Err(self.entries.len()),
            _ => self.entries.binary_search_by(|(k, _)| k.cmp(key)),
        }
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().and_then(|i| self.entries[i].1.as_ref())
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.find(key).ok().and_then(|i| self.entries[i].1.as_mut())
    }

    /// Inserts or replaces; returns the value replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => {
                let old = self.entries[i].1.replace(value);
                if old.is_none() {
                    self.live += 1;
                }
                old
            }
            Err(i) => {
                self.entries.insert(i, (key, Some(value)));
                self.live += 1;
                None
            }
        }
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.find(key).ok()?;
        let value = self.entries[i].1.take()?;
        self.live -= 1;
        if self.entries.len() - self.live > self.live.max(8) {
            self.entries.retain(|(_, v)| v.is_some());
            // Fewer than a quarter of the room used: keep twice the entries (a map that
            // emptied after a burst does not keep its peak).
            if self.entries.len() * 4 < self.entries.capacity() && self.entries.capacity() > 16 {
                self.entries.shrink_to(self.entries.len() * 2);
            }
        }
        Some(value)
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        (self.entries.iter()).filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    /// Bytes of room held (memory accounting, tests).
    #[cfg(test)]
    fn room_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<(K, Option<V>)>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::{BuildHasher, Hash};

    fn hash<T: Hash>(v: &T) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(v)
    }

    #[test]
    fn tuple_keys_mix_their_fields_in_order() {
        assert_ne!(hash(&(1u64, 2u64)), hash(&(2u64, 1u64)));
        assert_ne!(hash(&(5u64, 5u64)), hash(&(0u64, 0u64)));
        // A grid of (session, stream) pairs: every key hashes differently, and the low bits
        // (the bucket index of a small table) spread over the buckets.
        let mut all = HashSet::new();
        let mut buckets = vec![0u32; 1024];
        for session in 0..64u64 {
            for stream in (0..256u64).step_by(4) {
                let h = hash(&(session, stream));
                assert!(all.insert(h), "({session}, {stream}) collides");
                buckets[(h & 1023) as usize] += 1;
            }
        }
        // 4,096 keys over 1,024 buckets: about 4 each; a weak mix piles them up.
        assert!(
            buckets.iter().all(|&n| n <= 16),
            "{:?}",
            buckets.iter().max()
        );
    }

    #[test]
    fn a_sorted_id_map_matches_a_hash_map_through_inserts_and_removes() {
        let mut sorted: SortedIdMap<u64, u64> = SortedIdMap::default();
        let mut model: IdMap<u64, u64> = IdMap::default();
        // Increasing ids (as sessions are numbered), some out of order, and removals anywhere.
        for i in 0..3000u64 {
            let key = if i % 97 == 0 { i / 2 } else { i };
            assert_eq!(sorted.insert(key, i), model.insert(key, i));
            if i % 3 == 0 {
                let gone = (i * 7919) % (i + 1);
                assert_eq!(sorted.remove(&gone), model.remove(&gone));
            }
            assert_eq!(sorted.len(), model.len());
        }
        for key in 0..3100u64 {
            assert_eq!(sorted.get(&key), model.get(&key));
        }
        if let Some(v) = sorted.get_mut(&2999) {
            *v = 7;
        }
        assert_eq!(sorted.get(&2999), Some(&7));
        let keys: Vec<u64> = sorted.keys().copied().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "in key order");
        assert_eq!(keys.len(), sorted.iter().count());
    }

    #[test]
    fn removals_oldest_first_leave_tombstones_that_are_swept_in_bulk() {
        let mut m: SortedIdMap<u64, u64> = SortedIdMap::default();
        for id in 0..10_000u64 {
            m.insert(id, id);
        }
        for id in 0..9_000u64 {
            assert_eq!(m.remove(&id), Some(id));
            assert_eq!(m.remove(&id), None, "a tombstone is not an entry");
            // Never more tombstones than live entries (and 8): the sweeps keep lookups short.
            assert!(m.entries.len() - m.len() <= m.len().max(8), "at {id}");
        }
        assert_eq!(m.len(), 1_000);
        assert_eq!(m.get(&8_999), None);
        assert_eq!(m.insert(8_999, 1), None, "a tombstone's key can come back");
        assert_eq!(m.len(), 1_001);
        assert_eq!(m.iter().count(), 1_001);
        assert_eq!(m.keys().next(), Some(&8_999));
    }

    #[test]
    fn a_sorted_id_map_holds_1001_entries_in_1024_and_gives_room_back() {
        // A 48-byte value with a niche, as the server loop's session record has (its `Vec` and
        // `IpAddr`): a tombstone costs no room.
        type Value = (std::num::NonZeroU64, [u8; 40]);
        let mut m: SortedIdMap<u64, Value> = SortedIdMap::default();
        for id in 1..=1001u64 {
            m.insert(id, (std::num::NonZeroU64::MIN, [0; 40]));
        }
        // A hash map of these 56-byte entries took 2,048 buckets (116,768 bytes).
        assert!(m.room_bytes() <= 1024 * 56, "{}", m.room_bytes());
        for id in 1..=990u64 {
            m.remove(&id);
        }
        assert_eq!(m.len(), 11);
        assert!(m.room_bytes() <= 64 * 56, "{}", m.room_bytes());
    }

    #[test]
    fn maps_keyed_by_tuples_find_every_entry() {
        let mut m: IdMap<(u64, u64), u64> = IdMap::default();
        for a in 0..100u64 {
            for b in 0..100u64 {
                m.insert((a, b), a * 1000 + b);
            }
        }
        assert_eq!(m.len(), 10_000);
        assert!((0..100u64).all(|a| (0..100u64).all(|b| m[&(a, b)] == a * 1000 + b)));
    }
}
