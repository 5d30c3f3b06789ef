//! The measurement in docs/DURABILITY.md ("The recorder's index files"): opening a recording of 1,000,002 events (3
//! sources interleaved, about 115 B each, 64 MiB segments) after a clean close (every segment has its index file),
//! after a crash (the newest segment has none: it is read), and with every index file gone (every segment read, as
//! opening did before index files), each three times, checking each time that a replay of the last 100 events of
//! one source is right. `cargo run --release -p kecho-store --example open_index`.

use std::path::Path;
use std::time::{Duration, Instant};

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

fn index_files(dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "idx"))
        .collect();
    v.sort();
    Ok(v)
}

/// Opens the recording, checks a replay, and returns the time the opening took and the records it decoded.
fn open(dir: &Path, per: u64) -> anyhow::Result<(Duration, u64, Recorder)> {
    let t = Instant::now();
    let mut rec = Recorder::open(dir, LogOptions::default())?;
    let took = t.elapsed();
    let req = Request {
        id: "r".into(),
        version: replay::VERSION,
        to: Some(RecorderId(1)),
        after: vec![(SourceKey(2), per - 100)],
        ..Request::default()
    };
    let a = replay::prepare(&mut rec, &req, None)?;
    let got: Vec<u64> = a.events.iter().map(|(r, _)| r.seq).collect();
    anyhow::ensure!(got == (per - 99..=per).collect::<Vec<_>>(), "a wrong replay: {} events", got.len());
    anyhow::ensure!(rec.seen().get(SourceKey(1)) == Some(per), "source 1's last event is not {per}");
    Ok((took, rec.open_report().decoded, rec))
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
    let n = rec.next_index();
    rec.close()?;
    let segments = index_files(dir.path())?.len();
    let bytes: u64 = std::fs::read_dir(dir.path())?.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum();
    println!(
        "recorded {n} events ({:.0} MiB, {segments} segments) and closed in {:?}",
        bytes as f64 / 1048576.0,
        t.elapsed()
    );
    let idx_bytes: u64 = index_files(dir.path())?.iter().filter_map(|p| p.metadata().ok()).map(|m| m.len()).sum();
    println!("index files: {idx_bytes} bytes");

    for _ in 0..3 {
        let (took, decoded, rec) = open(dir.path(), per)?;
        println!("after a clean close: opened in {took:?}, {decoded} records decoded");
        rec.close()?;
    }
    let newest = index_files(dir.path())?.pop().expect("index files");
    for _ in 0..3 {
        std::fs::remove_file(&newest)?;
        let (took, decoded, rec) = open(dir.path(), per)?;
        println!("after a crash (the newest segment read): opened in {took:?}, {decoded} records decoded");
        rec.close()?;
    }
    for _ in 0..3 {
        for p in index_files(dir.path())? {
            std::fs::remove_file(p)?;
        }
        let (took, decoded, rec) = open(dir.path(), per)?;
        anyhow::ensure!(decoded == n, "{decoded} of {n} records decoded");
        println!("with no index file (every segment read, as before): opened in {took:?}, {decoded} records decoded");
        rec.close()?;
    }
    Ok(())
}
