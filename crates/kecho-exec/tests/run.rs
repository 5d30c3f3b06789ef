//! `kecho run --restart on-node-loss` end to end on this host: the submitter's `RunSession`, an in-memory placer over
//! two agents, and two in-process agents that run tasks with the supervisor. Every message crosses an encode and a
//! decode, as it would as a kecho event. The first agent is drained mid-run: the task is stopped, its checkpoint
//! shipped, and it continues on the other agent from that checkpoint.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kecho_exec::place::{AgentName, InMemoryPlacer, MemAgent, Placer, ReservationSpec};
use kecho_exec::restart::{Ending, RestartLimits, RestartPolicy};
use kecho_exec::submit::{RunAction, RunSession};
use kecho_exec::task::{Confinement, Limits, Stream, Supervisor, Task, TaskId, TaskSpec};
use kecho_exec::wire::{ExecMsg, Submit};
use tokio::sync::mpsc;

const BOUND: Duration = Duration::from_secs(30);

/// Encodes and decodes, as the message would travel.
fn travel(msg: &ExecMsg) -> Result<ExecMsg> {
    Ok(ExecMsg::decode(&msg.encode())?)
}

/// An agent's side: run a submitted task, forward its output and exit as messages.
async fn run_on_agent(
    sup: &Supervisor,
    agent: &AgentName,
    submit: Submit,
    to_submitter: mpsc::UnboundedSender<ExecMsg>,
) -> Result<Task> {
    let spec = TaskSpec {
        id: submit.task.clone(),
        argv: submit.argv.clone(),
        env: submit.env.clone(),
        kecho_env: vec![],
        limits: Limits { cpus: submit.spec.cpus, mem: submit.spec.mem },
        state: submit.state.clone(),
    };
    let mut task = sup.spawn(spec).await?;
    to_submitter.send(travel(&ExecMsg::Started {
        task: submit.task.clone(),
        run: submit.run,
        agent: agent.clone(),
        limits: task.limits.clone(),
    })?)?;
    let mut output = std::mem::replace(&mut task.output, mpsc::channel(1).1);
    let control = task.control.clone();
    let (id, run) = (submit.task.clone(), submit.run);
    tokio::spawn(async move {
        while let Some(chunk) = output.recv().await {
            let _ = to_submitter.send(ExecMsg::output(&id, run, chunk));
        }
        let exit = control.wait().await;
        let _ = to_submitter.send(ExecMsg::Exit { task: id, run, ending: Ending::Exited(exit.code), exit: Some(exit) });
    });
    Ok(task)
}

