//! The agent (2K's Local Resource Manager): the tokio layer around a [`Ledger`]. One task owns the channel I/O:
//! it answers requests and operations, publishes reports (periodically and at once on a change), renews its sink's
//! attributes, ends offers and leases on time, and probes which holders are still members of the channel.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use kecho::filter::{EventView, SinkView};
use kecho::{Attrs, Channel, Event, Node, Overflow, SinkOptions, Source, Value};
use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::expr::{Rank, Requirement};
use crate::ledger::{Ledger, LedgerConfig, LedgerError, Refusal};
use crate::measure::{HostSample, Measurer};
use crate::types::{check_resource_name, Amounts, HolderId, CPUS, GPU, MEM};
use crate::wire::{self, Op};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Its name (the host name by default in the CLI): letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// Static attributes (`zone`, `rack`, ...).
    pub attrs: Attrs,
    /// Cores it offers; `None`: what it measures (if it measures).
    pub cpus: Option<u64>,
    /// Memory it offers in bytes; `None`: what it measures.
    pub mem: Option<u64>,
    /// Other counted resources (`gpu=2`); `gpu` defaults to the GPUs it measures, if any.
    pub resources: Amounts,
    /// Measure the host (`host_*` attributes, default capacities). Off: only what is configured.
    pub measure: bool,
    /// How often it reports when nothing changes.
    pub report_every: Duration,
    /// How long a report stays valid in a view (a silent agent drops out after this).
    pub lifetime: Duration,
    /// Least time between two reports (and updates of the attributes requesters screen on): a change is reported at
    /// once unless one went out less than this ago.
    pub min_report_gap: Duration,
    /// Least time between two updates of the request sink's attributes, which requesters' OUT-filters screen on
    /// until they hold a report of the agent (they screen on its newest report from then on). Each update makes
    /// kecho send the node's snapshot to every member of the channel, which re-derives its routes: far dearer than
    /// a report, which goes to view sinks only (see docs/RESOURCES.md, "Costs"); with N agents the channel's
    /// members re-derive their routes N / `attr_gap` times a second, each time over every sink. 10 minutes by
    /// default: requesters screen on reports, and the sink's attributes are only their fallback for an agent they
    /// have not heard from yet.
    pub attr_gap: Duration,
    /// How often it checks which holders are still on the channel.
    pub probe_every: Duration,
    /// Its answers (offers, refusals, acknowledgements) say what is free now and the ledger's version, so that the
    /// requester's view learns of a change at once instead of with the next report (docs/RESOURCES.md, "Costs").
    pub tell_free: bool,
    /// Hold time, lease limit, holder grace.
    pub ledger: LedgerConfig,
}

impl AgentConfig {
    /// Defaults: measure the host, report every second with a lifetime of 3 s, at most one report per 20 ms,
    /// answers that say what is free.
    pub fn new(name: impl Into<String>) -> Self {
        AgentConfig {
            name: name.into(),
            attrs: Attrs::new(),
            cpus: None,
            mem: None,
            resources: Amounts::new(),
            measure: true,
            report_every: Duration::from_secs(1),
            lifetime: Duration::from_secs(3),
            min_report_gap: Duration::from_millis(20),
            attr_gap: Duration::from_secs(600),
            probe_every: Duration::from_secs(1),
            tell_free: true,
            ledger: LedgerConfig::default(),
        }
    }
}

