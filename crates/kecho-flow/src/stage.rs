//! Chunks, the buffer pool and the transforms.
//!
//! A [`Chunk`] is one pooled buffer and the list of its byte ranges that carry data, in order. Transforms that can
//! work in place do (decryption leaves each plaintext where its ciphertext was and only edits the range list, so
//! the sink writes the records with one vectored call and no compaction copy); the others write into a second
//! pooled buffer. Every byte a transform copies in user space is counted.
//!
//! A stage has a sequential part (`&mut self`: framing, numbering, running state) and, when it is stateless, a
//! parallel part ([`Parallel`], `&self`) that the scheduler may run on several cores for different chunks.

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::record::{self, Deframer, Key, Opener, RecordError, Scan, Sealer};
use crate::spec::{Codec, TransformSpec};
use crate::FlowError;

/// Buffers reused across chunks, so that the steady state allocates nothing.
#[derive(Debug)]
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// A chunk's range and record lists, reused like its buffer: a 1 MiB chunk of 64 B records holds about 16 000
    /// of each, and growing fresh lists for every chunk cost more than the buffer's read.
    lists: Mutex<Vec<Lists>>,
    size: usize,
}

/// A chunk's lists, kept with their capacity.
type Lists = (Vec<Range<usize>>, Vec<record::RecordRef>);

impl Pool {
    /// A pool of buffers of at least `size` bytes of capacity.
    pub fn new(size: usize) -> Arc<Self> {
        Arc::new(Pool { free: Mutex::new(Vec::new()), lists: Mutex::new(Vec::new()), size })
    }

    /// An empty buffer with at least `want` bytes of capacity, and not more than twice that: a source reads into
    /// the whole capacity, so a buffer grown elsewhere (a transform's larger output) would make its reads, and the
    /// flow's chunks, larger than asked.
    pub fn get(&self, want: usize) -> Vec<u8> {
        let want = want.max(self.size);
        let mut v = self.free.lock().pop().unwrap_or_default();
        v.clear();
        if v.capacity() > 2 * want {
            v.shrink_to(want);
        }
        v.reserve(want);
        v
    }

    /// Returns a buffer.
    pub fn put(&self, v: Vec<u8>) {
        let mut free = self.free.lock();
        if free.len() < 64 && v.capacity() >= self.size {
            free.push(v);
        }
    }

    /// Empty range and record lists (with the capacity an earlier chunk left them).
    fn get_lists(&self) -> Lists {
        self.lists.lock().pop().unwrap_or_default()
    }

    /// Returns a chunk's lists.
    fn put_lists(&self, (mut segs, mut records): Lists) {
        segs.clear();
        records.clear();
        let mut lists = self.lists.lock();
        if lists.len() < 64 {
            lists.push((segs, records));
        }
    }
}

/// One unit of work: a buffer and its data ranges.
#[derive(Debug)]
pub struct Chunk {
    /// Sequence number in the flow (input order).
    pub seq: u64,
    /// The bytes.
    pub buf: Vec<u8>,
    /// Ranges of `buf` that carry the data, in order.
    pub segs: Vec<Range<usize>>,
    /// Records framed by a decrypt stage's sequential part for its parallel part.
    pub records: Vec<record::RecordRef>,
    /// First record index and plaintext offset (encrypt).
    pub first: (u64, u64),
    /// The encrypted stream's header, to go in front of this chunk's records.
    pub header: Option<[u8; record::HEADER_LEN]>,
    /// A fault found while transforming: the ranges before it are good and are still delivered.
    pub error: Option<FlowError>,
    /// Processing of stage `done` and before is complete (the parallel part ran).
    pub done: usize,
    /// The reading thread's clocks at the end of the source's work on this chunk: the first stage, which runs on
    /// that thread, starts its timing from them (framing and the carried partial record included) instead of
    /// reading the thread's CPU clock again.
    pub(crate) started: Option<crate::stats::Timing>,
    pool: Option<Arc<Pool>>,
}

impl Chunk {
    /// A chunk around a pooled buffer, all of whose bytes are data.
    pub fn new(seq: u64, buf: Vec<u8>, pool: Option<Arc<Pool>>) -> Self {
        let (mut segs, records) = pool.as_ref().map(|p| p.get_lists()).unwrap_or_default();
        if !buf.is_empty() {
            segs.push(0..buf.len());
        }
        Chunk { seq, buf, segs, records, first: (0, 0), header: None, error: None, done: 0, started: None, pool }
    }

