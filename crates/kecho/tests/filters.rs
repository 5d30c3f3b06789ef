//! Channel filters across nodes: member attributes, OUT-filters, content filters at the source, IN-filters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::filter::{Dedupe, EventView, InDecision, InEvent, LocalSinks, Selector, SinkView};
use kecho::{Attrs, Event, Node, RegistryClient, SinkOptions, TryRecvError, Value};
use parking_lot::Mutex;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

async fn cluster(n: usize) -> Result<Vec<Node>> {
    let reg = RegistryClient::in_process_private();
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::builder().registry_client(reg.clone()).start().await?);
    }
    Ok(nodes)
}

async fn recv(sink: &mut kecho::Sink) -> Result<Event> {
    match timeout(T, sink.recv()).await.context("timed out waiting for an event")? {
        Ok(e) => Ok(e),
        Err(e) => bail!("recv: {e}"),
    }
}

/// Waits until `sinks` have received `total` events between them (all the source node sent them, by its
/// statistics, so nothing more can arrive), then takes what each holds.
async fn settle(sinks: Vec<&mut kecho::Sink>, total: u64) -> Result<Vec<Vec<Event>>> {
    let arrived = |sinks: &[&mut kecho::Sink]| sinks.iter().map(|s| s.received()).sum::<u64>();
    eventually("every event sent arrived", || arrived(&sinks) >= total).await?;
    assert_eq!(arrived(&sinks), total, "more events arrived than were sent");
    Ok(sinks.into_iter().map(take_all).collect())
}

