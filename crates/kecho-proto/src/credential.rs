//! Credentials: the rights a node may hold in a channel ([`Roles`]), the signed grant of them ([`Token`]), the key
//! that signs grants ([`Authority`]) and why a credential or node is refused ([`Denied`]).
//!
//! This module knows nothing of snapshots or membership; [`crate::access`] builds the channel's policy decisions on
//! it and re-exports its items, which is where users name them.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::types::{NodeId, MAX_CHANNEL_NAME};

/// A set of rights in a channel.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Roles(u8);

impl Roles {
    /// No rights.
    pub const NONE: Roles = Roles(0);
    /// Publish events (own source members).
    pub const SOURCE: Roles = Roles(1);
    /// Receive events (own sink members).
    pub const SINK: Roles = Roles(2);
    /// Install filters on other members' nodes.
    pub const FILTERS: Roles = Roles(4);
    /// Every right in a channel (`all`). [`Roles::EXEC`] is not among them: it is granted by name.
    pub const ALL: Roles = Roles(7);
    /// Start work on exec agents (`kecho run`, `deploy`, `configure`, `agent drain`). Not a channel right: an agent
    /// under an access policy checks it on every request it is sent (the credential travels with the request).
    pub const EXEC: Roles = Roles(8);

    /// The set with these bits; `None` if a bit names no role.
    pub fn from_bits(bits: u8) -> Option<Roles> {
        (bits & !(Roles::ALL.0 | Roles::EXEC.0) == 0).then_some(Roles(bits))
    }

    /// The bits of this set.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// True if every role of `other` is in this set.
    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    /// True if the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The roles in either set.
    pub fn union(self, other: Roles) -> Roles {
        Roles(self.0 | other.0)
    }

