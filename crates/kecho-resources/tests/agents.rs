//! Agents, views and requesters on real kecho channels (in-process registry, loopback links). Each test uses a
//! channel of its own so that tests running at once do not see each other's agents.

use std::time::Duration;

use anyhow::Result;
use kecho::{Attrs, Node};
use kecho_resources::{Agent, AgentConfig, Amounts, Error, LedgerConfig, Requester, Spec, View};

fn config(name: &str, cpus: u64, mem: u64) -> AgentConfig {
    let mut c = AgentConfig::new(name);
    c.measure = false;
    c.cpus = Some(cpus);
    c.mem = Some(mem);
    c.report_every = Duration::from_millis(200);
    c.lifetime = Duration::from_millis(600);
    c.probe_every = Duration::from_millis(100);
    c.ledger = LedgerConfig {
        hold: Duration::from_millis(400),
        max_lease: Duration::from_secs(3600),
        holder_grace: Duration::from_millis(400),
    };
    c
}

struct Cluster {
    nodes: Vec<Node>,
    agents: Vec<Agent>,
}

async fn cluster(channel: &str, agents: Vec<AgentConfig>) -> Result<Cluster> {
    let mut c = Cluster { nodes: Vec::new(), agents: Vec::new() };
    for cfg in agents {
        let node = Node::start().await?;
        let ch = node.channel(channel).await?;
        c.agents.push(Agent::start_on(&ch, cfg).await?);
        c.nodes.push(node);
    }
    Ok(c)
}

async fn requester(channel: &str, agents: usize) -> Result<(Node, Requester)> {
    let node = Node::start().await?;
    let r = Requester::on(&node.channel(channel).await?)?;
    r.wait_for_agents(agents, Duration::from_secs(10)).await?;
    Ok((node, r))
}

