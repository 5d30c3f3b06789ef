//! `kecho bench flows`: the flow paper's section 4 on real sockets, files and cores.
//!
//! 1. Receive (TCP) -> decrypt (AES-256-GCM) -> store (file), 1 M records of 64 B and of 1 KB, once as the
//!    memory-centric program of the paper's Figure 1 (buffered reads copied into a record buffer, decrypted into a
//!    new buffer, written through a buffered writer) and once as a flow.
//! 2. A pure move, socket -> file and file -> socket, 64 KiB to 1 GiB: the flow (splice / sendfile) against a
//!    read/write loop and `socat` (when installed).
//! 3. The decrypt stage replicated on 2 cores against 1 core, file -> decrypt -> /dev/null (decryption is the bound).
//! 4. The machine's limits in the same run: memory copy bandwidth, one core's AES-256-GCM rate, file write rate.
//!
//! CPU is the process's CPU time minus the peer thread's (the peer only feeds or drains the socket); system calls
//! are counted by the flow's counters and by counting wrappers around the baseline's reader and writer.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use kecho_flow::record::{self, Key, Opener, Sealer, HEADER_LEN, TAG_LEN, WORD_LEN};
use kecho_flow::{parse, Flow};

use crate::report::{fmt_num, fmt_ratio, Check, Section, Table};
use crate::util::{count, self_cpu_ns};
use crate::BenchArgs;

fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Children's CPU (user + system) in nanoseconds, from `getrusage(RUSAGE_CHILDREN)` (waited-for children only).
fn children_cpu_ns() -> u64 {
    use nix::sys::resource::{getrusage, UsageWho};
    let ns = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1_000;
    getrusage(UsageWho::RUSAGE_CHILDREN).map(|u| ns(u.user_time()) + ns(u.system_time())).unwrap_or(0)
}

/// One measured run.
#[derive(Debug, Clone, serde::Serialize)]
struct Run {
    what: String,
    bytes: u64,
    records: u64,
    secs: f64,
    cpu_s: f64,
    syscalls: u64,
    /// CPU time of the peer thread (feeder or drainer), not counted in `cpu_s`.
    peer_cpu_s: f64,
}

impl Run {
    fn mb_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.secs
    }
    fn rec_s(&self) -> f64 {
        self.records as f64 / self.secs
    }
    fn cpu_per_gb(&self) -> f64 {
        self.cpu_s / (self.bytes as f64 / 1e9)
    }
    fn peer_cpu_per_gb(&self) -> f64 {
        self.peer_cpu_s / (self.bytes as f64 / 1e9)
    }
}

struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Scratch> {
        let p = std::env::temp_dir().join(format!("kecho-bench-flows-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(Scratch(p))
    }
    fn file(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counts read calls.
struct CountingRead<R>(R, u64);
impl<R: Read> Read for CountingRead<R> {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.1 += 1;
        self.0.read(b)
    }
}
/// Counts write calls.
struct CountingWrite<W>(W, u64);
impl<W: Write> Write for CountingWrite<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.1 += 1;
        self.0.write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// What a feeder sends: bytes from memory (`write`), or a file (`sendfile`, so that the sending side costs little
/// and the receiving programs, not the feeder, bound the experiment: the paper's NIC is not the bottleneck).
#[derive(Clone)]
enum Feed {
    Bytes(std::sync::Arc<Vec<u8>>),
    File(PathBuf),
}

/// A thread that sends `feed` to `addr` and returns its own CPU time.
fn feeder(addr: std::net::SocketAddr, feed: Feed) -> std::thread::JoinHandle<Result<u64>> {
    named("feeder", move || {
        let mut s = connect_retry(addr)?;
        match feed {
            Feed::Bytes(data) => {
                for c in data.chunks(1 << 20) {
                    s.write_all(c)?;
                }
            }
            Feed::File(p) => {
                // Every program under test must receive the whole stream: count what sendfile moved.
                let f = std::fs::File::open(&p)?;
                let want = f.metadata()?.len();
                let mut sent = 0u64;
                loop {
                    let k = rustix::fs::sendfile(&s, &f, None, 4 << 20)?;
                    if k == 0 {
                        break;
                    }
                    sent += k as u64;
                }
                anyhow::ensure!(sent == want, "the feeder sent {sent} of {want} bytes of {}", p.display());
            }
        }
        drop(s);
        Ok(self_cpu_ns())
    })
}

/// A thread with a name (so that a profile tells the peer from the program under test).
fn named<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    spawned.unwrap_or_else(|e| std::thread::spawn(move || Err(anyhow::anyhow!("spawn a peer thread: {e}"))))
}

fn connect_retry(addr: std::net::SocketAddr) -> Result<TcpStream> {
    let t = Instant::now();
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if t.elapsed().as_secs() > 10 => return Err(e.into()),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
}

/// The encrypted stream of `n` records of `size` bytes.
fn stream(key: &Key, n: u64, size: usize) -> Vec<u8> {
    let (sealer, header) = Sealer::random(key);
    let mut out = Vec::with_capacity(HEADER_LEN + n as usize * (size + WORD_LEN + TAG_LEN) + 64);
    out.extend_from_slice(&header);
    let mut payload = vec![0u8; size];
    for i in 0..n {
        record_plain(i, &mut payload);
        sealer.seal(i, i * size as u64, &payload, false, &mut out);
    }
    sealer.seal(n, n * size as u64, &[], true, &mut out);
    out
}

/// The plaintext of record `i`: a byte pattern that starts with the record's index (as much of it as fits), so that
/// a lost, repeated or misplaced record shows in the output.
fn record_plain(i: u64, buf: &mut [u8]) {
    for (j, b) in buf.iter_mut().enumerate() {
        *b = j as u8;
    }
    let k = buf.len().min(8);
    buf[..k].copy_from_slice(&i.to_le_bytes()[..k]);
}

/// Checks that `out` holds exactly what [`stream`] encrypted: `n` records of `size` bytes, in order (outside the
/// timed part; a program that lost, reordered or corrupted a record fails the run).
fn verify_plain(out: &Path, n: u64, size: usize) -> Result<()> {
    let len = std::fs::metadata(out)?.len();
    anyhow::ensure!(len == n * size as u64, "{}: {len} bytes, expected {}", out.display(), n * size as u64);
    let mut f = BufReader::with_capacity(1 << 20, std::fs::File::open(out)?);
    let (mut want, mut rec) = (vec![0u8; size], vec![0u8; size]);
    for i in 0..n {
        f.read_exact(&mut rec)?;
        record_plain(i, &mut want);
        anyhow::ensure!(rec == want, "{}: record {i} differs from what was encrypted", out.display());
    }
    Ok(())
}

/// What a measured body reports: the bytes it moved, its system calls, and the CPU time its peer thread (the feeder
/// or drainer standing in for the network) spent, which is not the measured program's.
struct Moved {
    bytes: u64,
    syscalls: u64,
    peer_cpu_ns: u64,
}

/// Runs `body` and measures it: wall time, and the CPU time read by `clock` (the process's, or its children's for an
/// external program) minus the peer's.
fn measure(
    what: impl Into<String>,
    records: u64,
    clock: fn() -> u64,
    body: impl FnOnce() -> Result<Moved>,
) -> Result<Run> {
    let cpu0 = clock();
    let t = Instant::now();
    let m = body()?;
    let secs = t.elapsed().as_secs_f64();
    let cpu = clock().saturating_sub(cpu0).saturating_sub(m.peer_cpu_ns);
    Ok(Run {
        what: what.into(),
        bytes: m.bytes,
        records,
        secs,
        cpu_s: cpu as f64 / 1e9,
        syscalls: m.syscalls,
        peer_cpu_s: m.peer_cpu_ns as f64 / 1e9,
    })
}

/// Joins a peer thread.
fn join<T>(h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("a peer thread panicked"))?
}