    /// Data bytes.
    pub fn len(&self) -> usize {
        self.segs.iter().map(|r| r.len()).sum()
    }

    /// True when no data.
    pub fn is_empty(&self) -> bool {
        self.segs.iter().all(|r| r.is_empty())
    }

    /// A fresh buffer from the same pool.
    pub fn spare(&self, want: usize) -> Vec<u8> {
        match &self.pool {
            Some(p) => p.get(want),
            None => Vec::with_capacity(want),
        }
    }

    /// Replaces the buffer (the old one goes back to the pool) with `buf`, all data.
    pub fn replace(&mut self, buf: Vec<u8>) {
        let old = std::mem::replace(&mut self.buf, buf);
        self.segs.clear();
        if !self.buf.is_empty() {
            self.segs.push(0..self.buf.len());
        }
        if let Some(p) = &self.pool {
            p.put(old);
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        if let Some(p) = &self.pool {
            p.put(std::mem::take(&mut self.buf));
            p.put_lists((std::mem::take(&mut self.segs), std::mem::take(&mut self.records)));
        }
    }
}

/// Counters a stage's parallel part updates (shared by replicas).
#[derive(Debug, Default)]
pub struct Work {
    /// Bytes copied in user space.
    pub copied: AtomicU64,
}

/// The stateless part of a stage, run on any core for any chunk.
pub trait Parallel: Send + Sync + std::fmt::Debug {
    /// Transforms `chunk` (already prepared by the sequential part).
    fn run(&self, chunk: &mut Chunk, work: &Work);
}

/// A transform.
pub trait Stage: Send + std::fmt::Debug {
    /// Name shown in stats.
    fn name(&self) -> String;
    /// When this is the first stage: how many bytes at the start of `buf` it can take now (the rest waits for more
    /// input). The default takes everything.
    fn frame(&mut self, buf: &[u8]) -> Result<usize, FlowError> {
        Ok(buf.len())
    }
    /// The sequential part, in input order.
    fn sequential(&mut self, chunk: &mut Chunk, work: &Work) -> Result<(), FlowError>;
    /// The stateless part, if there is one.
    fn parallel(&self) -> Option<Arc<dyn Parallel>> {
        None
    }
    /// End of input: a last chunk to send, if any, or the error that the stream ended wrongly.
    fn finish(&mut self, seq: u64, pool: &Arc<Pool>) -> Result<Option<Chunk>, FlowError>;
    /// A result to show once the flow ends (a checksum).
    fn summary(&self) -> Option<String> {
        None
    }
}

/// Builds the stage of a transform spec (reads key and module files).
pub fn build(t: &TransformSpec) -> Result<Box<dyn Stage>, FlowError> {
    Ok(match t {
        TransformSpec::Encrypt { key, record } => Box::new(Encrypt::new(&load_key(key)?, *record)),
        TransformSpec::Decrypt { key } => Box::new(Decrypt::new(load_key(key)?)),
        TransformSpec::Compress { codec, level } => {
            Box::new(Compress { part: Arc::new(CompressPart { codec: *codec, level: *level }) })
        }
        TransformSpec::Decompress { codec } => Box::new(Decompress::new(*codec)?),
        TransformSpec::Checksum => Box::new(Checksum { hasher: crc32fast::Hasher::new(), bytes: 0 }),
        TransformSpec::Wasm { module, fuel, memory } => Box::new(crate::wasm::WasmStage::load(module, *fuel, *memory)?),
    })
}

fn load_key(p: &Path) -> Result<Key, FlowError> {
    Key::from_file(p).map_err(|e| FlowError::Config(e.to_string()))
}

/// AES-256-GCM encryption into the record format; each range of input becomes records of at most `record` bytes.
#[derive(Debug)]
pub struct Encrypt {
    part: Arc<EncryptPart>,
    header: Option<[u8; record::HEADER_LEN]>,
    index: u64,
    offset: u64,
}

#[derive(Debug)]
struct EncryptPart {
    sealer: Sealer,
    record: usize,
}

impl Encrypt {
    /// A stage with a fresh random salt.
    pub fn new(key: &Key, record: usize) -> Self {
        let (sealer, header) = Sealer::random(key);
        Encrypt { part: Arc::new(EncryptPart { sealer, record }), header: Some(header), index: 0, offset: 0 }
    }
}

impl Stage for Encrypt {
    fn name(&self) -> String {
        "encrypt aes-256-gcm".into()
    }
    fn sequential(&mut self, chunk: &mut Chunk, _: &Work) -> Result<(), FlowError> {
        // Number the records this chunk will hold, so that any core can seal them.
        chunk.first = (self.index, self.offset);
        for r in &chunk.segs {
            self.index += r.len().div_ceil(self.part.record) as u64;
            self.offset += r.len() as u64;
        }
        // The header travels in front of the first chunk's records.
        chunk.header = self.header.take();
        Ok(())
    }
    fn parallel(&self) -> Option<Arc<dyn Parallel>> {
        Some(self.part.clone())
    }
    fn finish(&mut self, seq: u64, pool: &Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        let mut out = pool.get(64);
        if let Some(h) = self.header.take() {
            out.extend_from_slice(&h);
        }
        self.part.sealer.seal(self.index, self.offset, &[], true, &mut out);
        let mut c = Chunk::new(seq, out, Some(pool.clone()));
        c.done = usize::MAX;
        Ok(Some(c))
    }
}

impl Parallel for EncryptPart {
    fn run(&self, chunk: &mut Chunk, work: &Work) {
        let (mut index, mut offset) = chunk.first;
        let n = chunk.len();
        let records = n.div_ceil(self.record).max(1);
        let mut out = chunk.spare(n + records * (record::WORD_LEN + record::TAG_LEN) + record::HEADER_LEN);
        if let Some(h) = chunk.header.take() {
            out.extend_from_slice(&h);
        }
        for r in &chunk.segs {
            for piece in chunk.buf[r.clone()].chunks(self.record) {
                self.sealer.seal(index, offset, piece, false, &mut out);
                index += 1;
                offset += piece.len() as u64;
            }
        }
        work.copied.fetch_add(n as u64, Ordering::Relaxed);
        chunk.records.clear();
        chunk.replace(out);
    }
}

/// AES-256-GCM decryption of the record format, in place.
#[derive(Debug)]
pub struct Decrypt {
    key: Key,
    deframer: Deframer,
    scan: Scan,
    part: Arc<DecryptPart>,
    carry: Vec<u8>,
}

#[derive(Debug, Default)]
struct DecryptPart {
    opener: std::sync::OnceLock<Opener>,
}

impl Decrypt {
    /// A stage for one stream.
    pub fn new(key: Key) -> Self {
        Decrypt { key, deframer: Deframer::new(), scan: Scan::default(), part: Arc::default(), carry: Vec::new() }
    }

