//! A segmented append-only log with a checksum per record.
//!
//! A log is a directory of segment files named by the index of their first record (`00000000000000000000.log`, 20
//! digits, so that names sort in index order). A segment starts with the 8-byte magic `KECHOLG1`; then records, each
//! `u32` length (little-endian), `u32` CRC-32 (of the length's four bytes and the payload), payload. Appends go to the
//! newest segment, which rolls over once it holds `segment_bytes`; the oldest segments are deleted while the log
//! holds more than `max_bytes` (the newest is always kept).
//!
//! A process killed in the middle of an append leaves a torn record at the end of the newest segment: opening the
//! log finds it (a short header or payload, or a checksum that does not match), truncates the segment to the last
//! whole record and says so in [`Opened::truncated`]. A bad record anywhere else is not a torn write but damage, and
//! opening fails with [`LogError::Corrupt`] naming the file and offset.
//!
//! Which records a segment's bytes hold is decided by [`scan`], a pure function; the file handling around it is thin.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"KECHOLG1";
/// A record's header: length and checksum.
const HEADER: usize = 8;
/// The largest record accepted (16 MiB).
pub const MAX_RECORD: usize = 16 << 20;

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A segment other than the newest holds a bad record: the log is damaged, not torn by a crash.
    #[error("{path}: damaged record at byte {offset}: {why}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the bad record starts.
        offset: u64,
        /// What is wrong with it.
        why: String,
    },
    /// A record larger than [`MAX_RECORD`] was appended.
    #[error("record of {0} bytes is larger than the limit of {MAX_RECORD}")]
    TooLarge(usize),
    /// A file in the log's directory is not a segment of this format.
    #[error("{0}: not a kecho log segment")]
    NotASegment(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_owned(), source }
}

/// What [`scan`] found in a segment's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Each whole record: where its payload starts and how long it is.
    pub records: Vec<(usize, usize)>,
    /// The length of the prefix made of the magic and whole records.
    pub valid: usize,
    /// Why the bytes after `valid` are not a record, if there are any.
    pub bad: Option<String>,
}

/// The records in a segment's bytes (pure).
pub fn scan(bytes: &[u8]) -> Scan {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        let why = if bytes.len() < MAGIC.len() { "short header" } else { "wrong magic" };
        return Scan { records: Vec::new(), valid: 0, bad: Some(why.to_owned()) };
    }
    let mut records = Vec::new();
    let mut at = MAGIC.len();
    let bad = loop {
        let rest = &bytes[at..];
        if rest.is_empty() {
            break None;
        }
        if rest.len() < HEADER {
            break Some(format!("{} byte(s) of a record header", rest.len()));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        if len > MAX_RECORD {
            break Some(format!("length {len} over the limit"));
        }
        if rest.len() < HEADER + len {
            break Some(format!("{} of {len} payload byte(s)", rest.len() - HEADER));
        }
        if checksum(&rest[..4], &rest[HEADER..HEADER + len]) != crc {
            break Some("checksum mismatch".to_owned());
        }
        records.push((at + HEADER, len));
        at += HEADER + len;
    };
    Scan { records, valid: at, bad }
}

fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(len);
    h.update(payload);
    h.finalize()
}

/// Encodes one record (header and payload) into `out`.
pub fn encode_record(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&len);
    out.extend_from_slice(&checksum(&len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// The log's bounds.
#[derive(Clone, Copy, Debug)]
pub struct LogOptions {
    /// A segment rolls over once it holds this many bytes.
    pub segment_bytes: u64,
    /// The oldest segments are deleted while the log holds more than this (the newest is always kept).
    pub max_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions { segment_bytes: 64 << 20, max_bytes: u64::MAX }
    }
}

/// What opening a log found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Opened {
    /// A torn tail was cut off the newest segment: the segment, and the bytes dropped and why.
    pub truncated: Option<(PathBuf, u64, String)>,
    /// Records in the log.
    pub records: u64,
}

#[derive(Debug)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
}

/// An open log. Appends are buffered: [`Log::flush`] hands them to the kernel (they then survive the process being
/// killed), [`Log::sync`] to the disk.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    opts: LogOptions,
    segments: Vec<Segment>,
    out: BufWriter<File>,
    next: u64,
    opened: Opened,
    buf: Vec<u8>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

