//! The recorder's index files (docs/DURABILITY.md, "The recorder's index files"): opening a recording reads only what
//! was written since its last segment was sealed or it was closed cleanly; an index file that is missing, cut short,
//! damaged or of another segment is rebuilt from the segment, and replays stay exactly right; a crash between a
//! segment's data and its index file recovers; the byte bound deletes index files with their segments.

use std::path::{Path, PathBuf};

mod recording;

use kecho::SourceKey;
use kecho_store::{LogOptions, Recorder};
use recording::{after, answer, ev, files, fill, SOURCES};

const OPTS: LogOptions = LogOptions { segment_bytes: 64 << 10, max_bytes: u64::MAX };

/// Replays from several positions (in every segment) answer exactly the events after them, reading near them; the
/// recorder knows each source's last event (a duplicate is refused).
fn check_replays(rec: &mut Recorder, last: u64) {
    for (s, p) in [(1, 0), (2, last / 6), (3, last / 3 + 11), (1, last * 5 / 6), (2, last - 7), (3, last)] {
        let (got, read) = answer(rec, &after(s, p));
        assert_eq!(got, (p + 1..=last).map(|q| (s, q)).collect::<Vec<_>>(), "source {s} after {p}");
        assert!(read <= (last - p + 64) * SOURCES + 256, "source {s} after {p}: {read} record(s) read");
    }
    for s in 1..=SOURCES {
        assert_eq!(rec.seen().get(SourceKey(s)), Some(last), "source {s}");
    }
}

/// A recording of 6,000 events of each source in more than 20 segments, closed cleanly.
fn recording() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    fill(&mut rec, 1, 6_000);
    rec.close().unwrap();
    let logs = files(dir.path(), ".log");
    assert!(logs.len() > 20, "{} segment(s)", logs.len());
    assert_eq!(files(dir.path(), ".idx").len(), logs.len(), "an index file per segment after a clean close");
    (dir, logs)
}

/// The index entries of a recording opened with no index file (everything read), for comparison.
fn entries_rebuilt_whole(dir: &Path) -> usize {
    let copy = tempfile::tempdir().unwrap();
    for p in files(dir, ".log").into_iter().chain(files(dir, ".id")) {
        std::fs::copy(&p, copy.path().join(p.file_name().unwrap())).unwrap();
    }
    let rec = Recorder::open(copy.path(), OPTS).unwrap();
    assert_eq!(rec.open_report().from_index_files, 0);
    rec.index().entries()
}

#[test]
fn after_a_clean_close_opening_reads_no_record_and_answers_as_before() {
    let (dir, _) = recording();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    let report = rec.open_report().clone();
    assert_eq!((report.decoded, rec.opened().scanned), (0, 0), "no record read at open");
    assert_eq!(report.from_index_files, 18_000);
    assert!(report.rebuilt.is_empty(), "{:?}", report.rebuilt);
    assert_eq!(rec.opened().records, 18_000);
    check_replays(&mut rec, 6_000);
    assert_eq!(rec.index().entries(), entries_rebuilt_whole(dir.path()), "the same index as a whole read builds");
    assert!(!rec.record(&ev(2, 6_000)).unwrap(), "a duplicate");
    // Appends go on, into new segments; a crash (no close) costs a read of the newest segment only.
    fill(&mut rec, 6_001, 7_000);
    drop(rec);
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    let newest_first: u64 =
        files(dir.path(), ".log").last().unwrap().file_stem().unwrap().to_str().unwrap().parse().unwrap();
    assert_eq!(rec.open_report().decoded, 21_000 - newest_first, "only the newest segment's records");
    assert!(rec.open_report().decoded < 21_000 / 20, "{}", rec.open_report().decoded);
    assert!(rec.open_report().rebuilt.is_empty(), "{:?}", rec.open_report().rebuilt);
    check_replays(&mut rec, 7_000);
}

