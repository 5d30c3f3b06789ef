//! The measurements in docs/DURABILITY.md ("The recorder's index", "The recorder's index files"), on a recording of
//! 1,000,002 events (3 sources interleaved, about 115 B each, 64 MiB segments):
//!
//! - a replay of the last 100 events of one source, through the index and through the whole-recording path an answer
//!   took before it, each three times;
//! - opening the recording after a clean close (every segment has its index file), after a crash (the newest segment
//!   has none: it is read) and with every index file gone (every segment read, as opening did before index files),
//!   each three times, each checked by a replay.
//!
//! `cargo run --release -p kecho-store --example replay_index`.

use std::path::Path;
use std::time::{Duration, Instant};

use kecho::SourceKey;
use kecho_store::replay;
use kecho_store::{LogOptions, Recorder};

#[path = "../tests/recording/mod.rs"]
mod recording;

use recording::{after, files, fill, SOURCES};

/// Opens the recording and checks a replay of the last 100 events of source 2 and each source's last event; returns
/// the time the opening took and the records it decoded.
fn open(dir: &Path, per: u64) -> anyhow::Result<(Duration, u64, Recorder)> {
    let t = Instant::now();
    let mut rec = Recorder::open(dir, LogOptions::default())?;
    let took = t.elapsed();
    let a = replay::prepare(&mut rec, &after(2, per - 100), None)?;
    let got: Vec<(u64, u64)> = a.events.iter().map(|(r, _)| (r.source.0, r.seq)).collect();
    anyhow::ensure!(got == (per - 99..=per).map(|q| (2, q)).collect::<Vec<_>>(), "a wrong replay: {got:?}");
    for s in 1..=SOURCES {
        anyhow::ensure!(rec.seen().get(SourceKey(s)) == Some(per), "source {s}'s last event is not {per}");
    }
    Ok((took, rec.open_report().decoded, rec))
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut rec = Recorder::open(dir.path(), LogOptions::default())?;
    let per = 1_000_000 / SOURCES + 1;
    let t = Instant::now();
    fill(&mut rec, 1, per);
    let n = rec.next_index();
    rec.close()?;
    let bytes: u64 = files(dir.path(), ".log").iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
    let idx: u64 = files(dir.path(), ".idx").iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
    println!(
        "recorded {n} events ({:.1} MiB in {} segments) and closed in {:?}; index files {idx} bytes",
        bytes as f64 / 1048576.0,
        files(dir.path(), ".log").len(),
        t.elapsed()
    );

    let mut rec = None;
    for i in 0..3 {
        let (took, decoded, r) = open(dir.path(), per)?;
        println!("after a clean close: opened in {took:?}, {decoded} records decoded");
        if i < 2 {
            r.close()?;
        } else {
            rec = Some(r);
        }
    }
    let mut rec = rec.expect("opened");
    println!("{} index entries", rec.index().entries());
    // Each replay path three times, the index first (a read of the whole recording leaves a million freed
    // allocations behind, which slows what follows it at once).
    let req = after(2, per - 100);
    let mut indexed = Vec::new();
    for _ in 0..3 {
        let before = rec.records_read();
        let t = Instant::now();
        let a = replay::prepare(&mut rec, &req, None)?;
        let took = t.elapsed();
        indexed = a.events.iter().map(|(r, _)| (r.source.0, r.seq)).collect::<Vec<_>>();
        anyhow::ensure!(indexed.len() == 100, "the answer has {} events, not 100", indexed.len());
        println!("replay with the index: {took:?} ({} records read)", rec.records_read() - before);
    }
    for _ in 0..3 {
        let t = Instant::now();
        let all = rec.indexed(rec.first_index())?;
        let old: Vec<(u64, u64)> = replay::answer(&req, &all).iter().map(|r| (r.source.0, r.seq)).collect();
        let took = t.elapsed();
        anyhow::ensure!(old == indexed, "the whole recording's answer differs from the index's");
        println!("replay through the whole recording: {took:?}");
    }
    rec.close()?;

    let newest = files(dir.path(), ".idx").pop().expect("index files");
    for _ in 0..3 {
        std::fs::remove_file(&newest)?;
        let (took, decoded, rec) = open(dir.path(), per)?;
        println!("after a crash (the newest segment read): opened in {took:?}, {decoded} records decoded");
        rec.close()?;
    }
    for _ in 0..3 {
        for p in files(dir.path(), ".idx") {
            std::fs::remove_file(p)?;
        }
        let (took, decoded, rec) = open(dir.path(), per)?;
        anyhow::ensure!(decoded == n, "{decoded} of {n} records decoded");
        println!("with no index file (every segment read, as before): opened in {took:?}, {decoded} records decoded");
        rec.close()?;
    }
    Ok(())
}
