//! The agent's bookkeeping around running tasks, pure (time passed in): what `kecho logs` replays, when a silent
//! submitter's tasks are stopped, and when a checkpoint is shipped; and the audit log of who asked for what.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::repo::Digest;
use crate::task::{OutputChunk, TaskId};

/// A task's recent output, bounded in bytes: the oldest chunks are dropped first and counted.
#[derive(Debug, Clone)]
pub struct OutputLog {
    chunks: VecDeque<OutputChunk>,
    bytes: usize,
    max_bytes: usize,
    dropped_chunks: u64,
    dropped_bytes: u64,
}

impl OutputLog {
    /// A log keeping at most `max_bytes` of output (the newest chunk is kept even if larger).
    pub fn new(max_bytes: usize) -> OutputLog {
        OutputLog { chunks: VecDeque::new(), bytes: 0, max_bytes, dropped_chunks: 0, dropped_bytes: 0 }
    }

    /// Appends a chunk, dropping the oldest ones beyond the bound.
    pub fn push(&mut self, chunk: OutputChunk) {
        self.bytes += chunk.data.len();
        self.chunks.push_back(chunk);
        while self.bytes > self.max_bytes && self.chunks.len() > 1 {
            if let Some(old) = self.chunks.pop_front() {
                self.bytes -= old.data.len();
                self.dropped_chunks += 1;
                self.dropped_bytes += old.data.len() as u64;
            }
        }
    }

    /// The chunks kept, oldest first, from sequence number `from` on (what a `kecho logs` replay sends).
    pub fn since(&self, from: u64) -> impl Iterator<Item = &OutputChunk> {
        self.chunks.iter().filter(move |c| c.seq >= from)
    }

    /// How many chunks and bytes were dropped to keep the bound.
    pub fn dropped(&self) -> (u64, u64) {
        (self.dropped_chunks, self.dropped_bytes)
    }

    /// The bytes kept.
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
}

/// Submitters' liveness as an agent sees it: a submitter that has not been heard from for `timeout` is gone, and its
/// tasks are stopped.
#[derive(Debug, Clone)]
pub struct SubmitterLeases {
    timeout: Duration,
    last_heard: BTreeMap<String, Instant>,
    tasks: BTreeMap<String, Vec<TaskId>>,
}

impl SubmitterLeases {
    /// Leases that expire after `timeout` of silence.
    pub fn new(timeout: Duration) -> SubmitterLeases {
        SubmitterLeases { timeout, last_heard: BTreeMap::new(), tasks: BTreeMap::new() }
    }

    /// A message (a heartbeat, a submission) from `submitter` arrived at `now`.
    pub fn heard(&mut self, submitter: &str, now: Instant) {
        self.last_heard.insert(submitter.to_string(), now);
    }

    /// `submitter` owns `task`.
    pub fn track(&mut self, submitter: &str, task: TaskId, now: Instant) {
        self.heard(submitter, now);
        self.tasks.entry(submitter.to_string()).or_default().push(task);
    }

    /// `task` ended; it no longer needs its submitter.
    pub fn untrack(&mut self, task: &TaskId) {
        for tasks in self.tasks.values_mut() {
            tasks.retain(|t| t != task);
        }
        self.tasks.retain(|_, t| !t.is_empty());
    }

    /// When [`SubmitterLeases::expire`] should next be called, if any task depends on a submitter.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.tasks.keys().filter_map(|s| self.last_heard.get(s)).map(|t| *t + self.timeout).min()
    }

    /// The tasks of every submitter silent for longer than the timeout at `now`, to stop; they are forgotten.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, Vec<TaskId>)> {
        let gone: Vec<String> = self
            .tasks
            .keys()
            .filter(|s| self.last_heard.get(*s).is_none_or(|t| now.saturating_duration_since(*t) > self.timeout))
            .cloned()
            .collect();
        gone.into_iter()
            .map(|s| {
                self.last_heard.remove(&s);
                let tasks = self.tasks.remove(&s).unwrap_or_default();
                (s, tasks)
            })
            .collect()
    }
}

/// When to ship a task's checkpoint: every `every`, only if it changed since the last one shipped; and always on
/// drain (the caller asks with `force`).
#[derive(Debug, Clone)]
pub struct CheckpointShipper {
    every: Duration,
    next: Instant,
    last: Option<Digest>,
}

impl CheckpointShipper {
    /// Ships at most every `every`, starting `every` after `now`.
    pub fn new(every: Duration, now: Instant) -> CheckpointShipper {
        CheckpointShipper { every, next: now + every, last: None }
    }

    /// When the next periodic look is due.
    pub fn next_due(&self) -> Instant {
        self.next
    }

    /// Whether a periodic look is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Given the checkpoint read at `now`, whether to ship it: when it differs from the last one shipped (or `force`,
    /// on drain, when it exists). Schedules the next look.
    pub fn offer(&mut self, state: Option<&[u8]>, now: Instant, force: bool) -> bool {
        self.next = now + self.every;
        let Some(state) = state else { return false };
        let digest = Digest::of(state);
        if !force && self.last == Some(digest) {
            return false;
        }
        self.last = Some(digest);
        true
    }
}

