//! `kecho flow` as a user runs it: encrypt and decrypt files, a corrupted record, a bad spec, ls/stats/stop.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("kecho-flow-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kecho ARGS` with the test's own control-socket directory.
fn command(dir: &Dir, args: &[&str]) -> Command {
    let mut c = Command::new(KECHO);
    c.args(args).env("KECHO_FLOW_DIR", dir.path("ctl"));
    c
}

fn kecho(dir: &Dir, args: &[&str]) -> Result<Output> {
    command(dir, args).output().context("run kecho")
}

/// Starts `kecho flow run [OPTIONS] SPEC` (a `tcp-listen:` source on port 0) and returns the child and the address
/// it printed on standard error. The rest of its standard error is drained by a thread (a closed pipe would fail the
/// child's next message).
fn spawn_listening(dir: &Dir, options: &[&str], spec: &str) -> Result<(Child, String)> {
    let mut args = vec!["flow", "run"];
    args.extend_from_slice(options);
    args.push(spec);
    let mut child = command(dir, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    for line in lines.by_ref().take(5) {
        let line = line?;
        if line.contains("listening on") {
            let addr = line.rsplit(' ').next().context("address")?.to_owned();
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, addr));
        }
    }
    let _ = child.kill();
    bail!("no `listening on` line")
}

/// Polls `f` every 50 ms until it returns a value, for at most 10 s (`what` names what was awaited).
fn await_some<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let t = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn encrypt_decrypt_and_corruption_from_the_command_line() -> Result<()> {
    let d = Dir::new("crypt");
    let key = d.path("key");
    std::fs::write(&key, [42u8; 32])?;
    let input: Vec<u8> = (0..500_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
    std::fs::write(d.path("in"), &input)?;
    let enc = format!("file:{} ! encrypt aes-256-gcm key={key} record=1000 ! file:{}", d.path("in"), d.path("enc"));
    let out = kecho(&d, &["flow", "run", &enc])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Unquoted words work too.
    let dec = format!("file:{} ! decrypt aes-256-gcm key={key} ! file:{}", d.path("enc"), d.path("out"));
    let words: Vec<&str> = dec.split(' ').collect();
    let mut args = vec!["flow", "run"];
    args.extend(&words);
    let out = kecho(&d, &args)?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("done: "), "{}", text(&out.stderr));
    assert!(std::fs::read(d.path("out"))? == input);

    // One flipped byte in record 5 (each record is 4 + 1000 + 16 bytes after the 44-byte header).
    let mut bytes = std::fs::read(d.path("enc"))?;
    bytes[44 + 5 * 1020 + 500] ^= 1;
    std::fs::write(d.path("enc"), &bytes)?;
    let out = kecho(&d, &["flow", "run", &dec])?;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains(&format!("authentication failed for record 5 at byte offset {}", 44 + 5 * 1020)), "{err}");
    assert_eq!(std::fs::read(d.path("out"))?, &input[..5000], "only the records before the bad one are written");
    Ok(())
}

#[test]
fn a_bad_spec_shows_a_caret_under_the_token() -> Result<()> {
    let d = Dir::new("caret");
    let out = kecho(&d, &["flow", "run", "file:a ! compress brotli ! file:b"])?;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("unknown codec `brotli`"), "{err}");
    assert!(err.contains("  file:a ! compress brotli ! file:b\n"), "{err}");
    assert!(err.contains(&format!("\n  {}^^^^^^", " ".repeat(18))), "{err}");
    Ok(())
}

#[test]
fn ls_stats_and_stop_a_running_flow() -> Result<()> {
    let d = Dir::new("ls");
    let (mut child, addr) =
        spawn_listening(&d, &[], &format!("tcp-listen:127.0.0.1:0 ! checksum ! file:{}", d.path("out")))?;
    let mut conn = std::net::TcpStream::connect(&addr)?;
    std::io::Write::write_all(&mut conn, &[7u8; 100_000])?;
    // Wait until the flow registered and moved the bytes.
    let ls = await_some("the flow in `flow ls`", || {
        let s = text(&kecho(&d, &["flow", "ls"])?.stdout);
        Ok((s.contains("running") && s.contains("100000")).then_some(s))
    })?;
    // Every stage is listed with how busy it is, whichever stage (if any) bounds the flow; it is idle now.
    let line = ls.lines().nth(1).context("a flow line")?;
    assert!(line.contains(" copy "), "{ls}");
    assert!(line.contains("tcp-listen:127.0.0.1:0 ") && line.contains(" ! checksum crc32 "), "{ls}");
    assert!(line.contains(&format!(" ! file:{} ", d.path("out"))), "{ls}");
    let id = ls.lines().nth(1).and_then(|l| l.split_whitespace().next()).context("id")?.to_owned();
    let stats = text(&kecho(&d, &["flow", "stats", &id])?.stdout);
    assert!(stats.contains("STAGE") && stats.contains("bound by:"), "{stats}");
    let out = kecho(&d, &["flow", "stop", &id])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = child.wait()?;
    assert!(!status.success(), "a stopped flow exits with failure");
    assert!(text(&kecho(&d, &["flow", "ls"])?.stdout).contains("no flows"));
    Ok(())
}

