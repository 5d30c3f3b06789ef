//! Task supervision with real short processes (`sh -c ...`), every wait bounded.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_exec::app::ReadyCheck;
use kecho_exec::deploy::wait_ready;
use kecho_exec::place::AgentName;
use kecho_exec::reaper::Reaper;
use kecho_exec::task::{
    cgroup2_mount, CgroupTree, Confinement, Limits, OutputChunk, Stream, Supervisor, Task, TaskError, TaskExit, TaskId,
    TaskSpec,
};

const BOUND: Duration = Duration::from_secs(20);

fn supervisor(dir: &Path, confinement: Confinement) -> Supervisor {
    Supervisor::new(AgentName("agent-7".into()), dir.join("state"), confinement)
}

fn rlimits() -> Confinement {
    Confinement::Rlimits { reason: "test".into() }
}

fn spec(id: &str, script: &str) -> TaskSpec {
    TaskSpec {
        id: TaskId(id.into()),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        kecho_env: vec![],
        limits: Limits::default(),
        state: None,
    }
}

/// Collects all output (until both pipes close) and the exit, within the bound.
async fn check(task: Task) -> Result<(Vec<u8>, Vec<u8>, Vec<OutputChunk>, TaskExit)> {
    let Task { mut output, control, .. } = task;
    tokio::time::timeout(BOUND, async move {
        let mut chunks = Vec::new();
        while let Some(c) = output.recv().await {
            chunks.push(c);
        }
        let exit = control.wait().await;
        let mut out = Vec::new();
        let mut err = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.seq, i as u64, "sequence numbers are contiguous and in order");
            assert!(!c.data.is_empty() && c.data.len() <= kecho_exec::task::MAX_CHUNK);
            match c.stream {
                Stream::Stdout => out.extend_from_slice(&c.data),
                Stream::Stderr => err.extend_from_slice(&c.data),
            }
        }
        (out, err, chunks, exit)
    })
    .await
    .context("task did not finish in time")
}

fn alive(pid: i32) -> bool {
    // A zombie has ended; only a process in any other state is alive.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn environment_output_and_exit_code() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut s = spec(
        "t1",
        "echo \"$KECHO_AGENT $KECHO_TASK $FOO $KECHO_APP\"; echo oops >&2; test -n \"$KECHO_STATE\" && exit 3",
    );
    s.env.push(("FOO".into(), "bar baz".into()));
    s.kecho_env.push(("KECHO_APP".into(), "shop".into()));
    let task = sup.spawn(s).await?;
    assert_eq!(task.limits.mechanism, "none");
    let (out, err, _, exit) = check(task).await?;
    assert_eq!(String::from_utf8(out)?, "agent-7 t1 bar baz shop\n");
    assert_eq!(String::from_utf8(err)?, "oops\n");
    assert_eq!(exit, TaskExit { code: 3, signal: None });
    Ok(())
}

#[tokio::test]
async fn signal_death_is_128_plus_n_and_missing_command_is_127() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let (_, _, _, exit) = check(sup.spawn(spec("t2", "kill -KILL $$")).await?).await?;
    assert_eq!(exit, TaskExit { code: 137, signal: Some(9) });
    let mut missing = spec("t3", "");
    missing.argv = vec!["/nonexistent/kecho-no-such-program".into()];
    let (_, err, _, exit) = check(sup.spawn(missing).await?).await?;
    assert_eq!(exit.code, 127, "stderr: {}", String::from_utf8_lossy(&err));
    Ok(())
}

#[tokio::test]
async fn a_lot_of_output_arrives_whole_and_in_order() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let (out, _, chunks, exit) =
        check(sup.spawn(spec("t4", "i=0; while [ $i -lt 20000 ]; do echo $i; i=$((i+1)); done")).await?).await?;
    assert!(exit.success());
    let expected: String = (0..20000).map(|i| format!("{i}\n")).collect();
    assert_eq!(String::from_utf8(out)?, expected);
    assert!(chunks.len() > 1, "more than one chunk for {} bytes", expected.len());
    Ok(())
}

