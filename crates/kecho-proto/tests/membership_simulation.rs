//! Simulation of the membership state machine: several nodes, one registry and a network with latency, wired in
//! memory and driven with virtual time. Heartbeats come from the real `Liveness` machine, so failure detection is
//! simulated, not assumed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use kecho_proto::codec::{Message, RegResult};
use kecho_proto::liveness::{Liveness, LivenessAction};
use kecho_proto::membership::{ChannelState, MembershipConfig, OpenFailure, OpenMode, Output};
use kecho_proto::registry::RegistryTable;
use kecho_proto::*;

const NAME: &str = "sim";
const LATENCY: Duration = Duration::from_millis(2);
const HEARTBEAT: Duration = Duration::from_millis(600);
const TICK: Duration = Duration::from_millis(1);

enum Delivery {
    Msg { from: NodeId, to: NodeId, msg: Message },
    Ping { from: NodeId, to: NodeId },
    Refused { from: NodeId, to: NodeId },
    RegRequest { from: NodeId, msg: Message },
    RegReply { to: NodeId, result: Result<RegResult, String> },
}

struct SimNode {
    st: ChannelState,
    open: Option<Result<(), OpenFailure>>,
    /// Liveness of this node's links, by peer.
    links: HashMap<NodeId, Liveness>,
}

struct Sim {
    t0: Instant,
    now: Instant,
    cfg: MembershipConfig,
    nodes: BTreeMap<NodeId, SimNode>,
    crashed: BTreeSet<NodeId>,
    registry: RegistryTable,
    registry_up: bool,
    queue: VecDeque<(Instant, Delivery)>,
}

fn member(id: u32, sink: bool) -> MemberInfo {
    let role = if sink {
        Role::Sink { types: TypeFilter::Only(vec!["x".into()]), overflow: Overflow::DropOldest, filter: None }
    } else {
        Role::Source
    };
    MemberInfo { id: LocalId(id), role, attrs: Attrs::new() }
}

impl Sim {
    fn new() -> Self {
        let t0 = Instant::now();
        let cfg = MembershipConfig {
            lease_ttl: Duration::from_millis(900),
            join_attempt: Duration::from_millis(300),
            open_timeout: Duration::from_secs(5),
            retry: Duration::from_millis(50),
        };
        Sim {
            t0,
            now: t0,
            cfg,
            nodes: BTreeMap::new(),
            crashed: BTreeSet::new(),
            registry: RegistryTable::new(),
            registry_up: true,
            queue: VecDeque::new(),
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Adds node `id` with one source and one sink and starts opening the channel.
    fn open(&mut self, id: u64, mode: OpenMode) {
        let node = NodeId(id);
        let addr = format!("10.0.0.{id}:7");
        let mut st = ChannelState::new(NAME, ChannelId(1000 + id), node, &addr, self.cfg.clone());
        st.set_members(vec![member(1, false), member(2, true)], self.now);
        st.open(mode, self.now);
        self.nodes.insert(node, SimNode { st, open: None, links: HashMap::new() });
        self.pump();
    }

    fn push(&mut self, d: Delivery) {
        self.queue.push_back((self.now + LATENCY, d));
    }

    /// Drains every node's outputs into the network.
    fn pump(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.crashed.contains(&id) {
                continue;
            }
            loop {
                let node = self.nodes.get_mut(&id).expect("node");
                let Some(out) = node.st.poll_output() else { break };
                match out {
                    Output::Send { to, msg, .. } => {
                        if self.crashed.contains(&to) && !node.links.contains_key(&to) {
                            // Connecting to a dead process is refused at once.
                            self.push(Delivery::Refused { from: id, to });
                            continue;
                        }
                        let now = self.now;
                        node.links.entry(to).or_insert_with(|| Liveness::new(now, HEARTBEAT)).on_send(now);
                        self.push(Delivery::Msg { from: id, to, msg });
                    }
                    Output::Registry(op) => {
                        let msg = node.st.registry_message(&op, 0);
                        self.push(Delivery::RegRequest { from: id, msg });
                    }
                    Output::Ready => node.open = Some(Ok(())),
                    Output::Failed(why) => node.open = Some(Err(why)),
                    Output::Changed | Output::Contact(_) => {}
                }
            }
        }
    }

    fn deliver(&mut self, d: Delivery) {
        let now = self.now;
        match d {
            Delivery::Msg { from, to, msg } => {
                if self.crashed.contains(&to) || self.crashed.contains(&from) {
                    return;
                }
                let Some(node) = self.nodes.get_mut(&to) else { return };
                node.links.entry(from).or_insert_with(|| Liveness::new(now, HEARTBEAT)).on_receive(now);
                node.st.handle_message(from, msg, now);
            }
            Delivery::Ping { from, to } => {
                if self.crashed.contains(&to) || self.crashed.contains(&from) {
                    return;
                }
                if let Some(l) = self.nodes.get_mut(&to).and_then(|n| n.links.get_mut(&from)) {
                    l.on_receive(now);
                }
            }
            Delivery::Refused { from, to } => {
                if let Some(node) = self.nodes.get_mut(&from) {
                    node.st.handle_peer_lost(to, now);
                }
            }
            Delivery::RegRequest { from, msg } => {
                let result = if self.registry_up {
                    match self.registry.handle(&msg, now) {
                        Some(Message::RegReply { result, .. }) => Ok(result),
                        other => panic!("registry answered {other:?}"),
                    }
                } else {
                    Err("registry unreachable".to_owned())
                };
                self.push(Delivery::RegReply { to: from, result });
            }
            Delivery::RegReply { to, result } => {
                if self.crashed.contains(&to) {
                    return;
                }
                if let Some(node) = self.nodes.get_mut(&to) {
                    node.st.handle_registry(result, now);
                }
            }
        }
    }

    /// One tick of virtual time: deliveries due, heartbeats, timers.
    fn tick(&mut self) {
        self.now += TICK;
        while self.queue.front().is_some_and(|(at, _)| *at <= self.now) {
            let (_, d) = self.queue.pop_front().expect("front");
            self.deliver(d);
            self.pump();
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.crashed.contains(&id) {
                continue;
            }
            let now = self.now;
            let node = self.nodes.get_mut(&id).expect("node");
            let mut pings = Vec::new();
            let mut dead = Vec::new();
            for (peer, l) in node.links.iter_mut() {
                match l.poll(now) {
                    LivenessAction::SendPing => pings.push(*peer),
                    LivenessAction::Dead => dead.push(*peer),
                    LivenessAction::Wait => {}
                }
            }
            for peer in dead {
                node.links.remove(&peer);
                node.st.handle_peer_lost(peer, now);
            }
            if node.st.poll_timeout().is_some_and(|t| t <= now) {
                node.st.handle_timeout(now);
            }
            for to in pings {
                self.push(Delivery::Ping { from: id, to });
            }
        }
        self.pump();
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.tick();
        }
    }