    /// The roles of this set that are not in `other`.
    pub fn minus(self, other: Roles) -> Roles {
        Roles(self.0 & !other.0)
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let names =
            [(Roles::SOURCE, "source"), (Roles::SINK, "sink"), (Roles::FILTERS, "filters"), (Roles::EXEC, "exec")];
        let mut first = true;
        for (r, name) in names {
            if self.contains(r) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

impl FromStr for Roles {
    type Err = RolesError;

    /// A comma-separated list of `source`, `sink`, `filters`, `exec`, or `all` (the three channel rights), or `none`.
    fn from_str(s: &str) -> Result<Roles, RolesError> {
        let mut roles = Roles::NONE;
        for part in s.split(',').map(str::trim) {
            roles = roles.union(match part {
                "source" | "sources" => Roles::SOURCE,
                "sink" | "sinks" => Roles::SINK,
                "filters" | "filter" => Roles::FILTERS,
                "exec" => Roles::EXEC,
                "all" => Roles::ALL,
                "none" => Roles::NONE,
                other => return Err(RolesError::Unknown(other.to_owned())),
            });
        }
        Ok(roles)
    }
}

/// A credential: the authority's grant of `roles` in channel `channel` to the node with key `holder`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The channel's name, or a prefix of names followed by `*` (`*` alone: every channel).
    pub channel: String,
    /// The rights granted.
    pub roles: Roles,
    /// The holder's node public key (see `Identity::public_key` in `crate::handshake`).
    pub holder: [u8; 32],
    /// Valid until this time, in seconds since the Unix epoch; 0 means it does not expire.
    pub not_after: u64,
    /// The issuing authority's public key.
    pub authority: [u8; 32],
    /// The authority's signature.
    pub sig: [u8; 64],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("channel", &self.channel)
            .field("roles", &self.roles)
            .field("holder", &NodeId::from_public_key(&self.holder))
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The prefix of a token's text form.
const TEXT_PREFIX: &str = "kecho-token-1:";

/// Longest channel pattern in a token (the registry's longest name).
pub const MAX_PATTERN: usize = MAX_CHANNEL_NAME;

impl Token {
    fn transcript(channel: &str, roles: Roles, holder: &[u8; 32], not_after: u64) -> Vec<u8> {
        let mut t = b"kecho channel token 1".to_vec();
        t.extend_from_slice(&(channel.len() as u32).to_le_bytes());
        t.extend_from_slice(channel.as_bytes());
        t.push(roles.bits());
        t.extend_from_slice(holder);
        t.extend_from_slice(&not_after.to_le_bytes());
        t
    }

    /// True if the token's channel pattern covers channel `name`.
    pub fn covers(&self, name: &str) -> bool {
        match self.channel.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => self.channel == name,
        }
    }

    /// The node id of the holder.
    pub fn holder_node(&self) -> NodeId {
        NodeId::from_public_key(&self.holder)
    }

    /// Checks the authority's signature.
    pub fn verify_signature(&self) -> Result<(), Denied> {
        let key = VerifyingKey::from_bytes(&self.authority).map_err(|_| Denied::BadSignature)?;
        let t = Token::transcript(&self.channel, self.roles, &self.holder, self.not_after);
        key.verify_strict(&t, &Signature::from_bytes(&self.sig)).map_err(|_| Denied::BadSignature)
    }

    /// The token's binary form (also carried in snapshots).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + self.channel.len() + 1 + 32 + 8 + 32 + 64);
        b.extend_from_slice(&(self.channel.len() as u32).to_le_bytes());
        b.extend_from_slice(self.channel.as_bytes());
        b.push(self.roles.bits());
        b.extend_from_slice(&self.holder);
        b.extend_from_slice(&self.not_after.to_le_bytes());
        b.extend_from_slice(&self.authority);
        b.extend_from_slice(&self.sig);
        b
    }

    /// Reads a token's binary form; the signature is not checked here.
    pub fn from_bytes(b: &[u8]) -> Result<Token, TokenError> {
        let bad = || TokenError::Malformed;
        let n = u32::from_le_bytes(b.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        if n > MAX_PATTERN || b.len() != 4 + n + 1 + 32 + 8 + 32 + 64 {
            return Err(bad());
        }
        let channel = std::str::from_utf8(&b[4..4 + n]).map_err(|_| bad())?.to_owned();
        let mut at = 4 + n;
        let roles = Roles::from_bits(b[at]).ok_or_else(bad)?;
        at += 1;
        let holder: [u8; 32] = b[at..at + 32].try_into().map_err(|_| bad())?;
        at += 32;
        let not_after = u64::from_le_bytes(b[at..at + 8].try_into().map_err(|_| bad())?);
        at += 8;
        let authority: [u8; 32] = b[at..at + 32].try_into().map_err(|_| bad())?;
        at += 32;
        let sig: [u8; 64] = b[at..at + 64].try_into().map_err(|_| bad())?;
        Ok(Token { channel, roles, holder, not_after, authority, sig })
    }

    /// The token as one line of text, to keep in a file or pass around.
    pub fn to_text(&self) -> String {
        let mut s = String::from(TEXT_PREFIX);
        for b in self.to_bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// Reads the text form (surrounding white space is ignored). The signature is checked.
    pub fn from_text(s: &str) -> Result<Token, TokenError> {
        let hex = s.trim().strip_prefix(TEXT_PREFIX).ok_or(TokenError::NoPrefix)?;
        let bytes = parse_hex(hex).ok_or(TokenError::BadHex)?;
        let token = Token::from_bytes(&bytes)?;
        token.verify_signature().map_err(|_| TokenError::BadSignature)?;
        Ok(token)
    }
}

/// Decodes lowercase or uppercase hex digits.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// An authority: the key that signs tokens.
#[derive(Clone)]
pub struct Authority {
    key: SigningKey,
}

impl fmt::Debug for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

impl Authority {
    /// The authority with this 32-byte secret (random, from the caller).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Authority { key: SigningKey::from_bytes(&secret) }
    }

    /// The secret, to store the authority.
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key, which policies name.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Grants `roles` in the channel(s) `channel` (a name, or a prefix followed by `*`) to the node with key
    /// `holder`, valid until `not_after` (Unix seconds; 0 for no expiry).
    pub fn grant(&self, channel: &str, roles: Roles, holder: [u8; 32], not_after: u64) -> Result<Token, GrantError> {
        if channel.is_empty() || channel.len() > MAX_PATTERN {
            return Err(GrantError::PatternLength { len: channel.len() });
        }
        if channel[..channel.len() - 1].contains('*') {
            return Err(GrantError::InnerWildcard);
        }
        if VerifyingKey::from_bytes(&holder).is_err() {
            return Err(GrantError::BadHolderKey);
        }
        let sig = self.key.sign(&Token::transcript(channel, roles, &holder, not_after)).to_bytes();
        Ok(Token { channel: channel.to_owned(), roles, holder, not_after, authority: self.public_key(), sig })
    }
}

/// Why a list of roles does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RolesError {
    /// A name that is no role.
    #[error("unknown role {0:?}: expected source, sink, filters, exec, all or none")]
    Unknown(String),
}

/// Why bytes or text are not a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The text does not start with the token prefix.
    #[error("not a kecho token (it should start with {TEXT_PREFIX})")]
    NoPrefix,
    /// The text after the prefix is not hex digits.
    #[error("not a kecho token (bad hex digits)")]
    BadHex,
    /// The binary form has the wrong length or an invalid field.
    #[error("not a kecho token (malformed)")]
    Malformed,
    /// The authority's signature does not verify (the token was altered, or is not the authority's).
    #[error("the credential's signature does not verify")]
    BadSignature,
}

