//! A live view of a cluster, for `kecho top` and `kecho ui`: the registry's channels, and what nodes report about
//! them on the [`STATS_CHANNEL`].
//!
//! A node takes part by running a [`Reporter`], which publishes its channel and link counters every second. The
//! [`Cluster`] model is pure: it takes registry listings and reports with the time they arrived and computes rates
//! from consecutive reports; [`watch`] runs it on a node of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kecho::{Attrs, Event, Node, Value};
use serde::Serialize;

/// The channel nodes report their counters on.
pub const STATS_CHANNEL: &str = "kecho.stats";

/// The event type of a per-channel report.
const CHANNEL_REPORT: &str = "channel";
/// The event type of a per-node report.
const NODE_REPORT: &str = "node";

/// A report older than this many report intervals means the node is gone.
const STALE_AFTER: u32 = 3;

/// One channel's counters on one node, as reported.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Counters {
    submitted: u64,
    sent: u64,
    received: u64,
    dropped: u64,
    lagged: u64,
    bytes: u64,
    sinks: u64,
    sources: u64,
}

impl Counters {
    fn from_stats(c: &kecho::Channel) -> Counters {
        let s = c.stats();
        Counters {
            submitted: s.submitted,
            sent: s.sent,
            received: s.received,
            dropped: s.dropped,
            lagged: s.missed,
            bytes: s.bytes_sent,
            sinks: c.sinks() as u64,
            sources: c.sources() as u64,
        }
    }

    fn attrs(&self, node: &str, channel: &str) -> Attrs {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Attrs::new()
            .with("node", node)
            .with("channel", channel)
            .with("submitted", n(self.submitted))
            .with("sent", n(self.sent))
            .with("received", n(self.received))
            .with("dropped", n(self.dropped))
            .with("lagged", n(self.lagged))
            .with("bytes", n(self.bytes))
            .with("sinks", n(self.sinks))
            .with("sources", n(self.sources))
    }

    fn parse(a: &Attrs) -> Counters {
        let n = |k: &str| match a.get(k) {
            Some(Value::Int(v)) => u64::try_from(*v).unwrap_or(0),
            _ => 0,
        };
        Counters {
            submitted: n("submitted"),
            sent: n("sent"),
            received: n("received"),
            dropped: n("dropped"),
            lagged: n("lagged"),
            bytes: n("bytes"),
            sinks: n("sinks"),
            sources: n("sources"),
        }
    }
}

fn text(a: &Attrs, k: &str) -> Option<String> {
    match a.get(k) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int(a: &Attrs, k: &str) -> u64 {
    match a.get(k) {
        Some(Value::Int(v)) => u64::try_from(*v).unwrap_or(0),
        _ => 0,
    }
}

/// Publishes a node's counters on [`STATS_CHANNEL`] every interval, until dropped.
#[derive(Debug)]
pub struct Reporter {
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    /// Joins the stats channel as a source and starts reporting `node`'s channels (all but the stats channel) and
    /// links every `every`.
    pub async fn start(node: &Node, every: Duration) -> kecho::Result<Reporter> {
        let ch = node.channel(STATS_CHANNEL).await?;
        let mut src = ch.source()?;
        let node = node.clone();
        let id = node.advertised_addr().to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut chans = node.channels();
                chans.retain(|c| c.name() != STATS_CHANNEL);
                for c in &chans {
                    let attrs = Counters::from_stats(c).attrs(&id, c.name());
                    // A full link drops the report (a newer one follows); a closed node ends the reporter.
                    if let Err(kecho::Error::Closed(_)) = src.try_submit(CHANNEL_REPORT, &attrs, b"") {
                        return;
                    }
                }
                let links = node.link_stats();
                let up = links.iter().filter(|l| l.up).count() as i64;
                let reconnects: u64 = links.iter().map(|l| l.connects.saturating_sub(1)).sum();
                let queued: usize = links.iter().map(|l| l.queued_bytes).sum();
                let attrs = Attrs::new()
                    .with("node", id.as_str())
                    .with("links", up)
                    .with("reconnects", i64::try_from(reconnects).unwrap_or(i64::MAX))
                    .with("queued_bytes", i64::try_from(queued).unwrap_or(i64::MAX))
                    .with("interval_ms", i64::try_from(every.as_millis()).unwrap_or(i64::MAX));
                if let Err(kecho::Error::Closed(_)) = src.try_submit(NODE_REPORT, &attrs, b"") {
                    return;
                }
            }
        });
        Ok(Reporter { task })
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A channel as the registry lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Its name.
    pub name: String,
    /// Sources, as its contact last reported.
    pub sources: u32,
    /// Sinks, as its contact last reported.
    pub sinks: u32,
    /// The contact's address.
    pub contact: String,
}