#[tokio::test]
async fn stop_kills_the_process_group_including_children_that_ignore_sigterm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    // The child ignores SIGTERM and its own child (sleep) inherits that; SIGKILL after the grace must end both.
    let mut task = sup.spawn(spec("t5", "trap '' TERM; sleep 300 & echo $!; wait")).await?;
    let first = tokio::time::timeout(BOUND, task.output.recv()).await?.context("no output")?;
    let grandchild: i32 = String::from_utf8(first.data)?.trim().parse()?;
    assert!(alive(grandchild));
    let exit = tokio::time::timeout(BOUND, task.control.stop(Duration::from_millis(200))).await?;
    assert_eq!(exit, TaskExit { code: 137, signal: Some(9) }, "the leader ignored SIGTERM, so SIGKILL ended it");
    tokio::time::timeout(BOUND, async {
        while alive(grandchild) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the task's child survived the stop")?;
    Ok(())
}

#[tokio::test]
async fn stop_with_sigterm_ends_a_cooperative_task_and_its_children() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut task = sup.spawn(spec("t6", "sleep 300 & echo $!; wait")).await?;
    let first = tokio::time::timeout(BOUND, task.output.recv()).await?.context("no output")?;
    let grandchild: i32 = String::from_utf8(first.data)?.trim().parse()?;
    let exit = tokio::time::timeout(BOUND, task.control.stop(Duration::from_secs(10))).await?;
    assert_eq!(exit, TaskExit { code: 143, signal: Some(15) });
    tokio::time::timeout(BOUND, async {
        while alive(grandchild) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("the task's child survived the stop")?;
    // Stopping an ended task is harmless and reports the same exit.
    assert_eq!(task.control.stop(Duration::from_millis(10)).await, exit);
    Ok(())
}

#[tokio::test]
async fn nothing_outlives_the_task() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    // The leader exits at once, leaving a background child that would run for minutes.
    let (out, _, _, exit) = check(sup.spawn(spec("t10", "sleep 300 & echo $!")).await?).await?;
    assert!(exit.success());
    let orphan: i32 = String::from_utf8(out)?.trim().parse()?;
    tokio::time::timeout(BOUND, async {
        while alive(orphan) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .context("a child outlived its task")?;
    Ok(())
}

#[tokio::test]
async fn checkpoint_is_handed_in_and_read_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut s = spec("t7", "cat \"$KECHO_STATE\"; printf 'step 2' > \"$KECHO_STATE\"");
    s.state = Some(b"step 1".to_vec());
    let task = sup.spawn(s).await?;
    let control = task.control.clone();
    let (out, _, _, exit) = check(task).await?;
    assert!(exit.success());
    assert_eq!(out, b"step 1", "a restarted task starts from its last state");
    assert_eq!(control.checkpoint().await?, Some(b"step 2".to_vec()));
    // A fresh task has no state: an old file is not left for it.
    let task = sup.spawn(spec("t7", "test -e \"$KECHO_STATE\" && echo stale; exit 0")).await?;
    let control = task.control.clone();
    let (out, _, _, _) = check(task).await?;
    assert!(out.is_empty());
    assert_eq!(control.checkpoint().await?, None);
    Ok(())
}

#[tokio::test]
async fn rlimits_apply_before_the_command_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut s = spec("t8", "grep 'Max address space' /proc/self/limits");
    s.limits = Limits { cpus: Some(0.5), mem: Some(512 << 20) };
    let task = sup.spawn(s).await?;
    assert_eq!(task.limits.mechanism, "rlimit");
    assert_eq!(task.limits.applied, vec![format!("RLIMIT_AS={}", 512u64 << 20)]);
    assert_eq!(task.limits.not_enforced.len(), 1, "a CPU share is reported as not enforced");
    let (out, _, _, exit) = check(task).await?;
    assert!(exit.success());
    let line = String::from_utf8(out)?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(fields[3..5], [(512u64 << 20).to_string(), (512u64 << 20).to_string()], "{line}");
    Ok(())
}

#[tokio::test]
async fn cgroup_limits_are_written_and_the_task_joins_before_it_runs() -> Result<()> {
    // A plain directory stands in for a delegated cgroup v2 subtree: the agent writes the same files.
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("cg");
    std::fs::create_dir(&root)?;
    let tree = CgroupTree { root: root.clone(), controllers: BTreeSet::from(["memory".into(), "cpu".into()]) };
    let sup = supervisor(dir.path(), Confinement::Cgroup(tree));
    let mut s = spec("job:9", "echo $$ $PPID");
    s.limits = Limits { cpus: Some(1.5), mem: Some(1 << 30) };
    let task = sup.spawn(s).await?;
    let cg = task.limits.cgroup.clone().context("no cgroup")?;
    assert_eq!(cg, root.join("kecho-task-job_9"));
    assert_eq!(task.limits.mechanism, "cgroup");
    let (pid, reaper) = (task.control.pid(), task.control.reaper_pid());
    let (out, _, _, exit) = check(task).await?;
    assert!(exit.success());
    // The reaper joined the cgroup before it started the command: the command is its child, born there.
    assert_eq!(String::from_utf8(out)?.trim(), format!("{pid} {reaper}"), "the command runs as the reported pid");
    assert_eq!(std::fs::read_to_string(cg.join("memory.max"))?, (1u64 << 30).to_string());
    assert_eq!(std::fs::read_to_string(cg.join("cpu.max"))?, "150000 100000");
    assert_eq!(std::fs::read_to_string(cg.join("cgroup.procs"))?, reaper.to_string());
    Ok(())
}

#[tokio::test]
async fn bad_specs_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut reserved = spec("t9", "true");
    reserved.env.push(("KECHO_TASK".into(), "forged".into()));
    let mut empty = spec("t9", "true");
    empty.argv.clear();
    let traversal = spec("../x", "true");
    let mut forged = spec("t9", "true");
    forged.kecho_env.push(("KECHO_AGENT".into(), "someone-else".into()));
    let mut not_kecho = spec("t9", "true");
    not_kecho.kecho_env.push(("PATH".into(), "/tmp".into()));
    for bad in [reserved, empty, traversal, forged, not_kecho] {
        match sup.spawn(bad).await {
            Err(TaskError::Invalid(_)) => {}
            other => bail!("not refused: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn confinement_on_a_plain_directory_falls_back_to_rlimits_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    match Confinement::detect(Some(dir.path())) {
        Confinement::Rlimits { reason } => assert!(reason.contains("not a cgroup v2 directory"), "{reason}"),
        other => panic!("a plain directory accepted as a cgroup: {other:?}"),
    }
}

/// Set in the copy of this test binary that plays the agent in [`a_task_and_its_children_die_with_a_killed_agent`].
const AS_AGENT: &str = "KECHO_EXEC_TEST_AS_AGENT";
/// The marked `sleep` that copy's task starts (escaping its group).
const AGENT_MARK: &str = "KECHO_EXEC_TEST_MARKSLEEP";

#[test]
fn a_task_and_its_children_die_with_a_killed_agent() -> Result<()> {
    use std::io::BufRead;
    if let Ok(dir) = std::env::var(AS_AGENT) {
        // The agent: starts a task with a background child and prints their pids, then runs until killed.
        let rt = tokio::runtime::Runtime::new()?;
        return rt.block_on(async {
            let sup = supervisor(Path::new(&dir), rlimits());
            // A background child, and two that escape: one in a session of its own, one orphaned in another.
            let mut s =
                spec("t-orphan", "setsid \"$M\" 1000 & (setsid \"$M\" 1001 &); sleep 300 & echo \"PIDS $$ $!\"; wait");
            s.env.push(("M".into(), std::env::var(AGENT_MARK)?));
            let mut task = sup.spawn(s).await?;
            let chunk = task.output.recv().await.context("no output")?;
            println!("{}", String::from_utf8_lossy(&chunk.data).trim());
            tokio::time::sleep(Duration::from_secs(300)).await;
            bail!("the agent was not killed");
        });
    }
    let dir = tempfile::tempdir()?;
    let mark = marked_sleep(dir.path(), "agentkill")?;
    let mut agent = std::process::Command::new(std::env::current_exe()?)
        .args(["a_task_and_its_children_die_with_a_killed_agent", "--exact", "--nocapture", "--test-threads", "1"])
        .env(AS_AGENT, dir.path())
        .env(AGENT_MARK, &mark.path)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = agent.stdout.take().context("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            // libtest may have printed the test's name on the same line.
            if let Some((_, pids)) = line.split_once("PIDS ") {
                let _ = tx.send(pids.to_string());
            }
        }
    });
    let pids = match rx.recv_timeout(BOUND) {
        Ok(p) => p,
        Err(_) => {
            let _ = agent.kill();
            bail!("the agent never started its task");
        }
    };
    let pids: Vec<i32> = pids.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.iter().all(|&p| alive(p)), "the task runs before its agent is killed");
    mark.wait_for(2)?;
    agent.kill()?; // SIGKILL: the agent has no chance to stop anything itself.
    agent.wait()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| alive(p)) {
        if std::time::Instant::now() > deadline {
            bail!("the task's processes {pids:?} outlived their agent by 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    mark.wait_gone("after its agent was killed -9")?;
    Ok(())
}

/// A `sleep` reached through a link whose name carries a marker, so that the processes of one test can be found by
/// their command line in `/proc` whatever session or process group they moved to.
struct Marked {
    path: std::path::PathBuf,
    marker: String,
}

fn marked_sleep(dir: &Path, name: &str) -> Result<Marked> {
    let sleep =
        ["/bin/sleep", "/usr/bin/sleep"].into_iter().find(|p| Path::new(p).exists()).context("no sleep program")?;
    let marker = format!("kecho-mark-{}-{name}", std::process::id());
    let path = dir.join(format!("sleep-{marker}"));
    std::os::unix::fs::symlink(sleep, &path)?;
    Ok(Marked { path, marker })
}

impl Marked {
    /// The live processes whose command line carries the marker.
    fn running(&self) -> Vec<i32> {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
        dir.filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
            .filter(|&pid| alive(pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&self.marker))
            })
            .collect()
    }

    /// Waits (bounded) until at least `n` marked processes run.
    fn wait_for(&self, n: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + BOUND;
        while self.running().len() < n {
            if std::time::Instant::now() > deadline {
                bail!("only {:?} of {n} marked processes started", self.running());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits (5 s at most) until no marked process runs.
    fn wait_gone(&self, when: &str) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.running();
            if left.is_empty() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                for pid in &left {
                    let _ = rustix::process::kill_process(
                        rustix::process::Pid::from_raw(*pid).context("pid")?,
                        rustix::process::Signal::KILL,
                    );
                }
                bail!("processes {left:?} of the task outlived it by 5 s {when}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Escapes: a `setsid` child, a double fork into another session, a double fork that stays in the group, and a child
/// in a session of its own that ignores SIGTERM (so only the kill after the grace ends it).
const ESCAPES: &str = "setsid \"$M\" 1000 & (setsid \"$M\" 1001 &); (\"$M\" 1002 &); \
     setsid sh -c 'trap \"\" TERM; \"$M\" 1003 & wait' &";

#[tokio::test]
async fn a_stop_kills_descendants_that_left_the_process_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mark = marked_sleep(dir.path(), "stop")?;
    let sup = supervisor(dir.path(), rlimits());
    let mut s = spec("t11", &format!("{ESCAPES} echo started; wait"));
    s.env.push(("M".into(), mark.path.display().to_string()));
    let mut task = sup.spawn(s).await?;
    let first = tokio::time::timeout(BOUND, task.output.recv()).await?.context("no output")?;
    assert_eq!(String::from_utf8(first.data)?.trim(), "started");
    let m = mark.path.clone();
    let marker = mark.marker.clone();
    tokio::task::spawn_blocking(move || Marked { path: m, marker }.wait_for(4)).await??;
    let exit = tokio::time::timeout(BOUND, task.control.stop(Duration::from_millis(300))).await?;
    assert_eq!(exit.code, 143, "the leader ends by SIGTERM: {exit:?}");
    tokio::task::spawn_blocking(move || mark.wait_gone("after a stop")).await??;
    Ok(())
}

#[tokio::test]
async fn descendants_that_left_the_process_group_die_when_the_leader_exits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mark = marked_sleep(dir.path(), "exit")?;
    let sup = supervisor(dir.path(), rlimits());
    // The leader waits for a file `go` in its directory, then exits 0, leaving its escapes behind.
    let mut s = spec("t12", &format!("{ESCAPES} while [ ! -e go ]; do sleep 0.01; done; exit 0"));
    s.env.push(("M".into(), mark.path.display().to_string()));
    let task = sup.spawn(s).await?;
    let m = Marked { path: mark.path.clone(), marker: mark.marker.clone() };
    tokio::task::spawn_blocking(move || m.wait_for(4)).await??;
    std::fs::write(dir.path().join("state/t12/go"), "")?;
    let (_, _, _, exit) = check(task).await?;
    assert!(exit.success(), "{exit:?}");
    tokio::task::spawn_blocking(move || mark.wait_gone("after its leader exited")).await??;
    Ok(())
}

#[tokio::test]
async fn a_program_that_is_not_a_reaper_is_refused_before_anything_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let echo = supervisor(dir.path(), rlimits()).with_reaper(Reaper::program("/bin/echo"));
    match echo.spawn(spec("t13", "touch ran")).await {
        Err(TaskError::Spawn(e)) => assert!(e.to_string().contains("is not a kecho task reaper"), "{e}"),
        other => bail!("not refused: {other:?}"),
    }
    let missing = supervisor(dir.path(), rlimits()).with_reaper(Reaper::program("/nonexistent/kecho-task-reaper"));
    match missing.spawn(spec("t13", "touch ran")).await {
        Err(TaskError::Spawn(e)) => assert!(e.to_string().contains("/nonexistent/kecho-task-reaper"), "{e}"),
        other => bail!("not refused: {other:?}"),
    }
    assert!(!dir.path().join("state/t13/ran").exists());
    Ok(())
}

#[tokio::test]
async fn a_readiness_check_runs_within_the_task_rlimits_and_process_group() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sup = supervisor(dir.path(), rlimits());
    let mut s = spec("t14", "echo up; exec sleep 300");
    s.limits = Limits { cpus: None, mem: Some(512 << 20) };
    let env = sup.probe_env(&s);
    let mut task = sup.spawn(s).await?;
    tokio::time::timeout(BOUND, task.output.recv()).await?.context("no output")?;
    let env = env.within(&task.control);
    let check = ReadyCheck::Command(
        "grep 'Max address space' /proc/self/limits > probe-limits && cut -d' ' -f5 /proc/$$/stat > probe-pgid".into(),
    );
    wait_ready(&check, "127.0.0.1", BOUND, &env).await?;
    let task_dir = dir.path().join("state/t14");
    let limits = std::fs::read_to_string(task_dir.join("probe-limits"))?;
    let fields: Vec<&str> = limits.split_whitespace().collect();
    assert_eq!(fields[3..5], [(512u64 << 20).to_string(), (512u64 << 20).to_string()], "{limits}");
    let pgid: i32 = std::fs::read_to_string(task_dir.join("probe-pgid"))?.trim().parse()?;
    assert_eq!(pgid, task.control.pid(), "the check is in the task's process group");
    task.control.stop(Duration::from_millis(100)).await;
    Ok(())
}

/// The cgroup v2 mount, if there is one.
fn cgroup2_root() -> Option<std::path::PathBuf> {
    cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)
}

