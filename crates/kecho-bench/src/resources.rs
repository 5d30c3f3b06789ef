//! Resource management (docs/RESOURCES.md): agents on loopback, many concurrent requesters, placement latency and
//! rate, overcommit, and placement quality against an omniscient central allocator and a cycle-based central
//! matchmaker (HTCondor-style negotiation every second), both run on the request trace of the same run.
//!
//! Each requester task takes the next request of the trace (1, 2, 4 or 8 cores, a job length drawn from an
//! exponential distribution), reserves it with `rank = cpus_free` (spread: the agent with most free cores is best),
//! holds it for the job's length and releases it. Just before each request is sent, the true free cores of every
//! agent are read from their ledgers (in-process): the omniscient allocator's choice at that moment. A placement
//! *agrees* when the chosen agent had the most free cores then (ties count).
//!
//! The two central baselines are discrete-event simulations over the recorded trace (arrival times, sizes, job
//! lengths): the omniscient allocator places each request at its arrival on the agent with most free cores; the
//! matchmaker learns the agents' state at the start of each 1 s cycle, queues requests, and matches the queue at
//! each cycle in arrival order against its copy (which it updates with its own matches, not with releases, until
//! the next cycle's reports).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use kecho::{Node, SinkOptions};
use kecho_resources::{Agent, AgentConfig, Amounts, Error, Requester, Spec};
use parking_lot::Mutex;
use serde::Serialize;

use crate::report::{fmt_num, Check, Section, Table};
use crate::util::count;
use crate::BenchArgs;

const CPUS: u64 = 16;
const SIZES: [u64; 4] = [1, 2, 4, 8];

