//! `kecho webfarm`: the paper's section 5.4, reproduced and extended.
//!
//! Eight simulated web servers on real kecho nodes (one process, loopback) get open-loop Poisson arrivals from a
//! seeded generator, skewed so that one server stays under 10 % utilisation; each request needs about 38 ms of
//! processing and times out after 5 s. The same arrival trace runs under every mode (no balancing, KECho
//! forwarding to the n least loaded, cancel events, round-robin, power-of-two-choices and shortest-queue front
//! ends, adaptive hedging, tied requests), and an ideal central queue computed on that trace is the reference. A
//! time scale runs the sweep faster: every time (arrivals, processing, thresholds, time-outs, report periods) is
//! divided by it during the run, and the results are converted back.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use kecho_lb::mechanism::now;
use kecho_lb::overhead::OverheadSnapshot;

use crate::error::{Result, WebfarmError};
use crate::farm::{until, Farm, FarmConfig, Mode};

/// Options of `kecho webfarm`.
#[derive(Debug, Clone, clap::Args)]
pub struct WebfarmArgs {
    /// Number of servers.
    #[arg(long, default_value_t = 8)]
    pub servers: usize,
    /// Requests a server processes at once.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Mean arrival rates per loaded server to sweep, requests/s.
    #[arg(long, value_delimiter = ',', default_value = "20,25,30,35,40,45,50")]
    pub rates: Vec<f64>,
    /// Arrival rate of the one lightly loaded server, requests/s (under 10 % utilisation).
    #[arg(long, default_value_t = 2.0)]
    pub idle_rate: f64,
    /// Spread of the loaded servers' rates: from (1 - skew) to (1 + skew) times the mean.
    #[arg(long, default_value_t = 0.3)]
    pub skew: f64,
    /// Mean processing time per request, ms.
    #[arg(long, default_value_t = 38.0)]
    pub service_ms: f64,
    /// Processing times vary uniformly by this share around the mean.
    #[arg(long, default_value_t = 0.1)]
    pub jitter: f64,
    /// Request time-out, s.
    #[arg(long, default_value_t = 5.0)]
    pub timeout: f64,
    /// KECho's forwarding threshold, s.
    #[arg(long, default_value_t = 2.5)]
    pub forward_after: f64,
    /// Seconds of arrivals per run.
    #[arg(long, default_value_t = 60.0)]
    pub duration: f64,
    /// Runs this many times faster than real time (all times scaled together).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Modes to run: none, kecho:N (or kecho for 1..5), cancel:N, rr, p2c, jsq, hedge, tied; or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    pub modes: Vec<String>,
    /// Load reports per second.
    #[arg(long, default_value_t = 1.0)]
    pub report_hz: f64,
    /// Extra requests allowed for hedging and tying, as a share of all requests.
    #[arg(long, default_value_t = 0.1)]
    pub budget: f64,
    /// Report frequencies for the overhead sweep (Fig. 9a), comma-separated; empty to skip.
    #[arg(long, default_value = "1,2,5,10")]
    pub overhead_hz: Frequencies,
    /// Arrival rate of the overhead sweep (Figs. 9a and 9b).
    #[arg(long, default_value_t = 25.0)]
    pub overhead_rate: f64,
    /// Seed of the arrival generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Servers rank each other by the reported load only (as in the paper), not by the report plus what they sent
    /// each server since.
    #[arg(long)]
    pub reported_loads_only: bool,
    /// Directory for the SVG plots and the CSV of results; none if not given.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A comma-separated list of frequencies in Hz, possibly empty (`""`). A list argument of clap's own would read `""`
/// as one empty number and refuse it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Frequencies(pub Vec<f64>);

impl std::str::FromStr for Frequencies {
    type Err = std::num::ParseFloatError;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Frequencies(Vec::new()));
        }
        s.split(',').map(|f| f.trim().parse()).collect::<std::result::Result<_, _>>().map(Frequencies)
    }
}

impl Default for WebfarmArgs {
    fn default() -> Self {
        WebfarmArgs {
            servers: 8,
            workers: 1,
            rates: vec![20.0, 25.0, 30.0, 35.0, 40.0, 45.0, 50.0],
            idle_rate: 2.0,
            skew: 0.3,
            service_ms: 38.0,
            jitter: 0.1,
            timeout: 5.0,
            forward_after: 2.5,
            duration: 60.0,
            time_scale: 1.0,
            modes: vec!["all".into()],
            report_hz: 1.0,
            budget: 0.1,
            overhead_hz: Frequencies(vec![1.0, 2.0, 5.0, 10.0]),
            overhead_rate: 25.0,
            seed: 1,
            reported_loads_only: false,
            out: None,
        }
    }
}