    fn take_header(&mut self) -> Result<(), FlowError> {
        if let Some(h) = self.scan.header.take() {
            let opener = Opener::new(&self.key, &h)?;
            let _ = self.part.opener.set(opener);
        }
        Ok(())
    }
}

impl Stage for Decrypt {
    fn name(&self) -> String {
        "decrypt aes-256-gcm".into()
    }
    fn frame(&mut self, buf: &[u8]) -> Result<usize, FlowError> {
        // As the first stage, the source hands over whole records only: no carry, no copy.
        self.deframer.scan(buf, &mut self.scan)?;
        self.take_header()?;
        Ok(self.scan.consumed)
    }
    fn sequential(&mut self, chunk: &mut Chunk, work: &Work) -> Result<(), FlowError> {
        if !self.scan.records.is_empty() || self.scan.consumed > 0 {
            // Framed by `frame` on exactly this buffer. Swapped, not taken: the deframer fills the chunk's
            // recycled (empty) list next time rather than growing a new one.
            std::mem::swap(&mut chunk.records, &mut self.scan.records);
            self.scan.records.clear();
            self.scan.consumed = 0;
            return Ok(());
        }
        // Not first: records may straddle chunks; gather the data behind any carried bytes.
        let mut buf = chunk.spare(self.carry.len() + chunk.len());
        buf.extend_from_slice(&self.carry);
        for r in &chunk.segs {
            buf.extend_from_slice(&chunk.buf[r.clone()]);
        }
        work.copied.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.deframer.scan(&buf, &mut self.scan)?;
        self.take_header()?;
        self.carry.clear();
        self.carry.extend_from_slice(&buf[self.scan.consumed..]);
        buf.truncate(self.scan.consumed);
        chunk.replace(buf);
        std::mem::swap(&mut chunk.records, &mut self.scan.records);
        self.scan.records.clear();
        self.scan.consumed = 0;
        Ok(())
    }
    fn parallel(&self) -> Option<Arc<dyn Parallel>> {
        Some(self.part.clone())
    }
    fn finish(&mut self, _: u64, _: &Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        self.deframer.finish(self.carry.len())?;
        Ok(None)
    }
}

impl Parallel for DecryptPart {
    fn run(&self, chunk: &mut Chunk, _: &Work) {
        chunk.segs.clear();
        let Some(opener) = self.opener.get() else {
            if !chunk.records.is_empty() {
                chunk.error = Some(RecordError::BadHeader.into());
            }
            return;
        };
        let records = std::mem::take(&mut chunk.records);
        for r in &records {
            match opener.open(r, &mut chunk.buf) {
                Ok(range) => {
                    if !range.is_empty() {
                        chunk.segs.push(range);
                    }
                }
                Err(e) => {
                    // The records before this one are authentic and are delivered; nothing of this one is.
                    chunk.error = Some(e.into());
                    break;
                }
            }
        }
        chunk.records = records;
        chunk.records.clear();
    }
}

/// Compression: each chunk becomes one independent frame, so chunks compress on any core.
#[derive(Debug)]
pub struct Compress {
    part: Arc<CompressPart>,
}

#[derive(Debug)]
struct CompressPart {
    codec: Codec,
    level: i32,
}

impl Stage for Compress {
    fn name(&self) -> String {
        format!("compress {:?}", self.part.codec).to_lowercase()
    }
    fn sequential(&mut self, _: &mut Chunk, _: &Work) -> Result<(), FlowError> {
        Ok(())
    }
    fn parallel(&self) -> Option<Arc<dyn Parallel>> {
        Some(self.part.clone())
    }
    fn finish(&mut self, _: u64, _: &Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        Ok(None)
    }
}

impl Parallel for CompressPart {
    fn run(&self, chunk: &mut Chunk, _: &Work) {
        let n = chunk.len();
        if n == 0 {
            return;
        }
        let mut input = chunk.spare(n);
        for r in &chunk.segs {
            input.extend_from_slice(&chunk.buf[r.clone()]);
        }
        let result = match self.codec {
            Codec::Zstd => {
                let mut out = chunk.spare(zstd::zstd_safe::compress_bound(n));
                zstd::bulk::Compressor::new(self.level)
                    .and_then(|mut c| c.compress_to_buffer(&input, &mut out))
                    .map(|_| out)
            }
            Codec::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(chunk.spare(n / 2 + 64));
                std::io::Write::write_all(&mut enc, &input)
                    .map_err(std::io::Error::other)
                    .and_then(|_| enc.finish().map_err(std::io::Error::other))
            }
        };
        match result {
            Ok(out) => chunk.replace(out),
            Err(e) => chunk.error = Some(FlowError::Transform(format!("compress: {e}"))),
        }
        if let Some(p) = &chunk.pool {
            p.put(input);
        }
    }
}