struct Report {
    at: Instant,
    cur: Counters,
    /// The report before, for rates.
    prev: Option<(Instant, Counters)>,
}

struct NodeReport {
    at: Instant,
    links: u64,
    reconnects: u64,
    queued_bytes: u64,
    interval: Duration,
}

/// The cluster as last seen: pure, fed with what arrived and when.
#[derive(Default)]
pub struct Cluster {
    listed: Vec<Listed>,
    registry_error: Option<String>,
    /// By (channel, node).
    reports: BTreeMap<(String, String), Report>,
    nodes: BTreeMap<String, NodeReport>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("channels", &self.listed.len()).field("nodes", &self.nodes.len()).finish()
    }
}

impl Cluster {
    /// A registry listing (or why it failed) arrived.
    pub fn on_listing(&mut self, listing: Result<Vec<Listed>, kecho::RegistryError>) {
        match listing {
            Ok(l) => {
                self.listed = l;
                self.registry_error = None;
            }
            Err(e) => self.registry_error = Some(e.to_string()),
        }
    }

    /// A report arrived on the stats channel at `now`. Events of other types, or without a node, are ignored.
    pub fn on_report(&mut self, ty: &str, attrs: &Attrs, now: Instant) {
        let Some(node) = text(attrs, "node") else { return };
        match ty {
            CHANNEL_REPORT => {
                let Some(channel) = text(attrs, "channel") else { return };
                let cur = Counters::parse(attrs);
                let r = self.reports.entry((channel, node)).or_insert(Report { at: now, cur, prev: None });
                if r.at != now || r.prev.is_some() || r.cur != cur {
                    r.prev = Some((r.at, r.cur));
                }
                r.at = now;
                r.cur = cur;
            }
            NODE_REPORT => {
                let interval = Duration::from_millis(int(attrs, "interval_ms").max(1));
                self.nodes.insert(
                    node,
                    NodeReport {
                        at: now,
                        links: int(attrs, "links"),
                        reconnects: int(attrs, "reconnects"),
                        queued_bytes: int(attrs, "queued_bytes"),
                        interval,
                    },
                );
            }
            _ => {}
        }
    }

    /// Forgets nodes that stopped reporting.
    pub fn expire(&mut self, now: Instant) {
        let stale = |at: Instant, interval: Duration| now.saturating_duration_since(at) > interval * STALE_AFTER;
        self.nodes.retain(|_, n| !stale(n.at, n.interval));
        let nodes = &self.nodes;
        self.reports.retain(|(_, node), r| {
            let interval = nodes.get(node).map_or(Duration::from_secs(1), |n| n.interval);
            !stale(r.at, interval)
        });
    }