impl WebfarmArgs {
    fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(WebfarmError::Invalid(what.to_owned()));
        if self.servers < 2 {
            return bad("--servers must be at least 2");
        }
        if self.workers == 0 {
            return bad("--workers must be at least 1");
        }
        if self.rates.is_empty() || self.rates.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
            return bad("--rates must be positive numbers");
        }
        if !(0.0..1.0).contains(&self.skew) || !(0.0..1.0).contains(&self.jitter) {
            return bad("--skew and --jitter must be in [0, 1)");
        }
        let positive = [
            self.service_ms,
            self.timeout,
            self.forward_after,
            self.duration,
            self.time_scale,
            self.report_hz,
            self.overhead_rate,
        ];
        if positive.iter().any(|v| !(v.is_finite() && *v > 0.0))
            || !(self.idle_rate.is_finite() && self.idle_rate >= 0.0)
        {
            return bad("times, rates and the time scale must be positive");
        }
        if self.forward_after >= self.timeout {
            return bad("--forward-after must be shorter than --timeout");
        }
        if self.overhead_hz.0.iter().any(|h| !(h.is_finite() && *h > 0.0)) {
            return bad("--overhead-hz must be positive");
        }
        if !(0.0..=1.0).contains(&self.budget) {
            return bad("--budget must be in [0, 1]");
        }
        Ok(())
    }

    /// Per-server arrival rates at mean rate `r`: server 0 is the light one, the others spread linearly.
    pub fn server_rates(&self, r: f64) -> Vec<f64> {
        let loaded = self.servers - 1;
        let mut v = vec![self.idle_rate];
        for i in 0..loaded {
            let f = if loaded == 1 { 0.0 } else { i as f64 / (loaded - 1) as f64 * 2.0 - 1.0 };
            v.push(r * (1.0 + self.skew * f));
        }
        v
    }

    /// Requests per second the whole cluster can process.
    pub fn capacity(&self) -> f64 {
        (self.servers * self.workers) as f64 * 1000.0 / self.service_ms
    }
}

/// One arrival of the trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Seconds from the start.
    pub t: f64,
    /// The server the client sent it to.
    pub server: usize,
    /// Processing it needs, s.
    pub work: f64,
}

/// Open-loop Poisson arrivals at each server's rate for `duration` seconds, merged in time order; processing
/// times uniform in `service * (1 +- jitter)`. Deterministic per seed.
pub fn poisson_trace(seed: u64, rates: &[f64], duration: f64, service: f64, jitter: f64) -> Vec<Arrival> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut all = Vec::new();
    for (server, &rate) in rates.iter().enumerate() {
        if rate <= 0.0 {
            continue;
        }
        let mut t = 0.0;
        loop {
            let u: f64 = rng.gen_range(f64::EPSILON..1.0);
            t += -u.ln() / rate;
            if t >= duration {
                break;
            }
            let work = service * (1.0 + jitter * rng.gen_range(-1.0..=1.0));
            all.push(Arrival { t, server, work });
        }
    }
    all.sort_by(|a, b| a.t.total_cmp(&b.t));
    all
}

/// The ideal central queue: one FIFO queue in front of all `workers` of the cluster, on the same trace. A request
/// that would start after waiting `timeout` or more is dropped without using capacity, as the servers do.
/// Returns each request's response time, `None` for a time-out.
pub fn ideal_queue(trace: &[Arrival], workers: usize, timeout: f64) -> Vec<Option<f64>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct F(f64);
    impl Eq for F {}
    impl PartialOrd for F {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for F {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0)
        }
    }
    let mut free: BinaryHeap<Reverse<F>> = (0..workers.max(1)).map(|_| Reverse(F(0.0))).collect();
    let mut out = Vec::with_capacity(trace.len());
    for a in trace {
        let Some(Reverse(F(f))) = free.pop() else { break };
        let start = f.max(a.t);
        if start - a.t >= timeout {
            free.push(Reverse(F(f)));
            out.push(None);
            continue;
        }
        free.push(Reverse(F(start + a.work)));
        let r = start - a.t + a.work;
        out.push((r <= timeout).then_some(r));
    }
    out
}

