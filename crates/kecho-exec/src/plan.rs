//! The deploy planner, pure: no processes, no network, no clock.
//!
//! [`Deployment`] tracks each component of an application and answers, event by event, what the deployer must do
//! next. The deployer (the I/O layer) places every component first (all or nothing, [`crate::place::place_all`]),
//! then feeds the planner what happens: a component started and became ready, failed, stopped. The planner answers
//! with [`Action`]s:
//!
//! - A component starts as soon as every component it needs is ready, so independent components start in parallel
//!   and a slow branch does not hold up another (the waves of [`crate::graph::AppGraph`] are the order this gives
//!   when every start takes as long).
//! - When a component fails, every component that needs it, directly or not, is told (2K's Automatic Configuration
//!   Service "inspects its dependencies and informs the proper components about the failure"), and its failure policy
//!   applies: restart it in place, replace it on another node, or stop its dependents (furthest first). A component
//!   that fails more than `max_attempts` times in a row without staying up is given up: if the application has
//!   never been fully ready, the deploy is aborted and everything started is stopped (nothing half-starts);
//!   otherwise its dependents are stopped. "Staying up" is the deployer's call, which knows the time: it reports
//!   [`Deployment::on_stable`] once a component has been ready long enough, and that clears its failure count (a
//!   component that becomes ready and crashes at once is still a crash loop).
//! - Undeploy stops components in reverse dependency order: a component stops only after everything that needs it
//!   has stopped.

use std::collections::{BTreeMap, BTreeSet};

use crate::app::{AppSpec, ComponentName, FailurePolicy};
use crate::graph::AppGraph;

/// How many times in a row a component may fail without becoming ready before it is given up.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A component's state in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ComponentState {
    /// Not started: waiting for the components it needs.
    Waiting,
    /// Started (or restarting, or being replaced), not yet ready.
    Starting,
    /// Ready.
    Ready,
    /// Failed and not being restarted (given up, or its policy is to stop dependents).
    Failed,
    /// Told to stop, not yet stopped.
    Stopping,
    /// Stopped (or never started and no longer going to be).
    Stopped,
}

/// What the deployer does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Start the component on its placement, with its dependencies' addresses in its environment, then check its
    /// readiness.
    Start(ComponentName),
    /// Restart the failed component in place (same node, same reservation).
    Restart(ComponentName),
    /// Start the failed component on another fitting node (release its reservation, place it avoiding its node).
    Replace(ComponentName),
    /// Stop the component (and release its reservation).
    Stop(ComponentName),
    /// Publish an event on the application's channel about `about`, addressed to its dependents `to` (in start order).
    Notify {
        /// The component the event is about.
        about: ComponentName,
        /// What happened.
        event: AppEvent,
        /// The components that depend on it, directly or not.
        to: Vec<ComponentName>,
    },
    /// The deploy failed: `component` could not be made ready; everything started is being stopped.
    Abort {
        /// The component that was given up.
        component: ComponentName,
    },
}

/// An event about a component, published on the application's channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AppEvent {
    /// It failed; the policy says what follows.
    Failed(FailurePolicy),
    /// It is ready again after a failure (possibly on another node: dependents re-resolve its address).
    Recovered,
    /// It was given up after too many failed attempts.
    GivenUp,
}

/// The planner's view of one deployment of an application.
#[derive(Debug, Clone)]
pub struct Deployment {
    graph: AppGraph,
    policy: BTreeMap<ComponentName, FailurePolicy>,
    state: BTreeMap<ComponentName, ComponentState>,
    /// Failures in a row since the component was last ready.
    attempts: BTreeMap<ComponentName, u32>,
    /// Components that failed since they were last ready (to announce their recovery).
    recovering: BTreeMap<ComponentName, bool>,
    /// Dependents of a failed component (policy stop-dependents) that are still to be stopped.
    to_stop: BTreeSet<ComponentName>,
    max_attempts: u32,
    ever_ready: bool,
    undeploying: bool,
}

impl Deployment {
    /// A deployment of `app` with every component waiting.
    pub fn new(app: &AppSpec) -> Deployment {
        let policy = app.components.iter().map(|(n, c)| (n.clone(), c.on_failure)).collect();
        Deployment::from_parts(app.graph.clone(), policy)
    }

