//! The node's channel table: every open channel by name and by id, with what channels share on a node (its
//! identity, configuration, registry client, links, tasks and compiled content filters). It is what the link layer
//! hands arriving frames to ([`LinkHandler`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use kecho_proto::handshake::Identity;
use kecho_proto::membership::OpenMode;
use kecho_proto::{ChannelId, Message, NodeId};
use kecho_registry::RegistryClient;
use parking_lot::{Mutex, RwLock};
use tokio::task::AbortHandle;

use super::{Channel, ChannelInner};
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::filter::{ContentFilter, FilterError};
use crate::link::{Batch, LinkHandler, Links, Peer};
use crate::tasks::Tasks;

/// A node's channels and what they share.
pub(crate) struct Channels {
    pub(crate) id: NodeId,
    pub(crate) identity: Identity,
    /// The address other nodes dial (`NodeConfig::advertise`, or the listening address).
    pub(crate) advertised: SocketAddr,
    pub(crate) cfg: Arc<NodeConfig>,
    pub(crate) registry: RegistryClient,
    pub(crate) links: Arc<Links<Channels>>,
    pub(crate) tasks: Arc<Tasks>,
    /// Content filters compiled once per node and expression, shared by every route that uses them.
    filters: Mutex<HashMap<String, Arc<ContentFilter>>>,
    by_id: RwLock<HashMap<ChannelId, Arc<ChannelInner>>>,
    by_name: Mutex<HashMap<String, Arc<ChannelInner>>>,
}

impl Channels {
    /// The channels that are open (not opening, failed or closed).
    pub(crate) fn ready(&self) -> Vec<Arc<ChannelInner>> {
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        chans.into_iter().filter(|c| c.is_ready()).collect()
    }

    /// The channel table of a new node, with its links (which hand what arrives to it).
    pub(crate) fn new(
        identity: Identity,
        advertised: SocketAddr,
        cfg: Arc<NodeConfig>,
        registry: RegistryClient,
    ) -> Arc<Self> {
        let tasks = Arc::new(Tasks::new());
        Arc::new_cyclic(|me| Channels {
            id: identity.node_id(),
            links: Arc::new(Links::new(identity.clone(), advertised, cfg.clone(), tasks.clone(), me.clone())),
            identity,
            advertised,
            cfg,
            registry,
            tasks,
            filters: Mutex::new(HashMap::new()),
            by_id: RwLock::new(HashMap::new()),
            by_name: Mutex::new(HashMap::new()),
        })
    }

    /// Spawns a task that dies with the node.
    pub(crate) fn spawn<F>(&self, fut: F) -> AbortHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut)
    }

    /// Sends a membership message, dialling if needed.
    pub(crate) fn send(&self, to: NodeId, addr: &str, msg: &Message) {
        self.links.send(to, addr, msg);
    }

    /// The peer `id`, created (without a link) if unknown.
    pub(crate) fn peer(&self, id: NodeId, addr: &str) -> Arc<Peer> {
        self.links.peer(id, addr)
    }

    /// A content filter compiled once per node and expression, shared by every route that uses it.
    pub(crate) fn content_filter(&self, expr: &str) -> Result<Arc<ContentFilter>, FilterError> {
        let mut cache = self.filters.lock();
        if let Some(f) = cache.get(expr) {
            return Ok(f.clone());
        }
        let f = Arc::new(ContentFilter::compile(expr)?);
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(expr.to_owned(), f.clone());
        Ok(f)
    }

    fn channel_by_id(&self, id: ChannelId) -> Option<Arc<ChannelInner>> {
        self.by_id.read().get(&id).cloned()
    }

    /// Files channel `ch` under its id `new` (in place of `old`).
    pub(crate) fn index_channel(&self, old: Option<ChannelId>, new: ChannelId, ch: &Arc<ChannelInner>) {
        let mut map = self.by_id.write();
        if let Some(old) = old {
            if map.get(&old).is_some_and(|c| Arc::ptr_eq(c, ch)) {
                map.remove(&old);
            }
        }
        map.insert(new, ch.clone());
    }

    /// Removes channel `ch` from the table.
    pub(crate) fn forget_channel(&self, ch: &Arc<ChannelInner>) {
        let mut by_name = self.by_name.lock();
        if by_name.get(ch.name()).is_some_and(|c| Arc::ptr_eq(c, ch)) {
            by_name.remove(ch.name());
        }
        drop(by_name);
        self.by_id.write().retain(|_, c| !Arc::ptr_eq(c, ch));
    }

    /// Opens channel `name` (creating it, looking it up, or either, by `mode`) and waits until it is ready.
    pub(crate) async fn open(self: &Arc<Self>, name: &str, mode: OpenMode, guard: &Arc<NodeGuard>) -> Result<Channel> {
        if name.is_empty() || name.len() > kecho_proto::registry::MAX_NAME {
            return Err(Error::Invalid(format!("channel name must be 1 to {} bytes", kecho_proto::registry::MAX_NAME)));
        }
        if self.tasks.is_closed() {
            return Err(Error::Closed(name.to_owned()));
        }
        let existing = self.by_name.lock().get(name).cloned();
        if let Some(ch) = existing {
            ch.wait_ready().await?;
            if mode == OpenMode::Create {
                return Err(Error::ChannelExists(name.to_owned()));
            }
            return Ok(Channel::new(ch, guard.clone()));
        }
        let ch = ChannelInner::new(self, name);
        self.by_name.lock().insert(name.to_owned(), ch.clone());
        ch.open(mode);
        match ch.wait_ready().await {
            Ok(()) => Ok(Channel::new(ch, guard.clone())),
            Err(e) => {
                self.forget_channel(&ch);
                Err(e)
            }
        }
    }

    /// Closes the links that no channel needs (channels in tree mode use only their overlay neighbours'), and
    /// forgets the link state kept for nodes that nothing sends to any more.
    pub(crate) fn release_links(&self) {
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        for id in self.links.up_peers() {
            if !chans.iter().any(|c| c.needs_link(id)) {
                self.links.release(id);
            }
        }
        self.links.forget_unused();
    }

    /// Leaves every channel cleanly (members are told).
    pub(crate) async fn leave_all(&self) {
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        for ch in chans {
            ch.leave().await;
        }
    }

    /// Stops everything at once without telling anyone: tasks, links, channels.
    pub(crate) fn stop(&self) {
        self.tasks.stop();
        self.links.abort_all();
        for (_, ch) in self.by_name.lock().drain() {
            ch.close_local();
        }
        self.by_id.write().clear();
    }
}

