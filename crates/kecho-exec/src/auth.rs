//! The `exec` right: who may start work on an agent.
//!
//! Events on a kecho channel do not say which node sent them, so an agent cannot learn who submitted a task from the
//! channel. A request that starts or moves work (a submission, a stop, a drain, a configuration) therefore carries
//! its own proof: the submitter's credential ([`Token`], issued by the access authority with the
//! [`Roles::EXEC`] right to the submitter's node key, `kecho grant --roles exec`) and the node key's Ed25519
//! signature over the request. The agent checks both ([`ExecPolicy::verify`]): the credential is the authority's,
//! covers the exec channel, grants `exec`, has not expired, and the signature verifies under the credential's
//! holder key; so the credential is worthless to anyone but its holder, and a request cannot be altered on the way.
//! The signature covers the event type, the address, the time and the payload; the agent refuses requests signed
//! more than [`ExecPolicy::max_skew`] away from its own clock, which bounds how long a captured request could be
//! replayed (a replayed submission is a duplicate of a task the agent already knows).
//!
//! Without an access policy the agent runs requests from anyone who can reach the channel (after `--allow-exec`),
//! and a credential that comes with a request is then only used to name who asked.
//!
//! Everything here is pure: the time is passed in.

use std::time::Duration;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use kecho::{Attrs, Identity, NodeId, Roles, Token, Value};
use kecho_proto::access::{Denied, Policy, TokenError};

/// The attribute that carries the credential (the token's binary form).
pub const CRED_ATTR: &str = "cred";
/// The attribute that carries the signature (64 bytes).
pub const SIG_ATTR: &str = "sig";
/// The attribute that carries the signing time (milliseconds since the Unix epoch).
pub const AT_ATTR: &str = "at";

/// A submitter's proof of its `exec` right: its node identity and the credential issued to it.
#[derive(Clone)]
pub struct Credential {
    key: SigningKey,
    token: Token,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credential").field("token", &self.token).finish_non_exhaustive()
    }
}

impl Credential {
    /// The credential `token` held by the node with identity `identity`; refused when it was issued to another key
    /// or does not grant `exec`.
    pub fn new(identity: &Identity, token: Token) -> Result<Credential, AuthError> {
        if token.holder != identity.public_key() {
            return Err(AuthError::Denied(Denied::WrongHolder {
                holder: token.holder_node(),
                node: identity.node_id(),
            }));
        }
        if !token.roles.contains(Roles::EXEC) {
            return Err(AuthError::NoExecRight { node: identity.node_id(), have: token.roles });
        }
        Ok(Credential { key: SigningKey::from_bytes(&identity.secret()), token })
    }

    /// The holder's node id.
    pub fn node(&self) -> NodeId {
        self.token.holder_node()
    }

    /// Adds the credential and the signature over a request (event type `ty` to `to` with `payload`, at Unix time
    /// `at_ms`) to `attrs`.
    pub fn sign(&self, attrs: Attrs, ty: &str, to: &str, payload: &[u8], at_ms: u64) -> Attrs {
        let sig = self.key.sign(&transcript(ty, to, at_ms, payload));
        attrs
            .with(CRED_ATTR, Value::Bytes(self.token.to_bytes().into()))
            .with(SIG_ATTR, Value::Bytes(sig.to_bytes().to_vec().into()))
            .with(AT_ATTR, Value::Int(at_ms as i64))
    }
}

/// What the signature covers. Each field's length comes first, so no two requests share a transcript.
fn transcript(ty: &str, to: &str, at_ms: u64, payload: &[u8]) -> Vec<u8> {
    let mut t = b"kecho exec request 1".to_vec();
    for part in [ty.as_bytes(), to.as_bytes()] {
        t.extend_from_slice(&(part.len() as u32).to_le_bytes());
        t.extend_from_slice(part);
    }
    t.extend_from_slice(&at_ms.to_le_bytes());
    t.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    t.extend_from_slice(payload);
    t
}

/// An agent's rule for requests: the authority whose `exec` credentials it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecPolicy {
    /// The authority's Ed25519 public key.
    pub authority: [u8; 32],
    /// How far a request's signing time may be from the agent's clock.
    pub max_skew: Duration,
}

impl ExecPolicy {
    /// Accepts `exec` credentials of `authority`, signed within a minute of the agent's clock.
    pub fn new(authority: [u8; 32]) -> ExecPolicy {
        ExecPolicy { authority, max_skew: Duration::from_secs(60) }
    }

