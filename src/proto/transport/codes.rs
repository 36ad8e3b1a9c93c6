//! Wire reason codes: why a session closed, why a stream was reset, how a stream open ended.

/// Why a session was closed (CLOSE frame reason byte, or a local cause).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// Orderly close requested by the application.
    Normal,
    /// The endpoint is shutting down.
    Shutdown,
    /// A user limit (traffic quota, expiry, connection count) was reached.
    LimitReached,
    /// The user was deleted or disabled.
    UserDeleted,
    /// The peer violated the protocol (bad frame, flow-control overrun, ...).
    ProtocolViolation,
    /// Nothing was received for the idle timeout (local only, never sent).
    IdleTimeout,
    /// Internal error.
    Internal,
    /// A code this implementation does not know.
    Other(u8),
}

impl CloseReason {
    pub fn code(self) -> u8 {
        match self {
            CloseReason::Normal => 0,
            CloseReason::Shutdown => 1,
            CloseReason::LimitReached => 2,
            CloseReason::UserDeleted => 3,
            CloseReason::ProtocolViolation => 4,
            CloseReason::IdleTimeout => 5,
            CloseReason::Internal => 6,
            CloseReason::Other(c) => c,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            0 => CloseReason::Normal,
            1 => CloseReason::Shutdown,
            2 => CloseReason::LimitReached,
            3 => CloseReason::UserDeleted,
            4 => CloseReason::ProtocolViolation,
            5 => CloseReason::IdleTimeout,
            6 => CloseReason::Internal,
            c => CloseReason::Other(c),
        }
    }
}

/// Why a stream was aborted (RESET_STREAM reason byte). Codes 16..=21 report a failed open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResetReason {
    /// The application cancelled the stream.
    Cancelled,
    /// The remote destination connection broke (e.g. TCP RST).
    ConnectionReset,
    /// A timeout at the application level.
    Timeout,
    /// A stream-level protocol error.
    ProtocolError,
    /// The open failed (server answered with this result).
    OpenFailed(OpenResult),
    /// The session closed while the stream was active (local only).
    SessionClosed,
    /// A code this implementation does not know.
    Other(u8),
}

impl ResetReason {
    pub fn code(self) -> u8 {
        match self {
            ResetReason::Cancelled => 0,
            ResetReason::ConnectionReset => 1,
            ResetReason::Timeout => 2,
            ResetReason::ProtocolError => 3,
            ResetReason::SessionClosed => 4,
            ResetReason::OpenFailed(r) => 16 + r.code(),
            ResetReason::Other(c) => c,
        }
    }

    pub fn from_code(code: u8) -> Self {
        match code {
            0 => ResetReason::Cancelled,
            1 => ResetReason::ConnectionReset,
            2 => ResetReason::Timeout,
            3 => ResetReason::ProtocolError,
            4 => ResetReason::SessionClosed,
            17..=21 => ResetReason::OpenFailed(OpenResult::from_code(code - 16)),
            c => ResetReason::Other(c),
        }
    }
}

impl std::fmt::Display for ResetReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResetReason::Cancelled => f.write_str("cancelled"),
            ResetReason::ConnectionReset => f.write_str("destination connection reset"),
            ResetReason::Timeout => f.write_str("timeout"),
            ResetReason::ProtocolError => f.write_str("stream protocol error"),
            ResetReason::OpenFailed(result) => write!(f, "open failed: {result}"),
            ResetReason::SessionClosed => f.write_str("session closed"),
            ResetReason::Other(code) => write!(f, "reset code {code}"),
        }
    }
}

/// Outcome of a stream open, as answered by the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpenResult {
    Ok,
    Refused,
    Unreachable,
    DnsFailure,
    NotAllowed,
    Timeout,
}

impl OpenResult {
    pub fn code(self) -> u8 {
        match self {
            OpenResult::Ok => 0,
            OpenResult::Refused => 1,
            OpenResult::Unreachable => 2,
            OpenResult::DnsFailure => 3,
            OpenResult::NotAllowed => 4,
            OpenResult::Timeout => 5,
        }
    }

    /// Unknown codes map to `Refused`.
    pub fn from_code(code: u8) -> Self {
        match code {
            0 => OpenResult::Ok,
            2 => OpenResult::Unreachable,
            3 => OpenResult::DnsFailure,
            4 => OpenResult::NotAllowed,
            5 => OpenResult::Timeout,
            _ => OpenResult::Refused,
        }
    }
}

impl std::fmt::Display for OpenResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OpenResult::Ok => "ok",
            OpenResult::Refused => "refused",
            OpenResult::Unreachable => "destination unreachable",
            OpenResult::DnsFailure => "name resolution failed",
            OpenResult::NotAllowed => "destination not allowed",
            OpenResult::Timeout => "timeout",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_roundtrip() {
        for c in 0..=255u8 {
            assert_eq!(CloseReason::from_code(c).code(), c);
            let r = ResetReason::from_code(c);
            assert_eq!(r.code(), c, "{r:?}");
        }
        assert_eq!(
            ResetReason::from_code(ResetReason::OpenFailed(OpenResult::DnsFailure).code()),
            ResetReason::OpenFailed(OpenResult::DnsFailure)
        );
    }
}
