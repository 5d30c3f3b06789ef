//! Shared helpers: counts, runtimes whose threads' CPU time can be read, clocks, memory, histograms.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tids::Tids;

use crate::BenchArgs;

/// A count scaled by `--scale`, never below `min` (so that a smoke run still exercises every path).
pub fn count(args: &BenchArgs, base: u64, min: u64) -> u64 {
    ((base as f64 * args.scale).round() as u64).max(min)
}

/// Nanoseconds since a process-wide epoch: timestamps carried in payloads for one-way latency, sender and receiver
/// being in the same process.
pub fn epoch_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// The calling thread's kernel id, from the `/proc/thread-self` link (no `gettid` call needed, so no unsafe code).
pub fn current_tid() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU nanoseconds of the calling thread (`CLOCK_THREAD_CPUTIME_ID`, which brings the running slice up to date).
pub fn self_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Nanoseconds another thread of this process has run on a CPU (`/proc/self/task/TID/schedstat`, first field). The
/// kernel updates it when the thread is descheduled (and at ticks), so it is exact for a thread that is parked when
/// read, as the runtime workers are once a measured run has drained; [`self_cpu_ns`] is for the calling thread.
pub fn thread_cpu_ns(tid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(0)
}

/// A set of threads whose CPU time is summed: a node's runtime workers.
#[derive(Debug, Clone, Default)]
pub struct CpuMeter {
    tids: Tids,
}

impl CpuMeter {
    /// Adds the calling thread (from the runtime's thread-start hook).
    fn add_current(&self) {
        if let Some(t) = current_tid() {
            self.tids.add(t);
        }
    }

    /// Total CPU nanoseconds of the threads so far. Waits a moment first, so that threads that have just finished
    /// their work are parked and their accounting is current.
    pub fn cpu_ns(&self) -> u64 {
        std::thread::sleep(std::time::Duration::from_millis(5));
        self.tids.all().into_iter().map(thread_cpu_ns).sum()
    }
}

/// Thread ids collected from runtime hooks; a tiny wrapper so the hook closures stay `Fn + Send + Sync`.
mod tids {
    use std::sync::{Arc, Mutex};

    #[derive(Debug, Clone, Default)]
    pub struct Tids(Arc<Mutex<Vec<u32>>>);

    impl Tids {
        pub fn add(&self, t: u32) {
            let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if !v.contains(&t) {
                v.push(t);
            }
        }
        pub fn all(&self) -> Vec<u32> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }
}

/// A multi-threaded runtime with `workers` workers whose threads (workers and blocking pool) are added to the
/// returned meter as they start.
pub fn metered_runtime(workers: usize, name: &str) -> Result<(tokio::runtime::Runtime, CpuMeter)> {
    let meter = CpuMeter::default();
    let m = meter.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .on_thread_start(move || m.add_current())
        .enable_all()
        .build()
        .context("building a runtime")?;
    Ok((rt, meter))
}

/// The runtime most workloads use: two workers, as the `kecho` command has.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("building a runtime")
}

/// Resident set size of this process in KiB (`VmRSS`).
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A registry server on a loopback port, run on the current runtime, as a deployment would use (the in-process
/// registry would hide the round trips that KECho's group server cost).
pub async fn start_registry() -> Result<(SocketAddr, kecho_registry::RegistryHandle)> {
    start_registry_for(kecho_registry::MAX_CONNECTIONS).await
}

/// [`start_registry`] serving up to `max_connections` connections at once (each node keeps one while it is up).
pub async fn start_registry_for(max_connections: usize) -> Result<(SocketAddr, kecho_registry::RegistryHandle)> {
    let server = kecho_registry::RegistryServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await?
        .with_max_connections(max_connections);
    let addr = server.local_addr();
    Ok((addr, server.spawn()))
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of a histogram, in nanoseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl Summary {
    /// Summarises a histogram.
    pub fn of(h: &Histogram<u64>) -> Self {
        Summary {
            count: h.len(),
            p50: h.value_at_quantile(0.5) as f64,
            p99: h.value_at_quantile(0.99) as f64,
            p999: h.value_at_quantile(0.999) as f64,
            max: h.max() as f64,
            mean: h.mean(),
        }
    }
}

/// Points of a histogram's CDF (value in ns, cumulative fraction), for the plots.
pub fn cdf_points(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    let mut pts = Vec::new();
    if h.is_empty() {
        return pts;
    }
    for v in h.iter_quantiles(4) {
        pts.push((v.value_iterated_to() as f64, v.quantile_iterated_to()));
    }
    pts
}

/// Median of a list of samples.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Waits until `f` returns true, polling every millisecond, at most `timeout`. Returns whether it did.
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    f()
}

/// A payload of `size` bytes (at least 8) whose first 8 bytes are a send timestamp.
pub fn stamped(size: usize) -> Vec<u8> {
    vec![0x5a; size.max(8)]
}

/// Writes the current timestamp into a payload.
pub fn stamp(buf: &mut [u8]) {
    buf[..8].copy_from_slice(&epoch_ns().to_le_bytes());
}

/// Reads the timestamp from a payload.
pub fn stamp_of(buf: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[..8]);
    u64::from_le_bytes(b)
}