    /// A deployment over a graph and each component's failure policy (components without one restart).
    pub fn from_parts(graph: AppGraph, policy: BTreeMap<ComponentName, FailurePolicy>) -> Deployment {
        let names = graph.start_order();
        Deployment {
            policy,
            state: names.iter().map(|n| (n.clone(), ComponentState::Waiting)).collect(),
            attempts: names.iter().map(|n| (n.clone(), 0)).collect(),
            recovering: BTreeMap::new(),
            graph,
            to_stop: BTreeSet::new(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            ever_ready: false,
            undeploying: false,
        }
    }

    /// Sets how many failures in a row (without becoming ready) a component is allowed before it is given up.
    pub fn with_max_attempts(mut self, max: u32) -> Deployment {
        self.max_attempts = max.max(1);
        self
    }

    /// The state of a component (`None` if the application has no such component).
    pub fn state(&self, c: &ComponentName) -> Option<ComponentState> {
        self.state.get(c).copied()
    }

    /// Every component's state, in start order.
    pub fn states(&self) -> Vec<(ComponentName, ComponentState)> {
        self.graph.start_order().into_iter().map(|c| (c.clone(), self.state[&c])).collect()
    }

    /// Whether every component is ready.
    pub fn all_ready(&self) -> bool {
        self.state.values().all(|s| *s == ComponentState::Ready)
    }

    /// Whether every component is stopped (or failed and not running).
    pub fn all_stopped(&self) -> bool {
        self.state.values().all(|s| matches!(s, ComponentState::Stopped | ComponentState::Failed))
    }

    /// The graph.
    pub fn graph(&self) -> &AppGraph {
        &self.graph
    }

    /// Begins the deploy: starts every component that needs nothing.
    pub fn start(&mut self) -> Vec<Action> {
        self.start_unblocked()
    }

    /// A component passed its readiness check.
    pub fn on_ready(&mut self, c: &ComponentName) -> Vec<Action> {
        if self.state.get(c) != Some(&ComponentState::Starting) {
            return Vec::new();
        }
        self.state.insert(c.clone(), ComponentState::Ready);
        let mut out = Vec::new();
        if self.recovering.remove(c).is_some() {
            out.push(self.notify(c, AppEvent::Recovered));
        }
        if self.all_ready() {
            self.ever_ready = true;
        }
        out.extend(self.start_unblocked());
        out
    }

    /// A component has stayed ready long enough to count as up: its failures in a row are forgotten.
    pub fn on_stable(&mut self, c: &ComponentName) {
        if self.state.get(c) == Some(&ComponentState::Ready) {
            self.attempts.insert(c.clone(), 0);
        }
    }

    /// How many times in a row the component has failed without staying up.
    pub fn attempts(&self, c: &ComponentName) -> u32 {
        self.attempts.get(c).copied().unwrap_or(0)
    }

    /// A component failed: its process exited, its node was lost, or its readiness check timed out.
    pub fn on_failed(&mut self, c: &ComponentName) -> Vec<Action> {
        if !matches!(self.state.get(c), Some(ComponentState::Starting | ComponentState::Ready)) {
            return Vec::new();
        }
        if self.undeploying {
            self.state.insert(c.clone(), ComponentState::Stopped);
            return self.stop_unblocked();
        }
        let attempts = {
            let a = self.attempts.entry(c.clone()).or_insert(0);
            *a += 1;
            *a
        };
        let policy = self.policy.get(c).copied().unwrap_or_default();
        let mut out = Vec::new();
        if attempts > self.max_attempts {
            self.state.insert(c.clone(), ComponentState::Failed);
            self.recovering.remove(c);
            out.push(self.notify(c, AppEvent::GivenUp));
            if !self.ever_ready {
                out.push(Action::Abort { component: c.clone() });
                out.extend(self.undeploy());
            } else {
                out.extend(self.stop_dependents(c));
            }
            return out;
        }
        out.push(self.notify(c, AppEvent::Failed(policy)));
        match policy {
            FailurePolicy::Restart => {
                self.state.insert(c.clone(), ComponentState::Starting);
                self.recovering.insert(c.clone(), true);
                out.push(Action::Restart(c.clone()));
            }
            FailurePolicy::Replace => {
                self.state.insert(c.clone(), ComponentState::Starting);
                self.recovering.insert(c.clone(), true);
                out.push(Action::Replace(c.clone()));
            }
            FailurePolicy::StopDependents => {
                self.state.insert(c.clone(), ComponentState::Failed);
                out.extend(self.stop_dependents(c));
            }
        }
        out
    }

    /// A component stopped after an [`Action::Stop`].
    pub fn on_stopped(&mut self, c: &ComponentName) -> Vec<Action> {
        if self.state.get(c) != Some(&ComponentState::Stopping) {
            return Vec::new();
        }
        self.state.insert(c.clone(), ComponentState::Stopped);
        self.stop_unblocked()
    }

    /// Begins undeploy: components stop in reverse dependency order; [`Deployment::on_stopped`] releases the next.
    pub fn undeploy(&mut self) -> Vec<Action> {
        self.undeploying = true;
        for s in self.state.values_mut() {
            if *s == ComponentState::Waiting {
                *s = ComponentState::Stopped;
            }
        }
        self.stop_unblocked()
    }

    fn notify(&self, c: &ComponentName, event: AppEvent) -> Action {
        Action::Notify { about: c.clone(), event, to: self.graph.dependents(c) }
    }

    /// Stops every running dependent of `c`, furthest first (a component stops only after its own dependents have);
    /// those still waiting will not start.
    fn stop_dependents(&mut self, c: &ComponentName) -> Vec<Action> {
        for d in self.graph.dependents(c) {
            match self.state[&d] {
                ComponentState::Starting | ComponentState::Ready => {
                    self.recovering.remove(&d);
                    self.to_stop.insert(d);
                }
                ComponentState::Waiting => {
                    self.state.insert(d, ComponentState::Stopped);
                }
                _ => {}
            }
        }
        self.stop_unblocked()
    }

    fn start_unblocked(&mut self) -> Vec<Action> {
        if self.undeploying {
            return Vec::new();
        }
        let mut out = Vec::new();
        for c in self.graph.start_order() {
            if self.state[&c] != ComponentState::Waiting {
                continue;
            }
            if self.graph.needs(&c).iter().all(|d| self.state[d] == ComponentState::Ready) {
                self.state.insert(c.clone(), ComponentState::Starting);
                out.push(Action::Start(c));
            }
        }
        out
    }

    /// Stops the components due to stop (all of them when undeploying) whose dependents have all stopped.
    fn stop_unblocked(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        for c in self.graph.start_order().into_iter().rev() {
            if !matches!(self.state[&c], ComponentState::Starting | ComponentState::Ready) {
                continue;
            }
            if !self.undeploying && !self.to_stop.contains(&c) {
                continue;
            }
            let dependents_down = self
                .graph
                .direct_dependents(&c)
                .iter()
                .all(|d| matches!(self.state[d], ComponentState::Stopped | ComponentState::Failed));
            if dependents_down {
                self.to_stop.remove(&c);
                self.state.insert(c.clone(), ComponentState::Stopping);
                out.push(Action::Stop(c));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(s: &str) -> ComponentName {
        s.parse().unwrap()
    }

    /// db <- api <- web, db <- worker; api's policy is given, others restart.
    fn shop(api: FailurePolicy) -> Deployment {
        let needs: BTreeMap<ComponentName, Vec<ComponentName>> =
            [("db", vec![]), ("api", vec![n("db")]), ("worker", vec![n("db")]), ("web", vec![n("api")])]
                .into_iter()
                .map(|(k, v)| (n(k), v))
                .collect();
        let graph = AppGraph::from_needs(&needs).unwrap();
        Deployment::from_parts(graph, BTreeMap::from([(n("api"), api)]))
    }

    fn bring_up(d: &mut Deployment) {
        assert_eq!(d.start(), vec![Action::Start(n("db"))]);
        assert_eq!(d.on_ready(&n("db")), vec![Action::Start(n("api")), Action::Start(n("worker"))]);
        assert_eq!(d.on_ready(&n("worker")), vec![]);
        assert_eq!(d.on_ready(&n("api")), vec![Action::Start(n("web"))]);
        assert_eq!(d.on_ready(&n("web")), vec![]);
        assert!(d.all_ready());
    }

    #[test]
    fn starts_when_needs_are_ready_and_stops_in_reverse() {
        let mut d = shop(FailurePolicy::Restart);
        bring_up(&mut d);
        assert_eq!(d.undeploy(), vec![Action::Stop(n("web")), Action::Stop(n("worker"))]);
        assert_eq!(d.on_stopped(&n("worker")), vec![]);
        assert_eq!(d.on_stopped(&n("web")), vec![Action::Stop(n("api"))]);
        assert_eq!(d.on_stopped(&n("api")), vec![Action::Stop(n("db"))]);
        assert_eq!(d.on_stopped(&n("db")), vec![]);
        assert!(d.all_stopped());
    }

    #[test]
    fn restart_tells_dependents_and_announces_recovery() {
        let mut d = shop(FailurePolicy::Restart);
        bring_up(&mut d);
        let out = d.on_failed(&n("api"));
        assert_eq!(
            out,
            vec![
                Action::Notify { about: n("api"), event: AppEvent::Failed(FailurePolicy::Restart), to: vec![n("web")] },
                Action::Restart(n("api")),
            ]
        );
        assert_eq!(d.state(&n("web")), Some(ComponentState::Ready), "dependents keep running");
        assert_eq!(
            d.on_ready(&n("api")),
            vec![Action::Notify { about: n("api"), event: AppEvent::Recovered, to: vec![n("web")] }]
        );
    }

    #[test]
    fn replace_moves_the_component() {
        let mut d = shop(FailurePolicy::Replace);
        bring_up(&mut d);
        let out = d.on_failed(&n("api"));
        assert_eq!(out[1], Action::Replace(n("api")));
        assert_eq!(d.state(&n("api")), Some(ComponentState::Starting));
    }

    #[test]
    fn stop_dependents_stops_them_furthest_first() {
        let mut d = shop(FailurePolicy::Restart);
        bring_up(&mut d);
        // db restarts by default; make a graph where db's policy is stop-dependents.
        let mut d2 =
            Deployment::from_parts(d.graph().clone(), BTreeMap::from([(n("db"), FailurePolicy::StopDependents)]));
        bring_up(&mut d2);
        let out = d2.on_failed(&n("db"));
        assert_eq!(
            out,
            vec![
                Action::Notify {
                    about: n("db"),
                    event: AppEvent::Failed(FailurePolicy::StopDependents),
                    to: vec![n("api"), n("worker"), n("web")]
                },
                Action::Stop(n("web")),
                Action::Stop(n("worker")),
            ]
        );
        assert_eq!(d2.state(&n("db")), Some(ComponentState::Failed));
        assert_eq!(d2.on_stopped(&n("worker")), vec![], "api waits for web");
        assert_eq!(d2.on_stopped(&n("web")), vec![Action::Stop(n("api"))]);
        assert_eq!(d2.on_stopped(&n("api")), vec![]);
        assert!(d2.all_stopped());
    }

    #[test]
    fn a_component_that_never_comes_up_aborts_the_deploy() {
        let mut d = shop(FailurePolicy::Restart).with_max_attempts(2);
        d.start();
        d.on_ready(&n("db"));
        assert_eq!(d.on_failed(&n("api"))[1], Action::Restart(n("api")));
        assert_eq!(d.on_failed(&n("api"))[1], Action::Restart(n("api")));
        let out = d.on_failed(&n("api"));
        assert_eq!(
            out,
            vec![
                Action::Notify { about: n("api"), event: AppEvent::GivenUp, to: vec![n("web")] },
                Action::Abort { component: n("api") },
                Action::Stop(n("worker")),
            ]
        );
        assert_eq!(d.state(&n("web")), Some(ComponentState::Stopped), "web never starts");
        assert_eq!(d.on_stopped(&n("worker")), vec![Action::Stop(n("db"))]);
        assert_eq!(d.on_stopped(&n("db")), vec![]);
        assert!(d.all_stopped());
    }

    #[test]
    fn only_a_stable_component_has_its_failures_forgotten() {
        let mut d = shop(FailurePolicy::Restart).with_max_attempts(2);
        bring_up(&mut d);
        for _ in 0..2 {
            assert_eq!(d.on_failed(&n("web"))[1], Action::Restart(n("web")));
            d.on_ready(&n("web"));
        }
        assert_eq!(d.attempts(&n("web")), 2, "ready and crashing again is still a crash loop");
        d.on_stable(&n("web"));
        assert_eq!(d.attempts(&n("web")), 0);
        assert_eq!(d.on_failed(&n("web"))[1], Action::Restart(n("web")));
        d.on_ready(&n("web"));
        d.on_failed(&n("web"));
        d.on_ready(&n("web"));
        let out = d.on_failed(&n("web"));
        assert_eq!(out[0], Action::Notify { about: n("web"), event: AppEvent::GivenUp, to: vec![] });
        assert_eq!(out.len(), 1, "given up after the whole application was ready once: no abort, no dependents");
        assert_eq!(d.state(&n("web")), Some(ComponentState::Failed));
    }

    #[test]
    fn stale_events_are_ignored() {
        let mut d = shop(FailurePolicy::Restart);
        assert_eq!(d.on_ready(&n("web")), vec![], "web was never started");
        assert_eq!(d.on_failed(&n("web")), vec![]);
        assert_eq!(d.on_stopped(&n("db")), vec![]);
        assert_eq!(d.on_ready(&n("nope")), vec![]);
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Ready(usize),
        Fail(usize),
        Stopped(usize),
        Undeploy,
    }

    proptest! {
        /// Whatever happens, a component is started only when everything it needs is ready, a component is
        /// stopped during undeploy only after its dependents, and undeploy ends with everything stopped.
        #[test]
        fn planner_invariants(
            edges in proptest::collection::vec(proptest::collection::btree_set(0usize..6, 0..3), 6),
            policies in proptest::collection::vec(0u8..3, 6),
            events in proptest::collection::vec(
                prop_oneof![
                    (0usize..6).prop_map(Ev::Ready),
                    (0usize..6).prop_map(Ev::Fail),
                    (0usize..6).prop_map(Ev::Stopped),
                    Just(Ev::Undeploy),
                ],
                0..40,
            ),
        ) {
            // Component i may need only components j < i: acyclic by construction.
            let names: Vec<ComponentName> = (0..6).map(|i| n(&format!("c{i}"))).collect();
            let needs: BTreeMap<ComponentName, Vec<ComponentName>> = edges
                .iter()
                .enumerate()
                .map(|(i, deps)| (names[i].clone(), deps.iter().filter(|&&j| j < i).map(|&j| names[j].clone()).collect()))
                .collect();
            let graph = AppGraph::from_needs(&needs).unwrap();
            let policy = policies
                .iter()
                .enumerate()
                .map(|(i, p)| (names[i].clone(), [FailurePolicy::Restart, FailurePolicy::Replace, FailurePolicy::StopDependents][*p as usize]))
                .collect();
            let mut d = Deployment::from_parts(graph.clone(), policy);
            let check = |d: &Deployment, acts: Vec<Action>| -> Result<Vec<ComponentName>, TestCaseError> {
                let mut stops = Vec::new();
                for a in acts {
                    match a {
                        Action::Start(c) => {
                            for dep in graph.needs(&c) {
                                prop_assert_eq!(d.state(&dep), Some(ComponentState::Ready), "{} started before {}", c, dep);
                            }
                        }
                        Action::Stop(c) => {
                            for dep in graph.direct_dependents(&c) {
                                prop_assert!(
                                    matches!(d.state(&dep), Some(ComponentState::Stopped | ComponentState::Failed)),
                                    "{} stopped while its dependent {} is {:?}", c, dep, d.state(&dep)
                                );
                            }
                            stops.push(c);
                        }
                        _ => {}
                    }
                }
                Ok(stops)
            };
            let acts = d.start();
            let mut pending_stops: Vec<ComponentName> = check(&d, acts)?;
            for ev in events {
                let acts = match ev {
                    Ev::Ready(i) => d.on_ready(&names[i]),
                    Ev::Fail(i) => d.on_failed(&names[i]),
                    Ev::Stopped(i) => d.on_stopped(&names[i]),
                    Ev::Undeploy => d.undeploy(),
                };
                pending_stops.extend(check(&d, acts)?);
            }
            // Finish: undeploy and acknowledge every stop until nothing is left.
            let acts = d.undeploy();
            let mut queue = pending_stops;
            queue.extend(check(&d, acts)?);
            let mut rounds = 0;
            while let Some(c) = queue.pop() {
                rounds += 1;
                prop_assert!(rounds < 100, "undeploy does not converge");
                let next = d.on_stopped(&c);
                queue.extend(check(&d, next)?);
            }
            prop_assert!(d.all_stopped(), "left running: {:?}", d.states());
        }
    }
}
