//! `kecho run`, `kecho ps`, `kecho logs` and `kecho agent drain` as a user runs them: separate processes on loopback,
//! a registry and two agents started with `--allow-exec`.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use support::{eventually, free_port, registry, Proc, KECHO};

/// A registry and two exec agents, `NAMEa` and `NAMEb` (names differ per test so that their state stays apart).
struct Cluster {
    addr: String,
    agents: Vec<Proc>,
    _reg: Proc,
}

fn cluster(prefix: &str) -> Result<Cluster> {
    cluster_with(prefix, &[])
}

/// [`cluster`] with extra arguments for every agent.
fn cluster_with(prefix: &str, extra: &[&str]) -> Result<Cluster> {
    let addr = free_port()?;
    let reg = registry(&addr, &[])?;
    let mut agents = Vec::new();
    for n in ["a", "b"] {
        let name = format!("{prefix}{n}");
        let dir = format!("{}/exec-{name}-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
        let mut args = vec![
            "agent",
            "--name",
            &name,
            "--cpus",
            "2",
            "--mem",
            "1G",
            "--no-measure",
            "--registry",
            &addr,
            "--report",
            "0.3",
            "--lifetime",
            "1",
            "--holder-grace",
            "0.5",
            "--heartbeat",
            "1",
            "--allow-exec",
            "--exec-dir",
            &dir,
        ];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn(&name, &args)?;
        p.wait_stderr("runs tasks")?;
        agents.push(p);
    }
    Ok(Cluster { addr, agents, _reg: reg })
}

/// Starts a kecho command with its output piped.
fn spawn(args: &[&str]) -> Result<Child> {
    Ok(Command::new(KECHO)
        .args(args)
        .env_remove("KECHO_CONFIG")
        .env_remove("KECHO_IDENTITY")
        .env_remove("KECHO_AUTHORITY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

/// Runs a kecho command to completion (30 s at most).
fn kecho(args: &[&str]) -> Result<Output> {
    let mut child = spawn(args)?;
    let (tx, rx) = mpsc::channel();
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    std::thread::spawn(move || {
        let _ = tx.send(child.wait().map(|s| (s, child)));
    });
    let (status, _child) = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(r) => r?,
        Err(_) => bail!("{args:?} did not exit within 30 s"),
    };
    let stdout = t1.join().map_err(|_| anyhow::anyhow!("reader"))?;
    let stderr = t2.join().map_err(|_| anyhow::anyhow!("reader"))?;
    Ok(Output { status, stdout, stderr })
}

/// A `kecho run` in the background whose output lines are read as they come.
struct Running {
    child: Child,
    lines: mpsc::Receiver<(bool, String)>,
    seen: Vec<(bool, String)>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(args: &[&str]) -> Result<Running> {
        let mut child = spawn(args)?;
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().context("stdout")?;
        let err = child.stderr.take().context("stderr")?;
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send((true, l));
            }
        });
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send((false, l));
            }
        });
        Ok(Running { child, lines: rx, seen: Vec::new() })
    }

    /// Waits (20 s at most) for a line on stdout (`stdout`) or stderr matching `f`.
    fn expect(&mut self, stdout: bool, what: &str, f: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((o, l)) => {
                    self.seen.push((o, l.clone()));
                    if o == stdout && f(&l) {
                        return Ok(l);
                    }
                }
                Err(_) => bail!("never saw {what}; saw {:?}", self.seen),
            }
        }
    }

    /// Waits for the exit and the rest of the output.
    fn finish(&mut self) -> Result<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.child.try_wait()? {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s.code().context("killed by a signal");
            }
            if Instant::now() > deadline {
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                bail!("kecho run did not finish; saw {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stdout(&self) -> Vec<&str> {
        self.seen.iter().filter(|(o, _)| *o).map(|(_, l)| l.as_str()).collect()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a kecho command that must succeed; its standard output.
fn check(args: &[&str]) -> Result<String> {
    let o = kecho(args)?;
    if !o.status.success() {
        bail!("{args:?} failed ({}): {}", o.status, text(&o.stderr));
    }
    Ok(text(&o.stdout))
}

/// A task that counts from its last checkpoint (or 0) to `to`, a line `AGENT N` every 0.1 s, saving its count.
fn counter(to: u32) -> String {
    format!(
        "n=$(cat \"$KECHO_STATE\" 2>/dev/null || echo 0); \
         while [ $n -lt {to} ]; do n=$((n+1)); echo \"$KECHO_AGENT $n\"; \
         echo $n > \"$KECHO_STATE.tmp\" && mv \"$KECHO_STATE.tmp\" \"$KECHO_STATE\"; sleep 0.1; done"
    )
}

/// A counter's line: the agent and the count.
fn agent_count(line: &str) -> Result<(String, u32)> {
    let (agent, n) = line.split_once(' ').with_context(|| format!("not AGENT N: {line}"))?;
    Ok((agent.to_owned(), n.parse().with_context(|| format!("not AGENT N: {line}"))?))
}

/// The other agent of a two-agent cluster.
fn other(prefix: &str, agent: &str) -> String {
    if agent == format!("{prefix}a") {
        format!("{prefix}b")
    } else {
        format!("{prefix}a")
    }
}

/// Whether a process runs (a zombie has ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// A link to `sleep` named `sleep-MARKER-SUFFIX` for each suffix (in the target's temporary directory), so that a
/// task's processes can be found by their command line whatever session or process group they moved to. Returns the
/// path without the suffix, and the marker.
fn marked_sleep(name: &str, suffixes: &[&str]) -> Result<(String, String)> {
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .context("no sleep program")?;
    let marker = format!("kecho-mark-{}-{name}", std::process::id());
    let base = format!("{}/sleep-{marker}", env!("CARGO_TARGET_TMPDIR"));
    for s in suffixes {
        let path = format!("{base}{s}");
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(sleep, &path)?;
    }
    Ok((base, marker))
}

/// The live processes whose command line carries `marker`.
fn marked(marker: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .collect()
}

fn ps(c: &Cluster) -> Result<Vec<serde_json::Value>> {
    let out = check(&["ps", "--format", "json", "--registry", &c.addr])?;
    out.lines().map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))).collect()
}

