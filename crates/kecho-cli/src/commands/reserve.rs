//! `kecho reserve`: negotiate reservations by QoS specification (2K's admission control and negotiation).
//!
//! Two lifetimes: with `--for SECS` the reservations are *detached*, leased for SECS seconds; they outlive the
//! command, which prints them and exits (free them early with `kecho release ID`). Without it they are *attached*
//! and held while the command runs: it renews them, and releases them when it is stopped (Ctrl-C, SIGTERM); if it
//! dies, the agents free them once its node has left the channel.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_resources::types::{human, parse_size};
use kecho_resources::{Amounts, Requester, Reservation, Spec};
use serde_json::json;

use crate::access::AccessArgs;
use crate::commands::agent::wait_for_stop;
use crate::node_args::{parse_addr, RegistryArg, TlsArgs};
use crate::secrets::read_identity;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cores per reservation.
    #[arg(long)]
    cpus: Option<u64>,
    /// Memory per reservation in bytes (suffixes k, M, G, Ki, Mi, Gi).
    #[arg(long, value_name = "BYTES")]
    mem: Option<String>,
    /// Another counted resource, NAME=COUNT (repeatable), e.g. --resource gpu=1.
    #[arg(long = "resource", value_name = "NAME=COUNT")]
    resources: Vec<String>,
    /// A CEL expression over an agent's attributes that must hold, e.g. 'zone == "a" && host_load1 < 2.0'.
    #[arg(long = "require", id = "requirement", value_name = "EXPR")]
    requirement: Option<String>,
    /// A CEL expression over an agent's attributes, higher is better, e.g. cpus_free.
    #[arg(long, value_name = "EXPR")]
    rank: Option<String>,
    /// Lease in seconds: the reservations outlive this command and end after SECS unless released. Without it they
    /// are held (renewed) while the command runs and released when it stops.
    #[arg(long = "for", value_name = "SECS")]
    lease: Option<f64>,
    /// Number of reservations, on distinct agents, all or nothing.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Milliseconds to wait for offers.
    #[arg(long, default_value_t = 250)]
    window: u64,
    /// Seconds to wait for the first agent to be seen on the channel.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    /// Output format: one line per reservation.
    #[arg(long, value_enum, default_value_t = crate::commands::resources::Format::Text)]
    format: crate::commands::resources::Format,
    /// The channel agents and requesters meet on.
    #[arg(long, default_value = kecho_resources::wire::CHANNEL)]
    channel: String,
    #[command(flatten)]
    reg: RegistryArg,
    /// Address this node listens on for other nodes.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address other nodes dial to reach this one, if not the listening address.
    #[arg(long, value_name = "ADDR")]
    advertise: Option<String>,
    /// Seconds of silence after which another node counts as dead.
    #[arg(long, default_value_t = 3.0)]
    heartbeat: f64,
    /// This node's identity (see `kecho identity new`); needed with --token.
    #[arg(long, value_name = "FILE", env = "KECHO_IDENTITY")]
    identity: Option<std::path::PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    access: AccessFlags,
}

/// The access-control flags of every command that runs a node, with the roles flag under its other name: here
/// `--require` is the requirement expression (the issue's `kecho reserve --require EXPR`).
#[derive(clap::Args, Debug, Clone, Default)]
struct AccessFlags {
    /// Present this credential (see `kecho grant`; repeatable). It was issued to one node key: pass that node's
    /// --identity too.
    #[arg(long = "token", value_name = "FILE")]
    tokens: Vec<std::path::PathBuf>,
    /// Require the access policy of this authority (its public key, 64 hex digits; see `kecho authority new`).
    #[arg(long, value_name = "HEX", env = "KECHO_AUTHORITY")]
    authority_pub: Option<String>,
    /// The roles that need a credential under --authority-pub (--require ROLES of the other commands): a
    /// comma-separated list of source, sink, filters, or all.
    #[arg(long = "require-roles", value_name = "ROLES", default_value = "all", requires = "authority_pub")]
    require_roles: String,
}

impl From<&AccessFlags> for AccessArgs {
    fn from(f: &AccessFlags) -> Self {
        AccessArgs {
            tokens: f.tokens.clone(),
            authority_pub: f.authority_pub.clone(),
            require: f.require_roles.clone(),
        }
    }
}

