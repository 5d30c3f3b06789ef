//! Flags and outputs as a new user meets them from the documentation: the values the docs give are accepted, and
//! a sink that is told of expired events ends on its `--count` and says so once, not once per notice.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

/// A child process killed when dropped, so a failing test leaves nothing behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn spawn(args: &[&str]) -> Result<Proc> {
        let child = Command::new(KECHO)
            .args(args)
            .env_remove("KECHO_REGISTRY")
            .env_remove("KECHO_SAME_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn kecho")?;
        Ok(Proc(child))
    }

    /// Waits (bounded) for the process to exit and returns its output.
    fn finish(mut self, within: Duration) -> Result<Output> {
        let deadline = Instant::now() + within;
        while self.0.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("kecho did not exit within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = std::mem::replace(&mut self.0, Command::new("true").spawn()?);
        Ok(child.wait_with_output()?)
    }
}

fn free_port() -> Result<String> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A registry on a free port, once it listens.
fn registry() -> Result<(Proc, String)> {
    let addr = free_port()?;
    let reg = Proc::spawn(&["registry", "--listen", &addr])?;
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the registry never listened on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((reg, addr))
}

/// Publishes `count` events of `payload` on `channel` with `extra` flags; asserts success.
fn publish(addr: &str, channel: &str, count: &str, extra: &[&str]) -> Result<Output> {
    let mut args = vec!["pub", channel, "--registry", addr, "--count", count, "--wait-sinks", "1"];
    args.extend_from_slice(extra);
    args.push("x");
    let out = Proc::spawn(&args)?.finish(Duration::from_secs(30))?;
    assert!(out.status.success(), "pub {extra:?} failed: {}", text(&out.stderr));
    Ok(out)
}

