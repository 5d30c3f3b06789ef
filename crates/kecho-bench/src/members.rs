//! Channels with many member nodes (issue 17, part 3): the join time of the Nth member node as N grows, and the
//! time for every member to know every sink after a storm of joins at once.
//!
//! The member nodes live in a few child processes (`KECHO_BENCH_MEMBERS=NODES,PROCESSES,STORM`, default
//! `200,4,20`; `--scale` multiplies NODES and STORM), as separate hosts would have them, all on loopback with one
//! registry server in this process. Each node has one sink; a join is timed from the node's start until it knows all
//! N sinks (so it can send to all of them), the other members learning of it meanwhile. Nodes join one at a time,
//! each in the next process; then STORM nodes join at once (spread over the processes) and the storm is timed until
//! every member in every process knows every sink. The channel is a full mesh (each node links to every other), so a
//! run is bounded by file descriptors (a process holds about NODES x NODES / PROCESSES sockets) and memory.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kecho::{Channel, MembershipConfig, Node, Sink, SinkOptions};
use serde::Serialize;

use crate::pipe::fresh_name;
use crate::report::{Check, Section, Table};
use crate::util::{rss_kib, runtime, start_registry};
use crate::BenchArgs;

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

#[derive(Debug, Serialize)]
struct ProcRow {
    nodes: usize,
    rss_kib: u64,
}

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
    let (addr, reg) = rt.block_on(start_registry())?;
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
    let mut storms = Vec::new();
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
    }
    let mut procs_rows = Vec::new();
    for h in &mut hosts {
        h.ask("rss")?;
        let rss = h.answer().ok().and_then(|w| w.first()?.parse().ok()).unwrap_or(0);
        procs_rows.push(ProcRow { nodes: h.nodes, rss_kib: rss });
    }
    drop(hosts);
    rt.block_on(reg.shutdown());

    let mut s = Section::new("members");
    let mut t = Table::new(
        "join of the Nth member node (full mesh)",
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
    let mut t = Table::new("member processes", &["process", "nodes", "resident (MiB)", "per node (KiB)"]);
    for (i, p) in procs_rows.iter().enumerate() {
        let per = if p.nodes > 0 { p.rss_kib / p.nodes as u64 } else { 0 };
        t.row(vec![i.to_string(), p.nodes.to_string(), format!("{:.0}", p.rss_kib as f64 / 1024.0), per.to_string()]);
    }
    s.tables.push(t);
    if let Some(last) = joins.last() {
        s.checks.push(Check::at_most(format!("join of node {} (all known)", last.nth), last.known_ms / 1e3, 1.0, "s"));
    }
    s.notes.push(format!(
        "{} member nodes in {procs} processes on loopback, one sink each, one registry server; nodes join one at a \
         time, then {storm} at once. Full mesh: node N links to the N-1 others.",
        joins.len()
    ));
    if let Some(why) = &stopped {
        s.notes.push(format!("The run stopped early: {why}"));
    }
    s.put("joins", &joins);
    s.put("storms", &storms);
    s.put("processes", &procs_rows);
    Ok(s)
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
    let mut members: Vec<(Node, Channel, Sink)> = Vec::new();
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
                            all.spawn(async move { join(registry, &channel, k).await });
                        }
                        while let Some(joined) = all.join_next().await {
                            members.push(joined.context("a joining node's task")??.0);
                        }
                        for (_, ch, _) in &members {
                            ch.wait_for_sinks(k, STEP_LIMIT).await?;
                        }
                        Ok::<_, anyhow::Error>(())
                    })
                    .await;
                    joined.map_err(|_| anyhow!("storm not converged within {STEP_LIMIT:?}"))??;
                    Ok(format!("ok {}", t0.elapsed().as_nanos()))
                })
            }
            ["rss"] => Ok(format!("ok {}", rss_kib())),
            _ => Err(anyhow!("unknown command {line:?}")),
        };
        let line = answer.unwrap_or_else(|e| format!("err {e:#}").replace('\n', " "));
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    // The parent is done: exit without closing hundreds of links one by one.
    std::process::exit(0)
}

async fn join(registry: SocketAddr, channel: &str, k: usize) -> Result<((Node, Channel, Sink), Instant)> {
    let membership = MembershipConfig { open_timeout: STEP_LIMIT, ..MembershipConfig::default() };
    let node = Node::builder().registry(registry).membership(membership).start().await.context("starting a node")?;
    let ch = node.channel(channel).await.context("opening the channel")?;
    let opened = Instant::now();
    let sink = ch.sink(SinkOptions::new())?;
    ch.wait_for_sinks(k, STEP_LIMIT)
        .await
        .with_context(|| format!("{} member nodes known", ch.member_nodes().len()))?;
    Ok(((node, ch, sink), opened))
}
