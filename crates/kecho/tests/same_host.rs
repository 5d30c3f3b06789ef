//! Same-host links (`NodeBuilder::same_host`: shared-memory rings set up over Unix-domain sockets, or the sockets
//! themselves) and the low-latency receive mode (`NodeBuilder::low_latency`): the cases that matter for a transport
//! (order, loss accounting, a crashed peer, a killed process, the choice of transport) over them.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::{Attrs, MembershipConfig, Node, Overflow, RegistryClient, SinkOptions};
use tokio::time::timeout;

mod common;
use common::{eventually, recv};

const T: Duration = Duration::from_secs(10);

/// How the nodes of a test run.
#[derive(Clone, Copy)]
struct Mode {
    same_host: bool,
    /// Shared-memory rings of this size (the default), or the socket itself.
    ring: Option<usize>,
    low_latency: Duration,
}

const SAME_HOST: Mode = Mode { same_host: true, ring: Some(kecho_shm::DEFAULT_RING), low_latency: Duration::ZERO };
const SOCKET: Mode = Mode { same_host: true, ring: None, low_latency: Duration::ZERO };
const TCP: Mode = Mode { same_host: false, ring: None, low_latency: Duration::ZERO };

fn builder(reg: &RegistryClient, mode: Mode) -> kecho::NodeBuilder {
    let m = MembershipConfig {
        lease_ttl: Duration::from_millis(1500),
        open_timeout: Duration::from_secs(3),
        ..MembershipConfig::default()
    };
    Node::builder()
        .registry_client(reg.clone())
        .same_host(mode.same_host)
        .shared_memory(mode.ring)
        .low_latency(mode.low_latency)
        .heartbeat_timeout(Duration::from_millis(600))
        .membership(m)
}

/// Every link of `n` that is up is same-host (or not, as `want` says).
fn check_same_host(n: &Node, want: bool) {
    let up: Vec<_> = n.link_stats().into_iter().filter(|l| l.up).collect();
    assert!(!up.is_empty(), "no link up");
    for l in up {
        assert_eq!(l.same_host, want, "link to {} ({})", l.node, l.addr);
    }
}

/// Every link of `n` that is up runs over shared memory (or not, as `want` says).
fn check_shared_memory(n: &Node, want: bool) {
    let up: Vec<_> = n.link_stats().into_iter().filter(|l| l.up).collect();
    assert!(!up.is_empty(), "no link up");
    for l in up {
        assert!(l.same_host || !want, "link to {} is not same-host", l.node);
        assert_eq!(l.shared_memory, want, "link to {} ({})", l.node, l.addr);
    }
}

/// The heartbeat of `in_order`'s nodes.
const ORDER_HEARTBEAT: Duration = Duration::from_secs(10);

/// `n` events from one source, each carrying its number, arrive at a Block sink on another node all and in order.
async fn in_order(mode: Mode, n: u32) -> Result<(Node, Node)> {
    let reg = RegistryClient::in_process_private();
    // Order and wholeness over a link that stays up: a heartbeat that a starved test process (nice 19 beside busy
    // cores) cannot miss, so that a lost link's reported loss does not stand in for what this checks.
    let a = builder(&reg, mode).heartbeat_timeout(ORDER_HEARTBEAT).start().await?;
    let b = builder(&reg, mode).heartbeat_timeout(ORDER_HEARTBEAT).start().await?;
    let ca = a.create_channel("order").await?;
    let cb = b.open_channel("order").await?;
    let mut sink = cb.sink(SinkOptions::new().capacity(256).overflow(Overflow::Block))?;
    ca.wait_for_sinks(1, T).await?;
    let mut src = ca.source()?;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            // Sizes vary so that frames straddle the reads.
            let mut payload = i.to_le_bytes().to_vec();
            payload.resize(4 + (i as usize * 37) % 3000, 0xa5);
            src.submit("e", &Attrs::new(), &payload).await?;
        }
        Ok::<_, anyhow::Error>(src)
    });
    for i in 0..n {
        let ev = recv(&mut sink).await?;
        let got = u32::from_le_bytes(ev.payload()[..4].try_into()?);
        assert_eq!((got, ev.seq()), (i, u64::from(i) + 1), "out of order");
        assert_eq!(ev.payload().len(), 4 + (i as usize * 37) % 3000);
    }
    let _src = sender.await??;
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_whole_and_in_order_over_shared_memory() -> Result<()> {
    let (a, b) = in_order(SAME_HOST, 20_000).await?;
    check_shared_memory(&a, true);
    check_shared_memory(&b, true);
    // A ring smaller than many of the frames' bursts: the writer waits for room again and again.
    let (a, _b) = in_order(Mode { ring: Some(4096), ..SAME_HOST }, 5_000).await?;
    check_shared_memory(&a, true);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_whole_and_in_order_over_a_same_host_socket() -> Result<()> {
    let (a, b) = in_order(SOCKET, 20_000).await?;
    check_same_host(&a, true);
    check_shared_memory(&a, false);
    check_shared_memory(&b, false);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_whole_and_in_order_in_low_latency_mode() -> Result<()> {
    let low = Duration::from_micros(100);
    let (a, _b) = in_order(Mode { low_latency: low, ..TCP }, 20_000).await?;
    check_same_host(&a, false);
    let (a, _b) = in_order(Mode { low_latency: low, ..SOCKET }, 20_000).await?;
    check_shared_memory(&a, false);
    let (a, _b) = in_order(Mode { low_latency: low, ..SAME_HOST }, 20_000).await?;
    check_shared_memory(&a, true);
    Ok(())
}

/// A node that links over the socket itself and one that sets up shared memory reach each other whichever dials:
/// the acceptor goes by what the dialler sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_and_shared_memory_nodes_link_either_way() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let shm = builder(&reg, SAME_HOST).start().await?;
    let sock = builder(&reg, SOCKET).start().await?;
    // The joiner dials the contact: the socket node dials first.
    let ch = shm.create_channel("mixed").await?;
    let mut sink = ch.sink(SinkOptions::new())?;
    let cs = sock.open_channel("mixed").await?;
    cs.wait_for_sinks(1, T).await?;
    cs.source()?.submit("e", &Attrs::new(), b"x").await?;
    assert_eq!(&recv(&mut sink).await?.payload()[..], b"x");
    check_shared_memory(&shm, false);
    check_shared_memory(&sock, false);
    // And the other way round: a new shared-memory node dials the socket node.
    let shm2 = builder(&reg, SAME_HOST).start().await?;
    let ch2 = sock.create_channel("mixed2").await?;
    let mut sink2 = ch2.sink(SinkOptions::new())?;
    let c2 = shm2.open_channel("mixed2").await?;
    c2.wait_for_sinks(1, T).await?;
    c2.source()?.submit("e", &Attrs::new(), b"y").await?;
    assert_eq!(&recv(&mut sink2).await?.payload()[..], b"y");
    check_shared_memory(&shm2, true);
    Ok(())
}

/// A node without same-host links is reached over TCP by one with them, and the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_same_host_links_is_reached_over_tcp() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let local = builder(&reg, SAME_HOST).start().await?;
    let plain = builder(&reg, TCP).start().await?;
    let ch = local.create_channel("mixed").await?;
    let mut sink = ch.sink(SinkOptions::new())?;
    let cp = plain.open_channel("mixed").await?;
    cp.wait_for_sinks(1, T).await?;
    cp.source()?.submit("e", &Attrs::new(), b"x").await?;
    assert_eq!(&recv(&mut sink).await?.payload()[..], b"x");
    check_same_host(&local, false);
    check_same_host(&plain, false);
    Ok(())
}

