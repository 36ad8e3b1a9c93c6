//! Resolver tickets: who asked for a DNS lookup, typed, and which incarnation of that owner.
//!
//! A lookup cannot be cancelled (`getaddrinfo`), so its answer may arrive after the owner is gone
//! and its slot reused. Every ticket carries a loop-wide, never-repeating serial number; the owner
//! keeps the ticket it was issued and accepts an answer only when the whole ticket matches. The
//! serial is a plain `u64` (no atomics; wrapping would take 584,000 years at a million lookups per
//! second), and nothing is packed into bit fields, so no value of it can change the owner's kind
//! or index (the bug of the former `generation << 32 | index` tokens).

/// What kind of owner a ticket belongs to; each loop routes answers by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketKind {
    /// Server: a tunnel stream's outbound TCP connection (index = outbound slab index).
    Outbound,
    /// Server: a datagram waiting in a session's UDP relay (index = relay slab index).
    Relay,
    /// Client: the server's host name for a session slot (index = slot index).
    ServerName,
    /// Client: an excluded destination's name, connected directly (index = local connection).
    Direct,
}

/// One lookup's claim ticket, returned unchanged with its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub kind: TicketKind,
    /// The owner's index in its table.
    pub index: usize,
    /// Unique per issued ticket within one loop.
    pub serial: u64,
}

/// Issues tickets with never-repeating serial numbers. One per loop.
#[derive(Debug, Default)]
pub struct TicketIssuer {
    next: u64,
}

impl TicketIssuer {
    pub fn new() -> Self {
        Self::default()
    }

    /// An issuer whose first serial is `first` (tests start near the old packing limits).
    pub fn starting_at(first: u64) -> Self {
        TicketIssuer { next: first }
    }

    /// A fresh ticket for the owner `kind`/`index`.
    pub fn issue(&mut self, kind: TicketKind, index: usize) -> Ticket {
        let serial = self.next;
        self.next = self.next.wrapping_add(1);
        Ticket {
            kind,
            index,
            serial,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_past_the_old_32_bit_packing_keep_kind_and_index() {
        // The former server token `generation << 32 | index` set bit 63 (the relay bit) once the
        // generation reached 2^31, routing every hostname CONNECT answer to the relay pool.
        let mut issuer = TicketIssuer::starting_at(u64::from(u32::MAX) - 2);
        for i in 0..8 {
            let t = issuer.issue(TicketKind::Outbound, usize::MAX - i);
            assert_eq!(t.kind, TicketKind::Outbound);
            assert_eq!(t.index, usize::MAX - i);
            assert_eq!(t.serial, u64::from(u32::MAX) - 2 + i as u64);
        }
        let last = issuer.issue(TicketKind::Relay, 0);
        assert_eq!((last.kind, last.index), (TicketKind::Relay, 0));
    }

    #[test]
    fn a_reissued_owner_never_matches_an_older_ticket() {
        let mut issuer = TicketIssuer::starting_at(u64::MAX - 1);
        let old = issuer.issue(TicketKind::Relay, 3);
        let new = issuer.issue(TicketKind::Relay, 3); // same slot, next owner
        let wrapped = issuer.issue(TicketKind::Relay, 3);
        assert_ne!(old, new);
        assert_ne!(new, wrapped);
        assert_ne!(old, wrapped);
    }
}
