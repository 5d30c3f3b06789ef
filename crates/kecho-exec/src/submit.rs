//! The submitter side of `kecho run`, pure: [`RunSession`] takes what happens (a placement, the agent's messages, the
//! agent's loss, Ctrl-C, time) and returns what to do ([`RunAction`]): place the task, send it, print its output in
//! order, restart it where its policy says with its last checkpoint, and finally exit with its status.
//!
//! Exit statuses of `kecho run` besides the task's own (chosen after `docker run` and `ssh`):
//! [`EXIT_NOT_PLACED`] (125) when no agent could take the task, [`EXIT_REFUSED`] (126) when every agent tried refused
//! it, [`EXIT_LOST`] (255) when its node was lost and the policy does not restart it.

use std::time::Instant;

use crate::place::{AgentName, Placement, ReservationSpec};
use crate::restart::{Decision, Ending, RestartLimits, Restarts};
use crate::task::{Stream, TaskId};
use crate::wire::{Accept, ExecMsg, OutputCursor, Submit};

/// No agent could take the task.
pub const EXIT_NOT_PLACED: i32 = 125;
/// Every agent tried refused the task.
pub const EXIT_REFUSED: i32 = 126;
/// The task's node was lost and its policy does not restart it.
pub const EXIT_LOST: i32 = 255;

/// How many different agents may refuse a task before the submitter gives up.
const MAX_REFUSALS: usize = 3;

/// After a node loss, when no other agent fits the task: how often, and how far apart, the placement is tried again
/// with the lost agent among the candidates (taken for lost, it may only have been silent for a while: frozen, or cut
/// off, past the heartbeat timeout), before the run ends as not placed.
const PLACE_AGAIN_TRIES: u32 = 5;
const PLACE_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// What the submitter does next.
// A handful of actions per run, each consumed at once: boxing the message would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RunAction {
    /// Reserve capacity for the task on a fitting agent outside `avoid`, then call [`RunSession::placed`] or
    /// [`RunSession::place_failed`].
    Place {
        /// The reservation spec.
        spec: ReservationSpec,
        /// Agents not to use (the one that was lost or refused).
        avoid: Vec<AgentName>,
    },
    /// Release a reservation that is no longer used.
    Release(Placement),
    /// Send this message to the agent.
    Send(AgentName, ExecMsg),
    /// Call [`RunSession::resubmit`] at this time (a restart's backoff).
    WakeAt(Instant),
    /// Write output to the submitter's stdout or stderr.
    Print(Stream, Vec<u8>),
    /// Tell the user something (on stderr): a restart, a gap in the output, a refusal.
    Note(String),
    /// The run is over: exit with this status.
    Exit(i32),
}

/// One `kecho run` in progress.
#[derive(Debug, Clone)]
pub struct RunSession {
    template: Submit,
    restarts: Restarts,
    placement: Option<Placement>,
    run: u32,
    started_at: Option<Instant>,
    cursor: OutputCursor,
    refused_by: Vec<AgentName>,
    /// The current placement is a restart after a node loss that avoids the lost agent: how many times it was tried
    /// again with every agent (`PLACE_AGAIN_TRIES`), `None` otherwise.
    after_loss: Option<u32>,
    /// A placement is due at the next `resubmit` (the wake-up after `place_failed`).
    place_due: bool,
    stopping: bool,
    done: bool,
}

impl RunSession {
    /// A session for the task in `submit` (its `run`, `placement` and `state` are filled in as the session goes).
    pub fn new(submit: Submit, limits: RestartLimits) -> RunSession {
        let restarts = Restarts::new(submit.restart, limits);
        RunSession {
            template: Submit { run: 0, placement: None, ..submit },
            restarts,
            placement: None,
            run: 0,
            started_at: None,
            cursor: OutputCursor::default(),
            refused_by: Vec::new(),
            after_loss: None,
            place_due: false,
            stopping: false,
            done: false,
        }
    }

    /// The task.
    pub fn task(&self) -> &TaskId {
        &self.template.task
    }

    /// Where the current run is placed.
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// The last checkpoint received (what a restarted run starts from).
    pub fn state(&self) -> Option<&[u8]> {
        self.template.state.as_deref()
    }

