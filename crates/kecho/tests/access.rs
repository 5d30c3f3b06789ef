//! Per-channel access control from the library: who may join a protected channel as a source or a sink, or install
//! filters in it; what a refused node is told; and that every member checks, not only the contact, so that a node
//! bypassing its own checks gets nothing in.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use kecho::{Attrs, Authority, Error, FilterKind, Identity, Node, Policy, RegistryClient, Roles, SinkOptions, Token};
use kecho_proto::codec::{decode_body, split_frame, EventMsg, Purpose, RegResult};
use kecho_proto::{LocalId, MemberInfo, Message, NodeSnapshot, Overflow, Role, TypeFilter, PROTOCOL_VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);
const CH: &str = "vault";

/// An IN-filter that delivers every event.
const ACCEPT_ALL: &str = r#"(module
  (memory (export "memory") 2)
  (func (export "kecho_buffer") (result i32) (i32.const 1024))
  (func (export "kecho_accept") (param $len i32) (result i32) (i32.const 1)))"#;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

struct World {
    reg: RegistryClient,
    authority: Authority,
}

impl World {
    fn new() -> Self {
        World { reg: RegistryClient::in_process_private(), authority: Authority::from_secret([0xA5; 32]) }
    }

    fn policy(&self, require: Roles) -> Policy {
        self.authority.policy(require)
    }

    fn grant(&self, id: &Identity, roles: Roles, not_after: u64) -> Token {
        self.authority.grant(CH, roles, id.public_key(), not_after).unwrap()
    }

    /// A node with identity `id`, requiring `policy` in the channel (if any) and presenting `token` (if any).
    async fn node(&self, id: &Identity, policy: Option<Policy>, token: Option<Token>) -> Result<Node> {
        let mut b = Node::builder().identity(id.clone());
        if let Some(p) = policy {
            b = b.policy(CH, p);
        }
        if let Some(t) = token {
            b = b.token(t);
        }
        Ok(b.registry_client(self.reg.clone()).start().await?)
    }
}

fn denied(r: Result<impl std::fmt::Debug, Error>) -> String {
    match r {
        Err(e @ Error::AccessDenied { .. }) => e.to_string(),
        other => panic!("expected access denied, got {other:?}"),
    }
}

/// The library as a user meets it: a creator with every right, a node with the sink role, nodes without credentials
/// or with someone else's, each told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_channel_lets_in_exactly_what_credentials_grant() -> Result<()> {
    let w = World::new();
    let (ia, ib, ic, id) = (
        Identity::from_secret([1; 32]),
        Identity::from_secret([2; 32]),
        Identity::from_secret([3; 32]),
        Identity::from_secret([4; 32]),
    );
    let policy = w.policy(Roles::ALL);
    let a = w.node(&ia, Some(policy), Some(w.grant(&ia, Roles::ALL, 0))).await?;
    let ca = a.create_channel(CH).await?;
    let mut src = ca.source()?;
    // b: the sink role only; no policy configured, it adopts the channel's.
    let b = w.node(&ib, None, Some(w.grant(&ib, Roles::SINK, 0))).await?;
    let cb = b.open_channel(CH).await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    assert_eq!(cb.rights()?, Roles::SINK);
    let why = denied(cb.source());
    assert!(why.contains("not the source role"), "{why}");
    let why = denied(cb.install_filter(FilterKind::In, b"(module)", T).await);
    assert!(why.contains("filters"), "{why}");
    ca.wait_for_sinks(1, T).await?;
    src.submit("secret", &Attrs::new(), b"for members only").await?;
    let ev = timeout(T, sink.recv()).await?.context("recv")?;
    assert_eq!(ev.payload().as_ref(), b"for members only");

    // c: no credential, with the policy configured: refused before it asks anyone.
    let c = w.node(&ic, Some(policy), None).await?;
    let why = denied(c.open_channel(CH).await);
    assert!(why.contains("none was given"), "{why}");
    // c again without a policy of its own: the contact refuses it.
    c.shutdown().await;
    let c = w.node(&ic, None, None).await?;
    let why = denied(c.open_channel(CH).await);
    assert!(why.contains("admits only nodes with a credential"), "{why}");
    // d presents b's credential: it is not d's, so d presents nothing and is refused.
    let d = w.node(&id, None, Some(w.grant(&ib, Roles::ALL, 0))).await?;
    let why = denied(d.open_channel(CH).await);
    assert!(why.contains("none was given"), "{why}");
    // Neither left a trace: a's view is a and b, and a counted the refusals (a counts a refusal before it answers,
    // so both are counted by the time c's and d's opens failed).
    assert_eq!(ca.sinks(), 1);
    assert!(ca.stats().denied >= 2, "{:?}", ca.stats());
    // The registry's counts follow membership within a lease renewal (250 ms): wait for them to show a and b only.
    // A refused node that left a trace would keep them above (1, 1), and the wait would end in a failure.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listed = match w.reg.request(Message::RegList { req: 0 }).await? {
            RegResult::Entries(e) => e,
            other => bail!("list: {other:?}"),
        };
        let counts = (listed[0].sources, listed[0].sinks);
        if counts == (1, 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the registry still counts {counts:?}, not (1, 1)");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A policy may leave roles open: here sources need a credential and sinks do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_roles_need_no_credential() -> Result<()> {
    let w = World::new();
    let (ia, ib) = (Identity::from_secret([1; 32]), Identity::from_secret([2; 32]));
    let policy = w.policy(Roles::SOURCE);
    let a = w.node(&ia, Some(policy), Some(w.grant(&ia, Roles::SOURCE, 0))).await?;
    let ca = a.create_channel(CH).await?;
    let mut src = ca.source()?;
    let b = w.node(&ib, None, None).await?;
    let cb = b.open_channel(CH).await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    let why = denied(cb.source());
    assert!(why.contains("source"), "{why}");
    ca.wait_for_sinks(1, T).await?;
    src.submit("news", &Attrs::new(), b"public").await?;
    assert_eq!(timeout(T, sink.recv()).await?.context("recv")?.payload().as_ref(), b"public");
    Ok(())
}

