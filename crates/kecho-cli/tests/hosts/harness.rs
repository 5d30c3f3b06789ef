//! Hosts on one machine: network namespaces joined by veth pairs to a bridge, real `kecho` processes on them, and
//! the faults a network and its hosts suffer.
//!
//! Layout of one [`Net`] named `khPID-N-`:
//!
//! ```text
//!   namespace khPID-N-br:  br0 10.213.0.254/24 ── p1 ── p2 ── ... (bridge ports; `cut` takes one down)
//!                                                 │     │
//!   namespace khPID-N-h1:  eth0 10.213.0.1/24 ────┘     │
//!   namespace khPID-N-h2:  eth0 10.213.0.2/24 ──────────┘
//! ```
//!
//! The bridge lives in its own namespace, so nothing touches the machine's interfaces and parallel nets may all use
//! the same subnet. Every name carries the test process's id and a counter, so parallel tests and leftovers of a
//! crashed run never collide; `Drop` kills what still runs in the namespaces and deletes them, also on panic.

// Shared by the test files that include it; each uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

/// The port every node listens on (one node per host), so that relays can be put in front of it.
pub const NODE_PORT: u16 = 7500;
/// The registry's port on whichever host runs it.
pub const REGISTRY_PORT: u16 = 7400;
const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 254);
const PREFIX: &str = "kh";

static NETS: AtomicUsize = AtomicUsize::new(0);

/// Runs a command to completion and fails with its standard error if it fails.
fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A set of hosts on one bridge. Hosts are numbered from 1; host `i` has address 10.213.0.`i`.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    hosts: usize,
    relays: Vec<Relay>,
}

impl Net {
    /// Builds `hosts` hosts (at most 16). Fails, saying why, if namespaces cannot be created: a test that needs them
    /// must not pass without them.
    pub fn new(hosts: usize) -> Result<Net> {
        assert!((1..=16).contains(&hosts));
        sweep_stale();
        let prefix = format!("{PREFIX}{}-{}-", std::process::id(), NETS.fetch_add(1, Ordering::Relaxed));
        // From here on Drop deletes whatever was made, also when a step fails.
        let net = Net { prefix, hosts, relays: Vec::new() };
        net.build().context(
            "cannot build the test network (these tests need root, `ip netns` from iproute2 and veth and bridge \
             support in the kernel)",
        )?;
        Ok(net)
    }