#[test]
fn run_prints_the_remote_output_and_exits_with_its_status() -> Result<()> {
    let c = cluster("r")?;
    let o = kecho(&["run", "--registry", &c.addr, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"])?;
    assert_eq!(text(&o.stdout), "hi\n", "stderr: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("oops"), "{}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(3), "stderr: {}", text(&o.stderr));
    // The default reservation (one core) is the task's limit, and what applied is said: cpu.max under cgroups, a CPU
    // share reported as not enforced under rlimits.
    let said = text(&o.stderr);
    assert!(said.contains("cpu.max=100000 100000") || said.contains("not enforced: cpus=1"), "{said}");

    // The task sees its agent and id, and the --env it was given; a signal death is 128+N.
    let o = kecho(&[
        "run",
        "--registry",
        &c.addr,
        "--require",
        "agent == \"rb\"",
        "--env",
        "GREETING=hello",
        "--",
        "sh",
        "-c",
        "echo $KECHO_AGENT $GREETING ${KECHO_TASK:+task}; kill -9 $$",
    ])?;
    assert_eq!(text(&o.stdout), "rb hello task\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(137), "stderr: {}", text(&o.stderr));

    // --restart on-failure restarts in place from the last state the task saved: it fails twice, then succeeds.
    let script = "n=$(cat \"$KECHO_STATE\" 2>/dev/null || echo 0); n=$((n+1)); \
                  echo $n > \"$KECHO_STATE.tmp\" && mv \"$KECHO_STATE.tmp\" \"$KECHO_STATE\"; echo try $n; [ $n -ge 3 ]";
    let o = kecho(&["run", "--registry", &c.addr, "--restart", "on-failure", "--", "sh", "-c", script])?;
    assert_eq!(text(&o.stdout), "try 1\ntry 2\ntry 3\n", "stderr: {}", text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "stderr: {}", text(&o.stderr));

    // An agent that only offers resources (no --allow-exec) is never chosen for a task it would not run.
    let mut plain = Proc::spawn(
        "rc",
        &["agent", "--name", "rc", "--cpus", "8", "--no-measure", "--registry", &c.addr, "--report", "0.3"],
    )?;
    plain.wait_stderr("offering")?;
    let o = kecho(&["run", "--registry", &c.addr, "--require", "agent == \"rc\"", "--", "true"])?;
    assert_eq!(o.status.code(), Some(125), "stderr: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("exec == true"), "{}", text(&o.stderr));
    drop(plain);

    // No agent fits: 125, with the reason.
    let o = kecho(&["run", "--registry", &c.addr, "--cpus", "64", "--", "true"])?;
    assert_eq!(o.status.code(), Some(125), "stderr: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("cannot be placed"), "{}", text(&o.stderr));

    // ps lists the ended tasks; logs replays one.
    let rows = ps(&c)?;
    let hi = rows
        .iter()
        .find(|r| r["argv"][2].as_str().is_some_and(|a| a.starts_with("echo hi")))
        .context("the first task is not listed")?;
    assert_eq!(hi["state"], "exited 3", "{rows:?}");
    let task = hi["task"].as_str().context("task id")?;
    let o = kecho(&["logs", task, "--registry", &c.addr])?;
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "hi\n");
    assert!(text(&o.stderr).contains("oops"), "{}", text(&o.stderr));
    Ok(())
}

#[test]
fn a_killed_submitter_has_its_task_stopped() -> Result<()> {
    let c = cluster("k")?;
    let mut run = Running::start(&[
        "run",
        "--registry",
        &c.addr,
        "--heartbeat",
        "1",
        "--",
        "sh",
        "-c",
        "echo started; sleep 60",
    ])?;
    run.expect(true, "the task's first line", |l| l == "started")?;
    let running = ps(&c)?;
    assert!(running.iter().any(|r| r["state"] == "running"), "{running:?}");
    let killed = Instant::now();
    run.child.kill()?;
    let state = eventually(Duration::from_secs(15), "the task stopped", || {
        let rows = ps(&c)?;
        Ok(rows.iter().find(|r| r["argv"][2] == "echo started; sleep 60").and_then(|r| {
            let s = r["state"].as_str().unwrap_or("");
            (s != "running").then(|| s.to_owned())
        }))
    })?;
    assert!(state.starts_with("stopped"), "{state}");
    eprintln!("submitter killed to task stopped: {:?}", killed.elapsed());
    Ok(())
}

#[test]
fn ctrl_c_stops_the_remote_task_and_what_left_its_process_group() -> Result<()> {
    let c = cluster("i")?;
    let (mark, marker) = marked_sleep("ctrlc", &[""])?;
    let env = format!("M={mark}");
    // Two processes leave the task's group (one orphaned by a double fork); a third ignores SIGTERM as well.
    let script = "setsid \"$M\" 1000 & (setsid \"$M\" 1001 &); setsid sh -c 'trap \"\" TERM; exec \"$M\" 1002' & \
                  echo started; wait";
    let mut run = Running::start(&["run", "--registry", &c.addr, "--env", &env, "--", "sh", "-c", script])?;
    run.expect(true, "the task's first line", |l| l == "started")?;
    eventually(Duration::from_secs(10), "the escaped processes to start", || {
        Ok((marked(&marker).len() >= 3).then_some(()))
    })?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(run.child.id())?);
    let interrupted = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
    assert_eq!(run.finish()?, 143, "the task's shell ends by SIGTERM: {:?}", run.seen);
    eventually(Duration::from_secs(5), "every process of the task to end", || {
        Ok(marked(&marker).is_empty().then_some(()))
    })?;
    eprintln!("Ctrl-C to kecho run's exit, the task and its escapes gone: {:?}", interrupted.elapsed());
    Ok(())
}

#[test]
fn a_drained_agent_moves_an_on_node_loss_task_with_its_checkpoint() -> Result<()> {
    let c = cluster("d")?;
    let script = counter(30);
    let mut run = Running::start(&[
        "run",
        "--registry",
        &c.addr,
        "--restart",
        "on-node-loss",
        "--checkpoint-every",
        "0.2",
        "--",
        "sh",
        "-c",
        &script,
    ])?;
    let (agent, _) = agent_count(&run.expect(true, "the fifth line", |l| l.ends_with(" 5"))?)?;
    let drained_at = Instant::now();
    check(&["agent", "drain", &agent, "--registry", &c.addr])?;
    let other = other("d", &agent);
    let (_, n) = agent_count(&run.expect(true, "a line from the other agent", |l| l.starts_with(&other))?)?;
    let restart = drained_at.elapsed();
    assert_eq!(run.finish()?, 0, "{:?}", run.seen);
    let last_before =
        run.stdout().iter().filter_map(|l| agent_count(l).ok()).filter(|(a, _)| *a == agent).map(|(_, n)| n).max();
    let last_before = last_before.unwrap_or(0);
    assert!(n > 1 && n.abs_diff(last_before + 1) <= 1, "resumed at {n} after {last_before}");
    assert_eq!(run.stdout().last().copied(), Some(format!("{other} 30").as_str()));
    assert!(run.seen.iter().any(|(o, l)| !o && l.contains("drained")), "{:?}", run.seen);
    eprintln!("drain to first line on the other agent: {restart:?}");
    drop(c.agents);
    Ok(())
}

#[test]
fn inspect_configure_and_the_repository() -> Result<()> {
    let c = cluster("i")?;
    let out = check(&["inspect", "--registry", &c.addr])?;
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["ia", "ib"], "{out}");
    // --where: only the agents whose attributes satisfy the expression are asked.
    let out = check(&["inspect", "--where", "agent == \"ib\" && cpus >= 2", "--registry", &c.addr])?;
    let names: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["ib"], "{out}");
    // --module: a sandboxed WebAssembly program runs on each node over its report (this one echoes it); one that
    // spins is stopped by its limits and reported as an error, not a hang.
    let dir = format!("{}/modules-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    std::fs::create_dir_all(&dir)?;
    let echo = format!("{dir}/echo.wat");
    std::fs::write(
        &echo,
        r#"(module (memory (export "memory") 2)
             (func (export "kecho_buffer") (result i32) (i32.const 0))
             (func (export "kecho_inspect") (param $len i32) (result i32) (local.get $len)))"#,
    )?;
    let out = check(&["inspect", "--module", &echo, "--registry", &c.addr])?;
    for n in ["ia", "ib"] {
        let line =
            out.lines().find(|l| l.starts_with(&format!("{n} ")) && l.contains("module:")).context("no answer")?;
        assert!(line.contains(&format!("\"name\":\"{n}\"")), "{out}");
    }
    let spin = format!("{dir}/spin.wat");
    std::fs::write(
        &spin,
        r#"(module (memory (export "memory") 2)
             (func (export "kecho_buffer") (result i32) (i32.const 0))
             (func (export "kecho_inspect") (param i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    )?;
    let out = check(&["inspect", "--module", &spin, "--registry", &c.addr])?;
    assert_eq!(out.matches("module error: the module failed").count(), 2, "{out}");
    let o = kecho(&["inspect", "--where", "cpus >= 64", "--registry", &c.addr])?;
    assert!(!o.status.success() && text(&o.stderr).contains("no exec agent satisfies"), "{}", text(&o.stderr));
    let o = kecho(&["inspect", "--where", "cpus >=", "--registry", &c.addr])?;
    assert!(!o.status.success() && text(&o.stderr).contains("--where"), "{}", text(&o.stderr));

    let dir = format!("{}/repo-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    std::fs::create_dir_all(&dir)?;
    let file = format!("{dir}/component.bin");
    std::fs::write(&file, (0..30_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>())?;
    let store = format!("{dir}/store");
    let digest = check(&["repo", "add", &file, "--repo-dir", &store])?.trim().to_owned();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(check(&["repo", "ls", "--repo-dir", &store])?, format!("{digest}  30000\n"));

    // configure --where loads onto the selected node only; then onto every node.
    let out = check(&["configure", "--where", "agent == \"ia\"", "--load", &file, "--registry", &c.addr])?;
    assert_eq!(out.lines().collect::<Vec<_>>(), [format!("ia           loaded {digest}")], "{out}");
    let out = check(&["inspect", "--registry", &c.addr])?;
    assert_eq!(out.matches(&digest).count(), 1, "{out}");
    // By its digest, from the repository it was put in (as `kecho repo put` printed it).
    let out = check(&["configure", "--load", &digest, "--repo-dir", &store, "--registry", &c.addr])?;
    assert_eq!(out.matches(&format!("loaded {digest}")).count(), 2, "{out}");
    let missing = format!("sha256:{}", "0".repeat(64));
    let o = kecho(&["configure", "--load", &missing, "--repo-dir", &store, "--registry", &c.addr])?;
    assert!(!o.status.success() && text(&o.stderr).contains("from the repository"), "{}", text(&o.stderr));
    // The nodes now report the component.
    let out = check(&["inspect", "--registry", &c.addr])?;
    assert_eq!(out.matches(&digest).count(), 2, "{out}");

    // Each agent wrote the configuration to its audit log with who asked.
    let audit =
        std::fs::read_to_string(format!("{}/exec-ia-{}/audit.jsonl", env!("CARGO_TARGET_TMPDIR"), std::process::id()))?;
    let line: serde_json::Value = serde_json::from_str(
        audit.lines().find(|l| l.contains("\"configure\"")).context("no configure entry in the audit log")?,
    )?;
    assert_eq!(line["target"], digest.as_str());
    assert!(line["who"].as_str().is_some_and(|w| !w.is_empty()), "{line}");

    check(&["repo", "rm", &digest, "--repo-dir", &store])?;
    assert_eq!(check(&["repo", "ls", "--repo-dir", &store])?, "");
    Ok(())
}

#[test]
fn a_killed_agent_task_restarts_elsewhere_from_its_last_checkpoint() -> Result<()> {
    let mut c = cluster("n")?;
    let pids = format!("{}/pids-n-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_file(&pids);
    let (mark, marker) = marked_sleep("agentkill", &["-na", "-nb"])?;
    // Each run keeps a background child and notes its agent, the pid of its shell and the child's; it also starts a
    // process that leaves its group (`setsid`) and one orphaned in a session of its own, marked with its agent.
    let script = format!(
        "setsid \"$M$KECHO_AGENT\" 1000 & (setsid \"$M$KECHO_AGENT\" 1001 &); \
         sleep 300 & echo \"$KECHO_AGENT $$ $!\" >> \"$PIDS\"; {}",
        counter(40)
    );
    let env = format!("PIDS={pids}");
    let env_mark = format!("M={mark}-");
    let mut run = Running::start(&[
        "run",
        "--registry",
        &c.addr,
        "--heartbeat",
        "1",
        "--restart",
        "on-node-loss",
        "--checkpoint-every",
        "0.2",
        "--env",
        &env,
        "--env",
        &env_mark,
        "--",
        "sh",
        "-c",
        &script,
    ])?;
    let (agent, _) = agent_count(&run.expect(true, "the tenth line", |l| l.ends_with(" 10"))?)?;
    let escaped = format!("{marker}-{agent}");
    assert_eq!(marked(&escaped).len(), 2, "the escaped processes run on {agent}");
    let idx = if agent == "na" { 0 } else { 1 };
    let killed = Instant::now();
    let first_pids: Vec<i32> = std::fs::read_to_string(&pids)?
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{agent} ")).map(str::to_owned))
        .with_context(|| format!("no pids noted by the run on {agent}"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    assert!(first_pids.len() == 2 && first_pids.iter().all(|&p| alive(p)), "the task runs on {agent}: {first_pids:?}");
    // kill -9: no goodbye, no drain.
    c.agents[idx].child.kill()?;
    let _ = c.agents[idx].child.wait();
    // The orphaned run dies with its agent (its lifeline closes), not when it next writes to a dead pipe.
    eventually(Duration::from_secs(5), "the killed agent's task and its child to end", || {
        Ok(first_pids.iter().all(|&p| !alive(p)).then_some(()))
    })?;
    eprintln!("agent killed to its task gone (polled every 100 ms): {:?}", killed.elapsed());
    eventually(Duration::from_secs(5), "the processes that left the task's group to end", || {
        Ok(marked(&escaped).is_empty().then_some(()))
    })?;
    let other = other("n", &agent);
    let (_, n) = agent_count(&run.expect(true, "a line from the other agent", |l| l.starts_with(&other))?)?;
    let restart = killed.elapsed();
    assert_eq!(run.finish()?, 0, "{:?}", run.seen);
    assert!(n > 5, "resumed at {n}: not from a checkpoint");
    assert_eq!(run.stdout().last().copied(), Some(format!("{other} 40").as_str()));
    assert!(run.seen.iter().any(|(o, l)| !o && l.contains("silent")), "{:?}", run.seen);
    eprintln!("agent killed to first line on the other agent: {restart:?} (heartbeat timeout 1 s)");
    Ok(())
}

#[test]
fn deploy_starts_an_application_in_dependency_order_and_recovers_its_middle_component() -> Result<()> {
    let c = cluster("p")?;
    let d = format!("{}/app-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    // Each component records its start, says it is ready with a file, and refuses to start before its dependency.
    // db's readiness command runs on its agent, in its directory and with its environment: it notes where it ran,
    // and the file it tests is one db made in its own directory (which the deploying process's directory lacks).
    let app = format!(
        r#"
name = "shop"
on_failure = "restart"

[component.db]
cmd = "echo db >> {d}/order; touch db.ready {d}/db.ready; exec sleep 60"
cpus = 1
port = 7001
ready = {{ cmd = "echo $KECHO_AGENT $KECHO_COMPONENT $PWD >> {d}/db.checked; test -f db.ready", timeout = 20 }}

[component.api]
cmd = "test -f {d}/db.ready || exit 1; echo api >> {d}/order; echo $KECHO_DEP_DB > {d}/api.dep; echo $$ > {d}/api.pid; touch {d}/api.ready; exec sleep 60"
after = ["db"]
cpus = 1
ready = {{ cmd = "test -f {d}/api.ready", timeout = 20 }}

[component.web]
cmd = "test -f {d}/api.ready || exit 1; echo web >> {d}/order; touch {d}/web.ready; exec sleep 60"
after = ["api"]
cpus = 1
ready = {{ cmd = "test -f {d}/web.ready", timeout = 20 }}
on_failure = "stop-dependents"
"#
    );
    let file = format!("{d}/shop.toml");
    std::fs::write(&file, app)?;
    let mut dep = Running::start(&["deploy", &file, "--registry", &c.addr, "--heartbeat", "1"])?;
    dep.expect(false, "ready", |l| l.contains("shop ready"))?;
    assert_eq!(std::fs::read_to_string(format!("{d}/order"))?, "db\napi\nweb\n");
    assert_eq!(std::fs::read_to_string(format!("{d}/api.dep"))?.trim(), "127.0.0.1:7001");
    let checked = std::fs::read_to_string(format!("{d}/db.checked"))?;
    let rows = ps(&c)?;
    let db_agent = rows
        .iter()
        .find(|r| r["task"].as_str().is_some_and(|t| t.starts_with("shop.db.")))
        .and_then(|r| r["agent"].as_str())
        .with_context(|| format!("no db task in {rows:?}"))?
        .to_owned();
    assert!(!checked.is_empty(), "db's readiness command never ran");
    for line in checked.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f[..2], [db_agent.as_str(), "db"], "the check ran on db's agent, with its environment: {line}");
        assert!(f[2].contains(&format!("exec-{db_agent}-")), "the check ran in db's directory: {line}");
    }

    let out = check(&["status", "shop", "--registry", &c.addr])?;
    let running = out.lines().filter(|l| l.starts_with("shop") && l.contains("running")).count();
    assert_eq!(running, 3, "{out}");

    // Kill the middle component: its dependent is told and the policy (restart) brings it back.
    let pid = std::fs::read_to_string(format!("{d}/api.pid"))?.trim().to_owned();
    // Its readiness file goes too, so that the restarted instance must say it is ready again.
    std::fs::remove_file(format!("{d}/api.ready"))?;
    let killed = Instant::now();
    let st = Command::new("kill").args(["-9", &pid]).status()?;
    assert!(st.success());
    let failed = dep.expect(false, "the failure notice", |l| l.contains("api Failed"))?;
    assert!(failed.contains("told: web"), "{failed}");
    dep.expect(false, "the recovery", |l| l.contains("api Recovered"))?;
    let recovered = killed.elapsed();
    assert_eq!(std::fs::read_to_string(format!("{d}/order"))?, "db\napi\nweb\napi\n");

    check(&["undeploy", "shop", "--registry", &c.addr])?;
    assert_eq!(dep.finish()?, 0, "{:?}", dep.seen);
    let rows = ps(&c)?;
    assert!(rows.iter().all(|r| r["state"] != "running"), "{rows:?}");
    eprintln!("middle component killed to recovered (ready again): {recovered:?}");
    Ok(())
}

#[test]
fn under_an_access_policy_only_holders_of_the_exec_right_run_work() -> Result<()> {
    let dir = format!("{}/right-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (auth, me, token) = (format!("{dir}/authority"), format!("{dir}/me.id"), format!("{dir}/exec.token"));
    let public = check(&["authority", "new", &auth])?;
    let public = public.split_whitespace().last().context("no public key printed")?.to_owned();
    check(&["identity", "new", &me])?;
    check(&[
        "grant",
        "--authority",
        &auth,
        "--channel",
        "kecho.exec",
        "--roles",
        "exec",
        "--holder-identity",
        &me,
        "--out",
        &token,
    ])?;
    // The agents protect their channels with the authority's policy (only filters need a credential there), and run
    // work only for holders of its exec right.
    let c = cluster_with("x", &["--authority-pub", &public, "--require-roles", "filters"])?;

    // Without the right: every agent refuses, with the reason; `kecho run` says so and exits 126.
    let o = kecho(&["run", "--registry", &c.addr, "--", "echo", "ran"])?;
    assert_eq!(o.status.code(), Some(126), "stderr: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "");
    assert!(text(&o.stderr).contains("exec credential"), "{}", text(&o.stderr));
    let o = kecho(&["agent", "drain", "xa", "--registry", &c.addr])?;
    assert!(!o.status.success() && text(&o.stderr).contains("exec credential"), "{}", text(&o.stderr));

    // A credential for another node key is refused before anything is sent.
    let stranger = format!("{dir}/stranger.id");
    check(&["identity", "new", &stranger])?;
    let o = kecho(&["run", "--registry", &c.addr, "--identity", &stranger, "--token", &token, "--", "true"])?;
    assert!(!o.status.success() && text(&o.stderr).contains("issued to node"), "{}", text(&o.stderr));

    // A configuration needs the right too; inspection does not.
    let component = format!("{dir}/component.bin");
    std::fs::write(&component, b"a component")?;
    let o = kecho(&["configure", "--load", &component, "--registry", &c.addr])?;
    assert!(!o.status.success(), "configured without the right: {}", text(&o.stdout));
    assert!(
        text(&o.stdout).contains("not allowed") && text(&o.stdout).contains("exec credential"),
        "{}",
        text(&o.stdout)
    );
    let out = check(&["configure", "--load", &component, "--registry", &c.addr, "--identity", &me, "--token", &token])?;
    assert_eq!(out.matches("loaded sha256:").count(), 2, "{out}");
    check(&["inspect", "--registry", &c.addr])?;

    // With it: the task runs.
    let out = check(&["run", "--registry", &c.addr, "--identity", &me, "--token", &token, "--", "echo", "ran"])?;
    assert_eq!(out, "ran\n");
    // The agent's audit log names the node that asked.
    let node = check(&["identity", "show", &me])?;
    let node = node.split_whitespace().nth(1).context("no node id printed")?.to_owned();
    let audit = ["xa", "xb"]
        .iter()
        .map(|a| {
            std::fs::read_to_string(format!(
                "{}/exec-{a}-{}/audit.jsonl",
                env!("CARGO_TARGET_TMPDIR"),
                std::process::id()
            ))
        })
        .collect::<std::io::Result<Vec<_>>>()?
        .concat();
    assert!(audit.lines().any(|l| l.contains("\"task\"") && l.contains(&node)), "{audit}");
    assert!(audit.lines().any(|l| l.contains("\"refuse\"") && l.contains("exec credential")), "{audit}");
    Ok(())
}

#[test]
fn deploy_runs_a_repository_artifact_that_the_agent_fetches_and_verifies() -> Result<()> {
    let c = cluster("f")?;
    let d = format!("{}/artifact-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let store = format!("{d}/store");
    let program = format!("{d}/tool.sh");
    std::fs::write(&program, format!("#!/bin/sh\necho \"$1 $KECHO_AGENT\" > {d}/ran; exec sleep 60\n"))?;
    let digest = check(&["repo", "add", &program, "--repo-dir", &store])?.trim().to_owned();
    let app = format!(
        "[component.tool]\nartifact = \"{digest}\"\nargs = [\"fetched\"]\nready = {{ cmd = \"test -f {d}/ran\", timeout = 20 }}\n"
    );
    std::fs::write(format!("{d}/tools.toml"), app)?;
    let mut dep = Running::start(&["deploy", &format!("{d}/tools.toml"), "--repo-dir", &store, "--registry", &c.addr])?;
    dep.expect(false, "ready", |l| l.contains("tools ready"))?;
    let ran = std::fs::read_to_string(format!("{d}/ran"))?;
    let agent = ran.split_whitespace().nth(1).context("no agent")?.to_owned();
    assert_eq!(ran, format!("fetched {agent}\n"));
    // The agent keeps the verified artifact in its own store.
    let kept = format!("{}/exec-{agent}-{}/repo", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    assert!(check(&["repo", "ls", "--repo-dir", &kept])?.contains(&digest), "{kept} lacks {digest}");
    check(&["undeploy", "tools", "--registry", &c.addr])?;
    assert_eq!(dep.finish()?, 0, "{:?}", dep.seen);

    // An artifact no repository holds: the deploy fails with the reason, and nothing keeps running.
    let missing = "sha256:".to_owned() + &"ab".repeat(32);
    std::fs::write(format!("{d}/ghost.toml"), format!("[component.ghost]\nartifact = \"{missing}\"\n"))?;
    let o = kecho(&["deploy", &format!("{d}/ghost.toml"), "--repo-dir", &store, "--registry", &c.addr])?;
    assert!(!o.status.success(), "a deploy of a missing artifact succeeded");
    assert!(text(&o.stderr).contains(&missing), "{}", text(&o.stderr));
    assert!(ps(&c)?.iter().all(|r| r["state"] != "running"), "something still runs");
    Ok(())
}

#[test]
fn repo_serve_lets_agents_and_other_nodes_fetch_an_artifact_by_digest() -> Result<()> {
    let c = cluster("g")?;
    let d = format!("{}/served-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    let served = format!("{d}/served");
    let program = format!("{d}/tool.sh");
    std::fs::write(&program, format!("#!/bin/sh\necho \"$1 $KECHO_AGENT\" > {d}/ran; exec sleep 60\n"))?;
    let digest = check(&["repo", "add", &program, "--repo-dir", &served])?.trim().to_owned();
    let mut repo =
        Proc::spawn("repo", &["repo", "serve", "--name", "r1", "--repo-dir", &served, "--registry", &c.addr])?;
    repo.wait_stderr("serves")?;

    // Another node fetches it by digest into its own store, verified.
    let got = check(&["repo", "get", &digest, "--repo-dir", &format!("{d}/got"), "--registry", &c.addr])?;
    assert_eq!(std::fs::read(got.trim())?, std::fs::read(&program)?);

    // A deploy from a user whose own store is empty: the agent fetches the artifact from the repository node.
    let app = format!("[component.tool]\nartifact = \"{digest}\"\nargs = [\"served\"]\n");
    std::fs::write(format!("{d}/tools.toml"), app)?;
    let empty = format!("{d}/empty");
    let mut dep = Running::start(&["deploy", &format!("{d}/tools.toml"), "--repo-dir", &empty, "--registry", &c.addr])?;
    dep.expect(false, "ready", |l| l.contains("tools ready"))?;
    eventually(Duration::from_secs(10), "the artifact to run", || {
        Ok(std::fs::read_to_string(format!("{d}/ran")).ok().filter(|r| r.starts_with("served g")))
    })?;
    check(&["undeploy", "tools", "--registry", &c.addr])?;
    assert_eq!(dep.finish()?, 0, "{:?}", dep.seen);

    // A damaged copy on the repository node is never sent: a fetch finds no valid copy and keeps nothing. (A second
    // artifact: the agent that ran the first keeps and serves a verified copy of it.)
    let other = format!("{d}/other.sh");
    std::fs::write(&other, "#!/bin/sh\necho other\n")?;
    let digest = check(&["repo", "add", &other, "--repo-dir", &served])?.trim().to_owned();
    let hex = digest.trim_start_matches("sha256:");
    // The store keeps artifacts read-only: replace the file, as root could write it in place but an ordinary user not.
    let stored = format!("{served}/{hex}");
    std::fs::remove_file(&stored)?;
    std::fs::write(&stored, b"#!/bin/sh\necho tampered\n")?;
    let fresh = format!("{d}/fresh");
    let o = kecho(&["repo", "get", &digest, "--repo-dir", &fresh, "--wait", "3", "--registry", &c.addr])?;
    assert!(!o.status.success(), "a damaged artifact was fetched: {}", text(&o.stdout));
    assert!(text(&o.stderr).contains(hex), "{}", text(&o.stderr));
    assert_eq!(check(&["repo", "ls", "--repo-dir", &fresh])?, "");
    Ok(())
}
