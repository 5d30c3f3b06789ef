//! The messages between a submitter (`kecho run`, `kecho deploy`) and an agent, as serde types.
//!
//! They travel as JSON payloads of kecho events (the node library's typed sources and sinks), one message per event,
//! with the event type [`ExecMsg::event_type`]. Byte payloads (output, checkpoints) are base64 in the JSON. A run of a
//! task is numbered (`run`: 0, then 1 after the first restart, ...) and each run's output chunks are numbered from 0,
//! so the submitter can tell a restart from a gap ([`OutputCursor`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::place::{AgentName, Placement, ReservationSpec};
use crate::restart::{Ending, RestartPolicy};
use crate::task::{LimitReport, OutputChunk, Stream, TaskExit, TaskId};

/// A message of the execution protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
// A message is decoded, handled and dropped one at a time; boxing the submission would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum ExecMsg {
    /// Submitter → agent: run this task within this reservation.
    Submit(Submit),
    /// Agent → submitter: the task started.
    Started {
        /// The task.
        task: TaskId,
        /// Which run (0 first, then one more per restart).
        run: u32,
        /// The agent running it.
        agent: AgentName,
        /// The limits that applied.
        limits: LimitReport,
    },
    /// Agent → submitter: the task was not started.
    Refused {
        /// The task.
        task: TaskId,
        /// The agent that refused.
        agent: AgentName,
        /// Why (no `--allow-exec`, no `exec` right, a bad spec, an artifact that failed verification, ...).
        reason: String,
    },
    /// Agent → submitter: a chunk of output.
    Output {
        /// The task.
        task: TaskId,
        /// Which run.
        run: u32,
        /// Sequence number within the run.
        seq: u64,
        /// Which stream.
        stream: Stream,
        /// The bytes.
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Agent → submitter: a run ended (the submitter's restart decision follows from `ending`).
    Exit {
        /// The task.
        task: TaskId,
        /// Which run.
        run: u32,
        /// How it ended.
        ending: Ending,
        /// The process's status, when it ended as a process does.
        exit: Option<TaskExit>,
    },
    /// Agent → submitter: the task's latest checkpoint (every `--checkpoint-every` and on drain).
    Checkpoint {
        /// The task.
        task: TaskId,
        /// Which run.
        run: u32,
        /// The content of `$KECHO_STATE`.
        #[serde(with = "b64")]
        state: Vec<u8>,
    },
    /// Submitter → agent: stop the task (SIGTERM to its process group, SIGKILL after the grace).
    Stop {
        /// The task.
        task: TaskId,
        /// The grace period, milliseconds.
        grace_ms: u64,
    },
    /// Operator → agent, and agent → its submitters: the agent is drained (its owner reclaims the node); its tasks
    /// are checkpointed and stopped, and restart elsewhere as their policy says.
    Drain {
        /// The drained agent.
        agent: AgentName,
        /// Who asked.
        by: String,
    },
    /// Submitter → agents: the submitter is alive (an agent stops a silent submitter's tasks after the heartbeat
    /// timeout).
    Heartbeat {
        /// The submitter.
        submitter: String,
    },
    /// Agent → everyone, three times per heartbeat timeout (at most every second): the agent is alive (a submitter counts its task's node as lost when these stop
    /// for the heartbeat timeout).
    Alive {
        /// The agent.
        agent: AgentName,
        /// Whether it is drained (it takes no new tasks).
        drained: bool,
        /// Its heartbeat timeout, milliseconds: submitters send heartbeats at least three times within it.
        #[serde(default)]
        heartbeat_ms: u64,
    },
    /// Anyone → agents: list your tasks (`kecho ps`); answered with [`ExecMsg::Tasks`] to `reply_to`.
    List {
        /// Where the answer goes.
        reply_to: String,
    },
    /// Agent → asker: the tasks it runs or ran recently.
    Tasks {
        /// The agent.
        agent: AgentName,
        /// Its tasks.
        tasks: Vec<TaskRow>,
    },
    /// Anyone → agents: replay a task's recent output (`kecho logs`); answered with [`ExecMsg::Log`].
    Logs {
        /// Where the answer goes.
        reply_to: String,
        /// The task.
        task: TaskId,
    },
    /// Anyone → a deploying process (`kecho undeploy APP`): stop application `app` in reverse dependency order.
    Undeploy {
        /// The application.
        app: String,
        /// Who asked.
        by: String,
    },
    /// Agent → asker: a task's recent output, in order.
    Log {
        /// The agent.
        agent: AgentName,
        /// The task.
        task: TaskId,
        /// Chunks the bounded log no longer holds (chunks, bytes).
        dropped: (u64, u64),
        /// The chunks it holds.
        chunks: Vec<LogChunk>,
    },
}

/// One task as `kecho ps` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRow {
    /// The task.
    pub task: TaskId,
    /// Which run.
    pub run: u32,
    /// Who submitted it.
    pub submitter: String,
    /// The command line.
    pub argv: Vec<String>,
    /// `running`, `exited N`, `stopped`, `drained`.
    pub state: String,
    /// Milliseconds since the Unix epoch when the run started.
    pub since_ms: u64,
    /// The limits that applied.
    pub limits: String,
}

