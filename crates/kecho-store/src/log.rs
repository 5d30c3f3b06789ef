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
//!
//! An open log keeps, per segment, a sparse index in memory: the byte offset of every [`MARK_EVERY`]th record
//! (rebuilt when the log is opened, kept up to date by appends, dropped with the segment). A read from some index
//! ([`Log::for_each`]) starts at the nearest offset at or before it instead of the segment's first record, and a
//! read up to some index stops at the next offset after it.
//!
//! **Index files.** An owner that seals its segments ([`Log::seal`] when [`Log::is_full`], [`Log::write_index`] on a
//! clean close) keeps beside each segment `NNNN.log` an index file `NNNN.idx` ([`IndexFile`]): what opening would
//! learn by reading the segment's first `bytes` bytes (its records, the sparse index, the header of its last record)
//! and bytes of the owner's own ([`IndexFile::extra`]), under one CRC-32. Opening then reads no record an index file
//! describes: it reads only the bytes after them (the newest segment's appends since the index file was written).
//! An index file is used only if its checksum holds, it names the segment's first record, the segment is at least
//! as long as it says and holds the header of the last record it describes where it says; otherwise (and when it is
//! missing) the segment is read whole as before, and [`Log::segments_opened`] says why. Index files are written to a
//! temporary file, synced, renamed and the directory synced (after the segment's data is synced), so that a crash
//! leaves the old file, none or the whole new one; a leftover temporary file and an index file without its segment
//! are deleted on opening, and a segment's index file goes with it (the byte bound, [`Log::drop_all_but_newest`]).
//! Records an index file describes are not checked at open: damage among them is found (as
//! [`LogError::Corrupt`]) when they are read.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"KECHOLG1";
/// A record's header: length and checksum.
pub const HEADER: usize = 8;
/// The largest record accepted (16 MiB).
pub const MAX_RECORD: usize = 16 << 20;
/// A segment's index holds the byte offset of every `MARK_EVERY`th record (counted from the segment's first).
pub const MARK_EVERY: u64 = 256;
/// The first bytes of every index file.
pub const INDEX_MAGIC: &[u8; 8] = b"KECHOIX1";

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
    scan_records(bytes, MAGIC.len())
}

/// The whole records in `bytes` from byte `at` on (a record boundary), as [`scan`] finds them (pure).
fn scan_records(bytes: &[u8], mut at: usize) -> Scan {
    let mut records = Vec::new();
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
    /// Records read from the segments' bytes to open the log (those their index files describe are not read).
    pub scanned: u64,
}

/// What opening found of one segment's index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexState {
    /// It was used: it described the segment's first `records` records (not read), and kept the owner's `extra`.
    Loaded {
        /// The records it described.
        records: u64,
        /// [`IndexFile::extra`].
        extra: Vec<u8>,
    },
    /// There is none (the newest segment has none until it is sealed or the log closed cleanly).
    Missing,
    /// There is one and it was not used, for this reason (the segment was read whole).
    Unusable(String),
}

/// What opening found of one segment ([`Log::segments_opened`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentOpened {
    /// The index of its first record.
    pub first: u64,
    /// Its records.
    pub records: u64,
    /// The segment file.
    pub path: PathBuf,
    /// Its index file.
    pub index: IndexState,
}

/// A reader of little-endian fields that says "truncated" when the bytes end (index files' layouts).
pub(crate) struct Fields<'a>(pub(crate) &'a [u8]);

impl<'a> Fields<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated".to_owned());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap_or_default()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap_or_default()))
    }
}

