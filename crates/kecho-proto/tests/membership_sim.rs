//! Deterministic simulation of channel membership with virtual time: joins, leaves, crashes found by heartbeats,
//! contact takeover, registry failures and restarts, partitions and random churn. See `sim/mod.rs` for the model.

mod sim;

use std::collections::BTreeSet;
use std::time::Duration;

use kecho_proto::codec::{ClaimMode, Message};
use kecho_proto::membership::{OpenFailure, OpenMode, Output};
use kecho_proto::{Attrs, ChannelSecret, LocalId, MemberInfo, NodeId, Overflow, Role, TypeFilter};

use sim::{standard_members, Sim, SimConfig, XorShift, JOIN};

const CH: &str = "news";
const LIMIT: Duration = Duration::from_secs(20);

fn ids(list: &[u64]) -> Vec<NodeId> {
    list.iter().copied().map(NodeId).collect()
}

/// `creator` creates the channel, then each of `joiners` joins once the previous one is ready; views converge.
fn build(sim: &mut Sim, creator: u64, joiners: &[u64]) {
    sim.open(creator, CH, OpenMode::Create);
    sim.run_until(LIMIT, "creator ready", |s| s.ready(creator, CH));
    for &j in joiners {
        sim.open(j, CH, JOIN);
        sim.run_until(LIMIT, "joiner ready", |s| s.ready(j, CH));
    }
    settle(sim);
}

/// Runs until every live member sees every other live member with its current snapshot.
fn settle(sim: &mut Sim) -> Duration {
    sim.run_until(LIMIT, "views converge", |s| s.views_agree(CH).is_ok())
}

/// Every live member believes `contact` is the contact, and the registry agrees.
fn assert_contact(sim: &mut Sim, contact: u64) {
    assert_eq!(sim.entry_contact(CH), Some(NodeId(contact)), "registry contact\n{}", sim.dump());
    for id in sim.live_members(CH) {
        assert_eq!(sim.st(id.0, CH).contact(), Some(NodeId(contact)), "{id:?} believes another contact");
    }
}

fn changed_since(sim: &Sim, id: u64, since: Duration) -> bool {
    sim.chan(id, CH).notices.iter().any(|(t, o)| *t >= since && *o == Output::Changed)
}

fn sink(id: u32, types: &[&str]) -> MemberInfo {
    MemberInfo {
        id: LocalId(id),
        role: Role::Sink {
            types: TypeFilter::Only(types.iter().map(|t| t.to_string()).collect()),
            overflow: Overflow::Block,
            filter: None,
        },
        attrs: Attrs::new(),
    }
}

// 1.
#[test]
fn create_and_three_joiners() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3, 4]);
    let all = [1u64, 2, 3, 4];
    for &id in &all {
        assert!(sim.ready(id, CH), "n{id} ready");
        let st = sim.st(id, CH);
        assert!(st.is_member());
        let peers: Vec<NodeId> = st.peers().keys().copied().collect();
        let others: Vec<u64> = all.iter().copied().filter(|o| *o != id).collect();
        assert_eq!(peers, ids(&others), "n{id}'s peers");
        for &o in &others {
            let p = &st.peers()[&NodeId(o)];
            assert_eq!(p.snapshot.members, standard_members(o), "n{id}'s copy of n{o}'s members");
            assert_eq!(p.snapshot, *sim.st(o, CH).local());
            assert_eq!(p.addr, sim.nodes[&NodeId(o)].addr);
        }
        assert_eq!(st.counts(), (4, 4), "n{id}'s counts");
        assert_eq!(st.id(), sim.st(1, CH).id(), "one channel id");
    }
    assert_contact(&mut sim, 1);
    // The registry learns the counts with the contact's next renewal.
    let now = sim.elapsed();
    sim.run_until(LIMIT, "a renewal", |s| s.claims_by(1).iter().any(|(t, m)| *t > now && *m == ClaimMode::Renew));
    let e = sim.entry(CH).expect("entry");
    assert_eq!((e.contact, e.sources, e.sinks, e.channel), (NodeId(1), 4, 4, sim.st(1, CH).id()));
}

// 2.
#[test]
fn concurrent_joins_converge() {
    let mut sim = Sim::new(SimConfig::default());
    sim.open(1, CH, OpenMode::Create);
    sim.run_until(LIMIT, "creator ready", |s| s.ready(1, CH));
    // Seven joiners at the same virtual instant, some over slow links.
    for id in 2..=8u64 {
        sim.set_latency(1, id, Duration::from_millis(id * 7));
        sim.set_latency(id, id + 1, Duration::from_millis(1 + id));
        sim.open(id, CH, if id % 2 == 0 { JOIN } else { OpenMode::OpenOrCreate });
    }
    sim.run_until(LIMIT, "all ready", |s| (2..=8).all(|id| s.ready(id, CH)));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[1, 2, 3, 4, 5, 6, 7, 8]));
    for id in 1..=8u64 {
        assert_eq!(sim.st(id, CH).counts(), (8, 8));
    }
    assert_contact(&mut sim, 1);
}

// 2b. Nobody has created the channel yet and several nodes open it with OpenOrCreate at once.
#[test]
fn concurrent_open_or_create_makes_one_channel() {
    let mut sim = Sim::new(SimConfig::default());
    for id in [5u64, 3, 9, 1, 7] {
        sim.open(id, CH, OpenMode::OpenOrCreate);
    }
    sim.run_until(LIMIT, "all ready", |s| [5u64, 3, 9, 1, 7].iter().all(|id| s.ready(*id, CH)));
    settle(&mut sim);
    let chans: BTreeSet<_> = [5u64, 3, 9, 1, 7].iter().map(|id| sim.st(*id, CH).id()).collect();
    assert_eq!(chans.len(), 1, "one channel");
    // The first create to reach the registry wins (node 5 opened first).
    assert_contact(&mut sim, 5);
}

