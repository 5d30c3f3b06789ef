//! An agent given a newer run of a task whose older run still runs there (its submitter took the agent for lost,
//! after a freeze or a cut longer than the heartbeat timeout, and restarted the task on it again since no other agent
//! fitted) stops the older run: two runs of one task never go on side by side. Real kecho nodes on loopback.

mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use common::{outcome, submit, BOUND};
use kecho::Node;
use kecho_exec::place::AgentName;
use kecho_exec::remote::Submitter;
use kecho_exec::service::{ExecService, ServiceConfig};
use kecho_exec::task::Confinement;
use kecho_exec::wire::ExecMsg;

const CHANNEL: &str = "kecho.exec.supersede-test";

/// Whether process `pid` exists and has not exited (a zombie counts as ended).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_run_of_a_task_stops_the_older_one_still_running_on_the_agent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent_node = Node::start().await?;
    let ch = agent_node.channel(CHANNEL).await?;
    let cfg = ServiceConfig::new(
        AgentName("a".into()),
        dir.path().join("tasks"),
        Confinement::Rlimits { reason: "test".into() },
    );
    let _service = ExecService::start(&ch, cfg).await?;
    let user_node = Node::start().await?;
    let uch = user_node.channel(CHANNEL).await?;
    let mut sub = Submitter::on(&uch, "me".into())?;
    sub.wait_for_agent("a", BOUND).await?;

    let pidfile = dir.path().join("first.pid");
    let first = format!("echo $$ > '{}'; exec sleep 300", pidfile.display());
    let msg = submit(&sub, "t", vec!["sh".into(), "-c".into(), first], None);
    sub.send("a", &msg).await?;
    let deadline = tokio::time::Instant::now() + BOUND;
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok()) {
            break pid;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the first run never started");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(alive(pid));

    // Run 1 of the same task, as a restart would send it.
    let ExecMsg::Submit(mut second) = submit(&sub, "t", vec!["sh".into(), "-c".into(), "echo second".into()], None)
    else {
        bail!("not a submission")
    };
    second.run = 1;
    sub.send("a", &ExecMsg::Submit(second)).await?;
    assert_eq!(outcome(&mut sub, "t").await?, Ok("second\n".to_owned()));
    let deadline = tokio::time::Instant::now() + BOUND;
    while alive(pid) {
        if tokio::time::Instant::now() > deadline {
            bail!("the superseded run (pid {pid}) still runs {BOUND:?} after the newer one started");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
