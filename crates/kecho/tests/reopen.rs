//! A node that closes a channel and opens it again: events and accounts meant for the earlier opening (instance) of
//! the channel never reach the new one's sinks as theirs, and the new one's events are delivered or reported missed
//! (docs/PROTOCOL.md, "Loss accounting", "A channel opened again").

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RegistryClient, SinkOptions, Transport, TryRecvError};
use tokio::time::timeout;

mod common;
use common::drain;

const T: Duration = Duration::from_secs(10);

async fn pair() -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).transport(Transport::Tcp);
    let b = Node::builder().registry_client(reg).transport(Transport::Tcp);
    Ok((a.start().await?, b.start().await?))
}

/// Waits until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + T;
    while !f() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Events a source sent to the earlier instance of a channel, still in flight when the node opened the channel again
/// (they wait on the link behind an event for a full Block sink of another channel), reach the new instance: they are
/// ignored there (counted as stale), and the new instance's own events are all delivered. (They used to set the new
/// instance's baseline in the old numbering: the new numbering's events were then dropped as ones it had, silently,
/// and the end event below never came.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_in_flight_to_an_earlier_instance_do_not_set_the_new_ones_baseline() -> Result<()> {
    let (a, b) = pair().await?;
    let keep_a = a.channel("keep").await?;
    let keep_b = b.channel("keep").await?;
    let mut stall = keep_b.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let ca = a.channel("again").await?;
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    keep_a.wait_for_sinks(1, T).await?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..20 {
        src.submit("old", &Attrs::new(), b"before").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    assert_eq!(got.len(), 21);

    // b's link reader stops at the second event for the full Block sink of "keep": what a sends after it waits.
    let mut keep_src = keep_a.source()?;
    keep_src.submit("k", &Attrs::new(), b"1").await?;
    keep_src.submit("k", &Attrs::new(), b"2").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let last_old = {
        let mut last = 0;
        for _ in 0..200 {
            last = src.submit("old", &Attrs::new(), b"in flight").await?;
        }
        last
    };

    // b closes the channel (a hears of it: that way is not stalled) and opens it again.
    drop(sink);
    cb.close().await;
    drop(cb);
    until("the source no longer sees the closed channel's sink", || src.sinks() == 0).await?;
    let b2 = b.clone();
    let reopen = tokio::spawn(async move { b2.channel("again").await });
    // The new instance has the channel's id (from the registry) before the stalled events move on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        timeout(T, stall.recv()).await.context("the stalled Block sink's events")?.context("recv")?;
    }
    let cb = reopen.await??;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let first = src.submit("new", &Attrs::new(), b"first").await?;
    for _ in 0..50 {
        src.submit("new", &Attrs::new(), b"after").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    assert!(got.iter().all(|(_, seq, _)| *seq > last_old), "an event meant for the earlier instance was delivered");
    assert_eq!(got.first().map(|g| (g.1, g.2)), Some((first, 0)), "the new instance's first event arrived");
    assert_eq!(got.len(), 52, "every event to the new instance delivered: {got:?}");
    let stale = cb.stats().stale;
    assert!(stale > 0, "the earlier instance's events reached the new one (else the test shows nothing)");
    assert_eq!(cb.stats().missed, 0);
    Ok(())
}

/// A source's node closes the channel and opens it again: the new instance's sources (whose local ids and sequence
/// numbers start again at 1) are delivered from their first event, not taken for the old instance's sources, whose
/// account at the sink is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_of_a_reopened_channel_are_not_taken_for_the_old_ones() -> Result<()> {
    let (a, b) = pair().await?;
    let _keep_a = a.channel("keep").await?;
    let _keep_b = b.channel("keep").await?;
    let ca = a.channel("again").await?;
    let mut sink = ca.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    let cb = b.channel("again").await?;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..30 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let old_key = {
        let e = timeout(T, sink.recv()).await?;
        e.map_err(|e| anyhow::anyhow!("recv: {e}"))?.source()
    };
    assert_eq!(drain(&mut sink, "end").await?.len(), 30);
    drop(src);
    cb.close().await;
    drop(cb);

    let cb = b.channel("again").await?;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..5 {
        src.submit("new", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let e = timeout(T, sink.recv()).await.context("timed out waiting for the new source's first event")?;
    let e = e.map_err(|e| anyhow::anyhow!("recv: {e}"))?;
    assert_eq!((e.ty(), e.seq()), ("new", 1), "the new source's first event");
    assert_eq!(e.source(), old_key, "the new source has the old one's key (else the test shows nothing)");
    let got = drain(&mut sink, "end").await?;
    let seqs: Vec<u64> = got.iter().map(|g| g.1).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5, 6], "the new source's events: {got:?}");
    assert!(got.iter().all(|g| g.2 == 0), "nothing reported missed: {got:?}");
    Ok(())
}

