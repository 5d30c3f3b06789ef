//! The cluster view (2K's Global Resource Manager): an approximate picture of every agent built from their reports,
//! as soft state. Each report carries a lifetime; an agent not heard from within it drops out. Any number of nodes
//! hold a view of their own from the channel; none is authoritative (the agents' ledgers are). Pure: time passed in.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kecho::Attrs;

use crate::error::ParseError;
use crate::expr::Requirement;
use crate::negotiate::{attr_u64, screen, Miss};
use crate::types::Amounts;
use crate::wire;

/// One agent's report: everything it publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The agent's name.
    pub agent: String,
    /// Its incarnation.
    pub epoch: u64,
    /// Report number within the incarnation (newer is larger).
    pub seq: u64,
    /// How long the report stays valid.
    pub lifetime: Duration,
    /// The counted resources (each has `NAME`, `NAME_free` and `NAME_reserved` attributes).
    pub resources: Vec<String>,
    /// Attributes the agent could not measure here.
    pub unknown: Vec<String>,
    /// All attributes: measured, static, capacity, free and reserved, and the fields above.
    pub attrs: Attrs,
}

impl Report {
    /// Reads a report event's attributes.
    pub fn from_attrs(attrs: &Attrs) -> Result<Self, ParseError> {
        let list = |s: Option<&str>| -> Vec<String> {
            s.unwrap_or("").split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect()
        };
        Ok(Report {
            agent: wire::str_attr(attrs, "agent")?.to_owned(),
            epoch: wire::epoch_of(attrs, "epoch")?,
            seq: u64::try_from(wire::int_attr(attrs, "seq")?).map_err(|_| ParseError::new("negative `seq`"))?,
            lifetime: wire::dur(attrs, "lifetime_ms")?,
            resources: list(wire::opt_str(attrs, "resources")),
            unknown: list(wire::opt_str(attrs, "unknown")),
            attrs: attrs.clone(),
        })
    }

    /// Capacity per resource.
    pub fn capacity(&self) -> Amounts {
        self.per_resource("")
    }
    /// Free per resource.
    pub fn free(&self) -> Amounts {
        self.per_resource("_free")
    }
    /// Reserved (offers held and reservations) per resource.
    pub fn reserved(&self) -> Amounts {
        self.per_resource("_reserved")
    }

    fn per_resource(&self, suffix: &str) -> Amounts {
        let mut a = Amounts::new();
        for r in &self.resources {
            if let Some(v) = attr_u64(&self.attrs, &format!("{r}{suffix}")) {
                a.set(r.clone(), v);
            }
        }
        a
    }
}

/// A report in a view, with when it arrived.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    /// The report.
    pub report: Report,
    /// When this view received it.
    pub received: Instant,
}

impl ViewEntry {
    /// How old the report is.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.received)
    }
    /// When it drops out unless a newer one arrives.
    pub fn expires(&self) -> Instant {
        self.received + self.report.lifetime
    }
}

/// What a report did to the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new agent (or a new incarnation of one).
    Joined,
    /// A newer report of a known agent.
    Updated,
    /// An older or repeated report, ignored.
    Stale,
}

/// The view.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    entries: BTreeMap<String, ViewEntry>,
}

impl ClusterView {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in a report received at `now`. A report of another incarnation replaces the old one (the agent
    /// restarted); within an incarnation only a newer sequence number counts.
    pub fn apply(&mut self, report: Report, now: Instant) -> Applied {
        match self.entries.get_mut(&report.agent) {
            Some(e) if e.report.epoch == report.epoch && e.report.seq >= report.seq => Applied::Stale,
            Some(e) => {
                let restarted = e.report.epoch != report.epoch;
                *e = ViewEntry { report, received: now };
                if restarted {
                    Applied::Joined
                } else {
                    Applied::Updated
                }
            }
            None => {
                self.entries.insert(report.agent.clone(), ViewEntry { report, received: now });
                Applied::Joined
            }
        }
    }

    /// An agent said goodbye (only its current incarnation is removed).
    pub fn remove(&mut self, agent: &str, epoch: u64) -> bool {
        if self.entries.get(agent).is_some_and(|e| e.report.epoch == epoch) {
            self.entries.remove(agent);
            true
        } else {
            false
        }
    }

    /// Drops every agent whose report outlived its lifetime; returns their names.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let gone: Vec<String> =
            self.entries.iter().filter(|(_, e)| e.expires() <= now).map(|(k, _)| k.clone()).collect();
        for g in &gone {
            self.entries.remove(g);
        }
        gone
    }

