//! `kecho flow`: run a declared data path, list running flows, show their per-stage counters.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_flow::control::{self, Control};
use kecho_flow::{Endpoint, Flow, FlowStats};

use crate::node_args::{node, open, NodeArgs, RegistryArg};

#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// Run a flow until its source ends: `kecho flow run 'tcp-listen:0.0.0.0:9000 ! decrypt aes-256-gcm key=k !
    /// file:/data/out'`. The words may also be given unquoted.
    Run(Box<RunArgs>),
    /// List the running flows on this host (their control sockets).
    Ls(ListArgs),
    /// Per-stage counters of running flows: bytes, rate, busy fraction, system calls, user-space copies.
    Stats(StatsArgs),
    /// Stop a running flow.
    Stop {
        /// Flow id (from `kecho flow ls`).
        id: u64,
        #[arg(long, env = "KECHO_FLOW_DIR")]
        dir: Option<PathBuf>,
    },
    /// Change a running flow's priority or rate limit.
    Set {
        /// Flow id.
        id: u64,
        /// New priority (>= 1).
        #[arg(long)]
        priority: Option<u32>,
        /// New rate limit in bytes/s (e.g. 10M), or `none`.
        #[arg(long)]
        rate: Option<String>,
        #[arg(long, env = "KECHO_FLOW_DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The spec: SOURCE [opts] ! TRANSFORM args ! ... ! SINK [opts] [SINK [opts]...]. Every word from the spec's
    /// first on is the spec's: this command's options go before it.
    #[arg(required = true, num_args = 1.., allow_hyphen_values = true, trailing_var_arg = true)]
    spec: Vec<String>,
    /// Print the final counters as JSON on standard output.
    #[arg(long)]
    json: bool,
    /// Directory of the control sockets [default: $KECHO_FLOW_DIR, $XDG_RUNTIME_DIR/kecho-flows, or the temp dir].
    #[arg(long, env = "KECHO_FLOW_DIR")]
    dir: Option<PathBuf>,
    /// For `kecho:` endpoints: the registry and this node's settings.
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
    /// `--metrics ADDR`: the flow's per-stage counters as Prometheus metrics (`kecho_flow_*`).
    #[command(flatten)]
    metrics: crate::observe::MetricsArg,
}

#[derive(clap::Args, Debug)]
pub struct ListArgs {
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, env = "KECHO_FLOW_DIR")]
    dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Only this flow.
    id: Option<u64>,
    /// JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[arg(long, env = "KECHO_FLOW_DIR")]
    dir: Option<PathBuf>,
}

pub async fn run(a: Args) -> Result<()> {
    match a {
        Args::Run(r) => run_flow(*r).await,
        Args::Ls(l) => {
            let flows = control::list(&l.dir.unwrap_or_else(control::default_dir));
            if l.json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&flows.iter().map(|f| &f.1).collect::<Vec<_>>())?))?;
                return Ok(());
            }
            let flows: Vec<FlowStats> = flows.into_iter().map(|f| f.1).collect();
            emit(&ls_table(&flows))?;
            Ok(())
        }
        Args::Stats(st) => {
            let flows: Vec<FlowStats> = control::list(&st.dir.unwrap_or_else(control::default_dir))
                .into_iter()
                .map(|f| f.1)
                .filter(|f| st.id.is_none_or(|id| id == f.id))
                .collect();
            if flows.is_empty() {
                bail!("no such flow running");
            }
            if st.json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&flows)?))?;
            } else {
                emit(&flows.iter().map(stats_table).collect::<String>())?;
            }
            Ok(())
        }
        Args::Stop { id, dir } => send(dir, id, "stop"),
        Args::Set { id, priority, rate, dir } => {
            if priority.is_none() && rate.is_none() {
                bail!("give --priority and/or --rate");
            }
            if let Some(p) = priority {
                send(dir.clone(), id, &format!("priority {p}"))?;
            }
            if let Some(r) = rate {
                send(dir, id, &format!("rate {r}"))?;
            }
            Ok(())
        }
    }
}

fn send(dir: Option<PathBuf>, id: u64, req: &str) -> Result<()> {
    let dir = dir.unwrap_or_else(control::default_dir);
    let (sock, _) =
        control::list(&dir).into_iter().find(|f| f.1.id == id).with_context(|| format!("no flow {id} running"))?;
    let reply = control::request(&sock, req)?;
    if reply != "ok" {
        bail!("flow {id}: {reply}");
    }
    Ok(())
}

