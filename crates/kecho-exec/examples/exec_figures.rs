//! Figures for remote execution and automatic configuration on this host, each against a baseline measured in the
//! same run:
//!
//! 1. task start: spawn to first output byte through the supervisor (gate, limits, process group, output pump)
//!    against a bare `tokio::process::Command`;
//! 2. task stop: SIGTERM to a task with a child until both are gone;
//! 3. deploy of a three-component application (place, start in dependency order, readiness) and time to recover
//!    when the middle component is killed with SIGKILL, restart in place and replace on another agent;
//! 4. the component repository, 2K's Figure 4: loading 1 to 8 components of 19.2 KB through a cache (fetch from the
//!    repository store, verify SHA-256, keep) against plain file copies.
//!
//! `cargo run -p kecho-exec --example exec_figures [-- RUNS]`

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kecho_exec::app::{AppSpec, ComponentName};
use kecho_exec::deploy::{deploy, LocalLauncher, RunningApp};
use kecho_exec::place::{AgentName, InMemoryPlacer, MemAgent};
use kecho_exec::plan::AppEvent;
use kecho_exec::repo::{Cache, Store};
use kecho_exec::task::{Confinement, Limits, Supervisor, TaskId, TaskSpec};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(name: &str, v: &[Duration]) {
    let mut s = v.to_vec();
    s.sort();
    println!(
        "{name:<48} n={:<3} median {:>8.2} ms   min {:>8.2} ms   max {:>8.2} ms",
        s.len(),
        ms(s[s.len() / 2]),
        ms(s[0]),
        ms(s[s.len() - 1])
    );
}

fn spec(id: String, script: &str) -> TaskSpec {
    TaskSpec {
        id: TaskId(id),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        kecho_env: vec![],
        limits: Limits { cpus: None, mem: Some(1 << 30) },
        state: None,
    }
}

async fn task_start(runs: usize, dir: &Path) -> Result<()> {
    let sup = Supervisor::new(AgentName("bench".into()), dir.join("state"), Confinement::detect(None));
    println!("confinement on this host: {}", sup.confinement().describe());
    let mut supervised = Vec::new();
    let mut bare = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let mut task = sup.spawn(spec(format!("start-{i}"), "echo hi")).await?;
        task.output.recv().await.context("no output")?;
        supervised.push(t.elapsed());
        task.control.wait().await;

        let t = Instant::now();
        let mut child =
            tokio::process::Command::new("sh").args(["-c", "echo hi"]).stdout(std::process::Stdio::piped()).spawn()?;
        let mut out = child.stdout.take().context("stdout")?;
        let mut buf = [0u8; 16];
        tokio::io::AsyncReadExt::read(&mut out, &mut buf).await?;
        bare.push(t.elapsed());
        child.wait().await?;
    }
    report("task start to first output (supervisor)", &supervised);
    report("  baseline: bare tokio::process::Command", &bare);
    println!("  ratio supervisor / bare: {:.2}", ms(median(supervised)) / ms(median(bare)));

    let mut stops = Vec::new();
    for i in 0..runs {
        let mut task = sup.spawn(spec(format!("stop-{i}"), "sleep 300 & echo $!; wait")).await?;
        task.output.recv().await.context("no output")?;
        let t = Instant::now();
        task.control.stop(Duration::from_secs(5)).await;
        stops.push(t.elapsed());
    }
    report("task stop (SIGTERM to the group, task + child)", &stops);
    Ok(())
}

fn app(dir: &Path, api_policy: &str) -> Result<AppSpec> {
    let comp = |name: &str, after: &str, policy: &str| {
        let d = dir.display();
        format!(
            "[component.{name}]\ncmd = \"echo $$ > {d}/{name}.pid; exec sleep 300\"\nafter = [{after}]\n\
             ready = {{ cmd = \"kill -0 $(cat {d}/{name}.pid 2>/dev/null) 2>/dev/null\" }}\non_failure = \"{policy}\"\n"
        )
    };
    let text =
        [comp("db", "", "restart"), comp("api", "\"db\"", api_policy), comp("web", "\"api\"", "restart")].concat();
    Ok(AppSpec::parse(&text, Some("bench"))?)
}

