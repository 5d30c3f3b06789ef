//! `kecho webfarm` in small, as CI runs it: a tiny sweep at a strong time scale, with plots.

use kecho_webfarm::webfarm::{report, sweep, write_outputs, Frequencies, WebfarmArgs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_sweep_runs_and_reports() {
    let dir = std::env::temp_dir().join(format!("kecho-webfarm-{}", std::process::id()));
    let args = WebfarmArgs {
        servers: 3,
        rates: vec![15.0, 60.0],
        duration: 4.0,
        time_scale: 20.0,
        modes: vec!["none".into(), "kecho:1".into(), "kecho:2".into(), "hedge".into(), "rr".into()],
        overhead_hz: Frequencies(vec![1.0, 4.0]),
        overhead_rate: 15.0,
        out: Some(dir.clone()),
        ..WebfarmArgs::default()
    };
    let s = sweep(&args).await.unwrap();
    // The ideal queue and five modes per rate, and the overhead runs.
    assert_eq!(s.results.len(), 12);
    assert_eq!(s.by_frequency.len(), 2);
    for r in &s.results {
        assert!(r.requests > 0 && r.p50 <= r.p95 && r.p95 <= r.p99, "{r:?}");
        assert!(r.timeouts <= r.requests);
    }
    let at = |mode: &str, rate: f64| s.results.iter().find(|r| r.mode == mode && r.rate == rate).unwrap();
    // At 60/s the loaded servers (42 and 78 requests/s against 26 each) are overloaded without balancing.
    assert!(at("none", 60.0).timeouts > 0, "overload shows as time-outs");
    assert!(at("kecho:1", 60.0).forwarded > 0.0, "KECho forwards under overload");
    assert!(s.by_frequency[1].1.reports_per_s > s.by_frequency[0].1.reports_per_s, "more reports at 4/s");
    let text = report(&args, &s);
    assert!(text.contains("Time scale 20"), "the scaling is said");
    assert!(text.contains("| 60 |") && text.contains("Targets:"));
    write_outputs(&dir, &args, &s).unwrap();
    for f in ["webfarm.csv", "fig8a.svg", "fig8b.svg", "fig9a.svg", "fig9b.svg", "p99.svg"] {
        let len = std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 100, "{f} written");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// `kecho webfarm` from its command line (the same `WebfarmArgs` the binary flattens), with the front ends of the
/// release demo's bug: at 40 % load no request may time out (time scale 5: a time-out is still a second of wall
/// time, so a slow debug build on a busy machine does not make one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_runs_a_tiny_sweep_of_the_front_ends() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: WebfarmArgs,
    }
    let cli = Cli::try_parse_from([
        "kecho-webfarm",
        "--servers",
        "3",
        "--rates",
        "15",
        "--duration",
        "4",
        "--time-scale",
        "5",
        "--modes",
        "p2c,jsq,rr",
    ])
    .unwrap();
    let s = sweep(&cli.args).await.unwrap();
    assert_eq!(s.results.len(), 4, "the ideal queue and three front ends");
    for r in s.results.iter().filter(|r| r.mode != "ideal") {
        assert_eq!(r.timeouts, 0, "{} at 40 % load: {r:?}", r.mode);
    }
    kecho_webfarm::run_webfarm(cli.args).await.unwrap();
}
