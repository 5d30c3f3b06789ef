//! Task supervision on one host: the agent side of `kecho run`.
//!
//! [`Supervisor::spawn`] starts a task's command with its environment (`KECHO_AGENT`, `KECHO_TASK`, `KECHO_STATE`
//! and the submitter's `--env`), in a process group of its own so that a stop reaches its children, within its
//! reservation's limits, and returns a [`Task`]: its output as ordered [`OutputChunk`]s and a [`TaskControl`] to wait
//! for its [`TaskExit`], stop it, and read its checkpoint.
//!
//! **Limits without a race, in safe Rust, and no descendant out of reach.** Limits must hold from the task's first
//! instruction, but safe Rust cannot run code in the child between fork and exec (`pre_exec` is unsafe), and a task
//! can leave its process group (`setsid`) or be orphaned by a double fork. So every task starts under a *reaper*
//! ([`crate::reaper`]), a process of its own that is a child subreaper: the agent moves the reaper into the task's
//! cgroup (under cgroups) and writes it one line with the limits; the reaper starts the command behind a gate
//! (`/bin/sh -c 'read; exec CMD ARGS'`, in a process group of its own), applies `RLIMIT_AS` to it, tells the agent its
//! pid, and opens the gate: the command runs with its limits from its first instruction, as the same pid. Every
//! orphaned descendant is re-parented to the reaper, so a `/proc` walk from it finds the whole task. The reaper's
//! standard input stays open as the task's lifeline: when the agent closes it, or dies, even by SIGKILL, the reaper
//! kills the whole tree, and when the command ends it kills whatever the command left; it then exits as the command
//! did. No task, nor anything it started, outlives its agent or itself.
//!
//! **Which limits apply** is decided once per agent by [`Confinement::detect`]: cgroup v2 where the agent's cgroup is
//! a writable subtree with the `memory` and `cpu` controllers (memory → `memory.max`, CPUs → `cpu.max`; a stop also
//! writes `cgroup.kill`), rlimits otherwise (memory → `RLIMIT_AS`; a CPU share cannot be expressed as an rlimit and is
//! reported as not enforced). Every task reports what applied in its [`LimitReport`].

use std::collections::BTreeSet;
use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{kill_process, kill_process_group, prlimit, Pid, Resource, Rlimit, Signal};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Mutex};

use crate::place::AgentName;
use crate::reaper::{Gate, Reaper};

/// The largest output chunk (bytes): a chunk travels as one kecho event.
pub const MAX_CHUNK: usize = 16 << 10;

/// The largest checkpoint the agent reads back (8 MiB: in base64 it still fits one kecho frame of 16 MiB).
pub const MAX_CHECKPOINT: u64 = 8 << 20;

/// How many output chunks may wait for the agent before the task's pipes fill and the task blocks on write (output
/// is never dropped).
const OUTPUT_QUEUE: usize = 64;

/// The cgroup `cpu.max` period, microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// How long the agent waits for a task's reaper to start and answer.
const REAPER_ANSWER: Duration = Duration::from_secs(10);

/// How long a stop waits for the reaper to kill the task's tree after the lifeline closed, before it kills the
/// reaper and the task's group itself.
const REAPER_KILL: Duration = Duration::from_secs(2);

/// A readiness check starts behind this gate (`/bin/sh -c PROBE_GATE CMD`), so that it is in the task's cgroup or
/// under its `RLIMIT_AS` before its first instruction.
const PROBE_GATE: &str = "IFS= read -r _ || exit 125; exec /bin/sh -c \"$0\" </dev/null";

/// A task's id, unique per submitter (the submitter's node id and a counter, say).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TaskId(pub String);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's id.
    pub id: TaskId,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Extra environment variables (the submitter's `--env`); `KECHO_*` names are reserved.
    pub env: Vec<(String, String)>,
    /// Variables kecho itself hands the task (a deployed component's `KECHO_APP`, `KECHO_COMPONENT`,
    /// `KECHO_DEP_<NAME>`): every name starts with `KECHO_`, and none may be one the agent sets.
    #[serde(default)]
    pub kecho_env: Vec<(String, String)>,
    /// The reservation's limits.
    pub limits: Limits,
    /// The last checkpoint of a restarted task, written to `$KECHO_STATE` before it starts.
    pub state: Option<Vec<u8>>,
}

/// Resource limits of one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// CPUs (fractions allowed).
    pub cpus: Option<f64>,
    /// Memory, bytes.
    pub mem: Option<u64>,
}

