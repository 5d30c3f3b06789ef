//! The `kecho` binary, run as separate processes on loopback.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

/// A child process killed when dropped, so a failing test leaves nothing behind.
struct Proc {
    child: Child,
    name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(name: &str, args: &[&str]) -> Result<Proc> {
        let child = Command::new(KECHO)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc { child, name: name.to_owned() })
    }

    /// Waits for a line on standard error containing `needle`; the rest of stderr keeps draining in the background.
    fn wait_stderr(&mut self, needle: &str) -> Result<()> {
        let err = self.child.stderr.take().context("stderr taken")?;
        let (tx, rx) = mpsc::channel();
        let needle = needle.to_owned();
        std::thread::spawn(move || {
            let mut seen = false;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if !seen && line.contains(&needle) {
                    seen = true;
                    let _ = tx.send(Ok(()));
                }
                if !seen {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(line)) => lines.push(line),
                Err(_) => bail!("{} never printed the expected line; stderr: {lines:?}", self.name),
            }
        }
    }

    /// Waits for exit (bounded) and returns the output.
    fn finish(mut self, within: Duration) -> Result<Output> {
        let deadline = Instant::now() + within;
        loop {
            if self.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let child = std::mem::replace(&mut self.child, Command::new("true").spawn()?);
        Ok(child.wait_with_output()?)
    }

    /// Sends SIGINT (what Ctrl-C does): a subscriber stops cleanly.
    fn interrupt(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
        Ok(())
    }

    fn kill9(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

fn free_port() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn registry(addr: &str) -> Result<Proc> {
    let mut r = Proc::spawn("registry", &["registry", "--listen", addr])?;
    r.wait_stderr("listening")?;
    Ok(r)
}

fn subscriber(addr: &str, channel: &str, extra: &[&str]) -> Result<Proc> {
    let mut args = vec!["sub", channel, "--registry", addr];
    args.extend_from_slice(extra);
    let mut s = Proc::spawn("sub", &args)?;
    s.wait_stderr("subscribed")?;
    Ok(s)
}

/// Runs a command to completion (bounded).
fn run(args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = Command::new(KECHO)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(input) = stdin {
        use std::io::Write;
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    Proc { child, name: args.join(" ") }.finish(Duration::from_secs(30))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json_lines(o: &Output) -> Result<Vec<serde_json::Value>> {
    stdout(o).lines().map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))).collect()
}

/// Checks a failing command: non-zero exit, one line on stderr mentioning `needle`, no panic.
fn check_error(args: &[&str], needle: &str) -> Result<()> {
    let o = run(args, None)?;
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: stderr {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{args:?} panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: not one line: {err:?}");
    Ok(())
}

#[test]
fn pub_sub_json_across_processes() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let sub = subscriber(&addr, "news", &["--count", "3", "--format", "json"])?;
    let p = run(
        &[
            "pub",
            "news",
            "--registry",
            &addr,
            "--type",
            "greet",
            "--attr",
            "lang=en",
            "--attr",
            "n=5",
            "--attr",
            "raw:hex=00ff",
            "--count",
            "3",
            "--wait-sinks",
            "1",
            "hello",
        ],
        None,
    )?;
    assert!(p.status.success(), "pub failed: {}", stderr(&p));
    let o = sub.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "sub failed: {}", stderr(&o));
    let lines = json_lines(&o)?;
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["type"], "greet");
        assert_eq!(l["seq"], i as u64 + 1);
        assert_eq!(l["attrs"]["lang"], "en");
        assert_eq!(l["attrs"]["n"], 5);
        assert_eq!(l["attrs"]["raw"]["base64"], "AP8=");
        assert_eq!(l["payload"], "hello");
        assert_eq!(l["payload_encoding"], "utf8");
        let source = l["source"].as_str().context("source")?;
        assert!(source.len() == 16 && source.chars().all(|c| c.is_ascii_hexdigit()), "opaque source key {source}");
        assert_eq!(l["source"], lines[0]["source"], "one source, one key");
    }
    Ok(())
}