/// Checks an agent name: 1 to 128 of letters, digits, `.`, `_`, `-`.
pub fn check_agent_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!("agent name `{name}` must be 1 to 128 letters, digits, `.`, `_` or `-`")))
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    name: String,
    epoch: u64,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Starts an agent on `node`: opens `kecho.resources`, measures the host (if configured), publishes its first
    /// report and serves requests until stopped.
    pub async fn start(node: &Node, cfg: AgentConfig) -> Result<Agent> {
        let channel = node.channel(wire::CHANNEL).await?;
        Self::start_on(&channel, cfg).await
    }

    /// Starts an agent on an open `kecho.resources` channel.
    pub async fn start_on(channel: &Channel, cfg: AgentConfig) -> Result<Agent> {
        check_agent_name(&cfg.name)?;
        let mut measurer = Measurer::default();
        let now = Instant::now();
        let host = if cfg.measure { measurer.sample(now.into_std()) } else { HostSample::default() };
        let capacity = capacity(&cfg, &host)?;
        for (k, _) in cfg.attrs.iter() {
            let derived =
                capacity.iter().any(|(r, _)| k == r || k == format!("{r}_free") || k == format!("{r}_reserved"));
            if wire::RESERVED_ATTRS.contains(&k) || k.starts_with("host_") || derived {
                return Err(Error::Config(format!("static attribute `{k}` would shadow one the agent sets")));
            }
        }
        let epoch = rand::random::<u64>();
        let ledger = Arc::new(Mutex::new(Ledger::new(cfg.name.clone(), epoch, capacity, cfg.ledger.clone())));
        let mut state = State {
            cfg,
            epoch,
            seq: 0,
            ledger: ledger.clone(),
            host,
            measurer,
            attrs: Attrs::new(),
            attrs_lv: 0,
            on_sink: Attrs::new(),
            requirements: Default::default(),
            ranks: Default::default(),
            dirty: true,
            last_report: None,
            last_attrs: Some(Instant::now()),
        };
        state.refresh_attrs();
        let sink_opts = {
            let mut o = SinkOptions::new()
                .types([wire::REQUEST, wire::OP])
                // Requests come to every agent the requester's OUT-filter chose; operations to this agent only.
                .filter(&format!("type == \"{}\" || to == \"{}\"", wire::REQUEST, state.cfg.name))
                .capacity(65_536)
                .overflow(Overflow::Block);
            for (k, v) in state.attrs.iter() {
                o = o.attr(k, v.clone());
            }
            state.on_sink = state.attrs.clone();
            o
        };
        let sink = channel.sink(sink_opts)?;
        // One source for answers, reports and the holder probe: its OUT-filter sends every event where the sinks'
        // filters let it, except the probe, which it only uses to read which holders' reply sinks are present.
        let mut replies = channel.source()?;
        let seen: Arc<Mutex<HashSet<HolderId>>> = Arc::default();
        let seen2 = seen.clone();
        replies.set_out_filter(Some(Arc::new(
            move |ev: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>| {
                if ev.ty() != wire::HOLDERS {
                    chosen.extend(0..sinks.len());
                    return;
                }
                let mut s = seen2.lock();
                s.clear();
                for r in sinks.iter() {
                    if let Some(Value::Str(h)) = r.attrs().get("holder") {
                        s.insert(HolderId(h.clone()));
                    }
                }
            },
        )));
        let stop = Arc::new(Notify::new());
        let io = Io { sink, replies, seen, stop: stop.clone() };
        let name = state.cfg.name.clone();
        let task = tokio::spawn(run(state, io));
        Ok(Agent { name, epoch, ledger, stop, task })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its incarnation.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// Reads its ledger (for audits and for remote execution's fence checks).
    pub fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        f(&mut self.ledger.lock())
    }
    /// A check for remote execution, usable after the agent moved: `Ok` when `id` is a confirmed reservation of this
    /// agent whose fence is `fence` (see [`Ledger::check`]).
    pub fn reservation_check(
        &self,
    ) -> impl Fn(&crate::types::ReservationId, u64) -> std::result::Result<(), crate::ledger::LedgerError>
           + Send
           + Sync
           + 'static {
        let ledger = self.ledger.clone();
        move |id, fence| ledger.lock().check(id, fence, Instant::now().into_std()).map(|_| ())
    }
    /// Says goodbye on the channel and stops.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
    /// Stops at once without a goodbye (as if the process died; views drop it when its report runs out).
    pub fn kill(self) {
        self.task.abort();
    }
}