// 3.
#[test]
fn member_changes_reach_everyone() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3, 4]);
    let mut members = standard_members(3);
    members.push(sink(7, &["y", "z"]));
    if let Role::Sink { types, .. } = &mut members[0].role {
        *types = TypeFilter::Only(vec!["x".into(), "w".into()]);
    }
    let before = sim.st(3, CH).local().version;
    let since = sim.elapsed();
    sim.set_members(3, CH, members.clone());
    let version = sim.st(3, CH).local().version;
    assert_eq!(version, before + 1);
    let took = sim.run_until(LIMIT, "new snapshot everywhere", |s| {
        [1u64, 2, 4].iter().all(|id| s.st(*id, CH).peers()[&NodeId(3)].snapshot.version == version)
    });
    assert!(took <= Duration::from_millis(10), "one hop: {took:?}");
    for id in [1u64, 2, 4] {
        let st = sim.st(id, CH);
        assert_eq!(st.peers()[&NodeId(3)].snapshot.members, members);
        assert_eq!(st.counts(), (4, 5));
        assert!(changed_since(&sim, id, since), "n{id} reported the change");
    }
    settle(&mut sim);
}

// 3b. The registry's member counts follow a change within `counts_delay`, not only at the next renewal.
#[test]
fn registry_counts_follow_member_changes_promptly() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3]);
    let m = sim.cfg.membership.clone();
    // Past the claims of the joins: the next renewal is a third of a lease away.
    sim.run_for(m.counts_delay * 2);
    let mut members = standard_members(3);
    members.push(sink(9, &["x"]));
    sim.set_members(3, CH, members);
    let want = sim.st(1, CH).counts();
    let took = sim.run_until(LIMIT, "registry counts", |s| s.entry(CH).is_some_and(|e| (e.sources, e.sinks) == want));
    let bound = m.counts_delay + sim.cfg.latency + sim.cfg.registry_latency * 2 + Duration::from_millis(5);
    assert!(took <= bound, "counts reached the registry after {took:?}, expected within {bound:?}");
    assert!(took < m.lease_ttl / 3, "not merely at the renewal");
}

// 4.
#[test]
fn clean_leave_of_a_member() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3, 4]);
    let entry = sim.entry(CH).expect("entry");
    let since = sim.elapsed();
    sim.leave(3, CH);
    let took = sim.run_until(LIMIT, "leaver dropped", |s| {
        [1u64, 2, 4].iter().all(|id| !s.st(*id, CH).peers().contains_key(&NodeId(3)))
    });
    assert!(took <= Duration::from_millis(10), "a leave takes one hop, not a heartbeat: {took:?}");
    for id in [1u64, 2, 4] {
        assert!(changed_since(&sim, id, since), "n{id} reported the change");
        assert_eq!(sim.st(id, CH).counts(), (3, 3));
    }
    assert!(sim.st(3, CH).has_left());
    // Nothing that was still on its way brings the leaver back, and the registry entry is the same.
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.live_members(CH), ids(&[1, 2, 4]));
    sim.views_agree(CH).expect("views");
    let now = sim.entry(CH).expect("entry");
    assert_eq!((now.contact, now.channel, now.addr), (entry.contact, entry.channel, entry.addr));
    assert_eq!((now.sources, now.sinks), (3, 3), "renewed with the new counts");
    assert!(sim.claims_by(2).is_empty() && sim.claims_by(4).is_empty(), "no takeover");
}

// 5.
#[test]
fn contact_leaves_and_the_lowest_member_takes_over() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[30, 20, 40]);
    let since = sim.elapsed();
    sim.leave(10, CH);
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact(CH) == Some(NodeId(20)));
    assert_eq!(sim.claims_by(20), vec![(sim.claims_by(20)[0].0, ClaimMode::Takeover(NodeId(10)))]);
    assert!(sim.claims_by(30).is_empty() && sim.claims_by(40).is_empty(), "only the lowest claims");
    assert!(sim.claims_by(20)[0].0 - since <= Duration::from_millis(20), "takeover right after the leave");
    settle(&mut sim);
    assert_contact(&mut sim, 20);
    assert_eq!(sim.entry(CH).expect("entry").channel, sim.st(20, CH).id(), "same channel");
    sim.open(50, CH, JOIN);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(50, CH));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[20, 30, 40, 50]));
    let peers: Vec<NodeId> = sim.st(50, CH).peers().keys().copied().collect();
    assert_eq!(peers, ids(&[20, 30, 40]));
    assert_contact(&mut sim, 20);
}

// 6.
#[test]
fn contact_crash_is_found_by_heartbeat_and_taken_over() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30]);
    // Let the links go idle so that only heartbeats flow.
    sim.run_for(Duration::from_secs(1));
    let hb = sim.cfg.heartbeat;
    let crashed_at = sim.elapsed();
    sim.crash(10);
    sim.run_until(LIMIT, "crash detected", |s| {
        [20u64, 30].iter().all(|id| !s.st(*id, CH).peers().contains_key(&NodeId(10)))
    });
    for id in [20u64, 30] {
        let at = sim.lost_at(id, 10, crashed_at).expect("lost by heartbeat") - crashed_at;
        assert!(at <= hb + hb / 3, "n{id} found the crash after {at:?}");
        assert!(at >= hb - hb / 3, "n{id} found the crash after {at:?}, before the timeout could run out");
    }
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact(CH) == Some(NodeId(20)));
    assert_eq!(sim.claims_by(20).last().map(|c| c.1), Some(ClaimMode::Takeover(NodeId(10))));
    settle(&mut sim);
    assert_contact(&mut sim, 20);
    sim.open(40, CH, JOIN);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(40, CH));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[20, 30, 40]));
    assert_contact(&mut sim, 20);
}

// 7.
#[test]
fn member_crash_is_removed_everywhere() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30, 40]);
    sim.run_for(Duration::from_secs(1));
    let hb = sim.cfg.heartbeat;
    let crashed_at = sim.elapsed();
    sim.crash(30);
    let took = settle(&mut sim);
    assert!(took <= hb + hb / 3, "took {took:?}");
    for id in [10u64, 20, 40] {
        assert!(sim.lost_at(id, 30, crashed_at).is_some(), "n{id} lost n30 by heartbeat");
        assert_eq!(sim.st(id, CH).counts(), (3, 3));
    }
    assert_eq!(sim.live_members(CH), ids(&[10, 20, 40]));
    assert_contact(&mut sim, 10);
    assert!(sim.claims_by(20).is_empty(), "no takeover");
}

