//! The boundary to resource management: where a task or a component runs.
//!
//! Placement (agents, their resources, reservations, the `require`/`rank` expressions) belongs to the resources crate;
//! this crate needs only "reserve capacity for this spec on a fitting agent" and "release it". [`Placer`] is that
//! boundary; [`InMemoryPlacer`] is a small implementation for tests and simulations, and the resources crate plugs in
//! its reservation client behind the same trait.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// A reservation request: the hardware prerequisites of a task or component.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReservationSpec {
    /// A requirement expression over an agent's attributes (evaluated by the placer).
    pub require: Option<String>,
    /// A rank expression: among fitting agents, the highest rank wins (evaluated by the placer).
    pub rank: Option<String>,
    /// CPUs to reserve (fractions allowed).
    pub cpus: Option<f64>,
    /// Memory to reserve, bytes.
    pub mem: Option<u64>,
}

/// An agent's name, as it announces itself (also `KECHO_AGENT` in a task's environment).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentName(pub String);

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A reservation's id, unique per placer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReservationId(pub u64);

/// Where a reservation was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The reservation, to release later.
    pub reservation: ReservationId,
    /// The agent that holds it.
    pub agent: AgentName,
    /// The host name or address dependents reach the agent's node at.
    pub host: String,
    /// The resources crate's reservation id (`AGENT:EPOCH:N`) and fence, which the agent checks against its ledger
    /// before it runs anything under the reservation (`None` from placers without real reservations).
    #[serde(default)]
    pub lease: Option<(String, u64)>,
}

/// Why a placement failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlaceError {
    /// No agent fits the spec (with the placer's reason, e.g. which resource ran short).
    #[error("no agent fits: {0}")]
    NoFit(String),
    /// The reservation is not known (already released, or never made here).
    #[error("unknown reservation {0:?}")]
    UnknownReservation(ReservationId),
    /// The placer could not be reached or did not answer.
    #[error("placement unavailable: {0}")]
    Unavailable(String),
}

/// Reserves capacity on fitting agents. Implemented by the resources crate's reservation client; [`InMemoryPlacer`]
/// for tests.
pub trait Placer {
    /// Reserves capacity for `spec` on a fitting agent not in `avoid` (a replacement avoids the node that failed).
    fn place(
        &self,
        spec: &ReservationSpec,
        avoid: &[AgentName],
    ) -> impl Future<Output = Result<Placement, PlaceError>> + Send;

    /// Releases a reservation.
    fn release(&self, placement: &Placement) -> impl Future<Output = Result<(), PlaceError>> + Send;
}

/// Places every spec or none: on the first failure, the reservations already made are released (in reverse order)
/// and the error says which spec could not be placed (its index in `specs`).
pub async fn place_all<P: Placer>(
    placer: &P,
    specs: &[ReservationSpec],
) -> Result<Vec<Placement>, (usize, PlaceError)> {
    let mut placed = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        match placer.place(spec, &[]).await {
            Ok(p) => placed.push(p),
            Err(e) => {
                for p in placed.iter().rev() {
                    if let Err(release) = placer.release(p).await {
                        tracing::warn!(reservation = ?p.reservation, %release, "could not release a reservation after a failed placement");
                    }
                }
                return Err((i, e));
            }
        }
    }
    Ok(placed)
}

/// An agent as the in-memory placer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemAgent {
    /// Its name.
    pub name: AgentName,
    /// The host dependents reach it at.
    pub host: String,
    /// Free CPUs.
    pub cpus: f64,
    /// Free memory, bytes.
    pub mem: u64,
    /// Labels; in this placer a `require` expression is satisfied when it equals one of them (the resources crate
    /// evaluates real expressions).
    pub labels: BTreeSet<String>,
}

/// A placer over a fixed set of agents held in memory: it picks the fitting agent with the most free CPUs (then the
/// most free memory, then the smallest name), and subtracts the reservation from it.
#[derive(Debug, Default)]
pub struct InMemoryPlacer {
    inner: Mutex<MemState>,
}

#[derive(Debug, Default)]
struct MemState {
    agents: Vec<MemAgent>,
    reservations: BTreeMap<ReservationId, (usize, f64, u64)>,
    next: u64,
}

impl InMemoryPlacer {
    /// A placer over these agents.
    pub fn new(agents: Vec<MemAgent>) -> InMemoryPlacer {
        InMemoryPlacer { inner: Mutex::new(MemState { agents, reservations: BTreeMap::new(), next: 1 }) }
    }

    /// The agents with their free capacity now.
    pub fn agents(&self) -> Vec<MemAgent> {
        self.lock().agents.clone()
    }

