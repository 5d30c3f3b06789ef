//! Tree mode's liveness check (docs/SCALE.md, "Guarantees in tree mode"): the node side of `kecho_proto::probe`.
//!
//! Only a member's overlay neighbours notice its death (their links fail); a member killed together with its whole
//! active view was noticed by nobody and stayed in every survivor's view. So every `NodeBuilder::tree_probe_every` each node in
//! tree mode probes one member that is not its neighbour. The probe needs no link: a connection of its own that
//! carries one `ProbeHello`, answered by the probed node's accept path before any handshake with its signature over
//! the probe's nonce (so the answer proves the node's identity and that it is still a member of the channel, not
//! only that something listens at its address), then closed (`link/dial.rs`, `probe` and `answer_probe`). One
//! signature at the probed node, one verification here, no link tasks, and nothing for either side's sweep to close
//! under the probe; a link that stalls (its queue full, its reader waiting on a slow sink) delays nothing. A probe
//! unanswered within the timeout, or that failed (nothing accepts, the node refused, the answer is no proof),
//! makes the node suspected: a `Suspect` broadcast on this node's membership stream, which the suspected node
//! refutes, if it is alive and hears it, by publishing a newer snapshot. A suspicion not refuted in time becomes a
//! goodbye on the node's behalf, as a neighbour sends when its link fails; a node that is alive and hears it
//! publishes again and is back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kecho_proto::gossip::GossipMsg;
use kecho_proto::probe::{ProbeConfig, ProbeFailure, ProbeOut};
use kecho_proto::{Message, NodeId, NodeSnapshot};

use super::{membership_stream, ChannelInner, Channels};
use crate::clock::now;

/// The liveness check's periods: a probe every `period` (`NodeBuilder::tree_probe_every`, 5 s by default), 2 s to
/// answer, 3 s to refute a suspicion. A dead member no neighbour noticed is out of every view a few seconds after
/// some member first probes it (a connection to a dead process fails at once); an alive one gets 5 s and more, and
/// a goodbye it hears anyway brings it back. Not every second by default: with 400 member nodes in 4 processes on 2
/// cores, a probe per member per second (then a dial and handshake each, at both ends) stalled the processes for 4
/// to 6 s at a time and a storm of 40 joins did not converge in 60 s (docs/SCALE.md).
pub(super) fn probe_config(period: Duration) -> ProbeConfig {
    ProbeConfig { period: period.as_millis().max(1) as u64, timeout: PROBE_TIMEOUT, ..ProbeConfig::default() }
}

/// How long a probe may go unanswered before its member is suspected (ms).
const PROBE_TIMEOUT: u64 = 2_000;

impl ChannelInner {
    /// A `Probe` or `ProbeAck` on a link (a `Suspect` travels only inside the overlay's broadcasts). Nodes probe with
    /// `ProbeHello` on a connection of its own; a `Probe` that comes on a link is still answered there.
    pub(super) fn probe_input(self: &Arc<Self>, node: &Arc<Channels>, from: NodeId, body: GossipMsg) {
        match body {
            GossipMsg::Probe { nonce } => self.probe_send(node, from, GossipMsg::ProbeAck { nonce }),
            GossipMsg::ProbeAck { nonce } => {
                if let Some(p) = self.tree.inner.lock().prober.as_mut() {
                    p.ack(from, nonce);
                }
            }
            other => tracing::debug!(channel = %self.name, node = %from, "{other:?} on a link, ignored"),
        }
    }

