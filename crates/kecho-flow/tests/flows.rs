//! Flows over real files, sockets and threads: round trips, corruption, the zero-copy path and its fallback,
//! replication, fan-out with a slow sink, and each rung of the exception ladder with the fault injected.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kecho_flow::record::{self, Key, RecordError};
use kecho_flow::{parse, Decision, Flow, FlowError, FlowHandle, FlowStats};

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("kecho-flow-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
    fn path(&self, f: &str) -> String {
        self.0.join(f).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn data(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn run(spec: &str) -> Result<FlowStats, FlowError> {
    Flow::from_spec(&parse(spec).map_err(FlowError::from)?).start()?.wait()
}

/// Starts the flow `spec` (which must parse and start).
fn start(spec: &str) -> FlowHandle {
    Flow::from_spec(&parse(spec).unwrap()).start().unwrap()
}

/// A scratch directory named `name` holding `n` bytes of test data in the file `in`, and those bytes.
fn with_input(name: &str, n: usize) -> (Dir, Vec<u8>) {
    let d = Dir::new(name);
    let input = data(n);
    std::fs::write(d.path("in"), &input).unwrap();
    (d, input)
}

/// A TCP peer on loopback that accepts one connection and returns everything it read.
fn tcp_reader() -> (std::net::SocketAddr, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (addr, std::thread::spawn(move || read_all(l.accept().unwrap().0)))
}

/// A Unix socket peer at `path` that accepts one connection and returns everything it read.
fn unix_reader(path: &str) -> JoinHandle<Vec<u8>> {
    let l = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || read_all(l.accept().unwrap().0))
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

/// A resume-capable TCP peer: it starts each connection by sending how many bytes of the stream it holds (u64 BE),
/// holding `prefix` (zero-filled stand-ins) at first; with `drop_after`, it drops its first connection after taking
/// that many bytes and takes the rest on the next. Returns the bytes it received, the prefix left out.
fn resuming_peer(prefix: u64, drop_after: Option<usize>) -> (std::net::SocketAddr, JoinHandle<Vec<u8>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let mut got = Vec::new();
        if let Some(n) = drop_after {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(&prefix.to_be_bytes()).unwrap();
            let mut buf = vec![0u8; n];
            s.read_exact(&mut buf).unwrap();
            got.extend_from_slice(&buf);
        }
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&(prefix + got.len() as u64).to_be_bytes()).unwrap();
        s.read_to_end(&mut got).unwrap();
        got
    });
    (addr, peer)
}

/// Waits (at most 30 s) until the flow has ended, leaving its handle to read the events and the result.
fn await_end(f: &FlowHandle) {
    let t = Instant::now();
    while !f.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(30), "the flow did not end");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn key_file(d: &Dir) -> String {
    let k = d.path("key");
    std::fs::write(&k, "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n").unwrap();
    k
}

#[test]
fn encrypt_then_decrypt_round_trips() {
    let (d, input) = with_input("roundtrip", 1_000_003);
    let k = key_file(&d);
    let s = run(&format!(
        "file:{} chunk=64K ! encrypt aes-256-gcm key={k} record=1000 ! file:{}",
        d.path("in"),
        d.path("enc")
    ))
    .unwrap();
    assert_eq!(s.bytes_in, input.len() as u64);
    let enc = std::fs::read(d.path("enc")).unwrap();
    // Another program can decrypt it: the documented format, through the pure decoder.
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    assert_eq!(record::open_all(&key, &enc).unwrap(), input);
    let s = run(&format!("file:{} chunk=10K ! decrypt aes-256-gcm key={k} ! file:{}", d.path("enc"), d.path("out")))
        .unwrap();
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);
    assert_eq!(s.path, "copy");
    // Decryption is in place: the only user-space copies are the reads and the partial records carried over.
    let dec = &s.stages[1];
    assert_eq!(dec.copied, 0, "{s:#?}");
}

#[test]
fn replicated_decrypt_keeps_order() {
    let d = Dir::new("replicas");
    let k = key_file(&d);
    let input = data(3_000_000);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    std::fs::write(d.path("enc"), record::seal_all(&key, &input, 1024)).unwrap();
    let s = run(&format!(
        "file:{} chunk=16K ! decrypt aes-256-gcm key={k} replicas=2 ! file:{}",
        d.path("enc"),
        d.path("out")
    ))
    .unwrap();
    assert_eq!(s.stages[1].replicas, 2);
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);
    // When both replicas are busy the reading thread decrypts the chunk itself and hands it to the reordering tail:
    // those chunks are in the output above, in order; the flow says how many there were.
    if let Some(r) = s.results.iter().find(|r| r.contains("the reading thread ran")) {
        let n: Vec<u64> = r.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        // Reads fill a pooled buffer of the chunk plus 4 KiB: at most 20 KiB a chunk.
        assert!(n[0] >= 1 && n[0] <= n[1] && n[1] >= 3_000_000 / (20 << 10), "{r}");
        eprintln!("{r}");
    }
    // `auto` decides after its warm-up (16 MiB here: this input stays inline) whether the stage moves off the reading thread, on 1 or more
    // threads, depending on the cores free now: whichever it chose, the output is whole and in order, and the
    // stages' CPU time is counted.
    let s = run(&format!(
        "file:{} chunk=16K ! decrypt aes-256-gcm key={k} replicas=auto ! file:{}",
        d.path("enc"),
        d.path("out")
    ))
    .unwrap();
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);
    assert!(s.stages[1].cpu_s > 0.0 && s.stages[1].cpu_s <= s.stages[1].busy_s + 0.01, "{s:#?}");
}

/// The first stage's timing starts from the source's end reading of the clocks (one CPU clock reading fewer per
/// chunk), but never across a wait for the rate limit: a flow held to 2 MB/s spends most of its time waiting, and
/// neither the source nor the decrypt stage may count that wait as work.
#[test]
fn the_first_stage_is_not_charged_for_the_rate_limits_wait() {
    let (d, input) = with_input("ratewait", 2 << 20);
    let k = key_file(&d);
    run(&format!("file:{} ! encrypt aes-256-gcm key={k} record=1000 ! file:{}", d.path("in"), d.path("enc"))).unwrap();
    let t = Instant::now();
    let s = run(&format!(
        "file:{} rate=2M chunk=64K ! decrypt aes-256-gcm key={k} replicas=1 ! file:{}",
        d.path("enc"),
        d.path("out")
    ))
    .unwrap();
    let took = t.elapsed().as_secs_f64();
    assert!(std::fs::read(d.path("out")).unwrap() == input);
    // 2.1 MB at 2 MB/s with a burst of 0.2 MB: at least 0.9 s, nearly all of it waiting.
    assert!(took >= 0.9, "{took}");
    for st in &s.stages[..2] {
        assert!(st.busy_s < 0.3 * took, "{} counted the wait: {s:#?}", st.name);
        assert!(st.cpu_s > 0.0 && st.cpu_s <= st.busy_s + 0.01, "{s:#?}");
    }
}