    /// How many reservations are held.
    pub fn held(&self) -> usize {
        self.lock().reservations.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        // A panic while holding the lock leaves plain numbers behind, still consistent enough for a test placer.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn place_now(&self, spec: &ReservationSpec, avoid: &[AgentName]) -> Result<Placement, PlaceError> {
        let mut st = self.lock();
        let cpus = spec.cpus.unwrap_or(0.0);
        let mem = spec.mem.unwrap_or(0);
        let fits = |a: &MemAgent| {
            !avoid.contains(&a.name)
                && a.cpus + 1e-9 >= cpus
                && a.mem >= mem
                && spec.require.as_ref().is_none_or(|r| a.labels.contains(r))
        };
        let best = st
            .agents
            .iter()
            .enumerate()
            .filter(|(_, a)| fits(a))
            .max_by(|(_, a), (_, b)| a.cpus.total_cmp(&b.cpus).then(a.mem.cmp(&b.mem)).then(b.name.cmp(&a.name)))
            .map(|(i, _)| i);
        let Some(i) = best else {
            return Err(PlaceError::NoFit(format!(
                "{} agents, none with {cpus} CPUs and {mem} bytes free{}{}",
                st.agents.len(),
                spec.require.as_ref().map(|r| format!(" and `{r}`")).unwrap_or_default(),
                if avoid.is_empty() { String::new() } else { format!(" outside {avoid:?}") }
            )));
        };
        st.agents[i].cpus -= cpus;
        st.agents[i].mem -= mem;
        let id = ReservationId(st.next);
        st.next += 1;
        st.reservations.insert(id, (i, cpus, mem));
        let agent = &st.agents[i];
        Ok(Placement { reservation: id, agent: agent.name.clone(), host: agent.host.clone(), lease: None })
    }

    fn release_now(&self, placement: &Placement) -> Result<(), PlaceError> {
        let mut st = self.lock();
        let (i, cpus, mem) = st
            .reservations
            .remove(&placement.reservation)
            .ok_or(PlaceError::UnknownReservation(placement.reservation))?;
        st.agents[i].cpus += cpus;
        st.agents[i].mem += mem;
        Ok(())
    }
}

impl Placer for InMemoryPlacer {
    fn place(
        &self,
        spec: &ReservationSpec,
        avoid: &[AgentName],
    ) -> impl Future<Output = Result<Placement, PlaceError>> + Send {
        std::future::ready(self.place_now(spec, avoid))
    }

    fn release(&self, placement: &Placement) -> impl Future<Output = Result<(), PlaceError>> + Send {
        std::future::ready(self.release_now(placement))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(name: &str, cpus: f64, mem: u64, labels: &[&str]) -> MemAgent {
        MemAgent {
            name: AgentName(name.into()),
            host: format!("{name}.local"),
            cpus,
            mem,
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn spec(cpus: f64, mem: u64, require: Option<&str>) -> ReservationSpec {
        ReservationSpec { require: require.map(str::to_string), rank: None, cpus: Some(cpus), mem: Some(mem) }
    }

    #[tokio::test]
    async fn places_on_the_freest_fitting_agent_and_releases() {
        let p = InMemoryPlacer::new(vec![agent("a", 2.0, 1000, &[]), agent("b", 4.0, 1000, &["gpu"])]);
        let first = p.place(&spec(1.0, 100, None), &[]).await.unwrap();
        assert_eq!(first.agent.0, "b");
        assert_eq!(first.host, "b.local");
        let gpu = p.place(&spec(3.0, 100, Some("gpu")), &[]).await.unwrap();
        assert_eq!(gpu.agent.0, "b");
        let err = p.place(&spec(1.0, 100, Some("gpu")), &[]).await.unwrap_err();
        assert!(matches!(err, PlaceError::NoFit(_)), "{err}");
        let elsewhere = p.place(&spec(1.0, 1, None), &[AgentName("b".into())]).await.unwrap();
        assert_eq!(elsewhere.agent.0, "a");
        p.release(&gpu).await.unwrap();
        assert_eq!(p.release(&gpu).await, Err(PlaceError::UnknownReservation(gpu.reservation)));
        assert_eq!(p.agents()[1].cpus, 3.0);
    }

    #[tokio::test]
    async fn place_all_is_all_or_nothing() {
        let p = InMemoryPlacer::new(vec![agent("a", 2.0, 1000, &[]), agent("b", 2.0, 1000, &[])]);
        let specs = [spec(2.0, 10, None), spec(2.0, 10, None), spec(1.0, 10, None)];
        let (i, err) = place_all(&p, &specs).await.unwrap_err();
        assert_eq!(i, 2);
        assert!(matches!(err, PlaceError::NoFit(_)));
        assert_eq!(p.held(), 0, "every reservation made was released");
        assert_eq!(p.agents().iter().map(|a| a.cpus).sum::<f64>(), 4.0);
        let ok = place_all(&p, &specs[..2]).await.unwrap();
        assert_eq!(ok.len(), 2);
        assert_ne!(ok[0].agent, ok[1].agent);
    }
}
