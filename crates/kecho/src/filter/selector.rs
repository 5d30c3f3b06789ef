//! The built-in OUT-filters ([`Selector`]).

use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{hash_value, mix, EventView, Fnv, OutFilter, SinkView};

/// The built-in OUT-filters. Parse one from a spec with `str::parse`:
///
/// | spec | chooses |
/// |---|---|
/// | `all` | every sink |
/// | `none` | no sink |
/// | `rr` | one sink, in turn |
/// | `random` | one sink at random |
/// | `weighted:ATTR` | one sink at random, weighted by its numeric attribute (missing or negative: 0) |
/// | `hash:ATTR` | one sink by the event attribute's value (rendezvous hashing: a key keeps its sink while it lives) |
/// | `least:ATTR:N` | the N sinks with the lowest attribute ("n least loaded"; sinks without it come last) |
/// | `most:ATTR:N` | the N sinks with the highest attribute |
/// | `p2c:ATTR` | the lower of two sinks picked at random (power of two choices) |
#[derive(Debug)]
pub struct Selector {
    kind: SelectorKind,
    /// Random state (xorshift).
    state: AtomicU64,
    /// Round-robin position.
    turn: AtomicU64,
}

#[derive(Debug, Clone, PartialEq)]
enum SelectorKind {
    All,
    None,
    RoundRobin,
    Random,
    Weighted(String),
    Hash(String),
    Lowest(String, usize),
    Highest(String, usize),
    PowerOfTwo(String),
}

/// A selector spec that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid selector {spec:?}: {why} (expected all, none, rr, random, weighted:ATTR, hash:ATTR, least:ATTR:N, most:ATTR:N or p2c:ATTR)")]
pub struct SelectorError {
    spec: String,
    why: String,
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(spec: &str) -> Result<Self, SelectorError> {
        let err = |why: &str| SelectorError { spec: spec.to_owned(), why: why.to_owned() };
        let parts: Vec<&str> = spec.split(':').collect();
        let attr = |i: usize| -> Result<String, SelectorError> {
            match parts.get(i) {
                Some(a) if !a.is_empty() => Ok((*a).to_owned()),
                _ => Err(err("an attribute name is missing")),
            }
        };
        let n = |i: usize| -> Result<usize, SelectorError> {
            match parts.get(i) {
                None => Ok(1),
                Some(s) => match s.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(err("N must be a positive integer")),
                },
            }
        };
        let (kind, arity) = match parts[0] {
            "all" => (SelectorKind::All, 1),
            "none" => (SelectorKind::None, 1),
            "rr" => (SelectorKind::RoundRobin, 1),
            "random" => (SelectorKind::Random, 1),
            "weighted" => (SelectorKind::Weighted(attr(1)?), 2),
            "hash" => (SelectorKind::Hash(attr(1)?), 2),
            "least" => (SelectorKind::Lowest(attr(1)?, n(2)?), 3),
            "most" => (SelectorKind::Highest(attr(1)?, n(2)?), 3),
            "p2c" => (SelectorKind::PowerOfTwo(attr(1)?), 2),
            _ => return Err(err("unknown selector")),
        };
        if parts.len() > arity {
            return Err(err("too many parts"));
        }
        Ok(Self::of(kind))
    }
}

impl Selector {
    /// Every sink (the default when no OUT-filter is installed).
    pub fn all() -> Self {
        Self::of(SelectorKind::All)
    }
    /// One sink in turn.
    pub fn round_robin() -> Self {
        Self::of(SelectorKind::RoundRobin)
    }
    /// The `n` sinks with the lowest value of `attr`.
    pub fn least(attr: &str, n: usize) -> Self {
        Self::of(SelectorKind::Lowest(attr.to_owned(), n.max(1)))
    }
    /// Power of two choices on `attr`.
    pub fn p2c(attr: &str) -> Self {
        Self::of(SelectorKind::PowerOfTwo(attr.to_owned()))
    }
    /// One sink by rendezvous hashing of the event attribute `attr`.
    pub fn hash(attr: &str) -> Self {
        Self::of(SelectorKind::Hash(attr.to_owned()))
    }

    fn of(kind: SelectorKind) -> Self {
        Selector { kind, state: AtomicU64::new(0x2545_f491_4f6c_dd1d), turn: AtomicU64::new(0) }
    }

