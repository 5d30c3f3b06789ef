//! One replica of a replicated registry: Raft over the lease table, without I/O.
//!
//! The replicated state machine is [`RegistryTable`]: every request that changes it (`RegClaim`, `RegRemove`) is an
//! entry of the Raft log, stamped by the leader with the cluster time, and is applied in log order on every replica
//! with that stamp as "now", so every replica's table goes through the same states. Reads (`RegLookup`, `RegList`)
//! are answered by the leader from its applied table while it holds a *lease* (a majority acknowledged one of its
//! appends within the last election timeout, and it has committed an entry of its own term); otherwise they go
//! through the log too. Followers answer every request with [`RegErrorCode::NotLeader`] naming the leader, and the
//! client asks there.
//!
//! The Raft is the textbook one (Ongaro and Ousterhout, 2014) with three additions that keep a healthy cluster
//! stable: *pre-vote* (a replica asks whether it could win before raising its term, so a replica that was cut off
//! does not depose the leader when it returns), *leader stickiness* (a replica that heard from a live leader within
//! the minimum election timeout refuses votes, which is also what makes the leader's read lease safe) and
//! *check-quorum* (a leader that has not heard from a majority for the maximum election timeout steps down, so that
//! clients on its side of a partition are sent elsewhere).
//!
//! Inputs carry `now` in milliseconds of the cluster clock (wall-clock milliseconds in the server, virtual time in
//! simulations); outputs are drained with [`Replica::poll_output`]; [`Replica::poll_timeout`] says when to call
//! [`Replica::handle_timeout`]. Randomness (election timeouts) comes from a seed.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kecho_proto::codec::{Message, RegErrorCode, RegResult};
use kecho_proto::registry::RegistryTable;

/// A replica's number: its position in the sorted list of every replica's address.
pub type ReplicaId = usize;

/// Timing of a replica, in milliseconds.
#[derive(Clone, Debug)]
pub struct RaftConfig {
    /// Shortest election timeout: a follower that heard from a leader within it refuses votes.
    pub election_min: u64,
    /// Longest election timeout; a leader that has not heard from a majority for this long steps down.
    pub election_max: u64,
    /// How often a leader sends appends when it has nothing new.
    pub heartbeat: u64,
    /// Most entries in one append.
    pub max_append: usize,
    /// The log is compacted into a snapshot once it holds this many applied entries.
    pub compact_after: usize,
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig { election_min: 300, election_max: 600, heartbeat: 60, max_append: 512, compact_after: 4096 }
    }
}

/// What a log entry does.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Nothing: the entry a new leader appends to commit the entries of earlier terms.
    Noop,
    /// A registry request, applied to the table.
    Request(Message),
}

/// One entry of the Raft log.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The term of the leader that appended it.
    pub term: u64,
    /// The cluster time (ms) the leader stamped it with: "now" when it is applied.
    pub stamp: u64,
    /// What it does.
    pub cmd: Command,
}

/// The table as of a log position: what a replica keeps instead of the entries up to that position.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Snapshot {
    /// The last entry it includes.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
    /// That entry's stamp: the time the claims' remaining lease times count from.
    pub stamp: u64,
    /// The live leases, as `Renew` claims (see [`RegistryTable::export`]).
    pub claims: Vec<Message>,
}

/// A message between replicas.
#[derive(Clone, Debug, PartialEq)]
pub enum PeerMsg {
    /// Asks for a vote in `term` (`pre`: asks whether the vote would be granted, without raising anyone's term).
    Vote {
        /// The term the candidate asks for.
        term: u64,
        /// A pre-vote.
        pre: bool,
        /// The index of the candidate's last entry.
        last_index: u64,
        /// Its term.
        last_term: u64,
    },
    /// The answer to a [`PeerMsg::Vote`].
    VoteReply {
        /// The term voted in (or the voter's own, higher, term when refused).
        term: u64,
        /// It answers a pre-vote.
        pre: bool,
        /// Granted.
        granted: bool,
    },
    /// Entries from the leader (none: a heartbeat), following the entry at `prev_index`.
    Append {
        /// The leader's term.
        term: u64,
        /// The index of the entry before the first one carried.
        prev_index: u64,
        /// Its term.
        prev_term: u64,
        /// The entries.
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: u64,
        /// The leader's clock when it sent this (echoed back, for the read lease).
        sent: u64,
    },
    /// The answer to an [`PeerMsg::Append`] or [`PeerMsg::Install`].
    AppendReply {
        /// The follower's term.
        term: u64,
        /// The entries were appended.
        ok: bool,
        /// If `ok`, the index of the last entry now known to match the leader's; if not, an index from which the
        /// leader should send again.
        index: u64,
        /// The `sent` of the append answered.
        sent: u64,
    },
    /// The leader's snapshot, for a follower that needs entries the leader has compacted.
    Install {
        /// The leader's term.
        term: u64,
        /// The snapshot.
        snap: Snapshot,
        /// The leader's clock when it sent this.
        sent: u64,
    },
}

