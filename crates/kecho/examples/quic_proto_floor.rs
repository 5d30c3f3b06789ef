//! What QUIC costs when nothing but the protocol stands between two threads: `quinn-proto` (quinn's sans-IO core)
//! driven inline by the thread that owns the UDP socket, against a TCP socket used the same way. The question it
//! answers: could a QUIC link that drives `quinn-proto` from its own task (no endpoint or connection driver tasks,
//! no wake-up between them) come within 1.3x of TCP's latency, as issue 16 asks of kecho's QUIC links?
//! (docs/PROTOCOL.md, "QUIC: what bounds latency and throughput"; `quic_floor` measures quinn itself.)
//!
//! `cargo run --release -p kecho --no-default-features --features quic --example quic_proto_floor -- [rounds]
//! [count]`: 100 B ping-pong between two threads of one process over loopback, blocking sockets both ways, each
//! round a TCP run and a QUIC run alternated; prints each run's round-trip p50 and p99 and the QUIC / TCP ratios.
//! Both ends keep kecho's transport settings (ACK frequency: up to 8 packets or 1 ms before an ACK).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn_proto::{
    ClientConfig, Connection, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ServerConfig,
    StreamId, TransportConfig, VarInt,
};

const SIZE: usize = 100;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

#[path = "common/any_cert.rs"]
mod any_cert;
use any_cert::AnyCert;

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    let mut ack = quinn_proto::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8)).max_ack_delay(Some(Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

fn configs() -> (ServerConfig, ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert = rcgen::generate_simple_self_signed(vec!["floor".to_owned()]).expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("server config");
    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    server.alpn_protocols = vec![b"floor".to_vec()];
    client.alpn_protocols = vec![b"floor".to_vec()];
    let mut s = ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).expect("QUIC server")));
    s.transport_config(transport());
    let mut c = ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).expect("QUIC client")));
    c.transport_config(transport());
    (s, c)
}

/// One end: a UDP socket, the endpoint and its one connection, all driven by the thread that owns them.
struct End {
    sock: UdpSocket,
    ep: Endpoint,
    conn: Option<(ConnectionHandle, Connection)>,
    server: Option<Arc<ServerConfig>>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    /// UDP datagrams sent (a system call each).
    sends: u64,
}

impl End {
    fn new(server: Option<Arc<ServerConfig>>) -> End {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind UDP");
        End {
            sock,
            ep: Endpoint::new(Arc::new(EndpointConfig::default()), server.clone(), true, None),
            conn: None,
            server,
            out: Vec::with_capacity(64 * 1024),
            inbuf: vec![0; 64 * 1024],
            sends: 0,
        }
    }

    /// Sends what the connection has to send and hands its endpoint events over.
    fn flush(&mut self) {
        let Some((h, conn)) = self.conn.as_mut() else { return };
        let now = Instant::now();
        while let Some(ev) = conn.poll_endpoint_events() {
            if let Some(back) = self.ep.handle_event(*h, ev) {
                conn.handle_event(back);
            }
        }
        loop {
            self.out.clear();
            let Some(t) = conn.poll_transmit(now, 10, &mut self.out) else { break };
            let seg = t.segment_size.unwrap_or(t.size);
            for part in self.out[..t.size].chunks(seg) {
                self.sock.send_to(part, t.destination).expect("send UDP");
                self.sends += 1;
            }
        }
    }

