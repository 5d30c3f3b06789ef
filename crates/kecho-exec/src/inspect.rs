//! Inspection and configuration agents over kecho channels, after 2K's mobile configuration agents (section 3.2).
//!
//! 2K sends an agent along a route through the ORBs; kecho fans out instead of walking a chain: the inspector submits
//! one request on the agents' channel, kecho delivers it to every agent node at once, and each answers on the reply
//! channel. A *configuration* request carries a component (an artifact's bytes): each node verifies it against its
//! digest, keeps it in its repository store, and answers. The baseline is 2K's "conventional point-to-point
//! approach": one request per node, one after another, each on that node's own channel.
//!
//! Requests travel as raw kecho events: the id, the asker and the digest as event attributes, a component's bytes as
//! the payload (no JSON, no base64: the source encodes the frame once and kecho sends it to every node). Replies are
//! small JSON events.
//!
//! The node report here is what a node knows without the resources crate: its name, kecho's version, CPUs, memory,
//! load and the artifacts it holds. An inspection or configuration can be limited to some nodes
//! ([`Inspector::only`], `--where EXPR` over the resource agents' attributes, [`agents_where`]): the request's
//! OUT-filter then sends it to those nodes' sinks alone, so the others never see it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kecho::filter::{EventView, SinkView};

use kecho::{Attrs, Event, Node, RecvError, Sink, SinkOptions, Source, TypedSink, TypedSource, Value};
use serde::{Deserialize, Serialize};

use crate::repo::{Digest, Store};

/// The prefix of the agents' channel names in a kecho deployment (tests and separate clusters sharing a registry use
/// their own).
pub const DEFAULT_PREFIX: &str = "kecho";
/// The event type of an inspection request.
pub const INSPECT_TYPE: &str = "agent.inspect";
/// The event type of a configuration request (the component is the payload).
pub const LOAD_TYPE: &str = "agent.load";
/// The event type of a reply.
pub const REPLY_TYPE: &str = "agent.reply";
/// The request attribute naming the node whose sinks wait for the replies (its id in decimal).
pub const REPLY_TO_ATTR: &str = "reply_to";
/// How long an agent waits to learn of the asker's reply sink before it answers anyway.
pub const REPLY_SINK_WAIT: Duration = Duration::from_secs(3);

/// The node a request asks the replies to be sent to, if it names one.
fn reply_node(event: &Event) -> Option<kecho::NodeId> {
    match event.attrs().get(REPLY_TO_ATTR) {
        Some(Value::Str(s)) => s.parse().ok().map(kecho::NodeId),
        _ => None,
    }
}

/// Waits until `replies` has a sink on node `node` (the asker), at most `wait`; returns whether it has one. Each
/// `kecho inspect` is a new node: the request can reach an agent before the agent has learned of the asker's
/// reply sink, and a reply submitted then would reach no sink.
async fn await_reply_sink(replies: &kecho::Channel, node: kecho::NodeId, wait: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if replies.sink_attrs().iter().any(|(n, _)| *n == node) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The channel every agent node listens on for requests: `PREFIX.agents`.
pub fn agents_channel(prefix: &str) -> String {
    format!("{prefix}.agents")
}

/// The channel agents answer on: `PREFIX.agents.replies`.
pub fn replies_channel(prefix: &str) -> String {
    format!("{prefix}.agents.replies")
}

/// The channel of one agent node, for point-to-point requests: `PREFIX.agent.NAME`.
pub fn node_channel(prefix: &str, name: &str) -> String {
    format!("{prefix}.agent.{name}")
}

/// A request to agent nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AgentRequest {
    /// Report this node's state.
    Inspect {
        /// Matches the replies to the request.
        id: u64,
        /// Who asks (logged).
        by: String,
        /// An inspection module to run over the report ([`crate::module`]); its answer joins the report.
        #[serde(with = "crate::wire::b64_opt", default)]
        module: Option<Vec<u8>>,
    },
    /// Keep this component in the repository store.
    Load {
        /// Matches the replies to the request.
        id: u64,
        /// Who asks (logged).
        by: String,
        /// The component's digest; bytes that do not match are refused.
        digest: Digest,
        /// The component.
        #[serde(with = "crate::wire::b64")]
        bytes: Vec<u8>,
    },
}