    /// What a viewer shows.
    pub fn view(&self) -> View {
        let mut channels: Vec<ChannelView> = Vec::new();
        let mut names: Vec<&str> = self.listed.iter().map(|l| l.name.as_str()).collect();
        names.extend(self.reports.keys().map(|(c, _)| c.as_str()));
        names.sort_unstable();
        names.dedup();
        for name in names {
            if name == STATS_CHANNEL {
                continue;
            }
            let listed = self.listed.iter().find(|l| l.name == name);
            let members: Vec<MemberView> = self
                .reports
                .range((name.to_owned(), String::new())..)
                .take_while(|((c, _), _)| c == name)
                .map(|((_, node), r)| {
                    let rate = |f: fn(&Counters) -> u64| match r.prev {
                        Some((t, p)) if r.at > t => {
                            f(&r.cur).saturating_sub(f(&p)) as f64 / r.at.duration_since(t).as_secs_f64()
                        }
                        _ => 0.0,
                    };
                    MemberView {
                        node: node.clone(),
                        sources: r.cur.sources,
                        sinks: r.cur.sinks,
                        submitted_per_s: rate(|c| c.submitted),
                        received_per_s: rate(|c| c.received),
                        sent_bytes_per_s: rate(|c| c.bytes),
                        dropped: r.cur.dropped,
                        lagged: r.cur.lagged,
                    }
                })
                .collect();
            channels.push(ChannelView {
                name: name.to_owned(),
                listed: listed.is_some(),
                sources: listed.map(|l| l.sources),
                sinks: listed.map(|l| l.sinks),
                contact: listed.map(|l| l.contact.clone()),
                submitted_per_s: members.iter().map(|m| m.submitted_per_s).sum(),
                received_per_s: members.iter().map(|m| m.received_per_s).sum(),
                dropped: members.iter().map(|m| m.dropped).sum(),
                lagged: members.iter().map(|m| m.lagged).sum(),
                members,
            });
        }
        let nodes = self
            .nodes
            .iter()
            .map(|(node, n)| NodeView {
                node: node.clone(),
                links: n.links,
                reconnects: n.reconnects,
                queued_bytes: n.queued_bytes,
            })
            .collect();
        View { registry_error: self.registry_error.clone(), channels, nodes }
    }
}

/// What `kecho top` and `kecho ui` show.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct View {
    /// Why the last registry listing failed, if it did.
    pub registry_error: Option<String>,
    /// Channels, by name.
    pub channels: Vec<ChannelView>,
    /// Reporting nodes, by address.
    pub nodes: Vec<NodeView>,
}

/// A channel.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChannelView {
    /// Its name.
    pub name: String,
    /// The registry lists it (a channel only reported on is not listed: it was just created or is going away).
    pub listed: bool,
    /// Sources, as the registry lists them.
    pub sources: Option<u32>,
    /// Sinks, as the registry lists them.
    pub sinks: Option<u32>,
    /// The contact's address.
    pub contact: Option<String>,
    /// Events submitted per second, over the reporting members.
    pub submitted_per_s: f64,
    /// Events received per second, over the reporting members.
    pub received_per_s: f64,
    /// Events dropped, over the reporting members.
    pub dropped: u64,
    /// Events lagged (never arrived), over the reporting members.
    pub lagged: u64,
    /// The reporting member nodes.
    pub members: Vec<MemberView>,
}

/// A member node of a channel, as it reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemberView {
    /// The node's address.
    pub node: String,
    /// Sources in the channel, as this node knows it.
    pub sources: u64,
    /// Sinks in the channel, as this node knows it.
    pub sinks: u64,
    /// Events its sources submit per second.
    pub submitted_per_s: f64,
    /// Events its sinks receive per second.
    pub received_per_s: f64,
    /// Bytes it sends per second.
    pub sent_bytes_per_s: f64,
    /// Events dropped on it.
    pub dropped: u64,
    /// Events meant for it that never arrived.
    pub lagged: u64,
}

/// A reporting node.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeView {
    /// The node's address.
    pub node: String,
    /// Links up.
    pub links: u64,
    /// Reconnections over all its links.
    pub reconnects: u64,
    /// Bytes queued on its links.
    pub queued_bytes: u64,
}

