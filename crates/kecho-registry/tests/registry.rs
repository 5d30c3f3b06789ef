//! The registry server and its clients over real sockets on loopback, plus the in-process clients.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::BytesMut;
use kecho_proto::codec::{decode_frame, ClaimMode, CloseCode, Purpose, RegErrorCode, RegResult};
use kecho_proto::{ChannelId, ChannelSecret, Message, NodeId, PROTOCOL_VERSION};
use kecho_registry::{RegistryClient, RegistryError, RegistryHandle, RegistryServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

/// Bound on every test.
const T: Duration = Duration::from_secs(20);

/// Runs a test body under the time bound.
async fn within(body: impl Future<Output = Result<()>>) -> Result<()> {
    timeout(T, body).await.context("test timed out")?
}

fn claim(name: &str, node: u64, ttl_ms: u64, mode: ClaimMode) -> Message {
    Message::RegClaim {
        req: 0,
        name: name.into(),
        channel: ChannelId(7),
        node: NodeId(node),
        addr: format!("127.0.0.1:{}", 1000 + node),
        ttl_ms,
        mode,
        sources: 1,
        sinks: 2,
        secret: ChannelSecret(77),
    }
}

/// Sends a request: `None` if the registry granted it, else the refusal's code.
async fn check(client: &RegistryClient, msg: Message) -> Result<Option<RegErrorCode>> {
    Ok(match client.request(msg).await? {
        RegResult::Error { code, .. } => Some(code),
        _ => None,
    })
}

async fn server() -> Result<(SocketAddr, RegistryHandle)> {
    let s = RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?;
    let addr = s.local_addr();
    Ok((addr, s.spawn()))
}

/// An address nothing listens on.
fn dead_addr() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

#[tokio::test]
async fn create_lookup_list_remove_over_tcp() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let c = RegistryClient::remote(addr);
        assert_eq!(c.describe(), addr.to_string());
        assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?, None);
        // A retried create by the same contact succeeds; another node's create is refused.
        assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?, None);
        assert_eq!(check(&c, claim("a", 2, 10_000, ClaimMode::Create)).await?, Some(RegErrorCode::Exists));
        assert_eq!(check(&c, claim("b", 2, 10_000, ClaimMode::Create)).await?, None);
        let e = c.lookup("a").await?;
        assert_eq!((e.name.as_str(), e.channel, e.contact), ("a", ChannelId(7), NodeId(1)));
        assert_eq!((e.addr.as_str(), e.sources, e.sinks), ("127.0.0.1:1001", 1, 2));
        assert!(e.expires_in_ms > 9_000 && e.expires_in_ms <= 10_000, "{}", e.expires_in_ms);
        let names: Vec<String> = c.list().await?.into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a", "b"]);
        let remove = |node| Message::RegRemove {
            req: 0,
            name: "a".into(),
            channel: ChannelId(7),
            node: NodeId(node),
            secret: ChannelSecret(77),
        };
        assert_eq!(check(&c, remove(2)).await?, Some(RegErrorCode::NotContact));
        assert_eq!(check(&c, remove(1)).await?, None);
        // Removing what is not there is not an error.
        assert_eq!(check(&c, remove(1)).await?, None);
        match c.lookup("a").await {
            Err(RegistryError::UnknownChannel(n)) => assert_eq!(n, "a"),
            other => bail!("expected UnknownChannel: {other:?}"),
        }
        // A refused claim of an invalid name comes back as a refusal, not as a transport error.
        assert_eq!(check(&c, claim("", 1, 10_000, ClaimMode::Create)).await?, Some(RegErrorCode::Invalid));
        assert_eq!(c.list().await?.len(), 1);
        Ok(())
    })
    .await
}

