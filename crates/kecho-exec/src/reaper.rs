//! The per-task reaper: a small process between the agent and each task that keeps every descendant of the task
//! within reach, even one that left the task's process group (`setsid`) or was orphaned by a double fork.
//!
//! A process group is not a container: a task can leave it (`setsid CMD &`, `(CMD &)` then `setsid`), and its orphans
//! are adopted by init, out of sight of the agent. cgroups contain them, but they are not available everywhere. So
//! the agent starts every task under a reaper, this module's [`serve_if_invoked`] run in a process of its own:
//!
//! 1. The reaper marks itself a *child subreaper* (`PR_SET_CHILD_SUBREAPER`): every orphaned descendant of the task
//!    is re-parented to it instead of init, so the task's whole tree stays below it, whatever the task does with
//!    sessions and process groups.
//! 2. It reads one line from its standard input (the agent's [`Gate`]: the limits to apply), starts the task's
//!    command behind a gate (`/bin/sh -c 'read; exec CMD ARGS'`, in a process group of its own whose id is the
//!    command's pid), applies `RLIMIT_AS` to that pid, says `kecho-reaper ok PID` on its standard output (the task's
//!    output pipe, read by the agent before anything else), then opens the gate: the command runs with its limits from
//!    its first instruction. Under cgroups the agent has moved the reaper into the task's cgroup before writing the
//!    line, so the command is born there.
//! 3. Its standard input stays open as the *lifeline*. A line `term` forwards SIGTERM to the descendants that left the
//!    task's process group (the agent signals the group itself). End of file — the agent closed it after a stop's
//!    grace, or the agent died, even by SIGKILL, and the kernel closed it — kills the whole tree.
//! 4. When the command (the task's leader) ends, it kills its process group and every remaining descendant (found by
//!    a walk of `/proc` from the reaper's pid), reaps them all, and exits as the command did (the same code, or death
//!    by the same signal), so the agent sees the task's own status.
//!
//! The reaper is a program that calls [`serve_if_invoked`] first thing in `main` (the `kecho` binary does; so does
//! this crate's `kecho-task-reaper`), chosen by [`Reaper`].

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rustix::process::{
    getpid, getrlimit, kill_process, kill_process_group, prlimit, set_child_subreaper, setrlimit, wait, Pid, Resource,
    Rlimit, Signal, WaitOptions, WaitStatus,
};
use serde::{Deserialize, Serialize};

/// The argument that makes a program calling [`serve_if_invoked`] act as a task reaper.
pub const ARG: &str = "__kecho-task-reaper";
/// An environment variable naming the reaper program (overrides the search of [`Reaper::locate`]).
pub const ENV: &str = "KECHO_TASK_REAPER";
/// The stand-alone reaper binary of this crate.
pub const BIN: &str = "kecho-task-reaper";
/// The first word of every line the reaper says to the agent.
pub const HELLO: &str = "kecho-reaper";
/// The lifeline line that forwards SIGTERM to the descendants outside the task's process group.
pub const TERM_LINE: &str = "term";

/// The task's leader starts behind this gate (run as `/bin/sh -c LEADER_GATE CMD ARGS...`): it waits for the reaper
/// to have applied the limits, then becomes the command (same pid), with `/dev/null` as standard input. A command that
/// does not exist exits 127, as in a shell.
const LEADER_GATE: &str = "IFS= read -r _ || exit 125; exec \"$0\" \"$@\" </dev/null";

static SERVES: AtomicBool = AtomicBool::new(false);

/// What the agent tells the reaper before the command starts (one JSON line on the lifeline).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    /// `RLIMIT_AS` for the command (soft and hard), bytes.
    pub rlimit_as: Option<u64>,
    /// The task's cgroup (the reaper is in it): killed whole when the lifeline closes.
    pub cgroup: Option<PathBuf>,
}

/// Which program runs as the reaper: a program that calls [`serve_if_invoked`], given [`ARG`] first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaper {
    program: PathBuf,
}

impl Reaper {
    /// The program at `path` (the `kecho` binary, or this crate's `kecho-task-reaper`).
    pub fn program(path: impl Into<PathBuf>) -> Reaper {
        Reaper { program: path.into() }
    }

    /// This very program (`/proc/self/exe`, which still works when the file was replaced since it started): only for
    /// a program that calls [`serve_if_invoked`] at the start of `main`.
    pub fn this_program() -> Reaper {
        Reaper::program("/proc/self/exe")
    }

