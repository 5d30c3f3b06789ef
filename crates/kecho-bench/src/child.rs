//! Child processes: a source or a sink node in a process of its own, so that a tracer (strace, perf) counts that
//! node's system calls and nothing else; and the memory probe, which needs a fresh process.
//!
//! A child is this same program run again with `--child ROLE` appended to its arguments (so it works both as
//! `kecho-bench` and as `kecho bench`), or the binary given with `--exe`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho::{Attrs, Node, Overflow, RecvError, SinkOptions};

use crate::BenchArgs;

/// The program and arguments that run this suite as a child with `role`.
pub fn command(args: &BenchArgs, role: &str) -> Result<(PathBuf, Vec<OsString>)> {
    let extra = [OsString::from("--child"), OsString::from(role)];
    match &args.exe {
        Some(exe) => Ok((exe.clone(), extra.to_vec())),
        None => {
            let exe = std::env::current_exe().context("locating this program")?;
            let mut argv: Vec<OsString> = std::env::args_os().skip(1).collect();
            argv.extend(extra);
            Ok((exe, argv))
        }
    }
}

/// Runs a child role (called when `--child` is given).
pub fn run(role: &str) -> Result<()> {
    let parts: Vec<&str> = role.split(',').collect();
    match parts.as_slice() {
        ["source", registry, channel, n, size] => source(registry.parse()?, channel, n.parse()?, size.parse()?),
        ["sink", registry, channel, n] => sink(registry.parse()?, channel, n.parse()?),
        ["memory", channels, members] => crate::memory::child(channels.parse()?, members.parse()?),
        ["members", registry, channel] => crate::members::child(registry.parse()?, channel),
        ["local-echo", addr, n] => crate::local::echo_child(addr.parse()?, n.parse()?),
        ["local-kecho", registry, channel, ll, sh, n] => {
            crate::local::kecho_child(registry.parse()?, channel, ll, sh, n.parse()?)
        }
        ["local-count", registry, channel, ll, sh, n, batch] => {
            crate::local::count_child(registry.parse()?, channel, ll, sh, n.parse()?, batch.parse()?)
        }
        ["urgent-net-b", quic, two, _, _, n] => crate::urgent_net::child_b(quic.parse()?, two.parse()?, n.parse()?),
        ["urgent-net-a", quic, two, prio, bulk, n] => {
            crate::urgent_net::child_a(quic.parse()?, two.parse()?, prio.parse()?, bulk.parse()?, n.parse()?)
        }
        _ => bail!("unknown child role {role:?}"),
    }
}

fn child_runtime() -> Result<tokio::runtime::Runtime> {
    crate::util::runtime()
}

/// Joins the channel, waits for one sink, submits `n` events, then stays until its standard input closes (so that
/// the parent decides when the events have all arrived).
fn source(registry: SocketAddr, channel: &str, n: u64, size: usize) -> Result<()> {
    let rt = child_runtime()?;
    rt.block_on(async {
        let node = Node::builder().registry(registry).start().await?;
        let ch = node.open_channel(channel).await?;
        ch.wait_for_sinks(1, Duration::from_secs(10)).await?;
        let mut src = ch.source()?;
        let payload = vec![0x5au8; size];
        let attrs = Attrs::new();
        for _ in 0..n {
            src.submit("e", &attrs, &payload).await?;
        }
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            std::io::stdin().read_to_end(&mut sink)
        })
        .await??;
        drop(src);
        node.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })?;
    println!("done");
    Ok(())
}

/// Joins the channel with one sink, says "ready", receives `n` events and leaves.
fn sink(registry: SocketAddr, channel: &str, n: u64) -> Result<()> {
    let rt = child_runtime()?;
    let (got, lost) = rt.block_on(async {
        let node = Node::builder().registry(registry).start().await?;
        let ch = node.open_channel(channel).await?;
        let mut sink = ch.sink(SinkOptions::new().capacity(65_536).overflow(Overflow::Block))?;
        println!("ready");
        std::io::stdout().flush()?;
        let (mut got, mut lost) = (0u64, 0u64);
        while got + lost < n {
            match tokio::time::timeout(Duration::from_secs(30), sink.recv()).await {
                Ok(Ok(_)) => got += 1,
                Ok(Err(RecvError::Lagged(k))) => lost += k,
                Ok(Err(_)) | Err(_) => break,
            }
        }
        drop(sink);
        node.shutdown().await;
        Ok::<_, anyhow::Error>((got, lost))
    })?;
    println!("received {got} lost {lost}");
    Ok(())
}