/// One line of an agent's audit log: every task, deploy and configure action, with who asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who asked (the submitter's node identity).
    pub who: String,
    /// What (`run`, `stop`, `drain`, `deploy`, `configure`, `refuse`, ...).
    pub action: String,
    /// On what (a task id, a component, an artifact digest).
    pub target: String,
    /// Details (the command line, the reason of a refusal).
    pub detail: String,
}

/// An append-only file of [`AuditEntry`]s, one JSON object per line. Each entry is written with a single `write` on
/// a file opened for appending, so concurrent writers do not interleave within a line.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: std::fs::File,
}

impl AuditLog {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path) -> std::io::Result<AuditLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog { path: path.to_path_buf(), file })
    }

    /// Appends an entry stamped with the current time, and mirrors it to the agent's log.
    pub fn record(&mut self, who: &str, action: &str, target: &str, detail: &str) -> std::io::Result<AuditEntry> {
        let at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let entry = AuditEntry {
            at_ms,
            who: who.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        };
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        tracing::info!(who, action, target, detail, "audit");
        Ok(entry)
    }

    /// Reads every entry back (for `kecho agent audit`); a line that does not parse is an error naming it.
    pub fn read_all(&self) -> std::io::Result<Vec<AuditEntry>> {
        let text = std::fs::read_to_string(&self.path)?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}:{}: {e}", self.path.display(), i + 1),
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Stream;

    fn chunk(seq: u64, len: usize) -> OutputChunk {
        OutputChunk { seq, stream: Stream::Stdout, data: vec![b'x'; len] }
    }

    #[test]
    fn the_audit_log_keeps_who_asked_for_what() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        let first = log.record("node-7f3a", "run", "task-1", "sh -c 'make test'").unwrap();
        log.record("node-9b21", "refuse", "task-2", "no exec right").unwrap();
        drop(log);
        let log = AuditLog::open(&path).unwrap();
        let entries = log.read_all().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0], first);
        assert_eq!((entries[1].who.as_str(), entries[1].action.as_str()), ("node-9b21", "refuse"));
        std::fs::write(&path, "{\"at_ms\":1}\n").unwrap();
        let err = log.read_all().unwrap_err();
        assert!(err.to_string().contains("audit.jsonl:1"), "{err}");
    }

    #[test]
    fn output_log_keeps_the_tail_and_counts_what_it_drops() {
        let mut log = OutputLog::new(100);
        for seq in 0..10 {
            log.push(chunk(seq, 30));
        }
        assert_eq!(log.since(0).map(|c| c.seq).collect::<Vec<_>>(), vec![7, 8, 9]);
        assert_eq!(log.dropped(), (7, 210));
        assert_eq!(log.len_bytes(), 90);
        assert_eq!(log.since(9).count(), 1);
        log.push(chunk(10, 500));
        assert_eq!(log.since(0).map(|c| c.seq).collect::<Vec<_>>(), vec![10], "the newest chunk is kept whole");
    }

    #[test]
    fn a_silent_submitter_loses_its_tasks() {
        let t0 = Instant::now();
        let mut leases = SubmitterLeases::new(Duration::from_secs(3));
        leases.track("alice", TaskId("a1".into()), t0);
        leases.track("bob", TaskId("b1".into()), t0);
        leases.track("bob", TaskId("b2".into()), t0);
        assert_eq!(leases.next_deadline(), Some(t0 + Duration::from_secs(3)));
        leases.heard("alice", t0 + Duration::from_secs(2));
        leases.untrack(&TaskId("b2".into()));
        assert!(leases.expire(t0 + Duration::from_secs(3)).is_empty(), "exactly at the timeout is still alive");
        let gone = leases.expire(t0 + Duration::from_millis(3001));
        assert_eq!(gone, vec![("bob".to_string(), vec![TaskId("b1".into())])]);
        assert_eq!(leases.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert_eq!(leases.expire(t0 + Duration::from_secs(6)).len(), 1);
        assert_eq!(leases.next_deadline(), None);
    }

    #[test]
    fn checkpoints_ship_when_changed_and_on_drain() {
        let t0 = Instant::now();
        let every = Duration::from_secs(5);
        let mut s = CheckpointShipper::new(every, t0);
        assert!(!s.due(t0 + Duration::from_secs(4)));
        let t1 = t0 + every;
        assert!(s.due(t1));
        assert!(!s.offer(None, t1, false), "no checkpoint yet");
        assert!(s.offer(Some(b"v1"), t1, false));
        assert_eq!(s.next_due(), t1 + every);
        assert!(!s.offer(Some(b"v1"), t1 + every, false), "unchanged");
        assert!(s.offer(Some(b"v1"), t1 + every, true), "drain ships it anyway");
        assert!(s.offer(Some(b"v2"), t1 + every * 2, false));
    }
}
