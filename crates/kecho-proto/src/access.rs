//! Per-channel access control, without I/O: who may join a channel as a source, as a sink, or install filters in it.
//!
//! This follows the 2K paper's dynamic security (a policy names who holds which rights, checked wherever a right is
//! used) with signed capabilities instead of a central server on every check. An *authority* is an Ed25519 key
//! pair. A channel's [`Policy`] names the authority's public key and the roles that need a credential. A credential
//! is a [`Token`]: the authority's signature over a channel name (or a name prefix ending in `*`), a set of
//! [`Roles`], the holder's node key and an expiry. Because node ids derive from node keys and every link proves its
//! node's key (see `crate::handshake`), a token is worthless to any node but its holder.
//!
//! Tokens travel in the holder's [`NodeSnapshot`](crate::NodeSnapshot); the channel's policy travels in the
//! contact's `JoinAccept`, so every member checks every other member itself, not only the contact
//! ([`crate::membership::ChannelState`] refuses or drops nodes whose snapshot is not covered).

// The credential types live in their own module, below snapshots (which carry tokens) and this one (which judges
// snapshots); this is where users name them.
pub use crate::credential::{
    parse_hex, Authority, Denied, GrantError, Roles, RolesError, Token, TokenError, MAX_PATTERN,
};
use crate::snapshot::NodeSnapshot;
use crate::types::{NodeId, Role};

/// A channel's access policy: which authority issues its credentials, and which roles need one. Roles not in
/// `require` are open to every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The authority's Ed25519 public key.
    pub authority: [u8; 32],
    /// The roles that need a credential.
    pub require: Roles,
}

impl Authority {
    /// A policy of this authority requiring a credential for `require`.
    pub fn policy(&self, require: Roles) -> Policy {
        Policy { authority: self.public_key(), require }
    }
}

impl Policy {
    /// The roles a credential `token` presented by node `node` grants in channel `channel`, at Unix time `now`
    /// (`None`: unknown, then tokens with an expiry count as expired).
    pub fn check_token(&self, channel: &str, node: NodeId, token: &Token, now: Option<u64>) -> Result<Roles, Denied> {
        if token.authority != self.authority {
            return Err(Denied::WrongAuthority { channel: channel.to_owned() });
        }
        if !token.covers(channel) {
            return Err(Denied::WrongChannel { channel: channel.to_owned(), pattern: token.channel.clone() });
        }
        if token.holder_node() != node {
            return Err(Denied::WrongHolder { holder: token.holder_node(), node });
        }
        if token.not_after != 0 && now.is_none_or(|t| t >= token.not_after) {
            return Err(Denied::Expired { not_after: token.not_after, now: now.unwrap_or(0) });
        }
        token.verify_signature()?;
        Ok(token.roles)
    }

    /// The rights of node `node` in channel `channel` with credential `token` (if any) at Unix time `now`: the
    /// credential's roles plus every role open to all, or why the node may not be in the channel at all. A credential
    /// that is presented must be valid even where no role needs one.
    pub fn rights(
        &self,
        channel: &str,
        node: NodeId,
        token: Option<&Token>,
        now: Option<u64>,
    ) -> Result<Roles, Denied> {
        let open = Roles::ALL.minus(self.require);
        let granted = match token {
            Some(t) => self.check_token(channel, node, t, now)?,
            None if open.is_empty() => {
                return Err(Denied::NoCredential { channel: channel.to_owned(), require: self.require });
            }
            None => Roles::NONE,
        };
        Ok(granted.union(open))
    }

    /// Checks that node rights `rights` cover the members of `snapshot`.
    pub fn check_members(&self, channel: &str, snapshot: &NodeSnapshot, rights: Roles) -> Result<Roles, Denied> {
        let mut used = Roles::NONE;
        for m in &snapshot.members {
            used = used.union(match m.role {
                Role::Source => Roles::SOURCE,
                Role::Sink { .. } => Roles::SINK,
            });
        }
        let missing = used.minus(rights);
        if !missing.is_empty() {
            let have = match &snapshot.token {
                Some(t) => format!("the credential grants {}", t.roles),
                None => "no credential was given".to_owned(),
            };
            return Err(Denied::MissingRole { channel: channel.to_owned(), missing, have });
        }
        Ok(rights)
    }

    /// Decides on node `node`'s snapshot in channel `channel` at Unix time `now`: the node's rights if it may be in
    /// the channel with these members, or why not.
    pub fn admit(
        &self,
        channel: &str,
        node: NodeId,
        snapshot: &NodeSnapshot,
        now: Option<u64>,
    ) -> Result<Roles, Denied> {
        let rights = self.rights(channel, node, snapshot.token.as_deref(), now)?;
        self.check_members(channel, snapshot, rights)
    }