#[derive(Debug, Clone, Serialize)]
struct Rec {
    /// Seconds from the start when the request was sent.
    at: f64,
    cpus: u64,
    /// Job length, seconds.
    job: f64,
    /// Placement latency, seconds (None: refused).
    latency: Option<f64>,
    agrees: bool,
    /// Cluster utilisation (reserved / capacity) when sent.
    util: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Outcome {
    system: String,
    requests: usize,
    placed: usize,
    refused: usize,
    p50_ms: f64,
    p99_ms: f64,
    placements_per_s: f64,
    agree_low: f64,
    agree_all: f64,
    overcommit: u64,
    /// CPU time of the whole process (every node, agent and requester) per placement, microseconds (`None` where
    /// not measured: the simulated baselines, or no /proc).
    cpu_us_per_placement: Option<f64>,
}

/// This process's CPU time (user + system) in seconds, from /proc/self/stat (Linux; `None` elsewhere).
fn process_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks / 100.0)
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut section = Section::new("resources");
    let n = count(args, 100_000, 200) as usize;
    // Experiments: KECHO_BENCH_RES="CONCURRENCY,FANOUT,BIG,ATTR_GAP_MS,RATE_REQUESTERS,REPORT_GAP_MS,TELL"
    // (defaults 16,2,1,600000,64,20,1; BIG=0 skips the large runs; TELL=0: answers do not carry what is free).
    let env = std::env::var("KECHO_BENCH_RES").unwrap_or_default();
    let p: Vec<usize> = env.split(',').filter_map(|x| x.parse().ok()).collect();
    let (conc, run_big) = (p.first().copied().unwrap_or(16), p.get(2) != Some(&0));
    let attr_gap = p.get(3).map_or(AgentConfig::new("x").attr_gap, |ms| Duration::from_millis(*ms as u64));
    let tuning = Tuning {
        fanout: p.get(1).copied().unwrap_or(2),
        attr_gap,
        report_gap: Duration::from_millis(p.get(5).copied().unwrap_or(20) as u64),
        tell_free: p.get(6) != Some(&0),
    };
    // The baseline, run first in the same process on the same trace: the protocol's settings before the changes of
    // 2026-12-05 (ask the best 4, reports at most every 100 ms, answers that do not say what is free).
    // KECHO_BENCH_RES_BASELINE=0 skips it.
    let baseline_tuning = Tuning { fanout: 4, attr_gap, report_gap: Duration::from_millis(100), tell_free: false };
    let mut outcomes = Vec::new();
    let mut base_over = 0;
    let mut base_trace = None;
    if std::env::var("KECHO_BENCH_RES_BASELINE").as_deref() != Ok("0") {
        let base = rt
            .block_on(distributed(32, 1, conc, n, 0.02, &baseline_tuning, false, None))
            .context("32 agents, baseline")?;
        let mut o = base.outcome.clone();
        o.system = format!("baseline settings ({}), 32 agents", baseline_tuning.describe());
        outcomes.push(o);
        base_over = base.outcome.overcommit;
        base_trace = Some(base.trace);
        eprintln!("kecho-bench: resources: baseline done: {} placed", base.outcome.placed);
    }
    let small = rt.block_on(distributed(32, 1, conc, n, 0.02, &tuning, false, None)).context("32 agents")?;
    let mut o = small.outcome.clone();
    o.system = format!("kecho agents ({}), 32 agents", tuning.describe());
    outcomes.push(o);
    outcomes.push(omniscient(&small.trace, 32));
    outcomes.push(matchmaker(&small.trace, 32, 1.0));
    eprintln!("kecho-bench: resources: 32 agents done: {} placed", small.outcome.placed);
    // The rate under contention: each requester task places its next request as soon as the last one is placed
    // (the job runs and is released on the side), so the rate is what the negotiation sustains, not the number of
    // requesters over the job length as above.
    let rate_conc = p.get(4).copied().unwrap_or(64);
    let rate = rt.block_on(distributed(32, 1, rate_conc, n, 0.02, &tuning, true, None)).context("32 agents, rate")?;
    let mut o = rate.outcome.clone();
    o.system = format!("kecho agents, 32 agents, {rate_conc} requesters back to back (rate run)");
    outcomes.push(o);
    eprintln!("kecho-bench: resources: rate run done: {} placed", rate.outcome.placed);
    // The large runs: KECHO_BENCH_RES_SIZES="100,250,500,1000" (default 1000; BIG=0 skips them), 50 agents per node,
    // each bounded in time; a size that fails is reported with how far it got.
    let sizes: Vec<usize> = match std::env::var("KECHO_BENCH_RES_SIZES") {
        Ok(v) => v.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![1000],
    };
    let big_n = count(args, 20_000, 100) as usize;
    let mut bigs: Vec<Distributed> = Vec::new();
    let mut scale = Table::new(
        "scale: agents on few nodes (50 per node), 4 requester nodes",
        &[
            "agents",
            "nodes",
            "agents started",
            "all seen by requesters",
            "placed",
            "p50",
            "p99",
            "placements/s",
            "agree <50%",
            "outcome",
        ],
    );
    for &size in if run_big { sizes.as_slice() } else { &[] } {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let limit = Duration::from_secs(600);
        let r = rt.block_on(async {
            let run = distributed(size, 50, conc, big_n, 0.02, &tuning, false, Some(progress.clone()));
            tokio::time::timeout(limit, run)
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish within {} s", limit.as_secs())))
        });
        let p = progress.lock().clone();
        let secs = |t: Option<f64>| t.map_or_else(|| "-".to_owned(), |t| format!("{t:.1} s"));
        match r {
            Ok(b) => {
                let o = &b.outcome;
                scale.row(vec![
                    size.to_string(),
                    size.div_ceil(50).to_string(),
                    secs(p.started),
                    secs(p.seen),
                    o.placed.to_string(),
                    format!("{:.2} ms", o.p50_ms),
                    format!("{:.2} ms", o.p99_ms),
                    fmt_num(o.placements_per_s),
                    format!("{:.1} %", o.agree_low * 100.0),
                    "completed".into(),
                ]);
                let mut o = b.outcome.clone();
                o.system = format!("kecho agents, {size} agents on {} nodes", size.div_ceil(50));
                outcomes.push(o);
                outcomes.push(omniscient(&b.trace, size));
                outcomes.push(matchmaker(&b.trace, size, 1.0));
                bigs.push(b);
            }
            Err(e) => {
                scale.row(vec![
                    size.to_string(),
                    size.div_ceil(50).to_string(),
                    secs(p.started),
                    secs(p.seen),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("failed: {e:#}").chars().take(100).collect(),
                ]);
                section.notes.push(format!("the {size}-agent run failed: {e:#}"));
            }
        }
        eprintln!("kecho-bench: resources: {size}-agent run done");
    }
    let mut t = Table::new(
        "placement: latency, rate, quality (agreement: chosen agent had the most free cores when asked)",
        &[
            "system",
            "requests",
            "placed",
            "refused",
            "p50",
            "p99",
            "placements/s",
            "top-1 agree <50% util",
            "top-1 agree all",
            "overcommit",
            "CPU per placement",
        ],
    );
    for o in &outcomes {
        t.row(vec![
            o.system.clone(),
            o.requests.to_string(),
            o.placed.to_string(),
            o.refused.to_string(),
            format!("{:.2} ms", o.p50_ms),
            format!("{:.2} ms", o.p99_ms),
            fmt_num(o.placements_per_s),
            format!("{:.1} %", o.agree_low * 100.0),
            format!("{:.1} %", o.agree_all * 100.0),
            o.overcommit.to_string(),
            o.cpu_us_per_placement.map_or_else(|| "-".to_owned(), |c| format!("{c:.0} us")),
        ]);
    }
    section.tables.push(t);
    let mut v = Table::new(
        "cluster view update traffic (reports received by one view)",
        &["agents", "reports/s per agent", "bytes/s per agent", "report size"],
    );
    for d in std::iter::once(&small).chain(bigs.iter()) {
        v.row(vec![
            d.agents.to_string(),
            format!("{:.2}", d.reports_per_agent_s),
            format!("{:.0}", d.bytes_per_agent_s),
            format!("{:.0} B", d.report_bytes),
        ]);
    }
    section.tables.push(v);
    if !scale.rows.is_empty() {
        section.tables.push(scale);
    }
    let o = &small.outcome;
    section.checks.push(Check::at_most("32 agents: placement p50", o.p50_ms, 2.0, "ms"));
    section.checks.push(Check::at_most("32 agents: placement p99", o.p99_ms, 10.0, "ms"));
    section.checks.push(Check::at_least(
        "32 agents: placements/s (rate run)",
        rate.outcome.placements_per_s,
        5000.0,
        "/s",
    ));
    section.checks.push(Check::at_least(
        "32 agents: top-1 agreement below 50 % utilisation",
        o.agree_low * 100.0,
        95.0,
        "%",
    ));
    let big_over: u64 = bigs.iter().map(|b| b.outcome.overcommit).sum();
    section.checks.push(Check::at_most(
        "overcommit (all runs)",
        (base_over + small.outcome.overcommit + rate.outcome.overcommit + big_over) as f64,
        0.0,
        "reservations",
    ));
    section.notes.push(format!(
        "every request reserved or refused with a reason, 32 agents: {} of {} (other errors: {})",
        small.outcome.placed + small.outcome.refused,
        small.outcome.requests,
        small.errors
    ));
    section.notes.push(format!("refusal reasons, 32 agents: {:?}", small.reasons));
    section.notes.push(format!(
        "rate run: {} of {} reserved or refused with a reason (other errors: {}); refusal reasons: {:?}",
        rate.outcome.placed + rate.outcome.refused,
        rate.outcome.requests,
        rate.errors,
        rate.reasons
    ));
    for b in &bigs {
        section.notes.push(format!("refusal reasons, {} agents: {:?}", b.agents, b.reasons));
        section.notes.push(format!(
            "every request reserved or refused with a reason, {} agents: {} of {} (other errors: {})",
            b.agents,
            b.outcome.placed + b.outcome.refused,
            b.outcome.requests,
            b.errors
        ));
    }
    section.notes.push(format!("requests: 1, 2, 4 or 8 cores; jobs exponential, mean 20 ms; rank cpus_free; {}; {conc} concurrent requesters on 4 requester nodes; sink attributes updated at most every {} ms; agents of 16 cores, one per node (32 agents) or 50 per node (larger runs)", tuning.describe(), attr_gap.as_millis()));
    section.put("outcomes", &outcomes);
    section.put("trace_32", &small.trace);
    if let Some(t) = &base_trace {
        section.put("trace_base", t);
    }
    Ok(section)
}

