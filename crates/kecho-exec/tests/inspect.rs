//! Inspection and configuration agents over real kecho nodes on loopback (one process, the in-process registry).

use std::time::Duration;

use anyhow::{bail, Result};
use kecho::Node;
use kecho_exec::inspect::{serve, AgentRequest, Inspector, Outcome};
use kecho_exec::repo::{Digest, Store};

const BOUND: Duration = Duration::from_secs(20);

struct Cluster {
    tag: String,
    _dir: tempfile::TempDir,
    stores: Vec<Store>,
    names: Vec<String>,
    _nodes: Vec<Node>,
    _serving: Vec<tokio::task::JoinHandle<()>>,
    inspector_node: Node,
}

async fn cluster(n: usize, tag: &str) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    let mut stores = Vec::new();
    let mut serving = Vec::new();
    let mut names = Vec::new();
    for i in 0..n {
        let node = Node::start().await?;
        let name = format!("{tag}-{i}");
        let store = Store::open(dir.path().join(&name))?;
        serving.push(serve(&node, tag, name.clone(), store.clone()).await?);
        stores.push(store);
        names.push(name);
        nodes.push(node);
    }
    let inspector_node = Node::start().await?;
    Ok(Cluster { tag: tag.to_string(), _dir: dir, stores, names, _nodes: nodes, _serving: serving, inspector_node })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspection_and_configuration_reach_every_node_at_once() -> Result<()> {
    let c = cluster(6, "insp").await?;
    let mut inspector = Inspector::new(&c.inspector_node, &c.tag, "tester", 6, BOUND).await?;

    let mut reports = inspector.inspect(6, BOUND).await?;
    reports.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(reports.iter().map(|r| r.node.clone()).collect::<Vec<_>>(), c.names);
    for r in &reports {
        match &r.outcome {
            Ok(Outcome::Report(rep)) => {
                assert_eq!(rep.name, r.node);
                assert!(rep.cpus >= 1 && rep.artifacts.is_empty());
            }
            other => bail!("not a report: {other:?}"),
        }
    }

    let component: Vec<u8> = (0..30_000u32).map(|i| (i % 253) as u8).collect();
    let digest = Digest::of(&component);
    let loaded = inspector.configure(&component, 6, BOUND).await?;
    assert_eq!(loaded.len(), 6);
    assert!(loaded.iter().all(|r| r.outcome == Ok(Outcome::Loaded { digest })));
    for s in &c.stores {
        assert_eq!(s.get(&digest)?, component, "every node keeps the verified component");
    }
    let again = inspector.inspect(6, BOUND).await?;
    assert!(again.iter().all(|r| matches!(&r.outcome, Ok(Outcome::Report(rep)) if rep.artifacts == vec![digest])));

    // The point-to-point baseline reaches the same nodes, one after another.
    let mut targets = Vec::new();
    let mut channels = Vec::new();
    for name in &c.names {
        let (ch, src) = Inspector::direct(&c.inspector_node, &c.tag, name, BOUND).await?;
        channels.push(ch);
        targets.push(src);
    }
    let one_by_one = inspector.one_by_one(&mut targets, None, BOUND).await?;
    assert_eq!(one_by_one.iter().map(|r| r.node.clone()).collect::<Vec<_>>(), c.names);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_does_not_match_its_digest_is_refused() -> Result<()> {
    let c = cluster(1, "liar").await?;
    let mut inspector = Inspector::new(&c.inspector_node, &c.tag, "tester", 1, BOUND).await?;
    let (_ch, mut src) = Inspector::direct(&c.inspector_node, &c.tag, &c.names[0], BOUND).await?;
    let claimed = Digest::of(b"the real component");
    let forged =
        AgentRequest::Load { id: 99, by: "mallory".into(), digest: claimed, bytes: b"something else".to_vec() };
    forged.submit(&mut src).await?;
    let replies = inspector.gather(99, 1, BOUND).await?;
    match &replies[0].outcome {
        Err(why) => assert!(why.contains("refused"), "{why}"),
        other => bail!("a forged component was accepted: {other:?}"),
    }
    assert!(!c.stores[0].contains(&claimed), "a wrong component is never kept");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_waits_for_the_askers_reply_sink_before_it_answers() -> Result<()> {
    // The request reaches the agent before the asker has any sink on the replies channel (as when a new
    // `kecho inspect` node's request outruns its reply sink's news): the agent must hold its answer until it knows
    // the asker's sink, not send it to no one.
    let c = cluster(1, "late").await?;
    let agents = c.inspector_node.channel(&kecho_exec::inspect::agents_channel(&c.tag)).await?;
    let mut requests = agents.source()?;
    agents.wait_for_sinks(1, BOUND).await?;
    let request = AgentRequest::Inspect { id: 4242, by: "tester".into(), module: None };
    request.submit_to(&mut requests, None, Some(c.inspector_node.id())).await?;
    // Only now does the asker open its reply sink.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replies = c.inspector_node.channel(&kecho_exec::inspect::replies_channel(&c.tag)).await?;
    let mut sink = replies.typed_sink::<kecho_exec::inspect::AgentReply>(
        kecho_exec::inspect::REPLY_TYPE,
        kecho::SinkOptions::new().types([kecho_exec::inspect::REPLY_TYPE]),
    )?;
    let reply = tokio::time::timeout(BOUND, sink.recv()).await??;
    assert_eq!((reply.value.id, reply.value.node.as_str()), (4242, c.names[0].as_str()));
    Ok(())
}
