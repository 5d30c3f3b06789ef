//! `kecho agent`, `kecho resources`, `kecho reserve` and `kecho release` run as a user would: separate processes on
//! loopback around a registry.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

/// A child process killed when dropped.
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

    /// Waits (20 s at most) for a line containing `needle` on stdout or stderr; returns it.
    fn wait_line(&mut self, stdout: bool, needle: &str) -> Result<String> {
        let (tx, rx) = mpsc::channel();
        let needle = needle.to_owned();
        let reader: Box<dyn std::io::Read + Send> = if stdout {
            Box::new(self.child.stdout.take().context("stdout taken")?)
        } else {
            Box::new(self.child.stderr.take().context("stderr taken")?)
        };
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                if line.contains(&needle) {
                    let _ = tx.send(line);
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => Ok(l),
            Err(_) => bail!("{} never printed the expected line", self.name),
        }
    }
}

fn free_port() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// Runs a command to completion (30 s at most).
fn run(args: &[&str]) -> Result<Output> {
    let mut child =
        Command::new(KECHO).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{args:?} did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child.wait_with_output()?)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A registry and two agents: `a` (4 cores, 8 GB, zone a), `b` (2 cores, 6.1 GB, one GPU, zone b).
struct Cluster {
    addr: String,
    _procs: Vec<Proc>,
}

fn cluster() -> Result<Cluster> {
    let addr = free_port()?;
    let mut reg = Proc::spawn("registry", &["registry", "--listen", &addr])?;
    reg.wait_line(false, "listening")?;
    let mut procs = vec![reg];
    for (name, cpus, mem, extra) in [
        ("a", "4", "8G", vec!["--attr", "zone=a"]),
        ("b", "2", "6.1G", vec!["--attr", "zone=b", "--resource", "gpu=1"]),
    ] {
        let mut args = vec![
            "agent",
            "--name",
            name,
            "--cpus",
            cpus,
            "--mem",
            mem,
            "--no-measure",
            "--registry",
            &addr,
            "--report",
            "0.3",
            "--lifetime",
            "1",
            "--holder-grace",
            "0.5",
        ];
        args.extend(extra);
        let mut p = Proc::spawn(name, &args)?;
        p.wait_line(false, "offering")?;
        procs.push(p);
    }
    Ok(Cluster { addr, _procs: procs })
}

fn resources_json(c: &Cluster, extra: &[&str]) -> Result<Vec<serde_json::Value>> {
    let mut args = vec!["resources", "--format", "json", "--wait", "1", "--registry", &c.addr];
    args.extend_from_slice(extra);
    let o = run(&args)?;
    assert!(o.status.success(), "resources failed: {}", err(&o));
    out(&o).lines().map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))).collect()
}

/// Waits until `kecho resources` shows agent `name` with `cpus` reserved.
fn wait_reserved(c: &Cluster, name: &str, cpus: u64) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = resources_json(c, &[])?;
        let got = lines.iter().find(|l| l["name"] == name).and_then(|l| l["reserved"]["cpus"].as_u64());
        if got == Some(cpus) {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{name} never showed {cpus} cpus reserved (last {got:?})");
        }
    }
}

#[test]
fn view_reserve_release_and_refusals() -> Result<()> {
    let c = cluster()?;
    let lines = resources_json(&c, &[])?;
    let names: Vec<&str> = lines.iter().filter_map(|l| l["name"].as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(lines[1]["attrs"]["gpu"], 1);
    assert_eq!(lines[1]["attrs"]["zone"], "b");
    assert_eq!(lines[0]["reserved"]["cpus"], 0);
    // Discovery.
    let lines = resources_json(&c, &["--where", "zone == \"b\" && gpu_free >= 1"])?;
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["name"], "b");
    let o = run(&["resources", "--registry", &c.addr, "--where", "cpus_free >="])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("line 1, column"), "{}", err(&o));

    // A detached reservation outlives the command.
    let o =
        run(&["reserve", "--registry", &c.addr, "--cpus", "2", "--mem", "1G", "--rank", "cpus_free", "--for", "60"])?;
    assert!(o.status.success(), "reserve failed: {}", err(&o));
    let line = out(&o);
    let id = line.split_whitespace().next().context("an id")?.to_owned();
    assert!(id.starts_with("a:"), "the agent with most free cores wins: {line}");
    assert!(line.contains("cpus=2") && line.contains("lease 60s"), "{line}");
    wait_reserved(&c, "a", 2)?;
    let o = run(&["release", "--registry", &c.addr, &id])?;
    assert!(o.status.success(), "release failed: {}", err(&o));
    assert!(out(&o).contains(&format!("released {id}")));
    wait_reserved(&c, "a", 0)?;
    let o = run(&["release", "--registry", &c.addr, &id])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("no such reservation"), "{}", err(&o));

    // Refusals with the reason.
    let o = run(&["reserve", "--registry", &c.addr, "--mem", "9G"])?;
    assert!(!o.status.success());
    assert_eq!(err(&o).trim(), "kecho: no agent has mem_free >= 9.0 GB; best offer 8.0 GB on a");
    let o = run(&["reserve", "--registry", &c.addr, "--resource", "tpu=1"])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("unknown resource `tpu`"), "{}", err(&o));
    let o = run(&["reserve", "--registry", &c.addr, "--cpus", "1", "--require", "zone =="])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("require expression") && err(&o).contains("column"), "{}", err(&o));
    Ok(())
}

