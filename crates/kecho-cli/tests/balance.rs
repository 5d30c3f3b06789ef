//! `kecho balance` as a process, over small HTTP servers: by URL, and discovered from `kecho sub --attr http=...`
//! members, with a dead member leaving the pool.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;

mod support;
use support::*;

/// An HTTP server on a thread answering every request with its own address.
fn http_server() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let me = addr.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let me = me.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                // One request per connection is all these tests need: read the head, answer, close.
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(c, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{me}", me.len());
            });
        }
    });
    Ok(addr)
}

fn spread(lb: &str, n: usize) -> Result<HashMap<String, usize>> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (code, body) = http_get(lb, "/")?;
        anyhow::ensure!(code == 200, "status {code}: {body}");
        *seen.entry(body).or_default() += 1;
    }
    Ok(seen)
}

#[test]
fn round_robin_over_servers_given_by_url() -> Result<()> {
    let (a, b) = (http_server()?, http_server()?);
    let lb = free_port()?;
    let servers = format!("http://{a},{b}");
    let mut p = Proc::spawn("balance", &["balance", "--listen", &lb, "--servers", &servers])?;
    p.wait_stderr("kecho balance on")?;
    let seen = spread(&lb, 10)?;
    assert_eq!((seen.get(&a), seen.get(&b)), (Some(&5), Some(&5)), "{seen:?}");
    Ok(())
}

#[test]
fn servers_discovered_from_a_channel_leave_when_their_node_dies() -> Result<()> {
    let reg = free_port()?;
    let _r = registry(&reg, &[])?;
    let (a, b, c) = (http_server()?, http_server()?, http_server()?);
    let member = |addr: &str, zone: &str| -> Result<Proc> {
        let (http, zone) = (format!("http={addr}"), format!("zone={zone}"));
        let args = ["sub", "web", "--registry", &reg, "--heartbeat", "1", "--attr", &http, "--attr", &zone];
        let mut p = Proc::spawn("member", &args)?;
        p.wait_stderr("subscribed")?;
        Ok(p)
    };
    let mut ma = member(&a, "eu")?;
    let _mb = member(&b, "eu")?;
    let _mc = member(&c, "us")?;
    let lb = free_port()?;
    let metrics = free_port()?;
    let args = [
        "balance",
        "--listen",
        &lb,
        "--registry",
        &reg,
        "--heartbeat",
        "1",
        "--pool",
        "web/zone == \"eu\"",
        "--mode",
        "jsq",
        "--metrics",
        &metrics,
    ];
    let mut p = Proc::spawn("balance", &args)?;
    p.wait_stderr("kecho balance on")?;
    let w = Duration::from_secs(20);
    eventually(w, "both eu servers in the pool", || {
        let (_, body) = http_get(&metrics, "/metrics")?;
        let s = kecho_metrics::text::parse(&body)?;
        Ok((kecho_metrics::text::value(&s, "kecho_balance_servers", &[]) == Some(2.0)).then_some(()))
    })?;
    let seen = spread(&lb, 20)?;
    assert!(seen.contains_key(&a) && seen.contains_key(&b) && !seen.contains_key(&c), "{seen:?}");

    // Member a's process dies: its server leaves the pool within the heartbeat timeout.
    ma.child.kill()?;
    ma.child.wait()?;
    eventually(w, "only b answering", || {
        let seen = spread(&lb, 6)?;
        Ok((seen.len() == 1 && seen.contains_key(&b)).then_some(()))
    })?;
    Ok(())
}

#[test]
fn bad_modes_and_missing_servers_are_clear_errors() -> Result<()> {
    for (args, needle) in [
        (vec!["balance", "--mode", "lru", "--servers", "127.0.0.1:1"], "expected rr, p2c, jsq"),
        (vec!["balance"], "--servers URL"),
        (vec!["balance", "--servers", "https://x:1"], "expected http://HOST:PORT"),
    ] {
        let o = std::process::Command::new(KECHO).args(&args).output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{args:?}: {err}");
    }
    Ok(())
}