/// The results of one mode at one rate, in unscaled (paper) time.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// The mode's label.
    pub mode: String,
    /// Mean arrival rate per loaded server.
    pub rate: f64,
    /// Requests in the trace.
    pub requests: usize,
    /// Response-time percentiles in ms; a time-out counts as the time-out.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Mean response time of requests served where they arrived, ms.
    pub mean_local: f64,
    /// Mean response time of requests served elsewhere, ms.
    pub mean_remote: f64,
    /// Requests not answered within the time-out.
    pub timeouts: usize,
    /// Requests forwarded (moved), as a share of all requests.
    pub forwarded: f64,
    /// Extra copies sent, as a share of all requests.
    pub extra: f64,
    /// Requests processed more than once to the end, as a share of all requests.
    pub duplicated: f64,
    /// Overhead per server and second, µs: monitoring, event handling, OUT-filter, IN-filter, forwarding.
    pub overhead_us: [f64; 5],
    /// Load reports per server and second.
    pub reports_per_s: f64,
}

/// Response-time statistics from per-request outcomes (`None`: time-out), in ms.
pub fn percentiles(lat: &[Option<f64>], timeout: f64) -> (f64, f64, f64, usize) {
    let mut v: Vec<f64> = lat.iter().map(|l| l.unwrap_or(timeout) * 1000.0).collect();
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    (q(0.5), q(0.95), q(0.99), lat.iter().filter(|l| l.is_none()).count())
}

static FARMS: AtomicU64 = AtomicU64::new(0);

fn parse_modes(specs: &[String]) -> Result<Vec<(String, Mode)>> {
    let mut out = Vec::new();
    for spec in specs {
        let spec = spec.trim();
        let n = |s: &str| -> Result<usize> {
            match s.parse::<usize>() {
                Ok(n) if (1..=16).contains(&n) => Ok(n),
                _ => Err(WebfarmError::Invalid(format!("mode {spec:?}: N must be 1 to 16"))),
            }
        };
        match spec.split_once(':') {
            _ if spec == "all" => {
                out.push(("none".into(), Mode::None));
                for n in 1..=5 {
                    out.push((format!("kecho:{n}"), Mode::Kecho { n }));
                }
                out.push(("cancel:3".into(), Mode::Cancel { n: 3 }));
                out.push(("rr".into(), Mode::FrontRoundRobin));
                out.push(("p2c".into(), Mode::FrontP2c));
                out.push(("jsq".into(), Mode::FrontJsq));
                out.push(("hedge".into(), Mode::Hedge));
                out.push(("tied".into(), Mode::Tied));
            }
            _ if spec == "kecho" => {
                for n in 1..=5 {
                    out.push((format!("kecho:{n}"), Mode::Kecho { n }));
                }
            }
            Some(("kecho", k)) => out.push((format!("kecho:{}", n(k)?), Mode::Kecho { n: n(k)? })),
            Some(("cancel", k)) => out.push((format!("cancel:{}", n(k)?), Mode::Cancel { n: n(k)? })),
            None if spec == "cancel" => out.push(("cancel:3".into(), Mode::Cancel { n: 3 })),
            None if spec == "none" => out.push(("none".into(), Mode::None)),
            None if spec == "rr" => out.push(("rr".into(), Mode::FrontRoundRobin)),
            None if spec == "p2c" => out.push(("p2c".into(), Mode::FrontP2c)),
            None if spec == "jsq" => out.push(("jsq".into(), Mode::FrontJsq)),
            None if spec == "hedge" => out.push(("hedge".into(), Mode::Hedge)),
            None if spec == "tied" => out.push(("tied".into(), Mode::Tied)),
            _ => {
                return Err(WebfarmError::Invalid(format!(
                    "unknown mode {spec:?} (expected none, kecho[:N], cancel[:N], rr, p2c, jsq, hedge, tied or all)"
                )))
            }
        }
    }
    if out.is_empty() {
        return Err(WebfarmError::Invalid("no mode given".into()));
    }
    Ok(out)
}

