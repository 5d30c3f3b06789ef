//! Sandboxed (WebAssembly) filters installed by one member on the others, and misbehaving modules contained.
#![cfg(feature = "wasm")]

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::wasm::{WasmError, WasmLimits};
use kecho::{Attrs, Error, Event, FilterKind, Node, RegistryClient, SinkOptions, TryRecvError};
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

fn wat(name: &str) -> Vec<u8> {
    let path = format!("{}/../../examples/filters/{name}.wat", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Waits until every event frame the publisher `a` sent has arrived at its node and was either dropped there by an
/// IN-filter or queued at the node's one sink (nothing more can arrive then), and takes what each sink holds.
async fn settle(s: &mut Setup) -> Result<Vec<Vec<Event>>> {
    let start = tokio::time::Instant::now();
    loop {
        let sent = s.a.stats().sent;
        let arrived: u64 = s.sinks.iter().map(|(ch, _)| ch.stats().received).sum();
        let handled = s.sinks.iter().all(|(ch, k)| ch.stats().received == ch.stats().filtered + k.received());
        if arrived == sent && handled {
            break;
        }
        anyhow::ensure!(arrived <= sent, "more events arrived than were sent");
        anyhow::ensure!(start.elapsed() < T, "timed out: {arrived} of {sent} events arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(s.sinks.iter_mut().map(|(_, k)| take_all(k)).collect())
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

/// A publisher node `a` that allows remote filters, two sink nodes, and an installer node.
struct Setup {
    nodes: Vec<Node>,
    a: kecho::Channel,
    sinks: Vec<(kecho::Channel, kecho::Sink)>,
    installer: kecho::Channel,
}

async fn setup(allow: bool) -> Result<Setup> {
    let reg = RegistryClient::in_process_private();
    let mut nodes = Vec::new();
    for _ in 0..4 {
        nodes.push(Node::builder().registry_client(reg.clone()).start().await?);
    }
    let a = nodes[0].create_channel("sandbox").await?;
    a.set_remote_filters(allow);
    let mut sinks = Vec::new();
    for n in &nodes[1..3] {
        let ch = n.open_channel("sandbox").await?;
        ch.set_remote_filters(allow);
        let s = ch.sink(SinkOptions::new())?;
        sinks.push((ch, s));
    }
    let installer = nodes[3].open_channel("sandbox").await?;
    a.wait_for_sinks(2, T).await?;
    installer.wait_for_sinks(2, T).await?;
    Ok(Setup { nodes, a, sinks, installer })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_installs_an_out_filter_on_the_others() -> Result<()> {
    let mut s = setup(true).await?;
    let report = s.installer.install_filter(FilterKind::Out, &wat("round_robin"), T).await?;
    assert_eq!(report.installed, 4, "{report:?}");
    assert!(report.refused.is_empty() && report.silent == 0, "{report:?}");
    let mut src = s.a.source()?;
    for i in 0..10i64 {
        src.submit("e", &Attrs::new().with("i", i), b"").await?;
    }
    let got: Vec<usize> = settle(&mut s).await?.iter().map(Vec::len).collect();
    assert_eq!(got, [5, 5], "round robin over the two sinks");
    // A source's own filter takes precedence over the installed one.
    src.set_out_filter(Some(Arc::new(kecho::filter::Selector::all())));
    src.submit("e", &Attrs::new(), b"").await?;
    for got in settle(&mut s).await? {
        assert_eq!(got.len(), 1);
    }
    drop(s.nodes);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_is_refused_where_not_allowed() -> Result<()> {
    let mut s = setup(false).await?;
    let report = s.installer.install_filter(FilterKind::Out, &wat("first_sink"), T).await?;
    assert_eq!(report.installed, 1, "only on the installer itself: {report:?}");
    assert_eq!(report.refused.len(), 3, "{report:?}");
    assert!(report.refused.iter().all(|r| r.contains("not allowed")), "{report:?}");
    let mut src = s.a.source()?;
    src.submit("e", &Attrs::new(), b"").await?;
    for got in settle(&mut s).await? {
        assert_eq!(got.len(), 1, "the refused filter has no effect");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_filter_runs_at_the_receiving_node() -> Result<()> {
    let mut s = setup(true).await?;
    // Only node 1 lets it in: node 2 refuses.
    s.sinks[1].0.set_remote_filters(false);
    let report = s.installer.install_filter(FilterKind::In, &wat("drop_all"), T).await?;
    assert_eq!(report.refused.len(), 1, "{report:?}");
    let mut src = s.a.source()?;
    src.submit("e", &Attrs::new(), b"").await?;
    let got = settle(&mut s).await?;
    assert_eq!(got[0].len(), 0, "dropped by the installed IN-filter");
    assert_eq!(got[1].len(), 1);
    assert_eq!(s.sinks[0].0.stats().filtered, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_modules_are_contained() -> Result<()> {
    for bad in ["infinite_loop", "trap", "memory_bomb", "huge_return"] {
        let mut s = setup(true).await?;
        s.a.set_wasm_limits(WasmLimits { fuel: 200_000, memory: 1 << 20, wall_time: Duration::from_millis(50) });
        let mut host_faults = s.a.filter_faults();
        let mut installer_faults = s.installer.filter_faults();
        let report = s.installer.install_filter(FilterKind::Out, &wat(bad), T).await?;
        assert_eq!(report.installed, 4, "{bad}: {report:?}");
        // Another channel on the same node, to show it is not slowed or stopped.
        let other = s.nodes[0].channel("other").await?;
        let mut other_sink = other.sink(SinkOptions::new())?;
        let mut other_src = other.source()?;

        let mut src = s.a.source()?;
        let start = std::time::Instant::now();
        for i in 0..20i64 {
            src.submit("e", &Attrs::new().with("i", i), b"").await?;
        }
        assert!(start.elapsed() < Duration::from_secs(2), "{bad}: submits took {:?}", start.elapsed());
        // Delivery fell back to the default: every sink got every event.
        for got in settle(&mut s).await? {
            assert_eq!(got.len(), 20, "{bad}");
        }
        let fault = timeout(T, host_faults.recv()).await.context("host fault")??;
        assert_eq!(fault.kind, FilterKind::Out);
        let remote = timeout(T, installer_faults.recv()).await.context("installer fault")??;
        assert!(!remote.reason.is_empty(), "{bad}");
        match bad {
            "infinite_loop" => assert!(fault.reason.contains("fuel"), "{}", fault.reason),
            "huge_return" => assert!(fault.reason.contains("1000000"), "{}", fault.reason),
            _ => assert!(fault.reason.contains("trap"), "{bad}: {}", fault.reason),
        }
        other_src.submit("x", &Attrs::new(), b"").await?;
        assert_eq!(timeout(T, other_sink.recv()).await?.map(|e| e.ty().to_owned()), Ok("x".to_owned()));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_modules_are_refused_before_sending() -> Result<()> {
    let s = setup(true).await?;
    let missing = |name| move |e: &WasmError| matches!(e, WasmError::MissingExport { name: n, .. } if *n == name);
    type Kind = Box<dyn Fn(&WasmError) -> bool>;
    let checks: [(Vec<u8>, &str, Kind); 4] = [
        (b"not wasm at all".to_vec(), "invalid filter module", Box::new(|e| matches!(e, WasmError::Compile { .. }))),
        (b"(module (memory (export \"memory\") 2))".to_vec(), "kecho_buffer", Box::new(missing("kecho_buffer"))),
        (wat("drop_all"), "kecho_select", Box::new(missing("kecho_select"))),
        (vec![0; kecho::wasm::MAX_MODULE + 1], "exceeds", Box::new(|e| matches!(e, WasmError::TooLarge { .. }))),
    ];
    for (module, needle, kind) in checks {
        match s.installer.install_filter(FilterKind::Out, &module, T).await {
            Err(Error::Wasm(e)) => {
                assert!(e.to_string().contains(needle), "{e}");
                assert!(kind(&e), "{needle}: wrong kind {e:?}");
            }
            Err(e) => bail!("refused for another reason: {e}"),
            Ok(r) => bail!("accepted a bad module: {r:?}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_time_stops_a_module_that_fuel_would_not() -> Result<()> {
    let mut s = setup(true).await?;
    let limits = WasmLimits { fuel: u64::MAX / 2, memory: 1 << 20, wall_time: Duration::from_millis(5) };
    s.a.set_wasm_limits(limits);
    for (ch, _) in &s.sinks {
        ch.set_wasm_limits(limits);
    }
    s.installer.set_wasm_limits(limits);
    let mut faults = s.a.filter_faults();
    s.installer.install_filter(FilterKind::Out, &wat("infinite_loop"), T).await?;
    let mut src = s.a.source()?;
    let start = std::time::Instant::now();
    src.submit("e", &Attrs::new(), b"").await?;
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
    let fault = timeout(T, faults.recv()).await??;
    assert!(fault.reason.contains("wall-time"), "{}", fault.reason);
    for got in settle(&mut s).await? {
        assert_eq!(got.len(), 1, "fell back to every sink");
    }
    Ok(())
}