/// `--urgent-connection on|off|at-once` (docs/PROTOCOL.md) and `KECHO_SAME_HOST=1` are taken as written, by a sink and a
/// source that then exchange events.
#[test]
fn on_off_and_boolish_flag_values_are_accepted() -> Result<()> {
    let (_reg, addr) = registry()?;
    let sub = Proc::spawn(&["sub", "flags", "--registry", &addr, "--count", "3", "--urgent-connection", "off"])?;
    publish(&addr, "flags", "1", &["--urgent-connection", "on", "--priority", "2"])?;
    publish(&addr, "flags", "1", &["--urgent-connection=off"])?;
    publish(&addr, "flags", "1", &["--urgent-connection", "at-once", "--priority", "1"])?;
    let out = sub.finish(Duration::from_secs(20))?;
    assert!(out.status.success(), "sub failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3, "{}", text(&out.stdout));

    for v in ["1", "yes", "on", "true"] {
        let mut c = Command::new(KECHO);
        c.args(["pub", "flags", "--registry", &addr, "--count", "1"]).env("KECHO_SAME_HOST", v);
        let out = c.output()?;
        assert!(out.status.success(), "KECHO_SAME_HOST={v}: {}", text(&out.stderr));
    }
    Ok(())
}

/// A sink whose standard output is not read for the first second while 20,000 events with a 50 ms deadline arrive: most of
/// them expire. `--count 20000` counts the expired ones, so the sink ends (with a failure status and a statement of
/// what it received) instead of waiting forever, and the expiry notices are said in a few lines, not one per notice.
#[test]
fn expired_events_count_towards_count_and_are_said_in_few_lines() -> Result<()> {
    let (_reg, addr) = registry()?;
    let mut sub = Proc::spawn(&["sub", "dl", "--registry", &addr, "--count", "20000"])?;
    let mut stdout = sub.0.stdout.take().context("stdout")?;
    let mut stderr = sub.0.stderr.take().context("stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The publisher ends once its links drained, which needs the sink to read: its output is read a second after the
    // publisher started, while the publisher waits.
    let publisher =
        std::thread::spawn(move || publish(&addr, "dl", "20000", &["--deadline-ms", "50", "--size", "100"]));
    std::thread::sleep(Duration::from_secs(1));
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    publisher.join().map_err(|_| anyhow::anyhow!("publisher thread"))??;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = sub.0.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            bail!("sub --count 20000 did not end though every event was received or reported expired");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let printed = out_reader.join().map_err(|_| anyhow::anyhow!("stdout reader"))?.lines().count() as u64;
    let err = err_reader.join().map_err(|_| anyhow::anyhow!("stderr reader"))?;
    let said: u64 = err
        .lines()
        .filter_map(|l| l.strip_prefix("kecho: ")?.strip_suffix(" event(s) expired before they could be received"))
        .map(|n| n.parse::<u64>())
        .sum::<Result<u64, _>>()?;
    assert!(said > 0, "nothing expired in this run: {err}");
    assert_eq!(printed + said, 20_000, "every event printed or said expired: {err}");
    let lines = err.lines().filter(|l| l.contains("expired before they could be received")).count();
    assert!(lines <= 40, "{lines} lines of expiry notices: {err}");
    assert!(!status.success(), "a sink that received fewer than --count events fails: {err}");
    assert!(err.contains(&format!("received {printed} of 20000 event(s); 0 reported missed, {said} expired")), "{err}");
    Ok(())
}

/// `kecho flow run SPEC --json`: an option after the spec is taken by the spec (whose words may start with `-`);
/// the error says to give it before the spec rather than calling it an unknown endpoint option, and given there it
/// works. `-` still names standard input and output.
#[test]
fn an_option_after_the_flow_spec_is_named_as_such() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-user-flags-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (input, output) = (dir.join("in"), dir.join("out"));
    std::fs::write(&input, vec![5u8; 70_000])?;
    let spec = format!("file:{} ! checksum ! file:{}", input.display(), output.display());
    let flow = |args: &[&str]| Command::new(KECHO).args(args).env("KECHO_FLOW_DIR", dir.join("ctl")).output();
    let out = flow(&["flow", "run", &spec, "--json"])?;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("`--json` follows the flow spec") && err.contains("before the spec"), "{err}");
    assert!(!output.exists(), "nothing ran");

    let out = flow(&["flow", "run", "--json", &spec])?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout).context("the final counters as JSON")?;
    assert_eq!(stats["bytes_in"], 70_000, "{stats}");
    assert_eq!(std::fs::read(&output)?.len(), 70_000);

    let mut c = Command::new(KECHO);
    c.args(["flow", "run", "--dir"]).arg(dir.join("ctl")).args(["-", "!", "-"]);
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, b"through\n")?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "through\n");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `kecho record CHANNEL --dir DIR --print` beside a running recorder (docs/DURABILITY.md) reads the recording and
/// writes nothing: a half-written last record (the recorder's write in progress) is left as it is (it was cut off,
/// after which the recorder wrote on past a hole), and a directory without a recording is an error, not created.
#[test]
fn printing_a_recording_writes_nothing() -> Result<()> {
    use kecho_store::{LogOptions, Recorded, Recorder};
    let dir = tempfile::tempdir()?;
    let rec_dir = dir.path().join("rec");
    let mut rec = Recorder::open(&rec_dir, LogOptions::default())?;
    for seq in 1..=3 {
        let ev = Recorded {
            source: kecho::SourceKey(7),
            seq,
            ty: "t".into(),
            attrs: kecho::Attrs::default(),
            payload: format!("event {seq}").into_bytes().into(),
        };
        rec.record(&ev)?;
    }
    rec.flush()?;
    drop(rec);
    let seg = rec_dir.join("00000000000000000000.log");
    // The first bytes of a fourth record, as a recorder in the middle of a write leaves them.
    std::fs::OpenOptions::new().append(true).open(&seg)?.write_all(&[40, 0, 0, 0, 1, 2])?;
    let before = std::fs::read(&seg)?;

    let out = Command::new(KECHO).args(["record", "c", "--print", "--dir"]).arg(&rec_dir).output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> =
        text(&out.stdout).lines().map(serde_json::from_str).collect::<Result<_, _>>().context("JSON lines")?;
    let seqs: Vec<u64> = lines.iter().filter_map(|l| l["seq"].as_u64()).collect();
    assert_eq!(seqs, [1, 2, 3], "{lines:?}");
    assert!(text(&out.stderr).contains("not a whole record"), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&seg)?, before, "the recording is as it was");

    let missing = dir.path().join("none");
    let out = Command::new(KECHO).args(["record", "c", "--print", "--dir"]).arg(&missing).output()?;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no recording in"), "{}", text(&out.stderr));
    assert!(!missing.exists(), "--print created {}", missing.display());
    Ok(())
}