#[tokio::test]
async fn a_drained_agent_task_continues_elsewhere_from_its_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let names = [AgentName("a".into()), AgentName("b".into())];
    let placer = InMemoryPlacer::new(
        names
            .iter()
            .map(|n| MemAgent {
                name: n.clone(),
                host: "127.0.0.1".into(),
                cpus: 2.0,
                mem: 1 << 30,
                labels: BTreeSet::new(),
            })
            .collect(),
    );
    let supervisors: BTreeMap<AgentName, Supervisor> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                Supervisor::new(n.clone(), dir.path().join(&n.0), Confinement::Rlimits { reason: "test".into() }),
            )
        })
        .collect();
    // Counts to 40 from its saved state, saving after each line, atomically (write a temporary file, rename it), as
    // a task must: a kill in the middle of a plain write would leave a truncated checkpoint.
    let script = "n=$(cat \"$KECHO_STATE\" 2>/dev/null || echo 0); \
                  while [ $n -lt 40 ]; do n=$((n+1)); echo \"$KECHO_AGENT $n\"; \
                  echo $n > \"$KECHO_STATE.tmp\" && mv \"$KECHO_STATE.tmp\" \"$KECHO_STATE\"; sleep 0.01; done";
    let submit = Submit {
        task: TaskId("count".into()),
        run: 0,
        submitter: "tester".into(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec![],
        kecho_env: vec![],
        spec: ReservationSpec { cpus: Some(2.0), mem: Some(256 << 20), ..Default::default() },
        placement: None,
        restart: RestartPolicy::OnNodeLoss,
        checkpoint_every_ms: None,
        state: None,
        artifact: None,
        ready: None,
    };
    let mut session = RunSession::new(submit, RestartLimits::default());
    let (to_submitter, mut inbox) = mpsc::unbounded_channel::<ExecMsg>();
    let mut tasks: BTreeMap<AgentName, Task> = BTreeMap::new();
    let mut printed = String::new();
    let mut queue: Vec<RunAction> = session.start();
    let mut drained: Option<Instant> = None;
    let mut restarted_after: Option<Duration> = None;
    let code = tokio::time::timeout(BOUND, async {
        loop {
            while !queue.is_empty() {
                let actions: Vec<RunAction> = std::mem::take(&mut queue);
                for action in actions {
                    match action {
                        RunAction::Place { spec, avoid } => match placer.place(&spec, &avoid).await {
                            Ok(p) => queue.extend(session.placed(p, Instant::now())),
                            Err(e) => queue.extend(session.place_failed(&e.to_string(), Instant::now())),
                        },
                        RunAction::Release(p) => placer.release(&p).await?,
                        RunAction::Send(agent, msg) => match travel(&msg)? {
                            ExecMsg::Submit(s) => {
                                let task = run_on_agent(&supervisors[&agent], &agent, s, to_submitter.clone()).await?;
                                tasks.insert(agent, task);
                            }
                            other => bail!("unexpected message to an agent: {other:?}"),
                        },
                        RunAction::Print(Stream::Stdout, data) => printed.push_str(&String::from_utf8(data)?),
                        RunAction::Print(Stream::Stderr, data) => bail!("stderr: {}", String::from_utf8_lossy(&data)),
                        RunAction::Note(_) => {}
                        RunAction::WakeAt(_) => queue.extend(session.resubmit(Instant::now())),
                        RunAction::Exit(code) => return Ok(code),
                        other => bail!("unexpected action {other:?}"),
                    }
                }
            }
            let msg = inbox.recv().await.context("inbox closed")?;
            if let ExecMsg::Started { run: 1, .. } = &msg {
                restarted_after = drained.map(|t| t.elapsed());
            }
            queue.extend(session.handle(travel(&msg)?, Instant::now()));
            // Drain agent `a` once the task has counted past 10 there: stop it, ship its checkpoint, report the drain.
            let past_ten = printed.lines().filter(|l| l.starts_with("a ")).count() >= 10;
            if past_ten && drained.is_none() {
                drained = Some(Instant::now());
                let task = tasks.remove(&names[0]).context("no task on a")?;
                task.control.stop(Duration::from_secs(5)).await;
                let state = task.control.checkpoint().await?.context("no checkpoint")?;
                queue.extend(session.handle(
                    travel(&ExecMsg::Checkpoint { task: TaskId("count".into()), run: 0, state })?,
                    Instant::now(),
                ));
                let drain = ExecMsg::Exit { task: TaskId("count".into()), run: 0, ending: Ending::Drained, exit: None };
                queue.extend(session.handle(travel(&drain)?, Instant::now()));
            }
        }
    })
    .await??;

    assert_eq!(code, 0);
    let lines: Vec<(&str, u32)> = printed
        .lines()
        .map(|l| l.split_once(' ').map(|(a, n)| (a, n.parse().unwrap_or(0))).unwrap_or(("?", 0)))
        .collect();
    let on_a: Vec<u32> = lines.iter().filter(|(a, _)| *a == "a").map(|(_, n)| *n).collect();
    let on_b: Vec<u32> = lines.iter().filter(|(a, _)| *a == "b").map(|(_, n)| *n).collect();
    assert!(on_a.len() >= 10 && !on_b.is_empty(), "{printed}");
    assert_eq!(on_a, (1..=on_a.len() as u32).collect::<Vec<_>>(), "run 0 counted from 1 on a");
    // Run 1 resumes from the checkpoint: at most one line repeated or skipped (the kill may fall between a line and
    // its save), never a restart from scratch.
    let resumed = on_b[0];
    let last_a = *on_a.last().unwrap_or(&0);
    assert!(resumed > 1 && resumed.abs_diff(last_a + 1) <= 1, "resumed at {resumed} after {last_a}");
    assert_eq!(*on_b.last().unwrap_or(&0), 40);
    assert_eq!(placer.held(), 0, "every reservation released");
    eprintln!("drain to restarted run started on the other agent: {:?}", restarted_after.context("no restart")?);
    Ok(())
}
