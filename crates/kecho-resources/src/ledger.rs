//! An agent's ledger: admission control, offers held for a short time, leased reservations, and their end (release,
//! lapse, holder gone). Pure: every input carries `now`, nothing here reads a clock or does I/O.
//!
//! **Invariant:** for every resource, the sum of the amounts of all entries (offers still held and confirmed
//! reservations) never exceeds the capacity. An offer counts against capacity from the moment it is made, so
//! concurrent requesters can never be promised the same capacity twice; an offer nobody confirms stops counting when
//! its hold time ends.
//!
//! **Fencing.** A reservation lives until its lease ends unless its holder renews it; the agent's own clock decides.
//! A holder cut off from the agent cannot renew, so the agent frees the capacity when the lease ends, whatever the
//! holder believes; a renewal or resize that arrives after that finds no reservation and is refused (the holder must
//! reserve again and gets a new id). Every confirmation draws a new, larger *fence* number from the ledger; work
//! started under a reservation (remote execution) carries `(id, fence)` and the agent checks it with
//! [`Ledger::check`], so nothing runs under a reservation that has ended, even one whose id is reused by no one (ids
//! carry the agent's incarnation and are never reused).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::types::{human, Amounts, HolderId, ReservationId};

/// Timings of a ledger.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// How long an offer holds its capacity for the requester to confirm it.
    pub hold: Duration,
    /// The longest lease granted in one confirmation or renewal (longer asks are granted this).
    pub max_lease: Duration,
    /// How long the holder of an attached reservation may be absent from the channel before it is freed.
    pub holder_grace: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            hold: Duration::from_secs(2),
            max_lease: Duration::from_secs(24 * 3600),
            holder_grace: Duration::from_secs(3),
        }
    }
}

/// Where an entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Offered to a requester, held until `until`.
    Offered,
    /// Confirmed: reserved until `until` unless renewed.
    Active,
}

/// One entry of the ledger.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The reservation.
    pub id: ReservationId,
    /// Who asked for it.
    pub holder: HolderId,
    /// What it holds.
    pub amounts: Amounts,
    /// Offered or confirmed.
    pub phase: Phase,
    /// End of the hold time (offers) or of the lease (reservations).
    pub until: Instant,
    /// Freed when its holder leaves the channel (the holder keeps it while it runs); a detached reservation lives by
    /// its lease alone.
    pub attached: bool,
    /// The fence number of the latest confirmation (0 while offered).
    pub fence: u64,
    /// Since when the holder has been missing from the channel, for attached reservations.
    missing_since: Option<Instant>,
}

/// Why an agent does not admit a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request names a resource this agent does not count.
    #[error("unknown resource `{resource}` (this agent counts {known})")]
    UnknownResource {
        /// The name asked for.
        resource: String,
        /// The names the agent counts, comma-separated.
        known: String,
    },
    /// Not enough of one resource is free.
    #[error("{resource}: wants {}, {} free", human(resource, *wanted), human(resource, *free))]
    Insufficient {
        /// The resource.
        resource: String,
        /// The amount asked for.
        wanted: u64,
        /// What is free.
        free: u64,
    },
    /// The agent's attributes do not satisfy the request's requirement.
    #[error("requirement `{expr}` does not hold here")]
    Requirement {
        /// The requirement.
        expr: String,
    },
}

/// Why an operation on a reservation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// No such reservation: never made here, released, or ended (its hold or lease ran out, its holder left).
    #[error("no such reservation (released, lapsed, or of an earlier run of the agent)")]
    Unknown,
    /// The reservation belongs to another holder.
    #[error("held by another requester")]
    NotHolder,
    /// The operation needs a confirmed reservation and this is an offer, or the other way round.
    #[error("reservation is {0}")]
    WrongPhase(&'static str),
    /// A lease of zero length.
    #[error("a lease must be longer than zero")]
    BadLease,
    /// A resize that would exceed capacity or names an unknown resource.
    #[error(transparent)]
    Admission(#[from] Refusal),
    /// The fence number is not the reservation's current one.
    #[error("stale fence {given} (current {current})")]
    Fenced {
        /// What was presented.
        given: u64,
        /// What the ledger has.
        current: u64,
    },
}

/// What a confirmation, renewal or resize granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The reservation.
    pub id: ReservationId,
    /// Its amounts now.
    pub amounts: Amounts,
    /// End of the lease.
    pub until: Instant,
    /// Its fence number.
    pub fence: u64,
}