impl AgentRequest {
    /// The request's id.
    pub fn id(&self) -> u64 {
        match self {
            AgentRequest::Inspect { id, .. } | AgentRequest::Load { id, .. } => *id,
        }
    }

    /// Submits the request on a source as a raw event.
    pub async fn submit(&self, source: &mut Source) -> Result<(), InspectError> {
        self.submit_signed(source, None).await
    }

    /// Submits the request, a configuration signed with `credential` (the `exec` right an agent under an access
    /// policy asks for, [`crate::auth`]).
    pub async fn submit_signed(
        &self,
        source: &mut Source,
        credential: Option<&crate::auth::Credential>,
    ) -> Result<(), InspectError> {
        self.submit_to(source, credential, None).await
    }

    /// Submits the request (signed with `credential` if given), asking for the replies on the sinks of node
    /// `reply_to`: an agent that does not know a reply sink of that node yet (the asker joined the replies channel
    /// a moment ago) waits for it, up to [`REPLY_SINK_WAIT`], instead of answering to no one.
    pub async fn submit_to(
        &self,
        source: &mut Source,
        credential: Option<&crate::auth::Credential>,
        reply_to: Option<kecho::NodeId>,
    ) -> Result<(), InspectError> {
        let base = |id: u64, by: &str| {
            let attrs = Attrs::default().with("id", id as i64).with("by", by);
            match reply_to {
                // Node ids use all 64 bits; the attribute keeps them as text.
                Some(node) => attrs.with(REPLY_TO_ATTR, node.0.to_string()),
                None => attrs,
            }
        };
        match self {
            AgentRequest::Inspect { id, by, module } => {
                let attrs = base(*id, by);
                source.submit(INSPECT_TYPE, &attrs, module.as_deref().unwrap_or(&[])).await?;
            }
            AgentRequest::Load { id, by, digest, bytes } => {
                let mut attrs = base(*id, by).with("digest", digest.to_string());
                if let Some(c) = credential {
                    attrs = c.sign(attrs, LOAD_TYPE, "", bytes, unix_ms());
                }
                source.submit(LOAD_TYPE, &attrs, bytes).await?;
            }
        }
        Ok(())
    }

    /// Reads a request from an event; `None` (with the reason logged) when it is not one.
    pub fn from_event(event: &Event) -> Option<AgentRequest> {
        let attrs = event.attrs();
        let id = match attrs.get("id") {
            Some(Value::Int(i)) if *i >= 0 => *i as u64,
            _ => {
                tracing::warn!(ty = event.ty(), "an agent request without an id");
                return None;
            }
        };
        let by = match attrs.get("by") {
            Some(Value::Str(s)) => s.clone(),
            _ => String::from("?"),
        };
        match event.ty() {
            INSPECT_TYPE => {
                let module = (!event.payload().is_empty()).then(|| event.payload().to_vec());
                Some(AgentRequest::Inspect { id, by, module })
            }
            LOAD_TYPE => {
                let digest = match attrs.get("digest") {
                    Some(Value::Str(s)) => s.parse().ok()?,
                    _ => return None,
                };
                Some(AgentRequest::Load { id, by, digest, bytes: event.payload().to_vec() })
            }
            _ => None,
        }
    }
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReply {
    /// The request answered.
    pub id: u64,
    /// The node.
    pub node: String,
    /// What it found or did, or why it could not.
    pub outcome: Result<Outcome, String>,
}

/// What a node did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Outcome {
    /// Its report.
    Report(NodeReport),
    /// The component is in its store.
    Loaded {
        /// The component's digest.
        digest: Digest,
    },
}

/// What an inspection reports about a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node's name.
    pub name: String,
    /// kecho's version on the node.
    pub version: String,
    /// CPUs available to it.
    pub cpus: usize,
    /// Total memory, bytes (0 when unknown).
    pub mem_total: u64,
    /// The one-minute load average (0 when unknown).
    pub load1: f64,
    /// The artifacts in its repository store.
    pub artifacts: Vec<Digest>,
    /// The inspection module's answer, or why it gave none (when the request carried a module).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<Result<String, String>>,
}

