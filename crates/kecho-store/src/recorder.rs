//! The recorder's event log: every event of a channel, once, in a [`Log`]. The decisions (what to keep) are pure in
//! [`Seen`]; [`Recorder`] applies them to the log.

use std::collections::HashMap;
use std::path::Path;

use kecho::SourceKey;

use crate::log::{Log, LogError, LogOptions, Opened};
use crate::record::{DecodeError, Recorded};

/// Errors of the recorder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecorderError {
    /// The log failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// A whole record (its checksum matched) is not an event: written by something else.
    #[error("record {index}: {source}")]
    Decode {
        /// The record's index.
        index: u64,
        /// Why.
        source: DecodeError,
    },
}

/// The last sequence number recorded per source: an event at or below it is not recorded again.
#[derive(Debug, Default)]
pub struct Seen(HashMap<SourceKey, u64>);

impl Seen {
    /// True (and noted) if event `seq` of `source` is new.
    pub fn fresh(&mut self, source: SourceKey, seq: u64) -> bool {
        let last = self.0.entry(source).or_insert(0);
        if seq <= *last {
            return false;
        }
        *last = seq;
        true
    }

    /// Sources recorded and their last sequence numbers.
    pub fn sources(&self) -> impl Iterator<Item = (SourceKey, u64)> + '_ {
        self.0.iter().map(|(k, v)| (*k, *v))
    }
}

/// A channel's recorded events on disk.
#[derive(Debug)]
pub struct Recorder {
    log: Log,
    seen: Seen,
    buf: Vec<u8>,
}

impl Recorder {
    /// Opens (or creates) the recording in `dir`; a torn tail is cut off (see [`Recorder::opened`]).
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Recorder, RecorderError> {
        let mut log = Log::open(dir, opts)?;
        let mut seen = Seen::default();
        for (index, rec) in log.read_from(0)? {
            let r = Recorded::decode(&rec).map_err(|source| RecorderError::Decode { index, source })?;
            seen.fresh(r.source, r.seq);
        }
        Ok(Recorder { log, seen, buf: Vec::new() })
    }

    /// What opening found.
    pub fn opened(&self) -> &Opened {
        self.log.opened()
    }

    /// Records an event unless it was recorded before; returns whether it was.
    pub fn record(&mut self, r: &Recorded) -> Result<bool, RecorderError> {
        if !self.seen.fresh(r.source, r.seq) {
            return Ok(false);
        }
        self.buf.clear();
        r.encode(&mut self.buf);
        self.log.append(&self.buf)?;
        Ok(true)
    }

    /// Hands what was recorded to the kernel.
    pub fn flush(&mut self) -> Result<(), RecorderError> {
        Ok(self.log.flush()?)
    }

    /// The recorded events from log index `from` on, oldest first.
    pub fn events(&mut self, from: u64) -> Result<Vec<Recorded>, RecorderError> {
        self.log
            .read_from(from)?
            .into_iter()
            .map(|(index, rec)| Recorded::decode(&rec).map_err(|source| RecorderError::Decode { index, source }))
            .collect()
    }

    /// The last sequence number recorded per source.
    pub fn seen(&self) -> &Seen {
        &self.seen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kecho::Attrs;

    fn ev(source: u64, seq: u64) -> Recorded {
        Recorded {
            source: SourceKey(source),
            seq,
            ty: "t".into(),
            attrs: Attrs::default(),
            payload: Bytes::from(format!("{source}:{seq}")),
        }
    }

    #[test]
    fn events_are_recorded_once_across_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        assert!(r.record(&ev(1, 1)).unwrap());
        assert!(r.record(&ev(1, 2)).unwrap());
        assert!(!r.record(&ev(1, 2)).unwrap(), "a duplicate");
        assert!(r.record(&ev(2, 1)).unwrap());
        r.flush().unwrap();
        drop(r);
        // A torn last record: cut off on opening, and recorded again when it comes again.
        let seg = dir.path().join("00000000000000000000.log");
        let len = std::fs::metadata(&seg).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 1).unwrap();
        let mut r = Recorder::open(dir.path(), LogOptions::default()).unwrap();
        assert!(r.opened().truncated.is_some());
        assert!(!r.record(&ev(1, 2)).unwrap());
        assert!(r.record(&ev(2, 1)).unwrap());
        let got: Vec<(u64, u64)> = r.events(0).unwrap().iter().map(|e| (e.source.0, e.seq)).collect();
        assert_eq!(got, vec![(1, 1), (1, 2), (2, 1)]);
        assert_eq!(r.events(0).unwrap()[2], ev(2, 1));
    }
}