    /// Runs until `f` holds, at most `limit` of virtual time; returns how long it took.
    fn run_until(&mut self, limit: Duration, what: &str, f: impl Fn(&mut Sim) -> bool) -> Duration {
        let start = self.now;
        while !f(self) {
            assert!(self.now - start < limit, "{what}: not reached within {limit:?} (virtual)");
            self.tick();
        }
        self.now - start
    }

    /// Opens a channel on `ids` one after the other (the first creates it); optionally waits for full convergence.
    fn start(&mut self, ids: &[u64], converge: bool) {
        for (i, id) in ids.iter().copied().enumerate() {
            self.open(id, if i == 0 { OpenMode::Create } else { OpenMode::Open });
            self.run_until(LIMIT, "ready", |s| s.ready(id));
        }
        if converge {
            self.run_until(LIMIT, "views converge", |s| s.converged());
        }
    }

    fn crash(&mut self, id: u64) {
        self.crashed.insert(NodeId(id));
    }

    fn live(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(id, n)| !self.crashed.contains(id) && !n.st.has_left() && n.st.is_member())
            .map(|(id, _)| *id)
            .collect()
    }

    /// True when every live member sees exactly the other live members, each with its latest snapshot.
    fn converged(&self) -> bool {
        let live = self.live();
        live.iter().all(|id| {
            let st = &self.nodes[id].st;
            let peers: Vec<NodeId> = st.peers().keys().copied().collect();
            let others: Vec<NodeId> = live.iter().copied().filter(|n| n != id).collect();
            peers == others && others.iter().all(|o| st.peers()[o].snapshot == *self.nodes[o].st.local())
        })
    }

    fn registry_entry(&mut self) -> Option<kecho_proto::codec::RegEntry> {
        match self.registry.handle(&Message::RegLookup { req: 0, name: NAME.into() }, self.now) {
            Some(Message::RegReply { result: RegResult::Entry(e), .. }) => Some(e),
            _ => None,
        }
    }

    fn entry_contact(&mut self) -> Option<NodeId> {
        self.registry_entry().map(|e| e.contact)
    }

    fn ready(&self, id: u64) -> bool {
        self.nodes[&NodeId(id)].open == Some(Ok(()))
    }
}