    /// Whether the run is over.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Begins: place the task.
    pub fn start(&mut self) -> Vec<RunAction> {
        vec![self.place(Vec::new())]
    }

    /// The task was placed: send it there.
    pub fn placed(&mut self, placement: Placement, now: Instant) -> Vec<RunAction> {
        if self.done {
            return vec![RunAction::Release(placement)];
        }
        let agent = placement.agent.clone();
        self.after_loss = None;
        self.placement = Some(placement.clone());
        self.started_at = Some(now);
        let submit = Submit { run: self.run, placement: Some(placement), ..self.template.clone() };
        vec![RunAction::Send(agent, ExecMsg::Submit(submit))]
    }

    /// No agent could take the task at `now`. When agents have refused it before and no other fits, the run ends as
    /// refused (126): the refusals, not the lack of room, are why it did not run. A restart after a node loss that
    /// finds no agent but the lost one tries again with that one too, a few times a second apart (`resubmit` at the
    /// wake-up): an agent taken for lost after a freeze or a short cut is usually back by then (and stops the older
    /// run it may still have when the newer one arrives).
    pub fn place_failed(&mut self, reason: &str, now: Instant) -> Vec<RunAction> {
        let task = self.template.task.clone();
        if let Some(tries) = self.after_loss.filter(|&t| t < PLACE_AGAIN_TRIES && !self.done) {
            self.after_loss = Some(tries + 1);
            self.place_due = true;
            return vec![
                RunAction::Note(format!(
                    "task {task}: no other agent fits ({reason}); trying again in {PLACE_AGAIN_AFTER:?} with every agent"
                )),
                RunAction::WakeAt(now + PLACE_AGAIN_AFTER),
            ];
        }
        self.after_loss = None;
        match self.refused_by.len() {
            0 => self.finish(EXIT_NOT_PLACED, format!("task {task} cannot be placed: {reason}")),
            n => {
                let note = format!("task {task} was refused by {n} agent(s), and no other fits: {reason}");
                self.finish(EXIT_REFUSED, note)
            }
        }
    }

    /// A message from the agent running the task.
    pub fn handle(&mut self, msg: ExecMsg, now: Instant) -> Vec<RunAction> {
        match msg {
            ExecMsg::Output { task, run, seq, stream, data } if task == self.template.task => {
                match self.cursor.accept(run, seq) {
                    Accept::Duplicate => Vec::new(),
                    Accept::Next | Accept::NewRun => vec![RunAction::Print(stream, data)],
                    Accept::Gap { missing } => vec![
                        RunAction::Note(format!("{missing} output chunk(s) of task {task} were lost")),
                        RunAction::Print(stream, data),
                    ],
                }
            }
            ExecMsg::Checkpoint { task, run, state } if task == self.template.task && run == self.run => {
                self.template.state = Some(state);
                Vec::new()
            }
            ExecMsg::Started { task, run, agent, limits } if task == self.template.task && run == self.run => {
                vec![RunAction::Note(format!("task {task} run {run} started on {agent}, {limits}"))]
            }
            ExecMsg::Refused { task, agent, reason } if task == self.template.task => {
                let mut out = vec![RunAction::Note(format!("agent {agent} refused task {task}: {reason}"))];
                if let Some(p) = self.placement.take() {
                    out.push(RunAction::Release(p));
                }
                self.refused_by.push(agent);
                if self.refused_by.len() >= MAX_REFUSALS {
                    out.extend(self.finish(EXIT_REFUSED, format!("task {task} was refused by {MAX_REFUSALS} agents")));
                } else {
                    out.push(self.place(self.refused_by.clone()));
                }
                out
            }
            ExecMsg::Exit { task, run, ending, exit } if task == self.template.task && run == self.run => {
                let code = exit.map(|e| e.code);
                self.ended(ending, code, now)
            }
            ExecMsg::Drain { agent, .. } if self.placement.as_ref().is_some_and(|p| p.agent == agent) => {
                vec![RunAction::Note(format!(
                    "agent {agent} is drained; task {} will be checkpointed",
                    self.template.task
                ))]
            }
            _ => Vec::new(),
        }
    }

    /// The task's agent was lost (its heartbeats stopped).
    pub fn agent_lost(&mut self, now: Instant) -> Vec<RunAction> {
        if self.placement.is_none() || self.done {
            return Vec::new();
        }
        self.ended(Ending::NodeLost, None, now)
    }

