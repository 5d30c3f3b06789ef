//! Sandboxed filters installed on the channel by its members: installing one everywhere, accepting (or refusing) one
//! from another node, and reporting faults.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kecho_proto::access::Roles;
use kecho_proto::codec::FilterKind;
use kecho_proto::{Message, NodeId};

use super::{Channel, ChannelInner};
use crate::clock::now;
use crate::error::{Error, Result};
use crate::wasm::{FilterFault, WasmFilter, WasmIn, WasmLimits, WasmOut};

/// Sandboxed-filter bookkeeping of a channel.
#[derive(Default)]
pub(super) struct Sandbox {
    /// Other members may install filters here.
    allowed: bool,
    limits: WasmLimits,
    next_req: u32,
    /// Installs this node started: their kind, and where answers go while someone waits for them.
    installs: std::collections::HashMap<u32, (FilterKind, Option<InstallAnswers>)>,
}

/// Where the answers to an install go: (installed, message) per member node.
type InstallAnswers = tokio::sync::mpsc::UnboundedSender<(bool, String)>;

/// What [`Channel::install_filter`] achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Member nodes (this one included) where the filter now runs.
    pub installed: usize,
    /// Refusals, one message per refusing node.
    pub refused: Vec<String>,
    /// Member nodes that did not answer in time.
    pub silent: usize,
}

impl ChannelInner {
    /// Installs a sandboxed filter sent by member node `from` (if this channel allows it) and answers.
    pub(crate) fn install_remote(self: &Arc<Self>, from: NodeId, req: u32, kind: FilterKind, module: bytes::Bytes) {
        let Some(node) = self.node.upgrade() else { return };
        let (addr, permitted) = {
            let st = self.state.lock();
            let addr = st.peers().get(&from).map(|p| p.addr.clone()).unwrap_or_default();
            (addr, st.permits(from, Roles::FILTERS, now()))
        };
        if !permitted {
            self.counters.denied.fetch_add(1, Ordering::Relaxed);
            let message = format!(
                "access to channel {:?} denied: node {from} holds no credential with the filters role",
                self.name
            );
            node.send(from, &addr, &Message::FilterStatus { channel: self.id(), req, ok: false, message });
            return;
        }
        let (allowed, limits) = {
            let sb = self.sandbox.lock();
            (sb.allowed, sb.limits)
        };
        let channel = self.id();
        if !allowed {
            let message = format!("remote filters are not allowed on channel {:?}", self.name);
            node.send(from, &addr, &Message::FilterStatus { channel, req, ok: false, message });
            return;
        }
        let ch = self.clone();
        node.clone().spawn(async move {
            // Compiling can take milliseconds: keep it off the link's reader.
            let fault_ch = Arc::downgrade(&ch);
            let fault_addr = addr.clone();
            let on_fault = Box::new(move |reason: String| {
                if let Some(ch) = fault_ch.upgrade() {
                    ch.report_fault(kind, reason.clone());
                    if let Some(node) = ch.node.upgrade() {
                        let msg = Message::FilterStatus { channel: ch.id(), req, ok: false, message: reason };
                        node.send(from, &fault_addr, &msg);
                    }
                }
            });
            let built = tokio::task::spawn_blocking(move || WasmFilter::new(kind, &module, limits, on_fault)).await;
            let reply = match built {
                Ok(Ok(f)) => {
                    ch.set_sandboxed(kind, Arc::new(f));
                    Message::FilterStatus { channel, req, ok: true, message: "installed".into() }
                }
                Ok(Err(e)) => Message::FilterStatus { channel, req, ok: false, message: e.to_string() },
                Err(e) => Message::FilterStatus { channel, req, ok: false, message: format!("compile task: {e}") },
            };
            node.send(from, &addr, &reply);
        });
    }

    pub(super) fn set_sandboxed(&self, kind: FilterKind, f: Arc<WasmFilter>) {
        match kind {
            FilterKind::Out => {
                *self.out_default.write() = Some(Arc::new(WasmOut(f)));
                self.routing_gen.fetch_add(1, Ordering::AcqRel);
            }
            FilterKind::In => *self.in_filter.write() = Some(Arc::new(WasmIn(f))),
        }
    }