/// A segment's index file (`NNNN.idx` beside `NNNN.log`): what opening learns by reading the segment's first
/// `bytes` bytes, and bytes of the log's owner. Layout (little-endian): [`INDEX_MAGIC`], `u64` first, `u64` records,
/// `u64` bytes, `u64` offset of the last record, its 8-byte header, `u32` count of marks, each a `u64` offset (of
/// records 0, [`MARK_EVERY`], ...), `u32` length of `extra`, `extra`, then a `u32` CRC-32 of all before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    /// The index of the segment's first record.
    pub first: u64,
    /// The records described (at least one).
    pub records: u64,
    /// The length of the segment they fill (magic and whole records).
    pub bytes: u64,
    /// The byte offset of the last of them.
    pub last_at: u64,
    /// Its header (length and checksum), as in the segment.
    pub last_header: [u8; HEADER],
    /// The byte offsets of records `first`, `first + MARK_EVERY`, ...
    pub marks: Vec<u64>,
    /// The owner's bytes ([`Log::seal`]).
    pub extra: Vec<u8>,
}

impl IndexFile {
    /// Its bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(60 + 8 * self.marks.len() + self.extra.len());
        b.extend_from_slice(INDEX_MAGIC);
        for v in [self.first, self.records, self.bytes, self.last_at] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&self.last_header);
        b.extend_from_slice(&(self.marks.len() as u32).to_le_bytes());
        for m in &self.marks {
            b.extend_from_slice(&m.to_le_bytes());
        }
        b.extend_from_slice(&(self.extra.len() as u32).to_le_bytes());
        b.extend_from_slice(&self.extra);
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads an index file's bytes, checking its checksum and that it describes whole records consistently (pure);
    /// the reason if not.
    pub fn decode(b: &[u8]) -> Result<IndexFile, String> {
        if b.len() < INDEX_MAGIC.len() + 4 {
            return Err(format!("{} byte(s): too short", b.len()));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().unwrap_or_default()) {
            return Err("checksum mismatch".to_owned());
        }
        if &body[..INDEX_MAGIC.len()] != INDEX_MAGIC {
            return Err("wrong magic".to_owned());
        }
        let mut r = Fields(&body[INDEX_MAGIC.len()..]);
        let first = r.u64()?;
        let records = r.u64()?;
        let bytes = r.u64()?;
        let last_at = r.u64()?;
        let last_header: [u8; HEADER] = r.take(HEADER)?.try_into().unwrap_or_default();
        let n = r.u32()? as usize;
        if n as u64 != records.div_ceil(MARK_EVERY) {
            return Err(format!("{n} mark(s) for {records} record(s)"));
        }
        let marks = (0..n).map(|_| r.u64()).collect::<Result<Vec<u64>, String>>()?;
        let e = r.u32()? as usize;
        let extra = r.take(e)?.to_vec();
        if !r.0.is_empty() {
            return Err("bytes after the end".to_owned());
        }
        let last_len = u64::from(u32::from_le_bytes(last_header[..4].try_into().unwrap_or_default()));
        let ordered = marks.first() == Some(&(MAGIC.len() as u64))
            && marks.windows(2).all(|w| w[0] < w[1])
            && marks.last().is_some_and(|m| *m <= last_at);
        if records == 0 || !ordered || last_at.checked_add(HEADER as u64 + last_len) != Some(bytes) {
            return Err("it does not describe whole records".to_owned());
        }
        Ok(IndexFile { first, records, bytes, last_at, last_header, marks, extra })
    }
}

#[derive(Debug)]
struct Segment {
    first: u64,
    path: PathBuf,
    bytes: u64,
    /// The byte offset of records `first`, `first + MARK_EVERY`, ... (the sparse index).
    marks: Vec<u64>,
    /// The byte offset and header of its last record, if it has one.
    last: Option<(u64, [u8; HEADER])>,
}

impl Segment {
    /// The index and byte offset of the nearest record at or before `index` that the sparse index holds.
    fn mark_at_or_before(&self, index: u64) -> (u64, u64) {
        let k = (index.saturating_sub(self.first) / MARK_EVERY) as usize;
        let k = k.min(self.marks.len().saturating_sub(1));
        match self.marks.get(k) {
            Some(off) => (self.first + k as u64 * MARK_EVERY, *off),
            None => (self.first, MAGIC.len() as u64),
        }
    }