/// Why an entry ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// An offer nobody confirmed in its hold time.
    OfferLapsed,
    /// A lease not renewed in time.
    LeaseEnded,
    /// The holder of an attached reservation left the channel (died, was cut off, exited).
    HolderGone,
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ending::OfferLapsed => "offer lapsed",
            Ending::LeaseEnded => "lease ended",
            Ending::HolderGone => "holder gone",
        })
    }
}

/// The ledger of one agent.
#[derive(Debug, Clone)]
pub struct Ledger {
    agent: String,
    epoch: u64,
    cfg: LedgerConfig,
    capacity: Amounts,
    reserved: Amounts,
    entries: BTreeMap<u64, Entry>,
    next: u64,
    fence: u64,
    /// Counts changes of what is reserved.
    version: u64,
}

impl Ledger {
    /// An empty ledger for agent `agent` in incarnation `epoch`, with the capacity it offers.
    pub fn new(agent: impl Into<String>, epoch: u64, capacity: Amounts, cfg: LedgerConfig) -> Self {
        let reserved = capacity.iter().fold(Amounts::new(), |a, (k, _)| a.with(k, 0));
        Ledger {
            agent: agent.into(),
            epoch,
            cfg,
            capacity,
            reserved,
            entries: BTreeMap::new(),
            next: 1,
            fence: 0,
            version: 0,
        }
    }

