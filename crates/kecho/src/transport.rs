//! Which transports a node speaks, how its address says so, and which one a dialler picks: pure, no I/O.
//!
//! A node's address (in its `Hello`, its channel snapshots and the registry) is a list of the endpoints it listens
//! on, separated by commas: `HOST:PORT` for TCP (plain or TLS, as the node is configured), `quic://HOST:PORT` for
//! QUIC. A TCP-only node's address is its `HOST:PORT` alone, as before QUIC existed, so older nodes and tools read it
//! unchanged. A dialler picks QUIC when both nodes speak it and TCP otherwise; with nothing in common it refuses
//! with a reason naming both sides.

use std::fmt;
use std::net::SocketAddr;

/// The transports a node's links use ([`crate::NodeBuilder::transport`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transport {
    /// TCP links (TLS over TCP when the node is configured for TLS). The default.
    #[default]
    Tcp,
    /// QUIC links (UDP), one connection per pair of nodes; TLS 1.3 is part of QUIC.
    Quic,
    /// Listens on both; dials QUIC to nodes that speak it, TCP to the others.
    Both,
}

impl Transport {
    /// The node listens and dials over TCP.
    pub fn tcp(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Both)
    }

    /// The node listens and dials over QUIC.
    pub fn quic(self) -> bool {
        matches!(self, Transport::Quic | Transport::Both)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
            Transport::Both => "both",
        })
    }
}

/// A transport name that is not `tcp`, `quic` or `both`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown transport {0:?} (tcp, quic or both)")]
pub struct UnknownTransport(pub String);

impl std::str::FromStr for Transport {
    type Err = UnknownTransport;
    fn from_str(s: &str) -> Result<Self, UnknownTransport> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "quic" => Ok(Transport::Quic),
            "both" => Ok(Transport::Both),
            other => Err(UnknownTransport(other.to_owned())),
        }
    }
}

/// A node cannot dial a peer: they have no transport in common.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no transport in common: this node speaks {mine}, the peer's address is {addr:?}")]
pub(crate) struct NoCommonTransport {
    /// What this node speaks.
    pub(crate) mine: Transport,
    /// The peer's advertised address.
    pub(crate) addr: String,
}

const QUIC_SCHEME: &str = "quic://";

/// The address a node advertises, for `transport` listening at `addr` (one port number for both transports: TCP
/// and UDP ports are separate spaces).
pub(crate) fn advertise(transport: Transport, addr: SocketAddr) -> String {
    match transport {
        Transport::Tcp => addr.to_string(),
        Transport::Quic => format!("{QUIC_SCHEME}{addr}"),
        Transport::Both => format!("{addr},{QUIC_SCHEME}{addr}"),
    }
}

/// How to reach a node, as its address says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Endpoints<'a> {
    pub(crate) tcp: Option<&'a str>,
    pub(crate) quic: Option<&'a str>,
}

/// Reads an advertised address (unknown schemes are ignored: a newer node may speak more).
pub(crate) fn endpoints(addr: &str) -> Endpoints<'_> {
    let mut e = Endpoints { tcp: None, quic: None };
    for part in addr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some(q) = part.strip_prefix(QUIC_SCHEME) {
            e.quic.get_or_insert(q);
        } else if !part.contains("://") {
            e.tcp.get_or_insert(part);
        }
    }
    e
}

/// The transport and address a node speaking `mine` uses to dial a node advertising `addr`.
pub(crate) fn pick(mine: Transport, addr: &str) -> Result<(Transport, &str), NoCommonTransport> {
    let e = endpoints(addr);
    match (e.quic, e.tcp) {
        (Some(q), _) if mine.quic() => Ok((Transport::Quic, q)),
        (_, Some(t)) if mine.tcp() => Ok((Transport::Tcp, t)),
        _ => Err(NoCommonTransport { mine, addr: addr.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mine: Transport, addr: &str, want: Result<(Transport, &str), ()>) {
        assert_eq!(pick(mine, addr).map_err(|_| ()), want, "{mine} dialling {addr:?}");
    }

    #[test]
    fn dialler_picks_what_both_speak() {
        let a: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let (tcp, quic, both) =
            (advertise(Transport::Tcp, a), advertise(Transport::Quic, a), advertise(Transport::Both, a));
        assert_eq!(tcp, "10.0.0.1:7000");
        check(Transport::Tcp, &tcp, Ok((Transport::Tcp, "10.0.0.1:7000")));
        check(Transport::Tcp, &quic, Err(()));
        check(Transport::Tcp, &both, Ok((Transport::Tcp, "10.0.0.1:7000")));
        check(Transport::Quic, &tcp, Err(()));
        check(Transport::Quic, &quic, Ok((Transport::Quic, "10.0.0.1:7000")));
        check(Transport::Quic, &both, Ok((Transport::Quic, "10.0.0.1:7000")));
        check(Transport::Both, &tcp, Ok((Transport::Tcp, "10.0.0.1:7000")));
        check(Transport::Both, &quic, Ok((Transport::Quic, "10.0.0.1:7000")));
        check(Transport::Both, &both, Ok((Transport::Quic, "10.0.0.1:7000")));
    }

    #[test]
    fn unknown_schemes_and_blanks_are_ignored() {
        assert_eq!(endpoints(" shm://x , host:1,,quic://h:2"), Endpoints { tcp: Some("host:1"), quic: Some("h:2") });
        assert_eq!(endpoints(""), Endpoints { tcp: None, quic: None });
        let e = pick(Transport::Both, "shm://x").unwrap_err();
        assert_eq!(e, NoCommonTransport { mine: Transport::Both, addr: "shm://x".into() });
        assert!(e.to_string().contains("no transport in common"), "{e}");
    }

    #[test]
    fn transport_names_round_trip() {
        for t in [Transport::Tcp, Transport::Quic, Transport::Both] {
            assert_eq!(t.to_string().parse::<Transport>(), Ok(t));
        }
        assert!("udp".parse::<Transport>().is_err());
    }
}