async fn run_flow(a: RunArgs) -> Result<()> {
    // No spec word starts with `--`: such a word is one of this command's options given after the spec, which the
    // spec took (its words may start with `-`, and given unquoted they run to the end of the line).
    if let Some(opt) = a.spec.iter().find(|w| w.starts_with("--")) {
        eprintln!(
            "kecho: `{opt}` follows the flow spec, whose words run to the end of the command line: give the options \
             of `kecho flow run` before the spec (`kecho flow run {opt} ... 'SPEC'`)"
        );
        std::process::exit(2);
    }
    let text = a.spec.join(" ");
    let spec = match kecho_flow::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            // The caret needs its own lines: print and exit here rather than through the one-line error path.
            eprintln!("kecho: {e}");
            std::process::exit(2);
        }
    };
    // An `app:` sink hands the output to a function of a program built on the library; this one has none to give.
    if let Some(Endpoint::App(name)) = spec.sinks.iter().map(|s| &s.endpoint).find(|e| matches!(e, Endpoint::App(_))) {
        bail!(
            "`app:{name}` hands a flow's output to a function of a program built on the library \
             (FlowBuilder::app_sink); the command line has none: use `-` (standard output) or `exec:'CMD'`"
        );
    }
    let mut b = Flow::from_spec(&spec).name(text.clone());
    let channels: Vec<&Endpoint> = std::iter::once(&spec.source.endpoint)
        .chain(spec.sinks.iter().map(|s| &s.endpoint))
        .filter(|e| matches!(e, Endpoint::Channel(_)))
        .collect();
    let mut _node = None;
    if !channels.is_empty() {
        let n = node(&a.reg, &a.node, None).await?;
        if let Endpoint::Channel(name) = &spec.source.endpoint {
            let ch = open(&n, name, false).await?;
            b = b.channel_source(name.clone(), ch.sink(kecho::SinkOptions::new())?);
        }
        for s in &spec.sinks {
            if let Endpoint::Channel(name) = &s.endpoint {
                let ch = open(&n, name, false).await?;
                b = b.channel_sink(name.clone(), ch.source()?);
            }
        }
        _node = Some(n);
    }
    let flow = b.start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut registry = crate::observe::prometheus_client_registry::Registry::default();
    registry.register_collector(Box::new(FlowCollector(flow.watcher())));
    let _metrics = a.metrics.serve(registry).await?;
    // Announced once what it serves (its listener and its metrics) accepts connections.
    if let Some(addr) = flow.local_addr() {
        eprintln!("kecho: flow {} listening on {addr}", flow.id());
    }
    let dir = a.dir.unwrap_or_else(control::default_dir);
    let ctl = Control::serve(&dir, flow.watcher()).with_context(|| format!("control socket in {}", dir.display()))?;
    let w = flow.watcher();
    let watcher = flow.watcher();
    let stop = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            w.stop();
        }
    });
    let r = tokio::task::spawn_blocking(move || flow.wait()).await?;
    stop.abort();
    drop(ctl);
    let s = match r {
        Ok(s) => s,
        // Stopped on request (`kecho flow stop`, Ctrl-C) before its source ended: not a fault of the flow, but the
        // data may be incomplete, hence the failure status.
        Err(kecho_flow::FlowError::Stopped) => {
            let s = watcher.stats();
            bail!(
                "flow {} stopped before its source ended: {} bytes in, {} bytes out in {:.3} s",
                s.id,
                s.bytes_in,
                s.bytes_out,
                s.elapsed_s
            );
        }
        Err(e) => return Err(anyhow::anyhow!("flow failed: {e}")),
    };
    if a.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&s)?))?;
    } else {
        eprintln!(
            "kecho: flow {} done: {} bytes in {:.3} s ({:.1} MB/s), {}, {} system calls, {} bytes copied in user space{}",
            s.id,
            s.bytes_in,
            s.elapsed_s,
            if s.elapsed_s > 0.0 { s.bytes_in as f64 / 1e6 / s.elapsed_s } else { 0.0 },
            s.path,
            s.syscalls,
            s.user_copied,
            s.bound.as_deref().map(|b| format!(", bound by {b}")).unwrap_or_default()
        );
        for r in &s.results {
            eprintln!("kecho: {r}");
        }
    }
    // Give a kecho channel sink's last events time to leave.
    if _node.is_some() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A flow's counters as Prometheus metrics, read at each scrape (nothing is counted twice or costs anything between