    /// Checks a request on channel `channel` (event type `ty`, address `to`, `payload`, its attributes) at Unix
    /// time `now_ms`: the node that signed it if it holds the `exec` right, or why not.
    pub fn verify(
        &self,
        channel: &str,
        ty: &str,
        to: &str,
        payload: &[u8],
        attrs: &Attrs,
        now_ms: u64,
    ) -> Result<NodeId, AuthError> {
        let Some(signed) = Signed::read(attrs)? else {
            return Err(AuthError::NoCredential { authority: NodeId::from_public_key(&self.authority) });
        };
        let policy = Policy { authority: self.authority, require: Roles::EXEC };
        let roles = policy.check_token(channel, signed.token.holder_node(), &signed.token, Some(now_ms / 1000))?;
        if !roles.contains(Roles::EXEC) {
            return Err(AuthError::NoExecRight { node: signed.token.holder_node(), have: roles });
        }
        let skew = now_ms.abs_diff(signed.at_ms);
        if skew > self.max_skew.as_millis() as u64 {
            return Err(AuthError::Stale { skew: Duration::from_millis(skew), max: self.max_skew });
        }
        signed.check(ty, to, payload)?;
        Ok(signed.token.holder_node())
    }
}

/// Who signed a request, without a policy: the holder of the credential it carries if its signature verifies
/// (`None` when it carries none or does not verify). Used to name who asked when the agent has no policy.
pub fn signer(ty: &str, to: &str, payload: &[u8], attrs: &Attrs) -> Option<NodeId> {
    let signed = Signed::read(attrs).ok()??;
    signed.token.verify_signature().ok()?;
    signed.check(ty, to, payload).ok()?;
    Some(signed.token.holder_node())
}

struct Signed {
    token: Token,
    sig: [u8; 64],
    at_ms: u64,
}

impl Signed {
    fn read(attrs: &Attrs) -> Result<Option<Signed>, AuthError> {
        let Some(cred) = attrs.get(CRED_ATTR) else { return Ok(None) };
        let Value::Bytes(cred) = cred else { return Err(AuthError::Malformed("the credential is not bytes")) };
        let token = Token::from_bytes(cred)?;
        let sig: [u8; 64] = match attrs.get(SIG_ATTR) {
            Some(Value::Bytes(b)) => {
                b[..].try_into().map_err(|_| AuthError::Malformed("the signature is not 64 bytes"))?
            }
            _ => return Err(AuthError::Malformed("a credential without a signature")),
        };
        let at_ms = match attrs.get(AT_ATTR) {
            Some(Value::Int(t)) if *t >= 0 => *t as u64,
            _ => return Err(AuthError::Malformed("a signature without its time")),
        };
        Ok(Some(Signed { token, sig, at_ms }))
    }

    fn check(&self, ty: &str, to: &str, payload: &[u8]) -> Result<(), AuthError> {
        let key = VerifyingKey::from_bytes(&self.token.holder).map_err(|_| AuthError::BadSignature)?;
        key.verify_strict(&transcript(ty, to, self.at_ms, payload), &Signature::from_bytes(&self.sig))
            .map_err(|_| AuthError::BadSignature)
    }
}

