//! A replica's state on disk (`kecho registry --data DIR`): one append-only file of checksummed records, synced
//! before the replica sends what depends on them, and rewritten whole when the log is compacted.
//!
//! Record: `u32 length (LE) | u32 CRC-32 of the rest | u8 kind | body`. Kinds: 1 term and vote (`u64`, `u64`, vote
//! `u64::MAX` for none), 2 snapshot (see `wire::put_snapshot`), 3 truncate (`u64`: entries from this index on are
//! dropped), 4 entry (`u64` index, then the entry as in an append). A torn or damaged record at the end (a crash in
//! the middle of a write) ends the file: it and whatever follows are dropped when the file is read.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use bytes::{BufMut, BytesMut};

use crate::raft::{Changes, Persistent, ReplicaId};
use crate::wire::{get_entry, get_snapshot, put_entry, put_snapshot, u64_, u8_};

const HARD: u8 = 1;
const SNAPSHOT: u8 = 2;
const TRUNCATE: u8 = 3;
const ENTRY: u8 = 4;
const FILE: &str = "raft.log";

/// The file of one replica's state.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    file: File,
}

impl Store {
    /// Opens (creating it if needed) the state in `dir` and reads it back.
    pub fn open(dir: &Path) -> io::Result<(Store, Persistent)> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let mut bytes = Vec::new();
        if let Ok(mut f) = File::open(&path) {
            f.read_to_end(&mut bytes)?;
        }
        let (p, good) = replay(&bytes);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        if good < bytes.len() {
            tracing::warn!(path = %path.display(), "dropping {} damaged bytes at the end of the replica state", bytes.len() - good);
            file.set_len(good as u64)?;
        }
        Ok((Store { dir: dir.to_owned(), file }, p))
    }

    /// Writes `c` and syncs. A new snapshot rewrites the file (a new file renamed over the old one).
    pub fn write(&mut self, c: &Changes, whole: &Persistent) -> io::Result<()> {
        if c.snapshot.is_some() {
            return self.rewrite(whole);
        }
        let mut out = BytesMut::new();
        if let Some((term, vote)) = c.hard {
            record(&mut out, HARD, |b| {
                b.put_u64_le(term);
                b.put_u64_le(vote.map_or(u64::MAX, |v| v as u64));
            });
        }
        if let Some(from) = c.truncate_from {
            record(&mut out, TRUNCATE, |b| b.put_u64_le(from));
            for (i, e) in &c.entries {
                record(&mut out, ENTRY, |b| {
                    b.put_u64_le(*i);
                    put_entry(b, e);
                });
            }
        }
        self.file.write_all(&out)?;
        self.file.sync_data()
    }

    fn rewrite(&mut self, p: &Persistent) -> io::Result<()> {
        let mut out = BytesMut::new();
        record(&mut out, SNAPSHOT, |b| put_snapshot(b, &p.snap));
        record(&mut out, HARD, |b| {
            b.put_u64_le(p.term);
            b.put_u64_le(p.voted_for.map_or(u64::MAX, |v| v as u64));
        });
        for (k, e) in p.log.iter().enumerate() {
            record(&mut out, ENTRY, |b| {
                b.put_u64_le(p.snap.index + 1 + k as u64);
                put_entry(b, e);
            });
        }
        let tmp = self.dir.join(format!("{FILE}.new"));
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        fs::rename(&tmp, self.dir.join(FILE))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.file = OpenOptions::new().append(true).open(self.dir.join(FILE))?;
        Ok(())
    }
}

fn record(out: &mut BytesMut, kind: u8, body: impl FnOnce(&mut BytesMut)) {
    let mut b = BytesMut::new();
    b.put_u8(kind);
    body(&mut b);
    out.put_u32_le(b.len() as u32);
    out.put_u32_le(crc32fast::hash(&b));
    out.put_slice(&b);
}

/// The state the records in `bytes` describe, and how many bytes of whole, intact records there were.
fn replay(bytes: &[u8]) -> (Persistent, usize) {
    let mut p = Persistent::default();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len = u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        let Some(body) = bytes.get(at + 8..at + 8 + len) else { break };
        if len == 0 || crc32fast::hash(body) != crc || apply(&mut p, body).is_none() {
            break;
        }
        at += 8 + len;
    }
    (p, at)
}

fn apply(p: &mut Persistent, body: &[u8]) -> Option<()> {
    let mut b = BytesMut::from(body);
    match u8_(&mut b).ok()? {
        HARD => {
            p.term = u64_(&mut b).ok()?;
            let vote = u64_(&mut b).ok()?;
            p.voted_for = (vote != u64::MAX).then_some(vote as ReplicaId);
        }
        SNAPSHOT => {
            // Snapshots open a rewritten file: nothing before them survives.
            p.snap = get_snapshot(&mut b).ok()?;
            p.log.clear();
        }
        TRUNCATE => {
            let from = u64_(&mut b).ok()?;
            let keep = from.saturating_sub(p.snap.index + 1) as usize;
            p.log.truncate(keep);
        }
        ENTRY => {
            let index = u64_(&mut b).ok()?;
            let e = get_entry(&mut b).ok()?;
            if index <= p.snap.index {
                return Some(());
            }
            let pos = (index - p.snap.index - 1) as usize;
            if pos > p.log.len() {
                return None;
            }
            p.log.truncate(pos);
            p.log.push(e);
        }
        _ => return None,
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{Command, Entry, Snapshot};

    fn entry(term: u64) -> Entry {
        Entry { term, stamp: term * 10, cmd: Command::Noop }
    }

    #[test]
    fn written_state_reads_back_and_a_torn_tail_is_dropped() {
        let dir = std::env::temp_dir().join(format!("kecho-store-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (mut s, p) = Store::open(&dir).expect("open");
        assert_eq!(p, Persistent::default());
        let mut want = Persistent { term: 3, voted_for: Some(1), ..Default::default() };
        want.log = vec![entry(1), entry(2), entry(3)];
        let c = Changes {
            hard: Some((3, Some(1))),
            truncate_from: Some(1),
            entries: want.log.iter().enumerate().map(|(i, e)| (i as u64 + 1, e.clone())).collect(),
            ..Default::default()
        };
        s.write(&c, &want).expect("write");
        // A conflicting suffix replaces the entry at 3.
        want.log[2] = entry(4);
        s.write(&Changes { truncate_from: Some(3), entries: vec![(3, entry(4))], ..Default::default() }, &want)
            .expect("write");
        drop(s);
        let (s, p) = Store::open(&dir).expect("reopen");
        assert_eq!(p, want);
        drop(s);
        // A snapshot rewrites the file; then a torn record at the end is ignored.
        let (mut s, _) = Store::open(&dir).expect("reopen");
        want.snap = Snapshot { index: 2, term: 2, stamp: 20, claims: vec![] };
        want.log = vec![entry(4)];
        s.write(&Changes { snapshot: Some(want.snap.clone()), ..Default::default() }, &want).expect("snapshot");
        drop(s);
        let path = dir.join(FILE);
        let mut f = OpenOptions::new().append(true).open(&path).expect("file");
        f.write_all(&[9, 0, 0, 0, 1, 2]).expect("torn");
        drop(f);
        let (_s, p) = Store::open(&dir).expect("reopen after a torn write");
        assert_eq!(p, want);
        let _ = fs::remove_dir_all(&dir);
    }
}
