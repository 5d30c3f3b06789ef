//! A fault scenario on several hosts over QUIC (see `hosts.rs` for the harness and why these need root): a member
//! killed with -9 is detected by its heartbeat, and a link losing 5 % of its UDP packets both ways loses nothing
//! that the application sees, in order.

#[path = "hosts/cli.rs"]
mod cli;
#[path = "hosts/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cli::{check_published, publisher_with, registry, secs, sink, wait_seq, HEARTBEAT, TIMED_OUT, WAIT};
use harness::{Ledger, Net};

const QUIC: &[&str] = &["--transport", "quic"];

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn quic_links_survive_loss_and_detect_a_killed_member() -> Result<()> {
    let net = Net::new(4)?;
    let _reg = registry(&net, 1)?;
    for chain in ["INPUT", "OUTPUT"] {
        net.iptables(
            3,
            &["-A", chain, "-p", "udp", "-m", "statistic", "--mode", "random", "--probability", "0.05", "-j", "DROP"],
        )?;
    }
    let mut keep = sink(&net, 3, "keep", "q9", HEARTBEAT, QUIC)?;
    let mut victim = sink(&net, 4, "victim", "q9", HEARTBEAT, QUIC)?;
    let mut args = QUIC.to_vec();
    args.extend(["--size", "400"]);
    let mut p = publisher_with(&net, 2, "p", "q9", 1000, 200, 2, HEARTBEAT, &args)?;
    wait_seq(&mut victim, "p", 50, WAIT)?;
    let killed = Instant::now();
    victim.kill9()?;
    let detected = p.wait_stderr_after("link lost", killed, Duration::from_secs(5))?;
    eprintln!("FIGURE QUIC, kill -9 of a member: detected by the publisher after {}", secs(detected - killed));
    check_published(&mut p)?;
    wait_seq(&mut keep, "p", 1000, WAIT)?;
    Ledger::of(&keep)?.check_complete(&[("p", 1000)], "keep")?;
    // The sink times out its link to the killed member, and no other: the lossy link to the publisher lives on.
    let timeouts = keep.stderr_text().matches(TIMED_OUT).count();
    ensure!(timeouts <= 1, "the lossy link was declared dead: {}", keep.stderr_text());
    let counters = net.iptables(3, &["-L", "INPUT", "-v", "-n", "-x"])?;
    let dropped: u64 = counters
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    ensure!(dropped > 0, "no UDP packet was dropped: {counters}");
    eprintln!("FIGURE QUIC lossy link: {dropped} UDP packets dropped at the sink, nothing lost to the application");
    Ok(())
}
