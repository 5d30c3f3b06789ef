//! `kecho top` in a real pseudo-terminal (as over SSH): it draws the registry's channels and quits on `q`. The
//! terminal is made by util-linux's `script`, which passes this test's keys to the command.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

mod support;
use support::*;

#[test]
fn top_draws_the_channels_in_a_terminal_and_q_quits() -> Result<()> {
    if Command::new("script").arg("--version").output().is_err() {
        let why = "util-linux `script` not found (it makes the pseudo-terminal)";
        if std::env::var_os("CI").is_some() {
            bail!("{why}; under CI this test must run");
        }
        eprintln!("skipped: {why}");
        return Ok(());
    }
    let reg = free_port()?;
    let _r = registry(&reg, &[])?;
    let mut sub = Proc::spawn("sub", &["sub", "watched-by-top", "--registry", &reg, "--report"])?;
    sub.wait_stderr("subscribed")?;

    // The pseudo-terminal of `script` has no size when the test's own input is not a terminal: give it one, as an
    // SSH client does.
    let cmd = format!("stty cols 120 rows 30 && exec {KECHO} top --registry {reg} --no-agents");
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env("TERM", "xterm")
        .env_remove("KECHO_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn script")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = child.stdout.take().context("stdout")?;
    let screen = Arc::new(Mutex::new(Vec::new()));
    let s2 = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                return;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let seen = |what: &str| String::from_utf8_lossy(&screen.lock().unwrap()).contains(what);
    let result = (|| {
        eventually(Duration::from_secs(30), "the title and the channel on the screen", || {
            Ok((seen("kecho top") && seen("watched-by-top")).then_some(()))
        })?;
        stdin.write_all(b"q")?;
        stdin.flush()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                anyhow::ensure!(status.success(), "kecho top exited with {status}");
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("kecho top did not quit on q");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })();
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| format!("screen: {}", String::from_utf8_lossy(&screen.lock().unwrap())))
}
