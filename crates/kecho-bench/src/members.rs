//! Channels with many member nodes (issue 17, part 3): the join time of the Nth member node as N grows, and the
//! time for every member to know every sink after a storm of joins at once.
//!
//! The member nodes live in a few child processes (`KECHO_BENCH_MEMBERS=NODES,PROCESSES,STORM`, default
//! `200,4,20`; `--scale` multiplies NODES and STORM), as separate hosts would have them, all on loopback with one
//! registry server in this process. Each node has one sink; a join is timed from the node's start until it knows all
//! N sinks (so it can send to all of them), the other members learning of it meanwhile. Nodes join one at a time,
//! each in the next process; then STORM nodes join at once (spread over the processes) and the storm is timed until
//! every member in every process knows every sink. Then the first node publishes 20 events 50 ms apart (not
//! counted: in tree mode they shape its tree) and 200 events of 100 B (its thread's
//! CPU per event, what every sink received or was told it missed, and the event frames per event per member), and each
//! process reports its resident memory, the links up per node (and the most at one node), heartbeat timeouts and
//! the longest delay of a 50 ms timer on its runtime (how long its tasks could not run). Then 30 % of the member nodes in every process (never
//! the source's) are killed at once, as a crash would stop them (`Node::kill`: links dropped, no goodbye), and the
//! first node publishes 200 more events 10 ms apart: what every surviving sink received or was told it missed, and
//! what it was never told of (the target: 99.9 % received, the rest reported), and whether every survivor
//! dropped every killed node from its view within 60 s (checked once the events are accounted for). Up to the nodes' tree threshold (64, or
//! `KECHO_BENCH_TREE=THRESHOLD`) the channel is a full mesh (each node links to every other), so a run is bounded by
//! file descriptors (a process holds about NODES x NODES / PROCESSES sockets) and memory; above it the channel runs
//! in tree mode (about 5 links per node; docs/SCALE.md).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kecho::{Channel, MembershipConfig, Node, Sink, SinkOptions};
use serde::Serialize;

use crate::pipe::fresh_name;
use crate::report::{Check, Section, Table};
use crate::util::{rss_kib, runtime, start_registry_for};
use crate::BenchArgs;
use kecho_registry::MAX_CONNECTIONS;

/// How long one join (or the storm) may take before the run stops there.
const STEP_LIMIT: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize)]
struct JoinRow {
    /// The node's place in the channel (1 for the creator).
    nth: usize,
    /// Start of the node until `open_channel` returned (the contact answered with the member list).
    open_ms: f64,
    /// Start of the node until it knew all `nth` sinks.
    known_ms: f64,
}

#[derive(Debug, Serialize)]
struct StormRow {
    before: usize,
    joiners: usize,
    /// From the storm's start until every member (old and new) knew every sink.
    converged_ms: f64,
}

/// Membership traffic (tree mode's control frames, `TreeStats::control_frames`), summed over every member node.
#[derive(Debug, Serialize)]
struct TrafficRow {
    members: usize,
    /// Frames and bytes sent from the storm's start until it converged, per member node and per joiner.
    storm_frames_per_member_per_join: f64,
    storm_bytes_per_member_per_join: f64,
    /// Frames and bytes sent per member node and second in an idle channel, 12 s after the storm.
    idle_frames_per_member_per_s: f64,
    idle_bytes_per_member_per_s: f64,
}

#[derive(Debug, Serialize)]
struct ProcRow {
    nodes: usize,
    rss_kib: u64,
    /// Longest delay of a 50 ms timer on the process's runtime beyond its period (ms).
    stall_ms: u64,
    /// Links up at the end, summed over the process's nodes (each link counted at both of its ends).
    links: usize,
    /// The most links up at one node of the process, and how many of its nodes had more than 8.
    links_max: usize,
    over_8: usize,
    /// Links declared dead on a heartbeat timeout during the run, summed over the nodes.
    heartbeat_timeouts: u64,
}

#[derive(Debug, Serialize)]
struct EventRow {
    sinks: usize,
    events: u64,
    /// CPU time of the publishing thread per event (µs).
    source_cpu_us: f64,
    /// Events received by sinks, reported missed, and event frames that arrived at member nodes.
    received: u64,
    missed: u64,
    copies: u64,
}

/// Delivery to the survivors after a share of the member nodes was killed at once.
#[derive(Serialize)]
struct KillRow {
    members: usize,
    killed: usize,
    events: u64,
    received: u64,
    missed: u64,
    /// Neither received nor reported when the step limit was reached.
    unaccounted: u64,
    /// From the first event after the kill until every survivor had every event received or reported (ms).
    accounted_ms: f64,
    /// Survivors that still counted a killed node's sink `VIEWS_WITHIN` after the kill.
    stale_views: usize,
    /// When every survivor was seen counting the survivors' sinks only, in ms after the kill, if within
    /// `VIEWS_WITHIN`: looked at only once the events after the kill were accounted for, so an upper bound.
    views_ms: Option<f64>,
}

/// How long the survivors are given to drop every killed node from their views.
const VIEWS_WITHIN: Duration = Duration::from_secs(60);

/// The share of member nodes killed at once (percent).
const KILL_PERCENT: usize = 30;
/// Events published after the kill, 10 ms apart.
const AFTER_KILL: u64 = 200;