// 8.
#[test]
fn last_member_leaving_removes_the_entry() {
    // Alone.
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[]);
    assert!(sim.entry(CH).is_some());
    sim.leave(1, CH);
    sim.run_until(LIMIT, "entry removed", |s| s.entry(CH).is_none());

    // Two: the member leaves first, then the contact, which is the last one.
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2]);
    sim.leave(2, CH);
    sim.run_until(LIMIT, "member dropped", |s| s.st(1, CH).peers().is_empty());
    assert!(sim.entry(CH).is_some());
    sim.leave(1, CH);
    sim.run_until(LIMIT, "entry removed", |s| s.entry(CH).is_none());

    // Two: the contact leaves first; the member takes over and then leaves as the last one.
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2]);
    sim.leave(1, CH);
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact(CH) == Some(NodeId(2)));
    sim.leave(2, CH);
    sim.run_until(LIMIT, "entry removed", |s| s.entry(CH).is_none());
    // And nothing brings it back.
    sim.run_for(sim.cfg.membership.lease_ttl * 2);
    assert!(sim.entry(CH).is_none());
}

// 9.
#[test]
fn open_failures() {
    let mut sim = Sim::new(SimConfig::default());
    sim.open(1, CH, OpenMode::Open);
    sim.run_until(LIMIT, "fails", |s| s.result(1, CH).is_some());
    assert_eq!(sim.result(1, CH), Some(Err(OpenFailure::UnknownChannel)));
    assert!(sim.entry(CH).is_none(), "Open creates nothing");

    sim.open(2, CH, OpenMode::Create);
    sim.run_until(LIMIT, "ready", |s| s.ready(2, CH));
    sim.open(3, CH, OpenMode::Create);
    sim.run_until(LIMIT, "fails", |s| s.result(3, CH).is_some());
    assert_eq!(sim.result(3, CH), Some(Err(OpenFailure::Exists)));
    assert_contact(&mut sim, 2);

    sim.registry_up = false;
    for (id, mode) in [(4u64, OpenMode::OpenOrCreate), (5, OpenMode::Create), (6, OpenMode::Open)] {
        sim.open(id, CH, mode);
        sim.run_until(LIMIT, "fails", |s| s.result(id, CH).is_some());
        assert!(matches!(sim.result(id, CH), Some(Err(OpenFailure::Registry(_)))), "{mode:?}");
    }
    // The contact keeps the role while the registry is down, and renews once it is back.
    sim.run_for(sim.cfg.membership.lease_ttl / 2);
    sim.registry_up = true;
    sim.run_for(sim.cfg.membership.lease_ttl / 2);
    assert_contact(&mut sim, 2);
    // Failed opens leave nothing behind.
    assert_eq!(sim.live_members(CH), ids(&[2]));
    assert!(sim.st(2, CH).peers().is_empty());
}

// 9b. The registry names a contact that crashed and had no other member: its lease has not run out yet.
#[test]
fn dead_lone_contact_open_or_create_recreates_after_the_lease() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[]);
    let old = sim.st(1, CH).id();
    let crashed_at = sim.elapsed();
    sim.crash(1);
    sim.open(2, CH, OpenMode::OpenOrCreate);
    sim.run_until(LIMIT, "joiner ready", |s| s.result(2, CH).is_some());
    assert_eq!(sim.result(2, CH), Some(Ok(())));
    let took = sim.chan(2, CH).result.as_ref().expect("result").0 - crashed_at;
    let m = &sim.cfg.membership;
    // The lease was renewed at most a third of it before the crash; the joiner notices its expiry on the next retry.
    assert!(took <= m.lease_ttl + m.join_attempt + m.retry + Duration::from_millis(50), "took {took:?}");
    assert!(took >= m.lease_ttl * 2 / 3 - Duration::from_millis(50), "cannot beat the lease: {took:?}");
    assert_contact(&mut sim, 2);
    // The joiner learnt the old channel's id from its first lookup and creates the channel again under that id.
    assert_eq!(sim.st(2, CH).id(), old);
    assert_eq!(sim.entry(CH).expect("entry").channel, old);
    // A second joiner joins the new channel.
    sim.open(3, CH, JOIN);
    sim.run_until(LIMIT, "ready", |s| s.ready(3, CH));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[2, 3]));
}

// 9c. Same, but Open with an open timeout shorter than the lease: the joiner retries and gives up with Timeout.
#[test]
fn dead_lone_contact_open_times_out_or_finds_no_channel() {
    let mut cfg = SimConfig::default();
    cfg.membership.open_timeout = Duration::from_millis(1500);
    let mut sim = Sim::new(cfg);
    build(&mut sim, 1, &[]);
    sim.crash(1);
    let opened = sim.elapsed();
    sim.open(2, CH, OpenMode::Open);
    sim.run_until(LIMIT, "joiner gives up", |s| s.result(2, CH).is_some());
    assert_eq!(sim.result(2, CH), Some(Err(OpenFailure::Timeout)));
    let took = sim.chan(2, CH).result.as_ref().expect("result").0 - opened;
    assert_eq!(took, Duration::from_millis(1500), "exactly the open timeout");
    // It kept retrying meanwhile: a lookup per attempt.
    let lookups =
        sim.reg_log.iter().filter(|r| r.from == NodeId(2) && matches!(r.msg, Message::RegLookup { .. })).count();
    assert!(lookups >= 3, "{lookups} lookups");
    // After it gave up it does nothing more.
    let before = sim.reg_log.len();
    sim.run_for(Duration::from_secs(2));
    assert!(sim.reg_log[before..].iter().all(|r| r.from != NodeId(2)));

    // With Open and a timeout longer than the lease, the lease runs out first: the channel is gone.
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[]);
    sim.crash(1);
    sim.open(2, CH, OpenMode::Open);
    sim.run_until(LIMIT, "joiner gives up", |s| s.result(2, CH).is_some());
    assert_eq!(sim.result(2, CH), Some(Err(OpenFailure::UnknownChannel)));
}

// 10.
#[test]
fn lease_renewal_and_registry_restart() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3]);
    sim.run_for(Duration::from_secs(5));
    let ttl = sim.cfg.membership.lease_ttl;
    let rtt = sim.cfg.registry_latency * 2;
    let renewals: Vec<Duration> =
        sim.claims_by(1).into_iter().filter(|(_, m)| *m == ClaimMode::Renew).map(|(t, _)| t).collect();
    assert!(renewals.len() >= 4, "{renewals:?}");
    for w in renewals.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= ttl / 3 && gap <= ttl / 3 + rtt, "renewal gap {gap:?}");
    }
    assert!(sim.claims_by(2).is_empty() && sim.claims_by(3).is_empty(), "only the contact claims");
    // The registry restarts with an empty table.
    sim.registry = kecho_proto::registry::RegistryTable::new();
    assert!(sim.entry(CH).is_none());
    let took = sim.run_until(LIMIT, "entry back", |s| s.entry_contact(CH) == Some(NodeId(1)));
    assert!(took <= ttl / 3 + rtt, "took {took:?}");
    let e = sim.entry(CH).expect("entry");
    assert_eq!((e.channel, e.sources, e.sinks), (sim.st(1, CH).id(), 3, 3));
    sim.open(4, CH, JOIN);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(4, CH));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[1, 2, 3, 4]));
    assert_contact(&mut sim, 1);
}