    /// A fast pseudo-random number (xorshift on a shared atomic; statistical quality is enough for load spreading).
    fn next_random(&self) -> u64 {
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        x
    }
}

impl OutFilter for Selector {
    fn select(&self, event: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>) {
        let k = sinks.len();
        if k == 0 {
            return;
        }
        let value = |i: usize, attr: &str| sinks.get(i).number(attr);
        // Attribute values looked up once per call (on the stack for up to 16 sinks).
        let mut stack = [0f64; 16];
        let mut heap = Vec::new();
        match &self.kind {
            SelectorKind::All => chosen.extend(0..k),
            SelectorKind::None => {}
            SelectorKind::RoundRobin => {
                let n = self.turn.fetch_add(1, Ordering::Relaxed);
                chosen.push((n % k as u64) as usize);
            }
            SelectorKind::Random => chosen.push((self.next_random() % k as u64) as usize),
            SelectorKind::Weighted(attr) => {
                let w = attr_values(&mut stack, &mut heap, sinks, attr, 0.0);
                let total: f64 = w.iter().map(|v| v.max(0.0)).sum();
                if total <= 0.0 {
                    chosen.push((self.next_random() % k as u64) as usize);
                    return;
                }
                let mut r = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64 * total;
                for (i, w) in w.iter().enumerate() {
                    let w = w.max(0.0);
                    if r < w {
                        chosen.push(i);
                        return;
                    }
                    r -= w;
                }
                chosen.push(k - 1);
            }
            SelectorKind::Hash(attr) => {
                let mut key = Fnv::default();
                match event.attrs.get(attr) {
                    Some(v) => hash_value(v, &mut key),
                    // Events without the key spread evenly.
                    None => self.next_random().hash(&mut key),
                }
                let key = key.finish();
                let best = (0..k).max_by_key(|&i| mix(key ^ sinks.get(i).key())).unwrap_or(0);
                chosen.push(best);
            }
            SelectorKind::Lowest(attr, n) | SelectorKind::Highest(attr, n) => {
                let lowest = matches!(self.kind, SelectorKind::Lowest(..));
                // Sinks without the attribute rank after every sink that has it.
                let ranks = attr_values(&mut stack, &mut heap, sinks, attr, f64::NAN);
                for r in ranks.iter_mut() {
                    *r = if r.is_nan() {
                        f64::INFINITY
                    } else if lowest {
                        *r
                    } else {
                        -*r
                    };
                }
                chosen.extend(0..k);
                if *n < k {
                    chosen.select_nth_unstable_by(*n - 1, |a, b| ranks[*a].total_cmp(&ranks[*b]));
                    chosen.truncate(*n);
                }
            }
            SelectorKind::PowerOfTwo(attr) => {
                if k == 1 {
                    chosen.push(0);
                    return;
                }
                let r = self.next_random();
                let a = (r % k as u64) as usize;
                let mut b = ((r >> 32) % (k as u64 - 1)) as usize;
                if b >= a {
                    b += 1;
                }
                let va = value(a, attr).unwrap_or(f64::INFINITY);
                let vb = value(b, attr).unwrap_or(f64::INFINITY);
                chosen.push(if vb < va { b } else { a });
            }
        }
    }
}