    /// Ctrl-C or SIGTERM at the submitter: stop the task (its exit follows).
    pub fn interrupt(&mut self, grace_ms: u64) -> Vec<RunAction> {
        self.stopping = true;
        match &self.placement {
            Some(p) if !self.done => {
                vec![RunAction::Send(p.agent.clone(), ExecMsg::Stop { task: self.template.task.clone(), grace_ms })]
            }
            // Not running anywhere (placing, or waiting to restart): nothing to stop.
            _ => self.finish(130, format!("task {} interrupted", self.template.task)),
        }
    }

    /// A restart's backoff is over: send the task again where it was.
    pub fn resubmit(&mut self, now: Instant) -> Vec<RunAction> {
        if std::mem::take(&mut self.place_due) {
            return if self.done { Vec::new() } else { vec![self.place(self.refused_by.clone())] };
        }
        match self.placement.clone() {
            Some(p) if !self.done => self.placed(p, now),
            _ => Vec::new(),
        }
    }

    fn ended(&mut self, ending: Ending, code: Option<i32>, now: Instant) -> Vec<RunAction> {
        let ending = if self.stopping && ending != Ending::NodeLost { Ending::Stopped } else { ending };
        let started = self.started_at.unwrap_or(now);
        let task = self.template.task.clone();
        let final_code = match (ending, code) {
            (_, Some(c)) => c,
            (Ending::NodeLost | Ending::Drained, None) => EXIT_LOST,
            _ => 1,
        };
        if self.stopping {
            let mut out = self.release();
            out.extend(self.finish(final_code, format!("task {task} stopped")));
            return out;
        }
        match self.restarts.decide(ending, started, now) {
            Decision::Finished => {
                let mut out = self.release();
                if matches!(ending, Ending::NodeLost | Ending::Drained) {
                    out.extend(self.finish(final_code, format!("task {task}: its node was lost ({ending:?})")));
                } else {
                    out.push(RunAction::Exit(final_code));
                    self.done = true;
                }
                out
            }
            Decision::RestartInPlace { after } => {
                self.run += 1;
                vec![
                    RunAction::Note(format!(
                        "task {task} ended with {final_code}; restart {} in {after:?}",
                        self.restarts.total()
                    )),
                    RunAction::WakeAt(now + after),
                ]
            }
            Decision::RestartElsewhere { .. } => {
                self.run += 1;
                let lost: Vec<AgentName> = self.placement.iter().map(|p| p.agent.clone()).collect();
                let mut out = vec![RunAction::Note(format!(
                    "task {task}: node {} lost ({ending:?}); restart {} elsewhere{}",
                    lost.first().map(|a| a.0.as_str()).unwrap_or("?"),
                    self.restarts.total(),
                    if self.template.state.is_some() { " from its last checkpoint" } else { "" }
                ))];
                out.extend(self.release());
                if ending == Ending::NodeLost {
                    self.after_loss = Some(0);
                }
                out.push(self.place(lost));
                out
            }
            Decision::GiveUp { restarts } => {
                let mut out = self.release();
                out.extend(self.finish(final_code, format!("task {task} given up after {restarts} restarts")));
                out
            }
        }
    }

    fn place(&self, avoid: Vec<AgentName>) -> RunAction {
        RunAction::Place { spec: self.template.spec.clone(), avoid }
    }

    fn release(&mut self) -> Vec<RunAction> {
        self.placement.take().map(RunAction::Release).into_iter().collect()
    }

