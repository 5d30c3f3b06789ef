//! `kecho resources`: the cluster view (2K's Global Resource Manager) and discovery by QoS specification.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{bail, Result};
use kecho::Value;
use kecho_resources::types::human;
use kecho_resources::view::ViewEntry;
use kecho_resources::{Amounts, Requirement, View};
use serde_json::{json, Map};
use tokio::time::Instant;

use crate::attrs;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only agents whose attributes satisfy this CEL expression, e.g. 'mem_free >= 2e9 && zone == "a"'.
    #[arg(long = "where", value_name = "EXPR")]
    filter: Option<String>,
    /// Only agents with at least these free amounts, e.g. cpus=2,mem=4G.
    #[arg(long, value_name = "AMOUNTS")]
    need: Option<String>,
    /// Output format: one line per agent.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// Keep running and print the view again whenever it changes.
    #[arg(long)]
    watch: bool,
    /// Seconds to collect reports before printing (agents report every second by default).
    #[arg(long, default_value_t = 1.5)]
    wait: f64,
    /// The channel agents report on.
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

pub async fn run(a: Args) -> Result<()> {
    // Bad input fails before touching the network.
    let req = a.filter.as_deref().map(Requirement::compile).transpose()?;
    let need: Amounts = a.need.as_deref().unwrap_or("").parse()?;
    if !(a.wait >= 0.0 && a.wait.is_finite()) {
        bail!("--wait must be a number of seconds");
    }
    let node = node(&a.reg, &a.node, None).await?;
    let mut view = View::start_on(&node.channel(&a.channel).await?)?;
    tokio::time::sleep(Duration::from_secs_f64(a.wait)).await;
    let tty = std::io::stdout().is_terminal();
    loop {
        let snap = view.snapshot();
        let (yes, _) = snap.candidates(&need, req.as_ref());
        let now = Instant::now().into_std();
        let mut out = std::io::stdout().lock();
        if a.watch && tty && a.format == Format::Text {
            // Redraw in place on a terminal.
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let mut text = String::new();
        for e in &yes {
            let line = match a.format {
                Format::Text => line(e, now),
                Format::Json => json_line(e, now).to_string(),
            };
            text.push_str(&line);
            text.push('\n');
        }
        if yes.is_empty() && a.format == Format::Text {
            text.push_str(if snap.is_empty() { "(no agents)\n" } else { "(no agent matches)\n" });
        }
        if a.watch && !tty {
            text.push('\n');
        }
        if out.write_all(text.as_bytes()).and_then(|_| out.flush()).is_err() {
            break;
        }
        drop(out);
        if !a.watch {
            break;
        }
        tokio::select! {
            r = view.changed() => r?,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    node.shutdown().await;
    Ok(())
}

fn line(e: &ViewEntry, now: std::time::Instant) -> String {
    let r = &e.report;
    let cap = r.capacity();
    let free = r.free();
    let reserved = r.reserved();
    let mut parts = Vec::new();
    for (k, c) in cap.iter() {
        parts.push(format!(
            "{k} {}/{} free ({} reserved)",
            human(k, free.amount(k)),
            human(k, c),
            human(k, reserved.amount(k))
        ));
    }
    let mut extra = Vec::new();
    let derived = |k: &str| {
        cap.iter().any(|(r, _)| k == r || k == format!("{r}_free") || k == format!("{r}_reserved"))
            || matches!(k, "agent" | "epoch" | "seq" | "lifetime_ms" | "lv" | "resources")
    };
    for (k, v) in r.attrs.iter() {
        if derived(k) || (k == "unknown" && matches!(v, Value::Str(s) if s.is_empty())) {
            continue;
        }
        let v = match v {
            Value::Float(f) => format!("{f:.2}"),
            Value::Str(s) => s.clone(),
            other => attrs::value_text(other),
        };
        extra.push(format!("{k}={v}"));
    }
    format!("{:<16} {}  {}  age {:.1}s", r.agent, parts.join(", "), extra.join(" "), e.age(now).as_secs_f64())
}

/// An agent as JSON: `name`, `attrs`, `capacity`, `free`, `reserved`, `unknown`, `age_ms` (also `kecho ui`'s).
pub(crate) fn json_line(e: &ViewEntry, now: std::time::Instant) -> serde_json::Value {
    let r = &e.report;
    let mut attrs = Map::new();
    for (k, v) in r.attrs.iter() {
        attrs.insert(k.to_owned(), attrs::value_json(v));
    }
    let amounts = |a: Amounts| a.iter().map(|(k, v)| (k.to_owned(), json!(v))).collect::<Map<_, _>>();
    json!({
        "name": r.agent,
        "attrs": attrs,
        "capacity": amounts(r.capacity()),
        "free": amounts(r.free()),
        "reserved": amounts(r.reserved()),
        "unknown": r.unknown,
        "age_ms": e.age(now).as_millis() as u64,
    })
}
