//! Amounts of counted resources, identities of agents, holders, requests and reservations.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::error::ParseError;

/// The counted resource of processor cores.
pub const CPUS: &str = "cpus";
/// The counted resource of memory, in bytes.
pub const MEM: &str = "mem";
/// The counted resource of GPUs.
pub const GPU: &str = "gpu";

/// Amounts of counted resources by name (`cpus`, `mem` in bytes, `gpu`, or any name an agent counts). A name maps to
/// at most one amount; zero amounts are kept (a request for `gpu=0` still needs an agent that counts GPUs).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Amounts(BTreeMap<String, u64>);

impl Amounts {
    /// No resources.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds (replaces) one amount.
    pub fn with(mut self, name: impl Into<String>, amount: u64) -> Self {
        self.0.insert(name.into(), amount);
        self
    }
    /// Sets one amount.
    pub fn set(&mut self, name: impl Into<String>, amount: u64) {
        self.0.insert(name.into(), amount);
    }
    /// The amount of `name`, if named.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }
    /// The amount of `name`, 0 if not named.
    pub fn amount(&self, name: &str) -> u64 {
        self.get(name).unwrap_or(0)
    }
    /// Names and amounts in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
    /// True if nothing is named.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Adds `other` to these amounts, name by name (saturating).
    pub fn add(&mut self, other: &Amounts) {
        for (k, v) in other.iter() {
            let e = self.0.entry(k.to_owned()).or_insert(0);
            *e = e.saturating_add(v);
        }
    }
    /// Subtracts `other` from these amounts, name by name (saturating at 0).
    pub fn sub(&mut self, other: &Amounts) {
        for (k, v) in other.iter() {
            if let Some(e) = self.0.get_mut(k) {
                *e = e.saturating_sub(v);
            }
        }
    }
}

impl fmt::Display for Amounts {
    /// `cpus=2,mem=1000000000`: the wire form, which `FromStr` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

impl FromStr for Amounts {
    type Err = ParseError;
    /// `name=amount[,name=amount]...`; amounts are integers, optionally with a decimal size suffix (`k`, `M`, `G`,
    /// `T`) or a binary one (`Ki`, `Mi`, `Gi`, `Ti`). The empty string is no resources.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut out = Amounts::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| ParseError::new(format!("`{part}` is not NAME=AMOUNT")))?;
            let k = k.trim();
            check_resource_name(k)?;
            if out.0.contains_key(k) {
                return Err(ParseError::new(format!("resource `{k}` is named twice")));
            }
            out.0.insert(k.to_owned(), parse_size(v.trim())?);
        }
        Ok(out)
    }
}

/// A resource name is what an agent's attribute names are built from (`NAME`, `NAME_free`, `NAME_reserved`), so it
/// must be a CEL identifier: a letter or `_`, then letters, digits or `_`.
pub fn check_resource_name(name: &str) -> Result<(), ParseError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok && name.len() <= 64 {
        Ok(())
    } else {
        Err(ParseError::new(format!(
            "resource name `{name}` must be a letter or `_` followed by letters, digits or `_` (at most 64)"
        )))
    }
}

/// Reads `1500`, `2G` (10^9), `2Gi` (2^30), `512M`, `1.5G`.
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let mult: u64 = match suffix.trim() {
        "" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => {
            return Err(ParseError::new(format!(
                "`{other}` in `{s}` is not a size suffix (k, M, G, T, Ki, Mi, Gi, Ti)"
            )))
        }
    };
    if num.is_empty() {
        return Err(ParseError::new(format!("`{s}` is not an amount")));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| ParseError::new(format!("`{s}` is too large")));
    }
    let f: f64 = num.parse().map_err(|_| ParseError::new(format!("`{s}` is not an amount")))?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) || v.fract() != 0.0 {
        return Err(ParseError::new(format!("`{s}` is not a whole amount")));
    }
    Ok(v as u64)
}

/// An amount for people: memory in decimal units (`6.1 GB`), everything else as a number.
pub fn human(resource: &str, amount: u64) -> String {
    if resource == MEM || resource.ends_with("_bytes") {
        let units = [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")];
        for (size, unit) in units {
            if amount as f64 >= size {
                let v = amount as f64 / size;
                return if v >= 100.0 { format!("{v:.0} {unit}") } else { format!("{:.1} {unit}", v) };
            }
        }
        format!("{amount} B")
    } else {
        amount.to_string()
    }
}

/// One reservation at one agent: the agent's name, its incarnation (a random number drawn when the agent starts, so
/// that an id never names a reservation of an earlier run) and a number the agent counts up. Written
/// `NAME:EPOCH:N` (epoch in hex); the id is what `kecho release` takes, and it is the capability to release.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId {
    /// The agent's name.
    pub agent: String,
    /// The agent's incarnation.
    pub epoch: u64,
    /// The agent's counter.
    pub n: u64,
}

impl fmt::Display for ReservationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:x}:{}", self.agent, self.epoch, self.n)
    }
}

impl FromStr for ReservationId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError::new(format!("`{s}` is not a reservation id (AGENT:EPOCH:N)"));
        let mut it = s.rsplitn(3, ':');
        let n = it.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        let epoch = u64::from_str_radix(it.next().ok_or_else(bad)?, 16).map_err(|_| bad())?;
        let agent = it.next().filter(|a| !a.is_empty()).ok_or_else(bad)?.to_owned();
        Ok(ReservationId { agent, epoch, n })
    }
}

/// Who holds reservations: one requester (one per process, normally), named by a random id drawn at its start.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HolderId(pub String);

impl HolderId {
    /// A fresh random id.
    pub fn random() -> Self {
        HolderId(format!("h{:016x}", rand::random::<u64>()))
    }
}

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_round_trip_and_sizes() {
        let a: Amounts = "cpus=2, mem=1.5G,gpu=1,scratch=2Gi".parse().unwrap();
        assert_eq!(a.get("mem"), Some(1_500_000_000));
        assert_eq!(a.get("scratch"), Some(2 << 30));
        assert_eq!(a.to_string().parse::<Amounts>().unwrap(), a);
        assert!("cpus".parse::<Amounts>().is_err());
        assert!("cpus=2,cpus=3".parse::<Amounts>().is_err());
        assert!("9cpu=1".parse::<Amounts>().is_err());
        assert!("mem=1.25".parse::<Amounts>().is_err());
        assert!("mem=3X".parse::<Amounts>().is_err());
        assert_eq!("".parse::<Amounts>().unwrap(), Amounts::new());
    }

    #[test]
    fn ids_round_trip() {
        let id = ReservationId { agent: "a:b".into(), epoch: 0xdead, n: 7 };
        assert_eq!(id.to_string(), "a:b:dead:7");
        assert_eq!(id.to_string().parse::<ReservationId>().unwrap(), id);
        assert!("x:1".parse::<ReservationId>().is_err());
        assert!(":1:2".parse::<ReservationId>().is_err());
    }

    #[test]
    fn human_amounts() {
        assert_eq!(human("mem", 6_100_000_000), "6.1 GB");
        assert_eq!(human("mem", 512), "512 B");
        assert_eq!(human("cpus", 4), "4");
    }
}
