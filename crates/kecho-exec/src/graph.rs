//! The dependency graph of an application, on petgraph.
//!
//! An edge runs from a component to each component that needs it, so a topological order is a start order. The graph
//! refuses a missing dependency (with the chain of components that leads to it) and a cycle (with the cycle itself,
//! `a -> b -> a`, read "a needs b, which needs a"), and cuts the components into *waves*: wave 0 needs nothing, wave
//! `k` needs only components of earlier waves, at least one of wave `k - 1`. Components of one wave are independent and
//! start in parallel; undeploy walks the waves backwards.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, EdgeRef, Reversed};
use petgraph::Direction;

use crate::app::{ComponentName, ComponentSpec};

/// Why a dependency graph is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GraphError {
    /// A component needs a component the application does not define. `path` runs from a component nothing depends
    /// on down to the one whose `after` names the missing component.
    #[error("line {line}: `{}` needs `{missing}`, which the application does not define (path: {} -> {missing})", path.last().map(ComponentName::as_str).unwrap_or(""), join(path))]
    MissingDependency {
        /// The chain of components that needs the missing one, outermost first.
        path: Vec<ComponentName>,
        /// The missing component.
        missing: ComponentName,
        /// The 1-based line of the `after` entry that names it (0 when not parsed from a file).
        line: usize,
    },
    /// The components depend on each other in a cycle; `cycle` starts and ends with the same component and each
    /// needs the next.
    #[error("line {line}: dependency cycle {}", join(cycle))]
    Cycle {
        /// The cycle, first component repeated at the end.
        cycle: Vec<ComponentName>,
        /// The 1-based line of the first `after` entry on the cycle (0 when not parsed from a file).
        line: usize,
    },
}

impl GraphError {
    /// The 1-based line the error points at (0 when the graph was not parsed from a file).
    pub fn line(&self) -> usize {
        match self {
            GraphError::MissingDependency { line, .. } | GraphError::Cycle { line, .. } => *line,
        }
    }
}

fn join(names: &[ComponentName]) -> String {
    names.iter().map(ComponentName::as_str).collect::<Vec<_>>().join(" -> ")
}

/// An application's checked, acyclic dependency graph.
#[derive(Debug, Clone)]
pub struct AppGraph {
    graph: DiGraph<ComponentName, ()>,
    index: BTreeMap<ComponentName, NodeIndex>,
    waves: Vec<Vec<ComponentName>>,
}

impl PartialEq for AppGraph {
    fn eq(&self, other: &AppGraph) -> bool {
        self.waves == other.waves && self.index.keys().all(|c| self.needs(c) == other.needs(c))
    }
}

impl AppGraph {
    /// Builds the graph of parsed components (errors name the line of the offending `after` entry).
    pub fn build(components: &BTreeMap<ComponentName, ComponentSpec>) -> Result<AppGraph, GraphError> {
        let needs = components.iter().map(|(n, s)| (n.clone(), s.after.clone())).collect();
        let line_of =
            |c: &ComponentName, i: usize| components.get(c).and_then(|s| s.after_lines.get(i)).copied().unwrap_or(0);
        AppGraph::build_with_lines(&needs, &line_of)
    }

    /// Builds the graph from each component's list of needed components.
    pub fn from_needs(needs: &BTreeMap<ComponentName, Vec<ComponentName>>) -> Result<AppGraph, GraphError> {
        AppGraph::build_with_lines(needs, &|_, _| 0)
    }

