//! `kecho filter install`: install a sandboxed filter (WebAssembly) on every member of a channel.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::access;
use crate::node_args::{node, NodeArgs, RegistryArg, TlsArgs, UrgentConnection};

#[derive(Subcommand, Debug)]
pub enum Args {
    /// Install FILE as an OUT-filter (--out) or IN-filter (--in) on every member node that allows it.
    Install {
        /// Channel name.
        channel: String,
        /// The module, WebAssembly text (.wat) or binary (.wasm); see docs/FILTERS.md for the ABI.
        file: std::path::PathBuf,
        /// Install as an OUT-filter (runs at sources, chooses sinks).
        #[arg(long, conflicts_with = "in_filter", required_unless_present = "in_filter")]
        out: bool,
        /// Install as an IN-filter (runs at receiving nodes, before dispatch).
        #[arg(long = "in")]
        in_filter: bool,
        #[command(flatten)]
        reg: RegistryArg,
        /// Seconds to wait for the members' answers.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        #[command(flatten)]
        tls: TlsArgs,
        /// This node's identity (needed with --token).
        #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
        identity: Option<std::path::PathBuf>,
        #[command(flatten)]
        access: access::AccessArgs,
    },
}

pub async fn run(cmd: Args) -> Result<()> {
    let Args::Install { channel, file, out, in_filter: _, reg, timeout, tls, identity, access } = cmd;
    let args = NodeArgs {
        listen: "127.0.0.1:0".into(),
        advertise: None,
        transport: kecho::Transport::Tcp,
        same_host: false,
        same_host_ring_kib: 0,
        low_latency_us: 0,
        urgent_connection: UrgentConnection::On,
        heartbeat: 3.0,
        tree_threshold: None,
        allow_filters: false,
        identity,
        tls,
        access,
    };
    install_filter(&channel, &file, out, &reg, timeout, &args).await
}

async fn install_filter(
    channel: &str,
    file: &std::path::Path,
    out: bool,
    reg: &RegistryArg,
    timeout: f64,
    args: &NodeArgs,
) -> Result<()> {
    let module = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let node = node(reg, args, Some(timeout)).await?;
    let ch = node.open_channel(channel).await?;
    let kind = if out { kecho::FilterKind::Out } else { kecho::FilterKind::In };
    let report = ch.install_filter(kind, &module, Duration::from_secs_f64(timeout)).await;
    node.shutdown().await;
    let report = report?;
    let remote = report.installed.saturating_sub(1);
    println!("installed on {remote} member node(s)");
    for r in &report.refused {
        println!("refused: {r}");
    }
    if report.silent > 0 {
        println!("{} member node(s) did not answer", report.silent);
    }
    if remote == 0 && (!report.refused.is_empty() || report.silent > 0) {
        bail!("no member node installed the filter");
    }
    Ok(())
}
