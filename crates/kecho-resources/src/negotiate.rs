//! The requester's side of a negotiation, pure: which agents a request goes to (screening an agent's attributes
//! against the amounts and the requirement), which offers it confirms (by rank, then response time), and the reason
//! it gives when nothing admits it. Time is passed in.

use std::time::{Duration, Instant};

use kecho::{Attrs, Value};

use crate::expr::{Rank, Requirement};
use crate::types::{human, Amounts, ReservationId};

/// Why an agent cannot serve a request, as seen from its attributes.
#[derive(Debug, Clone, PartialEq)]
pub enum Miss {
    /// It does not count this resource.
    Unknown(String),
    /// Not enough of a resource is free.
    Short {
        /// The resource.
        resource: String,
        /// What is free there.
        free: u64,
    },
    /// Its attributes do not satisfy the requirement.
    Requirement,
}

/// An integer attribute as `u64` (negative or missing: `None`; floats are truncated).
pub fn attr_u64(attrs: &Attrs, name: &str) -> Option<u64> {
    match attrs.get(name)? {
        Value::Int(i) => u64::try_from(*i).ok(),
        Value::Float(f) if *f >= 0.0 && f.is_finite() => Some(*f as u64),
        _ => None,
    }
}

/// Can an agent with these attributes (`NAME_free` per resource) serve `amounts` under `require`?
pub fn screen(amounts: &Amounts, require: Option<&Requirement>, attrs: &Attrs) -> Result<(), Miss> {
    Screen::new(amounts).check(require, attrs)
}

/// [`screen`] prepared once for many agents: the attribute names (`NAME_free`) are built once, not per agent (a
/// requester screens every agent of the channel for every request).
#[derive(Debug, Clone)]
pub struct Screen {
    /// Per resource: its name, its `NAME_free` attribute, the amount wanted.
    wants: Vec<(String, String, u64)>,
}

impl Screen {
    /// Screening for these amounts.
    pub fn new(amounts: &Amounts) -> Self {
        Screen { wants: amounts.iter().map(|(r, want)| (r.to_owned(), format!("{r}_free"), want)).collect() }
    }

    /// Can an agent with these attributes serve the amounts under `require`?
    pub fn check(&self, require: Option<&Requirement>, attrs: &Attrs) -> Result<(), Miss> {
        for (r, key, want) in &self.wants {
            let Some(free) = attr_u64(attrs, key) else {
                return Err(Miss::Unknown(r.clone()));
            };
            if free < *want {
                return Err(Miss::Short { resource: r.clone(), free });
            }
        }
        if let Some(req) = require {
            if !req.matches(attrs) {
                return Err(Miss::Requirement);
            }
        }
        Ok(())
    }

    /// [`Screen::check`] without saying why: no allocation (the common case of a request that many agents pass or
    /// fail, when the reasons are not needed). `Some(true)` means the agent was short of a resource it counts.
    pub fn passes(&self, require: Option<&Requirement>, attrs: &Attrs) -> Result<(), bool> {
        for (_, key, want) in &self.wants {
            match attr_u64(attrs, key) {
                None => return Err(false),
                Some(free) if free < *want => return Err(true),
                Some(_) => {}
            }
        }
        match require {
            Some(req) if !req.matches(attrs) => Err(false),
            _ => Ok(()),
        }
    }
}

/// The reason for people when no agent can serve: the resource most agents lacked, with the best on offer, e.g.
/// "no agent has mem_free >= 8.0 GB; best offer 6.1 GB on b".
pub fn explain<'a>(
    amounts: &Amounts,
    require: Option<&Requirement>,
    misses: impl IntoIterator<Item = (&'a str, &'a Miss)>,
) -> String {
    let mut considered = 0usize;
    let mut unknown: Vec<&str> = Vec::new();
    let mut req = 0usize;
    // Per resource: how many agents were short, and the best free amount with its agent.
    let mut short: Vec<(&str, usize, u64, &str)> = Vec::new();
    for (agent, m) in misses {
        considered += 1;
        match m {
            Miss::Unknown(r) => unknown.push(r),
            Miss::Requirement => req += 1,
            Miss::Short { resource, free } => match short.iter_mut().find(|s| s.0 == resource) {
                Some(s) => {
                    s.1 += 1;
                    if *free > s.2 {
                        s.2 = *free;
                        s.3 = agent;
                    }
                }
                None => short.push((resource, 1, *free, agent)),
            },
        }
    }
    if considered == 0 {
        return "no agent is on the channel".into();
    }
    short.sort_by_key(|s| std::cmp::Reverse(s.1));
    if let Some((r, _, best, agent)) = short.first() {
        return format!(
            "no agent has {r}_free >= {}; best offer {} on {agent}",
            human(r, amounts.amount(r)),
            human(r, *best)
        );
    }
    if req > 0 {
        let expr = require.map_or("", |r| r.expr());
        return format!("no agent satisfies `{expr}` ({considered} considered)");
    }
    unknown.sort_unstable();
    unknown.dedup();
    format!("unknown resource `{}`: no agent counts it", unknown.join("`, `"))
}

