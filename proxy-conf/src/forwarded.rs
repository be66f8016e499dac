//! `[web].forwarded_allow_ips`: the proxies whose `X-Forwarded-For`/`-Proto` the web front
//! believes, parsed once at load from `"*"`, IP addresses and CIDR networks. The front asks
//! [`Forwarders::trusts`] for each request's peer; `emit nginx` asks it whether nginx's own
//! address is covered. Reading the headers belongs to the front.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One entry of `forwarded_allow_ips`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrustedPeer {
    /// `"*"`: every peer.
    Any,
    /// An address (`prefix` absent) or a CIDR network.
    Network {
        /// The address or network base, as written.
        ip: IpAddr,
        /// The prefix length after `/`, when one was written.
        prefix: Option<u8>,
    },
}

impl TrustedPeer {
    /// True when `ip` is this peer or inside this network.
    fn covers(self, ip: IpAddr) -> bool {
        let TrustedPeer::Network {
            ip: network,
            prefix,
        } = self
        else {
            return true;
        };
        match (network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let bits = u32::from(prefix.unwrap_or(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let bits = u32::from(prefix.unwrap_or(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why an entry was refused; the text says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not an IP address, a CIDR like \"10.0.0.0/8\", or \"*\"")]
pub struct TrustedPeerError(String);

impl FromStr for TrustedPeer {
    type Err = TrustedPeerError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "*" {
            return Ok(TrustedPeer::Any);
        }
        let invalid = || TrustedPeerError(text.to_owned());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let ip = address.parse::<IpAddr>().map_err(|_| invalid())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => Some(
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|bits| *bits <= max)
                    .ok_or_else(invalid)?,
            ),
            None => None,
        };
        Ok(TrustedPeer::Network { ip, prefix })
    }
}

impl fmt::Display for TrustedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrustedPeer::Any => f.write_str("*"),
            TrustedPeer::Network { ip, prefix: None } => write!(f, "{ip}"),
            TrustedPeer::Network {
                ip,
                prefix: Some(bits),
            } => write!(f, "{ip}/{bits}"),
        }
    }
}

/// The proxies whose `X-Forwarded-*` headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarders(pub Vec<TrustedPeer>);

impl Forwarders {
    /// True when `ip` is an allowed proxy. An IPv4 peer seen on an IPv6 socket
    /// (`::ffff:10.0.0.1`) is judged by its IPv4 address.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|peer| peer.covers(ip))
    }

    /// The entries as `sauna.toml` spells them, for messages.
    pub fn entries(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarders(entries: &[&str]) -> Forwarders {
        Forwarders(entries.iter().map(|entry| entry.parse().unwrap()).collect())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn entries_cover_addresses_and_networks() {
        let v4 = ip("127.0.0.1");
        let v6 = ip("::1");
        assert!(forwarders(&["*"]).trusts(v4));
        assert!(forwarders(&["127.0.0.1"]).trusts(v4));
        assert!(forwarders(&["127.0.0.0/8"]).trusts(v4));
        assert!(forwarders(&["0.0.0.0/0"]).trusts(v4));
        assert!(!forwarders(&["10.0.0.0/8"]).trusts(v4));
        assert!(!forwarders(&["127.0.0.1"]).trusts(v6));
        assert!(forwarders(&["::1"]).trusts(v6));
        assert!(forwarders(&["::/0"]).trusts(v6));
        assert!(!forwarders(&[]).trusts(v4));
    }

    #[test]
    fn a_mapped_ipv4_peer_is_judged_as_ipv4() {
        let trusted = forwarders(&["127.0.0.1", "fd00::/8"]);
        assert!(trusted.trusts(ip("::ffff:127.0.0.1")));
        assert!(trusted.trusts(ip("fd12::1")));
        assert!(!trusted.trusts(ip("10.1.2.3")));
    }

    #[test]
    fn mistakes_are_refused_and_entries_print_as_written() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "nope",
            " 10.0.0.1",
            "10.0.0.0/x",
            "",
        ] {
            let error = bad.parse::<TrustedPeer>().unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("\"{bad}\" is not an IP address, a CIDR like \"10.0.0.0/8\", or \"*\"")
            );
        }
        assert_eq!(
            forwarders(&["*", "10.0.0.0/8", "::1", "10.0.0.1/32"]).entries(),
            ["*", "10.0.0.0/8", "::1", "10.0.0.1/32"]
        );
    }
}
