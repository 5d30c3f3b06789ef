//! kecho's benchmark suite: `kecho bench <workload>`.
//!
//! Each workload measures one thing the KECho paper measured (section 5: Table 1, Figs. 6 and 7) or that the
//! benchmark issue added, prints Markdown tables to standard output and writes the same figures as JSON
//! (`<out>/<workload>.json`). Where a target from the issue applies, the workload records a check (met or missed,
//! with the measured value and the limit); `all` prints them together at the end and writes `targets.json`.
//!
//! Baselines are measured in the same run: raw TCP (a plain socket, the physical floor) always, and with the cargo
//! feature `peers` NATS (a `nats-server` process) and Zenoh (peer mode over loopback TCP).
//!
//! Benchmarks are programs, not timed tests: nothing here asserts timing. Correctness is asserted (events lost must
//! be 0 wherever the configuration promises no loss), so a tiny run (`--scale 0.001`) keeps the suite working in CI.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::path::PathBuf;

use anyhow::{Context, Result};

mod balance;
mod channel_ops;
mod child;
mod filters;
mod flows;
mod latency;
mod local;
mod members;
mod memory;
mod pipe;
mod plot;
mod poll;
mod priority;
mod rawtcp;
mod report;
mod resources;
mod submit;
mod syscalls;
mod systems;
mod throughput;
mod urgent_net;
mod util;

#[cfg(feature = "peers")]
mod peers;

pub use report::{Check, Section, Table};

/// Arguments of `kecho bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum, default_value_t = Workload::All)]
    pub workload: Workload,
    /// Multiplies every event and repetition count (e.g. 0.001 for a smoke run; each count stays at least 1-10).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Directory for the JSON results and SVG plots (created if missing).
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Do not draw the SVG plots.
    #[arg(long)]
    pub no_plots: bool,
    /// Skip the baseline systems (raw TCP, and NATS and Zenoh when built with the `peers` feature).
    #[arg(long)]
    pub no_peers: bool,
    /// Seconds after which a child process (the strace runs, the memory probe) is killed.
    #[arg(long, default_value_t = 120)]
    pub child_timeout: u64,
    /// A kecho-bench binary to run child processes with (default: this program with its own arguments).
    #[arg(long, hide = true)]
    pub exe: Option<PathBuf>,
    /// Internal: run as a child process with this role.
    #[arg(long, hide = true)]
    pub child: Option<String>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        BenchArgs {
            workload: Workload::All,
            scale: 1.0,
            out: PathBuf::from("bench-results"),
            no_plots: false,
            no_peers: false,
            child_timeout: 120,
            exe: None,
            child: None,
        }
    }
}

/// The workloads.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Every workload below, in this order, then the targets.
    All,
    /// Channel creation time (Table 1).
    Create,
    /// Channel open (join) time with 1 to 16 existing members (Table 1).
    Open,
    /// CPU time per submitted event at the source, 100 B and 1 KB, 1 to 8 sinks (Fig. 6).
    Submit,
    /// System calls per event under sustained load, counted with strace (Table 1).
    Syscalls,
    /// Cost of polling: `try_recv` on an empty and a non-empty queue (Table 1).
    Poll,
    /// Delivery latency: ping-pong and one-way, back-to-back and paced at 1 kHz, against the peers.
    Latency,
    /// Events/s and MB/s: 1->1, 1->8, 8->1; 100 B, 1 KB, 64 KB; with the loss count.
    Throughput,
    /// Filter overheads (Fig. 7): IN-filter at a host with 8 sinks, OUT-filter to 8 remote sinks, one call's cost.
    Filters,
    /// Resident memory: an idle node, per channel, per member.
    Memory,
    /// Flows (not in `all`): receive -> decrypt -> store against a memory-centric program, pure moves against a
    /// read/write loop and socat, replicated decryption, and the machine's limits. See docs/FLOWS.md.
    Flows,
    /// Resource management: placement latency, rate, overcommit and quality against central allocators (not in
    /// `all`; see docs/RESOURCES.md).
    Resources,
    /// HTTP load balancing (`kecho balance`) against a plain round-robin proxy (not part of `all`).
    Balance,
    /// Urgent 100 B events behind a 64 KB bulk stream: idle link, no priority, priority 3, and priority 3 without
    /// `TCP_NOTSENT_LOWAT` (not part of `all`).
    Priority,
    /// Urgent 100 B events behind a 64 KB bulk stream on a link shaped to 200 Mbit/s between two network namespaces:
    /// TCP with one connection (with and without priorities), with the urgent connection, QUIC; a FIFO and a
    /// `pfifo_fast` (priority bands) queue in the shaper (needs root; not part of `all`).
    UrgentNet,
    /// Two processes on one host: 100 B ping-pong against a blocking-socket floor, kecho's default and low-latency
    /// receive modes over TCP and same-host links, with CPU per message; 100 B 1->1 throughput over TCP and
    /// same-host links (not part of `all`).
    Local,
    /// Channels of many member nodes in a few processes: join time of the Nth node, a storm of joins (not part of
    /// `all`; see docs/SCALE.md).
    Members,
}

