//! The physical floor: a plain TCP socket on loopback carrying length-prefixed messages, on the same tokio runtime
//! as kecho. Latency runs write each message at once (one `write` per message, `TCP_NODELAY`); throughput runs
//! batch messages in a 64 KiB user-space buffer, which is what kecho's writer does too.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::pipe::{AnyRx, AnyTx, Got};
use crate::util::stamp_of;

const BUF: usize = 64 * 1024;

/// The writing half of a connection.
pub struct RawTx {
    w: BufWriter<OwnedWriteHalf>,
    /// Flush after every message (latency runs).
    pub immediate: bool,
}

impl RawTx {
    /// Writes one length-prefixed message.
    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        self.w.write_all(&(buf.len() as u32).to_le_bytes()).await?;
        self.w.write_all(buf).await?;
        if self.immediate {
            self.w.flush().await?;
        }
        Ok(())
    }

    /// Writes out the buffer.
    pub async fn flush(&mut self) -> Result<()> {
        self.w.flush().await.context("raw TCP flush")
    }
}

/// The reading half of a connection.
pub struct RawRx {
    r: BufReader<OwnedReadHalf>,
    buf: Vec<u8>,
}

impl RawRx {
    /// Reads one message.
    pub async fn recv(&mut self) -> Result<Got> {
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len).await.context("raw TCP read")?;
        let len = u32::from_le_bytes(len) as usize;
        self.buf.resize(len, 0);
        self.r.read_exact(&mut self.buf).await.context("raw TCP read")?;
        Ok(Got::Msg(stamp_of(&self.buf), len))
    }
}

/// A connected pair of sockets on loopback: (A's end, B's end).
async fn connected() -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = l.local_addr()?;
    let (a, b) = tokio::try_join!(TcpStream::connect(addr), async { Ok(l.accept().await?.0) })?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

fn split(s: TcpStream) -> (RawTx, RawRx) {
    let (r, w) = s.into_split();
    (
        RawTx { w: BufWriter::with_capacity(BUF, w), immediate: false },
        RawRx { r: BufReader::with_capacity(BUF, r), buf: Vec::new() },
    )
}

/// Two directions between A and B: (A->B sender, A's receiver, B->A sender, B's receiver).
pub async fn pair() -> Result<(AnyTx, AnyRx, AnyTx, AnyRx)> {
    let (a, b) = connected().await?;
    let (a_tx, a_rx) = split(a);
    let (b_tx, b_rx) = split(b);
    Ok((AnyTx::Raw(vec![a_tx]), AnyRx::Raw(a_rx), AnyTx::Raw(vec![b_tx]), AnyRx::Raw(b_rx)))
}

/// `sources` senders and `sinks` receivers, every sender connected to every receiver. Returns one sender per source,
/// one receiver per connection, and how many messages each receiver gets per message a source sends (1: a
/// connection carries one source's stream).
pub async fn topology(sources: usize, sinks: usize) -> Result<(Vec<AnyTx>, Vec<AnyRx>, u64)> {
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..sources {
        let mut conns = Vec::new();
        for _ in 0..sinks {
            let (a, b) = connected().await?;
            let (tx, _) = split(a);
            let (_, rx) = split(b);
            conns.push(tx);
            rxs.push(AnyRx::Raw(rx));
        }
        txs.push(AnyTx::Raw(conns));
    }
    Ok((txs, rxs, 1))
}

/// The floor for the submission cost: one thread writes each message to `sinks` loopback sockets (length-prefixed,
/// batched in a 64 KiB buffer per socket, as kecho's writers batch), with a reader thread per socket. Returns the
/// writing thread's CPU ns per message. On loopback the kernel delivers into the receiving socket inside the
/// sender's `write`, so this cost grows with the number of sockets even though the payload is the same.
pub fn source_cost(size: usize, sinks: usize, n: u64) -> Result<f64> {
    use std::io::{BufReader as StdBufReader, BufWriter as StdBufWriter, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..sinks {
        let w = std::net::TcpStream::connect(addr)?;
        let (r, _) = listener.accept()?;
        w.set_nodelay(true)?;
        writers.push(StdBufWriter::with_capacity(BUF, w));
        readers.push(std::thread::spawn(move || -> std::io::Result<u64> {
            let mut r = StdBufReader::with_capacity(BUF, r);
            let mut buf = Vec::new();
            let mut got = 0;
            for _ in 0..n {
                let mut len = [0u8; 4];
                r.read_exact(&mut len)?;
                buf.resize(u32::from_le_bytes(len) as usize, 0);
                r.read_exact(&mut buf)?;
                got += 1;
            }
            Ok(got)
        }));
    }
    let payload = vec![0x5au8; size];
    let t0 = crate::util::self_cpu_ns();
    for _ in 0..n {
        for w in &mut writers {
            w.write_all(&(size as u32).to_le_bytes())?;
            w.write_all(&payload)?;
        }
    }
    for w in &mut writers {
        w.flush()?;
    }
    let cpu = crate::util::self_cpu_ns() - t0;
    for r in readers {
        let got = r.join().map_err(|_| anyhow::anyhow!("reader thread panicked"))??;
        if got != n {
            anyhow::bail!("raw TCP reader got {got} of {n}");
        }
    }
    Ok(cpu as f64 / n as f64)
}