/// A loopback listener and the feeder connected to it; the caller accepts.
fn fed(feed: Feed) -> Result<(TcpListener, std::thread::JoinHandle<Result<u64>>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let h = feeder(l.local_addr()?, feed);
    Ok((l, h))
}

/// A drained loopback listener: its address, and the drainer (CPU time, bytes).
/// A drainer thread: its CPU time and the bytes it read.
type Drainer = std::thread::JoinHandle<Result<(u64, u64)>>;

fn drained() -> Result<(std::net::SocketAddr, Drainer)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok((l.local_addr()?, drainer(l)))
}

/// Figure 1: the program as applications are usually written.
fn memory_centric(key: &Key, data: Feed, out: &Path, records: u64, size: usize) -> Result<Run> {
    measure(format!("memory-centric {size} B"), records, process_cpu_ns, || {
        let (l, feed) = fed(data)?;
        let (sock, _) = l.accept()?;
        let mut r = BufReader::with_capacity(64 << 10, CountingRead(sock, 0));
        let mut w = BufWriter::with_capacity(64 << 10, CountingWrite(std::fs::File::create(out)?, 0));
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        let opener = Opener::new(key, &header)?;
        let (mut index, mut offset, mut position) = (0u64, 0u64, HEADER_LEN as u64);
        let mut moved = 0u64;
        loop {
            let mut word = [0u8; 4];
            r.read_exact(&mut word)?;
            let wv = u32::from_be_bytes(word);
            let len = (wv & 0x00ff_ffff) as usize;
            // Read the record into its own buffer, then decrypt into a new one (the copy of Figure 1).
            let mut rec = vec![0u8; WORD_LEN + len + TAG_LEN];
            rec[..4].copy_from_slice(&word);
            r.read_exact(&mut rec[4..])?;
            let mut plain = rec.clone();
            let rr = record::RecordRef { start: 0, len, index, offset, position, word: wv };
            let range = opener.open(&rr, &mut plain)?;
            w.write_all(&plain[range])?;
            moved += len as u64;
            if wv & (1 << 31) != 0 {
                break;
            }
            index += 1;
            offset += len as u64;
            position += rr.wire_len() as u64;
        }
        w.flush()?;
        let syscalls = r.get_ref().1 + w.get_ref().1;
        Ok(Moved { bytes: moved, syscalls, peer_cpu_ns: join(feed)? })
    })
}

/// The network peer of a flow under test.
enum Peer {
    /// None: file to file.
    None,
    /// A feeder connects to the flow's listening source.
    Feed(Feed),
    /// A drainer behind the flow's connecting sink (already listening; the spec names its address).
    Drain(Drainer),
}

/// Runs the flow `spec` with its peer; the bytes are the sink's (or the drainer's). Also returns what the scheduler
/// did (the flow's `replicated` events, e.g. "decrypt aes-256-gcm: its own thread").
fn flow_run(spec: &str, peer: Peer, records: u64, what: String) -> Result<(Run, kecho_flow::FlowStats, String)> {
    let mut stats = None;
    let mut decided = String::new();
    let run = measure(what, records, process_cpu_ns, || {
        let f = Flow::from_spec(&parse(spec).map_err(|e| anyhow::anyhow!("{e}"))?)
            .start()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let feed = match (&peer, f.local_addr()) {
            (Peer::Feed(d), Some(a)) => Some(feeder(a, d.clone())),
            _ => None,
        };
        // The events outlive the handle in its watcher: the wall clock stops when the flow's thread ends.
        let w = f.watcher();
        let s = f.wait().map_err(|e| anyhow::anyhow!("{e}"))?;
        decided = w
            .events()
            .iter()
            .filter(|e| e.what == "replicated")
            .map(|e| format!("{}: {}", e.endpoint, e.detail))
            .collect::<Vec<_>>()
            .join("; ");
        let (peer_cpu_ns, bytes) = match (peer, feed) {
            (_, Some(h)) => (join(h)?, s.stages.last().map(|x| x.bytes_out).unwrap_or(0)),
            (Peer::Drain(h), None) => join(h)?,
            _ => (0, s.stages.last().map(|x| x.bytes_out).unwrap_or(0)),
        };
        let syscalls = s.syscalls;
        stats = Some(s);
        Ok(Moved { bytes, syscalls, peer_cpu_ns })
    })?;
    Ok((run, stats.ok_or_else(|| anyhow::anyhow!("no stats"))?, decided))
}

