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
    /// The agent's ledger version when it stated what is free (`lv`; 0 from an agent that does not say): orders
    /// reports and the free amounts its answers carry (see [`ClusterView::learn`]).
    pub lv: u64,
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
            lv: wire::int_attr(attrs, "lv").ok().and_then(|v| u64::try_from(v).ok()).unwrap_or(0),
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
    pub fn apply(&mut self, mut report: Report, now: Instant) -> Applied {
        match self.entries.get_mut(&report.agent) {
            Some(e) if e.report.epoch == report.epoch && e.report.seq >= report.seq => Applied::Stale,
            Some(e) => {
                let restarted = e.report.epoch != report.epoch;
                if !restarted && e.report.lv > report.lv {
                    // An answer told this view of a newer state of the ledger than the report: keep what it said.
                    for r in &report.resources {
                        for k in [format!("{r}_free"), format!("{r}_reserved")] {
                            if let Some(v) = e.report.attrs.get(&k) {
                                report.attrs.set(k, v.clone());
                            }
                        }
                    }
                    report.lv = e.report.lv;
                    report.attrs.set("lv", i64::try_from(report.lv).unwrap_or(i64::MAX));
                }
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

    /// An agent's answer (offer, refusal, acknowledgement) said what was free at its ledger version `lv`: if that
    /// is newer than what this view holds of the same incarnation, its `R_free` and `R_reserved` are updated
    /// (the report's other attributes and its age stay). Returns whether it was newer.
    pub fn learn(&mut self, agent: &str, epoch: u64, lv: u64, free: &Amounts) -> bool {
        let Some(e) = self.entries.get_mut(agent) else { return false };
        if e.report.epoch != epoch || e.report.lv >= lv {
            return false;
        }
        let cap = e.report.capacity();
        for (r, f) in free.iter() {
            let Some(c) = cap.get(r) else { continue };
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            e.report.attrs.set(format!("{r}_free"), i(f));
            e.report.attrs.set(format!("{r}_reserved"), i(c.saturating_sub(f)));
        }
        e.report.lv = lv;
        e.report.attrs.set("lv", i64::try_from(lv).unwrap_or(i64::MAX));
        true
    }

    /// This view's holder withdrew an offer of `amounts` that the agent's last statement counted as held: they are
    /// free again as far as this view knows, until the agent's next statement. Only for an agent that states its
    /// ledger version (`lv` > 0), whose last statement in this view then followed the offer.
    pub fn credit(&mut self, agent: &str, epoch: u64, amounts: &Amounts) {
        let Some(e) = self.entries.get_mut(agent) else { return };
        if e.report.epoch != epoch || e.report.lv == 0 {
            return;
        }
        let (cap, mut free) = (e.report.capacity(), e.report.free());
        for (r, a) in amounts.iter() {
            let (Some(c), Some(f)) = (cap.get(r), free.get(r)) else { continue };
            let f = f.saturating_add(a).min(c);
            free.set(r, f);
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            e.report.attrs.set(format!("{r}_free"), i(f));
            e.report.attrs.set(format!("{r}_reserved"), i(c - f));
        }
    }

    /// This view's holder asked the agent for `amounts`, which the agent will hold for it if it admits them: they
    /// count as taken here until the agent's answer or next report says what is free (so that the holder's next
    /// requests, sent before that, go elsewhere). Only for an agent that states its ledger version.
    pub fn debit(&mut self, agent: &str, amounts: &Amounts) {
        let Some(e) = self.entries.get_mut(agent) else { return };
        if e.report.lv == 0 {
            return;
        }
        let (cap, free) = (e.report.capacity(), e.report.free());
        for (r, a) in amounts.iter() {
            let (Some(c), Some(f)) = (cap.get(r), free.get(r)) else { continue };
            let f = f.saturating_sub(a);
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            e.report.attrs.set(format!("{r}_free"), i(f));
            e.report.attrs.set(format!("{r}_reserved"), i(c - f));
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
    fn answers_update_what_is_free_until_a_newer_report() {
        let t0 = Instant::now();
        let with_lv = |seq, free, lv: i64| {
            let mut r = report("a", 1, seq, 1000, free);
            r.attrs.set("lv", lv);
            Report::from_attrs(&r.attrs).unwrap()
        };
        let mut v = ClusterView::new();
        v.apply(with_lv(1, 8, 10), t0);
        let cpus = |v: &ClusterView| v.get("a").unwrap().report.free().amount("cpus");
        // An answer at a newer ledger version is taken; one at an older version, another incarnation's or an
        // unknown agent's is not.
        assert!(v.learn("a", 1, 12, &Amounts::new().with("cpus", 5)));
        assert_eq!((cpus(&v), v.get("a").unwrap().report.reserved().amount("cpus")), (5, 3));
        assert!(!v.learn("a", 1, 11, &Amounts::new().with("cpus", 7)));
        assert!(!v.learn("a", 2, 20, &Amounts::new().with("cpus", 7)));
        assert!(!v.learn("b", 1, 20, &Amounts::new().with("cpus", 7)));
        assert_eq!(cpus(&v), 5);
        // A report sent before the answer (older version) refreshes the age but keeps the answer's amounts.
        assert_eq!(v.apply(with_lv(2, 8, 11), t0 + Duration::from_millis(100)), Applied::Updated);
        assert_eq!(cpus(&v), 5);
        assert_eq!(v.get("a").unwrap().received, t0 + Duration::from_millis(100));
        // A newer report wins.
        v.apply(with_lv(3, 6, 13), t0);
        assert_eq!((cpus(&v), v.get("a").unwrap().report.lv), (6, 13));
        // A declined offer is free again (never beyond the capacity) until the agent's next statement.
        v.credit("a", 1, &Amounts::new().with("cpus", 1));
        assert_eq!(cpus(&v), 7);
        v.credit("a", 1, &Amounts::new().with("cpus", 4));
        assert_eq!((cpus(&v), v.get("a").unwrap().report.reserved().amount("cpus")), (8, 0));
        v.credit("a", 2, &Amounts::new().with("cpus", 4));
        assert!(v.learn("a", 1, 14, &Amounts::new().with("cpus", 3)));
        assert_eq!(cpus(&v), 3);
        // A request sent counts as taken until the answer.
        v.debit("a", &Amounts::new().with("cpus", 2));
        assert_eq!(cpus(&v), 1);
        v.debit("a", &Amounts::new().with("cpus", 2));
        assert_eq!((cpus(&v), v.get("a").unwrap().report.reserved().amount("cpus")), (0, 8));
        assert!(v.learn("a", 1, 15, &Amounts::new().with("cpus", 2)));
        assert_eq!(cpus(&v), 2);
        // Not for an agent that does not state its version.
        v.apply(report("c", 1, 1, 1000, 2), t0);
        v.debit("c", &Amounts::new().with("cpus", 1));
        v.credit("c", 1, &Amounts::new().with("cpus", 4));
        assert_eq!(v.get("c").unwrap().report.free().amount("cpus"), 2);
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