#[test]
fn stdin_lines_and_type_filter() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let sub = subscriber(&addr, "logs", &["--type", "error", "--count", "2"])?;
    let p = run(&["pub", "logs", "--registry", &addr, "--type", "info", "--wait-sinks", "1", "-"], Some("a\nb\n"))?;
    assert!(p.status.success(), "{}", stderr(&p));
    let p = run(&["pub", "logs", "--registry", &addr, "--type", "error", "--wait-sinks", "1", "-"], Some("x\ny\n"))?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = sub.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["error #1 | x", "error #2 | y"], "{out}");
    Ok(())
}

#[test]
fn registry_address_comes_from_the_environment() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let spawn = |args: &[&str]| {
        Command::new(KECHO)
            .args(args)
            .env("KECHO_REGISTRY", &addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let mut sub = Proc { child: spawn(&["sub", "env-channel", "--count", "1"])?, name: "sub".into() };
    sub.wait_stderr("subscribed")?;
    let p = Proc { child: spawn(&["pub", "env-channel", "--wait-sinks", "1", "via-env"])?, name: "pub".into() };
    let p = p.finish(Duration::from_secs(20))?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = sub.finish(Duration::from_secs(20))?;
    assert!(stdout(&o).contains("| via-env"), "{}", stdout(&o));
    // The flag wins over the variable.
    let o =
        Command::new(KECHO).args(["channels", "--registry", "127.0.0.1:1"]).env("KECHO_REGISTRY", &addr).output()?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("127.0.0.1:1"), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

#[test]
fn channels_lists_member_counts() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let _s1 = subscriber(&addr, "room", &[])?;
    let _s2 = subscriber(&addr, "room", &[])?;
    // The contact reports counts within a quarter of a second of a change.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let o = run(&["channels", "--registry", &addr], None)?;
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        let row = out.lines().find(|l| l.starts_with("room")).map(|l| l.split_whitespace().collect::<Vec<_>>());
        if let Some(r) = row {
            if r[1] == "0" && r[2] == "2" {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("channels never showed 2 sinks: {out}");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn errors_are_one_line_and_non_zero() -> Result<()> {
    let dead = free_port()?;
    check_error(&["channels", "--registry", &dead], "unreachable")?;
    check_error(&["pub", "x", "--registry", &dead, "hi"], "unreachable")?;
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    check_error(&["pub", "missing", "--registry", &addr, "--existing", "hi"], "unknown channel")?;
    check_error(&["sub", "missing", "--registry", &addr, "--existing"], "unknown channel")?;
    check_error(&["pub", "c", "--registry", &addr, "--attr", "novalue", "hi"], "malformed --attr")?;
    check_error(&["registry", "--listen", &addr], "in use")?;
    check_error(&["pub", "lonely", "--registry", &addr, "--wait-sinks", "1", "--timeout", "0.5", "hi"], "timed out")?;
    Ok(())
}

#[test]
fn killed_subscriber_is_dropped_and_the_rest_carry_on() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let survivor = subscriber(&addr, "k", &["--count", "1", "--type", "after"])?;
    let mut victim = subscriber(&addr, "k", &[])?;
    let p = run(&["pub", "k", "--registry", &addr, "--type", "before", "--wait-sinks", "2"], None)?;
    assert!(p.status.success(), "{}", stderr(&p));
    victim.kill9()?;
    let p = run(&["pub", "k", "--registry", &addr, "--type", "after", "--wait-sinks", "1", "--timeout", "10"], None)?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = survivor.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("after #1"), "{}", stdout(&o));
    Ok(())
}

#[test]
fn creator_dies_and_newcomers_still_join() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let mut creator = subscriber(&addr, "phoenix", &[])?;
    let member = subscriber(&addr, "phoenix", &["--count", "1"])?;
    creator.kill9()?;
    // The member takes the contact role over once the creator's link is found dead; a new publisher then joins.
    let p = run(
        &["pub", "phoenix", "--registry", &addr, "--existing", "--wait-sinks", "1", "--timeout", "15", "hi"],
        None,
    )?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = member.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| hi"), "{}", stdout(&o));
    Ok(())
}

#[test]
fn registry_restart_is_survived() -> Result<()> {
    let addr = free_port()?;
    let mut reg = registry(&addr)?;
    let member = subscriber(&addr, "durable", &["--count", "1"])?;
    reg.kill9()?;
    let _reg2 = registry(&addr)?;
    // The contact renews its lease every 3 s and so re-registers the channel with the new registry.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stdout(&run(&["channels", "--registry", &addr], None)?).contains("durable") {
        if Instant::now() > deadline {
            bail!("the channel never reappeared in the restarted registry");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let p = run(&["pub", "durable", "--registry", &addr, "--existing", "--wait-sinks", "1", "back"], None)?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = member.finish(Duration::from_secs(20))?;
    assert!(stdout(&o).contains("| back"), "{}", stdout(&o));
    Ok(())
}

#[test]
fn demo_runs_and_reports_latency() -> Result<()> {
    let o = run(&["demo", "--events", "200"], None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for needle in ["monitoring", "requests", "load balancer", "discarded", "p50", "p99", "deploy:", "api Recovered"] {
        assert!(out.contains(needle), "demo output lacks {needle}: {out}");
    }
    // A normal shutdown is not a warning, and captured output carries no terminal colour codes.
    let err = stderr(&o);
    assert!(!err.contains("WARN") && !err.contains('\x1b'), "demo printed warnings: {err}");
    assert!(!out.contains('\x1b'), "demo output has colour codes: {out}");
    Ok(())
}

#[test]
fn filters_from_the_command_line() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    // Content filter: only events with n > 2 reach this sink.
    let picky = subscriber(&addr, "f", &["--filter", "n > 2", "--count", "2"])?;
    // Two sinks advertising their load; the publisher sends to the least loaded only.
    // It runs until interrupted below (a timeout of its own could end it before the publisher comes on a loaded
    // machine, and the publisher would then wait for two sinks forever).
    let busy = subscriber(&addr, "lb", &["--attr", "load=0.9"])?;
    let idle = subscriber(&addr, "lb", &["--attr", "load=0.1", "--count", "3"])?;
    for n in ["1", "5", "7"] {
        let attr = format!("n={n}");
        let p = run(&["pub", "f", "--registry", &addr, "--attr", &attr, "--wait-sinks", "1", n], None)?;
        assert!(p.status.success(), "{}", stderr(&p));
    }
    let p = run(
        &["pub", "lb", "--registry", &addr, "--select", "least:load:1", "--wait-sinks", "2", "--count", "3", "job"],
        None,
    )?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = picky.finish(Duration::from_secs(20))?;
    assert_eq!(stdout(&o).lines().map(|l| l.rsplit(' ').next().unwrap_or("")).collect::<Vec<_>>(), ["5", "7"]);
    let o = idle.finish(Duration::from_secs(20))?;
    assert_eq!(stdout(&o).lines().count(), 3, "{}", stdout(&o));
    busy.interrupt()?;
    let o = busy.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "the busy sink got events: {}", stdout(&o));
    check_error(&["sub", "f", "--registry", &addr, "--filter", "n > && 1"], "column 5")?;
    check_error(&["pub", "f", "--registry", &addr, "--select", "fastest", "x"], "invalid selector")?;
    Ok(())
}

#[test]
fn sandboxed_filter_installed_from_the_command_line() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let wat = format!("{}/../../examples/filters/drop_all.wat", env!("CARGO_MANIFEST_DIR"));
    // It runs until interrupted below: a timeout of its own could end it before the publisher comes.
    let guarded = subscriber(&addr, "sbx", &["--allow-filters"])?;
    let open = subscriber(&addr, "sbx", &["--count", "1"])?;
    let o = run(&["filter", "install", "sbx", &wat, "--in", "--registry", &addr], None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("installed on 1 member node(s)"), "{out}");
    assert!(out.contains("refused: remote filters are not allowed"), "{out}");
    let p = run(&["pub", "sbx", "--registry", &addr, "--wait-sinks", "2", "hello"], None)?;
    assert!(p.status.success(), "{}", stderr(&p));
    let o = open.finish(Duration::from_secs(20))?;
    assert!(stdout(&o).contains("| hello"), "{}", stdout(&o));
    guarded.interrupt()?;
    let o = guarded.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "the IN-filter should have dropped it: {}", stdout(&o));
    check_error(&["filter", "install", "sbx", "/nonexistent.wat", "--out", "--registry", &addr], "cannot read")?;
    Ok(())
}

