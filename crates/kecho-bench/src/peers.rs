//! The peer systems (feature `peers`): NATS through a local `nats-server` process (async-nats client) and Zenoh in
//! peer mode over loopback TCP (multicast scouting off, loopback endpoints only).
//!
//! Every endpoint gets its own connection or session, as separate processes would have; they share this process's
//! clock, which the one-way latency needs.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::pipe::{fresh_name, AnyRx, AnyTx, Got};
use crate::util::stamp_of;

/// What the peers need for a run: the nats-server process, if it could be started.
pub struct Peers {
    nats: Option<(Child, SocketAddr)>,
    /// Why a peer is missing.
    pub notes: Vec<String>,
}

/// A free loopback port (bound and released: the server or session binds it right after).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Peers {
    /// No peers (`--no-peers`).
    pub fn none() -> Self {
        Peers { nats: None, notes: Vec::new() }
    }

    /// Starts nats-server on a loopback port if it is installed.
    pub async fn start() -> Self {
        let mut p = Peers::none();
        match start_nats().await {
            Ok(n) => p.nats = Some(n),
            Err(e) => p.notes.push(format!("NATS not measured: {e:#} (scripts/bench-peers.sh installs nats-server)")),
        }
        p
    }

    /// Whether NATS can be measured.
    pub fn nats_available(&self) -> bool {
        self.nats.is_some()
    }

    /// Stops nats-server.
    pub async fn stop(mut self) {
        if let Some((mut child, _)) = self.nats.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn nats_client(&self) -> Result<async_nats::Client> {
        let (_, addr) = self.nats.as_ref().context("nats-server is not running")?;
        // The subscription buffer is as deep as kecho's deepest sink queue; beyond it the client drops (counted as
        // lost by the receiver).
        async_nats::ConnectOptions::new()
            .subscription_capacity(65_536)
            .connect(addr.to_string())
            .await
            .context("connecting to nats-server")
    }

    async fn nats_sub(&self, subject: &str) -> Result<AnyRx> {
        let client = self.nats_client().await?;
        let sub = client.subscribe(subject.to_owned()).await?;
        // A round trip to the server: the subscription is registered before anyone publishes.
        client.flush().await?;
        Ok(AnyRx::Nats(NatsRx { sub, _client: client }))
    }

    async fn nats_pub(&self, subject: &str) -> Result<AnyTx> {
        Ok(AnyTx::Nats(NatsTx { client: self.nats_client().await?, subject: subject.to_owned() }))
    }

    /// See [`crate::systems::Systems::pair`].
    pub async fn nats_pair(&self) -> Result<(AnyTx, AnyRx, AnyTx, AnyRx)> {
        let (ping, pong) = (fresh_name("ping"), fresh_name("pong"));
        let b_rx = self.nats_sub(&ping).await?;
        let a_rx = self.nats_sub(&pong).await?;
        Ok((self.nats_pub(&ping).await?, a_rx, self.nats_pub(&pong).await?, b_rx))
    }

    /// See [`crate::systems::Systems::topology`].
    pub async fn nats_topology(&self, sources: usize, sinks: usize) -> Result<(Vec<AnyTx>, Vec<AnyRx>, u64)> {
        let subject = fresh_name("tp");
        let mut rxs = Vec::new();
        for _ in 0..sinks {
            rxs.push(self.nats_sub(&subject).await?);
        }
        let mut txs = Vec::new();
        for _ in 0..sources {
            txs.push(self.nats_pub(&subject).await?);
        }
        Ok((txs, rxs, sources as u64))
    }

    /// See [`crate::systems::Systems::pair`]. Latency runs use express publishers (no batching).
    pub async fn zenoh_pair(&self) -> Result<(AnyTx, AnyRx, AnyTx, AnyRx)> {
        let (ping, pong) = (fresh_name("bench/ping"), fresh_name("bench/pong"));
        let (a, b) = zenoh_sessions().await?;
        let b_rx = zenoh_sub(&b, &ping).await?;
        let a_rx = zenoh_sub(&a, &pong).await?;
        let a_tx = zenoh_pub(&a, &ping, true).await?;
        let b_tx = zenoh_pub(&b, &pong, true).await?;
        Ok((a_tx, a_rx, b_tx, b_rx))
    }

    /// See [`crate::systems::Systems::topology`]. Throughput runs use Zenoh's default batching and `Block`
    /// congestion control (a full link waits instead of dropping, as kecho's Block sinks do).
    pub async fn zenoh_topology(&self, sources: usize, sinks: usize) -> Result<(Vec<AnyTx>, Vec<AnyRx>, u64)> {
        let key = fresh_name("bench/tp");
        // One session per member, each connected to every earlier one: a full mesh, because a peer does not
        // forward other peers' data.
        let mut ports = Vec::new();
        let mut rxs = Vec::new();
        let mut sessions = Vec::new();
        for _ in 0..sources + sinks {
            let port = free_port()?;
            sessions.push(zenoh_session(port, &ports).await?);
            ports.push(port);
        }
        for s in &sessions[sources..] {
            rxs.push(zenoh_sub(s, &key).await?);
        }
        let mut txs = Vec::new();
        for s in &sessions[..sources] {
            txs.push(zenoh_pub(s, &key, false).await?);
        }
        Ok((txs, rxs, sources as u64))
    }
}

