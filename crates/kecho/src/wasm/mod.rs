//! Sandboxed filters: WebAssembly modules run by wasmtime, with limits on fuel (CPU), memory and wall time.
//!
//! The ABI (version 1) is documented in docs/FILTERS.md. In short, a module exports `memory`, `kecho_buffer() -> i32`
//! (where the host writes the input, at least 64 KiB), and `kecho_select(len: i32) -> i32` (an OUT-filter: returns
//! -1 for every sink, or `n` after writing `n` little-endian `u32` sink indices at the buffer) or
//! `kecho_accept(len: i32) -> i32` (an IN-filter: 1 deliver, 0 drop). The input at the buffer is:
//!
//! | offset | field |
//! |---|---|
//! | 0 | `u32` ABI version (1) |
//! | 4 | `u32` number of sinks |
//! | 8 | `u32` offset of the event (from the buffer) |
//! | 12 | `u32` offset of the sinks |
//! | event | `u32` type length, type bytes, attributes (wire encoding), `u32` payload length, payload |
//! | sinks | per sink: attributes (wire encoding), `u64` age in milliseconds |
//!
//! A module that traps, runs out of fuel or wall time, grows memory past its limit, or returns nonsense is disabled
//! for its channel: delivery falls back to the default (every sink / deliver) and a [`FilterFault`] is reported.

#[cfg(feature = "wasm")]
mod sandbox;
#[cfg(not(feature = "wasm"))]
#[path = "disabled.rs"]
mod sandbox;

use std::time::Duration;

use kecho_proto::codec::FilterKind;

pub(crate) use sandbox::{WasmFilter, WasmIn, WasmOut};

/// Size of the input region a module must offer.
pub const MIN_BUFFER: usize = 64 * 1024;
/// Largest module accepted, in bytes.
pub const MAX_MODULE: usize = 1 << 20;
/// Resource limits of one sandboxed filter.
#[derive(Clone, Copy, Debug)]
pub struct WasmLimits {
    /// Fuel per call (roughly, WebAssembly instructions).
    pub fuel: u64,
    /// Largest linear memory, in bytes.
    pub memory: usize,
    /// Longest wall time per call.
    pub wall_time: Duration,
}

impl Default for WasmLimits {
    fn default() -> Self {
        WasmLimits { fuel: 1_000_000, memory: 4 << 20, wall_time: Duration::from_millis(20) }
    }
}

/// A sandboxed filter stopped working and was disabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterFault {
    /// Channel.
    pub channel: String,
    /// OUT or IN.
    pub kind: FilterKind,
    /// What went wrong.
    pub reason: String,
}

/// Why a module was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WasmError {
    /// This build of the node has no WebAssembly runtime (kecho's `wasm` feature is off).
    #[error("sandboxed filters need kecho's `wasm` feature, which this build of the node leaves out")]
    Unsupported,
    /// The module is larger than [`MAX_MODULE`].
    #[error("invalid filter module: module of {len} bytes exceeds {MAX_MODULE} bytes")]
    TooLarge {
        /// Its size in bytes.
        len: usize,
    },
    /// The module did not compile (binary or text format), with the runtime's explanation.
    #[error("invalid filter module: {message}")]
    Compile {
        /// The runtime's explanation.
        message: String,
    },
    /// The module compiled but could not be instantiated (it imports something, or its start function trapped).
    #[error("invalid filter module: cannot instantiate: {message}")]
    Instantiate {
        /// The runtime's explanation.
        message: String,
    },
    /// The module lacks an export the ABI requires, or has it with another type.
    #[error("invalid filter module: no `{name}: {signature}` export")]
    MissingExport {
        /// The export's name.
        name: &'static str,
        /// Its required type.
        signature: &'static str,
    },
    /// `kecho_buffer` trapped.
    #[error("invalid filter module: kecho_buffer trapped: {message}")]
    BufferTrapped {
        /// The runtime's explanation.
        message: String,
    },
    /// The buffer `kecho_buffer` returned does not hold [`MIN_BUFFER`] bytes inside the module's memory.
    #[error("invalid filter module: the buffer must hold {MIN_BUFFER} bytes inside the memory (offset {offset})")]
    BadBuffer {
        /// The offset it returned.
        offset: i64,
    },
    /// The runtime refused the limits (fuel) set for the module.
    #[error("invalid filter module: cannot set its limits: {message}")]
    Limits {
        /// The runtime's explanation.
        message: String,
    },
}
