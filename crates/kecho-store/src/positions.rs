//! Durable (named) sinks: a sink that keeps, per source, the sequence number of the last event it handed to the
//! application, on disk, so that after its process is killed and restarted it delivers nothing twice and reports
//! what it missed in between as missed (`RecvError::Lagged`).
//!
//! [`Positions`] decides (pure); [`DurableSink`] wraps a [`kecho::Sink`] and keeps the positions in a [`Log`] of
//! 16-byte records (source key, seq), compacted to one record per source each time it is opened.
//!
//! It also keeps its starting points: per recorder ([`RecorderId`]), the index in that recorder's log from which
//! it has every event of the sources it has no position for, as 24-byte records ([`MARK_TAG`], recorder id, index).
//! A catch-up asks the recorder for its known sources after their positions and for every other source's events
//! recorded from that index on, so that a source that began while the sink was away is replayed too; the answer
//! moves the starting point to the recorder's next index. State written before starting points existed (only
//! 16-byte records) opens as it is: the sink has no starting point until its first answer, and says so.
//!
//! Replays are filtered as live events are, by the wrapped sink's own type and content filters: a request carries
//! them and the recorder applies them ([`crate::replay::Filters`]); the sink checks each event again
//! ([`kecho::Sink::accepts`]), for a recorder that predates this and sends everything. A replayed event they reject
//! counts as had (its position moves, it is not missed). A
//! sink with a starting point holds back a live event that comes past events of its source it may have missed (a
//! position's gap after a restart, or a new source's first event past its first: the source began as the sink joined)
//! and [`DurableSink::fill`] gets them from a recorder or says them missed.
//!
//! Delivery is at least once at the instant of a kill: an event's position is written when the application asks for
//! the next event (or calls [`DurableSink::commit`]), so the event it was handling when killed comes again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kecho::{Event, RecvError, Sink, SourceFate, SourceKey};

use crate::log::{Log, LogError, LogOptions};
use crate::record::Recorded;
use crate::replay::{Ask, Filters, RecorderId, ReplayClient, ReplayError};

/// The first 8 bytes of a starting point's record (a position's record is 16 bytes, a starting point's 24).
pub const MARK_TAG: [u8; 8] = *b"kechoSP\0";

/// The sequence number a position record holds for a source that ended or went away while the sink was away and was
/// accounted for ([`DurableSink::recv`]): the next opening forgets the source.
const GONE: u64 = u64::MAX;

/// How often a resumed durable sink asks what became of the sources it heard nothing of since it started.
const FATE_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

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
    /// whose OUT-filter or the sink's filters kept some of those from it is over-counted: the sink cannot tell. A sink
    /// with a recorder asks it instead: [`Positions::gap`], [`DurableSink::fill`].)
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

    /// Event `seq` of `source` came live, and events before it may have been missed: those after a position kept from
    /// the last run (its first event in this run), or, for a source it has no position for, those before its first
    /// event here (they may have been sent after the sink's starting point while the source did not yet send to it).
    /// `None` if it follows on (or is the source's first event).
    pub fn gap(&self, source: SourceKey, seq: u64) -> Option<Gap> {
        match self.last.get(&source) {
            Some(&last) if self.resumed.contains_key(&source) && seq > last + 1 => {
                Some(Gap { source, from: last + 1, to: seq - 1, new: false })
            }
            Some(_) => None,
            None if seq > 1 => Some(Gap { source, from: 1, to: seq - 1, new: true }),
            None => None,
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

    /// The sources whose position came from an earlier run and that sent nothing in this one yet.
    pub fn resumed_sources(&self) -> Vec<SourceKey> {
        self.resumed.keys().copied().collect()
    }

    /// Source `source` is accounted for otherwise (it ended or went away): its next event, should one come, counts
    /// no gap.
    pub fn settle(&mut self, source: SourceKey) {
        self.resumed.remove(&source);
    }
}

/// Events of one source before its first live event in this run that a durable sink may have missed
/// ([`Positions::gap`], [`DurableError::Behind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gap {
    /// The source.
    pub source: SourceKey,
    /// Its first sequence number not accounted for.
    pub from: u64,
    /// Its last (the one before the live event held back).
    pub to: u64,
    /// A source the sink had no position for: events of it recorded before the sink's starting point are not its.
    pub new: bool,
}