// 10b. The registry is down for longer than a lease: the contact keeps the role, and when the registry comes back
// (empty, as after a restart) the next renewal recreates the entry.
#[test]
fn registry_outage_longer_than_the_lease() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2]);
    sim.registry_up = false;
    sim.run_for(sim.cfg.membership.lease_ttl * 2);
    sim.registry = kecho_proto::registry::RegistryTable::new();
    sim.registry_up = true;
    let ttl = sim.cfg.membership.lease_ttl;
    sim.run_until(ttl, "entry back", |s| s.entry_contact(CH) == Some(NodeId(1)));
    settle(&mut sim);
    assert_contact(&mut sim, 1);
}

// 11. Split brain: the contact is cut off from the members (and from the registry); a member takes over. When the
// partition heals, the old contact's renewal is refused, it joins through the new contact and the views merge.
#[test]
fn split_brain_heals() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30, 40]);
    sim.partition(&[10], &[20, 30, 40]);
    sim.registry_cut.insert(NodeId(10));
    sim.run_until(LIMIT, "takeover by 20", |s| s.entry_contact(CH) == Some(NodeId(20)));
    sim.run_until(LIMIT, "both sides settled", |s| {
        s.st(10, CH).peers().is_empty()
            && [20u64, 30, 40].iter().all(|id| !s.st(*id, CH).peers().contains_key(&NodeId(10)))
    });
    // Both believe they are the contact.
    assert_eq!(sim.st(10, CH).contact(), Some(NodeId(10)));
    assert_eq!(sim.st(20, CH).contact(), Some(NodeId(20)));
    // The old contact changes its members meanwhile.
    let mut m = standard_members(10);
    m.push(sink(9, &["q"]));
    sim.set_members(10, CH, m);
    sim.run_for(Duration::from_secs(1));
    let since = sim.elapsed();
    sim.heal();
    sim.registry_cut.clear();
    sim.run_until(LIMIT, "old contact refused", |s| {
        s.reg_log.iter().any(|r| {
            r.at >= since && r.from == NodeId(10) && matches!(r.msg, Message::RegClaim { mode: ClaimMode::Renew, .. })
        })
    });
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[10, 20, 30, 40]));
    assert_contact(&mut sim, 20);
    for id in [20u64, 30, 40] {
        assert_eq!(sim.st(id, CH).counts(), (4, 5));
    }
}

// 11b. Split brain with members on both sides: {10, 20} | {30, 40}; 30 takes over. After healing, both halves merge.
#[test]
fn split_brain_with_members_on_both_sides_heals() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30, 40]);
    sim.partition(&[10, 20], &[30, 40]);
    sim.registry_cut.insert(NodeId(10));
    sim.registry_cut.insert(NodeId(20));
    sim.run_until(LIMIT, "takeover by 30", |s| s.entry_contact(CH) == Some(NodeId(30)));
    sim.run_until(LIMIT, "both sides settled", |s| s.st(10, CH).peers().len() == 1 && s.st(30, CH).peers().len() == 1);
    sim.run_for(Duration::from_secs(1));
    sim.heal();
    sim.registry_cut.clear();
    sim.run_until(LIMIT, "merged", |s| s.views_agree(CH).is_ok() && s.live_members(CH).len() == 4);
    // Give beliefs time to settle too.
    sim.run_until(LIMIT, "one contact", |s| {
        s.live_members(CH).iter().all(|id| s.st(id.0, CH).contact() == Some(NodeId(30)))
    });
    settle(&mut sim);
    assert_contact(&mut sim, 30);
}

// 11c. The channel's lease runs out during a registry partition of the whole channel, and a newcomer creates the
// channel anew (another id); when the old channel's contact reaches the registry again, the two merge into one.
#[test]
fn recreated_channel_absorbs_the_old_one() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30]);
    for id in [10u64, 20, 30] {
        sim.registry_cut.insert(NodeId(id));
    }
    sim.run_for(sim.cfg.membership.lease_ttl + Duration::from_millis(100));
    assert!(sim.entry(CH).is_none(), "lease ran out");
    sim.open(5, CH, OpenMode::OpenOrCreate);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(5, CH));
    assert_ne!(sim.st(5, CH).id(), sim.st(10, CH).id());
    sim.registry_cut.clear();
    sim.run_until(LIMIT, "merged", |s| {
        s.live_members(CH).len() == 4
            && s.views_agree(CH).is_ok()
            && s.live_members(CH).iter().all(|id| s.st(id.0, CH).id() == s.st(5, CH).id())
    });
    settle(&mut sim);
    assert_contact(&mut sim, 5);
}

// 11d. The takeover claim fails because the registry is down at that moment; the taker keeps trying and the channel
// gets a working contact again.
#[test]
fn takeover_while_registry_is_down() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 10, &[20, 30]);
    sim.registry_up = false;
    sim.leave(10, CH);
    sim.run_for(Duration::from_millis(200));
    sim.registry_up = true;
    sim.run_until(LIMIT, "takeover", |s| s.entry_contact(CH) == Some(NodeId(20)));
    settle(&mut sim);
    assert_contact(&mut sim, 20);
    sim.open(40, CH, JOIN);
    sim.run_until(LIMIT, "newcomer ready", |s| s.ready(40, CH));
    settle(&mut sim);
    assert_eq!(sim.live_members(CH), ids(&[20, 30, 40]));
}

// 12. Random joins, leaves, crashes and member changes over links of random speed; after quiescence every live
// member sees exactly the live members, and exactly one of them is the contact, the one the registry names.
#[test]
fn random_churn_converges() {
    for seed in seeds(1, 6) {
        churn(seed, Faults::None);
    }
}

// 12b. The same with partitions that heal (some shorter, some longer than the heartbeat timeout), registry outages
// and registry restarts on top.
#[test]
fn random_churn_with_partitions_and_registry_faults() {
    for seed in seeds(1000, 6) {
        churn(seed, Faults::Network);
    }
}