/// On paused time (the server reads tokio's clock), so that renewing every 80 ms a lease of 200 ms does not depend on
/// how fast the machine answers.
#[tokio::test(start_paused = true)]
async fn leases_expire_unless_renewed() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let c = RegistryClient::remote(addr);
        assert_eq!(check(&c, claim("short", 1, 200, ClaimMode::Create)).await?, None);
        assert_eq!(check(&c, claim("kept", 1, 200, ClaimMode::Create)).await?, None);
        assert_eq!(c.lookup("short").await?.contact, NodeId(1));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(80)).await;
            assert_eq!(check(&c, claim("kept", 1, 200, ClaimMode::Renew)).await?, None);
        }
        // 400 ms after the 200 ms lease was granted.
        assert!(matches!(c.lookup("short").await, Err(RegistryError::UnknownChannel(_))));
        assert_eq!(c.lookup("kept").await?.contact, NodeId(1));
        let names: Vec<String> = c.list().await?.into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["kept"]);
        // An expired name is free for another node.
        assert_eq!(check(&c, claim("short", 2, 10_000, ClaimMode::Create)).await?, None);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn takeover_is_compare_and_set() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let (c, other) = (RegistryClient::remote(addr), RegistryClient::remote(addr));
        check(&c, claim("ch", 1, 10_000, ClaimMode::Create)).await?;
        let wrong = claim("ch", 3, 10_000, ClaimMode::Takeover(NodeId(9)));
        assert_eq!(check(&other, wrong).await?, Some(RegErrorCode::NotContact));
        assert_eq!(c.lookup("ch").await?.contact, NodeId(1));
        assert_eq!(check(&other, claim("ch", 3, 10_000, ClaimMode::Takeover(NodeId(1)))).await?, None);
        assert_eq!(c.lookup("ch").await?.contact, NodeId(3));
        // The old contact has lost the role; a second node racing with the same expectation loses too.
        assert_eq!(check(&c, claim("ch", 1, 10_000, ClaimMode::Renew)).await?, Some(RegErrorCode::NotContact));
        let late = claim("ch", 4, 10_000, ClaimMode::Takeover(NodeId(1)));
        assert_eq!(check(&c, late).await?, Some(RegErrorCode::NotContact));
        assert_eq!(other.lookup("ch").await?.contact, NodeId(3));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn concurrent_clients() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            tasks.push(tokio::spawn(async move {
                let c = RegistryClient::remote(addr);
                for k in 0..20 {
                    let name = format!("ch{i}-{k}");
                    if check(&c, claim(&name, i, 10_000, ClaimMode::Create)).await?.is_some() {
                        bail!("create {name} refused");
                    }
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        assert_eq!(RegistryClient::remote(addr).list().await?.len(), 16 * 20);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn one_client_pipelines_concurrent_requests() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let c = RegistryClient::remote(addr);
        for i in 0..50u64 {
            check(&c, claim(&format!("p{i}"), i, 10_000, ClaimMode::Create)).await?;
        }
        // Many requests in flight at once on clones of one client: every answer must reach its own request.
        let mut tasks = Vec::new();
        for round in 0..4u64 {
            for i in 0..50u64 {
                let c = c.clone();
                tasks.push(tokio::spawn(async move {
                    let e = c.lookup(&format!("p{i}")).await?;
                    ensure!(e.contact == NodeId(i), "round {round}: p{i} answered with {e:?}");
                    anyhow::Ok(())
                }));
            }
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn restart_on_the_same_port_is_survived_by_clients() -> Result<()> {
    within(async {
        let (addr, h) = server().await?;
        let c = RegistryClient::remote(addr);
        check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?;
        h.shutdown().await;
        let start = Instant::now();
        match c.lookup("a").await {
            Err(e @ RegistryError::Unreachable { .. }) => {
                assert!(e.to_string().starts_with(&format!("registry at {addr} is unreachable: ")), "{e}")
            }
            other => bail!("expected Unreachable while the registry is down, got {other:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        // Still down: still a clear error.
        assert!(matches!(c.list().await, Err(RegistryError::Unreachable { .. })));

        let _h2 = RegistryServer::bind(addr).await?.spawn();
        // The same client object works again; the new registry has forgotten everything, and the contact's renewal
        // puts its entry back.
        assert!(matches!(c.lookup("a").await, Err(RegistryError::UnknownChannel(_))));
        assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Renew)).await?, None);
        assert_eq!(c.lookup("a").await?.contact, NodeId(1));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_dropped_handle_kills_the_registry_and_a_restart_is_transparent() -> Result<()> {
    within(async {
        let (addr, h) = server().await?;
        let c = RegistryClient::remote(addr);
        check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?;
        drop(h);
        // Wait until the port is really closed (the abort completes on the runtime).
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _h2 = RegistryServer::bind(addr).await?.spawn();
        // The client's connection to the old registry is dead, but it had been made by an earlier request: the
        // client retries once on a new connection, so a restart between two requests costs no error.
        assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Renew)).await?, None);
        assert_eq!(c.lookup("a").await?.contact, NodeId(1));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unreachable_registry_fails_quickly_and_clearly() -> Result<()> {
    within(async {
        let addr = dead_addr()?;
        let c = RegistryClient::remote(addr);
        let start = Instant::now();
        let err = c.list().await.expect_err("nothing listens there");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with(&format!("registry at {addr} is unreachable: ")), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
        // Concurrent requests against the dead address all fail quickly too.
        let (a, b, d) = tokio::join!(c.lookup("x"), c.list(), c.lookup("y"));
        assert!(matches!(a, Err(RegistryError::Unreachable { .. })), "{a:?}");
        assert!(matches!(b, Err(RegistryError::Unreachable { .. })), "{b:?}");
        assert!(matches!(d, Err(RegistryError::Unreachable { .. })), "{d:?}");
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn address_in_use_is_a_clear_error() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let err = RegistryServer::bind(addr).await.expect_err("port taken");
        assert!(matches!(err, RegistryError::Bind { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.starts_with(&format!("cannot listen on {addr}: address in use")), "{text}");
        Ok(())
    })
    .await
}

/// Reads every message until the peer closes the connection.
async fn read_until_closed(s: &mut TcpStream) -> Result<Vec<Message>> {
    let mut buf = BytesMut::new();
    let mut msgs = Vec::new();
    loop {
        let n = s.read_buf(&mut buf).await.unwrap_or(0);
        while let Ok(Some(m)) = decode_frame(&mut buf, 1 << 20) {
            msgs.push(m);
        }
        if n == 0 {
            return Ok(msgs);
        }
    }
}

fn hello(version: u16, purpose: Purpose) -> Vec<u8> {
    Message::Hello { version, node: NodeId(5), addr: String::new(), purpose }.to_bytes().to_vec()
}

fn is_close(msgs: &[Message], want: CloseCode) -> bool {
    matches!(msgs.last(), Some(Message::Close { code, .. }) if *code == want)
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_their_connection() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let good = RegistryClient::remote(addr);
        check(&good, claim("a", 1, 10_000, ClaimMode::Create)).await?;

        // An unknown message kind instead of Hello.
        let mut garbage = TcpStream::connect(addr).await?;
        garbage.write_all(b"\x05\x00\x00\x00\xffhello world").await?;
        let msgs = read_until_closed(&mut garbage).await?;
        assert!(is_close(&msgs, CloseCode::Malformed), "{msgs:?}");

        // An HTTP request: its first four bytes read as a huge length.
        let mut http = TcpStream::connect(addr).await?;
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await?;
        let msgs = read_until_closed(&mut http).await?;
        assert!(is_close(&msgs, CloseCode::Malformed), "{msgs:?}");

        // A good handshake, then a length prefix above the 1 MiB limit: refused before any body is sent.
        let mut big = TcpStream::connect(addr).await?;
        big.write_all(&hello(PROTOCOL_VERSION, Purpose::Registry)).await?;
        big.write_all(&((1u32 << 20) + 1).to_le_bytes()).await?;
        let msgs = read_until_closed(&mut big).await?;
        assert!(matches!(msgs.first(), Some(Message::HelloAck { version: PROTOCOL_VERSION, .. })), "{msgs:?}");
        assert!(is_close(&msgs, CloseCode::Malformed), "{msgs:?}");

        // A valid request after the handshake, then a truncated body: the answer comes first, then the Close.
        let mut trunc = TcpStream::connect(addr).await?;
        let mut bytes = hello(PROTOCOL_VERSION, Purpose::Registry);
        bytes.extend_from_slice(&Message::RegLookup { req: 42, name: "a".into() }.to_bytes());
        bytes.extend_from_slice(b"\x01\x00\x00\x00\x17"); // RegList without its request id
        trunc.write_all(&bytes).await?;
        let msgs = read_until_closed(&mut trunc).await?;
        assert!(matches!(msgs.get(1), Some(Message::RegReply { req: 42, result: RegResult::Entry(_) })), "{msgs:?}");
        assert!(is_close(&msgs, CloseCode::Malformed), "{msgs:?}");

        // The well-behaved client's connection was not affected.
        assert_eq!(good.lookup("a").await?.contact, NodeId(1));
        assert_eq!(good.list().await?.len(), 1);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn handshake_rules_are_enforced_with_a_reason() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&hello(PROTOCOL_VERSION + 1, Purpose::Registry)).await?;
        match read_until_closed(&mut s).await?.as_slice() {
            [Message::Close { code: CloseCode::VersionMismatch, reason }] => {
                assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 1)), "{reason}");
                assert!(reason.contains(&format!("version {PROTOCOL_VERSION}")), "{reason}");
            }
            other => bail!("expected Close(VersionMismatch): {other:?}"),
        }
        // A node dialling the registry.
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&hello(PROTOCOL_VERSION, Purpose::Node)).await?;
        let msgs = read_until_closed(&mut s).await?;
        assert!(matches!(msgs.as_slice(), [Message::Close { code: CloseCode::Handshake, .. }]), "{msgs:?}");
        // A request before Hello.
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(&Message::RegList { req: 1 }.to_bytes()).await?;
        let msgs = read_until_closed(&mut s).await?;
        assert!(matches!(msgs.as_slice(), [Message::Close { code: CloseCode::Handshake, .. }]), "{msgs:?}");
        // A node message after the handshake.
        let mut s = TcpStream::connect(addr).await?;
        let mut bytes = hello(PROTOCOL_VERSION, Purpose::Registry);
        bytes.extend_from_slice(&Message::Ping(3).to_bytes());
        s.write_all(&bytes).await?;
        let msgs = read_until_closed(&mut s).await?;
        assert!(matches!(
            msgs.as_slice(),
            [Message::HelloAck { .. }, Message::Close { code: CloseCode::Handshake, .. }]
        ));
        Ok(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_is_closed_after_the_handshake_timeout() -> Result<()> {
    within(async {
        let s = RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?;
        let addr = s.local_addr();
        let _h = s.with_handshake_timeout(Duration::from_millis(200)).spawn();
        let start = Instant::now();
        let mut silent = TcpStream::connect(addr).await?;
        // Half a Hello does not count.
        silent.write_all(&hello(PROTOCOL_VERSION, Purpose::Registry)[..6]).await?;
        let msgs = read_until_closed(&mut silent).await?;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(200) && took < Duration::from_secs(3), "took {took:?}");
        assert!(is_close(&msgs, CloseCode::Timeout), "{msgs:?}");
        // A client that does complete its Hello is served.
        assert!(RegistryClient::remote(addr).list().await?.is_empty());
        Ok(())
    })
    .await
}

#[tokio::test]
async fn connections_beyond_the_bound_are_closed_at_once() -> Result<()> {
    within(async {
        let s = RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?.with_max_connections(2);
        let addr = s.local_addr();
        let _h = s.spawn();
        let (a, b) = (RegistryClient::remote(addr), RegistryClient::remote(addr));
        a.list().await?;
        b.list().await?;
        // A third connection is closed without a word, even though it says Hello.
        let mut third = TcpStream::connect(addr).await?;
        third.write_all(&hello(PROTOCOL_VERSION, Purpose::Registry)).await?;
        assert!(read_until_closed(&mut third).await?.is_empty());
        let c = RegistryClient::remote(addr);
        assert!(matches!(c.list().await, Err(RegistryError::Unreachable { .. })));
        // The two served connections keep working; once one is gone its slot is free again.
        check(&a, claim("x", 1, 10_000, ClaimMode::Create)).await?;
        assert_eq!(b.lookup("x").await?.contact, NodeId(1));
        drop(a);
        let mut served = false;
        for _ in 0..100 {
            if c.list().await.is_ok() {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(served, "a freed slot was not reused");
        Ok(())
    })
    .await
}

/// A fake registry: answers every `Hello` with `ack` (if any), then sends `then`, then reads until the client leaves.
/// Returns its address and the number of connections it accepted.
async fn fake_registry(ack: Option<Message>, then: Vec<u8>) -> Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (ack, then) = (ack.clone(), then.clone());
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                while !matches!(decode_frame(&mut buf, 1 << 20), Ok(Some(Message::Hello { .. }))) {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                }
                if let Some(ack) = ack {
                    let _ = s.write_all(&ack.to_bytes()).await;
                }
                let _ = s.write_all(&then).await;
                while s.read_buf(&mut buf).await.unwrap_or(0) > 0 {}
            });
        }
    });
    Ok((addr, accepted))
}

#[tokio::test]
async fn the_client_reports_a_version_mismatch() -> Result<()> {
    within(async {
        let theirs = PROTOCOL_VERSION + 7;
        let (addr, _) = fake_registry(Some(Message::HelloAck { version: theirs, node: NodeId(0) }), vec![]).await?;
        match RegistryClient::remote(addr).list().await {
            Err(RegistryError::VersionMismatch { ours, theirs: t }) => assert_eq!((ours, t), (PROTOCOL_VERSION, theirs)),
            other => bail!("expected VersionMismatch: {other:?}"),
        }
        let reason = format!(
            "protocol version mismatch: this registry speaks version {theirs}, the client speaks version {PROTOCOL_VERSION}"
        );
        let close = Message::Close { code: CloseCode::VersionMismatch, reason };
        let (addr, _) = fake_registry(Some(close), vec![]).await?;
        let err = RegistryClient::remote(addr).list().await.expect_err("refused");
        assert!(matches!(err, RegistryError::VersionMismatch { theirs: t, .. } if t == theirs), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("registry speaks protocol version {theirs}, this program speaks version {PROTOCOL_VERSION}")
        );
        Ok(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn a_silent_registry_times_out_and_the_next_request_reconnects() -> Result<()> {
    within(async {
        let (addr, accepted) =
            fake_registry(Some(Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(0) }), vec![]).await?;
        let c = RegistryClient::remote(addr).with_timeouts(Duration::from_secs(2), Duration::from_millis(300));
        let start = Instant::now();
        let err = c.list().await.expect_err("never answered");
        let took = start.elapsed();
        assert!(matches!(err, RegistryError::Timeout { addr: a } if a == addr), "{err:?}");
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "took {took:?}");
        assert_eq!(err.to_string(), format!("registry at {addr} did not answer in time"));
        assert!(matches!(c.lookup("x").await, Err(RegistryError::Timeout { .. })));
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "a timed-out connection is not reused");

        // A registry that accepts but never finishes the handshake is a timeout too.
        let (addr, _) = fake_registry(None, vec![]).await?;
        let c = RegistryClient::remote(addr).with_timeouts(Duration::from_secs(2), Duration::from_millis(300));
        assert!(matches!(c.list().await, Err(RegistryError::Timeout { .. })));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn garbage_from_the_registry_is_a_protocol_error() -> Result<()> {
    within(async {
        let ack = Message::HelloAck { version: PROTOCOL_VERSION, node: NodeId(0) };
        let (addr, _) = fake_registry(Some(ack), b"\x03\x00\x00\x00\xee\x01\x02".to_vec()).await?;
        match RegistryClient::remote(addr).list().await {
            Err(RegistryError::Protocol(why)) => assert!(why.contains("unknown message kind 238"), "{why}"),
            other => bail!("expected Protocol: {other:?}"),
        }
        // Something that is no kecho registry at all.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let http = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            }
        });
        assert!(matches!(RegistryClient::remote(http).list().await, Err(RegistryError::Protocol(_))));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn only_registry_requests_are_accepted() -> Result<()> {
    within(async {
        let (addr, _h) = server().await?;
        for c in [RegistryClient::remote(addr), RegistryClient::in_process_private()] {
            match c.request(Message::Ping(1)).await {
                Err(e @ RegistryError::NotARequest { kind: 4 }) => {
                    assert_eq!(e.to_string(), "message kind 4 is not a registry request")
                }
                other => bail!("{}: expected NotARequest: {other:?}", c.describe()),
            }
            // The client is still usable.
            assert!(c.list().await?.is_empty());
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn in_process_clients_share_one_table_private_ones_do_not() -> Result<()> {
    within(async {
        let (a, b) = (RegistryClient::in_process(), RegistryClient::in_process());
        assert_eq!(a.describe(), "in-process");
        let name = format!("shared-{}", std::process::id());
        assert_eq!(check(&a, claim(&name, 1, 10_000, ClaimMode::Create)).await?, None);
        assert_eq!(b.lookup(&name).await?.contact, NodeId(1));
        // The process-wide table is shared across threads and runtimes too.
        let n = name.clone();
        let seen = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async { RegistryClient::in_process().lookup(&n).await.map(|e| e.contact) })
                .map_err(anyhow::Error::from)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))??;
        assert_eq!(seen, NodeId(1));

        let p = RegistryClient::in_process_private();
        assert!(matches!(p.lookup(&name).await, Err(RegistryError::UnknownChannel(_))));
        assert_eq!(p.describe(), "in-process");
        let q = RegistryClient::in_process_private();
        check(&p, claim("private", 2, 10_000, ClaimMode::Create)).await?;
        assert_eq!(p.clone().lookup("private").await?.contact, NodeId(2));
        assert!(matches!(q.lookup("private").await, Err(RegistryError::UnknownChannel(_))));
        assert!(matches!(a.lookup("private").await, Err(RegistryError::UnknownChannel(_))));
        // Timeouts do not apply to an in-process client.
        assert_eq!(p.with_timeouts(Duration::ZERO, Duration::ZERO).lookup("private").await?.contact, NodeId(2));
        Ok(())
    })
    .await
}

#[tokio::test(start_paused = true)]
async fn in_process_leases_follow_tokio_time() -> Result<()> {
    within(async {
        let c = RegistryClient::in_process_private();
        check(&c, claim("t", 1, 1_000, ClaimMode::Create)).await?;
        tokio::time::advance(Duration::from_millis(600)).await;
        assert_eq!(c.lookup("t").await?.expires_in_ms, 400);
        assert_eq!(check(&c, claim("t", 1, 1_000, ClaimMode::Renew)).await?, None);
        tokio::time::advance(Duration::from_millis(900)).await;
        assert_eq!(c.lookup("t").await?.expires_in_ms, 100);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(matches!(c.lookup("t").await, Err(RegistryError::UnknownChannel(_))));
        // A lease shorter than the minimum is granted the minimum (100 ms).
        check(&c, claim("min", 1, 1, ClaimMode::Create)).await?;
        assert_eq!(c.lookup("min").await?.expires_in_ms, 100);
        Ok(())
    })
    .await
}

/// A replicated registry with no leader to be had: the error names every replica and what each did (two addresses
/// where nothing listens refuse the connection, one that accepts and never answers times out), not only the last one
/// asked.
#[tokio::test]
async fn without_a_leader_the_error_names_every_replica_and_its_answer() -> Result<()> {
    within(async {
        // Accepts connections and says nothing: not a registry.
        let mute = TcpListener::bind("127.0.0.1:0").await?;
        let silent = mute.local_addr()?;
        // Ports bound and let go again: nothing listens there.
        let bound = [TcpListener::bind("127.0.0.1:0").await?, TcpListener::bind("127.0.0.1:0").await?];
        let refused = [bound[0].local_addr()?, bound[1].local_addr()?];
        drop(bound);
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((s, _)) = mute.accept().await {
                conns.push(s);
            }
        });
        let addrs = vec![refused[0], silent, refused[1]];
        let c = RegistryClient::replicated(addrs.clone())
            .with_timeouts(Duration::from_millis(200), Duration::from_millis(800));
        let err = c.list().await.expect_err("no registry listens");
        let text = err.to_string();
        eprintln!("{text}");
        let RegistryError::NoLeader { replicas, .. } = &err else { bail!("expected NoLeader, got {err:?}") };
        assert_eq!(replicas.iter().map(|r| r.addr).collect::<Vec<_>>(), addrs, "{text}");
        for (r, want_refused) in replicas.iter().zip([true, false, true]) {
            let e = r.error.as_deref().with_context(|| format!("{} was never asked: {text}", r.addr))?;
            if want_refused {
                let RegistryError::Unreachable { source, .. } = e else { bail!("{}: {e:?}", r.addr) };
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused, "{text}");
            } else {
                assert!(matches!(e, RegistryError::Timeout { .. }), "{}: {e:?}", r.addr);
            }
        }
        for a in &addrs {
            assert!(text.contains(&a.to_string()), "{a} missing from: {text}");
        }
        assert!(text.contains("did not answer in time"), "{text}");
        assert!(text.contains("unreachable: Connection refused"), "{text}");
        held.abort();
        Ok(())
    })
    .await
}
