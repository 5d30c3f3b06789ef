//! Remote execution and deployment across namespace hosts (docs/EXEC.md, docs/CONFIG.md): a registry on host 1, exec
//! agents `a` and `b` on hosts 2 and 3, the submitter on host 4. `kecho run` lands on another host, its output streams
//! back and its exit status maps; `--restart on-node-loss` moves a task (from its last checkpoint) when its agent's
//! host is cut off or the agent is killed with -9, and when the agent is drained; a three-component application whose
//! middle component is killed recovers, its dependent told. The harness is `hosts/harness.rs`; these tests need root,
//! so they are marked ignored with that reason; `.ci/run` (as root) runs them with `--ignored`. The FIGURE lines
//! (`--nocapture`) are recorded in docs/EXEC.md and docs/CONFIG.md.

#[path = "hosts/cli.rs"]
mod cli;
#[path = "hosts/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cli::{node_args, registry, secs, HEARTBEAT, WAIT};
use harness::{Net, Proc};

/// Hosts: 1 registry, 2 agent `a`, 3 agent `b`, 4 the submitter.
struct Cluster {
    net: Net,
    agents: Vec<Proc>,
    _reg: Proc,
}

fn cluster(tag: &str) -> Result<Cluster> {
    let net = Net::new(4)?;
    let reg = registry(&net, 1)?;
    let mut agents = Vec::new();
    for (h, name) in [(2, "a"), (3, "b")] {
        let dir = format!("{}/hosts-exec-{tag}-{name}-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
        let _ = std::fs::remove_dir_all(&dir);
        let mut args: Vec<String> = [
            "agent",
            "--name",
            name,
            "--cpus",
            "2",
            "--mem",
            "1G",
            "--no-measure",
            "--report",
            "0.3",
            "--lifetime",
            "1",
            "--holder-grace",
            "1",
            "--allow-exec",
            "--exec-dir",
            &dir,
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(node_args(&net, h, HEARTBEAT));
        let mut p = net.kecho(h, name, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        p.wait_stderr("runs tasks", WAIT)?;
        agents.push(p);
    }
    Ok(Cluster { net, agents, _reg: reg })
}

impl Cluster {
    /// `kecho ARGS` on the submitter's host (any free port), node arguments before the `--` of a command.
    fn kecho(&self, name: &str, args: &[&str]) -> Result<Proc> {
        let node = [
            "--registry".to_owned(),
            self.net.addr(1, harness::REGISTRY_PORT),
            "--listen".to_owned(),
            self.net.addr(4, 0),
            "--heartbeat".to_owned(),
            HEARTBEAT.to_owned(),
        ];
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let mut all: Vec<String> = args[..split].iter().map(|s| (*s).to_owned()).collect();
        all.extend(node);
        all.extend(args[split..].iter().map(|s| (*s).to_owned()));
        self.net.kecho(4, name, &all.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The host an agent runs on.
    fn host_of(agent: &str) -> usize {
        if agent == "a" {
            2
        } else {
            3
        }
    }
}

/// A task that prints `AGENT N` every 0.1 s from its last checkpoint (or 0) to `to`, saving its count atomically.
fn counter(to: u32) -> String {
    format!(
        "n=$(cat \"$KECHO_STATE\" 2>/dev/null || echo 0); \
         while [ $n -lt {to} ]; do n=$((n+1)); echo \"$KECHO_AGENT $n\"; \
         echo $n > \"$KECHO_STATE.tmp\" && mv \"$KECHO_STATE.tmp\" \"$KECHO_STATE\"; sleep 0.1; done"
    )
}

fn agent_count(line: &str) -> Option<(String, u32)> {
    let (a, n) = line.split_once(' ')?;
    Some((a.to_owned(), n.parse().ok()?))
}

/// Waits for a counter line that `f` accepts.
fn wait_line(run: &mut Proc, what: &str, f: impl Fn(&str, u32) -> bool) -> Result<(String, u32, Instant)> {
    run.wait_for(WAIT, what, |out, _| {
        out.iter().find_map(|l| agent_count(&l.text).filter(|(a, n)| f(a, *n)).map(|(a, n)| (a, n, l.at)))
    })
}

/// Checks the end of a moved counter: exit 0, the last line from `other`, and the first line there continuing from
/// a checkpoint (not from 1).
fn check_moved(run: &mut Proc, other: &str, to: u32) -> Result<u32> {
    let status = run.finish(Duration::from_secs(40))?;
    ensure!(status.success(), "kecho run ended {status}: {}", run.stderr_text());
    let lines: Vec<(String, u32)> = run.stdout().iter().filter_map(|l| agent_count(&l.text)).collect();
    let first_there =
        lines.iter().find(|(a, _)| a == other).map(|(_, n)| *n).context("no line from the other agent")?;
    ensure!(first_there > 3, "the task started over on {other} (first count {first_there}), not from its checkpoint");
    ensure!(lines.last() == Some(&(other.to_owned(), to)), "the last line is {:?}", lines.last());
    Ok(first_there)
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn run_lands_on_another_host_streams_its_output_and_maps_its_exit_status() -> Result<()> {
    let c = cluster("run")?;
    // The task runs in agent b's network namespace: it sees host 3's address, not the submitter's.
    let ip_b = c.net.ip_of(3).to_string();
    let script = format!(
        "echo on $KECHO_AGENT; ip -4 -o addr show | grep -q ' {ip_b}/' && echo host-3; echo oops >&2; \
         for i in 1 2 3; do echo line $i; sleep 0.1; done; exit 3"
    );
    let started = Instant::now();
    let mut run = c.kecho("run", &["run", "--require", "agent == \"b\"", "--", "sh", "-c", &script])?;
    let status = run.finish(Duration::from_secs(30))?;
    let out: Vec<String> = run.stdout().iter().map(|l| l.text.clone()).collect();
    ensure!(out == ["on b", "host-3", "line 1", "line 2", "line 3"], "stdout {out:?}; stderr {}", run.stderr_text());
    ensure!(run.stderr_text().contains("oops"), "{}", run.stderr_text());
    ensure!(status.code() == Some(3), "exit {status}, not 3: {}", run.stderr_text());
    // Output arrives live: the lines came over about 0.2 s, not all at the exit.
    let lines = run.stdout();
    let spread = lines[4].at - lines[2].at;
    ensure!(spread >= Duration::from_millis(100), "the lines came together ({spread:?}): not streamed");
    eprintln!("FIGURE kecho run across hosts (start to exit, 0.3 s of work): {}", secs(started.elapsed()));

    // A signal death maps to 128 + N.
    let mut run = c.kecho("kill", &["run", "--require", "agent == \"a\"", "--", "sh", "-c", "kill -9 $$"])?;
    let status = run.finish(Duration::from_secs(30))?;
    ensure!(status.code() == Some(137), "exit {status}, not 137: {}", run.stderr_text());
    Ok(())
}

/// Starts a counter with `--restart on-node-loss`, waits for its tenth line, does `fail` to its agent, and checks
/// that it continues on the other agent from a checkpoint; returns the time from `fail` to the first line there.
fn moves_on(tag: &str, fail: impl FnOnce(&mut Cluster, &str) -> Result<()>) -> Result<Duration> {
    let mut c = cluster(tag)?;
    let script = counter(40);
    let mut run =
        c.kecho("run", &["run", "--restart", "on-node-loss", "--checkpoint-every", "0.2", "--", "sh", "-c", &script])?;
    let (agent, _, _) = wait_line(&mut run, "the tenth line", |_, n| n == 10)?;
    let other = if agent == "a" { "b" } else { "a" };
    let failed = Instant::now();
    fail(&mut c, &agent)?;
    let (_, _, at) = wait_line(&mut run, "a line from the other agent", |a, _| a == other)?;
    let first = check_moved(&mut run, other, 40)?;
    eprintln!("{tag}: resumed on {other} at {first}");
    Ok(at - failed)
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn on_node_loss_restarts_elsewhere_when_the_host_is_cut() -> Result<()> {
    let t = moves_on("cut", |c, agent| c.net.cut(Cluster::host_of(agent)))?;
    eprintln!("FIGURE agent host cut (heartbeat 1 s): first line on the other agent after {}", secs(t));
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn on_node_loss_restarts_elsewhere_when_the_agent_is_killed() -> Result<()> {
    let t = moves_on("kill", |c, agent| c.agents[Cluster::host_of(agent) - 2].kill9())?;
    eprintln!("FIGURE agent kill -9 (heartbeat 1 s): first line on the other agent after {}", secs(t));
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn drain_moves_work_to_the_other_host() -> Result<()> {
    let t = moves_on("drain", |c, agent| {
        let mut d = c.kecho("drain", &["agent", "drain", agent])?;
        let status = d.finish(Duration::from_secs(20))?;
        ensure!(status.success(), "drain failed: {}", d.stderr_text());
        Ok(())
    })?;
    eprintln!("FIGURE agent drained: first line on the other agent after {}", secs(t));
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_three_component_application_across_hosts_recovers_its_killed_middle() -> Result<()> {
    let c = cluster("app")?;
    let d = format!("{}/hosts-exec-app-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    // Two cores per agent and one per component: the three cannot share one host.
    let app = format!(
        r#"
name = "shop"

[component.db]
cmd = "echo db $KECHO_AGENT >> {d}/order; touch {d}/db.ready; exec sleep 120"
cpus = 1
port = 7001
ready = {{ cmd = "test -f {d}/db.ready", timeout = 20 }}

[component.api]
cmd = "test -f {d}/db.ready || exit 1; echo api $KECHO_AGENT >> {d}/order; echo $KECHO_DEP_DB > {d}/api.dep; echo $$ > {d}/api.pid; touch {d}/api.ready; exec sleep 120"
after = ["db"]
cpus = 1
ready = {{ cmd = "test -f {d}/api.ready", timeout = 20 }}

[component.web]
cmd = "test -f {d}/api.ready || exit 1; echo web $KECHO_AGENT >> {d}/order; touch {d}/web.ready; exec sleep 120"
after = ["api"]
cpus = 1
ready = {{ cmd = "test -f {d}/web.ready", timeout = 20 }}
"#
    );
    let file = format!("{d}/shop.toml");
    std::fs::write(&file, app)?;
    let started = Instant::now();
    let mut dep = c.kecho("deploy", &["deploy", &file])?;
    dep.wait_stderr("shop ready", WAIT)?;
    eprintln!("FIGURE deploy of 3 components across 2 agent hosts: ready after {}", secs(started.elapsed()));
    let order = std::fs::read_to_string(format!("{d}/order"))?;
    let names: Vec<&str> = order.lines().filter_map(|l| l.split(' ').next()).collect();
    ensure!(names == ["db", "api", "web"], "start order {order:?}");
    let agents: std::collections::BTreeSet<&str> = order.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    ensure!(agents.len() == 2, "the components did not spread over both agents: {order:?}");
    // api got db's address: the host of db's agent, as the other hosts reach it.
    let db_agent = order.lines().next().and_then(|l| l.split(' ').nth(1)).context("db's agent")?;
    let db_host = c.net.ip_of(Cluster::host_of(db_agent));
    let dep_addr = std::fs::read_to_string(format!("{d}/api.dep"))?;
    ensure!(dep_addr.trim() == format!("{db_host}:7001"), "api was given {dep_addr:?} for db on {db_agent}");

    let pid = std::fs::read_to_string(format!("{d}/api.pid"))?.trim().to_owned();
    std::fs::remove_file(format!("{d}/api.ready"))?;
    let killed = Instant::now();
    ensure!(std::process::Command::new("kill").args(["-9", &pid]).status()?.success(), "kill -9 {pid}");
    let told = dep.wait_for(WAIT, "the failure notice", |_, err| {
        err.iter().find(|l| l.text.contains("api Failed")).map(|l| l.text.clone())
    })?;
    ensure!(told.contains("told: web"), "{told}");
    let recovered = dep.wait_stderr_after("api Recovered", killed, WAIT)?;
    eprintln!("FIGURE middle component killed -9 across hosts: ready again after {}", secs(recovered - killed));

    let mut undeploy = c.kecho("undeploy", &["undeploy", "shop"])?;
    ensure!(undeploy.finish(Duration::from_secs(30))?.success(), "undeploy: {}", undeploy.stderr_text());
    ensure!(dep.finish(Duration::from_secs(30))?.success(), "deploy: {}", dep.stderr_text());
    Ok(())
}

#[test]
#[ignore = "needs root: network namespaces (run by .ci/run)"]
fn a_repository_artifact_is_fetched_by_the_agent_on_another_host() -> Result<()> {
    let c = cluster("artifact")?;
    let d = format!("{}/hosts-exec-artifact-{}", env!("CARGO_TARGET_TMPDIR"), std::process::id());
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    // The program reports the host it runs on by the addresses it sees.
    let program = format!("{d}/where.sh");
    std::fs::write(
        &program,
        format!("#!/bin/sh\nip -4 -o addr show > {d}/addrs; echo $KECHO_AGENT > {d}/ran; exec sleep 120\n"),
    )?;
    let store = format!("{d}/store");
    let mut add = c.net.kecho(4, "repo", &["repo", "add", &program, "--repo-dir", &store])?;
    ensure!(add.finish(Duration::from_secs(20))?.success(), "repo add: {}", add.stderr_text());
    let digest = add.stdout().first().map(|l| l.text.trim().to_owned()).context("no digest printed")?;
    let app = format!(
        "[component.where]\nartifact = \"{digest}\"\nrequire = 'agent == \"b\"'\nready = {{ cmd = \"test -f {d}/ran\", timeout = 20 }}\n"
    );
    std::fs::write(format!("{d}/where.toml"), app)?;
    let started = Instant::now();
    let mut dep = c.kecho("deploy", &["deploy", &format!("{d}/where.toml"), "--repo-dir", &store])?;
    dep.wait_stderr("where ready", WAIT)?;
    eprintln!("FIGURE deploy of a repository artifact fetched across hosts: ready after {}", secs(started.elapsed()));
    let addrs = std::fs::read_to_string(format!("{d}/addrs"))?;
    ensure!(addrs.contains(&format!(" {}/", c.net.ip_of(3))), "the artifact did not run on host 3: {addrs}");
    ensure!(!addrs.contains(&format!(" {}/", c.net.ip_of(4))), "the artifact ran on the deploying host: {addrs}");
    let mut undeploy = c.kecho("undeploy", &["undeploy", "where"])?;
    ensure!(undeploy.finish(Duration::from_secs(30))?.success(), "undeploy: {}", undeploy.stderr_text());
    ensure!(dep.finish(Duration::from_secs(30))?.success(), "deploy: {}", dep.stderr_text());
    Ok(())
}