#[test]
fn tls_links_from_the_command_line() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().context("path")?.to_owned();
    let o = run(&["certs", &d, "--node", "127.0.0.1"], None)?;
    assert!(o.status.success(), "certs: {}", stderr(&o));
    for f in ["ca.pem", "ca.key", "127.0.0.1.pem", "127.0.0.1.key"] {
        assert!(dir.join(f).exists(), "{f} written");
    }
    check_error(&["certs", &d, "--node", "127.0.0.1"], "exists already")?;
    let (cert, key, ca) = (format!("{d}/127.0.0.1.pem"), format!("{d}/127.0.0.1.key"), format!("{d}/ca.pem"));
    let tls = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str(), "--tls-ca", ca.as_str()];

    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let mut extra = vec!["--count", "2", "--format", "json"];
    extra.extend_from_slice(&tls);
    let sub = subscriber(&addr, "secure", &extra)?;
    let mut args = vec!["pub", "secure", "--registry", &addr, "--count", "2", "--wait-sinks", "1", "--existing"];
    args.extend_from_slice(&tls);
    args.push("over tls");
    let p = run(&args, None)?;
    assert!(p.status.success(), "pub over TLS failed: {}", stderr(&p));
    let o = sub.finish(Duration::from_secs(20))?;
    assert!(o.status.success(), "sub failed: {}", stderr(&o));
    let lines = json_lines(&o)?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["payload"], "over tls");

    // A plaintext node is refused, and told why (a warning when it happens, then the error).
    let sub = subscriber(&addr, "secure", &extra)?;
    let o =
        run(&["pub", "secure", "--registry", &addr, "--existing", "--timeout", "3", "--wait-sinks", "1", "x"], None)?;
    let err = stderr(&o);
    assert!(!o.status.success(), "a plaintext node got in: {err}");
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("kecho: timed out opening channel") && last.contains("requires TLS"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    drop(sub);
    // Unusable files are one-line errors before anything starts.
    let missing = format!("{d}/missing.pem");
    check_error(
        &["pub", "secure", "--registry", &addr, "--tls-cert", &missing, "--tls-key", &key, "--tls-ca", &ca, "x"],
        "missing.pem",
    )?;
    // A certificate without its key and CA is a usage error (clap's, which explains over several lines).
    let o = run(&["pub", "secure", "--registry", &addr, "--tls-cert", &cert, "x"], None)?;
    assert!(!o.status.success() && stderr(&o).contains("--tls-key"), "{}", stderr(&o));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn identities_keep_a_node_id_across_restarts() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-cli-id-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("node.id");
    let f = file.to_str().context("path")?.to_owned();
    let o = run(&["identity", "new", &f], None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let node = stdout(&o).split_whitespace().nth(1).context("node id printed")?.to_owned();
    assert_eq!(node.len(), 16, "{node}");
    check_error(&["identity", "new", &f], "must not exist")?;
    let o = run(&["identity", "show", &f], None)?;
    assert!(stdout(&o).contains(&node), "show: {}", stdout(&o));
    // A node started with it twice is the same node both times: the registry names it as the contact.
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    for round in 0..2 {
        let channel = format!("id{round}");
        let _sub = subscriber(&addr, &channel, &["--identity", &f])?;
        let o = run(&["channels", "--registry", &addr], None)?;
        let out = stdout(&o);
        let row = out.lines().find(|l| l.starts_with(channel.as_str())).context("listed")?;
        assert!(row.contains(&node), "round {round}: {row}");
    }
    std::fs::write(&file, "not an identity")?;
    check_error(&["sub", "x", "--registry", &addr, "--identity", &f], "not a kecho identity")?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Access control as a user sets it up: an authority, node identities, credentials from `kecho grant`; a protected
/// channel lets in what the credentials grant and refuses the rest with a one-line reason.
#[test]
fn protected_channel_from_the_command_line() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-cli-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let o = run(&["authority", "new", &path("auth.key")], None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let auth = stdout(&o).split_whitespace().last().context("authority key printed")?.to_owned();
    assert_eq!(auth.len(), 64, "{auth}");
    let mut keys = Vec::new();
    for who in ["a", "b", "c"] {
        let o = run(&["identity", "new", &path(&format!("{who}.id"))], None)?;
        keys.push(stdout(&o).split_whitespace().last().context("key printed")?.to_owned());
    }
    let grant = |who: &str, roles: &str, holder: &[&str]| -> Result<()> {
        let (auth_key, tok) = (path("auth.key"), path(&format!("{who}.tok")));
        let mut args = vec!["grant", "--authority", &auth_key, "--channel", "vault", "--roles", roles, "--out", &tok];
        args.extend_from_slice(holder);
        let o = run(&args, None)?;
        assert!(o.status.success(), "grant {who}: {}", stderr(&o));
        Ok(())
    };
    grant("a", "all", &["--holder-identity", &path("a.id")])?;
    grant("b", "sink", &["--holder", &keys[1], "--valid-for", "1h"])?;
    check_error(
        &["grant", "--authority", &path("auth.key"), "--channel", "vault", "--roles", "root", "--holder", &keys[1]],
        "unknown role",
    )?;
    check_error(
        &["grant", "--authority", &path("b.id"), "--channel", "vault", "--roles", "sink", "--holder", "xyz"],
        "64 hex digits",
    )?;

    let addr = free_port()?;
    let _reg = registry(&addr)?;
    let (a_id, a_tok, b_id, b_tok, c_id) = (path("a.id"), path("a.tok"), path("b.id"), path("b.tok"), path("c.id"));
    let _a = subscriber(&addr, "vault", &["--identity", &a_id, "--token", &a_tok, "--authority-pub", &auth])?;
    let b = subscriber(&addr, "vault", &["--identity", &b_id, "--token", &b_tok, "--count", "1", "--format", "json"])?;
    // Refused, each with its reason: no credential; the sink role used to publish; someone else's credential; a
    // credential without the identity it was issued to; a channel without the policy this node requires.
    check_error(&["sub", "vault", "--registry", &addr, "--identity", &c_id], "admits only nodes with a credential")?;
    // (Its own identity: two processes with one identity would be one node twice.)
    let e_id = path("e.id");
    assert!(run(&["identity", "new", &e_id], None)?.status.success());
    grant("e", "sink", &["--holder-identity", &e_id])?;
    let o = run(&["pub", "vault", "--registry", &addr, "--identity", &e_id, "--token", &path("e.tok")], Some("x\n"))?;
    assert!(!o.status.success() && stderr(&o).contains("not the source role"), "{}", stderr(&o));
    check_error(&["sub", "vault", "--registry", &addr, "--identity", &c_id, "--token", &b_tok], "was issued to node")?;
    check_error(&["sub", "vault", "--registry", &addr, "--token", &b_tok], "needs --identity")?;
    let _open = subscriber(&addr, "open", &[])?;
    let any_tok = path("any.tok");
    let (auth_key, any) = (path("auth.key"), any_tok.as_str());
    let args = [
        "grant",
        "--authority",
        &auth_key,
        "--channel",
        "*",
        "--roles",
        "all",
        "--holder-identity",
        &a_id,
        "--out",
        any,
    ];
    assert!(run(&args, None)?.status.success());
    check_error(
        &["sub", "open", "--registry", &addr, "--authority-pub", &auth, "--identity", &a_id, "--token", any],
        "has no access policy",
    )?;
    // Nobody refused left a trace: one source (a's, below) and two sinks.
    let o = run(&["pub", "vault", "--registry", &addr, "--identity", &path("c.id")], Some("x\n"))?;
    assert!(!o.status.success());
    // The registry's counts follow the channel's soon after a change (the contact renews its entry), so look until
    // they show the two sinks, or fail with the last row seen: a third sink is a trace a refused node left.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o = run(&["channels", "--registry", &addr], None)?;
        let row = stdout(&o).lines().find(|l| l.starts_with("vault")).context("listed")?.to_owned();
        if row.split_whitespace().nth(2) == Some("2") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the listing never showed 2 sinks: {row}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // b, with its sink credential, gets what a member with the source role publishes.
    grant("p", "source", &["--holder-identity", &path("c.id")])?;
    let p_tok = path("p.tok");
    let args =
        ["pub", "vault", "--registry", &addr, "--identity", &c_id, "--token", &p_tok, "--wait-sinks", "2", "hello"];
    let o = run(&args, None)?;
    assert!(o.status.success(), "{}", stderr(&o));
    let o = b.finish(Duration::from_secs(10))?;
    let got = json_lines(&o)?;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["payload"], "hello");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `kecho webfarm --overhead-hz ""` skips the overhead sweep, as its help says ("empty to skip"), and runs the rest.
#[test]
fn webfarm_with_an_empty_overhead_sweep_runs_and_skips_it() -> Result<()> {
    let args = [
        "webfarm",
        "--overhead-hz",
        "",
        "--modes",
        "kecho:1",
        "--rates",
        "20",
        "--servers",
        "2",
        "--duration",
        "2",
        "--time-scale",
        "20",
    ];
    let o = run(&args, None)?;
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("kecho:1"), "the kecho:1 run is missing: {err}");
    assert!(!err.contains("overhead at"), "the overhead sweep ran: {err}");
    // A bad list is still refused, with the reason.
    let o = run(&["webfarm", "--overhead-hz", "1,x"], None)?;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("overhead-hz"), "{}", stderr(&o));
    Ok(())
}

