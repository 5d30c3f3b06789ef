//! Durable (named) sinks: a sink that keeps, per source, the sequence number of the last event it handed to the
//! application, on disk, so that after its process is killed and restarted it delivers nothing twice and reports
//! what it missed in between as missed (`RecvError::Lagged`).
//!
//! [`Positions`] decides (pure); [`DurableSink`] wraps a [`kecho::Sink`] and keeps the positions in a [`Log`] of
//! 16-byte records (source key, seq), compacted to one record per source each time it is opened.
//!
//! Delivery is at least once at the instant of a kill: an event's position is written when the application asks for
//! the next event (or calls [`DurableSink::commit`]), so the event it was handling when killed comes again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kecho::{Event, RecvError, Sink, SourceKey};

use crate::log::{Log, LogError, LogOptions};

/// What to do with an arriving event.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Hand it over; `missed` events of its source were missed since the position kept from the last run.
    Deliver {
        /// Events between the kept position and this one.
        missed: u64,
    },
    /// It was handed over before (in this run or an earlier one): drop it.
    Duplicate,
}

/// Per-source positions: the sequence number of the last event handed to the application.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Positions {
    last: HashMap<SourceKey, u64>,
    /// Sources whose position came from an earlier run and that sent nothing in this one yet.
    resumed: HashMap<SourceKey, ()>,
}

impl Positions {
    /// Positions kept from an earlier run.
    pub fn resumed(last: HashMap<SourceKey, u64>) -> Positions {
        let resumed = last.keys().map(|k| (*k, ())).collect();
        Positions { last, resumed }
    }

    /// Event `seq` of `source` arrived.
    ///
    /// The first event of a source this sink had a position for counts as missed every event in between. (A source
    /// whose OUT-filter or content filters sent some of those elsewhere is over-counted: the sink cannot tell.)
    pub fn admit(&mut self, source: SourceKey, seq: u64) -> Admit {
        match self.last.get(&source) {
            Some(&last) if seq <= last => Admit::Duplicate,
            Some(&last) => {
                let missed = if self.resumed.remove(&source).is_some() { seq - last - 1 } else { 0 };
                Admit::Deliver { missed }
            }
            None => Admit::Deliver { missed: 0 },
        }
    }

    /// The application has event `seq` of `source`.
    pub fn handed(&mut self, source: SourceKey, seq: u64) {
        let e = self.last.entry(source).or_default();
        *e = (*e).max(seq);
    }

    /// The position of `source`, if any.
    pub fn get(&self, source: SourceKey) -> Option<u64> {
        self.last.get(&source).copied()
    }

    /// Every position.
    pub fn all(&self) -> impl Iterator<Item = (SourceKey, u64)> + '_ {
        self.last.iter().map(|(k, v)| (*k, *v))
    }
}

/// Errors of durable sinks.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DurableError {
    /// A name that is not 1 to 64 of `A-Z a-z 0-9 . _ -` (it names a directory).
    #[error("durable sink name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)")]
    BadName(String),
    /// The positions' log failed.
    #[error("durable sink positions: {0}")]
    Log(#[from] LogError),
    /// A record of the positions' log is not 16 bytes.
    #[error("durable sink positions: record {0} is not a position")]
    BadRecord(u64),
    /// The sink itself.
    #[error(transparent)]
    Recv(#[from] RecvError),
}

fn check_name(name: &str) -> Result<(), DurableError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(DurableError::BadName(name.to_owned()))
    }
}

/// A sink that resumes where it left off across restarts of its process (see the module's documentation).
#[derive(Debug)]
pub struct DurableSink {
    sink: Sink,
    positions: Positions,
    log: Log,
    /// Handed over and not yet written.
    pending: Option<(SourceKey, u64)>,
    /// An event held back behind its missed-count report.
    held: Option<Event>,
    dir: PathBuf,
}

impl DurableSink {
    /// Wraps `sink` as durable sink `name`, its positions in `state_dir/NAME`.
    pub fn open(sink: Sink, state_dir: &Path, name: &str) -> Result<DurableSink, DurableError> {
        check_name(name)?;
        let dir = state_dir.join(name);
        let (log, last) = load(&dir)?;
        Ok(DurableSink { sink, positions: Positions::resumed(last), log, pending: None, held: None, dir })
    }

