//! Events arriving from other nodes: loss accounting, the IN-filter, and offering them to local sinks under their
//! overflow policies; and lag notices from sources.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use kecho_proto::codec::EventMsg;
use kecho_proto::{Attrs, LocalId, NodeId, Overflow};

use super::sink::LocalSink;
use super::ChannelInner;
use crate::filter::{InDecision, InEvent, LocalSinks};
use crate::link::datagram::{verdict, Verdict};
use crate::link::{Arrived, Batch, Numbered};
use crate::queue::{Event, Offer, SourceKey};

/// Loss accounting at a receiver, per remote source.
#[derive(Default)]
pub(super) struct RecvTrack {
    pub(super) skipped: u64,
    /// The per-node number (`seq - skipped`) of the last event that arrived; 0 before the first.
    pub(super) last: u64,
    /// The source's own sequence number of the last event that arrived; 0 before the first.
    pub(super) last_seq: u64,
    /// How the source's end is accounted for (see `channel::ends`).
    pub(super) end: super::ends::EndTrack,
    /// A `Routed` frame numbered for this instance of the channel arrived: before one, the source's events are
    /// numbered for another instance (an earlier opening of the channel on this node; a source always sends one
    /// before its first event to an instance) and must not set the baseline.
    pub(super) anchored: bool,
    /// The source's own sequence number of the first event that arrived after the anchoring `Routed` (0 before): a
    /// source numbers its events to an instance of the channel from an event submitted after every event it sent to
    /// the instances before, so an event below it (a late datagram, say) was numbered for another instance.
    pub(super) floor: u64,
    /// The instance of the channel on the source's node that the source belongs to, as its `Routed` frames say (0
    /// before the first): a later instance's source is another source with the same local id (see `routed`).
    pub(super) origin_instance: u64,
    /// The source's end arrived from its own node, behind every frame of the source on the link (`RecvTrack::own_end`):
    /// the source sends nothing more, so what arrives under its key until a `Routed` frame of a later instance of
    /// its node's channel starts the track again is stale (a late datagram, whose loss the end counted already, or a
    /// datagram of that later instance's source with the same local id, which overtook the `Routed` frame and the
    /// first event that go on the stream before it, and would otherwise be numbered as the old source's).
    pub(super) ended: bool,
}

impl RecvTrack {
    /// True if event `seq` of the source was numbered for another instance of the channel on this node (see
    /// `anchored`, `floor`): it is ignored, neither delivered nor counted in a gap.
    #[inline]
    pub(super) fn stale(&self, seq: u64) -> bool {
        !self.anchored || seq < self.floor || self.ended
    }

    /// A `Routed` frame of the source arrived, numbered for instance `instance` of the channel on this node, which is
    /// `mine`, from a source of the sender's instance `origin`: false (and nothing changes) if it is another instance
    /// of this node's, or an earlier instance of the sender's than the track's. A later instance of the sender's is
    /// a new source (its node opened the channel again): the track starts again, and the old source's track is
    /// returned, to account for (`ChannelInner::source_gone_with_instance`).
    pub(super) fn routed(
        &mut self,
        instance: u64,
        mine: u64,
        origin: u64,
        skipped: u64,
    ) -> Result<Option<RecvTrack>, ()> {
        if instance != mine || origin < self.origin_instance {
            return Err(());
        }
        let old = self.started_again(origin);
        self.anchored = true;
        self.skipped = skipped;
        Ok(old)
    }

    /// Event `seq` of the source arrived: returns how many events meant for this node went missing before it, or
    /// `None` if it arrived before (a source replays the events that were in flight on a link that broke, some of
    /// which had arrived: see docs/DURABILITY.md).
    fn arrived(&mut self, seq: u64) -> Option<u64> {
        let n = seq.saturating_sub(self.skipped);
        if self.last != 0 && n <= self.last {
            return None;
        }
        let gap = if self.last != 0 && n > self.last + 1 { n - self.last - 1 } else { 0 };
        self.last = self.last.max(n);
        self.last_seq = self.last_seq.max(seq);
        if self.floor == 0 {
            self.floor = seq;
        }
        self.end.alive();
        Some(gap)
    }

