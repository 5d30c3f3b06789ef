//! Deterministic simulation of a replicated registry: replicas (`kecho_registry::raft::Replica`) and clients wired
//! in memory with latency, loss, crashes (a crashed replica restarts from what it persisted) and partitions, driven
//! millisecond by millisecond in virtual time. Every run is determined by its seed.
//!
//! Checked on every seed: at most one leader per term; no two replicas apply different entries at one index; no
//! acknowledged create is lost (every replica's table holds it at the end); two contacts creating one name never
//! both succeed; and every request completes within a bound while a majority is up and connected.

use std::collections::{BTreeMap, HashMap, HashSet};

use kecho_proto::codec::{ClaimMode, Message, RegErrorCode, RegResult};
use kecho_proto::{ChannelId, ChannelSecret, NodeId};
use kecho_registry::raft::{Entry, Output, PeerMsg, Persistent, RaftConfig, Replica, ReplicaId, Role};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What travels: a message between replicas, a request to a replica, or an answer to a client.
enum Packet {
    Peer { from: ReplicaId, to: ReplicaId, msg: PeerMsg },
    Request { client: usize, to: ReplicaId, msg: Message },
    Reply { client: usize, from: ReplicaId, msg: Message },
}

/// A client with one request at a time, retried until answered.
struct Client {
    id: usize,
    /// The replica it asks.
    target: ReplicaId,
    /// The request under way: message, when it was first issued, when to send it again, and whether to ask another
    /// replica then (no answer) or the one chosen already (a `NotLeader` answer named it).
    pending: Option<(Message, u64, u64, bool)>,
    next_req: u32,
    /// Names it was told it created (acknowledged), with the channel id.
    acked: Vec<(String, ChannelId)>,
    /// Longest time a request took.
    slowest: u64,
    done: usize,
}

struct Sim {
    rng: Rng,
    now: u64,
    n: usize,
    cfg: RaftConfig,
    replicas: Vec<Option<Replica<usize>>>,
    /// What each replica wrote to its disk (from `take_changes`), and what a crashed one restarts from.
    shadow: Vec<Persistent>,
    disk: Vec<Option<Persistent>>,
    /// Replicas cut off from everyone (replicas and clients).
    isolated: HashSet<ReplicaId>,
    wire: BTreeMap<(u64, u64), Packet>,
    seq: u64,
    clients: Vec<Client>,
    /// term -> leader seen in it.
    leaders: HashMap<u64, ReplicaId>,
    /// index -> the entry some replica applied there.
    applied: HashMap<u64, Entry>,
    seen_applied: Vec<u64>,
    loss_percent: u64,
    /// Clients finish what they asked but ask nothing new.
    quiet: bool,
}

fn addrs(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.0.0.{i}:7400")).collect()
}

impl Sim {
    fn new(seed: u64, n: usize, clients: usize) -> Sim {
        let cfg = RaftConfig { compact_after: usize::MAX, ..RaftConfig::default() };
        let replicas =
            (0..n).map(|i| Some(Replica::new(i, addrs(n), cfg.clone(), seed.wrapping_add(i as u64), 0))).collect();
        let clients = (0..clients)
            .map(|id| Client { id, target: id % n, pending: None, next_req: 1, acked: vec![], slowest: 0, done: 0 })
            .collect();
        Sim {
            rng: Rng(seed | 1),
            now: 0,
            n,
            cfg,
            replicas,
            shadow: vec![Persistent::default(); n],
            disk: vec![None; n],
            isolated: HashSet::new(),
            wire: BTreeMap::new(),
            seq: 0,
            clients,
            leaders: HashMap::new(),
            applied: HashMap::new(),
            seen_applied: vec![0; n],
            loss_percent: 1,
            quiet: false,
        }
    }

    fn send(&mut self, p: Packet) {
        if self.rng.chance(self.loss_percent) {
            return;
        }
        let at = self.now + 1 + self.rng.below(8);
        self.seq += 1;
        self.wire.insert((at, self.seq), p);
    }

    fn reachable(&self, r: ReplicaId) -> bool {
        self.replicas[r].is_some() && !self.isolated.contains(&r)
    }

    fn up_and_connected(&self) -> usize {
        (0..self.n).filter(|r| self.reachable(*r)).count()
    }

    fn crash(&mut self, r: ReplicaId) {
        if let Some(rep) = self.replicas[r].take() {
            assert_eq!(&self.shadow[r], rep.persistent(), "replica {r}'s changes do not rebuild its state");
            // It restarts from what it wrote, not from its memory.
            self.disk[r] = Some(self.shadow[r].clone());
        }
    }