impl Gap {
    /// The last sequence number of the gap accounted for after an answer, given the source's position (events up to
    /// it were handed over, rejected by the sink's filters, or counted missed) and, for a source the sink had no
    /// position for, the last sequence number the recorder has recorded of it (`recorded`): what it recorded and did
    /// not replay since the starting point was recorded before it, so not the sink's. The gap is filled once this
    /// reaches [`Gap::to`].
    pub fn covered(&self, position: Option<u64>, recorded: Option<u64>) -> u64 {
        let mut c = position.unwrap_or(0).max(self.from - 1);
        if self.new {
            c = c.max(recorded.unwrap_or(0));
        }
        c.min(self.to)
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
    /// A record of the positions' log is neither a position (16 bytes) nor a starting point (24 bytes, tagged).
    #[error("durable sink positions: record {0} is not a position")]
    BadRecord(u64),
    /// The sink itself.
    #[error(transparent)]
    Recv(#[from] RecvError),
    /// A replay from a recorder failed.
    #[error("replay: {0}")]
    Replay(#[from] ReplayError),
    /// Not a failure: a live event came past events of its source that this sink (which has a starting point at a
    /// recorder) may have missed. It is held back: call [`DurableSink::fill`], which gets them from a recorder or
    /// says they are missed, and then `recv` again, which hands it over. (Calling `recv` without filling hands it
    /// over as a sink without a recorder would: a position's gap reported as `Lagged`, a new source's not at all.)
    #[error("events of source {} before {} may be missed: fill the gap from a recorder", .0.source, .0.to + 1)]
    Behind(Gap),
}

/// What a catch-up hands over, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum CatchUp {
    /// Events missed before the next one (the recorder does not have them either).
    Missed(u64),
    /// A recorded event.
    Event(Recorded),
    /// The answer cannot say whether sources this sink never heard of sent events it missed.
    Unknown(Unknown),
}

/// Why a catch-up cannot account for sources the sink never heard of (each is said, never passed over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// The sink had no starting point at the recorder that answered (its state predates starting points, it began
    /// with no recorder on the channel, or its starting point is at another recorder, not present): events of sources
    /// it never heard of, recorded before this answer, are neither replayed nor counted. From now on it has one.
    NoStart {
        /// The recorder that answered.
        recorder: RecorderId,
        /// The recorders the sink has a starting point at.
        others: Vec<RecorderId>,
    },
    /// The recorder no longer holds the oldest `records` events recorded from the sink's starting point on (deleted
    /// beyond its size bound): those of sources the sink never heard of are missed, how many is not known.
    Deleted {
        /// The recorder that answered.
        recorder: RecorderId,
        /// Records gone between the starting point and the oldest kept.
        records: u64,
    },
    /// A version 1 recorder answered: it knows no starting points.
    OldRecorder,
    /// The first event of `source` this sink received came after `events` of its events that it did not receive, and
    /// whether they were sent after the sink's starting point (its to have) cannot be known: no recorder answered, or
    /// the one that did cannot say what it recorded of the source (it predates the question).
    Began {
        /// The source.
        source: SourceKey,
        /// How many of its events may be missed.
        events: u64,
    },
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
    /// An event held back behind its missed-count report, or behind `gap`.
    held: Option<Event>,
    /// The events the held event came past ([`DurableError::Behind`]), until [`DurableSink::fill`].
    gap: Option<Gap>,
    dir: PathBuf,
    /// Per recorder, the index of its log from which this sink has every event of a source it has no position for.
    marks: HashMap<RecorderId, u64>,
    /// Its state was created by this opening (it never ran before).
    new: bool,
    /// A source's end reported (as `Lagged`) and not yet applied to its position: (source, its last event).
    ended: Option<(SourceKey, u64)>,
    /// When the sources it heard nothing of were last looked up ([`kecho::Sink::source_fate`]).
    fates_at: Option<std::time::Instant>,
}

impl DurableSink {
    /// Wraps `sink` as durable sink `name`, its positions in `state_dir/NAME`.
    pub fn open(sink: Sink, state_dir: &Path, name: &str) -> Result<DurableSink, DurableError> {
        check_name(name)?;
        let dir = state_dir.join(name);
        let State { log, last, marks, new } = load(&dir)?;
        Ok(DurableSink {
            sink,
            positions: Positions::resumed(last),
            log: Some(log),
            pending: None,
            held: None,
            gap: None,
            dir,
            marks,
            new,
            ended: None,
            fates_at: None,
        })
    }