/// A system-call counter wrapped around a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Tracer {
    /// `perf stat -e raw_syscalls:sys_enter`: counts in the kernel without stopping the process.
    Perf,
    /// `strace -f -c`: stops the process at every call (slower), but names each call.
    Strace,
}

impl Tracer {
    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Tracer::Perf => "perf stat",
            Tracer::Strace => "strace -c -f",
        }
    }

    /// Whether the tool is installed and allowed here.
    pub fn available(self) -> bool {
        let probe = match self {
            Tracer::Perf => Command::new("perf")
                .args(["stat", "-e", "raw_syscalls:sys_enter", "-x,", "--", "true"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status(),
            Tracer::Strace => Command::new("strace").args(["-c", "-o", "/dev/null", "--", "true"]).status(),
        };
        probe.map(|s| s.success()).unwrap_or(false)
    }
}

/// A child running under a tracer that writes its summary to `out`.
pub struct Traced {
    /// The child (the tracer, which runs the program).
    pub child: Child,
    out: PathBuf,
    tracer: Tracer,
}

/// System calls counted in one child's life.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Counts {
    /// All calls.
    pub total: u64,
    /// Per call name, most frequent first (strace only).
    pub by_name: Vec<(String, u64)>,
}

impl Traced {
    /// Starts `args`' child `role` under `tracer`; standard input and output are piped.
    pub fn spawn(args: &BenchArgs, role: &str, tracer: Tracer, out: PathBuf) -> Result<Traced> {
        let (exe, argv) = command(args, role)?;
        let mut cmd = match tracer {
            Tracer::Perf => {
                let mut c = Command::new("perf");
                c.args(["stat", "-e", "raw_syscalls:sys_enter", "-x,", "-o"]).arg(&out).arg("--");
                c
            }
            Tracer::Strace => {
                let mut c = Command::new("strace");
                c.args(["-f", "-c", "-o"]).arg(&out).arg("--");
                c
            }
        };
        cmd.arg(exe).args(argv).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let child = cmd.spawn().with_context(|| format!("starting {}", tracer.name()))?;
        Ok(Traced { child, out, tracer })
    }

    /// Closes the child's standard input (a source child then leaves).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits for the first line the child prints.
    pub fn read_line(&mut self) -> Result<String> {
        let out = self.child.stdout.as_mut().context("child stdout")?;
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b)? == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Waits at most `timeout` for the child to exit (killing it after that) and reads the tracer's counts.
    pub fn finish(mut self, timeout: Duration) -> Result<Counts> {
        wait_bounded(&mut self.child, timeout)?;
        let text = std::fs::read_to_string(&self.out).with_context(|| format!("reading {}", self.out.display()))?;
        let _ = std::fs::remove_file(&self.out);
        match self.tracer {
            Tracer::Perf => parse_perf(&text),
            Tracer::Strace => parse_strace(&text),
        }
    }
}

/// Waits for a child to exit, killing it after `timeout`.
pub fn wait_bounded(child: &mut Child, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("child exited with {status}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("child killed after {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `perf stat -x,` output: `COUNT,,raw_syscalls:sys_enter,...`.
fn parse_perf(text: &str) -> Result<Counts> {
    for line in text.lines() {
        if line.contains("raw_syscalls:sys_enter") {
            let n = line.split(',').next().unwrap_or("").trim();
            let total = n.parse().with_context(|| format!("perf count {n:?}"))?;
            return Ok(Counts { total, by_name: Vec::new() });
        }
    }
    bail!("no count in perf output: {text:?}")
}

/// `strace -c` summary: one line per call (`% time  seconds  usecs/call  calls  [errors]  syscall`) and a total.
fn parse_strace(text: &str) -> Result<Counts> {
    let mut counts = Counts::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let (Ok(calls), Some(name)) = (f[3].parse::<u64>(), f.last()) else { continue };
        if *name == "total" {
            counts.total = calls;
        } else {
            counts.by_name.push(((*name).to_owned(), calls));
        }
    }
    if counts.total == 0 && counts.by_name.is_empty() {
        bail!("no summary in strace output: {text:?}");
    }
    counts.by_name.sort_by_key(|x| std::cmp::Reverse(x.1));
    Ok(counts)
}
