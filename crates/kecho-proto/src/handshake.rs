//! The connection handshake as pure decisions: what the accepting side does with the first message of a connection,
//! and what the dialling side concludes from the answer to its `Hello`; and node identities, which both sides prove
//! with a `Proof` after `Hello` and after `HelloAck`. The node layer does the I/O around them.
//!
//! A node's id derives from its Ed25519 public key (the key's first eight bytes), and on a node link each side signs
//! the handshake with the key, naming the other side. So no node can speak for another node id: events, snapshots and
//! filter installs that arrive on a link come from the node the link names, and a member cannot make its events
//! appear to come from another member's source. (Finding a key whose id matches a given node's takes about 2^64
//! attempts.) The signature binds the two node ids and the dialler's address, so a proof shown to one node is useless
//! towards another; on plaintext links someone who can record and replay traffic between the same two nodes could
//! replay one, which is what TLS (`NodeBuilder::tls` in kecho) is for.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::codec::{CloseCode, Message, Purpose, PROTOCOL_VERSION};
use crate::types::{ChannelId, NodeId};

/// A node's identity: its signing key. Its node id derives from the public key.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("node", &self.node_id()).finish_non_exhaustive()
    }
}

impl Identity {
    /// The identity with this 32-byte secret (random, from the caller: the core has no randomness of its own).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Identity { key: SigningKey::from_bytes(&secret) }
    }

    /// The secret, to store an identity that should outlive the process.
    pub fn secret(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(&self.public_key())
    }

    /// The proof that follows our `Hello` to node `to`, sent from listening address `addr`.
    pub fn hello_proof(&self, to: NodeId, addr: &str) -> Message {
        self.proof(&hello_transcript(self.node_id(), to, addr))
    }

    /// The proof that follows our `HelloAck` to the dialling node `to`.
    pub fn ack_proof(&self, to: NodeId) -> Message {
        self.proof(&ack_transcript(self.node_id(), to))
    }

    /// The answer to `prober`'s `ProbeHello` with `nonce` about `channel`: proof that this node, alive and a member of
    /// the channel, answers (one signature, no link; see [`check_probe_answer`]).
    pub fn probe_proof(&self, prober: NodeId, channel: ChannelId, nonce: u64) -> Message {
        self.proof(&probe_transcript(self.node_id(), prober, channel, nonce))
    }

    fn proof(&self, transcript: &[u8]) -> Message {
        Message::Proof { key: self.public_key(), sig: self.key.sign(transcript).to_bytes() }
    }
}

fn hello_transcript(from: NodeId, to: NodeId, addr: &str) -> Vec<u8> {
    let mut t = b"kecho hello proof".to_vec();
    t.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    t.extend_from_slice(&from.0.to_le_bytes());
    t.extend_from_slice(&to.0.to_le_bytes());
    t.extend_from_slice(addr.as_bytes());
    t
}

fn ack_transcript(from: NodeId, to: NodeId) -> Vec<u8> {
    let mut t = b"kecho ack proof".to_vec();
    t.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    t.extend_from_slice(&from.0.to_le_bytes());
    t.extend_from_slice(&to.0.to_le_bytes());
    t
}

fn probe_transcript(from: NodeId, prober: NodeId, channel: ChannelId, nonce: u64) -> Vec<u8> {
    let mut t = b"kecho probe proof".to_vec();
    t.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    t.extend_from_slice(&from.0.to_le_bytes());
    t.extend_from_slice(&prober.0.to_le_bytes());
    t.extend_from_slice(&channel.0.to_le_bytes());
    t.extend_from_slice(&nonce.to_le_bytes());
    t
}

/// Checks the proof that followed a `Hello` from node `from` (listening at `addr`) to us, node `me`.
pub fn check_hello_proof(proof: &Message, from: NodeId, addr: &str, me: NodeId) -> Result<(), ProofError> {
    check(proof, from, &hello_transcript(from, me, addr))
}

/// Checks the proof that followed the `HelloAck` of node `from` to us, node `me`.
pub fn check_ack_proof(proof: &Message, from: NodeId, me: NodeId) -> Result<(), ProofError> {
    check(proof, from, &ack_transcript(from, me))
}

/// Why an identity proof is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// Another message came where the proof was due.
    #[error("expected an identity proof, got message kind {kind}")]
    NotAProof {
        /// The kind of the message that came instead.
        kind: u8,
    },
    /// The proof's key does not belong to the node id claimed.
    #[error("the identity proof's key is not node {claimed}'s")]
    WrongKey {
        /// The node id the peer claimed.
        claimed: NodeId,
    },
    /// The proof's key is not an Ed25519 public key.
    #[error("the identity proof's key is invalid")]
    InvalidKey,
    /// The signature does not verify over this handshake (forged, or made for another node or address).
    #[error("node {claimed}'s identity proof does not verify")]
    BadSignature {
        /// The node id the peer claimed.
        claimed: NodeId,
    },
}