    /// Wraps `sink` with its positions kept in memory only: a replay ([`DurableSink::catch_up`]) is then merged with
    /// the live events without duplicates (a late joiner's `--last N`).
    pub fn in_memory(sink: Sink) -> DurableSink {
        DurableSink {
            sink,
            positions: Positions::default(),
            log: None,
            pending: None,
            held: None,
            gap: None,
            dir: PathBuf::new(),
            marks: HashMap::new(),
            new: true,
            ended: None,
            fates_at: None,
        }
    }

    /// Asks a recorder of the channel (through `client`) for the events after this sink's positions, for every other
    /// source's events recorded since its starting point at that recorder, and for the newest `last` events, and
    /// returns what to hand over before any live event, in order (each recorded event once, after what the
    /// application has; events missed ahead of them counted; what cannot be accounted for said as
    /// [`CatchUp::Unknown`]). `None` if no recorder appears within `wait` (a recorder it has a starting point at is
    /// waited for that long; another one present is asked then). The positions of what is returned are written, and
    /// the starting point at the recorder moves to the recorder's next index. `resume`: the first live event of each
    /// source replayed counts the events between the replay and it as missed (for a sink that starts; not for one
    /// filling a loss the channel reported, whose count already covers them).
    ///
    /// A durable sink always asks (a new one to learn its starting point); one kept in memory only if it has
    /// positions, a starting point or `last` to ask for.
    ///
    /// Replayed events are filtered as live ones are: those this sink's type and content filters reject are not sent
    /// by a recorder that applies them, nor handed over ([`kecho::Sink::accepts`]), but count as had (they move the
    /// position, and are not missed); `last` counts the newest that the filters accept (of a recorder that predates
    /// filtered requests: those the filters accept of the newest `last`).
    pub async fn catch_up(
        &mut self,
        client: &mut ReplayClient,
        last: u64,
        wait: std::time::Duration,
        resume: bool,
    ) -> Result<Option<Vec<CatchUp>>, DurableError> {
        Ok(self.ask(client, last, wait, resume, None).await?.map(|(items, _)| items))
    }

    /// [`DurableSink::catch_up`], asking the recorder also for the last sequence number it recorded of `probe`.
    /// Returns the items and what the answer says of `probe`: whether the sink's starting point was asked of the
    /// recorder that answered, and the last sequence number it recorded of the source (`None` if it recorded none;
    /// the outer `None` if it does not say).
    async fn ask(
        &mut self,
        client: &mut ReplayClient,
        last: u64,
        wait: std::time::Duration,
        resume: bool,
        probe: Option<SourceKey>,
    ) -> Result<Option<(Vec<CatchUp>, Probed)>, DurableError> {
        let ask = Ask {
            after: self.positions.all().collect(),
            last,
            since: self.marks.clone(),
            newest: probe.into_iter().collect(),
            filters: Filters::of(&self.sink),
        };
        if self.log.is_none() && ask.after.is_empty() && last == 0 && ask.since.is_empty() {
            return Ok(Some((Vec::new(), Probed::default())));
        }
        let Some(answer) = client.fetch(&ask, wait).await? else { return Ok(None) };
        let probed = Probed {
            since: answer.since.is_some(),
            recorded: probe.and_then(|k| answer.newest.as_ref().map(|n| n.get(&k).copied())),
        };
        let mut out = Vec::new();
        match answer.recorder {
            None if self.log.is_some() => out.push(CatchUp::Unknown(Unknown::OldRecorder)),
            None => {}
            Some(recorder) => match (answer.since, answer.first) {
                (None, _) if !self.new => out.push(CatchUp::Unknown(Unknown::NoStart {
                    recorder,
                    others: {
                        let mut o: Vec<RecorderId> = self.marks.keys().copied().collect();
                        o.sort();
                        o
                    },
                })),
                (Some(since), Some(first)) if first > since => {
                    out.push(CatchUp::Unknown(Unknown::Deleted { recorder, records: first - since }))
                }
                _ => {}
            },
        }
        let mut newest: HashMap<SourceKey, u64> = HashMap::new();
        let filtered = answer.filtered;
        let mut missed = answer.missed.into_iter();
        for r in answer.events {
            // A filtered answer says what the recorder lacks before each event (the events between that its filters
            // rejected are had); an unfiltered one holds every event, and the gaps are what it lacks.
            let lacking = missed.next();
            match self.positions.replay(r.source, r.seq, resume) {
                None => continue,
                Some(n) => match if filtered { lacking.unwrap_or(0) } else { n } {
                    0 => {}
                    n => out.push(CatchUp::Missed(n)),
                },
            }
            newest.insert(r.source, r.seq);
            // Filtered as a live event is: one the sink would not have received is had, not missed. (A recorder
            // that applied the filters sent only events they accept: this is the check of one that did not.)
            if self.sink.accepts(&r.ty, &r.attrs) {
                out.push(CatchUp::Event(r));
            }
        }
        for (k, seq, lacking) in answer.passed {
            // The source's last events in the answer, rejected by the filters at the recorder: had, not missed.
            if self.positions.replay(k, seq, resume).is_some() {
                if lacking > 0 {
                    out.push(CatchUp::Missed(lacking));
                }
                newest.insert(k, seq);
            }
        }
        let mark = answer.recorder.zip(answer.next);
        if let Some((r, next)) = mark {
            self.marks.insert(r, next);
        }
        self.new = false;
        if let Some(log) = &mut self.log {
            for (k, s) in newest {
                log.append(&record(k, s))?;
            }
            if let Some((r, next)) = mark {
                log.append(&mark_record(r, next))?;
            }
            log.flush()?;
        }
        Ok(Some((out, probed)))
    }