/// What a replica asks its I/O layer to do.
#[derive(Debug)]
pub enum Output<T> {
    /// Send `msg` to replica `to` (it may be lost: Raft copes).
    Send {
        /// The destination.
        to: ReplicaId,
        /// The message.
        msg: PeerMsg,
    },
    /// Answer a client's request: `reply` is a `RegReply` for the connection `token` names.
    Reply {
        /// The token given with the request.
        token: T,
        /// The answer.
        reply: Message,
    },
}

/// A replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks for pre-votes.
    PreCandidate,
    /// Asks for votes in its new term.
    Candidate,
    /// Leads its term.
    Leader,
}

/// What a replica must keep across a crash for Raft to stay safe (the term, its vote and the log); the rest is
/// rebuilt from it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Persistent {
    /// The current term.
    pub term: u64,
    /// Whom it voted for in that term.
    pub voted_for: Option<ReplicaId>,
    /// The compacted part of the log.
    pub snap: Snapshot,
    /// The entries after the snapshot.
    pub log: Vec<Entry>,
}

/// Changes to a replica's [`Persistent`] state, to be written in this order: the snapshot (which replaces every
/// entry up to its index), the term and vote, then the log from `truncate_from` on (everything at and after it is
/// replaced by `entries`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// The new term and vote.
    pub hard: Option<(u64, Option<ReplicaId>)>,
    /// A new snapshot.
    pub snapshot: Option<Snapshot>,
    /// The first log index rewritten.
    pub truncate_from: Option<u64>,
    /// The entries from `truncate_from` on, with their indices.
    pub entries: Vec<(u64, Entry)>,
}

impl Changes {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.hard.is_none() && self.snapshot.is_none() && self.truncate_from.is_none()
    }
}

impl Persistent {
    /// Applies `c`: what a store that kept this state does with the changes (the simulation checks that the result
    /// is the replica's own state).
    pub fn apply(&mut self, c: &Changes) {
        if let Some(snap) = &c.snapshot {
            let drop = (snap.index.saturating_sub(self.snap.index) as usize).min(self.log.len());
            self.log.drain(..drop);
            self.snap = snap.clone();
        }
        if let Some((term, vote)) = c.hard {
            self.term = term;
            self.voted_for = vote;
        }
        if let Some(from) = c.truncate_from {
            self.log.truncate(from.saturating_sub(self.snap.index + 1) as usize);
            self.log.extend(c.entries.iter().map(|(_, e)| e.clone()));
        }
    }
}

/// Leader-only bookkeeping, per replica.
#[derive(Debug)]
struct Leading {
    /// The next entry to send.
    next: Vec<u64>,
    /// The highest entry known to be replicated there.
    matched: Vec<u64>,
    /// The newest `sent` each replica echoed (the leader's own clock).
    heard: Vec<u64>,
    /// When it became leader (check-quorum counts from there until a majority has answered).
    since: u64,
    /// When the next heartbeat is due.
    heartbeat_at: u64,
}