    /// The byte offset of the first record after `index` that the sparse index holds (`None`: read to the end).
    fn mark_after(&self, index: u64) -> Option<u64> {
        let k = (index.saturating_sub(self.first) / MARK_EVERY) as usize + 1;
        self.marks.get(k).copied()
    }
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
    /// Per segment, what opening found (until [`Log::segments_opened`] takes it).
    segments_opened: Vec<SegmentOpened>,
    buf: Vec<u8>,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

/// The index file of the segment at `segment`.
pub fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("idx")
}

/// Writes `bytes` to `path` so that a crash leaves the file as it was (or none) or whole: to the temporary file
/// `tmp` beside it, synced, renamed over it, then the directory synced.
pub fn write_atomically(path: &Path, tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(tmp, path)?;
    match path.parent() {
        Some(dir) => File::open(if dir.as_os_str().is_empty() { Path::new(".") } else { dir })?.sync_all(),
        None => Ok(()),
    }
}

/// Deletes `path`; there being none is fine.
fn remove_if_there(path: &Path) -> Result<(), LogError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LogError::Io { path: path.to_owned(), source: e }),
        _ => Ok(()),
    }
}

/// Reads segment `seg` at opening (the newest one if `newest`): from its index file if it has a usable one (and
/// `use_index`), then the
/// bytes after what that describes (all of them without). Fills in its length, sparse index and last record, cuts
/// a torn tail off the newest, and says what it found.
fn open_segment(
    seg: &mut Segment,
    newest: bool,
    opened: &mut Opened,
    use_index: bool,
) -> Result<SegmentOpened, LogError> {
    let path = seg.path.clone();
    let mut file = OpenOptions::new().read(true).write(newest).open(&path).map_err(io(&path))?;
    let len = file.metadata().map_err(io(&path))?.len();
    let idx = index_path(&path);
    let read = if use_index { fs::read(&idx) } else { Err(std::io::ErrorKind::NotFound.into()) };
    let index = match read {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(IndexState::Missing),
        Err(e) => Err(IndexState::Unusable(format!("cannot be read: {e}"))),
        Ok(b) => IndexFile::decode(&b)
            .and_then(|ix| {
                if ix.first != seg.first {
                    return Err(format!("describes the segment of record {}", ix.first));
                }
                if ix.bytes > len {
                    return Err(format!("describes {} byte(s) of a segment of {len}", ix.bytes));
                }
                let mut header = [0u8; HEADER];
                file.seek(SeekFrom::Start(ix.last_at))
                    .and_then(|_| file.read_exact(&mut header))
                    .map_err(|e| format!("reading the segment: {e}"))?;
                if header != ix.last_header {
                    return Err(format!("the segment holds another record at byte {}", ix.last_at));
                }
                Ok(ix)
            })
            .map_err(IndexState::Unusable),
    };
    let (start, described, state) = match index {
        Ok(ix) => {
            seg.marks = ix.marks;
            seg.last = Some((ix.last_at, ix.last_header));
            (ix.bytes, ix.records, IndexState::Loaded { records: ix.records, extra: ix.extra })
        }
        Err(state) => {
            seg.marks.clear();
            seg.last = None;
            (0, 0, state)
        }
    };
    let mut bytes = Vec::with_capacity(len.saturating_sub(start) as usize);
    file.seek(SeekFrom::Start(start)).and_then(|_| file.read_to_end(&mut bytes)).map_err(io(&path))?;
    let s = if start == 0 { scan(&bytes) } else { scan_records(&bytes, 0) };
    if let Some(why) = s.bad {
        if !newest {
            return Err(LogError::Corrupt { path, offset: start + s.valid as u64, why });
        }
        // A torn write at the end: keep the whole records (and a fresh magic if even that was torn).
        if start == 0 && s.valid == 0 {
            file.set_len(0).map_err(io(&path))?;
            file.seek(SeekFrom::Start(0)).and_then(|_| file.write_all(MAGIC)).map_err(io(&path))?;
        } else {
            file.set_len(start + s.valid as u64).map_err(io(&path))?;
        }
        file.sync_all().map_err(io(&path))?;
        opened.truncated = Some((path.clone(), (bytes.len() - s.valid) as u64, why));
    }
    for (k, (at, _)) in s.records.iter().enumerate() {
        if (described + k as u64).is_multiple_of(MARK_EVERY) {
            seg.marks.push(start + (at - HEADER) as u64);
        }
    }
    if let Some((at, _)) = s.records.last() {
        let header = bytes[at - HEADER..*at].try_into().unwrap_or_default();
        seg.last = Some((start + (at - HEADER) as u64, header));
    }
    seg.bytes = (start + s.valid as u64).max(MAGIC.len() as u64);
    opened.scanned += s.records.len() as u64;
    Ok(SegmentOpened { first: seg.first, records: described + s.records.len() as u64, path, index: state })
}

