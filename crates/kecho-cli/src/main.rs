//! The `kecho` command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use kecho::{Node, Overflow, RecvError, SinkOptions, Value};
use kecho_registry::RegistryServer;
use tokio::io::AsyncBufReadExt;

mod access;
mod attrs;
mod certs;
mod demo;

const DEFAULT_REGISTRY: &str = "127.0.0.1:7400";

#[derive(Parser, Debug)]
#[command(name = "kecho", version, about = "Event channels after KECho: registry, publish, subscribe, demo")]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. info or kecho=debug.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct RegistryArg {
    /// Registry address [default: $KECHO_REGISTRY, then 127.0.0.1:7400].
    #[arg(long, env = "KECHO_REGISTRY", default_value = DEFAULT_REGISTRY)]
    registry: String,
}

#[derive(clap::Args, Debug, Clone)]
struct NodeArgs {
    /// Address this node listens on for other nodes.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address other nodes dial to reach this one, if not the listening address (needed with --listen 0.0.0.0:PORT,
    /// or behind address translation); port 0 means the listening port.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Seconds of silence after which another node counts as dead and its members are removed.
    #[arg(long, default_value_t = 3.0)]
    heartbeat: f64,
    /// Let other members install sandboxed (WebAssembly) filters on this node's part of the channel.
    #[arg(long)]
    allow_filters: bool,
    /// This node's identity (see `kecho identity new`), so that its node id stays the same across restarts; default
    /// a new one per start.
    #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
    identity: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    access: access::AccessArgs,
}

#[derive(clap::Args, Debug, Clone, Default)]
struct TlsArgs {
    /// Run node links over TLS with this certificate (PEM; see `kecho certs`); needs --tls-key and --tls-ca.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], env = "KECHO_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "KECHO_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// The CA certificate peers' certificates must chain to (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "KECHO_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Check this name in every peer's certificate instead of the address dialled.
    #[arg(long, value_name = "NAME", requires = "tls_cert", env = "KECHO_TLS_NAME")]
    tls_name: Option<String>,
}

impl TlsArgs {
    fn config(&self) -> Result<Option<kecho::TlsConfig>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca) else { return Ok(None) };
        let mut cfg = kecho::TlsConfig::from_pem_files(cert, key, ca)?;
        if let Some(name) = &self.tls_name {
            cfg = cfg.server_name(name)?;
        }
        Ok(Some(cfg))
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the channel registry (the KECho group server).
    Registry {
        /// Address to listen on.
        #[arg(long, default_value = DEFAULT_REGISTRY)]
        listen: String,
    },
    /// Subscribe to a channel and print each event.
    Sub(SubArgs),
    /// Publish events on a channel.
    Pub(PubArgs),
    /// List the registry's channels with member counts.
    Channels {
        #[command(flatten)]
        reg: RegistryArg,
    },
    /// Install a sandboxed filter (WebAssembly, .wat or .wasm) on every member of a channel.
    Filter {
        #[command(subcommand)]
        cmd: FilterCmd,
    },
    /// Make or show a node identity: the key a node proves its node id with (see --identity).
    Identity {
        #[command(subcommand)]
        cmd: IdentityCmd,
    },
    /// Make or show an access authority: the key that signs credentials for protected channels (see
    /// --authority-pub and `kecho grant`).
    Authority {
        #[command(subcommand)]
        cmd: access::AuthorityCmd,
    },
    /// Issue a credential: the right to join a protected channel as a source or sink, or to install filters in it,
    /// for one node key.
    Grant(access::GrantArgs),
    /// Make a CA and certificates for TLS node links (a development CA: keep ca.key safe or use your own PKI).
    Certs {
        /// Directory to write ca.pem, ca.key and NAME.pem / NAME.key per node into.
        dir: std::path::PathBuf,
        /// A node's name: an IP address or DNS name other nodes dial it by (repeatable). Each gets a certificate.
        #[arg(long = "node", value_name = "NAME", required = true)]
        nodes: Vec<String>,
        /// An extra name put in every node certificate, for use with --tls-name.
        #[arg(long, value_name = "NAME")]
        shared_name: Option<String>,
    },
    /// Run an embedded registry and a small cluster on loopback; print what each sink got and delivery latency, then
    /// a short web-farm run (KECho's load balancer against other modes).
    Demo {
        /// Events per source in the latency run.
        #[arg(long, default_value_t = 2000)]
        events: u64,
        /// Leave out the web-farm part.
        #[arg(long)]
        no_webfarm: bool,
    },
    /// Run the benchmark suite: the KECho paper's measurements against raw TCP (and NATS and Zenoh when built with
    /// the bench-peers feature); Markdown on standard output, JSON and SVG plots in --out. See BENCHMARKS.md.
    Bench(kecho_bench::BenchArgs),
    /// Reproduce KECho's web-farm experiment (section 5.4), extended: balancing modes, the ideal queue, plots.
    Webfarm(kecho_lb::WebfarmArgs),
}