fn settings(args: &BenchArgs) -> Result<(usize, usize, usize)> {
    let raw = std::env::var("KECHO_BENCH_MEMBERS").unwrap_or_else(|_| "200,4,20".into());
    let parts: Vec<usize> = raw
        .split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("KECHO_BENCH_MEMBERS={raw:?}: expected NODES,PROCESSES,STORM"))?;
    let [nodes, procs, storm] = parts[..] else { bail!("KECHO_BENCH_MEMBERS={raw:?}: expected NODES,PROCESSES,STORM") };
    let scaled = |n: usize, min: usize| ((n as f64 * args.scale).round() as usize).max(min);
    Ok((scaled(nodes, 4), procs.max(1), scaled(storm, 1)))
}

/// One child process hosting member nodes, driven line by line.
struct Host {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    nodes: usize,
}

impl Host {
    fn start(args: &BenchArgs, registry: SocketAddr, channel: &str) -> Result<Self> {
        let (exe, argv) = crate::child::command(args, &format!("members,{registry},{channel}"))?;
        let mut child = Command::new(exe)
            .args(argv)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a member process")?;
        let to = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let from = BufReader::new(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?);
        Ok(Host { child, to, from, nodes: 0 })
    }

    fn ask(&mut self, line: &str) -> Result<()> {
        writeln!(self.to, "{line}").context("writing to a member process")?;
        self.to.flush().context("writing to a member process")
    }

