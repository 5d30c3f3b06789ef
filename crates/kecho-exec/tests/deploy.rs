//! Deploying applications on this host: real processes, simulated agents (an in-memory placer), every wait bounded.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho_exec::app::{AppSpec, ComponentName, FailurePolicy};
use kecho_exec::deploy::{deploy, DeployError, LocalLauncher, Notice, RunningApp};
use kecho_exec::place::{AgentName, InMemoryPlacer, MemAgent};
use kecho_exec::plan::{AppEvent, ComponentState};
use kecho_exec::repo::{Cache, MemRemote, Store};
use kecho_exec::task::Confinement;

const BOUND: Duration = Duration::from_secs(30);

fn n(s: &str) -> ComponentName {
    s.parse().unwrap()
}

fn agents(count: usize, mem: u64) -> Arc<InMemoryPlacer> {
    Arc::new(InMemoryPlacer::new(
        (0..count)
            .map(|i| MemAgent {
                name: AgentName(format!("agent-{i}")),
                host: "127.0.0.1".into(),
                cpus: 4.0,
                mem,
                labels: BTreeSet::new(),
            })
            .collect(),
    ))
}

/// A component that records its pid, its dependency environment and the order of stops, then waits; ready when its
/// recorded pid is alive.
fn component(dir: &Path, name: &str, after: &[&str], policy: &str) -> String {
    let d = dir.display();
    let after: Vec<String> = after.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[component.{name}]\n\
         cmd = \"trap 'echo {name} >> {d}/stops; exit 0' TERM; env | grep '^KECHO_DEP_' | sort > {d}/{name}.env; echo $$ > {d}/{name}.pid; sleep 300 & wait\"\n\
         after = [{}]\n\
         port = {}\n\
         mem = \"64M\"\n\
         ready = {{ cmd = \"kill -0 $(cat {d}/{name}.pid 2>/dev/null) 2>/dev/null\", timeout = 10 }}\n\
         on_failure = \"{policy}\"\n\n",
        after.join(", "),
        7000 + name.len(),
    )
}

fn three_tier(dir: &Path, db: &str, api: &str) -> Result<AppSpec> {
    let text = [
        component(dir, "db", &[], db),
        component(dir, "api", &["db"], api),
        component(dir, "web", &["api"], "restart"),
    ]
    .concat();
    Ok(AppSpec::parse(&text, Some("shop"))?)
}

async fn start(app: AppSpec, placer: Arc<InMemoryPlacer>, dir: &Path) -> Result<RunningApp, DeployError> {
    let launcher = Arc::new(LocalLauncher::new(dir.join("agents"), Confinement::Rlimits { reason: "test".into() }));
    deploy::<_, _, MemRemote>(app, placer, launcher, None).await
}

fn pid_of(dir: &Path, name: &str) -> Result<i32> {
    Ok(std::fs::read_to_string(dir.join(format!("{name}.pid")))?.trim().parse()?)
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

async fn notice(app: &mut RunningApp) -> Result<Notice> {
    tokio::time::timeout(BOUND, app.notices.recv()).await?.context("notices closed")
}

#[tokio::test]
async fn three_tier_deploy_recovers_the_killed_middle_and_undeploys_in_reverse() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut app = start(three_tier(d, "restart", "restart")?, agents(3, 1 << 30), d).await?;
    tokio::time::timeout(BOUND, app.ready()).await??;
    let status = app.status();
    assert!(status.values().all(|s| s.state == ComponentState::Ready && s.pid.is_some() && s.agent.is_some()));
    // Dependencies' addresses are in the environment (host:port of each component named in `after`).
    assert_eq!(std::fs::read_to_string(d.join("api.env"))?, "KECHO_DEP_DB=127.0.0.1:7002\n");
    assert_eq!(std::fs::read_to_string(d.join("web.env"))?, "KECHO_DEP_API=127.0.0.1:7003\n");
    assert_eq!(std::fs::read_to_string(d.join("db.env"))?, "");

    let api = pid_of(d, "api")?;
    let killed = Instant::now();
    rustix::process::kill_process(rustix::process::Pid::from_raw(api).context("pid")?, rustix::process::Signal::KILL)?;
    let failed = notice(&mut app).await?;
    assert_eq!(
        (failed.about.clone(), failed.event, failed.to.clone()),
        (n("api"), AppEvent::Failed(FailurePolicy::Restart), vec![n("web")])
    );
    let recovered = notice(&mut app).await?;
    let took = killed.elapsed();
    assert_eq!((recovered.about.clone(), recovered.event), (n("api"), AppEvent::Recovered));
    eprintln!("time to recover (kill -9 of the middle component, restart in place): {took:?}");
    let status = app.status();
    assert_eq!(status[&n("api")].restarts, 1);
    assert_ne!(status[&n("api")].pid, Some(api));
    assert_eq!(status[&n("web")].restarts, 0, "dependents keep running under the restart policy");

    let pids: Vec<i32> = ["db", "api", "web"].iter().map(|c| pid_of(d, c)).collect::<Result<_>>()?;
    tokio::time::timeout(BOUND, app.undeploy()).await??;
    assert_eq!(std::fs::read_to_string(d.join("stops"))?, "web\napi\ndb\n", "stopped in reverse dependency order");
    assert!(pids.iter().all(|p| !alive(*p)));
    Ok(())
}