#[tokio::test]
#[ignore = "needs root: creates a cgroup v2 directory (run by .ci/run)"]
async fn a_readiness_check_and_escaped_descendants_stay_in_the_task_cgroup() -> Result<()> {
    let Some(mount) = cgroup2_root() else {
        eprintln!("skipped: no cgroup v2 hierarchy is mounted here");
        return Ok(());
    };
    let root = mount.join(format!("kecho-test-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir(&root) {
        eprintln!("skipped: cannot create {}: {e}", root.display());
        return Ok(());
    }
    let result = async {
        // The controllers the host gives (none on a hybrid host: membership and cgroup.kill still work).
        let tree = CgroupTree::open(&root).unwrap_or(CgroupTree { root: root.clone(), controllers: BTreeSet::new() });
        eprintln!("cgroup tree {} with controllers {:?}", root.display(), tree.controllers);
        let dir = tempfile::tempdir()?;
        let mark = marked_sleep(dir.path(), "cgroup")?;
        let sup = supervisor(dir.path(), Confinement::Cgroup(tree));
        let mut s = spec("t15", &format!("{ESCAPES} echo up; wait"));
        s.limits = Limits { cpus: Some(1.0), mem: Some(256 << 20) };
        s.env.push(("M".into(), mark.path.display().to_string()));
        let env = sup.probe_env(&s);
        let mut task = sup.spawn(s).await?;
        let cg = task.limits.cgroup.clone().context("no cgroup")?;
        tokio::time::timeout(BOUND, task.output.recv()).await?.context("no output")?;
        let m = Marked { path: mark.path.clone(), marker: mark.marker.clone() };
        let marked = tokio::task::spawn_blocking(move || m.wait_for(4).map(|()| m.running())).await??;
        let procs: Vec<i32> =
            std::fs::read_to_string(cg.join("cgroup.procs"))?.lines().map(str::parse).collect::<Result<_, _>>()?;
        for pid in &marked {
            assert!(procs.contains(pid), "escaped process {pid} is in the task's cgroup {procs:?}");
        }
        let env = env.within(&task.control);
        wait_ready(&ReadyCheck::Command("cat /proc/self/cgroup > probe-cgroup".into()), "127.0.0.1", BOUND, &env)
            .await?;
        let seen = std::fs::read_to_string(dir.path().join("state/t15/probe-cgroup"))?;
        let rel = cg.strip_prefix(&mount)?.display().to_string();
        assert!(seen.lines().any(|l| l == format!("0::/{rel}")), "the check ran in {seen:?}, not in /{rel}");
        let exit = tokio::time::timeout(BOUND, task.control.stop(Duration::from_millis(300))).await?;
        assert_eq!(exit.code, 143, "{exit:?}");
        tokio::task::spawn_blocking(move || mark.wait_gone("after a stop under cgroups")).await??;
        tokio::time::timeout(BOUND, async {
            while cg.exists() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .context("the task's cgroup was not removed")?;
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir(&root);
    result
}