/// Why an inspection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// A kecho operation failed.
    #[error(transparent)]
    Kecho(#[from] kecho::Error),
    /// Not every expected node answered in time.
    #[error("{got} of {expected} node(s) answered within {timeout:?}")]
    Incomplete {
        /// Answers received.
        got: usize,
        /// Answers expected.
        expected: usize,
        /// The time allowed.
        timeout: Duration,
    },
}

/// Serves inspection and configuration requests on a node until the returned task is aborted.
pub async fn serve(
    node: &Node,
    prefix: &str,
    name: String,
    store: Store,
) -> Result<tokio::task::JoinHandle<()>, InspectError> {
    serve_audited(node, prefix, name, store, None).await
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// As [`serve`], also writing every inspection and configuration, with who asked, to the agent's audit log.
pub async fn serve_audited(
    node: &Node,
    prefix: &str,
    name: String,
    store: Store,
    audit: Option<crate::agent::AuditLog>,
) -> Result<tokio::task::JoinHandle<()>, InspectError> {
    serve_with(node, prefix, name, store, audit, None).await
}

/// As [`serve_audited`]; under `policy`, a configuration is taken only from a holder of the `exec` right (its
/// credential for [`crate::service::CHANNEL`], [`crate::auth`]), and refused with the reason otherwise. Inspection
/// needs no right.
pub async fn serve_with(
    node: &Node,
    prefix: &str,
    name: String,
    store: Store,
    mut audit: Option<crate::agent::AuditLog>,
    policy: Option<crate::auth::ExecPolicy>,
) -> Result<tokio::task::JoinHandle<()>, InspectError> {
    let agents = node.channel(&agents_channel(prefix)).await?;
    let own = node.channel(&node_channel(prefix, &name)).await?;
    let replies = node.channel(&replies_channel(prefix)).await?;
    let mut fanout: Sink =
        agents.sink(SinkOptions::new().types([INSPECT_TYPE, LOAD_TYPE]).attr("agent", name.clone()))?;
    let mut direct: Sink = own.sink(SinkOptions::new().types([INSPECT_TYPE, LOAD_TYPE]))?;
    let mut out: TypedSource<AgentReply> = replies.typed_source(REPLY_TYPE)?;
    Ok(tokio::spawn(async move {
        // The channels must live as long as the loop.
        let _keep = (agents, own);
        loop {
            let event = tokio::select! {
                e = fanout.recv() => e,
                e = direct.recv() => e,
            };
            let event = match event {
                Ok(e) => e,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(node = %name, missed = n, "agent requests missed");
                    continue;
                }
                // Closed, or a kind of error this loop does not know: the sink is done.
                Err(_) => break,
            };
            let Some(request) = AgentRequest::from_event(&event) else { continue };
            if let Some(asker) = reply_node(&event) {
                if !await_reply_sink(&replies, asker, REPLY_SINK_WAIT).await {
                    tracing::warn!(node = %name, asker = %asker.0, "no reply sink of the asker known; answering anyway");
                }
            }
            if let (Some(p), AgentRequest::Load { id, by, digest, .. }) = (&policy, &request) {
                let channel = crate::service::CHANNEL;
                if let Err(e) = p.verify(channel, LOAD_TYPE, "", event.payload(), event.attrs(), unix_ms()) {
                    let reason = format!("not allowed: {e}");
                    if let Some(log) = &mut audit {
                        let _ = log.record(by, "refuse-configure", &digest.to_string(), &reason);
                    }
                    let reply = AgentReply { id: *id, node: name.clone(), outcome: Err(reason) };
                    if out.submit(&reply, &Attrs::default()).await.is_err() {
                        break;
                    }
                    continue;
                }
            }
            if let Some(log) = &mut audit {
                let written = match &request {
                    AgentRequest::Inspect { by, module, .. } => {
                        let detail = module.as_ref().map_or(String::new(), |m| format!("module of {} bytes", m.len()));
                        log.record(by, "inspect", &name, &detail)
                    }
                    AgentRequest::Load { by, digest, bytes, .. } => {
                        log.record(by, "configure", &digest.to_string(), &format!("{} bytes", bytes.len()))
                    }
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, "audit log write failed");
                }
            }
            let reply = match request {
                // A module runs on a blocking thread (within its wall-time limit), not on the node's runtime.
                AgentRequest::Inspect { id, by, module: Some(module) } => {
                    tracing::info!(who = %by, action = "inspect", module_bytes = module.len(), "audit");
                    let mut rep = report(&name, &store);
                    let input = serde_json::to_vec(&rep).unwrap_or_default();
                    let ran = tokio::task::spawn_blocking(move || {
                        crate::module::run(&module, &input, kecho::wasm::WasmLimits::default())
                    })
                    .await;
                    rep.module = Some(match ran {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(e) => Err(format!("the module's thread failed: {e}")),
                    });
                    AgentReply { id, node: name.clone(), outcome: Ok(Outcome::Report(rep)) }
                }
                request => answer(&name, &store, request),
            };
            if out.submit(&reply, &Attrs::default()).await.is_err() {
                break;
            }
        }
    }))
}