impl Workload {
    /// Every single workload, in the order `all` runs them.
    pub const EACH: [Workload; 9] = [
        Workload::Create,
        Workload::Open,
        Workload::Submit,
        Workload::Syscalls,
        Workload::Poll,
        Workload::Latency,
        Workload::Throughput,
        Workload::Filters,
        Workload::Memory,
    ];

    /// The name used on the command line and for the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Workload::All => "all",
            Workload::Create => "create",
            Workload::Open => "open",
            Workload::Submit => "submit",
            Workload::Syscalls => "syscalls",
            Workload::Poll => "poll",
            Workload::Latency => "latency",
            Workload::Throughput => "throughput",
            Workload::Filters => "filters",
            Workload::Memory => "memory",
            Workload::Flows => "flows",
            Workload::Resources => "resources",
            Workload::Balance => "balance",
            Workload::Priority => "priority",
            Workload::UrgentNet => "urgent-net",
            Workload::Local => "local",
            Workload::Members => "members",
        }
    }
}

/// Runs the benchmark from async code (e.g. the `kecho` command's runtime). The workloads build their own runtimes
/// (some need a runtime per node to account CPU time per node), so the work runs on a blocking thread.
pub async fn run(args: BenchArgs) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(args)).await.context("benchmark thread")?
}

/// Runs the benchmark from synchronous code (outside any runtime).
pub fn run_blocking(args: BenchArgs) -> Result<()> {
    run_sections(&args).map(|_| ())
}

/// Runs the workload(s) and returns their sections, as printed and written.
pub fn run_sections(args: &BenchArgs) -> Result<Vec<Section>> {
    if let Some(role) = &args.child {
        child::run(role)?;
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let list: Vec<Workload> =
        if args.workload == Workload::All { Workload::EACH.to_vec() } else { vec![args.workload] };
    println!("{}", report::machine_line());
    let mut sections = Vec::new();
    for w in list {
        let started = std::time::Instant::now();
        let section = run_one(w, args).with_context(|| format!("workload {}", w.name()))?;
        section.print();
        section.write_json(&args.out)?;
        eprintln!("kecho-bench: {} done in {:.1} s", w.name(), started.elapsed().as_secs_f64());
        sections.push(section);
    }
    if !args.no_plots {
        let drawn = plot::draw(&sections, &args.out)?;
        for p in drawn {
            println!("plot: {}", p.display());
        }
    }
    if sections.len() > 1 {
        let targets = report::targets_section(&sections);
        targets.print();
        targets.write_json(&args.out)?;
        sections.push(targets);
    }
    Ok(sections)
}

fn run_one(w: Workload, args: &BenchArgs) -> Result<Section> {
    match w {
        Workload::All => unreachable!("expanded by the caller"),
        Workload::Create => channel_ops::create(args),
        Workload::Open => channel_ops::open(args),
        Workload::Submit => submit::run(args),
        Workload::Syscalls => syscalls::run(args),
        Workload::Poll => poll::run(args),
        Workload::Latency => latency::run(args),
        Workload::Throughput => throughput::run(args),
        Workload::Filters => filters::run(args),
        Workload::Memory => memory::run(args),
        Workload::Flows => flows::run(args),
        Workload::Resources => resources::run(args),
        Workload::Balance => balance::run(args),
        Workload::Priority => priority::run(args),
        Workload::UrgentNet => urgent_net::run(args),
        Workload::Local => local::run(args),
        Workload::Members => members::run(args),
    }
}
