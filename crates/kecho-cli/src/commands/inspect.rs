//! `kecho inspect` and `kecho configure`: 2K's mobile agents for inspection and configuration, fanned out by kecho
//! to every exec agent at once instead of walking a chain.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kecho_exec::inspect::{agents_where, Inspector, Outcome, DEFAULT_PREFIX};
use kecho_exec::remote::{submitter_id, Submitter};
use kecho_exec::service::CHANNEL;
use serde_json::json;

use crate::commands::agent::host_name;
use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How many nodes must answer [default: every exec agent seen within --wait (that --where selects)].
    #[arg(long)]
    nodes: Option<usize>,
    /// Only the agents whose attributes satisfy this CEL expression (as `kecho resources` shows them), e.g.
    /// 'cpus >= 4 && zone == "b"'; the request reaches no other node.
    #[arg(long = "where", value_name = "EXPR")]
    where_: Option<String>,
    /// (inspect) An inspection module to run on every node, sandboxed with the limits of filters: WebAssembly,
    /// text or binary, exporting memory, kecho_buffer() -> i32 and kecho_inspect(len: i32) -> i32 (it gets the
    /// node's report as JSON at the buffer and returns the length of its answer there; docs/CONFIG.md).
    #[arg(long, value_name = "FILE.wat")]
    module: Option<std::path::PathBuf>,
    /// Seconds to wait for agents and for their answers.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::commands::resources::Format::Text)]
    format: crate::commands::resources::Format,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(clap::Args, Debug)]
pub struct ConfigureArgs {
    /// The component to load onto every node (kept in each node's repository store under its SHA-256): a file, or
    /// an artifact of this node's repository by its digest (`sha256:HEX`, as `kecho repo put` printed it; verified
    /// before it is sent).
    #[arg(long, value_name = "FILE|sha256:HEX")]
    load: std::path::PathBuf,
    #[command(flatten)]
    repo: crate::commands::repo::Dir,
    #[command(flatten)]
    common: Args,
}

/// The bytes `--load` names: a file, else a repository artifact by digest.
fn load_bytes(a: &ConfigureArgs) -> Result<Vec<u8>> {
    let text = a.load.to_string_lossy();
    if a.load.exists() || !text.starts_with("sha256:") {
        return std::fs::read(&a.load).with_context(|| format!("--load {}", a.load.display()));
    }
    let digest: kecho_exec::repo::Digest = text.parse().map_err(|e| anyhow::anyhow!("--load {text}: {e}"))?;
    let store = a.repo.open()?;
    store.get(&digest).with_context(|| format!("--load {digest} from the repository {}", store.dir().display()))
}

