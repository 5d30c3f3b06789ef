//! Load monitoring: a load index per node, published on a monitoring channel.
//!
//! - [`LoadSample`] and [`LoadWeights`]: CPU utilisation, requests in queue, open connections and memory, combined
//!   into one load index with configurable weights.
//! - [`ProcProbe`] reads CPU and memory from `/proc`; the application supplies queue and connection counts through
//!   [`LoadGauges`]. Any [`LoadProbe`] can stand in (the web farm uses a simulated one).
//! - [`ReportPolicy`] decides when to publish (push model, after the load-distribution patterns paper): periodically
//!   and whenever the index moved by more than a threshold since the last report. Pure, time passed in.
//! - [`LoadTable`] keeps the reports of other nodes as soft state: each report carries a lifetime, and a node whose
//!   reports stop (a crash, a partition) ages out of the table. Pure, time passed in.
//! - [`LoadMonitor`] and [`LoadListener`] are the thin async layer: one publishes samples on the monitoring channel,
//!   the other feeds a shared table from it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kecho::{Attrs, Channel, SinkOptions};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::overhead::Overhead;

/// A server's identity in load reports, allocators and sink attributes (the `server` attribute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServerId(pub u32);

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}", self.0)
    }
}

/// One measurement of a node's load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadSample {
    /// CPU utilisation, 0 to 1 (all CPUs together).
    pub cpu: f64,
    /// Requests waiting or in service.
    pub queue: u32,
    /// Open client connections.
    pub connections: u32,
    /// Memory in use, 0 to 1.
    pub memory: f64,
}

/// How the parts of a [`LoadSample`] add up to the load index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadWeights {
    /// Per unit of CPU utilisation.
    pub cpu: f64,
    /// Per request in queue.
    pub queue: f64,
    /// Per open connection.
    pub connections: f64,
    /// Per unit of memory in use.
    pub memory: f64,
}

impl Default for LoadWeights {
    /// A request in queue counts as much as a fully busy CPU; connections and memory matter less.
    fn default() -> Self {
        LoadWeights { cpu: 1.0, queue: 1.0, connections: 0.05, memory: 0.25 }
    }
}

impl LoadWeights {
    /// The load index of a sample: the weighted sum of its parts.
    pub fn index(&self, s: &LoadSample) -> f64 {
        self.cpu * s.cpu
            + self.queue * f64::from(s.queue)
            + self.connections * f64::from(s.connections)
            + self.memory * s.memory
    }
}

/// Something that measures load.
pub trait LoadProbe: Send + 'static {
    /// Takes one sample.
    fn sample(&mut self) -> LoadSample;
}

/// Counts the application keeps current for the probe: requests in queue and open connections.
#[derive(Debug, Default)]
pub struct LoadGauges {
    /// Requests waiting or in service.
    pub queue: AtomicU32,
    /// Open connections.
    pub connections: AtomicU32,
}

/// CPU utilisation and memory from `/proc/stat` and `/proc/meminfo`, queue and connections from [`LoadGauges`].
/// Where `/proc` is missing, CPU and memory read as 0.
#[derive(Debug)]
pub struct ProcProbe {
    gauges: Arc<LoadGauges>,
    last_cpu: Option<CpuTimes>,
}

/// Jiffies from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Idle and I/O wait.
    pub idle: u64,
    /// Everything.
    pub total: u64,
}

impl ProcProbe {
    /// A probe reading the gauges the application updates.
    pub fn new(gauges: Arc<LoadGauges>) -> Self {
        ProcProbe { gauges, last_cpu: None }
    }
}

impl LoadProbe for ProcProbe {
    fn sample(&mut self) -> LoadSample {
        let now = std::fs::read_to_string("/proc/stat").ok().and_then(|s| parse_proc_stat(&s));
        let cpu = match (self.last_cpu, now) {
            (Some(a), Some(b)) => cpu_utilisation(a, b),
            _ => 0.0,
        };
        if now.is_some() {
            self.last_cpu = now;
        }
        let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo(&s)).unwrap_or(0.0);
        LoadSample {
            cpu,
            queue: self.gauges.queue.load(Ordering::Relaxed),
            connections: self.gauges.connections.load(Ordering::Relaxed),
            memory,
        }
    }
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest times are already in user and nice).
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    let total = v.iter().take(8).sum();
    Some(CpuTimes { idle, total })
}

/// The share of time not idle between two readings, 0 to 1.
pub fn cpu_utilisation(a: CpuTimes, b: CpuTimes) -> f64 {
    let total = b.total.saturating_sub(a.total);
    if total == 0 {
        return 0.0;
    }
    let idle = b.idle.saturating_sub(a.idle).min(total);
    (total - idle) as f64 / total as f64
}

/// Memory in use (1 - MemAvailable / MemTotal) from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<f64> {
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    let total = field("MemTotal:")?;
    let avail = field("MemAvailable:")?;
    (total > 0.0).then(|| (1.0 - avail / total).clamp(0.0, 1.0))
}

