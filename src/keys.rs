//! Access keys and API tokens: generation (getrandom), validation, masking for logs and
//! constant-time comparison. Nothing else in the crate formats or compares secrets by hand.

use std::fmt;

/// Shortest accepted access key (characters).
pub const MIN_KEY_LEN: usize = 16;
/// Longest accepted access key (characters).
pub const MAX_KEY_LEN: usize = 64;
/// How many leading characters of a secret may appear in logs.
pub const LOG_PREFIX_LEN: usize = 8;

/// Why a string is not a valid access key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    TooShort(usize),
    TooLong(usize),
    BadCharacter(char),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::TooShort(n) => write!(
                f,
                "access key is {n} characters long; it must be {MIN_KEY_LEN}-{MAX_KEY_LEN} characters of [A-Za-z0-9_-]"
            ),
            KeyError::TooLong(n) => write!(
                f,
                "access key is {n} characters long; it must be {MIN_KEY_LEN}-{MAX_KEY_LEN} characters of [A-Za-z0-9_-]"
            ),
            KeyError::BadCharacter(c) => write!(
                f,
                "access key contains {c:?}; only the characters [A-Za-z0-9_-] are allowed"
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// The OS random source failed (practically never; reported instead of panicking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomError(pub String);

impl fmt::Display for RandomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the operating system's random source failed: {}", self.0)
    }
}

impl std::error::Error for RandomError {}

/// Fills `buf` from the operating system's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::fill(buf).map_err(|e| RandomError(e.to_string()))
}

fn random_hex(bytes: usize) -> Result<String, RandomError> {
    let mut buf = vec![0u8; bytes];
    fill_random(&mut buf)?;
    Ok(to_hex(&buf))
}

/// Lowercase hexadecimal encoding.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

/// A fresh access key: 16 bytes from the OS CSPRNG as 32 lowercase hex characters.
pub fn generate_key() -> Result<String, RandomError> {
    random_hex(16)
}

/// A fresh API token: 32 bytes from the OS CSPRNG as 64 lowercase hex characters.
pub fn generate_token() -> Result<String, RandomError> {
    random_hex(32)
}

/// Checks that `key` is 16–64 characters of `[A-Za-z0-9_-]` (UUIDs and generated keys fit).
pub fn validate_key(key: &str) -> Result<(), KeyError> {
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(KeyError::BadCharacter(c));
    }
    let n = key.len();
    if n < MIN_KEY_LEN {
        return Err(KeyError::TooShort(n));
    }
    if n > MAX_KEY_LEN {
        return Err(KeyError::TooLong(n));
    }
    Ok(())
}

/// The loggable form of a secret: at most its first 8 characters followed by `…`.
pub fn mask(secret: &str) -> String {
    let prefix: String = secret.chars().take(LOG_PREFIX_LEN).collect();
    if secret.chars().count() > LOG_PREFIX_LEN {
        format!("{prefix}…")
    } else {
        prefix
    }
}

/// Compares two byte strings in time that depends only on their lengths, never on where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= x ^ y;
    }
    // Keep the optimiser from turning the loop into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_32_lowercase_hex_and_valid() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_eq!(a.len(), 32);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
        validate_key(&a).unwrap();
        assert_eq!(generate_token().unwrap().len(), 64);
    }

    #[test]
    fn key_validation_bounds_and_alphabet() {
        assert!(validate_key("0123456789abcdef").is_ok());
        assert!(validate_key("550e8400-e29b-41d4-a716-446655440000").is_ok());
        assert!(validate_key(&"a".repeat(64)).is_ok());
        assert_eq!(validate_key("short"), Err(KeyError::TooShort(5)));
        assert_eq!(validate_key(&"a".repeat(65)), Err(KeyError::TooLong(65)));
        assert_eq!(
            validate_key("0123456789abcdef/"),
            Err(KeyError::BadCharacter('/'))
        );
        assert!(validate_key("0123456789abcdéf").is_err());
        assert!(validate_key("").is_err());
    }

    #[test]
    fn mask_never_shows_more_than_eight_characters() {
        assert_eq!(mask("c8a6fde902b4e23910cde882b7cf1612"), "c8a6fde9…");
        assert_eq!(mask("abc"), "abc");
        assert_eq!(mask("ééééééééééé"), "éééééééé…");
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"token", b"token"));
        assert!(!ct_eq(b"token", b"tokem"));
        assert!(!ct_eq(b"token", b"token2"));
        assert!(ct_eq(b"", b""));
    }
}