impl Log {
    /// Opens (or creates) the log in `dir`, cutting a torn tail off its newest segment.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".log")) else { continue };
            let first: u64 = stem.parse().map_err(|_| LogError::NotASegment(path.clone()))?;
            segments.push(Segment { first, path, bytes: 0 });
        }
        segments.sort_by_key(|s| s.first);
        let mut opened = Opened::default();
        let n = segments.len();
        let mut next = segments.first().map_or(0, |s| s.first);
        for (i, seg) in segments.iter_mut().enumerate() {
            let bytes = fs::read(&seg.path).map_err(io(&seg.path))?;
            let s = scan(&bytes);
            let newest = i + 1 == n;
            if seg.first != next {
                return Err(LogError::Corrupt {
                    path: seg.path.clone(),
                    offset: 0,
                    why: format!("starts at record {} where {next} was expected", seg.first),
                });
            }
            if let Some(why) = s.bad {
                if !newest {
                    return Err(LogError::Corrupt { path: seg.path.clone(), offset: s.valid as u64, why });
                }
                // A torn write at the end: keep the whole records (and a fresh magic if even that was torn).
                let keep = s.valid.max(MAGIC.len());
                let f = OpenOptions::new().write(true).open(&seg.path).map_err(io(&seg.path))?;
                if s.valid == 0 {
                    f.set_len(0).map_err(io(&seg.path))?;
                    (&f).write_all(MAGIC).map_err(io(&seg.path))?;
                } else {
                    f.set_len(keep as u64).map_err(io(&seg.path))?;
                }
                f.sync_all().map_err(io(&seg.path))?;
                opened.truncated = Some((seg.path.clone(), (bytes.len() - s.valid) as u64, why));
            }
            seg.bytes = s.valid.max(MAGIC.len()) as u64;
            next += s.records.len() as u64;
        }
        opened.records = next - segments.first().map_or(0, |s| s.first);
        if segments.is_empty() {
            segments.push(new_segment(dir, 0)?);
        }
        let last = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let mut f = OpenOptions::new().write(true).open(&last).map_err(io(&last))?;
        f.seek(SeekFrom::End(0)).map_err(io(&last))?;
        Ok(Log { dir: dir.to_owned(), opts, segments, out: BufWriter::new(f), next, opened, buf: Vec::new() })
    }

    /// What opening found.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The index the next record gets.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// The index of the oldest record kept.
    pub fn first_index(&self) -> u64 {
        self.segments.first().map_or(0, |s| s.first)
    }

    /// The bytes the log holds.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Appends a record; returns its index.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, LogError> {
        if payload.len() > MAX_RECORD {
            return Err(LogError::TooLarge(payload.len()));
        }
        let last = self.segments.len() - 1;
        if self.segments[last].bytes >= self.opts.segment_bytes {
            self.roll()?;
        }
        self.buf.clear();
        encode_record(&mut self.buf, payload);
        let seg = self.segments.last_mut().expect("a log has a segment");
        self.out.write_all(&self.buf).map_err(io(&seg.path))?;
        seg.bytes += self.buf.len() as u64;
        let i = self.next;
        self.next += 1;
        Ok(i)
    }

    /// Starts a new segment (unless the newest holds no record yet), then deletes the oldest ones beyond
    /// `max_bytes`.
    pub fn roll(&mut self) -> Result<(), LogError> {
        self.flush()?;
        if self.segments.last().is_some_and(|s| s.first == self.next) {
            return Ok(());
        }
        let seg = new_segment(&self.dir, self.next)?;
        let f = OpenOptions::new().append(true).open(&seg.path).map_err(io(&seg.path))?;
        self.out = BufWriter::new(f);
        self.segments.push(seg);
        while self.segments.len() > 1 && self.bytes() > self.opts.max_bytes {
            self.drop_oldest()?;
        }
        Ok(())
    }

    /// Deletes every segment older than the newest (after [`Log::roll`], whatever was written before it).
    pub fn drop_all_but_newest(&mut self) -> Result<(), LogError> {
        while self.segments.len() > 1 {
            self.drop_oldest()?;
        }
        Ok(())
    }

    fn drop_oldest(&mut self) -> Result<(), LogError> {
        let old = self.segments.remove(0);
        fs::remove_file(&old.path).map_err(io(&old.path))
    }

    /// Hands buffered appends to the kernel: they survive the process being killed.
    pub fn flush(&mut self) -> Result<(), LogError> {
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        self.out.flush().map_err(io(&path))
    }

    /// Flushes, then waits until the newest segment is on disk.
    pub fn sync(&mut self) -> Result<(), LogError> {
        self.flush()?;
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        self.out.get_ref().sync_data().map_err(io(&path))
    }

    /// The records from index `from` on (flushed first), oldest first, each with its index.
    pub fn read_from(&mut self, from: u64) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
        self.flush()?;
        let mut out = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let end = self.segments.get(i + 1).map_or(self.next, |s| s.first);
            if end <= from {
                continue;
            }
            let mut bytes = Vec::new();
            File::open(&seg.path).and_then(|mut f| f.read_to_end(&mut bytes)).map_err(io(&seg.path))?;
            let s = scan(&bytes);
            if let Some(why) = s.bad {
                return Err(LogError::Corrupt { path: seg.path.clone(), offset: s.valid as u64, why });
            }
            for (k, (at, len)) in s.records.into_iter().enumerate() {
                let idx = seg.first + k as u64;
                if idx >= from {
                    out.push((idx, bytes[at..at + len].to_vec()));
                }
            }
        }
        Ok(out)
    }
}