/// `-` is this process's standard input as a source and standard output as a sink: untransformed (splice between
/// the pipes) and through compress/decompress.
#[test]
fn stdin_and_stdout_endpoints() -> Result<()> {
    let d = Dir::new("stdio");
    let input: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8 ^ (i / 4093) as u8).collect();
    let pipe_through = |spec: &str, data: &[u8]| -> Result<Vec<u8>> {
        let mut child = command(&d, &["flow", "run", spec])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        let data = data.to_vec();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
        let out = child.wait_with_output()?;
        writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
        if !out.status.success() {
            bail!("{spec}: {}", text(&out.stderr));
        }
        assert!(text(&out.stderr).contains("done: "), "{}", text(&out.stderr));
        Ok(out.stdout)
    };
    assert!(pipe_through("- ! -", &input)? == input);
    let z = pipe_through("- ! compress zstd ! -", &input)?;
    assert!(z.len() < input.len() / 2, "compressed {} of {}", z.len(), input.len());
    assert!(pipe_through("- ! decompress zstd ! checksum ! -", &z)? == input);
    Ok(())
}

/// `kecho flow run --metrics ADDR` serves the flow's per-stage counters; scraped while the flow runs, they follow
/// the bytes sent.
#[test]
fn a_running_flow_serves_prometheus_metrics() -> Result<()> {
    use kecho_metrics::text::{parse, value};
    let d = Dir::new("metrics");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let metrics = format!("127.0.0.1:{port}");
    let (mut child, addr) = spawn_listening(
        &d,
        &["--metrics", &metrics],
        &format!("tcp-listen:127.0.0.1:0 ! checksum ! file:{}", d.path("out")),
    )?;
    let scrape = || -> Result<Vec<kecho_metrics::text::Sample>> {
        let mut s = std::net::TcpStream::connect(&metrics)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        std::io::Write::write_all(
            &mut s,
            format!("GET /metrics HTTP/1.1\r\nHost: {metrics}\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body)?;
        anyhow::ensure!(body.starts_with("HTTP/1.1 200"), "{body}");
        let body = body.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
        Ok(parse(body)?)
    };
    let stage = |i: &'static str, name: String, kind: &'static str| -> Vec<(&'static str, String)> {
        vec![("flow", "1".into()), ("stage", name), ("index", i.into()), ("kind", kind.into())]
    };
    let get = |samples: &[kecho_metrics::text::Sample], metric: &str, labels: &[(&'static str, String)]| {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
        value(samples, metric, &l)
    };
    let checksum = stage("1", "checksum crc32".into(), "transform");
    let sink = stage("2", format!("file:{}", d.path("out")), "sink");
    let before = scrape()?;
    assert_eq!(value(&before, "kecho_flow_running", &[("flow", "1")]), Some(1.0));
    assert_eq!(get(&before, "kecho_flow_stage_in_bytes_total", &checksum), Some(0.0));
    let mut conn = std::net::TcpStream::connect(&addr)?;
    let mut sent = 0u64;
    for round in 1..=2u64 {
        std::io::Write::write_all(&mut conn, &[round as u8; 70_000])?;
        sent += 70_000;
        let now = await_some(&format!("the sink's bytes to reach {sent}"), || {
            let now = scrape()?;
            Ok((get(&now, "kecho_flow_stage_out_bytes_total", &sink) == Some(sent as f64)).then_some(now))
        })?;
        assert_eq!(get(&now, "kecho_flow_stage_in_bytes_total", &checksum), Some(sent as f64));
        assert!(get(&now, "kecho_flow_stage_syscalls_total", &sink).is_some_and(|v| v >= round as f64));
        assert!(get(&now, "kecho_flow_stage_busy_seconds_total", &checksum).is_some_and(|v| v > 0.0));
        assert_eq!(get(&now, "kecho_flow_stage_replicas", &checksum), Some(1.0));
    }
    drop(conn);
    let status = child.wait()?;
    assert!(status.success());
    Ok(())
}

/// A reader that goes away (`kecho flow run --json ... | head -1`) is not a crash: the flow's result stands.
#[test]
fn a_closed_standard_output_is_not_a_crash() -> Result<()> {
    let d = Dir::new("epipe");
    std::fs::write(d.path("in"), vec![5u8; 200_000])?;
    let spec = format!("file:{} ! checksum ! file:{}", d.path("in"), d.path("out"));
    let mut child =
        command(&d, &["flow", "run", "--json", &spec]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    let err = text(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.status.success(), "{err}");
    assert_eq!(std::fs::read(d.path("out"))?.len(), 200_000);
    Ok(())
}