/// `pub` to a subscriber whose process is frozen (SIGSTOP) after it joined: the link stalls, and `pub` gives up after
/// `--linger`, says how many events it abandoned still queued, and fails, instead of reporting them published.
#[test]
fn pub_reports_events_it_abandoned_when_a_sink_node_is_frozen() -> Result<()> {
    let addr = free_port()?;
    let _reg = registry(&addr)?;
    // `pub` creates the channel (it is the contact), so that nothing it needs waits on the frozen subscriber.
    let publ = Proc::spawn(
        "pub",
        &[
            "pub",
            "stall",
            "--registry",
            &addr,
            "--wait-sinks",
            "1",
            "--timeout",
            "20",
            "--count",
            "100000",
            "--size",
            "4000",
            "--linger",
            "1",
            "--heartbeat",
            "60",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = run(&["channels", "--registry", &addr], None)?;
        if stdout(&o).lines().any(|l| l.starts_with("stall")) {
            break;
        }
        if Instant::now() > deadline {
            bail!("pub never created the channel: {}", stderr(&o));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A sink that never holds its source back (a Block one would make `pub` wait for it instead).
    let sub = subscriber(&addr, "stall", &["--overflow", "drop-oldest"])?;
    // Its sink is announced, then it stops reading (and answering) for good.
    std::thread::sleep(Duration::from_millis(200));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sub.child.id())?);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP)?;
    let started = Instant::now();
    let o = publ.finish(Duration::from_secs(40))?;
    let err = stderr(&o);
    eprintln!("{err}");
    assert!(!o.status.success(), "pub succeeded although its link stalled: {err}");
    assert!(err.contains("kecho: published 100000 event(s)"), "{err}");
    assert!(err.contains("still sending after --linger 1s") && err.contains("abandoned"), "{err}");
    assert!(err.contains("were still queued when the links were closed after --linger 1s and never sent"), "{err}");
    let abandoned: u64 = err
        .lines()
        .filter_map(|l| l.strip_prefix("kecho: "))
        .find_map(|l| l.split_whitespace().next().and_then(|n| n.parse().ok()))
        .with_context(|| format!("no count of abandoned events in {err}"))?;
    assert!(abandoned > 0, "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "pub took {:?} after the freeze", started.elapsed());
    drop(sub);
    Ok(())
}
