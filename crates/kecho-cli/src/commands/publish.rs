//! `kecho pub`: publish events on a channel.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::AsyncBufReadExt;

use crate::attrs;
use crate::node_args::{node, open, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Channel name.
    channel: String,
    /// Payload text, or `-` to read one event per line from standard input.
    payload: Option<String>,
    #[command(flatten)]
    reg: RegistryArg,
    /// Event type.
    #[arg(long = "type", value_name = "T", default_value = "event")]
    ty: String,
    /// Attribute KEY=VALUE (repeatable). VALUE is read as integer, float, true/false or text; force a type with
    /// KEY:int=, KEY:float=, KEY:bool=, KEY:str= or KEY:hex= (bytes).
    #[arg(long = "attr", value_name = "K=V")]
    attrs: Vec<String>,
    /// OUT-filter choosing which sinks get each event: all, none, rr, random, weighted:ATTR, hash:ATTR,
    /// least:ATTR:N, most:ATTR:N or p2c:ATTR (ATTR is a sink attribute, or for hash an event attribute).
    #[arg(long, value_name = "SPEC")]
    select: Option<String>,
    /// Number of events (default 1; with `-`, every line).
    #[arg(long)]
    count: Option<u64>,
    /// Events per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Payload size in bytes when no payload text is given (filled with 'x').
    #[arg(long)]
    size: Option<usize>,
    /// Wait until this many sinks are present before publishing.
    #[arg(long)]
    wait_sinks: Option<usize>,
    /// Seconds to wait for sinks (and for the channel).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Fail if the channel does not exist instead of creating it.
    #[arg(long)]
    existing: bool,
    /// Add the attribute kecho.sent_us (the submit time, microseconds since the Unix epoch) to every event, so that
    /// sinks with --metrics measure delivery latency (across hosts, as exact as their clocks agree).
    #[arg(long)]
    stamp: bool,
    /// Durability: keep up to this many of the events that cut-off sinks miss, and replay them to those sinks when
    /// their node comes back (in order, before newer events); what falls outside is reported missed. See
    /// docs/DURABILITY.md.
    #[arg(long, value_name = "N")]
    history_events: Option<usize>,
    /// Durability: keep at most this many bytes of such events (with --history-events, or alone).
    #[arg(long, value_name = "BYTES")]
    history_bytes: Option<usize>,
    /// Durability: keep no such event longer than this many seconds (with --history-events, or alone).
    #[arg(long, value_name = "SECS")]
    history_secs: Option<f64>,
    /// Priority of the events, 0 (the default) to 3: at this node's links they overtake queued events of lower
    /// priority from other sources.
    #[arg(long, value_name = "N")]
    priority: Option<u8>,
    /// Deadline of each event, in milliseconds from its submission: an event not received by then is not sent or
    /// delivered, and its sinks are told it expired (across hosts, as exact as their clocks agree).
    #[arg(long, value_name = "MS")]
    deadline_ms: Option<f64>,
    /// Best-effort events: over QUIC links, each event that fits in a datagram is sent as one (never waiting for a
    /// retransmission or behind other traffic; a lost one is reported to its sinks as missed, order kept). Over TCP
    /// nothing changes.
    #[arg(long)]
    best_effort: bool,
    /// Seconds to wait at the end for the links to send what is still queued. Whatever is still queued then is
    /// abandoned: `pub` says how many events that was and exits with an error. A link that sent everything ends the
    /// wait at once.
    #[arg(long, value_name = "SECS", default_value_t = kecho::SHUTDOWN_DRAIN.as_secs_f64())]
    linger: f64,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    observe: crate::observe::ObserveArgs,
}