/// As many replicas as cores: the reading thread is the last of them (one thread of their own fewer) and runs the
/// stage on the chunks it reads while the others are busy; the output is still whole and in order, and the flow
/// says how the replicas were placed.
#[test]
fn replicas_on_every_core_count_the_reading_thread() {
    let d = Dir::new("replicas-all-cores");
    let k = key_file(&d);
    let input = data(2_000_000);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    std::fs::write(d.path("enc"), record::seal_all(&key, &input, 1000)).unwrap();
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1).max(2);
    let s = run(&format!(
        "file:{} chunk=8K ! decrypt aes-256-gcm key={k} replicas={cores} ! file:{}",
        d.path("enc"),
        d.path("out")
    ))
    .unwrap();
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);
    assert_eq!(s.stages[1].replicas, cores);
    let placed = format!("{cores} replicas on ");
    let r = s.results.iter().find(|r| r.contains(&placed)).unwrap_or_else(|| panic!("{:#?}", s.results));
    assert!(r.contains(&format!("{} thread", cores - 1)) && r.contains("and the reading thread"), "{r}");
}

/// `replicas=auto` split mid-flow, forced: the planner is told to answer, whatever the cores, so that the split
/// after the warm-up happens on every machine. The chunks before it went through inline, the ones after through the
/// replicas and the reordering tail, which must start from the chunk after the warm-up: the output is the input,
/// whole and in order, for a split onto a thread of its own, onto several replicas, and for a second transform
/// split away from a first one that stays on the flow's thread.
#[test]
fn auto_replicas_split_mid_flow_and_lose_nothing() {
    let d = Dir::new("auto-split");
    let k = key_file(&d);
    let input = data(3_000_000);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    std::fs::write(d.path("enc"), record::seal_all(&key, &input, 1024)).unwrap();
    let plain = d.path("plain");
    std::fs::write(&plain, &input).unwrap();
    let cases = [
        // (spec, the stage forced, replicas)
        (
            format!(
                "file:{} chunk=16K ! decrypt aes-256-gcm key={k} replicas=auto ! file:{}",
                d.path("enc"),
                d.path("out")
            ),
            1,
            2,
        ),
        (
            format!(
                "file:{} chunk=16K ! decrypt aes-256-gcm key={k} replicas=auto ! file:{}",
                d.path("enc"),
                d.path("out")
            ),
            1,
            1,
        ),
        (
            format!(
                "file:{plain} chunk=16K ! encrypt aes-256-gcm key={k} record=1000 ! decrypt aes-256-gcm key={k} \
                 replicas=auto ! file:{}",
                d.path("out")
            ),
            2,
            3,
        ),
    ];
    for (spec, stage, n) in cases {
        let _ = std::fs::remove_file(d.path("out"));
        let asked = Arc::new(AtomicUsize::new(0));
        let seen = asked.clone();
        let f = Flow::from_spec(&parse(&spec).unwrap())
            .warm_up_bytes(1 << 20)
            .replica_planner(move |loads, wall, inline, _cap| {
                seen.fetch_add(1, Ordering::SeqCst);
                // Asked once, after the warm-up: the source and the transforms all ran on the flow's thread.
                assert_eq!(inline, loads.len() - 1, "{loads:?}");
                assert!(!wall.is_zero() && loads[0].busy > Duration::ZERO, "{loads:?}");
                Some((stage, n))
            })
            .start()
            .unwrap();
        await_end(&f);
        let events = f.events();
        let s = f.wait().unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(asked.load(Ordering::SeqCst), 1, "{spec}: {s:#?}");
        assert!(events.iter().any(|e| e.what == "replicated"), "{spec}: {events:?}");
        assert_eq!(s.stages[stage].replicas, n, "{spec}: {s:#?}");
        let out = std::fs::read(d.path("out")).unwrap();
        assert_eq!(out.len(), input.len(), "{spec}");
        assert!(out == input, "{spec}: the output differs from the input");
        // The split came mid-flow: more chunks than the warm-up went through the flow.
        assert!(s.bytes_in > 1 << 20, "{spec}: {s:#?}");
    }
}

/// `replicas=auto` decides after a number of bytes, not of chunks: with chunks of 16 KiB and of 256 KiB the planner
/// is asked once the same warm-up is read, within one chunk of it (a chunk count would ask 16 times later in bytes
/// at the larger chunk).
#[test]
fn the_warm_up_counts_bytes_whatever_the_chunk_size() {
    let d = Dir::new("warm-up-bytes");
    let k = key_file(&d);
    let input = data(4_000_000);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    std::fs::write(d.path("enc"), record::seal_all(&key, &input, 1024)).unwrap();
    let warm = 1u64 << 20;
    for chunk in [16usize << 10, 256 << 10] {
        let _ = std::fs::remove_file(d.path("out"));
        let spec = format!(
            "file:{} chunk={} ! decrypt aes-256-gcm key={k} replicas=auto ! file:{}",
            d.path("enc"),
            chunk,
            d.path("out")
        );
        let f = Flow::from_spec(&parse(&spec).unwrap())
            .warm_up_bytes(warm)
            .replica_planner(|_, _, _, _| Some((1, 1)))
            .start()
            .unwrap();
        await_end(&f);
        let events = f.events();
        let s = f.wait().unwrap_or_else(|e| panic!("{spec}: {e}"));
        let ev = events.iter().find(|e| e.what == "replicated").unwrap_or_else(|| panic!("{spec}: {events:?}"));
        let at: u64 = ev
            .detail
            .rsplit_once("after ")
            .and_then(|(_, b)| b.strip_suffix(" bytes"))
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("{spec}: {ev:?}"));
        // A read takes at most a chunk plus the pool's slack (4 KiB) and the partial record carried over.
        let most = warm + chunk as u64 + 8192;
        assert!((warm..most).contains(&at), "{spec}: planner asked after {at} bytes, not in {warm}..{most}");
        assert_eq!(std::fs::read(d.path("out")).unwrap(), input, "{spec}");
        assert_eq!(s.stages[1].replicas, 1, "{spec}: {s:#?}");
    }
}

