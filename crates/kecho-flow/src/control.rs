//! The local control socket: every running flow that wants to be seen by `kecho flow ls` / `kecho flow stats`
//! listens on a Unix socket `<dir>/<pid>-<id>.sock`. A client connects, sends one line (`stats`, `stop`,
//! `priority N`, `rate BYTES|none`) and reads one line back (the flow's stats as JSON, or `ok` / `error: ...`).
//!
//! Why a socket directory rather than a kecho channel: it needs no registry or node, works for a flow started by any
//! user's process on the host with file permissions as access control, and a crashed process leaves only a socket
//! that refuses connections (it is removed by the next listing).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::stats::FlowStats;
use crate::FlowWatcher;

/// The default directory: `$KECHO_FLOW_DIR`, else `$XDG_RUNTIME_DIR/kecho-flows`, else `<tmp>/kecho-flows-<uid>`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KECHO_FLOW_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(d).join("kecho-flows");
    }
    std::env::temp_dir().join(format!("kecho-flows-{}", rustix::process::getuid().as_raw()))
}

/// Serves a flow's control socket until dropped.
#[derive(Debug)]
pub struct Control {
    path: PathBuf,
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Control {
    /// Starts serving `flow` in `dir` (created, mode 0700).
    pub fn serve(dir: &Path, flow: FlowWatcher) -> io::Result<Control> {
        std::fs::create_dir_all(dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let path = dir.join(format!("{}-{}.sock", std::process::id(), flow.id()));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)?;
        l.set_nonblocking(true)?;
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let thread = std::thread::Builder::new().name("kecho-flow-control".into()).spawn(move || {
            while !d.load(Ordering::Acquire) {
                match l.accept() {
                    Ok((s, _)) => {
                        let _ = answer(s, &flow);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        Ok(Control { path, done, thread: Some(thread) })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(s: UnixStream, flow: &FlowWatcher) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    // At most 256 bytes: requests are short.
    BufReader::new(std::io::Read::take(&s, 256)).read_line(&mut line)?;
    let mut w = &s;
    let mut words = line.split_whitespace();
    let reply = match (words.next(), words.next()) {
        (Some("stats"), None) => serde_json::to_string(&flow.stats()).map_err(io::Error::other)?,
        (Some("stop"), None) => {
            flow.stop();
            "ok".into()
        }
        (Some("priority"), Some(p)) => match p.parse::<u32>() {
            Ok(p) if p > 0 => {
                flow.set_priority(p);
                "ok".into()
            }
            _ => "error: priority is a number >= 1".into(),
        },
        (Some("rate"), Some("none")) => {
            flow.set_rate(None);
            "ok".into()
        }
        (Some("rate"), Some(r)) => match crate::spec::parse_size(r) {
            Some(r) if r > 0 => {
                flow.set_rate(Some(r as u64));
                "ok".into()
            }
            _ => "error: rate is bytes/s like 10M, or none".into(),
        },
        _ => format!("error: unknown request `{}`", line.trim()),
    };
    writeln!(w, "{reply}")
}

/// Sends one request to a control socket and returns the reply line.
pub fn request(sock: &Path, req: &str) -> io::Result<String> {
    let s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut w = &s;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

/// The flows registered in `dir`: socket path and stats. Sockets nobody answers on are removed.
pub fn list(dir: &Path) -> Vec<(PathBuf, FlowStats)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    let mut paths: Vec<PathBuf> =
        rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "sock")).collect();
    paths.sort();
    for p in paths {
        match request(&p, "stats") {
            Ok(line) => {
                if let Ok(s) = serde_json::from_str::<FlowStats>(&line) {
                    out.push((p, s));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(&p);
            }
            Err(_) => {}
        }
    }
    out
}