    /// The default: this program if it called [`serve_if_invoked`]; else the program named by `$KECHO_TASK_REAPER`;
    /// else `kecho-task-reaper` beside this program or one directory up (where cargo puts it for tests and
    /// examples); else `kecho-task-reaper` on the `PATH`.
    pub fn locate() -> Reaper {
        if SERVES.load(Ordering::Relaxed) {
            return Reaper::this_program();
        }
        if let Some(p) = std::env::var_os(ENV).filter(|p| !p.is_empty()) {
            return Reaper::program(p);
        }
        if let Ok(exe) = std::env::current_exe() {
            let mut dir = exe.parent();
            for _ in 0..2 {
                let Some(d) = dir else { break };
                let candidate = d.join(BIN);
                if candidate.is_file() {
                    return Reaper::program(candidate);
                }
                dir = d.parent();
            }
        }
        Reaper::program(BIN)
    }

    /// The program to start and its first argument ([`ARG`]).
    pub fn command(&self) -> (&Path, &'static str) {
        (&self.program, ARG)
    }
}

impl Default for Reaper {
    fn default() -> Reaper {
        Reaper::locate()
    }
}

/// Call first thing in `main`: when the program was started as a task reaper (`PROGRAM __kecho-task-reaper -- CMD
/// ARGS...`) this serves the task and exits as the task did; otherwise it returns at once, and [`Reaper::locate`]
/// will pick this program.
pub fn serve_if_invoked() {
    let mut args = std::env::args_os();
    let _ = args.next();
    if args.next().as_deref() == Some(OsStr::new(ARG)) {
        let code = serve(args.collect());
        std::process::exit(code);
    }
    SERVES.store(true, Ordering::Relaxed);
}

fn say(what: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{HELLO} {}", what.replace('\n', " "));
    let _ = out.flush();
}

/// Serves one task: `args` is `-- CMD ARGS...`. Returns the exit code (after a signal death of the command it
/// re-raises the signal and returns only if that did not end it).
fn serve(args: Vec<OsString>) -> i32 {
    let cmd = match args.split_first() {
        Some((dd, rest)) if dd == "--" && !rest.is_empty() => rest.to_vec(),
        _ => {
            say("error usage: PROGRAM __kecho-task-reaper -- CMD ARGS...");
            return 125;
        }
    };
    if let Err(e) = set_child_subreaper(Some(getpid())) {
        say(&format!("error PR_SET_CHILD_SUBREAPER: {e}"));
        return 125;
    }
    let mut line = String::new();
    match std::io::stdin().read_line(&mut line) {
        Ok(0) | Err(_) => return 125, // The agent gave up before the gate opened.
        Ok(_) => {}
    }
    let gate: Gate = match serde_json::from_str(line.trim_end()) {
        Ok(g) => g,
        Err(e) => {
            say(&format!("error unreadable gate line: {e}"));
            return 125;
        }
    };
    let mut child = match std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(LEADER_GATE)
        .args(&cmd)
        .stdin(Stdio::piped())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!("error cannot start /bin/sh: {e}"));
            return 125;
        }
    };
    let Some(leader) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) else {
        say("error the command has no pid");
        return 125;
    };
    if let Some(mem) = gate.rlimit_as {
        if let Err(e) = prlimit(Some(leader), Resource::As, Rlimit { current: Some(mem), maximum: Some(mem) }) {
            let _ = child.kill();
            let _ = child.wait();
            say(&format!("limits RLIMIT_AS={mem}: {e}"));
            return 125;
        }
    }
    say(&format!("ok {}", leader.as_raw_nonzero()));
    if let Some(mut gate_pipe) = child.stdin.take() {
        // The command may already be gone (killed): its exit is reaped below either way.
        let _ = gate_pipe.write_all(b"\n");
    }
    // Reaped below with waitpid, together with every adopted orphan.
    drop(child);
    let status = supervise(leader, gate.cgroup.as_deref());
    mirror(status)
}

enum Ev {
    Reaped(Pid, WaitStatus),
    NoChildren,
    Term,
    Closed,
}

