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

/// Children's CPU (user + system) in nanoseconds, from /proc/self/stat (clock ticks of 10 ms).
fn children_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is index 0, so cutime is field 16 -> index 13, cstime index 14.
    let ticks: u64 =
        f.get(13).and_then(|x| x.parse().ok()).unwrap_or(0) + f.get(14).and_then(|x| x.parse().ok()).unwrap_or(0);
    ticks * 10_000_000
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
    std::thread::spawn(move || {
        let mut s = connect_retry(addr)?;
        match feed {
            Feed::Bytes(data) => {
                for c in data.chunks(1 << 20) {
                    s.write_all(c)?;
                }
            }
            Feed::File(p) => {
                let f = std::fs::File::open(p)?;
                while rustix::fs::sendfile(&s, &f, None, 4 << 20)? > 0 {}
            }
        }
        drop(s);
        Ok(self_cpu_ns())
    })
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
    let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
    for i in 0..n {
        sealer.seal(i, i * size as u64, &payload, false, &mut out);
    }
    sealer.seal(n, n * size as u64, &[], true, &mut out);
    out
}

/// Figure 1: the program as applications are usually written.
fn memory_centric(key: &Key, data: Feed, out: &Path, records: u64, size: usize) -> Result<Run> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let cpu0 = process_cpu_ns();
    let t = Instant::now();
    let feed = feeder(addr, data);
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
    let secs = t.elapsed().as_secs_f64();
    let feeder_cpu = feed.join().map_err(|_| anyhow::anyhow!("feeder panicked"))??;
    let cpu = process_cpu_ns() - cpu0;
    let syscalls = r.get_ref().1 + w.get_ref().1;
    Ok(Run {
        what: format!("memory-centric {size} B"),
        bytes: moved,
        records,
        secs,
        cpu_s: cpu.saturating_sub(feeder_cpu) as f64 / 1e9,
        syscalls,
    })
}

fn flow_run(spec: &str, feed: Option<Feed>, records: u64, what: String) -> Result<(Run, kecho_flow::FlowStats)> {
    let cpu0 = process_cpu_ns();
    let t = Instant::now();
    let f = Flow::from_spec(&parse(spec).map_err(|e| anyhow::anyhow!("{e}"))?)
        .start()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let feeder_thread = match (feed, f.local_addr()) {
        (Some(d), Some(a)) => Some(feeder(a, d)),
        _ => None,
    };
    let s = f.wait().map_err(|e| anyhow::anyhow!("{e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let feeder_cpu = match feeder_thread {
        Some(h) => h.join().map_err(|_| anyhow::anyhow!("feeder panicked"))??,
        None => 0,
    };
    let cpu = process_cpu_ns() - cpu0;
    let bytes = s.stages.last().map(|x| x.bytes_out).unwrap_or(0);
    Ok((
        Run { what, bytes, records, secs, cpu_s: cpu.saturating_sub(feeder_cpu) as f64 / 1e9, syscalls: s.syscalls },
        s,
    ))
}

/// Socket -> file with a plain read/write loop (64 KiB buffer).
fn rw_socket_to_file(data: std::sync::Arc<Vec<u8>>, out: &Path) -> Result<Run> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let cpu0 = process_cpu_ns();
    let t = Instant::now();
    let feed = feeder(addr, Feed::Bytes(data));
    let (mut s, _) = l.accept()?;
    let mut f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, mut calls) = (0u64, 0u64);
    loop {
        calls += 1;
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        calls += 1;
        f.write_all(&buf[..k])?;
        n += k as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    let fc = feed.join().map_err(|_| anyhow::anyhow!("feeder panicked"))??;
    Ok(Run {
        what: "read/write loop".into(),
        bytes: n,
        records: 0,
        secs,
        cpu_s: (process_cpu_ns() - cpu0).saturating_sub(fc) as f64 / 1e9,
        syscalls: calls,
    })
}