    /// When the next report runs out.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.values().map(ViewEntry::expires).min()
    }

    /// The agents, by name.
    pub fn iter(&self) -> impl Iterator<Item = &ViewEntry> {
        self.entries.values()
    }

    /// One agent.
    pub fn get(&self, agent: &str) -> Option<&ViewEntry> {
        self.entries.get(agent)
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no agent is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Discovery (2K's trader): the agents that could serve `amounts` under `require` according to this view, and
    /// for the others why not.
    pub fn candidates(&self, amounts: &Amounts, require: Option<&Requirement>) -> (Vec<&ViewEntry>, Vec<(&str, Miss)>) {
        let mut yes = Vec::new();
        let mut no = Vec::new();
        for e in self.entries.values() {
            match screen(amounts, require, &e.report.attrs) {
                Ok(()) => yes.push(e),
                Err(m) => no.push((e.report.agent.as_str(), m)),
            }
        }
        (yes, no)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report(agent: &str, epoch: u64, seq: u64, lifetime_ms: i64, cpus_free: i64) -> Report {
        let attrs = Attrs::new()
            .with("agent", agent)
            .with("epoch", epoch as i64)
            .with("seq", seq as i64)
            .with("lifetime_ms", lifetime_ms)
            .with("resources", "cpus")
            .with("cpus", 8i64)
            .with("cpus_free", cpus_free)
            .with("cpus_reserved", 8 - cpus_free);
        Report::from_attrs(&attrs).unwrap()
    }

    #[test]
    fn reports_age_out_and_restarts_replace() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut v = ClusterView::new();
        assert_eq!(v.apply(report("a", 1, 1, 1000, 8), t0), Applied::Joined);
        assert_eq!(v.apply(report("a", 1, 1, 1000, 2), t0), Applied::Stale);
        assert_eq!(v.apply(report("b", 1, 1, 3000, 2), t0), Applied::Joined);
        assert_eq!(v.apply(report("a", 1, 2, 1000, 4), t0 + ms(500)), Applied::Updated);
        assert_eq!(v.get("a").unwrap().report.free().amount("cpus"), 4);
        assert_eq!(v.get("a").unwrap().report.reserved().amount("cpus"), 4);
        assert_eq!(v.next_expiry(), Some(t0 + ms(1500)));
        assert_eq!(v.expire(t0 + ms(1499)), Vec::<String>::new());
        assert_eq!(v.expire(t0 + ms(1500)), vec!["a".to_string()]);
        assert_eq!(v.apply(report("b", 2, 1, 3000, 8), t0 + ms(1600)), Applied::Joined);
        assert!(!v.remove("b", 1));
        assert!(v.remove("b", 2));
        assert!(v.is_empty());
    }

    #[test]
    fn discovery_says_why_not() {
        let t0 = Instant::now();
        let mut v = ClusterView::new();
        v.apply(report("a", 1, 1, 1000, 8), t0);
        v.apply(report("b", 1, 1, 1000, 1), t0);
        let (yes, no) = v.candidates(&Amounts::new().with("cpus", 2), None);
        assert_eq!(yes.len(), 1);
        assert_eq!(yes[0].report.agent, "a");
        assert_eq!(no, vec![("b", Miss::Short { resource: "cpus".into(), free: 1 })]);
    }

    #[test]
    fn a_report_without_its_fields_is_refused() {
        assert!(Report::from_attrs(&Attrs::new().with("agent", "a")).is_err());
    }

    proptest! {
        /// Whatever the order of reports, an agent is in the view exactly while its newest report received is
        /// younger than that report's lifetime.
        #[test]
        fn soft_state(events in proptest::collection::vec((0u8..3, 1u64..5, 0u64..2000, 1i64..1500), 1..60)) {
            let t0 = Instant::now();
            let mut v = ClusterView::new();
            let mut now = t0;
            let mut last: BTreeMap<String, (u64, Instant, Duration)> = BTreeMap::new();
            for (agent, seq, wait, life) in events {
                now += Duration::from_millis(wait);
                v.expire(now);
                last.retain(|_, (_, at, l)| *at + *l > now);
                let name = format!("n{agent}");
                if v.apply(report(&name, 1, seq, life, 1), now) != Applied::Stale {
                    last.insert(name, (seq, now, Duration::from_millis(life as u64)));
                }
                let names: Vec<&String> = last.keys().collect();
                let in_view: Vec<&String> = v.iter().map(|e| &e.report.agent).collect();
                prop_assert_eq!(names, in_view);
            }
        }
    }
}