    fn answer(&mut self) -> Result<Vec<String>> {
        let mut line = String::new();
        self.from.read_line(&mut line).context("reading a member process")?;
        let words: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        match words.first().map(String::as_str) {
            Some("ok") => Ok(words[1..].to_vec()),
            Some("err") => bail!("member process: {}", words[1..].join(" ")),
            _ => bail!("member process ended or said {line:?}"),
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(words: &[String], i: usize) -> Result<f64> {
    let ns: u64 = words.get(i).ok_or_else(|| anyhow!("short answer"))?.parse()?;
    Ok(ns as f64 / 1e6)
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let (total, procs, storm) = settings(args)?;
    let rt = runtime()?;
    // Every member node keeps a registry connection while it is up: room for all of them (and the storm's).
    let (addr, reg) = rt.block_on(start_registry_for((total + storm + 64).max(MAX_CONNECTIONS)))?;
    let channel = fresh_name("members");
    let mut hosts = (0..procs).map(|_| Host::start(args, addr, &channel)).collect::<Result<Vec<_>>>()?;
    let mut joins = Vec::new();
    let mut stopped = None;
    for nth in 1..=total {
        let h = &mut hosts[(nth - 1) % procs];
        h.ask(&format!("join {nth}"))?;
        match h.answer() {
            Ok(words) => {
                h.nodes += 1;
                joins.push(JoinRow { nth, open_ms: ms(&words, 0)?, known_ms: ms(&words, 1)? });
            }
            Err(e) => {
                stopped = Some(format!("join of node {nth} failed: {e:#}"));
                break;
            }
        }
        if nth % 50 == 0 {
            eprintln!("kecho-bench members: {nth} nodes joined");
        }
    }
    let mut tables_later: Vec<Table> = Vec::new();
    let mut storms = Vec::new();
    let mut traffic = Vec::new();
    // Resident memory per node once the nodes joined one at a time (before the storm and the kill change the count).
    let mut joined_kib = Vec::new();
    for h in &mut hosts {
        h.ask("rss")?;
        let kib = h.answer().ok().and_then(|w| w.first().and_then(|x| x.parse::<u64>().ok())).unwrap_or(0);
        joined_kib.push(if h.nodes > 0 { kib / h.nodes as u64 } else { 0 });
    }
    let before_storm = control(&mut hosts)?;
    if stopped.is_none() {
        let after = total + storm;
        let mut share = vec![0; procs];
        for i in 0..storm {
            share[i % procs] += 1;
        }
        let t0 = Instant::now();
        for (h, n) in hosts.iter_mut().zip(&share) {
            h.ask(&format!("storm {n} {after}"))?;
        }
        let mut failed = None;
        for (h, n) in hosts.iter_mut().zip(&share) {
            match h.answer() {
                Ok(_) => h.nodes += n,
                Err(e) => failed = Some(format!("storm of {storm}: {e:#}")),
            }
        }
        match failed {
            None => {
                storms.push(StormRow { before: total, joiners: storm, converged_ms: t0.elapsed().as_secs_f64() * 1e3 })
            }
            Some(e) => stopped = Some(e),
        }
        if stopped.is_none() {
            let after = control(&mut hosts)?;
            let members = (total + storm) as f64;
            std::thread::sleep(IDLE_AFTER);
            let idle0 = control(&mut hosts)?;
            let t = Instant::now();
            std::thread::sleep(IDLE_FOR);
            let idle1 = control(&mut hosts)?;
            let secs = t.elapsed().as_secs_f64();
            let per_join = |a: u64, b: u64| (b - a) as f64 / members / storm as f64;
            let per_s = |a: u64, b: u64| (b - a) as f64 / members / secs;
            traffic.push(TrafficRow {
                members: total + storm,
                storm_frames_per_member_per_join: per_join(before_storm.0, after.0),
                storm_bytes_per_member_per_join: per_join(before_storm.1, after.1),
                idle_frames_per_member_per_s: per_s(idle0.0, idle1.0),
                idle_bytes_per_member_per_s: per_s(idle0.1, idle1.1),
            });
        }
    }
    if let Some(tr) = traffic.first() {
        let mut t = Table::new(
            "membership traffic per member node (tree mode's control frames)",
            &["members", "storm: frames per join", "storm: bytes per join", "idle: frames/s", "idle: bytes/s"],
        );
        t.row(vec![
            tr.members.to_string(),
            format!("{:.2}", tr.storm_frames_per_member_per_join),
            format!("{:.0}", tr.storm_bytes_per_member_per_join),
            format!("{:.2}", tr.idle_frames_per_member_per_s),
            format!("{:.0}", tr.idle_bytes_per_member_per_s),
        ]);
        tables_later.push(t);
    }
    let mut events = Vec::new();
    if stopped.is_none() {
        match publish(&mut hosts, EVENTS) {
            Ok(row) => events.push(row),
            Err(e) => stopped = Some(format!("events: {e:#}")),
        }
    }
    let mut kills = Vec::new();
    if stopped.is_none() {
        match kill_and_publish(&mut hosts) {
            Ok(row) => kills.push(row),
            Err(e) => stopped = Some(format!("kill of {KILL_PERCENT} %: {e:#}")),
        }
    }
    let mut procs_rows = Vec::new();
    for h in &mut hosts {
        h.ask("rss")?;
        let w = h.answer().unwrap_or_default();
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        procs_rows.push(ProcRow {
            nodes: h.nodes,
            rss_kib: num(0),
            stall_ms: num(1),
            links: num(2) as usize,
            heartbeat_timeouts: num(3),
            links_max: num(4) as usize,
            over_8: num(5) as usize,
        });
    }
    drop(hosts);
    rt.block_on(reg.shutdown());

    let mut s = Section::new("members");
    let mut t = Table::new(
        "join of the Nth member node",
        &["N", "open (ms)", "all sinks known (ms)", "mean of the 10 joins up to N (ms)"],
    );
    let marks: Vec<usize> = [1usize, 10, 25, 50, 100, 150, 200, 250, 300, 400, 500, 750, 1000]
        .into_iter()
        .filter(|m| *m <= joins.len())
        .chain((!joins.is_empty()).then_some(joins.len()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for m in &marks {
        let r = &joins[m - 1];
        let window = &joins[m.saturating_sub(10)..*m];
        let mean = window.iter().map(|r| r.known_ms).sum::<f64>() / window.len() as f64;
        t.row(vec![m.to_string(), format!("{:.1}", r.open_ms), format!("{:.1}", r.known_ms), format!("{mean:.1}")]);
    }
    s.tables.push(t);
    if let Some(st) = storms.first() {
        let mut t = Table::new("storm of joins at once", &["members before", "joining at once", "all converged (ms)"]);
        t.row(vec![st.before.to_string(), st.joiners.to_string(), format!("{:.0}", st.converged_ms)]);
        s.tables.push(t);
        s.checks.push(Check::at_most("storm convergence", st.converged_ms / 1e3, 2.0, "s"));
    }
    s.tables.extend(tables_later);
    if let Some(e) = events.first() {
        let mut t = Table::new(
            "events from one source to every member",
            &[
                "sinks",
                "events",
                "source CPU per event (µs)",
                "received",
                "reported missed",
                "copies per event per member",
            ],
        );
        let copies = e.copies as f64 / (e.events as f64 * (e.sinks.saturating_sub(1)).max(1) as f64);
        t.row(vec![
            e.sinks.to_string(),
            e.events.to_string(),
            format!("{:.1}", e.source_cpu_us),
            e.received.to_string(),
            e.missed.to_string(),
            format!("{copies:.3}"),
        ]);
        s.tables.push(t);
    }
    if let Some(k) = kills.first() {
        let mut t = Table::new(
            "after 30 % of the member nodes were killed at once (no goodbye)",
            &[
                "members",
                "killed",
                "events after",
                "received by survivors",
                "reported missed",
                "never told",
                "received (%)",
                "all accounted for (ms)",
                "every view without the killed, seen at (ms after the kill)",
            ],
        );
        let want = k.events * (k.members - k.killed) as u64;
        let share = k.received as f64 / want.max(1) as f64;
        t.row(vec![
            k.members.to_string(),
            k.killed.to_string(),
            k.events.to_string(),
            k.received.to_string(),
            k.missed.to_string(),
            k.unaccounted.to_string(),
            format!("{:.2}", share * 100.0),
            format!("{:.0}", k.accounted_ms),
            k.views_ms.map_or(format!("not within {VIEWS_WITHIN:?}"), |v| format!("{v:.0}")),
        ]);
        s.tables.push(t);
        s.checks.push(Check::at_most("survivors still listing a killed node", k.stale_views as f64, 0.0, "members"));
        s.checks.push(Check::at_least("received by the survivors after the kill", share * 100.0, 99.9, "%"));
        s.checks.push(Check::at_most("events never told of after the kill", k.unaccounted as f64, 0.0, "events"));
    }
    let mut t = Table::new(
        "member processes",
        &[
            "process",
            "nodes",
            "resident (MiB)",
            "per node (KiB)",
            "per node after the joins (KiB)",
            "links per node",
            "most links at a node",
            "nodes with more than 8",
            "longest stall (ms)",
            "heartbeat timeouts (known peers)",
        ],
    );
    for (i, p) in procs_rows.iter().enumerate() {
        let per = if p.nodes > 0 { p.rss_kib / p.nodes as u64 } else { 0 };
        let links = if p.nodes > 0 { p.links as f64 / p.nodes as f64 } else { 0.0 };
        t.row(vec![
            i.to_string(),
            p.nodes.to_string(),
            format!("{:.0}", p.rss_kib as f64 / 1024.0),
            per.to_string(),
            joined_kib.get(i).map_or_else(String::new, |k| k.to_string()),
            format!("{links:.1}"),
            p.links_max.to_string(),
            p.over_8.to_string(),
            p.stall_ms.to_string(),
            p.heartbeat_timeouts.to_string(),
        ]);
    }
    s.tables.push(t);
    if let Some(most) = procs_rows.iter().map(|p| p.links_max).max() {
        s.checks.push(Check::at_most("links at one node, the most (end of the run)", most as f64, 8.0, ""));
    }
    if let Some(last) = joins.last() {
        s.checks.push(Check::at_most(format!("join of node {} (all known)", last.nth), last.known_ms / 1e3, 1.0, "s"));
    }
    s.notes.push(format!(
        "{} member nodes in {procs} processes on loopback, one sink each, one registry server; nodes join one at a \
         time, then {storm} at once. Tree threshold {}: up to it a full mesh (node N links to the N-1 others), above \
         it tree mode (bounded links, events along per-source trees).",
        joins.len(),
        tree_threshold().map_or("64 (the default)".to_owned(), |t| t.to_string()),
    ));
    if let Some(why) = &stopped {
        s.notes.push(format!("The run stopped early: {why}"));
    }
    s.put("joins", &joins);
    s.put("storms", &storms);
    s.put("processes", &procs_rows);
    s.put("events", &events);
    s.put("traffic", &traffic);
    s.put("kills", &kills);
    Ok(s)
}

/// After the storm, the channel is left idle this long before its membership traffic is measured (the overlay's
/// summaries name a snapshot broadcast for 10 s).
const IDLE_AFTER: Duration = Duration::from_secs(12);
/// How long the idle traffic is measured.
const IDLE_FOR: Duration = Duration::from_secs(10);

/// Tree mode's control frames and bytes sent so far by every member node.
fn control(hosts: &mut [Host]) -> Result<(u64, u64)> {
    let mut sum = (0, 0);
    for h in hosts.iter_mut() {
        h.ask("control")?;
        let w = h.answer()?;
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        sum.0 += num(0);
        sum.1 += num(1);
    }
    Ok(sum)
}

/// Events the first node publishes once every member has joined.
const EVENTS: u64 = 200;
/// Events published before those, 50 ms apart, and not counted.
const WARM_UP: u64 = 20;

/// The first node (in the first process) publishes `n` events of 100 B; every sink (its own included) must get them.
fn publish(hosts: &mut [Host], n: u64) -> Result<EventRow> {
    let sinks: usize = hosts.iter().map(|h| h.nodes).sum();
    // First a few events 50 ms apart, not counted: in tree mode they shape the source's tree (the first events of a
    // source go to every neighbour until duplicates prune the links), so that the figures are the steady state's.
    hosts[0].ask(&format!("publish {WARM_UP} 50"))?;
    hosts[0].answer()?;
    for h in hosts.iter_mut() {
        h.ask(&format!("count {WARM_UP}"))?;
    }
    for h in hosts.iter_mut() {
        h.answer()?;
    }
    // Event frames are counted from here (in tree mode, membership messages travel as overlay events too).
    for h in hosts.iter_mut() {
        h.ask("mark")?;
        h.answer()?;
    }
    hosts[0].ask(&format!("publish {n}"))?;
    let cpu_ns = hosts[0].answer()?.first().ok_or_else(|| anyhow!("short answer"))?.parse::<u64>()?;
    let (mut received, mut missed, mut copies) = (0, 0, 0);
    for h in hosts.iter_mut() {
        h.ask(&format!("count {n}"))?;
    }
    for h in hosts.iter_mut() {
        let w = h.answer()?;
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        received += num(0);
        missed += num(1);
        copies += num(2);
    }
    // The source's own sink gets its events locally; they count as received there but are no copy over a link.
    let copies = copies.saturating_sub(n);
    Ok(EventRow { sinks, events: n, source_cpu_us: cpu_ns as f64 / 1e3, received, missed, copies })
}

/// Kills `KILL_PERCENT` % of the member nodes in every process at once, then the first node publishes `AFTER_KILL`
/// events 10 ms apart; every surviving sink must get each of them or be told it missed it.
fn kill_and_publish(hosts: &mut [Host]) -> Result<KillRow> {
    let members: usize = hosts.iter().map(|h| h.nodes).sum();
    for h in hosts.iter_mut() {
        h.ask(&format!("kill {KILL_PERCENT}"))?;
    }
    let mut killed = 0;
    // The killed nodes' ids (for the diagnosis below).
    let mut killed_ids = Vec::new();
    for h in hosts.iter_mut() {
        let w = h.answer()?;
        let k = w.first().ok_or_else(|| anyhow!("short answer"))?.parse::<usize>()?;
        killed_ids.extend(w.get(1).cloned());
        h.nodes -= k;
        killed += k;
    }
    let killed_at = Instant::now();
    let t0 = Instant::now();
    hosts[0].ask(&format!("publish {AFTER_KILL} 10"))?;
    hosts[0].answer()?;
    let (mut received, mut missed) = (0, 0);
    for h in hosts.iter_mut() {
        h.ask(&format!("count {AFTER_KILL}"))?;
    }
    for h in hosts.iter_mut() {
        let w = h.answer()?;
        let num = |i: usize| w.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        received += num(0).saturating_sub(num(1));
        missed += num(1);
    }
    let accounted_ms = t0.elapsed().as_secs_f64() * 1e3;
    let unaccounted = (AFTER_KILL * (members - killed) as u64).saturating_sub(received + missed);
    // Every survivor must drop every killed node (tree mode's liveness check takes out those no neighbour saw die).
    let left = VIEWS_WITHIN.saturating_sub(killed_at.elapsed());
    for h in hosts.iter_mut() {
        h.ask(&format!("views {} {}", members - killed, left.as_millis()))?;
    }
    let mut stale_views = 0;
    for h in hosts.iter_mut() {
        stale_views += h.answer()?.first().ok_or_else(|| anyhow!("short answer"))?.parse::<usize>()?;
    }
    let views_ms = (stale_views == 0).then(|| killed_at.elapsed().as_secs_f64() * 1e3);
    // What the survivors' views and the killed nodes look like now (on standard error, per process).
    let mut survivors = Vec::new();
    for h in hosts.iter_mut() {
        h.ask("ids")?;
        survivors.extend(h.answer()?.first().cloned());
    }
    let (killed_ids, survivors) = (killed_ids.join(","), survivors.join(","));
    for h in hosts.iter_mut() {
        h.ask(&format!("diagnose {killed_ids} {survivors}"))?;
        h.answer()?;
    }
    Ok(KillRow {
        members,
        killed,
        events: AFTER_KILL,
        received,
        missed,
        unaccounted,
        accounted_ms,
        stale_views,
        views_ms,
    })
}

/// The child: hosts member nodes of `channel`, started on the parent's word (`join K`: one node, answered when it
/// knows K sinks; `storm M K`: M nodes at once, answered when every node here knows K sinks; `rss`).
pub fn child(registry: SocketAddr, channel: &str) -> Result<()> {
    // RUST_LOG=kecho=debug (say) shows what the member nodes do, on standard error.
    if std::env::var_os("RUST_LOG").is_some() {
        let filter = tracing_subscriber::EnvFilter::from_default_env();
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
    let rt = runtime()?;
    // The longest time a 50 ms timer on this runtime waited beyond its period: how long the nodes' tasks (their
    // heartbeats among them) could not run.
    let stall = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let meter = stall.clone();
    rt.spawn(async move {
        let period = Duration::from_millis(50);
        let mut t = tokio::time::interval(period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            t.tick().await;
            let late = last.elapsed().saturating_sub(period);
            last = Instant::now();
            meter.fetch_max(late.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    let mut members: Vec<(Node, Channel, Sink)> = Vec::new();
    let mut killed: Vec<(Node, Channel, Sink)> = Vec::new();
    // Event frames that arrived here up to the last `mark`.
    let mut marked = 0u64;
    // The first node's source, made at the first `publish` and kept (a new source would change the node's members).
    let mut source: Option<kecho::Source> = None;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let answer = match words.as_slice() {
            ["join", k] => {
                let k: usize = k.parse()?;
                rt.block_on(async {
                    let t0 = Instant::now();
                    let (m, opened) =
                        tokio::time::timeout(STEP_LIMIT + Duration::from_secs(10), join(registry, channel, k))
                            .await??;
                    let known = t0.elapsed();
                    members.push(m);
                    Ok::<_, anyhow::Error>(format!("ok {} {}", (opened - t0).as_nanos(), known.as_nanos()))
                })
            }
            ["storm", m, k] => {
                let (m, k): (usize, usize) = (m.parse()?, k.parse()?);
                rt.block_on(async {
                    let t0 = Instant::now();
                    let joined = tokio::time::timeout(STEP_LIMIT + Duration::from_secs(10), async {
                        let mut all = tokio::task::JoinSet::new();
                        for _ in 0..m {
                            let channel = channel.to_owned();
                            all.spawn(async move { join_steps(registry, &channel, k).await });
                        }
                        // When the last joiner here had opened the channel, and knew every sink.
                        let (mut opened, mut known) = (Duration::ZERO, Duration::ZERO);
                        let mut steps = Vec::new();
                        while let Some(joined) = all.join_next().await {
                            let (m, at, s) = joined.context("a joining node's task")??;
                            steps.push(s);
                            if at - t0 > Duration::from_secs(2) {
                                eprintln!(
                                    "kecho-bench members: node {} opened the channel {:?} after the storm's start",
                                    m.0.id(),
                                    at - t0
                                );
                            }
                            opened = opened.max(at - t0);
                            known = known.max(t0.elapsed());
                            members.push(m);
                        }
                        storm_breakdown(&steps);
                        let mut slow = Vec::new();
                        for (i, (_, ch, _)) in members.iter().enumerate() {
                            ch.wait_for_sinks(k, STEP_LIMIT).await?;
                            slow.push((t0.elapsed(), i));
                        }
                        slow.sort();
                        let slowest: Vec<String> =
                            slow.iter().rev().take(3).map(|(t, i)| format!("member {i} at {t:?}")).collect();
                        eprintln!("kecho-bench members: slowest here: {}", slowest.join(", "));
                        eprintln!(
                            "kecho-bench members: storm of {m} here: opened {opened:?}, the joiners knew every sink \
                             {known:?}, every member {:?}",
                            t0.elapsed()
                        );
                        Ok::<_, anyhow::Error>(())
                    })
                    .await;
                    joined.map_err(|_| anyhow!("storm not converged within {STEP_LIMIT:?}"))??;
                    Ok(format!("ok {}", t0.elapsed().as_nanos()))
                })
            }
            ["kill", pct] => {
                // `kill PCT`: PCT % of the nodes here stop at once, as in a crash (no goodbye, links dropped); never
                // the first (it may hold the source). Spread over the order of joining.
                let pct: usize = pct.parse()?;
                let n = members.len();
                let k = (n * pct + 50) / 100;
                let victims: Vec<usize> = (0..k).map(|j| 1 + j * (n - 1) / k.max(1)).filter(|i| *i < n).collect();
                let mut ids = Vec::new();
                for &i in victims.iter().rev() {
                    let m = members.remove(i);
                    m.0.kill();
                    ids.push(m.0.id().to_string());
                    // Kept (not dropped) until the process exits: a crashed node does nothing more.
                    killed.push(m);
                }
                Ok(format!("ok {} {}", victims.len(), ids.join(",")))
            }
            ["views", n, ms] => {
                // `views N MS`: waits up to MS for every node here to count N sinks (one per surviving member node);
                // the answer is how many still do not.
                let (n, ms): (usize, u64) = (n.parse()?, ms.parse()?);
                rt.block_on(async {
                    let until = Instant::now() + Duration::from_millis(ms);
                    loop {
                        let stale = members.iter().filter(|(_, ch, _)| ch.sinks() != n).count();
                        if stale == 0 || Instant::now() >= until {
                            return Ok::<_, anyhow::Error>(format!("ok {stale}"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
            }
            ["ids"] => {
                let ids: Vec<String> = members.iter().map(|(n, _, _)| n.id().to_string()).collect();
                Ok(format!("ok {}", ids.join(",")))
            }
            ["diagnose", killed_ids, survivors] => {
                diagnose(&members, &killed, killed_ids, survivors);
                Ok("ok".to_owned())
            }
            ["control"] => {
                let (frames, bytes) = members.iter().fold((0, 0), |(f, b), (_, ch, _)| {
                    let t = ch.tree_stats();
                    (f + t.control_frames, b + t.control_bytes)
                });
                Ok(format!("ok {frames} {bytes}"))
            }
            ["mark"] => {
                marked = copies(&members);
                Ok("ok".to_owned())
            }
            ["rss"] => {
                let per: Vec<usize> =
                    members.iter().map(|(n, _, _)| n.link_stats().iter().filter(|l| l.up).count()).collect();
                let links: usize = per.iter().sum();
                let most = per.iter().copied().max().unwrap_or(0);
                let over = per.iter().filter(|&&k| k > 8).count();
                // The nodes with the most links over 8 (at most 3 per process): their overlay views, and how much
                // their links carried (diagnosis on standard error).
                let mut over_8: Vec<(usize, usize)> = per.iter().copied().enumerate().filter(|&(_, k)| k > 8).collect();
                over_8.sort_by_key(|&(_, k)| std::cmp::Reverse(k));
                for &(i, k) in over_8.iter().take(3) {
                    let (n, ch, _) = &members[i];
                    let t = ch.tree_stats();
                    let up: Vec<_> = n.link_stats().into_iter().filter(|l| l.up).collect();
                    let small = up.iter().filter(|l| l.bytes_sent + l.bytes_received < 1024).count();
                    let sent: u64 = up.iter().map(|l| l.bytes_sent).sum();
                    eprintln!(
                        "node #{i} here: {k} links up (active view {}, passive {}; {small} of them carried under 1 KB; \
                         {sent} bytes sent on them), {} sinks known",
                        t.active,
                        t.passive,
                        ch.sinks()
                    );
                }
                let timeouts: u64 =
                    members.iter().flat_map(|(n, _, _)| n.link_stats()).map(|l| l.heartbeat_timeouts).sum();
                let stall = stall.load(std::sync::atomic::Ordering::Relaxed);
                Ok(format!("ok {} {stall} {links} {timeouts} {most} {over}", rss_kib()))
            }
            ["publish", n, rest @ ..] => {
                // The first node here publishes n events (`publish N PACE_MS`: PACE_MS apart); the answer is the CPU
                // time of this thread per event (the submit path runs on the caller: encoding and queueing to every
                // member's link, or to its tree children).
                let n: u64 = n.parse()?;
                let pace = Duration::from_millis(rest.first().map_or(Ok(0), |p| p.parse::<u64>())?);
                let (_, ch, _) = members.first().ok_or_else(|| anyhow!("no node here"))?;
                let src = match &mut source {
                    Some(s) => s,
                    None => source.insert(ch.source()?),
                };
                let attrs = kecho::Attrs::new();
                let payload = [7u8; 100];
                rt.block_on(async {
                    let cpu = crate::util::self_cpu_ns();
                    for _ in 0..n {
                        src.submit("m", &attrs, &payload).await?;
                        if !pace.is_zero() {
                            tokio::time::sleep(pace).await;
                        }
                    }
                    Ok::<_, anyhow::Error>(format!("ok {}", (crate::util::self_cpu_ns() - cpu) / n.max(1)))
                })
            }
            ["count", n] => {
                // Waits until every sink here has n events (or a step limit), then answers the events received, the
                // events reported missed, and the event frames that arrived at the nodes here (copies).
                let n: u64 = n.parse()?;
                rt.block_on(async {
                    let (mut got, mut missed) = (0u64, 0u64);
                    let deadline = tokio::time::Instant::now() + STEP_LIMIT;
                    for (node, ch, sink) in members.iter_mut() {
                        let (mut here, mut lagged, mut ended) = (0, 0, String::from("the step limit"));
                        while here < n {
                            match tokio::time::timeout_at(deadline, sink.recv()).await {
                                Ok(Ok(_)) => here += 1,
                                Ok(Err(kecho::RecvError::Lagged(k))) => {
                                    missed += k;
                                    lagged += k;
                                    here += k;
                                }
                                Ok(Err(e)) => {
                                    ended = format!("{e:?}");
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        if here < n {
                            let t = ch.tree_stats();
                            eprintln!(
                                "kecho-bench members: node {} accounted for {here} of {n} ({lagged} reported missed) \
                                 until {ended}; overlay: {} neighbours, {} passive, {} delivered, {} lost",
                                node.id(),
                                t.active,
                                t.passive,
                                t.delivered,
                                t.lost
                            );
                        }
                        got += here;
                    }
                    let copies = copies(&members) - marked;
                    Ok::<_, anyhow::Error>(format!("ok {got} {missed} {copies}"))
                })
            }
            _ => Err(anyhow!("unknown command {line:?}")),
        };
        let line = answer.unwrap_or_else(|e| format!("err {e:#}").replace('\n', " "));
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    // The parent is done: exit without closing hundreds of links one by one.
    std::process::exit(0)
}

/// Event frames that arrived at the nodes here, and events of local sources delivered to their local sinks: in a
/// full mesh the events received; in tree mode every frame carrying an event, duplicates included.
fn copies(members: &[(Node, Channel, Sink)]) -> u64 {
    members
        .iter()
        .map(|(_, ch, _)| {
            let (stats, tree) = (ch.stats(), ch.tree_stats());
            if tree.on {
                tree.event_frames + stats.received.saturating_sub(tree.delivered)
            } else {
                stats.received
            }
        })
        .sum()
}

/// `KECHO_BENCH_TREE=THRESHOLD`: the member nodes' tree threshold (`NodeBuilder::tree_threshold`).
fn tree_threshold() -> Option<usize> {
    std::env::var("KECHO_BENCH_TREE").ok().and_then(|v| v.trim().parse().ok())
}

/// One joiner's steps, from the call to `join` (for the storm's breakdown on standard error).
struct Steps {
    /// The node started (its listener bound).
    started: Duration,
    /// The channel open (the contact's answer taken and handed to the application).
    opened: Duration,
    /// It knew every sink.
    known: Duration,
    /// The membership state machine's record of the open (times from the open's start).
    trace: kecho::JoinTrace,
}

async fn join(registry: SocketAddr, channel: &str, k: usize) -> Result<((Node, Channel, Sink), Instant)> {
    let (m, opened, _) = join_steps(registry, channel, k).await?;
    Ok((m, opened))
}

async fn join_steps(registry: SocketAddr, channel: &str, k: usize) -> Result<((Node, Channel, Sink), Instant, Steps)> {
    let t0 = Instant::now();
    let membership = MembershipConfig { open_timeout: STEP_LIMIT, ..MembershipConfig::default() };
    let mut builder = Node::builder().registry(registry).membership(membership);
    if let Some(t) = tree_threshold() {
        builder = builder.tree_threshold(t);
    }
    // `KECHO_BENCH_PROBE=0`: tree mode's liveness check off, to measure what it costs.
    if std::env::var("KECHO_BENCH_PROBE").is_ok_and(|v| v.trim() == "0") {
        builder = builder.tree_liveness_check(false);
    }
    let node = builder.start().await.context("starting a node")?;
    let started = t0.elapsed();
    let ch = node.channel(channel).await.context("opening the channel")?;
    let opened = Instant::now();
    let sink = ch.sink(SinkOptions::new())?;
    ch.wait_for_sinks(k, STEP_LIMIT)
        .await
        .with_context(|| format!("{} member nodes known", ch.member_nodes().len()))?;
    let steps = Steps { started, opened: opened - t0, known: t0.elapsed(), trace: ch.join_trace() };
    Ok(((node, ch, sink), opened, steps))
}

/// The storm joiners' steps in this process, on standard error: the least, median and greatest of each (ms), so that
/// a slow storm shows where its joiners' time went (node start, registry lookup, `JoinRequest` to the contact's
/// `JoinAccept`, every sink known).
fn storm_breakdown(steps: &[Steps]) {
    if steps.is_empty() {
        return;
    }
    let spread = |f: &dyn Fn(&Steps) -> Option<Duration>| {
        let mut v: Vec<f64> = steps.iter().filter_map(f).map(|d| d.as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => "-".to_owned(),
            n => format!("{:.0}/{:.0}/{:.0}", v[0], v[n / 2], v[n - 1]),
        }
    };
    let lookups: u32 = steps.iter().map(|s| s.trace.lookups).sum();
    let requests: u32 = steps.iter().map(|s| s.trace.requests).sum();
    let retried = steps.iter().filter(|s| s.trace.requests > 1).count();
    let entries = steps.iter().map(|s| s.trace.accept_entries).max().unwrap_or(0);
    eprintln!(
        "kecho-bench members: storm joiners here ({}; ms, least/median/greatest from the node's start): node started \
         {}, first lookup answered +{}, last JoinRequest sent +{}, JoinAccept taken +{}, open returned {}, every sink \
         known {}; {lookups} lookups and {requests} JoinRequests in all ({retried} joiners asked more than once); \
         JoinAccept listed up to {entries} member nodes",
        steps.len(),
        spread(&|s| Some(s.started)),
        spread(&|s| s.trace.first_lookup),
        spread(&|s| s.trace.last_request),
        spread(&|s| s.trace.accepted),
        spread(&|s| Some(s.opened)),
        spread(&|s| Some(s.known)),
    );
}

/// On standard error: which killed nodes the survivors here still list (and whether a link to them is up, or they
/// are overlay neighbours), which survivors they miss, the liveness check's counters, and whether the killed nodes
/// here kept links or asked for tasks after they were stopped.
fn diagnose(members: &[(Node, Channel, Sink)], killed: &[(Node, Channel, Sink)], killed_ids: &str, survivors: &str) {
    use std::collections::{BTreeMap, BTreeSet};
    let killed_ids: BTreeSet<&str> = killed_ids.split(',').filter(|s| !s.is_empty()).collect();
    let survivors: BTreeSet<&str> = survivors.split(',').filter(|s| !s.is_empty()).collect();
    let (mut stale, mut linked, mut neighbours) = (0, 0, 0);
    let mut listed: BTreeMap<String, usize> = BTreeMap::new();
    let mut missing: BTreeMap<String, usize> = BTreeMap::new();
    let (mut suspicions, mut refuted) = (0, 0);
    // What made the probes behind the suspicions fail, counted at the probers.
    let (mut timed_out, mut lost, mut refused, mut identity) = (0, 0, 0, 0);
    for (node, ch, _) in members {
        let known: BTreeSet<String> = ch.member_nodes().iter().map(|n| n.to_string()).collect();
        let up: BTreeSet<String> = node.link_stats().iter().filter(|l| l.up).map(|l| l.node.to_string()).collect();
        let near: BTreeSet<String> = ch.tree_neighbours().iter().map(|n| n.to_string()).collect();
        let me = node.id().to_string();
        let extra: Vec<&String> = known.iter().filter(|k| killed_ids.contains(k.as_str())).collect();
        let lacks: Vec<&&str> = survivors.iter().filter(|s| **s != me && !known.contains(**s)).collect();
        if !extra.is_empty() || !lacks.is_empty() {
            stale += 1;
        }
        for k in extra {
            *listed.entry(k.clone()).or_default() += 1;
            linked += usize::from(up.contains(k));
            neighbours += usize::from(near.contains(k));
        }
        for s in lacks {
            *missing.entry((*s).to_owned()).or_default() += 1;
        }
        let t = ch.tree_stats();
        suspicions += t.suspicions;
        refuted += t.refuted;
        timed_out += t.suspicion_causes.timed_out;
        lost += t.suspicion_causes.lost;
        refused += t.suspicion_causes.refused;
        identity += t.suspicion_causes.identity;
    }
    let kept_links: usize = killed.iter().map(|(n, _, _)| n.link_stats().iter().filter(|l| l.up).count()).sum();
    let late: u64 = killed.iter().map(|(n, _, _)| n.tasks_after_stop()).sum();
    let top = |m: &BTreeMap<String, usize>| {
        let mut v: Vec<(usize, &String)> = m.iter().map(|(k, c)| (*c, k)).collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.iter().take(5).map(|(c, k)| format!("{k} by {c}")).collect::<Vec<_>>().join(", ")
    };
    eprintln!(
        "kecho-bench members: diagnosis here: {stale} of {} survivors with a wrong view; killed nodes listed: {} \
         distinct ({}), {linked} of those with a link up, {neighbours} as overlay neighbours; survivors missing: {} \
         distinct ({}); suspicions {suspicions} (after a timeout {timed_out}, a failed or lost connection {lost}, a \
         refusal {refused}, a wrong identity {identity}), refuted {refuted}; the {} killed here: {kept_links} links \
         up, {late} tasks asked for after the kill",
        members.len(),
        listed.len(),
        top(&listed),
        missing.len(),
        top(&missing),
        killed.len()
    );
}