/// scrapes). Labels: `flow` (id); per stage also `stage` (its name), `index` (its place in the path: 0 is the
/// source) and `kind` (source, transform, sink).
///
/// | metric | what |
/// |---|---|
/// | `kecho_flow_running` | 1 while the flow runs |
/// | `kecho_flow_priority` | its priority |
/// | `kecho_flow_rate_limit_bytes_per_second` | the rate in effect (absent: unlimited) |
/// | `kecho_flow_bound` | 1 on the stage that bounds the flow (none while it is idle) |
/// | `kecho_flow_stage_{in,out}_bytes_total` | bytes into and out of each stage |
/// | `kecho_flow_stage_busy_seconds_total` | time each stage spent working (summed over replicas) |
/// | `kecho_flow_stage_syscalls_total` | system calls on the data path |
/// | `kecho_flow_stage_copied_bytes_total` | bytes copied in user space (a `read` into user memory counts) |
/// | `kecho_flow_stage_dropped_bytes_total` | bytes a full fan-out queue dropped |
/// | `kecho_flow_stage_replicas` | replicas of the stage |
/// | `kecho_flow_stage_detached` | 1 once a fan-out sink was cut off |
#[derive(Debug)]
struct FlowCollector(kecho_flow::FlowWatcher);

impl kecho_metrics::prometheus_client::collector::Collector for FlowCollector {
    fn encode(
        &self,
        mut enc: kecho_metrics::prometheus_client::encoding::DescriptorEncoder,
    ) -> std::result::Result<(), std::fmt::Error> {
        use kecho_metrics::prometheus_client::encoding::EncodeMetric;
        use kecho_metrics::prometheus_client::metrics::counter::ConstCounter;
        use kecho_metrics::prometheus_client::metrics::gauge::ConstGauge;
        use kecho_metrics::prometheus_client::metrics::MetricType;
        let s = self.0.stats();
        let id = s.id.to_string();
        let flow = [("flow", id.as_str())];
        let (g, c) = (MetricType::Gauge, MetricType::Counter);
        let mut m = enc.encode_descriptor("kecho_flow_running", "1 while the flow runs", None, g)?;
        ConstGauge::new(i64::from(s.state == "running")).encode(m.encode_family(&flow)?)?;
        let mut m = enc.encode_descriptor("kecho_flow_priority", "The flow's priority", None, g)?;
        ConstGauge::new(i64::from(s.priority)).encode(m.encode_family(&flow)?)?;
        if let Some(r) = s.effective_rate {
            let mut m =
                enc.encode_descriptor("kecho_flow_rate_limit_bytes_per_second", "The rate in effect", None, g)?;
            ConstGauge::new(r as i64).encode(m.encode_family(&flow)?)?;
        }
        let index: Vec<String> = (0..s.stages.len()).map(|i| i.to_string()).collect();
        let labels = |i: usize| {
            let st = &s.stages[i];
            [
                ("flow", id.as_str()),
                ("stage", st.name.as_str()),
                ("index", index[i].as_str()),
                ("kind", st.kind.as_str()),
            ]
        };
        let mut m = enc.encode_descriptor("kecho_flow_bound", "1 on the stage that bounds the flow", None, g)?;
        for (i, st) in s.stages.iter().enumerate() {
            ConstGauge::new(i64::from(s.bound.as_deref() == Some(st.name.as_str())))
                .encode(m.encode_family(&labels(i))?)?;
        }
        type Get = fn(&kecho_flow::StageStats) -> u64;
        let counters: [(&str, &str, Get); 5] = [
            ("kecho_flow_stage_in_bytes", "Bytes into the stage", |st| st.bytes_in),
            ("kecho_flow_stage_out_bytes", "Bytes out of the stage", |st| st.bytes_out),
            ("kecho_flow_stage_syscalls", "System calls on the data path", |st| st.syscalls),
            ("kecho_flow_stage_copied_bytes", "Bytes copied in user space", |st| st.copied),
            ("kecho_flow_stage_dropped_bytes", "Bytes a full fan-out queue dropped", |st| st.dropped),
        ];
        for (name, help, get) in counters {
            let mut m = enc.encode_descriptor(name, help, None, c)?;
            for (i, st) in s.stages.iter().enumerate() {
                ConstCounter::new(get(st)).encode(m.encode_family(&labels(i))?)?;
            }
        }
        let mut m = enc.encode_descriptor("kecho_flow_stage_busy_seconds", "Time the stage spent working", None, c)?;
        for (i, st) in s.stages.iter().enumerate() {
            ConstCounter::new(st.busy_s).encode(m.encode_family(&labels(i))?)?;
        }
        let mut m = enc.encode_descriptor("kecho_flow_stage_replicas", "Replicas of the stage", None, g)?;
        for (i, st) in s.stages.iter().enumerate() {
            ConstGauge::new(st.replicas as i64).encode(m.encode_family(&labels(i))?)?;
        }
        let mut m = enc.encode_descriptor("kecho_flow_stage_detached", "1 once a fan-out sink was cut off", None, g)?;
        for (i, st) in s.stages.iter().enumerate() {
            ConstGauge::new(i64::from(st.detached)).encode(m.encode_family(&labels(i))?)?;
        }
        Ok(())
    }
}