#[derive(Subcommand, Debug)]
enum IdentityCmd {
    /// Write a new identity to FILE (refuses to overwrite) and print its node id.
    New {
        /// Where to keep it (readable by its owner only).
        file: std::path::PathBuf,
    },
    /// Print the node id and public key of the identity in FILE.
    Show {
        /// The identity file.
        file: std::path::PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum FilterCmd {
    /// Install FILE as an OUT-filter (--out) or IN-filter (--in) on every member node that allows it.
    Install {
        /// Channel name.
        channel: String,
        /// The module, WebAssembly text (.wat) or binary (.wasm); see docs/FILTERS.md for the ABI.
        file: std::path::PathBuf,
        /// Install as an OUT-filter (runs at sources, chooses sinks).
        #[arg(long, conflicts_with = "in_filter", required_unless_present = "in_filter")]
        out: bool,
        /// Install as an IN-filter (runs at receiving nodes, before dispatch).
        #[arg(long = "in")]
        in_filter: bool,
        #[command(flatten)]
        reg: RegistryArg,
        /// Seconds to wait for the members' answers.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
        #[command(flatten)]
        tls: TlsArgs,
        /// This node's identity (needed with --token).
        #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
        identity: Option<std::path::PathBuf>,
        #[command(flatten)]
        access: access::AccessArgs,
    },
}

#[derive(clap::Args, Debug)]
struct SubArgs {
    /// Channel name.
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    /// Only these event types (repeatable); default all.
    #[arg(long = "type", value_name = "T")]
    types: Vec<String>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    format: Format,
    /// What to do when events arrive faster than they are printed.
    #[arg(long, value_enum, default_value_t = OverflowArg::Block)]
    overflow: OverflowArg,
    /// Queue capacity in events.
    #[arg(long, default_value_t = 4096)]
    capacity: usize,
    /// Content filter, evaluated at every source: a CEL expression over `type` and the event's attributes, e.g.
    /// 'type == "load" && cpu > 0.8 && zone in ["a", "b"]'.
    #[arg(long, value_name = "EXPR")]
    filter: Option<String>,
    /// Attribute this sink advertises to the channel's filters, KEY=VALUE (repeatable; typed as for pub).
    #[arg(long = "attr", value_name = "K=V")]
    attrs: Vec<String>,
    /// Fail if the channel does not exist instead of creating it.
    #[arg(long)]
    existing: bool,
    #[command(flatten)]
    node: NodeArgs,
    /// Give up after this many seconds (default: never).
    #[arg(long)]
    timeout: Option<f64>,
}

#[derive(clap::Args, Debug)]
struct PubArgs {
    /// Channel name.
    channel: String,
    /// Payload text, or `-` to read one event per line from standard input.
    payload: Option<String>,
    #[command(flatten)]
    reg: RegistryArg,
    /// Event type.
    #[arg(long = "type", value_name = "T", default_value = "event")]
    ty: String,
    /// Attribute KEY=VALUE (repeatable). VALUE is read as integer, float, true/false or text; force a type with
    /// KEY:int=, KEY:float=, KEY:bool=, KEY:str= or KEY:hex= (bytes).
    #[arg(long = "attr", value_name = "K=V")]
    attrs: Vec<String>,
    /// OUT-filter choosing which sinks get each event: all, none, rr, random, weighted:ATTR, hash:ATTR,
    /// least:ATTR:N, most:ATTR:N or p2c:ATTR (ATTR is a sink attribute, or for hash an event attribute).
    #[arg(long, value_name = "SPEC")]
    select: Option<String>,
    /// Number of events (default 1; with `-`, every line).
    #[arg(long)]
    count: Option<u64>,
    /// Events per second (default: as fast as possible).
    #[arg(long)]
    rate: Option<f64>,
    /// Payload size in bytes when no payload text is given (filled with 'x').
    #[arg(long)]
    size: Option<usize>,
    /// Wait until this many sinks are present before publishing.
    #[arg(long)]
    wait_sinks: Option<usize>,
    /// Seconds to wait for sinks (and for the channel).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Fail if the channel does not exist instead of creating it.
    #[arg(long)]
    existing: bool,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OverflowArg {
    Block,
    DropOldest,
    DropNewest,
}

impl From<OverflowArg> for Overflow {
    fn from(o: OverflowArg) -> Self {
        match o {
            OverflowArg::Block => Overflow::Block,
            OverflowArg::DropOldest => Overflow::DropOldest,
            OverflowArg::DropNewest => Overflow::DropNewest,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kecho: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kecho: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line.
fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    parts.join(": ").replace('\n', " ")
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Registry { listen } => registry(&listen).await,
        Cmd::Sub(a) => sub(a).await,
        Cmd::Pub(a) => publish(a).await,
        Cmd::Channels { reg } => channels(&reg).await,
        Cmd::Demo { events, no_webfarm } => {
            demo::run(events).await?;
            if !no_webfarm {
                println!();
                kecho_lb::demo_webfarm().await?;
            }
            Ok(())
        }
        Cmd::Webfarm(args) => kecho_lb::run_webfarm(args).await,
        Cmd::Identity { cmd: IdentityCmd::New { file } } => identity_new(&file),
        Cmd::Identity { cmd: IdentityCmd::Show { file } } => {
            let id = read_identity(&file)?;
            println!("node {}  public key {}", id.node_id(), hex(&id.public_key()));
            Ok(())
        }
        Cmd::Authority { cmd } => access::authority(cmd),
        Cmd::Grant(args) => access::grant(args),
        Cmd::Bench(args) => kecho_bench::run(args).await,
        Cmd::Certs { dir, nodes, shared_name } => certs::write(&dir, &nodes, shared_name.as_deref()),
        Cmd::Filter {
            cmd: FilterCmd::Install { channel, file, out, in_filter: _, reg, timeout, tls, identity, access },
        } => {
            let args = NodeArgs {
                listen: "127.0.0.1:0".into(),
                advertise: None,
                heartbeat: 3.0,
                allow_filters: false,
                identity,
                tls,
                access,
            };
            install_filter(&channel, &file, out, &reg, timeout, &args).await
        }
    }
}

fn parse_addr(what: &str, s: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .with_context(|| format!("invalid {what} address {s:?}"))?
        .next()
        .with_context(|| format!("invalid {what} address {s:?}"))
}

async fn registry(listen: &str) -> Result<()> {
    let addr = parse_addr("listen", listen)?;
    let server = RegistryServer::bind(addr).await?;
    eprintln!("kecho registry listening on {}", server.local_addr());
    tokio::select! {
        _ = server.run() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Starts this process's node; `open_timeout` bounds how long opening a channel may take (seconds).
async fn node(reg: &RegistryArg, args: &NodeArgs, open_timeout: Option<f64>) -> Result<Node> {
    let registry = parse_addr("registry", &reg.registry)?;
    let listen = parse_addr("listen", &args.listen)?;
    if !(args.heartbeat > 0.0 && args.heartbeat.is_finite()) {
        bail!("--heartbeat must be a positive number of seconds");
    }
    let mut builder =
        Node::builder().registry(registry).listen(listen).heartbeat_timeout(Duration::from_secs_f64(args.heartbeat));
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

async fn open(node: &Node, name: &str, existing: bool) -> Result<kecho::Channel> {
    let ch = if existing { node.open_channel(name).await? } else { node.channel(name).await? };
    Ok(ch)
}

async fn install_filter(
    channel: &str,
    file: &std::path::Path,
    out: bool,
    reg: &RegistryArg,
    timeout: f64,
    args: &NodeArgs,
) -> Result<()> {
    let module = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !(timeout > 0.0 && timeout.is_finite()) {
        bail!("--timeout must be a positive number of seconds");
    }
    let node = node(reg, args, Some(timeout)).await?;
    let ch = node.open_channel(channel).await?;
    let kind = if out { kecho::FilterKind::Out } else { kecho::FilterKind::In };
    let report = ch.install_filter(kind, &module, Duration::from_secs_f64(timeout)).await;
    node.shutdown().await;
    let report = report?;
    let remote = report.installed.saturating_sub(1);
    println!("installed on {remote} member node(s)");
    for r in &report.refused {
        println!("refused: {r}");
    }
    if report.silent > 0 {
        println!("{} member node(s) did not answer", report.silent);
    }
    if remote == 0 && (!report.refused.is_empty() || report.silent > 0) {
        bail!("no member node installed the filter");
    }
    Ok(())
}

async fn sub(a: SubArgs) -> Result<()> {
    let mut opts = SinkOptions::new().types(a.types.clone()).capacity(a.capacity).overflow(a.overflow.into());
    for (k, v) in attrs::parse_all(&a.attrs)?.0 {
        opts = opts.attr(k, v);
    }
    if let Some(expr) = &a.filter {
        // Check before touching the network, so that a typo fails fast.
        kecho::filter::ContentFilter::compile(expr)?;
        opts = opts.filter(expr);
    }
    let node = node(&a.reg, &a.node, a.timeout).await?;
    let ch = open(&node, &a.channel, a.existing).await?;
    ch.set_remote_filters(a.node.allow_filters);
    let mut sink = ch.sink(opts)?;
    eprintln!("kecho: subscribed to {:?}", a.channel);
    let deadline = a.timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
    let mut got = 0u64;
    let mut out = std::io::stdout().lock();
    let result = loop {
        if a.count.is_some_and(|n| got >= n) {
            break Ok(());
        }
        let next = async {
            tokio::select! {
                r = sink.recv() => Some(r),
                _ = tokio::signal::ctrl_c() => None,
            }
        };
        let r = match deadline {
            Some(d) => match tokio::time::timeout_at(d, next).await {
                Ok(r) => r,
                Err(_) => {
                    break Err(anyhow::anyhow!(
                        "timed out after {:.1} s with {got} event(s) received",
                        a.timeout.unwrap_or_default()
                    ))
                }
            },
            None => next.await,
        };
        match r {
            None => break Ok(()),
            Some(Ok(ev)) => {
                got += 1;
                let line = match a.format {
                    Format::Json => attrs::event_json(&ev).to_string(),
                    Format::Text => attrs::event_text(&ev),
                };
                use std::io::Write;
                if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                    break Ok(()); // stdout closed (e.g. piped into head)
                }
            }
            Some(Err(RecvError::Lagged(n))) => eprintln!("kecho: missed {n} event(s)"),
            Some(Err(RecvError::Closed)) => break Err(anyhow::anyhow!("channel closed")),
            Some(Err(e)) => break Err(e.into()),
        }
    };
    drop(out);
    drop(sink);
    node.shutdown().await;
    result
}

async fn publish(a: PubArgs) -> Result<()> {
    let attrs = attrs::parse_all(&a.attrs)?;
    if a.ty.is_empty() {
        bail!("--type must not be empty");
    }
    if let Some(r) = a.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be a positive number of events per second");
        }
    }
    if !(a.timeout >= 0.0 && a.timeout.is_finite()) {
        bail!("--timeout must be a non-negative number of seconds");
    }
    let selector = match &a.select {
        Some(spec) => Some(std::sync::Arc::new(spec.parse::<kecho::filter::Selector>()?)),
        None => None,
    };
    let node = node(&a.reg, &a.node, Some(a.timeout)).await?;
    let ch = open(&node, &a.channel, a.existing).await?;
    ch.set_remote_filters(a.node.allow_filters);
    let mut src = ch.source()?;
    if let Some(sel) = selector {
        src.set_out_filter(Some(sel));
    }
    if let Some(k) = a.wait_sinks {
        ch.wait_for_sinks(k, Duration::from_secs_f64(a.timeout)).await?;
    }
    let mut ticker = a.rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut sent = 0u64;
    if a.payload.as_deref() == Some("-") {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading standard input")? {
            if a.count.is_some_and(|n| sent >= n) {
                break;
            }
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            src.submit(&a.ty, &attrs, line.as_bytes()).await?;
            sent += 1;
        }
    } else {
        let payload: Vec<u8> = match (&a.payload, a.size) {
            (Some(p), _) => p.clone().into_bytes(),
            (None, Some(n)) => vec![b'x'; n],
            (None, None) => Vec::new(),
        };
        let count = a.count.unwrap_or(1);
        for _ in 0..count {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            src.submit(&a.ty, &attrs, &payload).await?;
            sent += 1;
        }
    }
    let stats = ch.stats();
    drop(src);
    node.shutdown().await;
    eprintln!("kecho: published {sent} event(s) ({} frame(s) sent, {} dropped)", stats.sent, stats.dropped);
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn identity_new(file: &std::path::Path) -> Result<()> {
    let secret: [u8; 32] = rand_secret()?;
    write_secret(file, &secret)?;
    let id = kecho::Identity::from_secret(secret);
    println!("node {}  public key {}", id.node_id(), hex(&id.public_key()));
    Ok(())
}

/// Writes a 32-byte secret as hex to a new file readable by its owner only.
fn write_secret(file: &std::path::Path, secret: &[u8; 32]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(file).with_context(|| format!("cannot create {} (it must not exist)", file.display()))?;
    writeln!(f, "{}", hex(secret)).with_context(|| format!("cannot write {}", file.display()))
}

/// 32 random bytes from the operating system.
fn rand_secret() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b).context("cannot read /dev/urandom")?;
    Ok(b)
}

fn read_identity(file: &std::path::Path) -> Result<kecho::Identity> {
    Ok(kecho::Identity::from_secret(read_secret(file, "identity", "kecho identity new FILE")?))
}

/// Reads a 32-byte secret kept as hex (an identity or an authority).
fn read_secret(file: &std::path::Path, what: &str, make: &str) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {what} {} (make one with `{make}`)", file.display()))?;
    kecho_proto::access::parse_hex(text.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("{} is not a kecho {what} (64 hex digits)", file.display()))
}

async fn channels(reg: &RegistryArg) -> Result<()> {
    let addr = parse_addr("registry", &reg.registry)?;
    let client = kecho::RegistryClient::remote(addr);
    let list = client.list().await?;
    if list.is_empty() {
        println!("no channels");
        return Ok(());
    }
    println!(
        "{:<32} {:>8} {:>8}  {:<21} {:<16} {:>9}",
        "CHANNEL", "SOURCES", "SINKS", "CONTACT", "CONTACT NODE", "LEASE"
    );
    for e in list {
        println!(
            "{:<32} {:>8} {:>8}  {:<21} {:<16} {:>8.1}s",
            e.name,
            e.sources,
            e.sinks,
            e.addr,
            e.contact.to_string(),
            e.expires_in_ms as f64 / 1000.0
        );
    }
    Ok(())
}

/// Used by `demo` and by attribute printing.
pub(crate) fn value_text(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        other => other.to_string(),
    }
}