/// Everything queued at `sink` now.
fn take_all(sink: &mut kecho::Sink) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        match sink.try_recv() {
            Ok(e) => out.push(e),
            Err(TryRecvError::Empty) => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

fn int(ev: &Event, k: &str) -> i64 {
    match ev.attrs().get(k) {
        Some(Value::Int(i)) => *i,
        other => panic!("{k}: {other:?}"),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = tokio::time::Instant::now();
    while !f() {
        if start.elapsed() > T {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_attributes_reach_sources_with_their_age_and_updates_coalesce() -> Result<()> {
    let nodes = cluster(2).await?;
    let a = nodes[0].create_channel("attrs").await?;
    let b = nodes[1].open_channel("attrs").await?;
    let sink = b.sink(SinkOptions::new().attr("load", 0.5).attr("zone", "a"))?;
    a.wait_for_sinks(1, T).await?;
    // An OUT-filter that records what it sees.
    // What the filter saw on each call: the sink's load and the age of its attributes.
    type Seen = Vec<(Option<f64>, Duration)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let log = seen.clone();
    let mut src = a.source()?;
    src.set_out_filter(Some(Arc::new(move |_: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>| {
        let s = sinks.get(0);
        log.lock().push((s.number("load"), s.age()));
        chosen.push(0);
    })));
    src.submit("e", &Attrs::new(), b"").await?;
    assert_eq!(seen.lock()[0].0, Some(0.5));
    tokio::time::sleep(Duration::from_millis(120)).await;
    src.submit("e", &Attrs::new(), b"").await?;
    assert!(seen.lock()[1].1 >= Duration::from_millis(100), "attributes age: {:?}", seen.lock()[1]);

    // 10,000 updates in a burst are published a handful of times, and the last value wins.
    let before = b.stats().published;
    let start = std::time::Instant::now();
    for i in 0..10_000 {
        sink.set_attr("load", f64::from(i) / 10_000.0);
    }
    sink.set_attr("load", 0.125);
    let spent = start.elapsed();
    eventually("last value seen at the source", || {
        let _ = futures_util::FutureExt::now_or_never(src.submit("e", &Attrs::new(), b""));
        seen.lock().last().map(|x| x.0) == Some(Some(0.125))
    })
    .await?;
    let published = b.stats().published - before;
    let allowed = 2 + (spent.as_millis() / 20) as u64 + 2;
    assert!(published <= allowed, "{published} publications for 10,001 updates in {spent:?}");
    assert!(seen.lock().last().expect("seen").1 < Duration::from_secs(1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_selector_sends_only_to_the_chosen_nodes() -> Result<()> {
    let nodes = cluster(5).await?;
    let a = nodes[0].create_channel("lb").await?;
    let mut sinks = Vec::new();
    let loads = [0.9, 0.1, 0.5, 0.2];
    for (i, n) in nodes[1..].iter().enumerate() {
        let ch = n.open_channel("lb").await?;
        sinks.push((ch.clone(), ch.sink(SinkOptions::new().attr("load", loads[i]))?));
    }
    a.wait_for_sinks(4, T).await?;
    let mut src = a.source()?;
    src.set_out_filter(Some(Arc::new("least:load:2".parse::<Selector>()?)));
    for i in 0..20i64 {
        src.submit("req", &Attrs::new().with("i", i), b"").await?;
    }
    let sent = a.stats().sent;
    let got: Vec<usize> =
        settle(sinks.iter_mut().map(|(_, s)| s).collect(), sent).await?.iter().map(Vec::len).collect();
    assert_eq!(got, [0, 20, 0, 20], "only the two least loaded sinks receive");
    // Frames went only to the chosen nodes.
    assert_eq!(a.stats().sent, 40);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choosing_one_of_two_sinks_on_a_node_targets_it() -> Result<()> {
    let nodes = cluster(2).await?;
    let a = nodes[0].create_channel("targets").await?;
    let b = nodes[1].open_channel("targets").await?;
    let mut s1 = b.sink(SinkOptions::new().attr("n", 1))?;
    let mut s2 = b.sink(SinkOptions::new().attr("n", 2))?;
    a.wait_for_sinks(2, T).await?;
    let mut src = a.source()?;
    src.set_out_filter(Some(Arc::new(Selector::round_robin())));
    for i in 0..10i64 {
        src.submit("e", &Attrs::new().with("i", i), b"").await?;
    }
    let mut got = settle(vec![&mut s1, &mut s2], 10).await?;
    let (g2, g1) = (got.pop().expect("two"), got.pop().expect("two"));
    assert_eq!(g1.len(), 5);
    assert_eq!(g2.len(), 5);
    let mut all: Vec<i64> = g1.iter().chain(&g2).map(|e| int(e, "i")).collect();
    all.sort();
    assert_eq!(all, (0..10).collect::<Vec<_>>(), "each event exactly once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_selector_keeps_sessions_on_one_sink() -> Result<()> {
    let nodes = cluster(4).await?;
    let a = nodes[0].create_channel("affinity").await?;
    let mut sinks = Vec::new();
    for n in &nodes[1..] {
        sinks.push(n.open_channel("affinity").await?.sink(SinkOptions::new())?);
    }
    a.wait_for_sinks(3, T).await?;
    let mut src = a.source()?;
    src.set_out_filter(Some(Arc::new(Selector::hash("session"))));
    for round in 0..5 {
        for s in 0..12i64 {
            src.submit("req", &Attrs::new().with("session", s).with("round", round), b"").await?;
        }
    }
    let mut owner: HashMap<i64, usize> = HashMap::new();
    let mut total = 0;
    for (i, evs) in settle(sinks.iter_mut().collect(), 60).await?.into_iter().enumerate() {
        for ev in evs {
            total += 1;
            let prev = owner.insert(int(&ev, "session"), i);
            assert!(prev.is_none() || prev == Some(i), "session moved between sinks");
        }
    }
    assert_eq!(total, 60);
    assert!(owner.values().collect::<std::collections::HashSet<_>>().len() > 1, "sessions spread over sinks");
    Ok(())
}

#[cfg(feature = "cel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_filters_run_at_the_source() -> Result<()> {
    let nodes = cluster(2).await?;
    let a = nodes[0].create_channel("content").await?;
    let b = nodes[1].open_channel("content").await?;
    let mut hot = b.sink(SinkOptions::new().filter(r#"type == "load" && cpu > 0.8 && zone in ["a", "b"]"#))?;
    a.wait_for_sinks(1, T).await?;
    let mut src = a.source()?;
    let zones = ["a", "b", "c"];
    let mut expected = Vec::new();
    for i in 0..90i64 {
        let cpu = (i % 10) as f64 / 10.0 + 0.05;
        let zone = zones[(i % 3) as usize];
        let ty = if i % 2 == 0 { "load" } else { "other" };
        src.submit(ty, &Attrs::new().with("cpu", cpu).with("zone", zone).with("i", i), &[0u8; 500]).await?;
        if ty == "load" && cpu > 0.8 && zone != "c" {
            expected.push(i);
        }
    }
    let got: Vec<i64> = settle(vec![&mut hot], expected.len() as u64).await?[0].iter().map(|e| int(e, "i")).collect();
    assert_eq!(got, expected);
    // Rejected events never left the source node.
    let s = a.stats();
    assert_eq!(s.sent, expected.len() as u64);
    assert!(s.bytes_sent < (expected.len() as u64 + 1) * 600, "{s:?}");
    assert_eq!(s.filtered, 90 - expected.len() as u64);
    Ok(())
}

/// Many sinks with overlapping type filters (every type, one type, several, a name listed twice, types nobody
/// sends) and content filters, on the source's node and on two others: each sink gets exactly the events its types and
/// filter accept, in order, nothing is counted as lost, and a sink that joins later with a type no other sink names is
/// routed to as soon as the source sees it. (Sources find the sinks of a type through an index of the routing table;
/// this is what it must keep.)
#[cfg(feature = "cel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_and_content_filters_of_many_sinks_pick_exactly_their_events() -> Result<()> {
    let nodes = cluster(3).await?;
    let a = nodes[0].create_channel("many").await?;
    let b = nodes[1].open_channel("many").await?;
    let c = nodes[2].open_channel("many").await?;
    let opts = || SinkOptions::new().capacity(1 << 12);
    // (channel, types, filter): what each sink asks for.
    let specs: [(&kecho::Channel, &[&str], Option<&str>); 9] = [
        (&b, &[], None),
        (&b, &["x"], None),
        (&b, &["x", "y", "x"], None),
        (&b, &["y"], Some("i >= 10")),
        (&c, &["z"], None),
        (&c, &["x"], Some(r#"to == "c""#)),
        (&c, &["q", "r"], None),
        (&a, &["y"], None),
        (&a, &[], Some(r#"type == "z" || to == "b""#)),
    ];
    let mut sinks = Vec::new();
    for (ch, types, filter) in specs {
        let mut o = opts();
        if !types.is_empty() {
            o = o.types(types.iter().copied());
        }
        if let Some(f) = filter {
            o = o.filter(f);
        }
        sinks.push(ch.sink(o)?);
    }
    a.wait_for_sinks(specs.len(), T).await?;
    let mut src = a.source()?;
    let types = ["x", "y", "z", "w"];
    let accepts = |k: usize, ty: &str, i: i64, to: &str| {
        let (_, tys, filter) = specs[k];
        let typed = tys.is_empty() || tys.contains(&ty);
        typed
            && match filter {
                None => true,
                Some("i >= 10") => i >= 10,
                Some(r#"to == "c""#) => to == "c",
                Some(_) => ty == "z" || to == "b",
            }
    };
    let mut expected: Vec<Vec<(String, i64)>> = vec![Vec::new(); specs.len()];
    // Event `i`'s type and `to` attribute.
    let event = |i: i64| (types[(i as usize) % 4], if i % 3 == 0 { "c" } else { "b" });
    for i in 0..80 {
        let (ty, to) = event(i);
        src.submit(ty, &Attrs::new().with("i", i).with("to", to), b"").await?;
        for (k, e) in expected.iter_mut().enumerate() {
            if accepts(k, ty, i, to) {
                e.push((ty.to_owned(), i));
            }
        }
    }
    let total = expected.iter().map(Vec::len).sum::<usize>() as u64;
    let got = settle(sinks.iter_mut().collect(), total).await?;
    // `Sink::accepts` (what a replay from a recorder is filtered by) says what the sources decided.
    for (k, sink) in sinks.iter().enumerate() {
        let said: Vec<(String, i64)> = (0..80)
            .map(|i| (event(i), i))
            .filter(|((ty, to), i)| sink.accepts(ty, &Attrs::new().with("i", *i).with("to", *to)))
            .map(|((ty, _), i)| (ty.to_owned(), i))
            .collect();
        assert_eq!(said, expected[k], "Sink::accepts of sink {k}");
    }
    for (k, (got, want)) in got.iter().zip(&expected).enumerate() {
        let got: Vec<(String, i64)> = got.iter().map(|e| (e.ty().to_owned(), int(e, "i"))).collect();
        assert_eq!(&got, want, "sink {k} ({:?}, {:?})", specs[k].1, specs[k].2);
    }
    // A sink of a type nobody asked for so far: the source's next table routes it.
    let mut late = c.sink(opts().types(["w"]))?;
    a.wait_for_sinks(specs.len() + 1, T).await?;
    let mut late_want = Vec::new();
    for i in 80..100 {
        let (ty, to) = event(i);
        src.submit(ty, &Attrs::new().with("i", i).with("to", to), b"").await?;
        if ty == "w" {
            late_want.push(i);
        }
    }
    let got: Vec<i64> = settle(vec![&mut late], late_want.len() as u64).await?[0].iter().map(|e| int(e, "i")).collect();
    assert_eq!(got, late_want);
    // Nothing was dropped or reported missing: every node's count of the events not meant for it was right.
    for ch in [&a, &b, &c] {
        let s = ch.stats();
        assert_eq!((s.dropped, s.missed), (0, 0), "{s:?}");
    }
    Ok(())
}

#[cfg(feature = "cel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_expressions_are_refused_with_a_position() -> Result<()> {
    let nodes = cluster(1).await?;
    let ch = nodes[0].channel("bad").await?;
    match ch.sink(SinkOptions::new().filter("cpu > 0.8 &&")) {
        Err(kecho::Error::Filter(e)) => {
            assert_eq!(e.line, 1);
            assert!(e.to_string().contains("column"), "{e}");
        }
        other => bail!("expected a filter error, got {other:?}"),
    }
    assert_eq!(ch.sinks(), 0, "the refused sink never joined");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_filter_drops_duplicate_responses_and_can_add_attributes() -> Result<()> {
    let nodes = cluster(3).await?;
    let client = nodes[0].create_channel("responses").await?;
    let mut sink = client.sink(SinkOptions::new())?;
    client.set_in_filter(Some(Arc::new(Dedupe::new("req", Duration::from_secs(5)))));
    let mut servers = Vec::new();
    for n in &nodes[1..] {
        let ch = n.open_channel("responses").await?;
        ch.wait_for_sinks(1, T).await?;
        servers.push(ch.source()?);
    }
    // Both servers answer requests 0..10; the client keeps the first answer of each.
    for req in 0..10i64 {
        for s in servers.iter_mut() {
            s.submit("resp", &Attrs::new().with("req", req), b"").await?;
        }
    }
    // Every answer arrived and was either dropped by the IN-filter or delivered.
    eventually("20 answers handled", || {
        let s = client.stats();
        s.received == 20 && s.filtered + sink.received() == 20
    })
    .await?;
    let got: Vec<i64> = take_all(&mut sink).iter().map(|e| int(e, "req")).collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>(), "exactly one answer per request");
    assert_eq!(client.stats().filtered, 10);

    // An IN-filter may annotate events and narrow the local sinks.
    let mut second = client.sink(SinkOptions::new().attr("role", "audit"))?;
    client.set_in_filter(Some(Arc::new(|ev: &mut InEvent<'_>, sinks: &LocalSinks<'_>| {
        ev.attrs_mut().set("checked", true);
        let audit: Vec<usize> =
            (0..sinks.len()).filter(|&i| sinks.attrs(i).get("role") == Some(&Value::from("audit"))).collect();
        InDecision::Only(audit)
    })));
    servers[0].submit("resp", &Attrs::new().with("req", 99i64), b"").await?;
    servers[0].submit("resp", &Attrs::new().with("req", 100i64), b"").await?;
    let ev = recv(&mut second).await?;
    assert_eq!(ev.attrs().get("checked"), Some(&Value::Bool(true)));
    // The next event of the same source arrived: the one before is wholly dispatched.
    assert_eq!(int(&recv(&mut second).await?, "req"), 100);
    assert!(take_all(&mut sink).is_empty(), "the other sink was not chosen");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_out_filter_while_events_flow_loses_and_repeats_nothing() -> Result<()> {
    let nodes = cluster(3).await?;
    let a = nodes[0].create_channel("swap").await?;
    let mut sinks = Vec::new();
    for n in &nodes[1..] {
        sinks.push(n.open_channel("swap").await?.sink(SinkOptions::new().capacity(100_000))?);
    }
    a.wait_for_sinks(2, T).await?;
    let mut src = a.source()?;
    let mut expected: HashMap<u64, usize> = HashMap::new();
    for round in 0..30 {
        let (filter, copies): (Option<Arc<dyn kecho::filter::OutFilter>>, usize) = match round % 3 {
            0 => (None, 2),
            1 => (Some(Arc::new(Selector::round_robin())), 1),
            _ => (Some(Arc::new("none".parse::<Selector>()?)), 0),
        };
        src.set_out_filter(filter);
        for _ in 0..50 {
            let seq = src.submit("e", &Attrs::new(), b"").await?;
            expected.insert(seq, copies);
        }
    }
    let mut got: HashMap<u64, usize> = HashMap::new();
    let sent = a.stats().sent;
    for evs in settle(sinks.iter_mut().collect(), sent).await? {
        for ev in evs {
            *got.entry(ev.seq()).or_default() += 1;
        }
    }
    for (seq, copies) in &expected {
        assert_eq!(got.get(seq).copied().unwrap_or(0), *copies, "event {seq}");
    }
    Ok(())
}
