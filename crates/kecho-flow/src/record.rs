//! The AES-256-GCM record format of encrypted flows (pure: no I/O).
//!
//! ```text
//! stream  = header record* final
//! header  = "KFLOWGCM" (8) | version u8 = 1 | 3 zero bytes | salt (32 random bytes)          -- 44 bytes
//! record  = word u32 BE | ciphertext (len bytes) | tag (16)
//! word    = len (bits 0..24, at most 16 MiB) | FINAL (bit 31); bits 24..31 are zero
//! final   = the record with FINAL set (the encrypter sends an empty one at end of stream)
//! key     = HKDF-SHA256(salt = salt, ikm = the 32-byte key, info = "kecho-flow aes-256-gcm v1"), 32 bytes
//! nonce   = 4 zero bytes | record index u64 BE (0, 1, 2, ... in stream order)
//! aad     = plaintext offset u64 BE (bytes of plaintext before this record) | word u32 BE
//! ```
//!
//! The per-stream key (from the random salt) makes nonces unique across streams that share a key file; the index
//! in the nonce and the offset and length in the additional data make a reordered, dropped, resized or corrupted
//! record fail authentication, and the FINAL record makes truncation at a record boundary detectable. Every failure
//! carries the byte offset of the record in the encrypted stream. A record is released only once its tag checks,
//! so no unauthenticated byte is ever written out.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

/// Magic bytes at the start of an encrypted stream.
pub const MAGIC: &[u8; 8] = b"KFLOWGCM";
/// Format version.
pub const VERSION: u8 = 1;
/// Length of the stream header.
pub const HEADER_LEN: usize = 44;
/// Length of a record's word.
pub const WORD_LEN: usize = 4;
/// Length of a record's tag.
pub const TAG_LEN: usize = 16;
/// Largest plaintext of one record.
pub const MAX_RECORD: usize = 1 << 24;
const FINAL: u32 = 1 << 31;
const INFO: &[u8] = b"kecho-flow aes-256-gcm v1";

/// Why an encrypted stream is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The stream does not start with a version-1 header.
    #[error("not a kecho-flow AES-256-GCM stream (bad header)")]
    BadHeader,
    /// A record's tag did not verify: corrupted, reordered, resized or encrypted with another key.
    #[error("authentication failed for record {index} at byte offset {offset}")]
    Authentication {
        /// Record index.
        index: u64,
        /// Byte offset of the record in the encrypted stream.
        offset: u64,
    },
    /// A record announces an impossible length.
    #[error("record {index} at byte offset {offset} has an invalid length word {word:#010x}")]
    BadLength {
        /// Record index.
        index: u64,
        /// Byte offset of the record.
        offset: u64,
        /// The word read.
        word: u32,
    },
    /// The stream ended before its final record.
    #[error("stream truncated at byte offset {offset} (no final record)")]
    Truncated {
        /// Where the stream ended.
        offset: u64,
    },
    /// Bytes follow the final record.
    #[error("data after the final record at byte offset {offset}")]
    TrailingData {
        /// Where they start.
        offset: u64,
    },
}

/// Why a key file is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds neither 32 raw bytes nor 64 hex digits.
    #[error("key file {path} must hold 32 raw bytes or 64 hex digits (found {len} bytes)")]
    Format {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// A 256-bit key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key from its bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Key(bytes)
    }

    /// Reads a key file: 32 raw bytes, or 64 hex digits (surrounding white space ignored).
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let p = path.display().to_string();
        let data = std::fs::read(path).map_err(|source| KeyError::Io { path: p.clone(), source })?;
        Self::parse(&data).ok_or(KeyError::Format { path: p, len: data.len() })
    }

    /// Parses key file contents.
    pub fn parse(data: &[u8]) -> Option<Self> {
        if let Ok(raw) = <[u8; 32]>::try_from(data) {
            return Some(Key(raw));
        }
        let text = std::str::from_utf8(data).ok()?.trim();
        if text.len() != 64 {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(k))
    }

    fn stream_key(&self, salt: &[u8; 32]) -> LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&self.0);
        let okm = prk.expand(&[INFO], &AES_256_GCM).expect("32 bytes is a valid HKDF-SHA256 output length");
        LessSafeKey::new(UnboundKey::from(okm))
    }
}

