//! `--metrics ADDR` on the long-running commands: scraped over HTTP while events flow.

use std::time::Duration;

use anyhow::Result;
use kecho_metrics::text::{parse, value};

mod support;
use support::*;

fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
    let (code, body) = http_get(addr, "/metrics")?;
    anyhow::ensure!(code == 200, "status {code}");
    Ok(value(&parse(&body)?, name, labels))
}

#[test]
fn registry_sub_and_pub_serve_metrics_that_move() -> Result<()> {
    let reg = free_port()?;
    let reg_metrics = free_port()?;
    let _r = registry(&reg, &["--metrics", &reg_metrics])?;
    let sub_metrics = free_port()?;
    let mut sub = Proc::spawn("sub", &["sub", "ticks", "--registry", &reg, "--metrics", &sub_metrics])?;
    sub.wait_stderr("subscribed")?;
    let pub_metrics = free_port()?;
    let mut publ = Proc::spawn(
        "pub",
        &[
            "pub",
            "ticks",
            "--registry",
            &reg,
            "--rate",
            "200",
            "--count",
            "100000",
            "--stamp",
            "--wait-sinks",
            "1",
            "--metrics",
            &pub_metrics,
        ],
    )?;
    publ.wait_stderr("metrics on")?;
    let ch = [("channel", "ticks")];
    let w = Duration::from_secs(20);
    let first = eventually(w, "events at the sink", || {
        Ok(metric(&sub_metrics, "kecho_channel_events_received_total", &ch)?.filter(|v| *v >= 20.0))
    })?;
    eventually(w, "more events at the sink", || {
        Ok(metric(&sub_metrics, "kecho_channel_events_received_total", &ch)?.filter(|v| *v > first))
    })?;
    eventually(w, "stamped latencies", || {
        Ok(metric(&sub_metrics, "kecho_delivery_latency_seconds_count", &ch)?.filter(|v| *v >= 20.0))
    })?;
    eventually(w, "events submitted", || {
        Ok(metric(&pub_metrics, "kecho_channel_events_submitted_total", &ch)?.filter(|v| *v >= 20.0))
    })?;
    assert_eq!(metric(&pub_metrics, "kecho_channel_sinks", &ch)?, Some(1.0));
    assert_eq!(metric(&pub_metrics, "kecho_node_links", &[])?, Some(1.0));
    eventually(w, "the channel at the registry", || {
        Ok(metric(&reg_metrics, "kecho_registry_channel_sinks", &ch)?.filter(|v| *v == 1.0))
    })?;
    assert_eq!(metric(&reg_metrics, "kecho_registry_up", &[])?, Some(1.0));
    Ok(())
}

#[test]
fn a_bad_metrics_address_is_a_clear_error() -> Result<()> {
    let o = std::process::Command::new(KECHO)
        .args(["registry", "--listen", "127.0.0.1:0", "--metrics", "nonsense"])
        .output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("invalid metrics address"), "{err}");
    Ok(())
}

/// The resource agent serves its node's metrics too: its channel `kecho.resources`, with its reports counted.
#[test]
fn the_agent_serves_metrics() -> Result<()> {
    let reg = free_port()?;
    let _r = registry(&reg, &[])?;
    let m = free_port()?;
    let args = ["agent", "--name", "m", "--cpus", "1", "--no-measure", "--report", "0.2", "--registry", &reg];
    let mut agent = Proc::spawn("agent", &[&args[..], &["--metrics", &m]].concat())?;
    agent.wait_stderr("offering")?;
    let ch = [("channel", "kecho.resources")];
    eventually(Duration::from_secs(20), "the agent's events submitted", || {
        Ok(metric(&m, "kecho_channel_events_submitted_total", &ch)?.filter(|v| *v >= 2.0))
    })?;
    Ok(())
}