// 12c. The simulation is deterministic: the same seed gives the same run.
#[test]
fn simulation_is_deterministic() {
    assert_eq!(churn(7, Faults::Network), churn(7, Faults::Network));
}

/// The seeds a randomized test runs: `n` from `first`; `KECHO_SIM_SEEDS` (how many) and `KECHO_SIM_FIRST` (an
/// offset) override them for a longer search or to replay one seed.
fn seeds(first: u64, n: u64) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let first = first + var("KECHO_SIM_FIRST").unwrap_or(0);
    first..first + var("KECHO_SIM_SEEDS").unwrap_or(n)
}

#[derive(Clone, Copy, PartialEq)]
enum Faults {
    None,
    Network,
}

/// One randomized run; returns a summary of its end for the determinism check.
fn churn(seed: u64, faults: Faults) -> String {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let mut sim = Sim::new(SimConfig::default());
    const NODES: u64 = 48;
    for a in 1..=NODES {
        for b in a + 1..=NODES {
            sim.set_latency(a, b, Duration::from_millis(1 + rng.below(30)));
        }
    }
    let mut heal_at: Option<Duration> = None;
    let mut registry_back_at: Option<Duration> = None;
    for _ in 0..80 {
        let live = sim.live_members(CH);
        let pick = |rng: &mut XorShift| live[rng.below(live.len() as u64) as usize].0;
        match rng.below(18) {
            0..=6 => {
                let id = 1 + rng.below(NODES);
                let used = sim
                    .nodes
                    .get(&NodeId(id))
                    .is_some_and(|n| n.crashed || n.chans.contains_key(CH) || n.left.contains_key(CH));
                if !used {
                    let mode = if rng.below(3) == 0 { OpenMode::Open } else { OpenMode::OpenOrCreate };
                    sim.open(id, CH, mode);
                }
            }
            7 | 8 if !live.is_empty() => sim.leave(pick(&mut rng), CH),
            9 if !live.is_empty() => sim.crash(pick(&mut rng)),
            10 | 11 if !live.is_empty() => {
                let v = pick(&mut rng);
                let mut m = standard_members(v);
                m.truncate(1 + rng.below(2) as usize);
                sim.set_members(v, CH, m);
            }
            12 | 13 if faults == Faults::Network && heal_at.is_none() && live.len() >= 2 => {
                let (a, b): (Vec<u64>, Vec<u64>) = (1..=NODES).partition(|_| rng.below(2) == 0);
                sim.partition(&a, &b);
                // Some nodes lose the registry too.
                for id in &a {
                    if rng.below(2) == 0 {
                        sim.registry_cut.insert(NodeId(*id));
                    }
                }
                heal_at = Some(sim.elapsed() + Duration::from_millis(100 + rng.below(2500)));
            }
            14 if faults == Faults::Network && registry_back_at.is_none() => {
                sim.registry_up = false;
                registry_back_at = Some(sim.elapsed() + Duration::from_millis(rng.below(4000)));
            }
            15 if faults == Faults::Network => sim.registry = kecho_proto::registry::RegistryTable::new(),
            _ => {}
        }
        sim.run_for(Duration::from_millis(rng.below(400)));
        if heal_at.is_some_and(|t| sim.elapsed() >= t) {
            sim.heal();
            sim.registry_cut.clear();
            heal_at = None;
        }
        if registry_back_at.is_some_and(|t| sim.elapsed() >= t) {
            sim.registry_up = true;
            registry_back_at = None;
        }
    }
    sim.heal();
    sim.registry_cut.clear();
    sim.registry_up = true;
    // Quiescence: no more churn. Pending opens end, crashes are found, leases of the dead run out.
    let m = sim.cfg.membership.clone();
    sim.run_for(m.open_timeout + m.lease_ttl * 2 + sim.cfg.heartbeat * 2);
    if !sim.opening(CH).is_empty() {
        sim.fail(&format!("seed {seed}: still opening: {:?}", sim.opening(CH)));
    }
    if let Err(e) = sim.views_agree(CH) {
        sim.fail(&format!("seed {seed}: views differ: {e}"));
    }
    let live = sim.live_members(CH);
    let summary = format!("{live:?} {:?} {} {}", sim.entry(CH), sim.steps, sim.dump());
    if live.is_empty() {
        // Nobody is left: at most a lease of the dead, which runs out.
        sim.run_for(m.lease_ttl);
        assert!(sim.entry(CH).is_none(), "seed {seed}: an entry with no member\n{}", sim.dump());
        return summary;
    }
    let Some(entry) = sim.entry(CH) else { sim.fail(&format!("seed {seed}: live members {live:?} but no entry")) };
    if !live.contains(&entry.contact) {
        sim.fail(&format!("seed {seed}: registry names {:?}, live {live:?}", entry.contact));
    }
    let believers: Vec<NodeId> = live.iter().copied().filter(|id| sim.st(id.0, CH).contact() == Some(*id)).collect();
    if believers != vec![entry.contact] {
        sim.fail(&format!(
            "seed {seed}: registry names {:?}, contacts by their own account {believers:?}",
            entry.contact
        ));
    }
    for id in &live {
        let st = sim.st(id.0, CH);
        if st.contact() != Some(entry.contact) || st.id() != entry.channel {
            sim.fail(&format!("seed {seed}: {id:?} believes {:?} in {}", st.contact(), st.id()));
        }
    }
    let counts = sim.st(live[0].0, CH).counts();
    for id in &live {
        assert_eq!(sim.st(id.0, CH).counts(), counts);
    }
    // The registry entry's counts follow at the next renewal.
    sim.run_for(m.lease_ttl / 3 + Duration::from_millis(50));
    let e = sim.entry(CH).expect("entry");
    assert_eq!((e.sources, e.sinks), counts, "seed {seed}: registry counts");
    summary
}

// 4b. A joiner leaves right after joining. The contact's relay of its snapshot to one member travels over a slow link
// and arrives after the joiner's own goodbye: the member must not keep the departed node (its node is still up, so no
// heartbeat would ever remove it).
#[test]
fn stale_relay_does_not_resurrect_a_leaver() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3]);
    sim.set_latency(1, 3, Duration::from_millis(300));
    sim.open(4, CH, JOIN);
    sim.run_until(LIMIT, "joiner ready", |s| s.ready(4, CH));
    sim.run_until(LIMIT, "n3 knows n4", |s| s.st(3, CH).peers().contains_key(&NodeId(4)));
    sim.leave(4, CH);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.live_members(CH), ids(&[1, 2, 3]));
    sim.views_agree(CH).unwrap_or_else(|e| sim.fail(&e));
}