#[test]
fn warmed_up_is_a_byte_and_time_threshold() {
    use kecho_flow::warmed_up;
    let ms = Duration::from_millis;
    assert!(!warmed_up(1000, ms(300), 1001, ms(200)));
    assert!(!warmed_up(1001, ms(199), 1001, ms(200)));
    assert!(warmed_up(1001, ms(200), 1001, ms(200)));
    assert!(warmed_up(u64::MAX, ms(200), 1001, ms(200)));
}

#[test]
fn corrupt_record_fails_with_its_offset_and_is_not_written() {
    let d = Dir::new("corrupt");
    let k = key_file(&d);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    let input = data(10_000);
    let mut enc = record::seal_all(&key, &input, 1000);
    // Record 3 starts at 44 + 3 * 1020; flip a byte inside its ciphertext.
    let at = 44 + 3 * 1020 + 100;
    enc[at] ^= 0x40;
    std::fs::write(d.path("enc"), &enc).unwrap();
    for replicas in [1, 2] {
        let e = run(&format!(
            "file:{} ! decrypt aes-256-gcm key={k} replicas={replicas} ! file:{}",
            d.path("enc"),
            d.path("out")
        ))
        .unwrap_err();
        match e {
            FlowError::Record(RecordError::Authentication { index, offset }) => {
                assert_eq!((index, offset), (3, 44 + 3 * 1020));
            }
            other => panic!("expected an authentication failure, got {other}"),
        }
        // The three good records are out; nothing of the bad one.
        assert_eq!(std::fs::read(d.path("out")).unwrap(), &input[..3000]);
    }
    // Truncation at a record boundary is caught too.
    std::fs::write(d.path("cut"), &record::seal_all(&key, &input, 1000)[..44 + 2 * 1020]).unwrap();
    let e = run(&format!("file:{} ! decrypt aes-256-gcm key={k} ! file:{}", d.path("cut"), d.path("out"))).unwrap_err();
    assert!(matches!(e, FlowError::Record(RecordError::Truncated { offset: 2084 })), "{e}");
}

#[test]
fn untransformed_flows_take_the_zero_copy_path() {
    let (d, input) = with_input("zerocopy", 5 << 20);
    let s = run(&format!("file:{} ! file:{}", d.path("in"), d.path("out"))).unwrap();
    assert_eq!(s.path, "zero-copy (copy_file_range)");
    assert_eq!(s.user_copied, 0);
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);

    // TCP to file: splice.
    let f = start(&format!("tcp-listen:127.0.0.1:0 ! file:{}", d.path("tcp")));
    let addr = f.local_addr().unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(&input).unwrap();
    drop(c);
    let s = f.wait().unwrap();
    assert_eq!(s.path, "zero-copy (splice)");
    assert_eq!(s.user_copied, 0);
    assert_eq!(std::fs::read(d.path("tcp")).unwrap(), input);

    // File to TCP: spliced through the flow's pipe of 1 MiB, two calls per MiB (in and out), no byte copied.
    let (addr, reader) = tcp_reader();
    let s = run(&format!("file:{} ! tcp-connect:{addr}", d.path("in"))).unwrap();
    assert_eq!(s.path, "zero-copy (splice through a pipe)");
    assert_eq!(s.user_copied, 0);
    assert!(s.stages[0].syscalls >= 10 && s.stages[0].syscalls <= 2 * 5 + 20, "{:?}", s.stages[0]);
    assert_eq!(reader.join().unwrap(), input);
}

/// The bytes a `direct` sink wrote with O_DIRECT and through the page cache, from the flow's results; `None` if the
/// file system refused O_DIRECT (the flow then says so with a rung-4 event).
fn direct_counts(s: &FlowStats) -> Option<(u64, u64)> {
    let r = s.results.iter().find(|r| r.contains("with O_DIRECT"))?;
    let nums: Vec<u64> = r.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    Some((nums[0], nums[1]))
}

/// A `direct` file sink writes exactly the input, whatever its length: the whole blocks with O_DIRECT, the unaligned
/// end (under 4 KiB) through the page cache; from a file (full reads) and from a socket (reads of any size).
#[test]
fn a_direct_sink_writes_exactly_the_bytes_tail_included() {
    let d = Dir::new("direct");
    for n in [0usize, 1, 4095, 4096, 4097, (1 << 20) + 123, 3 << 20, (5 << 20) / 2 + 7] {
        let input = data(n);
        std::fs::write(d.path("in"), &input).unwrap();
        // A stale longer file is truncated, not overwritten in place.
        std::fs::write(d.path("out"), vec![7u8; n + 10_000]).unwrap();
        let s = run(&format!("file:{} ! file:{} direct", d.path("in"), d.path("out"))).unwrap();
        assert!(std::fs::read(d.path("out")).unwrap() == input, "{n} bytes from a file: the output differs");
        assert_eq!(s.path, "direct (reads into aligned buffers, O_DIRECT writes)", "{n}");
        let (direct, buffered) = direct_counts(&s).unwrap_or_else(|| panic!("{n}: {:?}", s.results));
        assert_eq!((direct, buffered), ((n / 4096 * 4096) as u64, (n % 4096) as u64), "{n}");

        let _ = std::fs::remove_file(d.path("tcp"));
        let f = start(&format!("tcp-listen:127.0.0.1:0 ! file:{} direct", d.path("tcp")));
        let mut c = TcpStream::connect(f.local_addr().unwrap()).unwrap();
        // Odd write sizes, so that reads end anywhere.
        for part in input.chunks(70_001) {
            c.write_all(part).unwrap();
        }
        drop(c);
        let s = f.wait().unwrap();
        assert!(std::fs::read(d.path("tcp")).unwrap() == input, "{n} bytes from a socket: the output differs");
        assert_eq!(direct_counts(&s), Some(((n / 4096 * 4096) as u64, (n % 4096) as u64)), "{n}: {:?}", s.results);
        assert_eq!(s.bytes_out, n as u64, "{n}");
    }
}