/// Which output stream a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A piece of a task's output. Sequence numbers start at 0 and count both streams together, in the order the agent
/// read them, so the submitter can restore the order and see a gap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    /// The position of this chunk among all of the task's chunks.
    pub seq: u64,
    /// The stream.
    pub stream: Stream,
    /// The bytes, at most [`MAX_CHUNK`].
    pub data: Vec<u8>,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskExit {
    /// The status a shell would report: the exit code, or 128 + N for death by signal N.
    pub code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl TaskExit {
    /// Maps a process's exit status the way a shell does.
    pub fn from_status(status: std::process::ExitStatus) -> TaskExit {
        match (status.code(), status.signal()) {
            (Some(code), _) => TaskExit { code, signal: None },
            (None, Some(sig)) => TaskExit { code: 128 + sig, signal: Some(sig) },
            // Neither a code nor a signal: stopped or continued, which `wait` does not report; keep a failure code.
            (None, None) => TaskExit { code: 255, signal: None },
        }
    }

    /// Whether the task succeeded.
    pub fn success(&self) -> bool {
        self.code == 0
    }
}

/// Why supervision failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The spec is unusable (empty command, reserved or malformed environment variable, bad id).
    #[error("invalid task: {0}")]
    Invalid(String),
    /// The command could not be started.
    #[error("cannot start the task: {0}")]
    Spawn(std::io::Error),
    /// A file of the task (its state directory, its checkpoint) could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The checkpoint is larger than the agent reads back.
    #[error("checkpoint of {size} bytes is larger than the limit of {max} bytes")]
    CheckpointTooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// A limit could not be applied; the task was killed before it ran.
    #[error("cannot apply limits: {0}")]
    Limits(String),
    /// The agent asked to run it refused it or could not be reached.
    #[error("remote: {0}")]
    Remote(String),
}

/// How an agent confines its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// A cgroup v2 subtree the agent may write: one child cgroup per task.
    Cgroup(CgroupTree),
    /// Per-process rlimits, with the reason cgroups are not used.
    Rlimits {
        /// Why cgroup v2 is not used on this host.
        reason: String,
    },
}

/// A writable cgroup v2 directory and the controllers its children can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupTree {
    /// The directory task cgroups are created in.
    pub root: PathBuf,
    /// Controllers enabled for its children (`memory`, `cpu`, ...).
    pub controllers: BTreeSet<String>,
}

impl Confinement {
    /// Detects the host's confinement: cgroup v2 under the agent's own cgroup (or `root` when given) if it is
    /// mounted, writable, and has the `memory` or `cpu` controller for its children; rlimits otherwise, saying why.
    pub fn detect(root: Option<&Path>) -> Confinement {
        match detect_cgroup(root) {
            Ok(tree) => Confinement::Cgroup(tree),
            Err(why) => Confinement::Rlimits { reason: why.to_string() },
        }
    }

    /// A one-line description for the agent's log.
    pub fn describe(&self) -> String {
        match self {
            Confinement::Cgroup(t) => format!(
                "cgroup v2 under {} (controllers: {})",
                t.root.display(),
                t.controllers.iter().cloned().collect::<Vec<_>>().join(" ")
            ),
            Confinement::Rlimits { reason } => format!("rlimits ({reason})"),
        }
    }
}

/// Why cgroup v2 cannot confine tasks here (and rlimits are used instead).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CgroupError {
    /// A file that says where cgroups are could not be read.
    #[error("{}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No cgroup v2 hierarchy is mounted.
    #[error("cgroup v2 is not mounted")]
    NotMounted,
    /// This process is in no cgroup v2.
    #[error("this process has no cgroup v2 membership")]
    NoMembership,
    /// The directory is not a cgroup v2 directory.
    #[error("{} is not a cgroup v2 directory: {source}", path.display())]
    NotCgroup {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent cannot create child cgroups there.
    #[error("{} is not writable: {source}", path.display())]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither the memory nor the cpu controller can be given to children there.
    #[error(
        "{} cannot give its children the memory or cpu controller (a cgroup with processes of its own cannot \
         delegate controllers: run the agent in a leaf of a delegated subtree)",
        path.display()
    )]
    NoControllers {
        /// The directory.
        path: PathBuf,
    },
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Unreadable { path: path.to_path_buf(), source })
}