fn nonce(index: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&index.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

fn aad(offset: u64, word: u32) -> [u8; 12] {
    let mut a = [0u8; 12];
    a[..8].copy_from_slice(&offset.to_be_bytes());
    a[8..].copy_from_slice(&word.to_be_bytes());
    a
}

/// Encrypts records of one stream. Records are independent given their index and plaintext offset, so several
/// threads may seal different records of the same stream.
#[derive(Debug)]
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A sealer for a new stream with the given salt (32 random bytes) and the header to send first.
    pub fn new(key: &Key, salt: [u8; 32]) -> (Self, [u8; HEADER_LEN]) {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8] = VERSION;
        h[12..].copy_from_slice(&salt);
        (Sealer { key: key.stream_key(&salt) }, h)
    }

    /// A sealer with a random salt.
    pub fn random(key: &Key) -> (Self, [u8; HEADER_LEN]) {
        let mut salt = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .expect("the system random source works");
        Self::new(key, salt)
    }

    /// Appends record `index` (plaintext `data` at plaintext `offset`) to `out`. `data` is at most [`MAX_RECORD`].
    pub fn seal(&self, index: u64, offset: u64, data: &[u8], fin: bool, out: &mut Vec<u8>) {
        debug_assert!(data.len() <= MAX_RECORD);
        let word = data.len() as u32 | if fin { FINAL } else { 0 };
        out.extend_from_slice(&word.to_be_bytes());
        let start = out.len();
        out.extend_from_slice(data);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce(index), Aad::from(aad(offset, word)), &mut out[start..])
            .expect("a record below 16 MiB is within AES-GCM's limit");
        out.extend_from_slice(tag.as_ref());
    }
}

/// Decrypts records of one stream; like [`Sealer`], usable from several threads.
#[derive(Debug)]
pub struct Opener {
    key: LessSafeKey,
}

impl Opener {
    /// An opener for the stream whose header is `header`.
    pub fn new(key: &Key, header: &[u8]) -> Result<Self, RecordError> {
        if header.len() < HEADER_LEN || &header[..8] != MAGIC || header[8] != VERSION || header[9..12] != [0, 0, 0] {
            return Err(RecordError::BadHeader);
        }
        let salt: [u8; 32] = header[12..HEADER_LEN].try_into().map_err(|_| RecordError::BadHeader)?;
        Ok(Opener { key: key.stream_key(&salt) })
    }

    /// Decrypts `rec` (a whole record as framed by [`Deframer`]) in place; returns the plaintext's range in `buf`.
    pub fn open(&self, rec: &RecordRef, buf: &mut [u8]) -> Result<std::ops::Range<usize>, RecordError> {
        let body = rec.start + WORD_LEN;
        let end = body + rec.len + TAG_LEN;
        let fail = RecordError::Authentication { index: rec.index, offset: rec.position };
        let slot = buf.get_mut(body..end).ok_or(fail.clone())?;
        self.key.open_in_place(nonce(rec.index), Aad::from(aad(rec.offset, rec.word)), slot).map_err(|_| fail)?;
        Ok(body..body + rec.len)
    }
}

/// One framed record inside a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    /// Start of the record (its word) in the buffer.
    pub start: usize,
    /// Plaintext length.
    pub len: usize,
    /// Record index in the stream.
    pub index: u64,
    /// Plaintext offset.
    pub offset: u64,
    /// Byte offset of the record in the encrypted stream.
    pub position: u64,
    /// The raw word (length and FINAL flag).
    pub word: u32,
}

impl RecordRef {
    /// Bytes the record takes in the encrypted stream.
    pub fn wire_len(&self) -> usize {
        WORD_LEN + self.len + TAG_LEN
    }

    /// True for the final record.
    pub fn is_final(&self) -> bool {
        self.word & FINAL != 0
    }
}

/// Splits an encrypted byte stream into records (sequential and cheap: it reads words only). Feed it the stream's
/// bytes in order with [`Deframer::scan`]; decryption of the records it returns can then run anywhere.
#[derive(Debug, Default)]
pub struct Deframer {
    header_seen: bool,
    position: u64,
    index: u64,
    offset: u64,
    finished: bool,
}

