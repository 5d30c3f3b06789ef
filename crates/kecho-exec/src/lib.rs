//! Remote execution and automatic configuration for kecho, after the Cooperating Peers pattern (remote task
//! submission, execution, monitoring and checkpointing on independently owned workstations) and 2K's Automatic
//! Configuration Service (components with hardware and software prerequisites, a component repository, and the
//! runtime dependency graph that tells dependents when a component fails).
//!
//! - [`app`]: application files (`APP.toml`, one `[component.NAME]` table per component), parsed into typed specs
//!   with errors that name the line.
//! - [`graph`]: the dependency graph (petgraph): a cycle or a missing dependency is refused with the path that shows
//!   it; deploy waves in dependency order and undeploy in reverse.
//! - [`plan`]: the deploy planner, pure: which components may start now, what happens when one fails (which
//!   dependents are told, what the failure policy does), the all-or-nothing placement rule.
//! - [`deploy`]: the deployer, the thin I/O layer that carries out the planner's actions: artifacts resolved and
//!   verified, placement all or nothing, start in dependency order, readiness checks, failure policies, notices,
//!   undeploy; components run through a [`deploy::Launcher`] ([`deploy::LocalLauncher`] on this host).
//! - [`inspect`]: inspection and configuration agents over kecho channels (2K's mobile agents, fanned out by kecho
//!   instead of walking a chain), with the one-by-one point-to-point baseline.
//! - [`module`]: inspection modules, sandboxed WebAssembly programs that run on every inspected node.
//! - [`place`]: the boundary to resource management: the [`place::Placer`] trait that the resources crate will
//!   implement, and an in-memory placer for tests.
//! - [`repo`]: the content-addressed component repository: artifacts named by their SHA-256, verified before
//!   anything runs, and a local cache in front of a remote store.
//! - [`task`]: task supervision on one host (the agent side of `kecho run`): spawn with the task's environment in its
//!   own process group, ordered output chunks, exit status as a shell reports it, cgroup v2 or rlimit limits, the
//!   checkpoint file, and stop.
//! - [`reaper`]: the per-task reaper process (a child subreaper): every descendant of a task stays within reach,
//!   even one that left its process group (`setsid`), and dies with the task or with its agent.
//! - [`agent`]: the agent's bookkeeping around tasks, pure: the output kept for `kecho logs`, submitter leases (a
//!   silent submitter's tasks are stopped), when checkpoints are shipped.
//! - [`submit`]: the submitter side of `kecho run`, pure: place, send, print output in order, restart where the
//!   policy says from the last checkpoint, exit with the task's status.
//! - [`repo_net`]: the repository over kecho channels: repository nodes serve their store, agents fetch what they
//!   lack by digest (and verify it through their cache).
//! - [`resplace`]: the real [`place::Placer`]: attached, renewed reservations negotiated with the resource agents.
//! - [`service`]: the agent side over kecho channels (`kecho agent --allow-exec`): tasks run within their
//!   reservation, output streamed back in order, silent submitters' tasks stopped, drain, audit.
//! - [`remote`]: the submitter side over kecho channels: drives a [`submit::RunSession`] (`kecho run`), and `kecho
//!   ps`, `kecho logs`, `kecho agent drain`.
//! - [`auth`]: the `exec` right: requests signed with the submitter's node key and carrying its credential, checked
//!   by the agent under an access policy.
//! - [`restart`]: the restart policy decision (never, on-failure, on-node-loss) with backoff, pure.
//! - [`wire`]: the messages between submitter and agent (submit, output, exit, stop, drain) as serde types.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod agent;
pub mod app;
pub mod auth;
pub mod deploy;
pub mod graph;
pub mod inspect;
pub mod module;
pub mod place;
pub mod plan;
pub mod reaper;
pub mod remote;
pub mod repo;
pub mod repo_net;
pub mod resplace;
pub mod restart;
pub mod service;
pub mod submit;
pub mod task;
pub mod wire;