/// Watches the cluster of the registry at `registry`: starts a node of its own, joins [`STATS_CHANNEL`] as a sink,
/// lists the registry every `every` and sends the view after each listing. Ends when every receiver is gone.
pub async fn watch(registry: Vec<SocketAddr>, every: Duration) -> kecho::Result<tokio::sync::watch::Receiver<View>> {
    let node = Node::builder().registry_replicas(registry).start().await?;
    let ch = node.channel(STATS_CHANNEL).await?;
    let mut sink = ch.sink(kecho::SinkOptions::new().overflow(kecho::Overflow::DropOldest))?;
    let (tx, rx) = tokio::sync::watch::channel(View::default());
    tokio::spawn(async move {
        let mut cluster = Cluster::default();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let listing = node.registry().list().await.map(|l| {
                        l.into_iter()
                            .map(|e| Listed { name: e.name, sources: e.sources, sinks: e.sinks, contact: e.addr })
                            .collect()
                    });
                    cluster.on_listing(listing);
                    cluster.expire(Instant::now());
                    if tx.send(cluster.view()).is_err() {
                        break;
                    }
                }
                ev = sink.recv() => match ev {
                    Ok(ev) => on_event(&mut cluster, &ev),
                    Err(kecho::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = tx.closed() => break,
            }
        }
        drop(sink);
        node.shutdown().await;
    });
    Ok(rx)
}

fn on_event(cluster: &mut Cluster, ev: &Event) {
    cluster.on_report(ev.ty(), ev.attrs(), Instant::now());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, channel: &str, received: u64, dropped: u64) -> Attrs {
        Counters { received, dropped, sinks: 1, ..Default::default() }.attrs(node, channel)
    }

    #[test]
    fn rates_come_from_consecutive_reports_and_silent_nodes_expire() {
        let t0 = Instant::now();
        let mut c = Cluster::default();
        c.on_listing(Ok(vec![Listed { name: "news".into(), sources: 1, sinks: 2, contact: "a:1".into() }]));
        let v = c.view();
        assert_eq!(v.channels.len(), 1);
        assert_eq!(v.channels[0].sinks, Some(2));
        assert!(v.channels[0].members.is_empty());

        c.on_report("channel", &report("n1", "news", 100, 0), t0);
        c.on_report("node", &Attrs::new().with("node", "n1").with("links", 2).with("interval_ms", 1000), t0);
        c.on_report("channel", &report("n1", "news", 300, 5), t0 + Duration::from_secs(2));
        c.on_report(
            "node",
            &Attrs::new().with("node", "n1").with("links", 2).with("interval_ms", 1000),
            t0 + Duration::from_secs(2),
        );
        let v = c.view();
        let ch = &v.channels[0];
        assert_eq!(ch.members.len(), 1);
        assert_eq!(ch.received_per_s, 100.0);
        assert_eq!(ch.dropped, 5);
        assert_eq!(v.nodes[0].links, 2);

        // A channel only reported on shows up, marked as not listed; the stats channel never does.
        c.on_report("channel", &report("n1", "other", 1, 0), t0 + Duration::from_secs(2));
        c.on_report("channel", &report("n1", STATS_CHANNEL, 1, 0), t0 + Duration::from_secs(2));
        let v = c.view();
        assert_eq!(
            v.channels.iter().map(|c| (c.name.as_str(), c.listed)).collect::<Vec<_>>(),
            [("news", true), ("other", false)]
        );

        c.expire(t0 + Duration::from_secs(6));
        let v = c.view();
        assert!(v.nodes.is_empty());
        assert_eq!(v.channels.len(), 1, "the listed channel stays, its silent member goes");
        assert!(v.channels[0].members.is_empty());

        let addr = "127.0.0.1:7000".parse().expect("address");
        c.on_listing(Err(kecho::RegistryError::Timeout { addr }));
        assert_eq!(c.view().registry_error.as_deref(), Some("registry at 127.0.0.1:7000 did not answer in time"));
    }

    #[test]
    fn reports_without_a_node_or_of_unknown_types_are_ignored() {
        let mut c = Cluster::default();
        let now = Instant::now();
        c.on_report("channel", &Attrs::new().with("channel", "x"), now);
        c.on_report("gossip", &Attrs::new().with("node", "n").with("channel", "x"), now);
        assert_eq!(c.view(), View::default());
    }
}
