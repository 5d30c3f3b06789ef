//! A source that leaves while a sink is cut off from it (issue 17, part 1): three hosts, a publisher and two
//! `kecho sub` sinks; one sink's host drops everything from the publisher's host for 3 s (an asymmetric cut:
//! `iptables -A INPUT -s PUBLISHER -j DROP`), then heals; the publisher finishes and exits soon after. The cut-off sink
//! must be told of every event it missed, and its `--count` must end with a statement of the loss rather than hang.
//! The harness is `hosts/harness.rs`. These tests need root, so they are marked ignored with that reason; `.ci/run`
//! (as root) runs them with `--ignored`.

#[path = "hosts/cli.rs"]
mod cli;
#[path = "hosts/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cli::{check_published, publisher, registry, secs, sink, wait_seq, HEARTBEAT, WAIT};
use harness::{Ledger, Net};

/// Events the publisher sends, and at what rate.
const EVENTS: u64 = 4000;
const RATE: u64 = 800;

/// One run of the scenario; returns what the cut-off sink received and was told it missed.
fn publisher_leaves_soon_after_the_heal(run: usize) -> Result<(usize, u64)> {
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    let count = EVENTS.to_string();
    let mut keep = sink(&net, 2, "keep", "leave", HEARTBEAT, &["--count", &count])?;
    let mut victim = sink(&net, 4, "victim", "leave", HEARTBEAT, &["--count", &count])?;
    let mut p = publisher(&net, 3, "p", "leave", EVENTS, RATE, 2)?;
    wait_seq(&mut victim, "p", 400, WAIT)?;
    let publisher_ip = net.ip_of(3).to_string();
    let cut = Instant::now();
    net.iptables(4, &["-A", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    std::thread::sleep(Duration::from_secs(3));
    net.iptables(4, &["-D", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    let healed = Instant::now();
    check_published(&mut p)?;
    let exited = Instant::now();
    // The cut-off sink ends by itself: with every event received, or with the loss stated.
    let status = victim.finish(WAIT).context("the cut-off sink's --count never ended")?;
    let ended = Instant::now();
    let l = Ledger::of(&victim)?;
    eprintln!(
        "FIGURE run {run}: cut {}, publisher exited {} after the heal; the cut-off sink received {} of {EVENTS}, was \
         told of {} missed in {} report(s), and ended {} after the publisher",
        secs(healed - cut),
        secs(exited.saturating_duration_since(healed)),
        l.seqs("p").len(),
        l.reported_missing,
        l.gap_reports,
        secs(ended - exited)
    );
    l.check_accounted(&[("p", EVENTS)], "victim").context("the cut-off sink")?;
    if l.reported_missing > 0 {
        ensure!(!status.success(), "a sink that missed events must not end as if it had not");
        ensure!(
            victim.stderr_text().contains(&format!("{} reported missed", l.reported_missing)),
            "no statement of the loss: {}",
            victim.stderr_text()
        );
    }
    let status = keep.finish(WAIT)?;
    ensure!(status.success(), "the connected sink: {}", keep.stderr_text());
    Ledger::of(&keep)?.check_complete(&[("p", EVENTS)], "keep")?;
    Ok((l.seqs("p").len(), l.reported_missing))
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_publisher_that_leaves_soon_after_a_cut_heals_leaves_no_sink_unaware() -> Result<()> {
    // The issue saw the silent loss in 4 runs of 6; every run must account for everything.
    let mut lost_some = 0;
    for run in 1..=3 {
        let (_, missed) = publisher_leaves_soon_after_the_heal(run)?;
        lost_some += usize::from(missed > 0);
    }
    ensure!(lost_some > 0, "no run lost anything: the scenario did not cut the sink off");
    Ok(())
}

/// The publisher finishes and exits while the cut lasts: the cut-off sink is told of everything it missed (by the
/// other member, which heard the publisher's end) and its `--count` ends.
#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_publisher_gone_before_the_heal_leaves_no_sink_unaware() -> Result<()> {
    const N: u64 = 2000;
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    let n = N.to_string();
    let mut keep = sink(&net, 2, "keep", "gone", HEARTBEAT, &["--count", &n])?;
    let mut victim = sink(&net, 4, "victim", "gone", HEARTBEAT, &["--count", &n])?;
    let mut p = publisher(&net, 3, "p", "gone", N, RATE, 2)?;
    wait_seq(&mut victim, "p", 400, WAIT)?;
    let publisher_ip = net.ip_of(3).to_string();
    net.iptables(4, &["-A", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    check_published(&mut p)?;
    let status = victim.finish(WAIT).context("the cut-off sink's --count never ended")?;
    net.iptables(4, &["-D", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    let l = Ledger::of(&victim)?;
    eprintln!(
        "FIGURE publisher gone before the heal: the cut-off sink received {} of {N}, told of {} missed",
        l.seqs("p").len(),
        l.reported_missing
    );
    // The source was closed, so its end is exact and the other member relays it: the sink is told exactly what it
    // missed, never "an unknown number" (the other sink, ending as soon as it has the last event, waits for the end
    // that follows it before leaving, to hand it on).
    ensure!(
        !victim.stderr_text().contains("unknown number"),
        "the loss was reported as unknown: {}",
        victim.stderr_text()
    );
    l.check_accounted(&[("p", N)], "victim")?;
    ensure!(l.reported_missing > 0, "the cut cost nothing?");
    ensure!(!status.success(), "the cut-off sink's --count ended as if complete");
    ensure!(keep.finish(WAIT)?.success(), "the connected sink: {}", keep.stderr_text());
    Ledger::of(&keep)?.check_complete(&[("p", N)], "keep")?;
    Ok(())
}

/// The publisher keeps publishing through the cut and after the heal; returns what the cut-off sink missed.
fn publisher_still_running(channel: &str, history: &[&str]) -> Result<u64> {
    const N: u64 = 6000;
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    let n = N.to_string();
    let mut keep = sink(&net, 2, "keep", channel, HEARTBEAT, &["--count", &n])?;
    let mut victim = sink(&net, 4, "victim", channel, HEARTBEAT, &["--count", &n])?;
    let mut p = cli::publisher_with(&net, 3, "p", channel, N, RATE, 2, HEARTBEAT, history)?;
    wait_seq(&mut victim, "p", 400, WAIT)?;
    let publisher_ip = net.ip_of(3).to_string();
    net.iptables(4, &["-A", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    std::thread::sleep(Duration::from_secs(3));
    net.iptables(4, &["-D", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    check_published(&mut p)?;
    victim.finish(WAIT).context("the cut-off sink's --count never ended")?;
    let l = Ledger::of(&victim)?;
    eprintln!(
        "FIGURE publisher still running, history {history:?}: the cut-off sink received {} of {N}, told of {} missed",
        l.seqs("p").len(),
        l.reported_missing
    );
    l.check_accounted(&[("p", N)], "victim")?;
    if !history.is_empty() {
        l.check_complete(&[("p", N)], "victim").context("with a history")?;
    }
    ensure!(keep.finish(WAIT)?.success(), "the connected sink: {}", keep.stderr_text());
    Ledger::of(&keep)?.check_complete(&[("p", N)], "keep")?;
    Ok(l.reported_missing)
}

/// Publisher still running: without a history every missed event is reported; with one, nothing is lost: the events
/// in flight on the link that broke and those submitted while the sink's node was cut off are replayed, in order,
/// without duplicates.
#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_history_replays_the_cut_to_a_returning_sink() -> Result<()> {
    let without = publisher_still_running("nohist", &[])?;
    let with = publisher_still_running("hist", &["--history-events", "100000"])?;
    ensure!(without > 0, "the cut cost nothing without a history");
    ensure!(with == 0, "{with} events missed with a history ({without} without)");
    Ok(())
}