const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn creator_and_joiners_converge_with_counts() {
    let mut sim = Sim::new();
    sim.open(10, OpenMode::Create);
    sim.run_until(LIMIT, "creator ready", |s| s.ready(10));
    for id in [20, 30, 40] {
        sim.open(id, OpenMode::Open);
        sim.run_until(LIMIT, "joiner ready", |s| s.ready(id));
    }
    sim.run_until(LIMIT, "views converge", |s| s.converged());
    for n in sim.nodes.values() {
        assert_eq!(n.st.counts(), (4, 4));
        assert_eq!(n.st.contact(), Some(NodeId(10)));
    }
    // The contact reports the counts with its next renewal.
    sim.run_for(Duration::from_millis(400));
    let e = sim.registry_entry().expect("entry");
    assert_eq!((e.contact, e.sources, e.sinks), (NodeId(10), 4, 4));
}

#[test]
fn concurrent_joins_converge() {
    let mut sim = Sim::new();
    sim.open(10, OpenMode::Create);
    sim.run_until(LIMIT, "creator ready", |s| s.ready(10));
    for id in 20..30 {
        sim.open(id, OpenMode::OpenOrCreate);
    }
    sim.run_until(LIMIT, "all ready", |s| (20..30).all(|id| s.ready(id)));
    sim.run_until(LIMIT, "views converge", |s| s.converged());
    assert_eq!(sim.live().len(), 11);
}

#[test]
fn concurrent_creates_with_open_or_create_make_one_channel() {
    let mut sim = Sim::new();
    for id in 1..=6 {
        sim.open(id, OpenMode::OpenOrCreate);
    }
    sim.run_until(LIMIT, "all ready", |s| (1..=6).all(|id| s.ready(id)));
    sim.run_until(LIMIT, "views converge", |s| s.converged());
    let ids: BTreeSet<ChannelId> = sim.nodes.values().map(|n| n.st.id()).collect();
    assert_eq!(ids.len(), 1, "every node ended in the same channel");
}

#[test]
fn member_changes_reach_everyone() {
    let mut sim = Sim::new();
    sim.start(&[10, 20, 30], true);
    let now = sim.now;
    let n20 = sim.nodes.get_mut(&NodeId(20)).expect("node");
    n20.st.set_members(vec![member(1, false), member(2, true), member(3, true)], now);
    let version = n20.st.local().version;
    sim.pump();
    sim.run_until(LIMIT, "new snapshot everywhere", |s| {
        [10, 30].iter().all(|id| s.nodes[&NodeId(*id)].st.peers()[&NodeId(20)].snapshot.version == version)
    });
    assert_eq!(sim.nodes[&NodeId(30)].st.counts(), (3, 4));
}

#[test]
fn clean_leave_of_a_member() {
    let mut sim = Sim::new();
    sim.start(&[10, 20, 30], true);
    let now = sim.now;
    sim.nodes.get_mut(&NodeId(30)).expect("node").st.leave(now);
    sim.pump();
    // The leave message is much faster than any heartbeat.
    let took = sim.run_until(LIMIT, "leaver dropped", |s| {
        [10, 20].iter().all(|id| !s.nodes[&NodeId(*id)].st.peers().contains_key(&NodeId(30)))
    });
    assert!(took < HEARTBEAT / 4, "took {took:?}");
    assert_eq!(sim.registry_entry().expect("entry").contact, NodeId(10));
}

#[test]
fn contact_leaves_and_the_lowest_member_takes_over() {
    let mut sim = Sim::new();
    sim.start(&[10, 30, 20], true);
    let now = sim.now;
    sim.nodes.get_mut(&NodeId(10)).expect("node").st.leave(now);
    sim.pump();
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact() == Some(NodeId(20)));
    sim.open(40, OpenMode::Open);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(40));
    sim.run_until(LIMIT, "views converge", |s| s.converged());
    assert_eq!(sim.live(), vec![NodeId(20), NodeId(30), NodeId(40)]);
}

#[test]
fn contact_crash_is_detected_by_heartbeat_and_taken_over() {
    let mut sim = Sim::new();
    sim.start(&[10, 20, 30], true);
    sim.crash(10);
    let took = sim.run_until(LIMIT, "crash detected", |s| {
        [20, 30].iter().all(|id| !s.nodes[&NodeId(*id)].st.peers().contains_key(&NodeId(10)))
    });
    assert!(took >= HEARTBEAT - HEARTBEAT / 3, "detected before the timeout could expire: {took:?}");
    assert!(took <= HEARTBEAT + HEARTBEAT / 3, "detected too late: {took:?}");
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact() == Some(NodeId(20)));
    sim.open(40, OpenMode::Open);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(40));
    sim.run_until(LIMIT, "views converge", |s| s.converged());
    assert_eq!(sim.live(), vec![NodeId(20), NodeId(30), NodeId(40)]);
}