/// `kecho flow stop ID` ends the flow with a statement of what it moved, not as a failure of the flow ("flow
/// failed: stopped"); the status still says that the source did not end.
#[test]
fn a_stopped_flow_says_what_it_moved() -> Result<()> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let ctl = dir.path().join("ctl");
    let spec = format!("tcp-listen:127.0.0.1:0 ! file:{}", dir.path().join("out").display());
    let mut flow = Command::new(KECHO)
        .args(["flow", "run", &spec])
        .env("KECHO_FLOW_DIR", &ctl)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = std::io::BufReader::new(flow.stderr.take().context("stderr")?).lines();
    let first = lines.next().context("a line")??;
    let addr = first.rsplit(' ').next().context("the address")?.to_owned();
    let flow = Proc(flow);
    let mut conn = std::net::TcpStream::connect(&addr)?;
    conn.write_all(&[1u8; 1000])?;
    let t = Instant::now();
    loop {
        let ls = Command::new(KECHO).args(["flow", "ls"]).env("KECHO_FLOW_DIR", &ctl).output()?;
        let ls = text(&ls.stdout);
        if ls.contains(" 1000 ") {
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the flow never showed its 1000 bytes: {ls}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = Command::new(KECHO).args(["flow", "stop", "1"]).env("KECHO_FLOW_DIR", &ctl).output()?;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = {
        let mut flow = flow;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = flow.0.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                bail!("the stopped flow did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let rest = rest.join("\n");
    assert!(!status.success(), "{rest}");
    assert!(rest.contains("flow 1 stopped before its source ended: 1000 bytes in, 1000 bytes out"), "{rest}");
    assert!(!rest.contains("failed"), "{rest}");
    Ok(())
}

/// Values the command line cannot use get errors that say why in its terms: an `app:` sink (a library program's
/// function), a tree threshold of 0.
#[test]
fn library_only_and_impossible_values_are_explained() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = Command::new(KECHO)
        .args(["flow", "run", "-", "!", "app:store"])
        .env("KECHO_FLOW_DIR", dir.path())
        .stdin(Stdio::null())
        .output()?;
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("`app:store`") && err.contains("the command line has none"), "{err}");

    let out = Command::new(KECHO).args(["pub", "c", "--tree-threshold", "0"]).env_remove("KECHO_REGISTRY").output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("at least one member node") && !err.contains("18446744073709551615"), "{err}");
    Ok(())
}

/// `urgent-connection = false` in a config file (a TOML boolean, as `same-host = true` is) is taken like
/// `--urgent-connection off`: the command gets as far as the (absent) registry instead of refusing the value.
#[test]
fn a_config_file_boolean_sets_an_on_off_flag() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("kecho.toml");
    std::fs::write(&cfg, "urgent-connection = false\nsame-host = true\n")?;
    let dead = free_port()?;
    let out = Command::new(KECHO)
        .arg("--config")
        .arg(&cfg)
        .args(["pub", "c", "--registry", &dead, "--count", "1", "--timeout", "2"])
        .env_remove("KECHO_SAME_HOST")
        .output()?;
    let err = text(&out.stderr);
    assert!(!out.status.success(), "no registry there: {err}");
    assert!(!err.contains("invalid value") && out.status.code() != Some(2), "{err}");
    assert!(err.contains("registry"), "{err}");
    Ok(())
}