/// The result of scanning a buffer.
#[derive(Debug, Default)]
pub struct Scan {
    /// Bytes at the start of the buffer consumed (header and whole records).
    pub consumed: usize,
    /// The stream header, when it was in this buffer.
    pub header: Option<[u8; HEADER_LEN]>,
    /// Whole records found.
    pub records: Vec<RecordRef>,
}

impl Deframer {
    /// A deframer at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Finds the header and the whole records at the start of `buf`, which continues the stream where the previous
    /// scan's consumed bytes ended. Partial records are left for the next call (with more bytes appended).
    pub fn scan(&mut self, buf: &[u8], scan: &mut Scan) -> Result<(), RecordError> {
        scan.consumed = 0;
        scan.header = None;
        scan.records.clear();
        let mut at = 0;
        if !self.header_seen {
            if buf.len() < HEADER_LEN {
                if buf.len() >= 8 && &buf[..8] != MAGIC {
                    return Err(RecordError::BadHeader);
                }
                return Ok(());
            }
            let mut h = [0u8; HEADER_LEN];
            h.copy_from_slice(&buf[..HEADER_LEN]);
            if &h[..8] != MAGIC || h[8] != VERSION || h[9..12] != [0, 0, 0] {
                return Err(RecordError::BadHeader);
            }
            scan.header = Some(h);
            self.header_seen = true;
            self.position = HEADER_LEN as u64;
            at = HEADER_LEN;
        }
        while buf.len() - at >= WORD_LEN {
            if self.finished {
                return Err(RecordError::TrailingData { offset: self.position });
            }
            let word = u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
            let len = (word & !FINAL) as usize;
            if word & 0x7f00_0000 != 0 || len > MAX_RECORD {
                return Err(RecordError::BadLength { index: self.index, offset: self.position, word });
            }
            let r = RecordRef { start: at, len, index: self.index, offset: self.offset, position: self.position, word };
            if buf.len() - at < r.wire_len() {
                break;
            }
            at += r.wire_len();
            self.position += r.wire_len() as u64;
            self.index += 1;
            self.offset += len as u64;
            self.finished = r.is_final();
            scan.records.push(r);
        }
        scan.consumed = at;
        Ok(())
    }

    /// Called at end of input with the bytes left over: the stream must have ended with its final record.
    pub fn finish(&self, leftover: usize) -> Result<(), RecordError> {
        if self.finished && leftover == 0 {
            Ok(())
        } else if self.finished {
            Err(RecordError::TrailingData { offset: self.position })
        } else if !self.header_seen {
            Err(RecordError::BadHeader)
        } else {
            Err(RecordError::Truncated { offset: self.position + leftover as u64 })
        }
    }

    /// Bytes of the stream that whole records and the header took so far.
    pub fn position(&self) -> u64 {
        self.position
    }
}

/// Encrypts a whole buffer into a stream with records of at most `record` bytes (tests, tools and benches).
pub fn seal_all(key: &Key, data: &[u8], record: usize) -> Vec<u8> {
    let (s, h) = Sealer::random(key);
    let mut out = h.to_vec();
    let mut offset = 0u64;
    let mut index = 0u64;
    for c in data.chunks(record.max(1)) {
        s.seal(index, offset, c, false, &mut out);
        index += 1;
        offset += c.len() as u64;
    }
    s.seal(index, offset, &[], true, &mut out);
    out
}

