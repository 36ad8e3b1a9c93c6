//! A fast, deterministic hash map for protocol-internal ids (session tokens, user numbers, stream
//! ids, and tuples of them): no per-process random key, so simulations replay identically from a
//! seed.

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