#[test]
fn a_held_reservation_lives_with_its_command() -> Result<()> {
    let c = cluster()?;
    // Held while the command runs (renewed past its 10 s lease would be too slow to test; the holder's death is
    // what ends it here).
    let mut held = Proc::spawn(
        "reserve",
        &["reserve", "--registry", &c.addr, "--cpus", "1", "--require", "zone == \"b\"", "--format", "json"],
    )?;
    let line = held.wait_line(true, "\"id\"")?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    assert_eq!(v["agent"], "b");
    wait_reserved(&c, "b", 1)?;
    // The holder dies without releasing: its agent frees the reservation once the holder's node is gone.
    held.child.kill()?;
    held.child.wait()?;
    wait_reserved(&c, "b", 0)?;
    Ok(())
}

/// `kecho reserve` takes the access-control flags of every node command (the roles flag under the name
/// `--require-roles`, since `--require` is its requirement expression): on a protected `kecho.resources`, a requester
/// with a credential reserves with a requirement, one without is refused with the reason.
#[test]
fn reserve_on_a_protected_channel_takes_access_flags_and_a_requirement() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("kecho-res-access-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
    let o = run(&["authority", "new", &path("auth.key")])?;
    assert!(o.status.success(), "{}", err(&o));
    let auth = out(&o).split_whitespace().last().context("authority key printed")?.to_owned();
    for who in ["agent", "req", "stranger"] {
        let o = run(&["identity", "new", &path(&format!("{who}.id"))])?;
        assert!(o.status.success(), "{}", err(&o));
    }
    for who in ["agent", "req"] {
        let (key, id, tok) = (path("auth.key"), path(&format!("{who}.id")), path(&format!("{who}.tok")));
        let args = ["grant", "--authority", &key, "--channel", "kecho.resources", "--roles", "all"];
        let o = run(&[&args[..], &["--holder-identity", &id, "--out", &tok]].concat())?;
        assert!(o.status.success(), "grant {who}: {}", err(&o));
    }
    let addr = free_port()?;
    let mut reg = Proc::spawn("registry", &["registry", "--listen", &addr])?;
    reg.wait_line(false, "listening")?;
    let (agent_id, agent_tok) = (path("agent.id"), path("agent.tok"));
    let mut agent = Proc::spawn(
        "agent",
        &[
            "agent",
            "--name",
            "a",
            "--cpus",
            "2",
            "--no-measure",
            "--attr",
            "zone=a",
            "--registry",
            &addr,
            "--authority-pub",
            &auth,
            "--require-roles",
            "all",
            "--identity",
            &agent_id,
            "--token",
            &agent_tok,
        ],
    )?;
    agent.wait_line(false, "offering")?;
    let (req_id, req_tok) = (path("req.id"), path("req.tok"));
    // The roles flag is applied: a requester expecting another policy than the channel's is refused.
    let o = run(&[
        "reserve",
        "--registry",
        &addr,
        "--cpus",
        "1",
        "--require",
        "zone == \"a\"",
        "--for",
        "30",
        "--authority-pub",
        &auth,
        "--require-roles",
        "source,sink",
        "--identity",
        &req_id,
        "--token",
        &req_tok,
    ])?;
    assert!(!o.status.success());
    assert!(
        err(&o).contains("expects a policy") && err(&o).contains("requiring credentials for source,sink"),
        "{}",
        err(&o)
    );
    let o = run(&[
        "reserve",
        "--registry",
        &addr,
        "--cpus",
        "1",
        "--require",
        "zone == \"a\"",
        "--for",
        "30",
        "--authority-pub",
        &auth,
        "--require-roles",
        "all",
        "--identity",
        &req_id,
        "--token",
        &req_tok,
    ])?;
    assert!(o.status.success(), "reserve with a credential failed: {}", err(&o));
    assert!(out(&o).contains("agent a") && out(&o).contains("cpus=1"), "{}", out(&o));
    // A requirement nothing satisfies is still the requirement, not the roles.
    let o = run(&[
        "reserve",
        "--registry",
        &addr,
        "--cpus",
        "1",
        "--require",
        "zone == \"b\"",
        "--authority-pub",
        &auth,
        "--identity",
        &req_id,
        "--token",
        &req_tok,
    ])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("zone == \"b\""), "{}", err(&o));
    // Without a credential: refused by the channel's policy, with the reason.
    let o = run(&["reserve", "--registry", &addr, "--cpus", "1", "--wait", "2", "--identity", &path("stranger.id")])?;
    assert!(!o.status.success());
    assert!(err(&o).contains("credential"), "{}", err(&o));
    let o = run(&["reserve", "--registry", &addr, "--cpus", "1", "--require-roles", "sink"])?;
    assert!(!o.status.success() && err(&o).contains("--authority-pub"), "{}", err(&o));
    drop(agent);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn an_agent_started_before_its_registry_waits_for_it() -> Result<()> {
    // An init system may start the agent first: it says it is waiting and joins once the registry listens.
    let addr = free_port()?;
    let mut agent =
        Proc::spawn("agent", &["agent", "--name", "early", "--no-measure", "--cpus", "1", "--registry", &addr])?;
    // The first failure to reach the registry is reported, not fatal.
    let line = agent.wait_line(false, "cannot be reached")?;
    assert!(line.contains("trying again"), "{line}");
    assert!(agent.child.try_wait()?.is_none(), "the agent exited instead of waiting for its registry");
    let _reg = Proc::spawn("registry", &["registry", "--listen", &addr])?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(&["resources", "--registry", &addr])?;
        if String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with("early ")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent never joined once the registry listened: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