fn capacity(cfg: &AgentConfig, host: &HostSample) -> Result<Amounts> {
    let mut cap = Amounts::new();
    if let Some(c) = cfg.cpus.or_else(|| host.int("host_cores")) {
        cap.set(CPUS, c);
    }
    if let Some(m) = cfg.mem.or_else(|| host.int("host_mem_total")) {
        cap.set(MEM, m);
    }
    if let Some(g) = host.int("host_gpus").filter(|g| *g > 0) {
        cap.set(GPU, g);
    }
    for (k, v) in cfg.resources.iter() {
        check_resource_name(k)?;
        cap.set(k, v);
    }
    if cap.is_empty() {
        return Err(Error::Config("the agent offers nothing: give --cpus, --mem or --resource".into()));
    }
    Ok(cap)
}

struct Io {
    sink: kecho::Sink,
    replies: Source,
    seen: Arc<Mutex<HashSet<HolderId>>>,
    stop: Arc<Notify>,
}

struct State {
    cfg: AgentConfig,
    epoch: u64,
    seq: u64,
    ledger: Arc<Mutex<Ledger>>,
    host: HostSample,
    measurer: Measurer,
    /// Everything it publishes.
    attrs: Attrs,
    /// The ledger's version when `attrs` was built.
    attrs_lv: u64,
    /// The request sink's attributes as last set.
    on_sink: Attrs,
    requirements: lru::Cache<Requirement>,
    ranks: lru::Cache<Rank>,
    dirty: bool,
    last_report: Option<Instant>,
    last_attrs: Option<Instant>,
}

/// A small cache of compiled expressions by their text (requesters tend to send the same few).
mod lru {
    use std::collections::HashMap;
    use std::sync::Arc;

    pub(super) struct Cache<T> {
        map: HashMap<String, Arc<T>>,
    }
    impl<T> Default for Cache<T> {
        fn default() -> Self {
            Cache { map: HashMap::new() }
        }
    }
    impl<T> Cache<T> {
        pub(super) fn get<E>(&mut self, text: &str, compile: impl FnOnce(&str) -> Result<T, E>) -> Result<Arc<T>, E> {
            if let Some(v) = self.map.get(text) {
                return Ok(v.clone());
            }
            let v = Arc::new(compile(text)?);
            if self.map.len() >= 256 {
                self.map.clear();
            }
            self.map.insert(text.to_owned(), v.clone());
            Ok(v)
        }
    }
}

impl State {
    /// Rebuilds the published attributes from the ledger, the host sample and the static attributes.
    fn refresh_attrs(&mut self) {
        let l = self.ledger.lock();
        let mut a = Attrs::new();
        for (k, v) in self.cfg.attrs.iter() {
            a.set(k, v.clone());
        }
        for (k, v) in self.host.attrs.iter() {
            a.set(k, v.clone());
        }
        a.set("unknown", self.host.unknown.join(","));
        let names: Vec<&str> = l.capacity().iter().map(|(k, _)| k).collect();
        a.set("resources", names.join(","));
        let free = l.free();
        for (r, cap) in l.capacity().iter() {
            a.set(r, to_i64(cap));
            a.set(format!("{r}_free"), to_i64(free.amount(r)));
            a.set(format!("{r}_reserved"), to_i64(l.reserved().amount(r)));
        }
        a.set("agent", self.cfg.name.clone());
        self.attrs_lv = l.version();
        drop(l);
        self.attrs = a;
    }

    /// What an answer says of the ledger (if configured): `free_now` (the free amounts), `lv` and `lv_epoch`.
    fn tell(&self, out: &mut Attrs) {
        if !self.cfg.tell_free {
            return;
        }
        let l = self.ledger.lock();
        out.set("free_now", l.free().to_string());
        out.set("lv", to_i64(l.version()));
        out.set("lv_epoch", wire::epoch_attr(self.epoch));
    }