// 4c. A joiner leaves after its JoinRequest reached the contact but before the answer came back.
#[test]
fn leave_while_joining_is_not_left_behind() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2]);
    sim.set_latency(1, 3, Duration::from_millis(100));
    sim.open(3, CH, JOIN);
    sim.run_until(LIMIT, "contact took n3 in", |s| s.st(1, CH).peers().contains_key(&NodeId(3)));
    assert!(!sim.st(3, CH).is_member(), "the answer is still on its way");
    sim.leave(3, CH);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.live_members(CH), ids(&[1, 2]));
    sim.views_agree(CH).unwrap_or_else(|e| sim.fail(&e));
    assert_eq!(sim.chan(3, CH).notices.iter().filter(|(_, o)| *o == Output::Ready).count(), 0);
}

// 3b. A joiner changes its members while its JoinRequest (with the old snapshot) is on its way.
#[test]
fn member_change_while_joining_reaches_the_contact() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2]);
    sim.set_latency(1, 3, Duration::from_millis(100));
    sim.open(3, CH, JOIN);
    sim.run_until(LIMIT, "contact took n3 in", |s| s.st(1, CH).peers().contains_key(&NodeId(3)));
    let mut m = standard_members(3);
    m.push(sink(5, &["late"]));
    sim.set_members(3, CH, m);
    sim.run_until(LIMIT, "n3 ready", |s| s.ready(3, CH));
    settle(&mut sim);
    assert_eq!(sim.st(1, CH).peers()[&NodeId(3)].snapshot.members.len(), 3);
    assert_eq!(sim.st(1, CH).counts(), (3, 4));
}

// 9d. Registry answers that arrive after `open` gave up change nothing: no second `Failed`, no late join.
#[test]
fn late_registry_answers_after_a_failed_open() {
    let mut cfg = SimConfig { registry_latency: Duration::from_millis(400), ..SimConfig::default() };
    cfg.membership.open_timeout = Duration::from_millis(1000);
    let mut sim = Sim::new(cfg);
    // n2's lookup reaches the registry before n1's create, its own create after it.
    sim.open(2, CH, OpenMode::OpenOrCreate);
    sim.run_for(Duration::from_millis(100));
    sim.open(1, CH, OpenMode::Create);
    sim.run_for(Duration::from_secs(8));
    assert!(sim.ready(1, CH));
    assert_eq!(sim.result(2, CH), Some(Err(OpenFailure::Timeout)));
    let notices: Vec<&Output> = sim.chan(2, CH).notices.iter().map(|(_, o)| o).collect();
    assert_eq!(notices, vec![&Output::Failed(OpenFailure::Timeout)], "{}", sim.dump());
    assert!(!sim.st(2, CH).is_member());
    assert!(sim.st(1, CH).peers().is_empty(), "the failed opener never joined");
}

// Registry answers are matched with their requests in order: the answer to a superseded lookup is not taken for the
// answer to the takeover claim that followed it.
#[test]
fn registry_answers_are_matched_in_order() {
    use kecho_proto::codec::{PeerEntry, RegEntry, RegErrorCode, RegResult};
    use kecho_proto::membership::{ChannelState, MembershipConfig, RegistryOp};
    use kecho_proto::{ChannelId, NodeSnapshot};
    use std::time::Instant;

    let t0 = Instant::now();
    let cfg = MembershipConfig::default();
    let me = NodeId(1);
    let (contact, other) = (NodeId(5), NodeId(9));
    let ch = ChannelId(77);
    let mut st = ChannelState::new(CH, ChannelId(1), ChannelSecret(1), me, "a:1", cfg.clone());
    st.open(OpenMode::Open, t0);
    let drain = |st: &mut ChannelState| std::iter::from_fn(|| st.poll_output()).collect::<Vec<_>>();
    assert_eq!(drain(&mut st), vec![Output::Registry(RegistryOp::Lookup)]);
    let entry = |c: NodeId| RegEntry {
        name: CH.into(),
        channel: ch,
        contact: c,
        addr: format!("a:{}", c.0),
        sources: 0,
        sinks: 0,
        expires_in_ms: 1000,
    };
    st.handle_registry(Ok(RegResult::Entry(entry(contact))), t0);
    drain(&mut st);
    let peer = |n: NodeId| PeerEntry { node: n, addr: format!("a:{}", n.0), snapshot: NodeSnapshot::default() };
    st.handle_message(
        contact,
        Message::JoinAccept {
            channel: ch,
            contact,
            secret: ChannelSecret(2),
            nodes: vec![peer(contact), peer(other)],
            policy: None,
        },
        t0,
    );
    assert!(st.is_member());
    drain(&mut st);
    // A member leaves; we are now the lowest, so we check the contact with the registry a little later.
    st.handle_peer_lost(other, t0);
    let t1 = st.poll_timeout().expect("check scheduled");
    assert_eq!(t1, t0 + cfg.join_attempt);
    drain(&mut st);
    st.handle_timeout(t1);
    assert_eq!(drain(&mut st), vec![Output::Registry(RegistryOp::Lookup)]);
    // Before the answer comes, the contact is lost: we take over.
    st.handle_peer_lost(contact, t1);
    let outs = drain(&mut st);
    assert!(outs.contains(&Output::Registry(RegistryOp::Claim(ClaimMode::Takeover(contact)))), "{outs:?}");
    // The lookup's answer (still naming the old contact) comes first and is ignored.
    st.handle_registry(Ok(RegResult::Entry(entry(contact))), t1);
    assert_eq!(drain(&mut st), vec![]);
    // The takeover is refused: someone else holds the role; we ask who.
    let refused = RegResult::Error { code: RegErrorCode::NotContact, message: String::new() };
    st.handle_registry(Ok(refused), t1);
    assert_eq!(drain(&mut st), vec![Output::Registry(RegistryOp::Lookup)]);
    st.handle_registry(Ok(RegResult::Entry(entry(NodeId(3)))), t1);
    let outs = drain(&mut st);
    assert!(outs.contains(&Output::Contact(NodeId(3))), "{outs:?}");
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::Send { to, msg: Message::JoinRequest { .. }, .. } if *to == NodeId(3))));
    assert_eq!(st.contact(), Some(NodeId(3)));
}

