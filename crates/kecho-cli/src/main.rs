//! The `kecho` command. This file is the table of contents: each command lives in its own module under `commands/`,
//! with its arguments and its `run`; flags shared by the commands that run a node are in `node_args`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

mod access;
mod attrs;
mod commands;
mod config;
mod node_args;
mod observe;
mod secrets;

use commands::*;

#[derive(Parser, Debug)]
#[command(
    name = "kecho",
    version,
    about = "Event channels after KECho, and the systems on them: resource agents and reservations, remote execution and deployment, data flows, load balancing"
)]
struct Cli {
    /// Log filter (also RUST_LOG), e.g. info or kecho=debug.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    /// A TOML file of flag values (keys are long flag names; [commands.NAME] tables for one command); flags override it.
    #[arg(long, global = true, value_name = "FILE", env = "KECHO_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve the channel registry (the KECho group server).
    Registry(registry::Args),
    /// Subscribe to a channel and print each event.
    Sub(sub::Args),
    /// Publish events on a channel.
    Pub(publish::Args),
    /// Record every event of a channel into a log on disk (a recorder member).
    Record(record::Args),
    /// List the registry's channels with member counts.
    Channels(channels::Args),
    /// Install a sandboxed filter (WebAssembly, .wat or .wasm) on every member of a channel.
    Filter {
        #[command(subcommand)]
        cmd: filter::Args,
    },
    /// Make or show a node identity: the key a node proves its node id with (see --identity).
    Identity {
        #[command(subcommand)]
        cmd: identity::Args,
    },
    /// Make or show an access authority: the key that signs credentials for protected channels (see
    /// --authority-pub and `kecho grant`).
    Authority {
        #[command(subcommand)]
        cmd: authority::Args,
    },
    /// Issue a credential: the right to join a protected channel as a source or sink, or to install filters in it,
    /// for one node key.
    Grant(grant::Args),
    /// Make a CA and certificates for TLS node links (a development CA: keep ca.key safe or use your own PKI).
    Certs(certs::Args),
    /// Run an embedded registry and a small cluster on loopback; print what each sink got and delivery latency, then
    /// a short web-farm run (KECho's load balancer against other modes).
    Demo(demo::Args),
    /// Run the benchmark suite: the KECho paper's measurements against raw TCP (and NATS and Zenoh when built with
    /// the bench-peers feature); Markdown on standard output, JSON and SVG plots in --out. See BENCHMARKS.md.
    Bench(bench::Args),
    /// Declared data paths: `kecho flow run 'SOURCE ! TRANSFORM args ! SINK'`, `kecho flow ls`, `kecho flow stats`
    /// (see docs/FLOWS.md).
    Flow {
        #[command(subcommand)]
        cmd: flow::Args,
    },
    /// A live terminal view of the registry's channels, their members, event rates, drops and links (q quits).
    Top(top::Args),
    /// Serve a web page of the cluster: channels, members, rates, drops and links, updated live.
    Ui(ui::Args),
    /// An HTTP load balancer over servers given by URL or discovered from a channel's members (rr, p2c, jsq,
    /// hash:HEADER, kecho:N; proxy or --redirect; cookie affinity).
    Balance(balance::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(completions::Args),
    /// Print the manual page (or write one per command with --out DIR).
    Man(man::Args),
    /// Reproduce KECho's web-farm experiment (section 5.4), extended: balancing modes, the ideal queue, plots.
    Webfarm(webfarm::Args),
    /// Run a resource agent for this host: measure it, publish its attributes, admit and hold reservations.
    Agent(agent::Args),
    /// Show the cluster view: one line per agent (what it has, what is free and reserved, the report's age).
    Resources(resources::Args),
    /// Reserve resources on the agents by QoS specification (amounts, requirement, rank, lease, count).
    Reserve(reserve::Args),
    /// Release reservations by id.
    Release(release::Args),
    /// Run a command on a fitting agent (`kecho run [--cpus N] [--restart on-node-loss] -- CMD ARGS`): output
    /// streamed back, exit status as a shell reports it.
    Run(run::Args),
    /// List the tasks the exec agents run (agent, state, since, restarts).
    Ps(ps::Args),
    /// Replay a task's recent output.
    Logs(logs::Args),
    /// The component repository: add (put), ls, rm artifacts by their SHA-256 on this node; serve the store to
    /// agents, get an artifact by digest.
    Repo {
        #[command(subcommand)]
        cmd: repo::Args,
    },
    /// Send an inspection agent to every exec agent at once and gather their reports.
    Inspect(inspect::Args),
    /// Load a component onto every exec agent at once (verified by its SHA-256 and kept in each node's store).
    Configure(inspect::ConfigureArgs),
    /// Deploy an application (APP.toml): components placed, started in dependency order, readiness, failure policy.
    Deploy(deploy::Args),
    /// Show deployed applications' components: agent, state, generation.
    Status(status::Args),
    /// Stop a deployed application in reverse dependency order.
    Undeploy(undeploy::Args),
}

async fn run(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Registry(a) => registry::run(a).await,
        Cmd::Sub(a) => sub::run(a).await,
        Cmd::Pub(a) => publish::run(a).await,
        Cmd::Record(a) => record::run(a).await,
        Cmd::Channels(a) => channels::run(a).await,
        Cmd::Filter { cmd } => filter::run(cmd).await,
        Cmd::Identity { cmd } => identity::run(cmd),
        Cmd::Authority { cmd } => authority::run(cmd),
        Cmd::Grant(a) => grant::run(a),
        Cmd::Certs(a) => certs::run(a),
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Bench(a) => bench::run(a).await,
        Cmd::Webfarm(a) => webfarm::run(a).await,
        Cmd::Flow { cmd } => flow::run(cmd).await,
        Cmd::Agent(a) => agent::run(a).await,
        Cmd::Resources(a) => resources::run(a).await,
        Cmd::Reserve(a) => reserve::run(a).await,
        Cmd::Release(a) => release::run(a).await,
        Cmd::Run(a) => run::run(a).await,
        Cmd::Ps(a) => ps::run(a).await,
        Cmd::Logs(a) => logs::run(a).await,
        Cmd::Repo { cmd } => repo::run(cmd).await,
        Cmd::Inspect(a) => inspect::run(a).await,
        Cmd::Configure(a) => inspect::configure(a).await,
        Cmd::Deploy(a) => deploy::run(a).await,
        Cmd::Status(a) => status::run(a).await,
        Cmd::Undeploy(a) => undeploy::run(a).await,
        Cmd::Top(a) => top::run(a).await,
        Cmd::Balance(a) => balance::run(a).await,
        Cmd::Completions(a) => completions::run(a, Cli::command()),
        Cmd::Man(a) => man::run(a, Cli::command()),
        Cmd::Ui(a) => ui::run(a).await,
    }
}

fn main() -> ExitCode {
    // `kecho` is also the reaper every exec task runs under (kecho_exec::reaper): that use returns no further.
    kecho_exec::reaper::serve_if_invoked();
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("kecho: {}", one_line(&e));
            return ExitCode::FAILURE;
        }
    };
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: piped or captured output stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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

/// The command line, over the config file's values if there is one.
fn parse() -> Result<Cli> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    if let Some(file) = config::path(&args) {
        cmd = config::apply(cmd, &file)?;
    }
    let matches = cmd.get_matches_from(args);
    Ok(Cli::from_arg_matches(&matches).map_err(|e| e.exit()).unwrap_or_else(|never| never))
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