/// Every sink's value of `attr` (`missing` where absent), in `stack` when it fits.
fn attr_values<'s>(
    stack: &'s mut [f64; 16],
    heap: &'s mut Vec<f64>,
    sinks: &SinkView<'_>,
    attr: &str,
    missing: f64,
) -> &'s mut [f64] {
    let k = sinks.len();
    let slot: &mut [f64] = if k <= stack.len() {
        &mut stack[..k]
    } else {
        heap.resize(k, 0.0);
        &mut heap[..]
    };
    for (i, v) in slot.iter_mut().enumerate() {
        *v = sinks.get(i).number(attr).unwrap_or(missing);
    }
    slot
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use kecho_proto::{Attrs, LocalId, NodeId};

    use super::*;
    use crate::filter::SinkEntry;

    fn view(values: &[Option<f64>]) -> Vec<Arc<SinkEntry>> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let mut attrs = Attrs::new();
                if let Some(v) = v {
                    attrs.set("load", *v);
                }
                Arc::new(SinkEntry {
                    node: NodeId(i as u64),
                    id: LocalId(1),
                    local: false,
                    attrs,
                    updated: Instant::now(),
                })
            })
            .collect()
    }

    fn pick(sel: &Selector, entries: &[Arc<SinkEntry>], attrs: &Attrs) -> Vec<usize> {
        let mut chosen = Vec::new();
        let ev = EventView { ty: "t", attrs, payload: b"" };
        sel.select(&ev, &SinkView { entries, now: Instant::now() }, &mut chosen);
        chosen
    }

    #[test]
    fn specs_parse_and_bad_specs_explain() {
        for ok in [
            "all",
            "none",
            "rr",
            "random",
            "weighted:w",
            "hash:session",
            "least:load",
            "least:load:2",
            "most:cpu:3",
            "p2c:load",
        ] {
            assert!(ok.parse::<Selector>().is_ok(), "{ok}");
        }
        for bad in ["", "lest:load", "least", "least:load:0", "least:load:x", "hash:", "rr:x", "p2c:a:b"] {
            let e = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(e.contains("invalid selector"), "{bad}: {e}");
        }
    }

    #[test]
    fn all_none_and_random() {
        let sinks = view(&[None, None, None, None]);
        assert_eq!(pick(&Selector::all(), &sinks, &Attrs::new()), [0, 1, 2, 3]);
        assert!(pick(&"none".parse().unwrap(), &sinks, &Attrs::new()).is_empty());
        let random: Selector = "random".parse().unwrap();
        let mut counts = [0; 4];
        for _ in 0..4000 {
            let p = pick(&random, &sinks, &Attrs::new());
            assert_eq!(p.len(), 1);
            counts[p[0]] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        assert!(pick(&random, &[], &Attrs::new()).is_empty());
    }

    #[test]
    fn round_robin_is_exact() {
        let sinks = view(&[None, None, None]);
        let rr = Selector::round_robin();
        let picks: Vec<usize> = (0..9).flat_map(|_| pick(&rr, &sinks, &Attrs::new())).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn least_and_most_pick_the_extremes_and_missing_values_last() {
        let sinks = view(&[Some(0.9), None, Some(0.1), Some(0.5), Some(0.2)]);
        let mut got = pick(&Selector::least("load", 2), &sinks, &Attrs::new());
        got.sort();
        assert_eq!(got, [2, 4]);
        assert_eq!(pick(&"most:load:1".parse().unwrap(), &sinks, &Attrs::new()), [0]);
        let mut all = pick(&Selector::least("load", 9), &sinks, &Attrs::new());
        all.sort();
        assert_eq!(all, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn p2c_never_picks_the_worst_of_two() {
        let sinks = view(&[Some(3.0), Some(1.0), Some(2.0), Some(0.0)]);
        let sel = Selector::p2c("load");
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[pick(&sel, &sinks, &Attrs::new())[0]] += 1;
        }
        // The highest load can only win against itself, which p2c never draws.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[3] > counts[1] && counts[1] > counts[2], "{counts:?}");
    }

    #[test]
    fn hash_is_sticky_and_spreads() {
        let sinks = view(&[None, None, None, None]);
        let sel = Selector::hash("session");
        let mut used = std::collections::HashSet::new();
        for s in 0..64 {
            let attrs = Attrs::new().with("session", format!("user-{s}"));
            let first = pick(&sel, &sinks, &attrs);
            assert_eq!(pick(&sel, &sinks, &attrs), first);
            used.insert(first[0]);
        }
        assert_eq!(used.len(), 4);
        // Removing one sink moves only the keys that were on it (rendezvous hashing).
        let fewer: Vec<_> = sinks[..3].to_vec();
        for s in 0..64 {
            let attrs = Attrs::new().with("session", format!("user-{s}"));
            let before = pick(&sel, &sinks, &attrs)[0];
            if before < 3 {
                assert_eq!(pick(&sel, &fewer, &attrs)[0], before);
            }
        }
    }

    #[test]
    fn weighted_follows_weights() {
        let sinks = view(&[Some(1.0), Some(0.0), Some(3.0)]);
        let sel: Selector = "weighted:load".parse().unwrap();
        let mut counts = [0; 3];
        for _ in 0..8000 {
            counts[pick(&sel, &sinks, &Attrs::new())[0]] += 1;
        }
        assert_eq!(counts[1], 0);
        let ratio = counts[2] as f64 / counts[0] as f64;
        assert!((2.5..3.5).contains(&ratio), "{counts:?}");
    }
}