    fn build_with_lines(
        needs: &BTreeMap<ComponentName, Vec<ComponentName>>,
        line_of: &dyn Fn(&ComponentName, usize) -> usize,
    ) -> Result<AppGraph, GraphError> {
        let mut graph = DiGraph::new();
        let index: BTreeMap<ComponentName, NodeIndex> =
            needs.keys().map(|name| (name.clone(), graph.add_node(name.clone()))).collect();
        // Missing dependencies first: a cycle through a missing component cannot be shown.
        for (name, deps) in needs {
            for (i, dep) in deps.iter().enumerate() {
                if !index.contains_key(dep) {
                    return Err(GraphError::MissingDependency {
                        path: dependents_chain(needs, name),
                        missing: dep.clone(),
                        line: line_of(name, i),
                    });
                }
            }
        }
        for (name, deps) in needs {
            for dep in deps {
                graph.update_edge(index[dep], index[name], ());
            }
        }
        let order = match toposort(&graph, None) {
            Ok(order) => order,
            Err(_) => {
                let cycle = find_cycle(&graph);
                let line = match (cycle.first(), cycle.get(1)) {
                    (Some(a), Some(b)) => needs[a].iter().position(|d| d == b).map(|i| line_of(a, i)).unwrap_or(0),
                    _ => 0,
                };
                return Err(GraphError::Cycle { cycle, line });
            }
        };
        // Longest-path layering: a component's wave is one more than the latest wave among its needs.
        let mut level: BTreeMap<NodeIndex, usize> = BTreeMap::new();
        for n in &order {
            let l = graph.edges_directed(*n, Direction::Incoming).map(|e| level[&e.source()] + 1).max().unwrap_or(0);
            level.insert(*n, l);
        }
        let depth = level.values().max().map_or(0, |m| m + 1);
        let mut waves = vec![Vec::new(); depth];
        for (name, n) in &index {
            waves[level[n]].push(name.clone());
        }
        Ok(AppGraph { graph, index, waves })
    }

    /// The waves of the start order: each wave's components need only components of earlier waves. Names are sorted
    /// within a wave.
    pub fn waves(&self) -> &[Vec<ComponentName>] {
        &self.waves
    }

    /// The stop order: the waves backwards, so a component stops only after everything that needs it.
    pub fn undeploy_waves(&self) -> Vec<Vec<ComponentName>> {
        self.waves.iter().rev().cloned().collect()
    }

    /// Every component, in a start order (wave by wave).
    pub fn start_order(&self) -> Vec<ComponentName> {
        self.waves.iter().flatten().cloned().collect()
    }

    /// Whether the graph has this component.
    pub fn contains(&self, c: &ComponentName) -> bool {
        self.index.contains_key(c)
    }

    /// The components `c` needs directly, sorted.
    pub fn needs(&self, c: &ComponentName) -> Vec<ComponentName> {
        self.neighbours(c, Direction::Incoming)
    }

    /// The components that need `c` directly, sorted.
    pub fn direct_dependents(&self, c: &ComponentName) -> Vec<ComponentName> {
        self.neighbours(c, Direction::Outgoing)
    }

    /// Every component that needs `c`, directly or not, in start order.
    pub fn dependents(&self, c: &ComponentName) -> Vec<ComponentName> {
        let Some(&start) = self.index.get(c) else { return Vec::new() };
        let mut reached = BTreeSet::new();
        let mut dfs = Dfs::new(&self.graph, start);
        while let Some(n) = dfs.next(&self.graph) {
            if n != start {
                reached.insert(self.graph[n].clone());
            }
        }
        self.start_order().into_iter().filter(|x| reached.contains(x)).collect()
    }

    /// Every component `c` needs, directly or not, in start order.
    pub fn prerequisites(&self, c: &ComponentName) -> Vec<ComponentName> {
        let Some(&start) = self.index.get(c) else { return Vec::new() };
        let reversed = Reversed(&self.graph);
        let mut reached = BTreeSet::new();
        let mut dfs = Dfs::new(reversed, start);
        while let Some(n) = dfs.next(reversed) {
            if n != start {
                reached.insert(self.graph[n].clone());
            }
        }
        self.start_order().into_iter().filter(|x| reached.contains(x)).collect()
    }

    fn neighbours(&self, c: &ComponentName, dir: Direction) -> Vec<ComponentName> {
        let Some(&n) = self.index.get(c) else { return Vec::new() };
        let mut v: Vec<ComponentName> = self.graph.neighbors_directed(n, dir).map(|m| self.graph[m].clone()).collect();
        v.sort();
        v
    }
}

