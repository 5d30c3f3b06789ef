//! KECho's mechanism over real kecho channels on loopback: forwarding with the n-least-loaded OUT-filter,
//! duplicate responses discarded by the IN-filter, cancel events, soft-state load reports and a server killed
//! mid-run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kecho::{Attrs, Node, SinkOptions};
use kecho_lb::alloc::PowerOfTwo;
use kecho_lb::farm::{Farm, FarmConfig, Mode, Server};
use kecho_lb::load::{
    LoadListener, LoadMonitor, LoadProbe, LoadSample, LoadTable, LoadWeights, MonitorConfig, ReportPolicy, ServerId,
    SharedTable,
};
use kecho_lb::mechanism::{LoadAwareFilter, Placements};
use kecho_lb::overhead::Overhead;
use parking_lot::Mutex;

/// Small times so that a test takes about a second: 20 ms of work, forwarding after 100 ms.
fn config(servers: usize, mode: Mode, name: &str) -> FarmConfig {
    let mut c = FarmConfig::new(servers, mode, name);
    c.timeout = Duration::from_secs(4);
    c.forward_after = Duration::from_millis(100);
    c.report_period = Duration::from_millis(100);
    c.lifetime = Duration::from_millis(300);
    c.heartbeat_timeout = Duration::from_secs(1);
    c
}

/// Waits for a condition, polling, at most `secs`; fails the test with `what` otherwise.
async fn check(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn stat(s: &Server, f: fn(&kecho_lb::farm::ServerStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(&s.stats).load(Ordering::Relaxed)
}

fn total(farm: &Farm, f: fn(&kecho_lb::farm::ServerStats) -> &std::sync::atomic::AtomicU64) -> u64 {
    farm.servers().iter().map(|s| stat(s, f)).sum()
}

/// Server 0 gets a burst it cannot serve in time; the rest is forwarded.
async fn burst(farm: &Farm, n: u64, work_ms: u64) {
    for req in 0..n {
        farm.arrive(0, req, Duration::from_millis(work_ms)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_responses_are_discarded_exactly_once() {
    let farm = Farm::start(config(4, Mode::Kecho { n: 3 }, "dedupe")).await.unwrap();
    burst(&farm, 20, 20).await;
    check(10, "every request answered", || farm.recorder().answered() == 20).await;
    let fwd = stat(&farm.servers()[0], |s| &s.forwarded);
    assert!(fwd >= 5, "only {fwd} forwarded");
    // Every forwarded request runs on all 3 chosen servers, and 2 of the 3 responses are discarded at the origin.
    check(5, "all copies processed", || total(&farm, |s| &s.served_remote) == 3 * fwd).await;
    let origin = &farm.servers()[0];
    check(5, "duplicates discarded", || origin.data_stats().unwrap().filtered == 2 * fwd).await;
    for (req, p) in origin.placements() {
        assert_eq!(p.len(), 3, "request {req} went to {p:?}");
        assert!(!p.contains(&ServerId(0)), "never to itself");
    }
    // The first response was kept once: one outcome per request.
    let outcomes = farm.recorder().outcomes();
    assert_eq!(outcomes.len(), 20);
    assert!(outcomes.values().all(|o| o.done.is_some()));
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_events_prevent_double_processing() {
    let farm = Farm::start(config(4, Mode::Cancel { n: 3 }, "cancel")).await.unwrap();
    burst(&farm, 20, 20).await;
    check(10, "every request answered", || farm.recorder().answered() == 20).await;
    let fwd = stat(&farm.servers()[0], |s| &s.forwarded);
    assert!(fwd >= 5, "only {fwd} forwarded");
    // Each forwarded request ran to the end on exactly one server; the other two copies were skipped or stopped.
    check(5, "the other copies skipped", || total(&farm, |s| &s.skipped) + total(&farm, |s| &s.aborted) == 2 * fwd)
        .await;
    assert_eq!(total(&farm, |s| &s.served_remote), fwd, "no request was processed twice");
    assert_eq!(farm.servers()[0].data_stats().unwrap().filtered, 0, "so there was no duplicate response");
    farm.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_ages_out_and_its_requests_are_resent() {
    let farm = Farm::start(config(3, Mode::Kecho { n: 1 }, "kill")).await.unwrap();
    // 40 requests of 50 ms at server 0: most are forwarded to servers 1 and 2, where they queue.
    burst(&farm, 40, 50).await;
    let origin = farm.servers()[0].clone();
    check(5, "requests in flight at server 1", || {
        origin.placements().iter().any(|(req, p)| p == &[ServerId(1)] && origin.inflight().contains(req))
    })
    .await;
    farm.kill(1);
    let stranded: Vec<u64> = origin
        .placements()
        .iter()
        .filter(|(req, p)| p.as_slice() == [ServerId(1)] && origin.inflight().contains(req))
        .map(|(r, _)| *r)
        .collect();
    check(3, "server 1 aged out at the origin", || !origin.known_servers().contains(&ServerId(1))).await;
    check(10, "every request answered", || farm.recorder().answered() == 40).await;
    assert!(stat(&origin, |s| &s.resent) > 0, "stranded requests were re-sent");
    let outcomes = farm.recorder().outcomes();
    for req in &stranded {
        let (_, by) = outcomes[req].done.unwrap();
        // A request may have finished at server 1 just before the kill; the rest came from elsewhere.
        if by == ServerId(1) {
            continue;
        }
        assert!(by == ServerId(2) || by == ServerId(0), "request {req} answered by {by}");
    }
    assert!(stranded.iter().any(|r| outcomes[r].done.unwrap().1 != ServerId(1)), "some were re-sent and answered");
    for (req, p) in origin.placements() {
        assert!(!p.contains(&ServerId(1)) || !origin.inflight().contains(&req), "nothing new goes to server 1");
    }
    farm.shutdown().await;
}

struct Fixed(Arc<Mutex<u32>>);

impl LoadProbe for Fixed {
    fn sample(&mut self) -> LoadSample {
        LoadSample { queue: *self.0.lock(), ..LoadSample::default() }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let monitor =
        LoadMonitor::spawn(&ma, Box::new(Fixed(queue.clone())), cfg, Arc::default(), overhead.clone()).unwrap();
    let now = || tokio::time::Instant::now().into_std();
    check(5, "the first report", || table.lock().index(ServerId(9), now()) == Some(1.0)).await;
    *queue.lock() = 3;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(table.lock().index(ServerId(9), now()), Some(1.0), "a small change waits for the period");
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

/// End to end: a p2c front end answers every request sent right after the farm started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p2c_front_end_answers_every_request_from_the_start() {
    let mut cfg = config(3, Mode::FrontP2c, "p2c-start");
    cfg.report_period = Duration::from_millis(500);
    cfg.lifetime = Duration::from_millis(1500);
    let farm = Farm::start(cfg).await.unwrap();
    for req in 0..60 {
        farm.arrive(0, req, Duration::from_millis(2)).await.unwrap();
    }
    check(10, "every request answered", || farm.recorder().answered() == 60).await;
    assert_eq!(farm.unplaced(), 0, "no request was sent nowhere");
    farm.shutdown().await;
}