    fn build(&self) -> Result<()> {
        let br = self.bridge_ns();
        sh("ip", &["netns", "add", &br])?;
        self.ip(&br, &["link", "set", "lo", "up"])?;
        self.ip(&br, &["link", "add", "br0", "type", "bridge"])?;
        self.ip(&br, &["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"])?;
        self.ip(&br, &["link", "set", "br0", "up"])?;
        for h in 1..=self.hosts {
            let ns = self.ns(h);
            sh("ip", &["netns", "add", &ns])?;
            let port = format!("p{h}");
            self.ip(&br, &["link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            self.ip(&br, &["link", "set", &port, "master", "br0", "up"])?;
            self.ip(&ns, &["addr", "add", &format!("{}/24", self.ip_of(h)), "dev", "eth0"])?;
            self.ip(&ns, &["link", "set", "eth0", "up"])?;
            self.ip(&ns, &["link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    fn bridge_ns(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The namespace of host `h`.
    pub fn ns(&self, h: usize) -> String {
        format!("{}h{h}", self.prefix)
    }

    pub fn ip_of(&self, h: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, 0, h as u8)
    }

    /// `ADDR:PORT` of host `h`.
    pub fn addr(&self, h: usize, port: u16) -> String {
        format!("{}:{port}", self.ip_of(h))
    }

    /// Starts `kecho ARGS` on host `h`.
    pub fn kecho(&self, h: usize, name: &str, args: &[&str]) -> Result<Proc> {
        let mut all = vec!["netns", "exec", &self.ns_ref(h), KECHO].into_iter().map(str::to_owned).collect::<Vec<_>>();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        // `ip netns exec` enters the namespace and then execs kecho, so the child's pid is kecho's own.
        let child = Command::new("ip")
            .args(&all)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {name} on host {h}"))?;
        Ok(Proc::new(name, child))
    }

    fn ns_ref(&self, h: usize) -> String {
        assert!((1..=self.hosts).contains(&h), "no host {h}");
        self.ns(h)
    }

    /// Cuts host `h` off: its bridge port goes down, so its packets vanish as with a pulled cable (its own interface
    /// stays configured, its connections stay open and time out on their own).
    pub fn cut(&self, h: usize) -> Result<()> {
        self.ip(&self.bridge_ns(), &["link", "set", &format!("p{h}"), "down"])?;
        Ok(())
    }

    /// Reconnects host `h` after [`Net::cut`].
    pub fn heal(&self, h: usize) -> Result<()> {
        self.ip(&self.bridge_ns(), &["link", "set", &format!("p{h}"), "up"])?;
        Ok(())
    }

    /// Runs `iptables ARGS` in host `h`'s namespace.
    pub fn iptables(&self, h: usize, args: &[&str]) -> Result<String> {
        let ns = self.ns_ref(h);
        let mut all = vec!["netns", "exec", &ns, "iptables", "-w"];
        all.extend_from_slice(args);
        sh("ip", &all).context("iptables (Debian package iptables) is needed for loss and redirection")
    }

    /// Runs `tc ARGS` in host `h`'s namespace.
    pub fn tc(&self, h: usize, args: &[&str]) -> Result<String> {
        let ns = self.ns_ref(h);
        let mut all = vec!["netns", "exec", &ns, "tc"];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// Routes node traffic between hosts `a` and `b` (both directions, whichever side dials) through relays in the
    /// bridge namespace that hold every chunk back for `delay` plus up to `jitter`, never reordering within a
    /// connection. Returns the relays' byte counter.
    pub fn delay(&mut self, a: usize, b: usize, delay: Duration, jitter: Duration) -> Result<Arc<AtomicU64>> {
        let bytes = Arc::new(AtomicU64::new(0));
        for (from, to) in [(a, b), (b, a)] {
            let port = 9000 + (from * 32 + to) as u16;
            let listen = SocketAddr::from((BRIDGE_IP, port));
            let target = SocketAddr::from((self.ip_of(to), NODE_PORT));
            let relay = Relay::start(&self.bridge_ns(), listen, target, delay, jitter, bytes.clone())?;
            self.relays.push(relay);
            let dst = self.ip_of(to).to_string();
            let via = listen.to_string();
            let dport = NODE_PORT.to_string();
            self.iptables(
                from,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-p",
                    "tcp",
                    "-d",
                    &dst,
                    "--dport",
                    &dport,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &via,
                ],
            )?;
        }
        Ok(bytes)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for r in &self.relays {
            r.stop();
        }
        let mut names: Vec<String> = (1..=self.hosts).map(|h| self.ns(h)).collect();
        names.push(self.bridge_ns());
        for ns in names {
            kill_all_in(&ns);
            let _ = sh("ip", &["netns", "del", &ns]);
        }
    }
}

/// Kills the processes left in a namespace of ours (the tests' own kecho processes) so that none outlives it.
fn kill_all_in(ns: &str) {
    if let Ok(pids) = sh("ip", &["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Deletes namespaces of earlier runs of these tests whose process is gone (a run killed before its `Drop`).
fn sweep_stale() {
    let Ok(list) = sh("ip", &["netns", "list"]) else { return };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(rest) = name.strip_prefix(PREFIX) else { continue };
        let Some(Ok(pid)) = rest.split('-').next().map(str::parse::<u32>) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(name);
            let _ = sh("ip", &["netns", "del", name]);
        }
    }
}

/// One line of a process's output and when the test saw it.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

type Lines = Arc<Mutex<Vec<Line>>>;

/// A `kecho` process on some host, killed when dropped. Its standard output and error are collected line by line
/// with arrival times; reading standard output can be paused, which makes the process block on a full pipe (a sink
/// that stops reading).
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    out: Lines,
    err: Lines,
    paused: Arc<AtomicBool>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

impl Proc {
    fn new(name: &str, mut child: Child) -> Proc {
        let out: Lines = Arc::default();
        let err: Lines = Arc::default();
        let paused = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        if let Some(s) = child.stdout.take() {
            readers.push(collect(s, out.clone(), Some(paused.clone())));
        }
        if let Some(s) = child.stderr.take() {
            readers.push(collect(s, err.clone(), None));
        }
        Proc { name: name.to_owned(), child, out, err, paused, readers, status: None }
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn stdout(&self) -> Vec<Line> {
        self.out.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> Vec<Line> {
        self.err.lock().unwrap().clone()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr().iter().map(|l| l.text.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// Waits (bounded) for a line on standard error containing `needle` and returns when it was seen.
    pub fn wait_stderr(&mut self, needle: &str, within: Duration) -> Result<Instant> {
        self.wait_stderr_after(needle, Instant::now() - Duration::from_secs(3600), within)
    }

    /// Like [`Proc::wait_stderr`], for a line seen after `after`.
    pub fn wait_stderr_after(&mut self, needle: &str, after: Instant, within: Duration) -> Result<Instant> {
        let what = format!("{}: a line with {needle:?} on stderr", self.name);
        self.wait_for(within, &what, |_, err| {
            err.iter().find(|l| l.at >= after && l.text.contains(needle)).map(|l| l.at)
        })
    }

    /// Polls `cond` with the output so far (standard output, standard error) every 20 ms until it gives a value,
    /// for at most `within`; fails early if the process exits.
    pub fn wait_for<T>(
        &mut self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&[Line], &[Line]) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = cond(&self.stdout(), &self.stderr()) {
                return Ok(v);
            }
            if self.exited()? {
                // Give the readers a moment to catch the last lines, then one last look.
                std::thread::sleep(Duration::from_millis(200));
                if let Some(v) = cond(&self.stdout(), &self.stderr()) {
                    return Ok(v);
                }
                bail!("{what}: the process exited ({:?}); stderr:\n{}", self.status, self.stderr_text());
            }
            if Instant::now() > deadline {
                bail!("{what}: not within {within:?}; stderr:\n{}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process has exited (and so its status is known).
    pub fn exited(&mut self) -> Result<bool> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status.is_some())
    }

    /// Waits (bounded) for the process to exit by itself and returns its status; the output stays readable.
    pub fn finish(&mut self, within: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + within;
        while !self.exited()? {
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?}; stderr:\n{}", self.name, self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.drain();
        self.status.context("no status")
    }

    /// After the exit: waits until both pipes are read to the end.
    fn drain(&mut self) {
        self.pause_stdout(false);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    pub fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.status = Some(self.child.wait()?);
        self.drain();
        Ok(())
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the process.
    pub fn freeze(&self, frozen: bool) -> Result<()> {
        use nix::sys::signal::Signal;
        nix::sys::signal::kill(self.pid(), if frozen { Signal::SIGSTOP } else { Signal::SIGCONT })?;
        Ok(())
    }

    /// Stops or resumes reading the process's standard output.
    pub fn pause_stdout(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.freeze(false);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn collect(
    stream: impl Read + Send + 'static,
    lines: Lines,
    paused: Option<Arc<AtomicBool>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = String::new();
        loop {
            while paused.as_ref().is_some_and(|p| p.load(Ordering::SeqCst)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            buf.clear();
            match r.read_line(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = buf.trim_end_matches('\n').to_owned();
                    lines.lock().unwrap().push(Line { at: Instant::now(), text });
                }
            }
        }
    })
}

/// Opens sockets inside a namespace: a thread enters it (`setns` changes only the calling thread) and makes the
/// socket, which then stays in that namespace whichever thread uses it.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
}

/// A TCP relay that delays every chunk it forwards (the fixed delay and jitter `tc netem` would give, without it).
#[derive(Debug)]
struct Relay {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(
        ns: &str,
        listen: SocketAddr,
        target: SocketAddr,
        delay: Duration,
        jitter: Duration,
        bytes: Arc<AtomicU64>,
    ) -> Result<Relay> {
        let listener = in_netns(ns, move || Ok(TcpListener::bind(listen)?))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, conns2, ns) = (stop.clone(), conns.clone(), ns.to_owned());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let (inbound, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                let Ok(outbound) =
                    in_netns(&ns, move || Ok(TcpStream::connect_timeout(&target, Duration::from_secs(2))?))
                else {
                    continue;
                };
                let _ = inbound.set_nonblocking(false);
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let pairs = [(inbound.try_clone(), outbound.try_clone()), (outbound.try_clone(), inbound.try_clone())];
                if let Ok(mut c) = conns2.lock() {
                    c.extend([inbound, outbound]);
                }
                for (seed, pair) in pairs.into_iter().enumerate() {
                    if let (Ok(from), Ok(to)) = pair {
                        pump(from, to, delay, jitter, bytes.clone(), seed as u64 + 1);
                    }
                }
            }
        });
        Ok(Relay { stop, conns })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.conns.lock().unwrap().iter() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Forwards `from` to `to`, each chunk no earlier than `delay` (plus jitter) after it arrived and never before the
/// chunk ahead of it.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, jitter: Duration, bytes: Arc<AtomicU64>, seed: u64) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut last = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let extra = jitter.mul_f64((rng % 1000) as f64 / 1000.0);
            last = last.max(Instant::now() + delay + extra);
            if tx.send((last, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
            bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// What one sink printed, as the loss accounting sees it: per source (its `src` attribute) the sequence numbers in
/// arrival order, and the gaps the sink reported (`kecho: missed N event(s)` on stderr).
#[derive(Debug, Default)]
pub struct Ledger {
    pub by_source: BTreeMap<String, Vec<u64>>,
    /// When each source's events arrived, parallel to `by_source`.
    pub arrivals: BTreeMap<String, Vec<Instant>>,
    pub reported_missing: u64,
    pub gap_reports: usize,
}

impl Ledger {
    pub fn of(sink: &Proc) -> Result<Ledger> {
        Ledger::parse(&sink.name, &sink.stdout(), &sink.stderr())
    }

    pub fn parse(sink: &str, out: &[Line], err: &[Line]) -> Result<Ledger> {
        let mut l = Ledger::default();
        for line in out {
            let v: serde_json::Value =
                serde_json::from_str(&line.text).with_context(|| format!("{sink}: not JSON: {}", line.text))?;
            let src = v["attrs"]["src"].as_str().with_context(|| format!("no src attribute: {}", line.text))?;
            let seq = v["seq"].as_u64().with_context(|| format!("no seq: {}", line.text))?;
            l.by_source.entry(src.to_owned()).or_default().push(seq);
            l.arrivals.entry(src.to_owned()).or_default().push(line.at);
        }
        for line in err {
            if let Some(n) = line.text.strip_prefix("kecho: missed ").and_then(|r| r.split(' ').next()) {
                l.reported_missing += n.parse::<u64>().with_context(|| format!("bad gap report: {}", line.text))?;
                l.gap_reports += 1;
            }
        }
        Ok(l)
    }

    /// The sequence numbers of source `src` that never arrived, for a source that sent `sent` events.
    pub fn missing(&self, src: &str, sent: u64) -> Vec<u64> {
        let got: std::collections::BTreeSet<u64> = self.seqs(src).iter().copied().collect();
        (1..=sent).filter(|s| !got.contains(s)).collect()
    }

    pub fn seqs(&self, src: &str) -> &[u64] {
        self.by_source.get(src).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Checks that each source's events arrived in order without duplicates, and that nothing beyond what was sent
    /// arrived.
    pub fn check_order(&self, sources: &[(&str, u64)], sink: &str) -> Result<()> {
        for (src, seqs) in &self.by_source {
            let Some(&(_, sent)) = sources.iter().find(|(s, _)| s == src) else {
                bail!("{sink}: unknown source {src}")
            };
            if let Some(w) = seqs.windows(2).find(|w| w[1] <= w[0]) {
                bail!("{sink}: events of {src} out of order or repeated: {} then {}", w[0], w[1]);
            }
            if let Some(&last) = seqs.last() {
                if last > sent {
                    bail!("{sink}: {src} sent {sent} events but seq {last} arrived");
                }
            }
        }
        Ok(())
    }

    /// Zero loss, correct order and no gap reported.
    pub fn check_complete(&self, sources: &[(&str, u64)], sink: &str) -> Result<()> {
        self.check_order(sources, sink)?;
        for &(src, sent) in sources {
            let missing = self.missing(src, sent);
            if !missing.is_empty() {
                bail!("{sink}: {} of {sent} events of {src} lost: {}", missing.len(), ranges(&missing));
            }
        }
        if self.gap_reports > 0 {
            bail!("{sink}: reported {} missed events though it should have lost none", self.reported_missing);
        }
        Ok(())
    }

    /// Correct order, and every event that did not arrive is covered by a reported gap: the sink was told of
    /// exactly as many missed events as are missing.
    pub fn check_accounted(&self, sources: &[(&str, u64)], sink: &str) -> Result<()> {
        self.check_order(sources, sink)?;
        let mut missing_total = 0;
        let mut detail = Vec::new();
        for &(src, sent) in sources {
            let m = self.missing(src, sent);
            missing_total += m.len() as u64;
            if !m.is_empty() {
                detail.push(format!("{src}: {} missing ({})", m.len(), ranges(&m)));
            }
        }
        if missing_total != self.reported_missing {
            bail!(
                "{sink}: {missing_total} event(s) missing but {} reported as missed in {} gap report(s); {}",
                self.reported_missing,
                self.gap_reports,
                detail.join("; ")
            );
        }
        Ok(())
    }
}

/// `1-5, 9, 12-14`.
pub fn ranges(seqs: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < seqs.len() {
        let mut j = i;
        while j + 1 < seqs.len() && seqs[j + 1] == seqs[j] + 1 {
            j += 1;
        }
        out.push(if i == j { seqs[i].to_string() } else { format!("{}-{}", seqs[i], seqs[j]) });
        i = j + 1;
    }
    out.join(", ")
}
