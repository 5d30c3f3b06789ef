//! The requester's library API: reserve by QoS specification, renew, resize (renegotiation), release, and a handle
//! that keeps a reservation alive while it is held.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kecho::filter::{EventView, SinkView};
use kecho::{Attrs, Channel, Node, Overflow, SinkOptions, Source, Value};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::expr::{Rank, Requirement};
use crate::negotiate::{explain, pick, screen, Decision, Miss, Negotiation, OfferInfo};
use crate::types::{Amounts, HolderId, ReservationId};
use crate::watch::View;
use crate::wire::{self, Op};

/// A QoS request.
#[derive(Debug, Clone)]
pub struct Spec {
    /// What each reservation holds (`cpus`, `mem` in bytes, any counted resource).
    pub amounts: Amounts,
    /// A CEL expression over an agent's attributes that must hold.
    pub require: Option<String>,
    /// A CEL expression over an agent's attributes, higher is better.
    pub rank: Option<String>,
    /// The lease asked for.
    pub lease: Duration,
    /// How many reservations, on distinct agents, all or nothing.
    pub count: usize,
    /// Attached (ends when this requester leaves the channel) or detached (lives by its lease alone).
    pub attached: bool,
    /// How long to wait for offers.
    pub window: Duration,
    /// Ask at most this many agents (the best by rank over their published attributes; 0: every one that can
    /// serve, as in the paper).
    pub fanout: usize,
    /// Negotiation rounds before giving up (a round fails when offers lapse or every agent asked refuses).
    pub attempts: u32,
}

impl Spec {
    /// These amounts, no requirement or rank, a lease of 30 s, one reservation, attached, a window of 250 ms, every
    /// capable agent asked, 3 rounds.
    pub fn new(amounts: Amounts) -> Self {
        Spec {
            amounts,
            require: None,
            rank: None,
            lease: Duration::from_secs(30),
            count: 1,
            attached: true,
            window: Duration::from_millis(250),
            fanout: 0,
            attempts: 3,
        }
    }
    /// Sets the requirement.
    pub fn require(mut self, expr: impl Into<String>) -> Self {
        self.require = Some(expr.into());
        self
    }
    /// Sets the rank.
    pub fn rank(mut self, expr: impl Into<String>) -> Self {
        self.rank = Some(expr.into());
        self
    }
    /// Sets the lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// Sets the count.
    pub fn count(mut self, n: usize) -> Self {
        self.count = n.max(1);
        self
    }
    /// Detached: the reservation outlives this requester and ends with its lease or a release.
    pub fn detached(mut self) -> Self {
        self.attached = false;
        self
    }
    /// Sets the fanout.
    pub fn fanout(mut self, n: usize) -> Self {
        self.fanout = n;
        self
    }
    /// Sets the offer window.
    pub fn window(mut self, w: Duration) -> Self {
        self.window = w;
        self
    }
}

/// A confirmed reservation, as its holder knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    /// Its id (`kecho release` takes it).
    pub id: ReservationId,
    /// What it holds.
    pub amounts: Amounts,
    /// The lease the agent granted.
    pub lease: Duration,
    /// Until when the holder may count on it: the lease counted from when the holder *sent* the confirmation or
    /// renewal that the agent granted, so it ends no later than the agent's.
    pub valid_until: Instant,
    /// The fence number to present with work done under it.
    pub fence: u64,
    /// Its rank at the agent when offered.
    pub rank: Option<f64>,
}

/// What the OUT-filter needs to route one request, and what it found.
struct Screening {
    amounts: Amounts,
    require: Option<Arc<Requirement>>,
    rank: Option<Arc<Rank>>,
    fanout: usize,
    /// Reservations wanted.
    count: usize,
    /// Count only: choose nobody.
    dry: bool,
    found: Mutex<Found>,
}

#[derive(Default)]
struct Found {
    agents: usize,
    chosen: usize,
    misses: Vec<(String, Miss)>,
}

enum Reply {
    Offer(OfferInfo),
    Refuse { agent: String, reason: String, miss: Option<Miss> },
}