pub async fn run(a: Args) -> Result<()> {
    let attrs = attrs::parse_all(&a.attrs)?;
    if a.ty.is_empty() {
        bail!("--type must not be empty");
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be a positive number of events per second");
        }
    }
    if !(a.timeout >= 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a non-negative number of seconds");
    }
    if !(a.linger >= 0.0 && a.linger.is_finite()) {
        bail!("--linger must be a non-negative number of seconds");
    }
    // Checked before anything starts, so that a bad value is the error reported.
    let opts = options(&a)?;
    let selector = match &a.select {
        Some(spec) => Some(std::sync::Arc::new(spec.parse::<kecho::filter::Selector>()?)),
        None => None,
    };
    let node = node(&a.reg, &a.node, Some(a.timeout)).await?;
    let observer = a.observe.start(&node).await?;
    let ch = open(&node, &a.channel, a.existing).await?;
    ch.set_remote_filters(a.node.allow_filters);
    let mut src = ch.source()?;
    if let Some(h) = history(&a)? {
        src.set_history(h);
    }
    src.set_options(opts);
    let mut attrs = attrs;
    if let Some(sel) = selector {
        src.set_out_filter(Some(sel));
    }
    if let Some(k) = a.wait_sinks {
        ch.wait_for_sinks(k, Duration::from_secs_f64(a.timeout)).await?;
    }
    let mut ticker = a.rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut sent = 0u64;
    if a.payload.as_deref() == Some("-") {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading standard input")? {
            if a.count.is_some_and(|n| sent >= n) {
                break;
            }
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            if a.stamp {
                kecho_metrics::stamp(&mut attrs);
            }
            src.submit(&a.ty, &attrs, line.as_bytes()).await?;
            sent += 1;
        }
    } else {
        let payload: Vec<u8> = match (&a.payload, a.size) {
            (Some(p), _) => p.clone().into_bytes(),
            (None, Some(n)) => vec![b'x'; n],
            (None, None) => Vec::new(),
        };
        let count = a.count.unwrap_or(1);
        for _ in 0..count {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            if a.stamp {
                kecho_metrics::stamp(&mut attrs);
            }
            src.submit(&a.ty, &attrs, &payload).await?;
            sent += 1;
        }
    }
    let stats = ch.stats();
    drop(src);
    drop(observer);
    let report = node.shutdown_within(Duration::from_secs_f64(a.linger)).await;
    eprintln!(
        "kecho: published {sent} event(s) ({} frame(s) handed to links, {} dropped, {} expired)",
        stats.sent, stats.dropped, stats.expired
    );
    let abandoned = report.events_abandoned();
    for u in &report.undrained {
        if u.frames == 0 {
            // Everything was handed to the connection; the other node had not closed its side yet.
            eprintln!(
                "kecho: link to node {} ({}) still open after --linger {}s: everything queued was written, its \
                 arrival is not confirmed",
                u.node, u.addr, a.linger
            );
            continue;
        }
        let state = if u.up { "still sending" } else { "down" };
        eprintln!(
            "kecho: link to node {} ({}) {state} after --linger {}s: {} event(s) still queued ({} frame(s), {} bytes), \
             abandoned",
            u.node, u.addr, a.linger, u.events, u.frames, u.bytes
        );
    }
    if abandoned > 0 {
        bail!(
            "{abandoned} event(s) were still queued when the links were closed after --linger {}s and never sent",
            a.linger
        );
    }
    Ok(())
}

/// The events' priority, deadline and delivery from --priority, --deadline-ms and --best-effort.
fn options(a: &Args) -> Result<kecho::EventOptions> {
    let mut o = kecho::EventOptions::new();
    if a.best_effort {
        o = o.best_effort(true);
    }
    if let Some(p) = a.priority {
        o = o.priority(kecho::Priority::new(p).context("--priority")?);
    }
    if let Some(ms) = a.deadline_ms {
        if !(ms > 0.0 && ms.is_finite()) {
            bail!("--deadline-ms must be a positive number of milliseconds");
        }
        o = o.deadline(Duration::from_secs_f64(ms / 1000.0));
    }
    Ok(o)
}

/// The source's history from the --history-* flags, if any is given.
fn history(a: &Args) -> Result<Option<kecho::History>> {
    if a.history_events.is_none() && a.history_bytes.is_none() && a.history_secs.is_none() {
        return Ok(None);
    }
    let mut h = kecho::History::events(a.history_events.unwrap_or(usize::MAX));
    if let Some(b) = a.history_bytes {
        h = h.bytes(b);
    }
    if let Some(s) = a.history_secs {
        if !(s > 0.0 && s.is_finite()) {
            bail!("--history-secs must be a positive number of seconds");
        }
        h = h.age(Duration::from_secs_f64(s));
    }
    Ok(Some(h))
}