impl Log {
    /// Opens (or creates) the log in `dir`, cutting a torn tail off its newest segment. Segments with a usable
    /// index file are read only after what it describes (see the module's documentation).
    pub fn open(dir: &Path, opts: LogOptions) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut segments = Vec::new();
        let mut index_files = Vec::new();
        for entry in fs::read_dir(dir).map_err(io(dir))? {
            let entry = entry.map_err(io(dir))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".idx.tmp") {
                // An index file whose writing a crash interrupted: the segment is read instead.
                remove_if_there(&path)?;
            } else if name.ends_with(".idx") {
                index_files.push(path);
            } else if let Some(stem) = name.strip_suffix(".log") {
                let first: u64 = stem.parse().map_err(|_| LogError::NotASegment(path.clone()))?;
                segments.push(Segment { first, path, bytes: 0, marks: Vec::new(), last: None });
            }
        }
        // An index file left by a segment deleted (a crash between the two deletions).
        for idx in index_files {
            if !idx.with_extension("log").exists() {
                remove_if_there(&idx)?;
            }
        }
        segments.sort_by_key(|s| s.first);
        let mut opened = Opened::default();
        let mut segments_opened = Vec::with_capacity(segments.len());
        let n = segments.len();
        let mut next = segments.first().map_or(0, |s| s.first);
        for i in 0..n {
            if segments[i].first != next {
                // An index file that miscounts its segment's records (the next segment says so): read it instead.
                let prev =
                    segments_opened.last().filter(|o: &&SegmentOpened| matches!(o.index, IndexState::Loaded { .. }));
                if let Some(prev) = prev {
                    let why = format!(
                        "it counts {} record(s), the next segment starts at {}",
                        prev.records, segments[i].first
                    );
                    next -= prev.records;
                    let mut o = open_segment(&mut segments[i - 1], false, &mut opened, false)?;
                    o.index = IndexState::Unusable(why);
                    next += o.records;
                    *segments_opened.last_mut().expect("a segment before") = o;
                }
            }
            let seg = &mut segments[i];
            if seg.first != next {
                return Err(LogError::Corrupt {
                    path: seg.path.clone(),
                    offset: 0,
                    why: format!("starts at record {} where {next} was expected", seg.first),
                });
            }
            let o = open_segment(seg, i + 1 == n, &mut opened, true)?;
            next += o.records;
            segments_opened.push(o);
        }
        opened.records = next - segments.first().map_or(0, |s| s.first);
        if segments.is_empty() {
            segments.push(new_segment(dir, 0)?);
        }
        let last = segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let mut f = OpenOptions::new().write(true).open(&last).map_err(io(&last))?;
        f.seek(SeekFrom::End(0)).map_err(io(&last))?;
        Ok(Log {
            dir: dir.to_owned(),
            opts,
            segments,
            out: BufWriter::new(f),
            next,
            opened,
            segments_opened,
            buf: Vec::new(),
        })
    }

    /// What opening found of each segment, oldest first (taken: later calls return nothing).
    pub fn segments_opened(&mut self) -> Vec<SegmentOpened> {
        std::mem::take(&mut self.segments_opened)
    }

    /// Whether the newest segment is full: the next [`Log::append`] starts a new one. An owner that keeps index
    /// files calls [`Log::seal`] first.
    pub fn is_full(&self) -> bool {
        self.segments.last().is_some_and(|s| s.bytes >= self.opts.segment_bytes)
    }

    /// Seals the newest segment: writes its index file with the owner's `extra` (after its data is on disk), then
    /// starts a new segment ([`Log::roll`], which deletes the oldest beyond the byte bound with their index files).
    /// A segment that holds no record gets no index file (and no new segment follows it).
    pub fn seal(&mut self, extra: &[u8]) -> Result<(), LogError> {
        let first = self.segments.last().map_or(0, |s| s.first);
        self.write_index(first, extra)?;
        self.roll()
    }

    /// Writes the index file of the segment whose first record is `first` (its data synced first), with the owner's
    /// `extra`: for the newest on a clean close ([`Log::seal`] for the others), or for a segment whose index file
    /// was missing or unusable at opening. Nothing for a segment that holds no record, or none of that index.
    pub fn write_index(&mut self, first: u64, extra: &[u8]) -> Result<(), LogError> {
        let newest = self.segments.last().is_some_and(|s| s.first == first);
        let Some(k) = self.segments.iter().position(|s| s.first == first) else { return Ok(()) };
        let end = self.segments.get(k + 1).map_or(self.next, |s| s.first);
        let seg = &self.segments[k];
        let Some((last_at, last_header)) = seg.last else { return Ok(()) };
        if newest {
            self.out.flush().map_err(io(&seg.path))?;
            self.out.get_ref().sync_data().map_err(io(&seg.path))?;
        } else {
            File::open(&seg.path).and_then(|f| f.sync_data()).map_err(io(&seg.path))?;
        }
        let ix = IndexFile {
            first,
            records: end - first,
            bytes: seg.bytes,
            last_at,
            last_header,
            marks: seg.marks.clone(),
            extra: extra.to_vec(),
        };
        let path = index_path(&seg.path);
        let tmp = seg.path.with_extension("idx.tmp");
        write_atomically(&path, &tmp, &ix.encode()).map_err(io(&path))
    }

    /// What opening found.
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// The index the next record gets.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// The index of the newest segment's first record.
    pub fn segment_first(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.first)
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
        if (self.next - seg.first).is_multiple_of(MARK_EVERY) {
            seg.marks.push(seg.bytes);
        }
        seg.last = Some((seg.bytes, self.buf[..HEADER].try_into().unwrap_or_default()));
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

    /// Deletes the oldest segment, then its index file (a crash between the two leaves an index file without its
    /// segment, which opening deletes).
    fn drop_oldest(&mut self) -> Result<(), LogError> {
        let old = self.segments.remove(0);
        fs::remove_file(&old.path).map_err(io(&old.path))?;
        remove_if_there(&index_path(&old.path))
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
        let mut out = Vec::new();
        self.for_each(from, u64::MAX, |i, rec| {
            out.push((i, rec.to_vec()));
            std::ops::ControlFlow::Continue(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each record from index `from` to index `to` (both included; flushed first), oldest first,
    /// until it breaks. Reads start at the segment's nearest indexed record at or before `from` and stop at the
    /// nearest one after `to`, so a read of a few records near the end of a large log reads little of it.
    pub fn for_each(
        &mut self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> std::ops::ControlFlow<()>,
    ) -> Result<(), LogError> {
        self.flush()?;
        let to = to.min(self.next.saturating_sub(1));
        if self.next == 0 || from > to {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            let end = self.segments.get(i + 1).map_or(self.next, |s| s.first);
            if end <= from || seg.first > to {
                continue;
            }
            let (mut idx, start) = seg.mark_at_or_before(from);
            let stop = seg.mark_after(to);
            bytes.clear();
            let read = |bytes: &mut Vec<u8>| -> std::io::Result<()> {
                let mut file = File::open(&seg.path)?;
                file.seek(SeekFrom::Start(start))?;
                match stop {
                    Some(stop) => file.take(stop - start).read_to_end(bytes),
                    None => file.read_to_end(bytes),
                }
                .map(|_| ())
            };
            read(&mut bytes).map_err(io(&seg.path))?;
            let s = scan_records(&bytes, 0);
            if let Some(why) = s.bad {
                return Err(LogError::Corrupt { path: seg.path.clone(), offset: start + s.valid as u64, why });
            }
            for (at, len) in s.records {
                if idx > to {
                    return Ok(());
                }
                if idx >= from && f(idx, &bytes[at..at + len]).is_break() {
                    return Ok(());
                }
                idx += 1;
            }
        }
        Ok(())
    }
}

fn new_segment(dir: &Path, first: u64) -> Result<Segment, LogError> {
    let path = dir.join(segment_name(first));
    // An index file of that name describes another segment (of a log started afresh).
    remove_if_there(&index_path(&path))?;
    let mut f = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
    f.write_all(MAGIC).map_err(io(&path))?;
    f.sync_all().map_err(io(&path))?;
    Ok(Segment { first, path, bytes: MAGIC.len() as u64, marks: Vec::new(), last: None })
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
        assert_eq!(log.opened(), &Opened { truncated: None, records: 2, scanned: 2 });
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

    #[test]
    fn a_read_from_the_middle_starts_near_it_across_segments_reopening_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 4000, max_bytes: u64::MAX };
        let mut log = Log::open(dir.path(), opts).unwrap();
        let rec = |i: u64| format!("record {i:05}").into_bytes();
        for i in 0..3000 {
            assert_eq!(log.append(&rec(i)).unwrap(), i);
        }
        let check = |log: &mut Log, from: u64, to: u64, last: u64| {
            let mut got = Vec::new();
            log.for_each(from, to, |i, b| {
                got.push((i, b.to_vec()));
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
            let want: Vec<(u64, Vec<u8>)> = (from..=to.min(last)).map(|i| (i, rec(i))).collect();
            assert_eq!(got, want, "{from}..={to}");
        };
        assert!(log.segments.len() > 5, "{} segments", log.segments.len());
        for (from, to) in [(0, 0), (255, 257), (1234, 1300), (2999, 2999), (1000, u64::MAX), (700, 2999)] {
            check(&mut log, from, to, 2999);
        }
        // A read that stops: nothing after.
        let mut n = 0;
        log.for_each(100, u64::MAX, |_, _| {
            n += 1;
            if n == 3 {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .unwrap();
        assert_eq!(n, 3);
        log.flush().unwrap();
        drop(log);
        // Reopened, with the newest record torn: the index is rebuilt, the cut record is gone, appends follow.
        let newest = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).max().unwrap();
        let len = fs::metadata(&newest).unwrap().len();
        OpenOptions::new().write(true).open(&newest).unwrap().set_len(len - 3).unwrap();
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert!(log.opened().truncated.is_some());
        assert_eq!(log.next_index(), 2999);
        for (from, to) in [(1234, 1300), (2990, u64::MAX), (0, 10)] {
            check(&mut log, from, to, 2998);
        }
        for i in 2999..3600 {
            log.append(&rec(i)).unwrap();
        }
        for (from, to) in [(2990, 3010), (3300, u64::MAX), (2500, 3599)] {
            check(&mut log, from, to, 3599);
        }
    }

    #[test]
    fn an_index_file_round_trips_and_any_flipped_bit_or_cut_is_refused() {
        let ix = IndexFile {
            first: 512,
            records: 300,
            bytes: 5_000,
            last_at: 4_980,
            last_header: [12, 0, 0, 0, 1, 2, 3, 4],
            marks: vec![8, 2_100],
            extra: b"owner".to_vec(),
        };
        let b = ix.encode();
        assert_eq!(IndexFile::decode(&b), Ok(ix.clone()));
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(IndexFile::decode(&c).is_err(), "bit {i} flipped");
        }
        for n in 0..b.len() {
            assert!(IndexFile::decode(&b[..n]).is_err(), "cut at {n}");
        }
        // Checksummed but inconsistent: refused with the reason.
        let bad = IndexFile { marks: vec![8], ..ix.clone() };
        assert!(IndexFile::decode(&bad.encode()).unwrap_err().contains("mark"));
        let bad = IndexFile { bytes: 4_999, ..ix };
        assert!(IndexFile::decode(&bad.encode()).unwrap_err().contains("whole records"));
    }

    #[test]
    fn a_sealed_segment_with_an_index_file_is_not_read_at_opening() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 1_000, max_bytes: u64::MAX };
        let mut log = Log::open(dir.path(), opts).unwrap();
        let rec = |i: u64| format!("record {i:05}").into_bytes();
        for i in 0..300 {
            if log.is_full() {
                log.seal(format!("extra {}", log.segment_first()).as_bytes()).unwrap();
            }
            log.append(&rec(i)).unwrap();
        }
        let newest = log.segment_first();
        assert!(newest > 0);
        drop(log);
        // An index file left by a segment deleted, and a half-written one: both go.
        fs::write(dir.path().join("00000000000000099999.idx"), b"stale").unwrap();
        fs::write(dir.path().join(segment_name(newest)).with_extension("idx.tmp"), b"half").unwrap();
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert_eq!(log.opened().scanned, 300 - newest, "only the newest segment's records");
        let segs = log.segments_opened();
        for s in &segs[..segs.len() - 1] {
            let extra = format!("extra {}", s.first).into_bytes();
            assert_eq!(s.index, IndexState::Loaded { records: s.records, extra }, "{}", s.first);
        }
        assert_eq!(segs.last().unwrap().index, IndexState::Missing);
        let names: Vec<String> =
            fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| n.ends_with(".log") || n.ends_with(".idx")), "{names:?}");
        assert_eq!(names.len(), 2 * segs.len() - 1, "{names:?}");
        // Reads through the loaded sparse index, and appends after, as before.
        assert_eq!(log.read_from(0).unwrap().len(), 300);
        for (i, r) in log.read_from(0).unwrap() {
            assert_eq!(r, rec(i));
        }
        // The newest's index file on a clean close: nothing read at the next opening; appends after it are read.
        log.write_index(newest, b"closed").unwrap();
        drop(log);
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert_eq!(log.opened().scanned, 0);
        log.append(&rec(300)).unwrap();
        drop(log);
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert_eq!((log.opened().scanned, log.opened().records), (1, 301));
        assert_eq!(
            log.read_from(295).unwrap().into_iter().map(|(i, _)| i).collect::<Vec<_>>(),
            (295..301).collect::<Vec<_>>()
        );
        // A log started afresh where a segment's index file was left: not taken for the new segment's.
        for p in fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()) {
            if p.extension().is_some_and(|x| x == "log") {
                fs::remove_file(p).unwrap();
            }
        }
        drop(log);
        let mut log = Log::open(dir.path(), opts).unwrap();
        assert_eq!(log.opened().records, 0);
        log.append(b"fresh").unwrap();
        assert_eq!(log.read_from(0).unwrap(), vec![(0, b"fresh".to_vec())]);
    }

    #[test]
    fn an_index_file_that_miscounts_its_records_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let opts = LogOptions { segment_bytes: 1_000, max_bytes: u64::MAX };
        let mut log = Log::open(dir.path(), opts).unwrap();
        for i in 0..100u64 {
            if log.is_full() {
                log.seal(b"").unwrap();
            }
            log.append(&i.to_le_bytes()).unwrap();
        }
        drop(log);
        // Whole and checksummed, consistent in itself, but one record short.
        let idx = dir.path().join("00000000000000000000.idx");
        let mut ix = IndexFile::decode(&fs::read(&idx).unwrap()).unwrap();
        ix.records -= 1;
        fs::write(&idx, ix.encode()).unwrap();
        let mut log = Log::open(dir.path(), opts).unwrap();
        let first = log.segments_opened().remove(0);
        assert!(matches!(&first.index, IndexState::Unusable(why) if why.contains("next segment")), "{first:?}");
        assert_eq!(first.records, ix.records + 1);
        let got: Vec<u64> =
            log.read_from(0).unwrap().iter().map(|(_, b)| u64::from_le_bytes(b[..].try_into().unwrap())).collect();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }
}
