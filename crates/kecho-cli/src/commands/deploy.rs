//! `kecho deploy APP.toml`: 2K's automatic configuration. Builds the dependency graph (a cycle or a missing
//! dependency is refused with the path that shows it), places every component on a fitting agent (all or nothing),
//! starts them in dependency order with readiness checks, hands each its dependencies' addresses, and applies the
//! failure policies. The command stays in the foreground as the application's owner (it holds the reservations): it
//! prints the status, then each event (also published on the application's channel `kecho.app.NAME`), and stops the
//! application in reverse order on Ctrl-C, SIGTERM or `kecho undeploy APP`.

use std::time::Duration;

use anyhow::{Context, Result};
use kecho::Attrs;
use kecho_exec::app::AppSpec;
use kecho_exec::deploy::{deploy, render_status};
use kecho_exec::remote::{host_lookup, RemoteLauncher, Submitter};
use kecho_exec::repo::{Cache, MemRemote};
use kecho_exec::resplace::ResourcePlacer;
use kecho_exec::service::CHANNEL;
use kecho_resources::Requester;

use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The application file.
    file: std::path::PathBuf,
    /// Seconds to wait for the first agent to be seen.
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    /// The repository whose artifacts this application's components may name: served to the agents (who fetch
    /// by digest and verify) while the application runs.
    #[command(flatten)]
    repo: crate::commands::repo::Dir,
    #[command(flatten)]
    reg: RegistryArg,
    #[command(flatten)]
    node: NodeArgs,
}

/// The submitter id a deploying process answers `kecho undeploy APP` on.
pub fn owner_id(app: &str) -> String {
    format!("app-{app}")
}

pub async fn run(a: Args) -> Result<()> {
    // A malformed file is refused here, naming the line, before anything touches the network.
    let app = AppSpec::load(&a.file)?;
    let name = app.name.to_string();
    let heartbeat = Duration::from_secs_f64(a.node.heartbeat);
    let credential = crate::commands::exec_agent::credential_of(&a.node)?;
    let node = node(&a.reg, &a.node, None).await?;
    let requester = Requester::on(&node.channel(kecho_resources::wire::CHANNEL).await?)?;
    let wait = Duration::from_secs_f64(if a.wait.is_finite() { a.wait.max(0.0) } else { 5.0 });
    if requester.wait_for_agents(1, wait).await.is_err() {
        node.shutdown().await;
        anyhow::bail!("no agent on channel {} within {:?}", kecho_resources::wire::CHANNEL, wait);
    }
    // Components that are repository artifacts are fetched by the agents: this process serves the user's store.
    let has_artifacts = app.components.values().any(|c| matches!(c.run, kecho_exec::app::Run::Artifact { .. }));
    let _serving = match has_artifacts {
        true => {
            let store = a.repo.open()?;
            let repo_ch = node.channel(kecho_exec::repo_net::CHANNEL).await?;
            Some((kecho_exec::repo_net::serve(&repo_ch, &owner_id(&name), store)?, repo_ch))
        }
        false => None,
    };
    let exec = node.channel(CHANNEL).await?;
    let sub = Submitter::on(&exec, owner_id(&name))?.with_credential(credential);
    sub.wait_for_agents(wait).await;
    let placer = std::sync::Arc::new(
        ResourcePlacer::new(requester, heartbeat * 3)
            .hosts(host_lookup(&exec))
            .also_require(format!("{} == true", kecho_exec::resplace::EXEC_ATTR)),
    );
    let (launcher, mut undeploy) = RemoteLauncher::start(sub, heartbeat);
    let started = std::time::Instant::now();
    let mut running =
        match deploy(app.clone(), placer.clone(), std::sync::Arc::new(launcher), None::<&Cache<MemRemote>>).await {
            Ok(r) => r,
            Err(e) => {
                node.shutdown().await;
                return Err(e).context(format!("deploy {name}"));
            }
        };
    if let Err(e) = running.ready().await {
        eprintln!("kecho: deploy {name} failed: {e}");
        let _ = running.undeploy().await;
        node.shutdown().await;
        anyhow::bail!("deploy {name}: {e}");
    }
    eprintln!("kecho: {name} ready in {:.0} ms", started.elapsed().as_secs_f64() * 1e3);
    print!("{}", render_status(&app, &running.status()));
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let notices_ch = node.channel(&format!("kecho.app.{name}")).await?;
    let mut notices_src = notices_ch.source()?;
    loop {
        tokio::select! {
            n = running.notices.recv() => {
                let Some(n) = n else { break };
                let line = format!(
                    "{} {:?} (on {}); told: {}",
                    n.about,
                    n.event,
                    n.agent.as_ref().map_or("-", |a| a.0.as_str()),
                    n.to.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
                );
                eprintln!("kecho: {line}");
                let attrs = Attrs::new().with("component", n.about.to_string());
                let _ = notices_src.submit("app.notice", &attrs, line.as_bytes()).await;
            }
            _ = crate::commands::agent::wait_for_stop() => break,
            Some(_) = undeploy.recv() => break,
        }
    }
    eprintln!("kecho: undeploying {name}");
    running.undeploy().await?;
    let end = tokio::time::Instant::now() + Duration::from_secs(2);
    while placer.outstanding() > 0 && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.shutdown().await;
    eprintln!("kecho: {name} undeployed");
    Ok(())
}
