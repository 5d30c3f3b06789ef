//! Helpers for the tests of the operating commands (metrics, top, ui, balance): child processes killed on drop,
//! free ports, a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const KECHO: &str = env!("CARGO_BIN_EXE_kecho");

/// A child process killed when dropped, so a failing test leaves nothing behind.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(name: &str, args: &[&str]) -> Result<Proc> {
        let child = Command::new(KECHO)
            .args(args)
            .env_remove("KECHO_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {name}"))?;
        Ok(Proc { child, name: name.to_owned() })
    }

    /// Waits for a line on standard error containing `needle` and returns it; the rest of stderr keeps draining in
    /// the background.
    pub fn wait_stderr(&mut self, needle: &str) -> Result<String> {
        let err = self.child.stderr.take().context("stderr taken")?;
        let (tx, rx) = mpsc::channel();
        let want = needle.to_owned();
        std::thread::spawn(move || {
            let mut seen = false;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if !seen && line.contains(&want) {
                    seen = true;
                    let _ = tx.send(Ok(line));
                } else if !seen {
                    let _ = tx.send(Err(line));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Ok(line)) => return Ok(line),
                Ok(Err(line)) => lines.push(line),
                Err(_) => bail!("{} never printed {needle:?}; stderr: {lines:?}", self.name),
            }
        }
    }
}

pub fn free_port() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

pub fn registry(addr: &str, extra: &[&str]) -> Result<Proc> {
    let mut args = vec!["registry", "--listen", addr];
    args.extend_from_slice(extra);
    let mut r = Proc::spawn("registry", &args)?;
    r.wait_stderr("listening")?;
    Ok(r)
}

/// GET `path` from `addr`: the status code and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header")?;
    let code = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok((code, body.to_owned()))
}

/// Polls `f` until it returns Some, at most `within`.
pub fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `method path` with a JSON body to `addr`: the status code and the body as JSON (null if empty).
pub fn http_json(addr: &str, method: &str, path: &str, body: &serde_json::Value) -> Result<(u16, serde_json::Value)> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.to_string();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // Read until the body is complete: some servers (chromedriver) keep the connection open despite
    // `Connection: close`.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, body) = loop {
        let n = s.read(&mut chunk)?;
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let len = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            let chunked = lower.contains("transfer-encoding: chunked");
            let complete = match len {
                Some(len) => rest.len() >= len,
                None if chunked => rest.ends_with("0\r\n\r\n"),
                None => n == 0,
            };
            if complete {
                let body = if chunked { dechunk(rest)? } else { rest.to_owned() };
                break (head.to_owned(), body);
            }
        }
        if n == 0 {
            bail!("connection closed before the response was complete");
        }
    };
    let code = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let json = if body.trim().is_empty() { serde_json::Value::Null } else { serde_json::from_str(&body)? };
    Ok((code, json))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("bad chunk")?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).context("short chunk")?);
        s = rest.get(n + 2..).context("short chunk")?;
    }
}