/// The protocol's settings a run uses.
#[derive(Debug, Clone)]
struct Tuning {
    /// Agents asked per request.
    fanout: usize,
    /// Least time between updates of an agent's sink attributes.
    attr_gap: Duration,
    /// Least time between two reports of an agent.
    report_gap: Duration,
    /// Answers carry what is free.
    tell_free: bool,
}

impl Tuning {
    fn describe(&self) -> String {
        format!(
            "fanout {}, reports >= {} ms apart, answers {}",
            self.fanout,
            self.report_gap.as_millis(),
            if self.tell_free { "say what is free" } else { "silent" }
        )
    }
}

/// How far a run got, for a run that does not finish.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Seconds until every agent had started.
    started: Option<f64>,
    /// Seconds until every requester saw every agent.
    seen: Option<f64>,
}

struct Distributed {
    /// The most frequent refusal reasons (first 60 characters) and their counts.
    reasons: Vec<(String, u64)>,
    agents: usize,
    outcome: Outcome,
    trace: Vec<Rec>,
    errors: u64,
    reports_per_agent_s: f64,
    bytes_per_agent_s: f64,
    report_bytes: f64,
}

#[allow(clippy::too_many_arguments)]
async fn distributed(
    agents: usize,
    agents_per_node: usize,
    concurrency: usize,
    n: usize,
    mean_job: f64,
    tuning: &Tuning,
    detach_jobs: bool,
    progress: Option<Arc<Mutex<Progress>>>,
) -> Result<Distributed> {
    // A channel of its own per run: the nodes of an earlier run, killed, may still be listed on the registry for a
    // while, and joining their channel would wait for them.
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let channel = format!("kecho.resources.bench.{}.{agents}.{run}", std::process::id());
    let setup = Instant::now();
    let mut nodes = Vec::new();
    let mut chans = Vec::new();
    // Every node joins before any agent starts, so that joins do not queue behind agents' traffic.
    // Every node waits long for the channel: with 1,000 agents the contact is busy with the others' joins.
    let patient = || {
        let m = kecho::MembershipConfig { open_timeout: Duration::from_secs(180), ..Default::default() };
        Node::builder().membership(m).start()
    };
    for _ in 0..agents.div_ceil(agents_per_node) {
        let node = patient().await?;
        chans.push(node.channel(&channel).await?);
        nodes.push(node);
    }
    let mut all: Vec<Arc<Agent>> = Vec::new();
    for i in 0..agents {
        let ch = &chans[i / agents_per_node];
        let mut cfg = AgentConfig::new(format!("a{i}"));
        cfg.measure = false;
        cfg.cpus = Some(CPUS);
        cfg.mem = Some(64_000_000_000);
        cfg.attr_gap = tuning.attr_gap;
        cfg.min_report_gap = tuning.report_gap;
        cfg.tell_free = tuning.tell_free;
        all.push(Arc::new(Agent::start_on(ch, cfg).await?));
    }
    eprintln!("kecho-bench: resources: {agents} agents started after {:.1} s", setup.elapsed().as_secs_f64());
    if let Some(p) = &progress {
        p.lock().started = Some(setup.elapsed().as_secs_f64());
    }
    // One node that counts the view's update traffic.
    let viewer = patient().await?;
    let vch = viewer.channel(&channel).await?;
    let mut reports = vch.sink(SinkOptions::new().types(["report"]).capacity(1 << 16))?;
    let counted = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let c2 = counted.clone();
    let counter = tokio::spawn(async move {
        while let Ok(ev) = reports.recv().await {
            let bytes: usize =
                ev.attrs().iter().map(|(k, v)| k.len() + value_len(v) + 2).sum::<usize>() + ev.ty().len();
            c2.0.fetch_add(1, Ordering::Relaxed);
            c2.1.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    });

    let req_nodes = 4;
    let mut requesters = Vec::new();
    for _ in 0..req_nodes {
        let node = patient().await?;
        let r = Requester::on(&node.channel(&channel).await?)?;
        r.wait_for_agents(agents, Duration::from_secs(60.max(agents as u64 / 5))).await?;
        requesters.push((node, r));
    }
    eprintln!(
        "kecho-bench: resources: every requester sees the {agents} agents after {:.1} s",
        setup.elapsed().as_secs_f64()
    );
    if let Some(p) = &progress {
        p.lock().seen = Some(setup.elapsed().as_secs_f64());
    }
    // Let the agents' sink attributes settle everywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let fanout = tuning.fanout;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let plan: Arc<Vec<(u64, f64)>> =
        Arc::new((0..n).map(|_| (SIZES[(rng.next() % 4) as usize], -mean_job * (1.0 - rng.unit()).ln())).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let trace: Arc<Mutex<Vec<Option<Rec>>>> = Arc::new(Mutex::new(vec![None; n]));
    let errors = Arc::new(AtomicU64::new(0));
    let all = Arc::new(all);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The auditor: checks every ledger for overcommit while the run goes on.
    let overcommit = Arc::new(AtomicU64::new(0));
    let audit = {
        let (all, stop, over) = (all.clone(), stop.clone(), overcommit.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for a in all.iter() {
                    over.fetch_add(a.with_ledger(|l| l.overcommitted().len()) as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let reasons: Arc<Mutex<std::collections::BTreeMap<String, u64>>> = Arc::default();
    let start = Instant::now();
    let cpu0 = process_cpu_s();
    let reports0 = (counted.0.load(Ordering::Relaxed), counted.1.load(Ordering::Relaxed));
    let mut tasks = Vec::new();
    let jobs: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    for k in 0..concurrency {
        let r = requesters[k % req_nodes].1.clone();
        let (plan, next, trace, errors, all) = (plan.clone(), next.clone(), trace.clone(), errors.clone(), all.clone());
        let (reasons, jobs) = (reasons.clone(), jobs.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= plan.len() {
                    return;
                }
                let (cpus, job) = plan[i];
                // The omniscient allocator's knowledge at this moment: every agent's true free cores.
                let mut free = Vec::with_capacity(all.len());
                let mut reserved = 0u64;
                for a in all.iter() {
                    let f = a.with_ledger(|l| l.free().amount("cpus"));
                    reserved += CPUS - f;
                    free.push(f);
                }
                let best = free.iter().copied().max().unwrap_or(0);
                let util = reserved as f64 / (CPUS * all.len() as u64) as f64;
                let spec = Spec::new(Amounts::new().with("cpus", cpus))
                    .rank("cpus_free")
                    .fanout(fanout)
                    .window(Duration::from_millis(250))
                    .lease(Duration::from_secs(60));
                let t0 = Instant::now();
                let at = t0.duration_since(start).as_secs_f64();
                match r.reserve(&spec).await {
                    Ok(got) => {
                        let latency = t0.elapsed().as_secs_f64();
                        let id = &got[0].id;
                        let idx: usize = id.agent[1..].parse().unwrap_or(usize::MAX);
                        let agrees = free.get(idx).is_some_and(|f| *f == best);
                        trace.lock()[i] = Some(Rec { at, cpus, job, latency: Some(latency), agrees, util });
                        let (r2, id, errors2) = (r.clone(), id.clone(), errors.clone());
                        let job_run = async move {
                            tokio::time::sleep(Duration::from_secs_f64(job)).await;
                            if r2.release(&id).await.is_err() {
                                errors2.fetch_add(1, Ordering::Relaxed);
                            }
                        };
                        if detach_jobs {
                            jobs.lock().push(tokio::spawn(job_run));
                        } else {
                            job_run.await;
                        }
                    }
                    Err(Error::Unsatisfied { reason }) => {
                        {
                            let mut rs = reasons.lock();
                            let key: String = reason.chars().take(60).collect();
                            *rs.entry(key).or_insert(0u64) += 1;
                        }
                        trace.lock()[i] = Some(Rec { at, cpus, job, latency: None, agrees: false, util });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "request failed");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu1 = process_cpu_s();
    let detached: Vec<_> = std::mem::take(&mut *jobs.lock());
    for j in detached {
        j.await?;
    }
    let reports1 = (counted.0.load(Ordering::Relaxed), counted.1.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    audit.await?;
    let mut final_over = 0;
    for a in all.iter() {
        final_over += a.with_ledger(|l| l.overcommitted().len()) as u64;
    }
    counter.abort();
    let trace: Vec<Rec> = trace.lock().iter().flatten().cloned().collect();
    let mut lat: Vec<f64> = trace.iter().filter_map(|r| r.latency).collect();
    let placed = lat.len();
    let low: Vec<&Rec> = trace.iter().filter(|r| r.latency.is_some() && r.util < 0.5).collect();
    let outcome = Outcome {
        system: format!("kecho agents, {agents} agents"),
        requests: n,
        placed,
        refused: trace.len() - placed,
        p50_ms: quantile(&mut lat, 0.5) * 1e3,
        p99_ms: quantile(&mut lat, 0.99) * 1e3,
        placements_per_s: placed as f64 / wall,
        agree_low: low.iter().filter(|r| r.agrees).count() as f64 / low.len().max(1) as f64,
        agree_all: trace.iter().filter(|r| r.agrees).count() as f64 / placed.max(1) as f64,
        overcommit: overcommit.load(Ordering::Relaxed) + final_over,
        cpu_us_per_placement: cpu0.zip(cpu1).map(|(a, b)| (b - a) * 1e6 / placed.max(1) as f64),
    };
    let nrep = (reports1.0 - reports0.0) as f64;
    let mut reasons: Vec<(String, u64)> = reasons.lock().iter().map(|(k, v)| (k.clone(), *v)).collect();
    reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
    reasons.truncate(4);
    let out = Distributed {
        reasons,
        agents,
        outcome,
        trace,
        errors: errors.load(Ordering::Relaxed),
        reports_per_agent_s: nrep / wall / agents as f64,
        bytes_per_agent_s: (reports1.1 - reports0.1) as f64 / wall / agents as f64,
        report_bytes: (reports1.1 - reports0.1) as f64 / nrep.max(1.0),
    };
    for (node, _) in &requesters {
        node.kill();
    }
    for n in &nodes {
        n.kill();
    }
    viewer.kill();
    Ok(out)
}

fn value_len(v: &kecho::Value) -> usize {
    match v {
        kecho::Value::Str(s) => s.len(),
        kecho::Value::Bytes(b) => b.len(),
        _ => 8,
    }
}

/// Picks the agent with most free cores that fits (lowest index on ties).
fn best_fit(free: &[u64], cpus: u64) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, f) in free.iter().enumerate() {
        if *f >= cpus && best.is_none_or(|b| *f > free[b]) {
            best = Some(i);
        }
    }
    best
}

/// The omniscient central allocator on the trace: each request placed at its arrival with perfect information.
fn omniscient(trace: &[Rec], agents: usize) -> Outcome {
    let mut free = vec![CPUS; agents];
    // (release time, agent, cpus)
    let mut ends: Vec<(f64, usize, u64)> = Vec::new();
    let mut order: Vec<&Rec> = trace.iter().collect();
    order.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut placed = 0;
    let t = Instant::now();
    for r in &order {
        ends.retain(|(end, a, c)| {
            if *end <= r.at {
                free[*a] += c;
                false
            } else {
                true
            }
        });
        if let Some(a) = best_fit(&free, r.cpus) {
            free[a] -= r.cpus;
            ends.push((r.at + r.job, a, r.cpus));
            placed += 1;
        }
    }
    let decide = t.elapsed().as_secs_f64() / order.len().max(1) as f64;
    let span = order.last().map_or(1.0, |r| r.at).max(1e-9);
    Outcome {
        system: format!("omniscient central allocator, {agents} agents (simulated)"),
        requests: order.len(),
        placed,
        refused: order.len() - placed,
        p50_ms: decide * 1e3,
        p99_ms: decide * 1e3,
        placements_per_s: placed as f64 / span,
        agree_low: 1.0,
        agree_all: 1.0,
        overcommit: 0,
        cpu_us_per_placement: None,
    }
}

/// An HTCondor-style matchmaker on the trace: reports at each cycle start, matching every `cycle` seconds.
fn matchmaker(trace: &[Rec], agents: usize, cycle: f64) -> Outcome {
    let mut truth = vec![CPUS; agents];
    let mut ends: Vec<(f64, usize, u64)> = Vec::new();
    let mut order: Vec<&Rec> = trace.iter().collect();
    order.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut queue: std::collections::VecDeque<&Rec> = Default::default();
    let mut lat = Vec::new();
    let (mut agree, mut agree_low, mut n_low) = (0usize, 0usize, 0usize);
    let mut i = 0;
    let mut now = 0.0;
    let mut last = 0.0f64;
    while i < order.len() || !queue.is_empty() {
        now += cycle;
        while i < order.len() && order[i].at <= now {
            queue.push_back(order[i]);
            i += 1;
        }
        ends.retain(|(end, a, c)| {
            if *end <= now {
                truth[*a] += c;
                false
            } else {
                true
            }
        });
        // The cycle's reports: the matchmaker's copy is the truth now; releases during the cycle reach it next time.
        let mut view = truth.clone();
        let mut waiting = std::collections::VecDeque::new();
        while let Some(r) = queue.pop_front() {
            let util = 1.0 - truth.iter().sum::<u64>() as f64 / (CPUS * agents as u64) as f64;
            match best_fit(&view, r.cpus) {
                Some(a) => {
                    // Its copy never shows more than the truth (releases only add), so the match always fits.
                    let agrees = truth[a] == truth.iter().copied().max().unwrap_or(0);
                    view[a] -= r.cpus;
                    truth[a] = truth[a].saturating_sub(r.cpus);
                    agree += usize::from(agrees);
                    if util < 0.5 {
                        n_low += 1;
                        agree_low += usize::from(agrees);
                    }
                    ends.push((now + r.job, a, r.cpus));
                    lat.push(now - r.at);
                    last = now;
                }
                None => waiting.push_back(r),
            }
        }
        queue = waiting;
        if i >= order.len() && !queue.is_empty() && ends.is_empty() {
            // Requests that can never fit (none in this trace): stop rather than loop.
            break;
        }
    }
    let placed = lat.len();
    let span = last.max(1e-9);
    Outcome {
        system: format!("cycle matchmaker (1 s cycles), {agents} agents (simulated)"),
        requests: order.len(),
        placed,
        refused: order.len() - placed,
        p50_ms: quantile(&mut lat.clone(), 0.5) * 1e3,
        p99_ms: quantile(&mut lat, 0.99) * 1e3,
        placements_per_s: placed as f64 / span,
        agree_low: agree_low as f64 / n_low.max(1) as f64,
        agree_all: agree as f64 / placed.max(1) as f64,
        overcommit: 0,
        cpu_us_per_placement: None,
    }
}
