//! Split routing on the client: which destinations bypass the tunnel (`exclude.ips`: CIDR ranges,
//! `exclude.domains`: name suffixes) and are connected directly. Pure: parsed once from the
//! config (and again on SIGHUP), then asked per connection.

use std::fmt;
use std::net::IpAddr;

/// An address range `addr/prefix` (IPv4 or IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why an `exclude` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExcludeError {
    /// Not `address` or `address/prefix`, or the prefix is longer than the address.
    BadCidr(String),
    /// Empty, or not a host name (labels of letters, digits, `-`, `_`).
    BadDomain(String),
}

impl fmt::Display for ExcludeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExcludeError::BadCidr(s) => write!(
                f,
                "{s:?} is not an address range; write e.g. \"10.0.0.0/8\", \"192.168.1.7\" or \"fd00::/8\""
            ),
            ExcludeError::BadDomain(s) => write!(
                f,
                "{s:?} is not a domain suffix; write e.g. \"example.com\" (matches it and its subdomains)"
            ),
        }
    }
}

impl std::error::Error for ExcludeError {}

impl Cidr {
    /// Parses `addr/prefix` or a bare address (a host: /32 or /128).
    pub fn parse(text: &str) -> Result<Cidr, ExcludeError> {
        let bad = || ExcludeError::BadCidr(text.to_string());
        let (addr, prefix) = match text.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// The range's first address and prefix length.
    pub fn network(&self) -> (IpAddr, u8) {
        let masked = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((bits & mask).into())
            }
        };
        (masked, self.prefix)
    }

    /// Whether `ip` is inside the range (an IPv4-mapped IPv6 address counts as its IPv4 one).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(
                u128::from(u32::from(net)),
                u128::from(u32::from(ip)),
                self.prefix,
                32,
            ),
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether the first `prefix` of `bits` bits of `a` and `b` agree.
fn prefix_eq(a: u128, b: u128, prefix: u8, bits: u32) -> bool {
    if prefix == 0 {
        return true;
    }
    let shift = bits - u32::from(prefix);
    (a >> shift) == (b >> shift)
}

/// The destinations that bypass the tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclude {
    ranges: Vec<Cidr>,
    /// Lower case, no leading or trailing dot.
    domains: Vec<String>,
}

impl Exclude {
    /// Parses the config's lists (`exclude.ips`, `exclude.domains`).
    pub fn new<'a>(
        ips: impl IntoIterator<Item = &'a str>,
        domains: impl IntoIterator<Item = &'a str>,
    ) -> Result<Exclude, ExcludeError> {
        let ranges = ips.into_iter().map(Cidr::parse).collect::<Result<_, _>>()?;
        let domains = domains
            .into_iter()
            .map(normalise_domain)
            .collect::<Result<_, _>>()?;
        Ok(Exclude { ranges, domains })
    }

    /// The address ranges.
    pub fn ranges(&self) -> &[Cidr] {
        &self.ranges
    }

    /// Whether any domain suffix is excluded (DNS answers are worth looking at).
    pub fn has_domains(&self) -> bool {
        !self.domains.is_empty()
    }

    /// Nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.domains.is_empty()
    }

    /// Whether connections to `ip` go direct.
    pub fn excludes_ip(&self, ip: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    /// Whether connections to the host name `name` go direct: it is one of the suffixes or a
    /// subdomain of one (`example.com` matches `example.com` and `a.example.com`, not
    /// `badexample.com`). Case and a trailing dot are ignored.
    pub fn excludes_domain(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        self.domains.iter().any(|d| {
            name.len() >= d.len() && {
                let (head, tail) = name.split_at(name.len() - d.len());
                tail.eq_ignore_ascii_case(d) && (head.is_empty() || head.ends_with('.'))
            }
        })
    }
}

fn normalise_domain(text: &str) -> Result<String, ExcludeError> {
    let bad = || ExcludeError::BadDomain(text.to_string());
    let d = text.trim().trim_start_matches('.');
    let d = d.strip_suffix('.').unwrap_or(d);
    if d.is_empty() || d.len() > 253 {
        return Err(bad());
    }
    for label in d.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_match_by_prefix_in_both_families() {
        let e = Exclude::new(["10.0.0.0/8", "192.168.1.7", "fd00::/8"], []).unwrap();
        assert!(e.excludes_ip(ip("10.255.1.2")));
        assert!(!e.excludes_ip(ip("11.0.0.1")));
        assert!(e.excludes_ip(ip("192.168.1.7")));
        assert!(!e.excludes_ip(ip("192.168.1.8")));
        assert!(e.excludes_ip(ip("fd12:3456::1")));
        assert!(!e.excludes_ip(ip("fe80::1")));
        // An IPv4-mapped IPv6 address is judged as its IPv4 address; families never mix.
        assert!(e.excludes_ip(ip("::ffff:10.1.2.3")));
        assert!(!e.excludes_ip(ip("::a01:203")));
        let all = Exclude::new(["0.0.0.0/0"], []).unwrap();
        assert!(all.excludes_ip(ip("8.8.8.8")) && !all.excludes_ip(ip("2001:db8::1")));
        let host6 = Exclude::new(["2001:db8::1"], []).unwrap();
        assert!(host6.excludes_ip(ip("2001:db8::1")) && !host6.excludes_ip(ip("2001:db8::2")));
    }

    #[test]
    fn bad_ranges_are_refused_with_the_entry() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "x",
        ] {
            assert_eq!(
                Exclude::new([bad], []),
                Err(ExcludeError::BadCidr(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn domains_match_themselves_and_subdomains_only() {
        let e = Exclude::new([], ["Example.COM.", ".lan"]).unwrap();
        assert!(e.excludes_domain("example.com"));
        assert!(e.excludes_domain("www.EXAMPLE.com."));
        assert!(!e.excludes_domain("badexample.com"));
        assert!(!e.excludes_domain("example.com.evil"));
        assert!(!e.excludes_domain("com"));
        assert!(e.excludes_domain("printer.lan"));
        assert!(!e.excludes_domain("lanparty"));
        for bad in ["", ".", "a..b", "exa mple.com", "ex/ample"] {
            assert!(
                matches!(Exclude::new([], [bad]), Err(ExcludeError::BadDomain(_))),
                "{bad:?}"
            );
        }
        assert!(Exclude::new([], []).unwrap().is_empty());
    }
}