    fn restart(&mut self, r: ReplicaId) {
        if let Some(p) = self.disk[r].take() {
            let seed = self.rng.next();
            self.replicas[r] = Some(Replica::recover(r, addrs(self.n), self.cfg.clone(), seed, p, self.now));
            self.seen_applied[r] = self.replicas[r].as_ref().map_or(0, |x| x.applied_index());
        }
    }

    fn drain(&mut self, r: ReplicaId) {
        let mut outs = Vec::new();
        if let Some(rep) = self.replicas[r].as_mut() {
            let changes = rep.take_changes();
            self.shadow[r].apply(&changes);
            while let Some(o) = rep.poll_output() {
                outs.push(o);
            }
        }
        for o in outs {
            match o {
                Output::Send { to, msg } => self.send(Packet::Peer { from: r, to, msg }),
                Output::Reply { token, reply } => self.send(Packet::Reply { client: token, from: r, msg: reply }),
            }
        }
        self.audit(r);
    }

    /// The safety checks that can be made at every step.
    fn audit(&mut self, r: ReplicaId) {
        let Some(rep) = self.replicas[r].as_ref() else { return };
        if rep.role() == Role::Leader {
            let prev = *self.leaders.entry(rep.term()).or_insert(r);
            assert_eq!(prev, r, "two leaders in term {}: {prev} and {r}", rep.term());
        }
        let applied = rep.applied_index();
        for i in self.seen_applied[r] + 1..=applied {
            // Compaction (only in the snapshot test) may have removed it already.
            let Some(e) = rep.entry(i).cloned() else { continue };
            match self.applied.get(&i) {
                Some(other) => assert_eq!(other, &e, "replicas applied different entries at index {i}"),
                None => {
                    self.applied.insert(i, e);
                }
            }
        }
        self.seen_applied[r] = self.seen_applied[r].max(applied);
    }

    fn step(&mut self) {
        self.now += 1;
        // Deliver what is due.
        while let Some((&(at, seq), _)) = self.wire.iter().next() {
            if at > self.now {
                break;
            }
            let p = self.wire.remove(&(at, seq)).expect("present");
            match p {
                Packet::Peer { from, to, msg } => {
                    if self.reachable(from) && self.reachable(to) {
                        let now = self.now;
                        self.replicas[to].as_mut().expect("up").handle_peer(from, msg, now);
                        self.drain(to);
                    }
                }
                Packet::Request { client, to, msg } => {
                    if self.reachable(to) {
                        let now = self.now;
                        self.replicas[to].as_mut().expect("up").handle_request(client, msg, now);
                        self.drain(to);
                    }
                }
                Packet::Reply { client, from, msg } => {
                    if !self.isolated.contains(&from) {
                        self.on_reply(client, msg);
                    }
                }
            }
        }
        for r in 0..self.n {
            let due = self.replicas[r].as_ref().is_some_and(|x| x.poll_timeout() <= self.now);
            if due {
                let now = self.now;
                self.replicas[r].as_mut().expect("up").handle_timeout(now);
                self.drain(r);
            }
        }
        for c in 0..self.clients.len() {
            self.client_tick(c);
        }
    }

    fn client_tick(&mut self, c: usize) {
        let now = self.now;
        let n = self.n;
        let quiet = self.quiet;
        let cl = &mut self.clients[c];
        match &cl.pending {
            Some((_, _, resend, rotate)) if now >= *resend => {
                if *rotate {
                    cl.target = (cl.target + 1) % n;
                }
            }
            Some(_) => return,
            None if quiet => return,
            None => {
                // A new create: a unique name, and every fourth one a name another client also creates.
                let k = cl.next_req;
                cl.next_req += 1;
                let name = if k.is_multiple_of(4) { format!("shared-{}", k / 4) } else { format!("c{}-{k}", cl.id) };
                let msg = Message::RegClaim {
                    req: k,
                    name,
                    channel: ChannelId((cl.id as u64) << 32 | u64::from(k)),
                    node: NodeId(cl.id as u64 + 1),
                    addr: format!("10.1.0.{}:1", cl.id),
                    ttl_ms: 300_000,
                    mode: ClaimMode::Create,
                    sources: 1,
                    sinks: 1,
                    secret: ChannelSecret(cl.id as u128 + 100),
                };
                cl.pending = Some((msg, now, now, false));
            }
        }
        let cl = &mut self.clients[c];
        let Some((msg, issued, _, _)) = cl.pending.take() else { return };
        cl.pending = Some((msg.clone(), issued, now + 300, true));
        let to = cl.target;
        self.send(Packet::Request { client: c, to, msg });
    }