fn detect_cgroup(root: Option<&Path>) -> Result<CgroupTree, CgroupError> {
    let root = match root {
        Some(r) => r.to_path_buf(),
        None => {
            let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
            let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NotMounted)?;
            let own = read(Path::new("/proc/self/cgroup"))?;
            let rel = own_cgroup(&own).ok_or(CgroupError::NoMembership)?;
            mount.join(rel.trim_start_matches('/'))
        }
    };
    CgroupTree::open(&root)
}

impl CgroupTree {
    /// Checks that `root` is a cgroup v2 directory this process can create children in, enables `memory` and `cpu`
    /// for its children where it can, and reports the controllers they get.
    pub fn open(root: &Path) -> Result<CgroupTree, CgroupError> {
        let available = std::fs::read_to_string(root.join("cgroup.controllers"))
            .map_err(|source| CgroupError::NotCgroup { path: root.to_path_buf(), source })?;
        let available: BTreeSet<String> = available.split_whitespace().map(str::to_string).collect();
        let probe = root.join(format!("kecho-probe-{}", std::process::id()));
        std::fs::create_dir(&probe).map_err(|source| CgroupError::NotWritable { path: root.to_path_buf(), source })?;
        let _ = std::fs::remove_dir(&probe);
        let subtree_path = root.join("cgroup.subtree_control");
        let mut enabled: BTreeSet<String> = read(&subtree_path)?.split_whitespace().map(str::to_string).collect();
        for c in ["memory", "cpu"] {
            if available.contains(c) && !enabled.contains(c) && std::fs::write(&subtree_path, format!("+{c}")).is_ok() {
                enabled.insert(c.to_string());
            }
        }
        enabled.retain(|c| c == "memory" || c == "cpu" || c == "pids");
        if !enabled.contains("memory") && !enabled.contains("cpu") {
            return Err(CgroupError::NoControllers { path: root.to_path_buf() });
        }
        Ok(CgroupTree { root: root.to_path_buf(), controllers: enabled })
    }
}

/// The mount point of the cgroup v2 hierarchy in `/proc/self/mountinfo` text.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// This process's cgroup v2 path (the `0::` line) in `/proc/self/cgroup` text.
pub fn own_cgroup(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::")).map(str::to_string)
}

/// What limits a task got.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitReport {
    /// `cgroup` or `rlimit` (or `none` when the task asked for no limits).
    pub mechanism: String,
    /// The task's cgroup directory, under cgroups.
    pub cgroup: Option<PathBuf>,
    /// The limits that were applied, as `memory.max=...`, `RLIMIT_AS=...`.
    pub applied: Vec<String>,
    /// The limits asked for that this host cannot enforce, and why.
    pub not_enforced: Vec<String>,
}

impl fmt::Display for LimitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "limits by {}", self.mechanism)?;
        if !self.applied.is_empty() {
            write!(f, ": {}", self.applied.join(", "))?;
        }
        if !self.not_enforced.is_empty() {
            write!(f, "; not enforced: {}", self.not_enforced.join(", "))?;
        }
        Ok(())
    }
}

/// Where a command about a task runs (its readiness check): a directory, extra environment variables, and the task's
/// bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeEnv {
    /// The working directory (the task's own), or the caller's.
    pub dir: Option<PathBuf>,
    /// Environment variables on top of the caller's (the task's).
    pub env: Vec<(String, String)>,
    /// The task's bounds, once it runs: the command joins them before its first instruction. `None`: unbounded (a
    /// check run by the deployer on its own host).
    pub bounds: Option<ProbeBounds>,
}

/// The bounds a task's readiness check runs within: the task's process group, its cgroup (so that its CPU and memory
/// count against the reservation and a `cgroup.kill` takes it), or the task's `RLIMIT_AS` where rlimits apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeBounds {
    /// The task's process group (its leader's pid): a stop's signals to the group reach the check too.
    pub pgid: i32,
    /// The task's cgroup, under cgroups.
    pub cgroup: Option<PathBuf>,
    /// `RLIMIT_AS` (bytes) where rlimits apply.
    pub rlimit_as: Option<u64>,
}

impl ProbeEnv {
    /// This environment within `task`'s bounds (its group, its cgroup or its rlimits); a task on another node has
    /// none here.
    pub fn within(mut self, task: &TaskControl) -> ProbeEnv {
        self.bounds = task.probe_bounds();
        self
    }