/// A load report as published on the monitoring channel (event type `load`, JSON payload; the attributes `server`
/// and `index` repeat the essentials for content filters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Who reports.
    pub server: ServerId,
    /// Per-server sequence number; older reports never replace newer ones.
    pub seq: u64,
    /// The load index.
    pub index: f64,
    /// The sample behind it.
    pub sample: LoadSample,
    /// How long the report stays valid, in milliseconds (soft state).
    pub lifetime_ms: u64,
    /// Requests that arrived at this server so far (for a cluster-wide budget of extra requests).
    pub arrivals: u64,
    /// Extra requests (hedged or tied copies) this server sent so far.
    pub extra: u64,
    /// Histogram of recent waits (see [`crate::hedge::AdaptiveThreshold`]); empty if not kept.
    #[serde(default)]
    pub waits: Vec<u32>,
}

/// When to publish a report: every `period`, and at once when the index moved by `threshold` or more since the
/// last report, but not more often than every `min_gap`.
#[derive(Debug, Clone)]
pub struct ReportPolicy {
    period: Duration,
    threshold: f64,
    min_gap: Duration,
    last: Option<(Instant, f64)>,
}

impl ReportPolicy {
    /// Periodic reports every `period`, and on a change of `threshold` (infinity: periodic only).
    pub fn new(period: Duration, threshold: f64) -> Self {
        ReportPolicy { period, threshold, min_gap: period / 20, last: None }
    }
    /// The shortest gap between two reports (default: a twentieth of the period).
    pub fn min_gap(mut self, gap: Duration) -> Self {
        self.min_gap = gap;
        self
    }
    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }
    /// Given a fresh sample of the index, whether to publish it now. A `true` answer counts as published.
    pub fn on_sample(&mut self, now: Instant, index: f64) -> bool {
        let send = match self.last {
            None => true,
            Some((t, v)) => {
                let since = now.saturating_duration_since(t);
                since >= self.period || (since >= self.min_gap && (index - v).abs() >= self.threshold)
            }
        };
        if send {
            self.last = Some((now, index));
        }
        send
    }
}

/// Other servers' load reports as soft state: a report is valid for its lifetime after it arrived.
#[derive(Debug, Default)]
pub struct LoadTable {
    entries: HashMap<ServerId, (LoadReport, Instant)>,
}

impl LoadTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }
    /// Takes a report received at `now`; returns false if it is older than the one held.
    pub fn update(&mut self, report: LoadReport, now: Instant) -> bool {
        match self.entries.get(&report.server) {
            Some((old, _)) if old.seq >= report.seq => false,
            _ => {
                self.entries.insert(report.server, (report, now));
                true
            }
        }
    }
    /// The report of `server` if it is still valid at `now`.
    pub fn get(&self, server: ServerId, now: Instant) -> Option<&LoadReport> {
        self.entries.get(&server).filter(|(r, at)| alive(r, *at, now)).map(|(r, _)| r)
    }
    /// The load index of `server` if its report is still valid.
    pub fn index(&self, server: ServerId, now: Instant) -> Option<f64> {
        self.get(server, now).map(|r| r.index)
    }
    /// Every valid report.
    pub fn fresh(&self, now: Instant) -> impl Iterator<Item = &LoadReport> + '_ {
        self.entries.values().filter(move |(r, at)| alive(r, *at, now)).map(|(r, _)| r)
    }
    /// Removes and returns the servers whose reports aged out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<ServerId> {
        let gone: Vec<ServerId> =
            self.entries.iter().filter(|(_, (r, at))| !alive(r, *at, now)).map(|(id, _)| *id).collect();
        for id in &gone {
            self.entries.remove(id);
        }
        gone
    }
}

fn alive(r: &LoadReport, at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < Duration::from_millis(r.lifetime_ms)
}

/// A shared load table, fed by a [`LoadListener`] (push) or by whoever polls the servers (pull).
pub type SharedTable = Arc<Mutex<LoadTable>>;

/// Counters a monitor adds to its reports for the cluster-wide budget of extra requests.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests that arrived here.
    pub arrivals: AtomicU64,
    /// Extra copies sent from here.
    pub extra: AtomicU64,
    /// The latest histogram of waits here, copied into each report.
    pub waits: Mutex<Vec<u32>>,
}

/// Samples a probe every `sample_every` and publishes on the monitoring channel what the [`ReportPolicy`] lets
/// through. The time spent sampling and submitting is added to [`Overhead::monitor_ns`].
#[derive(Debug)]
pub struct LoadMonitor {
    /// The publishing task.
    pub task: tokio::task::JoinHandle<()>,
}

/// Settings of a [`LoadMonitor`].
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Who reports.
    pub server: ServerId,
    /// Index weights.
    pub weights: LoadWeights,
    /// When to publish.
    pub policy: ReportPolicy,
    /// How often to sample.
    pub sample_every: Duration,
    /// The lifetime given to each report (typically three periods).
    pub lifetime: Duration,
}