    fn finish(&mut self, code: i32, note: String) -> Vec<RunAction> {
        self.done = true;
        vec![RunAction::Note(note), RunAction::Exit(code)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::place::ReservationId;
    use crate::restart::RestartPolicy;
    use crate::task::TaskExit;
    use std::time::Duration;

    fn session(policy: RestartPolicy) -> RunSession {
        let submit = Submit {
            task: TaskId("t".into()),
            run: 0,
            submitter: "me".into(),
            argv: vec!["work".into()],
            env: vec![],
            kecho_env: vec![],
            spec: ReservationSpec { cpus: Some(1.0), ..Default::default() },
            placement: None,
            restart: policy,
            checkpoint_every_ms: Some(1000),
            state: None,
            artifact: None,
            ready: None,
        };
        RunSession::new(submit, RestartLimits::default())
    }

    fn at(agent: &str, id: u64) -> Placement {
        Placement {
            reservation: ReservationId(id),
            agent: AgentName(agent.into()),
            host: format!("{agent}.lan"),
            lease: None,
        }
    }

    fn exit(run: u32, code: i32) -> ExecMsg {
        ExecMsg::Exit {
            task: TaskId("t".into()),
            run,
            ending: Ending::Exited(code),
            exit: Some(TaskExit { code, signal: None }),
        }
    }

    fn out(run: u32, seq: u64, data: &str) -> ExecMsg {
        ExecMsg::Output { task: TaskId("t".into()), run, seq, stream: Stream::Stdout, data: data.as_bytes().to_vec() }
    }

    fn sent_submit(actions: &[RunAction]) -> Submit {
        actions
            .iter()
            .find_map(|a| match a {
                RunAction::Send(_, ExecMsg::Submit(s)) => Some(s.clone()),
                _ => None,
            })
            .expect("a submit")
    }

    #[test]
    fn a_run_prints_in_order_and_exits_with_the_task_status() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::Never);
        assert!(matches!(&s.start()[..], [RunAction::Place { avoid, .. }] if avoid.is_empty()));
        let sub = sent_submit(&s.placed(at("a", 1), t0));
        assert_eq!((sub.run, sub.placement.as_ref().map(|p| p.agent.0.as_str())), (0, Some("a")));
        assert_eq!(s.handle(out(0, 0, "x"), t0), vec![RunAction::Print(Stream::Stdout, b"x".to_vec())]);
        assert_eq!(s.handle(out(0, 0, "x"), t0), vec![], "a duplicate is dropped");
        let gap = s.handle(out(0, 3, "y"), t0);
        assert!(matches!(&gap[0], RunAction::Note(n) if n.contains("2 output chunk")));
        let end = s.handle(exit(0, 137), t0);
        assert_eq!(end, vec![RunAction::Release(at("a", 1)), RunAction::Exit(137)]);
        assert!(s.is_done());
    }

