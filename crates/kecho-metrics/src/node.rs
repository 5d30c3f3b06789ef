//! A node's metrics: channel and link counters read at scrape time, and the delivery latency histogram.

use std::time::{SystemTime, UNIX_EPOCH};

use kecho::{Attrs, Event, Node, Value};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

/// The attribute [`stamp`] sets: when the event was submitted, in microseconds since the Unix epoch (an integer).
pub const SENT_AT_ATTR: &str = "kecho.sent_us";

/// Registers `node`'s channel and link metrics into `registry` and returns the delivery latency histogram, also
/// registered, for the application's sinks to feed. The registry keeps a handle on the node, so the node runs as long
/// as the registry lives unless it is shut down.
pub fn register_node(registry: &mut Registry, node: &Node) -> DeliveryLatency {
    registry.register_collector(Box::new(NodeCollector::new(node.clone())));
    let latency = DeliveryLatency::default();
    registry.register_with_unit(
        "kecho_delivery_latency",
        "Delivery latency of stamped events, from the source's stamp to the sink's receive (clocks of both hosts)",
        Unit::Seconds,
        latency.family.clone(),
    );
    latency
}

/// Adds [`SENT_AT_ATTR`] (now) to `attrs`, so that sinks can measure delivery latency.
pub fn stamp(attrs: &mut Attrs) {
    let us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros());
    attrs.set(SENT_AT_ATTR, i64::try_from(us).unwrap_or(i64::MAX));
}

/// The delivery latency histogram, per channel. Cheap to clone; clones share the histogram.
#[derive(Clone, Debug)]
pub struct DeliveryLatency {
    family: Family<Vec<(String, String)>, Histogram>,
}

impl Default for DeliveryLatency {
    fn default() -> Self {
        // 10 us to about 10 s, doubling.
        DeliveryLatency { family: Family::new_with_constructor(|| Histogram::new(exponential_buckets(1e-5, 2.0, 21))) }
    }
}

impl DeliveryLatency {
    /// Records the latency of `event`, received now on `channel`, if its source stamped it (see [`stamp`]). Returns
    /// the latency in seconds, or `None` for an event without a valid stamp.
    pub fn observe(&self, channel: &str, event: &Event) -> Option<f64> {
        let Some(Value::Int(sent)) = event.attrs().get(SENT_AT_ATTR) else { return None };
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_micros();
        let sent = u128::try_from(*sent).ok()?;
        // A stamp from the future is a clock difference between hosts, not a latency.
        let us = now.checked_sub(sent)?;
        let secs = us as f64 / 1e6;
        self.family.get_or_create(&vec![("channel".to_owned(), channel.to_owned())]).observe(secs);
        Some(secs)
    }
}

/// Encodes a node's channel and link counters at every scrape. Usually registered through [`register_node`].
#[derive(Debug)]
pub struct NodeCollector {
    node: Node,
}

impl NodeCollector {
    /// A collector of `node`'s counters.
    pub fn new(node: Node) -> Self {
        NodeCollector { node }
    }
}

type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family from its samples.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    ty: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, ty)?;
    for (labels, metric) in samples {
        metric.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters<'a, T: 'a>(
    rows: &'a [(Labels, T)],
    f: impl Fn(&T) -> u64 + 'a,
) -> impl Iterator<Item = (Labels, ConstCounter<u64>)> + 'a {
    rows.iter().map(move |(l, t)| (l.clone(), ConstCounter::new(f(t))))
}

fn gauges<'a, T: 'a>(
    rows: &'a [(Labels, T)],
    f: impl Fn(&T) -> i64 + 'a,
) -> impl Iterator<Item = (Labels, ConstGauge<i64>)> + 'a {
    rows.iter().map(move |(l, t)| (l.clone(), ConstGauge::new(f(t))))
}