struct Inner {
    holder: HolderId,
    /// This requester's own cluster view, from the agents' reports (fresher than their sinks' attributes).
    view: View,
    source: tokio::sync::Mutex<Source>,
    current: Mutex<Option<Arc<Screening>>>,
    waiting: Mutex<HashMap<i64, mpsc::UnboundedSender<Reply>>>,
    acks: Mutex<HashMap<i64, oneshot::Sender<Attrs>>>,
    next: AtomicI64,
}

/// A requester: one per process normally; cheap to clone, safe to use from many tasks at once.
#[derive(Clone)]
pub struct Requester {
    inner: Arc<Inner>,
    _task: Arc<TaskGuard>,
}

impl std::fmt::Debug for Requester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester").field("holder", &self.inner.holder).finish()
    }
}

struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Requester {
    /// Opens `kecho.resources` on `node` and subscribes for answers.
    pub async fn new(node: &Node) -> Result<Self> {
        let ch = node.channel(wire::CHANNEL).await?;
        Self::on(&ch)
    }

    /// A requester on an open `kecho.resources` channel.
    pub fn on(channel: &Channel) -> Result<Self> {
        let holder = HolderId::random();
        let sink = channel.sink(
            SinkOptions::new()
                .types([wire::OFFER, wire::REFUSE, wire::ACK, wire::HOLDERS])
                .filter(&format!("type == \"{}\" || to == \"{}\"", wire::HOLDERS, holder.0))
                .attr("holder", holder.0.clone())
                .capacity(65_536)
                .overflow(Overflow::Block),
        )?;
        let source = channel.source()?;
        let view = View::start_on(channel)?;
        let inner = Arc::new(Inner {
            holder,
            view,
            source: tokio::sync::Mutex::new(channel.source()?),
            current: Mutex::new(None),
            waiting: Mutex::new(HashMap::new()),
            acks: Mutex::new(HashMap::new()),
            next: AtomicI64::new(1),
        });
        let weak = Arc::downgrade(&inner);
        let filter = move |ev: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>| {
            let Some(inner) = weak.upgrade() else { return };
            route(&inner, ev, sinks, chosen);
        };
        inner.source.try_lock().map_err(|_| Error::Stopped)?.set_out_filter(Some(Arc::new(filter)));
        // The answer task declines late offers through a source of its own.
        let task = tokio::spawn(receive(Arc::downgrade(&inner), sink, source));
        Ok(Requester { inner, _task: Arc::new(TaskGuard(task)) })
    }

    /// This requester's holder id.
    pub fn holder(&self) -> &HolderId {
        &self.inner.holder
    }

    /// How many agents this requester's channel knows now, and which of them could serve `spec` going by their
    /// published attributes (discovery without a view).
    pub async fn screen(&self, spec: &Spec) -> Result<(usize, usize)> {
        let s = Arc::new(self.screening(spec, true)?);
        self.submit_request(-1, spec, &s).await?;
        let f = s.found.lock();
        Ok((f.agents, f.agents - f.misses.len()))
    }

    /// Waits until the channel knows at least `n` agents.
    pub async fn wait_for_agents(&self, n: usize, timeout: Duration) -> Result<usize> {
        let end = Instant::now() + timeout;
        let spec = Spec::new(Amounts::new());
        loop {
            let (agents, _) = self.screen(&spec).await?;
            if agents >= n {
                return Ok(agents);
            }
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    what: format!("{n} agent(s) on the channel"),
                    ms: timeout.as_millis() as u64,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn screening(&self, spec: &Spec, dry: bool) -> Result<Screening> {
        let require = spec.require.as_deref().map(Requirement::compile).transpose()?.map(Arc::new);
        let rank = spec.rank.as_deref().map(Rank::compile).transpose()?.map(Arc::new);
        Ok(Screening {
            amounts: spec.amounts.clone(),
            require,
            rank,
            fanout: spec.fanout,
            count: spec.count,
            dry,
            found: Mutex::default(),
        })
    }

    async fn submit_request(&self, req: i64, spec: &Spec, s: &Arc<Screening>) -> Result<()> {
        let mut a = Attrs::new()
            .with("req", req)
            .with("from", self.inner.holder.0.clone())
            .with("amounts", spec.amounts.to_string());
        if let Some(r) = &spec.require {
            a.set("require", r.clone());
        }
        if let Some(r) = &spec.rank {
            a.set("rank", r.clone());
        }
        let mut src = self.inner.source.lock().await;
        *self.inner.current.lock() = Some(s.clone());
        let r = src.submit(wire::REQUEST, &a, b"").await;
        *self.inner.current.lock() = None;
        r?;
        Ok(())
    }

    /// Negotiates `spec.count` reservations: the request goes to the agents whose attributes satisfy it, the best
    /// offers by rank and response time are confirmed, the rest declined. Fails with the reason when nothing
    /// admits it.
    pub async fn reserve(&self, spec: &Spec) -> Result<Vec<Reservation>> {
        let mut last = String::new();
        for attempt in 0..spec.attempts.max(1) {
            if attempt > 0 {
                // The refusals of the failed round already told this requester's view what the agents it asked
                // have free (`free_now`); other agents publish a change within tens of milliseconds. A short pause
                // lets a race for capacity settle.
                tokio::time::sleep(Duration::from_millis(10 * u64::from(attempt))).await;
            }
            match self.round(spec).await? {
                Ok(r) => return Ok(r),
                Err((reason, retry)) => {
                    last = reason;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(Error::Unsatisfied { reason: last })
    }

    /// One negotiation round: `Ok(Err((reason, worth retrying)))` when it did not succeed.
    async fn round(&self, spec: &Spec) -> Result<Result<Vec<Reservation>, (String, bool)>> {
        let s = Arc::new(self.screening(spec, false)?);
        let req = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.inner.waiting.lock().insert(req, tx);
        let started = Instant::now();
        if let Err(e) = self.submit_request(req, spec, &s).await {
            self.inner.waiting.lock().remove(&req);
            return Err(e);
        }
        let expected = {
            let f = s.found.lock();
            if f.chosen == 0 {
                drop(f);
                self.inner.waiting.lock().remove(&req);
                let f = s.found.lock();
                let reason =
                    explain(&spec.amounts, s.require.as_deref(), f.misses.iter().map(|(a, m)| (a.as_str(), m)));
                // A shortage may be an attribute not yet updated after a release; a requirement or an unknown
                // resource will not change in the next moments.
                let stale = f.misses.iter().any(|(_, m)| matches!(m, Miss::Short { .. }));
                return Ok(Err((reason, stale)));
            }
            f.chosen
        };
        let mut neg = Negotiation::new(started.into_std(), expected, spec.count, spec.rank.is_some(), spec.window);
        while !neg.ready(Instant::now().into_std()) {
            let deadline = Instant::from_std(neg.deadline());
            tokio::select! {
                r = rx.recv() => match r {
                    Some(Reply::Offer(o)) => neg.offer(o, Instant::now().into_std()),
                    Some(Reply::Refuse { agent, reason, miss }) => neg.refusal(&agent, &reason, miss),
                    None => return Err(Error::Stopped),
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
        // Offers that arrive from now on are declined by the answer task.
        self.inner.waiting.lock().remove(&req);
        while let Ok(r) = rx.try_recv() {
            if let Reply::Offer(o) = r {
                neg.offer(o, Instant::now().into_std());
            }
        }
        match neg.decide(&spec.amounts) {
            Decision::Fail { reason, declined } => {
                for o in declined {
                    self.decline(&o).await;
                }
                Ok(Err((reason, true)))
            }
            Decision::Confirm { chosen, declined } => {
                // Confirmations first (they are what the caller waits for), then the declines.
                let extra = Attrs::new().with("lease_ms", wire::ms(spec.lease)).with("attached", spec.attached);
                let mut pending = Vec::new();
                let mut failed_start = None;
                for o in &chosen {
                    let sent = Instant::now();
                    match self.op_start(Op::Confirm, &o.id, &extra).await {
                        Ok(rx) => pending.push((o, sent, rx)),
                        Err(e) => {
                            failed_start = Some(e);
                            break;
                        }
                    }
                }
                for o in declined {
                    self.decline(&o).await;
                }
                if let Some(e) = failed_start {
                    return Err(e);
                }
                let mut got = Vec::new();
                let mut failed = None;
                for (o, sent, rx) in pending {
                    match self.op_finish(rx, &o.id, o.hold.max(Duration::from_millis(500))).await {
                        Ok(a) => got.push(reservation(&a, o, sent)),
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
                if let Some(reason) = failed {
                    // All or nothing: free what was confirmed and try again.
                    for r in &got {
                        self.op_nowait(Op::Release, &r.id, &Attrs::new()).await;
                    }
                    return Ok(Err((reason, true)));
                }
                Ok(Ok(got))
            }
        }
    }

    /// Withdraws an offer; this requester's view counts its amounts as free again.
    async fn decline(&self, o: &OfferInfo) {
        self.op_nowait(Op::Decline, &o.id, &Attrs::new()).await;
        self.inner.view.credit(&o.id.agent, o.id.epoch, &o.amounts);
    }

    async fn op_nowait(&self, op: Op, id: &ReservationId, extra: &Attrs) {
        let a = self.op_attrs(op, id, 0, extra);
        let _ = self.inner.source.lock().await.submit(wire::OP, &a, b"").await;
    }

    fn op_attrs(&self, op: Op, id: &ReservationId, corr: i64, extra: &Attrs) -> Attrs {
        let mut a = Attrs::new()
            .with("to", id.agent.clone())
            .with("op", op.name())
            .with("from", self.inner.holder.0.clone())
            .with("corr", corr);
        wire::id_attrs(&mut a, id);
        for (k, v) in extra.iter() {
            a.set(k, v.clone());
        }
        a
    }

    async fn op_start(&self, op: Op, id: &ReservationId, extra: &Attrs) -> Result<oneshot::Receiver<Attrs>> {
        let corr = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.acks.lock().insert(corr, tx);
        let a = self.op_attrs(op, id, corr, extra);
        let r = self.inner.source.lock().await.submit(wire::OP, &a, b"").await;
        if let Err(e) = r {
            self.inner.acks.lock().remove(&corr);
            return Err(e.into());
        }
        Ok(rx)
    }

    async fn op_finish(&self, rx: oneshot::Receiver<Attrs>, id: &ReservationId, timeout: Duration) -> Result<Attrs> {
        let a = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => return Err(Error::Stopped),
            Err(_) => {
                return Err(Error::Timeout { what: format!("agent {}", id.agent), ms: timeout.as_millis() as u64 })
            }
        };
        if matches!(a.get("ok"), Some(Value::Bool(true))) {
            Ok(a)
        } else {
            let reason = wire::opt_str(&a, "reason").unwrap_or("refused").to_owned();
            Err(Error::Refused { id: id.to_string(), reason })
        }
    }

    async fn op(&self, op: Op, id: &ReservationId, extra: &Attrs, timeout: Duration) -> Result<Attrs> {
        let rx = self.op_start(op, id, extra).await?;
        self.op_finish(rx, id, timeout).await
    }

    /// Extends the lease; the holder's `valid_until` counts from when the renewal was sent.
    pub async fn renew(&self, r: &mut Reservation, lease: Duration) -> Result<()> {
        let sent = Instant::now();
        let a =
            self.op(Op::Renew, &r.id, &Attrs::new().with("lease_ms", wire::ms(lease)), Duration::from_secs(2)).await?;
        let granted = wire::dur(&a, "lease_ms").map_err(Error::Parse)?;
        r.lease = granted;
        r.valid_until = sent + granted;
        Ok(())
    }

    /// Renegotiation: sets the named amounts (grow or shrink); the agent admits growth against what is free.
    pub async fn resize(&self, r: &mut Reservation, amounts: &Amounts) -> Result<()> {
        let a = self
            .op(Op::Resize, &r.id, &Attrs::new().with("amounts", amounts.to_string()), Duration::from_secs(2))
            .await?;
        r.amounts = wire::amounts_of(&a)?;
        Ok(())
    }

    /// Frees a reservation (by anyone who has its id); returns what it held.
    pub async fn release(&self, id: &ReservationId) -> Result<Amounts> {
        let a = self.op(Op::Release, id, &Attrs::new(), Duration::from_secs(2)).await?;
        Ok(wire::amounts_of(&a)?)
    }

    /// Keeps `r` alive: renews it at a third of its lease until the handle is dropped or released.
    pub fn hold(&self, r: Reservation) -> Held {
        let state = Arc::new(Mutex::new(r.clone()));
        let me = self.clone();
        let st = state.clone();
        let lease = r.lease;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                let mut cur = st.lock().clone();
                match me.renew(&mut cur, lease).await {
                    Ok(()) => *st.lock() = cur,
                    Err(e) => {
                        tracing::warn!(id = %cur.id, error = %e, "renewal failed");
                        if matches!(e, Error::Refused { .. }) {
                            return;
                        }
                    }
                }
            }
        });
        Held { requester: self.clone(), state, task: Some(task) }
    }
}

/// A reservation kept alive by its holder (renewed at a third of the lease); dropping it stops the renewals and
/// releases it.
#[derive(Debug)]
pub struct Held {
    requester: Requester,
    state: Arc<Mutex<Reservation>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Held {
    /// The reservation as last renewed.
    pub fn reservation(&self) -> Reservation {
        self.state.lock().clone()
    }
    /// True while the holder may count on it (its renewal task runs and the last granted lease has not run out).
    pub fn is_valid(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < self.state.lock().valid_until
    }
    /// Stops renewing and releases it.
    pub async fn release(mut self) -> Result<Amounts> {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        let id = self.state.lock().id.clone();
        self.requester.release(&id).await
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let id = self.state.lock().id.clone();
            let r = self.requester.clone();
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let _ = r.release(&id).await;
                });
            }
        }
    }
}

fn reservation(a: &Attrs, o: &OfferInfo, sent: Instant) -> Reservation {
    let lease = wire::dur(a, "lease_ms").unwrap_or_default();
    Reservation {
        id: o.id.clone(),
        amounts: wire::amounts_of(a).unwrap_or_else(|_| o.amounts.clone()),
        lease,
        valid_until: sent + lease,
        fence: wire::int_attr(a, "fence").ok().and_then(|f| u64::try_from(f).ok()).unwrap_or(0),
        rank: o.rank,
    }
}

/// The requester's OUT-filter: a request goes to the agents whose published attributes satisfy it (at most
/// `fanout`, the best by rank); an operation goes to the sink its content filter let through.
fn route(inner: &Inner, ev: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
    if ev.ty() != wire::REQUEST {
        chosen.extend(0..sinks.len());
        return;
    }
    let Some(s) = inner.current.lock().clone() else { return };
    let mut found = s.found.lock();
    let mut ok: Vec<(usize, Option<f64>, u64)> = Vec::new();
    let mut short: Vec<(usize, Option<f64>, u64)> = Vec::new();
    inner.view.with(|view| {
        for (i, r) in sinks.iter().enumerate() {
            let Some(Value::Str(name)) = r.attrs().get("agent") else { continue };
            // The agent's newest report, which goes out at once on a change (at most one per 100 ms); its sink's
            // attributes (updated rarely, see AgentConfig::attr_gap) until this requester has one.
            let a = view.get(name).map_or(r.attrs(), |e| &e.report.attrs);
            found.agents += 1;
            match screen(&s.amounts, s.require.as_deref(), a) {
                Ok(()) => ok.push((i, s.rank.as_ref().and_then(|x| x.eval(a)), rand::random())),
                Err(m) => {
                    if matches!(m, Miss::Short { .. }) && s.require.as_ref().is_none_or(|r| r.matches(a)) {
                        short.push((i, None, rand::random()));
                    }
                    found.misses.push((name.clone(), m));
                }
            }
        }
    });
    if s.dry {
        return;
    }
    pick(&mut ok, s.fanout);
    // The sink attributes lag the agents' ledgers (they are updated about once a second, see AgentConfig::attr_gap):
    // when too few agents look free enough, also ask those that looked short; their own admission control answers
    // with the truth.
    if ok.len() < s.count {
        let room = if s.fanout == 0 { 0 } else { s.fanout.max(s.count).saturating_sub(ok.len()).max(1) };
        pick(&mut short, room);
        ok.extend(short);
    }
    found.chosen = ok.len();
    chosen.extend(ok.iter().map(|c| c.0));
    // Until they answer, what this requester asked of them counts as taken in its view, so that its next
    // concurrent requests do not all go to the same few agents.
    inner.view.with(|view| {
        for c in &ok {
            if let Some(Value::Str(name)) = sinks.get(c.0).attrs().get("agent") {
                view.debit(name, &s.amounts);
            }
        }
    });
}

/// The answer task: hands offers and refusals to their negotiation, acknowledgements to their operation, and
/// declines offers that arrive after their negotiation ended.
async fn receive(inner: std::sync::Weak<Inner>, mut sink: kecho::Sink, mut decliner: Source) {
    loop {
        let ev = match sink.recv().await {
            Ok(ev) => ev,
            Err(kecho::RecvError::Closed) => return,
            Err(_) => continue,
        };
        let Some(inner) = inner.upgrade() else { return };
        let a = ev.attrs();
        if matches!(ev.ty(), wire::OFFER | wire::REFUSE | wire::ACK) {
            // The agent's state as of this answer: fresher than its last report.
            inner.view.learn_from(a);
        }
        match ev.ty() {
            wire::OFFER => {
                let Ok(req) = wire::int_attr(a, "req") else { continue };
                let Ok(id) = wire::id_of(a) else { continue };
                let offer = OfferInfo {
                    id,
                    amounts: wire::amounts_of(a).unwrap_or_default(),
                    rank: match a.get("rank") {
                        Some(Value::Float(f)) => Some(*f),
                        Some(Value::Int(i)) => Some(*i as f64),
                        _ => None,
                    },
                    hold: wire::dur(a, "hold_ms").unwrap_or_default(),
                };
                let tx = inner.waiting.lock().get(&req).cloned();
                let late = match tx {
                    Some(tx) => tx.send(Reply::Offer(offer.clone())).is_err(),
                    None => true,
                };
                if late {
                    let mut d = Attrs::new()
                        .with("to", offer.id.agent.clone())
                        .with("op", Op::Decline.name())
                        .with("from", inner.holder.0.clone())
                        .with("corr", 0i64);
                    wire::id_attrs(&mut d, &offer.id);
                    let _ = decliner.submit(wire::OP, &d, b"").await;
                }
            }
            wire::REFUSE => {
                let Ok(req) = wire::int_attr(a, "req") else { continue };
                let agent = wire::opt_str(a, "agent").unwrap_or("?").to_owned();
                let reason = wire::opt_str(a, "reason").unwrap_or("refused").to_owned();
                let miss = match (wire::opt_str(a, "resource"), wire::int_attr(a, "free")) {
                    (Some(r), Ok(free)) => Some(Miss::Short { resource: r.to_owned(), free: free.max(0) as u64 }),
                    _ => wire::opt_str(a, "unknown").map(|u| Miss::Unknown(u.to_owned())),
                };
                if let Some(tx) = inner.waiting.lock().get(&req) {
                    let _ = tx.send(Reply::Refuse { agent, reason, miss });
                }
            }
            wire::ACK => {
                let Ok(corr) = wire::int_attr(a, "corr") else { continue };
                if let Some(tx) = inner.acks.lock().remove(&corr) {
                    let _ = tx.send(a.clone());
                }
            }
            _ => {}
        }
    }
}
