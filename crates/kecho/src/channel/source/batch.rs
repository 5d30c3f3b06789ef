//! Batched submits: many events of one type with the same attributes, routed once per run of them.
//!
//! `Source::submit_many` takes the steps of `Source::submit_inner` once for a run of events instead of once per
//! event: the routing table, the type's sinks and content filters, the room check at Block sinks, the counters, one
//! lock of each link's outbox and one wake-up of its writer. The events are encoded once, in compact `EventRun` frames
//! (one header per up to 4 KiB of events; docs/PROTOCOL.md, "Event runs") that receivers take apart into the very
//! events single submits would have sent, or as `Event` frames of their own where an event must stand alone on the
//! wire (kept for a replay, or behind its own `Targets` frame); every link's outbox queues the run as one shared piece
//! of memory (no copy per link). Whatever needs a decision per event (an OUT-filter, a deadline,
//! best-effort datagrams, tree mode, cut-off sinks, a non-waiting submit to a local Block sink) takes the per-event
//! path for the batch, so every guarantee holds as it does for single submits.

use std::ops::Range;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use kecho_proto::codec::{encode_event, encode_event_run, encode_routed, encode_targets};
use kecho_proto::{Attrs, Overflow};

use super::{track_for, Encoder, LendOnExit, SendTrack, Source, Timing, Told, ENCODE_CHUNK};
use crate::channel::block_on;
use crate::channel::deliver::SinkList;
use crate::channel::history::SentTo;
use crate::clock::now;
use crate::error::{Error, Result};
use crate::timely::EventOptions;

/// A batch is routed and sent in runs of at most this many bytes of frames (and at least one event): enough to make
/// the per-run costs vanish per event, small enough that a run fits a link's outbox many times over.
const RUN_BYTES: usize = 64 * 1024;

/// A run goes on the wire as compact `EventRun` frames of at most this many bytes each (docs/PROTOCOL.md, "Event
/// runs"): few enough headers per event, and pieces small enough that a nearly full link takes most of a run rather
/// than losing all of it.
const COMPACT_BYTES: usize = 4 * 1024;

impl Source {
    /// Submits `payloads` as events of type `ty`, all with attributes `attrs`, in order; waits only if a sink with
    /// the Block policy is full. Returns the events' sequence numbers (consecutive, in the order of `payloads`; an
    /// empty range for no payloads).
    ///
    /// Every event is the same as if submitted alone (its own number, frame, filters and loss accounting, the same
    /// order at every sink), but the routing, the room check at Block sinks, the counters and the link's lock and
    /// wake-up are paid once per run of events rather than once per event: the way to the highest event rates. The
    /// events are checked before any is sent: one that is too large fails the batch with nothing sent.
    pub async fn submit_many<P: AsRef<[u8]>>(&mut self, ty: &str, attrs: &Attrs, payloads: &[P]) -> Result<Range<u64>> {
        self.cooperate(u32::try_from(payloads.len()).unwrap_or(u32::MAX)).await;
        self.submit_many_inner(ty, attrs, payloads, true, EventOptions::default()).await
    }

    /// [`Source::submit_many`] with the events' priority and deadline (see [`Source::submit_with`]). Events with a
    /// deadline or sent best-effort go one by one (each needs its own decision), with the same result.
    pub async fn submit_many_with<P: AsRef<[u8]>>(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
        opts: EventOptions,
    ) -> Result<Range<u64>> {
        self.cooperate(u32::try_from(payloads.len()).unwrap_or(u32::MAX)).await;
        self.submit_many_inner(ty, attrs, payloads, true, opts).await
    }

    /// [`Source::submit_many`] without ever waiting: sends the events up to the first that a full Block sink has no
    /// room for and returns their numbers (a prefix of `payloads`; the caller submits the rest later); fails with
    /// [`Error::WouldBlock`] if not even the first had room (nothing sent).
    pub fn try_submit_many<P: AsRef<[u8]>>(&mut self, ty: &str, attrs: &Attrs, payloads: &[P]) -> Result<Range<u64>> {
        let fut = self.submit_many_inner(ty, attrs, payloads, false, EventOptions::default());
        // The non-waiting path never awaits anything pending, so one poll completes it.
        futures_util::FutureExt::now_or_never(fut).unwrap_or(Err(Error::WouldBlock))
    }

