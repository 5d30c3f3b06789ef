//! Sinks: a local sink's queue and attributes, the [`Sink`] handle, its options, and the typed wrappers.

use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use kecho_proto::{Attrs, LocalId, Overflow, TypeFilter, Value};
use parking_lot::Mutex;

use super::{ChannelInner, NodeGuard, Source};
use crate::error::{Error, PayloadError, Result};
use crate::filter::{ContentFilter, FilterError};
use crate::queue::{Event, RecvError, SinkQueue, SourceKey, Taken, TryRecvError};

/// A sink on this node: what the channel and its sources need of it.
pub(super) struct LocalSink {
    pub(super) id: LocalId,
    pub(super) types: TypeFilter,
    pub(super) filter_expr: Option<String>,
    pub(super) filter: Option<Arc<ContentFilter>>,
    pub(super) attrs: Mutex<Attrs>,
    pub(super) queue: SinkQueue,
}

impl LocalSink {
    /// The sink wants an event of type `ty` with `attrs`: its type filter, then its content filter, as sources
    /// apply them (a replay from elsewhere, e.g. a recorder, is filtered by the same rule through
    /// [`Sink::accepts`]).
    pub(super) fn accepts(&self, ty: &str, attrs: &Attrs) -> bool {
        self.types.accepts(ty) && self.filter.as_ref().is_none_or(|f| f.matches(ty, attrs))
    }
}

/// Options for a new sink.
#[derive(Debug, Default)]
pub struct SinkOptions {
    pub(super) types: TypeFilter,
    pub(super) capacity: Option<usize>,
    pub(super) overflow: Overflow,
    pub(super) attrs: Attrs,
    pub(super) filter: Option<Arc<ContentFilter>>,
    pub(super) filter_error: Option<FilterError>,
}

impl SinkOptions {
    /// Every type, the node's default capacity, drop-oldest.
    pub fn new() -> Self {
        Self::default()
    }
    /// Receive only these event types (sources filter before sending).
    pub fn types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let list: Vec<String> = types.into_iter().map(Into::into).collect();
        self.types = if list.is_empty() { TypeFilter::All } else { TypeFilter::Only(list) };
        self
    }
    /// Queue capacity in events: how many may wait for the sink's receiver. A receive takes every waiting event at
    /// once (except under [`Overflow::DropOldest`], which needs them in the queue to discard the oldest), so while the
    /// receiver works through those, up to this many more may queue behind them.
    pub fn capacity(mut self, n: usize) -> Self {
        self.capacity = Some(n);
        self
    }
    /// What to do when the queue is full.
    pub fn overflow(mut self, o: Overflow) -> Self {
        self.overflow = o;
        self
    }
    /// An attribute this sink supplies to the channel's filters (e.g. its load); change it later with
    /// [`Sink::set_attr`].
    pub fn attr(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.attrs.set(name, value);
        self
    }
    /// A content filter: a CEL expression over the event's `type` and attributes, evaluated at every source (see
    /// [`ContentFilter`]). An invalid expression makes [`Channel::sink`] fail with its position.
    pub fn filter(mut self, expr: &str) -> Self {
        match ContentFilter::compile(expr) {
            Ok(f) => self.filter = Some(Arc::new(f)),
            Err(e) => self.filter_error = Some(e),
        }
        self
    }
}

/// Receives events from a channel.
pub struct Sink {
    ch: Arc<ChannelInner>,
    sink: Arc<LocalSink>,
    /// Events taken from the queue in one go and not yet returned.
    taken: crate::queue::Taken,
    _guard: Arc<NodeGuard>,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("channel", &self.ch.name).finish()
    }
}

impl Sink {
    pub(super) fn new(ch: Arc<ChannelInner>, sink: Arc<LocalSink>, guard: Arc<NodeGuard>) -> Self {
        Sink { ch, sink, taken: Taken::default(), _guard: guard }
    }

    /// Whether this sink's type and content filters accept an event of type `ty` with `attrs`: what sources decide
    /// for its live events, for events that reach it another way (a replay from a recorder).
    pub fn accepts(&self, ty: &str, attrs: &Attrs) -> bool {
        self.sink.accepts(ty, attrs)
    }

    /// The type filter this sink was opened with (e.g. to ask a recorder to apply it to a replay).
    pub fn type_filter(&self) -> &TypeFilter {
        &self.sink.types
    }

    /// The content filter expression this sink was opened with, if any.
    pub fn filter_expr(&self) -> Option<&str> {
        self.sink.filter_expr.as_deref()
    }

