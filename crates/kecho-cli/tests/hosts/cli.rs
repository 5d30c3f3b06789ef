//! The `kecho` processes of the scenarios: a registry, JSON-printing sinks and publishers whose events carry
//! `src=NAME`, one node per host on [`NODE_PORT`].

// Shared by the test files that include it; each uses only part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

use crate::harness::{Ledger, Net, Proc, NODE_PORT, REGISTRY_PORT};

/// Heartbeat timeout of every node unless a scenario says otherwise, in seconds.
pub const HEARTBEAT: &str = "1";
/// What a node logs when it gives a silent link up.
pub const TIMED_OUT: &str = "link lost: heartbeat timeout";
/// The upper bound of any single wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// Starts the registry on host `h`.
pub fn registry(net: &Net, h: usize) -> Result<Proc> {
    let mut r = net.kecho(h, "registry", &["registry", "--listen", &net.addr(h, REGISTRY_PORT)])?;
    r.wait_stderr("listening", WAIT)?;
    Ok(r)
}

/// The node arguments every process on host `h` shares: the registry on host 1, a fixed listening port, the
/// heartbeat and logs of links found lost.
pub fn node_args(net: &Net, h: usize, heartbeat: &str) -> Vec<String> {
    [
        "--registry",
        &net.addr(1, REGISTRY_PORT),
        "--listen",
        &net.addr(h, NODE_PORT),
        "--heartbeat",
        heartbeat,
        "--log",
        "kecho=info",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Starts a JSON-printing sink on host `h` and waits until it is subscribed. It gives up by itself after a minute.
pub fn sink(net: &Net, h: usize, name: &str, channel: &str, heartbeat: &str, extra: &[&str]) -> Result<Proc> {
    let mut args = vec!["sub".to_owned(), channel.to_owned(), "--format".into(), "json".into()];
    args.extend(["--timeout".into(), "60".into()]);
    args.extend(node_args(net, h, heartbeat));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut s = net.kecho(h, name, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    s.wait_stderr("subscribed", WAIT)?;
    Ok(s)
}

/// Starts a publisher on host `h` sending `count` events at `rate` per second once `sinks` sinks are present, each
/// carrying `src=NAME`.
pub fn publisher(net: &Net, h: usize, src: &str, channel: &str, count: u64, rate: u64, sinks: usize) -> Result<Proc> {
    publisher_with(net, h, src, channel, count, rate, sinks, HEARTBEAT, &[])
}

#[allow(clippy::too_many_arguments)]
pub fn publisher_with(
    net: &Net,
    h: usize,
    src: &str,
    channel: &str,
    count: u64,
    rate: u64,
    sinks: usize,
    heartbeat: &str,
    extra: &[&str],
) -> Result<Proc> {
    let mut args = vec!["pub".to_owned(), channel.to_owned(), "--type".into(), "tick".into()];
    args.extend(["--attr".into(), format!("src={src}"), "--count".into(), count.to_string()]);
    args.extend(["--rate".into(), rate.to_string(), "--wait-sinks".into(), sinks.to_string()]);
    args.extend(["--timeout".into(), "20".into()]);
    args.extend(node_args(net, h, heartbeat));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    net.kecho(h, src, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Waits until `sink` has received an event of `src` numbered at least `seq`, and returns when it arrived.
pub fn wait_seq(sink: &mut Proc, src: &str, seq: u64, within: Duration) -> Result<Instant> {
    let what = format!("{}: event {seq} of {src}", sink.name);
    let name = sink.name.clone();
    sink.wait_for(within, &what, |out, err| {
        let l = Ledger::parse(&name, out, err).ok()?;
        let i = l.seqs(src).iter().position(|&s| s >= seq)?;
        Some(l.arrivals[src][i])
    })
}

/// Waits for a publisher to finish successfully.
pub fn check_published(p: &mut Proc) -> Result<()> {
    let status = p.finish(Duration::from_secs(40))?;
    ensure!(status.success(), "{} failed: {}", p.name, p.stderr_text());
    Ok(())
}

pub fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
