//! The flags and set-up every command that runs a node shares: the registry address, the node's listening and
//! advertised addresses, heartbeat, identity, TLS and access control.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho::Node;

use crate::access;
use crate::secrets::read_identity;

/// The registry address used when neither --registry nor $KECHO_REGISTRY is given.
pub const DEFAULT_REGISTRY: &str = "127.0.0.1:7400";

#[derive(clap::Args, Debug, Clone)]
pub struct RegistryArg {
    /// Registry address, or the replicas' addresses of a replicated registry separated by commas.
    #[arg(long, env = "KECHO_REGISTRY", default_value = DEFAULT_REGISTRY)]
    pub registry: String,
}

impl RegistryArg {
    /// The registry's address, or its replicas' addresses.
    pub fn addrs(&self) -> Result<Vec<SocketAddr>> {
        parse_addrs("registry", &self.registry)
    }

    /// A client of the registry (or of its replicas).
    pub fn client(&self) -> Result<kecho::RegistryClient> {
        Ok(kecho::RegistryClient::replicated(self.addrs()?))
    }
}

/// A comma-separated list of addresses (at least one).
pub fn parse_addrs(what: &str, s: &str) -> Result<Vec<SocketAddr>> {
    let addrs = s
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| parse_addr(what, a))
        .collect::<Result<Vec<_>>>()?;
    if addrs.is_empty() {
        bail!("no {what} address given");
    }
    Ok(addrs)
}

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Address this node listens on for other nodes.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Address other nodes dial to reach this one, if not the listening address (needed with --listen 0.0.0.0:PORT,
    /// or behind address translation); port 0 means the listening port.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Transports of this node's links: tcp, quic (UDP, on the same port number) or both; nodes use QUIC when
    /// both speak it and TCP otherwise.
    #[arg(long, default_value = "tcp", value_name = "tcp|quic|both", env = "KECHO_TRANSPORT")]
    pub transport: kecho::Transport,
    /// Link to nodes of this host through shared memory, set up over Unix-domain sockets (when they run with
    /// --same-host too), instead of TCP or QUIC. `KECHO_SAME_HOST` takes 1/0, true/false, yes/no or on/off.
    #[arg(long, env = "KECHO_SAME_HOST", value_parser = clap::builder::BoolishValueParser::new())]
    pub same_host: bool,
    /// KiB of each shared-memory ring of the same-host links this node dials (per direction); 0 carries their bytes
    /// over the Unix-domain socket itself.
    #[arg(long, value_name = "KIB", default_value_t = 256)]
    pub same_host_ring_kib: usize,
    /// Low-latency receive mode: a link's reader polls its socket for up to this many microseconds after it found
    /// it empty before it sleeps (events are taken without a thread's wake-up; costs up to one core while it
    /// polls). 0: off.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub low_latency_us: u64,
    /// Whether TCP links may take a second connection for urgent events (priorities 1 to 3): `on`, dialled once a
    /// link carries one; `at-once`, as soon as a link is up (a first urgent event from either end then never waits
    /// behind a bulk backlog; it costs a second connection per link); `off`. A link has it only if both nodes allow
    /// it (docs/PROTOCOL.md, "Priorities and deadlines").
    #[arg(long, value_name = "on|off|at-once", default_value = "on", value_parser = parse_urgent)]
    pub urgent_connection: UrgentConnection,
    /// Seconds of silence after which another node counts as dead and its members are removed.
    #[arg(long, default_value_t = 3.0)]
    pub heartbeat: f64,
    /// Run a channel in tree mode once it has more than N member nodes: about 5 links per node and events forwarded
    /// along per-source trees, instead of a link to every member (docs/SCALE.md). Default: 64.
    #[arg(long, value_name = "N", value_parser = parse_member_count)]
    pub tree_threshold: Option<u64>,
    /// Let other members install sandboxed (WebAssembly) filters on this node's part of the channel.
    #[arg(long)]
    pub allow_filters: bool,
    /// This node's identity (see `kecho identity new`), so that its node id stays the same across restarts; default
    /// a new one per start.
    #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
    pub identity: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub access: access::AccessArgs,
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Run node links over TLS with this certificate (PEM; see `kecho certs`); needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], env = "KECHO_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "KECHO_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The CA certificate peers' certificates must chain to (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "KECHO_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Check this name in every peer's certificate instead of the address dialled.
    #[arg(long, value_name = "NAME", requires = "tls_cert", env = "KECHO_TLS_NAME")]
    pub tls_name: Option<String>,
}