/// Decrypts a whole stream (tests and tools); the streaming path is the flow runtime's.
pub fn open_all(key: &Key, stream: &[u8]) -> Result<Vec<u8>, RecordError> {
    let mut d = Deframer::new();
    let mut scan = Scan::default();
    let mut buf = stream.to_vec();
    d.scan(&buf, &mut scan)?;
    let opener = Opener::new(key, &scan.header.ok_or(RecordError::BadHeader)?)?;
    let mut out = Vec::new();
    for r in &scan.records {
        let range = opener.open(r, &mut buf)?;
        out.extend_from_slice(&buf[range]);
    }
    d.finish(stream.len() - scan.consumed)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> Key {
        Key::new([7; 32])
    }

    #[test]
    fn key_files() {
        assert!(Key::parse(&[1u8; 32]).is_some());
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n";
        assert_eq!(Key::parse(hex.as_bytes()).unwrap().0[1], 0x11);
        assert!(Key::parse(b"short").is_none());
        assert!(Key::parse(&hex.as_bytes()[..60]).is_none());
        assert!(Key::parse("zz".repeat(32).as_bytes()).is_none());
    }

    #[test]
    fn reordered_records_fail_with_the_offset() {
        let data = vec![5u8; 300];
        let mut s = seal_all(&key(), &data, 100);
        // Records are 4 + 100 + 16 = 120 bytes after the 44-byte header; swap the first two.
        let (a, b) = (HEADER_LEN, HEADER_LEN + 120);
        let first = s[a..b].to_vec();
        s.copy_within(b..b + 120, a);
        s[b..b + 120].copy_from_slice(&first);
        assert_eq!(open_all(&key(), &s), Err(RecordError::Authentication { index: 0, offset: HEADER_LEN as u64 }));
    }

    #[test]
    fn truncation_at_a_record_boundary_is_detected() {
        let s = seal_all(&key(), &[1u8; 250], 100);
        let cut = HEADER_LEN + 2 * 120;
        assert_eq!(open_all(&key(), &s[..cut]), Err(RecordError::Truncated { offset: cut as u64 }));
        let mut longer = s.clone();
        longer.extend_from_slice(&[0; 4]);
        assert!(matches!(open_all(&key(), &longer), Err(RecordError::TrailingData { .. })));
        assert_eq!(open_all(&Key::new([8; 32]), &s), Err(RecordError::Authentication { index: 0, offset: 44 }));
        assert_eq!(
            open_all(&key(), b"KFLOWGCX plus more bytes than a header has, surely"),
            Err(RecordError::BadHeader)
        );
    }

    proptest! {
        #[test]
        fn roundtrip_in_any_split(data in proptest::collection::vec(any::<u8>(), 0..3000), record in 1usize..700,
                                  cuts in proptest::collection::vec(any::<u16>(), 0..6)) {
            let s = seal_all(&key(), &data, record);
            prop_assert_eq!(open_all(&key(), &s).unwrap(), data.clone());
            // Feed the stream in arbitrary pieces, as reads deliver it.
            let mut d = Deframer::new();
            let mut scan = Scan::default();
            let mut pending: Vec<u8> = Vec::new();
            let mut opener = None;
            let mut out = Vec::new();
            let mut points: Vec<usize> = cuts.iter().map(|c| *c as usize % (s.len() + 1)).collect();
            points.push(s.len());
            points.sort_unstable();
            let mut prev = 0;
            for p in points {
                pending.extend_from_slice(&s[prev..p]);
                prev = p;
                d.scan(&pending, &mut scan).unwrap();
                if let Some(h) = scan.header { opener = Some(Opener::new(&key(), &h).unwrap()); }
                for r in scan.records.clone() {
                    let range = opener.as_ref().unwrap().open(&r, &mut pending).unwrap();
                    out.extend_from_slice(&pending[range]);
                }
                pending.drain(..scan.consumed);
            }
            d.finish(pending.len()).unwrap();
            prop_assert_eq!(out, data);
        }

        #[test]
        fn any_flipped_byte_is_caught(data in proptest::collection::vec(any::<u8>(), 1..2000), record in 1usize..500,
                                      at in any::<usize>(), bit in 0u8..8) {
            let mut s = seal_all(&key(), &data, record);
            let at = HEADER_LEN + at % (s.len() - HEADER_LEN);
            let mut scan = Scan::default();
            Deframer::new().scan(&s, &mut scan).unwrap();
            let hit = scan.records.iter().find(|r| r.position as usize <= at && at < r.position as usize + r.wire_len()).unwrap().position;
            s[at] ^= 1 << bit;
            match open_all(&key(), &s) {
                // The failing record is exactly the one holding the flipped byte: records before it are whole.
                Err(RecordError::Authentication { offset, .. }) => prop_assert_eq!(offset, hit),
                Err(RecordError::BadLength { .. } | RecordError::Truncated { .. } | RecordError::TrailingData { .. }) => {}
                other => prop_assert!(false, "flip at {} not caught: {:?}", at, other.map(|v| v.len())),
            }
        }
    }
}