    /// When the credential in `snapshot` stops being valid (Unix seconds), if it has an expiry.
    pub fn expiry(snapshot: &NodeSnapshot) -> Option<u64> {
        snapshot.token.as_ref().map(|t| t.not_after).filter(|t| *t != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Attrs, LocalId, MemberInfo, Overflow, TypeFilter};

    /// A node's public key and id. An authority's key is an Ed25519 key pair like a node identity's, so tests need
    /// not reach up to `handshake` for one.
    fn node(seed: u8) -> ([u8; 32], NodeId) {
        let key = Authority::from_secret([seed; 32]).public_key();
        (key, NodeId::from_public_key(&key))
    }

    fn sink() -> MemberInfo {
        MemberInfo {
            id: LocalId(1),
            role: Role::Sink { types: TypeFilter::All, overflow: Overflow::Block, filter: None },
            attrs: Attrs::new(),
        }
    }

    fn source() -> MemberInfo {
        MemberInfo { id: LocalId(2), role: Role::Source, attrs: Attrs::new() }
    }

    fn snap(members: Vec<MemberInfo>, token: Option<Token>) -> NodeSnapshot {
        NodeSnapshot { version: 1, instance: 0, members, token: token.map(std::sync::Arc::new) }
    }

    #[test]
    fn grant_and_admit() {
        let auth = Authority::from_secret([7; 32]);
        let (key, me) = node(1);
        let (_, other) = node(2);
        let policy = auth.policy(Roles::ALL);
        let t = auth.grant("prices", Roles::SINK, key, 0).unwrap();
        assert_eq!(policy.admit("prices", me, &snap(vec![sink()], Some(t.clone())), Some(5)), Ok(Roles::SINK));
        // A sink token does not make a source.
        let e = policy.admit("prices", me, &snap(vec![source()], Some(t.clone())), Some(5)).unwrap_err();
        assert!(matches!(e, Denied::MissingRole { missing, .. } if missing == Roles::SOURCE), "{e}");
        // Another node cannot use it.
        let e = policy.admit("prices", other, &snap(vec![sink()], Some(t.clone())), Some(5)).unwrap_err();
        assert!(matches!(e, Denied::WrongHolder { .. }), "{e}");
        // Nor can it be used in another channel.
        let e = policy.admit("orders", me, &snap(vec![sink()], Some(t.clone())), Some(5)).unwrap_err();
        assert!(matches!(e, Denied::WrongChannel { .. }), "{e}");
        // No token, no entry, even without members, when every role needs one.
        let e = policy.admit("prices", me, &snap(vec![], None), Some(5)).unwrap_err();
        assert!(matches!(e, Denied::NoCredential { .. }), "{e}");
        // Another authority's policy refuses it.
        let other_auth = Authority::from_secret([8; 32]).policy(Roles::ALL);
        let e = other_auth.admit("prices", me, &snap(vec![sink()], Some(t)), Some(5)).unwrap_err();
        assert!(matches!(e, Denied::WrongAuthority { .. }), "{e}");
    }

    #[test]
    fn open_roles_need_no_token() {
        let auth = Authority::from_secret([7; 32]);
        let (_, me) = node(1);
        let policy = auth.policy(Roles::SOURCE);
        assert_eq!(policy.admit("c", me, &snap(vec![sink()], None), None), Ok(Roles::SINK.union(Roles::FILTERS)));
        assert!(policy.admit("c", me, &snap(vec![sink(), source()], None), None).is_err());
    }

    #[test]
    fn expiry_and_tampering() {
        let auth = Authority::from_secret([7; 32]);
        let (key, me) = node(1);
        let policy = auth.policy(Roles::ALL);
        let t = auth.grant("c*", Roles::ALL, key, 100).unwrap();
        let s = snap(vec![sink()], Some(t.clone()));
        assert!(policy.admit("c.1", me, &s, Some(99)).is_ok());
        assert!(matches!(policy.admit("c.1", me, &s, Some(100)), Err(Denied::Expired { .. })));
        // Unknown time: an expiring token is not trusted.
        assert!(matches!(policy.admit("c.1", me, &s, None), Err(Denied::Expired { .. })));
        // Raising one's own roles or extending the expiry breaks the signature.
        let mut forged = t.clone();
        forged.not_after = 0;
        let e = policy.admit("c.1", me, &snap(vec![sink()], Some(forged)), Some(5)).unwrap_err();
        assert_eq!(e, Denied::BadSignature);
        let sink_only = auth.grant("c", Roles::SINK, key, 0).unwrap();
        let mut forged = sink_only;
        forged.roles = Roles::ALL;
        let e = policy.admit("c", me, &snap(vec![source()], Some(forged)), Some(5)).unwrap_err();
        assert_eq!(e, Denied::BadSignature);
    }
}