impl TlsArgs {
    pub fn config(&self) -> Result<Option<kecho::TlsConfig>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else { return Ok(None) };
        let mut cfg = kecho::TlsConfig::from_pem_files(cert, key, ca)?;
        if let Some(name) = &self.tls_name {
            cfg = cfg.server_name(name)?;
        }
        Ok(Some(cfg))
    }
}

pub fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("invalid {what} address {s:?}"))?
        .next()
        .with_context(|| format!("invalid {what} address {s:?}"))
}

/// A number of member nodes, at least 1 (clap's range check said "0 is not in 1..18446744073709551615").
fn parse_member_count(s: &str) -> std::result::Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("a channel has at least one member node: give 1 or more".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a number of member nodes, not {s:?}")),
    }
}

/// `--urgent-connection`: whether links (TCP, and QUIC) take an urgent connection, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrgentConnection {
    Off,
    /// Once a link carries a prioritised event.
    On,
    /// As soon as a link is up.
    AtOnce,
}

/// `on`, `off` or `at-once` (also what [`parse_on_off`] takes for on and off).
fn parse_urgent(s: &str) -> std::result::Result<UrgentConnection, String> {
    match s {
        "at-once" => Ok(UrgentConnection::AtOnce),
        _ => match parse_on_off(s) {
            Ok(true) => Ok(UrgentConnection::On),
            Ok(false) => Ok(UrgentConnection::Off),
            Err(_) => Err(format!("expected on, off or at-once, not {s:?}")),
        },
    }
}

/// `on` or `off` (also true/false, as a TOML boolean in a config file gives it, yes/no and 1/0).
fn parse_on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

/// Starts this process's node; `open_timeout` bounds how long opening a channel may take (seconds).
pub async fn node(reg: &RegistryArg, args: &NodeArgs, open_timeout: Option<f64>) -> Result<Node> {
    let registry = reg.addrs()?;
    let listen = parse_addr("listen", &args.listen)?;
    if !(args.heartbeat > 0.0 && args.heartbeat.is_finite()) {
        bail!("--heartbeat must be a positive number of seconds");
    }
    let mut builder = Node::builder()
        .registry_replicas(registry)
        .listen(listen)
        .transport(args.transport)
        .same_host(args.same_host)
        .shared_memory((args.same_host_ring_kib > 0).then(|| args.same_host_ring_kib.saturating_mul(1024)))
        .low_latency(Duration::from_micros(args.low_latency_us))
        .urgent_connection(args.urgent_connection != UrgentConnection::Off)
        .urgent_connection_at_once(args.urgent_connection == UrgentConnection::AtOnce)
        .heartbeat_timeout(Duration::from_secs_f64(args.heartbeat));
    if let Some(n) = args.tree_threshold {
        builder = builder.tree_threshold(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(a) = &args.advertise {
        builder = builder.advertise(parse_addr("advertise", a)?);
    }
    if let Some(tls) = args.tls.config()? {
        builder = builder.tls(tls);
    }
    let identity = args.identity.as_deref().map(read_identity).transpose()?;
    if let Some(id) = &identity {
        builder = builder.identity(id.clone());
    }
    builder = args.access.apply(builder, identity.as_ref())?;
    if let Some(t) = open_timeout.filter(|t| *t > 0.0 && t.is_finite()) {
        let m = kecho::MembershipConfig { open_timeout: Duration::from_secs_f64(t), ..Default::default() };
        builder = builder.membership(m);
    }
    Ok(builder.start().await?)
}

pub async fn open(node: &Node, name: &str, existing: bool) -> Result<kecho::Channel> {
    let ch = if existing { node.open_channel(name).await? } else { node.channel(name).await? };
    Ok(ch)
}