/// Behind a transform, a `direct` sink gathers the chunk's records into aligned buffers and writes them with
/// O_DIRECT: the output is exactly the plaintext, its unaligned end included, with one replica or several.
#[test]
fn a_direct_sink_behind_decryption_writes_exactly_the_plaintext() {
    let d = Dir::new("direct-decrypt");
    let k = key_file(&d);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    for (n, record, reps) in [(0usize, 1024, 1), (5000, 1000, 1), (3_000_001, 1024, 1), (2_500_000, 777, 2)] {
        let input = data(n);
        std::fs::write(d.path("enc"), record::seal_all(&key, &input, record)).unwrap();
        std::fs::write(d.path("out"), vec![1u8; n + 5000]).unwrap();
        let spec = format!(
            "file:{} chunk=64K ! decrypt aes-256-gcm key={k} replicas={reps} ! file:{} direct",
            d.path("enc"),
            d.path("out")
        );
        let s = run(&spec).unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert!(std::fs::read(d.path("out")).unwrap() == input, "{spec}: the output differs");
        if n > 0 {
            assert_eq!(
                direct_counts(&s),
                Some(((n / 4096 * 4096) as u64, (n % 4096) as u64)),
                "{spec}: {:?}",
                s.results
            );
        }
    }
}

#[test]
fn direct_is_refused_where_it_cannot_apply() {
    let d = Dir::new("direct-bad");
    let e = parse(&format!("file:{} ! tcp-connect:127.0.0.1:9 direct", d.path("in"))).unwrap_err();
    assert!(e.to_string().contains("`direct` is for file sinks"), "{e}");
    for (spec, why) in [
        (format!("file:{} ! file:{} direct file:{}", d.path("in"), d.path("o"), d.path("p")), "several sinks"),
        (format!("file:{} ! file:{} direct append", d.path("in"), d.path("o")), "append"),
        (format!("file:{} direct ! file:{}", d.path("in"), d.path("o")), "not of a source"),
    ] {
        let e = Flow::from_spec(&parse(&spec).unwrap()).start().map(|_| ()).unwrap_err();
        assert!(matches!(&e, FlowError::Config(m) if m.contains(why)), "{spec}: {e}");
    }
}

#[test]
fn rung4_falls_back_to_copying_when_the_kernel_refuses() {
    // copy_file_range and splice refuse a destination opened for appending: the flow copies instead.
    let (d, input) = with_input("fallback", 300_000);
    std::fs::write(d.path("out"), b"head:").unwrap();
    let s = run(&format!("file:{} ! file:{} append", d.path("in"), d.path("out"))).unwrap();
    assert!(s.path.starts_with("copy (fallback"), "{}", s.path);
    let mut want = b"head:".to_vec();
    want.extend_from_slice(&input);
    assert_eq!(std::fs::read(d.path("out")).unwrap(), want);
}

#[test]
fn compress_checksum_and_back() {
    let d = Dir::new("compress");
    let mut input = data(200_000);
    input.extend(std::iter::repeat_n(b'a', 500_000));
    std::fs::write(d.path("in"), &input).unwrap();
    for codec in ["zstd", "lz4"] {
        let s = run(&format!("file:{} chunk=32K ! checksum ! compress {codec} ! file:{}", d.path("in"), d.path("z")))
            .unwrap();
        assert!(s.results[0].contains(&format!("{:08x}", crc32fast::hash(&input))), "{:?}", s.results);
        assert!(std::fs::metadata(d.path("z")).unwrap().len() < input.len() as u64);
        run(&format!("file:{} chunk=8K ! decompress {codec} ! file:{}", d.path("z"), d.path("out"))).unwrap();
        assert_eq!(std::fs::read(d.path("out")).unwrap(), input, "{codec}");
    }
}

#[test]
fn wasm_transform_runs_sandboxed() {
    let d = Dir::new("wasm");
    // Upper-cases ASCII letters in place.
    let wat = r#"(module
      (memory (export "memory") 2)
      (func (export "kecho_buffer") (result i32) (i32.const 0))
      (func (export "kecho_transform") (param $n i32) (result i32) (local $i i32) (local $c i32)
        (block $done (loop $l
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $c (i32.load8_u (local.get $i)))
          (if (i32.and (i32.ge_u (local.get $c) (i32.const 97)) (i32.le_u (local.get $c) (i32.const 122)))
            (then (i32.store8 (local.get $i) (i32.sub (local.get $c) (i32.const 32)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $l)))
        (local.get $n)))"#;
    std::fs::write(d.path("up.wat"), wat).unwrap();
    let input = b"hello, flows! ".repeat(10_000);
    std::fs::write(d.path("in"), &input).unwrap();
    run(&format!("file:{} ! wasm module={} ! file:{}", d.path("in"), d.path("up.wat"), d.path("out"))).unwrap();
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input.to_ascii_uppercase());
    // A module that loops forever runs out of fuel and fails the flow.
    std::fs::write(
        d.path("spin.wat"),
        r#"(module (memory (export "memory") 2)
      (func (export "kecho_buffer") (result i32) (i32.const 0))
      (func (export "kecho_transform") (param i32) (result i32) (loop $l (br $l)) (i32.const 0)))"#,
    )
    .unwrap();
    let e = run(&format!(
        "file:{} ! wasm module={} fuel=100000 ! file:{}",
        d.path("in"),
        d.path("spin.wat"),
        d.path("out")
    ))
    .unwrap_err();
    assert!(matches!(e, FlowError::Transform(_)), "{e}");
}

#[test]
fn a_slow_sink_is_detached_and_the_others_go_on() {
    let (d, input) = with_input("fanout", 8 << 20);
    // Both fan-outs: zero-copy (tee into one pipe per sink) and, with `copy`, the copying one (a queue per sink).
    for (copy, path) in [("", "zero-copy (splice + tee)"), (" copy", "copy")] {
        // A peer that accepts and never reads: its socket buffers fill, then its queue.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let hold = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(3));
            drop(s);
        });
        let spec = format!(
            "file:{}{copy} chunk=64K ! tcp-connect:{addr} queue=256K full=detach file:{}",
            d.path("in"),
            d.path("out")
        );
        let s = run(&spec).unwrap();
        assert_eq!(s.path, path);
        assert!(std::fs::read(d.path("out")).unwrap() == input, "{path}");
        assert!(s.stages[1].detached, "{s:#?}");
        assert!(!s.stages[2].detached);
        hold.join().unwrap();
    }
}