// ----- access control (see `kecho_proto::access`) -----

mod access {
    use super::*;
    use kecho_proto::access::{Authority, Policy, Roles, Token};
    use kecho_proto::handshake::Identity;

    /// Unix time at the simulation's start, as every node's wall clock tells it.
    const T0: u64 = 1_000_000;

    struct Cast {
        authority: Authority,
        /// Node ids derive from keys, so each simulated node has an identity.
        nodes: Vec<Identity>,
    }

    impl Cast {
        fn new(n: u8) -> Self {
            Cast {
                authority: Authority::from_secret([0xA0; 32]),
                nodes: (1..=n).map(|i| Identity::from_secret([i; 32])).collect(),
            }
        }
        fn id(&self, i: usize) -> u64 {
            self.nodes[i].node_id().0
        }
        fn policy(&self) -> Policy {
            self.authority.policy(Roles::ALL)
        }
        fn token(&self, i: usize, roles: Roles, not_after: u64) -> Token {
            self.authority.grant(CH, roles, self.nodes[i].public_key(), not_after).unwrap()
        }
        /// Node `i` opens the channel with `policy` (pinned if given), credential `token` and `members`.
        fn open(
            &self,
            sim: &mut Sim,
            i: usize,
            mode: OpenMode,
            policy: Option<Policy>,
            token: Option<Token>,
            members: Vec<MemberInfo>,
        ) {
            let now = sim.now;
            // Every node's wall clock started at T0 with the simulation.
            let unix = Duration::from_secs(T0) + sim.elapsed();
            sim.open_configured(self.id(i), CH, mode, members, |st| {
                st.set_wall_clock(now, unix);
                st.set_policy(policy);
                st.set_token(token, now);
            });
        }

        /// Node 0 creates the protected channel with a full credential and its standard members, and is ready.
        fn create(&self, sim: &mut Sim) {
            let a = self.id(0);
            self.open(
                sim,
                0,
                OpenMode::Create,
                Some(self.policy()),
                Some(self.token(0, Roles::ALL, 0)),
                standard_members(a),
            );
            sim.run_until(LIMIT, "creator ready", |s| s.ready(a, CH));
        }
    }

    fn refusal(sim: &Sim, id: u64) -> String {
        match sim.result(id, CH) {
            Some(Err(OpenFailure::Refused(why))) => why.to_string(),
            other => panic!("n{id}: expected a refusal, got {other:?}\n{}", sim.dump()),
        }
    }

    fn denied(sim: &Sim, at: u64, node: u64) -> Vec<String> {
        sim.chan(at, CH)
            .notices
            .iter()
            .filter_map(|(_, o)| match o {
                Output::Denied { node: n, reason } if n.0 == node => Some(reason.to_string()),
                _ => None,
            })
            .collect()
    }

    // A protected channel: joiners without the rights their members need are refused by the contact with the
    // reason, and nobody keeps a trace of them; a joiner with a credential is let in, and adopts the policy.
    #[test]
    fn unauthorised_joins_are_refused_without_trace() {
        let cast = Cast::new(4);
        let mut sim = Sim::new(SimConfig::default());
        let (a, b, c, d) = (cast.id(0), cast.id(1), cast.id(2), cast.id(3));
        cast.create(&mut sim);
        // d: a full credential, no policy of its own.
        cast.open(
            &mut sim,
            3,
            JOIN,
            None,
            Some(cast.token(3, Roles::SOURCE.union(Roles::SINK), 0)),
            standard_members(d),
        );
        sim.run_until(LIMIT, "d ready", |s| s.ready(d, CH));
        assert_eq!(sim.st(d, CH).policy(), Some(&cast.policy()), "the joiner adopts the channel's policy");
        // b: a sink credential, but a source among its members.
        cast.open(&mut sim, 1, JOIN, None, Some(cast.token(1, Roles::SINK, 0)), standard_members(b));
        // c: no credential at all, and no members.
        cast.open(&mut sim, 2, JOIN, None, None, vec![]);
        sim.run_until(LIMIT, "b and c answered", |s| s.result(b, CH).is_some() && s.result(c, CH).is_some());
        let why_b = refusal(&sim, b);
        assert!(why_b.contains("requires a credential with the source role"), "{why_b}");
        let why_c = refusal(&sim, c);
        assert!(why_c.contains("none was given"), "{why_c}");
        sim.run_for(Duration::from_secs(3));
        for at in [a, d] {
            let peers: Vec<u64> = sim.st(at, CH).peers().keys().map(|n| n.0).collect();
            assert!(!peers.contains(&b) && !peers.contains(&c), "n{at} keeps a trace: {peers:?}\n{}", sim.dump());
            assert_eq!(sim.st(at, CH).counts(), (2, 2));
        }
        assert!(!denied(&sim, a, b).is_empty() && !denied(&sim, a, c).is_empty(), "the contact reports refusals");
        settle(&mut sim);
    }

    // A token issued to another node, by another authority, for another channel, or expired: each refused.
    #[test]
    fn borrowed_forged_and_expired_credentials_are_refused() {
        let cast = Cast::new(3);
        let mut sim = Sim::new(SimConfig::default());
        let (a, b) = (cast.id(0), cast.id(1));
        cast.create(&mut sim);
        let cases: Vec<(Token, &str)> = vec![
            (cast.token(2, Roles::ALL, 0), "issued to node"),
            (
                Authority::from_secret([0xB0; 32]).grant(CH, Roles::ALL, cast.nodes[1].public_key(), 0).unwrap(),
                "another authority",
            ),
            (cast.authority.grant("other", Roles::ALL, cast.nodes[1].public_key(), 0).unwrap(), "not \"news\""),
            (cast.token(1, Roles::ALL, T0 - 1), "expired"),
        ];
        for (token, expect) in cases {
            cast.open(&mut sim, 1, JOIN, None, Some(token), standard_members(b));
            sim.run_until(LIMIT, "answer", |s| s.result(b, CH).is_some());
            let why = refusal(&sim, b);
            assert!(why.contains(expect), "expected {expect:?} in {why:?}");
            sim.nodes.get_mut(&NodeId(b)).unwrap().chans.remove(CH);
            assert!(sim.st(a, CH).peers().is_empty());
        }
    }