/// A chunk of a task's recent output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// Which stream.
    pub stream: Stream,
    /// The bytes.
    #[serde(with = "b64")]
    pub data: Vec<u8>,
}

/// A task submission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Submit {
    /// The task.
    pub task: TaskId,
    /// Which run (0 first; a restart carries the next number).
    pub run: u32,
    /// Who asks (the submitter's node identity; logged by the agent and checked against the `exec` right).
    pub submitter: String,
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// kecho's own variables for a deployed component (`KECHO_APP`, `KECHO_COMPONENT`, `KECHO_DEP_<NAME>`).
    #[serde(default)]
    pub kecho_env: Vec<(String, String)>,
    /// The reservation spec.
    pub spec: ReservationSpec,
    /// The reservation made for this run.
    pub placement: Option<Placement>,
    /// The restart policy (decided by the submitter; the agent needs it to know whether to checkpoint).
    pub restart: RestartPolicy,
    /// How often to ship the checkpoint back, milliseconds.
    pub checkpoint_every_ms: Option<u64>,
    /// The last checkpoint, for a restarted task.
    #[serde(with = "b64_opt", default)]
    pub state: Option<Vec<u8>>,
    /// The program is this artifact of the component repository (`argv[0]` names it): the agent fetches it by its
    /// digest, verifies it and runs its verified copy, or refuses the task.
    #[serde(default)]
    pub artifact: Option<crate::repo::Digest>,
}

impl Submit {
    /// The checkpoint interval.
    pub fn checkpoint_every(&self) -> Option<Duration> {
        self.checkpoint_every_ms.map(Duration::from_millis)
    }
}

/// A message that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed exec message: {0}")]
pub struct WireError(#[from] serde_json::Error);

impl ExecMsg {
    /// The kecho event type the message travels as.
    pub fn event_type(&self) -> &'static str {
        match self {
            ExecMsg::Submit(_) => "exec.submit",
            ExecMsg::Started { .. } => "exec.started",
            ExecMsg::Refused { .. } => "exec.refused",
            ExecMsg::Output { .. } => "exec.output",
            ExecMsg::Exit { .. } => "exec.exit",
            ExecMsg::Checkpoint { .. } => "exec.checkpoint",
            ExecMsg::Stop { .. } => "exec.stop",
            ExecMsg::Drain { .. } => "exec.drain",
            ExecMsg::Heartbeat { .. } => "exec.heartbeat",
            ExecMsg::Alive { .. } => "exec.alive",
            ExecMsg::List { .. } => "exec.list",
            ExecMsg::Tasks { .. } => "exec.tasks",
            ExecMsg::Logs { .. } => "exec.logs",
            ExecMsg::Log { .. } => "exec.log",
            ExecMsg::Undeploy { .. } => "exec.undeploy",
        }
    }

    /// An output message for a chunk of run `run`.
    pub fn output(task: &TaskId, run: u32, chunk: OutputChunk) -> ExecMsg {
        ExecMsg::Output { task: task.clone(), run, seq: chunk.seq, stream: chunk.stream, data: chunk.data }
    }

    /// The event payload.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain types to JSON cannot fail (string keys, no non-finite floats reach here unless a
        // caller put NaN CPUs in a spec, which serde_json writes as null).
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads an event payload.
    pub fn decode(payload: &[u8]) -> Result<ExecMsg, WireError> {
        Ok(serde_json::from_slice(payload)?)
    }
}

/// What the submitter makes of an output chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// The next chunk: print it.
    Next,
    /// The first chunk of a new run (a restart): print it.
    NewRun,
    /// Seen already (or from an older run): drop it.
    Duplicate,
    /// Chunks are missing before this one (`missing` of them); print it and say so.
    Gap {
        /// How many chunks are missing.
        missing: u64,
    },
}

/// The submitter's position in a task's output, to print it in order and say what is missing.
#[derive(Debug, Clone, Default)]
pub struct OutputCursor {
    run: u32,
    next: u64,
    missing: u64,
}

impl OutputCursor {
    /// Accounts for a chunk `seq` of run `run`.
    pub fn accept(&mut self, run: u32, seq: u64) -> Accept {
        let new_run = run > self.run;
        if run < self.run || (!new_run && seq < self.next) {
            return Accept::Duplicate;
        }
        if new_run {
            self.run = run;
            self.next = 0;
        }
        let verdict = if seq > self.next {
            let missing = seq - self.next;
            self.missing += missing;
            Accept::Gap { missing }
        } else if new_run {
            Accept::NewRun
        } else {
            Accept::Next
        };
        self.next = seq + 1;
        verdict
    }