/// Untransformed fan-out to several kernel objects keeps the bytes in the kernel: `tee` duplicates the pipe's pages
/// for each sink, and every sink gets the whole stream.
#[test]
fn tee_fans_out_without_a_user_space_copy() {
    let (d, input) = with_input("tee", 6 << 20);
    let sock = d.path("u.sock");
    let reader = unix_reader(&sock);
    let spec = format!("file:{} ! file:{} unix:{sock} exec:'cat > {}'", d.path("in"), d.path("a"), d.path("c"));
    let s = run(&spec).unwrap();
    assert_eq!(s.path, "zero-copy (splice + tee)");
    assert_eq!(s.user_copied, 0, "{s:#?}");
    assert!(std::fs::read(d.path("a")).unwrap() == input);
    assert!(reader.join().unwrap() == input);
    assert!(std::fs::read(d.path("c")).unwrap() == input);
    for st in &s.stages[1..] {
        assert_eq!(st.bytes_out, input.len() as u64, "{}", st.name);
        assert!(!st.detached, "{}", st.name);
    }
    // A sink that refuses splice (a file opened for appending) is copied to, alone (rung 4); the others are not.
    std::fs::write(d.path("app"), b"head:").unwrap();
    let s = run(&format!("file:{} ! file:{} append file:{}", d.path("in"), d.path("app"), d.path("b"))).unwrap();
    assert_eq!(s.path, "zero-copy (splice + tee)");
    assert_eq!(s.stages[1].copied, input.len() as u64);
    assert_eq!(s.stages[2].copied, 0);
    let mut want = b"head:".to_vec();
    want.extend_from_slice(&input);
    assert!(std::fs::read(d.path("app")).unwrap() == want);
    assert!(std::fs::read(d.path("b")).unwrap() == input);
}

fn closed_port() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[test]
fn rungs_1_and_2_retry_then_redirect_to_the_alternate() {
    let (d, input) = with_input("redirect", 100_000);
    let (addr, reader) = tcp_reader();
    let f = start(&format!(
        "file:{} ! checksum ! tcp-connect:{} retries=2 alt=tcp-connect:{addr}",
        d.path("in"),
        closed_port()
    ));
    await_end(&f);
    let steps: Vec<(u8, String)> = f.events().into_iter().map(|e| (e.rung, e.what)).collect();
    assert_eq!(
        steps,
        vec![(1, "retry".into()), (1, "retry".into()), (2, "redirect".into()), (0, "reconnected".into())]
    );
    let s = f.wait().unwrap();
    assert_eq!(s.bytes_out, input.len() as u64);
    assert_eq!(reader.join().unwrap(), input);
}

#[test]
fn rung_3_and_5_notify_the_application_then_terminate() {
    let (d, _) = with_input("notify", 1000);
    let asked = Arc::new(AtomicUsize::new(0));
    let a = asked.clone();
    let spec =
        parse(&format!("file:{} ! compress zstd ! tcp-connect:{} retries=1", d.path("in"), closed_port())).unwrap();
    let f = Flow::from_spec(&spec)
        .on_fault(move |ev| {
            assert_eq!(ev.rung, 3);
            // First time: try once more; second time: give up.
            if a.fetch_add(1, Ordering::SeqCst) == 0 {
                Decision::Retry
            } else {
                Decision::Terminate
            }
        })
        .start()
        .unwrap();
    let watcher = f.watcher();
    let e = f.wait().unwrap_err();
    assert!(matches!(e, FlowError::Terminated { .. }), "{e}");
    assert_eq!(asked.load(Ordering::SeqCst), 2);
    assert!(watcher.stats().state.starts_with("failed: terminated"));
}

#[test]
fn ladder_events_are_recorded_in_order() {
    let (d, _) = with_input("events", 1000);
    let f = start(&format!("file:{} ! checksum ! tcp-connect:{} retries=1", d.path("in"), closed_port()));
    await_end(&f);
    let rungs: Vec<(u8, String)> = f.events().into_iter().map(|e| (e.rung, e.what)).collect();
    assert_eq!(rungs, vec![(1, "retry".into()), (3, "notify".into()), (5, "terminated".into())]);
}

#[test]
fn rung_1_resumes_a_dropped_connection_at_the_peers_offset() {
    let (d, input) = with_input("resume", 4 << 20);
    // A resume-capable peer: says how much it holds, takes 1 MB, drops the connection; then takes the rest.
    let (addr, peer) = resuming_peer(0, Some(1 << 20));
    let s = run(&format!("file:{} chunk=64K ! checksum ! tcp-connect:{addr} resume retries=5", d.path("in"))).unwrap();
    let got = peer.join().unwrap();
    assert_eq!(got.len(), input.len());
    assert!(got == input);
    assert!(s.bytes_out >= input.len() as u64);
}

#[test]
fn stop_by_handle_and_rate_limit() {
    let f = start("tcp-listen:127.0.0.1:0 ! checksum ! -");
    let addr = f.local_addr().unwrap();
    let _c = TcpStream::connect(addr).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    f.stop();
    assert!(matches!(f.wait(), Err(FlowError::Stopped)));

    let (d, _) = with_input("rate", 2 << 20);
    let t = Instant::now();
    let f = start(&format!("file:{} rate=8M chunk=64K ! checksum ! file:{}", d.path("in"), d.path("out")));
    f.set_priority(5);
    let s = f.wait().unwrap();
    // 2 MiB at 8 MiB/s with a burst of 0.8 MiB needs at least 0.15 s.
    assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
    assert_eq!(s.priority, 5);
}

#[test]
fn a_scheduler_shares_its_budget_by_priority() {
    let sched = kecho_flow::Scheduler::new(Some(30_000_000));
    let start = |p: u32| {
        Flow::from_spec(&parse("tcp-listen:127.0.0.1:0 ! checksum ! -").unwrap())
            .priority(p)
            .scheduler(sched.clone())
            .start()
            .unwrap()
    };
    let a = start(1);
    let b = start(2);
    assert_eq!(a.stats().effective_rate, Some(10_000_000));
    assert_eq!(b.stats().effective_rate, Some(20_000_000));
    // Reprioritise: a now weighs 4 against 2.
    a.set_priority(4);
    assert_eq!(a.stats().effective_rate, Some(20_000_000));
    assert_eq!(b.stats().effective_rate, Some(10_000_000));
    // A flow's own limit below its share frees the rest for the other.
    b.set_rate(Some(1_000_000));
    assert_eq!(b.stats().effective_rate, Some(1_000_000));
    assert_eq!(a.stats().effective_rate, Some(29_000_000));
    a.stop();
    b.stop();
    assert!(matches!(a.wait(), Err(FlowError::Stopped)));
    assert!(matches!(b.wait(), Err(FlowError::Stopped)));
}