    /// Fills the gap a [`DurableError::Behind`] reported: asks a recorder (through `client`) for what follows the
    /// sink's positions and what was recorded since its starting point, as [`DurableSink::catch_up`] does, and for
    /// what it recorded of the gap's source, up to `tries` times `pause` apart (the recorder receives the events as
    /// the sink does and may not have recorded the newest yet), until the gap is accounted for. Returns what to hand
    /// over before the held event, in order: the replayed events (filtered as live ones), and what could not be had
    /// as [`CatchUp::Missed`] (or [`Unknown::Began`] where it cannot be known whether it was the sink's). Events of a
    /// new source recorded before the sink's starting point are not the sink's: neither replayed nor counted.
    pub async fn fill(
        &mut self,
        client: &mut ReplayClient,
        tries: u32,
        pause: std::time::Duration,
    ) -> Result<Vec<CatchUp>, DurableError> {
        let mut out = Vec::new();
        let Some(gap) = self.gap else { return Ok(out) };
        // Whether what is not had can be said missed: a new source's earlier events only if a recorder says how far
        // it recorded the source (else they may have been before the starting point).
        let (mut covered, mut knowable) = (gap.from - 1, !gap.new);
        for i in 0..tries.max(1) {
            if i > 0 {
                tokio::time::sleep(pause).await;
            }
            let Some((items, probed)) = self.ask(client, 0, std::time::Duration::ZERO, false, Some(gap.source)).await?
            else {
                break;
            };
            // A source it had no position for, asked of a recorder it has no starting point at (or of version 1):
            // the answer said what cannot be known (`Unknown::NoStart` or `OldRecorder`).
            let said = gap.new && !probed.since;
            out.extend(items);
            knowable = !gap.new || probed.recorded.is_some();
            covered = gap.covered(self.positions.get(gap.source), probed.recorded.flatten());
            if said || covered >= gap.to {
                covered = gap.to;
                break;
            }
        }
        if covered < gap.to {
            let events = gap.to - covered;
            out.push(if knowable {
                CatchUp::Missed(events)
            } else {
                CatchUp::Unknown(Unknown::Began { source: gap.source, events })
            });
        }
        // Accounted for: the held event follows on.
        self.positions.handed(gap.source, gap.to);
        self.gap = None;
        Ok(out)
    }

