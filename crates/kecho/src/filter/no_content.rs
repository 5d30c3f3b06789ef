//! Content filters in a build without the `cel` feature: every expression is refused with a reason, so a sink that
//! asks for one learns at once that this build cannot honour it.

use std::marker::PhantomData;

use kecho_proto::Attrs;

use super::FilterError;

/// A sink's content filter (a CEL expression). This build leaves the `cel` feature out, so none compiles.
#[derive(Debug)]
pub struct ContentFilter {
    expr: String,
}

impl ContentFilter {
    /// Refuses `expr`: content filters need the `cel` feature.
    pub fn compile(expr: &str) -> Result<Self, FilterError> {
        Err(FilterError {
            line: 1,
            column: 1,
            message: "content filters need kecho's `cel` feature, which this build leaves out".into(),
            expr: expr.to_owned(),
            marker: "^".into(),
        })
    }

    /// The source text.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// Evaluates against one event (never reached: no filter compiles).
    pub fn matches(&self, _ty: &str, _attrs: &Attrs) -> bool {
        false
    }

    /// True if the direct evaluator handles this expression.
    pub fn is_fast(&self) -> bool {
        true
    }

    pub(crate) fn fast_matches(&self, _ty: &str, _attrs: &Attrs) -> Option<bool> {
        Some(false)
    }

    pub(crate) fn matches_in(&self, _ctx: &FilterContext<'_>) -> bool {
        false
    }
}

/// Stands in for the CEL interpreter's root context.
#[derive(Default)]
pub(crate) struct CelRoot(());

/// Stands in for one event's CEL variables.
pub(crate) struct FilterContext<'a>(PhantomData<&'a ()>);

impl<'a> FilterContext<'a> {
    pub(crate) fn new(_root: &'a CelRoot, _ty: &str, _attrs: &Attrs) -> Self {
        FilterContext(PhantomData)
    }
}