/// Decompression of concatenated frames (stateful: a frame may straddle chunks).
pub struct Decompress {
    codec: Codec,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
    carry: Vec<u8>,
}

impl std::fmt::Debug for Decompress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompress").field("codec", &self.codec).finish()
    }
}

impl Decompress {
    fn new(codec: Codec) -> Result<Self, FlowError> {
        let zstd = match codec {
            Codec::Zstd => {
                Some(zstd::stream::raw::Decoder::new().map_err(|e| FlowError::Transform(format!("zstd: {e}")))?)
            }
            Codec::Lz4 => None,
        };
        Ok(Decompress { codec, zstd, carry: Vec::new() })
    }
}

impl Stage for Decompress {
    fn name(&self) -> String {
        format!("decompress {:?}", self.codec).to_lowercase()
    }
    fn sequential(&mut self, chunk: &mut Chunk, work: &Work) -> Result<(), FlowError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut out = chunk.spare(chunk.len() * 4);
        match self.codec {
            Codec::Zstd => {
                let dec = self.zstd.as_mut().ok_or_else(|| FlowError::Transform("zstd decoder missing".into()))?;
                for r in &chunk.segs {
                    let mut input = InBuffer::around(&chunk.buf[r.clone()]);
                    loop {
                        if out.capacity() - out.len() < 64 << 10 {
                            out.reserve(out.capacity().max(128 << 10));
                        }
                        let pos = out.len();
                        let mut o = OutBuffer::around_pos(&mut out, pos);
                        dec.run(&mut input, &mut o).map_err(|e| FlowError::Transform(format!("zstd: {e}")))?;
                        let filled = out.len() == out.capacity();
                        if input.pos() == r.len() && !filled {
                            break;
                        }
                    }
                }
            }
            Codec::Lz4 => {
                for r in &chunk.segs {
                    self.carry.extend_from_slice(&chunk.buf[r.clone()]);
                }
                work.copied.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                let mut at = 0;
                while let Some(len) = lz4_frame_len(&self.carry[at..])? {
                    let mut dec = lz4_flex::frame::FrameDecoder::new(&self.carry[at..at + len]);
                    std::io::Read::read_to_end(&mut dec, &mut out)
                        .map_err(|e| FlowError::Transform(format!("lz4: {e}")))?;
                    at += len;
                }
                self.carry.drain(..at);
            }
        }
        chunk.replace(out);
        Ok(())
    }
    fn finish(&mut self, _: u64, _: &Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        if !self.carry.is_empty() {
            return Err(FlowError::Transform(format!(
                "{} bytes of an incomplete lz4 frame at end of input",
                self.carry.len()
            )));
        }
        Ok(None)
    }
}

