//! Counters: per stage (endpoints included) and per flow. Atomics written on the data path, read by `stats()`.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The start of a piece of a stage's work: the wall clock and the calling thread's CPU clock.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    wall: Instant,
    cpu: Duration,
}

/// The calling thread's CPU time.
pub fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

impl Timing {
    /// Now.
    pub fn start() -> Self {
        Timing { wall: Instant::now(), cpu: thread_cpu() }
    }
}

/// A zero-copy system call, counted by name as well as among a stage's system calls, so that the counters show
/// which calls moved the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `splice`.
    Splice,
    /// `sendfile`.
    Sendfile,
    /// `copy_file_range`.
    CopyFileRange,
    /// `tee`.
    Tee,
}

/// Live counters of one stage.
#[derive(Debug, Default)]
pub struct StageStat {
    /// Name.
    pub name: String,
    /// `source`, `transform` or `sink`.
    pub kind: &'static str,
    /// True if the scheduler may replicate it.
    pub stateless: bool,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    busy_ns: AtomicU64,
    cpu_ns: AtomicU64,
    syscalls: AtomicU64,
    /// The zero-copy calls among `syscalls`, by [`Call`].
    calls: [AtomicU64; 4],
    copied: AtomicU64,
    dropped: AtomicU64,
    replicas: AtomicUsize,
    detached: AtomicBool,
}

impl StageStat {
    /// A stage's counters.
    pub fn new(name: String, kind: &'static str, stateless: bool) -> Self {
        let s = StageStat { name, kind, stateless, ..Default::default() };
        s.replicas.store(1, Relaxed);
        s
    }
    /// One system call.
    pub fn syscall(&self) {
        self.syscalls.fetch_add(1, Relaxed);
    }
    /// One zero-copy system call (counted among the system calls too).
    pub fn call(&self, c: Call) {
        self.syscalls.fetch_add(1, Relaxed);
        self.calls[c as usize].fetch_add(1, Relaxed);
    }
    /// Time spent working since `t` (wall time: a stage blocked in the kernel on its device counts as busy) and
    /// the CPU time of it.
    pub fn busy(&self, t: &Timing) {
        self.busy_ns.fetch_add(t.wall.elapsed().as_nanos() as u64, Relaxed);
        self.cpu_ns.fetch_add(thread_cpu().saturating_sub(t.cpu).as_nanos() as u64, Relaxed);
    }
    /// Like [`busy`](Self::busy), and returns the clocks as read at the end, so that the next piece of work on the
    /// same thread can start from them: one reading of the thread's CPU clock (a system call) instead of two.
    pub fn busy_then(&self, t: &Timing) -> Timing {
        let now = Timing::start();
        self.busy_ns.fetch_add(now.wall.saturating_duration_since(t.wall).as_nanos() as u64, Relaxed);
        self.cpu_ns.fetch_add(now.cpu.saturating_sub(t.cpu).as_nanos() as u64, Relaxed);
        now
    }
    /// Bytes in and out.
    pub fn moved(&self, inp: usize, out: usize) {
        self.bytes_in.fetch_add(inp as u64, Relaxed);
        self.bytes_out.fetch_add(out as u64, Relaxed);
    }
    /// Bytes copied in user space.
    pub fn copied(&self, n: usize) {
        self.copied.fetch_add(n as u64, Relaxed);
    }
    /// Bytes a full queue dropped.
    pub fn dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Relaxed);
    }
    /// The sink was cut off.
    pub fn detach(&self) {
        self.detached.store(true, Relaxed);
    }
    /// Replicas now running.
    pub fn set_replicas(&self, n: usize) {
        self.replicas.store(n, Relaxed);
    }
    /// Replicas now running.
    pub fn replicas(&self) -> usize {
        self.replicas.load(Relaxed)
    }
    /// Busy time so far.
    pub fn busy_time(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Relaxed))
    }
    /// CPU time so far (all replicas).
    pub fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Relaxed))
    }

    /// What the scheduler needs of it.
    pub fn load(&self) -> crate::sched::StageLoad {
        crate::sched::StageLoad {
            busy: self.busy_time(),
            cpu: self.cpu_time(),
            stateless: self.stateless,
            replicas: self.replicas(),
        }
    }

    /// A snapshot.
    pub fn snapshot(&self, wall: Duration) -> StageStats {
        let busy = self.busy_time();
        let replicas = self.replicas();
        let out = self.bytes_out.load(Relaxed);
        StageStats {
            name: self.name.clone(),
            kind: self.kind.to_owned(),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: out,
            mb_per_s: if wall.is_zero() { 0.0 } else { out as f64 / 1e6 / wall.as_secs_f64() },
            busy_s: busy.as_secs_f64(),
            cpu_s: self.cpu_time().as_secs_f64(),
            busy: if wall.is_zero() { 0.0 } else { busy.as_secs_f64() / wall.as_secs_f64() / replicas.max(1) as f64 },
            syscalls: self.syscalls.load(Relaxed),
            splice: self.calls[Call::Splice as usize].load(Relaxed),
            sendfile: self.calls[Call::Sendfile as usize].load(Relaxed),
            copy_file_range: self.calls[Call::CopyFileRange as usize].load(Relaxed),
            tee: self.calls[Call::Tee as usize].load(Relaxed),
            copied: self.copied.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            replicas,
            detached: self.detached.load(Relaxed),
        }
    }
}