fn new_segment(dir: &Path, first: u64) -> Result<Segment, LogError> {
    let path = dir.join(segment_name(first));
    let mut f = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
    f.write_all(MAGIC).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(Segment { first, path, bytes: MAGIC.len() as u64 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(log: &mut Log) -> Vec<Vec<u8>> {
        log.read_from(0).unwrap().into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn scan_finds_whole_records_and_says_why_the_rest_is_not() {
        let mut b = MAGIC.to_vec();
        encode_record(&mut b, b"one");
        encode_record(&mut b, b"two!");
        let s = scan(&b);
        assert_eq!(s.records, vec![(16, 3), (27, 4)]);
        assert_eq!((s.valid, s.bad), (b.len(), None));
        // Torn in the payload, in the header, and with a flipped bit.
        let whole = b.len();
        encode_record(&mut b, b"three");
        assert_eq!(scan(&b[..b.len() - 2]).valid, whole);
        assert!(scan(&b[..b.len() - 2]).bad.unwrap().contains("payload"));
        assert!(scan(&b[..whole + 3]).bad.unwrap().contains("header"));
        let n = b.len();
        b[n - 1] ^= 1;
        assert_eq!(scan(&b).bad.as_deref(), Some("checksum mismatch"));
        assert_eq!(scan(&b).records.len(), 2);
        assert_eq!(scan(b"NOTALOG!").bad.as_deref(), Some("wrong magic"));
    }

    #[test]
    fn records_survive_reopening_and_indexes_continue() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(log.append(b"a").unwrap(), 0);
        assert_eq!(log.append(b"b").unwrap(), 1);
        log.flush().unwrap();
        drop(log);
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(log.opened(), &Opened { truncated: None, records: 2 });
        assert_eq!(log.append(b"c").unwrap(), 2);
        assert_eq!(payloads(&mut log), vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        assert_eq!(log.read_from(2).unwrap(), vec![(2, b"c".to_vec())]);
    }

    #[test]
    fn a_torn_tail_is_cut_off_with_a_report_and_appends_go_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        log.append(b"kept").unwrap();
        log.append(b"torn record").unwrap();
        log.flush().unwrap();
        drop(log);
        let seg = dir.path().join(segment_name(0));
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new().write(true).open(&seg).unwrap().set_len(len - 4).unwrap();
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        let (path, dropped, why) = log.opened().truncated.clone().unwrap();
        assert_eq!((path, dropped), (seg.clone(), 8 + 11 - 4));
        assert!(why.contains("payload"), "{why}");
        assert_eq!(log.opened().records, 1);
        assert_eq!(log.append(b"after").unwrap(), 1);
        assert_eq!(payloads(&mut log), vec![b"kept".to_vec(), b"after".to_vec()]);
        drop(log);
        let log = Log::open(dir.path(), LogOptions::default()).unwrap();
        assert_eq!(log.opened().truncated, None, "clean after the cut");
    }

    #[test]
    fn a_torn_magic_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(segment_name(0)), b"KEC").unwrap();
        let mut log = Log::open(dir.path(), LogOptions::default()).unwrap();
        assert!(log.opened().truncated.is_some());
        log.append(b"x").unwrap();
        assert_eq!(payloads(&mut log), vec![b"x".to_vec()]);
    }

    #[test]
    fn damage_in_an_older_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 30, max_bytes: u64::MAX };
        let mut log = Log::open(dir.path(), opts).unwrap();
        for i in 0..6u8 {
            log.append(&[i; 10]).unwrap();
        }
        log.flush().unwrap();
        drop(log);
        let seg = dir.path().join(segment_name(0));
        let mut b = fs::read(&seg).unwrap();
        b[MAGIC.len() + HEADER] ^= 0xff;
        fs::write(&seg, b).unwrap();
        match Log::open(dir.path(), opts) {
            Err(LogError::Corrupt { path, offset, why }) => {
                assert_eq!((path, offset), (seg, MAGIC.len() as u64));
                assert_eq!(why, "checksum mismatch");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn segments_roll_and_the_oldest_go_beyond_the_byte_bound() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 40, max_bytes: 100 };
        let mut log = Log::open(dir.path(), opts).unwrap();
        for i in 0..20u8 {
            log.append(&[i; 10]).unwrap();
        }
        assert!(log.bytes() <= 100 + 40, "{}", log.bytes());
        let first = log.first_index();
        assert!(first > 0, "old segments deleted");
        let got = log.read_from(0).unwrap();
        assert_eq!(got.first().unwrap().0, first);
        assert_eq!(got.last().unwrap(), &(19, vec![19; 10]));
        drop(log);
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert_eq!((log.first_index(), log.next_index()), (first, 20));
        assert_eq!(log.read_from(0).unwrap().len() as u64, 20 - first);
        assert!(log.append(&vec![0; MAX_RECORD + 1]).is_err());
    }
}
