//! `kecho sub`: subscribe to a channel and print each event.

use std::time::Duration;

use anyhow::Result;
use kecho::{Event, RecvError, Sink, SinkOptions};
use kecho_store::{Ask, CatchUp, DurableError, DurableSink, ReplayClient, Unknown};

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
    /// Exit after this many events. Events reported missed or expired count too: once the events received and those
    /// reported missed or expired reach the count, or once every source is gone with an unknown number missed, it exits with a statement
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
    /// A durable sink named NAME: its position per source is kept in --state-dir, and after a restart it prints
    /// nothing twice and reports the events it missed while it was away. With a recorder on the channel (`kecho
    /// record`) it gets them replayed first, including those of sources that began while it was away (from its
    /// starting point at that recorder, taken when it first runs); without one, a source it never heard of cannot be
    /// known (docs/DURABILITY.md). Replays are filtered by --type and --filter as live events are.
    #[arg(long, value_name = "NAME", requires = "state_dir")]
    durable: Option<String>,
    /// Where durable sinks keep their positions (a directory per name).
    #[arg(long, value_name = "DIR", requires = "durable")]
    state_dir: Option<std::path::PathBuf>,
    /// Start with the newest N events of the channel, from a recorder (`kecho record`), before the live ones.
    #[arg(long, value_name = "N", default_value_t = 0)]
    last: u64,
    /// When events are reported missed, fetch them from a recorder (`kecho record`) if one is present; only those
    /// it does not have either are reported (--durable and --last sinks always do).
    #[arg(long)]
    recover: bool,
    /// How long to wait for a recorder to replay from (with --durable or --last), in seconds. A new durable sink
    /// without --last does not wait (it has nothing to replay); while it has no starting point at a recorder it looks
    /// for one every 250 ms.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    replay_wait: f64,
}

/// How long a new durable sink waits for a recorder before it goes on (it looks again every [`LOOK_EVERY`]): not at
/// all, as its first answer has nothing to replay (it only gives a starting point) and its events would queue
/// meanwhile.
const NEW_WAIT: Duration = Duration::ZERO;
/// How long a durable sink waits to join the replay channel before its sink joins the channel, to take its first
/// starting point before (see `run`).
const PREFETCH_WAIT: Duration = Duration::from_millis(500);
/// How often a durable sink with no starting point looks for a recorder.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// What the receive loop got.
enum Next {
    Got(Result<Result<Event, RecvError>>),
    /// The durable sink holds an event back behind events of its source it may have missed: fill the gap.
    Behind,
    /// Time to look for a recorder.
    Look,
    Stop,
}

/// The sink, plain or durable.
enum Input {
    Plain(Sink),
    Durable(Box<DurableSink>),
}

impl Input {
    async fn recv(&mut self) -> Next {
        match self {
            Input::Plain(s) => Next::Got(Ok(s.recv().await)),
            Input::Durable(d) => match d.recv().await {
                Ok(ev) => Next::Got(Ok(Ok(ev))),
                Err(DurableError::Recv(e)) => Next::Got(Ok(Err(e))),
                Err(DurableError::Behind(_)) => Next::Behind,
                Err(e) => Next::Got(Err(e.into())),
            },
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Input::Plain(s) => s.is_empty(),
            Input::Durable(d) => d.is_empty(),
        }
    }