    /// The agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }
    /// The agent's incarnation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// The timings.
    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }
    /// What the agent offers in all.
    pub fn capacity(&self) -> &Amounts {
        &self.capacity
    }
    /// What offers and reservations hold, by resource.
    pub fn reserved(&self) -> &Amounts {
        &self.reserved
    }
    /// A number that grows with every change of what is reserved (an offer, a resize, an entry's end): the order of
    /// the agent's statements about what is free, so that a view keeps the newest of a report and an answer.
    pub fn version(&self) -> u64 {
        self.version
    }
    /// What is free, by resource.
    pub fn free(&self) -> Amounts {
        let mut f = self.capacity.clone();
        f.sub(&self.reserved);
        f
    }
    /// Every entry, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }
    /// Number of entries (offers and reservations).
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    /// True if nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks a request against free capacity, without changing anything.
    pub fn admits(&self, amounts: &Amounts) -> Result<(), Refusal> {
        for (r, want) in amounts.iter() {
            let Some(cap) = self.capacity.get(r) else {
                let known: Vec<&str> = self.capacity.iter().map(|(k, _)| k).collect();
                return Err(Refusal::UnknownResource { resource: r.to_owned(), known: known.join(", ") });
            };
            let free = cap.saturating_sub(self.reserved.amount(r));
            if want > free {
                return Err(Refusal::Insufficient { resource: r.to_owned(), wanted: want, free });
            }
        }
        Ok(())
    }

    /// Admission control: if the amounts fit in what is free, holds them for `holder` for the hold time and returns
    /// the offer's entry.
    pub fn offer(&mut self, holder: &HolderId, amounts: &Amounts, now: Instant) -> Result<&Entry, Refusal> {
        self.expire(now);
        self.admits(amounts)?;
        let n = self.next;
        self.next += 1;
        self.reserved.add(amounts);
        self.version += 1;
        let id = ReservationId { agent: self.agent.clone(), epoch: self.epoch, n };
        let entry = Entry {
            id,
            holder: holder.clone(),
            amounts: amounts.clone(),
            phase: Phase::Offered,
            until: now + self.cfg.hold,
            attached: false,
            fence: 0,
            missing_since: None,
        };
        Ok(self.entries.entry(n).or_insert(entry))
    }

    fn find(&mut self, id: &ReservationId, now: Instant) -> Result<&mut Entry, LedgerError> {
        self.expire(now);
        if id.agent != self.agent || id.epoch != self.epoch {
            return Err(LedgerError::Unknown);
        }
        self.entries.get_mut(&id.n).ok_or(LedgerError::Unknown)
    }

    fn lease(&self, lease: Duration) -> Result<Duration, LedgerError> {
        if lease.is_zero() {
            return Err(LedgerError::BadLease);
        }
        Ok(lease.min(self.cfg.max_lease))
    }

    /// Confirms an offer still held: it becomes a reservation leased until `now + lease`. Confirming a reservation
    /// already confirmed by the same holder grants it again (a repeated confirmation is harmless).
    pub fn confirm(
        &mut self,
        id: &ReservationId,
        holder: &HolderId,
        lease: Duration,
        attached: bool,
        now: Instant,
    ) -> Result<Grant, LedgerError> {
        let lease = self.lease(lease)?;
        self.fence += 1;
        let fence = self.fence;
        let e = self.find(id, now)?;
        if &e.holder != holder {
            return Err(LedgerError::NotHolder);
        }
        if e.phase == Phase::Offered {
            e.phase = Phase::Active;
            e.attached = attached;
            e.until = now + lease;
            e.fence = fence;
        }
        Ok(Grant { id: e.id.clone(), amounts: e.amounts.clone(), until: e.until, fence: e.fence })
    }

    /// Withdraws an offer (the requester chose another). Returns whether there was one.
    pub fn decline(&mut self, id: &ReservationId, holder: &HolderId, now: Instant) -> bool {
        match self.find(id, now) {
            Ok(e) if &e.holder == holder && e.phase == Phase::Offered => {}
            _ => return false,
        }
        self.remove(id.n);
        true
    }

    /// Extends a reservation's lease to `now + lease`.
    pub fn renew(
        &mut self,
        id: &ReservationId,
        holder: &HolderId,
        lease: Duration,
        now: Instant,
    ) -> Result<Grant, LedgerError> {
        let lease = self.lease(lease)?;
        let e = self.find(id, now)?;
        if &e.holder != holder {
            return Err(LedgerError::NotHolder);
        }
        if e.phase != Phase::Active {
            return Err(LedgerError::WrongPhase("not confirmed"));
        }
        e.until = e.until.max(now + lease);
        Ok(Grant { id: e.id.clone(), amounts: e.amounts.clone(), until: e.until, fence: e.fence })
    }

    /// Renegotiation: changes a reservation's amounts. Shrinking always succeeds; growing is admitted against what
    /// is free, as a new request would be. Resources not named keep their amount; an amount of 0 keeps the name.
    pub fn resize(
        &mut self,
        id: &ReservationId,
        holder: &HolderId,
        amounts: &Amounts,
        now: Instant,
    ) -> Result<Grant, LedgerError> {
        let e = self.find(id, now)?;
        if &e.holder != holder {
            return Err(LedgerError::NotHolder);
        }
        if e.phase != Phase::Active {
            return Err(LedgerError::WrongPhase("not confirmed"));
        }
        let old = e.amounts.clone();
        let mut new = old.clone();
        for (k, v) in amounts.iter() {
            new.set(k, v);
        }
        // Admission of the growth only.
        let mut growth = Amounts::new();
        for (k, v) in new.iter() {
            let before = old.amount(k);
            if v > before || old.get(k).is_none() {
                growth.set(k, v.saturating_sub(before));
            }
        }
        self.admits(&growth)?;
        self.reserved.sub(&old);
        self.reserved.add(&new);
        self.version += 1;
        let e = self.entries.get_mut(&id.n).ok_or(LedgerError::Unknown)?;
        e.amounts = new;
        Ok(Grant { id: e.id.clone(), amounts: e.amounts.clone(), until: e.until, fence: e.fence })
    }

    /// Frees a reservation or offer (the id is the capability; anyone who has it may release). Returns what it held.
    pub fn release(&mut self, id: &ReservationId, now: Instant) -> Result<Amounts, LedgerError> {
        self.find(id, now)?;
        Ok(self.remove(id.n).map(|e| e.amounts).unwrap_or_default())
    }

    /// The reservation `id` if it is confirmed and its fence is `fence`: what remote execution checks before
    /// starting or continuing work under it.
    pub fn check(&mut self, id: &ReservationId, fence: u64, now: Instant) -> Result<&Entry, LedgerError> {
        let e = self.find(id, now)?;
        if e.phase != Phase::Active {
            return Err(LedgerError::WrongPhase("not confirmed"));
        }
        if e.fence != fence {
            return Err(LedgerError::Fenced { given: fence, current: e.fence });
        }
        Ok(e)
    }

    fn remove(&mut self, n: u64) -> Option<Entry> {
        let e = self.entries.remove(&n)?;
        self.reserved.sub(&e.amounts);
        self.version += 1;
        Some(e)
    }

    /// Ends every offer past its hold time and every reservation past its lease.
    pub fn expire(&mut self, now: Instant) -> Vec<(Entry, Ending)> {
        let due: Vec<u64> = self.entries.iter().filter(|(_, e)| e.until <= now).map(|(n, _)| *n).collect();
        due.into_iter()
            .filter_map(|n| self.remove(n))
            .map(|e| {
                let why = if e.phase == Phase::Offered { Ending::OfferLapsed } else { Ending::LeaseEnded };
                (e, why)
            })
            .collect()
    }

    /// Holder liveness: `present` says which holders are members of the channel now. An attached reservation whose
    /// holder has been absent for the holder grace time ends; one whose holder is back is kept.
    pub fn holders(&mut self, present: impl Fn(&HolderId) -> bool, now: Instant) -> Vec<(Entry, Ending)> {
        let mut ended = self.expire(now);
        let grace = self.cfg.holder_grace;
        let mut gone = Vec::new();
        for (n, e) in self.entries.iter_mut() {
            if !(e.attached && e.phase == Phase::Active) {
                continue;
            }
            if present(&e.holder) {
                e.missing_since = None;
            } else {
                let since = *e.missing_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= grace {
                    gone.push(*n);
                }
            }
        }
        ended.extend(gone.into_iter().filter_map(|n| self.remove(n)).map(|e| (e, Ending::HolderGone)));
        ended
    }

    /// The earliest time at which an entry ends by itself (for the caller's timer).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.values().map(|e| e.until).min()
    }

    /// The sum of every entry's amounts, recomputed (the cached sum must equal it; used by tests and audits).
    pub fn recount(&self) -> Amounts {
        let mut sum = self.capacity.iter().fold(Amounts::new(), |a, (k, _)| a.with(k, 0));
        for e in self.entries.values() {
            sum.add(&e.amounts);
        }
        sum
    }

    /// Resources whose reservations exceed capacity (never any; the benchmark and tests audit it).
    pub fn overcommitted(&self) -> Vec<String> {
        let sum = self.recount();
        sum.iter().filter(|(k, v)| *v > self.capacity.amount(k)).map(|(k, _)| k.to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ledger(now: Instant) -> (Ledger, Instant) {
        let cap = Amounts::new().with("cpus", 8).with("mem", 16_000);
        (Ledger::new("a", 0xabc, cap, LedgerConfig::default()), now)
    }

    fn h(s: &str) -> HolderId {
        HolderId(s.into())
    }

    #[test]
    fn offers_count_against_capacity_and_lapse() {
        let (mut l, t0) = ledger(Instant::now());
        let want = Amounts::new().with("cpus", 5);
        let id = l.offer(&h("x"), &want, t0).unwrap().id.clone();
        // A second requester cannot be offered the same cores while the first offer holds.
        assert!(matches!(
            l.offer(&h("y"), &want, t0),
            Err(Refusal::Insufficient { ref resource, wanted: 5, free: 3 }) if resource == "cpus"
        ));
        // Once the hold time is over, the offer is gone and confirming it fails.
        let later = t0 + l.config().hold;
        assert!(l.offer(&h("y"), &want, later).is_ok());
        assert_eq!(l.confirm(&id, &h("x"), Duration::from_secs(10), false, later), Err(LedgerError::Unknown));
    }

    #[test]
    fn unknown_resource_refused_with_the_known_ones() {
        let (mut l, t0) = ledger(Instant::now());
        let e = l.offer(&h("x"), &Amounts::new().with("gpu", 1), t0).unwrap_err();
        assert_eq!(e.to_string(), "unknown resource `gpu` (this agent counts cpus, mem)");
    }

    #[test]
    fn lease_lifecycle_renew_resize_release() {
        let (mut l, t0) = ledger(Instant::now());
        let id = l.offer(&h("x"), &Amounts::new().with("cpus", 2), t0).unwrap().id.clone();
        let g = l.confirm(&id, &h("x"), Duration::from_secs(10), false, t0).unwrap();
        assert_eq!(g.until, t0 + Duration::from_secs(10));
        assert_eq!(l.renew(&id, &h("y"), Duration::from_secs(10), t0), Err(LedgerError::NotHolder));
        let t1 = t0 + Duration::from_secs(8);
        assert_eq!(l.renew(&id, &h("x"), Duration::from_secs(10), t1).unwrap().until, t1 + Duration::from_secs(10));
        // Grow within capacity, then beyond it.
        assert_eq!(l.resize(&id, &h("x"), &Amounts::new().with("cpus", 8), t1).unwrap().amounts.amount("cpus"), 8);
        assert!(matches!(
            l.resize(&id, &h("x"), &Amounts::new().with("cpus", 9), t1),
            Err(LedgerError::Admission(Refusal::Insufficient { .. }))
        ));
        assert_eq!(l.resize(&id, &h("x"), &Amounts::new().with("cpus", 1), t1).unwrap().amounts.amount("cpus"), 1);
        assert_eq!(l.free().amount("cpus"), 7);
        // The fence check passes with the current fence only.
        assert!(l.check(&id, g.fence, t1).is_ok());
        assert!(matches!(l.check(&id, g.fence + 1, t1), Err(LedgerError::Fenced { .. })));
        assert_eq!(l.release(&id, t1).unwrap().amount("cpus"), 1);
        assert_eq!(l.free().amount("cpus"), 8);
        assert_eq!(l.release(&id, t1), Err(LedgerError::Unknown));
    }

    #[test]
    fn a_lease_not_renewed_across_a_cut_is_fenced() {
        let (mut l, t0) = ledger(Instant::now());
        let id = l.offer(&h("x"), &Amounts::new().with("cpus", 8), t0).unwrap().id.clone();
        l.confirm(&id, &h("x"), Duration::from_secs(5), false, t0).unwrap();
        // Cut off for longer than the lease: the capacity is free again, and the late renewal is refused.
        let back = t0 + Duration::from_secs(6);
        assert_eq!(l.expire(back).len(), 1);
        assert_eq!(l.renew(&id, &h("x"), Duration::from_secs(5), back), Err(LedgerError::Unknown));
        assert_eq!(l.free().amount("cpus"), 8);
        // An id of another incarnation is unknown here.
        let other = ReservationId { epoch: 0x123, ..id };
        assert_eq!(l.release(&other, back), Err(LedgerError::Unknown));
    }

    #[test]
    fn attached_reservations_end_when_the_holder_is_gone_past_the_grace() {
        let (mut l, t0) = ledger(Instant::now());
        let a = l.offer(&h("x"), &Amounts::new().with("cpus", 1), t0).unwrap().id.clone();
        l.confirm(&a, &h("x"), Duration::from_secs(60), true, t0).unwrap();
        let d = l.offer(&h("x"), &Amounts::new().with("cpus", 1), t0).unwrap().id.clone();
        l.confirm(&d, &h("x"), Duration::from_secs(60), false, t0).unwrap();
        assert!(l.holders(|_| false, t0 + Duration::from_secs(1)).is_empty());
        // Back within the grace: kept, and the absence count starts again.
        assert!(l.holders(|_| true, t0 + Duration::from_secs(2)).is_empty());
        assert!(l.holders(|_| false, t0 + Duration::from_secs(3)).is_empty());
        let ended = l.holders(|_| false, t0 + Duration::from_secs(6));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].0.id, a);
        assert_eq!(ended[0].1, Ending::HolderGone);
        // The detached one lives by its lease.
        assert_eq!(l.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Offer { holder: u8, cpus: u64, mem: u64 },
        Confirm { pick: usize, holder: u8, lease: u64, attached: bool },
        Decline { pick: usize, holder: u8 },
        Renew { pick: usize, holder: u8, lease: u64 },
        Resize { pick: usize, holder: u8, cpus: u64 },
        Release { pick: usize },
        Holders { present: u8 },
        Wait { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0u64..6, 0u64..9000).prop_map(|(holder, cpus, mem)| Op::Offer { holder, cpus, mem }),
            3 => (any::<usize>(), 0u8..4, 0u64..8000, any::<bool>())
                .prop_map(|(pick, holder, lease, attached)| Op::Confirm { pick, holder, lease, attached }),
            1 => (any::<usize>(), 0u8..4).prop_map(|(pick, holder)| Op::Decline { pick, holder }),
            2 => (any::<usize>(), 0u8..4, 0u64..8000).prop_map(|(pick, holder, lease)| Op::Renew { pick, holder, lease }),
            2 => (any::<usize>(), 0u8..4, 0u64..9).prop_map(|(pick, holder, cpus)| Op::Resize { pick, holder, cpus }),
            1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
            1 => any::<u8>().prop_map(|present| Op::Holders { present }),
            3 => (0u64..3000).prop_map(|ms| Op::Wait { ms }),
        ]
    }

    proptest! {
        /// Under any interleaving of concurrent requesters' offers, confirmations, renewals, resizes, releases,
        /// expiries and holder departures: the cached sum equals the recount, never exceeds capacity, nothing
        /// outlives its deadline, and fence numbers only grow.
        #[test]
        fn never_overcommits(ops in proptest::collection::vec(op(), 1..200)) {
            let t0 = Instant::now();
            let (mut l, _) = ledger(t0);
            let mut now = t0;
            let mut ids: Vec<ReservationId> = Vec::new();
            let mut last_fence = 0;
            let pick = |ids: &Vec<ReservationId>, i: usize| ids.get(i % ids.len().max(1)).cloned();
            for op in ops {
                match op {
                    Op::Offer { holder, cpus, mem } => {
                        let want = Amounts::new().with("cpus", cpus).with("mem", mem);
                        match l.offer(&h(&holder.to_string()), &want, now) {
                            Ok(e) => ids.push(e.id.clone()),
                            Err(Refusal::Insufficient { resource, wanted, free: f }) => {
                                prop_assert!(wanted > f);
                                prop_assert_eq!(l.free().amount(&resource), f);
                            }
                            Err(e) => prop_assert!(false, "unexpected {e}"),
                        }
                    }
                    Op::Confirm { pick: p, holder, lease, attached } => {
                        if let Some(id) = pick(&ids, p) {
                            if let Ok(g) = l.confirm(&id, &h(&holder.to_string()), Duration::from_millis(lease), attached, now) {
                                prop_assert!(g.until > now);
                                prop_assert!(g.fence <= l.fence && g.fence >= 1);
                                last_fence = last_fence.max(g.fence);
                            }
                        }
                    }
                    Op::Decline { pick: p, holder } => {
                        if let Some(id) = pick(&ids, p) {
                            l.decline(&id, &h(&holder.to_string()), now);
                        }
                    }
                    Op::Renew { pick: p, holder, lease } => {
                        if let Some(id) = pick(&ids, p) {
                            if let Ok(g) = l.renew(&id, &h(&holder.to_string()), Duration::from_millis(lease), now) {
                                prop_assert!(g.until > now);
                            }
                        }
                    }
                    Op::Resize { pick: p, holder, cpus } => {
                        if let Some(id) = pick(&ids, p) {
                            let _ = l.resize(&id, &h(&holder.to_string()), &Amounts::new().with("cpus", cpus), now);
                        }
                    }
                    Op::Release { pick: p } => {
                        if let Some(id) = pick(&ids, p) {
                            let _ = l.release(&id, now);
                        }
                    }
                    Op::Holders { present } => {
                        l.holders(|hid| hid.0.parse::<u8>().is_ok_and(|x| present & (1 << x) != 0), now);
                    }
                    Op::Wait { ms } => {
                        now += Duration::from_millis(ms);
                        l.expire(now);
                    }
                }
                prop_assert_eq!(l.recount(), l.reserved().clone());
                prop_assert!(l.overcommitted().is_empty(), "overcommitted: {:?}", l.overcommitted());
                l.expire(now);
                for e in l.entries() {
                    prop_assert!(e.until > now, "entry past its deadline kept");
                }
                prop_assert!(l.fence >= last_fence);
            }
        }
    }
}