#[test]
fn kecho_channel_in_and_out() {
    // A flow from a file into a kecho channel, and a flow from that channel into a file, on one in-process node.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (d, input) = with_input("channel", 50_000);
    let (node, ch) = rt.block_on(async {
        let node =
            kecho::Node::builder().registry_client(kecho::RegistryClient::in_process_private()).start().await.unwrap();
        let ch = node.channel("flows-test").await.unwrap();
        (node, ch)
    });
    let sink = ch.sink(kecho::SinkOptions::new().capacity(100_000)).unwrap();
    let reader = Flow::from_spec(&parse(&format!("kecho:flows-test ! file:{}", d.path("out"))).unwrap())
        .channel_source("flows-test", sink)
        .start()
        .unwrap();
    let writer = Flow::from_spec(&parse(&format!("file:{} chunk=4K ! kecho:flows-test", d.path("in"))).unwrap())
        .channel_sink("flows-test", ch.source().unwrap())
        .start()
        .unwrap();
    writer.wait().unwrap();
    let t = Instant::now();
    while reader.stats().bytes_out < input.len() as u64 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    reader.stop();
    let _ = reader.wait();
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);

    // Rung 3's event on a channel: a failing flow tells the application's channel.
    let ev_ch = rt.block_on(node.channel("flows-events")).unwrap();
    let mut events = ev_ch.sink(kecho::SinkOptions::new().types(["flow.event"])).unwrap();
    let failing = Flow::from_spec(
        &parse(&format!("file:{} ! checksum ! tcp-connect:{} retries=0", d.path("in"), closed_port())).unwrap(),
    )
    .notify_channel(ev_ch.source().unwrap())
    .start()
    .unwrap();
    assert!(failing.wait().is_err());
    let mut seen = Vec::new();
    while let Ok(ev) = events.recv_blocking(Some(Duration::from_secs(5))) {
        let e: kecho_flow::FlowEvent = serde_json::from_slice(ev.payload()).unwrap();
        seen.push(e.what);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen, vec!["notify".to_owned(), "terminated".to_owned()]);
    drop(node);
}

/// Unix stream sockets both ways: a listening source (zero-copy splice into a file) and a connecting sink behind a
/// transform (the copying path), with the bytes checked end to end.
#[test]
fn unix_socket_endpoints_listen_and_connect() {
    use std::os::unix::net::UnixStream;
    let (d, input) = with_input("unix", 3 << 20);

    // unix-listen source -> file: splice, no user-space copy.
    let sock = d.path("src.sock");
    let f = start(&format!("unix-listen:{sock} ! file:{}", d.path("out")));
    let mut c = UnixStream::connect(&sock).unwrap();
    c.write_all(&input).unwrap();
    drop(c);
    let s = f.wait().unwrap();
    assert_eq!(s.path, "zero-copy (splice)");
    assert_eq!(s.user_copied, 0);
    assert_eq!(std::fs::read(d.path("out")).unwrap(), input);
    assert!(!std::path::Path::new(&sock).exists(), "the listening socket's file is removed");

    // file -> checksum -> unix sink (connect): the copying path.
    let sink = d.path("sink.sock");
    let reader = unix_reader(&sink);
    let s = run(&format!("file:{} ! checksum ! unix:{sink}", d.path("in"))).unwrap();
    assert_eq!(s.path, "copy");
    assert_eq!(reader.join().unwrap(), input);
    assert!(s.results[0].contains(&format!("{:08x}", crc32fast::hash(&input))), "{:?}", s.results);

    // A unix sink nobody listens on is a connection fault: the ladder retries, then terminates.
    let err = run(&format!("file:{} ! unix:{} retries=1", d.path("in"), d.path("nobody.sock"))).unwrap_err();
    assert!(matches!(err, FlowError::Terminated { .. } | FlowError::Io { .. }), "{err}");
}

/// A process's stdout as a source and a process's stdin as a sink (`sh -c`), untransformed and transformed; a
/// sink process that exits early fails the flow instead of hanging it.
#[test]
fn exec_endpoints_read_stdout_and_write_stdin() {
    let (d, input) = with_input("exec", 2 << 20);

    // exec source (a pipe) -> file: splice.
    let s = run(&format!("exec:'cat {}' ! file:{}", d.path("in"), d.path("a"))).unwrap();
    assert_eq!(s.path, "zero-copy (splice)");
    assert_eq!(std::fs::read(d.path("a")).unwrap(), input);

    // file -> exec sink: sendfile into the child's stdin; the flow waits for the child to finish.
    let s = run(&format!("file:{} ! exec:'cat > {}'", d.path("in"), d.path("b"))).unwrap();
    assert_eq!(s.path, "zero-copy (sendfile)");
    assert_eq!(std::fs::read(d.path("b")).unwrap(), input);

    // exec -> compress -> exec, and back through decompress: what the child gets is what the other child wrote.
    run(&format!("exec:'cat {}' ! compress zstd ! exec:'cat > {}'", d.path("in"), d.path("z"))).unwrap();
    run(&format!("file:{} ! decompress zstd ! file:{}", d.path("z"), d.path("c"))).unwrap();
    assert_eq!(std::fs::read(d.path("c")).unwrap(), input);

    // A sink process that exits at once: the flow ends with an error (a broken pipe), it does not hang.
    let t = Instant::now();
    let err = run(&format!("file:{} ! checksum ! exec:'exit 3'", d.path("in"))).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(20));
    assert!(err.to_string().contains("pipe") || matches!(err, FlowError::Terminated { .. }), "{err}");

    // A sink process that reads everything but fails: its exit status fails the flow.
    let err = run(&format!("file:{} ! exec:'cat > /dev/null; exit 4'", d.path("in"))).unwrap_err();
    assert!(err.to_string().contains("exit status: 4"), "{err}");

    // A source process that writes its output and then fails (or a command that does not exist): the flow fails
    // with its exit status rather than report done, on the zero-copy path and through a transform alike.
    let err = run(&format!("exec:'cat {}; exit 5' ! file:{}", d.path("in"), d.path("e"))).unwrap_err();
    assert!(err.to_string().contains("exited with status 5"), "{err}");
    let err = run(&format!("exec:'cat {}; exit 6' ! checksum ! file:{}", d.path("in"), d.path("f"))).unwrap_err();
    assert!(err.to_string().contains("exited with status 6"), "{err}");
    let err = run(&format!("exec:no-such-command-here ! file:{}", d.path("g"))).unwrap_err();
    assert!(err.to_string().contains("exited with status 127"), "{err}");
    let err = run(&format!("exec:'kill -9 $$' ! file:{}", d.path("h"))).unwrap_err();
    assert!(err.to_string().contains("killed by signal 9"), "{err}");

    // A sink process that stops reading early is not started again with the rest of the stream (as a retry would):
    // the flow fails, and the command ran once (it appends what it took: 10 bytes, not 10 per start).
    for spec in [
        format!("file:{} ! exec:'head -c 10 >> {}'", d.path("in"), d.path("once")),
        format!("file:{} ! checksum ! exec:'head -c 10 >> {}'", d.path("in"), d.path("once2")),
        format!("file:{} ! exec:true", d.path("in")),
    ] {
        let err = run(&spec).unwrap_err();
        assert!(matches!(err, FlowError::Terminated { .. }), "{spec}: {err}");
    }
    assert_eq!(std::fs::read(d.path("once")).unwrap(), input[..10]);
    assert_eq!(std::fs::read(d.path("once2")).unwrap(), input[..10]);
}