    /// Writes the durable sink's position of the last event printed.
    fn commit(&mut self) -> Result<()> {
        if let Input::Durable(d) = self {
            d.commit()?;
        }
        Ok(())
    }
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
    let mut client = None;
    let wants_client = a.durable.is_some() || a.last > 0 || a.recover;
    let who = format!("{}-{}", node.id(), a.durable.as_deref().unwrap_or("sink"));
    let opening = ReplayClient::open(&node, &a.channel, &who);
    tokio::pin!(opening);
    // A durable sink's first starting point, if it is new: a recorder's next index taken before its sink joins, so
    // that its first catch-up replays what a source that begins as it joins sent before seeing it. Only if a recorder
    // is there at once (a new sink does not wait for one, see NEW_WAIT) and the replay channel is joined within
    // PREFETCH_WAIT: the sink must not wait long to join (the replay channel's contact may be a node that died, whose
    // lease has not run out).
    let mut start = None;
    if wants_client {
        if let Ok(c) = tokio::time::timeout(PREFETCH_WAIT, &mut opening).await {
            let c = client.insert(c?);
            if a.durable.is_some() {
                start = c.fetch(&Ask::default(), Duration::ZERO).await?.and_then(|r| r.recorder.zip(r.next));
            }
        }
    }
    let sink = ch.sink(opts)?;
    let mut sink = match (&a.durable, &a.state_dir) {
        (Some(name), Some(dir)) => Input::Durable(Box::new(DurableSink::open(sink, dir, name)?)),
        _ if a.last > 0 || a.recover => Input::Durable(Box::new(DurableSink::in_memory(sink))),
        _ => Input::Plain(sink),
    };
    eprintln!("kecho: subscribed to {:?}", a.channel);
    let wait = Duration::from_secs_f64(a.replay_wait.max(0.0));
    // A durable sink that comes back, or a late joiner asking for the newest events: what a recorder has first.
    let mut replayed = Vec::new();
    if wants_client && client.is_none() {
        client = Some(opening.await?);
    }
    if let (Input::Durable(d), Some(c)) = (&mut sink, &mut client) {
        if let Some(start) = start {
            d.start_at(start)?;
        }
        // A new durable sink only takes its starting point: it need not wait, as it receives every event from now on
        // while it runs, and takes one when a recorder appears (below).
        let first_wait = if a.durable.is_some() && d.is_new() && a.last == 0 { wait.min(NEW_WAIT) } else { wait };
        match d.catch_up(c, a.last, first_wait, true).await? {
            Some(items) => {
                let n = items.iter().filter(|i| matches!(i, CatchUp::Event(_))).count();
                eprintln!("kecho: {n} event(s) replayed from a recorder");
                replayed = items;
            }
            None if a.durable.is_some() && d.is_new() => eprintln!(
                "kecho: no recorder on the channel yet: if this sink is stopped, it will be told of the events it misses \
                 only from sources it has heard of (a source it never heard of cannot be known without a recorder; \
                 if one appears while this sink runs, it takes a starting point there)"
            ),
            None if a.durable.is_some() => eprintln!(
                "kecho: no recorder on the channel; nothing replayed, and the events of sources this sink never heard \
                 of, sent while it was away, cannot be known"
            ),
            None if a.last > 0 => eprintln!("kecho: no recorder on the channel; nothing replayed"),
            None => {}
        }
    }
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut got = 0u64;
    // Events reported missed, and sources gone with an unknown number missed.
    let mut missed = 0u64;
    let mut lost = 0u64;
    // Events that expired (their deadline passed before this sink could take them): accounted for as missed ones
    // are. Under overload the notices come many a second, each for a few events, so they are said at most once a
    // second (`unsaid` holds the count not said yet; the rest is said when the loop ends).
    let mut expired = 0u64;
    let (mut unsaid, mut said_at): (u64, Option<std::time::Instant>) = (0, None);
    let mut looking = true;
    let mut look_tick = tokio::time::interval(LOOK_EVERY);
    look_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = std::io::stdout().lock();
    let (n, m) = print_replayed(&mut out, replayed, a.format, true)?;
    got += n;
    missed += m;
    let result = loop {
        if let Some(n) = a.count {
            if got >= n {
                break Ok(());
            }
            if got + missed + expired >= n {
                let expired = if expired > 0 {
                    format!(", {expired} expired before they could be received")
                } else {
                    String::new()
                };
                break Err(anyhow::anyhow!("received {got} of {n} event(s); {missed} reported missed{expired}"));
            }
            if lost > 0 && ch.sources() == 0 && sink.is_empty() {
                break Err(anyhow::anyhow!(
                    "received {got} of {n} event(s); {missed} reported missed, and {lost} source(s) gone with an \
                     unknown number missed; no source is left"
                ));
            }
        }
        // A durable sink with no starting point at a recorder looks for one now and then while it runs.
        let look = looking
            && client.is_some()
            && a.durable.is_some()
            && matches!(&sink, Input::Durable(d) if d.starting_points().is_empty());
        let next = async {
            tokio::select! {
                r = sink.recv() => r,
                _ = look_tick.tick(), if look => Next::Look,
                _ = tokio::signal::ctrl_c() => Next::Stop,
            }
        };
        let r: Next = match deadline {
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
        let r = match r {
            Next::Stop => None,
            Next::Got(Ok(r)) => Some(r),
            Next::Got(Err(e)) => break Err(e),
            Next::Behind => {
                // Events of a source before the event held back, which may have been sent while it did not yet send
                // to this sink (it began as this sink joined) or after its position (a restart): from a recorder, as
                // a catch-up does, or said missed. The recorder may be a moment behind: asked again (about 2 s).
                if let (Input::Durable(d), Some(c)) = (&mut sink, &mut client) {
                    let items = d.fill(c, 20, Duration::from_millis(100)).await?;
                    let (n, m) = print_replayed(&mut out, items, a.format, true)?;
                    (got, missed) = (got + n, missed + m);
                }
                continue;
            }
            Next::Look => {
                if let (Input::Durable(d), Some(c)) = (&mut sink, &mut client) {
                    if c.recorder_present(Duration::ZERO).await {
                        if let Some(items) = d.catch_up(c, 0, Duration::ZERO, false).await? {
                            let (n, m) = print_replayed(&mut out, items, a.format, true)?;
                            (got, missed) = (got + n, missed + m);
                            if !d.starting_points().is_empty() {
                                eprintln!(
                                    "kecho: a recorder is on the channel now: this sink has a starting point there \
                                     ({n} event(s) replayed)"
                                );
                            }
                            // Answered: a recorder that gave no starting point (an earlier version) will not later.
                            looking = false;
                        }
                    }
                }
                continue;
            }
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
                // With --recover (or --durable, or --last), a recorder may have them: fetch what follows each
                // source's last event here. (A durable sink or a late joiner also gets here when its sources began
                // sending to it only after its first catch-up was answered; the recorder has what came between.)
                let mut left = n;
                if let (Input::Durable(d), Some(c)) = (&mut sink, &mut client) {
                    // The recorder receives the channel's events as this sink does and may not have recorded the
                    // newest of the missed ones yet: ask again for what follows (about 2 s at most) until the answers
                    // cover the loss or show a gap the recorder has too. Taking the loss for missed at the first
                    // answer reported events the recorder had a moment later (seen in a loaded test run).
                    let (mut recovered, mut gaps, mut answered) = (0u64, 0u64, false);
                    for _ in 0..20 {
                        let Some(items) = d.catch_up(c, 0, Duration::ZERO, false).await? else { break };
                        answered = true;
                        let (r, g) = print_replayed(&mut out, items, a.format, false)?;
                        (recovered, gaps) = (recovered + r, gaps + g);
                        if recovered >= n || g > 0 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    if answered {
                        got += recovered;
                        // Replayed events beyond the loss (a source still sending) make this a lower bound; the gaps
                        // the recorder has too are certain.
                        left = n.saturating_sub(recovered).max(gaps);
                        eprintln!("kecho: {recovered} event(s) of {n} missed recovered from a recorder");
                    }
                }
                if left > 0 {
                    missed += left;
                    eprintln!("kecho: missed {left} event(s)");
                }
            }
            Some(Err(RecvError::SourceLost(k))) => {
                lost += 1;
                eprintln!("kecho: source {k} is gone; an unknown number of its events were missed");
            }
            Some(Err(RecvError::Expired(n))) => {
                expired += n;
                unsaid += n;
                if said_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    eprintln!("kecho: {unsaid} event(s) expired before they could be received");
                    (unsaid, said_at) = (0, Some(std::time::Instant::now()));
                }
            }
            Some(Err(RecvError::Closed)) => break Err(anyhow::anyhow!("channel closed")),
            Some(Err(e)) => break Err(e.into()),
        }
    };
    if unsaid > 0 {
        eprintln!("kecho: {unsaid} event(s) expired before they could be received");
    }
    let committed = sink.commit();
    drop(out);
    drop(sink);
    drop(observer);
    node.shutdown().await;
    committed?;
    result
}

