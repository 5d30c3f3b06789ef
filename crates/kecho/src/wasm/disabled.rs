//! Sandboxed filters in a build without the `wasm` feature: every module is refused with a reason, locally
//! ([`crate::Channel::install_filter`] fails) and from peers (the install is answered with the refusal).

use std::sync::Arc;

use kecho_proto::codec::FilterKind;

use super::{WasmError, WasmLimits};
use crate::filter::{EventView, InDecision, InEvent, InFilter, LocalSinks, OutFilter, SinkView};

/// A filter module; none can be built without the `wasm` feature.
pub(crate) struct WasmFilter {
    never: std::convert::Infallible,
}

impl WasmFilter {
    /// Refuses every module.
    pub(crate) fn new(
        _kind: FilterKind,
        _module: &[u8],
        _limits: WasmLimits,
        _on_fault: Box<dyn Fn(String) + Send + Sync>,
    ) -> Result<Self, WasmError> {
        Err(WasmError::Unsupported)
    }
}

/// A sandboxed OUT-filter (never built).
pub(crate) struct WasmOut(pub(crate) Arc<WasmFilter>);

impl OutFilter for WasmOut {
    fn select(&self, _event: &EventView<'_>, _sinks: &SinkView<'_>, _chosen: &mut Vec<usize>) {
        match self.0.never {}
    }
}

/// A sandboxed IN-filter (never built).
pub(crate) struct WasmIn(pub(crate) Arc<WasmFilter>);

impl InFilter for WasmIn {
    fn filter(&self, _event: &mut InEvent<'_>, _sinks: &LocalSinks<'_>) -> InDecision {
        match self.0.never {}
    }
}
