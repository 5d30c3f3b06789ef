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
use crate::record::Recorded;
use crate::replay::{ReplayClient, ReplayError};

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

    /// Replayed event `seq` of `source` (from a recorder) arrived: `None` if the application has it, else how many
    /// events of the source came between the position and it (0 for a source without a position). With `resume`,
    /// the source's first live event after it then counts what came between as missed.
    pub fn replay(&mut self, source: SourceKey, seq: u64, resume: bool) -> Option<u64> {
        let missed = match self.last.get(&source) {
            Some(&last) if seq <= last => return None,
            Some(&last) => seq - last - 1,
            None => 0,
        };
        self.last.insert(source, seq);
        if resume {
            self.resumed.insert(source, ());
        }
        Some(missed)
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
    /// A replay from a recorder failed.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
}

/// What a catch-up hands over, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum CatchUp {
    /// Events missed before the next one (the recorder does not have them either).
    Missed(u64),
    /// A recorded event.
    Event(Recorded),
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
    /// Where the positions are kept; none for [`DurableSink::in_memory`].
    log: Option<Log>,
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
        Ok(DurableSink { sink, positions: Positions::resumed(last), log: Some(log), pending: None, held: None, dir })
    }

    /// Wraps `sink` with its positions kept in memory only: a replay ([`DurableSink::catch_up`]) is then merged with
    /// the live events without duplicates (a late joiner's `--last N`).
    pub fn in_memory(sink: Sink) -> DurableSink {
        DurableSink { sink, positions: Positions::default(), log: None, pending: None, held: None, dir: PathBuf::new() }
    }

    /// Asks the channel's recorders (through `client`) for the events after this sink's positions and for the
    /// newest `last` events, and returns what to hand over before any live event, in order (each recorded event
    /// once, after what the application has; events missed ahead of them counted). `None` if no recorder appears
    /// within `wait`. The positions of what is returned are written. `resume`: the first live event of each source
    /// replayed counts the events between the replay and it as missed (for a sink that starts; not for one filling a
    /// loss the channel reported, whose count already covers them).
    pub async fn catch_up(
        &mut self,
        client: &mut ReplayClient,
        last: u64,
        wait: std::time::Duration,
        resume: bool,
    ) -> Result<Option<Vec<CatchUp>>, DurableError> {
        let after: Vec<(SourceKey, u64)> = self.positions.all().collect();
        if after.is_empty() && last == 0 {
            return Ok(Some(Vec::new()));
        }
        let Some(got) = client.fetch(after, last, wait).await? else { return Ok(None) };
        let mut out = Vec::new();
        let mut newest: HashMap<SourceKey, u64> = HashMap::new();
        for r in got {
            match self.positions.replay(r.source, r.seq, resume) {
                None => continue,
                Some(0) => {}
                Some(n) => out.push(CatchUp::Missed(n)),
            }
            newest.insert(r.source, r.seq);
            out.push(CatchUp::Event(r));
        }
        if let Some(log) = &mut self.log {
            for (k, s) in newest {
                log.append(&record(k, s))?;
            }
            log.flush()?;
        }
        Ok(Some(out))
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
    /// this sink had a position for is preceded by `Lagged` with the events missed since. A recorder may have those:
    /// a [`DurableSink::catch_up`] right after the report brings them (the event held back behind the report is then
    /// handed over only if the catch-up did not bring it too). That is worth doing after a first catch-up: the
    /// sources may start sending to a new sink only after its first catch-up was answered.
    pub async fn recv(&mut self) -> Result<Event, DurableError> {
        self.commit()?;
        if let Some(ev) = self.held.take() {
            // Unless a catch-up since its report brought it already.
            if self.positions.get(ev.source()).is_none_or(|p| ev.seq() > p) {
                return Ok(self.hand(ev));
            }
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
            if let Some(log) = &mut self.log {
                log.append(&record(k, s))?;
                log.flush()?;
            }
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
    fn a_replay_goes_after_the_position_and_live_events_after_the_replay() {
        let a = SourceKey(1);
        let b = SourceKey(2);
        let mut p = Positions::resumed(HashMap::from([(a, 10)]));
        assert_eq!(p.replay(a, 9, true), None, "the application has it");
        assert_eq!(p.replay(a, 13, true), Some(2), "11 and 12 are not recorded");
        assert_eq!(p.replay(a, 14, true), Some(0));
        assert_eq!(p.replay(b, 5, true), Some(0), "a late joiner's first event");
        // Live events that were buffered meanwhile: the replayed ones are dropped, the gap after them counted.
        assert_eq!(p.admit(a, 14), Admit::Duplicate);
        assert_eq!(p.admit(a, 15), Admit::Deliver { missed: 0 });
        assert_eq!(p.admit(b, 8), Admit::Deliver { missed: 2 });
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