struct ChannelRow {
    stats: kecho::ChannelStats,
    sinks: usize,
    sources: usize,
    members: usize,
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut chans: Vec<(Labels, ChannelRow)> = self
            .node
            .channels()
            .iter()
            .map(|c| {
                let row = ChannelRow {
                    stats: c.stats(),
                    sinks: c.sinks(),
                    sources: c.sources(),
                    members: c.member_nodes().len(),
                };
                (vec![("channel", c.name().to_owned())], row)
            })
            .collect();
        chans.sort_by(|a, b| a.0.cmp(&b.0));
        let mut links: Vec<(Labels, kecho::LinkStats)> = self
            .node
            .link_stats()
            .into_iter()
            .map(|l| (vec![("peer", l.node.to_string()), ("addr", l.addr.clone())], l))
            .collect();
        links.sort_by(|a, b| a.0.cmp(&b.0));
        let e = &mut enc;
        let c = MetricType::Counter;
        let g = MetricType::Gauge;
        let b = Some(&Unit::Bytes);
        let ch = &chans;
        family(
            e,
            "kecho_channel_events_submitted",
            "Events submitted by this node's sources",
            None,
            c,
            counters(ch, |r| r.stats.submitted),
        )?;
        family(
            e,
            "kecho_channel_events_sent",
            "Event frames queued to other nodes, one per node per event",
            None,
            c,
            counters(ch, |r| r.stats.sent),
        )?;
        family(
            e,
            "kecho_channel_sent",
            "Bytes of the event frames queued to other nodes",
            b,
            c,
            counters(ch, |r| r.stats.bytes_sent),
        )?;
        family(
            e,
            "kecho_channel_events_received",
            "Events delivered to this node's sinks",
            None,
            c,
            counters(ch, |r| r.stats.received),
        )?;
        family(
            e,
            "kecho_channel_events_dropped",
            "Events discarded here: full sink queue or full link",
            None,
            c,
            counters(ch, |r| r.stats.dropped),
        )?;
        family(
            e,
            "kecho_channel_events_filtered",
            "Events discarded on purpose: by the IN-filter or with no sink chosen",
            None,
            c,
            counters(ch, |r| r.stats.filtered),
        )?;
        family(
            e,
            "kecho_channel_events_lagged",
            "Events meant for this node's sinks that never arrived (reported to them as a gap)",
            None,
            c,
            counters(ch, |r| r.stats.missed),
        )?;
        family(
            e,
            "kecho_channel_frames_stale",
            "Frames from remote sources meant for another opening (instance) of the channel on this node, ignored",
            None,
            c,
            counters(ch, |r| r.stats.stale),
        )?;
        family(
            e,
            "kecho_channel_access_denied",
            "Refusals under the channel's access policy",
            None,
            c,
            counters(ch, |r| r.stats.denied),
        )?;
        family(
            e,
            "kecho_channel_sinks",
            "Sinks present in the channel, as this node knows it",
            None,
            g,
            gauges(ch, |r| r.sinks as i64),
        )?;
        family(
            e,
            "kecho_channel_sources",
            "Sources present in the channel, as this node knows it",
            None,
            g,
            gauges(ch, |r| r.sources as i64),
        )?;
        family(
            e,
            "kecho_channel_member_nodes",
            "Other member nodes of the channel",
            None,
            g,
            gauges(ch, |r| r.members as i64),
        )?;
        let li = &links;
        family(
            e,
            "kecho_link_up",
            "1 while a connection to the other node is up",
            None,
            g,
            gauges(li, |l| i64::from(l.up)),
        )?;
        family(
            e,
            "kecho_link_event_frames_sent",
            "Event frames sent on the link (one per event)",
            None,
            c,
            counters(li, |l| l.event_frames),
        )?;
        family(
            e,
            "kecho_link_writes",
            "Writes to the link's socket, each of one or more frames",
            None,
            c,
            counters(li, |l| l.writes),
        )?;
        family(e, "kecho_link_sent", "Bytes written on the link", b, c, counters(li, |l| l.bytes_sent))?;
        family(e, "kecho_link_received", "Bytes read from the link", b, c, counters(li, |l| l.bytes_received))?;
        family(
            e,
            "kecho_link_queued",
            "Bytes queued for the link and not written yet",
            b,
            g,
            gauges(li, |l| l.queued_bytes as i64),
        )?;
        family(
            e,
            "kecho_link_reconnects",
            "Connections to the other node after the first",
            None,
            c,
            counters(li, |l| l.connects.saturating_sub(1)),
        )?;
        family(
            e,
            "kecho_link_heartbeat_timeouts",
            "Connections declared dead because the other node fell silent",
            None,
            c,
            counters(li, |l| l.heartbeat_timeouts),
        )?;
        let up = links.iter().filter(|(_, l)| l.up).count() as i64;
        family(e, "kecho_node_links", "Links up", None, g, [(Labels::new(), ConstGauge::new(up))])?;
        Ok(())
    }
}