    /// The directory holding the positions.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The positions (those handed over, including one not yet written).
    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// The next event, or what was missed: events handed over before are dropped, and the first event of a source
    /// this sink had a position for is preceded by `Lagged` with the events missed since.
    pub async fn recv(&mut self) -> Result<Event, DurableError> {
        self.commit()?;
        if let Some(ev) = self.held.take() {
            return Ok(self.hand(ev));
        }
        loop {
            let ev = self.sink.recv().await?;
            match self.positions.admit(ev.source(), ev.seq()) {
                Admit::Duplicate => continue,
                Admit::Deliver { missed: 0 } => return Ok(self.hand(ev)),
                Admit::Deliver { missed } => {
                    self.held = Some(ev);
                    return Err(RecvError::Lagged(missed).into());
                }
            }
        }
    }

    fn hand(&mut self, ev: Event) -> Event {
        self.positions.handed(ev.source(), ev.seq());
        self.pending = Some((ev.source(), ev.seq()));
        ev
    }

    /// Writes the position of the last event handed over (it then survives the process being killed).
    pub fn commit(&mut self) -> Result<(), DurableError> {
        if let Some((k, s)) = self.pending.take() {
            self.log.append(&record(k, s))?;
            self.log.flush()?;
        }
        Ok(())
    }

    /// Events waiting in the sink.
    pub fn is_empty(&self) -> bool {
        self.held.is_none() && self.sink.is_empty()
    }

    /// The wrapped sink.
    pub fn sink(&self) -> &Sink {
        &self.sink
    }
}

/// Reads the positions kept in `dir` and compacts them: one record per source in a fresh segment, on disk before the
/// old segments go.
fn load(dir: &Path) -> Result<(Log, HashMap<SourceKey, u64>), DurableError> {
    let mut log = Log::open(dir, LogOptions::default())?;
    let mut last = HashMap::new();
    for (i, rec) in log.read_from(0)? {
        let (k, s) = rec.split_at_checked(8).ok_or(DurableError::BadRecord(i))?;
        let k = u64::from_le_bytes(k.try_into().map_err(|_| DurableError::BadRecord(i))?);
        let s = u64::from_le_bytes(s.try_into().map_err(|_| DurableError::BadRecord(i))?);
        let e = last.entry(SourceKey(k)).or_insert(0);
        *e = (*e).max(s);
    }
    log.roll()?;
    for (k, s) in &last {
        log.append(&record(*k, *s))?;
    }
    log.sync()?;
    log.drop_all_but_newest()?;
    Ok((log, last))
}

fn record(k: SourceKey, seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&k.0.to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_position_drops_duplicates_and_counts_the_gap_once() {
        let a = SourceKey(1);
        let b = SourceKey(2);
        let mut p = Positions::resumed(HashMap::from([(a, 10)]));
        assert_eq!(p.admit(a, 9), Admit::Duplicate);
        assert_eq!(p.admit(a, 10), Admit::Duplicate);
        assert_eq!(p.admit(a, 14), Admit::Deliver { missed: 3 });
        p.handed(a, 14);
        // Later jumps are this run's (filters, or gaps the channel reports itself).
        assert_eq!(p.admit(a, 20), Admit::Deliver { missed: 0 });
        assert_eq!(p.admit(b, 5), Admit::Deliver { missed: 0 }, "a source never seen");
        let mut p = Positions::resumed(HashMap::from([(a, 10)]));
        assert_eq!(p.admit(a, 11), Admit::Deliver { missed: 0 }, "right where it left off");
    }

    #[test]
    fn positions_survive_reopening_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, last) = load(dir.path()).unwrap();
        assert!(last.is_empty());
        for seq in 1..=5 {
            log.append(&record(SourceKey(1), seq)).unwrap();
        }
        log.append(&record(SourceKey(2), 9)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (mut log, last) = load(dir.path()).unwrap();
        assert_eq!(last, HashMap::from([(SourceKey(1), 5), (SourceKey(2), 9)]));
        assert_eq!(log.read_from(0).unwrap().len(), 2, "compacted");
        log.append(&record(SourceKey(1), 6)).unwrap();
        log.flush().unwrap();
        drop(log);
        let (_, last) = load(dir.path()).unwrap();
        assert_eq!(last[&SourceKey(1)], 6);
        // A record that is not a position is refused with its index.
        let (mut log, _) = load(dir.path()).unwrap();
        log.append(b"short").unwrap();
        log.flush().unwrap();
        drop(log);
        assert!(matches!(load(dir.path()), Err(DurableError::BadRecord(_))));
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["orders", "a.b-c_9"] {
            assert!(check_name(good).is_ok());
        }
    }
}