/// Prints a catch-up's events; returns (events printed, events missed), and with `say` says what was missed.
fn print_replayed(out: &mut impl std::io::Write, items: Vec<CatchUp>, format: Format, say: bool) -> Result<(u64, u64)> {
    let (mut got, mut missed) = (0, 0);
    for item in items {
        match item {
            CatchUp::Missed(n) => {
                missed += n;
                if say {
                    eprintln!("kecho: missed {n} event(s)");
                }
            }
            CatchUp::Unknown(why) => {
                if say {
                    eprintln!("kecho: {}", unknown(&why));
                }
            }
            CatchUp::Event(r) => {
                got += 1;
                let line = match format {
                    Format::Json => attrs::recorded_json(&r).to_string(),
                    Format::Text => attrs::recorded_text(&r),
                };
                writeln!(out, "{line}")?;
            }
        }
    }
    out.flush()?;
    Ok((got, missed))
}

/// What a catch-up could not account for, said.
fn unknown(why: &Unknown) -> String {
    match why {
        Unknown::NoStart { recorder, others } if others.is_empty() => format!(
            "this sink had no starting point at recorder {recorder} (it began with no recorder, or its state was \
             written by an earlier version): events of sources it never heard of, recorded before now, cannot be known"
        ),
        Unknown::NoStart { recorder, others } => format!(
            "the recorder(s) this sink has a starting point at ({}) are not on the channel and recorder {recorder} \
             answered: events of sources this sink never heard of, recorded before now, cannot be known",
            others.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ),
        Unknown::Deleted { recorder, records } => format!(
            "recorder {recorder} no longer holds {records} event(s) recorded after this sink's starting point (deleted \
             beyond its size bound): those of sources this sink never heard of are missed, how many is not known"
        ),
        Unknown::Began { source, events } => format!(
            "the first event of source {source} here came after {events} of its event(s) this sink did not receive; \
             whether they were sent after this sink's starting point cannot be known (no recorder answered, or it \
             cannot say what it recorded of the source)"
        ),
        Unknown::OldRecorder => "the recorder speaks an earlier version of the replay exchange: events of sources \
                                 this sink never heard of cannot be known"
            .to_owned(),
    }
}
