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
    /// The spec: SOURCE [opts] ! TRANSFORM args ! ... ! SINK [opts] [SINK [opts]...].
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
                println!("{}", serde_json::to_string_pretty(&flows.iter().map(|f| &f.1).collect::<Vec<_>>())?);
                return Ok(());
            }
            let flows: Vec<FlowStats> = flows.into_iter().map(|f| f.1).collect();
            print!("{}", ls_table(&flows));
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
                println!("{}", serde_json::to_string_pretty(&flows)?);
            } else {
                for f in &flows {
                    print_stats(f);
                }
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
    let text = a.spec.join(" ");
    let spec = match kecho_flow::parse(&text) {
        Ok(s) => s,
        Err(e) => {
            // The caret needs its own lines: print and exit here rather than through the one-line error path.
            eprintln!("kecho: {e}");
            std::process::exit(2);
        }
    };
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
    if let Some(addr) = flow.local_addr() {
        eprintln!("kecho: flow {} listening on {addr}", flow.id());
    }
    let dir = a.dir.unwrap_or_else(control::default_dir);
    let ctl = Control::serve(&dir, flow.watcher()).with_context(|| format!("control socket in {}", dir.display()))?;
    let w = flow.watcher();
    let stop = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            w.stop();
        }
    });
    let r = tokio::task::spawn_blocking(move || flow.wait()).await?;
    stop.abort();
    drop(ctl);
    let s = r.map_err(|e| anyhow::anyhow!("flow failed: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
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

fn print_stats(f: &FlowStats) {
    println!("flow {} [{}] {} — {}", f.id, f.state, f.path, f.name);
    println!(
        "  {:<28} {:<9} {:>12} {:>12} {:>9} {:>6} {:>4} {:>9} {:>12} {:>9}",
        "STAGE", "KIND", "IN", "OUT", "MB/s", "BUSY", "REPL", "SYSCALLS", "COPIED", "DROPPED"
    );
    for s in &f.stages {
        println!(
            "  {:<28} {:<9} {:>12} {:>12} {:>9.1} {:>5.0}% {:>4} {:>9} {:>12} {:>9}{}",
            s.name,
            s.kind,
            s.bytes_in,
            s.bytes_out,
            s.mb_per_s,
            s.busy * 100.0,
            s.replicas,
            s.syscalls,
            s.copied,
            s.dropped,
            if s.detached { " detached" } else { "" }
        );
    }
    println!("  bound by: {}", f.bound.as_deref().unwrap_or("- (idle)"));
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
            syscalls: 1,
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
