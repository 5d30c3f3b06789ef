//! Server allocators: the policy that picks servers for a request, separate from every mechanism that carries
//! requests (kecho's OUT-filters, the HTTP front end, the smart client).
//!
//! An [`Allocator`] is a pure state machine: it gets the candidate servers (with their load, where known) and an
//! optional affinity key, and answers with indices into the candidates. Randomised ones are seeded. Static
//! allocators ignore load: [`RoundRobin`], [`WeightedRandom`], [`Schedule`] (a cyclic schedule from a file) and
//! [`HashAffinity`] (rendezvous hashing of a client or session key, so a key sticks to its server while it lives).
//! Dynamic ones read load: [`LeastLoaded`] (the n least loaded) and [`PowerOfTwo`] (the lower of two drawn at
//! random, robust to stale reports).
//!
//! Deployment is the caller's choice: one allocator shared by every dispatcher (centralised, an
//! [`Arc<Mutex<_>>`](std::sync::Mutex)) or one per node (distributed); loads pushed by a
//! [`LoadListener`](crate::load::LoadListener) or pulled by the caller.

use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{LbError, Result};
use crate::load::ServerId;

/// One server an allocator may pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Which server.
    pub server: ServerId,
    /// Its load index, if a valid report is known.
    pub load: Option<f64>,
    /// Its static weight (capacity), for weighted allocators.
    pub weight: f64,
}

impl Candidate {
    /// A candidate with weight 1.
    pub fn new(server: ServerId, load: Option<f64>) -> Self {
        Candidate { server, load, weight: 1.0 }
    }
}

/// Picks servers for requests. Implementations are deterministic given their seed.
pub trait Allocator: Send + std::fmt::Debug + 'static {
    /// Pushes the indices (into `candidates`) of the chosen servers onto `out` (empty on entry). `key` is the
    /// request's affinity key, if any. Picks nothing when there are no candidates.
    fn allocate(&mut self, key: Option<&[u8]>, candidates: &[Candidate], out: &mut Vec<usize>);
}

/// One server after the other.
#[derive(Debug, Default)]
pub struct RoundRobin {
    turn: usize,
}

impl Allocator for RoundRobin {
    fn allocate(&mut self, _key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        if c.is_empty() {
            return;
        }
        out.push(self.turn % c.len());
        self.turn = self.turn.wrapping_add(1);
    }
}

/// One server at random, in proportion to its weight.
#[derive(Debug)]
pub struct WeightedRandom {
    rng: StdRng,
}

impl WeightedRandom {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        WeightedRandom { rng: StdRng::seed_from_u64(seed) }
    }
}

impl Allocator for WeightedRandom {
    fn allocate(&mut self, _key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        if c.is_empty() {
            return;
        }
        let total: f64 = c.iter().map(|x| x.weight.max(0.0)).sum();
        if total <= 0.0 {
            out.push(self.rng.gen_range(0..c.len()));
            return;
        }
        let mut r = self.rng.gen::<f64>() * total;
        for (i, x) in c.iter().enumerate() {
            let w = x.weight.max(0.0);
            if r < w {
                out.push(i);
                return;
            }
            r -= w;
        }
        out.push(c.len() - 1);
    }
}

/// A cyclic schedule of servers, from a file: one server per line (`s3` or `3`), optionally with a repeat count
/// (`s3 x4`); `#` starts a comment. A scheduled server that is not among the candidates is skipped.
#[derive(Debug, Clone)]
pub struct Schedule {
    slots: Vec<ServerId>,
    pos: usize,
}

impl Schedule {
    /// Parses a schedule; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let err = |line: usize, why: String| LbError::Schedule { path: origin.to_owned(), line, why };
        let mut slots = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let name = parts.next().unwrap_or("");
            let id = name
                .strip_prefix('s')
                .unwrap_or(name)
                .parse::<u32>()
                .map_err(|_| err(n + 1, format!("{name:?} is not a server (expected s3 or 3)")))?;
            let times = match parts.next() {
                None => 1,
                Some(t) => match t.strip_prefix('x').and_then(|t| t.parse::<usize>().ok()) {
                    Some(k) if (1..=1_000_000).contains(&k) => k,
                    _ => return Err(err(n + 1, format!("{t:?} is not a repeat count (expected x1 to x1000000)"))),
                },
            };
            if let Some(extra) = parts.next() {
                return Err(err(n + 1, format!("unexpected {extra:?}")));
            }
            slots.extend(std::iter::repeat_n(ServerId(id), times));
        }
        if slots.is_empty() {
            return Err(err(0, "the schedule names no server".into()));
        }
        Ok(Schedule { slots, pos: 0 })
    }

    /// Reads and parses a schedule file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| LbError::ScheduleIo { path: path.display().to_string(), source })?;
        Self::parse(&text, &path.display().to_string())
    }
}

impl Allocator for Schedule {
    fn allocate(&mut self, _key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        for _ in 0..self.slots.len() {
            let want = self.slots[self.pos];
            self.pos = (self.pos + 1) % self.slots.len();
            if let Some(i) = c.iter().position(|x| x.server == want) {
                out.push(i);
                return;
            }
        }
    }
}