fn check(proof: &Message, claimed: NodeId, transcript: &[u8]) -> Result<(), ProofError> {
    let Message::Proof { key, sig } = proof else {
        return Err(ProofError::NotAProof { kind: proof.kind() });
    };
    if NodeId::from_public_key(key) != claimed {
        return Err(ProofError::WrongKey { claimed });
    }
    let key = VerifyingKey::from_bytes(key).map_err(|_| ProofError::InvalidKey)?;
    key.verify_strict(transcript, &Signature::from_bytes(sig)).map_err(|_| ProofError::BadSignature { claimed })
}

/// Why a probe's answer does not show the probed node alive and a member.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProbeError {
    /// Another node answered at the address (say, one restarted there with a new identity), or the signature does
    /// not verify over this probe.
    #[error("the probe's answer is no proof of node {expected}: {why}")]
    Identity {
        /// The node probed.
        expected: NodeId,
        /// What was wrong with the proof.
        why: ProofError,
    },
    /// The node refused the probe: it is no member of the channel (its channel is gone), or is another node, or
    /// speaks another version.
    #[error("the probe was refused ({code:?}): {reason}")]
    Refused {
        /// The close code.
        code: CloseCode,
        /// The node's reason.
        reason: String,
    },
}

/// Decides on the answer to our `ProbeHello` (node `me` probing node `expected` about `channel` with `nonce`): `Ok`
/// exactly when it is `expected`'s signature over this probe. Pure; the signature check costs one Ed25519
/// verification.
pub fn check_probe_answer(
    answer: &Message,
    expected: NodeId,
    me: NodeId,
    channel: ChannelId,
    nonce: u64,
) -> Result<(), ProbeError> {
    match answer {
        Message::Close { code, reason } => Err(ProbeError::Refused { code: *code, reason: reason.clone() }),
        other => check(other, expected, &probe_transcript(expected, me, channel, nonce))
            .map_err(|why| ProbeError::Identity { expected, why }),
    }
}

/// What the accepting side of a node link does with the connection's first message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accept {
    /// A node speaking our version: go on with the duplicate rule, then answer `HelloAck`.
    Node {
        /// The dialling node.
        peer: NodeId,
        /// Its listening address.
        addr: String,
    },
    /// A probe of this node (tree mode's liveness check): if this node is a member of `channel`, answer with
    /// [`Identity::probe_proof`], else refuse; then close. No link, no peer.
    Probe {
        /// The prober.
        from: NodeId,
        /// The channel.
        channel: ChannelId,
        /// The nonce to sign.
        nonce: u64,
    },
    /// Refuse the connection: send `Close` with this code and reason, then close.
    Refuse {
        /// The close code.
        code: CloseCode,
        /// Why, for the peer's logs and errors.
        reason: String,
    },
}

/// Decides on the first message of an inbound connection to node `me`.
pub fn accept_first(first: &Message, me: NodeId) -> Accept {
    let refuse = |code, reason: String| Accept::Refuse { code, reason };
    match first {
        Message::Hello { version, .. } if *version != PROTOCOL_VERSION => refuse(
            CloseCode::VersionMismatch,
            format!(
                "protocol version mismatch: this node speaks version {PROTOCOL_VERSION}, the peer speaks version \
                 {version}"
            ),
        ),
        Message::Hello { purpose: Purpose::Registry | Purpose::RegistryPeer, .. } => {
            refuse(CloseCode::Handshake, "this is a kecho node, not a registry".into())
        }
        Message::Hello { node, .. } if *node == me => refuse(CloseCode::Handshake, "connection to self".into()),
        Message::Hello { node, addr, purpose: Purpose::Node, .. } => Accept::Node { peer: *node, addr: addr.clone() },
        Message::ProbeHello { version, .. } if *version != PROTOCOL_VERSION => refuse(
            CloseCode::VersionMismatch,
            format!("protocol version mismatch: this node speaks version {PROTOCOL_VERSION}, the prober {version}"),
        ),
        // Another node listens at the address the prober has for `to` (one restarted there with a new identity):
        // refused at no cost (no signature).
        Message::ProbeHello { to, .. } if *to != me => {
            refuse(CloseCode::Handshake, format!("this is node {me}, not {to}"))
        }
        Message::ProbeHello { from, channel, nonce, .. } => {
            Accept::Probe { from: *from, channel: *channel, nonce: *nonce }
        }
        other => refuse(CloseCode::Handshake, format!("expected Hello, got message kind {}", other.kind())),
    }
}

