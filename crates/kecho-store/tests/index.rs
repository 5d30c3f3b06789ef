//! The recorder's index (docs/DURABILITY.md, "A recorder"): an answer for a source after its position reads the
//! recording from near that position, not from its start, and returns exactly what a read of the whole recording
//! would, across segments, after the recorder is opened again and after a torn tail was cut off.

mod recording;

use kecho::SourceKey;
use kecho_store::recorder::SOURCE_MARK_EVERY;
use kecho_store::replay::{self, Filters, Request};
use kecho_store::{LogOptions, Recorder, RecorderId};
use recording::{after, answer, ev, files, fill, whole, SOURCES};

/// Most records read for an answer of `n` events of one source among `SOURCES` interleaved: from the source's mark
/// at or before its position (at most `SOURCE_MARK_EVERY` of its records back) and the log's mark before that (at
/// most 256 records back), to its last record.
fn bound(n: u64) -> u64 {
    (n + SOURCE_MARK_EVERY) * SOURCES + 256
}

#[test]
fn a_replay_from_the_middle_reads_near_it_and_returns_exactly_the_right_events() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions { segment_bytes: 64 << 10, max_bytes: u64::MAX };
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    fill(&mut rec, 1, 10_000);
    let segments = files(dir.path(), ".log").len();
    assert!(segments > 20, "a recording of {segments} segment(s)");

    for (s, p) in [(2, 5_000), (1, 9_900), (3, 1), (2, 9_999), (1, 0)] {
        let req = after(s, p);
        let (got, read) = answer(&mut rec, &req);
        let want: Vec<(u64, u64)> = (p + 1..=10_000).map(|q| (s, q)).collect();
        assert_eq!(got, want, "source {s} after {p}");
        assert!(read <= bound(10_000 - p), "source {s} after {p}: {read} record(s) read");
    }
    assert_eq!(answer(&mut rec, &after(2, 10_000)), (Vec::new(), 0), "nothing after its last: nothing read");
    // Several positions, a starting point and the newest N: the same answer as a read of the whole recording.
    let mut req = after(1, 9_990);
    req.after.push((SourceKey(3), 9_995));
    req.since = Some(29_990);
    req.last = 4;
    let (got, read) = answer(&mut rec, &req);
    assert_eq!(got, whole(&mut rec, &req));
    assert!(read <= bound(10), "{read}");

    // Opened again: the index is rebuilt from the log.
    drop(rec);
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    let (got, read) = answer(&mut rec, &after(2, 9_900));
    assert_eq!(got, (9_901..=10_000).map(|q| (2, q)).collect::<Vec<_>>());
    assert!(read <= bound(100), "{read}");

    // A torn tail: the last record (source 3's event 10,000) is cut off, and recorded again when it comes again.
    drop(rec);
    let newest = files(dir.path(), ".log").pop().unwrap();
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len - 5).unwrap();
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    assert!(rec.opened().truncated.is_some());
    let (got, _) = answer(&mut rec, &after(3, 9_990));
    assert_eq!(got, (9_991..=9_999).map(|q| (3, q)).collect::<Vec<_>>());
    assert!(rec.record(&ev(3, 10_000)).unwrap());
    fill(&mut rec, 10_001, 10_300);
    for (s, p) in [(3, 9_990), (1, 10_250), (2, 7_000)] {
        let (got, read) = answer(&mut rec, &after(s, p));
        assert_eq!(got, (p + 1..=10_300).map(|q| (s, q)).collect::<Vec<_>>(), "source {s} after {p}");
        assert!(read <= bound(10_300 - p), "{read}");
    }
}

#[test]
fn with_old_segments_deleted_a_replay_starts_at_the_oldest_record_kept() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions { segment_bytes: 32 << 10, max_bytes: 256 << 10 };
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    fill(&mut rec, 1, 5_000);
    let first = rec.first_index();
    assert!(first > 0, "old segments deleted");
    for (s, p) in [(1, 0), (2, 4_000), (3, 4_990)] {
        let req = after(s, p);
        let (got, _) = answer(&mut rec, &req);
        assert_eq!(got, whole(&mut rec, &req), "source {s} after {p}");
        assert_eq!(got.last(), Some(&(s, 5_000)));
    }
    let entries = rec.index().entries() as u64;
    assert!(entries <= (rec.next_index() - first) / SOURCE_MARK_EVERY + 3 * SOURCES, "{entries} index entries");
}

#[test]
fn the_newest_n_a_filter_accepts_are_found_from_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Recorder::open(dir.path(), LogOptions { segment_bytes: 64 << 10, max_bytes: u64::MAX }).unwrap();
    fill(&mut rec, 1, 3_000);
    let mut req =
        Request { id: "r".into(), version: replay::VERSION, to: Some(RecorderId(1)), last: 5, ..Request::default() };
    req.filters = Filters { types: None, expr: Some(r#"zone == "a""#.into()) };
    let (got, read) = answer(&mut rec, &req);
    // Even sequence numbers are in zone a: the newest 5 of them.
    assert_eq!(got, [(2, 2_998), (3, 2_998), (1, 3_000), (2, 3_000), (3, 3_000)]);
    assert!(read < 3 * 1024, "{read}");
    // Unfiltered, the newest 5 recorded.
    req.filters = Filters::default();
    let (got, _) = answer(&mut rec, &req);
    assert_eq!(got, [(2, 2_999), (3, 2_999), (1, 3_000), (2, 3_000), (3, 3_000)]);
}