/// Maps a client or session key to a server by rendezvous (highest random weight) hashing: a key stays on its
/// server while that server is a candidate, and only the keys of a departed server move. Requests without a key go
/// round robin.
#[derive(Debug, Default)]
pub struct HashAffinity {
    fallback: RoundRobin,
}

impl Allocator for HashAffinity {
    fn allocate(&mut self, key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        let Some(key) = key else { return self.fallback.allocate(None, c, out) };
        let k = fnv(key);
        if let Some((i, _)) = c.iter().enumerate().max_by_key(|(_, x)| mix(k ^ mix(u64::from(x.server.0)))) {
            out.push(i);
        }
    }
}

/// The `n` least-loaded servers (KECho's OUT-filter). Servers without a valid report rank last; ties rotate, so
/// equal servers share the work.
#[derive(Debug)]
pub struct LeastLoaded {
    n: usize,
    turn: usize,
    order: Vec<usize>,
}

impl LeastLoaded {
    /// The `n` least loaded (at least 1).
    pub fn new(n: usize) -> Self {
        LeastLoaded { n: n.max(1), turn: 0, order: Vec::new() }
    }
}

impl Allocator for LeastLoaded {
    fn allocate(&mut self, _key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        let k = c.len();
        if k == 0 {
            return;
        }
        let turn = self.turn;
        self.turn = self.turn.wrapping_add(1);
        let rank = |i: usize| (c[i].load.unwrap_or(f64::INFINITY), (i + k - turn % k) % k);
        self.order.clear();
        self.order.extend(0..k);
        self.order.sort_by(|&a, &b| {
            let (la, ta) = rank(a);
            let (lb, tb) = rank(b);
            la.total_cmp(&lb).then(ta.cmp(&tb))
        });
        out.extend(self.order.iter().take(self.n));
    }
}

/// Power of two choices: draw two distinct servers at random and take the less loaded (unknown load ranks last).
#[derive(Debug)]
pub struct PowerOfTwo {
    rng: StdRng,
}

impl PowerOfTwo {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        PowerOfTwo { rng: StdRng::seed_from_u64(seed) }
    }
    /// The two servers drawn for the next pick and the one chosen, for inspection.
    pub fn draw(&mut self, c: &[Candidate]) -> Option<(usize, usize, usize)> {
        match c.len() {
            0 => None,
            1 => Some((0, 0, 0)),
            k => {
                let a = self.rng.gen_range(0..k);
                let mut b = self.rng.gen_range(0..k - 1);
                if b >= a {
                    b += 1;
                }
                let la = c[a].load.unwrap_or(f64::INFINITY);
                let lb = c[b].load.unwrap_or(f64::INFINITY);
                Some((a, b, if lb < la { b } else { a }))
            }
        }
    }
}

impl Allocator for PowerOfTwo {
    fn allocate(&mut self, _key: Option<&[u8]>, c: &[Candidate], out: &mut Vec<usize>) {
        if let Some((_, _, pick)) = self.draw(c) {
            out.push(pick);
        }
    }
}

/// An allocation policy by name, for command lines: `rr`, `weighted`, `schedule:FILE`, `hash`, `least:N`, `p2c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// [`RoundRobin`].
    RoundRobin,
    /// [`WeightedRandom`].
    Weighted,
    /// [`Schedule`] from this file.
    Schedule(std::path::PathBuf),
    /// [`HashAffinity`].
    Hash,
    /// [`LeastLoaded`] with this n.
    Least(usize),
    /// [`PowerOfTwo`].
    PowerOfTwo,
}

impl FromStr for Policy {
    type Err = LbError;
    fn from_str(spec: &str) -> Result<Self> {
        let err = |why: &str| LbError::Policy { spec: spec.to_owned(), why: why.to_owned() };
        let (name, arg) = match spec.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (spec, None),
        };
        let no_arg = |p: Policy| if arg.is_some() { Err(err("takes no argument")) } else { Ok(p) };
        match name {
            "rr" => no_arg(Policy::RoundRobin),
            "weighted" => no_arg(Policy::Weighted),
            "hash" => no_arg(Policy::Hash),
            "p2c" => no_arg(Policy::PowerOfTwo),
            "least" => match arg.map(str::parse::<usize>) {
                None => Ok(Policy::Least(1)),
                Some(Ok(n)) if n > 0 => Ok(Policy::Least(n)),
                _ => Err(err("N must be a positive integer")),
            },
            "schedule" => match arg {
                Some(path) if !path.is_empty() => Ok(Policy::Schedule(path.into())),
                _ => Err(err("a file name is missing")),
            },
            _ => Err(err("unknown policy")),
        }
    }
}

impl Policy {
    /// Builds the allocator (reads the schedule file, if any).
    pub fn build(&self, seed: u64) -> Result<Box<dyn Allocator>> {
        Ok(match self {
            Policy::RoundRobin => Box::new(RoundRobin::default()),
            Policy::Weighted => Box::new(WeightedRandom::new(seed)),
            Policy::Schedule(p) => Box::new(Schedule::from_file(p)?),
            Policy::Hash => Box::new(HashAffinity::default()),
            Policy::Least(n) => Box::new(LeastLoaded::new(*n)),
            Policy::PowerOfTwo => Box::new(PowerOfTwo::new(seed)),
        })
    }
}

/// FNV-1a, stable across processes (affinity must survive restarts).
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser, so that rendezvous scores are well spread.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