    // A node configured with a policy refuses a channel that has none (someone else's under that name) or another
    // one; its own credential is checked before it asks anyone.
    #[test]
    fn pinned_policy_refuses_other_channels() {
        let cast = Cast::new(2);
        let mut sim = Sim::new(SimConfig::default());
        let (a, b) = (cast.id(0), cast.id(1));
        cast.open(&mut sim, 0, OpenMode::Create, None, None, standard_members(a));
        sim.run_until(LIMIT, "creator ready", |s| s.ready(a, CH));
        cast.open(&mut sim, 1, JOIN, Some(cast.policy()), Some(cast.token(1, Roles::ALL, 0)), standard_members(b));
        sim.run_until(LIMIT, "answer", |s| s.result(b, CH).is_some());
        let why = refusal(&sim, b);
        assert!(why.contains("has no access policy"), "{why}");
        // Its goodbye reaches the contact: no trace there either.
        sim.run_for(Duration::from_secs(1));
        assert!(sim.st(a, CH).peers().is_empty(), "{}", sim.dump());
        sim.nodes.get_mut(&NodeId(b)).unwrap().chans.remove(CH);
        // Without a credential it does not even ask.
        cast.open(&mut sim, 1, JOIN, Some(cast.policy()), None, standard_members(b));
        let why = refusal(&sim, b);
        assert!(why.contains("none was given"), "{why}");
    }

    // A member admitted as a sink that later lists a source (bypassing its own node's check) is dropped by every
    // member, and so is one whose credential expires.
    #[test]
    fn members_check_each_other_and_credentials_expire() {
        let cast = Cast::new(3);
        let mut sim = Sim::new(SimConfig::default());
        let (a, b, c) = (cast.id(0), cast.id(1), cast.id(2));
        let sink_only = vec![standard_members(b)[0].clone()];
        cast.create(&mut sim);
        cast.open(&mut sim, 1, JOIN, None, Some(cast.token(1, Roles::SINK, 0)), sink_only);
        // c's credential runs out 30 s into the run.
        cast.open(&mut sim, 2, JOIN, None, Some(cast.token(2, Roles::ALL, T0 + 30)), standard_members(c));
        sim.run_until(LIMIT, "joined", |s| s.ready(b, CH) && s.ready(c, CH));
        settle(&mut sim);
        assert_eq!(sim.st(a, CH).counts(), (2, 3));
        sim.set_members(b, CH, standard_members(b));
        sim.run_for(Duration::from_secs(1));
        for at in [a, c] {
            assert!(!sim.st(at, CH).peers().contains_key(&NodeId(b)), "n{at} still has b\n{}", sim.dump());
            assert!(denied(&sim, at, b).iter().any(|r| r.contains("source role")), "n{at}: {:?}", denied(&sim, at, b));
        }
        assert!(sim.st(a, CH).peers().contains_key(&NodeId(c)));
        sim.run_for(Duration::from_secs(30));
        assert!(!sim.st(a, CH).peers().contains_key(&NodeId(c)), "c's credential expired\n{}", sim.dump());
        assert!(denied(&sim, a, c).iter().any(|r| r.contains("expired")), "{:?}", denied(&sim, a, c));
        // c itself is told.
        let told = sim
            .chan(c, CH)
            .notices
            .iter()
            .any(|(_, o)| matches!(o, Output::Refused(r) if r.to_string().contains("expired")));
        assert!(told, "c was not told that its credential expired");
    }
}

#[test]
fn a_join_answer_that_comes_just_after_the_attempt_timed_out_still_counts() {
    // The round trip to the contact (503 ms) is a little longer than a join attempt (500 ms): every answer reaches
    // the joiner while it is looking the contact up again. A stalled process does the same (it runs the attempt's
    // timer before reading the answer that came meanwhile). Dropping such answers made the joiner ask again and
    // again, each time costing the contact another `JoinAccept` listing every member, until `open` timed out.
    let mut sim = Sim::new(SimConfig::default());
    sim.open(1, CH, OpenMode::Create);
    sim.run_until(LIMIT, "creator ready", |s| s.ready(1, CH));
    sim.add_node(2);
    sim.set_latency(1, 2, Duration::from_micros(251_500));
    sim.open(2, CH, JOIN);
    let took = sim.run_until(Duration::from_secs(2), "joiner ready", |s| s.ready(2, CH));
    assert!(took < Duration::from_secs(1), "joined after {took:?}");
    settle(&mut sim);
    assert!(sim.nodes[&NodeId(1)].lost.is_empty(), "no link was lost");
}

/// A node closes the channel and opens it again, its goodbye lost: the new instance's snapshots replace the old
/// instance's at every member (their versions start above the old ones', as the node layer has them do with
/// `start_versions_at`), and a late snapshot of the old instance does not bring it back. (With versions restarting
/// at 1, the old instance's snapshot stayed: the members' views never agreed with the new instance's own.)
#[test]
fn a_reopened_channel_replaces_the_old_instance_whose_goodbye_was_lost() {
    let mut sim = Sim::new(SimConfig::default());
    build(&mut sim, 1, &[2, 3]);
    let old = sim.st(3, CH).local().clone();
    let channel = sim.st(3, CH).id();
    let addr = sim.st(1, CH).peers()[&NodeId(3)].addr.clone();
    sim.vanish(3, CH);
    sim.open_configured(3, CH, JOIN, standard_members(3), |st| {
        st.set_instance(old.instance + 1);
        st.start_versions_at(old.version + 1_000);
    });
    sim.run_until(LIMIT, "the reopened channel ready", |s| s.ready(3, CH));
    settle(&mut sim);
    for id in [1, 2] {
        let p = &sim.st(id, CH).peers()[&NodeId(3)];
        assert_eq!(p.snapshot.instance, old.instance + 1, "n{id} holds the new instance");
    }
    // A copy of the old instance's last snapshot, delayed somewhere, arrives at each member after the new one.
    for id in [1, 2] {
        let msg = Message::Snapshot {
            channel,
            node: NodeId(3),
            addr: addr.clone(),
            snapshot: old.clone(),
            left: false,
            reply: true,
        };
        sim.inject(3, id, msg);
    }
    sim.run_for(Duration::from_secs(5));
    sim.views_agree(CH).unwrap_or_else(|e| sim.fail(&format!("the old instance came back: {e}")));
    for id in [1, 2] {
        assert_eq!(sim.st(id, CH).peers()[&NodeId(3)].snapshot.instance, old.instance + 1, "n{id}");
    }
}
