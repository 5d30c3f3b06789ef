//! The gossip membership and broadcast state machine (`kecho_proto::gossip`) at 1,000 members in virtual time
//! (`tests/gossip/mod.rs`; `examples/gossip_scale.rs` runs it up to 10,000 and prints docs/SCALE.md's table).

mod gossip;

#[test]
fn a_thousand_members_keep_bounded_links_one_copy_per_event_and_constant_join_cost() {
    let small = gossip::run(500, 3);
    let f = gossip::run(1000, 3);
    eprintln!("{small:?}\n{f:?}");
    assert!(f.links_max <= 8, "links per member {}", f.links_max);
    assert!(small.storm_ms < 2000, "a storm of 100 joins at 500 members took {} ms to settle", small.storm_ms);
    assert!(f.join_last_ms < 1000, "the last join took {} ms", f.join_last_ms);
    assert!(f.storm_ms < 2000, "a storm of 100 joins took {} ms to settle", f.storm_ms);
    assert!(f.copies_per_event <= 1.1, "{} copies per event per member", f.copies_per_event);
    assert_eq!(f.delivered_steady, 1.0, "every member gets every event in the steady state");
    // A join costs a random walk, not a message per member: doubling the channel does not double it.
    assert!(f.msgs_per_join < 2.0 * small.msgs_per_join.max(10.0), "{} vs {}", f.msgs_per_join, small.msgs_per_join);
    assert!(f.msgs_per_join < 60.0, "{} membership messages for one join", f.msgs_per_join);
    // After 30 % die at once, the survivors get 99.9 % of the events, and learn of the rest (periodic summaries on
    // every link reveal events a member missed even when no later event of their source comes).
    assert!(f.delivered_after_kill >= 0.999, "{} delivered after 30 % were killed", f.delivered_after_kill);
    let unaccounted = 1.0 - f.delivered_after_kill - f.reported_after_kill;
    assert!(unaccounted < 1e-9, "{unaccounted} of (survivor, event) pairs neither delivered nor reported lost");
}

#[test]
fn runs_are_deterministic() {
    let a = gossip::run(300, 9);
    let b = gossip::run(300, 9);
    assert_eq!(format!("{a:?}"), format!("{b:?}"));
}

/// Members that stall (a loaded host: a runtime waiting for a core, a frozen process) make Plumtree graft events
/// still on their way from the stalled tree parent; when the parent resumes it sends its backlog, each event a second
/// copy. A member that grafts prunes the parent that failed it at once, so the backlog stops at the prune. Before
/// that, this scenario cost 1.41 copies per event per member (seed 1; 1.24 with the prune).
#[test]
fn members_that_stall_cost_few_copies_and_nothing_is_lost_unreported() {
    use kecho_proto::gossip::GossipConfig;
    for seed in [1, 2] {
        let f = gossip::run_stalls(100, seed, GossipConfig::default());
        eprintln!("seed {seed}: {f:?}");
        let unaccounted = 1.0 - f.delivered - f.reported;
        assert!(unaccounted.abs() < 1e-9, "{unaccounted} of (member, event) pairs unaccounted for");
        assert!(f.delivered >= 0.999, "{} delivered", f.delivered);
        assert!(f.grafts > 0, "the stalls made members graft");
        assert!(f.copies_per_event <= 1.3, "{} copies per event per member", f.copies_per_event);
    }
}