/// The length of the LZ4 frame at the start of `b`, once it is all there (LZ4 frame format 1.6.x).
fn lz4_frame_len(b: &[u8]) -> Result<Option<usize>, FlowError> {
    const MAGIC: u32 = 0x184D_2204;
    if b.len() < 7 {
        return Ok(None);
    }
    let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if (0x184D_2A50..=0x184D_2A5F).contains(&magic) {
        // A skippable frame.
        let n = u32::from_le_bytes([b[4], b[5], b[6], b.get(7).copied().unwrap_or(0)]) as usize;
        return Ok((b.len() >= 8 + n).then_some(8 + n));
    }
    if magic != MAGIC {
        return Err(FlowError::Transform("lz4: not an LZ4 frame".into()));
    }
    let flg = b[4];
    let block_checksum = flg & 0x10 != 0;
    let content_size = flg & 0x08 != 0;
    let content_checksum = flg & 0x04 != 0;
    let dict = flg & 0x01 != 0;
    let mut at = 4 + 2 + if content_size { 8 } else { 0 } + if dict { 4 } else { 0 } + 1;
    loop {
        let Some(w) = b.get(at..at + 4) else { return Ok(None) };
        let w = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        at += 4;
        if w == 0 {
            break;
        }
        at += (w & 0x7fff_ffff) as usize + if block_checksum { 4 } else { 0 };
    }
    at += if content_checksum { 4 } else { 0 };
    Ok((b.len() >= at).then_some(at))
}

/// CRC-32 over the stream; the data passes untouched.
#[derive(Debug)]
pub struct Checksum {
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl Stage for Checksum {
    fn name(&self) -> String {
        "checksum crc32".into()
    }
    fn sequential(&mut self, chunk: &mut Chunk, _: &Work) -> Result<(), FlowError> {
        for r in &chunk.segs {
            self.hasher.update(&chunk.buf[r.clone()]);
            self.bytes += r.len() as u64;
        }
        Ok(())
    }
    fn finish(&mut self, _: u64, _: &Arc<Pool>) -> Result<Option<Chunk>, FlowError> {
        Ok(None)
    }
    fn summary(&self) -> Option<String> {
        Some(format!("crc32={:08x} over {} bytes", self.hasher.clone().finalize(), self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chunk's lists go back to the pool with its buffer, emptied, and the next chunk starts with their capacity.
    #[test]
    fn a_chunks_lists_are_reused_empty() {
        let pool = Pool::new(64);
        let mut c = Chunk::new(0, vec![1; 64], Some(pool.clone()));
        c.segs.extend((0..1000).map(|i| i..i + 1));
        c.records.extend((0..1000).map(|i| record::RecordRef {
            start: i,
            len: 1,
            index: i as u64,
            offset: 0,
            position: 0,
            word: 1,
        }));
        drop(c);
        let c = Chunk::new(1, pool.get(64), Some(pool.clone()));
        assert!(c.segs.capacity() >= 1000 && c.records.capacity() >= 1000, "the lists were not reused");
        assert!(c.records.is_empty(), "a reused record list kept records");
        assert_eq!(c.segs, Vec::<Range<usize>>::new(), "an empty buffer has no data ranges");
        let c = Chunk::new(2, vec![7; 10], Some(pool));
        assert_eq!(c.segs, vec![0..10], "a reused range list must hold exactly the new buffer's range");
    }
}