    /// Gives a sink that never ran (its state created by this opening, no recorder answered yet) its first starting
    /// point: `start`, a recorder's next index (`Answer::next`) fetched **before its sink joined the channel** (a
    /// request asking for nothing, [`crate::replay::Ask::default`]). Its first catch-up then replays every event
    /// recorded since, filtered, so that a source that begins as the sink joins, and whose first events reach the
    /// recorder before its node sees the sink, loses none of them. (A starting point taken by the first catch-up
    /// itself comes after the sink joined: events a source sent before it saw the sink and that were recorded before
    /// that answer would not be the sink's.) Returns whether it took it; a sink that ran before keeps its own.
    pub fn start_at(&mut self, start: (RecorderId, u64)) -> Result<bool, DurableError> {
        if !self.new || !self.marks.is_empty() {
            return Ok(false);
        }
        let (r, next) = start;
        self.marks.insert(r, next);
        if let Some(log) = &mut self.log {
            log.append(&mark_record(r, next))?;
            log.flush()?;
        }
        Ok(true)
    }

    /// Its starting points: per recorder, the index from which it has every event of a source it has no position
    /// for.
    pub fn starting_points(&self) -> &HashMap<RecorderId, u64> {
        &self.marks
    }

    /// Whether its state was created by this opening and no recorder has answered it yet.
    pub fn is_new(&self) -> bool {
        self.new
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
    ///
    /// A sink with a starting point at a recorder does not count such a gap itself: it holds the event back and
    /// returns [`DurableError::Behind`] (also for the first event of a source it has no position for that is not the
    /// source's first: the events before it may have been sent after its starting point, while the source did not
    /// yet send to it), and [`DurableSink::fill`] gets the events from a recorder, filtered as live ones, or says
    /// what is missed.
    pub async fn recv(&mut self) -> Result<Event, DurableError> {
        self.commit()?;
        if let Some((source, last)) = self.ended.take() {
            // Reported; what a catch-up since brought is the application's. Nothing more comes of the source.
            self.positions.handed(source, last);
            self.write(source, GONE)?;
        }
        loop {
            let ev = match self.held.take() {
                // Unless a catch-up since its report brought it already (then a duplicate, below). A gap not filled
                // is counted as without a recorder.
                Some(ev) => {
                    self.gap = None;
                    ev
                }
                None => {
                    let ev = self.live().await?;
                    if self.log.is_some() && !self.marks.is_empty() {
                        if let Some(gap) = self.positions.gap(ev.source(), ev.seq()) {
                            self.held = Some(ev);
                            self.gap = Some(gap);
                            return Err(DurableError::Behind(gap));
                        }
                    }
                    ev
                }
            };
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

    /// The next live event, or what became of a source it had a position for and heard nothing of since it
    /// started: its process was killed and started again as a new node, which no source knew, so a source that
    /// ended, or went away, meanwhile would otherwise leave it waiting unaware. Such a source is looked up every
    /// [`FATE_EVERY`] ([`kecho::Sink::source_fate`]): one that ended after events past the position is reported as
    /// `Lagged` with their number (a recorder may still have them: the position moves to the source's last event
    /// at the next `recv`); one gone without an end this node heard, as `SourceLost`. Either is written down as
    /// accounted for (the next opening forgets the source), so that no later run reports it again.
    async fn live(&mut self) -> Result<Event, DurableError> {
        loop {
            if self.log.is_none() || self.positions.resumed.is_empty() {
                return Ok(self.sink.recv().await?);
            }
            let due = self.fates_at.map_or(std::time::Duration::ZERO, |t| FATE_EVERY.saturating_sub(t.elapsed()));
            if due.is_zero() {
                self.fates_at = Some(std::time::Instant::now());
                if let Some(report) = self.account_fates()? {
                    return Err(report);
                }
                continue;
            }
            if let Ok(r) = tokio::time::timeout(due, self.sink.recv()).await {
                return Ok(r?);
            }
        }
    }

    /// Looks up the sources it heard nothing of since it started (see [`DurableSink::live`]); the first one
    /// accounted for now, as its report.
    fn account_fates(&mut self) -> Result<Option<DurableError>, DurableError> {
        for source in self.positions.resumed_sources() {
            let at = self.positions.get(source).unwrap_or(0);
            match self.sink.source_fate(source) {
                SourceFate::Ended { last } => {
                    self.positions.settle(source);
                    if last > at {
                        self.ended = Some((source, last));
                        return Ok(Some(RecvError::Lagged(last - at).into()));
                    }
                    self.write(source, GONE)?;
                }
                SourceFate::Absent => {
                    self.positions.settle(source);
                    self.write(source, GONE)?;
                    return Ok(Some(RecvError::SourceLost(source).into()));
                }
                _ => {}
            }
        }
        Ok(None)
    }

    fn write(&mut self, source: SourceKey, seq: u64) -> Result<(), DurableError> {
        if let Some(log) = &mut self.log {
            log.append(&record(source, seq))?;
            log.flush()?;
        }
        Ok(())
    }

    fn hand(&mut self, ev: Event) -> Event {
        self.positions.handed(ev.source(), ev.seq());
        self.pending = Some((ev.source(), ev.seq()));
        ev
    }

    /// Writes the position of the last event handed over (it then survives the process being killed).
    pub fn commit(&mut self) -> Result<(), DurableError> {
        if let Some((k, s)) = self.pending.take() {
            self.write(k, s)?;
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

/// What an answer said of the source asked about.
#[derive(Debug, Default)]
struct Probed {
    /// The sink's starting point was asked of the recorder that answered.
    since: bool,
    /// The last sequence number it recorded of the source (`Some(None)`: none); `None` if it does not say.
    recorded: Option<Option<u64>>,
}

/// What a durable sink's directory holds.
struct State {
    log: Log,
    last: HashMap<SourceKey, u64>,
    marks: HashMap<RecorderId, u64>,
    /// Nothing was kept: the sink never ran before.
    new: bool,
}

/// Reads the positions and starting points kept in `dir` and compacts them: one record per source and per recorder
/// in a fresh segment, on disk before the old segments go. A new sink's directory gets a record saying so (a
/// starting point at recorder 0, which no recording has), so that when it is opened again it is not new.
fn load(dir: &Path) -> Result<State, DurableError> {
    let mut log = Log::open(dir, LogOptions::default())?;
    let mut last = HashMap::new();
    let mut marks = HashMap::new();
    let records = log.read_from(0)?;
    let new = records.is_empty();
    for (i, rec) in records {
        let bad = || DurableError::BadRecord(i);
        let word = |at: usize| -> Result<u64, DurableError> {
            Ok(u64::from_le_bytes(rec.get(at..at + 8).ok_or_else(bad)?.try_into().map_err(|_| bad())?))
        };
        match rec.len() {
            16 => {
                let e = last.entry(SourceKey(word(0)?)).or_insert(0);
                *e = (*e).max(word(8)?);
            }
            24 if rec[..8] == MARK_TAG => {
                let r = RecorderId(word(8)?);
                if r.0 != 0 {
                    // The newest is the furthest: a catch-up moves it forward only.
                    marks.insert(r, word(16)?);
                }
            }
            _ => return Err(bad()),
        }
    }
    // Sources accounted for as ended or gone (`DurableSink::live`) are forgotten.
    last.retain(|_, s| *s != GONE);
    log.roll()?;
    for (k, s) in &last {
        log.append(&record(*k, *s))?;
    }
    log.append(&mark_record(RecorderId(0), 0))?;
    for (r, i) in &marks {
        log.append(&mark_record(*r, *i))?;
    }
    log.sync()?;
    log.drop_all_but_newest()?;
    Ok(State { log, last, marks, new })
}

fn record(k: SourceKey, seq: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&k.0.to_le_bytes());
    b[8..].copy_from_slice(&seq.to_le_bytes());
    b
}

fn mark_record(r: RecorderId, index: u64) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&MARK_TAG);
    b[8..16].copy_from_slice(&r.0.to_le_bytes());
    b[16..].copy_from_slice(&index.to_le_bytes());
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
    fn a_gap_is_a_resumed_sources_jump_or_a_new_sources_first_event_past_its_first() {
        let (a, b) = (SourceKey(1), SourceKey(2));
        let mut p = Positions::resumed(HashMap::from([(a, 10)]));
        assert_eq!(p.gap(a, 11), None, "right where it left off");
        assert_eq!(p.gap(a, 9), None, "a duplicate");
        assert_eq!(p.gap(a, 14), Some(Gap { source: a, from: 11, to: 13, new: false }));
        assert_eq!(p.gap(b, 1), None, "a new source's first event");
        assert_eq!(p.gap(b, 6), Some(Gap { source: b, from: 1, to: 5, new: true }));
        // A source that sent in this run: later jumps are the channel's to report (or its filters').
        assert_eq!(p.admit(a, 11), Admit::Deliver { missed: 0 });
        p.handed(a, 11);
        assert_eq!(p.gap(a, 20), None);
    }

    #[test]
    fn a_gap_is_covered_by_the_position_and_for_a_new_source_by_what_was_recorded() {
        let resumed = Gap { source: SourceKey(1), from: 11, to: 13, new: false };
        assert_eq!(resumed.covered(Some(10), None), 10, "nothing replayed");
        assert_eq!(resumed.covered(Some(12), Some(20)), 12, "the recorder's last says nothing of a known source");
        assert_eq!(resumed.covered(Some(15), None), 13);
        let new = Gap { source: SourceKey(2), from: 1, to: 5, new: true };
        assert_eq!(new.covered(None, None), 0, "the recorder has recorded none of it yet");
        assert_eq!(new.covered(None, Some(3)), 3, "1 to 3 recorded before the starting point; 4 and 5 not yet");
        assert_eq!(new.covered(None, Some(9)), 5, "all recorded before the starting point: not the sink's");
        assert_eq!(new.covered(Some(4), Some(4)), 4, "replayed to 4 (since the starting point), 5 not recorded yet");
    }

    #[test]
    fn positions_survive_reopening_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let State { mut log, last, new, .. } = load(dir.path()).unwrap();
        assert!(last.is_empty() && new);
        for seq in 1..=5 {
            log.append(&record(SourceKey(1), seq)).unwrap();
        }
        log.append(&record(SourceKey(2), 9)).unwrap();
        log.flush().unwrap();
        drop(log);
        let State { mut log, last, new, .. } = load(dir.path()).unwrap();
        assert!(!new);
        assert_eq!(last, HashMap::from([(SourceKey(1), 5), (SourceKey(2), 9)]));
        assert_eq!(log.read_from(0).unwrap().len(), 3, "compacted: two positions and the sink's own record");
        log.append(&record(SourceKey(1), 6)).unwrap();
        log.flush().unwrap();
        drop(log);
        let State { last, .. } = load(dir.path()).unwrap();
        assert_eq!(last[&SourceKey(1)], 6);
        // A record that is not a position is refused with its index.
        let State { mut log, .. } = load(dir.path()).unwrap();
        log.append(b"short").unwrap();
        log.flush().unwrap();
        drop(log);
        assert!(matches!(load(dir.path()), Err(DurableError::BadRecord(_))));
    }

    #[test]
    fn starting_points_survive_reopening_the_newest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let State { mut log, marks, .. } = load(dir.path()).unwrap();
        assert!(marks.is_empty());
        log.append(&mark_record(RecorderId(7), 10)).unwrap();
        log.append(&record(SourceKey(1), 3)).unwrap();
        log.append(&mark_record(RecorderId(7), 25)).unwrap();
        log.append(&mark_record(RecorderId(8), 4)).unwrap();
        log.flush().unwrap();
        drop(log);
        let State { log, last, marks, new } = load(dir.path()).unwrap();
        assert!(!new);
        assert_eq!(marks, HashMap::from([(RecorderId(7), 25), (RecorderId(8), 4)]));
        assert_eq!(last, HashMap::from([(SourceKey(1), 3)]));
        drop(log);
        let State { marks, .. } = load(dir.path()).unwrap();
        assert_eq!(marks, HashMap::from([(RecorderId(7), 25), (RecorderId(8), 4)]), "compacted and read again");
        // A 24-byte record without the tag is not a starting point.
        let State { mut log, .. } = load(dir.path()).unwrap();
        log.append(&[1u8; 24]).unwrap();
        log.flush().unwrap();
        drop(log);
        assert!(matches!(load(dir.path()), Err(DurableError::BadRecord(_))));
    }

    #[test]
    fn state_written_before_starting_points_opens_with_its_positions_and_none() {
        // The previous format: a log of 16-byte positions only, written with the log directly.
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        log.append(&record(SourceKey(0xab), 3)).unwrap();
        log.append(&record(SourceKey(0xab), 4)).unwrap();
        log.append(&record(SourceKey(0xcd), 1)).unwrap();
        log.flush().unwrap();
        drop(log);
        let State { last, marks, new, .. } = load(dir.path()).unwrap();
        assert_eq!(last, HashMap::from([(SourceKey(0xab), 4), (SourceKey(0xcd), 1)]));
        assert!(marks.is_empty(), "no starting point yet");
        assert!(!new, "a sink that ran before: its first answer says what it cannot know");
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