    /// The next event, waiting for one. Returns [`RecvError::Lagged`] once where events were missed.
    pub async fn recv(&mut self) -> Result<Event, RecvError> {
        self.sink.queue.recv(&mut self.taken).await
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Result<Event, TryRecvError> {
        self.sink.queue.try_recv(&mut self.taken)
    }

    /// Waits for events and moves up to `max` of them into `out` (appended, in order), taking everything queued
    /// under one lock: the batched form of [`Sink::recv`], for high event rates. Returns how many it moved (at least
    /// one; 0 only for `max` 0). A notice (lag, a lost source, expired events) comes as the error of the call where
    /// it is first, so that `out` never holds events from both sides of it: the events before a notice come in one
    /// call, the notice in the next, the events after it in the one after.
    pub async fn recv_many(&mut self, out: &mut Vec<Event>, max: usize) -> Result<usize, RecvError> {
        self.sink.queue.recv_many(&mut self.taken, out, max).await
    }

    /// [`Sink::recv_many`] without waiting: [`TryRecvError::Empty`] if nothing is queued.
    pub fn try_recv_many(&mut self, out: &mut Vec<Event>, max: usize) -> Result<usize, TryRecvError> {
        if max == 0 {
            return Ok(0);
        }
        self.sink.queue.try_recv_many(&mut self.taken, out, max)
    }

    /// The next event, blocking the thread (for code outside the runtime). `None` waits forever.
    pub fn recv_blocking(&mut self, timeout: Option<Duration>) -> Result<Event, TryRecvError> {
        self.sink.queue.recv_blocking(&mut self.taken, timeout)
    }

    /// Events (and lag notices) as an async stream; ends when the sink is closed.
    pub fn into_stream(self) -> impl Stream<Item = Result<Event, RecvError>> + Send {
        futures_util::stream::unfold(self, |mut s| async move {
            match s.recv().await {
                Err(RecvError::Closed) => None,
                r => Some((r, s)),
            }
        })
    }

    /// Runs `handler` on every event as it arrives, on a task of the current runtime. Lag notices are passed as
    /// `Err`. The task ends when the sink is closed.
    pub fn on_event<F>(mut self, mut handler: F) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(Result<Event, RecvError>) + Send + 'static,
    {
        tokio::spawn(async move {
            loop {
                match self.recv().await {
                    Err(RecvError::Closed) => return,
                    r => handler(r),
                }
            }
        })
    }

    /// Sets an attribute this sink supplies to the channel's filters (published promptly, coalesced).
    pub fn set_attr(&self, name: impl Into<String>, value: impl Into<Value>) {
        self.sink.attrs.lock().set(name, value);
        self.ch.attrs_changed();
    }

    /// Events received into this sink's queue so far.
    pub fn received(&self) -> u64 {
        self.sink.queue.received.load(Ordering::Relaxed)
    }

    /// Events this sink missed so far.
    pub fn dropped(&self) -> u64 {
        self.sink.queue.dropped.load(Ordering::Relaxed)
    }

    /// Events waiting in the queue.
    pub fn len(&self) -> usize {
        self.sink.queue.len(&self.taken)
    }

    /// True if no events are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What became of source `key`, as this sink's node knows it: still a member's, ended after some event, or gone
    /// without an end this node heard. For a sink that received from the source in an earlier life (a durable sink
    /// whose process was killed and started again is a new node, which no source knew and no end was meant for):
    /// `kecho_store::DurableSink` asks it for every source it has a position for and has heard nothing of since, so
    /// that it is told what it missed of a source that ended, or went away, while it was away.
    pub fn source_fate(&self, key: SourceKey) -> super::SourceFate {
        self.ch.source_fate(key)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.sink.queue.close();
        self.ch.remove_member(self.sink.id);
    }
}

/// A source of serde values, sent as JSON.
pub struct TypedSource<T> {
    src: Source,
    ty: String,
    _t: PhantomData<fn(T)>,
}

impl<T> std::fmt::Debug for TypedSource<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSource").field("ty", &self.ty).finish()
    }
}

impl<T> TypedSource<T> {
    pub(super) fn new(src: Source, ty: &str) -> Self {
        TypedSource { src, ty: ty.to_owned(), _t: PhantomData }
    }
}

impl<T: serde::Serialize> TypedSource<T> {
    /// Submits a value with attributes.
    pub async fn submit(&mut self, value: &T, attrs: &Attrs) -> Result<u64> {
        let bytes = serde_json::to_vec(value).map_err(PayloadError::new)?;
        self.src.submit(&self.ty, attrs, &bytes).await
    }
}

/// A sink of serde values.
pub struct TypedSink<T> {
    sink: Sink,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for TypedSink<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedSink").finish()
    }
}

/// What a typed sink yields.
#[derive(Debug)]
pub struct Typed<T> {
    /// The decoded value.
    pub value: T,
    /// The event it came in (type, attributes, sequence number).
    pub event: Event,
}

impl<T> TypedSink<T> {
    pub(super) fn new(sink: Sink) -> Self {
        TypedSink { sink, _t: PhantomData }
    }
}

impl<T: serde::de::DeserializeOwned> TypedSink<T> {
    /// The next value. A payload that does not decode as `T` is an error for that event only.
    pub async fn recv(&mut self) -> Result<Typed<T>> {
        loop {
            match self.sink.recv().await {
                Ok(event) => return Ok(Typed { value: event.decode()?, event }),
                Err(RecvError::Lagged(n)) => tracing::debug!("typed sink missed {n} events"),
                Err(RecvError::SourceLost(k)) => tracing::debug!("typed sink: source {k} is gone"),
                Err(RecvError::Expired(n)) => tracing::debug!("typed sink: {n} events expired"),
                Err(RecvError::Closed) => return Err(Error::Closed(self.sink.ch.name.clone())),
            }
        }
    }

    /// The underlying untyped sink.
    pub fn inner(&mut self) -> &mut Sink {
        &mut self.sink
    }
}