/// Runs one mode on one trace; times in the trace are unscaled.
pub async fn run_one(
    args: &WebfarmArgs,
    label: &str,
    mode: Mode,
    rate: f64,
    trace: &[Arrival],
    report_hz: f64,
) -> Result<RunResult> {
    let s = args.time_scale;
    let wall = |secs: f64| Duration::from_secs_f64(secs / s);
    let mut cfg = FarmConfig::new(args.servers, mode, &format!("webfarm{}", FARMS.fetch_add(1, Ordering::Relaxed)));
    cfg.workers = args.workers;
    cfg.timeout = wall(args.timeout);
    cfg.forward_after = wall(args.forward_after);
    cfg.report_period = wall(1.0 / report_hz);
    cfg.lifetime = cfg.report_period * 3;
    cfg.hedge_floor = wall(2.0 * args.service_ms / 1000.0);
    cfg.hedge_window = wall(10.0);
    cfg.budget_ratio = args.budget;
    cfg.seed = args.seed;
    cfg.fresh_loads = !args.reported_loads_only;
    let farm = Farm::start(cfg).await?;
    let before = farm.overhead();
    let t0 = tokio::time::Instant::now();
    for (i, a) in trace.iter().enumerate() {
        let at = t0 + Duration::from_secs_f64(a.t / s);
        if at > tokio::time::Instant::now() {
            tokio::time::sleep_until(at).await;
        }
        farm.arrive(a.server, i as u64, Duration::from_secs_f64(a.work / s)).await?;
    }
    let total = trace.len();
    until(wall(args.timeout) + Duration::from_millis(200), || farm.recorder().answered() >= total).await;
    let elapsed = t0.elapsed().as_secs_f64() * s;
    let outcomes = farm.recorder().outcomes();
    let mut lat = Vec::with_capacity(total);
    let (mut local, mut remote) = (Vec::new(), Vec::new());
    for i in 0..total as u64 {
        let Some(o) = outcomes.get(&i) else {
            lat.push(None);
            continue;
        };
        let r = o.done.map(|(t, by)| (t.saturating_duration_since(o.arrived).as_secs_f64() * s, by));
        match r {
            Some((secs, by)) if secs <= args.timeout => {
                lat.push(Some(secs));
                if by == o.origin {
                    local.push(secs);
                } else {
                    remote.push(secs);
                }
            }
            _ => lat.push(None),
        }
    }
    let (p50, p95, p99, timeouts) = percentiles(&lat, args.timeout);
    let sum =
        |f: &dyn Fn(&crate::farm::ServerStats) -> u64| -> u64 { farm.servers().iter().map(|sv| f(&sv.stats)).sum() };
    let forwarded = sum(&|st| st.forwarded.load(Ordering::Relaxed));
    let extra = sum(&|st| st.extra.load(Ordering::Relaxed));
    let completed = sum(&|st| st.completed.load(Ordering::Relaxed));
    let answered = lat.iter().filter(|l| l.is_some()).count() as u64;
    let after = farm.overhead();
    let ov = diff(after, before);
    let per = |ns: u64| ns as f64 / 1000.0 / (args.servers as f64 * elapsed);
    let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 * 1000.0 };
    let n = total.max(1) as f64;
    let result = RunResult {
        mode: label.to_owned(),
        rate,
        requests: total,
        p50,
        p95,
        p99,
        mean_local: mean(&local),
        mean_remote: mean(&remote),
        timeouts,
        forwarded: forwarded as f64 / n,
        extra: extra as f64 / n,
        duplicated: completed.saturating_sub(answered.max(completed.min(total as u64))) as f64 / n,
        overhead_us: [
            per(ov.monitor_ns),
            per(ov.handling_ns),
            per(ov.out_filter_ns),
            per(ov.in_filter_ns),
            per(ov.forward_ns),
        ],
        reports_per_s: ov.reports as f64 / (args.servers as f64 * elapsed),
    };
    farm.shutdown().await;
    Ok(result)
}

fn diff(a: OverheadSnapshot, b: OverheadSnapshot) -> OverheadSnapshot {
    OverheadSnapshot {
        monitor_ns: a.monitor_ns - b.monitor_ns,
        handling_ns: a.handling_ns - b.handling_ns,
        out_filter_ns: a.out_filter_ns - b.out_filter_ns,
        in_filter_ns: a.in_filter_ns - b.in_filter_ns,
        forward_ns: a.forward_ns - b.forward_ns,
        reports: a.reports - b.reports,
    }
}

/// Everything one sweep produced.
#[derive(Debug, Default)]
pub struct Sweep {
    /// One per mode and rate, the ideal queue included (mode `ideal`).
    pub results: Vec<RunResult>,
    /// KECho n = 1 at the overhead rate, per report frequency (Fig. 9a).
    pub by_frequency: Vec<(f64, RunResult)>,
}