impl LinkHandler for Channels {
    fn deliver<'a>(
        &'a self,
        from: NodeId,
        channel: ChannelId,
        batch: &'a mut Batch,
    ) -> impl Future<Output = ()> + Send + 'a {
        let ch = self.channel_by_id(channel);
        async move {
            match ch {
                Some(ch) => ch.deliver_batch(from, batch).await,
                None => {
                    batch.events.clear();
                    batch.runs.clear();
                    batch.run_events = 0;
                }
            }
        }
    }

    fn control(&self, from: NodeId, msg: Message) {
        match msg {
            Message::InstallFilter { channel, req, kind, module } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.install_remote(from, req, kind, module);
                }
            }
            Message::FilterStatus { channel, req, ok, message } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.filter_status(from, req, ok, message);
                }
            }
            Message::Lagged { channel, instance, count, sinks, .. } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.remote_lag(from, instance, count, &sinks);
                }
            }
            Message::SourceEnd { channel, origin, origin_instance, source, last, dests } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.source_end(from, origin, origin_instance, source, last, dests);
                }
            }
            Message::Expired { channel, source, seq, ty, sinks } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.remote_expired(from, source, seq, &ty, &sinks);
                }
            }
            Message::Routed { channel, source, instance, origin, skipped } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.routed(from, source, instance, origin, skipped);
                }
            }
            Message::Gossip { channel, addrs, body } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.gossip_input(from, addrs, body);
                }
            }
            Message::JoinRequest { channel, ref addr, .. } => match self.channel_by_id(channel) {
                Some(ch) => ch.membership_input(from, msg),
                None => {
                    let addr = addr.clone();
                    self.send(from, &addr, &Message::JoinRedirect { channel });
                }
            },
            Message::JoinAccept { channel, .. }
            | Message::JoinRedirect { channel }
            | Message::JoinRefused { channel, .. }
            | Message::Snapshot { channel, .. }
            | Message::ViewSync { channel, .. } => {
                if let Some(ch) = self.channel_by_id(channel) {
                    ch.membership_input(from, msg);
                }
            }
            other => tracing::debug!(node = %from, "not a channel frame: kind {}", other.kind()),
        }
    }

    fn peer_lost(&self, id: NodeId) {
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        for ch in chans {
            ch.peer_lost(id);
        }
    }

    fn peer_up(&self, id: NodeId) {
        let chans: Vec<_> = self.by_name.lock().values().cloned().collect();
        for ch in chans {
            ch.peer_up(id);
        }
    }

    fn probed(&self, channel: ChannelId, answer: usize) -> bool {
        let ch = self.channel_by_id(channel).filter(|ch| ch.is_member_now());
        if let Some(ch) = &ch {
            ch.count_probe_answer(answer);
        }
        ch.is_some()
    }
}

/// Stops the node when the last handle on it (node, channel, source or sink) is dropped, as if the process ended:
/// the node's tasks hold the node themselves, so without this it would run on unseen.
pub(crate) struct NodeGuard {
    node: std::sync::Weak<Channels>,
}

impl NodeGuard {
    pub(crate) fn new(node: &Arc<Channels>) -> Self {
        NodeGuard { node: Arc::downgrade(node) }
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if let Some(n) = self.node.upgrade() {
            if !n.tasks.is_closed() {
                tracing::debug!(node = %n.id, "last handle dropped; stopping the node");
                n.stop();
            }
        }
    }
}
