//! The registry's lease table: the KECho paper's group server, without I/O.
//!
//! A channel's contact stores `(name -> channel id, contact node, address)` here as a lease that it renews; a dead
//! contact's lease expires. Another member may take the contact role over with a compare-and-set on the holder.
//! Only the holder may renew or remove an entry, and every claim after the first must carry the channel's secret, which
//! only members know: a node outside the channel cannot take over, overwrite or delete its entry, even knowing the
//! channel id and contact that lookups reveal.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::codec::{ClaimMode, Message, RegEntry, RegErrorCode, RegResult};
use crate::types::{ChannelId, ChannelSecret, NodeId, MAX_CHANNEL_NAME};

/// Shortest lease granted.
pub const MIN_TTL: Duration = Duration::from_millis(100);
/// Longest lease granted.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// Longest channel name accepted, in bytes (the same as [`MAX_CHANNEL_NAME`]).
pub const MAX_NAME: usize = MAX_CHANNEL_NAME;

#[derive(Clone, Debug)]
struct Lease {
    channel: ChannelId,
    contact: NodeId,
    addr: String,
    sources: u32,
    sinks: u32,
    expires: Instant,
    secret: ChannelSecret,
}

/// The table of live leases.
#[derive(Debug, Default)]
pub struct RegistryTable {
    entries: HashMap<String, Lease>,
}

impl RegistryTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers one registry request. Returns `None` for messages that are not registry requests.
    pub fn handle(&mut self, msg: &Message, now: Instant) -> Option<Message> {
        self.expire(now);
        let (req, result) = match msg {
            Message::RegClaim { req, name, channel, node, addr, ttl_ms, mode, sources, sinks, secret } => {
                let counts = (*sources, *sinks);
                (*req, self.claim(name, *channel, *node, addr, *ttl_ms, *mode, counts, *secret, now))
            }
            Message::RegLookup { req, name } => (
                *req,
                match self.entries.get(name) {
                    Some(l) => RegResult::Entry(entry(name, l, now)),
                    None => unknown(name),
                },
            ),
            Message::RegRemove { req, name, channel, node, secret } => (
                *req,
                match self.entries.get(name) {
                    None => RegResult::Ok,
                    Some(l) if l.channel == *channel && l.contact == *node && l.secret == *secret => {
                        self.entries.remove(name);
                        RegResult::Ok
                    }
                    Some(_) => not_contact(name),
                },
            ),
            Message::RegList { req } => {
                let mut list: Vec<RegEntry> = self.entries.iter().map(|(n, l)| entry(n, l, now)).collect();
                list.sort_by(|a, b| a.name.cmp(&b.name));
                (*req, RegResult::Entries(list))
            }
            _ => return None,
        };
        Some(Message::RegReply { req, result })
    }

    /// Drops leases that have expired by `now`.
    pub fn expire(&mut self, now: Instant) {
        self.entries.retain(|_, l| l.expires > now);
    }

    /// The live entries as of `now`, as `Renew` claims (with each lease's remaining time and the channel's secret)
    /// sorted by name: applying them to an empty table at the same `now` rebuilds this table. A replicated registry
    /// ships its state this way (a snapshot).
    pub fn export(&self, now: Instant) -> Vec<Message> {
        let mut names: Vec<&String> = self.entries.iter().filter(|(_, l)| l.expires > now).map(|(n, _)| n).collect();
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let l = &self.entries[name];
                Message::RegClaim {
                    req: 0,
                    name: name.clone(),
                    channel: l.channel,
                    node: l.contact,
                    addr: l.addr.clone(),
                    ttl_ms: l.expires.saturating_duration_since(now).as_millis().max(1) as u64,
                    mode: ClaimMode::Renew,
                    sources: l.sources,
                    sinks: l.sinks,
                    secret: l.secret,
                }
            })
            .collect()
    }

    /// Number of live entries (as of the last call that was given the time).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        name: &str,
        channel: ChannelId,
        node: NodeId,
        addr: &str,
        ttl_ms: u64,
        mode: ClaimMode,
        (sources, sinks): (u32, u32),
        secret: ChannelSecret,
        now: Instant,
    ) -> RegResult {
        if name.is_empty() || name.len() > MAX_NAME {
            return RegResult::Error {
                code: RegErrorCode::Invalid,
                message: format!("channel name must be 1 to {MAX_NAME} bytes"),
            };
        }
        if addr.is_empty() {
            return RegResult::Error { code: RegErrorCode::Invalid, message: "contact address is empty".into() };
        }
        let ttl = Duration::from_millis(ttl_ms).clamp(MIN_TTL, MAX_TTL);
        let fresh = Lease { channel, contact: node, addr: addr.to_owned(), sources, sinks, expires: now + ttl, secret };
        let allowed = match (self.entries.get(name), mode) {
            (None, _) => true,
            (Some(l), ClaimMode::Create) if l.secret != secret => false,
            (Some(l), _) if l.secret != secret => {
                return RegResult::Error {
                    code: RegErrorCode::NotContact,
                    message: format!("channel {name:?} is held by others: the claim lacks the channel's secret"),
                }
            }
            // A retried create by the same contact is not an error.
            (Some(l), ClaimMode::Create) => l.channel == channel && l.contact == node,
            (Some(l), ClaimMode::Renew) => l.channel == channel && l.contact == node,
            (Some(l), ClaimMode::Takeover(old)) => l.channel == channel && (l.contact == old || l.contact == node),
        };
        if !allowed {
            return match mode {
                ClaimMode::Create => {
                    RegResult::Error { code: RegErrorCode::Exists, message: format!("channel {name:?} exists already") }
                }
                _ => not_contact(name),
            };
        }
        self.entries.insert(name.to_owned(), fresh);
        RegResult::Entry(entry(name, &self.entries[name], now))
    }
}