    /// How many chunks were missed in all.
    pub fn missing(&self) -> u64 {
        self.missing
    }
}

pub(crate) mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

pub(crate) mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => super::b64::serialize(b, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::b64")] Vec<u8>);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..300)
    }

    fn arb_text() -> impl Strategy<Value = String> + Clone {
        "[ -~]{0,20}"
    }

    fn arb_msg() -> impl Strategy<Value = ExecMsg> {
        let task = arb_text().prop_map(TaskId);
        let agent = arb_text().prop_map(AgentName);
        prop_oneof![
            (
                task.clone(),
                any::<u32>(),
                arb_text(),
                proptest::collection::vec(arb_text(), 0..4),
                proptest::collection::vec((arb_text(), arb_text()), 0..3),
                proptest::option::of(arb_text()),
                proptest::option::of(1u64..1 << 40),
                proptest::option::of(any::<u64>()),
                proptest::option::of(arb_bytes()),
            )
                .prop_map(|(task, run, submitter, argv, env, require, mem, every, state)| {
                    ExecMsg::Submit(Submit {
                        task,
                        run,
                        submitter,
                        argv,
                        env,
                        kecho_env: vec![("KECHO_APP".into(), "shop".into())],
                        spec: ReservationSpec { require, rank: None, cpus: Some(1.5), mem },
                        placement: None,
                        restart: RestartPolicy::OnNodeLoss,
                        checkpoint_every_ms: every,
                        artifact: state.as_ref().map(|s| crate::repo::Digest::of(s)),
                        state,
                    })
                }),
            (task.clone(), any::<u32>(), any::<u64>(), any::<bool>(), arb_bytes()).prop_map(
                |(task, run, seq, err, data)| {
                    ExecMsg::Output { task, run, seq, stream: if err { Stream::Stderr } else { Stream::Stdout }, data }
                }
            ),
            (task.clone(), any::<u32>(), any::<i32>(), proptest::option::of(1i32..64)).prop_map(
                |(task, run, code, signal)| {
                    ExecMsg::Exit { task, run, ending: Ending::Exited(code), exit: Some(TaskExit { code, signal }) }
                }
            ),
            (task.clone(), any::<u32>(), arb_bytes()).prop_map(|(task, run, state)| ExecMsg::Checkpoint {
                task,
                run,
                state
            }),
            (task.clone(), any::<u64>()).prop_map(|(task, grace_ms)| ExecMsg::Stop { task, grace_ms }),
            (agent.clone(), arb_text()).prop_map(|(agent, by)| ExecMsg::Drain { agent, by }),
            (task.clone(), agent.clone(), arb_text()).prop_map(|(task, agent, reason)| ExecMsg::Refused {
                task,
                agent,
                reason
            }),
            (task, any::<u32>(), agent).prop_map(|(task, run, agent)| ExecMsg::Started {
                task,
                run,
                agent,
                limits: LimitReport {
                    mechanism: "rlimit".into(),
                    cgroup: None,
                    applied: vec!["RLIMIT_AS=1".into()],
                    not_enforced: vec![],
                },
            }),
            arb_text().prop_map(|submitter| ExecMsg::Heartbeat { submitter }),
        ]
    }

    proptest! {
        #[test]
        fn every_message_round_trips(msg in arb_msg()) {
            let bytes = msg.encode();
            prop_assert_eq!(ExecMsg::decode(&bytes).unwrap(), msg);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ExecMsg::decode(&bytes);
        }
    }

    #[test]
    fn bytes_travel_as_base64_and_bad_base64_is_refused() {
        let msg = ExecMsg::Output {
            task: TaskId("t".into()),
            run: 0,
            seq: 7,
            stream: Stream::Stdout,
            data: b"hi\n".to_vec(),
        };
        let text = String::from_utf8(msg.encode()).unwrap();
        assert!(text.contains("\"data\":\"aGkK\""), "{text}");
        assert!(text.contains("\"kind\":\"output\""), "{text}");
        assert_eq!(msg.event_type(), "exec.output");
        let bad = text.replace("aGkK", "a!kK");
        assert!(ExecMsg::decode(bad.as_bytes()).is_err());
    }

    #[test]
    fn output_cursor_orders_runs_and_counts_gaps() {
        let mut c = OutputCursor::default();
        assert_eq!(c.accept(0, 0), Accept::Next);
        assert_eq!(c.accept(0, 1), Accept::Next);
        assert_eq!(c.accept(0, 1), Accept::Duplicate);
        assert_eq!(c.accept(0, 4), Accept::Gap { missing: 2 });
        assert_eq!(c.accept(1, 0), Accept::NewRun);
        assert_eq!(c.accept(0, 5), Accept::Duplicate, "an old run's late chunk");
        assert_eq!(c.accept(2, 3), Accept::Gap { missing: 3 });
        assert_eq!(c.missing(), 5);
    }
}
