//! A listen address of `sauna.toml`: `"ip:port"`, `"[v6]:port"` or `"unix:/absolute/path"`, parsed
//! once at load into a [`Listen`] that the web front binds, the upgrade hands over and `emit
//! nginx` proxies to. Host names are refused: the socket is bound without DNS, so a name would
//! only fail later, at bind. Binding belongs to the HTTP front and the metrics server.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with its NUL).
pub const MAX_UNIX_SOCKET_PATH: usize = 107;

/// A parsed listen address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Listen {
    /// A TCP address; port 0 lets the kernel choose.
    Tcp(SocketAddr),
    /// A Unix stream socket at an absolute path.
    Unix(PathBuf),
}

impl Listen {
    /// True when the two addresses cannot both be bound: the same address, or the same port
    /// where one side is a wildcard (`0.0.0.0`, `[::]`) that already covers the other.
    pub fn conflicts_with(&self, other: &Listen) -> bool {
        match (self, other) {
            (Listen::Unix(a), Listen::Unix(b)) => a == b,
            (Listen::Tcp(a), Listen::Tcp(b)) => tcp_conflict(*a, *b),
            _ => false,
        }
    }
}

/// See [`Listen::conflicts_with`]; port 0 asks the kernel for a fresh port each time, so it
/// never clashes.
pub(crate) fn tcp_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(address) => write!(f, "{address}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Why a listen address was refused; the text says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ListenError(String);

impl FromStr for Listen {
    type Err = ListenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: &str| {
            Err(ListenError(format!(
                "invalid listen address \"{text}\": {why}; expected \"host:port\", \"[v6]:port\" or \"unix:/absolute/path\""
            )))
        };
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return fail("a Unix socket path must be absolute");
            }
            if path.len() > MAX_UNIX_SOCKET_PATH {
                return fail(&format!(
                    "a Unix socket path can be at most {MAX_UNIX_SOCKET_PATH} bytes, this one has {}",
                    path.len()
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let (ip, port) = if let Some(rest) = text.strip_prefix('[') {
            let Some((v6, port)) = rest.split_once("]:") else {
                return fail("an IPv6 address in brackets must be followed by \":port\"");
            };
            match v6.parse::<std::net::Ipv6Addr>() {
                Ok(ip) => (IpAddr::V6(ip), port),
                Err(_) => return fail(&format!("\"{v6}\" is not an IPv6 address")),
            }
        } else {
            let Some((host, port)) = text.rsplit_once(':') else {
                return fail("the port is missing");
            };
            if host.contains(':') {
                return fail("write an IPv6 address in brackets, e.g. \"[::1]:8000\"");
            }
            if host.is_empty() {
                return fail("the host is missing; write \"0.0.0.0:PORT\" for every interface");
            }
            match host.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => (IpAddr::V4(ip), port),
                Err(_) => {
                    return fail(&format!(
                        "\"{host}\" is not an IP address (the socket is bound without DNS; write \"127.0.0.1\" for localhost)"
                    ));
                }
            }
        };
        match port.parse::<u16>() {
            Ok(port) => Ok(Listen::Tcp(SocketAddr::new(ip, port))),
            Err(_) => fail(&format!("\"{port}\" is not a port number from 0 to 65535")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str, port: u16) -> Listen {
        Listen::Tcp(SocketAddr::new(ip.parse().unwrap(), port))
    }

    #[test]
    fn the_three_forms_parse() {
        assert_eq!("127.0.0.1:8000".parse(), Ok(tcp("127.0.0.1", 8000)));
        assert_eq!("[::1]:8000".parse(), Ok(tcp("::1", 8000)));
        assert_eq!(
            "unix:/run/app.sock".parse(),
            Ok(Listen::Unix(PathBuf::from("/run/app.sock")))
        );
        assert_eq!(tcp("::1", 8000).to_string(), "[::1]:8000");
        assert_eq!(tcp("0.0.0.0", 80).to_string(), "0.0.0.0:80");
    }

    #[test]
    fn mistakes_are_explained() {
        let error = |text: &str| text.parse::<Listen>().unwrap_err().to_string();
        assert!(error("8000").contains("the port is missing"));
        assert!(error(":8000").contains("0.0.0.0:PORT"));
        assert!(error("::1:8000").contains("in brackets"));
        assert!(error("[::1]").contains("followed by \":port\""));
        assert!(error("127.0.0.1:99999").contains("not a port number"));
        assert!(error("unix:run/app.sock").contains("must be absolute"));
        assert!(error(&format!("unix:/{}", "x".repeat(120))).contains("at most 107 bytes"));
        assert!(error("my host:80").contains("\"my host\" is not an IP address"));
        assert!(error("localhost:80").contains("write \"127.0.0.1\" for localhost"));
        assert!(error("[fe80::zz]:80").contains("not an IPv6 address"));
    }

    #[test]
    fn wildcards_clash_with_every_host_on_their_port() {
        assert!(tcp("0.0.0.0", 80).conflicts_with(&tcp("127.0.0.1", 80)));
        assert!(tcp("::1", 80).conflicts_with(&tcp("::", 80)));
        assert!(!tcp("127.0.0.1", 80).conflicts_with(&tcp("127.0.0.2", 80)));
        assert!(!tcp("127.0.0.1", 0).conflicts_with(&tcp("127.0.0.1", 0)));
        assert!(!tcp("127.0.0.1", 80).conflicts_with(&tcp("127.0.0.1", 81)));
    }
}