fn entry(name: &str, l: &Lease, now: Instant) -> RegEntry {
    RegEntry {
        name: name.to_owned(),
        channel: l.channel,
        contact: l.contact,
        addr: l.addr.clone(),
        sources: l.sources,
        sinks: l.sinks,
        expires_in_ms: l.expires.saturating_duration_since(now).as_millis() as u64,
    }
}

fn unknown(name: &str) -> RegResult {
    RegResult::Error { code: RegErrorCode::UnknownChannel, message: format!("unknown channel {name:?}") }
}

fn not_contact(name: &str) -> RegResult {
    RegResult::Error {
        code: RegErrorCode::NotContact,
        message: format!("another node holds the contact role of channel {name:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: ChannelSecret = ChannelSecret(0x5ec2e7);

    fn claim(name: &str, ch: u64, node: u64, mode: ClaimMode) -> Message {
        claim_with(name, ch, node, mode, SECRET)
    }

    fn claim_with(name: &str, ch: u64, node: u64, mode: ClaimMode, secret: ChannelSecret) -> Message {
        Message::RegClaim {
            req: 1,
            name: name.into(),
            channel: ChannelId(ch),
            node: NodeId(node),
            addr: format!("127.0.0.1:{node}"),
            ttl_ms: 1000,
            mode,
            sources: 1,
            sinks: 2,
            secret,
        }
    }

    fn code(reply: Option<Message>) -> Option<RegErrorCode> {
        match reply {
            Some(Message::RegReply { result: RegResult::Error { code, .. }, .. }) => Some(code),
            Some(Message::RegReply { .. }) => None,
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn lease_lifecycle() {
        let t0 = Instant::now();
        let mut t = RegistryTable::new();
        assert_eq!(code(t.handle(&claim("a", 1, 10, ClaimMode::Create), t0)), None);
        assert_eq!(code(t.handle(&claim("a", 2, 11, ClaimMode::Create), t0)), Some(RegErrorCode::Exists));
        // Only the holder renews; a stranger is refused and the entry is untouched.
        assert_eq!(code(t.handle(&claim("a", 1, 11, ClaimMode::Renew), t0)), Some(RegErrorCode::NotContact));
        assert_eq!(code(t.handle(&claim("a", 1, 10, ClaimMode::Renew), t0)), None);
        // Takeover is a compare-and-set on the holder.
        let wrong_old = claim("a", 1, 12, ClaimMode::Takeover(NodeId(99)));
        assert_eq!(code(t.handle(&wrong_old, t0)), Some(RegErrorCode::NotContact));
        assert_eq!(code(t.handle(&claim("a", 1, 12, ClaimMode::Takeover(NodeId(10))), t0)), None);
        assert_eq!(code(t.handle(&claim("a", 1, 10, ClaimMode::Renew), t0)), Some(RegErrorCode::NotContact));
        // Leases expire.
        let later = t0 + Duration::from_millis(1001);
        let lookup = Message::RegLookup { req: 2, name: "a".into() };
        assert_eq!(code(t.handle(&lookup, later)), Some(RegErrorCode::UnknownChannel));
        assert!(t.is_empty());
    }

    #[test]
    fn remove_only_by_holder() {
        let t0 = Instant::now();
        let mut t = RegistryTable::new();
        t.handle(&claim("a", 1, 10, ClaimMode::Create), t0);
        let by = |node, secret| Message::RegRemove {
            req: 3,
            name: "a".into(),
            channel: ChannelId(1),
            node: NodeId(node),
            secret,
        };
        assert_eq!(code(t.handle(&by(11, SECRET), t0)), Some(RegErrorCode::NotContact));
        // Knowing the id and contact (a lookup tells both) is not enough: the secret is needed.
        assert_eq!(code(t.handle(&by(10, ChannelSecret(1)), t0)), Some(RegErrorCode::NotContact));
        assert_eq!(t.len(), 1);
        assert_eq!(code(t.handle(&by(10, SECRET), t0)), None);
        assert_eq!(t.len(), 0);
    }

    /// Someone outside the channel learns its id and contact from a lookup, but without the secret can neither take
    /// it over, nor renew or overwrite it as the contact.
    #[test]
    fn claims_without_the_secret_are_refused() {
        let t0 = Instant::now();
        let mut t = RegistryTable::new();
        t.handle(&claim("a", 1, 10, ClaimMode::Create), t0);
        let wrong = ChannelSecret(7);
        for mode in [ClaimMode::Takeover(NodeId(10)), ClaimMode::Renew, ClaimMode::Create] {
            let as_contact = claim_with("a", 1, 10, mode, wrong);
            let expected = if mode == ClaimMode::Create { RegErrorCode::Exists } else { RegErrorCode::NotContact };
            assert_eq!(code(t.handle(&as_contact, t0)), Some(expected), "{mode:?}");
            assert_eq!(code(t.handle(&claim_with("a", 1, 66, mode, wrong), t0)), Some(expected), "{mode:?}");
        }
        let lookup = Message::RegLookup { req: 2, name: "a".into() };
        match t.handle(&lookup, t0) {
            Some(Message::RegReply { result: RegResult::Entry(e), .. }) => assert_eq!(e.contact, NodeId(10)),
            other => panic!("entry changed: {other:?}"),
        }
        // A member (it has the secret) takes over.
        assert_eq!(code(t.handle(&claim("a", 1, 11, ClaimMode::Takeover(NodeId(10))), t0)), None);
    }

    #[test]
    fn export_rebuilds_the_table() {
        let t0 = Instant::now();
        let mut t = RegistryTable::new();
        t.handle(&claim("b", 2, 20, ClaimMode::Create), t0);
        t.handle(&claim("a", 1, 10, ClaimMode::Create), t0);
        let later = t0 + Duration::from_millis(400);
        let mut copy = RegistryTable::new();
        for m in t.export(later) {
            copy.handle(&m, later);
        }
        let list = Message::RegList { req: 1 };
        assert_eq!(t.handle(&list, later), copy.handle(&list, later));
        // The copy's leases end when the original's do.
        let end = t0 + Duration::from_millis(1001);
        assert_eq!(copy.handle(&list, end), Some(Message::RegReply { req: 1, result: RegResult::Entries(vec![]) }));
    }

    #[test]
    fn renew_recreates_after_registry_restart() {
        let t0 = Instant::now();
        let mut t = RegistryTable::new();
        assert_eq!(code(t.handle(&claim("a", 1, 10, ClaimMode::Renew), t0)), None);
        assert_eq!(t.len(), 1);
    }
}