    /// Starts `/bin/sh -c CMD` here, its output discarded, killed when the returned child is dropped. With bounds it
    /// starts behind a gate: it joins the task's process group at once, then the agent moves it into the task's
    /// cgroup or sets its `RLIMIT_AS`, and only then does the command run.
    pub async fn spawn(&self, cmd: &str) -> std::io::Result<tokio::process::Child> {
        let mut command = tokio::process::Command::new("/bin/sh");
        if let Some(dir) = &self.dir {
            command.current_dir(dir);
        }
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let Some(b) = &self.bounds else {
            return command.arg("-c").arg(cmd).stdin(Stdio::null()).spawn();
        };
        command.arg("-c").arg(PROBE_GATE).arg(cmd).stdin(Stdio::piped()).process_group(b.pgid);
        let mut child = command.spawn()?;
        let pid = child.id().and_then(|id| i32::try_from(id).ok()).and_then(Pid::from_raw);
        let applied = match pid {
            None => Err(std::io::Error::other("the readiness check exited before it could be bounded")),
            Some(pid) => (|| -> std::io::Result<()> {
                if let Some(dir) = &b.cgroup {
                    std::fs::write(dir.join("cgroup.procs"), pid.as_raw_nonzero().get().to_string())?;
                }
                if let Some(mem) = b.rlimit_as {
                    prlimit(Some(pid), Resource::As, Rlimit { current: Some(mem), maximum: Some(mem) })?;
                }
                Ok(())
            })(),
        };
        let opened = match (applied, child.stdin.take()) {
            (Ok(()), Some(mut gate)) => gate.write_all(b"\n").await.and(gate.flush().await),
            (Ok(()), None) => Err(std::io::Error::other("no gate pipe")),
            (Err(e), _) => Err(e),
        };
        if let Err(e) = opened {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(e);
        }
        Ok(child)
    }
}

/// Runs tasks on this host.
#[derive(Debug, Clone)]
pub struct Supervisor {
    agent: AgentName,
    state_dir: PathBuf,
    confinement: Confinement,
    reaper: Reaper,
}

/// A running task: its output and its control.
#[derive(Debug)]
pub struct Task {
    /// Output chunks in sequence order; the channel closes when both of the task's pipes have closed.
    pub output: mpsc::Receiver<OutputChunk>,
    /// Wait, stop, checkpoint.
    pub control: TaskControl,
    /// The limits that applied.
    pub limits: LimitReport,
}

/// A handle on a running task; clones share it.
#[derive(Debug, Clone)]
pub struct TaskControl {
    inner: Arc<ControlInner>,
}

/// The write end of a reaper's lifeline: `term` lines, then closed to kill the task's tree.
type Lifeline = Arc<Mutex<Option<tokio::process::ChildStdin>>>;

#[derive(Debug)]
struct ControlInner {
    id: TaskId,
    /// The command's pid (its process group id); `None` for a task on another node.
    pid: Option<Pid>,
    /// The task's reaper, its lifeline, and the `RLIMIT_AS` it applied; `None` for a task on another node.
    reaper: Option<(Pid, Lifeline, Option<u64>)>,
    state_path: PathBuf,
    cgroup: Option<PathBuf>,
    exit: watch::Receiver<Option<TaskExit>>,
    /// For a task on another node: where a stop request (its grace) goes.
    remote_stop: Option<mpsc::UnboundedSender<Duration>>,
}

impl Supervisor {
    /// A supervisor for agent `agent`, keeping task state under `state_dir`, confining tasks as `confinement` says,
    /// starting each under the default [`Reaper`] ([`Reaper::locate`]).
    pub fn new(agent: AgentName, state_dir: impl Into<PathBuf>, confinement: Confinement) -> Supervisor {
        Supervisor { agent, state_dir: state_dir.into(), confinement, reaper: Reaper::locate() }
    }

    /// Starts each task under `reaper`.
    pub fn with_reaper(mut self, reaper: Reaper) -> Supervisor {
        self.reaper = reaper;
        self
    }

    /// How tasks are confined here.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// The path of a task's checkpoint file (`$KECHO_STATE`).
    pub fn state_path(&self, id: &TaskId) -> PathBuf {
        self.state_dir.join(&id.0).join("state")
    }

    /// Where a command about task `spec` runs (its readiness check): the task's directory and environment; add the
    /// task's bounds with [`ProbeEnv::within`] once it runs.
    pub fn probe_env(&self, spec: &TaskSpec) -> ProbeEnv {
        let state_path = self.state_path(&spec.id);
        let mut env: Vec<(String, String)> = spec.env.iter().chain(&spec.kecho_env).cloned().collect();
        env.push(("KECHO_AGENT".into(), self.agent.0.clone()));
        env.push(("KECHO_TASK".into(), spec.id.0.clone()));
        env.push(("KECHO_STATE".into(), state_path.display().to_string()));
        ProbeEnv { dir: state_path.parent().map(Path::to_path_buf), env, bounds: None }
    }