/// An offer as the requester sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferInfo {
    /// The reservation it would become.
    pub id: ReservationId,
    /// What it holds.
    pub amounts: Amounts,
    /// The request's rank at the agent, if the request has a rank.
    pub rank: Option<f64>,
    /// How long the agent holds it.
    pub hold: Duration,
}

/// One negotiation: a request sent to `expected` agents at `started`, collecting offers and refusals.
#[derive(Debug, Clone)]
pub struct Negotiation {
    started: Instant,
    window: Duration,
    expected: usize,
    count: usize,
    ranked: bool,
    offers: Vec<(OfferInfo, Duration)>,
    refusals: Vec<(String, String, Option<Miss>)>,
}

/// What to do with the offers once a negotiation is ready.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Confirm these (best first) and withdraw the rest.
    Confirm {
        /// The chosen offers, best first.
        chosen: Vec<OfferInfo>,
        /// The others, to decline at once so that their capacity is free before their hold time ends.
        declined: Vec<OfferInfo>,
    },
    /// Too few offers: decline them all and fail with this reason.
    Fail {
        /// Why, for people.
        reason: String,
        /// Offers to decline.
        declined: Vec<OfferInfo>,
    },
}

impl Negotiation {
    /// A request that went to `expected` agents, wanting `count` reservations on distinct agents, ranked or not,
    /// waiting at most `window` for answers.
    pub fn new(started: Instant, expected: usize, count: usize, ranked: bool, window: Duration) -> Self {
        Negotiation { started, window, expected, count: count.max(1), ranked, offers: Vec::new(), refusals: Vec::new() }
    }

    /// An offer arrived. A second answer from the same agent is ignored.
    pub fn offer(&mut self, offer: OfferInfo, now: Instant) {
        if self.answered(&offer.id.agent) {
            return;
        }
        self.offers.push((offer, now.saturating_duration_since(self.started)));
    }

    /// A refusal arrived from `agent`, with its reason and, if it said, the resource it lacked.
    pub fn refusal(&mut self, agent: &str, reason: &str, miss: Option<Miss>) {
        if self.answered(agent) {
            return;
        }
        self.refusals.push((agent.to_owned(), reason.to_owned(), miss));
    }

    fn answered(&self, agent: &str) -> bool {
        self.offers.iter().any(|(o, _)| o.id.agent == agent) || self.refusals.iter().any(|(a, ..)| a == agent)
    }

    /// How many agents answered.
    pub fn answers(&self) -> usize {
        self.offers.len() + self.refusals.len()
    }

    /// When the negotiation stops waiting.
    pub fn deadline(&self) -> Instant {
        self.started + self.window
    }

    /// True when it is time to decide: every agent asked has answered, the window is over, or (without a rank)
    /// enough offers are in, since then the fastest answers win.
    pub fn ready(&self, now: Instant) -> bool {
        self.answers() >= self.expected || now >= self.deadline() || (!self.ranked && self.offers.len() >= self.count)
    }

    /// Chooses: the `count` best offers by rank (higher first; no rank last), then by response time.
    pub fn decide(mut self, amounts: &Amounts) -> Decision {
        self.offers.sort_by(|(a, ta), (b, tb)| {
            let ra = a.rank.unwrap_or(f64::NEG_INFINITY);
            let rb = b.rank.unwrap_or(f64::NEG_INFINITY);
            rb.total_cmp(&ra).then(ta.cmp(tb)).then_with(|| a.id.agent.cmp(&b.id.agent))
        });
        let mut offers: Vec<OfferInfo> = self.offers.into_iter().map(|(o, _)| o).collect();
        if offers.len() >= self.count {
            let declined = offers.split_off(self.count);
            return Decision::Confirm { chosen: offers, declined };
        }
        let reason = if offers.is_empty() && self.refusals.is_empty() {
            format!("no answer from the {} agent(s) asked within {} ms", self.expected, self.window.as_millis())
        } else if offers.is_empty() {
            let with_miss: Vec<(&str, &Miss)> =
                self.refusals.iter().filter_map(|(a, _, m)| m.as_ref().map(|m| (a.as_str(), m))).collect();
            if with_miss.is_empty() {
                let (a, r, _) = &self.refusals[0];
                format!("refused by {a}: {r}")
            } else {
                explain(amounts, None, with_miss)
            }
        } else {
            format!("wanted {} reservations on distinct agents, {} admitted it", self.count, offers.len())
        };
        Decision::Fail { reason, declined: offers }
    }
}