    /// Blocking form of [`Source::submit_many`], for threads outside the runtime.
    pub fn submit_many_blocking<P: AsRef<[u8]>>(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
    ) -> Result<Range<u64>> {
        block_on(self.submit_many_inner(ty, attrs, payloads, true, EventOptions::default()))?
    }

    async fn submit_many_inner<P: AsRef<[u8]>>(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
        wait: bool,
        opts: EventOptions,
    ) -> Result<Range<u64>> {
        self.reclaim();
        // Lent again once the batch is over, whether it finished or was cancelled at an await (see `Lent`).
        let lend = LendOnExit(self);
        let r = lend.0.submit_many_steps(ty, attrs, payloads, wait, opts).await;
        r
    }

    async fn submit_many_steps<P: AsRef<[u8]>>(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
        wait: bool,
        opts: EventOptions,
    ) -> Result<Range<u64>> {
        let first = self.seq + 1;
        // Checked whole before anything is sent. An event's frame is the same but for the payload's length.
        let base = self.check(ty, attrs, &[])?;
        if let Some(big) = payloads.iter().map(|p| p.as_ref().len()).max() {
            if base + big > self.max_frame {
                let len = base + big;
                return Err(Error::Invalid(format!(
                    "event of {len} bytes exceeds the frame limit of {}",
                    self.max_frame
                )));
            }
        }
        let timing = match self.options(ty, opts) {
            o if o == EventOptions::default() => Timing::default(),
            o => Timing::of(o),
        };
        if timing.deadline.is_some() || timing.best_effort || self.out_filter.is_some() {
            return self.submit_each(ty, attrs, payloads, wait, opts, first).await;
        }
        // An event alone in an `EventRun` frame takes 8 bytes more than in an `Event` frame.
        let big = payloads.iter().map(|p| p.as_ref().len()).max().unwrap_or(0);
        let compact_fits = base + big + 8 <= self.max_frame;
        let mut at = 0;
        while at < payloads.len() {
            if self.ch.tree_on() {
                return self.submit_each(ty, attrs, &payloads[at..], wait, opts, first).await;
            }
            self.routing.refresh(&self.ch);
            let routes = self.routing.routes.clone();
            let pick = &mut self.pick;
            pick.reset(&routes);
            pick.accepting(&routes, ty, attrs, false, &self.loss.waiting);
            pick.by_place(&routes);
            let local_block = pick.locals.iter().any(|l| l.queue.overflow() == Overflow::Block);
            // Ghosts, or counts of ghosts to report to nodes that are back (ahead of their next event): one by one.
            let ghosts = !pick.ghosts.is_empty() || self.loss.has_ghost_counts();
            if self.routing.installed.is_some() || ghosts || (!wait && local_block) {
                return self.submit_each(ty, attrs, &payloads[at..], wait, opts, first).await;
            }
            // The run: events from `at` while their frames fit `RUN_BYTES` (at least one).
            let mut end = at;
            let mut bytes = 0;
            while end < payloads.len() && (end == at || bytes + base + payloads[end].as_ref().len() <= RUN_BYTES) {
                bytes += base + payloads[end].as_ref().len();
                end += 1;
            }
            // Room at Block sinks for the whole run, before any of it is sent.
            if let Err(e) = pick.wait_for_room(&routes, bytes, wait, timing.lane).await {
                // Not waiting: what fits goes one by one.
                debug_assert!(!wait);
                return match e {
                    Error::WouldBlock => self.submit_each(ty, attrs, &payloads[at..], wait, opts, first).await,
                    e => Err(e),
                };
            }
            self.send_run(&routes, ty, attrs, &payloads[at..end], base, timing, compact_fits).await;
            at = end;
        }
        Ok(first..self.seq + 1)
    }