/// What a dialling node concludes from the answer to its `Hello`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dial {
    /// The link is up.
    Up,
    /// The peer has a link with us already (its own dial won the duplicate rule): use that one.
    Duplicate,
    /// The link failed, for this reason.
    Failed(DialError),
}

/// Why the answer to our `Hello` does not bring the link up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// Another node answered at the address.
    #[error("{addr} is node {node}, expected {expected}")]
    WrongNode {
        /// The address dialled.
        addr: String,
        /// The node that answered.
        node: NodeId,
        /// The node we meant to reach.
        expected: NodeId,
    },
    /// The peer answered with another protocol version.
    #[error("version mismatch: the peer answered with version {theirs}")]
    VersionMismatch {
        /// The peer's version.
        theirs: u16,
    },
    /// The peer refused us because it speaks another protocol version (its reason says which).
    #[error("version mismatch: {reason}")]
    PeerVersionMismatch {
        /// The peer's reason.
        reason: String,
    },
    /// The peer closed the connection with this code and reason.
    #[error("refused ({code:?}): {reason}")]
    Refused {
        /// The close code.
        code: CloseCode,
        /// The peer's reason.
        reason: String,
    },
    /// Another message came where `HelloAck` or `Close` was due.
    #[error("unexpected handshake answer kind {kind}")]
    Unexpected {
        /// The kind of the message that came.
        kind: u8,
    },
}

