//! Shared-memory streams end to end over real sockets: set-up, order across wrap-arounds and a full ring, the end of
//! the stream, a peer that goes away, and a dialler that does not speak shared memory.

use std::time::Duration;

use kecho_shm::{accept, connect, Accepted, Options, ShmReader, ShmWriter, MIN_RING};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(20);

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9) >> 13) as u8
}

/// A connected pair of shared-memory streams: (dialler's reader, writer), (acceptor's reader, writer).
async fn pair(opts: Options) -> ((ShmReader, ShmWriter), (ShmReader, ShmWriter)) {
    let (a, b) = UnixStream::pair().unwrap();
    let (dialled, accepted) = tokio::join!(connect(a, &opts), accept(b, opts.spin));
    let Accepted::Shm(r, w) = accepted.unwrap() else { panic!("the acceptor did not see a set-up") };
    (dialled.unwrap(), (r, w))
}

/// Writes `total` pattern bytes in chunks of varying sizes, then ends the stream.
async fn produce(mut w: ShmWriter, total: u64) -> ShmWriter {
    let mut pos = 0u64;
    let mut i = 0u64;
    while pos < total {
        let len = ((i * 7919) % 30_000 + 1).min(total - pos);
        let chunk: Vec<u8> = (pos..pos + len).map(pattern).collect();
        w.write_all(&chunk).await.unwrap();
        pos += len;
        i += 1;
        if i.is_multiple_of(64) {
            tokio::task::yield_now().await;
        }
    }
    w.shutdown().await.unwrap();
    w
}

/// Reads to the end of the stream, checking every byte.
async fn consume(mut r: ShmReader) -> u64 {
    let mut got = 0u64;
    let mut buf = vec![0u8; 50_000];
    let mut i = 0usize;
    loop {
        let want = (i * 104_729) % buf.len() + 1;
        i += 1;
        let n = r.read(&mut buf[..want]).await.unwrap();
        if n == 0 {
            return got;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, pattern(got + k as u64), "byte {} out of order", got + k as u64);
        }
        got += n as u64;
    }
}

async fn both_ways(opts: Options, total: u64) {
    let ((ar, aw), (br, bw)) = pair(opts).await;
    let run = async {
        let (_, _, a_got, b_got) =
            tokio::join!(tokio::spawn(produce(aw, total)), tokio::spawn(produce(bw, total)), consume(ar), consume(br));
        (a_got, b_got)
    };
    let (a_got, b_got) = timeout(T, run).await.expect("stream stalled");
    assert_eq!((a_got, b_got), (total, total));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_in_order_both_ways_through_a_small_ring() {
    // A 4 KiB ring against writes of up to 30 KB: the writer waits for room all the time, and wraps around.
    both_ways(Options { ring_bytes: MIN_RING, spin: None }, 3_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_arrive_in_order_with_the_default_ring_and_in_low_latency_mode() {
    both_ways(Options::default(), 20_000_000).await;
    both_ways(Options { ring_bytes: 65_536, spin: Some(Duration::from_micros(50)) }, 5_000_000).await;
}

#[tokio::test(flavor = "current_thread")]
async fn one_thread_runs_both_sides() {
    both_ways(Options { ring_bytes: 8192, spin: Some(Duration::from_micros(20)) }, 1_000_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_reader_wakes_for_each_message() {
    let ((mut ar, _aw), (_br, mut bw)) = pair(Options::default()).await;
    for i in 0..200u32 {
        // The reader is asleep by the time each message comes.
        tokio::time::sleep(Duration::from_micros(200)).await;
        bw.write_all(&i.to_le_bytes()).await.unwrap();
        let mut b = [0u8; 4];
        timeout(T, ar.read_exact(&mut b)).await.expect("a wake-up was lost").unwrap();
        assert_eq!(u32::from_le_bytes(b), i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_goes_away_ends_the_stream_and_fails_the_writer() {
    let ((mut ar, mut aw), (br, mut bw)) = pair(Options { ring_bytes: MIN_RING, spin: None }).await;
    bw.write_all(b"last words").await.unwrap();
    // The peer's process ends without closing anything cleanly: its descriptors go.
    drop((br, bw));
    let mut all = Vec::new();
    timeout(T, ar.read_to_end(&mut all)).await.expect("the end was not seen").unwrap();
    assert_eq!(all, b"last words", "what the peer wrote before it went is read, then the end");
    // Our writer fills the ring nobody reads and then finds the peer gone, instead of waiting forever.
    let filled = timeout(T, async {
        loop {
            if let Err(e) = aw.write_all(&[0u8; 1000]).await {
                return e;
            }
        }
    })
    .await
    .expect("the writer waited forever");
    assert_eq!(filled.kind(), std::io::ErrorKind::BrokenPipe, "{filled}");
}

#[tokio::test]
async fn a_dialler_without_shared_memory_is_handed_back_with_its_bytes() {
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(b"\x10\x00\x00\x00hello, plain").await.unwrap();
    let Accepted::Plain { mut stream, prefix } = accept(b, None).await.unwrap() else {
        panic!("took plain bytes for a set-up")
    };
    a.write_all(b" world").await.unwrap();
    drop(a);
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let mut all = prefix;
    all.extend_from_slice(&rest);
    assert_eq!(all, b"\x10\x00\x00\x00hello, plain world");
}

#[tokio::test]
async fn a_set_up_without_a_usable_memory_file_is_refused() {
    let (mut a, b) = UnixStream::pair().unwrap();
    // The magic and a version, but no descriptors.
    let mut msg = b"KSHM".to_vec();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&4096u32.to_le_bytes());
    a.write_all(&msg).await.unwrap();
    let e = accept(b, None).await.unwrap_err();
    assert!(e.to_string().contains("no memory file"), "{e}");
    let mut answer = Vec::new();
    a.read_to_end(&mut answer).await.unwrap();
    assert_eq!(&answer[..4], b"KSHM", "the dialler is told");
    assert_ne!(u32::from_le_bytes(answer[8..12].try_into().unwrap()), 0);
}
