//! Tree mode's liveness check (docs/SCALE.md, "Guarantees in tree mode"): the node side of `kecho_proto::probe`.
//!
//! Only a member's overlay neighbours notice its death (their links fail); a member killed together with its whole
//! active view was noticed by nobody and stayed in every survivor's view. So every `NodeBuilder::tree_probe_every` each node in
//! tree mode probes one member that is not its neighbour: a `Probe` on a link to it (dialled with the normal
//! handshake if none is up, so that the answer proves the node's identity, not only that something listens at its
//! address), answered by a `ProbeAck`. A probe unanswered within the timeout, or whose dial failed, makes the node
//! suspected: a `Suspect` broadcast on this node's membership stream, which the suspected node refutes, if it is
//! alive and hears it, by publishing a newer snapshot. A suspicion not refuted in time becomes a goodbye on the
//! node's behalf, as a neighbour sends when its link fails; a node that is alive and hears it publishes again and is
//! back. The link a probe opens is closed by the prober as soon as the answer arrives (or by the next sweep after
//! its timeout).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho_proto::gossip::GossipMsg;
use kecho_proto::probe::{ProbeConfig, ProbeOut};
use kecho_proto::{Message, NodeId, NodeSnapshot};

use super::{membership_stream, ChannelInner, Channels};
use crate::clock::now;

/// The liveness check's periods: a probe every `period` (`NodeBuilder::tree_probe_every`, 5 s by default), 2 s to
/// answer, 3 s to refute a suspicion. A dead member no neighbour noticed is out of every view a few seconds after
/// some member first probes it (a dial to a dead process fails at once); an alive one gets 5 s and more, and a
/// goodbye it hears anyway brings it back. Not every second by default: with 400 member nodes in 4 processes on 2
/// cores, a probe per member per second (a dial and handshake each, at both ends) stalled the processes for 4 to 6 s
/// at a time and a storm of 40 joins did not converge in 60 s (docs/SCALE.md).
pub(super) fn probe_config(period: Duration) -> ProbeConfig {
    ProbeConfig { period: period.as_millis().max(1) as u64, timeout: PROBE_TIMEOUT, ..ProbeConfig::default() }
}

/// How long a probe may go unanswered before its member is suspected (ms).
const PROBE_TIMEOUT: u64 = 2_000;

/// A node that answered a probe keeps the link this long (so that its sweep does not close it under the answer).
const ANSWER_GRACE: Duration = Duration::from_secs(1);

impl ChannelInner {
    /// A `Probe` or `ProbeAck` from `from` (a `Suspect` travels only inside the overlay's broadcasts).
    pub(super) fn probe_input(self: &Arc<Self>, node: &Arc<Channels>, from: NodeId, body: GossipMsg) {
        match body {
            GossipMsg::Probe { nonce } => {
                // Probes may cross: an entry for this node's own unanswered probe of `from` stays one (its resend
                // when the link is lost goes by it), held at least until the answer's grace ends.
                let until = now() + ANSWER_GRACE;
                let mut t = self.tree.inner.lock();
                t.probe_links.entry(from).and_modify(|(u, _)| *u = (*u).max(until)).or_insert((until, false));
                drop(t);
                self.probe_send(node, from, GossipMsg::ProbeAck { nonce });
            }
            GossipMsg::ProbeAck { nonce } => {
                {
                    let mut t = self.tree.inner.lock();
                    t.probe_links.remove(&from);
                    if let Some(p) = t.prober.as_mut() {
                        p.ack(from, nonce);
                    }
                }
                // The probe's link is closed now unless something else uses it (links stay about five per node).
                node.release_if_unneeded(from);
            }
            other => tracing::debug!(channel = %self.name, node = %from, "{other:?} on a link, ignored"),
        }
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

    /// The link to `id` is gone while this node's probe of it is unanswered: the probe is sent once more on a new
    /// link (the far side may have closed a link that had just come up, as unneeded, before reading the probe: seen
    /// as false suspicions); if that link is lost too (a dead process refuses the dial), the probe failed.
    pub(super) fn probe_link_lost(&self, node: &Arc<Channels>, id: NodeId) {
        let at = now();
        let mut t = self.tree.inner.lock();
        let Some((_, own)) = t.probe_links.get(&id).copied() else { return };
        if !own || node.links.is_up(id) {
            return;
        }
        if t.probe_retried.insert(id) {
            let nonce = t.prober.as_ref().and_then(|p| p.pending_nonce(id));
            drop(t);
            if let Some(nonce) = nonce {
                tracing::debug!(channel = %self.name, node = %id, "a probe's link lost before the answer: probing again");
                self.probe_send(node, id, GossipMsg::Probe { nonce });
            }
            return;
        }
        t.probe_links.remove(&id);
        let ms = t.ms(at);
        if let Some(p) = t.prober.as_mut() {
            p.failed(id, ms);
        }
    }

    /// This node needs the link to `id` for a probe (its own, unanswered, or one it answers).
    pub(super) fn probe_needs_link(&self, id: NodeId, at: Instant) -> bool {
        self.tree.inner.lock().probe_links.get(&id).is_some_and(|(until, _)| *until > at)
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
            let outs: Vec<ProbeOut> = std::iter::from_fn(|| p.poll_output()).collect();
            for o in &outs {
                if let ProbeOut::Probe { node: to, .. } = o {
                    t.probe_links.insert(*to, (at + Duration::from_millis(PROBE_TIMEOUT), true));
                    t.probe_retried.remove(to);
                }
            }
            // Answered or timed-out probes' links are no longer needed (a late answer still counts).
            t.probe_links.retain(|_, (until, _)| *until > at);
            let inner = &mut *t;
            inner.probe_retried.retain(|n| inner.probe_links.contains_key(n));
            outs
        };
        for out in outs {
            match out {
                ProbeOut::Probe { node: to, nonce } => self.probe_send(node, to, GossipMsg::Probe { nonce }),
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
                snapshot: NodeSnapshot { version: p.snapshot.version, members: Vec::new(), token: None },
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

    /// Sends a probe or its answer on a link to `to` (dialled if none is up), counted as control traffic.
    fn probe_send(&self, node: &Arc<Channels>, to: NodeId, body: GossipMsg) {
        let addr = {
            let t = self.tree.inner.lock();
            t.book.get(&to).cloned().or_else(|| node.links.addr_of(to))
        };
        let Some(addr) = addr.or_else(|| self.state.lock().peers().get(&to).map(|p| p.addr.clone())) else { return };
        let frame = Message::Gossip { channel: self.id(), addrs: Vec::new(), body }.to_bytes();
        self.count_control(frame.len());
        node.links.send_frame(to, &addr, frame);
    }
}
