//! The liveness check of a channel's members in tree mode (docs/SCALE.md, "Guarantees in tree mode"), after SWIM
//! (Das, Gupta and Motivala, 2002), sans-IO: time in milliseconds passed in, outputs polled, seeded randomness.
//!
//! In tree mode only a member's overlay neighbours notice its death (their links fail). A member whose neighbours all
//! died with it (30 % of a channel killed at once) would stay in every survivor's view for good. So every
//! [`ProbeConfig::period`] each member probes one other member that is *not* one of its neighbours (whose links'
//! heartbeats watch them already): the member nodes are taken in a shuffled round-robin order, so that each is
//! probed by every prober within one pass. A probe needs no link: the I/O layer opens a connection to the node and
//! sends a `ProbeHello` (`crate::codec::Message::ProbeHello`), which the node answers before any handshake with its
//! signature over the probe's nonce (`crate::handshake::check_probe_answer`), or refuses if it is no member of the
//! channel; a good answer goes to [`Prober::ack`], a bad one or a failed connection to [`Prober::failed`] with what
//! went wrong. (A `GossipMsg::Probe` on a link that is up, answered by a `ProbeAck`, counts the same.) A probe
//! unanswered within
//! [`ProbeConfig::timeout`] does not declare the node dead: it makes it *suspected* ([`ProbeOut::Suspect`]: the
//! I/O layer broadcasts the suspicion through the overlay, and the suspected node, if it is alive and hears it,
//! refutes it by publishing a newer snapshot, its incarnation number). A suspicion not refuted within
//! [`ProbeConfig::suspect_for`] (no newer snapshot version of the node seen, no late answer) becomes
//! [`ProbeOut::Dead`]: the I/O layer broadcasts a goodbye on the node's behalf, as a neighbour does when its link
//! fails; a node that is alive and hears it publishes a newer snapshot and is back.
//!
//! Cost: one probe and one answer per member per period, whatever the channel's size (one connection, one signature
//! at the probed node and one verification at the prober); a suspicion is one broadcast per failed probe.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::NodeId;

/// Periods of the liveness check, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConfig {
    /// How often a member probes another.
    pub period: u64,
    /// A probe unanswered this long makes its node suspected.
    pub timeout: u64,
    /// A suspicion not refuted this long makes its node taken for gone (at least; see `suspect_per_decade`).
    pub suspect_for: u64,
    /// A suspicion lasts at least this long per decade of the channel's members (`log10` of the member count), as
    /// memberlist scales it: a refutation crosses more overlay hops, each on a host that may stall, in a larger
    /// channel. 4 s per decade: 10.4 s at 400 members, 6.4 s at 40.
    pub suspect_per_decade: u64,
    /// A member whose own timer ran this late (its process did not run: a loaded host) has not seen the answers and
    /// refutations that may be waiting unread for it: it gives each due probe and suspicion another `timeout`
    /// instead of deciding on them (Lifeguard's local health, in its simplest form).
    pub late_after: u64,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig { period: 1_000, timeout: 2_000, suspect_for: 3_000, suspect_per_decade: 4_000, late_after: 1_000 }
    }
}

impl ProbeConfig {
    /// How long a suspicion lasts in a channel of `members` member nodes.
    pub fn suspicion(&self, members: usize) -> u64 {
        let decades = ((members.max(1)) as f64).log10();
        self.suspect_for.max((self.suspect_per_decade as f64 * decades) as u64)
    }
}

/// What the prober asks its I/O layer to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeOut {
    /// Send `node` a probe with this nonce (dialling it if no link is up); its answer goes to [`Prober::ack`].
    Probe {
        /// The probed node.
        node: NodeId,
        /// Echoed in the answer.
        nonce: u64,
    },
    /// `node`, at snapshot `version`, did not answer: tell the members (it refutes with a newer version).
    Suspect {
        /// The suspected node.
        node: NodeId,
        /// The snapshot version it was suspected at.
        version: u64,
    },
    /// `node`'s suspicion was not refuted: take it for gone (a goodbye on its behalf at `version`).
    Dead {
        /// The node.
        node: NodeId,
        /// The snapshot version it was suspected at.
        version: u64,
    },
}

/// Why a probe failed before its timeout, as the I/O layer found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFailure {
    /// Nothing accepts at the node's address, or the connection ended before an answer (a process that died).
    Lost,
    /// The node refused the probe: it is no member of the channel (its channel is gone), or not the node probed.
    Refused,
    /// The answer is no proof of the node's identity over this probe (another node at its address, say one
    /// restarted there with a new identity).
    Identity,
}

