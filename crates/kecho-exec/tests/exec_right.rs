//! The `exec` right over real kecho nodes on loopback (one process, the in-process registry): an agent under an
//! access policy runs a submission only when it carries an `exec` credential of its authority, signed by the
//! credential's holder; everything else is refused with the reason, and the refusal is audited.

mod common;

use anyhow::{Context, Result};
use common::{outcome, submit, BOUND};
use kecho::{Authority, Identity, Node, Roles};
use kecho_exec::agent::AuditLog;
use kecho_exec::auth::{Credential, ExecPolicy};
use kecho_exec::place::AgentName;
use kecho_exec::remote::Submitter;
use kecho_exec::service::{ExecService, ServiceConfig};
use kecho_exec::task::Confinement;

const CHANNEL: &str = "kecho.exec.right-test";

/// Submits a task and returns what came of it: `Ok(output)` when it ran to exit 0, `Err(reason)` when refused.
async fn check(sub: &mut Submitter, task: &str) -> Result<std::result::Result<String, String>> {
    sub.wait_for_agent("a", BOUND).await?;
    let msg = submit(sub, task, vec!["sh".into(), "-c".into(), "echo ran".into()], None);
    sub.send("a", &msg).await?;
    outcome(sub, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_holders_of_the_exec_right_start_work() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let authority = Authority::from_secret([0x51; 32]);
    let agent_node = Node::start().await?;
    let ch = agent_node.channel(CHANNEL).await?;
    let mut cfg = ServiceConfig::new(
        AgentName("a".into()),
        dir.path().join("tasks"),
        Confinement::Rlimits { reason: "test".into() },
    );
    cfg.audit = Some(dir.path().join("audit.jsonl"));
    cfg.policy = Some(ExecPolicy::new(authority.public_key()));
    let service = ExecService::start(&ch, cfg).await?;

    let user = Identity::from_secret([0x52; 32]);
    let user_node = Node::builder().identity(user.clone()).start().await?;
    let uch = user_node.channel(CHANNEL).await?;

    // No credential: refused, and the reason says what is missing and how to get it.
    let mut anonymous = Submitter::on(&uch, "anon".into())?;
    let reason = check(&mut anonymous, "t-anon").await?.expect_err("ran without a credential");
    assert!(reason.contains("exec credential") && reason.contains("kecho grant --roles exec"), "{reason}");

    // Another authority's exec credential: refused as such.
    let foreign = Authority::from_secret([0x53; 32]).grant("kecho.exec*", Roles::EXEC, user.public_key(), 0)?;
    let mut stranger = Submitter::on(&uch, "stranger".into())?.with_credential(Some(Credential::new(&user, foreign)?));
    let reason = check(&mut stranger, "t-foreign").await?.expect_err("ran with another authority's credential");
    assert!(reason.contains("another authority"), "{reason}");

    // The authority's exec credential, held by this node: the task runs.
    let token = authority.grant("kecho.exec*", Roles::EXEC, user.public_key(), 0)?;
    let mut holder = Submitter::on(&uch, "holder".into())?.with_credential(Some(Credential::new(&user, token)?));
    assert_eq!(check(&mut holder, "t-ok").await?, Ok("ran\n".to_owned()));

    // A drain needs the right too.
    let e = anonymous.drain("a", "anon", BOUND).await.expect_err("drained without a credential");
    assert!(e.to_string().contains("exec credential"), "{e}");
    holder.drain("a", "holder", BOUND).await?;

    // The audit log says who asked, and what was refused.
    service.stop().await;
    let entries = AuditLog::open(&dir.path().join("audit.jsonl"))?.read_all()?;
    let line = |action: &str, target: &str| entries.iter().find(|e| e.action == action && e.target == target);
    let ran = line("task", "t-ok").context("no audit line for the task")?;
    assert!(ran.who.contains(&user.node_id().to_string()), "{ran:?}");
    assert!(line("refuse", "t-anon").is_some() && line("refuse", "t-foreign").is_some(), "{entries:?}");
    assert!(line("refuse-drain", "a").is_some() && line("drain", "a").is_some(), "{entries:?}");
    user_node.shutdown().await;
    agent_node.shutdown().await;
    Ok(())
}