impl fmt::Display for AppGraph {
    /// One line per component in start order: `wave N  name <- needs, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, wave) in self.waves.iter().enumerate() {
            for c in wave {
                let needs = self.needs(c);
                if needs.is_empty() {
                    writeln!(f, "wave {i}  {c}")?;
                } else {
                    writeln!(
                        f,
                        "wave {i}  {c} <- {}",
                        needs.iter().map(ComponentName::as_str).collect::<Vec<_>>().join(", ")
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// The chain from a component nothing depends on down to `c`, following the smallest dependent at each step.
fn dependents_chain(needs: &BTreeMap<ComponentName, Vec<ComponentName>>, c: &ComponentName) -> Vec<ComponentName> {
    let mut chain = vec![c.clone()];
    let mut seen = BTreeSet::from([c.clone()]);
    let mut at = c.clone();
    while let Some(up) = needs.iter().find(|(n, deps)| deps.contains(&at) && !seen.contains(*n)).map(|(n, _)| n.clone())
    {
        seen.insert(up.clone());
        chain.push(up.clone());
        at = up;
    }
    chain.reverse();
    chain
}

/// A shortest cycle through the smallest component of the first cyclic strongly connected component, written in the
/// "needs" direction and closed (first component repeated at the end).
fn find_cycle(graph: &DiGraph<ComponentName, ()>) -> Vec<ComponentName> {
    let sccs = tarjan_scc(graph);
    let Some(scc) = sccs.iter().filter(|s| s.len() > 1).min_by_key(|s| s.iter().map(|n| &graph[*n]).min()) else {
        return Vec::new();
    };
    let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
    let start = *scc.iter().min_by_key(|n| &graph[**n]).expect("a cyclic component has members");
    // Breadth-first search from `start` along "needs" edges (incoming edges here) back to `start`.
    let mut parent: BTreeMap<NodeIndex, NodeIndex> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        let mut next: Vec<NodeIndex> =
            graph.neighbors_directed(n, Direction::Incoming).filter(|m| members.contains(m)).collect();
        next.sort_by_key(|m| &graph[*m]);
        for m in next {
            if m == start {
                // Walk back from `n` to `start`, then turn it round: start -> ... -> n -> start.
                let mut chain = Vec::new();
                let mut at = n;
                while at != start {
                    chain.push(graph[at].clone());
                    at = parent[&at];
                }
                chain.reverse();
                let mut path = vec![graph[start].clone()];
                path.extend(chain);
                path.push(graph[start].clone());
                return path;
            }
            if let std::collections::btree_map::Entry::Vacant(e) = parent.entry(m) {
                e.insert(n);
                queue.push_back(m);
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name(s: &str) -> ComponentName {
        s.parse().unwrap()
    }

    fn needs(spec: &[(&str, &[&str])]) -> BTreeMap<ComponentName, Vec<ComponentName>> {
        spec.iter().map(|(n, d)| (name(n), d.iter().map(|x| name(x)).collect())).collect()
    }

    fn names(v: &[ComponentName]) -> Vec<&str> {
        v.iter().map(ComponentName::as_str).collect()
    }

    #[test]
    fn waves_in_dependency_order() {
        let g = AppGraph::from_needs(&needs(&[
            ("db", &[]),
            ("cache", &[]),
            ("api", &["db", "cache"]),
            ("worker", &["db"]),
            ("web", &["api"]),
        ]))
        .unwrap();
        let waves: Vec<Vec<&str>> = g.waves().iter().map(|w| names(w)).collect();
        assert_eq!(waves, vec![vec!["cache", "db"], vec!["api", "worker"], vec!["web"]]);
        let undeploy = g.undeploy_waves();
        let back: Vec<Vec<&str>> = undeploy.iter().map(|w| names(w)).collect();
        assert_eq!(back, vec![vec!["web"], vec!["api", "worker"], vec!["cache", "db"]]);
        assert_eq!(names(&g.dependents(&name("db"))), vec!["api", "worker", "web"]);
        assert_eq!(names(&g.direct_dependents(&name("db"))), vec!["api", "worker"]);
        assert_eq!(names(&g.prerequisites(&name("web"))), vec!["cache", "db", "api"]);
        assert_eq!(names(&g.needs(&name("api"))), vec!["cache", "db"]);
        assert_eq!(g.to_string().lines().last(), Some("wave 2  web <- api"));
    }

    #[test]
    fn missing_dependency_shows_the_path() {
        let err = AppGraph::from_needs(&needs(&[("web", &["api"]), ("api", &["db"])])).unwrap_err();
        assert_eq!(
            err,
            GraphError::MissingDependency { path: vec![name("web"), name("api")], missing: name("db"), line: 0 }
        );
        assert!(err.to_string().contains("path: web -> api -> db"), "{err}");
    }

    #[test]
    fn cycle_shows_the_cycle() {
        let err = AppGraph::from_needs(&needs(&[
            ("a", &["b"]),
            ("b", &["c"]),
            ("c", &["a", "d"]),
            ("d", &[]),
            ("e", &["a"]),
        ]))
        .unwrap_err();
        assert_eq!(err, GraphError::Cycle { cycle: vec![name("a"), name("b"), name("c"), name("a")], line: 0 });
        assert!(err.to_string().contains("a -> b -> c -> a"), "{err}");
    }

    fn arb_needs() -> impl Strategy<Value = BTreeMap<ComponentName, Vec<ComponentName>>> {
        // Up to 12 components c0..c11, each with random edges to any component (cycles possible).
        (1usize..12).prop_flat_map(|n| {
            proptest::collection::vec(proptest::collection::btree_set(0..n, 0..4), n).prop_map(move |edges| {
                edges
                    .into_iter()
                    .enumerate()
                    .map(|(i, deps)| {
                        (
                            name(&format!("c{i}")),
                            deps.into_iter().filter(|d| *d != i).map(|d| name(&format!("c{d}"))).collect(),
                        )
                    })
                    .collect()
            })
        })
    }

    proptest! {
        #[test]
        fn waves_respect_every_edge_or_a_true_cycle_is_reported(needs in arb_needs()) {
            match AppGraph::from_needs(&needs) {
                Ok(g) => {
                    let wave_of: BTreeMap<&ComponentName, usize> =
                        g.waves().iter().enumerate().flat_map(|(i, w)| w.iter().map(move |c| (c, i))).collect();
                    prop_assert_eq!(wave_of.len(), needs.len(), "every component is in exactly one wave");
                    for (c, deps) in &needs {
                        for d in deps {
                            prop_assert!(wave_of[d] < wave_of[c], "{} needs {} but starts no later", c, d);
                        }
                        // Layering is tight: a component in wave k > 0 needs something in wave k - 1.
                        if wave_of[c] > 0 {
                            prop_assert!(deps.iter().any(|d| wave_of[d] + 1 == wave_of[c]));
                        }
                    }
                    let undeploy: Vec<ComponentName> = g.undeploy_waves().into_iter().flatten().collect();
                    let mut start = g.start_order();
                    start.reverse();
                    let pos = |v: &[ComponentName], x: &ComponentName| v.iter().position(|y| y == x).unwrap();
                    for (c, deps) in &needs {
                        for d in deps {
                            prop_assert!(pos(&undeploy, c) < pos(&undeploy, d), "undeploy stops {} before {}", d, c);
                        }
                    }
                }
                Err(GraphError::Cycle { cycle, .. }) => {
                    prop_assert!(cycle.len() >= 3);
                    prop_assert_eq!(cycle.first(), cycle.last());
                    for pair in cycle.windows(2) {
                        prop_assert!(needs[&pair[0]].contains(&pair[1]), "{} does not need {}", pair[0], pair[1]);
                    }
                }
                Err(other) => prop_assert!(false, "unexpected {}", other),
            }
        }
    }
}
