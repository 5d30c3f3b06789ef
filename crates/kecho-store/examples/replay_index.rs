//! The measurement in docs/DURABILITY.md ("A recorder"): a replay of the last 100 events of one source from a
//! recording of 1,000,000 events (3 sources interleaved), through the index and through the whole-recording path an
//! answer took before it, each three times. `cargo run --release -p kecho-store --example replay_index`.

use std::time::Instant;

use bytes::Bytes;
use kecho::{Attrs, SourceKey};
use kecho_store::replay::{self, Request};
use kecho_store::{LogOptions, Recorded, Recorder, RecorderId};

const SOURCES: u64 = 3;

fn ev(source: u64, seq: u64) -> Recorded {
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

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rec = Recorder::open(dir.path(), LogOptions::default())?;
    let per = 1_000_000 / SOURCES + 1;
    let t = Instant::now();
    for seq in 1..=per {
        for s in 1..=SOURCES {
            rec.record(&ev(s, seq))?;
        }
    }
    rec.flush()?;
    println!("recorded {} events in {:?}", rec.next_index(), t.elapsed());
    drop(rec);
    let t = Instant::now();
    let mut rec = Recorder::open(dir.path(), LogOptions::default())?;
    println!("opened (index rebuilt) in {:?}; {} index entries", t.elapsed(), rec.index().entries());
    let req = Request {
        id: "r".into(),
        version: replay::VERSION,
        to: Some(RecorderId(1)),
        after: vec![(SourceKey(2), per - 100)],
        ..Request::default()
    };
    // Each path three times, the index first (a read of the whole recording leaves a million freed allocations
    // behind, which slows what follows it at once).
    let mut indexed = Vec::new();
    for _ in 0..3 {
        let before = rec.records_read();
        let t = Instant::now();
        let a = replay::prepare(&mut rec, &req, None)?;
        let took = t.elapsed();
        indexed = a.events.iter().map(|(r, _)| (r.source.0, r.seq)).collect::<Vec<_>>();
        anyhow::ensure!(indexed.len() == 100, "the answer has {} events, not 100", indexed.len());
        println!("with the index: {took:?} ({} records read)", rec.records_read() - before);
    }
    for _ in 0..3 {
        let t = Instant::now();
        let all = rec.indexed(rec.first_index())?;
        let old: Vec<(u64, u64)> = replay::answer(&req, &all).iter().map(|r| (r.source.0, r.seq)).collect();
        let took = t.elapsed();
        anyhow::ensure!(old == indexed, "the whole recording's answer differs from the index's");
        println!("whole recording: {took:?}");
    }
    let segments = std::fs::read_dir(dir.path())?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log")))
        .count();
    println!("{segments} segment(s)");
    Ok(())
}
