//! What the recording tests and examples share (tests/index.rs, tests/index_files.rs, examples/replay_index.rs): events
//! of three sources interleaved, answers to requests after a position, the files of a recording.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kecho::{Attrs, SourceKey};
use kecho_store::replay::{self, Request};
use kecho_store::{Recorded, Recorder, RecorderId};

pub const SOURCES: u64 = 3;

pub fn ev(source: u64, seq: u64) -> Recorded {
    let mut attrs = Attrs::default();
    attrs.set("zone", if seq.is_multiple_of(2) { "a" } else { "b" });
    Recorded {
        source: SourceKey(source),
        seq,
        ty: "t".into(),
        attrs,
        payload: Bytes::from(format!("{source}:{seq}:{}", "x".repeat(60))),
    }
}

/// Events `1..=per_source` of each source, interleaved.
pub fn fill(rec: &mut Recorder, from: u64, per_source: u64) {
    for seq in from..=per_source {
        for s in 1..=SOURCES {
            assert!(rec.record(&ev(s, seq)).unwrap());
        }
    }
    rec.flush().unwrap();
}

pub fn after(source: u64, seq: u64) -> Request {
    Request {
        id: "r".into(),
        version: replay::VERSION,
        to: Some(RecorderId(1)),
        after: vec![(SourceKey(source), seq)],
        ..Request::default()
    }
}

/// The answer's events, and the records read to make it.
pub fn answer(rec: &mut Recorder, req: &Request) -> (Vec<(u64, u64)>, u64) {
    let before = rec.records_read();
    let m = (!req.filters.is_none()).then(|| req.filters.compile().unwrap());
    let a = replay::prepare(rec, req, m.as_ref()).unwrap();
    (a.events.iter().map(|(r, _)| (r.source.0, r.seq)).collect(), rec.records_read() - before)
}

/// What the whole recording says the answer is (the path an answer took before the index).
pub fn whole(rec: &mut Recorder, req: &Request) -> Vec<(u64, u64)> {
    let all = rec.indexed(rec.first_index()).unwrap();
    replay::answer(req, &all).iter().map(|r| (r.source.0, r.seq)).collect()
}

/// The files in `dir` whose names end with `ext`, sorted.
pub fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().is_some_and(|n| n.ends_with(ext)))
        .collect();
    v.sort();
    v
}
