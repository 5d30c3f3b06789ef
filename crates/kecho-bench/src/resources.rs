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
    // Experiments: KECHO_BENCH_RES="CONCURRENCY,FANOUT,BIG,ATTR_GAP_MS" (defaults 16,4,1,1000; BIG=0 skips the 1,000-agent run).
    let env = std::env::var("KECHO_BENCH_RES").unwrap_or_default();
    let p: Vec<usize> = env.split(',').filter_map(|x| x.parse().ok()).collect();
    let (conc, fanout, run_big) =
        (p.first().copied().unwrap_or(16), p.get(1).copied().unwrap_or(4), p.get(2) != Some(&0));
    let gap = p.get(3).map_or(AgentConfig::new("x").attr_gap, |ms| Duration::from_millis(*ms as u64));
    let small = rt.block_on(distributed(32, 1, conc, n, 0.02, fanout, gap, false)).context("32 agents")?;
    let mut outcomes = vec![small.outcome.clone()];
    outcomes.push(omniscient(&small.trace, 32));
    outcomes.push(matchmaker(&small.trace, 32, 1.0));
    eprintln!("kecho-bench: resources: 32 agents done: {} placed", small.outcome.placed);
    // The rate under contention: each requester task places its next request as soon as the last one is placed
    // (the job runs and is released on the side), so the rate is what the negotiation sustains, not the number of
    // requesters over the job length as above.
    let rate_conc = p.get(4).copied().unwrap_or(64);
    let rate = rt.block_on(distributed(32, 1, rate_conc, n, 0.02, fanout, gap, true)).context("32 agents, rate")?;
    let mut o = rate.outcome.clone();
    o.system = format!("kecho agents, 32 agents, {rate_conc} requesters back to back (rate run)");
    outcomes.push(o);
    eprintln!("kecho-bench: resources: rate run done: {} placed", rate.outcome.placed);
    let big_n = count(args, 20_000, 100) as usize;
    let big = match if run_big {
        // Bounded: a run that does not finish in 10 minutes is reported as such.
        rt.block_on(async {
            let limit = Duration::from_secs(600);
            tokio::time::timeout(limit, distributed(1000, 50, conc, big_n, 0.02, fanout, gap, false))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish within {} s", limit.as_secs())))
        })
    } else {
        Err(anyhow::anyhow!("skipped"))
    } {
        Ok(b) => {
            let mut o = b.outcome.clone();
            o.system = "kecho agents, 1,000 agents on 20 nodes".into();
            outcomes.push(o);
            outcomes.push(omniscient(&b.trace, 1000));
            outcomes.push(matchmaker(&b.trace, 1000, 1.0));
            Some(b)
        }
        Err(e) => {
            section.notes.push(format!("the 1,000-agent run failed: {e:#}"));
            None
        }
    };

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
        ]);
    }
    section.tables.push(t);
    let mut v = Table::new(
        "cluster view update traffic (reports received by one view)",
        &["agents", "reports/s per agent", "bytes/s per agent", "report size"],
    );
    for d in std::iter::once(&small).chain(big.as_ref()) {
        v.row(vec![
            d.agents.to_string(),
            format!("{:.2}", d.reports_per_agent_s),
            format!("{:.0}", d.bytes_per_agent_s),
            format!("{:.0} B", d.report_bytes),
        ]);
    }
    section.tables.push(v);
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
    let big_over = big.as_ref().map_or(0, |b| b.outcome.overcommit);
    section.checks.push(Check::at_most(
        "overcommit (all runs)",
        (small.outcome.overcommit + rate.outcome.overcommit + big_over) as f64,
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
    if let Some(b) = &big {
        section.notes.push(format!("refusal reasons, 1,000 agents: {:?}", b.reasons));
        section.notes.push(format!(
            "every request reserved or refused with a reason, 1,000 agents: {} of {} (other errors: {})",
            b.outcome.placed + b.outcome.refused,
            b.outcome.requests,
            b.errors
        ));
    }
    section.notes.push(format!("requests: 1, 2, 4 or 8 cores; jobs exponential, mean 20 ms; rank cpus_free; fanout {fanout}; {conc} concurrent requesters on 4 requester nodes; sink attributes updated at most every {} ms; agents of 16 cores, one per node (32 agents) or 50 per node (1,000 agents)", gap.as_millis()));
    section.put("outcomes", &outcomes);
    section.put("trace_32", &small.trace);
    Ok(section)
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
    fanout: usize,
    gap: Duration,
    detach_jobs: bool,
) -> Result<Distributed> {
    let channel = format!("kecho.resources.bench.{}", std::process::id() ^ agents as u32);
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
        cfg.attr_gap = gap;
        all.push(Arc::new(Agent::start_on(ch, cfg).await?));
    }
    eprintln!("kecho-bench: resources: {agents} agents started after {:.1} s", setup.elapsed().as_secs_f64());
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
    // Let the agents' sink attributes settle everywhere.
    tokio::time::sleep(Duration::from_millis(500)).await;

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
    }
}