    /// Starts a task under its reaper ([`crate::reaper`]). Must be called within a tokio runtime.
    ///
    /// When the command (the group's leader) ends, whatever it started is killed, even what left its process group:
    /// nothing outlives a task and its reservation (as systemd's default for a service's control group).
    pub async fn spawn(&self, spec: TaskSpec) -> Result<Task, TaskError> {
        validate(&spec)?;
        let state_path = self.state_path(&spec.id);
        let task_dir = state_path.parent().unwrap_or(&self.state_dir).to_path_buf();
        tokio::fs::create_dir_all(&task_dir)
            .await
            .map_err(|source| TaskError::Io { path: task_dir.clone(), source })?;
        match &spec.state {
            Some(state) => tokio::fs::write(&state_path, state).await,
            None => match tokio::fs::remove_file(&state_path).await {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        }
        .map_err(|source| TaskError::Io { path: state_path.clone(), source })?;

        let (program, arg) = self.reaper.command();
        let mut cmd = tokio::process::Command::new(program);
        cmd.arg(arg)
            .arg("--")
            .args(&spec.argv)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .envs(spec.kecho_env.iter().map(|(k, v)| (k, v)))
            .env("KECHO_AGENT", &self.agent.0)
            .env("KECHO_TASK", &spec.id.0)
            .env("KECHO_STATE", &state_path)
            .env_remove(crate::reaper::ENV)
            .current_dir(&task_dir)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            TaskError::Spawn(std::io::Error::new(e.kind(), format!("the task reaper {}: {e}", program.display())))
        })?;
        let raw = child.id().and_then(|id| i32::try_from(id).ok()).and_then(Pid::from_raw);
        let Some(reaper) = raw else {
            return Err(TaskError::Spawn(std::io::Error::other("the task reaper exited at once")));
        };
        let mut lifeline = child.stdin.take();
        let mut stdout = child.stdout.take();
        let started = async {
            let (limits, gate) = self.confine(&spec, reaper)?;
            let mut line = serde_json::to_string(&gate).map_err(|e| TaskError::Spawn(std::io::Error::other(e)))?;
            line.push('\n');
            if let Some(pipe) = lifeline.as_mut() {
                // A reaper that failed already has said why on its output: read that rather than the write error.
                let _ = pipe.write_all(line.as_bytes()).await;
                let _ = pipe.flush().await;
            }
            let answer = match stdout.as_mut() {
                Some(out) => tokio::time::timeout(REAPER_ANSWER, read_answer(out)).await,
                None => Ok(String::new()),
            };
            let leader = match answer.as_deref().map(|a| a.strip_prefix(crate::reaper::HELLO).map(str::trim)) {
                Ok(Some(a)) => match a.split_once(' ').unwrap_or((a, "")) {
                    ("ok", pid) => pid.parse().ok().and_then(Pid::from_raw).ok_or_else(|| {
                        TaskError::Spawn(std::io::Error::other(format!("the task reaper said {a:?}")))
                    })?,
                    ("limits", why) => return Err(TaskError::Limits(why.to_owned())),
                    (_, why) => return Err(TaskError::Spawn(std::io::Error::other(why.to_owned()))),
                },
                Ok(None) => {
                    return Err(TaskError::Spawn(std::io::Error::other(format!(
                        "{} is not a kecho task reaper (it answered {:?}; it must call kecho_exec::reaper::\
                         serve_if_invoked first in main, or set {})",
                        program.display(),
                        answer.as_deref().unwrap_or(""),
                        crate::reaper::ENV
                    ))))
                }
                Err(_) => {
                    return Err(TaskError::Spawn(std::io::Error::other(format!(
                        "the task reaper {} did not answer within {REAPER_ANSWER:?}",
                        program.display()
                    ))))
                }
            };
            Ok::<_, TaskError>((limits, gate, leader))
        };
        let (limits, gate, pid) = match started.await {
            Ok(v) => v,
            Err(e) => {
                // Nothing of the task has run: the reaper opens the gate only after its answer.
                let _ = kill_process(reaper, Signal::KILL);
                let _ = child.wait().await;
                return Err(e);
            }
        };