/// Waits up to 10 s for `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requesters_never_overcommit() -> Result<()> {
    let ch = "res.test.overcommit";
    let c = cluster(ch, (0..4).map(|i| config(&format!("a{i}"), 8, 1 << 30)).collect()).await?;
    let mut tasks = Vec::new();
    for k in 0..6 {
        let (node, r) = requester(ch, 4).await?;
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            let mut refused = 0;
            for i in 0..15u64 {
                let spec = Spec::new(Amounts::new().with("cpus", 1 + (i + k) % 3)).lease(Duration::from_secs(60));
                match r.reserve(&spec).await {
                    Ok(rs) => {
                        assert_eq!(rs.len(), 1);
                        ok += 1;
                    }
                    Err(Error::Unsatisfied { reason }) => {
                        assert!(!reason.is_empty());
                        refused += 1;
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            drop(node);
            (ok, refused)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (o, r) = t.await?;
        ok += o;
        refused += r;
    }
    assert_eq!(ok + refused, 90, "every request reserved or refused with a reason");
    // 32 cores in all for 90 requests of 1 to 3: the cluster fills up and the rest is refused, never overcommitted.
    assert!(refused > 0 && ok > 10, "ok {ok} refused {refused}");
    for a in &c.agents {
        a.with_ledger(|l| {
            assert!(l.overcommitted().is_empty(), "{} overcommitted", l.agent());
            assert_eq!(&l.recount(), l.reserved());
        });
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_rank_wins_and_renegotiation() -> Result<()> {
    let ch = "res.test.rank";
    let mut cfgs = vec![config("small", 2, 1 << 30), config("big", 16, 1 << 30)];
    cfgs[1].attrs = Attrs::new().with("zone", "b");
    let _c = cluster(ch, cfgs).await?;
    let (_n, r) = requester(ch, 2).await?;
    let spec = Spec::new(Amounts::new().with("cpus", 2)).rank("cpus_free");
    let mut got = r.reserve(&spec).await?;
    assert_eq!(got[0].id.agent, "big");
    assert_eq!(got[0].rank, Some(16.0));
    // Grow within what is free, then beyond it, then shrink.
    r.resize(&mut got[0], &Amounts::new().with("cpus", 10)).await?;
    assert_eq!(got[0].amounts.amount("cpus"), 10);
    let e = r.resize(&mut got[0], &Amounts::new().with("cpus", 17)).await.unwrap_err();
    assert!(e.to_string().contains("cpus: wants 7, 6 free"), "{e}");
    r.resize(&mut got[0], &Amounts::new().with("cpus", 1)).await?;
    r.renew(&mut got[0], Duration::from_secs(120)).await?;
    assert!(got[0].lease >= Duration::from_secs(119));
    // A requirement picks the zone; count 2 needs two agents.
    let z = r.reserve(&Spec::new(Amounts::new().with("cpus", 1)).require("zone == \"b\"")).await?;
    assert_eq!(z[0].id.agent, "big");
    let two = r.reserve(&Spec::new(Amounts::new().with("cpus", 1)).count(2)).await?;
    assert_eq!(two.len(), 2);
    assert_ne!(two[0].id.agent, two[1].id.agent);
    let e = r.reserve(&Spec::new(Amounts::new().with("cpus", 1)).count(3)).await.unwrap_err();
    assert!(e.to_string().contains("wanted 3 reservations"), "{e}");
    // Release by id; a second release is refused.
    assert_eq!(r.release(&got[0].id).await?.amount("cpus"), 1);
    assert!(matches!(r.release(&got[0].id).await, Err(Error::Refused { .. })));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why() -> Result<()> {
    let ch = "res.test.refuse";
    let _c = cluster(ch, vec![config("a", 4, 2_000_000_000), config("b", 4, 6_100_000_000)]).await?;
    let (_n, r) = requester(ch, 2).await?;
    let e = r.reserve(&Spec::new(Amounts::new().with("mem", 8_000_000_000))).await.unwrap_err();
    assert_eq!(e.to_string(), "no agent has mem_free >= 8.0 GB; best offer 6.1 GB on b");
    let e = r.reserve(&Spec::new(Amounts::new().with("gpu", 1))).await.unwrap_err();
    assert!(e.to_string().contains("unknown resource `gpu`"), "{e}");
    let e = r.reserve(&Spec::new(Amounts::new().with("cpus", 1)).require("zone == \"x\"")).await.unwrap_err();
    assert!(e.to_string().contains("no agent satisfies `zone == \"x\"`"), "{e}");
    match r.reserve(&Spec::new(Amounts::new()).require("cpus_free >= && x")).await {
        Err(Error::Expr { which: "require", source }) => {
            assert_eq!((source.line, source.column > 1), (1, true), "{source}");
        }
        other => panic!("expected a positioned error, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_unknown_resources_itself() -> Result<()> {
    // A request that bypasses the requester's screening (sent to every agent) is refused by the agent with the
    // names it counts.
    let ch = "res.test.unknown";
    let _c = cluster(ch, vec![config("a", 4, 1 << 30)]).await?;
    let node = Node::start().await?;
    let chan = node.channel(ch).await?;
    let mut sink = chan.sink(kecho::SinkOptions::new().types(["refuse"]).filter("to == \"me\""))?;
    let mut src = chan.source()?;
    chan.wait_for_sinks(2, Duration::from_secs(10)).await?;
    let req = Attrs::new().with("req", 1i64).with("from", "me").with("amounts", "gpu=1");
    let mut answer = None;
    for _ in 0..100 {
        src.submit("request", &req, b"").await?;
        if let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_millis(100), sink.recv()).await {
            answer = Some(ev);
            break;
        }
    }
    let ev = answer.expect("a refusal");
    assert_eq!(
        ev.attrs().get("reason"),
        Some(&kecho::Value::Str("unknown resource `gpu` (this agent counts cpus, mem)".into()))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_requesters_offers_and_reservations_lapse() -> Result<()> {
    let ch = "res.test.dead";
    let c = cluster(ch, vec![config("a", 4, 1 << 30)]).await?;
    // A requester that asks and dies before confirming: a raw request, never confirmed.
    let node = Node::start().await?;
    let chan = node.channel(ch).await?;
    let mut src = chan.source()?;
    chan.wait_for_sinks(1, Duration::from_secs(10)).await?;
    src.submit("request", &Attrs::new().with("req", 1i64).with("from", "ghost").with("amounts", "cpus=4"), b"").await?;
    eventually("the offer to be held", || c.agents[0].with_ledger(|l| l.reserved().amount("cpus") == 4)).await;
    node.kill();
    eventually("the offer to lapse", || c.agents[0].with_ledger(|l| l.is_empty())).await;

    // A requester that confirmed an attached reservation and died: freed after the holder grace, long before the
    // lease (an hour) ends. A detached one stays.
    let (node, r) = requester(ch, 1).await?;
    r.reserve(&Spec::new(Amounts::new().with("cpus", 1)).lease(Duration::from_secs(3600))).await?;
    r.reserve(&Spec::new(Amounts::new().with("cpus", 2)).lease(Duration::from_secs(3600)).detached()).await?;
    assert_eq!(c.agents[0].with_ledger(|l| l.reserved().amount("cpus")), 3);
    node.kill();
    eventually("the attached reservation to end", || c.agents[0].with_ledger(|l| l.reserved().amount("cpus") == 2))
        .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_reservations_are_renewed_and_released_on_drop() -> Result<()> {
    let ch = "res.test.held";
    let c = cluster(ch, vec![config("a", 4, 1 << 30)]).await?;
    let (_n, r) = requester(ch, 1).await?;
    let got = r.reserve(&Spec::new(Amounts::new().with("cpus", 3)).lease(Duration::from_millis(300))).await?;
    let held = r.hold(got[0].clone());
    // Several leases long: still there because it is renewed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(held.is_valid());
    assert_eq!(c.agents[0].with_ledger(|l| l.reserved().amount("cpus")), 3);
    drop(held);
    eventually("the release", || c.agents[0].with_ledger(|l| l.is_empty())).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_follows_agents_and_a_silent_one_leaves() -> Result<()> {
    let ch = "res.test.view";
    let mut cfgs = vec![config("a", 4, 1 << 30), config("b", 8, 1 << 30)];
    cfgs[0].attrs = Attrs::new().with("zone", "a");
    let c = cluster(ch, cfgs).await?;
    let node = Node::start().await?;
    let mut view = View::start_on(&node.channel(ch).await?)?;
    view.wait_until(Duration::from_secs(10), |v| v.len() == 2).await?;
    let found = view.discover(&Amounts::new().with("cpus", 6), None)?;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].report.agent, "b");
    let found = view.discover(&Amounts::new(), Some("zone == \"a\""))?;
    assert_eq!(found[0].report.agent, "a");
    let e = view.discover(&Amounts::new().with("cpus", 9), None).unwrap_err();
    assert_eq!(e.to_string(), "no agent has cpus_free >= 9; best offer 8 on b");
    assert!(matches!(view.discover(&Amounts::new(), Some("zone ==")), Err(Error::Expr { .. })));

    // A reservation shows in the view at once (a change is reported without waiting for the period).
    let (_rn, r) = requester(ch, 2).await?;
    let got = r.reserve(&Spec::new(Amounts::new().with("cpus", 3)).require("zone == \"a\"")).await?;
    assert_eq!(got[0].id.agent, "a");
    view.wait_until(Duration::from_secs(5), |v| v.get("a").is_some_and(|e| e.report.reserved().amount("cpus") == 3))
        .await?;

    // A silent agent (its task stopped, its node still up) leaves the view when its last report runs out; one
    // that stops cleanly leaves at once.
    let mut agents = c.agents;
    let b = agents.pop().unwrap();
    let a = agents.pop().unwrap();
    let t = tokio::time::Instant::now();
    a.kill();
    view.wait_until(Duration::from_secs(5), |v| v.get("a").is_none()).await?;
    assert!(t.elapsed() <= Duration::from_millis(600) + Duration::from_millis(400), "{:?}", t.elapsed());
    b.stop().await;
    view.wait_until(Duration::from_secs(2), |v| v.is_empty()).await?;
    Ok(())
}

/// Between two periodic reports, a change of the ledger reaches every view as a brief `free` update (the report
/// itself, its `seq`, stays the one of the period); with brief updates off, the change sends a whole report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_views_as_a_brief_update_between_reports() -> Result<()> {
    for brief in [true, false] {
        let ch = if brief { "res.test.brief.on" } else { "res.test.brief.off" };
        let mut cfg = config("a", 8, 1 << 30);
        cfg.report_every = Duration::from_secs(3);
        cfg.lifetime = Duration::from_secs(9);
        cfg.brief_updates = brief;
        let _c = cluster(ch, vec![cfg]).await?;
        let node = Node::start().await?;
        let mut view = View::start_on(&node.channel(ch).await?)?;
        let (_rn, r) = requester(ch, 1).await?;
        view.wait_until(Duration::from_secs(10), |v| v.len() == 1).await?;
        let seq_of = |view: &View| view.snapshot().get("a").map(|e| e.report.seq).unwrap_or_default();
        // Right after a periodic report, the next one is 3 s away.
        let s0 = seq_of(&view);
        view.wait_until(Duration::from_secs(10), |v| v.get("a").is_some_and(|e| e.report.seq > s0)).await?;
        let seq = seq_of(&view);
        r.reserve(&Spec::new(Amounts::new().with("cpus", 3))).await?;
        view.wait_until(Duration::from_secs(2), |v| {
            v.get("a").is_some_and(|e| e.report.reserved().amount("cpus") == 3 && e.report.free().amount("cpus") == 5)
        })
        .await?;
        let now = seq_of(&view);
        if brief {
            assert_eq!(now, seq, "the change came as a whole report");
        } else {
            assert!(now > seq, "no whole report for the change");
        }
    }
    Ok(())
}