/// Why a request is refused under an agent's [`ExecPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The request carries no credential.
    #[error(
        "this agent runs work only for holders of an exec credential of authority {authority}; none was given \
         (issue one with `kecho grant --roles exec --channel kecho.exec`, then pass --identity and --token)"
    )]
    NoCredential {
        /// The authority (as a node id: the hash of its public key).
        authority: NodeId,
    },
    /// The credential does not grant the `exec` right.
    #[error("no exec right: the credential of node {node} grants {have}, not exec")]
    NoExecRight {
        /// Its holder.
        node: NodeId,
        /// What it grants.
        have: Roles,
    },
    /// The credential is refused (another authority, another channel, expired, forged, another holder).
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The credential's bytes are not a token.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The credential attributes are not what a signed request carries.
    #[error("malformed signed request: {0}")]
    Malformed(&'static str),
    /// The request's signature does not verify under the credential's holder key (altered, or not the holder's).
    #[error("the request's signature does not verify under its credential's holder key")]
    BadSignature,
    /// The request was signed too far from the agent's clock (a replay, or a clock that is off).
    #[error("the request was signed {skew:?} away from this agent's clock (at most {max:?})")]
    Stale {
        /// How far.
        skew: Duration,
        /// The bound.
        max: Duration,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use kecho::Authority;

    const CH: &str = "kecho.exec";
    const NOW: u64 = 1_800_000_000_000;

    fn check(policy: &ExecPolicy, attrs: &Attrs, payload: &[u8], now: u64) -> Result<NodeId, AuthError> {
        policy.verify(CH, "exec.submit", "a", payload, attrs, now)
    }

    #[test]
    fn only_holders_of_the_exec_right_pass() {
        let auth = Authority::from_secret([7; 32]);
        let policy = ExecPolicy::new(auth.public_key());
        let me = Identity::from_secret([1; 32]);
        let token = auth.grant(CH, Roles::EXEC, me.public_key(), 0).unwrap();
        let cred = Credential::new(&me, token).unwrap();
        let signed = cred.sign(Attrs::new().with("to", "a"), "exec.submit", "a", b"task", NOW);
        assert_eq!(check(&policy, &signed, b"task", NOW + 5_000), Ok(me.node_id()));
        assert_eq!(signer("exec.submit", "a", b"task", &signed), Some(me.node_id()));

        // No credential at all.
        let e = check(&policy, &Attrs::new(), b"task", NOW).unwrap_err();
        assert!(matches!(e, AuthError::NoCredential { .. }), "{e}");
        assert!(e.to_string().contains("kecho grant --roles exec"), "{e}");
        // Altered payload, address or type.
        assert_eq!(check(&policy, &signed, b"rm -rf", NOW), Err(AuthError::BadSignature));
        assert_eq!(policy.verify(CH, "exec.submit", "b", b"task", &signed, NOW), Err(AuthError::BadSignature));
        assert_eq!(policy.verify(CH, "exec.drain", "a", b"task", &signed, NOW), Err(AuthError::BadSignature));
        assert_eq!(signer("exec.submit", "a", b"rm -rf", &signed), None);
        // Too old or from the future.
        assert!(matches!(check(&policy, &signed, b"task", NOW + 61_000), Err(AuthError::Stale { .. })));
        assert!(matches!(check(&policy, &signed, b"task", NOW - 61_000), Err(AuthError::Stale { .. })));
    }

    #[test]
    fn other_credentials_are_refused_with_the_reason() {
        let auth = Authority::from_secret([7; 32]);
        let policy = ExecPolicy::new(auth.public_key());
        let me = Identity::from_secret([1; 32]);
        // A channel credential without exec cannot even be made into an exec credential...
        let sources = auth.grant(CH, Roles::ALL, me.public_key(), 0).unwrap();
        let e = Credential::new(&me, sources.clone()).unwrap_err();
        assert!(e.to_string().contains("not exec"), "{e}");
        // ... and, presented by hand, is refused by the agent.
        let forged = Credential { key: SigningKey::from_bytes(&me.secret()), token: sources };
        let attrs = forged.sign(Attrs::new(), "exec.submit", "a", b"x", NOW);
        let e = check(&policy, &attrs, b"x", NOW).unwrap_err();
        assert!(matches!(e, AuthError::NoExecRight { .. }), "{e}");
        // Another authority's exec credential.
        let other = Authority::from_secret([8; 32]).grant(CH, Roles::EXEC, me.public_key(), 0).unwrap();
        let attrs = Credential::new(&me, other).unwrap().sign(Attrs::new(), "exec.submit", "a", b"x", NOW);
        assert!(matches!(check(&policy, &attrs, b"x", NOW), Err(AuthError::Denied(Denied::WrongAuthority { .. }))));
        // Expired.
        let old = auth.grant(CH, Roles::EXEC, me.public_key(), NOW / 1000 - 1).unwrap();
        let attrs = Credential::new(&me, old).unwrap().sign(Attrs::new(), "exec.submit", "a", b"x", NOW);
        assert!(matches!(check(&policy, &attrs, b"x", NOW), Err(AuthError::Denied(Denied::Expired { .. }))));
        // For another channel.
        let elsewhere = auth.grant("prices", Roles::EXEC, me.public_key(), 0).unwrap();
        let attrs = Credential::new(&me, elsewhere).unwrap().sign(Attrs::new(), "exec.submit", "a", b"x", NOW);
        assert!(matches!(check(&policy, &attrs, b"x", NOW), Err(AuthError::Denied(Denied::WrongChannel { .. }))));
        // Someone else's credential, signed with the thief's key.
        let thief = Identity::from_secret([2; 32]);
        let mine = auth.grant(CH, Roles::EXEC, me.public_key(), 0).unwrap();
        assert!(matches!(Credential::new(&thief, mine.clone()), Err(AuthError::Denied(Denied::WrongHolder { .. }))));
        let stolen = Credential { key: SigningKey::from_bytes(&thief.secret()), token: mine };
        let attrs = stolen.sign(Attrs::new(), "exec.submit", "a", b"x", NOW);
        assert_eq!(check(&policy, &attrs, b"x", NOW), Err(AuthError::BadSignature));
        // Garbage in the attributes.
        let junk = Attrs::new().with(CRED_ATTR, Value::Str("hello".into()));
        assert!(matches!(check(&policy, &junk, b"x", NOW), Err(AuthError::Malformed(_))));
        let junk = Attrs::new().with(CRED_ATTR, Value::Bytes(vec![1, 2, 3].into()));
        assert!(matches!(check(&policy, &junk, b"x", NOW), Err(AuthError::Token(TokenError::Malformed))));
    }
}