/// One registry replica (see the module documentation). `T` is what the I/O layer needs to route an answer back to
/// its client (a connection).
#[derive(Debug)]
pub struct Replica<T> {
    id: ReplicaId,
    /// Every replica's client-facing address, by id (told to clients in `NotLeader` answers).
    addrs: Vec<String>,
    cfg: RaftConfig,
    p: Persistent,
    commit: u64,
    applied: u64,
    role: Role,
    leader: Option<ReplicaId>,
    votes: Vec<bool>,
    leading: Option<Leading>,
    /// When a follower last heard from the leader of its term.
    leader_contact: Option<u64>,
    /// A replica that (re)starts refuses votes until then: it may have acknowledged a leader's lease before it
    /// crashed.
    quiet_until: u64,
    election_at: u64,
    rng: u64,
    table: RegistryTable,
    /// The instant cluster time 0 maps to, for the table (which counts in `Instant`s).
    origin: Instant,
    /// Clients waiting for an entry to be applied, by log index (leader only).
    waiting: HashMap<u64, T>,
    /// What of the persistent state was last handed out by [`Replica::take_changes`].
    saved_hard: (u64, Option<ReplicaId>),
    saved_snap: u64,
    /// The lowest log index changed since then.
    dirty_from: Option<u64>,
    out: VecDeque<Output<T>>,
}

impl<T> Replica<T> {
    /// A fresh replica `id` of the replicas at `addrs` (sorted; the same list on every replica).
    pub fn new(id: ReplicaId, addrs: Vec<String>, cfg: RaftConfig, seed: u64, now: u64) -> Self {
        Self::recover(id, addrs, cfg, seed, Persistent::default(), now)
    }

    /// A replica that restarts from what it had persisted.
    pub fn recover(id: ReplicaId, addrs: Vec<String>, cfg: RaftConfig, seed: u64, p: Persistent, now: u64) -> Self {
        let n = addrs.len();
        let cfg_election_min = cfg.election_min;
        let mut r = Replica {
            id,
            addrs,
            cfg,
            commit: p.snap.index,
            applied: p.snap.index,
            p,
            role: Role::Follower,
            leader: None,
            votes: vec![false; n],
            leading: None,
            leader_contact: None,
            quiet_until: now + cfg_election_min,
            election_at: now,
            rng: seed ^ 0x9e37_79b9_7f4a_7c15 ^ (id as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            table: RegistryTable::new(),
            origin: Instant::now(),
            waiting: HashMap::new(),
            saved_hard: (0, None),
            saved_snap: 0,
            dirty_from: None,
            out: VecDeque::new(),
        };
        r.saved_hard = (r.p.term, r.p.voted_for);
        r.saved_snap = r.p.snap.index;
        r.restore_table();
        r.reset_election(now);
        r
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.id
    }

    /// Its role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Its term.
    pub fn term(&self) -> u64 {
        self.p.term
    }

    /// The leader it knows of in its term (itself when leading).
    pub fn leader(&self) -> Option<ReplicaId> {
        self.leader
    }

    /// The highest log index known committed.
    pub fn commit_index(&self) -> u64 {
        self.commit
    }

    /// The highest log index applied to the table.
    pub fn applied_index(&self) -> u64 {
        self.applied
    }

    /// The entry at `index`, if the log still holds it (not compacted).
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        index.checked_sub(self.p.snap.index + 1).and_then(|i| self.p.log.get(i as usize))
    }

    /// What must survive a crash.
    pub fn persistent(&self) -> &Persistent {
        &self.p
    }

    /// Answers a read from the applied table at cluster time `now`, whatever the role (for tests and metrics: a
    /// follower's table may be behind).
    pub fn read_local(&mut self, msg: &Message, now: u64) -> Option<Message> {
        let at = self.at(now.max(self.last_stamp()));
        self.table.handle(msg, at)
    }

    /// What changed in the persistent state since the last call. A replica that keeps its state on disk writes these
    /// (and syncs) before it sends the outputs that follow them; that is what makes its votes and acknowledgements
    /// survive a crash.
    pub fn take_changes(&mut self) -> Changes {
        let mut c = Changes::default();
        if (self.p.term, self.p.voted_for) != self.saved_hard {
            self.saved_hard = (self.p.term, self.p.voted_for);
            c.hard = Some(self.saved_hard);
        }
        if self.p.snap.index != self.saved_snap {
            self.saved_snap = self.p.snap.index;
            c.snapshot = Some(self.p.snap.clone());
        }
        if let Some(from) = self.dirty_from.take() {
            let from = from.max(self.p.snap.index + 1);
            c.truncate_from = Some(from);
            c.entries = (from..=self.last_index()).filter_map(|i| self.entry(i).map(|e| (i, e.clone()))).collect();
        }
        c
    }

    fn dirty(&mut self, index: u64) {
        self.dirty_from = Some(self.dirty_from.map_or(index, |d| d.min(index)));
    }