fn placer() -> Arc<InMemoryPlacer> {
    Arc::new(InMemoryPlacer::new(
        (0..3)
            .map(|i| MemAgent {
                name: AgentName(format!("agent-{i}")),
                host: "127.0.0.1".into(),
                cpus: 8.0,
                mem: 1 << 34,
                labels: BTreeSet::new(),
            })
            .collect(),
    ))
}

async fn recover_once(app: &mut RunningApp, dir: &Path) -> Result<Duration> {
    let pid: i32 = std::fs::read_to_string(dir.join("api.pid"))?.trim().parse()?;
    let t = Instant::now();
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid).context("pid")?, rustix::process::Signal::KILL)?;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), app.notices.recv()).await?.context("closed")?;
        if n.about == "api".parse::<ComponentName>()? && n.event == AppEvent::Recovered {
            return Ok(t.elapsed());
        }
    }
}

async fn deploys(runs: usize, dir: &Path) -> Result<()> {
    for policy in ["restart", "replace"] {
        let mut deploy_times = Vec::new();
        let mut recover = Vec::new();
        for i in 0..runs {
            let d = dir.join(format!("{policy}-{i}"));
            std::fs::create_dir_all(&d)?;
            let launcher =
                Arc::new(LocalLauncher::new(d.join("agents"), Confinement::Rlimits { reason: "bench".into() }));
            let t = Instant::now();
            let mut running = deploy::<_, _, Store>(app(&d, policy)?, placer(), launcher, None).await?;
            running.ready().await?;
            deploy_times.push(t.elapsed());
            recover.push(recover_once(&mut running, &d).await?);
            running.undeploy().await?;
        }
        if policy == "restart" {
            report("deploy 3 components (place, start, ready)", &deploy_times);
        }
        report(&format!("time to recover, middle killed, {policy}"), &recover);
    }
    Ok(())
}

fn repository(runs: usize, dir: &Path) -> Result<()> {
    let repo = Store::open(dir.join("repo"))?;
    let digests: Vec<_> = (0..8u8)
        .map(|k| {
            let bytes: Vec<u8> = (0..19_200u32).map(|i| (i as u8).wrapping_mul(31).wrapping_add(k)).collect();
            repo.put(&bytes)
        })
        .collect::<Result<_, _>>()?;
    println!("component repository, components of 19.2 KB (2K Figure 4: fetch, keep in a cache, load):");
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    for count in [1usize, 2, 4, 8] {
        let mut cached = Vec::new();
        let mut copied = Vec::new();
        for r in 0..runs {
            let local = Store::open(dir.join(format!("cache-{count}-{r}")))?;
            let cache = Cache::new(local, repo.clone());
            let t = Instant::now();
            for d in &digests[..count] {
                rt.block_on(cache.ensure(d))?;
            }
            cached.push(t.elapsed());

            let plain = dir.join(format!("copy-{count}-{r}"));
            std::fs::create_dir_all(&plain)?;
            let t = Instant::now();
            for d in &digests[..count] {
                std::fs::copy(repo.path_of(d), plain.join(d.hex()))?;
            }
            copied.push(t.elapsed());
        }
        let (c, p) = (median(cached.clone()), median(copied.clone()));
        report(&format!("  {count} component(s) through the verifying cache"), &cached);
        report(&format!("    baseline: plain copies of {count}"), &copied);
        println!("    ratio cache / copy: {:.2}", ms(c) / ms(p));
    }
    Ok(())
}

fn main() -> Result<()> {
    // This program is also the reaper its tasks start under (kecho_exec::reaper).
    kecho_exec::reaper::serve_if_invoked();
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run())
}

async fn run() -> Result<()> {
    let runs: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(20).max(1);
    let dir = tempfile::tempdir()?;
    println!(
        "kecho-exec figures, {runs} runs each ({} build)",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    task_start(runs, dir.path()).await?;
    deploys(runs.min(10), dir.path()).await?;
    let d = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || repository(runs, &d)).await??;
    Ok(())
}
