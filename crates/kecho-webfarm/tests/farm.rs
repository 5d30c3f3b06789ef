//! KECho's mechanism in the web farm, over real kecho channels on loopback: forwarding with the n-least-loaded
//! OUT-filter, duplicate responses discarded by the IN-filter, cancel events, a server killed mid-run, and a p2c
//! front end from the start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kecho_lb::load::ServerId;
use kecho_webfarm::farm::{Farm, FarmConfig, Mode, Server};

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

fn stat(s: &Server, f: fn(&kecho_webfarm::farm::ServerStats) -> &AtomicU64) -> u64 {
    f(&s.stats).load(Ordering::Relaxed)
}

fn total(farm: &Farm, f: fn(&kecho_webfarm::farm::ServerStats) -> &AtomicU64) -> u64 {
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