#[tokio::test]
async fn replace_moves_the_failed_component_to_another_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut app = start(three_tier(d, "restart", "replace")?, agents(3, 1 << 30), d).await?;
    tokio::time::timeout(BOUND, app.ready()).await??;
    let before = app.status()[&n("api")].agent.clone();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid_of(d, "api")?).context("pid")?,
        rustix::process::Signal::KILL,
    )?;
    assert_eq!(notice(&mut app).await?.event, AppEvent::Failed(FailurePolicy::Replace));
    let recovered = notice(&mut app).await?;
    assert_eq!(recovered.event, AppEvent::Recovered);
    assert!(recovered.agent.is_some() && recovered.agent != before, "{:?} -> {:?}", before, recovered.agent);
    tokio::time::timeout(BOUND, app.undeploy()).await??;
    Ok(())
}

#[tokio::test]
async fn stop_dependents_stops_everything_above_the_failed_component() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let mut app = start(three_tier(d, "stop-dependents", "restart")?, agents(1, 1 << 30), d).await?;
    tokio::time::timeout(BOUND, app.ready()).await??;
    let (api, web) = (pid_of(d, "api")?, pid_of(d, "web")?);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid_of(d, "db")?).context("pid")?,
        rustix::process::Signal::KILL,
    )?;
    let told = notice(&mut app).await?;
    assert_eq!((told.event, told.to), (AppEvent::Failed(FailurePolicy::StopDependents), vec![n("api"), n("web")]));
    tokio::time::timeout(
        BOUND,
        app.wait_status(|s| {
            s[&n("api")].state == ComponentState::Stopped && s[&n("web")].state == ComponentState::Stopped
        }),
    )
    .await??;
    assert_eq!(app.status()[&n("db")].state, ComponentState::Failed);
    assert_eq!(std::fs::read_to_string(d.join("stops"))?, "web\napi\n");
    assert!(!alive(api) && !alive(web));
    Ok(())
}

#[tokio::test]
async fn a_deploy_that_cannot_place_everything_starts_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Room for two components of 64 MiB, not three.
    let placer = agents(1, 130 << 20);
    match start(three_tier(d, "restart", "restart")?, placer.clone(), d).await {
        Err(DeployError::Place { component, .. }) => assert_eq!(component, n("web")),
        other => bail!("deploy not refused: {other:?}"),
    }
    assert_eq!(placer.held(), 0, "reservations released");
    assert!(!d.join("agents").exists() && !d.join("db.pid").exists(), "nothing started");
    Ok(())
}

#[tokio::test]
async fn a_component_that_never_becomes_ready_aborts_and_stops_the_rest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let text = [
        component(d, "db", &[], "restart"),
        "[component.api]\ncmd = \"exit 3\"\nafter = [\"db\"]\nready = { cmd = \"false\", timeout = 5 }\n".to_string(),
    ]
    .concat();
    let mut app = start(AppSpec::parse(&text, Some("broken"))?, agents(1, 1 << 30), d).await?;
    match tokio::time::timeout(BOUND, app.ready()).await? {
        Err(DeployError::Aborted { component, .. }) => assert_eq!(component, n("api")),
        other => bail!("not aborted: {other:?}"),
    }
    tokio::time::timeout(
        BOUND,
        app.wait_status(|s| s.values().all(|c| matches!(c.state, ComponentState::Stopped | ComponentState::Failed))),
    )
    .await??;
    assert!(!alive(pid_of(d, "db")?), "what was started is stopped");
    Ok(())
}