    /// `arrived` for the `count` consecutive events of a run from `first`: how many at its start arrived before
    /// (they are dropped) and how many events went missing before the others, or `None` if all of them arrived
    /// before. The same as `arrived` per event: what arrived before is always a prefix of a run.
    fn arrived_run(&mut self, first: u64, count: usize) -> Option<(usize, u64)> {
        let skip = (0..count).find_map(|i| self.arrived(first + i as u64).map(|gap| (i, gap)))?;
        for i in skip.0 + 1..count {
            let gap = self.arrived(first + i as u64);
            debug_assert_eq!(gap, Some(0), "the rest of a run follows without gaps");
        }
        Some(skip)
    }

    /// `arrived` for an event that came as a datagram, `numbered` (`None`: from the stream). A datagram carries its
    /// number; one that is late or would overtake its source's stream is dropped (`None`) and counted in the gap
    /// that a later event reports (see `link::datagram::verdict`).
    fn arrived_as(&mut self, seq: u64, numbered: Option<Numbered>) -> Option<u64> {
        let Some(Numbered { number, after }) = numbered else { return self.arrived(seq) };
        match verdict(self.last, number, after) {
            Verdict::Deliver { gap } => {
                self.last = number;
                self.last_seq = self.last_seq.max(seq);
                self.end.alive();
                Some(gap)
            }
            Verdict::Late | Verdict::Overtook => None,
        }
    }
}

/// The bit mask of the sinks (at most 64) for which `f` holds.
fn mask(sinks: &[Arc<LocalSink>], f: impl Fn(&LocalSink) -> bool) -> u64 {
    sinks.iter().enumerate().fold(0, |m, (j, s)| if f(s) { m | 1 << j } else { m })
}

/// The local sinks an event goes to; on the stack for the common case of a few.
pub(super) type SinkList<'a> = smallvec::SmallVec<[&'a Arc<LocalSink>; 8]>;

impl ChannelInner {
    /// Delivers an event that arrived from another node to the local sinks that want it (only to `targets` if the
    /// source's OUT-filter named some).
    async fn deliver_one(
        &self,
        from: NodeId,
        e: EventMsg,
        targets: Option<Vec<LocalId>>,
        deadline: Option<u64>,
        numbered: Option<Numbered>,
    ) {
        if !self.may_send(from) {
            // A node without the source right: whatever it sends is not the channel's.
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sinks = self.local_sinks.read().clone();
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let gap = {
            let mut tracks = self.tracks.lock();
            let track = tracks.entry((from, e.source)).or_default();
            self.arrive_on(track, from, e.source, e.seq, 1, |t| t.arrived_as(e.seq, numbered)).flatten()
        };
        let Some(gap) = gap else { return };
        if gap > 0 {
            // Events meant for this node were lost on the way (a link broke with them in flight). Which of its sinks
            // wanted them is unknown here, so every sink is told.
            self.counters.missed.fetch_add(gap, Ordering::Relaxed);
            for s in sinks.iter() {
                s.queue.add_lag(gap);
            }
        }
        let chosen: SinkList<'_> = match &targets {
            None => sinks.iter().filter(|s| s.types.accepts(&e.ty)).collect(),
            Some(ids) => sinks.iter().filter(|s| ids.contains(&s.id) && s.types.accepts(&e.ty)).collect(),
        };
        self.dispatch(chosen, e.ty, e.attrs, e.payload, e.seq, SourceKey::new(from, e.source), deadline).await;
    }

    /// Delivers events that arrived together from node `from` (the frames of one read, in order), each with the
    /// sink ids of its `Targets` frame if it had one. The same as `deliver_remote` per event, but the channel's state
    /// is read once and each sink's queue is locked once for the lot instead of once per event.
    pub(crate) async fn deliver_batch(&self, from: NodeId, batch: &mut Batch) {
        if !batch.runs.is_empty() {
            return self.deliver_runs(from, batch).await;
        }
        self.deliver_events(from, batch).await
    }