/// Waits for the leader, forwards SIGTERM, kills everything when the leader ends or the lifeline closes, and returns
/// the leader's status once no descendant is left.
fn supervise(leader: Pid, cgroup: Option<&Path>) -> Option<WaitStatus> {
    let (tx, rx) = mpsc::channel();
    let lifeline = tx.clone();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) if l == TERM_LINE => {
                    let _ = lifeline.send(Ev::Term);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        let _ = lifeline.send(Ev::Closed);
    });
    std::thread::spawn(move || loop {
        match wait(WaitOptions::empty()) {
            Ok(Some((pid, status))) => {
                if tx.send(Ev::Reaped(pid, status)).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) if e == rustix::io::Errno::INTR => {}
            // ECHILD: no child is left, and a subreaper without children has no descendants.
            Err(_) => {
                let _ = tx.send(Ev::NoChildren);
                return;
            }
        }
    });
    let mut status = None;
    let mut closed = false;
    while let Ok(ev) = rx.recv() {
        match ev {
            Ev::Reaped(pid, st) if pid == leader => {
                status = Some(st);
                // At once, while the group id cannot have been reused: whatever is left in the leader's group
                // (readiness checks included), then every other descendant.
                let _ = kill_process_group(leader, Signal::KILL);
                kill_tree();
            }
            Ev::Reaped(..) => {}
            Ev::Term => {
                for pid in descendants(getpid()).into_iter().filter(|d| d.pgrp != leader.as_raw_nonzero().get()) {
                    if let Some(p) = Pid::from_raw(pid.pid) {
                        let _ = kill_process(p, Signal::TERM);
                    }
                }
            }
            Ev::Closed if !closed => {
                closed = true;
                if status.is_none() {
                    let _ = kill_process_group(leader, Signal::KILL);
                }
                kill_tree();
            }
            Ev::Closed => {}
            Ev::NoChildren => break,
        }
    }
    if closed {
        if let Some(dir) = cgroup {
            // Last: whatever else is in the task's cgroup (a readiness check's children), this reaper included.
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
    }
    status
}

/// SIGKILL to every live descendant until none is left (a process forked during one pass is found by the next).
fn kill_tree() {
    let me = getpid();
    for _ in 0..1000 {
        let live = descendants(me);
        if live.is_empty() {
            return;
        }
        for d in live {
            if let Some(p) = Pid::from_raw(d.pid) {
                let _ = kill_process(p, Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Exits as the leader did: its code, or death by its signal (without a core dump of the reaper).
fn mirror(status: Option<WaitStatus>) -> i32 {
    let Some(st) = status else { return 255 };
    if let Some(code) = st.exit_status() {
        return code;
    }
    if let Some(sig) = st.terminating_signal() {
        let core = getrlimit(Resource::Core);
        let _ = setrlimit(Resource::Core, Rlimit { current: Some(0), maximum: core.maximum });
        let _ = signal_hook::low_level::emulate_default_handler(sig);
        return 128 + sig;
    }
    255
}

/// One process as `/proc/PID/stat` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Its pid.
    pub pid: i32,
    /// Its parent's pid.
    pub ppid: i32,
    /// Its process group.
    pub pgrp: i32,
    /// Whether it has ended and waits to be reaped.
    pub zombie: bool,
}

/// Parses `/proc/PID/stat` text (`pid (comm) state ppid pgrp ...`; the command name may hold spaces and parens).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(") ")?;
    let pid = head.split_once(" (")?.0.trim().parse().ok()?;
    let mut f = rest.split_whitespace();
    let state = f.next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(ProcStat { pid, ppid, pgrp, zombie: state == "Z" || state == "X" })
}

/// Every process on the host, as far as `/proc` can be read.
pub fn processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|t| parse_stat(&t))
        .collect()
}

/// The live (not zombie) descendants of `root`.
pub fn descendants(root: Pid) -> Vec<ProcStat> {
    descendants_in(&processes(), root.as_raw_nonzero().get())
}

/// The live descendants of `root` among `procs`.
pub fn descendants_in(procs: &[ProcStat], root: i32) -> Vec<ProcStat> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for p in procs.iter().filter(|p| p.ppid == parent && p.pid != root) {
            if out.iter().any(|o: &ProcStat| o.pid == p.pid) {
                continue;
            }
            frontier.push(p.pid);
            if !p.zombie {
                out.push(*p);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        let s = parse_stat("4242 (my (odd) cmd) S 17 4242 17 0 -1 4194560 ...").unwrap();
        assert_eq!(s, ProcStat { pid: 4242, ppid: 17, pgrp: 4242, zombie: false });
        assert!(parse_stat("7 (x) Z 1 7 7").unwrap().zombie);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn descendants_follow_the_tree_and_skip_zombies() {
        let p = |pid, ppid, zombie| ProcStat { pid, ppid, pgrp: pid, zombie };
        let procs = [p(10, 1, false), p(11, 10, false), p(12, 11, true), p(13, 11, false), p(20, 1, false)];
        let mut d: Vec<i32> = descendants_in(&procs, 10).iter().map(|s| s.pid).collect();
        d.sort();
        assert_eq!(d, vec![11, 13]);
        assert!(descendants_in(&procs, 20).is_empty());
    }
}