/// Runs the whole sweep and returns the results (printing progress to stderr).
pub async fn sweep(args: &WebfarmArgs) -> Result<Sweep> {
    args.check()?;
    let modes = parse_modes(&args.modes)?;
    let mut out = Sweep::default();
    let service = args.service_ms / 1000.0;
    for (ri, &rate) in args.rates.iter().enumerate() {
        let trace = poisson_trace(args.seed + ri as u64, &args.server_rates(rate), args.duration, service, args.jitter);
        let ideal = ideal_queue(&trace, args.servers * args.workers, args.timeout);
        let (p50, p95, p99, timeouts) = percentiles(&ideal, args.timeout);
        out.results.push(RunResult {
            mode: "ideal".into(),
            rate,
            requests: trace.len(),
            p50,
            p95,
            p99,
            timeouts,
            ..RunResult::default()
        });
        for (label, mode) in &modes {
            let r = run_one(args, label, *mode, rate, &trace, args.report_hz).await?;
            eprintln!(
                "  rate {rate:>5.1}  {label:<9} p50 {:>7.1}  p99 {:>7.1} ms  time-outs {:>5}  extra {:>5.1} %",
                r.p50,
                r.p99,
                r.timeouts,
                r.extra * 100.0
            );
            out.results.push(r);
        }
    }
    if modes.iter().any(|(_, m)| *m == Mode::Kecho { n: 1 }) {
        let rates = args.server_rates(args.overhead_rate);
        let trace = poisson_trace(args.seed + 1000, &rates, args.duration, service, args.jitter);
        for &hz in &args.overhead_hz.0 {
            let r = run_one(args, "kecho:1", Mode::Kecho { n: 1 }, args.overhead_rate, &trace, hz).await?;
            eprintln!("  overhead at {hz} reports/s: {:?} µs/s", r.overhead_us.map(|v| (v * 10.0).round() / 10.0));
            out.by_frequency.push((hz, r));
        }
    }
    Ok(out)
}

/// The results as a Markdown table, the targets as verdicts.
pub fn report(args: &WebfarmArgs, sweep: &Sweep) -> String {
    let mut s = String::new();
    let cap = args.capacity();
    let _ = writeln!(
        s,
        "{} servers x {} worker(s), {:.0} ms per request (+-{:.0} %), time-out {} s, forwarding after {} s, {} s of \
         arrivals per run, seed {}.\nCapacity {:.1} requests/s. Server 0 gets {} requests/s, the others the rate \
         times {:.2} to {:.2}.",
        args.servers,
        args.workers,
        args.service_ms,
        args.jitter * 100.0,
        args.timeout,
        args.forward_after,
        args.duration,
        args.seed,
        cap,
        args.idle_rate,
        1.0 - args.skew,
        1.0 + args.skew
    );
    if args.time_scale != 1.0 {
        let _ = writeln!(
            s,
            "Time scale {}: every time was divided by {} during the run (a 38 ms request took {:.2} ms); all times \
             below are converted back to unscaled time.",
            args.time_scale,
            args.time_scale,
            args.service_ms / args.time_scale
        );
    }
    let _ = writeln!(
        s,
        "\n| rate/server | offered | mode | p50 ms | p95 ms | p99 ms | time-outs | forwarded | extra | duplicated |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in &sweep.results {
        let offered: f64 = args.server_rates(r.rate).iter().sum();
        let ms = |v: f64| if v >= args.timeout * 1000.0 { format!("≥{:.0}", v) } else { format!("{v:.0}") };
        let _ = writeln!(
            s,
            "| {:.0} | {:.0} ({:.0} %) | {} | {} | {} | {} | {} / {} | {:.1} % | {:.1} % | {:.1} % |",
            r.rate,
            offered,
            offered / cap * 100.0,
            r.mode,
            ms(r.p50),
            ms(r.p95),
            ms(r.p99),
            r.timeouts,
            r.requests,
            r.forwarded * 100.0,
            r.extra * 100.0,
            r.duplicated * 100.0
        );
    }
    let _ = writeln!(
        s,
        "\nOverhead per server, µs per second (Figs. 8b and 9): monitoring and submission, handling load events, \
         OUT-filter, IN-filter, submitting forwarded requests, responses and cancels."
    );
    let _ = writeln!(s, "\n| run | reports/s | monitoring | handling | OUT-filter | IN-filter | forwarding |");
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let row = |s: &mut String, name: String, r: &RunResult| {
        let o = r.overhead_us;
        let _ = writeln!(
            s,
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.reports_per_s, o[0], o[1], o[2], o[3], o[4]
        );
    };
    for r in sweep.results.iter().filter(|r| r.mode.starts_with("kecho")) {
        row(&mut s, format!("{} at {}/s", r.mode, r.rate), r);
    }
    for (hz, r) in &sweep.by_frequency {
        row(&mut s, format!("kecho:1 at {}/s, {hz} reports/s", r.rate), r);
    }
    s.push_str(&targets(args, sweep));
    s
}