    /// Delivers the `EventRun` frames of a batch: per run, loss accounting and the type filters once, then its
    /// events built straight into each accepting sink's queue under one lock (waiting for room in a Block sink's
    /// as `offer_to` does). An IN-filter (a decision per event), more sinks than a mask holds, or several accepting
    /// sinks of which one blocks take the per-event path instead.
    async fn deliver_runs(&self, from: NodeId, batch: &mut Batch) {
        let n = std::mem::take(&mut batch.run_events) as u64;
        if !self.may_send(from) {
            self.counters.denied.fetch_add(n, Ordering::Relaxed);
            batch.runs.clear();
            return;
        }
        let sinks = self.local_sinks.read().clone();
        if sinks.len() > 64 || self.in_filter.read().is_some() {
            return self.runs_one_by_one(from, batch).await;
        }
        let block = mask(&sinks, |s| s.queue.overflow() == Overflow::Block);
        let mut runs = std::mem::take(&mut batch.runs);
        let mut todo = runs.drain(..);
        while let Some(run) = todo.next() {
            let m = mask(&sinks, |s| s.types.accepts(&run.ty));
            if m & m.wrapping_sub(1) != 0 && m & block != 0 {
                // Several sinks, one of which may wait: they must be offered each event in step
                // (`offer_staged_in_step`), which the per-event path does. The runs after it follow it there.
                batch.runs.push(run);
                batch.runs.extend(todo);
                return self.runs_one_by_one(from, batch).await;
            }
            self.counters.received.fetch_add(run.count as u64, Ordering::Relaxed);
            let key = SourceKey::new(from, run.source);
            let arrived = {
                let mut tracks = self.tracks.lock();
                let track = tracks.entry((from, run.source)).or_default();
                // A run's events follow one another: all of them were numbered for the same instance.
                let (first, count) = (run.first, run.count);
                self.arrive_on(track, from, run.source, first, count as u64, |t| t.arrived_run(first, count)).flatten()
            };
            let Some((skip, gap)) = arrived else { continue };
            if gap > 0 {
                self.counters.missed.fetch_add(gap, Ordering::Relaxed);
                for s in sinks.iter() {
                    s.queue.add_lag(gap);
                }
            }
            if m == 0 {
                continue;
            }
            let evs = crate::queue::RunEvents::new(run, skip, key);
            for (j, s) in sinks.iter().enumerate() {
                let bit = 1u64 << j;
                if m & bit == 0 {
                    continue;
                }
                if m >> j == 1 {
                    self.offer_run_to(s, evs).await;
                    break;
                }
                self.offer_run_to(s, evs.clone()).await;
            }
        }
        drop(todo);
        batch.runs = runs;
    }

    /// A batch's runs through the per-event path, as the events of single `Event` frames.
    async fn runs_one_by_one(&self, from: NodeId, batch: &mut Batch) {
        batch.run_events = 0;
        for run in batch.runs.drain(..) {
            batch.events.extend(run.events().map(|e| Arrived::new(e, None, None)));
        }
        self.deliver_events(from, batch).await
    }

    /// `deliver_batch` for single events.
    async fn deliver_events(&self, from: NodeId, batch: &mut Batch) {
        let Batch { events, staged, .. } = batch;
        if !self.may_send(from) {
            self.counters.denied.fetch_add(events.len() as u64, Ordering::Relaxed);
            events.clear();
            return;
        }
        let sinks = self.local_sinks.read().clone();
        if sinks.len() > 64 || self.in_filter.read().is_some() {
            // An IN-filter decides per event; more sinks than a mask holds are rare. Both take the per-event path.
            for a in events.drain(..) {
                let numbered = a.numbered();
                let (event, targets, deadline) = a.parts();
                self.deliver_one(from, event, targets, deadline, numbered).await;
            }
            return;
        }
        self.counters.received.fetch_add(events.len() as u64, Ordering::Relaxed);
        staged.clear();
        // Which sinks accept the last type seen (events of one link share their type name's allocation).
        let mut by_type: Option<(Arc<str>, u64)> = None;
        let mut evs = events.drain(..);
        loop {
            // Loss accounting under one lock for a run of events; a gap ends the run, since the sinks must see its lag
            // notice after the events before it and before the event that revealed it.
            let mut after_gap = None;
            {
                let mut tracks = self.tracks.lock();
                for a in evs.by_ref() {
                    let numbered = a.numbered();
                    let (e, chosen, deadline) = a.parts();
                    let track = tracks.entry((from, e.source)).or_default();
                    let arrived = self.arrive_on(track, from, e.source, e.seq, 1, |t| t.arrived_as(e.seq, numbered));
                    let Some(gap) = arrived.flatten() else { continue };
                    let types = match &by_type {
                        Some((ty, m)) if Arc::ptr_eq(ty, &e.ty) => *m,
                        _ => {
                            let m = mask(&sinks, |s| s.types.accepts(&e.ty));
                            by_type = Some((e.ty.clone(), m));
                            m
                        }
                    };
                    let m = match &chosen {
                        None => types,
                        Some(ids) => types & mask(&sinks, |s| ids.contains(&s.id)),
                    };
                    let ev = Event::new(e.ty, e.attrs, e.payload, e.seq, SourceKey::new(from, e.source), deadline);
                    if gap > 0 {
                        after_gap = Some((gap, ev, m));
                        break;
                    }
                    if m != 0 {
                        staged.push((ev, m));
                    }
                }
            }
            self.offer_staged(&sinks, staged).await;
            let Some((gap, ev, m)) = after_gap else { return };
            // Events meant for this node were lost on the way (a link broke with them in flight). Which of its sinks
            // wanted them is unknown here, so every sink is told.
            self.counters.missed.fetch_add(gap, Ordering::Relaxed);
            for s in sinks.iter() {
                s.queue.add_lag(gap);
            }
            if m != 0 {
                staged.push((ev, m));
            }
        }
    }