#[test]
fn after_a_crash_opening_reads_only_what_was_appended_since_the_clean_close() {
    let (dir, _) = recording();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    // A few events, in the segment the close left newest (it is not full), then killed.
    fill(&mut rec, 6_001, 6_010);
    let segments = files(dir.path(), ".log").len();
    drop(rec);
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    assert_eq!(files(dir.path(), ".log").len(), segments, "no new segment: the appends went to the newest");
    assert_eq!((rec.open_report().decoded, rec.opened().scanned), (30, 30), "the 30 appended records only");
    check_replays(&mut rec, 6_010);
    // And a torn tail after them: cut off, the whole records kept, the index file's part used.
    fill(&mut rec, 6_011, 6_012);
    drop(rec);
    let newest = files(dir.path(), ".log").pop().unwrap();
    let len = std::fs::metadata(&newest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(len - 3).unwrap();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    assert!(rec.opened().truncated.is_some());
    assert_eq!(rec.open_report().decoded, 35);
    assert!(rec.record(&ev(3, 6_012)).unwrap(), "the cut event is recorded again");
    check_replays(&mut rec, 6_012);
}

/// Damages the index file of a middle segment with `damage`, then checks that opening rebuilds it (and only it),
/// that replays are exactly right, and that it is whole again for the next opening.
fn rebuilt_after(damage: impl Fn(&Path, &[PathBuf]), what: &str) {
    let (dir, logs) = recording();
    let k = logs.len() / 2;
    let idx = logs[k].with_extension("idx");
    damage(&idx, &logs);
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    let report = rec.open_report().clone();
    assert_eq!(report.rebuilt.len(), 1, "{what}: {:?}", report.rebuilt);
    assert_eq!(report.rebuilt[0].0, logs[k], "{what}");
    let first = |p: &Path| -> u64 { p.file_stem().unwrap().to_str().unwrap().parse().unwrap() };
    assert_eq!(report.decoded, first(&logs[k + 1]) - first(&logs[k]), "{what}: that segment's records only");
    check_replays(&mut rec, 6_000);
    assert_eq!(rec.index().entries(), entries_rebuilt_whole(dir.path()), "{what}");
    rec.close().unwrap();
    let rec = Recorder::open(dir.path(), OPTS).unwrap();
    assert_eq!((rec.open_report().decoded, rec.open_report().rebuilt.len()), (0, 0), "{what}: written again");
    eprintln!("{what}: {}", report.rebuilt[0].1);
}

#[test]
fn a_deleted_index_file_is_rebuilt() {
    rebuilt_after(|idx, _| std::fs::remove_file(idx).unwrap(), "deleted");
}

#[test]
fn a_truncated_index_file_is_rebuilt() {
    rebuilt_after(
        |idx, _| {
            let len = std::fs::metadata(idx).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(idx).unwrap().set_len(len / 2).unwrap();
        },
        "truncated",
    );
}

#[test]
fn a_bit_flipped_index_file_is_rebuilt_wherever_the_bit_is() {
    for at in [3usize, 12, 30, 50, 70, 200, usize::MAX] {
        rebuilt_after(
            |idx, _| {
                let mut b = std::fs::read(idx).unwrap();
                let i = at.min(b.len() - 1);
                b[i] ^= 0x10;
                std::fs::write(idx, b).unwrap();
            },
            &format!("bit flipped at {at}"),
        );
    }
}

#[test]
fn another_segments_index_file_is_not_taken_for_its_own() {
    // Whole and checksummed, but of the segment before.
    rebuilt_after(
        |idx, logs| {
            let k = logs.iter().position(|l| l.with_extension("idx") == idx).unwrap();
            std::fs::copy(logs[k - 1].with_extension("idx"), idx).unwrap();
        },
        "another segment's",
    );
}

#[test]
fn a_crash_between_a_sealed_segments_data_and_its_index_file_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    fill(&mut rec, 1, 3_000);
    drop(rec); // killed: the newest segment has no index file
               // ... and killed as the last sealed segment's index file was being written: a half-written temporary file, no
               // index file.
    let logs = files(dir.path(), ".log");
    let sealed = &logs[logs.len() - 2];
    let idx = sealed.with_extension("idx");
    let whole = std::fs::read(&idx).unwrap();
    std::fs::remove_file(&idx).unwrap();
    std::fs::write(sealed.with_extension("idx.tmp"), &whole[..whole.len() / 3]).unwrap();
    // (And one left from an earlier crash as the first segment's index file was written again: it has its own.)
    std::fs::write(logs[0].with_extension("idx.tmp"), b"half").unwrap();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    assert!(files(dir.path(), ".idx.tmp").is_empty(), "the temporary file is gone");
    assert_eq!(rec.open_report().rebuilt.len(), 1, "{:?}", rec.open_report().rebuilt);
    assert_eq!(&rec.open_report().rebuilt[0].0, sealed);
    assert_eq!(std::fs::read(&idx).unwrap(), whole, "written again as it was");
    check_replays(&mut rec, 3_000);
    fill(&mut rec, 3_001, 3_500);
    rec.close().unwrap();
    let mut rec = Recorder::open(dir.path(), OPTS).unwrap();
    assert_eq!(rec.open_report().decoded, 0);
    check_replays(&mut rec, 3_500);
}

#[test]
fn the_byte_bound_deletes_index_files_with_their_segments() {
    let dir = tempfile::tempdir().unwrap();
    let opts = LogOptions { segment_bytes: 32 << 10, max_bytes: 256 << 10 };
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    fill(&mut rec, 1, 5_000);
    let first = rec.first_index();
    assert!(first > 0, "old segments deleted");
    let stems = |ext: &str| -> Vec<String> {
        files(dir.path(), ext).iter().map(|p| p.file_stem().unwrap().to_str().unwrap().to_owned()).collect()
    };
    let logs = stems(".log");
    assert_eq!(stems(".idx"), logs[..logs.len() - 1], "an index file per sealed segment kept, none other");
    rec.close().unwrap();
    assert_eq!(stems(".idx"), logs, "and the newest's after a clean close");
    let mut rec = Recorder::open(dir.path(), opts).unwrap();
    assert_eq!((rec.open_report().decoded, rec.first_index()), (0, first));
    // Each source from its oldest event kept (whatever its count of records was there), and after a position.
    let kept = rec.indexed(first).unwrap();
    for s in 1..=SOURCES {
        let oldest = kept.iter().find(|(_, r)| r.source.0 == s).unwrap().1.seq;
        for p in [0, oldest + 100] {
            let (got, _) = answer(&mut rec, &after(s, p));
            assert_eq!(got, (oldest.max(p + 1)..=5_000).map(|q| (s, q)).collect::<Vec<_>>(), "source {s} after {p}");
        }
    }
}