    fn report_attrs(&mut self) -> Attrs {
        self.seq += 1;
        let mut a = self.attrs.clone();
        a.set("epoch", wire::epoch_attr(self.epoch));
        a.set("seq", to_i64(self.seq));
        a.set("lifetime_ms", wire::ms(self.cfg.lifetime));
        a.set("lv", to_i64(self.attrs_lv));
        a
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

async fn run(mut st: State, mut io: Io) {
    let mut next_report = Instant::now();
    let mut next_probe = Instant::now() + st.cfg.probe_every;
    let mut batch: Vec<Event> = Vec::new();
    loop {
        let now = Instant::now();
        // A change goes out at once, unless a report went out less than the minimum gap ago.
        if st.dirty {
            let soon = st.last_report.map_or(now, |t| t + st.cfg.min_report_gap);
            next_report = next_report.min(soon);
        }
        if now >= next_report {
            if st.cfg.measure {
                st.host = st.measurer.sample(now.into_std());
            }
            st.refresh_attrs();
            publish(&mut st, &mut io).await;
            next_report = now + st.cfg.report_every;
        }
        if now >= next_probe {
            io.replies.submit(wire::HOLDERS, &Attrs::new(), b"").await.ok();
            let seen = io.seen.lock().clone();
            let ended = st.ledger.lock().holders(|h| seen.contains(h), now.into_std());
            if !ended.is_empty() {
                tracing::info!(agent = %st.cfg.name, n = ended.len(), "reservations ended: holder gone or lease over");
                st.dirty = true;
            }
            next_probe = now + st.cfg.probe_every;
        }
        let ledger_due = st.ledger.lock().next_deadline().map(Instant::from_std);
        let wake = [Some(next_report), Some(next_probe), ledger_due].into_iter().flatten().min().unwrap_or(next_report);
        tokio::select! {
            ev = io.sink.recv() => {
                let Ok(ev) = ev else {
                    // Lagged cannot happen under Block; a closed sink means the node is gone.
                    if matches!(ev, Err(kecho::RecvError::Closed)) { return; }
                    continue;
                };
                batch.push(ev);
                while let Ok(ev) = io.sink.try_recv() {
                    batch.push(ev);
                    if batch.len() >= 256 { break; }
                }
                for ev in batch.drain(..) {
                    handle(&mut st, &mut io, &ev).await;
                }
            }
            _ = tokio::time::sleep_until(wake) => {
                if !st.ledger.lock().expire(Instant::now().into_std()).is_empty() {
                    st.dirty = true;
                }
            }
            _ = io.stop.notified() => {
                let a = Attrs::new().with("agent", st.cfg.name.clone()).with("epoch", wire::epoch_attr(st.epoch));
                io.replies.submit(wire::BYE, &a, b"").await.ok();
                return;
            }
        }
    }
}

async fn publish(st: &mut State, io: &mut Io) {
    let a = st.report_attrs();
    let now = Instant::now();
    if st.last_attrs.is_none_or(|t| t.checked_add(st.cfg.attr_gap).is_some_and(|due| now >= due)) {
        for (k, v) in st.attrs.iter() {
            if st.on_sink.get(k) != Some(v) {
                io.sink.set_attr(k, v.clone());
            }
        }
        st.on_sink = st.attrs.clone();
        st.last_attrs = Some(now);
    }
    if let Err(e) = io.replies.submit(wire::REPORT, &a, b"").await {
        tracing::warn!(error = %e, "report not sent");
    }
    st.dirty = false;
    st.last_report = Some(Instant::now());
}

async fn handle(st: &mut State, io: &mut Io, ev: &Event) {
    let r = match ev.ty() {
        wire::REQUEST => on_request(st, ev.attrs()),
        wire::OP => on_op(st, ev.attrs()),
        _ => return,
    };
    if let Some((ty, mut attrs)) = r {
        st.tell(&mut attrs);
        if let Err(e) = io.replies.submit(ty, &attrs, b"").await {
            tracing::warn!(error = %e, "answer not sent");
        }
    }
    // The request sink's attributes (what requesters' OUT-filters screen on) and the report go out together, at
    // most once per `min_report_gap`: every attribute change makes kecho send this node's snapshot to every member,
    // so updating them per request would cost every node of the channel work per request.
}

fn on_request(st: &mut State, a: &Attrs) -> Option<(&'static str, Attrs)> {
    let holder = wire::holder_of(a).ok()?;
    let req = wire::int_attr(a, "req").ok()?;
    let mut out = Attrs::new().with("to", holder.0.clone()).with("req", req).with("agent", st.cfg.name.clone());
    let refuse = |mut out: Attrs, reason: String| {
        out.set("reason", reason);
        Some((wire::REFUSE, out))
    };
    let amounts = match wire::amounts_of(a) {
        Ok(x) => x,
        Err(e) => return refuse(out, e.to_string()),
    };
    let now = Instant::now().into_std();
    // The requirement is checked on the attributes as they are now (offers may have been made or lapsed since the
    // last report).
    if !st.ledger.lock().expire(now).is_empty() {
        st.dirty = true;
    }
    if st.dirty {
        st.refresh_attrs();
    }
    if let Some(text) = wire::opt_str(a, "require") {
        match st.requirements.get(text, Requirement::compile) {
            Ok(r) if r.matches(&st.attrs) => {}
            Ok(_) => return refuse(out, Refusal::Requirement { expr: text.to_owned() }.to_string()),
            Err(e) => return refuse(out, e.to_string()),
        }
    }
    let rank = match wire::opt_str(a, "rank") {
        Some(text) => match st.ranks.get(text, Rank::compile) {
            Ok(r) => r.eval(&st.attrs),
            Err(e) => return refuse(out, e.to_string()),
        },
        None => None,
    };
    let mut l = st.ledger.lock();
    match l.offer(&holder, &amounts, now) {
        Ok(e) => {
            wire::id_attrs(&mut out, &e.id);
            out.set("amounts", e.amounts.to_string());
            out.set("hold_ms", wire::ms(l.config().hold));
            if let Some(r) = rank {
                out.set("rank", r);
            }
            drop(l);
            st.dirty = true;
            Some((wire::OFFER, out))
        }
        Err(refusal) => {
            if let Refusal::Insufficient { resource, free, .. } = &refusal {
                out.set("resource", resource.clone());
                out.set("free", to_i64(*free));
            }
            if let Refusal::UnknownResource { resource, .. } = &refusal {
                out.set("unknown", resource.clone());
            }
            drop(l);
            refuse(out, refusal.to_string())
        }
    }
}

fn on_op(st: &mut State, a: &Attrs) -> Option<(&'static str, Attrs)> {
    let holder = wire::holder_of(a).ok()?;
    let corr = wire::int_attr(a, "corr").ok()?;
    let op = Op::parse(wire::opt_str(a, "op")?)?;
    let mut out = Attrs::new().with("to", holder.0.clone()).with("corr", corr);
    let id = match wire::id_of(a) {
        Ok(id) => id,
        Err(e) => {
            out.set("ok", false);
            out.set("reason", e.to_string());
            return Some((wire::ACK, out));
        }
    };
    wire::id_attrs(&mut out, &id);
    if id.epoch != st.epoch {
        out.set("ok", false);
        out.set("reason", LedgerError::Unknown.to_string());
        return Some((wire::ACK, out));
    }
    let now = Instant::now().into_std();
    let lease = wire::dur(a, "lease_ms").unwrap_or_default();
    let mut l = st.ledger.lock();
    let result = match op {
        Op::Confirm => l.confirm(&id, &holder, lease, matches!(a.get("attached"), Some(Value::Bool(true))), now),
        Op::Renew => l.renew(&id, &holder, lease, now),
        Op::Resize => match wire::amounts_of(a) {
            Ok(amounts) => l.resize(&id, &holder, &amounts, now),
            Err(e) => {
                out.set("ok", false);
                out.set("reason", e.to_string());
                return Some((wire::ACK, out));
            }
        },
        Op::Decline => {
            let ok = l.decline(&id, &holder, now);
            drop(l);
            st.dirty |= ok;
            // Nobody waits for the answer to a decline.
            return None;
        }
        Op::Release => {
            l.release(&id, now).map(|amounts| crate::ledger::Grant { id: id.clone(), amounts, until: now, fence: 0 })
        }
    };
    drop(l);
    match result {
        Ok(g) => {
            st.dirty = true;
            out.set("ok", true);
            out.set("amounts", g.amounts.to_string());
            out.set("lease_ms", wire::ms(g.until.saturating_duration_since(now)));
            out.set("fence", to_i64(g.fence));
        }
        Err(e) => {
            out.set("ok", false);
            out.set("reason", e.to_string());
        }
    }
    Some((wire::ACK, out))
}