/// A thread that drains a listener and returns its CPU time and the byte count.
fn drainer(l: TcpListener) -> std::thread::JoinHandle<Result<(u64, u64)>> {
    std::thread::spawn(move || {
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

fn rw_file_to_socket(input: &Path) -> Result<Run> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let cpu0 = process_cpu_ns();
    let t = Instant::now();
    let d = drainer(l);
    let mut s = TcpStream::connect(addr)?;
    let mut f = std::fs::File::open(input)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut calls = 0u64;
    loop {
        calls += 1;
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        calls += 1;
        s.write_all(&buf[..k])?;
    }
    drop(s);
    let (dc, n) = d.join().map_err(|_| anyhow::anyhow!("drainer panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    Ok(Run {
        what: "read/write loop".into(),
        bytes: n,
        records: 0,
        secs,
        cpu_s: (process_cpu_ns() - cpu0).saturating_sub(dc) as f64 / 1e9,
        syscalls: calls,
    })
}

fn have_socat() -> bool {
    std::process::Command::new("socat")
        .arg("-V")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn socat_socket_to_file(data: std::sync::Arc<Vec<u8>>, out: &Path) -> Result<Run> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let c0 = children_cpu_ns();
    let t = Instant::now();
    let mut child = std::process::Command::new("socat")
        .args(["-u", &format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"), &format!("CREATE:{}", out.display())])
        .spawn()?;
    let feed = feeder(format!("127.0.0.1:{port}").parse()?, Feed::Bytes(data));
    feed.join().map_err(|_| anyhow::anyhow!("feeder panicked"))??;
    child.wait()?;
    let secs = t.elapsed().as_secs_f64();
    let n = std::fs::metadata(out)?.len();
    Ok(Run {
        what: "socat".into(),
        bytes: n,
        records: 0,
        secs,
        cpu_s: (children_cpu_ns() - c0) as f64 / 1e9,
        syscalls: 0,
    })
}

fn socat_file_to_socket(input: &Path) -> Result<Run> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let c0 = children_cpu_ns();
    let t = Instant::now();
    let d = drainer(l);
    let mut child = std::process::Command::new("socat")
        .args(["-u", &format!("OPEN:{},rdonly", input.display()), &format!("TCP:{addr}")])
        .spawn()?;
    child.wait()?;
    let (_, n) = d.join().map_err(|_| anyhow::anyhow!("drainer panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    Ok(Run {
        what: "socat".into(),
        bytes: n,
        records: 0,
        secs,
        cpu_s: (children_cpu_ns() - c0) as f64 / 1e9,
        syscalls: 0,
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

pub fn run(args: &BenchArgs) -> Result<Section> {
    let mut s = Section::new("flows");
    let scratch = Scratch::new()?;
    let key = Key::new([7; 32]);
    let keyfile = scratch.file("key");
    std::fs::write(&keyfile, [7u8; 32])?;
    let (lt, lj) = limits(&scratch, args)?;
    s.tables.push(lt);
    s.put("limits", lj);

    // 1. Receive -> decrypt -> store.
    let mut t = Table::new(
        "TCP receive -> AES-256-GCM decrypt -> file (paper section 4, Figures 1 and 2)",
        &["records", "program", "records/s", "MB/s", "CPU s/GB", "syscalls/record", "flow / memory-centric"],
    );
    let mut runs = Vec::new();
    for (size, paper) in [(64usize, 1.13), (1024, 1.93)] {
        let n = count(args, 1_000_000, 1000);
        // The stream is sent from a file by sendfile: the feeder must not be what bounds both programs.
        let streamed = scratch.file("stream");
        std::fs::write(&streamed, stream(&key, n, size))?;
        let data = Feed::File(streamed.clone());
        let out = scratch.file("decrypted");
        let mc = memory_centric(&key, data.clone(), &out, n, size)?;
        std::fs::remove_file(&out)?;
        // The flow as declared (the scheduler may replicate decryption), and pinned to one decrypting core.
        let mut flows = Vec::new();
        for (reps, label) in [("auto", "flow"), ("1", "flow, 1 decrypt core")] {
            let spec = format!(
                "tcp-listen:127.0.0.1:0 ! decrypt aes-256-gcm key={} replicas={reps} ! file:{}",
                keyfile.display(),
                out.display()
            );
            let (fl, fs) = flow_run(&spec, Some(data.clone()), n, format!("{label} {size} B"))?;
            std::fs::remove_file(&out)?;
            anyhow::ensure!(
                fl.bytes == mc.bytes && mc.bytes == n * size as u64,
                "byte counts differ: {} {}",
                fl.bytes,
                mc.bytes
            );
            s.notes.push(format!(
                "{label} {size} B: bound by {}; stage busy (per replica): {}",
                fs.bound.as_deref().unwrap_or("-"),
                fs.stages
                    .iter()
                    .map(|x| format!(
                        "{} {:.0}% x{}",
                        x.name.split(':').next().unwrap_or(""),
                        x.busy * 100.0,
                        x.replicas
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            flows.push(fl);
        }
        let ratio = flows[0].rec_s() / mc.rec_s();
        for r in std::iter::once(&mc).chain(&flows) {
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
        s.checks.push(Check::at_least(
            format!("flow / memory-centric throughput at {size} B (paper {paper}x)"),
            ratio,
            if size == 64 { 1.13 } else { 2.0 },
            "x",
        ));
        std::fs::remove_file(&streamed)?;
        runs.push(mc);
        runs.extend(flows);
    }
    s.tables.push(t);

    // 2. Replicated decrypt: file -> decrypt -> /dev/null, 1 KB records.
    let mut t = Table::new(
        "decrypt replicated on 2 cores (file -> decrypt -> /dev/null, 1 KB records)",
        &["replicas", "MB/s", "CPU s/GB", "bound by", "speed-up"],
    );
    let n = count(args, 1_000_000, 1000);
    let enc = scratch.file("enc");
    std::fs::write(&enc, stream(&key, n, 1024))?;
    let mut base = 0.0;
    for reps in [1, 2] {
        let spec = format!(
            "file:{} ! decrypt aes-256-gcm key={} replicas={reps} ! file:/dev/null",
            enc.display(),
            keyfile.display()
        );
        let (r, fs) = flow_run(&spec, None, n, format!("{reps} replicas"))?;
        if reps == 1 {
            base = r.mb_s();
        }
        t.row(vec![
            reps.to_string(),
            format!("{:.0}", r.mb_s()),
            format!("{:.2}", r.cpu_per_gb()),
            fs.bound.clone().unwrap_or_default(),
            fmt_ratio(r.mb_s() / base),
        ]);
        if reps == 2 {
            s.checks.push(Check::at_least("2 decrypt replicas / 1 (decryption bound)", r.mb_s() / base, 1.7, "x"));
        }
        runs.push(r);
    }
    std::fs::remove_file(&enc)?;
    s.tables.push(t);

    // 3. Pure moves.
    let socat = have_socat();
    if !socat {
        s.notes.push("socat is not installed: its rows are left out".into());
    }
    let mut t = Table::new(
        "pure move: flow (zero-copy) against a read/write loop and socat",
        &["direction", "size", "program", "MB/s", "CPU s/GB", "syscalls", "flow CPU / loop CPU"],
    );
    let sizes: Vec<u64> = [64u64 << 10, 1 << 20, 64 << 20, 1 << 30]
        .iter()
        .map(|&b| ((b as f64 * args.scale.min(1.0)) as u64).max(64 << 10))
        .collect();
    let mut worst = 0.0f64;
    for &size in &sizes {
        let data = std::sync::Arc::new(vec![0x5au8; size as usize]);
        let out = scratch.file("moved");
        // Socket -> file.
        let spec = format!("tcp-listen:127.0.0.1:0 ! file:{}", out.display());
        let (fl, _) = flow_run(&spec, Some(Feed::Bytes(data.clone())), 0, "flow (splice)".into())?;
        std::fs::remove_file(&out)?;
        let rw = rw_socket_to_file(data.clone(), &out)?;
        std::fs::remove_file(&out)?;
        let mut rows = vec![fl.clone(), rw.clone()];
        if socat {
            rows.push(socat_socket_to_file(data.clone(), &out)?);
            std::fs::remove_file(&out)?;
        }
        let r1 = fl.cpu_s / rw.cpu_s.max(1e-9);
        if size >= 64 << 20 {
            worst = worst.max(r1);
        }
        for r in &rows {
            t.row(vec![
                "socket -> file".into(),
                fmt_bytes(size),
                r.what.clone(),
                format!("{:.0}", r.mb_s()),
                format!("{:.3}", r.cpu_per_gb()),
                r.syscalls.to_string(),
                if r.what.starts_with("flow") { fmt_ratio(r1) } else { String::new() },
            ]);
        }
        runs.extend(rows);
        // File -> socket.
        std::fs::write(&out, &*data)?;
        drop(data);
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let d = drainer(l);
        let (mut fl, _) = {
            let cpu0 = process_cpu_ns();
            let t0 = Instant::now();
            let st = Flow::from_spec(
                &parse(&format!("file:{} ! tcp-connect:{addr}", out.display())).map_err(|e| anyhow::anyhow!("{e}"))?,
            )
            .start()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .wait()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            let (dc, n) = d.join().map_err(|_| anyhow::anyhow!("drainer panicked"))??;
            (
                Run {
                    what: "flow (sendfile)".into(),
                    bytes: n,
                    records: 0,
                    secs: t0.elapsed().as_secs_f64(),
                    cpu_s: (process_cpu_ns() - cpu0).saturating_sub(dc) as f64 / 1e9,
                    syscalls: st.syscalls,
                },
                st,
            )
        };
        fl.what = "flow (sendfile)".into();
        let rw = rw_file_to_socket(&out)?;
        let mut rows = vec![fl.clone(), rw.clone()];
        if socat {
            rows.push(socat_file_to_socket(&out)?);
        }
        std::fs::remove_file(&out)?;
        let r2 = fl.cpu_s / rw.cpu_s.max(1e-9);
        if size >= 64 << 20 {
            worst = worst.max(r2);
        }
        for r in &rows {
            t.row(vec![
                "file -> socket".into(),
                fmt_bytes(size),
                r.what.clone(),
                format!("{:.0}", r.mb_s()),
                format!("{:.3}", r.cpu_per_gb()),
                r.syscalls.to_string(),
                if r.what.starts_with("flow") { fmt_ratio(r2) } else { String::new() },
            ]);
        }
        runs.extend(rows);
    }
    s.tables.push(t);
    s.checks.push(Check::at_most(
        "pure move: flow CPU per GB / read-write loop's (worst of 64 MiB and up, both directions)",
        worst,
        0.5,
        "x",
    ));
    s.put("runs", &runs);
    s.notes.push("CPU s/GB counts this process minus the peer thread that feeds or drains the socket; socat's is its own (children, 10 ms ticks).".into());
    Ok(s)
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
