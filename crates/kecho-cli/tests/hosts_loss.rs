//! A source that leaves while a sink is cut off from it (issue 17, part 1): three hosts, a publisher and two
//! `kecho sub` sinks; one sink's host drops everything from the publisher's host for 3 s (an asymmetric cut:
//! `iptables -A INPUT -s PUBLISHER -j DROP`), then heals; the publisher finishes and exits soon after. The cut-off sink
//! must be told of every event it missed, and its `--count` must end with a statement of the loss rather than hang.
//! With durability (issue 17, part 2): a source's history replays the cut to a sink that returns while the publisher
//! runs; a recorder (`kecho record`) on a fifth host gives a sink whose publisher left before the heal everything it
//! missed (`sub --recover`); a durable sink (`sub --durable`) killed and restarted resumes with no gap and no
//! duplicate.
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

/// Starts a recorder (`kecho record`) of `channel` on host `h`, its log in `dir`.
fn recorder(net: &Net, h: usize, channel: &str, dir: &std::path::Path) -> Result<harness::Proc> {
    let mut args = vec!["record".to_owned(), channel.to_owned(), "--dir".into(), dir.display().to_string()];
    args.extend(cli::node_args(net, h, HEARTBEAT));
    let mut r = net.kecho(h, "recorder", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    r.wait_stderr("recording", WAIT)?;
    Ok(r)
}

/// Publisher gone before the heal, with a recorder on another host: the cut-off sink (`--recover`) is told of the
/// loss, fetches the missed events from the recorder, and ends up with every event, in order, none missed.
#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn with_a_recorder_a_sink_cut_off_while_its_publisher_leaves_loses_nothing() -> Result<()> {
    const N: u64 = 2000;
    let net = Net::new(5)?;
    let _reg = registry(&net, 1)?;
    let dir = tempfile::tempdir()?;
    let _rec = recorder(&net, 5, "gonerec", dir.path())?;
    let n = N.to_string();
    let mut keep = sink(&net, 2, "keep", "gonerec", HEARTBEAT, &["--count", &n])?;
    let mut victim = sink(&net, 4, "victim", "gonerec", HEARTBEAT, &["--count", &n, "--recover"])?;
    let mut p = publisher(&net, 3, "p", "gonerec", N, RATE, 3)?;
    wait_seq(&mut victim, "p", 400, WAIT)?;
    let publisher_ip = net.ip_of(3).to_string();
    net.iptables(4, &["-A", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    check_published(&mut p)?;
    let status = victim.finish(WAIT).context("the cut-off sink's --count never ended")?;
    net.iptables(4, &["-D", "INPUT", "-s", &publisher_ip, "-j", "DROP"])?;
    let l = Ledger::of(&victim)?;
    let recovered = victim.stderr_text().lines().find(|l| l.contains("recovered from a recorder")).map(str::to_owned);
    eprintln!(
        "FIGURE publisher gone before the heal, with a recorder: the cut-off sink received {} of {N}, told of {} \
         missed; {recovered:?}",
        l.seqs("p").len(),
        l.reported_missing
    );
    ensure!(recovered.is_some(), "nothing was recovered (was the sink cut off?): {}", victim.stderr_text());
    l.check_complete(&[("p", N)], "victim")?;
    ensure!(status.success(), "the cut-off sink: {}", victim.stderr_text());
    ensure!(keep.finish(WAIT)?.success(), "the connected sink: {}", keep.stderr_text());
    Ok(())
}

/// A durable sink whose process is killed (SIGKILL) and started again under the same name while the publisher
/// goes on: with a recorder it resumes with no gap and no duplicate (at least once at the instant of the kill: only
/// the event it was printing may come again).
#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_durable_sink_killed_and_restarted_resumes_with_no_gap_and_no_duplicate() -> Result<()> {
    const N: u64 = 4000;
    let net = Net::new(5)?;
    let _reg = registry(&net, 1)?;
    let dir = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let _rec = recorder(&net, 5, "durable", dir.path())?;
    let s = state.path().display().to_string();
    let args = ["--durable", "d1", "--state-dir", &s];
    let mut first = sink(&net, 4, "first", "durable", HEARTBEAT, &args)?;
    let mut p = publisher(&net, 3, "p", "durable", N, RATE, 2)?;
    wait_seq(&mut first, "p", 400, WAIT)?;
    first.kill9()?;
    let l1 = Ledger::of(&first)?;
    std::thread::sleep(Duration::from_secs(1));
    let mut second = sink(&net, 4, "second", "durable", HEARTBEAT, &args)?;
    wait_seq(&mut second, "p", N, WAIT)?;
    check_published(&mut p)?;
    let l2 = Ledger::of(&second)?;
    let (run1, run2) = (l1.seqs("p"), l2.seqs("p"));
    let last1 = *run1.last().context("the first run printed nothing")?;
    eprintln!(
        "FIGURE durable sink killed and restarted: first run {} events (up to {last1}), second {} from {:?}, {} \
         reported missed",
        run1.len(),
        run2.len(),
        run2.first(),
        l2.reported_missing
    );
    let dup: Vec<u64> = run2.iter().copied().filter(|s| run1.contains(s)).collect();
    ensure!(dup.is_empty() || dup == [last1], "printed twice: {dup:?}");
    let all: std::collections::BTreeSet<u64> = run1.iter().chain(run2).copied().collect();
    ensure!(all.len() as u64 == N, "{} events missing", N - all.len() as u64);
    ensure!(l2.reported_missing == 0, "{} reported missed", l2.reported_missing);
    l2.check_order(&[("p", N)], "second")?;
    Ok(())
}