/// The zero-copy path resumes too: a file spliced to a peer that drops the connection after 1 MB is
/// sent again from the offset the peer names on the new connection, without a byte entering user space; and a peer
/// that already holds a prefix when the flow starts (a restarted transfer) gets only the rest.
#[test]
fn rung_1_resumes_a_zero_copy_sendfile_at_the_peers_offset() {
    let (d, input) = with_input("zcresume", 4 << 20);
    let (addr, peer) = resuming_peer(0, Some(1 << 20));
    let s = run(&format!("file:{} ! tcp-connect:{addr} resume retries=5", d.path("in"))).unwrap();
    let got = peer.join().unwrap();
    assert_eq!(s.path, "zero-copy (splice through a pipe)");
    assert_eq!(s.user_copied, 0, "{s:?}");
    assert_eq!(got.len(), input.len());
    assert!(got == input, "the bytes lost with the first connection were sent again, none twice");

    // A peer holding the first 1.5 MB from an earlier transfer.
    let prefix = 3 << 19;
    let (addr, peer) = resuming_peer(prefix as u64, None);
    let s = run(&format!("file:{} ! tcp-connect:{addr} resume", d.path("in"))).unwrap();
    assert!(peer.join().unwrap() == input[prefix..]);
    assert_eq!(s.bytes_out, (input.len() - prefix) as u64);
    assert_eq!(s.user_copied, 0);
}

/// Both connections' bytes, as a [`dropping_reader`] read them.
type TwoConnections = JoinHandle<(Vec<u8>, Vec<u8>)>;

/// A TCP peer on loopback that takes `first` bytes on its first connection and drops it (closing with unread data:
/// the sender gets a reset), then reads its second connection to the end. Returns both connections' bytes.
fn dropping_reader(first: usize) -> (std::net::SocketAddr, TwoConnections) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut a = vec![0u8; first];
        s.read_exact(&mut a).unwrap();
        drop(s);
        (a, read_all(l.accept().unwrap().0))
    });
    (addr, peer)
}

/// Without `resume`, a file sent to a peer that drops its connection mid-transfer: the peer cannot say what it
/// holds, so the new connection gets the stream from the first byte not handed to the old one — on the splice path
/// the bytes still in the flow's pipe first, then the file from where it was read — each byte sent once and in
/// order; the flow reports that offset (event and result), so the user knows exactly which part may be lost: what
/// the first connection's peer had not read before it. The same on the `sendfile` and the copying paths.
#[test]
fn rung_1_without_resume_a_dropped_connection_goes_on_at_the_reported_byte() {
    let (d, input) = with_input("zcdrop", 24 << 20);
    let first = 1 << 20;
    for (mid, opt, path) in [
        ("", "", "zero-copy (splice through a pipe)"),
        ("", " sendfile", "zero-copy (sendfile)"),
        (" ! checksum", "", "copy"),
    ] {
        let (addr, peer) = dropping_reader(first);
        let f = start(&format!("file:{}{mid} ! tcp-connect:{addr} retries=5{opt}", d.path("in")));
        await_end(&f);
        let events = f.events();
        let s = f.wait().unwrap();
        let (a, b) = peer.join().unwrap();
        assert_eq!(s.path, path);
        if path != "copy" {
            assert_eq!(s.user_copied, 0, "{s:?}");
        }
        let re: Vec<_> = events.iter().filter(|e| e.what == "reconnected").collect();
        assert_eq!(re.len(), 1, "{path}: {events:?}");
        let at: usize = re[0]
            .detail
            .split("goes on at byte ")
            .nth(1)
            .and_then(|t| t.split(';').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{path}: no offset in {:?}", re[0].detail));
        assert!(s.results.iter().any(|r| r.contains(&format!("goes on at byte {at};"))), "{:?}", s.results);
        // The first connection's peer read a prefix; the offset lies at or past it (what the old connection still
        // held in its socket buffers is the loss), and the new connection got exactly the file from there on.
        assert!(a == input[..first]);
        assert!(at >= first && at < input.len(), "{path}: offset {at}");
        assert_eq!(b.len(), input.len() - at, "{path}: the new connection's bytes start at byte {at}");
        assert!(b == input[at..], "{path}: the new connection got the file from byte {at} on, in order");
        assert_eq!(s.bytes_out, input.len() as u64, "{path}: every byte handed to a connection once");
    }
}

/// A file to a socket goes by `splice` through the flow's pipe, or by `sendfile` with the sink's `sendfile` option;
/// the source stage's counters name the calls that moved the bytes. The option is for socket sinks only.
#[test]
fn the_sendfile_option_selects_the_call_that_sends_a_file() {
    let n = 8 << 20;
    let (d, input) = with_input("sendfileopt", n);
    for (opt, path) in [("", "zero-copy (splice through a pipe)"), (" sendfile", "zero-copy (sendfile)")] {
        let (addr, peer) = tcp_reader();
        let s = run(&format!("file:{} ! tcp-connect:{addr}{opt}", d.path("in"))).unwrap();
        assert!(peer.join().unwrap() == input, "{opt}: every byte, in order");
        assert_eq!(s.path, path);
        assert_eq!(s.user_copied, 0, "{s:?}");
        let src = &s.stages[0];
        if opt.is_empty() {
            // One splice into the pipe per MiB of the file and at least one out of it, plus the end.
            assert!(src.splice > 2 * (n as u64 >> 20), "{src:?}");
            assert_eq!(src.sendfile, 0, "{src:?}");
        } else {
            assert!(src.sendfile > n as u64 >> 20, "{src:?}");
            assert_eq!(src.splice, 0, "{src:?}");
        }
        assert!(src.syscalls >= src.splice + src.sendfile, "{src:?}");
    }
    // Not for a file sink, nor on a source; a library user who sets the field on a file sink is told so too.
    let e = parse(&format!("file:{} ! file:{} sendfile", d.path("in"), d.path("out"))).unwrap_err();
    assert!(e.to_string().contains("`sendfile` is for socket sinks"), "{e}");
    let e = parse(&format!("file:{} sendfile ! file:{}", d.path("in"), d.path("out"))).unwrap_err();
    assert!(e.to_string().contains("`sendfile` is for socket sinks"), "{e}");
    let mut sink = kecho_flow::EndpointSpec::new(kecho_flow::Endpoint::File(d.path("out").into()));
    sink.sendfile = true;
    let e = Flow::builder()
        .source(kecho_flow::EndpointSpec::new(kecho_flow::Endpoint::File(d.path("in").into())))
        .sink(sink)
        .start()
        .unwrap_err();
    assert!(e.to_string().contains("`sendfile` is for socket sinks"), "{e}");
}

/// `full=drop` on the zero-copy fan-out: the slow sink's bytes are skipped (and counted) while it holds the others
/// up, instead of cutting it off; the other sink gets everything.
#[test]
fn tee_drop_policy_skips_bytes_for_the_slow_sink_only() {
    let (d, input) = with_input("teedrop", 24 << 20);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let hold = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        // Never reads until the flow is over, then takes what was queued for it.
        let _ = rx.recv();
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        v.len()
    });
    let f = start(&format!("file:{} ! tcp-connect:{addr} queue=64K full=drop file:{}", d.path("in"), d.path("out")));
    // The file sink finishes while the TCP sink's bytes are dropped; then the peer drains what it was given.
    let t = Instant::now();
    while std::fs::metadata(d.path("out")).map(|m| m.len()).unwrap_or(0) < input.len() as u64 {
        assert!(t.elapsed() < Duration::from_secs(30), "the file sink was held up");
        std::thread::sleep(Duration::from_millis(20));
    }
    tx.send(()).unwrap();
    let s = f.wait().unwrap();
    let got = hold.join().unwrap();
    assert_eq!(s.path, "zero-copy (splice + tee)");
    assert!(std::fs::read(d.path("out")).unwrap() == input);
    assert!(s.stages[1].dropped > 0, "{s:#?}");
    assert!(!s.stages[1].detached);
    assert_eq!(got as u64 + s.stages[1].dropped, input.len() as u64, "every byte is either sent or counted as dropped");
}

