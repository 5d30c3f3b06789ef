//! A member far behind a busy stream (a tree parent slowed by a Block sink, a loaded host) hears one announcement per
//! event from each lazy peer: each must cost it work for the new numbers only, not its whole gap again (that was
//! quadratic in the gap, and stalled a node's runtime for seconds in tree mode), and a peer it grafted from in vain
//! must still be asked again when it announces again.

use std::time::{Duration, Instant};

use kecho_proto::gossip::{EventId, Gossip, GossipConfig, GossipMsg, GossipOut};
use kecho_proto::NodeId;

const SOURCE: NodeId = NodeId(7);
const PEER: NodeId = NodeId(2);

/// The overlay's settings in kecho (`channel/tree.rs`): a gap is grafted in full.
fn cfg() -> GossipConfig {
    GossipConfig { loss_after: 3_600_000, max_graft_run: 1 << 16, ..GossipConfig::default() }
}

fn announce(g: &mut Gossip, seq: u64, now: u64) {
    g.handle(PEER, GossipMsg::IHave { ids: vec![EventId { source: SOURCE, seq }] }, now);
}

/// The grafts sent to `PEER` so far.
fn grafts(g: &mut Gossip) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(o) = g.poll_output() {
        if let GossipOut::Send { to, msg: GossipMsg::Graft { id } } = o {
            assert_eq!(to, PEER);
            out.push(id.seq);
        }
    }
    out.sort_unstable();
    out
}

#[test]
fn announcements_of_a_long_gap_cost_linear_work() {
    const N: u64 = 50_000;
    let mut g = Gossip::new(NodeId(1), cfg(), 1, 0);
    let start = Instant::now();
    for seq in 1..=N {
        announce(&mut g, seq, 0);
    }
    let took = start.elapsed();
    // Linear: a few milliseconds even unoptimised; walking the gap again for each took minutes.
    assert!(took < Duration::from_secs(5), "{N} announcements took {took:?}");
    g.handle_timeout(cfg().graft_after);
    assert_eq!(grafts(&mut g), (1..=N).collect::<Vec<u64>>(), "every announced event is grafted once");
}

#[test]
fn a_peer_grafted_in_vain_is_asked_again_when_it_announces_again() {
    let mut g = Gossip::new(NodeId(1), cfg(), 1, 0);
    for seq in 1..=100 {
        announce(&mut g, seq, 0);
    }
    let after = cfg().graft_after;
    g.handle_timeout(after);
    assert_eq!(grafts(&mut g).len(), 100);
    // Nothing came; the peer was the only announcer: the events are no longer asked for.
    g.handle_timeout(2 * after);
    assert!(grafts(&mut g).is_empty());
    // Its summary names the newest again: every event up to it is asked for again.
    announce(&mut g, 100, 2 * after);
    g.handle_timeout(3 * after);
    assert_eq!(grafts(&mut g), (1..=100).collect::<Vec<u64>>());
    // An event that arrives is not asked for; a later announcement names only the new numbers.
    g.handle(NodeId(3), GossipMsg::Event { id: EventId { source: SOURCE, seq: 1 }, hops: 0, payload: "x".into() }, 0);
    announce(&mut g, 103, 3 * after);
    g.handle_timeout(4 * after);
    let again = grafts(&mut g);
    assert!(again.ends_with(&[101, 102, 103]) && !again.contains(&1), "{again:?}");
}