/// A stage's counters at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageStats {
    /// Name.
    pub name: String,
    /// `source`, `transform` or `sink`.
    pub kind: String,
    /// Bytes in.
    pub bytes_in: u64,
    /// Bytes out.
    pub bytes_out: u64,
    /// Output rate over the flow's life, MB/s.
    pub mb_per_s: f64,
    /// Busy time, seconds (all replicas).
    pub busy_s: f64,
    /// Fraction of wall time busy, per replica (0..1).
    pub busy: f64,
    /// CPU time, seconds (all replicas): what the stage cost the machine; `busy_s` less this is time blocked in the
    /// kernel (waiting for input, or for a device).
    #[serde(default)]
    pub cpu_s: f64,
    /// System calls.
    pub syscalls: u64,
    /// `splice` calls among `syscalls`.
    #[serde(default)]
    pub splice: u64,
    /// `sendfile` calls among `syscalls`.
    #[serde(default)]
    pub sendfile: u64,
    /// `copy_file_range` calls among `syscalls`.
    #[serde(default)]
    pub copy_file_range: u64,
    /// `tee` calls among `syscalls`.
    #[serde(default)]
    pub tee: u64,
    /// Bytes copied in user space.
    pub copied: u64,
    /// Bytes dropped by a full queue.
    pub dropped: u64,
    /// Replicas.
    pub replicas: usize,
    /// Cut off (fan-out sink that fell behind).
    pub detached: bool,
}

/// A flow's counters at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlowStats {
    /// Flow id (unique in the process).
    pub id: u64,
    /// The spec or name.
    pub name: String,
    /// `running`, `done`, `stopped` or `failed: ...`.
    pub state: String,
    /// `zero-copy (...)` or `copy`.
    pub path: String,
    /// Seconds since start (to the end once finished).
    pub elapsed_s: f64,
    /// Bytes taken from the source.
    pub bytes_in: u64,
    /// Bytes given to the sinks (summed over sinks).
    pub bytes_out: u64,
    /// Bytes copied in user space (reads into user memory count: a read is the kernel copying to us).
    pub user_copied: u64,
    /// System calls on the data path.
    pub syscalls: u64,
    /// Priority.
    pub priority: u32,
    /// The flow's own rate limit, bytes/s.
    pub rate: Option<u64>,
    /// The rate in effect: its own limit or its share of a scheduler's budget, bytes/s.
    pub effective_rate: Option<u64>,
    /// The stage that bounds the flow (most busy time per replica); `None` while the flow is idle (no stage busy
    /// for 2% of the time).
    pub bound: Option<String>,
    /// Stages: source, transforms, sinks.
    pub stages: Vec<StageStats>,
    /// Results of stages such as checksums.
    pub results: Vec<String>,
}