    fn report_fault(&self, kind: FilterKind, reason: String) {
        let _ = self.faults.send(FilterFault { channel: self.name.clone(), kind, reason });
    }

    /// A member node answered one of our installs, or reports that the filter it runs for us failed.
    pub(crate) fn filter_status(&self, from: NodeId, req: u32, ok: bool, message: String) {
        let sb = self.sandbox.lock();
        let Some((kind, waiter)) = sb.installs.get(&req) else { return };
        let kind = *kind;
        let delivered = waiter.as_ref().is_some_and(|w| w.send((ok, message.clone())).is_ok());
        drop(sb);
        if !delivered && !ok {
            self.report_fault(kind, format!("on node {from}: {message}"));
        }
    }
}
impl Channel {
    /// Lets other members install sandboxed filters on this node's part of the channel (default: refused).
    pub fn set_remote_filters(&self, allowed: bool) {
        self.inner.sandbox.lock().allowed = allowed;
    }

    /// Limits for sandboxed filters installed on this node's part of the channel from now on.
    pub fn set_wasm_limits(&self, limits: WasmLimits) {
        self.inner.sandbox.lock().limits = limits;
    }

    /// Reports of sandboxed filters that were disabled: those running here, and those this node installed elsewhere.
    pub fn filter_faults(&self) -> tokio::sync::broadcast::Receiver<FilterFault> {
        self.inner.faults.subscribe()
    }

    /// Installs a sandboxed filter (a WebAssembly module, binary or text format; see docs/FILTERS.md) on every
    /// member node of the channel, this one included: an OUT-filter is used by sources that have none of their own,
    /// an IN-filter replaces the node's IN-filter. Nodes that do not allow remote filters refuse. Waits at most
    /// `timeout` for the answers.
    pub async fn install_filter(&self, kind: FilterKind, module: &[u8], timeout: Duration) -> Result<InstallReport> {
        self.check_right(Roles::FILTERS)?;
        let ch = &self.inner;
        let node = ch.node.upgrade().ok_or_else(|| Error::Closed(ch.name.clone()))?;
        let limits = ch.sandbox.lock().limits;
        // Refuse a broken module here, before bothering anyone.
        let weak = Arc::downgrade(ch);
        let on_fault = Box::new(move |reason: String| {
            if let Some(ch) = weak.upgrade() {
                ch.report_fault(kind, reason);
            }
        });
        let module_bytes = module.to_vec();
        let local = tokio::task::spawn_blocking(move || WasmFilter::new(kind, &module_bytes, limits, on_fault))
            .await
            .map_err(|e| Error::Invalid(format!("compile task: {e}")))?
            .map_err(Error::Wasm)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = {
            let mut sb = ch.sandbox.lock();
            sb.next_req = sb.next_req.wrapping_add(1);
            let req = sb.next_req;
            sb.installs.insert(req, (kind, Some(tx)));
            req
        };
        let peers: Vec<(NodeId, String)> =
            ch.state.lock().peers().iter().map(|(id, p)| (*id, p.addr.clone())).collect();
        let msg = Message::InstallFilter { channel: ch.id(), req, kind, module: bytes::Bytes::copy_from_slice(module) };
        for (id, addr) in &peers {
            node.send(*id, addr, &msg);
        }
        ch.set_sandboxed(kind, Arc::new(local));
        let mut report = InstallReport { installed: 1, ..InstallReport::default() };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut answered = 0;
        while answered < peers.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((true, _))) => report.installed += 1,
                Ok(Some((false, why))) => report.refused.push(why),
                Ok(None) | Err(_) => break,
            }
            answered += 1;
        }
        report.silent = peers.len() - answered;
        // Later reports about this filter are faults.
        if let Some(entry) = ch.sandbox.lock().installs.get_mut(&req) {
            entry.1 = None;
        }
        Ok(report)
    }
}
