//! What quinn itself costs, without kecho: one-way latency of 100 B writes on an idle quinn stream against the same
//! writes on a tokio TCP socket (alternated rounds, one process), and the rate of 1 KB writes on one quinn stream.
//! The floor under kecho's QUIC figures in `transports` (docs/PROTOCOL.md, "QUIC: what bounds latency and
//! throughput").
//!
//! `cargo run --release -p kecho --no-default-features --features quic --example quic_floor -- [mt|ct|dedicated]
//! [rounds] [throughput]`: `mt` (default) runs everything on a two-worker multi-thread runtime, as the `transports`
//! example does; `ct` on one current-thread runtime (no wake-up crosses threads); `dedicated` runs each quinn
//! endpoint (its endpoint and connection drivers) on a current-thread runtime of its own thread, the application on
//! the two workers. With `throughput`, the rate of 200 000 1 KB writes instead of latency.
//! The transport settings are kecho's (windows, ACK frequency) except path MTU discovery, left at quinn's default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[path = "common/any_cert.rs"]
mod any_cert;
use any_cert::AnyCert;

/// quinn's tokio runtime, but spawning onto (and registering sockets and timers with) another runtime.
#[derive(Debug)]
struct OnThread(tokio::runtime::Handle);

impl quinn::Runtime for OnThread {
    fn new_timer(&self, i: Instant) -> std::pin::Pin<Box<dyn quinn::AsyncTimer>> {
        let _g = self.0.enter();
        quinn::TokioRuntime.new_timer(i)
    }
    fn spawn(&self, f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) {
        self.0.spawn(f);
    }
    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _g = self.0.enter();
        quinn::TokioRuntime.wrap_udp_socket(t)
    }
}

/// The runtime an endpoint runs on: the current one, or (`dedicated`) a current-thread runtime on a thread of its own.
fn quinn_runtime(dedicated: bool) -> Arc<dyn quinn::Runtime> {
    if !dedicated {
        return quinn::default_runtime().expect("in a tokio runtime");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let h = rt.handle().clone();
    std::thread::spawn(move || rt.block_on(std::future::pending::<()>()));
    Arc::new(OnThread(h))
}

fn endpoint(dedicated: bool) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["k".to_owned()]).expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("certificate");
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server).expect("QUIC suite"),
    ));
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client).expect("QUIC suite"),
    ));
    let transport = || {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(quinn::VarInt::from_u32(8 << 20));
        t.receive_window(quinn::VarInt::from_u32(16 << 20));
        t.send_window(16 << 20);
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(quinn::VarInt::from_u32(8)).max_ack_delay(Some(Duration::from_millis(1)));
        t.ack_frequency_config(Some(ack));
        Arc::new(t)
    };
    server.transport_config(transport());
    client.transport_config(transport());
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("UDP socket");
    let mut ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), sock, quinn_runtime(dedicated))
        .expect("endpoint");
    ep.set_default_client_config(client);
    ep
}

/// What keeps a connected pair alive: the unused stream halves, both connections and both endpoints.
type Keep =
    (quinn::RecvStream, quinn::SendStream, quinn::Connection, quinn::Connection, quinn::Endpoint, quinn::Endpoint);

/// A connected stream pair: the dialler's send half and the acceptor's receive half (and what keeps them alive).
async fn quic_pair(dedicated: bool) -> (quinn::SendStream, quinn::RecvStream, Keep) {
    let a = endpoint(dedicated);
    let b = endpoint(dedicated);
    let addr = b.local_addr().expect("address");
    let acc = tokio::spawn(async move {
        let c = b.accept().await.expect("incoming").await.expect("handshake");
        let (s, r) = c.accept_bi().await.expect("stream");
        (s, r, c, b)
    });
    let c = a.connect(addr, "k").expect("connect").await.expect("handshake");
    let (mut s, r) = c.open_bi().await.expect("stream");
    s.write_all(&[0u8; 100]).await.expect("write");
    let (s2, mut r2, c2, b) = acc.await.expect("join");
    let mut first = [0u8; 100];
    r2.read_exact(&mut first).await.expect("read");
    (s, r2, (r, s2, c, c2, a, b))
}

/// One-way latencies (us) of `n` paced 100 B writes from `w` to `r`.
async fn one_way<W, R>(mut w: W, mut r: R, n: usize) -> Vec<f64>
where
    W: tokio::io::AsyncWrite + Unpin,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    let base = Instant::now();
    let reading = tokio::spawn(async move {
        let mut out = Vec::with_capacity(n);
        let mut buf = [0u8; 100];
        for _ in 0..n {
            r.read_exact(&mut buf).await.expect("read");
            let at = base.elapsed().as_nanos() as u64;
            let sent = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            out.push((at - sent) as f64 / 1e3);
        }
        out
    });
    for _ in 0..n {
        let mut b = [0u8; 100];
        b[..8].copy_from_slice(&(base.elapsed().as_nanos() as u64).to_le_bytes());
        w.write_all(&b).await.expect("write");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    reading.await.expect("join")
}

async fn quic_latency(n: usize, dedicated: bool) -> Vec<f64> {
    let (s, r, _keep) = quic_pair(dedicated).await;
    one_way(s, r, n).await
}

async fn tcp_latency(n: usize) -> Vec<f64> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let a = tokio::net::TcpStream::connect(l.local_addr().expect("address")).await.expect("connect");
    a.set_nodelay(true).expect("nodelay");
    let (b, _) = l.accept().await.expect("accept");
    one_way(a, b, n).await
}

/// 1 KB writes per second on one quinn stream, and the connection's packet size and lost packets at the end.
async fn quic_throughput(n: usize, dedicated: bool) -> (f64, u16, u64) {
    let (mut s, mut r, keep) = quic_pair(dedicated).await;
    let reading = tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let mut got = 0;
        while got < n * 1024 {
            got += r.read(&mut buf).await.expect("read").expect("open");
        }
    });
    let start = Instant::now();
    let buf = [0u8; 1024];
    for _ in 0..n {
        s.write_all(&buf).await.expect("write");
    }
    reading.await.expect("join");
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let (_, _, c, ..) = &keep;
    let st = c.stats();
    (rate, st.path.current_mtu, st.path.lost_packets)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let flavor = args.next().unwrap_or_else(|| "mt".into());
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let throughput = args.next().is_some_and(|a| a == "throughput");
    let rt = if flavor == "ct" {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
    }
    .expect("runtime");
    let dedicated = flavor == "dedicated";
    rt.block_on(async {
        for r in 0..rounds {
            if throughput {
                let (rate, mtu, lost) = quic_throughput(200_000, dedicated).await;
                println!("round {r} ({flavor}): quinn 1 KB writes {:.0} k/s, packets {mtu} B, {lost} lost", rate / 1e3);
                continue;
            }
            let (mut t, mut q) = if r % 2 == 0 {
                let t = tcp_latency(2000).await;
                (t, quic_latency(2000, dedicated).await)
            } else {
                let q = quic_latency(2000, dedicated).await;
                (tcp_latency(2000).await, q)
            };
            println!(
                "round {r} ({flavor}): one-way 100 B p50 / p99 (us): tokio TCP {:.1} / {:.1}, quinn {:.1} / {:.1}",
                pct(&mut t, 0.5),
                pct(&mut t, 0.99),
                pct(&mut q, 0.5),
                pct(&mut q, 0.99)
            );
        }
    });
}