fn targets(args: &WebfarmArgs, sweep: &Sweep) -> String {
    let mut s = String::from("\nTargets:\n");
    let cap = args.capacity();
    let servable: Vec<f64> =
        args.rates.iter().copied().filter(|r| args.server_rates(*r).iter().sum::<f64>() < cap).collect();
    let at = |mode: &str, rate: f64| sweep.results.iter().find(|r| r.mode == mode && r.rate == rate);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut t1 = Vec::new();
    for &rate in &servable {
        for r in sweep.results.iter().filter(|r| r.rate == rate && r.mode != "none" && r.mode != "ideal") {
            if r.timeouts > 0 {
                t1.push(format!("{} at {rate}: {}", r.mode, r.timeouts));
            }
        }
    }
    let _ = writeln!(
        s,
        "- no time-outs with balancing at servable rates ({:?}): {}{}",
        servable,
        verdict(t1.is_empty()),
        if t1.is_empty() { String::new() } else { format!(" ({})", t1.join(", ")) }
    );
    let bound = (args.forward_after + 2.0 * args.service_ms / 1000.0) * 1000.0;
    let kecho: Vec<&RunResult> =
        sweep.results.iter().filter(|r| r.mode.starts_with("kecho") && servable.contains(&r.rate)).collect();
    let worst = kecho.iter().map(|r| r.p99).fold(0.0, f64::max);
    let each: Vec<String> = kecho.iter().map(|r| format!("{} at {}: {:.0}", r.mode, r.rate, r.p99)).collect();
    let _ = writeln!(
        s,
        "- KECho p99 below threshold + 2 service times ({bound:.0} ms) at servable rates: {} (worst {worst:.0} ms; {})",
        verdict(!kecho.is_empty() && worst < bound),
        each.join(", ")
    );
    for &rate in &servable {
        let Some(ideal) = at("ideal", rate) else { continue };
        let best = sweep
            .results
            .iter()
            .filter(|r| r.rate == rate && r.mode != "ideal" && r.mode != "none")
            .min_by(|a, b| a.p99.total_cmp(&b.p99));
        if let Some(b) = best {
            let ratio = b.p99 / ideal.p99.max(1e-9);
            let _ = writeln!(
                s,
                "- best p99 within 1.5x of the ideal queue at {rate}: {} ({} {:.0} ms vs ideal {:.0} ms, {ratio:.2}x)",
                verdict(ratio <= 1.5),
                b.mode,
                b.p99,
                ideal.p99
            );
        }
    }
    for &rate in &servable {
        if let (Some(h), Some(k)) = (at("hedge", rate), at("kecho:1", rate)) {
            let cut = k.p99 / h.p99.max(1e-9);
            let _ = writeln!(
                s,
                "- adaptive hedging cuts p99 5x against the fixed threshold at {rate} with <= 10 % extra: {} ({:.0} -> \
                 {:.0} ms, {cut:.1}x, {:.1} % extra)",
                verdict(cut >= 5.0 && h.extra <= 0.10 + 1e-9),
                k.p99,
                h.p99,
                h.extra * 100.0
            );
        }
    }
    s
}

