//! The registry server and its clients over real sockets on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::BytesMut;
use kecho_proto::codec::{decode_frame, ClaimMode, CloseCode, Purpose, RegErrorCode, RegResult};
use kecho_proto::{ChannelId, Message, NodeId, PROTOCOL_VERSION};
use kecho_registry::{RegistryClient, RegistryError, RegistryServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

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
    }
}

/// The error code of a refusal, `None` for success.
async fn check(client: &RegistryClient, msg: Message) -> Result<Option<RegErrorCode>> {
    Ok(match timeout(T, client.request(msg)).await?? {
        RegResult::Error { code, .. } => Some(code),
        _ => None,
    })
}

async fn server() -> Result<(SocketAddr, kecho_registry::RegistryHandle)> {
    let s = RegistryServer::bind(([127, 0, 0, 1], 0).into()).await?;
    let addr = s.local_addr();
    Ok((addr, s.spawn()))
}

#[tokio::test]
async fn create_lookup_list_remove_over_tcp() -> Result<()> {
    let (addr, _h) = server().await?;
    let c = RegistryClient::remote(addr);
    assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?, None);
    assert_eq!(check(&c, claim("a", 2, 10_000, ClaimMode::Create)).await?, Some(RegErrorCode::Exists));
    assert_eq!(check(&c, claim("b", 2, 10_000, ClaimMode::Create)).await?, None);
    let e = c.lookup("a").await?;
    assert_eq!((e.contact, e.addr.as_str(), e.sources, e.sinks), (NodeId(1), "127.0.0.1:1001", 1, 2));
    let names: Vec<String> = c.list().await?.into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["a", "b"]);
    let remove = |node| Message::RegRemove { req: 0, name: "a".into(), channel: ChannelId(7), node: NodeId(node) };
    assert_eq!(check(&c, remove(2)).await?, Some(RegErrorCode::NotContact));
    assert_eq!(check(&c, remove(1)).await?, None);
    assert!(matches!(c.lookup("a").await, Err(RegistryError::UnknownChannel(n)) if n == "a"));
    Ok(())
}

#[tokio::test]
async fn leases_expire_unless_renewed_and_takeover_is_compare_and_set() -> Result<()> {
    let (addr, _h) = server().await?;
    let c = RegistryClient::remote(addr);
    check(&c, claim("short", 1, 200, ClaimMode::Create)).await?;
    check(&c, claim("kept", 1, 200, ClaimMode::Create)).await?;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(check(&c, claim("kept", 1, 200, ClaimMode::Renew)).await?, None);
    }
    assert!(matches!(c.lookup("short").await, Err(RegistryError::UnknownChannel(_))));
    let other = RegistryClient::remote(addr);
    let wrong = claim("kept", 3, 200, ClaimMode::Takeover(NodeId(9)));
    assert_eq!(check(&other, wrong).await?, Some(RegErrorCode::NotContact));
    assert_eq!(check(&other, claim("kept", 3, 200, ClaimMode::Takeover(NodeId(1)))).await?, None);
    assert_eq!(c.lookup("kept").await?.contact, NodeId(3));
    assert_eq!(check(&c, claim("kept", 1, 200, ClaimMode::Renew)).await?, Some(RegErrorCode::NotContact));
    Ok(())
}

#[tokio::test]
async fn concurrent_clients() -> Result<()> {
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
}

#[tokio::test]
async fn restart_on_the_same_port_is_survived_by_clients() -> Result<()> {
    let (addr, h) = server().await?;
    let c = RegistryClient::remote(addr);
    check(&c, claim("a", 1, 10_000, ClaimMode::Create)).await?;
    h.shutdown().await;
    match timeout(T, c.lookup("a")).await? {
        Err(RegistryError::Unreachable { .. }) => {}
        other => bail!("expected Unreachable while the registry is down, got {other:?}"),
    }
    let s = RegistryServer::bind(addr).await?;
    let _h2 = s.spawn();
    // The same client object works again, and the contact's renewal puts its entry back.
    assert!(matches!(c.lookup("a").await, Err(RegistryError::UnknownChannel(_))));
    assert_eq!(check(&c, claim("a", 1, 10_000, ClaimMode::Renew)).await?, None);
    assert_eq!(c.lookup("a").await?.contact, NodeId(1));
    Ok(())
}

#[tokio::test]
async fn unreachable_registry_fails_quickly_and_clearly() -> Result<()> {
    let addr: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let c = RegistryClient::remote(addr);
    let start = std::time::Instant::now();
    let err = c.list().await.expect_err("nothing listens there");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(matches!(err, RegistryError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&addr.to_string()) && err.to_string().contains("unreachable"), "{err}");
    Ok(())
}

#[tokio::test]
async fn address_in_use_is_a_clear_error() -> Result<()> {
    let (addr, _h) = server().await?;
    let err = RegistryServer::bind(addr).await.expect_err("port taken");
    assert!(matches!(err, RegistryError::Bind { .. }), "{err:?}");
    assert!(err.to_string().contains("in use"), "{err}");
    Ok(())
}

async fn read_until_closed(s: &mut TcpStream) -> Result<Vec<Message>> {
    let mut buf = BytesMut::new();
    let mut msgs = Vec::new();
    loop {
        let n = timeout(T, s.read_buf(&mut buf)).await?.unwrap_or(0);
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

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_their_connection() -> Result<()> {
    let (addr, _h) = server().await?;
    let good = RegistryClient::remote(addr);
    check(&good, claim("a", 1, 10_000, ClaimMode::Create)).await?;

    let mut garbage = TcpStream::connect(addr).await?;
    garbage.write_all(b"\x05\x00\x00\x00\xffhello world").await?;
    read_until_closed(&mut garbage).await?;

    let mut big = TcpStream::connect(addr).await?;
    big.write_all(&hello(PROTOCOL_VERSION, Purpose::Registry)).await?;
    big.write_all(&(64u32 << 20).to_le_bytes()).await?;
    let msgs = read_until_closed(&mut big).await?;
    assert!(msgs.iter().any(|m| matches!(m, Message::Close { code: CloseCode::Malformed, .. })), "{msgs:?}");

    assert_eq!(good.lookup("a").await?.contact, NodeId(1));
    Ok(())
}

#[tokio::test]
async fn wrong_version_or_purpose_is_refused_with_a_reason() -> Result<()> {
    let (addr, _h) = server().await?;
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&hello(PROTOCOL_VERSION + 1, Purpose::Registry)).await?;
    match read_until_closed(&mut s).await?.as_slice() {
        [Message::Close { code: CloseCode::VersionMismatch, reason }] => {
            assert!(reason.contains(&format!("version {}", PROTOCOL_VERSION + 1)), "{reason}")
        }
        other => bail!("expected Close(VersionMismatch): {other:?}"),
    }
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&hello(PROTOCOL_VERSION, Purpose::Node)).await?;
    match read_until_closed(&mut s).await?.as_slice() {
        [Message::Close { code: CloseCode::Handshake, .. }] => {}
        other => bail!("expected Close(Handshake): {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn in_process_clients_share_one_table_private_ones_do_not() -> Result<()> {
    let (a, b) = (RegistryClient::in_process(), RegistryClient::in_process());
    let name = format!("shared-{}", std::process::id());
    check(&a, claim(&name, 1, 10_000, ClaimMode::Create)).await?;
    assert_eq!(b.lookup(&name).await?.contact, NodeId(1));
    let p = RegistryClient::in_process_private();
    assert!(matches!(p.lookup(&name).await, Err(RegistryError::UnknownChannel(_))));
    assert_eq!(p.describe(), "in-process");
    Ok(())
}
