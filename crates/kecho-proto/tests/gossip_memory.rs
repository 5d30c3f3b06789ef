//! What a member's overlay state holds per source it follows, once idle (docs/SCALE.md, "Memory per member"). In a
//! channel's tree mode every member follows two streams per other member (its events and its membership), so these
//! bytes are multiplied by the channel's size in every member: they must be the stream's own small state, not the
//! memory of the burst that brought its events (a join storm), and not a cached copy of every member's last event.
//!
//! The heap is counted by this binary's allocator (dhat's), so this file holds one test.

use bytes::Bytes;
use kecho_proto::gossip::{EventId, Gossip, GossipConfig, GossipMsg};
use kecho_proto::NodeId;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn live() -> isize {
    dhat::HeapStats::get().curr_bytes as isize
}

fn drain(g: &mut Gossip) -> usize {
    let mut n = 0;
    while g.poll_output().is_some() {
        n += 1;
    }
    n
}

#[test]
fn an_idle_member_holds_a_few_hundred_bytes_per_source_it_followed() {
    const SOURCES: u64 = 2_000;
    let _profiler = dhat::Profiler::builder().testing().build();
    let cfg = GossipConfig::default();
    let mut g = Gossip::new(NodeId(1), cfg.clone(), 1, 0);
    // Five neighbours, as in a tree's overlay.
    for p in 2..=6 {
        g.handle(NodeId(p), GossipMsg::Neighbor { high: true }, 0);
    }
    drain(&mut g);
    let before = live();
    // One event of each source (a member's snapshot, about 60 bytes), all at once through one neighbour, each pushed
    // on to the other four: a storm's burst.
    for s in 0..SOURCES {
        let id = EventId { source: NodeId(1_000 + s), seq: 1 };
        g.handle(NodeId(2), GossipMsg::Event { id, hops: 1, payload: Bytes::from(vec![7u8; 60]) }, 10);
    }
    let sent = drain(&mut g);
    assert_eq!(sent, SOURCES as usize * 5, "each event delivered and pushed on to the four others");
    let burst = (live() - before) / SOURCES as isize;
    assert!(g.cached(&EventId { source: NodeId(1_000), seq: 1 }), "a graft soon after is answered");
    // Idle past the cache's time: the timers run (a summary, a shuffle), as they do in a member.
    let mut now = 10;
    while now <= 10 + cfg.cache_for + cfg.summary_every {
        now += cfg.summary_every;
        g.handle_timeout(now);
        drain(&mut g);
    }
    let idle = (live() - before) / SOURCES as isize;
    eprintln!("per source: {burst} bytes after the burst, {idle} bytes idle");
    assert!(!g.cached(&EventId { source: NodeId(1_000), seq: 1 }), "the cache keeps events for cache_for only");
    assert_eq!(g.next_of(NodeId(1_000)), Some(2), "the stream is still followed: its next event is number 2");
    // The stream's state (its numbers and eager peers, in two hash maps at their load): about 250 bytes. Before the
    // cache expired, while an in-order event left a map node behind and the rarely used parts were inline: 1,731.
    assert!(idle < 320, "{idle} bytes per followed source once idle");
    assert!(burst - idle >= 60, "the cached payloads (60 bytes each) are given back: {burst} -> {idle} bytes");
}