/// Members with the filters role install filters; others are refused by every node they try.
#[cfg(feature = "wasm")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_filters_needs_the_filters_role() -> Result<()> {
    let w = World::new();
    let (ia, ib) = (Identity::from_secret([1; 32]), Identity::from_secret([2; 32]));
    let a = w.node(&ia, Some(w.policy(Roles::ALL)), Some(w.grant(&ia, Roles::ALL, 0))).await?;
    let ca = a.create_channel(CH).await?;
    ca.set_remote_filters(true);
    let b = w.node(&ib, None, Some(w.grant(&ib, Roles::SINK.union(Roles::FILTERS), 0))).await?;
    let cb = b.open_channel(CH).await?;
    cb.set_remote_filters(true);
    let _sink = cb.sink(SinkOptions::new())?;
    ca.wait_for_sinks(1, T).await?;
    let report = cb.install_filter(FilterKind::In, ACCEPT_ALL.as_bytes(), T).await?;
    assert_eq!((report.installed, report.refused.len(), report.silent), (2, 0, 0), "{report:?}");
    Ok(())
}

/// A hand-made member admitted as a sink, which then does what its credential does not allow: publish, install a
/// filter, add a source to its snapshot. The other members check it themselves and refuse each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_bypassing_its_own_checks_gets_nothing_in() -> Result<()> {
    let w = World::new();
    let ia = Identity::from_secret([1; 32]);
    let a = w.node(&ia, Some(w.policy(Roles::ALL)), Some(w.grant(&ia, Roles::ALL, 0))).await?;
    let ca = a.create_channel(CH).await?;
    ca.set_remote_filters(true);
    let mut local = ca.sink(SinkOptions::new())?;
    let entry = match w.reg.request(Message::RegLookup { req: 0, name: CH.into() }).await? {
        RegResult::Entry(e) => e,
        other => bail!("lookup: {other:?}"),
    };
    let rogue = Identity::from_secret([0x66; 32]);
    let token = std::sync::Arc::new(w.grant(&rogue, Roles::SINK, 0));
    let sink = MemberInfo {
        id: LocalId(1),
        role: Role::Sink { types: TypeFilter::All, overflow: Overflow::DropOldest, filter: None },
        attrs: Attrs::new(),
    };
    let addr = "127.0.0.1:9";
    let mut s = TcpStream::connect(a.local_addr()).await?;
    let mut out = BytesMut::new();
    Message::Hello { version: PROTOCOL_VERSION, node: rogue.node_id(), addr: addr.into(), purpose: Purpose::Node }
        .encode(&mut out);
    rogue.hello_proof(ia.node_id(), addr).encode(&mut out);
    let snapshot = NodeSnapshot { version: 1, instance: 0, members: vec![sink.clone()], token: Some(token.clone()) };
    Message::JoinRequest { channel: entry.channel, addr: addr.into(), snapshot }.encode(&mut out);
    s.write_all(&out).await?;
    // Admitted as a sink: a's view now has two sinks.
    ca.wait_for_sinks(2, T).await?;
    let before = ca.stats().denied;
    // a's instance of the channel, from its answer: a forged lag notice naming another one would be ignored anyway.
    let instance = match read_until(&mut s, |m| matches!(m, Message::JoinAccept { .. })).await? {
        Message::JoinAccept { nodes, .. } => nodes.first().map(|p| p.snapshot.instance).context("no contact listed")?,
        _ => unreachable!(),
    };

    // It publishes (a sink credential grants no source right) and asks a to run its filter.
    out.clear();
    for seq in 1..=5 {
        let e = EventMsg {
            channel: entry.channel,
            source: LocalId(9),
            seq,
            ty: "forged".into(),
            attrs: Attrs::new(),
            payload: Bytes::from_static(b"x"),
        };
        Message::Event(e).encode(&mut out);
    }
    // ... and claims that the local sink missed some of its events.
    Message::Lagged { channel: entry.channel, source: LocalId(9), instance, count: 3, sinks: vec![] }.encode(&mut out);
    let module = Bytes::from_static(ACCEPT_ALL.as_bytes());
    Message::InstallFilter { channel: entry.channel, req: 7, kind: FilterKind::In, module }.encode(&mut out);
    s.write_all(&out).await?;
    let status = read_until(&mut s, |m| matches!(m, Message::FilterStatus { req: 7, .. })).await?;
    let Message::FilterStatus { ok, message, .. } = status else { unreachable!() };
    assert!(!ok && message.contains("filters role"), "{message}");
    match local.try_recv() {
        Err(kecho::TryRecvError::Empty) => {}
        other => panic!("a node without the source right reached the sink: {other:?}"),
    }
    assert!(ca.stats().denied >= before + 5, "{:?}", ca.stats());

    // It adds a source to its snapshot: a drops it from the channel altogether.
    let source = MemberInfo { id: LocalId(2), role: Role::Source, attrs: Attrs::new() };
    let snapshot = NodeSnapshot { version: 2, instance: 0, members: vec![sink, source], token: Some(token) };
    let msg = Message::Snapshot {
        channel: entry.channel,
        node: rogue.node_id(),
        addr: addr.into(),
        snapshot,
        left: false,
        reply: false,
    };
    s.write_all(&msg.to_bytes()).await?;
    let start = tokio::time::Instant::now();
    while ca.sinks() != 1 {
        assert!(start.elapsed() < T, "the member was not dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// The link-internal frames of the urgent TCP connection (`UrgentToken`, `UrgentJoin`, `UrgentWanted`: kinds 65-67),
/// which a raw peer that never opens an urgent connection may ignore.
const URGENT_KINDS: std::ops::RangeInclusive<u8> = 65..=67;

/// Reads messages from `s` until one matches (skipping the urgent connection's frames).
async fn read_until(s: &mut TcpStream, want: impl Fn(&Message) -> bool) -> Result<Message> {
    let mut buf = BytesMut::new();
    loop {
        while let Some(frame) = split_frame(&mut buf, 1 << 24)? {
            if frame.first().is_some_and(|k| URGENT_KINDS.contains(k)) {
                continue;
            }
            let m = decode_body(frame)?;
            if want(&m) {
                return Ok(m);
            }
        }
        let n = timeout(T, s.read_buf(&mut buf)).await.context("no answer")??;
        if n == 0 {
            bail!("connection closed");
        }
    }
}

/// A credential that expires takes its holder out of the channel at every member; renewing it in time keeps the
/// holder in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_expire_and_can_be_renewed() -> Result<()> {
    let w = World::new();
    let (ia, ib, ic) = (Identity::from_secret([1; 32]), Identity::from_secret([2; 32]), Identity::from_secret([3; 32]));
    let a = w.node(&ia, Some(w.policy(Roles::ALL)), Some(w.grant(&ia, Roles::ALL, 0))).await?;
    let ca = a.create_channel(CH).await?;
    let soon = unix_now() + 2;
    let b = w.node(&ib, None, Some(w.grant(&ib, Roles::SINK, soon))).await?;
    let cb = b.open_channel(CH).await?;
    let _sb = cb.sink(SinkOptions::new())?;
    let c = w.node(&ic, None, Some(w.grant(&ic, Roles::SINK, soon))).await?;
    let cc = c.open_channel(CH).await?;
    let mut sc = cc.sink(SinkOptions::new())?;
    ca.wait_for_sinks(2, T).await?;
    // c renews; b does not.
    cc.set_token(Some(w.grant(&ic, Roles::SINK, unix_now() + 3600)))?;
    // Someone else's credential is refused at once.
    let why = denied(cc.set_token(Some(w.grant(&ib, Roles::SINK, 0))));
    assert!(why.contains("issued to node"), "{why}");
    let start = tokio::time::Instant::now();
    while ca.sinks() != 1 {
        assert!(start.elapsed() < Duration::from_secs(6), "b's expired credential was not noticed: {}", ca.sinks());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // b's view of itself: its rights are gone.
    let why = denied(cb.sink(SinkOptions::new()));
    assert!(why.contains("expired"), "{why}");
    // c renewed in time and stays: its old credential expired with b's, yet a still sends to it.
    ca.source()?.submit("e", &Attrs::new(), b"still in").await?;
    let ev = timeout(T, sc.recv()).await?.context("recv")?;
    assert_eq!(ev.payload().as_ref(), b"still in");
    assert_eq!(ca.sinks(), 1, "c renewed in time and stays");
    Ok(())
}
