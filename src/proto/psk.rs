//! Access key → 256-bit pre-shared key, and the per-user keys derived from it.
//!
//! An access key is 16–64 URL-safe characters `[A-Za-z0-9_-]`. Its bytes are split into two
//! zero-padded 32-byte halves `K1 = key[0..32]`, `K2 = key[32..64]`, and
//! `PSK = HChaCha20(K1, "ostpPSKa" || len) XOR HChaCha20(K2, "ostpPSKb" || len)` when the key is
//! longer than 32 bytes, or just the first term otherwise (XOR of two independently keyed PRFs is a
//! PRF as long as either key is secret; the length in the input removes padding ambiguity).

use super::crypto::{Key32, label, prf_labeled};

/// Minimum access key length in characters.
pub const ACCESS_KEY_MIN: usize = 16;
/// Maximum access key length in characters.
pub const ACCESS_KEY_MAX: usize = 64;

/// Why an access key was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessKeyError {
    /// Shorter than 16 or longer than 64 characters.
    BadLength(usize),
    /// Contains a character outside `[A-Za-z0-9_-]`.
    BadCharacter,
}

impl std::fmt::Display for AccessKeyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccessKeyError::BadLength(n) => {
                write!(
                    f,
                    "access key must be {ACCESS_KEY_MIN}-{ACCESS_KEY_MAX} characters, got {n}"
                )
            }
            AccessKeyError::BadCharacter => {
                write!(f, "access key may only contain A-Z a-z 0-9 _ -")
            }
        }
    }
}

impl std::error::Error for AccessKeyError {}

/// A user's pre-shared key plus the two per-user keys the handshake needs.
#[derive(Clone)]
pub struct UserKeys {
    /// The PSK itself (input to the reply and session key derivations).
    pub psk: Key32,
    /// Key of the PRF that produces hello lookup tags.
    pub tag_key: Key32,
    /// XChaCha20-Poly1305 key of the client hello.
    pub hello_key: Key32,
}

impl std::fmt::Debug for UserKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UserKeys(..)")
    }
}

impl UserKeys {
    /// Derives all keys of a user from the access key.
    pub fn from_access_key(access_key: &str) -> Result<Self, AccessKeyError> {
        let psk = derive_psk(access_key)?;
        Ok(Self::from_psk(psk))
    }

    /// Derives the per-user keys from a PSK.
    pub fn from_psk(psk: Key32) -> Self {
        UserKeys {
            tag_key: prf_labeled(&psk, label::TAG_KEY, 0),
            hello_key: prf_labeled(&psk, label::HELLO_KEY, 0),
            psk,
        }
    }
}

/// Checks the access key alphabet and length.
pub fn validate_access_key(access_key: &str) -> Result<(), AccessKeyError> {
    let n = access_key.len();
    if !(ACCESS_KEY_MIN..=ACCESS_KEY_MAX).contains(&n) {
        return Err(AccessKeyError::BadLength(n));
    }
    if !access_key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(AccessKeyError::BadCharacter);
    }
    Ok(())
}

/// Access key → PSK (see the module docs for the construction).
pub fn derive_psk(access_key: &str) -> Result<Key32, AccessKeyError> {
    validate_access_key(access_key)?;
    let bytes = access_key.as_bytes();
    let len = bytes.len() as u64;
    let mut k1 = [0u8; 32];
    let mut k2 = [0u8; 32];
    let first = bytes.len().min(32);
    k1[..first].copy_from_slice(&bytes[..first]);
    let mut psk = prf_labeled(&k1, label::PSK_A, len);
    if bytes.len() > 32 {
        k2[..bytes.len() - 32].copy_from_slice(&bytes[32..]);
        let second = prf_labeled(&k2, label::PSK_B, len);
        for (a, b) in psk.iter_mut().zip(second) {
            *a ^= b;
        }
    }
    Ok(psk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_length_and_alphabet() {
        assert_eq!(
            validate_access_key("short"),
            Err(AccessKeyError::BadLength(5))
        );
        assert_eq!(
            validate_access_key(&"a".repeat(65)),
            Err(AccessKeyError::BadLength(65))
        );
        assert_eq!(
            validate_access_key("abcdefghijklmnop+"),
            Err(AccessKeyError::BadCharacter)
        );
        assert!(validate_access_key("abcdefgh-_KLMNOP0123").is_ok());
    }

    #[test]
    fn every_character_matters_including_the_second_half() {
        let base = "A".repeat(64);
        let p = derive_psk(&base).unwrap();
        let mut changed = base.clone().into_bytes();
        changed[63] = b'B';
        assert_ne!(
            p,
            derive_psk(std::str::from_utf8(&changed).unwrap()).unwrap()
        );
        // Length is absorbed: a 32-char key differs from the same key extended.
        assert_ne!(
            derive_psk(&"A".repeat(32)).unwrap(),
            derive_psk(&"A".repeat(33)).unwrap()
        );
        assert_ne!(
            derive_psk(&"A".repeat(16)).unwrap(),
            derive_psk(&"A".repeat(17)).unwrap()
        );
    }
}