async fn start_node(a: &Args) -> Result<kecho::Node> {
    if !(a.heartbeat > 0.0 && a.heartbeat.is_finite()) {
        bail!("--heartbeat must be a positive number of seconds");
    }
    let mut b = kecho::Node::builder()
        .registry_replicas(a.reg.addrs()?)
        .listen(parse_addr("listen", &a.listen)?)
        .heartbeat_timeout(Duration::from_secs_f64(a.heartbeat));
    if let Some(adv) = &a.advertise {
        b = b.advertise(parse_addr("advertise", adv)?);
    }
    if let Some(tls) = a.tls.config()? {
        b = b.tls(tls);
    }
    let identity = a.identity.as_deref().map(read_identity).transpose()?;
    if let Some(id) = &identity {
        b = b.identity(id.clone());
    }
    b = AccessArgs::from(&a.access).apply(b, identity.as_ref())?;
    Ok(b.start().await?)
}

pub fn print(r: &Reservation, format: crate::commands::resources::Format) {
    match format {
        crate::commands::resources::Format::Text => {
            let amounts: Vec<String> = r.amounts.iter().map(|(k, v)| format!("{k}={}", human(k, v))).collect();
            println!("{}  agent {}  {}  lease {:.0}s", r.id, r.id.agent, amounts.join(" "), r.lease.as_secs_f64());
        }
        crate::commands::resources::Format::Json => {
            let amounts: serde_json::Map<String, serde_json::Value> =
                r.amounts.iter().map(|(k, v)| (k.to_owned(), json!(v))).collect();
            println!(
                "{}",
                json!({
                    "id": r.id.to_string(),
                    "agent": r.id.agent,
                    "amounts": amounts,
                    "lease_s": r.lease.as_secs_f64(),
                    "fence": r.fence,
                    "rank": r.rank,
                })
            );
        }
    }
}

pub async fn run(a: Args) -> Result<()> {
    let mut amounts = Amounts::new();
    if let Some(c) = a.cpus {
        amounts.set("cpus", c);
    }
    if let Some(m) = &a.mem {
        amounts.set("mem", parse_size(m).context("--mem")?);
    }
    for r in &a.resources {
        let one: Amounts = r.parse().with_context(|| format!("--resource {r}"))?;
        for (k, v) in one.iter() {
            amounts.set(k, v);
        }
    }
    if amounts.is_empty() {
        bail!("nothing to reserve: give --cpus, --mem or --resource");
    }
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    let mut spec = Spec::new(amounts).count(a.count).window(Duration::from_millis(a.window));
    if let Some(r) = &a.requirement {
        // Bad expressions fail here, with their position, before touching the network.
        kecho_resources::Requirement::compile(r)?;
        spec = spec.require(r.clone());
    }
    if let Some(r) = &a.rank {
        kecho_resources::Rank::compile(r)?;
        spec = spec.rank(r.clone());
    }
    let detached = match a.lease {
        Some(s) if s > 0.0 && s.is_finite() => {
            spec = spec.lease(Duration::from_secs_f64(s)).detached();
            true
        }
        Some(_) => bail!("--for must be a positive number of seconds"),
        None => {
            spec = spec.lease(Duration::from_secs(10));
            false
        }
    };
    let node = start_node(&a).await?;
    let requester = Requester::on(&node.channel(&a.channel).await?)?;
    if !(a.wait >= 0.0 && a.wait.is_finite()) {
        bail!("--wait must be a number of seconds");
    }
    if requester.wait_for_agents(1, Duration::from_secs_f64(a.wait)).await.is_err() {
        node.shutdown().await;
        bail!("no agent on channel {:?} within {} s", a.channel, a.wait);
    }
    let got = match requester.reserve(&spec).await {
        Ok(g) => g,
        Err(e) => {
            node.shutdown().await;
            return Err(e.into());
        }
    };
    for r in &got {
        print(r, a.format);
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if detached {
        node.shutdown().await;
        return Ok(());
    }
    eprintln!("kecho: holding {} reservation(s); Ctrl-C releases", got.len());
    let held: Vec<_> = got.into_iter().map(|r| requester.hold(r)).collect();
    // Held until stopped, or until a reservation is lost (its agent refused a renewal, e.g. after a cut that outlasted
    // the lease or the holder grace: the agent fenced it and may have granted the capacity to someone else).
    let lost = tokio::select! {
        _ = wait_for_stop() => None,
        id = async {
            loop {
                if let Some(h) = held.iter().find(|h| !h.is_valid()) {
                    break h.reservation().id;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } => Some(id),
    };
    if let Some(id) = &lost {
        eprintln!("kecho: reservation {id} lost: its agent no longer holds it for us (lease ended or fenced)");
    }
    for h in held {
        let id = h.reservation().id;
        if let Err(e) = h.release().await {
            eprintln!("kecho: release {id}: {e}");
        }
    }
    node.shutdown().await;
    if let Some(id) = lost {
        bail!("reservation {id} lost");
    }
    Ok(())
}
