//! What the exec tests over real nodes share: a submission and waiting for what came of it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_exec::place::ReservationSpec;
use kecho_exec::remote::Submitter;
use kecho_exec::repo::Digest;
use kecho_exec::restart::RestartPolicy;
use kecho_exec::task::TaskId;
use kecho_exec::wire::{ExecMsg, Submit};

/// How long any step may take.
pub const BOUND: Duration = Duration::from_secs(20);

/// A submission of task `task` running `argv` (or repository artifact `artifact`, named as `argv[0]`), run once.
pub fn submit(sub: &Submitter, task: &str, argv: Vec<String>, artifact: Option<Digest>) -> ExecMsg {
    ExecMsg::Submit(Submit {
        task: TaskId(task.into()),
        run: 0,
        submitter: sub.id().to_owned(),
        argv,
        env: vec![],
        kecho_env: vec![],
        spec: ReservationSpec::default(),
        placement: None,
        restart: RestartPolicy::Never,
        checkpoint_every_ms: None,
        state: None,
        artifact,
    })
}

/// Waits for what came of task `task`: `Ok(output)` when it ran to exit 0, `Err(reason)` when refused.
pub async fn outcome(sub: &mut Submitter, task: &str) -> Result<std::result::Result<String, String>> {
    let mut out = String::new();
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        match tokio::time::timeout_at(deadline, sub.recv()).await.context("no answer")?.context("closed")? {
            ExecMsg::Refused { task: t, reason, .. } if t.0 == task => return Ok(Err(reason)),
            ExecMsg::Output { task: t, data, .. } if t.0 == task => out.push_str(&String::from_utf8_lossy(&data)),
            ExecMsg::Exit { task: t, exit, .. } if t.0 == task => {
                if exit.map(|e| e.code) != Some(0) {
                    bail!("task {task} ended {exit:?}");
                }
                return Ok(Ok(out));
            }
            _ => {}
        }
    }
}