/// Picks the agents a request goes to from candidates that passed [`screen`]: all of them when `fanout` is 0, else
/// the `fanout` best by `rank` over their (possibly stale) attributes, ties broken by `tie` (a random draw per
/// candidate, so that concurrent requesters spread out).
pub fn pick(candidates: &mut Vec<(usize, Option<f64>, u64)>, fanout: usize) {
    if fanout == 0 || candidates.len() <= fanout {
        return;
    }
    candidates.sort_by(|a, b| {
        b.1.unwrap_or(f64::NEG_INFINITY).total_cmp(&a.1.unwrap_or(f64::NEG_INFINITY)).then(a.2.cmp(&b.2))
    });
    candidates.truncate(fanout);
}

/// The rank of an agent's attributes, if the request has one.
pub fn rank_of(rank: Option<&Rank>, attrs: &Attrs) -> Option<f64> {
    rank.and_then(|r| r.eval(attrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(agent: &str, rank: Option<f64>) -> OfferInfo {
        OfferInfo {
            id: ReservationId { agent: agent.into(), epoch: 1, n: 1 },
            amounts: Amounts::new().with("cpus", 1),
            rank,
            hold: Duration::from_secs(1),
        }
    }

    #[test]
    fn best_rank_then_fastest() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut n = Negotiation::new(t0, 3, 1, true, ms(100));
        n.offer(offer("slow-best", Some(5.0)), t0 + ms(9));
        assert!(!n.ready(t0 + ms(9)));
        n.offer(offer("fast-best", Some(5.0)), t0 + ms(2));
        n.offer(offer("fast-worse", Some(1.0)), t0 + ms(1));
        assert!(n.ready(t0 + ms(10)));
        match n.decide(&Amounts::new()) {
            Decision::Confirm { chosen, declined } => {
                assert_eq!(chosen[0].id.agent, "fast-best");
                assert_eq!(declined.len(), 2);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn unranked_takes_the_first_answers_and_gang_fails_whole() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut n = Negotiation::new(t0, 5, 2, false, ms(100));
        n.offer(offer("a", None), t0 + ms(1));
        assert!(!n.ready(t0 + ms(1)));
        n.offer(offer("a", None), t0 + ms(1));
        assert_eq!(n.answers(), 1, "a second answer of one agent is ignored");
        n.offer(offer("b", None), t0 + ms(2));
        assert!(n.ready(t0 + ms(2)));

        let mut n = Negotiation::new(t0, 2, 2, false, ms(100));
        n.offer(offer("a", None), t0);
        n.refusal("b", "cpus: wants 1, 0 free", Some(Miss::Short { resource: "cpus".into(), free: 0 }));
        assert!(n.ready(t0));
        match n.decide(&Amounts::new().with("cpus", 1)) {
            Decision::Fail { reason, declined } => {
                assert_eq!(declined.len(), 1);
                assert!(reason.contains("1 admitted"), "{reason}");
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn reasons_name_the_best_offer() {
        let amounts = Amounts::new().with("mem", 8_000_000_000);
        let a = Miss::Short { resource: "mem".into(), free: 2_000_000_000 };
        let b = Miss::Short { resource: "mem".into(), free: 6_100_000_000 };
        let r = explain(&amounts, None, [("a", &a), ("b", &b)]);
        assert_eq!(r, "no agent has mem_free >= 8.0 GB; best offer 6.1 GB on b");
        let req = Requirement::compile("zone == \"c\"").unwrap();
        assert_eq!(
            explain(&amounts, Some(&req), [("a", &Miss::Requirement)]),
            "no agent satisfies `zone == \"c\"` (1 considered)"
        );
        assert_eq!(
            explain(&amounts, None, [("a", &Miss::Unknown("tpu".into()))]),
            "unknown resource `tpu`: no agent counts it"
        );
        assert_eq!(explain(&amounts, None, []), "no agent is on the channel");
    }

    #[test]
    fn screening() {
        let attrs = Attrs::new().with("cpus_free", 4i64).with("mem_free", 1000i64).with("zone", "a");
        let req = Requirement::compile("zone == \"a\"").unwrap();
        assert_eq!(screen(&Amounts::new().with("cpus", 4), Some(&req), &attrs), Ok(()));
        assert_eq!(
            screen(&Amounts::new().with("cpus", 5), None, &attrs),
            Err(Miss::Short { resource: "cpus".into(), free: 4 })
        );
        assert_eq!(screen(&Amounts::new().with("gpu", 0), None, &attrs), Err(Miss::Unknown("gpu".into())));
        let req = Requirement::compile("zone == \"b\"").unwrap();
        assert_eq!(screen(&Amounts::new(), Some(&req), &attrs), Err(Miss::Requirement));
    }

    #[test]
    fn fanout_keeps_the_best() {
        let mut c = vec![(0, Some(1.0), 5), (1, Some(3.0), 1), (2, None, 0), (3, Some(3.0), 0)];
        pick(&mut c, 2);
        assert_eq!(c.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 1]);
    }
}