    #[test]
    fn node_loss_restarts_elsewhere_from_the_last_checkpoint() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::OnNodeLoss);
        s.start();
        s.placed(at("a", 1), t0);
        s.handle(ExecMsg::Checkpoint { task: TaskId("t".into()), run: 0, state: b"step 41".to_vec() }, t0);
        let actions = s.agent_lost(t0 + Duration::from_secs(5));
        assert!(matches!(&actions[0], RunAction::Note(n) if n.contains("from its last checkpoint")), "{actions:?}");
        assert_eq!(actions[1], RunAction::Release(at("a", 1)));
        assert!(matches!(&actions[2], RunAction::Place { avoid, .. } if avoid == &[AgentName("a".into())]));
        let sub = sent_submit(&s.placed(at("b", 2), t0 + Duration::from_secs(5)));
        assert_eq!((sub.run, sub.state.as_deref()), (1, Some(&b"step 41"[..])));
        // A late message of the old run changes nothing; the new run's output prints.
        assert_eq!(s.handle(exit(0, 0), t0), vec![]);
        assert_eq!(s.handle(out(1, 0, "again"), t0).len(), 1);
        assert_eq!(s.handle(exit(1, 0), t0).last(), Some(&RunAction::Exit(0)));
    }

    #[test]
    fn the_task_own_failure_ends_an_on_node_loss_run_and_a_lost_node_ends_a_never_run() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::OnNodeLoss);
        s.start();
        s.placed(at("a", 1), t0);
        assert_eq!(s.handle(exit(0, 3), t0).last(), Some(&RunAction::Exit(3)));
        let mut s = session(RestartPolicy::Never);
        s.start();
        s.placed(at("a", 1), t0);
        assert_eq!(s.agent_lost(t0).last(), Some(&RunAction::Exit(EXIT_LOST)));
    }

    #[test]
    fn on_failure_restarts_in_place_after_the_backoff() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::OnFailure);
        s.start();
        s.placed(at("a", 1), t0);
        let actions = s.handle(exit(0, 1), t0);
        assert_eq!(actions.last(), Some(&RunAction::WakeAt(t0 + Duration::from_millis(100))));
        let sub = sent_submit(&s.resubmit(t0 + Duration::from_millis(100)));
        assert_eq!((sub.run, sub.placement.map(|p| p.agent.0)), (1, Some("a".to_string())));
    }

    #[test]
    fn interrupt_stops_the_task_and_exits_with_its_status() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::OnFailure);
        s.start();
        s.placed(at("a", 1), t0);
        assert_eq!(
            s.interrupt(2000),
            vec![RunAction::Send(AgentName("a".into()), ExecMsg::Stop { task: TaskId("t".into()), grace_ms: 2000 })]
        );
        let end = s.handle(exit(0, 143), t0);
        assert_eq!(end.last(), Some(&RunAction::Exit(143)), "a stopped task is not restarted: {end:?}");
        let mut idle = session(RestartPolicy::Never);
        idle.start();
        assert_eq!(idle.interrupt(0).last(), Some(&RunAction::Exit(130)));
    }

    #[test]
    fn refusals_try_other_agents_then_give_up() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::Never);
        s.start();
        for (i, agent) in ["a", "b", "c"].iter().enumerate() {
            s.placed(at(agent, i as u64), t0);
            let actions = s.handle(
                ExecMsg::Refused {
                    task: TaskId("t".into()),
                    agent: AgentName(agent.to_string()),
                    reason: "no --allow-exec".into(),
                },
                t0,
            );
            assert_eq!(actions[1], RunAction::Release(at(agent, i as u64)));
            if i < 2 {
                assert!(matches!(&actions[2], RunAction::Place { avoid, .. } if avoid.len() == i + 1));
            } else {
                assert_eq!(actions.last(), Some(&RunAction::Exit(EXIT_REFUSED)));
            }
        }
        assert_eq!(
            session(RestartPolicy::Never).place_failed("no agent", t0).last(),
            Some(&RunAction::Exit(EXIT_NOT_PLACED))
        );
    }
    #[test]
    fn a_node_loss_with_no_other_agent_tries_the_lost_one_again_then_gives_up() {
        let t0 = Instant::now();
        let mut s = session(RestartPolicy::OnNodeLoss);
        s.start();
        s.placed(at("a", 1), t0);
        let actions = s.agent_lost(t0);
        assert!(matches!(actions.last(), Some(RunAction::Place { avoid, .. }) if avoid == &[AgentName("a".into())]));
        // Nothing but the lost agent fits: not the end, a wake-up, then a placement that avoids nobody.
        let mut now = t0;
        let again = s.place_failed("no agent fits", now);
        assert!(matches!(&again[0], RunAction::Note(n) if n.contains("trying again")), "{again:?}");
        assert_eq!(again[1], RunAction::WakeAt(now + PLACE_AGAIN_AFTER));
        now += PLACE_AGAIN_AFTER;
        assert!(matches!(&s.resubmit(now)[..], [RunAction::Place { avoid, .. }] if avoid.is_empty()));
        // The agent was back: the task runs there again, as run 1, from its last state.
        let sub = sent_submit(&s.placed(at("a", 2), now));
        assert_eq!((sub.run, sub.placement.map(|p| p.agent.0)), (1, Some("a".to_string())));
        assert!(!s.is_done());

        // Lost for good: a bounded number of tries, then the run ends as not placed.
        s.agent_lost(now);
        for _ in 0..PLACE_AGAIN_TRIES {
            assert_eq!(s.place_failed("no agent fits", now).last(), Some(&RunAction::WakeAt(now + PLACE_AGAIN_AFTER)));
            now += PLACE_AGAIN_AFTER;
            assert!(matches!(&s.resubmit(now)[..], [RunAction::Place { .. }]));
        }
        assert_eq!(s.place_failed("no agent fits", now).last(), Some(&RunAction::Exit(EXIT_NOT_PLACED)));
        assert!(s.is_done());
        // A first placement that fails is not retried: only a restart after a loss is.
        let mut fresh = session(RestartPolicy::OnNodeLoss);
        fresh.start();
        assert_eq!(fresh.place_failed("no agent", t0).last(), Some(&RunAction::Exit(EXIT_NOT_PLACED)));
    }
}