/// Writes the CSV of results and the SVG plots into `dir`.
pub fn write_outputs(dir: &Path, args: &WebfarmArgs, sweep: &Sweep) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut csv = String::from(
        "mode,rate,requests,p50_ms,p95_ms,p99_ms,mean_local_ms,mean_remote_ms,timeouts,forwarded,extra,duplicated,\
         monitor_us,handling_us,out_filter_us,in_filter_us,forward_us,reports_per_s\n",
    );
    for r in sweep.results.iter().chain(sweep.by_frequency.iter().map(|(_, r)| r)) {
        let o = r.overhead_us;
        let _ = writeln!(
            csv,
            "{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{},{:.4},{:.4},{:.4},{:.2},{:.2},{:.2},{:.2},{:.2},{:.2}",
            r.mode,
            r.rate,
            r.requests,
            r.p50,
            r.p95,
            r.p99,
            r.mean_local,
            r.mean_remote,
            r.timeouts,
            r.forwarded,
            r.extra,
            r.duplicated,
            o[0],
            o[1],
            o[2],
            o[3],
            o[4],
            r.reports_per_s
        );
    }
    std::fs::write(dir.join("webfarm.csv"), csv)?;
    let modes: Vec<String> = {
        let mut m: Vec<String> = Vec::new();
        for r in &sweep.results {
            if !m.contains(&r.mode) {
                m.push(r.mode.clone());
            }
        }
        m
    };
    let series = |f: &dyn Fn(&RunResult) -> Option<f64>, mode: &str| -> Vec<(f64, f64)> {
        sweep.results.iter().filter(|r| r.mode == mode).filter_map(|r| f(r).map(|v| (r.rate, v))).collect()
    };
    // Fig. 8a as in the paper: mean response times without balancing, and KECho's local and remote requests.
    let mean_all = |r: &RunResult| Some((r.mean_local + r.mean_remote).max(0.0));
    let mut fig8a = vec![("ideal queue, p50".to_owned(), series(&|r| Some(r.p50), "ideal"))];
    fig8a.push(("w/o load balancing, p50".into(), series(&|r| Some(r.p50), "none")));
    fig8a.push(("KECho n=1, local requests (mean)".into(), series(&|r| Some(r.mean_local), "kecho:1")));
    fig8a.push((
        "KECho n=1, remote requests (mean)".into(),
        series(&|r| (r.mean_remote > 0.0).then_some(r.mean_remote), "kecho:1"),
    ));
    let _ = mean_all;
    plot(&dir.join("fig8a.svg"), "Response times (Fig. 8a)", "requests/s per server", "ms", &fig8a, false)?;
    let p99: Vec<(String, Vec<(f64, f64)>)> =
        modes.iter().map(|m| (m.clone(), series(&|r| Some(r.p99.max(1.0)), m))).collect();
    plot(&dir.join("p99.svg"), "p99 response time by mode", "requests/s per server", "ms (log)", &p99, true)?;
    let names = ["monitoring + submission", "event handling", "OUT-filter", "IN-filter", "forwarding"];
    let over = |pts: Vec<(f64, &RunResult)>| -> Vec<(String, Vec<(f64, f64)>)> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_owned(), pts.iter().map(|(x, r)| (*x, r.overhead_us[i])).collect()))
            .collect()
    };
    let k1: Vec<(f64, &RunResult)> =
        sweep.results.iter().filter(|r| r.mode == "kecho:1").map(|r| (r.rate, r)).collect();
    plot(
        &dir.join("fig8b.svg"),
        "Overhead, KECho n=1 (Fig. 8b)",
        "requests/s per server",
        "µs per s",
        &over(k1),
        false,
    )?;
    let f: Vec<(f64, &RunResult)> = sweep.by_frequency.iter().map(|(hz, r)| (*hz, r)).collect();
    if !f.is_empty() {
        plot(
            &dir.join("fig9a.svg"),
            "Overhead vs report frequency (Fig. 9a)",
            "reports/s",
            "µs per s",
            &over(f),
            false,
        )?;
    }
    let by_n: Vec<(f64, &RunResult)> = sweep
        .results
        .iter()
        .filter(|r| r.rate == args.overhead_rate)
        .filter_map(|r| r.mode.strip_prefix("kecho:").and_then(|n| n.parse::<f64>().ok()).map(|n| (n, r)))
        .collect();
    if !by_n.is_empty() {
        plot(&dir.join("fig9b.svg"), "Overhead vs servers per forward (Fig. 9b)", "n", "µs per s", &over(by_n), false)?;
    }
    Ok(())
}