impl LoadMonitor {
    /// Starts publishing on `channel` (event type `load`).
    pub fn spawn(
        channel: &Channel,
        mut probe: Box<dyn LoadProbe>,
        mut cfg: MonitorConfig,
        counters: Arc<RequestCounters>,
        overhead: Arc<Overhead>,
    ) -> Result<Self> {
        let mut src = channel.source()?;
        let task = tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(cfg.sample_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let t0 = Instant::now();
                let sample = probe.sample();
                let index = cfg.weights.index(&sample);
                if !cfg.policy.on_sample(tokio::time::Instant::now().into_std(), index) {
                    overhead.add_monitor(t0.elapsed());
                    continue;
                }
                seq += 1;
                let report = LoadReport {
                    server: cfg.server,
                    seq,
                    index,
                    sample,
                    lifetime_ms: cfg.lifetime.as_millis() as u64,
                    arrivals: counters.arrivals.load(Ordering::Relaxed),
                    extra: counters.extra.load(Ordering::Relaxed),
                    waits: counters.waits.lock().clone(),
                };
                let Ok(body) = serde_json::to_vec(&report) else { continue };
                let attrs = Attrs::new().with("server", cfg.server.0).with("index", index);
                let sent = src.submit("load", &attrs, &body).await;
                overhead.add_monitor(t0.elapsed());
                overhead.reports.fetch_add(1, Ordering::Relaxed);
                if sent.is_err() {
                    break;
                }
            }
        });
        Ok(LoadMonitor { task })
    }
}

/// Feeds a [`LoadTable`] from the monitoring channel; time spent handling reports goes to
/// [`Overhead::handling_ns`]. Reports of `skip` (usually the node itself) are still stored: a node may balance
/// towards itself.
#[derive(Debug)]
pub struct LoadListener {
    /// The receiving task.
    pub task: tokio::task::JoinHandle<()>,
}

impl LoadListener {
    /// Subscribes to `load` events on `channel` and keeps `table` current.
    pub fn spawn(channel: &Channel, table: SharedTable, overhead: Arc<Overhead>) -> Result<Self> {
        let mut sink = channel.sink(SinkOptions::new().types(["load"]).capacity(4096))?;
        let task = tokio::spawn(async move {
            loop {
                match sink.recv().await {
                    Ok(ev) => {
                        let t0 = Instant::now();
                        if let Ok(report) = serde_json::from_slice::<LoadReport>(ev.payload()) {
                            table.lock().update(report, tokio::time::Instant::now().into_std());
                        }
                        overhead.add_handling(t0.elapsed());
                    }
                    Err(kecho::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                }
            }
        });
        Ok(LoadListener { task })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(server: u32, seq: u64, index: f64, lifetime_ms: u64) -> LoadReport {
        LoadReport {
            server: ServerId(server),
            seq,
            index,
            sample: LoadSample::default(),
            lifetime_ms,
            arrivals: 0,
            extra: 0,
            waits: Vec::new(),
        }
    }

    #[test]
    fn proc_stat_and_meminfo_parse() {
        let a = parse_proc_stat("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_proc_stat("cpu  150 0 150 900 0 0 0 0 0 0\n").unwrap();
        assert_eq!(a, CpuTimes { idle: 800, total: 1000 });
        assert!((cpu_utilisation(a, b) - 0.5).abs() < 1e-9);
        assert_eq!(parse_proc_stat("intr 1 2 3"), None);
        let m = parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\nMemAvailable: 250 kB\n").unwrap();
        assert!((m - 0.75).abs() < 1e-9);
        assert_eq!(parse_meminfo("MemTotal: 0 kB\nMemAvailable: 0 kB\n"), None);
    }

    #[test]
    fn weights_combine_the_parts() {
        let w = LoadWeights { cpu: 2.0, queue: 1.0, connections: 0.5, memory: 4.0 };
        let s = LoadSample { cpu: 0.5, queue: 3, connections: 2, memory: 0.25 };
        assert!((w.index(&s) - (1.0 + 3.0 + 1.0 + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn reports_are_periodic_and_on_change() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = ReportPolicy::new(ms(1000), 2.0).min_gap(ms(10));
        assert!(p.on_sample(t0, 1.0), "the first sample is always sent");
        assert!(!p.on_sample(t0 + ms(100), 2.5), "a change below the threshold waits for the period");
        assert!(p.on_sample(t0 + ms(200), 3.0), "a change of the threshold is sent at once");
        assert!(!p.on_sample(t0 + ms(205), 9.0), "but not within the minimum gap");
        assert!(!p.on_sample(t0 + ms(1100), 3.0));
        assert!(p.on_sample(t0 + ms(1200), 3.0), "one period after the last report");
    }

    #[test]
    fn silent_servers_age_out() {
        let t0 = Instant::now();
        let mut t = LoadTable::new();
        assert!(t.update(report(1, 2, 0.5, 1000), t0));
        assert!(!t.update(report(1, 1, 9.0, 1000), t0), "an older report never replaces a newer one");
        assert!(t.update(report(2, 1, 0.1, 3000), t0));
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(t.index(ServerId(1), later), None);
        assert_eq!(t.index(ServerId(2), later), Some(0.1));
        assert_eq!(t.fresh(later).count(), 1);
        assert_eq!(t.expire(later), vec![ServerId(1)]);
        assert_eq!(t.fresh(later).count(), 1);
    }
}