fn answer(name: &str, store: &Store, request: AgentRequest) -> AgentReply {
    match request {
        AgentRequest::Inspect { id, by, .. } => {
            tracing::info!(who = %by, action = "inspect", "audit");
            AgentReply { id, node: name.to_string(), outcome: Ok(Outcome::Report(report(name, store))) }
        }
        AgentRequest::Load { id, by, digest, bytes } => {
            tracing::info!(who = %by, action = "configure", %digest, "audit");
            let outcome =
                store.put_expecting(&digest, &bytes).map(|()| Outcome::Loaded { digest }).map_err(|e| e.to_string());
            AgentReply { id, node: name.to_string(), outcome }
        }
    }
}

fn report(name: &str, store: &Store) -> NodeReport {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    NodeReport {
        name: name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mem_total,
        load1,
        artifacts: store.list().unwrap_or_default(),
        module: None,
    }
}

/// The agents whose attributes on the resources channel `resources` (`kecho.resources`: name, CPUs, memory, free
/// capacity and the operator's attributes, as each agent publishes them) satisfy `require`.
pub fn agents_where(resources: &kecho::Channel, require: &kecho_resources::Requirement) -> BTreeSet<String> {
    resources
        .sink_attrs()
        .into_iter()
        .filter_map(|(_, a)| match a.get("agent") {
            Some(Value::Str(name)) if require.matches(&a) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Sends requests to agent nodes and gathers their answers.
#[derive(Debug)]
pub struct Inspector {
    who: String,
    credential: Option<crate::auth::Credential>,
    /// The node the inspector runs on: requests ask for the replies there.
    node: kecho::NodeId,
    next_id: u64,
    only: Arc<Mutex<Option<BTreeSet<String>>>>,
    requests: Source,
    replies: TypedSink<AgentReply>,
    _channels: (kecho::Channel, kecho::Channel),
}

impl Inspector {
    /// An inspector on `node` for the agents under `prefix`, waiting up to `timeout` until `nodes` agent nodes listen.
    pub async fn new(
        node: &Node,
        prefix: &str,
        who: &str,
        nodes: usize,
        timeout: Duration,
    ) -> Result<Inspector, InspectError> {
        let agents = node.channel(&agents_channel(prefix)).await?;
        let replies_ch = node.channel(&replies_channel(prefix)).await?;
        let replies = replies_ch.typed_sink(REPLY_TYPE, SinkOptions::new().types([REPLY_TYPE]))?;
        let mut requests = agents.source()?;
        let only: Arc<Mutex<Option<BTreeSet<String>>>> = Arc::default();
        let chosen_names = only.clone();
        let select = move |_: &EventView<'_>, sinks: &SinkView<'_>, chosen: &mut Vec<usize>| {
            let names = chosen_names.lock().unwrap_or_else(|e| e.into_inner());
            match &*names {
                None => chosen.extend(0..sinks.len()),
                Some(names) => {
                    chosen.extend(sinks.iter().enumerate().filter_map(|(i, s)| match s.attrs().get("agent") {
                        Some(Value::Str(n)) if names.contains(n) => Some(i),
                        _ => None,
                    }))
                }
            }
        };
        requests.set_out_filter(Some(Arc::new(select)));
        agents.wait_for_sinks(nodes, timeout).await?;
        let channels = (agents, replies_ch);
        Ok(Inspector {
            who: who.to_string(),
            credential: None,
            node: node.id(),
            // Every inspector's sink sees every reply on the channel: ids start where another inspector's (an
            // earlier `kecho inspect`, another operator) are unlikely to be, so replies to them are not taken for
            // answers here. Attributes carry them as non-negative i64.
            next_id: (node.id().0 ^ unix_ms().wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 12,
            only,
            requests,
            replies,
            _channels: channels,
        })
    }

    /// Signs configurations with `credential` (agents under an access policy take them only from holders of the
    /// `exec` right).
    pub fn with_credential(mut self, credential: Option<crate::auth::Credential>) -> Inspector {
        self.credential = credential;
        self
    }

    /// Sends the following requests only to the agent nodes named (`None`: to every one).
    pub fn only(&self, names: Option<BTreeSet<String>>) {
        *self.only.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Inspects every agent node at once; waits for `expect` reports.
    pub async fn inspect(&mut self, expect: usize, timeout: Duration) -> Result<Vec<AgentReply>, InspectError> {
        self.inspect_with(None, expect, timeout).await
    }

    /// Inspects every agent node at once, running inspection module `module` on each ([`crate::module`]); waits
    /// for `expect` reports.
    pub async fn inspect_with(
        &mut self,
        module: Option<&[u8]>,
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<AgentReply>, InspectError> {
        let id = self.id();
        let module = module.map(<[u8]>::to_vec);
        AgentRequest::Inspect { id, by: self.who.clone(), module }
            .submit_to(&mut self.requests, None, Some(self.node))
            .await?;
        self.gather(id, expect, timeout).await
    }

    /// Loads a component onto every agent node at once; waits for `expect` answers.
    pub async fn configure(
        &mut self,
        bytes: &[u8],
        expect: usize,
        timeout: Duration,
    ) -> Result<Vec<AgentReply>, InspectError> {
        let id = self.id();
        let request = AgentRequest::Load { id, by: self.who.clone(), digest: Digest::of(bytes), bytes: bytes.to_vec() };
        request.submit_to(&mut self.requests, self.credential.as_ref(), Some(self.node)).await?;
        self.gather(id, expect, timeout).await
    }

    /// The baseline: the same request to each node in turn on its own channel, waiting for each answer before the
    /// next (`targets` are sources opened with [`Inspector::direct`]).
    pub async fn one_by_one(
        &mut self,
        targets: &mut [Source],
        load: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<AgentReply>, InspectError> {
        let mut all = Vec::with_capacity(targets.len());
        for target in targets.iter_mut() {
            let id = self.id();
            let request = match load {
                Some(bytes) => {
                    AgentRequest::Load { id, by: self.who.clone(), digest: Digest::of(bytes), bytes: bytes.to_vec() }
                }
                None => AgentRequest::Inspect { id, by: self.who.clone(), module: None },
            };
            request.submit_to(target, self.credential.as_ref(), Some(self.node)).await?;
            all.extend(self.gather(id, 1, timeout).await?);
        }
        Ok(all)
    }

    /// A source on one node's own channel, for [`Inspector::one_by_one`]; waits until that node listens.
    pub async fn direct(
        node: &Node,
        prefix: &str,
        name: &str,
        timeout: Duration,
    ) -> Result<(kecho::Channel, Source), InspectError> {
        let ch = node.channel(&node_channel(prefix, name)).await?;
        let src = ch.source()?;
        ch.wait_for_sinks(1, timeout).await?;
        Ok((ch, src))
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Waits for `expect` answers (from distinct nodes) to request `id`.
    pub async fn gather(&mut self, id: u64, expect: usize, timeout: Duration) -> Result<Vec<AgentReply>, InspectError> {
        let mut got = Vec::with_capacity(expect);
        let mut nodes = BTreeSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while got.len() < expect {
            match tokio::time::timeout_at(deadline, self.replies.recv()).await {
                Ok(Ok(reply)) if reply.value.id == id && nodes.insert(reply.value.node.clone()) => {
                    got.push(reply.value)
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(InspectError::Incomplete { got: got.len(), expected: expect, timeout }),
            }
        }
        Ok(got)
    }
}