#[test]
fn member_crash_is_removed_everywhere() {
    let mut sim = Sim::new();
    sim.start(&[10, 20, 30, 40], true);
    sim.crash(30);
    let took = sim.run_until(LIMIT, "removed", |s| s.converged());
    assert!(took <= HEARTBEAT + HEARTBEAT / 3, "took {took:?}");
    assert_eq!(sim.entry_contact(), Some(NodeId(10)));
}

#[test]
fn last_member_leaving_removes_the_entry() {
    let mut sim = Sim::new();
    sim.open(10, OpenMode::Create);
    sim.run_until(LIMIT, "ready", |s| s.ready(10));
    assert!(sim.registry_entry().is_some());
    let now = sim.now;
    sim.nodes.get_mut(&NodeId(10)).expect("node").st.leave(now);
    sim.pump();
    sim.run_until(LIMIT, "entry removed", |s| s.entry_contact().is_none());
}

#[test]
fn open_failures() {
    let mut sim = Sim::new();
    sim.open(10, OpenMode::Open);
    sim.run_until(LIMIT, "fails", |s| s.nodes[&NodeId(10)].open.is_some());
    assert_eq!(sim.nodes[&NodeId(10)].open, Some(Err(OpenFailure::UnknownChannel)));

    sim.open(20, OpenMode::Create);
    sim.run_until(LIMIT, "ready", |s| s.ready(20));
    sim.open(30, OpenMode::Create);
    sim.run_until(LIMIT, "fails", |s| s.nodes[&NodeId(30)].open.is_some());
    assert_eq!(sim.nodes[&NodeId(30)].open, Some(Err(OpenFailure::Exists)));

    sim.registry_up = false;
    sim.open(40, OpenMode::OpenOrCreate);
    sim.run_until(LIMIT, "fails", |s| s.nodes[&NodeId(40)].open.is_some());
    assert!(matches!(sim.nodes[&NodeId(40)].open, Some(Err(OpenFailure::Registry(_)))));
}

#[test]
fn joiner_of_a_dead_lone_contact_recreates_the_channel_after_the_lease() {
    let mut sim = Sim::new();
    sim.open(10, OpenMode::Create);
    sim.run_until(LIMIT, "ready", |s| s.ready(10));
    sim.crash(10);
    // The lease still names the dead contact: the joiner retries until the lease runs out, then creates anew.
    sim.open(20, OpenMode::OpenOrCreate);
    let took = sim.run_until(LIMIT, "joiner ready", |s| s.ready(20));
    assert!(took <= sim.cfg.lease_ttl + sim.cfg.join_attempt * 2, "took {took:?}");
    assert_eq!(sim.entry_contact(), Some(NodeId(20)));
}

#[test]
fn registry_restart_is_repaired_by_renewal() {
    let mut sim = Sim::new();
    sim.start(&[10, 20], false);
    sim.registry = RegistryTable::new();
    assert!(sim.registry_entry().is_none());
    let took = sim.run_until(LIMIT, "entry back", |s| s.entry_contact() == Some(NodeId(10)));
    assert!(took <= sim.cfg.lease_ttl / 3 + Duration::from_millis(20), "took {took:?}");
    sim.open(30, OpenMode::Open);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(30));
    sim.run_until(LIMIT, "views converge", |s| s.converged());
}

#[test]
fn random_churn_converges() {
    // A small xorshift generator keeps the run reproducible.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for round in 0..5 {
        let mut sim = Sim::new();
        let mut next_id = 1u64;
        sim.open(next_id, OpenMode::OpenOrCreate);
        for _ in 0..40 {
            match rand(10) {
                0..=4 => {
                    next_id += 1;
                    sim.open(next_id, OpenMode::OpenOrCreate);
                }
                5 | 6 => {
                    let live = sim.live();
                    if live.len() > 1 {
                        let victim = live[rand(live.len() as u64) as usize];
                        let now = sim.now;
                        sim.nodes.get_mut(&victim).expect("node").st.leave(now);
                        sim.pump();
                    }
                }
                7 => {
                    let live = sim.live();
                    if live.len() > 1 {
                        sim.crash(live[rand(live.len() as u64) as usize].0);
                    }
                }
                _ => {}
            }
            sim.run_for(Duration::from_millis(rand(200)));
        }
        // Quiescence: no more churn; everything pending settles.
        sim.run_for(Duration::from_secs(3));
        sim.run_until(LIMIT, "views converge after churn", |s| s.converged());
        let live = sim.live();
        assert!(!live.is_empty(), "round {round}: somebody is alive");
        let contact = sim.entry_contact().expect("an entry while members live");
        assert!(live.contains(&contact), "round {round}: the registry names a live contact");
        for id in &live {
            assert_eq!(sim.nodes[id].st.contact(), Some(contact), "round {round}: {id:?} agrees on the contact");
        }
        let _ = sim.elapsed();
    }
}