/// The application sees the bytes only where it asks to: an `app:` sink gets the decrypted records, in order, beside
/// a file sink; a function that fails terminates the flow with its reason; a missing function is a configuration
/// error at start.
#[test]
fn an_app_sink_sees_the_bytes_it_asked_for() {
    let (d, input) = with_input("app", 300_000);
    let k = key_file(&d);
    let key = Key::parse(std::fs::read(&k).unwrap().as_slice()).unwrap();
    std::fs::write(d.path("enc"), record::seal_all(&key, &input, 1000)).unwrap();
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicUsize::new(0));
    let (s2, c2) = (seen.clone(), calls.clone());
    let spec = format!("file:{} ! decrypt aes-256-gcm key={k} ! app:mine file:{}", d.path("enc"), d.path("out"));
    let s = Flow::from_spec(&parse(&spec).unwrap())
        .app_sink("mine", move |b| {
            c2.fetch_add(1, Ordering::Relaxed);
            s2.lock().extend_from_slice(b);
            Ok(())
        })
        .start()
        .unwrap()
        .wait()
        .unwrap();
    assert!(*seen.lock() == input);
    assert_eq!(calls.load(Ordering::Relaxed), 300, "one call per decrypted record");
    assert!(std::fs::read(d.path("out")).unwrap() == input);
    assert_eq!(s.stages[2].name, "app:mine");

    let e = Flow::from_spec(&parse(&format!("file:{} ! app:picky", d.path("in"))).unwrap())
        .app_sink("picky", |_| Err("no thanks".into()))
        .start()
        .unwrap()
        .wait()
        .unwrap_err();
    assert!(matches!(&e, FlowError::Terminated { reason, .. } if reason == "no thanks"), "{e}");

    let e = Flow::from_spec(&parse(&format!("file:{} ! app:nobody", d.path("in"))).unwrap()).start().unwrap_err();
    assert!(matches!(e, FlowError::Config(_)), "{e}");
}

/// A file sink reserves disk space ahead of its writes (`fallocate` with `KEEP_SIZE`: each write lands in blocks
/// already allocated) and gives back what it did not write when it closes: while the flow runs, the file holds more
/// blocks than its size and its size is only what was written; once it ended, the file is the input exactly and holds
/// no more blocks than its size needs. On the copying path behind a transform, the zero-copy splice from a socket,
/// and copy_file_range from a file.
#[test]
fn file_sinks_reserve_space_ahead_and_give_the_rest_back() {
    use std::os::unix::fs::MetadataExt;
    let (d, input) = with_input("prealloc", 3_000_000);
    let allocated = |p: &str| std::fs::metadata(p).unwrap().blocks() * 512;
    let size = |p: &str| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let step = kecho_flow::endpoint::Prealloc::STEP;
    let first = 100_000usize;
    for (name, via) in [("behind a transform", " ! checksum"), ("spliced", "")] {
        let out = d.path("out");
        let _ = std::fs::remove_file(&out);
        let f = start(&format!("tcp-listen:127.0.0.1:0{via} ! file:{out}"));
        let mut s = TcpStream::connect(f.local_addr().unwrap()).unwrap();
        s.write_all(&input[..first]).unwrap();
        let t = Instant::now();
        while size(&out) < first as u64 {
            assert!(t.elapsed() < Duration::from_secs(20), "{name}: the sink wrote {} bytes", size(&out));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(size(&out), first as u64, "{name}: the size is what was written");
        assert!(allocated(&out) >= step, "{name}: {} bytes allocated mid-flow, {step} reserved", allocated(&out));
        s.write_all(&input[first..]).unwrap();
        drop(s);
        f.wait().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(std::fs::read(&out).unwrap() == input, "{name}: the output differs from the input");
        let slack = 1 << 20;
        assert!(
            allocated(&out) < input.len() as u64 + slack,
            "{name}: {} bytes allocated for {} written: the reserve was not given back",
            allocated(&out),
            input.len()
        );
    }
    let out = d.path("copied");
    run(&format!("file:{} ! file:{out}", d.path("in"))).unwrap();
    assert!(std::fs::read(&out).unwrap() == input, "copy_file_range: the output differs from the input");
    assert!(allocated(&out) < input.len() as u64 + (1 << 20), "copy_file_range: {} bytes allocated", allocated(&out));
}