async fn start_nats() -> Result<(Child, SocketAddr)> {
    let port = free_port()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((child, addr))
}

/// A NATS publisher.
pub struct NatsTx {
    client: async_nats::Client,
    subject: String,
}

impl NatsTx {
    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        self.client.publish(self.subject.clone(), Bytes::copy_from_slice(buf)).await?;
        Ok(())
    }
    pub async fn flush(&mut self) -> Result<()> {
        self.client.flush().await?;
        Ok(())
    }
}

/// A NATS subscription.
pub struct NatsRx {
    sub: async_nats::Subscriber,
    _client: async_nats::Client,
}

impl NatsRx {
    pub async fn recv(&mut self) -> Result<Got> {
        let m = self.sub.next().await.context("NATS subscription ended")?;
        Ok(Got::Msg(stamp_of(&m.payload), m.payload.len()))
    }
}

/// A Zenoh session in peer mode listening on `port`, connected to the sessions on `connect`; loopback only, no
/// multicast scouting.
async fn zenoh_session(port: u16, connect: &[u16]) -> Result<zenoh::Session> {
    let mut c = zenoh::Config::default();
    let set =
        |c: &mut zenoh::Config, k: &str, v: &str| c.insert_json5(k, v).map_err(|e| anyhow!("zenoh config {k}: {e}"));
    set(&mut c, "mode", r#""peer""#)?;
    set(&mut c, "scouting/multicast/enabled", "false")?;
    set(&mut c, "listen/endpoints", &format!(r#"["tcp/127.0.0.1:{port}"]"#))?;
    let endpoints: Vec<String> = connect.iter().map(|p| format!(r#""tcp/127.0.0.1:{p}""#)).collect();
    set(&mut c, "connect/endpoints", &format!("[{}]", endpoints.join(",")))?;
    zenoh::open(c).await.map_err(|e| anyhow!("opening a zenoh session: {e}"))
}

/// Two connected sessions.
async fn zenoh_sessions() -> Result<(zenoh::Session, zenoh::Session)> {
    let pa = free_port()?;
    let a = zenoh_session(pa, &[]).await?;
    let b = zenoh_session(free_port()?, &[pa]).await?;
    Ok((a, b))
}

async fn zenoh_sub(s: &zenoh::Session, key: &str) -> Result<AnyRx> {
    let sub = s
        .declare_subscriber(key.to_owned())
        .with(zenoh::handlers::FifoChannel::new(65_536))
        .await
        .map_err(|e| anyhow!("zenoh subscriber: {e}"))?;
    Ok(AnyRx::Zenoh(ZenohRx { sub, _session: s.clone() }))
}

async fn zenoh_pub(s: &zenoh::Session, key: &str, express: bool) -> Result<AnyTx> {
    let p = s
        .declare_publisher(key.to_owned())
        .congestion_control(zenoh::qos::CongestionControl::Block)
        .express(express)
        .await
        .map_err(|e| anyhow!("zenoh publisher: {e}"))?;
    // Wait until the subscribers' declarations have reached this session, or the first messages go nowhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = p.matching_status().await.map_err(|e| anyhow!("zenoh matching status: {e}"))?;
        if st.matching() {
            break;
        }
        if Instant::now() > deadline {
            bail!("zenoh publisher found no subscriber within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Matching says some subscriber is known; with several, give the rest of the declarations a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(AnyTx::Zenoh(ZenohTx { p, _session: s.clone() }))
}

/// A Zenoh publisher.
pub struct ZenohTx {
    p: zenoh::pubsub::Publisher<'static>,
    _session: zenoh::Session,
}

impl ZenohTx {
    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        self.p.put(buf.to_vec()).await.map_err(|e| anyhow!("zenoh put: {e}"))
    }
}

/// A Zenoh subscriber.
pub struct ZenohRx {
    sub: zenoh::pubsub::Subscriber<zenoh::handlers::FifoChannelHandler<zenoh::sample::Sample>>,
    _session: zenoh::Session,
}

impl ZenohRx {
    pub async fn recv(&mut self) -> Result<Got> {
        let s = self.sub.recv_async().await.map_err(|e| anyhow!("zenoh subscriber: {e}"))?;
        let p = s.payload().to_bytes();
        Ok(Got::Msg(stamp_of(&p), p.len()))
    }
}
