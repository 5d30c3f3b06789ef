//! A network of `kecho_proto::gossip::Gossip` members in virtual time: latency 10 to 40 ms per message, crashed
//! members detected by their peers after a heartbeat timeout, timers in a heap so that 10,000 members run in
//! seconds. Shared by `tests/gossip_sim.rs` and `examples/gossip_scale.rs`.
#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use bytes::Bytes;
use kecho_proto::gossip::{EventId, Gossip, GossipConfig, GossipMsg, GossipOut};
use kecho_proto::NodeId;

/// How long a peer takes to notice a crashed member (its heartbeat timeout), ms.
pub const DETECT: u64 = 1000;

enum Item {
    Msg { from: usize, to: usize, msg: GossipMsg },
    Failed { at: usize, peer: usize },
}

pub struct Net {
    pub now: u64,
    pub cfg: GossipConfig,
    pub nodes: Vec<Gossip>,
    pub alive: Vec<bool>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    items: HashMap<u64, Item>,
    timers: BinaryHeap<Reverse<(u64, usize)>>,
    seq: u64,
    rng: u64,
    /// Membership messages sent so far.
    pub membership_msgs: u64,
    /// Full copies of events received, per member.
    pub copies: Vec<u64>,
    /// Members that delivered each event.
    pub delivered: HashMap<EventId, u32>,
    /// Events each member delivered, and reported lost.
    pub delivered_by: Vec<u64>,
    pub lost_by: Vec<u64>,
    /// Members that found themselves isolated and joined again.
    pub rejoins: u64,
    /// Until when each member is stalled (a frozen process, or a runtime that gets no core): it reads nothing and
    /// its timers do not fire; what arrives meanwhile waits, in order, and is handled when the stall ends.
    pub stalled_until: Vec<u64>,
}

impl Net {
    pub fn new(cfg: GossipConfig, seed: u64) -> Net {
        Net {
            now: 0,
            cfg,
            nodes: Vec::new(),
            alive: Vec::new(),
            queue: BinaryHeap::new(),
            items: HashMap::new(),
            timers: BinaryHeap::new(),
            seq: 0,
            rng: seed | 1,
            membership_msgs: 0,
            copies: Vec::new(),
            delivered: HashMap::new(),
            delivered_by: Vec::new(),
            lost_by: Vec::new(),
            rejoins: 0,
            stalled_until: Vec::new(),
        }
    }