    fn on_reply(&mut self, c: usize, msg: Message) {
        let now = self.now;
        let n = self.n;
        let cl = &mut self.clients[c];
        let Message::RegReply { req, result } = msg else { panic!("not a reply") };
        let Some((Message::RegClaim { req: want, name, channel, .. }, issued, _, _)) = &cl.pending else { return };
        if req != *want {
            return;
        }
        match result {
            RegResult::Error { code: RegErrorCode::NotLeader, message } => {
                let hint = addrs(n).iter().position(|a| *a == message);
                match hint {
                    Some(h) => cl.target = h,
                    None => cl.target = (cl.target + 1) % n,
                }
                // Ask again on the next tick (after a short pause when nobody knows the leader).
                let retry = if hint.is_some() { now } else { now + 20 };
                if let Some(p) = &mut cl.pending {
                    p.2 = retry;
                    p.3 = false;
                }
            }
            RegResult::Entry(e) => {
                assert_eq!(e.channel, *channel, "a create answered with another channel's entry");
                cl.acked.push((name.clone(), *channel));
                cl.slowest = cl.slowest.max(now - issued);
                cl.done += 1;
                cl.pending = None;
            }
            RegResult::Error { code: RegErrorCode::Exists, .. } => {
                assert!(name.starts_with("shared-"), "{name} exists, but only this client creates it");
                cl.slowest = cl.slowest.max(now - issued);
                cl.done += 1;
                cl.pending = None;
            }
            other => panic!("unexpected answer {other:?}"),
        }
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    /// Final checks after every fault is healed and the cluster had time to settle.
    fn check_end(&mut self) {
        self.quiet = true;
        self.run(2000);
        assert!(self.clients.iter().all(|c| c.pending.is_none()), "a request is still unanswered after healing");
        let mut winners: HashMap<String, (usize, ChannelId)> = HashMap::new();
        for cl in &self.clients {
            for (name, ch) in &cl.acked {
                if let Some((other, och)) = winners.insert(name.clone(), (cl.id, *ch)) {
                    panic!("{name} created by client {other} (channel {och:?}) and by client {} ({ch:?})", cl.id);
                }
            }
        }
        let now = self.now;
        for r in 0..self.n {
            let rep = self.replicas[r].as_mut().expect("every replica is up at the end");
            for (name, (_, ch)) in &winners {
                let reply = rep.read_local(&Message::RegLookup { req: 1, name: name.clone() }, now);
                match reply {
                    Some(Message::RegReply { result: RegResult::Entry(e), .. }) => {
                        assert_eq!(e.channel, *ch, "replica {r} holds another channel for {name}")
                    }
                    other => panic!("replica {r} lost acknowledged create {name}: {other:?}"),
                }
            }
        }
    }
}

/// Runs one seed: `secs` of random faults, then healing. `max_down` replicas may be down or cut off at once.
fn run_seed(seed: u64, n: usize, max_down: usize, secs: u64) -> (u64, usize) {
    let mut sim = Sim::new(seed, n, 4);
    sim.run(1500);
    let mut slowest_with_majority = 0;
    for _ in 0..secs {
        // One fault change per second at most.
        let r = sim.rng.below(n as u64) as usize;
        let down = n - sim.up_and_connected();
        match sim.rng.below(6) {
            0 | 1 if down < max_down && sim.reachable(r) => {
                // Prefer the leader half of the time: it is the interesting one.
                let leader = (0..n).find(|i| sim.replicas[*i].as_ref().is_some_and(|x| x.role() == Role::Leader));
                let victim = if sim.rng.chance(50) { leader.unwrap_or(r) } else { r };
                if sim.rng.chance(50) {
                    sim.crash(victim);
                } else {
                    sim.isolated.insert(victim);
                }
            }
            2 | 3 => {
                for i in 0..n {
                    if sim.replicas[i].is_none() {
                        sim.restart(i);
                        break;
                    }
                }
                if sim.rng.chance(50) {
                    sim.isolated.clear();
                }
            }
            _ => {}
        }
        let before: Vec<usize> = sim.clients.iter().map(|c| c.done).collect();
        sim.run(1000);
        let after: Vec<usize> = sim.clients.iter().map(|c| c.done).collect();
        if sim.up_and_connected() > n / 2 {
            // A majority is up: the registry keeps answering (each client finished something this second, unless
            // its request started in a minority second, which the end's bound catches).
            let progressed = before.iter().zip(&after).filter(|(b, a)| a > b).count();
            assert!(progressed > 0, "seed {seed}: no request completed in a second with a majority up");
        }
        slowest_with_majority = slowest_with_majority.max(sim.clients.iter().map(|c| c.slowest).max().unwrap_or(0));
    }
    for i in 0..n {
        sim.restart(i);
    }
    sim.isolated.clear();
    sim.run(3000);
    sim.check_end();
    let done: usize = sim.clients.iter().map(|c| c.done).sum();
    (slowest_with_majority, done)
}

#[test]
fn three_replicas_survive_crashes_and_partitions_of_one() {
    let mut worst = 0;
    for seed in 1..=16 {
        let (slowest, done) = run_seed(seed, 3, 1, 20);
        assert!(done > 200, "seed {seed}: only {done} requests completed");
        worst = worst.max(slowest);
    }
    // With one replica down or cut off at a time, no request waits more than an election and a retry or two.
    assert!(worst < 3000, "slowest request {worst} ms");
    eprintln!("3 replicas, 16 seeds: slowest create {worst} ms");
}

#[test]
fn five_replicas_survive_two_faults() {
    let mut worst = 0;
    for seed in 100..=107 {
        let (slowest, done) = run_seed(seed, 5, 2, 20);
        assert!(done > 200, "seed {seed}: only {done} requests completed");
        worst = worst.max(slowest);
    }
    assert!(worst < 3000, "slowest request {worst} ms");
    eprintln!("5 replicas, 8 seeds: slowest create {worst} ms");
}

/// Safety holds even when a majority is lost (requests then wait, and finish after healing).
#[test]
fn no_split_brain_when_the_majority_is_lost() {
    for seed in 200..=209 {
        let mut sim = Sim::new(seed, 3, 3);
        sim.loss_percent = 5;
        sim.run(1000);
        for _ in 0..15 {
            let r = sim.rng.below(3) as usize;
            match sim.rng.below(4) {
                0 => sim.crash(r),
                1 => {
                    sim.isolated.insert(r);
                }
                2 => sim.restart(r),
                _ => {
                    sim.isolated.remove(&r);
                }
            }
            sim.run(700);
        }
        for i in 0..3 {
            sim.restart(i);
        }
        sim.isolated.clear();
        sim.loss_percent = 0;
        sim.run(4000);
        sim.check_end();
        assert!(sim.clients.iter().all(|c| c.pending.is_none() || c.done > 0), "seed {seed}: clients stuck");
    }
}

/// Same seed, same run.
#[test]
fn runs_are_deterministic() {
    assert_eq!(run_seed(7, 3, 1, 8), run_seed(7, 3, 1, 8));
}

/// A replica that was down while the others compacted their logs catches up from a snapshot.
#[test]
fn a_lagging_replica_catches_up_from_a_snapshot() {
    let mut sim = Sim::new(300, 3, 4);
    sim.cfg.compact_after = 50;
    for i in 0..3 {
        let seed = 300 + i as u64;
        sim.replicas[i] = Some(Replica::new(i, addrs(3), sim.cfg.clone(), seed, 0));
    }
    sim.run(1000);
    // Take a follower down, let the others compact well past it, bring it back.
    let follower = (0..3).find(|i| sim.replicas[*i].as_ref().is_some_and(|x| x.role() == Role::Follower)).expect("f");
    sim.crash(follower);
    // Auditing needs entries that compaction removes: skip it by marking everything seen.
    let before: usize = sim.clients.iter().map(|c| c.done).sum();
    for _ in 0..3000 {
        sim.step();
        for r in 0..3 {
            if let Some(x) = &sim.replicas[r] {
                sim.seen_applied[r] = x.applied_index();
            }
        }
    }
    let mid: usize = sim.clients.iter().map(|c| c.done).sum();
    assert!(mid - before > 100, "creates continue with one replica down");
    sim.restart(follower);
    for _ in 0..2000 {
        sim.step();
        for r in 0..3 {
            if let Some(x) = &sim.replicas[r] {
                sim.seen_applied[r] = x.applied_index();
            }
        }
    }
    let leader_commit = (0..3)
        .filter_map(|i| sim.replicas[i].as_ref())
        .find(|x| x.role() == Role::Leader)
        .map(|x| x.commit_index())
        .expect("a leader");
    let back = sim.replicas[follower].as_ref().expect("up");
    assert!(back.applied_index() + 50 >= leader_commit, "{} vs {leader_commit}", back.applied_index());
    sim.check_end();
}
