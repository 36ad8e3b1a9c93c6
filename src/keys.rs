//! Access keys and API tokens: generation (getrandom), validation, masking for logs and
//! constant-time comparison. Nothing else in the crate formats or compares secrets by hand.

use std::fmt;

/// Shortest accepted access key (characters).
pub const MIN_KEY_LEN: usize = 16;
/// Longest accepted access key (characters).
pub const MAX_KEY_LEN: usize = 64;
/// How many leading characters of a secret may appear in logs (at most a quarter of it).
pub const LOG_PREFIX_LEN: usize = 8;
/// Shortest accepted API token when the API listens on a non-loopback address.
pub const MIN_REMOTE_TOKEN_LEN: usize = 16;
/// Longest accepted API token (it must fit in a request head with room to spare).
pub const MAX_TOKEN_LEN: usize = 1024;

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

/// Why a string is not a usable API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not printable ASCII (a space counts as printable, other controls and non-ASCII do not).
    BadCharacter(char),
    /// Starts or ends with a space: header parsing trims it, so it could never match.
    EdgeSpace,
    /// Shorter than the minimum for where the API listens.
    TooShort {
        len: usize,
        min: usize,
    },
    TooLong(usize),
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::BadCharacter(c) => write!(
                f,
                "contains {c:?}; a token must be printable ASCII (codes 0x20-0x7e)"
            ),
            TokenError::EdgeSpace => write!(
                f,
                "starts or ends with a space; HTTP clients and servers strip those, so it could never authenticate"
            ),
            TokenError::TooShort { len, min } => write!(
                f,
                "is {len} characters long; an API reachable from other machines needs a token of at least {min} characters \
                 (`ostp --init` writes a 64-character random one)"
            ),
            TokenError::TooLong(n) => {
                write!(
                    f,
                    "is {n} characters long; at most {MAX_TOKEN_LEN} are allowed"
                )
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// Checks a non-empty API token: printable ASCII without edge spaces, at most
/// [`MAX_TOKEN_LEN`] characters, and at least [`MIN_REMOTE_TOKEN_LEN`] unless `loopback_only`.
pub fn validate_token(token: &str, loopback_only: bool) -> Result<(), TokenError> {
    if let Some(c) = token.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(TokenError::BadCharacter(c));
    }
    if token.starts_with(' ') || token.ends_with(' ') {
        return Err(TokenError::EdgeSpace);
    }
    let len = token.len();
    if len > MAX_TOKEN_LEN {
        return Err(TokenError::TooLong(len));
    }
    if !loopback_only && len < MIN_REMOTE_TOKEN_LEN {
        return Err(TokenError::TooShort {
            len,
            min: MIN_REMOTE_TOKEN_LEN,
        });
    }
    Ok(())
}

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

/// The loggable form of a secret: its first characters — at most [`LOG_PREFIX_LEN`] and at
/// most a quarter of it, so a short secret shows little or nothing — followed by `…`.
pub fn mask(secret: &str) -> String {
    let shown = LOG_PREFIX_LEN.min(secret.chars().count() / 4);
    let prefix: String = secret.chars().take(shown).collect();
    format!("{prefix}…")
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
    fn mask_never_shows_more_than_a_quarter_or_eight_characters() {
        assert_eq!(mask("c8a6fde902b4e23910cde882b7cf1612"), "c8a6fde9…");
        assert_eq!(mask(&"é".repeat(40)), format!("{}…", "é".repeat(8)));
        // Short secrets (tokens of 8 characters or fewer used to be logged in full).
        assert_eq!(mask("abc"), "…");
        assert_eq!(mask("x"), "…");
        assert_eq!(mask("12345678"), "12…");
        assert_eq!(mask("0123456789abcdef"), "0123…");
        assert_eq!(mask(""), "…");
    }

    #[test]
    fn token_validation() {
        assert!(
            validate_token("x", true).is_ok(),
            "short is fine on loopback"
        );
        assert!(validate_token("sekret with inner space!~", false).is_ok());
        assert_eq!(
            validate_token("x", false),
            Err(TokenError::TooShort { len: 1, min: 16 })
        );
        assert_eq!(
            validate_token(&"a".repeat(15), false),
            Err(TokenError::TooShort { len: 15, min: 16 })
        );
        assert!(validate_token(&"a".repeat(16), false).is_ok());
        assert_eq!(
            validate_token(" 0123456789abcdef", true),
            Err(TokenError::EdgeSpace)
        );
        assert_eq!(
            validate_token("0123456789abcdef ", false),
            Err(TokenError::EdgeSpace)
        );
        assert_eq!(
            validate_token("0123456789abcdéf", false),
            Err(TokenError::BadCharacter('é'))
        );
        assert_eq!(
            validate_token("0123456789\tabcdef", true),
            Err(TokenError::BadCharacter('\t'))
        );
        assert_eq!(
            validate_token(&"a".repeat(1025), true),
            Err(TokenError::TooLong(1025))
        );
        let msg = validate_token("short", false).unwrap_err().to_string();
        assert!(
            !msg.contains("short"),
            "the message must not echo the token: {msg}"
        );
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"token", b"token"));
        assert!(!ct_eq(b"token", b"tokem"));
        assert!(!ct_eq(b"token", b"token2"));
        assert!(ct_eq(b"", b""));
    }
}