fn plot(path: &Path, title: &str, x: &str, y: &str, series: &[(String, Vec<(f64, f64)>)], log: bool) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| WebfarmError::Plot { path: path.display().to_string(), why: e.to_string() };
    let pts = || series.iter().flat_map(|(_, p)| p.iter());
    let (x0, x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(*x), b.max(*x)));
    let y1 = pts().fold(0.0f64, |a, (_, y)| a.max(*y)).max(1e-3) * 1.1;
    if x0 > x1 {
        return Ok(());
    }
    let (x0, x1) = if x0 == x1 { (x0 - 1.0, x1 + 1.0) } else { (x0, x1) };
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 22)).margin(12).x_label_area_size(44).y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart.configure_mesh().x_desc(x).y_desc(y).draw().map_err(|e| err(&e))?;
            for (i, (name, p)) in series.iter().enumerate() {
                let color = Palette99::pick(i).to_rgba();
                chart
                    .draw_series(LineSeries::new(p.iter().copied(), color.stroke_width(2)))
                    .map_err(|e| err(&e))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                chart
                    .draw_series(p.iter().map(|&(a, b)| Circle::new((a, b), 3, color.filled())))
                    .map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if log {
        let y0 = pts().fold(f64::MAX, |a, (_, y)| a.min(*y)).max(1.0) * 0.8;
        draw!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(|e| err(&e))?);
    } else {
        draw!(b.build_cartesian_2d(x0..x1, 0.0..y1).map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// `kecho webfarm`: runs the sweep, prints the table and the targets, writes plots and CSV if asked.
pub async fn run_webfarm(args: WebfarmArgs) -> Result<()> {
    let started = now();
    let sweep = sweep(&args).await?;
    println!("{}", report(&args, &sweep));
    if let Some(dir) = &args.out {
        write_outputs(dir, &args, &sweep)?;
        println!("plots and CSV in {}", dir.display());
    }
    println!("(the sweep took {:.0} s of wall-clock time)", started.elapsed().as_secs_f64());
    Ok(())
}

/// A short version for `kecho demo`: four servers, two rates, four modes, 20 times faster than real time.
pub async fn demo_webfarm() -> Result<()> {
    let args = WebfarmArgs {
        servers: 4,
        rates: vec![20.0, 30.0],
        duration: 15.0,
        time_scale: 20.0,
        modes: vec!["none".into(), "kecho:1".into(), "p2c".into(), "hedge".into()],
        overhead_hz: Frequencies(vec![]),
        ..WebfarmArgs::default()
    };
    println!("web farm (KECho section 5.4, in small): {} servers on kecho channels", args.servers);
    let sweep = sweep(&args).await?;
    println!("{}", report(&args, &sweep));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_is_seeded_and_has_the_rates() {
        let a = poisson_trace(7, &[10.0, 40.0], 100.0, 0.038, 0.1);
        assert_eq!(a, poisson_trace(7, &[10.0, 40.0], 100.0, 0.038, 0.1));
        let n1 = a.iter().filter(|x| x.server == 1).count() as f64;
        assert!((n1 / 100.0 - 40.0).abs() < 4.0, "rate {}", n1 / 100.0);
        assert!(a.windows(2).all(|w| w[0].t <= w[1].t));
        assert!(a.iter().all(|x| (0.0342..=0.0418).contains(&x.work)));
    }

    #[test]
    fn ideal_queue_by_hand() {
        let arr = |t, work| Arrival { t, server: 0, work };
        let trace = [arr(0.0, 1.0), arr(0.1, 1.0), arr(0.2, 1.0), arr(0.3, 0.5)];
        let r = ideal_queue(&trace, 2, 10.0);
        let want = [1.0, 1.0, 1.8, 1.3];
        for (got, want) in r.iter().zip(want) {
            assert!((got.unwrap() - want).abs() < 1e-9, "{r:?}");
        }
        let trace = [arr(0.0, 1.0), arr(0.1, 1.0), arr(0.2, 1.0), arr(2.1, 0.5)];
        let r = ideal_queue(&trace, 1, 1.5);
        assert_eq!(r[0], Some(1.0));
        assert_eq!(r[1], None, "started in time but answered after 1.9 s");
        assert_eq!(r[2], None, "would wait 1.8 s of a 1.5 s time-out");
        assert!((r[3].unwrap() - 0.5).abs() < 1e-9, "the dropped request used no capacity: {r:?}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let bad = [
            WebfarmArgs { servers: 1, ..WebfarmArgs::default() },
            WebfarmArgs { rates: vec![-1.0], ..WebfarmArgs::default() },
            WebfarmArgs { time_scale: 0.0, ..WebfarmArgs::default() },
            WebfarmArgs { forward_after: 6.0, ..WebfarmArgs::default() },
        ];
        for a in bad {
            assert!(matches!(a.check(), Err(WebfarmError::Invalid(_))), "{a:?}");
        }
        assert!(parse_modes(&["kecho:0".into()]).is_err());
        assert!(parse_modes(&["bogus".into()]).is_err());
        assert_eq!(parse_modes(&["all".into()]).unwrap().len(), 12);
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebfarmArgs,
    }

    fn parse(argv: &[&str]) -> std::result::Result<WebfarmArgs, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("webfarm").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn overhead_frequencies_parse_and_may_be_empty() {
        assert_eq!(parse(&[]).unwrap().overhead_hz, Frequencies(vec![1.0, 2.0, 5.0, 10.0]));
        // "Empty to skip", as the help says.
        let a = parse(&["--overhead-hz", ""]).unwrap();
        assert_eq!(a.overhead_hz, Frequencies(vec![]));
        assert!(a.check().is_ok(), "an empty list passes the checks");
        assert_eq!(parse(&["--overhead-hz", "0.5, 3"]).unwrap().overhead_hz, Frequencies(vec![0.5, 3.0]));
        let e = parse(&["--overhead-hz", "1,x"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{e}");
        let a = parse(&["--overhead-hz", "0"]).unwrap();
        assert!(matches!(a.check(), Err(WebfarmError::Invalid(_))), "zero is refused by the checks");
    }

    #[test]
    fn skew_leaves_one_server_nearly_idle() {
        let a = WebfarmArgs::default();
        let r = a.server_rates(30.0);
        assert_eq!(r.len(), 8);
        assert!(r[0] * a.service_ms / 1000.0 < 0.1);
        let loaded: f64 = r[1..].iter().sum::<f64>() / 7.0;
        assert!((loaded - 30.0).abs() < 1e-9);
    }
}