    pub fn rand(&mut self, n: u64) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % n.max(1)
    }

    /// Adds a member that joins through `contact` (none: the first member).
    pub fn add(&mut self, contact: Option<usize>) -> usize {
        let i = self.nodes.len();
        let seed = self.rand(u64::MAX);
        self.nodes.push(Gossip::new(NodeId(i as u64), self.cfg.clone(), seed, self.now));
        self.alive.push(true);
        self.copies.push(0);
        self.delivered_by.push(0);
        self.lost_by.push(0);
        self.stalled_until.push(0);
        if let Some(c) = contact {
            let now = self.now;
            self.nodes[i].join(NodeId(c as u64), now);
        }
        self.drain(i);
        i
    }

    pub fn random_alive(&mut self) -> usize {
        loop {
            let i = self.rand(self.nodes.len() as u64) as usize;
            if self.alive[i] {
                return i;
            }
        }
    }

    pub fn kill(&mut self, i: usize) {
        self.alive[i] = false;
    }

    /// Stalls member `i` for `ms` from now.
    pub fn stall(&mut self, i: usize, ms: u64) {
        self.stalled_until[i] = self.stalled_until[i].max(self.now + ms);
    }

    pub fn publish(&mut self, i: usize) -> EventId {
        let now = self.now;
        let id = self.nodes[i].broadcast(Bytes::from_static(b"event"), now);
        *self.delivered.entry(id).or_default() += 1;
        self.delivered_by[i] += 1;
        self.drain(i);
        id
    }

    fn push(&mut self, at: u64, item: Item) {
        self.seq += 1;
        self.items.insert(self.seq, item);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn drain(&mut self, i: usize) {
        while let Some(o) = self.nodes[i].poll_output() {
            match o {
                GossipOut::Send { to, msg } => {
                    if msg.is_membership() {
                        self.membership_msgs += 1;
                    }
                    let latency = 10 + self.rand(31);
                    let at = self.now + latency;
                    self.push(at, Item::Msg { from: i, to: to.0 as usize, msg });
                }
                GossipOut::Deliver { id, .. } => {
                    *self.delivered.entry(id).or_default() += 1;
                    self.delivered_by[i] += 1;
                }
                GossipOut::Lost { count, .. } => self.lost_by[i] += count,
                GossipOut::Isolated => {
                    // As the node layer would: join again through a member the registry names.
                    self.rejoins += 1;
                    let c = self.random_alive();
                    let now = self.now;
                    self.nodes[i].join(NodeId(c as u64), now);
                }
            }
        }
        let t = self.nodes[i].poll_timeout();
        if t != u64::MAX {
            self.timers.push(Reverse((t, i)));
        }
    }

    /// Runs until `until` (virtual ms).
    pub fn run_until(&mut self, until: u64) {
        loop {
            let next_msg = self.queue.peek().map(|Reverse((t, _))| *t);
            let next_timer = self.timers.peek().map(|Reverse((t, _))| *t);
            let next = match (next_msg, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_msg == Some(next) {
                let Some(Reverse((_, seq))) = self.queue.pop() else { break };
                let Some(item) = self.items.remove(&seq) else { continue };
                if let Item::Msg { to, .. } = &item {
                    let until = self.stalled_until[*to];
                    if until > self.now {
                        // Handled when the stall ends, after what arrived before it (pushed in arrival order).
                        self.push(until, item);
                        continue;
                    }
                }
                match item {
                    Item::Msg { from, to, msg } => {
                        if !self.alive[from] {
                            continue;
                        }
                        if !self.alive[to] {
                            // The sender finds out after a heartbeat timeout.
                            let at = self.now + DETECT;
                            self.push(at, Item::Failed { at: from, peer: to });
                            continue;
                        }
                        if matches!(msg, GossipMsg::Event { .. }) {
                            self.copies[to] += 1;
                        }
                        let now = self.now;
                        self.nodes[to].handle(NodeId(from as u64), msg, now);
                        self.drain(to);
                    }
                    Item::Failed { at, peer } => {
                        if self.alive[at] {
                            let now = self.now;
                            self.nodes[at].peer_failed(NodeId(peer as u64), now);
                            self.drain(at);
                        }
                    }
                }
            } else {
                let Some(Reverse((t, i))) = self.timers.pop() else { break };
                if self.stalled_until[i] > self.now {
                    self.timers.push(Reverse((self.stalled_until[i], i)));
                    continue;
                }
                if self.alive[i] && self.nodes[i].poll_timeout() <= t {
                    let now = self.now;
                    self.nodes[i].handle_timeout(now);
                    self.drain(i);
                }
            }
        }
        self.now = until;
    }

    pub fn links(&self, i: usize) -> usize {
        self.nodes[i].active().iter().filter(|p| self.alive[p.0 as usize]).count()
    }
}

/// The figures of one run at `n` members.
#[derive(Debug, Clone)]
pub struct Figures {
    pub n: usize,
    /// Time for the last member to join (active view of at least 2), ms.
    pub join_last_ms: u64,
    /// Time for all of 100 members joining at once to reach 2 links each, ms.
    pub storm_ms: u64,
    /// Largest and mean active view.
    pub links_max: usize,
    pub links_mean: f64,
    /// Full copies of an event received per member in the steady state.
    pub copies_per_event: f64,
    /// Share of (survivor, event) pairs delivered after 30 % were killed, and the share reported lost.
    pub delivered_after_kill: f64,
    pub reported_after_kill: f64,
    /// Members that found themselves isolated after the kill and joined again.
    pub rejoins: u64,
    /// Membership messages caused by one join.
    pub msgs_per_join: f64,
    /// Share of (member, event) pairs delivered in the steady state.
    pub delivered_steady: f64,
}

fn wait_links(net: &mut Net, who: &[usize], links: usize, limit: u64) -> u64 {
    let start = net.now;
    while who.iter().any(|i| net.links(*i) < links) && net.now < start + limit {
        let t = net.now + 5;
        net.run_until(t);
    }
    net.now - start
}

/// Builds `n` members joining one after the other, then measures.
pub fn run(n: usize, seed: u64) -> Figures {
    let cfg = GossipConfig { shuffle_every: u64::MAX / 4, ..GossipConfig::default() };
    let mut net = Net::new(cfg, seed);
    net.add(None);
    for _ in 1..n - 100 {
        let c = net.random_alive();
        net.add(Some(c));
        let t = net.now + 2;
        net.run_until(t);
    }
    let t = net.now + 3000;
    net.run_until(t);
    // The last single join, and what it costs in membership messages.
    let before = net.membership_msgs;
    let c = net.random_alive();
    let last = net.add(Some(c));
    let join_last_ms = wait_links(&mut net, &[last], 2, 10_000);
    let t = net.now + 1000;
    net.run_until(t);
    let msgs_per_join = (net.membership_msgs - before) as f64;
    // A storm of 99 more at once.
    let mut storm = Vec::new();
    for _ in 0..99 {
        let c = net.random_alive();
        storm.push(net.add(Some(c)));
    }
    let storm_ms = wait_links(&mut net, &storm, 2, 10_000);
    let t = net.now + 2000;
    net.run_until(t);
    // Steady state, five sources: the first events shape each source's tree, the rest are counted.
    let m = net.nodes.len();
    let sources: Vec<usize> = (0..5).map(|_| net.random_alive()).collect();
    for k in 0..10 {
        let s = sources[k % sources.len()];
        net.publish(s);
        let t = net.now + 50;
        net.run_until(t);
    }
    let t = net.now + 2000;
    net.run_until(t);
    let copies_before: u64 = net.copies.iter().sum();
    let mut steady = Vec::new();
    for k in 0..20 {
        let s = sources[k % sources.len()];
        steady.push(net.publish(s));
        let t = net.now + 50;
        net.run_until(t);
    }
    let t = net.now + 3000;
    net.run_until(t);
    let copies: u64 = net.copies.iter().sum::<u64>() - copies_before;
    let copies_per_event = copies as f64 / (steady.len() as f64 * (m - 1) as f64);
    let delivered_steady =
        steady.iter().map(|id| *net.delivered.get(id).unwrap_or(&0) as f64).sum::<f64>() / (steady.len() * m) as f64;
    let links: Vec<usize> = (0..m).map(|i| net.nodes[i].active().len()).collect();
    let links_max = links.iter().copied().max().unwrap_or(0);
    let links_mean = links.iter().sum::<usize>() as f64 / m as f64;
    // Kill 30 % at once (the sources excepted); the sources go on publishing.
    for i in 0..m {
        if net.rand(100) < 30 && !sources.contains(&i) {
            net.kill(i);
        }
    }
    let survivors: Vec<usize> = (0..m).filter(|i| net.alive[*i]).collect();
    let rejoins_before = net.rejoins;
    let base_delivered: Vec<u64> = survivors.iter().map(|i| net.delivered_by[*i]).collect();
    let base_lost: Vec<u64> = survivors.iter().map(|i| net.lost_by[*i]).collect();
    let mut after = Vec::new();
    for k in 0..50 {
        let s = sources[k % sources.len()];
        after.push(net.publish(s));
        let t = net.now + 20;
        net.run_until(t);
    }
    let t = net.now + 8000;
    net.run_until(t);
    let got: u64 = survivors.iter().zip(&base_delivered).map(|(i, b)| net.delivered_by[*i] - b).sum();
    let lost: u64 = survivors.iter().zip(&base_lost).map(|(i, b)| net.lost_by[*i] - b).sum();
    let pairs = (after.len() * survivors.len()) as f64;
    Figures {
        n: m,
        join_last_ms,
        storm_ms,
        links_max,
        links_mean,
        copies_per_event,
        delivered_after_kill: got as f64 / pairs,
        reported_after_kill: lost as f64 / pairs,
        rejoins: net.rejoins - rejoins_before,
        msgs_per_join,
        delivered_steady,
    }
}

/// What the stalls scenario measured.
#[derive(Debug, Clone)]
pub struct StallFigures {
    /// Full copies of an event received per member while members stalled.
    pub copies_per_event: f64,
    /// Share of (member, event) pairs delivered, and reported lost.
    pub delivered: f64,
    pub reported: f64,
    /// Grafts sent, and needless ones (the tree's copy came too), by all members.
    pub grafts: u64,
    pub late_grafts: u64,
}

/// `n` members; one source publishes an event every 20 ms for 30 s while, every 100 ms, a random member other than
/// the source stalls for 200 to 1,200 ms (about 7 of the 100 members stalled at any time: a loaded host, where
/// each process's runtime waits for a core). Per-source order and loss accounting must hold; copies per event show
/// what grafts of events still on their way cost.
pub fn run_stalls(n: usize, seed: u64, cfg: GossipConfig) -> StallFigures {
    run_stalls_with(n, seed, cfg, 5, 200, 1001)
}

/// [`run_stalls`] with a stall every `every` events of `least + [0, spread)` ms.
pub fn run_stalls_with(n: usize, seed: u64, cfg: GossipConfig, every: usize, least: u64, spread: u64) -> StallFigures {
    let cfg = GossipConfig { shuffle_every: u64::MAX / 4, ..cfg };
    let mut net = Net::new(cfg, seed);
    net.add(None);
    for _ in 1..n {
        let c = net.random_alive();
        net.add(Some(c));
        let t = net.now + 2;
        net.run_until(t);
    }
    let t = net.now + 3000;
    net.run_until(t);
    let source = 0;
    for _ in 0..20 {
        net.publish(source);
        let t = net.now + 50;
        net.run_until(t);
    }
    let t = net.now + 2000;
    net.run_until(t);
    let copies_before: u64 = net.copies.iter().sum();
    let counters =
        |net: &Net| net.nodes.iter().map(|g| g.counters()).fold((0, 0), |a, c| (a.0 + c.grafts, a.1 + c.late_grafts));
    let (grafts_before, late_before) = counters(&net);
    let delivered_before: u64 = net.delivered_by.iter().sum();
    let lost_before: u64 = net.lost_by.iter().sum();
    let events = 1500;
    for k in 0..events {
        net.publish(source);
        if k % every == 0 {
            let who = 1 + net.rand(n as u64 - 1) as usize;
            let ms = least + net.rand(spread);
            net.stall(who, ms);
        }
        let t = net.now + 20;
        net.run_until(t);
    }
    // Long enough for every gap to be filled or reported (the loss timer runs after the last stall ends).
    let t = net.now + 4 * net.cfg.loss_after + 2000;
    net.run_until(t);
    let copies: u64 = net.copies.iter().sum::<u64>() - copies_before;
    let (grafts, late) = counters(&net);
    let delivered: u64 = net.delivered_by.iter().sum::<u64>() - delivered_before;
    let lost: u64 = net.lost_by.iter().sum::<u64>() - lost_before;
    // The source delivers its own events too (counted in `delivered_by`), and receives no copies.
    let pairs = (events * (n - 1)) as f64;
    StallFigures {
        copies_per_event: copies as f64 / pairs,
        delivered: (delivered - events as u64) as f64 / pairs,
        reported: lost as f64 / pairs,
        grafts: grafts - grafts_before,
        late_grafts: late - late_before,
    }
}