async fn inspector(a: &Args) -> Result<(kecho::Node, Inspector, usize, Duration)> {
    if !(a.wait > 0.0 && a.wait.is_finite()) {
        bail!("--wait must be a positive number of seconds");
    }
    let wait = Duration::from_secs_f64(a.wait);
    let require = match &a.where_ {
        Some(e) => Some(kecho_resources::Requirement::compile(e).with_context(|| format!("--where {e}"))?),
        None => None,
    };
    let node = node(&a.reg, &a.node, None).await?;
    let exec = node.channel(CHANNEL).await?;
    let sub = Submitter::on(&exec, submitter_id(&host_name()))?;
    // Agents announce themselves within a moment of each other; count them once the first is seen.
    if sub.wait_for_agents(wait).await == 0 {
        node.shutdown().await;
        bail!("no exec agent (kecho agent --allow-exec) seen within {:?}", wait);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let exec_agents: BTreeSet<String> = sub.agents().into_iter().collect();
    let selected = match &require {
        None => None,
        Some(req) => {
            // The resource agents' attributes, once every exec agent's are known here (or --wait is over).
            let resources = node.channel(kecho_resources::wire::CHANNEL).await?;
            let end = tokio::time::Instant::now() + wait;
            let known = |r: &kecho::Channel| {
                let names: BTreeSet<String> = r
                    .sink_attrs()
                    .into_iter()
                    .filter_map(|(_, at)| match at.get("agent") {
                        Some(kecho::Value::Str(n)) => Some(n.clone()),
                        _ => None,
                    })
                    .collect();
                exec_agents.is_subset(&names)
            };
            while !known(&resources) && tokio::time::Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let chosen: BTreeSet<String> = agents_where(&resources, req).intersection(&exec_agents).cloned().collect();
            if chosen.is_empty() {
                node.shutdown().await;
                bail!(
                    "no exec agent satisfies --where {} ({} considered)",
                    a.where_.as_deref().unwrap_or(""),
                    exec_agents.len()
                );
            }
            Some(chosen)
        }
    };
    let expect = a.nodes.unwrap_or_else(|| selected.as_ref().map_or(exec_agents.len(), BTreeSet::len));
    let who = submitter_id(&host_name());
    // Every agent node listens on the request channel; the OUT-filter picks the selected ones.
    let listening = if selected.is_some() { exec_agents.len() } else { expect };
    let credential = crate::commands::exec_agent::credential_of(&a.node)?;
    let insp = Inspector::new(&node, DEFAULT_PREFIX, &who, listening, wait).await?.with_credential(credential);
    insp.only(selected);
    Ok((node, insp, expect, wait))
}

pub async fn run(a: Args) -> Result<()> {
    let module = match &a.module {
        Some(f) => Some(std::fs::read(f).with_context(|| format!("--module {}", f.display()))?),
        None => None,
    };
    let (node, mut insp, expect, wait) = inspector(&a).await?;
    let started = std::time::Instant::now();
    let got = insp.inspect_with(module.as_deref(), expect, wait).await;
    let took = started.elapsed();
    node.shutdown().await;
    let mut replies = got?;
    replies.sort_by(|x, y| x.node.cmp(&y.node));
    for r in &replies {
        match (&r.outcome, a.format) {
            (Ok(Outcome::Report(rep)), crate::commands::resources::Format::Text) => {
                println!(
                    "{:<12} kecho {}  cpus {}  mem {}  load1 {:.2}  artifacts {}",
                    rep.name,
                    rep.version,
                    rep.cpus,
                    kecho_resources::types::human("mem", rep.mem_total),
                    rep.load1,
                    rep.artifacts.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
                );
                match &rep.module {
                    Some(Ok(answer)) => println!("{:<12} module: {answer}", rep.name),
                    Some(Err(e)) => println!("{:<12} module error: {e}", rep.name),
                    None => {}
                }
            }
            (Ok(o), crate::commands::resources::Format::Json) => println!("{}", json!({"node": r.node, "outcome": o})),
            (Ok(o), _) => println!("{:<12} {o:?}", r.node),
            (Err(e), _) => println!("{:<12} error: {e}", r.node),
        }
    }
    eprintln!("kecho: {} node(s) inspected in {:.2} ms", replies.len(), took.as_secs_f64() * 1e3);
    Ok(())
}

pub async fn configure(a: ConfigureArgs) -> Result<()> {
    let bytes = load_bytes(&a)?;
    let (node, mut insp, expect, wait) = inspector(&a.common).await?;
    let started = std::time::Instant::now();
    let got = insp.configure(&bytes, expect, wait).await;
    let took = started.elapsed();
    node.shutdown().await;
    let mut replies = got?;
    replies.sort_by(|x, y| x.node.cmp(&y.node));
    let mut failed = 0;
    for r in &replies {
        match &r.outcome {
            Ok(Outcome::Loaded { digest }) => println!("{:<12} loaded {digest}", r.node),
            Ok(o) => println!("{:<12} {o:?}", r.node),
            Err(e) => {
                failed += 1;
                println!("{:<12} refused: {e}", r.node);
            }
        }
    }
    eprintln!(
        "kecho: {} byte(s) loaded onto {} node(s) in {:.2} ms",
        bytes.len(),
        replies.len(),
        took.as_secs_f64() * 1e3
    );
    if failed > 0 {
        bail!("{failed} node(s) refused the component");
    }
    Ok(())
}