/// Suspicions this prober raised, by what made the probe fail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Suspicions {
    /// No answer within the timeout.
    pub timed_out: u64,
    /// [`ProbeFailure::Lost`].
    pub lost: u64,
    /// [`ProbeFailure::Refused`].
    pub refused: u64,
    /// [`ProbeFailure::Identity`].
    pub identity: u64,
}

impl Suspicions {
    /// All of them.
    pub fn total(&self) -> u64 {
        self.timed_out + self.lost + self.refused + self.identity
    }
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    node: NodeId,
    version: u64,
    nonce: u64,
    deadline: u64,
    /// What made the probe fail before its timeout, if something did.
    failure: Option<ProbeFailure>,
}

/// One member's liveness check of the others.
#[derive(Clone, Debug)]
pub struct Prober {
    cfg: ProbeConfig,
    rng: u64,
    next_probe: u64,
    /// The rest of the current pass over the members, in shuffled order.
    order: Vec<NodeId>,
    pending: Option<Pending>,
    /// Suspected nodes: the version they were suspected at, and when the suspicion runs out.
    suspects: BTreeMap<NodeId, (u64, u64)>,
    nonce: u64,
    outs: VecDeque<ProbeOut>,
    probes: u64,
    suspicions: Suspicions,
}

impl Prober {
    /// A prober whose first probe is due one period after `now` (a jittered part of it, so that members that
    /// started together do not probe in step).
    pub fn new(cfg: ProbeConfig, seed: u64, now: u64) -> Self {
        let mut p = Prober {
            cfg,
            rng: seed | 1,
            next_probe: 0,
            order: Vec::new(),
            pending: None,
            suspects: BTreeMap::new(),
            nonce: seed.rotate_left(17),
            outs: VecDeque::new(),
            probes: 0,
            suspicions: Suspicions::default(),
        };
        p.next_probe = now + cfg.period / 2 + p.below(cfg.period.max(1));
        p
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// Probes sent so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// Suspicions raised so far, by cause.
    pub fn suspicions(&self) -> Suspicions {
        self.suspicions
    }

    /// Nodes suspected now.
    pub fn suspects(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.suspects.keys().copied()
    }

    /// The answer to a probe arrived from `from`: it is alive (a late answer refutes a suspicion too).
    pub fn ack(&mut self, from: NodeId, nonce: u64) {
        if self.pending.is_some_and(|p| p.node == from && p.nonce == nonce) {
            self.pending = None;
        }
        self.suspects.remove(&from);
    }

    /// The nonce of the unanswered probe of `node`, if one is.
    pub fn pending_nonce(&self, node: NodeId) -> Option<u64> {
        self.pending.filter(|p| p.node == node).map(|p| p.nonce)
    }

    /// The probe of `node` with `nonce` failed before its timeout, for reason `why`: treated as unanswered now (a
    /// suspicion at the next [`Prober::handle_timeout`], which the node refutes if it is alive and a member). A
    /// failure of an earlier probe (another nonce) is ignored.
    pub fn failed(&mut self, node: NodeId, nonce: u64, why: ProbeFailure, now: u64) {
        if let Some(p) = self.pending.as_mut().filter(|p| p.node == node && p.nonce == nonce) {
            p.deadline = p.deadline.min(now);
            p.failure.get_or_insert(why);
        }
    }

    /// When [`Prober::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_probe;
        if let Some(p) = self.pending {
            t = t.min(p.deadline);
        }
        for (_, deadline) in self.suspects.values() {
            t = t.min(*deadline);
        }
        t
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<ProbeOut> {
        self.outs.pop_front()
    }

    /// Advances to `now`. `members`: every other member node this member knows, with its snapshot version;
    /// `neighbours`: those whose links the overlay watches (not probed).
    pub fn handle_timeout(&mut self, now: u64, members: &BTreeMap<NodeId, u64>, neighbours: &BTreeSet<NodeId>) {
        let due = self.poll_timeout();
        // A suspicion ends when its node is gone from the view (someone took it for gone, or it left) or refuted with
        // a newer snapshot, and a probe of a node that left the view or became a neighbour is void: bookkeeping that
        // needs no answer from anyone, so it is done even on a late tick.
        self.suspects.retain(|node, (version, _)| matches!(members.get(node), Some(v) if *v <= *version));
        if self.pending.is_some_and(|p| !members.contains_key(&p.node) || neighbours.contains(&p.node)) {
            self.pending = None;
        }
        if now >= due.saturating_add(self.cfg.late_after) {
            // This member did not run for a while: answers and refutations may be waiting unread in its sockets.
            // Nothing is decided on what it could not see; every decision due gets another `timeout` to come.
            let again = now + self.cfg.timeout;
            if let Some(p) = self.pending.as_mut().filter(|p| p.deadline <= now) {
                p.deadline = again;
            }
            for (_, deadline) in self.suspects.values_mut() {
                if *deadline <= now {
                    *deadline = again;
                }
            }
            self.next_probe = self.next_probe.max(again.min(now + self.cfg.period));
            return;
        }
        // A suspicion still standing (above) that ran out: the node is taken for gone.
        let expired: Vec<(NodeId, u64)> =
            self.suspects.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(n, (v, _))| (*n, *v)).collect();
        for (node, version) in expired {
            self.suspects.remove(&node);
            self.outs.push_back(ProbeOut::Dead { node, version });
        }
        if let Some(p) = self.pending {
            if p.deadline <= now {
                self.pending = None;
                let version = members[&p.node].max(p.version);
                if !self.suspects.contains_key(&p.node) {
                    self.suspects.insert(p.node, (version, now + self.cfg.suspicion(members.len() + 1)));
                    self.outs.push_back(ProbeOut::Suspect { node: p.node, version });
                    let count = match p.failure {
                        None => &mut self.suspicions.timed_out,
                        Some(ProbeFailure::Lost) => &mut self.suspicions.lost,
                        Some(ProbeFailure::Refused) => &mut self.suspicions.refused,
                        Some(ProbeFailure::Identity) => &mut self.suspicions.identity,
                    };
                    *count += 1;
                }
            }
        }
        if now < self.next_probe {
            return;
        }
        self.next_probe = now + self.cfg.period;
        if self.pending.is_some() {
            // One probe at a time: the next waits for this one's answer or timeout.
            return;
        }
        let eligible =
            |n: &NodeId, s: &Self| members.contains_key(n) && !neighbours.contains(n) && !s.suspects.contains_key(n);
        let mut target = None;
        for pass in 0..2 {
            while let Some(n) = self.order.pop() {
                if eligible(&n, self) {
                    target = Some(n);
                    break;
                }
            }
            if target.is_some() || pass == 1 {
                break;
            }
            // A new pass over the members, in a fresh random order.
            let mut order: Vec<NodeId> = members.keys().copied().collect();
            for i in (1..order.len()).rev() {
                let j = self.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
            self.order = order;
        }
        let Some(node) = target else { return };
        self.nonce = self.nonce.wrapping_add(1);
        let nonce = self.nonce;
        self.probes += 1;
        let deadline = now + self.cfg.timeout;
        self.pending = Some(Pending { node, version: members[&node], nonce, deadline, failure: None });
        self.outs.push_back(ProbeOut::Probe { node, nonce });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(ids: &[(u64, u64)]) -> BTreeMap<NodeId, u64> {
        ids.iter().map(|(n, v)| (NodeId(*n), *v)).collect()
    }

    fn drain(p: &mut Prober) -> Vec<ProbeOut> {
        std::iter::from_fn(|| p.poll_output()).collect()
    }

    /// Runs the prober to `until` in steps of 10 ms, answering the probes of the nodes in `alive`.
    fn run(p: &mut Prober, from: u64, until: u64, m: &BTreeMap<NodeId, u64>, alive: &[u64]) -> Vec<ProbeOut> {
        let mut seen = Vec::new();
        let none = BTreeSet::new();
        let mut t = from;
        while t <= until {
            p.handle_timeout(t, m, &none);
            for o in drain(p) {
                if let ProbeOut::Probe { node, nonce } = o {
                    if alive.contains(&node.0) {
                        p.ack(node, nonce);
                    }
                }
                seen.push(o);
            }
            t += 10;
        }
        seen
    }

    #[test]
    fn every_member_is_probed_once_per_pass_and_neighbours_never() {
        let mut p = Prober::new(ProbeConfig::default(), 7, 0);
        let m = members(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
        let neighbours: BTreeSet<NodeId> = [NodeId(5)].into();
        let mut probed = Vec::new();
        for t in (0..=8_500).step_by(10) {
            p.handle_timeout(t, &m, &neighbours);
            for o in drain(&mut p) {
                let ProbeOut::Probe { node, nonce } = o else { panic!("{o:?}") };
                p.ack(node, nonce);
                probed.push(node.0);
            }
        }
        assert!((7..=9).contains(&probed.len()), "one probe per period: {probed:?}");
        let mut first: Vec<u64> = probed[..4].to_vec();
        first.sort();
        assert_eq!(first, vec![1, 2, 3, 4], "each non-neighbour once per pass");
    }

    #[test]
    fn an_unanswered_probe_suspects_then_takes_for_gone() {
        let mut p = Prober::new(ProbeConfig::default(), 3, 0);
        let m = members(&[(9, 4)]);
        let seen = run(&mut p, 0, 8_000, &m, &[]);
        let at = |o: &ProbeOut| seen.iter().position(|x| x == o);
        let suspect = at(&ProbeOut::Suspect { node: NodeId(9), version: 4 }).expect("suspected");
        let dead = at(&ProbeOut::Dead { node: NodeId(9), version: 4 }).expect("taken for gone");
        assert!(suspect < dead);
        assert_eq!(seen.iter().filter(|o| matches!(o, ProbeOut::Dead { .. })).count(), 1);
    }

    #[test]
    fn a_newer_snapshot_or_a_late_answer_refutes_a_suspicion() {
        // Refuted by a newer version.
        let mut p = Prober::new(ProbeConfig::default(), 3, 0);
        let seen = run(&mut p, 0, 3_990, &members(&[(9, 4)]), &[]);
        assert!(seen.contains(&ProbeOut::Suspect { node: NodeId(9), version: 4 }), "{seen:?}");
        let seen = run(&mut p, 4_000, 20_000, &members(&[(9, 5)]), &[9]);
        assert!(!seen.iter().any(|o| matches!(o, ProbeOut::Dead { .. } | ProbeOut::Suspect { .. })), "{seen:?}");
        // Refuted by an answer that came late.
        let mut p = Prober::new(ProbeConfig::default(), 3, 0);
        let m = members(&[(9, 4)]);
        let seen = run(&mut p, 0, 3_990, &m, &[]);
        let Some(ProbeOut::Probe { nonce, .. }) = seen.iter().find(|o| matches!(o, ProbeOut::Probe { .. })).copied()
        else {
            panic!("no probe")
        };
        p.ack(NodeId(9), nonce);
        let seen = run(&mut p, 4_000, 20_000, &m, &[9]);
        assert!(!seen.iter().any(|o| matches!(o, ProbeOut::Dead { .. })), "{seen:?}");
    }

    #[test]
    fn a_suspicion_lasts_longer_in_a_larger_channel() {
        let cfg = ProbeConfig::default();
        assert_eq!(cfg.suspicion(5), 3_000);
        assert_eq!(cfg.suspicion(40), 6_408);
        assert_eq!(cfg.suspicion(400), 10_408);
    }

    /// A member that did not run past a probe's timeout (its own process stalled) does not suspect on what it could
    /// not read: the probe gets another timeout, and an answer read then counts.
    #[test]
    fn a_member_that_did_not_run_decides_nothing_on_what_it_could_not_read() {
        let mut p = Prober::new(ProbeConfig::default(), 3, 0);
        let m = members(&[(9, 4)]);
        let none = BTreeSet::new();
        let mut probe = None;
        let mut t = 0;
        while probe.is_none() {
            p.handle_timeout(t, &m, &none);
            probe = drain(&mut p).into_iter().find_map(|o| match o {
                ProbeOut::Probe { node, nonce } => Some((node, nonce)),
                _ => None,
            });
            t += 10;
        }
        // Its next timer comes 4 s late (the probe's timeout was 2 s): no suspicion.
        let late = p.poll_timeout() + 4_000;
        p.handle_timeout(late, &m, &none);
        assert!(drain(&mut p).is_empty(), "decided while it did not run");
        // The answer that was waiting is read now, and counts.
        let (node, nonce) = probe.expect("probed");
        p.ack(node, nonce);
        let seen = run(&mut p, late + 10, late + 1_500, &m, &[9]);
        assert!(!seen.iter().any(|o| matches!(o, ProbeOut::Suspect { .. } | ProbeOut::Dead { .. })), "{seen:?}");
    }

    #[test]
    fn a_node_that_left_the_view_is_no_longer_suspected_or_probed() {
        let mut p = Prober::new(ProbeConfig::default(), 5, 0);
        run(&mut p, 0, 3_990, &members(&[(9, 4)]), &[]);
        assert_eq!(p.suspects().collect::<Vec<_>>(), vec![NodeId(9)]);
        let seen = run(&mut p, 4_000, 20_000, &members(&[]), &[]);
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(p.suspects().count(), 0);
    }

    /// The first probe `p` sends when run from 0 with members `m`, and when.
    fn first_probe(p: &mut Prober, m: &BTreeMap<NodeId, u64>) -> (NodeId, u64, u64) {
        let none = BTreeSet::new();
        let mut t = 0;
        loop {
            p.handle_timeout(t, m, &none);
            for o in drain(p) {
                if let ProbeOut::Probe { node, nonce } = o {
                    return (node, nonce, t);
                }
            }
            t += 10;
        }
    }

    /// A probe answered by another identity (a node restarted at the member's address), refused (the member's
    /// channel is gone) or whose connection failed suspects the member at once, not after the timeout, and each
    /// suspicion is counted under its cause; an unanswered one under the timeout.
    #[test]
    fn a_failed_probe_suspects_at_once_and_is_counted_by_cause() {
        for why in [ProbeFailure::Identity, ProbeFailure::Refused, ProbeFailure::Lost] {
            let mut p = Prober::new(ProbeConfig::default(), 3, 0);
            let m = members(&[(9, 4)]);
            let (node, nonce, at) = first_probe(&mut p, &m);
            p.failed(node, nonce, why, at + 20);
            p.handle_timeout(at + 20, &m, &BTreeSet::new());
            assert_eq!(drain(&mut p), vec![ProbeOut::Suspect { node, version: 4 }], "{why:?}");
            let s = p.suspicions();
            let counted = match why {
                ProbeFailure::Identity => s.identity,
                ProbeFailure::Refused => s.refused,
                ProbeFailure::Lost => s.lost,
            };
            assert_eq!((counted, s.total()), (1, 1), "{why:?}: {s:?}");
        }
        let mut p = Prober::new(ProbeConfig::default(), 3, 0);
        let seen = run(&mut p, 0, 3_990, &members(&[(9, 4)]), &[]);
        assert!(seen.contains(&ProbeOut::Suspect { node: NodeId(9), version: 4 }), "{seen:?}");
        assert_eq!(p.suspicions(), Suspicions { timed_out: 1, ..Suspicions::default() });
    }

    /// A failure reported for an earlier probe (a connection of a probe already answered, ending late) does not fail
    /// the current probe of a live member: only the current probe's answer or failure counts.
    #[test]
    fn a_failure_of_an_earlier_probe_does_not_suspect_a_live_member() {
        let cfg = ProbeConfig { period: 500, ..ProbeConfig::default() };
        let mut p = Prober::new(cfg, 3, 0);
        let m = members(&[(9, 4)]);
        let (node, first, at) = first_probe(&mut p, &m);
        p.ack(node, first);
        // The next probe of the same member.
        let none = BTreeSet::new();
        let mut t = at + 10;
        let second = loop {
            p.handle_timeout(t, &m, &none);
            if let Some(ProbeOut::Probe { nonce, .. }) =
                drain(&mut p).into_iter().find(|o| matches!(o, ProbeOut::Probe { .. }))
            {
                break nonce;
            }
            t += 10;
        };
        assert_ne!(first, second);
        p.failed(node, first, ProbeFailure::Lost, t + 10);
        p.ack(node, second);
        let seen = run(&mut p, t + 20, t + 600, &m, &[9]);
        assert!(!seen.iter().any(|o| matches!(o, ProbeOut::Suspect { .. })), "{seen:?}");
        assert_eq!(p.suspicions().total(), 0);
    }

    /// What a peer, the overlay or the clock can do to a prober.
    #[derive(Clone, Debug)]
    enum Input {
        /// Time passes (ms).
        Wait(u64),
        /// An answer from `node` with a nonce: the pending probe's, or any other (late, repeated or forged).
        Ack { node: u64, right: bool, nonce: u64 },
        /// A probe of `node` failed (with the pending probe's nonce or another).
        Failed { node: u64, right: bool, nonce: u64, why: u8 },
        /// The view changes: member `node` is at `version` (0: it left the view).
        View { node: u64, version: u64 },
        /// The overlay takes `node` as a neighbour, or drops it.
        Neighbour { node: u64, on: bool },
    }

    fn input() -> impl proptest::strategy::Strategy<Value = Input> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u64..4_000).prop_map(Input::Wait),
            2 => (0u64..8, any::<bool>(), any::<u64>()).prop_map(|(node, right, nonce)| Input::Ack { node, right, nonce }),
            1 => (0u64..8, any::<bool>(), any::<u64>(), 0u8..3)
                .prop_map(|(node, right, nonce, why)| Input::Failed { node, right, nonce, why }),
            2 => (0u64..8, 0u64..6).prop_map(|(node, version)| Input::View { node, version }),
            1 => (0u64..8, any::<bool>()).prop_map(|(node, on)| Input::Neighbour { node, on }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Whatever it is fed, the prober never panics, is never due again at once (its I/O layer sleeps until
        /// `poll_timeout`: a timeout not past `now` would wake it in a loop), probes one node at a time and only
        /// members that are neither neighbours nor suspected, and takes for gone only a member it suspected.
        #[test]
        fn the_prober_holds_its_invariants_under_any_input(
            seed in proptest::prelude::any::<u64>(),
            start in 0u64..1_000_000,
            inputs in proptest::collection::vec(input(), 1..120),
        ) {
            let mut p = Prober::new(ProbeConfig::default(), seed, start);
            let (mut now, mut members, mut neighbours) = (start, BTreeMap::new(), BTreeSet::new());
            let mut suspected: BTreeSet<NodeId> = BTreeSet::new();
            let mut raised = 0u64;
            for i in inputs {
                match i {
                    Input::Wait(ms) => now += ms,
                    Input::Ack { node, right, nonce } => {
                        let node = NodeId(node);
                        let nonce = match p.pending_nonce(node) {
                            Some(n) if right => n,
                            _ => nonce,
                        };
                        p.ack(node, nonce);
                        suspected.remove(&node);
                    }
                    Input::Failed { node, right, nonce, why } => {
                        let node = NodeId(node);
                        let nonce = match p.pending_nonce(node) {
                            Some(n) if right => n,
                            _ => nonce,
                        };
                        let why = [ProbeFailure::Lost, ProbeFailure::Refused, ProbeFailure::Identity][why as usize];
                        p.failed(node, nonce, why, now);
                    }
                    Input::View { node, version: 0 } => {
                        members.remove(&NodeId(node));
                    }
                    Input::View { node, version } => {
                        members.insert(NodeId(node), version);
                    }
                    Input::Neighbour { node, on: true } => {
                        neighbours.insert(NodeId(node));
                    }
                    Input::Neighbour { node, on: false } => {
                        neighbours.remove(&NodeId(node));
                    }
                }
                if p.poll_timeout() > now {
                    continue;
                }
                p.handle_timeout(now, &members, &neighbours);
                proptest::prop_assert!(p.poll_timeout() > now, "due again at once: {} at {now}", p.poll_timeout());
                while let Some(o) = p.poll_output() {
                    match o {
                        ProbeOut::Probe { node, .. } => {
                            proptest::prop_assert!(members.contains_key(&node), "probed a non-member {node:?}");
                            proptest::prop_assert!(!neighbours.contains(&node), "probed a neighbour {node:?}");
                            proptest::prop_assert!(p.suspects().all(|s| s != node), "probed a suspect {node:?}");
                        }
                        ProbeOut::Suspect { node, .. } => {
                            proptest::prop_assert!(members.contains_key(&node), "suspected a non-member {node:?}");
                            suspected.insert(node);
                            raised += 1;
                        }
                        ProbeOut::Dead { node, version } => {
                            proptest::prop_assert!(suspected.remove(&node), "gone without a suspicion: {node:?}");
                            proptest::prop_assert!(members.get(&node).is_some_and(|v| *v <= version));
                        }
                    }
                }
                // At most one probe outstanding.
                let outstanding: Vec<NodeId> = members.keys().filter(|n| p.pending_nonce(**n).is_some()).copied().collect();
                proptest::prop_assert!(outstanding.len() <= 1, "{outstanding:?}");
                proptest::prop_assert!(p.suspects().all(|n| members.contains_key(&n)), "a suspect out of the view");
                suspected.retain(|n| p.suspects().any(|s| s == *n));
                // Every suspicion is counted under exactly one cause.
                proptest::prop_assert_eq!(p.suspicions().total(), raised);
            }
        }
    }
}
