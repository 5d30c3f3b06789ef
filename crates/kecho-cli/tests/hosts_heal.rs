//! Hosts cut off and healed, and members frozen past the heartbeat timeout: the member is removed, misses events,
//! and must rejoin by itself and be told how many events it missed (a gap), never skip them silently.
//! The harness is `hosts/harness.rs`; see `hosts.rs` for the other scenarios. These tests need root, so they are marked
//! ignored with that reason; `.ci/run` (as root) runs them with `--ignored`.

#[path = "hosts/cli.rs"]
mod cli;
#[path = "hosts/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cli::{check_published, publisher, registry, secs, sink, wait_seq, HEARTBEAT, TIMED_OUT, WAIT};
use harness::{Ledger, Net, Proc};

/// Waits until `member` receives an event at least as new as the newest `witness` (a member that stayed connected)
/// had at `since`, i.e. until traffic has caught up with it again, and returns when.
fn caught_up(member: &mut Proc, witness: &Proc, since: Instant) -> Result<Instant> {
    let now = Ledger::of(witness)?.seqs("p").last().copied().unwrap_or(1);
    let at = wait_seq(member, "p", now, WAIT)?;
    Ok(at.max(since))
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn cut_member_rejoins_after_heal_and_is_told_what_it_missed() -> Result<()> {
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    let mut keep = sink(&net, 2, "keep", "cut", HEARTBEAT, &[])?;
    let mut victim = sink(&net, 4, "victim", "cut", HEARTBEAT, &[])?;
    let mut p = publisher(&net, 3, "p", "cut", 1500, 100, 2)?;
    wait_seq(&mut victim, "p", 100, WAIT)?;
    let cut = Instant::now();
    net.cut(4)?;
    let seen = p.wait_stderr_after(TIMED_OUT, cut, Duration::from_secs(5))?;
    let felt = victim.wait_stderr_after(TIMED_OUT, cut, Duration::from_secs(5))?;
    std::thread::sleep((cut + Duration::from_secs(3)).saturating_duration_since(Instant::now()));
    let healed = Instant::now();
    net.heal(4)?;
    let back = caught_up(&mut victim, &keep, healed)?;
    eprintln!(
        "FIGURE member host cut (heartbeat 1 s): detected by the publisher after {}, by the member after {}",
        secs(seen - cut),
        secs(felt - cut)
    );
    eprintln!("FIGURE member host healed: events flow to it again after {}", secs(back - healed));
    check_published(&mut p)?;
    wait_seq(&mut keep, "p", 1500, WAIT)?;
    Ledger::of(&keep)?.check_complete(&[("p", 1500)], "keep")?;
    wait_seq(&mut victim, "p", 1500, WAIT)?;
    Ledger::of(&victim)?.check_accounted(&[("p", 1500)], "victim").context("the cut member")?;
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn cut_creator_is_replaced_and_rejoins_after_heal() -> Result<()> {
    let net = Net::new(5)?;
    let _reg = registry(&net, 1)?;
    let mut creator = sink(&net, 2, "creator", "crown", HEARTBEAT, &[])?;
    let mut keep = sink(&net, 3, "keep", "crown", HEARTBEAT, &[])?;
    let mut p = publisher(&net, 4, "p", "crown", 1500, 100, 2)?;
    wait_seq(&mut creator, "p", 100, WAIT)?;
    let cut = Instant::now();
    net.cut(2)?;
    // A newcomer tries at once; it gets in once a survivor has found the creator dead and taken the contact role.
    let mut newcomer = sink(&net, 5, "newcomer", "crown", HEARTBEAT, &["--existing"])?;
    let joined = newcomer.wait_stderr("subscribed", WAIT)?;
    eprintln!("FIGURE creator host cut (heartbeat 1 s): a newcomer could join after {}", secs(joined - cut));
    std::thread::sleep((cut + Duration::from_secs(3)).saturating_duration_since(Instant::now()));
    let healed = Instant::now();
    net.heal(2)?;
    let back = caught_up(&mut creator, &keep, healed)?;
    eprintln!("FIGURE creator host healed: events flow to it again after {}", secs(back - healed));
    check_published(&mut p)?;
    for s in [&mut keep, &mut newcomer, &mut creator] {
        wait_seq(s, "p", 1500, WAIT)?;
    }
    Ledger::of(&keep)?.check_complete(&[("p", 1500)], "keep")?;
    let l = Ledger::of(&newcomer)?;
    let first = l.seqs("p").first().copied().unwrap_or(1);
    let expected: Vec<u64> = (first..=1500).collect();
    anyhow::ensure!(
        l.seqs("p") == expected,
        "newcomer: not every event from {first} on: {}",
        harness::ranges(l.seqs("p"))
    );
    Ledger::of(&creator)?.check_accounted(&[("p", 1500)], "creator").context("the cut creator")?;
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn member_frozen_past_the_heartbeat_rejoins_and_is_told_what_it_missed() -> Result<()> {
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    let mut keep = sink(&net, 2, "keep", "thaw", HEARTBEAT, &[])?;
    let mut frozen = sink(&net, 4, "frozen", "thaw", HEARTBEAT, &[])?;
    let mut p = publisher(&net, 3, "p", "thaw", 1000, 100, 2)?;
    wait_seq(&mut frozen, "p", 100, WAIT)?;
    let stopped = Instant::now();
    frozen.freeze(true)?;
    p.wait_stderr_after(TIMED_OUT, stopped, Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_secs(2));
    let thawed = Instant::now();
    frozen.freeze(false)?;
    let back = caught_up(&mut frozen, &keep, thawed)?;
    eprintln!("FIGURE member frozen 2+ s: events flow to it again {} after SIGCONT", secs(back - thawed));
    check_published(&mut p)?;
    wait_seq(&mut keep, "p", 1000, WAIT)?;
    Ledger::of(&keep)?.check_complete(&[("p", 1000)], "keep")?;
    wait_seq(&mut frozen, "p", 1000, WAIT)?;
    Ledger::of(&frozen)?.check_accounted(&[("p", 1000)], "frozen").context("the frozen member")?;
    Ok(())
}