/// A member whose process dies is found at once (its socket closes), removed, and the others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_same_host_member_is_removed_and_the_others_carry_on() -> Result<()> {
    let reg = RegistryClient::in_process_private();
    let nodes = [
        builder(&reg, SAME_HOST).start().await?,
        builder(&reg, SAME_HOST).start().await?,
        builder(&reg, SAME_HOST).start().await?,
    ];
    common::a_crashed_member_is_removed_and_the_others_carry_on(&nodes, || check_shared_memory(&nodes[0], true)).await
}

/// A Block sink nobody reads stalls the link; the events of another channel that find the link full are dropped at
/// the source and reported to their sink, exactly, once the link moves again: over a small ring, the default ring and
/// the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_dropped_at_a_full_same_host_link_are_reported() -> Result<()> {
    for (mode, shm) in [(Mode { ring: Some(16 * 1024), ..SAME_HOST }, true), (SAME_HOST, true), (SOCKET, false)] {
        let reg = RegistryClient::in_process_private();
        let a_node = builder(&reg, mode).link_queue_bytes(64 * 1024).start().await?;
        let b_node = builder(&reg, mode).start().await?;
        common::events_dropped_at_a_full_link_are_reported(&a_node, &b_node, || check_shared_memory(&a_node, shm))
            .await?;
    }
    Ok(())
}

/// The environment variable that makes `child_node` run (in a process of its own) instead of returning at once.
const CHILD: &str = "KECHO_SAME_HOST_TEST_CHILD";

/// Not a test of its own: the other process of `a_killed_process_is_detected_at_once`. It joins the channel with a
/// sink, says so, and waits to be killed (at most a minute).
#[test]
fn child_node() -> Result<()> {
    let Ok(registry) = std::env::var(CHILD) else { return Ok(()) };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let reg = RegistryClient::remote(registry.parse()?);
        let node = builder(&reg, SAME_HOST).heartbeat_timeout(Duration::from_secs(30)).start().await?;
        let ch = node.open_channel("killed").await?;
        let _sink = ch.sink(SinkOptions::new())?;
        println!("joined");
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(())
    })
}

/// A node in another process, linked through shared memory, is killed (SIGKILL: nothing runs in it any more); its
/// end of the control socket closes with it, and its link and its sink are gone at once, not after a heartbeat
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_is_detected_at_once() -> Result<()> {
    use std::io::{BufRead, BufReader};
    let server = kecho_registry::RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?;
    let addr = server.local_addr();
    let _registry = server.spawn();
    let reg = RegistryClient::remote(addr);
    // A heartbeat far longer than the bound below: only the socket's end can explain a quick detection.
    let node = builder(&reg, SAME_HOST).heartbeat_timeout(Duration::from_secs(30)).start().await?;
    let ch = node.create_channel("killed").await?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "child_node", "--nocapture", "--test-threads=1"])
        .env(CHILD, addr.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().context("child stdout")?;
    let joined = tokio::task::spawn_blocking(move || {
        BufReader::new(out).lines().map_while(std::result::Result::ok).any(|l| l.contains("joined"))
    });
    let joined = timeout(T, joined).await;
    if !matches!(joined, Ok(Ok(true))) {
        let _ = child.kill();
        bail!("the child never joined");
    }
    ch.wait_for_sinks(1, T).await?;
    check_shared_memory(&node, true);
    child.kill()?;
    child.wait()?;
    let took = eventually("the killed process's sink removed", || ch.sinks() == 0).await?;
    assert!(took < Duration::from_secs(2), "took {took:?}");
    eventually("its link down", || node.link_stats().iter().all(|l| !l.up)).await?;
    Ok(())
}