#[tokio::test]
async fn artifacts_are_verified_before_anything_starts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let script = format!("#!/bin/sh\necho \"$@\" > {}/artifact.out\nexec sleep 300\n", d.display());
    let remote = MemRemote::default();
    let good = remote.put(script.as_bytes());
    let liar = kecho_exec::repo::Digest::of(b"the real thing");
    remote.put_as(liar, b"#!/bin/sh\necho pwned\n");
    let cache = Cache::new(Store::open(d.join("cache"))?, remote);
    let launcher = Arc::new(LocalLauncher::new(d.join("agents"), Confinement::Rlimits { reason: "test".into() }));

    let bad = format!("[component.a]\ncmd = \"sleep 300\"\n[component.b]\nartifact = \"{liar}\"\nafter = [\"a\"]\n");
    match deploy(AppSpec::parse(&bad, Some("bad"))?, agents(1, 1 << 30), launcher.clone(), Some(&cache)).await {
        Err(DeployError::Artifact { component, .. }) => assert_eq!(component, n("b")),
        other => bail!("wrong artifact not refused: {other:?}"),
    }
    assert!(!d.join("agents").exists(), "nothing started");

    let ok = format!("[component.tool]\nartifact = \"{good}\"\nargs = [\"hello\", \"artifact\"]\n");
    let mut app = deploy(AppSpec::parse(&ok, Some("ok"))?, agents(1, 1 << 30), launcher, Some(&cache)).await?;
    tokio::time::timeout(BOUND, app.ready()).await??;
    tokio::time::timeout(BOUND, async {
        while !d.join("artifact.out").exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    assert_eq!(std::fs::read_to_string(d.join("artifact.out"))?, "hello artifact\n");
    tokio::time::timeout(BOUND, app.undeploy()).await??;
    Ok(())
}

#[tokio::test]
async fn argv_gets_the_dependencies_addresses_without_a_shell() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let text = format!(
        "[component.a]\ncmd = \"exec sleep 300\"\nport = 9\n\
         [component.b]\ncmd = [\"sh\", \"-c\", \"echo \\\"$0\\\" > {}/b.arg; exec sleep 300\", \"a=${{KECHO_DEP_A}} ${{HOME}}\"]\nafter = [\"a\"]\n",
        d.display()
    );
    let mut app = start(AppSpec::parse(&text, Some("vars"))?, agents(1, 1 << 30), d).await?;
    tokio::time::timeout(BOUND, app.ready()).await??;
    tokio::time::timeout(BOUND, async {
        while std::fs::metadata(d.join("b.arg")).map(|m| m.len()).unwrap_or(0) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await?;
    assert_eq!(std::fs::read_to_string(d.join("b.arg"))?, "a=127.0.0.1:9 ${HOME}\n");
    let shown = kecho_exec::deploy::render_status(&AppSpec::parse(&text, Some("vars"))?, &app.status());
    assert!(
        shown.lines().nth(1).is_some_and(|l| l.contains("a") && l.contains("ready") && l.contains("agent-0")),
        "{shown}"
    );
    assert!(shown.lines().nth(2).is_some_and(|l| l.contains("b") && l.contains("a")), "{shown}");
    tokio::time::timeout(BOUND, app.undeploy()).await??;
    Ok(())
}

#[tokio::test]
async fn instances_that_never_become_ready_are_killed_not_leaked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let text = format!(
        "[component.slow]\ncmd = \"echo $$ >> {}/pids; exec sleep 300\"\nready = {{ cmd = \"false\", timeout = 0.2 }}\n",
        d.display()
    );
    let mut app = start(AppSpec::parse(&text, Some("slow"))?, agents(1, 1 << 30), d).await?;
    match tokio::time::timeout(BOUND, app.ready()).await? {
        Err(DeployError::Aborted { component, .. }) => assert_eq!(component, n("slow")),
        other => bail!("not aborted: {other:?}"),
    }
    let pids: Vec<i32> =
        std::fs::read_to_string(d.join("pids"))?.lines().map(|l| l.trim().parse()).collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 4, "the first start and three restarts (the default allows 3 failures in a row)");
    tokio::time::timeout(BOUND, async {
        while pids.iter().any(|p| alive(*p)) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("an instance that timed out is still running")?;
    Ok(())
}
