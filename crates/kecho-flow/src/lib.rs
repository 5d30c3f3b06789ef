//! kecho flows: an application declares a data path — a source, transforms, sinks — and the runtime moves the
//! bytes (after "Adding a Flow-Oriented Paradigm to Commodity Operating Systems", Soviani, Edwards, Keromytis).
//!
//! - [`spec`]: the SPEC language (`tcp-listen:0.0.0.0:9000 ! decrypt aes-256-gcm key=k ! file:/data/out`).
//! - [`record`]: the documented AES-256-GCM record format of encrypted flows.
//! - [`sched`]: the scheduler's decisions (bounding stage, replication on the cores free, reordering, rate limits,
//!   shares) and the pipeline simulation they are tested against.
//! - [`ladder`]: the exception ladder's decisions.
//!
//! The pure modules do no I/O; the runtime that moves bytes is a thin layer of threads and system calls on top.
//! The design is in docs/FLOWS.md.
#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod control;
pub mod endpoint;
pub mod ladder;
pub mod record;
pub mod runtime;
pub mod sched;
pub mod spec;
pub mod stage;
pub mod stats;
pub mod wasm;

pub use ladder::Decision;
pub use record::RecordError;
pub use runtime::{
    warmed_up, Flow, FlowBuilder, FlowEvent, FlowHandle, FlowWatcher, ReplicaPlanner, Scheduler, WARM_UP_BYTES,
    WARM_UP_TIME,
};
pub use spec::{parse, Endpoint, EndpointSpec, FlowSpec, SpecError, TransformSpec};
pub use stats::{FlowStats, StageStats};

/// Why a flow could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlowError {
    /// The spec does not parse.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A configuration problem (a key or module file, a missing channel object).
    #[error("{0}")]
    Config(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// Encrypted input did not authenticate or is malformed; nothing of the bad record was written.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A transform failed (corrupt compressed data, a sandboxed module trapped or ran out of fuel).
    #[error("transform failed: {0}")]
    Transform(String),
    /// A kecho channel endpoint failed.
    #[error("channel: {0}")]
    Channel(String),
    /// The exception ladder ran out of rungs for an endpoint.
    #[error("terminated: {endpoint}: {reason}")]
    Terminated {
        /// The endpoint.
        endpoint: String,
        /// The last error.
        reason: String,
    },
    /// Stopped by its handle.
    #[error("stopped")]
    Stopped,
}
