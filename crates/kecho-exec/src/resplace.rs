//! The real [`Placer`]: reservations negotiated with the agents of the resources crate.
//!
//! A placement is an *attached* reservation made through a [`Requester`] on `kecho.resources`: the request goes to
//! the agents whose attributes satisfy `require` (and do not name an agent to avoid), the best offer by `rank` wins,
//! and the reservation is renewed at a third of its lease for as long as it is held ([`kecho_resources::Held`]). A
//! release (the task ended, or moved) frees it at once; a submitter that dies stops renewing, and the agent frees the
//! reservation when its lease runs out or its holder has left the channel.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kecho_resources::{Amounts, Held, Requester, Spec};

use crate::place::{AgentName, PlaceError, Placement, Placer, ReservationId, ReservationSpec};
use crate::service::NoReservation;

/// CPUs reserved when a spec names neither CPUs nor memory: every task takes at least one core's share.
pub const DEFAULT_CPUS: u64 = 1;

/// A placer over the agents of the resources crate.
pub struct ResourcePlacer {
    requester: Requester,
    lease: Duration,
    window: Duration,
    next: AtomicU64,
    held: Mutex<BTreeMap<ReservationId, Held>>,
    releasing: std::sync::atomic::AtomicUsize,
    hosts: Option<HostOf>,
    also_require: Option<String>,
}

/// The attribute an agent that executes tasks (`kecho agent --allow-exec`) publishes, `true`.
pub const EXEC_ATTR: &str = "exec";

/// Where an agent's node is reached (its `host`), by agent name.
pub type HostOf = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

impl std::fmt::Debug for ResourcePlacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourcePlacer").field("lease", &self.lease).field("held", &self.held()).finish()
    }
}

impl ResourcePlacer {
    /// A placer that negotiates through `requester`, with leases of `lease` (renewed while held).
    pub fn new(requester: Requester, lease: Duration) -> ResourcePlacer {
        ResourcePlacer {
            requester,
            lease,
            window: Duration::from_millis(250),
            next: AtomicU64::new(1),
            held: Mutex::new(BTreeMap::new()),
            releasing: std::sync::atomic::AtomicUsize::new(0),
            hosts: None,
            also_require: None,
        }
    }

    /// Places only on agents that also satisfy `expr` (a CEL expression over their attributes), e.g.
    /// `exec == true` for the agents that execute tasks: an agent that only offers resources is never chosen for a
    /// task it would not run.
    pub fn also_require(mut self, expr: impl Into<String>) -> ResourcePlacer {
        self.also_require = Some(expr.into());
        self
    }

    /// How long to collect offers for one placement (default 250 ms).
    pub fn window(mut self, window: Duration) -> ResourcePlacer {
        self.window = window;
        self
    }

    /// How a placement's `host` is found from its agent's name (default: the agent's name itself).
    pub fn hosts(mut self, hosts: HostOf) -> ResourcePlacer {
        self.hosts = Some(hosts);
        self
    }