    /// This node is a member of the channel now (a `ProbeHello` asks, `link/dial.rs`).
    pub(crate) fn is_member_now(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::Acquire) && self.state.lock().is_member()
    }

    /// The answer to a `ProbeHello` of this node went out: counted as control traffic, as the probe is.
    pub(crate) fn count_probe_answer(&self, bytes: usize) {
        self.count_control(bytes);
    }

    /// A broadcast suspicion: if it is about this node at its current version or a newer one, refute it.
    pub(super) fn suspected(self: &Arc<Self>, node: &Arc<Channels>, who: NodeId, version: u64) {
        if who != node.id || version < self.state.lock().local().version {
            return;
        }
        tracing::debug!(channel = %self.name, version, "suspected by a member's liveness check: publishing again");
        self.tree.refuted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish_members();
    }

    /// Runs the liveness check if it is due, and does what it asks.
    pub(super) fn probe_tick(self: &Arc<Self>, node: &Arc<Channels>) {
        let at = now();
        let (ms, neighbours) = {
            let t = self.tree.inner.lock();
            let ms = t.ms(at);
            if t.prober.as_ref().is_none_or(|p| p.poll_timeout() > ms) {
                return;
            }
            let neighbours: BTreeSet<NodeId> =
                t.gossip.as_ref().map(|g| g.active().iter().copied().collect()).unwrap_or_default();
            (ms, neighbours)
        };
        let (members, channel) = {
            let st = self.state.lock();
            // A node that is no member (yet: a joiner may hear the overlay before its `JoinAccept`) probes nobody,
            // but its prober's timers must move on all the same: left due, they woke the tree loop again at once.
            let members: BTreeMap<NodeId, u64> = if st.is_member() {
                st.peers().iter().map(|(id, p)| (*id, p.snapshot.version)).collect()
            } else {
                BTreeMap::new()
            };
            (members, self.id())
        };
        let outs: Vec<ProbeOut> = {
            let mut t = self.tree.inner.lock();
            let Some(p) = t.prober.as_mut() else { return };
            p.handle_timeout(ms, &members, &neighbours);
            std::iter::from_fn(|| p.poll_output()).collect()
        };
        for out in outs {
            match out {
                ProbeOut::Probe { node: to, nonce } => self.probe(node, to, nonce),
                ProbeOut::Suspect { node: who, version } => {
                    tracing::debug!(channel = %self.name, node = %who, version, "a probe unanswered: suspected");
                    self.tree.suspicions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let msg =
                        Message::Gossip { channel, addrs: Vec::new(), body: GossipMsg::Suspect { node: who, version } };
                    let mut t = self.tree.inner.lock();
                    let ms = t.ms(now());
                    if let Some(g) = t.gossip.as_mut() {
                        g.broadcast_on(membership_stream(node.id), msg.to_bytes(), ms);
                    }
                }
                ProbeOut::Dead { node: who, version } => self.probe_dead(node, who, version),
            }
        }
        self.tree_execute(node);
    }

    /// A suspicion ran out unrefuted: a goodbye on `who`'s behalf, unless a link to it is up (its heartbeats say
    /// it lives) or its snapshot moved on.
    fn probe_dead(self: &Arc<Self>, node: &Arc<Channels>, who: NodeId, version: u64) {
        if node.links.is_up(who) {
            return;
        }
        let goodbye = {
            let st = self.state.lock();
            st.peers().get(&who).filter(|p| p.snapshot.version <= version).map(|p| Message::Snapshot {
                channel: self.id(),
                node: who,
                addr: p.addr.clone(),
                snapshot: NodeSnapshot {
                    version: p.snapshot.version,
                    instance: p.snapshot.instance,
                    members: Vec::new(),
                    token: None,
                },
                left: true,
                reply: false,
            })
        };
        let Some(msg) = goodbye else { return };
        tracing::debug!(channel = %self.name, node = %who, "a suspected member did not refute: telling the members");
        {
            let mut t = self.tree.inner.lock();
            let ms = t.ms(now());
            if let Some(g) = t.gossip.as_mut() {
                g.broadcast_on(membership_stream(node.id), msg.to_bytes(), ms);
            }
        }
        self.state.lock().handle_peer_lost(who, now());
        self.flush();
    }

    /// Probes `to` with `nonce` on a connection of its own (no link), and hands the outcome to the prober. A probe
    /// of a node with no address known waits for its timeout.
    fn probe(self: &Arc<Self>, node: &Arc<Channels>, to: NodeId, nonce: u64) {
        let Some(addr) = self.addr_of(node, to) else { return };
        // The `ProbeHello`'s bytes, counted as control traffic (the answer is counted where it is sent).
        let hello = Message::ProbeHello { version: 0, from: node.id, to, channel: self.id(), nonce };
        self.count_control(hello.to_bytes().len());
        let (links, weak, channel) = (node.links.clone(), Arc::downgrade(self), self.id());
        node.spawn(async move {
            let outcome = crate::link::dial::probe(&links, to, &addr, channel, nonce).await;
            if let Some(ch) = weak.upgrade() {
                ch.probe_outcome(to, nonce, outcome);
            }
        });
    }

    /// A probe's outcome: an answer that proves `to` alive and a member acks it; a failure makes it suspected at the
    /// prober's next turn (woken now); nothing decided within the handshake timeout leaves it to the prober's timeout.
    fn probe_outcome(&self, to: NodeId, nonce: u64, outcome: Option<Result<(), ProbeFailure>>) {
        let Some(outcome) = outcome else { return };
        let mut t = self.tree.inner.lock();
        let ms = t.ms(now());
        let Some(p) = t.prober.as_mut() else { return };
        match outcome {
            Ok(()) => p.ack(to, nonce),
            Err(why) => {
                p.failed(to, nonce, why, ms);
                drop(t);
                self.tree.wake.notify_one();
            }
        }
    }

    /// Where to reach `to`: the overlay's address book, a link's, or the channel's view.
    fn addr_of(&self, node: &Arc<Channels>, to: NodeId) -> Option<String> {
        let addr = self.tree.inner.lock().book.get(&to).cloned().or_else(|| node.links.addr_of(to));
        addr.or_else(|| self.state.lock().peers().get(&to).map(|p| p.addr.clone()))
    }

    /// Sends an answer to a `Probe` on a link, counted as control traffic.
    fn probe_send(&self, node: &Arc<Channels>, to: NodeId, body: GossipMsg) {
        let Some(addr) = self.addr_of(node, to) else { return };
        let frame = Message::Gossip { channel: self.id(), addrs: Vec::new(), body }.to_bytes();
        self.count_control(frame.len());
        node.links.send_frame(to, &addr, frame);
    }
}
