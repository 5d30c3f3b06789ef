//! `kecho sub`: subscribe to a channel and print each event.

use std::time::Duration;

use anyhow::Result;
use kecho::{RecvError, SinkOptions};

use crate::attrs;
use crate::node_args::{node, open, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Channel name.
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    /// Only these event types (repeatable); default all.
    #[arg(long = "type", value_name = "T")]
    types: Vec<String>,
    /// Exit after this many events. Events reported missed count too: once the events received and those reported
    /// missed reach the count, or once every source is gone with an unknown number missed, it exits with a statement
    /// of the loss (and a failure status) rather than waiting forever.
    #[arg(long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// What to do when events arrive faster than they are printed.
    #[arg(long, value_enum, default_value_t = OverflowArg::Block)]
    overflow: OverflowArg,
    /// Queue capacity in events.
    #[arg(long, default_value_t = 4096)]
    capacity: usize,
    /// Content filter, evaluated at every source: a CEL expression over `type` and the event's attributes, e.g.
    /// 'type == "load" && cpu > 0.8 && zone in ["a", "b"]'.
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Attribute this sink advertises to the channel's filters, KEY=VALUE (repeatable; typed as for pub).
    #[arg(long = "attr", value_name = "K=V")]
    attrs: Vec<String>,
    /// Fail if the channel does not exist instead of creating it.
    #[arg(long)]
    existing: bool,
    #[command(flatten)]
    node: NodeArgs,
    #[command(flatten)]
    observe: crate::observe::ObserveArgs,
    /// Give up after this many seconds (default: never).
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OverflowArg {
    Block,
    DropOldest,
    DropNewest,
}

impl From<OverflowArg> for kecho::Overflow {
    fn from(o: OverflowArg) -> Self {
        match o {
            OverflowArg::Block => kecho::Overflow::Block,
            OverflowArg::DropOldest => kecho::Overflow::DropOldest,
            OverflowArg::DropNewest => kecho::Overflow::DropNewest,
        }
    }
}

pub async fn run(a: Args) -> Result<()> {
    let mut opts = SinkOptions::new().types(a.types.clone()).capacity(a.capacity).overflow(a.overflow.into());
    for (k, v) in attrs::parse_all(&a.attrs)?.0 {
        opts = opts.attr(k, v);
    }
    if let Some(expr) = &a.filter {
        // Check before touching the network, so that a typo fails fast.
        kecho::filter::ContentFilter::compile(expr)?;
        opts = opts.filter(expr);
    }
    let node = node(&a.reg, &a.node, a.timeout).await?;
    let observer = a.observe.start(&node).await?;
    let ch = open(&node, &a.channel, a.existing).await?;
    ch.set_remote_filters(a.node.allow_filters);
    let mut sink = ch.sink(opts)?;
    eprintln!("kecho: subscribed to {:?}", a.channel);
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut got = 0u64;
    // Events reported missed, and sources gone with an unknown number missed.
    let mut missed = 0u64;
    let mut lost = 0u64;
    let mut out = std::io::stdout().lock();
    let result = loop {
        if let Some(n) = a.count {
            if got >= n {
                break Ok(());
            }
            if got + missed >= n {
                break Err(anyhow::anyhow!("received {got} of {n} event(s); {missed} reported missed"));
            }
            if lost > 0 && ch.sources() == 0 && sink.is_empty() {
                break Err(anyhow::anyhow!(
                    "received {got} of {n} event(s); {missed} reported missed, and {lost} source(s) gone with an \
                     unknown number missed; no source is left"
                ));
            }
        }
        let next = async {
            tokio::select! {
                r = sink.recv() => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        };
        let r = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(r) => r,
                Err(_) => {
                    break Err(anyhow::anyhow!(
                        "timed out after {:.1} s with {got} event(s) received",
                        a.timeout.unwrap_or_default()
                    ))
                }
            },
            None => next.await,
        };
        match r {
            None => break Ok(()),
            Some(Ok(ev)) => {
                got += 1;
                if let Some(l) = &observer.latency {
                    l.observe(&a.channel, &ev);
                }
                let line = match a.format {
                    Format::Json => attrs::event_json(&ev).to_string(),
                    Format::Text => attrs::event_text(&ev),
                };
                use std::io::Write;
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    break Ok(()); // stdout closed (e.g. piped into head)
                }
            }
            Some(Err(RecvError::Lagged(n))) => {
                missed += n;
                eprintln!("kecho: missed {n} event(s)");
            }
            Some(Err(RecvError::SourceLost(k))) => {
                lost += 1;
                eprintln!("kecho: source {k} is gone; an unknown number of its events were missed");
            }
            Some(Err(RecvError::Expired(n))) => eprintln!("kecho: {n} event(s) expired before they could be received"),
            Some(Err(RecvError::Closed)) => break Err(anyhow::anyhow!("channel closed")),
            Some(Err(e)) => break Err(e.into()),
        }
    };
    drop(out);
    drop(sink);
    drop(observer);
    node.shutdown().await;
    result
}
