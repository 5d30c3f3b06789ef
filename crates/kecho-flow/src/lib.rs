//! kecho flows: an application declares a data path — a source, transforms, sinks — and the runtime moves the
//! bytes (after "Adding a Flow-Oriented Paradigm to Commodity Operating Systems", Soviani, Edwards, Keromytis).
//!
//! - [`spec`]: the SPEC language (`tcp-listen:0.0.0.0:9000 ! decrypt aes-256-gcm key=k ! file:/data/out`).
//! - [`record`]: the documented AES-256-GCM record format of encrypted flows.
//! - [`sched`]: the scheduler's decisions (bounding stage, replication, reordering, rate limits, shares).
//! - [`ladder`]: the exception ladder's decisions.
//!
//! The pure modules do no I/O; the runtime that moves bytes is a thin layer of threads and system calls on top.
//! The design is in docs/FLOWS.md.
#![forbid(unsafe_code)]

pub mod ladder;
pub mod record;
pub mod sched;
pub mod spec;