    /// How many reservations this placer holds now.
    pub fn held(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Reservations held or being released now (a process waits for this to reach 0 before it leaves).
    pub fn outstanding(&self) -> usize {
        self.held() + self.releasing.load(Ordering::Acquire)
    }

    /// Whether the reservation behind `placement` is still held and its lease has not run out.
    pub fn is_valid(&self, placement: &Placement) -> bool {
        self.held.lock().ok().and_then(|h| h.get(&placement.reservation).map(Held::is_valid)).unwrap_or(false)
    }
}

/// The resources crate's request for a spec, avoiding some agents.
pub fn resource_spec(spec: &ReservationSpec, avoid: &[AgentName]) -> Result<Spec, PlaceError> {
    let mut amounts = Amounts::new();
    if let Some(c) = spec.cpus {
        if !(c.is_finite() && c >= 0.0) {
            return Err(PlaceError::NoFit(format!("cpus must be a non-negative number, not {c}")));
        }
        // The agents count whole cores; a fraction reserves the core it runs on.
        amounts.set(kecho_resources::types::CPUS, c.ceil() as u64);
    }
    if let Some(m) = spec.mem {
        amounts.set(kecho_resources::types::MEM, m);
    }
    if amounts.is_empty() {
        amounts.set(kecho_resources::types::CPUS, DEFAULT_CPUS);
    }
    let mut clauses: Vec<String> = Vec::new();
    if let Some(r) = &spec.require {
        clauses.push(format!("({r})"));
    }
    for a in avoid {
        clauses.push(format!("agent != {}", cel_string(&a.0)));
    }
    let mut s = Spec::new(amounts);
    if !clauses.is_empty() {
        let expr = clauses.join(" && ");
        kecho_resources::Requirement::compile(&expr).map_err(|e| PlaceError::NoFit(e.to_string()))?;
        s = s.require(expr);
    }
    if let Some(r) = &spec.rank {
        kecho_resources::Rank::compile(r).map_err(|e| PlaceError::NoFit(e.to_string()))?;
        s = s.rank(r.clone());
    }
    Ok(s)
}

/// A CEL string literal.
fn cel_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

impl Placer for ResourcePlacer {
    async fn place(&self, spec: &ReservationSpec, avoid: &[AgentName]) -> Result<Placement, PlaceError> {
        let mut spec = spec.clone();
        if let Some(base) = &self.also_require {
            spec.require = Some(match spec.require.take() {
                Some(r) => format!("({base}) && ({r})"),
                None => base.clone(),
            });
        }
        let s = resource_spec(&spec, avoid)?.lease(self.lease).window(self.window);
        let got = self.requester.reserve(&s).await.map_err(|e| match e {
            kecho_resources::Error::Unsatisfied { reason } => PlaceError::NoFit(reason),
            other => PlaceError::Unavailable(other.to_string()),
        })?;
        let Some(r) = got.into_iter().next() else {
            return Err(PlaceError::NoFit("no reservation was granted".into()));
        };
        let id = ReservationId(self.next.fetch_add(1, Ordering::Relaxed));
        let placement = Placement {
            reservation: id,
            agent: AgentName(r.id.agent.clone()),
            host: self.hosts.as_ref().and_then(|h| h(&r.id.agent)).unwrap_or_else(|| r.id.agent.clone()),
            lease: Some((r.id.to_string(), r.fence)),
        };
        let held = self.requester.hold(r);
        self.held.lock().map_err(|_| PlaceError::Unavailable("placer state poisoned".into()))?.insert(id, held);
        Ok(placement)
    }

    async fn release(&self, placement: &Placement) -> Result<(), PlaceError> {
        let held = self
            .held
            .lock()
            .map_err(|_| PlaceError::Unavailable("placer state poisoned".into()))?
            .remove(&placement.reservation)
            .ok_or(PlaceError::UnknownReservation(placement.reservation))?;
        self.releasing.fetch_add(1, Ordering::AcqRel);
        let r = held.release().await.map(|_| ()).map_err(|e| PlaceError::Unavailable(e.to_string()));
        self.releasing.fetch_sub(1, Ordering::AcqRel);
        r
    }
}

/// The reservation check of an exec agent that runs beside resource agent `agent`: a placement must carry a
/// reservation id and fence that the agent's ledger confirms (live, confirmed, not fenced off).
pub fn ledger_check(agent: &kecho_resources::Agent) -> crate::service::ReservationCheck {
    let check = agent.reservation_check();
    std::sync::Arc::new(move |p: &Placement| {
        let Some((id, fence)) = &p.lease else { return Err(NoReservation::Missing) };
        let id: kecho_resources::ReservationId = id.parse()?;
        Ok(check(&id, *fence)?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_become_requests_that_avoid_agents() {
        let spec = ReservationSpec {
            require: Some("zone == \"a\"".into()),
            rank: Some("cpus_free".into()),
            cpus: Some(1.5),
            mem: Some(1 << 20),
        };
        let s = resource_spec(&spec, &[AgentName("x\"y".into())]).unwrap();
        assert_eq!(s.amounts.amount("cpus"), 2);
        assert_eq!(s.amounts.amount("mem"), 1 << 20);
        assert_eq!(s.require.as_deref(), Some("(zone == \"a\") && agent != \"x\\\"y\""));
        assert_eq!(s.rank.as_deref(), Some("cpus_free"));
        let bare = resource_spec(&ReservationSpec::default(), &[]).unwrap();
        assert_eq!(bare.amounts.amount("cpus"), DEFAULT_CPUS);
        assert!(bare.require.is_none());
        let bad = ReservationSpec { require: Some("zone ==".into()), ..Default::default() };
        assert!(matches!(resource_spec(&bad, &[]), Err(PlaceError::NoFit(_))));
        let nan = ReservationSpec { cpus: Some(f64::NAN), ..Default::default() };
        assert!(resource_spec(&nan, &[]).is_err());
    }
}