/// Why an authority cannot grant a credential.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrantError {
    /// The channel pattern is empty or longer than [`MAX_PATTERN`].
    #[error("a token's channel must be 1 to {MAX_PATTERN} bytes (got {len})")]
    PatternLength {
        /// The pattern's length in bytes.
        len: usize,
    },
    /// A `*` that does not end the pattern.
    #[error("`*` may only end a token's channel pattern")]
    InnerWildcard,
    /// The holder's key is not an Ed25519 public key.
    #[error("the holder's key is not a valid Ed25519 public key")]
    BadHolderKey,
}

/// Why a node, or the credential it presents, is refused in a channel. This is the typed reason that the membership
/// state machine reports and that the node layer's access errors carry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No credential, and the channel admits nobody without one.
    #[error(
        "channel {channel:?} admits only nodes with a credential (roles requiring one: {require}); none was given"
    )]
    NoCredential {
        /// The channel.
        channel: String,
        /// The roles its policy requires a credential for.
        require: Roles,
    },
    /// The members need roles the credential (if any) does not grant.
    #[error("channel {channel:?} requires a credential with the {missing} role; {have}")]
    MissingRole {
        /// The channel.
        channel: String,
        /// The roles missing.
        missing: Roles,
        /// What the node has, for the message.
        have: String,
    },
    /// The credential was issued by another authority.
    #[error("the credential was issued by another authority than channel {channel:?}'s")]
    WrongAuthority {
        /// The channel.
        channel: String,
    },
    /// The credential is for other channels.
    #[error("the credential is for channel {pattern:?}, not {channel:?}")]
    WrongChannel {
        /// The channel.
        channel: String,
        /// The token's pattern.
        pattern: String,
    },
    /// The credential belongs to another node.
    #[error("the credential was issued to node {holder}, not to node {node}")]
    WrongHolder {
        /// Its holder.
        holder: NodeId,
        /// The node presenting it.
        node: NodeId,
    },
    /// The credential has expired.
    #[error("the credential expired at {not_after} (Unix time; now {now})")]
    Expired {
        /// Its expiry.
        not_after: u64,
        /// The current time, or 0 if the checking node does not know it.
        now: u64,
    },
    /// The signature does not verify.
    #[error("the credential's signature does not verify")]
    BadSignature,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_and_print() {
        assert_eq!("source,sink".parse::<Roles>().unwrap(), Roles::SOURCE.union(Roles::SINK));
        assert_eq!("all".parse::<Roles>().unwrap(), Roles::ALL);
        assert_eq!(Roles::ALL.to_string(), "source,sink,filters");
        assert_eq!(Roles::NONE.to_string(), "none");
        let e = "sauce".parse::<Roles>().unwrap_err();
        assert_eq!(e, RolesError::Unknown("sauce".into()));
        assert!(e.to_string().contains("sauce"), "{e}");
        assert_eq!("exec".parse::<Roles>().unwrap(), Roles::EXEC);
        assert_eq!("all,exec".parse::<Roles>().unwrap().to_string(), "source,sink,filters,exec");
        assert!(!Roles::ALL.contains(Roles::EXEC));
        assert_eq!(Roles::from_bits(8), Some(Roles::EXEC));
        assert_eq!(Roles::from_bits(16), None);
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let auth = Authority::from_secret([7; 32]);
        let t = auth.grant("prices", Roles::SINK, Authority::from_secret([1; 32]).public_key(), 42).unwrap();
        assert_eq!(Token::from_text(&format!(" {}\n", t.to_text())).unwrap(), t);
        let e = Token::from_text("hello").unwrap_err();
        assert_eq!(e, TokenError::NoPrefix);
        assert!(e.to_string().contains("kecho-token-1:"), "{e}");
        assert_eq!(Token::from_text("kecho-token-1:zz"), Err(TokenError::BadHex));
        assert_eq!(Token::from_text("kecho-token-1:00"), Err(TokenError::Malformed));
        let mut text = t.to_text();
        let last = text.pop().unwrap();
        text.push(if last == '0' { '1' } else { '0' });
        let e = Token::from_text(&text).unwrap_err();
        assert_eq!(e, TokenError::BadSignature);
        assert!(e.to_string().contains("signature"), "{e}");
        let holder = Authority::from_secret([1; 32]).public_key();
        assert_eq!(auth.grant("a*b", Roles::ALL, holder, 0), Err(GrantError::InnerWildcard));
        assert_eq!(auth.grant("", Roles::ALL, holder, 0), Err(GrantError::PatternLength { len: 0 }));
        let not_a_key = (0..=255u8).map(|b| [b; 32]).find(|k| VerifyingKey::from_bytes(k).is_err()).unwrap();
        assert_eq!(auth.grant("a*", Roles::ALL, not_a_key, 0), Err(GrantError::BadHolderKey));
    }
}
