//! The mechanism's parts over real kecho channels on loopback: soft-state load reports (on change and periodic, aged
//! out when silent) and the load-aware OUT-filter of a front end that knows no load yet. The whole mechanism in a
//! farm of servers is tested in the crate kecho-webfarm.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kecho::{Attrs, Node, SinkOptions};
use kecho_lb::alloc::PowerOfTwo;
use kecho_lb::load::{
    LoadListener, LoadMonitor, LoadProbe, LoadSample, LoadTable, LoadWeights, MonitorConfig, ReportPolicy, ServerId,
    SharedTable,
};
use kecho_lb::mechanism::{LoadAwareFilter, Placements};
use kecho_lb::overhead::Overhead;
use parking_lot::Mutex;

/// Waits for a condition, polling, at most `secs`; fails the test with `what` otherwise.
async fn check(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A probe with a queue length set by the test, counting the samples taken.
struct Fixed(Arc<Mutex<u32>>, Arc<AtomicU64>);

impl LoadProbe for Fixed {
    fn sample(&mut self) -> LoadSample {
        self.1.fetch_add(1, Ordering::Relaxed);
        LoadSample { queue: *self.0.lock(), ..LoadSample::default() }
    }
}

/// On paused time: the monitor samples every 10 ms of tokio's clock, and the test reads the monitor's own count of
/// reports, so what it asserts does not depend on how fast the machine is.
#[tokio::test(start_paused = true)]
async fn load_reports_flow_on_change_and_age_out() {
    let a = Node::start().await.unwrap();
    let b = Node::start().await.unwrap();
    let ma = a.channel("lb-test-monitoring").await.unwrap();
    let mb = b.channel("lb-test-monitoring").await.unwrap();
    let table = Arc::new(Mutex::new(LoadTable::new()));
    let overhead = Arc::new(Overhead::default());
    let _listener = LoadListener::spawn(&mb, table.clone(), overhead.clone()).unwrap();
    ma.wait_for_sinks(1, Duration::from_secs(5)).await.unwrap();
    let queue = Arc::new(Mutex::new(1));
    let cfg = MonitorConfig {
        server: ServerId(9),
        weights: LoadWeights::default(),
        // Periodic every 10 s: anything sooner comes from the change threshold.
        policy: ReportPolicy::new(Duration::from_secs(10), 5.0),
        sample_every: Duration::from_millis(10),
        lifetime: Duration::from_millis(400),
    };
    let samples = Arc::new(AtomicU64::new(0));
    let probe = Box::new(Fixed(queue.clone(), samples.clone()));
    let monitor = LoadMonitor::spawn(&ma, probe, cfg, Arc::default(), overhead.clone()).unwrap();
    let now = || tokio::time::Instant::now().into_std();
    check(5, "the first report", || table.lock().index(ServerId(9), now()) == Some(1.0)).await;
    let reports = overhead.snapshot().reports;
    assert_eq!(reports, 1);
    *queue.lock() = 3;
    // Ten samples of the small change: the monitor decides on each, and sends nothing.
    let seen = samples.load(Ordering::Relaxed);
    check(5, "ten samples of the small change", || samples.load(Ordering::Relaxed) >= seen + 10).await;
    assert_eq!(overhead.snapshot().reports, reports, "a small change waits for the period");
    assert_eq!(table.lock().index(ServerId(9), now()), Some(1.0));
    *queue.lock() = 20;
    check(5, "a large change is reported at once", || table.lock().index(ServerId(9), now()) == Some(20.0)).await;
    monitor.task.abort();
    check(5, "the silent node ages out", || table.lock().index(ServerId(9), now()).is_none()).await;
    assert!(overhead.snapshot().reports >= 2);
    assert!(overhead.snapshot().handling_ns > 0);
}

/// The release demo's bug: a p2c front end started sending before it had any load report, and its OUT-filter,
/// which chose among servers with a valid report only, sent those requests to no server at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_front_end_that_knows_no_load_still_sends_every_request() {
    let a = Node::start().await.unwrap();
    let b = Node::start().await.unwrap();
    let da = a.channel("lb-fallback-data").await.unwrap();
    let db = b.channel("lb-fallback-data").await.unwrap();
    let mut sink = db.sink(SinkOptions::new().types(["request"]).attr("server", 1)).unwrap();
    da.wait_for_sinks(1, Duration::from_secs(5)).await.unwrap();
    let table: SharedTable = Arc::default(); // no report at all
    let placed: Placements = Arc::default();
    let mut front = da.source().unwrap();
    front.set_out_filter(Some(Arc::new(
        LoadAwareFilter::new(table.clone(), Box::new(PowerOfTwo::new(1)), None)
            .placements(placed.clone())
            .fallback_to_all(true),
    )));
    for req in 0..5i64 {
        front.submit("request", &Attrs::new().with("req", req), b"GET /").await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), sink.recv()).await.expect("the request reached a server");
        assert_eq!(ev.unwrap().attrs().get("req"), Some(&kecho::Value::Int(req)));
        assert_eq!(placed.lock()[&(req as u64)], vec![ServerId(1)]);
    }
    // A forwarding server keeps the strict rule: with nobody known it forwards to nobody (and keeps the request).
    let strict: Placements = Arc::default();
    let mut fwd = da.source().unwrap();
    fwd.set_out_filter(Some(Arc::new(
        LoadAwareFilter::new(table, Box::new(PowerOfTwo::new(1)), None).placements(strict.clone()),
    )));
    fwd.submit("request", &Attrs::new().with("req", 99i64), b"GET /").await.unwrap();
    assert_eq!(strict.lock().get(&99), Some(&vec![]));
}
