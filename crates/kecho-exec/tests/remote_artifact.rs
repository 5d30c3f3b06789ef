//! A task that names a repository artifact, over real kecho nodes on loopback (one process, the in-process
//! registry): the agent fetches it by digest from a repository node, verifies it, keeps it and runs it; an artifact
//! that a lying repository node serves with the wrong bytes, or that no node holds, is refused and never run.

use std::sync::Arc;
use std::time::Duration;

mod common;

use anyhow::Result;
use common::{outcome, submit, BOUND};
use kecho::{Attrs, Node, SinkOptions, Value};
use kecho_exec::place::AgentName;
use kecho_exec::remote::Submitter;
use kecho_exec::repo::{Cache, Digest, Store};
use kecho_exec::repo_net::{self, ChannelFetch, ARTIFACT_TYPE, FETCH_TYPE};
use kecho_exec::service::{ExecService, ServiceConfig};
use kecho_exec::task::Confinement;

/// Submits a task running `artifact` and returns `Ok(output)` when it ran to exit 0, `Err(reason)` when refused.
async fn check(sub: &mut Submitter, task: &str, artifact: Digest) -> Result<std::result::Result<String, String>> {
    sub.wait_for_agent("a", BOUND).await?;
    let msg = submit(sub, task, vec![artifact.to_string(), "world".into()], Some(artifact));
    sub.send("a", &msg).await?;
    outcome(sub, task).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fetches_verifies_and_runs_an_artifact_and_refuses_a_wrong_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let channel = "kecho.repo.remote-artifact-test";
    let exec_channel = "kecho.exec.remote-artifact-test";

    // The repository node holds a script; the agent's store starts empty.
    let repo_node = Node::start().await?;
    let repo_store = Store::open(dir.path().join("repo"))?;
    let script = repo_store.put(b"#!/bin/sh\necho hello \"$1\" from \"$KECHO_AGENT\"\n")?;
    let repo_ch = repo_node.channel(channel).await?;
    let _serving = repo_net::serve(&repo_ch, "repo", repo_store)?;

    // A lying node answers every request with other bytes.
    let liar_node = Node::start().await?;
    let liar_ch = liar_node.channel(channel).await?;
    let mut liar_in = liar_ch.sink(SinkOptions::new().types([FETCH_TYPE]).attr("repo", "liar"))?;
    let mut liar_out = liar_ch.source()?;
    let forged = Digest::of(b"what the user stored");
    let _liar = tokio::spawn(async move {
        while let Ok(ev) = liar_in.recv().await {
            let (Some(Value::Str(d)), Some(Value::Str(to))) = (ev.attrs().get("digest"), ev.attrs().get("to")) else {
                continue;
            };
            if *d != forged.to_string() {
                continue;
            }
            let attrs = Attrs::new().with("to", to.clone()).with("digest", d.clone());
            let _ = liar_out.submit(ARTIFACT_TYPE, &attrs, b"#!/bin/sh\necho pwned\n").await;
        }
    });

    let agent_node = Node::start().await?;
    let agent_store = Store::open(dir.path().join("agent"))?;
    let fetch = ChannelFetch::new(&agent_node.channel(channel).await?, "agent-a", Duration::from_secs(5))?;
    let cache = Arc::new(Cache::new(agent_store.clone(), fetch));
    let mut cfg = ServiceConfig::new(
        AgentName("a".into()),
        dir.path().join("tasks"),
        Confinement::Rlimits { reason: "test".into() },
    );
    cfg.artifacts = Some(cache.clone());
    let service = ExecService::start(&agent_node.channel(exec_channel).await?, cfg).await?;

    let user = Node::start().await?;
    let mut sub = Submitter::on(&user.channel(exec_channel).await?, "user".into())?;

    // Fetched once, verified, kept, run with its arguments.
    assert_eq!(check(&mut sub, "t1", script).await?, Ok("hello world from a\n".to_owned()));
    assert!(agent_store.contains(&script));
    assert_eq!(check(&mut sub, "t2", script).await?, Ok("hello world from a\n".to_owned()));
    assert_eq!((cache.stats().fetched, cache.stats().hits), (1, 1));

    // The liar's bytes do not hash to the digest: refused, not kept, not run.
    let reason = check(&mut sub, "t3", forged).await?.expect_err("ran a forged artifact");
    assert!(reason.contains(&forged.to_string()) && reason.contains("refused: its content hashes to"), "{reason}");
    assert!(!agent_store.contains(&forged));

    // Nobody holds it: refused with the reason.
    let unknown = Digest::of(b"never stored");
    let reason = check(&mut sub, "t4", unknown).await?.expect_err("ran an unknown artifact");
    assert!(reason.contains(&unknown.to_string()), "{reason}");

    service.stop().await;
    for n in [user, agent_node, liar_node, repo_node] {
        n.shutdown().await;
    }
    Ok(())
}