    /// The next output, if any.
    pub fn poll_output(&mut self) -> Option<Output<T>> {
        self.out.pop_front()
    }

    /// When [`Replica::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> u64 {
        match &self.leading {
            Some(l) => l.heartbeat_at,
            None => self.election_at,
        }
    }

    /// A client's request (`token` routes the answer back). Answered at once (reads under the lease, refusals,
    /// `NotLeader`) or once its entry is applied.
    pub fn handle_request(&mut self, token: T, msg: Message, now: u64) {
        let req = match &msg {
            Message::RegClaim { req, .. }
            | Message::RegRemove { req, .. }
            | Message::RegLookup { req, .. }
            | Message::RegList { req } => *req,
            other => {
                let message = format!("message kind {} is not a registry request", other.kind());
                let result = RegResult::Error { code: RegErrorCode::Invalid, message };
                return self.out.push_back(Output::Reply { token, reply: Message::RegReply { req: 0, result } });
            }
        };
        if self.role != Role::Leader {
            // Name the leader only while it is heard from: one that went silent may be dead or cut off.
            let fresh = self.leader_contact.is_some_and(|t| now < t + self.cfg.election_min);
            let hint = self.leader.filter(|_| fresh).map(|l| self.addrs[l].clone()).unwrap_or_default();
            let result = RegResult::Error { code: RegErrorCode::NotLeader, message: hint };
            return self.out.push_back(Output::Reply { token, reply: Message::RegReply { req, result } });
        }
        let read = matches!(msg, Message::RegLookup { .. } | Message::RegList { .. });
        if read && self.lease_valid(now) {
            if let Some(reply) = self.read_local(&msg, now) {
                self.out.push_back(Output::Reply { token, reply });
            }
            return;
        }
        let index = self.append(Command::Request(msg), now);
        self.waiting.insert(index, token);
        self.broadcast(now);
    }

    /// A message from replica `from`.
    pub fn handle_peer(&mut self, from: ReplicaId, msg: PeerMsg, now: u64) {
        if from >= self.addrs.len() || from == self.id {
            return;
        }
        match msg {
            PeerMsg::Vote { term, pre, last_index, last_term } => {
                self.on_vote(from, term, pre, last_index, last_term, now)
            }
            PeerMsg::VoteReply { term, pre, granted } => self.on_vote_reply(from, term, pre, granted, now),
            PeerMsg::Append { term, prev_index, prev_term, entries, commit, sent } => {
                self.on_append(from, term, prev_index, prev_term, entries, commit, sent, now)
            }
            PeerMsg::AppendReply { term, ok, index, sent } => self.on_append_reply(from, term, ok, index, sent, now),
            PeerMsg::Install { term, snap, sent } => self.on_install(from, term, snap, sent, now),
        }
    }

    /// Timers: elections, heartbeats, check-quorum.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.role == Role::Leader {
            let since = self.leading.as_ref().map_or(0, |l| l.since);
            let majority_heard = self.quorum_heard(now).max(since);
            if now.saturating_sub(majority_heard) > self.cfg.election_max {
                tracing::info!(replica = self.id, term = self.p.term, "lost contact with a majority; stepping down");
                self.step_down(self.p.term, None, now);
                return;
            }
            if self.leading.as_ref().is_some_and(|l| now >= l.heartbeat_at) {
                self.broadcast(now);
            }
            return;
        }
        if now >= self.election_at {
            self.start_election(true, now);
        }
    }

    // ---- elections -------------------------------------------------------------------------------------------

    fn start_election(&mut self, pre: bool, now: u64) {
        self.role = if pre { Role::PreCandidate } else { Role::Candidate };
        self.leader = None;
        self.votes = vec![false; self.addrs.len()];
        self.votes[self.id] = true;
        let term = if pre {
            self.p.term + 1
        } else {
            self.p.term += 1;
            self.p.voted_for = Some(self.id);
            self.p.term
        };
        self.reset_election(now);
        let (last_index, last_term) = (self.last_index(), self.last_term());
        for to in self.others() {
            self.out.push_back(Output::Send { to, msg: PeerMsg::Vote { term, pre, last_index, last_term } });
        }
        self.count_votes(now);
    }

    fn count_votes(&mut self, now: u64) {
        if !self.is_majority(self.votes.iter().filter(|v| **v).count()) {
            return;
        }
        match self.role {
            Role::PreCandidate => self.start_election(false, now),
            Role::Candidate => self.become_leader(now),
            _ => {}
        }
    }

    fn on_vote(&mut self, from: ReplicaId, term: u64, pre: bool, last_index: u64, last_term: u64, now: u64) {
        // Stickiness: while a leader is alive, nobody else may win (this also keeps the leader's read lease).
        let leader_alive = now < self.quiet_until
            || match self.role {
                Role::Leader => true,
                _ => self.leader.is_some() && self.leader_contact.is_some_and(|t| now < t + self.cfg.election_min),
            };
        let up_to_date = (last_term, last_index) >= (self.last_term(), self.last_index());
        if term < self.p.term || leader_alive {
            let msg = PeerMsg::VoteReply { term: self.p.term, pre, granted: false };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        if pre {
            let granted = term > self.p.term && up_to_date;
            let reply_term = if granted { term } else { self.p.term };
            let msg = PeerMsg::VoteReply { term: reply_term, pre, granted };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        if term > self.p.term {
            self.step_down(term, None, now);
        }
        let granted = up_to_date && self.p.voted_for.is_none_or(|v| v == from);
        if granted {
            self.p.voted_for = Some(from);
            self.reset_election(now);
        }
        let msg = PeerMsg::VoteReply { term: self.p.term, pre: false, granted };
        self.out.push_back(Output::Send { to: from, msg });
    }

    fn on_vote_reply(&mut self, from: ReplicaId, term: u64, pre: bool, granted: bool, now: u64) {
        if term > self.p.term && !granted {
            return self.step_down(term, None, now);
        }
        let expected = match (self.role, pre) {
            (Role::PreCandidate, true) => self.p.term + 1,
            (Role::Candidate, false) => self.p.term,
            _ => return,
        };
        if granted && term == expected {
            self.votes[from] = true;
            self.count_votes(now);
        }
    }

    fn become_leader(&mut self, now: u64) {
        tracing::info!(replica = self.id, term = self.p.term, "elected leader");
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let n = self.addrs.len();
        let next = self.last_index() + 1;
        self.leading = Some(Leading {
            next: vec![next; n],
            matched: vec![0; n],
            heard: vec![0; n],
            since: now,
            heartbeat_at: now + self.cfg.heartbeat,
        });
        // An entry of its own term, so that earlier entries commit (and reads become possible) at once.
        self.append(Command::Noop, now);
        self.broadcast(now);
    }

    /// Follows `term` (raising it when higher, which clears the vote); answers every waiting client `NotLeader`.
    fn step_down(&mut self, term: u64, leader: Option<ReplicaId>, now: u64) {
        if term > self.p.term {
            self.p.term = term;
            self.p.voted_for = None;
        }
        let was_leading = self.role == Role::Leader;
        self.role = Role::Follower;
        self.leader = leader;
        self.leading = None;
        if was_leading {
            self.reset_election(now);
        }
        let hint = leader.map(|l| self.addrs[l].clone()).unwrap_or_default();
        let mut waiting: Vec<(u64, T)> = self.waiting.drain().collect();
        waiting.sort_by_key(|(i, _)| *i);
        for (index, token) in waiting {
            let req = match self.entry(index).map(|e| &e.cmd) {
                Some(Command::Request(m)) => request_id(m),
                _ => 0,
            };
            let result = RegResult::Error { code: RegErrorCode::NotLeader, message: hint.clone() };
            self.out.push_back(Output::Reply { token, reply: Message::RegReply { req, result } });
        }
    }

    // ---- replication -----------------------------------------------------------------------------------------

    fn append(&mut self, cmd: Command, now: u64) -> u64 {
        let stamp = now.max(self.last_stamp());
        self.p.log.push(Entry { term: self.p.term, stamp, cmd });
        let index = self.last_index();
        self.dirty(index);
        if let Some(l) = &mut self.leading {
            l.matched[self.id] = index;
        }
        self.advance_commit(now);
        index
    }

    /// Sends every follower what it lacks (or a heartbeat).
    fn broadcast(&mut self, now: u64) {
        for to in self.others() {
            self.send_append(to, now);
        }
        if let Some(l) = &mut self.leading {
            l.heartbeat_at = now + self.cfg.heartbeat;
        }
    }

    fn send_append(&mut self, to: ReplicaId, now: u64) {
        let Some(l) = &mut self.leading else { return };
        let next = l.next[to];
        if next <= self.p.snap.index {
            let msg = PeerMsg::Install { term: self.p.term, snap: self.p.snap.clone(), sent: now };
            l.next[to] = self.p.snap.index + 1;
            return self.out.push_back(Output::Send { to, msg });
        }
        let prev_index = next - 1;
        let from = (next - self.p.snap.index - 1) as usize;
        let upto = (from + self.cfg.max_append).min(self.p.log.len());
        let entries = self.p.log[from..upto].to_vec();
        // Optimistic: the next append carries what follows; a refusal moves `next` back.
        l.next[to] = next + entries.len() as u64;
        let prev_term = self.term_at(prev_index).unwrap_or(0);
        let msg = PeerMsg::Append { term: self.p.term, prev_index, prev_term, entries, commit: self.commit, sent: now };
        self.out.push_back(Output::Send { to, msg });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_append(
        &mut self,
        from: ReplicaId,
        term: u64,
        prev_index: u64,
        prev_term: u64,
        entries: Vec<Entry>,
        commit: u64,
        sent: u64,
        now: u64,
    ) {
        if term < self.p.term {
            let msg = PeerMsg::AppendReply { term: self.p.term, ok: false, index: self.last_index(), sent };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        self.follow(from, term, now);
        if prev_index > self.last_index() {
            let msg = PeerMsg::AppendReply { term, ok: false, index: self.last_index(), sent };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        if prev_index >= self.p.snap.index && self.term_at(prev_index) != Some(prev_term) {
            // Entries up to the commit index match every leader's (leader completeness): resend from there.
            let index = self.commit.min(prev_index.saturating_sub(1));
            let msg = PeerMsg::AppendReply { term, ok: false, index, sent };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        let mut index = prev_index;
        for e in entries {
            index += 1;
            if index <= self.p.snap.index {
                continue;
            }
            match self.term_at(index) {
                Some(t) if t == e.term => {}
                // A committed entry never conflicts with a leader's; keep ours if a peer claims otherwise.
                Some(_) if index <= self.commit => {}
                Some(_) => {
                    // A conflicting entry: drop it and everything after.
                    self.p.log.truncate((index - self.p.snap.index - 1) as usize);
                    self.p.log.push(e);
                    self.dirty(index);
                }
                None => {
                    self.p.log.push(e);
                    self.dirty(index);
                }
            }
        }
        let new_commit = commit.min(index);
        if new_commit > self.commit {
            self.commit = new_commit;
            self.apply(now);
        }
        let msg = PeerMsg::AppendReply { term, ok: true, index, sent };
        self.out.push_back(Output::Send { to: from, msg });
    }

    fn on_install(&mut self, from: ReplicaId, term: u64, snap: Snapshot, sent: u64, now: u64) {
        if term < self.p.term {
            let msg = PeerMsg::AppendReply { term: self.p.term, ok: false, index: self.last_index(), sent };
            return self.out.push_back(Output::Send { to: from, msg });
        }
        self.follow(from, term, now);
        let index = snap.index;
        if index > self.commit {
            if self.term_at(index) == Some(snap.term) {
                let keep = (index - self.p.snap.index) as usize;
                self.p.log.drain(..keep.min(self.p.log.len()));
            } else {
                self.p.log.clear();
                self.dirty(index + 1);
            }
            self.p.snap = snap;
            self.commit = index;
            self.applied = index;
            self.restore_table();
        }
        let msg = PeerMsg::AppendReply { term, ok: true, index: index.max(self.commit), sent };
        self.out.push_back(Output::Send { to: from, msg });
    }

    /// Accepts `from` as the leader of `term`.
    fn follow(&mut self, from: ReplicaId, term: u64, now: u64) {
        if term > self.p.term || self.role != Role::Follower {
            self.step_down(term, Some(from), now);
        }
        self.leader = Some(from);
        self.leader_contact = Some(now);
        self.reset_election(now);
    }

    fn on_append_reply(&mut self, from: ReplicaId, term: u64, ok: bool, index: u64, sent: u64, now: u64) {
        if term > self.p.term {
            return self.step_down(term, None, now);
        }
        if self.role != Role::Leader || term != self.p.term {
            return;
        }
        let last = self.last_index();
        let Some(l) = &mut self.leading else { return };
        l.heard[from] = l.heard[from].max(sent);
        if ok {
            l.matched[from] = l.matched[from].max(index);
            l.next[from] = l.next[from].max(index + 1);
            self.advance_commit(now);
            // Keep a follower that is catching up streaming.
            if self.leading.as_ref().is_some_and(|l| l.next[from] <= last) {
                self.send_append(from, now);
            }
        } else {
            l.next[from] = (index + 1).min(last + 1).max(l.matched[from] + 1);
            self.send_append(from, now);
        }
    }

    fn advance_commit(&mut self, now: u64) {
        let Some(l) = &self.leading else { return };
        let mut matched = l.matched.clone();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let n = matched[self.addrs.len() / 2];
        if n > self.commit && self.term_at(n) == Some(self.p.term) {
            self.commit = n;
            self.apply(now);
        }
    }

    fn apply(&mut self, _now: u64) {
        while self.applied < self.commit {
            let index = self.applied + 1;
            let Some(e) = self.entry(index).cloned() else { break };
            self.applied = index;
            let at = self.at(e.stamp);
            let reply = match &e.cmd {
                Command::Noop => {
                    self.table.expire(at);
                    None
                }
                Command::Request(m) => self.table.handle(m, at),
            };
            if let Some(token) = self.waiting.remove(&index) {
                if let Some(reply) = reply {
                    self.out.push_back(Output::Reply { token, reply });
                }
            }
        }
        self.compact();
    }

    fn compact(&mut self) {
        let keep_from = self.applied;
        let applied_in_log = keep_from.saturating_sub(self.p.snap.index) as usize;
        if applied_in_log < self.cfg.compact_after {
            return;
        }
        let Some(last) = self.entry(keep_from).cloned() else { return };
        let claims = self.table.export(self.at(last.stamp));
        self.p.snap = Snapshot { index: keep_from, term: last.term, stamp: last.stamp, claims };
        self.p.log.drain(..applied_in_log);
    }

    fn restore_table(&mut self) {
        self.table = RegistryTable::new();
        let at = self.at(self.p.snap.stamp);
        for claim in &self.p.snap.claims {
            self.table.handle(claim, at);
        }
    }

    // ---- helpers ---------------------------------------------------------------------------------------------

    fn lease_valid(&self, now: u64) -> bool {
        self.term_at(self.commit) == Some(self.p.term) && now < self.quorum_heard(now) + self.cfg.election_min
    }

    /// The newest time a majority (the leader included) is known to have heard from this leader.
    fn quorum_heard(&self, now: u64) -> u64 {
        let Some(l) = &self.leading else { return 0 };
        let mut heard = l.heard.clone();
        heard[self.id] = now;
        heard.sort_unstable_by(|a, b| b.cmp(a));
        heard[self.addrs.len() / 2]
    }

    fn is_majority(&self, n: usize) -> bool {
        n > self.addrs.len() / 2
    }

    fn others(&self) -> Vec<ReplicaId> {
        (0..self.addrs.len()).filter(|i| *i != self.id).collect()
    }

    fn last_index(&self) -> u64 {
        self.p.snap.index + self.p.log.len() as u64
    }

    fn last_term(&self) -> u64 {
        self.p.log.last().map_or(self.p.snap.term, |e| e.term)
    }

    fn last_stamp(&self) -> u64 {
        self.p.log.last().map_or(self.p.snap.stamp, |e| e.stamp)
    }

    fn term_at(&self, index: u64) -> Option<u64> {
        if index == self.p.snap.index {
            Some(self.p.snap.term)
        } else {
            self.entry(index).map(|e| e.term)
        }
    }

    fn at(&self, stamp: u64) -> Instant {
        self.origin + Duration::from_millis(stamp)
    }

    fn reset_election(&mut self, now: u64) {
        // xorshift64*: a seeded, dependency-free random election timeout.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = self.cfg.election_max.saturating_sub(self.cfg.election_min).max(1);
        self.election_at = now + self.cfg.election_min + r % span;
    }
}

/// The request id of a registry request.
pub(crate) fn request_id(m: &Message) -> u32 {
    match m {
        Message::RegClaim { req, .. }
        | Message::RegRemove { req, .. }
        | Message::RegLookup { req, .. }
        | Message::RegList { req } => *req,
        _ => 0,
    }
}