/// Copies `from` to `to` with a plain read/write loop (64 KiB buffer); returns bytes and system calls.
fn read_write_loop(mut from: impl Read, mut to: impl Write) -> Result<(u64, u64)> {
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, mut calls) = (0u64, 0u64);
    loop {
        calls += 1;
        let k = from.read(&mut buf)?;
        if k == 0 {
            return Ok((n, calls));
        }
        calls += 1;
        to.write_all(&buf[..k])?;
        n += k as u64;
    }
}

/// Touches `bytes` of fresh memory and frees it, outside the measurement, before a program that fills as much new
/// page cache. On a VM whose balloon reports free pages to the host (`VIRTIO_BALLOON_F_REPORTING`), pages freed a few
/// seconds earlier are given back to the host, and the first write to each afterwards faults in the host, charged
/// to the writing thread as CPU time: 1 GiB written into the page cache cost 1.7-1.9 s of CPU after 8 s idle
/// against 0.22 s right after another such write (docs/FLOWS.md). Pages touched and freed here are back on the free
/// lists, backed, when the program allocates its page cache (not shown to remove every bad round: docs/FLOWS.md).
fn back_pages(bytes: u64) {
    let mut v = vec![0u8; bytes as usize];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
}

/// Socket -> file with a plain read/write loop.
fn rw_socket_to_file(data: std::sync::Arc<Vec<u8>>, out: &Path) -> Result<Run> {
    measure("read/write loop", 0, process_cpu_ns, || {
        let (l, feed) = fed(Feed::Bytes(data))?;
        let (s, _) = l.accept()?;
        let (bytes, syscalls) = read_write_loop(s, std::fs::File::create(out)?)?;
        Ok(Moved { bytes, syscalls, peer_cpu_ns: join(feed)? })
    })
}

/// A thread that drains a listener and returns its CPU time and the byte count.
fn drainer(l: TcpListener) -> Drainer {
    named("drainer", move || {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            let k = s.read(&mut buf)?;
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        Ok((self_cpu_ns(), n))
    })
}

/// File -> socket with a plain read/write loop.
fn rw_file_to_socket(input: &Path) -> Result<Run> {
    measure("read/write loop", 0, process_cpu_ns, || {
        let (addr, d) = drained()?;
        let (_, syscalls) = read_write_loop(std::fs::File::open(input)?, TcpStream::connect(addr)?)?;
        let (peer_cpu_ns, bytes) = join(d)?;
        Ok(Moved { bytes, syscalls, peer_cpu_ns })
    })
}

/// File -> socket with a plain `sendfile` loop (1 MiB per call, as the flow's steps): the kernel's own cost of a
/// zero-copy move to this socket, the floor no program that sends by `sendfile` goes below.
fn sendfile_file_to_socket(input: &Path) -> Result<Run> {
    measure("plain sendfile loop", 0, process_cpu_ns, || {
        let (addr, d) = drained()?;
        let (file, sock) = (std::fs::File::open(input)?, TcpStream::connect(addr)?);
        let mut calls = 0u64;
        loop {
            calls += 1;
            if rustix::fs::sendfile(&sock, &file, None, 1 << 20)? == 0 {
                break;
            }
        }
        drop(sock);
        let (peer_cpu_ns, bytes) = join(d)?;
        Ok(Moved { bytes, syscalls: calls, peer_cpu_ns })
    })
}