/// A source's node closes the channel and opens it again while its link to the sink's node is stalled (behind a
/// full Block sink of another channel): the old source's end waits on the link, and the new opening's join, which
/// goes ahead of a link's backlog, overtakes it. The sink's node then sees the new instance before the old source's
/// end, and must wait for that end rather than tell its sink that the source is gone with an unknown number missed
/// (it was: a false alarm, for a source whose every event had arrived).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_sources_end_overtaken_by_its_nodes_new_opening_still_settles_it() -> Result<()> {
    join_overtakes_the_old_sources_frames(0).await
}

/// As above, with the old source's last events waiting on the link too, behind the stall and before its end: the
/// new opening's join overtakes them as well. They are the old source's, delivered as such (the new source's frames
/// begin with a `Routed` frame that follows them on the link), not ignored as stale and then reported missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_sources_events_overtaken_by_its_nodes_new_opening_are_delivered() -> Result<()> {
    join_overtakes_the_old_sources_frames(5).await
}

/// The scenario of the two tests above, with `in_flight` of the old source's events queued behind the stall.
async fn join_overtakes_the_old_sources_frames(in_flight: u64) -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).transport(Transport::Tcp).start().await?;
    let b = Node::builder().registry_client(reg).transport(Transport::Tcp).link_queue_bytes(64 << 10).start().await?;
    let keep_a = a.channel("keep").await?;
    let keep_b = b.channel("keep").await?;
    let mut stall = keep_a.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let ca = a.channel("again").await?;
    let mut sink = ca.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    let cb = b.channel("again").await?;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..30 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    assert_eq!(drain(&mut sink, "end").await?.len(), 31, "every event of the old source so far arrived");

    // a's link reader stops at the full Block sink of "keep"; the link from b fills up behind it.
    keep_b.wait_for_sinks(1, T).await?;
    let mut keep_src = keep_b.source()?;
    let mut filled = common::fill_until_refused(&mut keep_src).await?;
    let mut taken = 0;
    // The old source's last events go in behind the filler, as room is made for them one stalled event at a time.
    let mut queued = 0;
    while queued < in_flight {
        match src.try_submit("late", &Attrs::new(), b"") {
            Ok(_) => queued += 1,
            Err(_) if taken < filled => {
                timeout(T, stall.recv()).await.context("a stalled Block sink's event")?.context("recv")?;
                taken += 1;
            }
            Err(e) => bail!("no room for the old source's last events: {e}"),
        }
    }
    // A little more filler behind them, so that the link stays stalled.
    filled += common::fill_until_refused(&mut keep_src).await?;
    // The old source's end, then the channel's goodbye, wait behind the filler; the new opening's join overtakes them.
    drop(src);
    cb.close().await;
    drop(cb);
    let b2 = b.clone();
    let reopen = tokio::spawn(async move { b2.channel("again").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in taken..filled {
        timeout(T, stall.recv()).await.context("the stalled Block sink's events")?.context("recv")?;
    }
    let cb = reopen.await??;
    cb.wait_for_sinks(1, T).await?;
    let mut src = cb.source()?;
    for _ in 0..5 {
        src.submit("new", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    let want: Vec<(String, u64, u64)> = (0..in_flight)
        .map(|i| ("late".to_owned(), 32 + i, 0))
        .chain((1..=5).map(|i| ("new".to_owned(), i, 0)))
        .chain([("end".to_owned(), 6, 0)])
        .collect();
    assert_eq!(got, want, "the old source's events in flight, then the new source's, and nothing reported missed");
    // Past the wait for an end that did not come (a heartbeat timeout): still nothing said of the old source.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let next = sink.try_recv();
    assert!(matches!(next, Err(TryRecvError::Empty)), "nothing more for the sink: {next:?}");
    assert_eq!(ca.stats().missed, 0, "no loss counted");
    Ok(())
}

/// Three nodes on one registry. `a`'s link queue is small, so that it fills up; `b` takes a node for gone, and a
/// source whose node is gone without word of its end for lost, within a second.
async fn trio() -> Result<(Node, Node, Node)> {
    let reg = RegistryClient::in_process_private();
    let a = Node::builder().registry_client(reg.clone()).transport(Transport::Tcp).link_queue_bytes(64 << 10);
    let b = Node::builder()
        .registry_client(reg.clone())
        .transport(Transport::Tcp)
        .heartbeat_timeout(T / 10)
        .source_grace(T / 10);
    let c = Node::builder().registry_client(reg).transport(Transport::Tcp);
    Ok((a.start().await?, b.start().await?, c.start().await?))
}

/// A source's end names, per node, the instance of the channel there that its account is for: the end of a source
/// that sent to an earlier instance of the channel on `b` (here relayed by `c`, which remembered it, to `b`'s new
/// instance when that appeared) is not the new instance's, whose sinks are told nothing of it (it is counted as
/// stale). (Before version 16 the new instance took the end's share for `b` as its own: once the source's node left,
/// its sink was told it had missed all 31 events the earlier instance received.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_instances_source_end_is_not_the_new_ones() -> Result<()> {
    let (a, b, c) = trio().await?;
    let cc = c.channel("again").await?;
    let ca = a.channel("again").await?;
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..30 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    assert_eq!(drain(&mut sink, "end").await?.len(), 31);
    // The end goes to `b` and `c`; `c` relays it to `b` and remembers it for members that appear later.
    drop(src);
    tokio::time::sleep(Duration::from_millis(500)).await;

    drop(sink);
    cb.close().await;
    drop(cb);
    // `c` sees `b` leave, so that `b` appears to it again after.
    until("b has left c's view", || !cc.member_nodes().contains(&b.id())).await?;
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    cc.wait_for_sinks(1, T).await?;
    // `c` hears of `b`'s new instance and gives it the ends it remembers.
    let _ = until("the remembered end reaches the new instance", || cb.stats().stale > 0).await;
    // `a` leaves: an end the new instance took as its own would be accounted for now (a heartbeat timeout later).
    ca.close().await;
    drop(ca);
    until("a has left b's view", || !cb.member_nodes().contains(&a.id())).await?;
    // Nothing comes within three of `b`'s heartbeat timeouts.
    if let Ok(got) = timeout(3 * T / 10, sink.recv()).await {
        bail!("the new instance's sink was told something of the earlier one's source: {got:?}");
    }
    assert_eq!(cb.stats().missed, 0, "{:?}", cb.stats());
    assert!(cb.stats().stale > 0, "the earlier instance's end never reached the new one (else the test shows nothing)");
    Ok(())
}

/// A lag notice names the instance of the channel whose sinks missed the events: notices for an earlier instance,
/// still in flight when the node opened the channel again (behind events for a full Block sink of another channel),
/// are ignored there (counted as stale), and the new instance's sink is told of no loss. (Before version 16 the new
/// instance's sink was told it had missed the events dropped for the earlier one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_notices_for_an_earlier_instance_do_not_reach_the_new_ones_sinks() -> Result<()> {
    let (a, b, c) = trio().await?;
    let _cx = c.channel("x").await?;
    let ax = a.channel("x").await?;
    let bx = b.channel("x").await?;
    let mut blocker = bx.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    let _cc = c.channel("again").await?;
    let ca = a.channel("again").await?;
    let cb = b.channel("again").await?;
    let sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropNewest))?;
    ax.wait_for_sinks(1, T).await?;
    ca.wait_for_sinks(1, T).await?;

    // The link from `a` to `b` fills up behind the Block sink nobody reads.
    let mut sx = ax.source()?;
    common::fill_until_refused(&mut sx).await?;
    // Events for `b`'s sink find the link full: dropped, and lag notices for this instance wait on the link.
    let mut src = ca.source()?;
    for _ in 0..100 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    assert!(ca.stats().dropped > 0, "nothing was dropped at the full link (else the test shows nothing)");

    // `b` opens the channel again (joining through `c`, whose link is not stalled), with a new sink.
    drop(sink);
    cb.close().await;
    drop(cb);
    until("the source no longer sees the closed channel's sink", || src.sinks() == 0).await?;
    let cb = timeout(T, b.channel("again")).await.context("opening the channel again")??;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropNewest))?;
    ca.wait_for_sinks(1, T).await?;

    // The link moves again: what was on it for the earlier instance reaches the new one.
    while let Ok(Ok(_)) = timeout(Duration::from_millis(500), blocker.recv()).await {}
    until("the earlier instance's frames reach the new one", || cb.stats().stale > 0).await?;
    for _ in 0..20 {
        src.submit("new", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let got = drain(&mut sink, "end").await?;
    assert!(got.iter().all(|g| g.2 == 0), "the new instance's sink was told of a loss: {got:?}");
    assert_eq!(got.len(), 21, "{got:?}");
    assert_eq!(cb.stats().missed, 0, "{:?}", cb.stats());
    Ok(())
}

/// A source's end names the instance of its node's channel that the source belongs to: the end of a source of an
/// earlier instance of `a`'s channel, which `c` relays late (the link from `a` to `c` was stalled behind a full Block
/// sink of another channel while `a` closed the channel and opened it again), does not end the account of the new
/// instance's source with the same local id at `b` (it is counted as stale). When `a` then crashes, `b`'s sink is
/// told that the new source is gone with an unknown number missed. (Before version 16 `b` took the old end for the new
/// source's: its sink was told it had missed 31 events (the old source's 36 less the new one's 5), and never that the
/// new source was lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_instances_source_end_does_not_end_a_later_ones_source() -> Result<()> {
    let (a, b, c) = trio().await?;
    let _bx = b.channel("x").await?;
    let ax = a.channel("x").await?;
    let cx = c.channel("x").await?;
    let mut stall = cx.sink(SinkOptions::new().capacity(1).overflow(Overflow::Block))?;
    // `b` is the contact: `a` opens the channel again through it while the link from `a` to `c` is stalled.
    let cb = b.channel("again").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(1 << 16).overflow(Overflow::DropOldest))?;
    let cc = c.channel("again").await?;
    let ca = a.channel("again").await?;
    ca.wait_for_sinks(1, T).await?;
    ax.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..35 {
        src.submit("old", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    let old_key = first_source(&mut sink).await?;
    assert_eq!(drain(&mut sink, "end").await?.len(), 35);

    // `c`'s link reader stops at the second event for its full Block sink: what `a` sends it after that waits.
    let mut sx = ax.source()?;
    sx.submit("x", &Attrs::new(), b"1").await?;
    sx.submit("x", &Attrs::new(), b"2").await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(src);
    ca.close().await;
    drop(ca);
    let ca = a.channel("again").await?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    for _ in 0..4 {
        src.submit("new", &Attrs::new(), b"").await?;
    }
    src.submit("end", &Attrs::new(), b"").await?;
    assert_eq!(
        first_source(&mut sink).await?,
        old_key,
        "the new source has the old one's key (else the test shows nothing)"
    );
    let new = drain(&mut sink, "end").await?;
    assert_eq!(new.iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(), vec![(2, 0), (3, 0), (4, 0), (5, 0)]);

    // The link to `c` moves again: `c` gets the old source's end from `a` and relays it to `b`.
    for _ in 0..2 {
        timeout(T, stall.recv()).await.context("the stalled Block sink's events")?.context("recv")?;
    }
    // (Without the instance in the end, nothing shows here that it arrived: the wait then times out.)
    let _ = until("the old source's end reaches b", || cb.stats().stale > 0).await;
    // `a` crashes with the new source open: no end of it will come.
    a.kill();
    match timeout(T, sink.recv()).await.context("no word of the new source's loss")? {
        Err(kecho::RecvError::SourceLost(key)) => assert_eq!(key, old_key),
        other => bail!("expected the new source to be reported lost, got {other:?}"),
    }
    assert_eq!(cb.stats().missed, 0, "{:?}", cb.stats());
    assert!(cb.stats().stale > 0, "the old source's end never reached b (else the test shows nothing)");
    drop(cc);
    Ok(())
}

/// The source of the next event of `sink`, which must be one (no loss reported before it).
async fn first_source(sink: &mut kecho::Sink) -> Result<kecho::SourceKey> {
    let e = timeout(T, sink.recv()).await.context("timed out waiting for an event")?;
    Ok(e.map_err(|e| anyhow::anyhow!("recv: {e}"))?.source())
}