    /// Numbers, encodes and sends a run of events whose sinks `self.pick` holds (chosen without an OUT-filter, with
    /// room at Block sinks), then gives them to local sinks. `base`: an event's frame length without its payload;
    /// `compact_fits`: each event fits an `EventRun` frame of its own.
    #[allow(clippy::too_many_arguments)]
    async fn send_run<P: AsRef<[u8]>>(
        &mut self,
        routes: &super::Routes,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
        base: usize,
        timing: Timing,
        compact_fits: bool,
    ) {
        let k = payloads.len();
        let seq0 = self.seq + 1;
        self.seq += k as u64;
        self.shared_seq.store(self.seq, Ordering::Release);
        let (channel, source) = (self.ch.id(), self.id);
        let c = &self.ch.counters;
        c.submitted.fetch_add(k as u64, Ordering::Relaxed);
        let pick = &mut self.pick;
        if pick.candidates.is_empty() {
            c.filtered.fetch_add(k as u64, Ordering::Relaxed);
            return;
        }
        let keep = self.kept.is_on();
        // Compact `EventRun` frames, unless some event must stand alone on the wire: kept for a replay (which
        // resends events one by one), or preceded by its own `Targets` frame at a node where content filters chose
        // some of the accepting sinks.
        let compact = compact_fits
            && !keep
            && pick
                .touched
                .iter()
                .all(|&p| pick.peers[p].chosen == 0 || pick.peers[p].chosen >= pick.peers[p].accepting);
        // Encoded once into memory that every link shares: `ends` are where the frames end, `upto` how many of the
        // run's events the frames up to each hold.
        let enc = &mut self.enc;
        enc.ends.clear();
        let mut upto: smallvec::SmallVec<[usize; 32]> = smallvec::SmallVec::new();
        let run = if compact {
            let head = base + 4;
            let bytes: usize = payloads.iter().map(|p| 4 + p.as_ref().len()).sum::<usize>() + head;
            let b = enc.buf.room(bytes + bytes / (COMPACT_BYTES / 2) * head, ENCODE_CHUNK);
            let mut i = 0;
            while i < k {
                let mut j = i + 1;
                let mut len = head + 4 + payloads[i].as_ref().len();
                while j < k && len + 4 + payloads[j].as_ref().len() <= COMPACT_BYTES {
                    len += 4 + payloads[j].as_ref().len();
                    j += 1;
                }
                let ps = payloads[i..j].iter().map(|p| p.as_ref());
                encode_event_run(b, channel, source, seq0 + i as u64, ty, attrs, ps);
                enc.ends.push(b.len());
                upto.push(j);
                i = j;
            }
            b.split().freeze()
        } else {
            // Each event as its own frame, as it would be alone.
            let bytes: usize = payloads.iter().map(|p| base + p.as_ref().len()).sum();
            let b = enc.buf.room(bytes, ENCODE_CHUNK);
            for (i, p) in payloads.iter().enumerate() {
                encode_event(b, channel, source, seq0 + i as u64, ty, attrs, p.as_ref());
                enc.ends.push(b.len());
            }
            b.split().freeze()
        };
        let mut went: Vec<smallvec::SmallVec<[SentTo; 1]>> = Vec::new();
        if keep {
            went.resize_with(k, Default::default);
        }
        let (mut sent_to, mut sent_bytes) = (0u64, 0u64);
        for &p in &pick.touched {
            let pp = &pick.peers[p];
            if pp.chosen == 0 {
                continue;
            }
            let peer = &routes.peers[p];
            peer.flush_lag();
            let track = track_for(&mut self.loss.sent_to, peer.id, routes.instances[p], &mut self.kept);
            if keep && track.relinked(peer) {
                track.replay_in_flight(peer, &self.kept, channel, source, &mut self.enc);
            }
            let (told, tell) = track.before(peer, seq0);
            let Encoder { me, buf, ends, targeted_ends: tends, prefix, gate, .. } = &mut self.enc;
            if tell {
                encode_routed(prefix, channel, source, track.instance, *me, told.skipped);
            }
            // Sinks chosen by content filters among the node's accepting ones: each event is preceded by its
            // `Targets` frame, as it would be alone.
            let targeted = pp.chosen < pp.accepting;
            let (frames, ends) = if targeted {
                tends.clear();
                let b = buf.room(run.len() + k * (24 + 4 * pp.ids.len()), ENCODE_CHUNK);
                let mut start = 0;
                for &e in ends.iter() {
                    encode_targets(b, channel, &pp.ids);
                    b.extend_from_slice(&run[start..e]);
                    tends.push(b.len());
                    start = e;
                }
                (b.split().freeze(), &tends[..])
            } else {
                (run.clone(), &ends[..])
            };
            let routed = track.routed;
            let urgency = timing.urgency(&mut track.held, None, pp.blocks);
            let frames_in = peer.outbox.push_events(prefix, &frames, ends, gate, urgency);
            prefix.clear();
            let n = match frames_in {
                0 => 0,
                f if compact => upto[f - 1],
                f => f,
            };
            if n > 0 {
                track.sent_many(told, n as u64);
                sent_to += n as u64;
                sent_bytes += ends[frames_in - 1] as u64;
                if keep {
                    for (i, w) in went.iter_mut().take(n).enumerate() {
                        w.push((peer.id, routed + 1 + i as u64, targeted.then(|| pp.ids.clone())));
                    }
                }
            }
            if n < k {
                // No room on the link for the rest of the run: lost, and reported as for single events.
                let lost = (k - n) as u64;
                c.dropped.fetch_add(lost, Ordering::Relaxed);
                let lane = track.held.lane().map_or(timing.lane, |l| l.min(timing.lane));
                peer.add_lag(channel, source, track.instance, &pp.ids, lost, lane);
            }
        }
        if sent_to > 0 {
            c.sent.fetch_add(sent_to, Ordering::Relaxed);
            c.bytes_sent.fetch_add(sent_bytes, Ordering::Relaxed);
        }
        self.enc.gate.done();
        if keep {
            // Kept for a node whose link breaks with them in flight (sharing the run's memory).
            let at = self.kept.needs_time().then(now);
            let mut start = 0;
            for (i, w) in went.into_iter().enumerate() {
                let e = self.enc.ends[i];
                if !w.is_empty() {
                    self.kept.sent(seq0 + i as u64, run.slice(start..e), w, at);
                }
                start = e;
            }
        }
        // Local sinks get the events without any encoding, one by one (each passes the IN-filter).
        if !self.pick.locals.is_empty() {
            c.received.fetch_add(k as u64, Ordering::Relaxed);
            let locals = std::mem::take(&mut self.pick.locals);
            let name = match &self.ty_name {
                Some(n) if **n == *ty => n.clone(),
                _ => self.ty_name.insert(std::sync::Arc::from(ty)).clone(),
            };
            for (i, p) in payloads.iter().enumerate() {
                let payload = Bytes::copy_from_slice(p.as_ref());
                let sinks = locals.iter().collect::<SinkList<'_>>();
                self.ch.dispatch(sinks, name.clone(), attrs.clone(), payload, seq0 + i as u64, self.key, None).await;
            }
            self.pick.locals = locals;
        }
    }

    /// The per-event path for a batch (or its rest), with the batch's result: the numbers of the events sent since
    /// `first`. Not waiting, it stops at the first event a full Block sink refuses.
    async fn submit_each<P: AsRef<[u8]>>(
        &mut self,
        ty: &str,
        attrs: &Attrs,
        payloads: &[P],
        wait: bool,
        opts: EventOptions,
        first: u64,
    ) -> Result<Range<u64>> {
        for p in payloads {
            match self.submit_inner(ty, attrs, p.as_ref(), wait, opts).await {
                Ok(_) => {}
                Err(Error::WouldBlock) if !wait && self.seq >= first => break,
                Err(e) => return Err(e),
            }
        }
        Ok(first..self.seq + 1)
    }
}

impl SendTrack {
    /// `n` events in a row were queued to the node, which then knows `told`.
    fn sent_many(&mut self, told: Told, n: u64) {
        self.routed += n;
        self.stream_last = self.routed;
        self.told = Some(told);
    }
}