    /// Offers staged events (each with the mask of the local sinks it goes to) sink by sink, in order, and empties
    /// the list.
    async fn offer_staged(&self, sinks: &[Arc<LocalSink>], staged: &mut Vec<(Event, u64)>) {
        let all = staged.iter().fold(0, |acc, (_, m)| acc | m);
        if all & all.wrapping_sub(1) != 0 && sinks.iter().any(|s| s.queue.overflow() == Overflow::Block) {
            return self.offer_staged_in_step(sinks, staged).await;
        }
        // One sink, or none that waits: no sink can hold back another's share.
        for (j, s) in sinks.iter().enumerate() {
            let bit = 1u64 << j;
            if all & bit == 0 {
                continue;
            }
            if all >> j == 1 {
                // The last sink takes the events themselves rather than copies.
                self.offer_to(s, staged.drain(..).filter(|(_, m)| m & bit != 0).map(|(e, _)| e)).await;
            } else {
                self.offer_to(s, staged.iter().filter(|(_, m)| m & bit != 0).map(|(e, _)| e.clone())).await;
            }
        }
        staged.clear();
    }

    /// `offer_staged` for several sinks of which some block: as on the per-event path, a sink waits for room for an
    /// event only once every sink has been offered every event before it. Each sink takes what fits without waiting;
    /// then the wait is for the earliest event a full sink refused. Offering sink by sink instead would let a full
    /// sink withhold events another sink has room for, and a reader of both in turn would wait forever.
    async fn offer_staged_in_step(&self, sinks: &[Arc<LocalSink>], staged: &mut Vec<(Event, u64)>) {
        // Per sink, the index in `staged` of the next event to offer it.
        let mut next = vec![0usize; sinks.len()];
        loop {
            // The earliest refused event: (its index, the sink).
            let mut earliest: Option<(usize, usize)> = None;
            for (j, s) in sinks.iter().enumerate() {
                let bit = 1u64 << j;
                let start = next[j];
                let mut reached = staged.len();
                let evs = staged[start..].iter().enumerate().filter(|(_, (_, m))| m & bit != 0).map(|(i, (e, _))| {
                    reached = start + i;
                    e.clone()
                });
                let (_, dropped, stop) = s.queue.offer_many(evs);
                if dropped > 0 {
                    self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
                }
                next[j] = match stop {
                    Some(Offer::Full(_)) => {
                        if earliest.is_none_or(|(at, _)| reached < at) {
                            earliest = Some((reached, j));
                        }
                        reached
                    }
                    // Everything offered, or the sink is closed.
                    _ => staged.len(),
                };
            }
            let Some((at, j)) = earliest else { break };
            match sinks[j].queue.offer_wait(staged[at].0.clone()).await {
                Offer::Dropped => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    next[j] = at + 1;
                }
                Offer::Closed => next[j] = staged.len(),
                _ => next[j] = at + 1,
            }
        }
        staged.clear();
    }

    /// Offers a run to one sink: queued whole if it fits, else event by event as `offer_to` does.
    async fn offer_run_to(&self, s: &LocalSink, evs: crate::queue::RunEvents) {
        if let Err(evs) = s.queue.offer_run(evs) {
            self.offer_to(s, evs).await;
        }
    }

    /// Offers events to one sink under its overflow policy, waiting for room if it blocks.
    async fn offer_to(&self, s: &LocalSink, mut evs: impl Iterator<Item = Event>) {
        loop {
            let (_, dropped, stop) = s.queue.offer_many(&mut evs);
            if dropped > 0 {
                self.counters.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
            match stop {
                Some(Offer::Full(ev)) => match s.queue.offer_wait(ev).await {
                    Offer::Dropped => {
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Offer::Closed => return,
                    _ => {}
                },
                _ => return,
            }
        }
    }

    /// Event `seq` of source `source` of node `from` is stale for that source's track `track`: while the track is not
    /// anchored by a `Routed` frame (which a source sends before its first event to an instance, and which travels
    /// behind its earlier frames), the event is of the source of an earlier instance of `from`'s channel whose track
    /// waits apart for its end (`ChannelInner::source_gone_with_instance`), if one does. Applies `f` to that track
    /// then (the event is delivered and counted in it); `None` if there is none or the event is stale for it too.
    /// Applies `arrive` to the track that event `seq` of `from`'s `source` belongs to: `track`, the key's current one,
    /// or, for an event stale there, an earlier instance's track still waiting apart (`with_retired`). `None` for an
    /// event stale in both, counted as `count` stale events (a run's length, or 1). The retired tracks are looked at
    /// only for stale events.
    fn arrive_on<R>(
        &self,
        track: &mut RecvTrack,
        from: NodeId,
        source: LocalId,
        seq: u64,
        count: u64,
        arrive: impl FnOnce(&mut RecvTrack) -> R,
    ) -> Option<R> {
        if !track.stale(seq) {
            return Some(arrive(track));
        }
        let arrived = self.with_retired(track, from, source, seq, arrive);
        if arrived.is_none() {
            self.counters.stale.fetch_add(count, Ordering::Relaxed);
        }
        arrived
    }

    fn with_retired<R>(
        &self,
        track: &RecvTrack,
        from: NodeId,
        source: LocalId,
        seq: u64,
        f: impl FnOnce(&mut RecvTrack) -> R,
    ) -> Option<R> {
        if track.anchored {
            return None;
        }
        let mut retired = self.retired.lock();
        let (_, old) = retired
            .iter_mut()
            .filter(|((n, s, _), _)| *n == from && *s == source)
            .max_by_key(|((_, _, instance), _)| *instance)?;
        if old.stale(seq) {
            return None;
        }
        Some(f(old))
    }

    /// False if the channel's policy requires the source right and node `from` does not hold it.
    fn may_send(&self, from: NodeId) -> bool {
        !self.guard_sources.load(Ordering::Acquire) || self.senders.read().contains(&from)
    }

    /// A remote source says how many of its events so far were not meant for this node (see `Message::Routed`),
    /// numbering them for instance `instance` of the channel here: ignored (and counted) if that is not this one.
    pub(crate) fn routed(self: &Arc<Self>, from: NodeId, source: LocalId, instance: u64, origin: u64, skipped: u64) {
        let r = self.tracks.lock().entry((from, source)).or_default().routed(instance, self.instance, origin, skipped);
        match r {
            Err(()) => _ = self.counters.stale.fetch_add(1, Ordering::Relaxed),
            Ok(Some(old)) => self.source_gone_with_instance(from, source, old),
            Ok(None) => {}
        }
    }

    /// Runs the IN-filter, then offers the event to the chosen local sinks under their overflow policies.
    /// Runs the channel's IN-filter (if any) over an event bound for the local `sinks`: the sinks it keeps, or `None`
    /// (counted as filtered) when it drops the event. The filter may rewrite `attrs`.
    pub(super) fn in_filtered<'a>(
        &self,
        sinks: SinkList<'a>,
        ty: &str,
        attrs: &mut Attrs,
        payload: &Bytes,
    ) -> Option<SinkList<'a>> {
        let Some(f) = self.in_filter.read().clone() else { return Some(sinks) };
        let sink_attrs: Vec<Attrs> = sinks.iter().map(|s| s.attrs.lock().clone()).collect();
        let decision = {
            let mut ev = InEvent { ty, attrs, payload };
            f.filter(&mut ev, &LocalSinks { attrs: &sink_attrs })
        };
        match decision {
            InDecision::Deliver => Some(sinks),
            InDecision::Drop => {
                self.counters.filtered.fetch_add(1, Ordering::Relaxed);
                None
            }
            InDecision::Only(keep) => {
                Some(sinks.into_iter().enumerate().filter(|(i, _)| keep.contains(i)).map(|(_, s)| s).collect())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn dispatch(
        &self,
        sinks: SinkList<'_>,
        ty: Arc<str>,
        mut attrs: Attrs,
        payload: Bytes,
        seq: u64,
        source: SourceKey,
        deadline: Option<u64>,
    ) {
        let Some(sinks) = self.in_filtered(sinks, &ty, &mut attrs, &payload) else { return };
        if sinks.is_empty() {
            return;
        }
        let ev = Event::new(ty, attrs, payload, seq, source, deadline);
        for s in sinks {
            let outcome = if s.queue.overflow() == Overflow::Block {
                s.queue.offer_wait(ev.clone()).await
            } else {
                s.queue.offer(ev.clone())
            };
            if matches!(outcome, Offer::Dropped) {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Event `seq` of remote source `source` (of type `ty`, meant for `ids`, or every local sink accepting `ty` if
    /// empty) passed its deadline before its node sent it: it counts as arrived in the source's numbering, and its
    /// sinks are told it expired.
    pub(crate) fn remote_expired(&self, from: NodeId, source: LocalId, seq: u64, ty: &str, ids: &[LocalId]) {
        if !self.may_send(from) {
            return;
        }
        let sinks = self.local_sinks.read().clone();
        let gap = {
            let mut tracks = self.tracks.lock();
            let track = tracks.entry((from, source)).or_default();
            self.arrive_on(track, from, source, seq, 1, |t| t.arrived(seq)).flatten()
        };
        let Some(gap) = gap else { return };
        if gap > 0 {
            self.counters.missed.fetch_add(gap, Ordering::Relaxed);
            for s in sinks.iter() {
                s.queue.add_lag(gap);
            }
        }
        self.counters.expired.fetch_add(1, Ordering::Relaxed);
        for s in sinks.iter().filter(|s| (ids.is_empty() || ids.contains(&s.id)) && s.types.accepts(ty)) {
            s.queue.add_expired(1);
        }
    }

    /// A source did not deliver `count` events meant for `ids` (every local sink if empty) of instance `instance`
    /// of the channel here: its link was full, or this node was cut off from the channel. Ignored (and counted as
    /// stale) if that is another instance: its sinks are not this one's, even where their local ids are the same.
    pub(crate) fn remote_lag(&self, from: NodeId, instance: u64, count: u64, ids: &[LocalId]) {
        if !self.may_send(from) {
            // Only a node that may publish can have missed events for our sinks.
            return;
        }
        if instance != self.instance {
            self.counters.stale.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let sinks = self.local_sinks.read().clone();
        self.counters.missed.fetch_add(count, Ordering::Relaxed);
        for s in sinks.iter().filter(|s| ids.is_empty() || ids.contains(&s.id)) {
            s.queue.add_lag(count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::datagram;

    /// One event as a source sends it to a node: its number, and `Some(after)` if it went as a datagram.
    type Sent = (u64, Option<u64>);

    /// Sends events to a node as a source does: `best_effort[i]` says whether event `i + 1` may go as a datagram
    /// (`datagram::numbers` decides whether it does), the others go on the stream.
    fn send(best_effort: &[bool]) -> Vec<Sent> {
        let (mut routed, mut stream_last) = (0, 0);
        let mut out = Vec::new();
        for &be in best_effort {
            match datagram::numbers(routed, stream_last).filter(|_| be) {
                Some((number, after)) => out.push((number, Some(after))),
                None => {
                    stream_last = routed + 1;
                    out.push((stream_last, None));
                }
            }
            routed += 1;
        }
        out
    }

    /// Receives `arrivals` (stream events in their order, datagrams anywhere among them) and checks the account: what
    /// is delivered is in order with every number skipped before it reported right there, every stream event is
    /// delivered, and once the last event (on the stream) is in, everything is delivered or reported.
    fn receive(arrivals: &[Sent], total: u64, case: &str) {
        let mut track = RecvTrack::default();
        let (mut prev, mut reported, mut delivered) = (0, 0, 0);
        for &(number, after) in arrivals {
            let numbered = after.map(|after| Numbered { number, after });
            let Some(gap) = track.arrived_as(number, numbered) else {
                assert!(after.is_some(), "{case}: stream event {number} dropped");
                continue;
            };
            assert!(number > prev, "{case}: {number} delivered after {prev}");
            assert_eq!(gap, number - prev - 1, "{case}: events missed before {number} not reported in place");
            (prev, reported, delivered) = (number, reported + gap, delivered + 1);
        }
        assert_eq!(prev, total, "{case}: the last event is delivered");
        assert_eq!(delivered + reported, total, "{case}: every event delivered or reported");
    }

    /// Best-effort events sent as datagrams before a source's first stream event, that are lost or read after it,
    /// are reported: the stream event that the receiver takes as its baseline is the source's first event. (The
    /// source used to send its first best-effort events as datagrams; a reliable event after them, read first, hid
    /// their loss: `mixed_paths_keep_order_and_reliable_events` failed that way once events of several KiB went as
    /// datagrams.)
    #[test]
    fn datagrams_lost_or_late_before_the_first_stream_event_are_reported() {
        // Three best-effort events, then a reliable one, then best-effort ones and a reliable end.
        let pattern = [true, true, true, false, true, true, false];
        let sent = send(&pattern);
        let total = pattern.len() as u64;
        // Every datagram lost: the stream events alone must report them.
        let stream: Vec<Sent> = sent.iter().copied().filter(|s| s.1.is_none()).collect();
        receive(&stream, total, "datagrams lost");
        // Every datagram read after all of the stream.
        let late: Vec<Sent> = stream.iter().chain(sent.iter().filter(|s| s.1.is_some())).copied().collect();
        receive(&late, total, "datagrams late");
        // Every datagram read before all of the stream.
        let early: Vec<Sent> = sent.iter().filter(|s| s.1.is_some()).chain(stream.iter()).copied().collect();
        receive(&early, total, "datagrams early");
        assert_eq!(sent[0], (1, None), "a source's first event to a node goes on the stream");
        assert!(sent[1..].iter().all(|&(_, after)| after != Some(0)), "every datagram names a stream event");
    }

    /// The same for many mixes of best-effort and reliable events and many arrival orders (datagrams lost, reordered
    /// among themselves, ahead of or behind the stream; the stream in order), from a fixed pseudo-random sequence.
    #[test]
    fn every_arrival_order_of_datagrams_and_stream_keeps_the_account_exact() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for round in 0..3000 {
            let len = 2 + rnd(12) as usize;
            // The last event is reliable: it shows the receiver everything before it.
            let pattern: Vec<bool> = (0..len).map(|i| i + 1 < len && rnd(4) != 0).collect();
            let sent = send(&pattern);
            let mut stream: std::collections::VecDeque<Sent> = sent.iter().copied().filter(|s| s.1.is_none()).collect();
            let mut dgrams: Vec<Sent> = sent.iter().copied().filter(|s| s.1.is_some() && rnd(3) != 0).collect();
            let mut arrivals = Vec::new();
            while !stream.is_empty() || !dgrams.is_empty() {
                if !dgrams.is_empty() && (stream.is_empty() || rnd(2) == 0) {
                    arrivals.push(dgrams.swap_remove(rnd(dgrams.len() as u64) as usize));
                } else if let Some(s) = stream.pop_front() {
                    arrivals.push(s);
                }
            }
            receive(&arrivals, len as u64, &format!("round {round}: {sent:?} arriving as {arrivals:?}"));
        }
    }

    /// A receiver takes a source's events as its own only after a `Routed` frame numbered for its instance of the
    /// channel, and then only from the first event after it on: events of another instance's numbering (before the
    /// frame, or a late datagram below that first event) are stale, whatever their numbers say.
    #[test]
    fn only_events_numbered_for_this_instance_count() {
        let mut track = RecvTrack::default();
        assert!(track.stale(1), "no Routed frame yet: an earlier instance's event");
        assert!(track.routed(7, 9, 1, 300).is_err(), "another instance's Routed frame is refused");
        assert!(track.stale(301) && track.skipped == 0, "and changes nothing");
        assert!(matches!(track.routed(9, 9, 1, 499), Ok(None)));
        assert!(!track.stale(500));
        assert_eq!(track.arrived(500), Some(0), "the first event sets the baseline");
        assert!(track.stale(480), "an event submitted before the first one was numbered for another instance");
        assert!(!track.stale(501));
        assert_eq!(track.arrived_as(502, Some(Numbered { number: 3, after: 1 })), Some(1));
    }

    /// A source whose end came from its own node sends nothing more: a datagram that arrives under its key after that
    /// (here one of a later instance's source with the same local id, sent after that source's first event, which
    /// travels on the stream with its `Routed` frame, and arriving before them) is stale. It used to be numbered as the
    /// old source's, delivered ahead of the new source's first event, and then reported missed as well.
    #[test]
    fn nothing_counts_after_a_sources_own_end_until_a_later_instances_source_starts() {
        use super::super::ends::{End, Verdict};
        let mut track = RecvTrack::default();
        assert!(matches!(track.routed(9, 9, 5, 0), Ok(None)));
        assert_eq!(track.arrived(1), Some(0));
        let end = End::of(
            NodeId(7),
            9,
            1,
            &[kecho_proto::codec::EndDest { node: NodeId(7), instance: 9, routed: 1, missed: Vec::new() }],
        )
        .0;
        assert_eq!(track.own_end(&end), Some(Verdict::Quiet));
        assert!(track.stale(2), "a datagram of the later instance's source, ahead of its Routed frame");
        let mut old = track.routed(9, 9, 6, 0).expect("the later instance's source").expect("the old one's track");
        assert_eq!(old.instance_gone(), super::super::ends::Gone::Now(None), "the old one was accounted for");
        assert!(!track.stale(1));
        assert_eq!(track.arrived(1), Some(0), "its first event sets the baseline");
        assert_eq!(
            track.arrived_as(3, Some(Numbered { number: 3, after: 1 })),
            Some(1),
            "the stale datagram is missed"
        );
    }

    /// A `Routed` frame from a later instance of the sender's channel names a new source with the old one's local id
    /// (the sender opened the channel again): the track starts again, and the old source is reported gone; frames of
    /// an earlier instance of the sender's are refused.
    #[test]
    fn a_source_of_a_later_instance_of_its_nodes_channel_is_a_new_source() {
        let mut track = RecvTrack::default();
        assert!(matches!(track.routed(9, 9, 5, 0), Ok(None)));
        for seq in 1..=30 {
            assert_eq!(track.arrived(seq), Some(0));
        }
        let mut old = track.routed(9, 9, 6, 0).expect("the later instance's source").expect("the old source is gone");
        assert_eq!(old.instance_gone(), super::super::ends::Gone::AwaitEnd, "its end may be on its way");
        assert_eq!(track.arrived(1), Some(0), "the new source's first event is delivered");
        assert!(track.routed(9, 9, 5, 40).is_err(), "a late frame of the old instance is refused");
        assert_eq!((track.skipped, track.origin_instance), (0, 6), "and changes nothing");
        assert_eq!(track.arrived(2), Some(0));
    }

    /// `arrived_run` decides as `arrived` per event would, from every state a source's track can be in: what arrived
    /// before (skipped), the gap before the rest, and the track afterwards.
    #[test]
    fn a_run_is_accounted_for_as_its_events_one_by_one() {
        for skipped in 0..4 {
            for last in 0..8 {
                for first in 1..10 {
                    for count in 1..6usize {
                        let track = || RecvTrack { skipped, last, last_seq: last + skipped, ..RecvTrack::default() };
                        let mut one = track();
                        let each: Vec<Option<u64>> = (0..count).map(|i| one.arrived(first + i as u64)).collect();
                        let want = each.iter().position(Option::is_some).map(|i| (i, each[i].unwrap_or(0)));
                        let mut run = track();
                        let case = (skipped, last, first, count);
                        assert_eq!(run.arrived_run(first, count), want, "{case:?}: {each:?}");
                        assert_eq!((run.last, run.last_seq), (one.last, one.last_seq), "{case:?}");
                    }
                }
            }
        }
    }
}