fn have_socat() -> bool {
    std::process::Command::new("socat")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// socat's own CPU (its children's clock); the feeder or drainer is a thread of this process, not counted.
fn socat_socket_to_file(data: std::sync::Arc<Vec<u8>>, out: &Path) -> Result<Run> {
    measure("socat", 0, children_cpu_ns, || {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut child = std::process::Command::new("socat")
            .args(["-u", &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"), &format!("CREATE:{}", out.display())])
            .spawn()?;
        join(feeder(format!("127.0.0.1:{port}").parse()?, Feed::Bytes(data)))?;
        child.wait()?;
        Ok(Moved { bytes: std::fs::metadata(out)?.len(), syscalls: 0, peer_cpu_ns: 0 })
    })
}

fn socat_file_to_socket(input: &Path) -> Result<Run> {
    measure("socat", 0, children_cpu_ns, || {
        let (addr, d) = drained()?;
        let mut child = std::process::Command::new("socat")
            .args(["-u", &format!("OPEN:{},rdonly", input.display()), &format!("TCP:{addr}")])
            .spawn()?;
        child.wait()?;
        let (_, bytes) = join(d)?;
        Ok(Moved { bytes, syscalls: 0, peer_cpu_ns: 0 })
    })
}

/// The machine's limits: memcpy GB/s, one core's AES-256-GCM MB/s (64 B, 1 KB, 64 KiB records), file write MB/s.
fn limits(scratch: &Scratch, args: &BenchArgs) -> Result<(Table, serde_json::Value)> {
    let mut t = Table::new("machine limits, measured in this run", &["limit", "value"]);
    let size = 256 << 20;
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    let reps = count(args, 8, 2);
    let t0 = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    }
    let memcpy = (size as u64 * reps) as f64 / 1e9 / t0.elapsed().as_secs_f64();
    t.row(vec!["memory copy (256 MiB memcpy)".into(), format!("{memcpy:.2} GB/s")]);
    drop(dst);
    let key = Key::new([3; 32]);
    let (sealer, _) = Sealer::new(&key, [9; 32]);
    let mut aes = serde_json::Map::new();
    for rec in [64usize, 1024, 65536] {
        let total = count(args, 512 << 20, 1 << 20) as usize;
        let n = total / rec;
        let mut out = Vec::with_capacity(rec + 64);
        let t0 = Instant::now();
        for i in 0..n {
            out.clear();
            sealer.seal(i as u64, 0, &src[..rec], false, &mut out);
            std::hint::black_box(&out);
        }
        let mb = (n * rec) as f64 / 1e6 / t0.elapsed().as_secs_f64();
        t.row(vec![
            format!("AES-256-GCM, one core, {rec} B records"),
            format!("{mb:.0} MB/s ({:.2} M records/s)", mb * 1e6 / rec as f64 / 1e6),
        ]);
        aes.insert(rec.to_string(), mb.into());
    }
    let path = scratch.file("write-rate");
    let total = count(args, 1 << 30, 16 << 20) as usize;
    let t0 = Instant::now();
    {
        let mut f = std::fs::File::create(&path)?;
        for _ in 0..total / size.min(total) {
            f.write_all(&src[..size.min(total)])?;
        }
        f.sync_all()?;
    }
    let write = total as f64 / 1e6 / t0.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    t.row(vec![format!("file write, {} MiB then fsync", total >> 20), format!("{write:.0} MB/s")]);
    Ok((t, serde_json::json!({ "memcpy_gb_s": memcpy, "aes_gcm_mb_s": aes, "file_write_mb_s": write })))
}

/// The machine's CPU counters (all cores, from /proc/stat, in clock ticks): busy and total.
#[derive(Debug, Clone, Copy)]
struct MachineCpu {
    busy: u64,
    total: u64,
}

impl MachineCpu {
    fn now() -> MachineCpu {
        let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let f: Vec<u64> =
            s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
        let total: u64 = f.iter().take(8).sum();
        let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
        MachineCpu { busy: total - idle, total }
    }

    /// Cores busy on average since `earlier` (0 to the number of cores), over `cores` cores.
    fn cores_busy_since(&self, earlier: MachineCpu, cores: usize) -> f64 {
        let dt = self.total.saturating_sub(earlier.total).max(1) as f64;
        (self.busy.saturating_sub(earlier.busy)) as f64 / dt * cores as f64
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// One line of stage figures: each stage's busy fraction per replica, its CPU time and its replicas.
fn stage_line(fs: &kecho_flow::FlowStats) -> String {
    fs.stages
        .iter()
        .map(|x| {
            format!(
                "{} {:.0}% ({:.2} s CPU) x{}",
                x.name.split(':').next().unwrap_or(""),
                x.busy * 100.0,
                x.cpu_s,
                x.replicas
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The run of `runs` (one program's rounds) with the median records/s (the lower one of an even count).
fn median_run(runs: &[Run]) -> Run {
    let mut v: Vec<&Run> = runs.iter().collect();
    v.sort_by(|a, b| a.rec_s().total_cmp(&b.rec_s()));
    v[(v.len() - 1) / 2].clone()
}

/// Environment settings: (name, value) pairs.
type EnvSet = [(String, String)];

/// `KECHO_BENCH_FLOWS_ENV=NAME=VALUE[,NAME=VALUE]`: environment settings of the flow runtime that an extra program
/// runs with (set around its run only), so that a runtime knob is compared with the default in the same rounds.
fn env_variant() -> Option<Vec<(String, String)>> {
    let v = std::env::var("KECHO_BENCH_FLOWS_ENV").ok()?;
    let kv: Vec<(String, String)> = v
        .split(',')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    (!kv.is_empty()).then_some(kv)
}

/// In `KECHO_BENCH_FLOWS_ENV`, `KECHO_FLOW_SENDFILE=1` gives the file -> socket flow of the extra program the sink
/// option `sendfile` (`sendfile` instead of `splice` through the flow's pipe) rather than an environment setting.
const SENDFILE_VAR: &str = "KECHO_FLOW_SENDFILE";

/// Runs `f` with the settings `env` in the environment (none of the flow's threads runs meanwhile).
fn with_env<T>(env: Option<&EnvSet>, f: impl FnOnce() -> T) -> T {
    for (k, v) in env.unwrap_or(&[]) {
        std::env::set_var(k, v);
    }
    let r = f();
    for (k, _) in env.unwrap_or(&[]) {
        std::env::remove_var(k);
    }
    r
}

/// Which parts run: `KECHO_BENCH_FLOWS=limits,decrypt,replicas,moves` (any subset; default all), e.g. to profile
/// one part alone.
fn part(name: &str) -> bool {
    std::env::var("KECHO_BENCH_FLOWS").map_or(true, |v| v.split(',').any(|p| p.trim() == name))
}

pub fn run(args: &BenchArgs) -> Result<Section> {
    let mut s = Section::new("flows");
    let scratch = Scratch::new()?;
    let key = Key::new([7; 32]);
    let keyfile = scratch.file("key");
    std::fs::write(&keyfile, [7u8; 32])?;
    if part("limits") {
        let (lt, lj) = limits(&scratch, args)?;
        s.tables.push(lt);
        s.put("limits", lj);
    }
    let mut runs = Vec::new();
    if part("decrypt") {
        decrypt_part(args, &mut s, &scratch, &key, &keyfile, &mut runs)?;
    }
    if part("replicas") {
        replicas_part(args, &mut s, &scratch, &key, &keyfile, &mut runs)?;
    }
    if part("moves") {
        moves_part(args, &mut s, &scratch, &mut runs)?;
    }
    s.put("runs", &runs);
    s.notes.push(
        "CPU s/GB is this process's CPU clock (user and kernel time of all its threads, the flow's set-up and \
         ended threads included) minus the CPU clock of the peer thread that feeds or drains the socket; on \
         loopback the kernel runs much of the receiving side's TCP work on the sending thread, so each side pays \
         part of the other's; socat's is its own (`getrusage` of the waited-for child)."
            .into(),
    );
    Ok(s)
}

/// Receive -> decrypt -> store: the memory-centric program and the flows alternate, `rounds` times; the table shows
/// each program's median round and the ratio of the medians.
fn decrypt_part(
    args: &BenchArgs,
    s: &mut Section,
    scratch: &Scratch,
    key: &Key,
    keyfile: &Path,
    runs: &mut Vec<Run>,
) -> Result<()> {
    let mut t = Table::new(
        "TCP receive -> AES-256-GCM decrypt -> file (paper section 4, Figures 1 and 2): median of alternating rounds",
        &["records", "program", "records/s", "MB/s", "CPU s/GB", "syscalls/record", "flow / memory-centric"],
    );
    let rounds = count(args, 5, 1) as usize;
    let mut all_rounds = Vec::new();
    // `KECHO_BENCH_FLOWS_SIZES=1024` (or 64): one record size alone, e.g. to compare builds at 1 KB.
    let sizes = std::env::var("KECHO_BENCH_FLOWS_SIZES").unwrap_or_default();
    let chosen = |size: usize| sizes.is_empty() || sizes.split(',').any(|x| x.trim() == size.to_string());
    for (size, paper) in [(64usize, 1.13), (1024, 1.93)].into_iter().filter(|(z, _)| chosen(*z)) {
        let n = count(args, 1_000_000, 1000);
        // The stream is sent from a file by sendfile: the feeder must not be what bounds both programs.
        let streamed = scratch.file("stream");
        std::fs::write(&streamed, stream(key, n, size))?;
        let data = Feed::File(streamed.clone());
        let out = scratch.file("decrypted");
        // The flow as declared (the scheduler may replicate decryption), and pinned to one decrypting core;
        // `KECHO_BENCH_FLOWS_CHUNK=SIZE` adds the declared flow with that chunk, to compare chunk sizes in one run.
        let other_chunk = std::env::var("KECHO_BENCH_FLOWS_CHUNK").ok();
        let mut programs = vec![
            ("auto", "flow".to_owned(), String::new(), ""),
            ("1", "flow, 1 decrypt core".into(), String::new(), ""),
        ];
        let variant = env_variant();
        if let Some(v) = &variant {
            let names: Vec<String> = v.iter().map(|(k, x)| format!("{k}={x}")).collect();
            programs.push(("auto", format!("flow, {}", names.join(" ")), String::new(), ""));
        }
        if let Some(c) = &other_chunk {
            programs.push(("auto", format!("flow, chunk={c}"), format!(" chunk={c}"), ""));
        }
        // `KECHO_BENCH_FLOWS_DIRECT=1` adds the declared flow with a `direct` (O_DIRECT) file sink.
        if std::env::var("KECHO_BENCH_FLOWS_DIRECT").is_ok_and(|v| v == "1") {
            programs.push(("auto", "flow, direct sink".into(), String::new(), " direct"));
        }
        let mut mcs = Vec::new();
        let mut flows: Vec<Vec<Run>> = vec![Vec::new(); programs.len()];
        let mut ratios = Vec::new();
        let mut decisions = Vec::new();
        let mut busiest = Vec::new();
        let mut round_rows = Vec::new();
        for round in 0..rounds {
            // Each program fills `n * size` bytes of new page cache: memory touched and freed first (`back_pages`).
            back_pages(n * size as u64);
            let mc = memory_centric(key, data.clone(), &out, n, size)?;
            verify_plain(&out, n, size)?;
            std::fs::remove_file(&out)?;
            anyhow::ensure!(mc.bytes == n * size as u64, "memory-centric moved {} bytes", mc.bytes);
            round_rows.push(serde_json::json!({
                "size": size, "round": round + 1, "program": "memory-centric", "records_per_s": mc.rec_s()
            }));
            for (k, (reps, label, chunk, sink_opts)) in programs.iter().enumerate() {
                let spec = format!(
                    "tcp-listen:127.0.0.1:0{chunk} ! decrypt aes-256-gcm key={} replicas={reps} ! file:{}{sink_opts}",
                    keyfile.display(),
                    out.display()
                );
                back_pages(n * size as u64);
                let env = if label.contains('=') && !label.contains("chunk=") { variant.as_deref() } else { None };
                let (fl, fs, decided) =
                    with_env(env, || flow_run(&spec, Peer::Feed(data.clone()), n, format!("{label} {size} B")))?;
                if k == 0 {
                    // The CPU per GB of the flow's busiest thread: the source and the decrypt stage share the
                    // reading thread unless the scheduler moved decryption off it.
                    let cpu = |i: usize| fs.stages.get(i).map_or(0.0, |x| x.cpu_s);
                    let reps = fs.stages.get(1).map_or(1, |x| x.replicas.max(1)) as f64;
                    let threads = if decided.is_empty() {
                        vec![cpu(0) + cpu(1), cpu(2)]
                    } else {
                        vec![cpu(0), cpu(1) / reps, cpu(2)]
                    };
                    let gb = fl.bytes as f64 / 1e9;
                    busiest.push(threads.into_iter().fold(0.0, f64::max) / gb.max(1e-12));
                    decisions.push(if decided.is_empty() { "kept inline".to_owned() } else { decided });
                }
                verify_plain(&out, n, size)?;
                std::fs::remove_file(&out)?;
                anyhow::ensure!(fl.bytes == mc.bytes, "byte counts differ: {} {}", fl.bytes, mc.bytes);
                if k == 0 {
                    ratios.push(fl.rec_s() / mc.rec_s());
                }
                if k > 0 && env.is_some() {
                    s.notes.push(format!(
                        "{size} B round {}: {label} / memory-centric {:.2}x (flow {:.2}x); CPU s/GB {:.3}",
                        round + 1,
                        fl.rec_s() / mc.rec_s(),
                        flows[0].last().map_or(0.0, |f| f.rec_s() / mc.rec_s()),
                        fl.cpu_per_gb()
                    ));
                }
                if round == 0 {
                    s.notes.push(format!(
                        "{label} {size} B (round 1): bound by {}; stage busy per replica (CPU): {}",
                        fs.bound.as_deref().unwrap_or("-"),
                        stage_line(&fs)
                    ));
                }
                round_rows.push(serde_json::json!({
                    "size": size, "round": round + 1, "program": label, "records_per_s": fl.rec_s()
                }));
                flows[k].push(fl);
            }
            mcs.push(mc);
        }
        let mc = median_run(&mcs);
        let meds: Vec<Run> = flows.iter().map(|f| median_run(f)).collect();
        for r in std::iter::once(&mc).chain(&meds) {
            t.row(vec![
                format!("{} x {size} B", fmt_num(n as f64)),
                r.what.clone(),
                fmt_num(r.rec_s()),
                format!("{:.1}", r.mb_s()),
                format!("{:.2}", r.cpu_per_gb()),
                format!("{:.4}", r.syscalls as f64 / n as f64),
                if r.what.starts_with("flow") { fmt_ratio(r.rec_s() / mc.rec_s()) } else { String::new() },
            ]);
        }
        // What a pipeline can gain at most: each of its threads on a core of its own and the one-thread program on
        // one core, the flow is at most as fast as its busiest thread allows.
        let busiest = median(busiest);
        s.notes.push(format!(
            "{size} B, CPU per GB (median rounds): feeder {:.3} s (beside the memory-centric program {:.3} s), memory-centric {:.2} s ({:.2} cores busy), flow {:.2} s \
             ({:.2} cores), the flow's busiest thread {busiest:.2} s: with a core for each thread, the flow can be at \
             most {:.2}x the memory-centric program",
            meds[0].peer_cpu_per_gb(),
            mc.peer_cpu_per_gb(),
            mc.cpu_per_gb(),
            mc.cpu_s / mc.secs,
            meds[0].cpu_per_gb(),
            meds[0].cpu_s / meds[0].secs,
            mc.cpu_per_gb() / busiest.max(1e-9)
        ));
        s.notes.push(format!(
            "{size} B, flow / memory-centric per round (alternating, {rounds} rounds): {}; replicas=auto per round: {}",
            ratios.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", "),
            decisions.join(", ")
        ));
        s.checks.push(Check::at_least(
            format!("flow / memory-centric throughput at {size} B (paper {paper}x; median of rounds)"),
            meds[0].rec_s() / mc.rec_s(),
            if size == 64 { 1.13 } else { 2.0 },
            "x",
        ));
        std::fs::remove_file(&streamed)?;
        all_rounds.extend(round_rows);
        runs.extend(mcs);
        runs.extend(flows.into_iter().flatten());
    }
    s.tables.push(t);
    s.put("decrypt_rounds", all_rounds);
    Ok(())
}

/// Replicated decrypt: file -> decrypt -> /dev/null, 1 KB records, 1 and 2 replicas alternating; with the CPU each
/// stage used and how busy the machine's cores were (other processes included), which says whether a second core
/// was free to take the replica.
fn replicas_part(
    args: &BenchArgs,
    s: &mut Section,
    scratch: &Scratch,
    key: &Key,
    keyfile: &Path,
    runs: &mut Vec<Run>,
) -> Result<()> {
    let mut t = Table::new(
        "decrypt replicated on 2 cores (file -> decrypt -> /dev/null, 1 KB records), alternating rounds",
        &[
            "round",
            "replicas",
            "MB/s",
            "CPU s/GB",
            "flow's cores",
            "machine's cores busy",
            "others' cores",
            "stage busy per replica (CPU)",
            "bound by",
            "speed-up",
        ],
    );
    let n = count(args, 1_000_000, 1000);
    let enc = scratch.file("enc");
    std::fs::write(&enc, stream(key, n, 1024))?;
    let ncores = cores();
    let mut speedups = Vec::new();
    let mut cpu_per_gb: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut one_mb_s = Vec::new();
    let variant = env_variant();
    let mut var_speedups = Vec::new();
    for round in 0..count(args, 3, 1) {
        let mut base = 0.0;
        let plain = [(1usize, None), (2, None)];
        let with: Vec<(usize, Option<&EnvSet>)> =
            variant.as_deref().map(|v| vec![(1, Some(v)), (2, Some(v))]).unwrap_or_default();
        let mut var_base = 0.0;
        for (reps, env) in plain.into_iter().chain(with) {
            let spec = format!(
                "file:{} ! decrypt aes-256-gcm key={} replicas={reps} ! file:/dev/null",
                enc.display(),
                keyfile.display()
            );
            let m0 = MachineCpu::now();
            let label = match env {
                Some(e) => format!(
                    "{reps} replicas, {}",
                    e.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                ),
                None => format!("{reps} replicas"),
            };
            let (r, fs, _) = with_env(env, || flow_run(&spec, Peer::None, n, label.clone()))?;
            let machine = MachineCpu::now().cores_busy_since(m0, ncores);
            let own = r.cpu_s / r.secs;
            if env.is_some() {
                if reps == 1 {
                    var_base = r.mb_s();
                } else {
                    var_speedups.push((r.mb_s() / base, r.mb_s() / var_base));
                }
                s.notes.push(format!(
                    "replicas round {}: {label}: {:.0} MB/s, CPU {:.3} s/GB, {own:.2} cores; {}",
                    round + 1,
                    r.mb_s(),
                    r.cpu_per_gb(),
                    stage_line(&fs)
                ));
                runs.push(r);
                continue;
            }
            cpu_per_gb[reps - 1].push(r.cpu_per_gb());
            if reps == 1 {
                base = r.mb_s();
                one_mb_s.push(base);
            } else {
                speedups.push(r.mb_s() / base);
            }
            t.row(vec![
                (round + 1).to_string(),
                reps.to_string(),
                format!("{:.0}", r.mb_s()),
                format!("{:.2}", r.cpu_per_gb()),
                format!("{own:.2}"),
                format!("{machine:.2} of {ncores}"),
                format!("{:.2}", (machine - own).max(0.0)),
                stage_line(&fs),
                fs.bound.clone().unwrap_or_default(),
                fmt_ratio(r.mb_s() / base),
            ]);
            runs.push(r);
        }
    }
    // With the work spread perfectly over the cores, 2 replicas run at most `cores` / (their CPU per GB): against
    // one replica's measured rate, that is the most replication could gain on this machine with these costs.
    let (c1, c2) = (median(cpu_per_gb[0].clone()), median(cpu_per_gb[1].clone()));
    let one = median(one_mb_s);
    let most = ncores as f64 / c2.max(1e-9) * 1e3;
    s.notes.push(format!(
        "replicas (medians): CPU per GB 1 replica {c1:.3} s, 2 replicas {c2:.3} s; 1 replica {one:.0} MB/s; all \
         {ncores} cores busy with the 2-replica flow alone would give {most:.0} MB/s = {:.2}x",
        most / one.max(1e-9)
    ));
    if !var_speedups.is_empty() {
        s.notes.push(format!(
            "replicas with the variant: 2 replicas (variant) / 1 replica (plain), and / 1 replica (variant), per round: {}",
            var_speedups.iter().map(|(a, b)| format!("{a:.2}x/{b:.2}x")).collect::<Vec<_>>().join(", ")
        ));
    }
    s.checks.push(Check::at_least(
        "2 decrypt replicas / 1 (decryption bound; median of rounds)",
        median(speedups),
        1.7,
        "x",
    ));
    std::fs::remove_file(&enc)?;
    s.tables.push(t);
    Ok(())
}

/// The run with the median CPU per GB (the lower one of an even count).
fn median_cpu_run(runs: &[Run]) -> Run {
    let mut v: Vec<&Run> = runs.iter().collect();
    v.sort_by(|a, b| a.cpu_per_gb().total_cmp(&b.cpu_per_gb()));
    v[(v.len() - 1) / 2].clone()
}

/// Pure moves: socket -> file and file -> socket, the flow against a read/write loop and socat. A move of 64 MiB
/// takes some tens of milliseconds, so one run says little (single runs of the same pair spread by 3x): the
/// programs alternate for several rounds at each size and the table shows each program's median CPU per GB.
fn moves_part(args: &BenchArgs, s: &mut Section, scratch: &Scratch, runs: &mut Vec<Run>) -> Result<()> {
    let socat = have_socat();
    if !socat {
        s.notes.push("socat is not installed: its rows are left out".into());
    }
    let mut t = Table::new(
        "pure move: flow (zero-copy) against a read/write loop and socat, median CPU per GB of alternating rounds",
        &["direction", "size", "program", "rounds", "MB/s", "CPU s/GB", "syscalls", "flow CPU / loop CPU"],
    );
    let sizes: Vec<u64> = [64u64 << 10, 1 << 20, 64 << 20, 1 << 30]
        .iter()
        .map(|&b| ((b as f64 * args.scale.min(1.0)) as u64).max(64 << 10))
        .collect();
    let variant = env_variant();
    let mut worst = (0.0f64, String::new());
    let mut worst_direct = (0.0f64, String::new());
    let mut points = Vec::new();
    for &size in &sizes {
        let data = std::sync::Arc::new(vec![0x5au8; size as usize]);
        let out = scratch.file("moved");
        let input = scratch.file("to-send");
        std::fs::write(&input, &*data)?;
        // Written back before the rounds: otherwise the write-back of up to 1 GiB runs during the first round's
        // programs (its completions charged to whichever thread is on the core, as is the CPU its throttling takes).
        std::fs::File::open(&input)?.sync_all()?;
        // 1 GiB rounds write 1 GiB each (and the file system's rate bounds them): fewer of those.
        let rounds = if size >= 1 << 30 { count(args, 2, 1) } else { count(args, 5, 1) } as usize;
        // [direction][program] -> the rounds' runs.
        let mut by: [Vec<Vec<Run>>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds {
            // Socket -> file, the programs taking turns at going first too (round r starts with program r).
            let n_in = 3 + usize::from(socat);
            let mut rows: Vec<Option<Run>> = vec![None; n_in];
            for p in (0..n_in).map(|i| (i + round) % n_in) {
                back_pages(size);
                let r = match p {
                    0 => {
                        let spec = format!("tcp-listen:127.0.0.1:0 ! file:{}", out.display());
                        flow_run(&spec, Peer::Feed(Feed::Bytes(data.clone())), 0, "flow (splice)".into())?.0
                    }
                    1 => rw_socket_to_file(data.clone(), &out)?,
                    // The flow with `direct`: reads into aligned buffers, O_DIRECT writes (no page-cache copy).
                    2 => {
                        let spec = format!("tcp-listen:127.0.0.1:0 ! file:{} direct", out.display());
                        let what = "flow (O_DIRECT)".to_owned();
                        let (r, fs, _) = flow_run(&spec, Peer::Feed(Feed::Bytes(data.clone())), 0, what)?;
                        if !fs.path.starts_with("direct") && !s.notes.iter().any(|n| n.starts_with("O_DIRECT refused"))
                        {
                            // A file system without O_DIRECT (the flow fell back, rung 4): the row measures that path.
                            s.notes.push(format!("O_DIRECT refused here: the `direct` row took the path {}", fs.path));
                        }
                        r
                    }
                    _ => socat_socket_to_file(data.clone(), &out)?,
                };
                std::fs::remove_file(&out)?;
                rows[p] = Some(r);
            }
            let rows: Vec<Run> = rows.into_iter().flatten().collect();
            // File -> socket. The programs take turns at going first (round r starts with program r): with a fixed
            // order the same program always met whatever the socket -> file runs above left behind (their write-back,
            // freed pages), which could favour or penalise it in every round.
            let progs = 3 + usize::from(socat) + usize::from(variant.is_some());
            let mut back: Vec<Option<Run>> = vec![None; progs];
            for p in (0..progs).map(|i| (i + round) % progs) {
                let r = match p {
                    0 => {
                        let (addr, d) = drained()?;
                        let spec = format!("file:{} ! tcp-connect:{addr}", input.display());
                        flow_run(&spec, Peer::Drain(d), 0, "flow (splice)".into())?.0
                    }
                    1 => rw_file_to_socket(&input)?,
                    2 => sendfile_file_to_socket(&input)?,
                    3 if socat => socat_file_to_socket(&input)?,
                    // `KECHO_BENCH_FLOWS_ENV`: the flow again with those runtime settings; `KECHO_FLOW_SENDFILE=1`
                    // is the bench's name for the sink's `sendfile` option (the library reads no such variable).
                    _ => {
                        let v = variant.as_deref().unwrap_or(&[]);
                        let (addr, d) = drained()?;
                        let sendfile = v.iter().any(|(k, x)| k == SENDFILE_VAR && x == "1");
                        let env: Vec<(String, String)> = v.iter().filter(|(k, _)| k != SENDFILE_VAR).cloned().collect();
                        let opt = if sendfile { " sendfile" } else { "" };
                        let spec = format!("file:{} ! tcp-connect:{addr}{opt}", input.display());
                        let names: Vec<String> = v.iter().map(|(k, x)| format!("{k}={x}")).collect();
                        let what = format!("flow, {}", names.join(" "));
                        with_env(Some(&env), || flow_run(&spec, Peer::Drain(d), 0, what))?.0
                    }
                };
                back[p] = Some(r);
            }
            let back: Vec<Run> = back.into_iter().flatten().collect();
            for (k, set) in [rows, back].into_iter().enumerate() {
                for (j, r) in set.into_iter().enumerate() {
                    anyhow::ensure!(r.bytes == size, "{}: moved {} of {size} bytes", r.what, r.bytes);
                    if by[k].len() <= j {
                        by[k].push(Vec::new());
                    }
                    by[k][j].push(r);
                }
            }
        }
        drop(data);
        std::fs::remove_file(&input)?;
        for (k, name) in ["socket -> file", "file -> socket"].into_iter().enumerate() {
            let meds: Vec<Run> = by[k].iter().map(|rs| median_cpu_run(rs)).collect();
            let ratio = meds[0].cpu_s / meds[1].cpu_s.max(1e-9);
            let per_round = |j: usize| -> Vec<String> {
                by[k][j].iter().zip(&by[k][1]).map(|(f, l)| format!("{:.2}x", f.cpu_s / l.cpu_s.max(1e-9))).collect()
            };
            if size >= 64 << 20 && ratio > worst.0 {
                worst = (ratio, format!("{name}, {}", fmt_bytes(size)));
            }
            let direct = meds.iter().position(|r| r.what == "flow (O_DIRECT)");
            if let (Some(j), true) = (direct, size >= 64 << 20) {
                let r = meds[j].cpu_s / meds[1].cpu_s.max(1e-9);
                if r > worst_direct.0 {
                    worst_direct = (r, fmt_bytes(size));
                }
            }
            if let (Some(j), true) = (meds.iter().position(|r| r.what == "plain sendfile loop"), size >= 64 << 20) {
                s.notes.push(format!(
                    "pure move {name} {}: flow CPU / the plain sendfile loop's {:.2}x; the plain sendfile loop's / \
                     the read-write loop's {:.2}x (medians)",
                    fmt_bytes(size),
                    meds[0].cpu_s / meds[j].cpu_s.max(1e-9),
                    meds[j].cpu_s / meds[1].cpu_s.max(1e-9)
                ));
            }
            if size >= 64 << 20 {
                let env = meds.iter().position(|r| r.what.starts_with("flow, "));
                for j in std::iter::once(0).chain(direct).chain(env) {
                    s.notes.push(format!(
                        "pure move {name} {}: {} CPU / loop CPU per round {}",
                        fmt_bytes(size),
                        meds[j].what,
                        per_round(j).join(", ")
                    ));
                }
            }
            for r in &meds {
                points.push(serde_json::json!({
                    "direction": name, "size": size, "program": r.what, "cpu_s_per_gb": r.cpu_per_gb(), "mb_s": r.mb_s()
                }));
                t.row(vec![
                    name.into(),
                    fmt_bytes(size),
                    r.what.clone(),
                    rounds.to_string(),
                    format!("{:.0}", r.mb_s()),
                    format!("{:.3}", r.cpu_per_gb()),
                    r.syscalls.to_string(),
                    if r.what.starts_with("flow") {
                        fmt_ratio(r.cpu_s / meds[1].cpu_s.max(1e-9))
                    } else {
                        String::new()
                    },
                ]);
            }
            runs.extend(by[k].iter().flatten().cloned());
        }
    }
    s.tables.push(t);
    s.put("moves", points);
    s.checks.push(Check::at_most(
        format!(
            "pure move: flow CPU per GB / read-write loop's (median of rounds; worst of 64 MiB and up, both \
             directions: {})",
            worst.1
        ),
        worst.0,
        0.5,
        "x",
    ));
    if !worst_direct.1.is_empty() {
        s.checks.push(Check::at_most(
            format!(
                "pure move socket -> file with `direct` (O_DIRECT): flow CPU per GB / read-write loop's (median of \
                 rounds; worst of 64 MiB and up: {})",
                worst_direct.1
            ),
            worst_direct.0,
            0.5,
            "x",
        ));
    }
    Ok(())
}

fn fmt_bytes(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{} GiB", b >> 30)
    } else if b >= 1 << 20 {
        format!("{} MiB", b >> 20)
    } else {
        format!("{} KiB", b >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The output check accepts the decrypted stream and nothing else: a flipped byte, a lost record and two
    /// records swapped each fail it.
    #[test]
    fn verify_plain_rejects_lost_swapped_and_corrupt_records() -> Result<()> {
        let scratch = Scratch::new()?;
        let key = Key::new([3; 32]);
        let (n, size) = (300u64, 64usize);
        // The real stream, decrypted by the memory-centric program's own decoder path: the reference output.
        let enc = stream(&key, n, size);
        let opener = Opener::new(&key, &enc[..HEADER_LEN])?;
        let (mut plain, mut at, mut offset) = (Vec::new(), HEADER_LEN, 0u64);
        for index in 0..=n {
            let word = u32::from_be_bytes(enc[at..at + 4].try_into()?);
            let len = (word & 0x00ff_ffff) as usize;
            let rr = record::RecordRef { start: 0, len, index, offset, position: at as u64, word };
            let mut rec = enc[at..at + rr.wire_len()].to_vec();
            let range = opener.open(&rr, &mut rec)?;
            plain.extend_from_slice(&rec[range]);
            at += rr.wire_len();
            offset += len as u64;
        }
        let out = scratch.file("out");
        std::fs::write(&out, &plain)?;
        verify_plain(&out, n, size)?;
        let mut flipped = plain.clone();
        flipped[100 * size + 17] ^= 1;
        std::fs::write(&out, &flipped)?;
        assert!(verify_plain(&out, n, size).is_err(), "a flipped byte passed");
        std::fs::write(&out, &plain[..plain.len() - size])?;
        assert!(verify_plain(&out, n, size).is_err(), "a lost record passed");
        let mut swapped = plain.clone();
        let (a, b) = swapped.split_at_mut(200 * size);
        a[199 * size..].swap_with_slice(&mut b[..size]);
        std::fs::write(&out, &swapped)?;
        assert!(verify_plain(&out, n, size).is_err(), "two swapped records passed");
        Ok(())
    }
}