        let (tx, output) = mpsc::channel(OUTPUT_QUEUE);
        let order = Arc::new(Mutex::new((0u64, tx)));
        if let Some(out) = stdout {
            tokio::spawn(pump(out, Stream::Stdout, order.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(pump(err, Stream::Stderr, order));
        }
        let (exit_tx, exit) = watch::channel(None);
        let cgroup = limits.cgroup.clone();
        let id = spec.id.clone();
        let cleanup = cgroup.clone();
        let lifeline: Lifeline = Arc::new(Mutex::new(lifeline));
        let held = lifeline.clone();
        tokio::spawn(async move {
            // The reaper exits as the command did, once it has killed and reaped everything the command left.
            let exit = match child.wait().await {
                Ok(status) => TaskExit::from_status(status),
                Err(e) => {
                    tracing::warn!(task = %id, %e, "waiting for a task failed");
                    TaskExit { code: 255, signal: None }
                }
            };
            // Whatever else is in the task's cgroup (a readiness check's children) goes too.
            if let Some(dir) = &cleanup {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
            }
            drop(held.lock().await.take());
            let _ = exit_tx.send(Some(exit));
            if let Some(dir) = cleanup {
                // Succeeds once the killed processes are gone; a leftover empty directory is harmless.
                for _ in 0..50 {
                    if tokio::fs::remove_dir(&dir).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        tracing::info!(task = %spec.id, pid = pid.as_raw_nonzero().get(), %limits, "task started");
        let inner = ControlInner {
            id: spec.id,
            pid: Some(pid),
            reaper: Some((reaper, lifeline, gate.rlimit_as)),
            state_path,
            cgroup,
            exit,
            remote_stop: None,
        };
        Ok(Task { output, control: TaskControl { inner: Arc::new(inner) }, limits })
    }

    /// Applies the spec's limits to the waiting reaper `pid` (under cgroups: moves it into the task's cgroup), and
    /// says what the reaper applies to the command (`RLIMIT_AS`).
    fn confine(&self, spec: &TaskSpec, pid: Pid) -> Result<(LimitReport, Gate), TaskError> {
        let Limits { cpus, mem } = spec.limits;
        let mut report =
            LimitReport { mechanism: String::new(), cgroup: None, applied: Vec::new(), not_enforced: Vec::new() };
        let mut gate = Gate::default();
        if cpus.is_none() && mem.is_none() {
            report.mechanism = "none".into();
            return Ok((report, Gate::default()));
        }
        match &self.confinement {
            Confinement::Cgroup(tree) => {
                report.mechanism = "cgroup".into();
                let dir = tree.root.join(format!("kecho-task-{}", sanitize(&spec.id.0)));
                let fail =
                    |what: &str, e: std::io::Error| TaskError::Limits(format!("{what} in {}: {e}", dir.display()));
                match std::fs::create_dir(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(fail("create", e)),
                    _ => {}
                }
                if let Some(mem) = mem {
                    if tree.controllers.contains("memory") {
                        std::fs::write(dir.join("memory.max"), mem.to_string()).map_err(|e| fail("memory.max", e))?;
                        report.applied.push(format!("memory.max={mem}"));
                    } else {
                        report.not_enforced.push(format!("mem={mem} (no memory controller)"));
                    }
                }
                if let Some(cpus) = cpus {
                    if tree.controllers.contains("cpu") {
                        let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
                        let line = format!("{quota} {CPU_PERIOD_US}");
                        std::fs::write(dir.join("cpu.max"), &line).map_err(|e| fail("cpu.max", e))?;
                        report.applied.push(format!("cpu.max={line}"));
                    } else {
                        report.not_enforced.push(format!("cpus={cpus} (no cpu controller)"));
                    }
                }
                std::fs::write(dir.join("cgroup.procs"), pid.as_raw_nonzero().get().to_string())
                    .map_err(|e| fail("cgroup.procs", e))?;
                report.cgroup = Some(dir);
            }
            Confinement::Rlimits { reason } => {
                report.mechanism = "rlimit".into();
                if let Some(mem) = mem {
                    // The reaper applies it to the command (and fails the start if it cannot).
                    gate.rlimit_as = Some(mem);
                    report.applied.push(format!("RLIMIT_AS={mem}"));
                }
                if let Some(cpus) = cpus {
                    report.not_enforced.push(format!("cpus={cpus} (a CPU share needs cgroups: {reason})"));
                }
            }
        }
        gate.cgroup = report.cgroup.clone();
        Ok((report, gate))
    }
}

fn validate(spec: &TaskSpec) -> Result<(), TaskError> {
    if spec.argv.first().is_none_or(|p| p.is_empty()) {
        return Err(TaskError::Invalid("no command".into()));
    }
    if spec.argv.iter().any(|a| a.contains('\0')) {
        return Err(TaskError::Invalid("an argument contains a NUL byte".into()));
    }
    let id = &spec.id.0;
    if id.is_empty()
        || id.len() > 128
        || id.starts_with('.')
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(TaskError::Invalid(format!("`{id}` is not a task id (letters, digits, `-_.:`, at most 128)")));
    }
    for (k, v) in spec.env.iter().chain(&spec.kecho_env) {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(TaskError::Invalid(format!("`{k}` is not an environment variable name")));
        }
    }
    if let Some((k, _)) = spec.env.iter().find(|(k, _)| k.starts_with("KECHO_")) {
        return Err(TaskError::Invalid(format!("`{k}` is reserved: KECHO_* variables are set by kecho")));
    }
    let agent_set = ["KECHO_AGENT", "KECHO_TASK", "KECHO_STATE"];
    if let Some((k, _)) =
        spec.kecho_env.iter().find(|(k, _)| !k.starts_with("KECHO_") || agent_set.contains(&k.as_str()))
    {
        return Err(TaskError::Invalid(format!("`{k}` cannot be handed in as a kecho variable")));
    }
    Ok(())
}

fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Reads the reaper's one-line answer (at most 4 KiB) from the task's output pipe, byte by byte so that nothing of
/// the task's own output is taken with it.
async fn read_answer(out: &mut tokio::process::ChildStdout) -> String {
    let mut line = Vec::new();
    while line.len() < 4096 {
        match out.read_u8().await {
            Ok(b'\n') | Err(_) => break,
            Ok(b) => line.push(b),
        }
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Reads one pipe into chunks; the sequence number is taken and the chunk queued under one lock, so sequence order is
/// queue order across both streams.
async fn pump(mut pipe: impl AsyncRead + Unpin, stream: Stream, order: Arc<Mutex<(u64, mpsc::Sender<OutputChunk>)>>) {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut guard = order.lock().await;
        let seq = guard.0;
        guard.0 += 1;
        if guard.1.send(OutputChunk { seq, stream, data: buf[..n].to_vec() }).await.is_err() {
            // Nobody reads the output any more; keep draining the pipe so the task does not block on it.
            guard.0 -= 1;
        }
    }
}

impl TaskControl {
    /// A handle on a task that runs on another node: its end arrives on `exit`, and a stop is a request sent on
    /// `stop` (the grace period) to whoever talks to that node.
    pub fn remote(
        id: TaskId,
        exit: watch::Receiver<Option<TaskExit>>,
        stop: mpsc::UnboundedSender<Duration>,
    ) -> TaskControl {
        TaskControl {
            inner: Arc::new(ControlInner {
                id,
                pid: None,
                reaper: None,
                state_path: PathBuf::new(),
                cgroup: None,
                exit,
                remote_stop: Some(stop),
            }),
        }
    }

    /// The task's id.
    pub fn id(&self) -> &TaskId {
        &self.inner.id
    }

    /// The task's pid (also its process group id); 0 for a task on another node.
    pub fn pid(&self) -> i32 {
        self.inner.pid.map_or(0, |p| p.as_raw_nonzero().get())
    }

    /// The pid of the task's reaper (the parent of the command and of every orphan of the task); 0 for a task on
    /// another node.
    pub fn reaper_pid(&self) -> i32 {
        self.inner.reaper.as_ref().map_or(0, |(p, _, _)| p.as_raw_nonzero().get())
    }

    /// The task's cgroup directory, if it has one.
    pub fn cgroup(&self) -> Option<&Path> {
        self.inner.cgroup.as_deref()
    }

    /// The bounds a readiness check of this task runs within (see [`ProbeEnv::within`]); `None` for a task on
    /// another node.
    pub fn probe_bounds(&self) -> Option<ProbeBounds> {
        let pid = self.inner.pid?;
        let (_, _, rlimit_as) = self.inner.reaper.as_ref()?;
        Some(ProbeBounds { pgid: pid.as_raw_nonzero().get(), cgroup: self.inner.cgroup.clone(), rlimit_as: *rlimit_as })
    }

    /// How the task ended, if it has.
    pub fn exit_now(&self) -> Option<TaskExit> {
        *self.inner.exit.borrow()
    }

    /// Waits for the task to end.
    pub async fn wait(&self) -> TaskExit {
        let mut rx = self.inner.exit.clone();
        let seen = rx.wait_for(Option::is_some).await.map(|v| *v);
        match seen {
            Ok(v) => v.unwrap_or(TaskExit { code: 255, signal: None }),
            // The waiter is gone without a word (its runtime shut down); report a failure.
            Err(_) => rx.borrow().unwrap_or(TaskExit { code: 255, signal: None }),
        }
    }

    /// Stops the task and everything it started: SIGTERM to its process group and, through its reaper, to its
    /// descendants that left the group; then, if the task has not ended within `grace`, the reaper's lifeline is
    /// closed and the reaper kills the whole tree with SIGKILL (should the reaper not be done within 2 s, the agent
    /// kills it and the group itself, and writes `cgroup.kill` under cgroups). When the task's leader ends, whatever
    /// is left of the task is killed (see [`Supervisor::spawn`]), so a child that ignores SIGTERM does not outlive the
    /// stop. A task that has already ended is not signalled: its group id may belong to someone else by now. Returns
    /// how the task ended.
    pub async fn stop(&self, grace: Duration) -> TaskExit {
        if self.exit_now().is_some() {
            return self.wait().await;
        }
        let (Some(pid), Some((reaper, lifeline, _))) = (self.inner.pid, &self.inner.reaper) else {
            if let Some(tx) = &self.inner.remote_stop {
                let _ = tx.send(grace);
            }
            return self.wait().await;
        };
        let _ = kill_process_group(pid, Signal::TERM);
        if let Some(pipe) = lifeline.lock().await.as_mut() {
            let line = format!("{}\n", crate::reaper::TERM_LINE);
            let _ = pipe.write_all(line.as_bytes()).await;
            let _ = pipe.flush().await;
        }
        if tokio::time::timeout(grace, self.wait()).await.is_err() {
            drop(lifeline.lock().await.take());
            if tokio::time::timeout(REAPER_KILL, self.wait()).await.is_err() {
                tracing::warn!(task = %self.inner.id, "the task's reaper did not end it: killing its group");
                let _ = kill_process(*reaper, Signal::KILL);
                let _ = kill_process_group(pid, Signal::KILL);
                if let Some(dir) = &self.inner.cgroup {
                    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                }
            }
        }
        self.wait().await
    }

    /// Reads the task's checkpoint (`$KECHO_STATE`): `None` if it has not written one.
    pub async fn checkpoint(&self) -> Result<Option<Vec<u8>>, TaskError> {
        if self.inner.pid.is_none() {
            // A remote task's checkpoints travel as messages, not through this handle.
            return Ok(None);
        }
        read_checkpoint(&self.inner.state_path).await
    }
}

/// Reads a checkpoint file, refusing one larger than [`MAX_CHECKPOINT`].
pub async fn read_checkpoint(path: &Path) -> Result<Option<Vec<u8>>, TaskError> {
    let io = |source| TaskError::Io { path: path.to_path_buf(), source };
    let meta = match tokio::fs::metadata(path).await {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    if meta.len() > MAX_CHECKPOINT {
        return Err(TaskError::CheckpointTooLarge { size: meta.len(), max: MAX_CHECKPOINT });
    }
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut data = Vec::with_capacity(meta.len() as usize);
    // The task may grow the file while it is read: never read more than the limit.
    file.take(MAX_CHECKPOINT + 1).read_to_end(&mut data).await.map_err(io)?;
    if data.len() as u64 > MAX_CHECKPOINT {
        return Err(TaskError::CheckpointTooLarge { size: data.len() as u64, max: MAX_CHECKPOINT });
    }
    Ok(Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_own_cgroup() {
        let mountinfo = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                         30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup")));
        let v1 = "30 22 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(v1), None);
        assert_eq!(own_cgroup("1:cpu:/\n0::/user.slice/agent.service\n").as_deref(), Some("/user.slice/agent.service"));
        assert_eq!(own_cgroup("4:memory:/x\n"), None);
    }

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        use std::process::ExitStatus;
        assert_eq!(TaskExit::from_status(ExitStatus::from_raw(3 << 8)), TaskExit { code: 3, signal: None });
        assert_eq!(TaskExit::from_status(ExitStatus::from_raw(9)), TaskExit { code: 137, signal: Some(9) });
        assert_eq!(TaskExit::from_status(ExitStatus::from_raw(15)), TaskExit { code: 143, signal: Some(15) });
    }

    #[test]
    fn cgroup_tree_refuses_a_plain_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = CgroupTree::open(dir.path()).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup { .. }), "{err:?}");
        assert!(err.to_string().contains("not a cgroup v2 directory"), "{err}");
    }
}