    /// Waits for one datagram (or the connection's next timer) and handles it; then flushes.
    fn turn(&mut self) {
        let now = Instant::now();
        let deadline = self.conn.as_mut().and_then(|(_, c)| c.poll_timeout());
        let wait = deadline.map(|d| d.saturating_duration_since(now));
        if wait == Some(Duration::ZERO) {
            if let Some((_, c)) = self.conn.as_mut() {
                c.handle_timeout(now);
            }
            self.flush();
            return;
        }
        self.sock.set_read_timeout(wait.map(|w| w.max(Duration::from_micros(1)))).expect("timeout");
        match self.sock.recv_from(&mut self.inbuf) {
            Ok((n, from)) => {
                let data = BytesMut::from(&self.inbuf[..n]);
                let mut resp = Vec::new();
                match self.ep.handle(Instant::now(), from, None, None, data, &mut resp) {
                    Some(DatagramEvent::ConnectionEvent(_, ev)) => {
                        if let Some((_, c)) = self.conn.as_mut() {
                            c.handle_event(ev);
                        }
                    }
                    Some(DatagramEvent::NewConnection(inc)) => {
                        let mut resp = Vec::new();
                        match self.ep.accept(inc, Instant::now(), &mut resp, self.server.clone()) {
                            Ok(pair) => self.conn = Some(pair),
                            Err(e) => panic!("accept: {:?}", e.cause),
                        }
                    }
                    Some(DatagramEvent::Response(t)) => {
                        self.sock.send_to(&resp[..t.size], t.destination).expect("send UDP");
                    }
                    None => {}
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                if let Some((_, c)) = self.conn.as_mut() {
                    c.handle_timeout(Instant::now());
                }
            }
            Err(e) => panic!("recv UDP: {e}"),
        }
        self.flush();
    }

    fn conn(&mut self) -> &mut Connection {
        &mut self.conn.as_mut().expect("connected").1
    }

    /// Reads what stream `id` holds into `got`.
    fn read(&mut self, id: StreamId, got: &mut usize) {
        let conn = self.conn();
        let mut stream = conn.recv_stream(id);
        let Ok(mut chunks) = stream.read(true) else { return };
        while let Ok(Some(c)) = chunks.next(usize::MAX) {
            *got += c.bytes.len();
        }
        let _ = chunks.finalize();
    }
}

/// QUIC ping-pong: `count` round trips of 100 B on one bidirectional stream; returns the round trips in us and the
/// UDP datagrams per round trip (sent by both ends).
fn quic_run(count: usize) -> (Vec<f64>, f64) {
    let (server_cfg, client_cfg) = configs();
    let mut server = End::new(Some(Arc::new(server_cfg)));
    let server_addr: SocketAddr = server.sock.local_addr().expect("address");
    let echo = std::thread::spawn(move || {
        let mut stream = None;
        let mut got = 0usize;
        let mut echoed = 0usize;
        let mut pending = 0usize;
        while echoed < count * SIZE {
            server.turn();
            let Some((_, conn)) = server.conn.as_mut() else { continue };
            while conn.poll().is_some() {}
            if stream.is_none() {
                stream = conn.streams().accept(Dir::Bi);
            }
            let Some(id) = stream else { continue };
            let before = got;
            server.read(id, &mut got);
            pending += got - before;
            let payload = [7u8; SIZE];
            while pending >= SIZE {
                match server.conn().send_stream(id).write(&payload) {
                    Ok(SIZE) => {
                        pending -= SIZE;
                        echoed += SIZE;
                    }
                    _ => break,
                }
            }
            server.flush();
        }
        // Let the last packets and their ACKs go out.
        let end = Instant::now() + Duration::from_millis(20);
        while Instant::now() < end {
            server.turn();
        }
        server.sends
    });

    let mut client = End::new(None);
    let now = Instant::now();
    client.conn = Some(client.ep.connect(now, client_cfg, server_addr, "floor").expect("connect"));
    client.flush();
    loop {
        client.turn();
        if matches!(client.conn().poll(), Some(Event::Connected)) {
            break;
        }
    }
    let id = client.conn().streams().open(Dir::Bi).expect("stream");
    let payload = [1u8; SIZE];
    let mut rtts = Vec::with_capacity(count);
    let mut got = 0usize;
    let sends0 = client.sends;
    for i in 0..count {
        let t = Instant::now();
        assert_eq!(client.conn().send_stream(id).write(&payload).expect("write"), SIZE);
        client.flush();
        while got < (i + 1) * SIZE {
            client.turn();
            while client.conn().poll().is_some() {}
            client.read(id, &mut got);
        }
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let csends = client.sends - sends0;
    let end = Instant::now() + Duration::from_millis(20);
    while Instant::now() < end {
        client.turn();
    }
    let ssends = echo.join().expect("echo thread");
    (rtts, (csends + ssends) as f64 / count as f64)
}

/// TCP ping-pong, the same shape: `count` round trips of 100 B between two threads with blocking sockets.
fn tcp_run(count: usize) -> Vec<f64> {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind TCP");
    let addr = l.local_addr().expect("address");
    let echo = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        let mut buf = [0u8; SIZE];
        for _ in 0..count {
            s.read_exact(&mut buf).expect("read");
            s.write_all(&buf).expect("write");
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let payload = [1u8; SIZE];
    let mut buf = [0u8; SIZE];
    let mut rtts = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        s.write_all(&payload).expect("write");
        s.read_exact(&mut buf).expect("read");
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    echo.join().expect("echo thread");
    rtts
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let count: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    println!("100 B ping-pong between two threads, blocking sockets, {count} round trips per run (us)");
    println!(
        "{:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
        "round", "TCP p50", "TCP p99", "QUIC p50", "QUIC p99", "p50 ratio", "p99 ratio", "UDP/rt"
    );
    let (mut r50, mut r99) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let mut tcp = tcp_run(count);
        let (mut quic, dgrams) = quic_run(count);
        let (t50, t99, q50, q99) = (pct(&mut tcp, 0.5), pct(&mut tcp, 0.99), pct(&mut quic, 0.5), pct(&mut quic, 0.99));
        r50.push(q50 / t50);
        r99.push(q99 / t99);
        println!(
            "{r:>5} {t50:>10.1} {t99:>10.1} {q50:>10.1} {q99:>10.1} {:>11.2}x {:>11.2}x {dgrams:>10.2}",
            q50 / t50,
            q99 / t99
        );
    }
    println!("median QUIC/TCP: p50 {:.2}x, p99 {:.2}x", pct(&mut r50, 0.5), pct(&mut r99, 0.5));
}