/// The `kecho flow ls` table: one line per flow with its path, bytes, rate, bounding stage, and its stages (as a
/// spec with the canonical transform names) with how busy each is.
fn ls_table(flows: &[FlowStats]) -> String {
    use std::fmt::Write;
    if flows.is_empty() {
        return "no flows\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>4} {:<10} {:<24} {:>12} {:>9} {:<24} STAGES (busy)",
        "ID", "STATE", "PATH", "BYTES", "MB/s", "BOUND BY"
    );
    for s in flows {
        let rate = if s.elapsed_s > 0.0 { s.bytes_out as f64 / 1e6 / s.elapsed_s } else { 0.0 };
        let stages: Vec<String> = s
            .stages
            .iter()
            .map(|st| {
                let repl = if st.replicas > 1 { format!(" x{}", st.replicas) } else { String::new() };
                format!("{} {:.0}%{repl}", st.name, st.busy * 100.0)
            })
            .collect();
        let _ = writeln!(
            out,
            "{:>4} {:<10} {:<24} {:>12} {:>9.1} {:<24} {}",
            s.id,
            s.state,
            s.path,
            s.bytes_in,
            rate,
            s.bound.as_deref().unwrap_or("- (idle)"),
            stages.join(" ! ")
        );
    }
    out
}

/// Writes to standard output; a reader that went away (`kecho flow ls | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn stats_table(f: &FlowStats) -> String {
    use std::fmt::Write;
    let mut t = String::new();
    let _ = writeln!(t, "flow {} [{}] {} — {}", f.id, f.state, f.path, f.name);
    let _ = writeln!(
        t,
        "  {:<28} {:<9} {:>12} {:>12} {:>9} {:>6} {:>8} {:>4} {:>9} {:>12} {:>9}",
        "STAGE", "KIND", "IN", "OUT", "MB/s", "BUSY", "CPU s", "REPL", "SYSCALLS", "COPIED", "DROPPED"
    );
    for s in &f.stages {
        let _ = writeln!(
            t,
            "  {:<28} {:<9} {:>12} {:>12} {:>9.1} {:>5.0}% {:>8.3} {:>4} {:>9} {:>12} {:>9}{}",
            s.name,
            s.kind,
            s.bytes_in,
            s.bytes_out,
            s.mb_per_s,
            s.busy * 100.0,
            s.cpu_s,
            s.replicas,
            s.syscalls,
            s.copied,
            s.dropped,
            if s.detached { " detached" } else { "" }
        );
    }
    let _ = writeln!(t, "  bound by: {}", f.bound.as_deref().unwrap_or("- (idle)"));
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use kecho_flow::StageStats;

    fn stage(name: &str, kind: &str, busy: f64) -> StageStats {
        StageStats {
            name: name.into(),
            kind: kind.into(),
            bytes_in: 100_000,
            bytes_out: 100_000,
            mb_per_s: 0.0,
            busy_s: 0.0,
            busy,
            cpu_s: 0.0,
            syscalls: 1,
            splice: 0,
            sendfile: 0,
            copy_file_range: 0,
            tee: 0,
            copied: 0,
            dropped: 0,
            replicas: 1,
            detached: false,
        }
    }

    fn flow(bound: Option<&str>) -> FlowStats {
        FlowStats {
            id: 7,
            name: "tcp-listen:127.0.0.1:0 ! checksum ! file:out".into(),
            state: "running".into(),
            path: "copy".into(),
            elapsed_s: 10.0,
            bytes_in: 100_000,
            bytes_out: 100_000,
            user_copied: 100_000,
            syscalls: 3,
            priority: 1,
            rate: None,
            effective_rate: None,
            bound: bound.map(Into::into),
            stages: vec![
                stage("tcp-listen:127.0.0.1:0", "source", 0.0),
                stage("checksum crc32", "transform", 0.31),
                stage("file:out", "sink", 0.0),
            ],
            results: Vec::new(),
        }
    }

    /// The listing names every stage of a flow, whichever stage (if any) bounds it: a listing that showed the
    /// transform only when it happened to be the bounding stage passed or failed by chance.
    #[test]
    fn the_listing_shows_every_stage_whatever_bounds_the_flow() {
        for bound in [None, Some("file:out"), Some("tcp-listen:127.0.0.1:0"), Some("checksum crc32")] {
            let t = ls_table(&[flow(bound)]);
            let line = t.lines().nth(1).unwrap_or_default();
            assert!(line.contains("tcp-listen:127.0.0.1:0 0% ! checksum crc32 31% ! file:out 0%"), "{t}");
            assert!(line.starts_with("   7 running    copy"), "{t}");
            assert!(line.contains(bound.unwrap_or("- (idle)")), "{t}");
        }
        assert_eq!(ls_table(&[]), "no flows\n");
    }
}