/// Decides on the answer to our `Hello`, sent to `addr` where we expected node `expected`.
pub fn dial_answer(answer: &Message, expected: NodeId, addr: &str) -> Dial {
    match answer {
        Message::HelloAck { version, node } if *version == PROTOCOL_VERSION && *node == expected => Dial::Up,
        Message::HelloAck { node, .. } if *node != expected => {
            Dial::Failed(DialError::WrongNode { addr: addr.to_owned(), node: *node, expected })
        }
        Message::HelloAck { version, .. } => Dial::Failed(DialError::VersionMismatch { theirs: *version }),
        Message::Close { code: CloseCode::Duplicate, .. } => Dial::Duplicate,
        Message::Close { code: CloseCode::VersionMismatch, reason } => {
            Dial::Failed(DialError::PeerVersionMismatch { reason: reason.clone() })
        }
        Message::Close { code, reason } => Dial::Failed(DialError::Refused { code: *code, reason: reason.clone() }),
        other => Dial::Failed(DialError::Unexpected { kind: other.kind() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_both_nodes_and_the_key() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let c = Identity::from_secret([3; 32]);
        let (ia, ib, ic) = (a.node_id(), b.node_id(), c.node_id());
        assert_ne!(ia, ib);
        let hello = a.hello_proof(ib, "10.0.0.1:7");
        assert_eq!(check_hello_proof(&hello, ia, "10.0.0.1:7", ib), Ok(()));
        // Shown to another node, or with another address, or claimed by another node, it fails.
        assert_eq!(check_hello_proof(&hello, ia, "10.0.0.1:7", ic), Err(ProofError::BadSignature { claimed: ia }));
        assert_eq!(check_hello_proof(&hello, ia, "10.0.0.9:7", ib), Err(ProofError::BadSignature { claimed: ia }));
        assert_eq!(check_hello_proof(&hello, ic, "10.0.0.1:7", ib), Err(ProofError::WrongKey { claimed: ic }));
        // C cannot make a proof for A's id.
        let forged = match c.hello_proof(ib, "10.0.0.1:7") {
            Message::Proof { sig, .. } => Message::Proof { key: a.public_key(), sig },
            other => panic!("{other:?}"),
        };
        assert_eq!(check_hello_proof(&forged, ia, "10.0.0.1:7", ib), Err(ProofError::BadSignature { claimed: ia }));
        let ack = b.ack_proof(ia);
        assert_eq!(check_ack_proof(&ack, ib, ia), Ok(()));
        assert!(check_ack_proof(&ack, ib, ic).is_err());
        assert!(check_ack_proof(&hello, ia, ib).is_err(), "a hello proof is no ack proof");
        let e = check_ack_proof(&Message::Ping(1), ib, ia).unwrap_err();
        assert!(matches!(e, ProofError::NotAProof { .. }), "{e}");
        assert_eq!(Identity::from_secret(a.secret()).node_id(), ia);
    }

    /// A probe's answer counts only as the probed node's signature over this very probe: an answer of a node
    /// restarted at the address with a new identity, one made for another nonce, channel or prober, or a refusal
    /// (its channel gone), all fail the probe.
    #[test]
    fn a_probe_answer_proves_the_probed_node_and_this_probe() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let restarted = Identity::from_secret([4; 32]);
        let (ia, ib) = (a.node_id(), b.node_id());
        let ch = ChannelId(77);
        let answer = b.probe_proof(ia, ch, 5);
        assert_eq!(check_probe_answer(&answer, ib, ia, ch, 5), Ok(()));
        // Identity mismatch: the node at the address now is another one.
        let other = restarted.probe_proof(ia, ch, 5);
        let e = check_probe_answer(&other, ib, ia, ch, 5).unwrap_err();
        assert_eq!(e, ProbeError::Identity { expected: ib, why: ProofError::WrongKey { claimed: ib } });
        // Replayed for another nonce, channel or prober; a handshake proof is no probe proof.
        let bad = ProbeError::Identity { expected: ib, why: ProofError::BadSignature { claimed: ib } };
        assert_eq!(check_probe_answer(&answer, ib, ia, ch, 6), Err(bad.clone()));
        assert_eq!(check_probe_answer(&answer, ib, ia, ChannelId(78), 5), Err(bad.clone()));
        assert_eq!(check_probe_answer(&b.probe_proof(NodeId(3), ch, 5), ib, ia, ch, 5), Err(bad.clone()));
        assert_eq!(check_probe_answer(&b.ack_proof(ia), ib, ia, ch, 5), Err(bad));
        // Refused (its channel is gone), or something else entirely.
        let gone = Message::Close { code: CloseCode::Handshake, reason: "no such channel".into() };
        let e = check_probe_answer(&gone, ib, ia, ch, 5).unwrap_err();
        assert_eq!(e.to_string(), "the probe was refused (Handshake): no such channel");
        assert!(matches!(
            check_probe_answer(&Message::Ping(1), ib, ia, ch, 5),
            Err(ProbeError::Identity { why: ProofError::NotAProof { .. }, .. })
        ));
    }

    #[test]
    fn a_probe_is_accepted_only_for_this_node_and_version() {
        let me = NodeId(7);
        let probe = |version, to| Message::ProbeHello { version, from: NodeId(1), to, channel: ChannelId(2), nonce: 3 };
        assert_eq!(
            accept_first(&probe(PROTOCOL_VERSION, me), me),
            Accept::Probe { from: NodeId(1), channel: ChannelId(2), nonce: 3 }
        );
        let Accept::Refuse { code, reason } = accept_first(&probe(PROTOCOL_VERSION, NodeId(8)), me) else { panic!() };
        assert_eq!(
            (code, reason.as_str()),
            (CloseCode::Handshake, "this is node 0000000000000007, not 0000000000000008")
        );
        let Accept::Refuse { code, .. } = accept_first(&probe(PROTOCOL_VERSION + 1, me), me) else { panic!() };
        assert_eq!(code, CloseCode::VersionMismatch);
    }

    #[test]
    fn dial_answers_say_why_they_fail() {
        let (me, other) = (NodeId(1), NodeId(2));
        let ack = |version, node| Message::HelloAck { version, node };
        assert_eq!(dial_answer(&ack(PROTOCOL_VERSION, me), me, "a:1"), Dial::Up);
        let wrong = dial_answer(&ack(PROTOCOL_VERSION, other), me, "a:1");
        assert_eq!(wrong, Dial::Failed(DialError::WrongNode { addr: "a:1".into(), node: other, expected: me }));
        let Dial::Failed(e) = dial_answer(&ack(PROTOCOL_VERSION + 1, me), me, "a:1") else { panic!("not a failure") };
        assert_eq!(e.to_string(), format!("version mismatch: the peer answered with version {}", PROTOCOL_VERSION + 1));
        let close = |code, reason: &str| Message::Close { code, reason: reason.into() };
        assert_eq!(dial_answer(&close(CloseCode::Duplicate, ""), me, "a:1"), Dial::Duplicate);
        let Dial::Failed(e) = dial_answer(&close(CloseCode::VersionMismatch, "v9"), me, "a:1") else { panic!() };
        assert_eq!(e.to_string(), "version mismatch: v9");
        let Dial::Failed(e) = dial_answer(&close(CloseCode::Handshake, "no"), me, "a:1") else { panic!() };
        assert_eq!(e.to_string(), "refused (Handshake): no");
        assert!(matches!(dial_answer(&Message::Ping(1), me, "a:1"), Dial::Failed(DialError::Unexpected { .. })));
    }
}
