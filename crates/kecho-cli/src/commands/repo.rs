//! `kecho repo add|ls|rm|serve|get`: the content-addressed component repository on this node (an artifact's SHA-256
//! is its name; a damaged file is refused, never run). `kecho repo serve` makes this node a repository node: it
//! serves its store on the channel `kecho.repo`, where agents fetch artifacts by digest (and verify them); `kecho repo
//! get` fetches one the same way into this node's store. `kecho configure --load FILE` puts a component into every
//! exec agent's store.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kecho_exec::repo::{Cache, Digest, Store};
use kecho_exec::repo_net::{self, ChannelFetch};

use crate::node_args::{node, NodeArgs, RegistryArg};

#[derive(clap::Subcommand, Debug)]
pub enum Args {
    /// Store FILE; prints its digest (its name in the repository).
    #[command(alias = "put")]
    Add {
        /// The artifact.
        file: PathBuf,
        #[command(flatten)]
        dir: Dir,
    },
    /// List the stored artifacts (digest and size).
    Ls {
        #[command(flatten)]
        dir: Dir,
    },
    /// Remove an artifact by digest.
    Rm {
        /// The digest (`sha256:HEX` or HEX).
        digest: String,
        #[command(flatten)]
        dir: Dir,
    },
    /// Serve the store on the channel `kecho.repo` until Ctrl-C or SIGTERM: agents fetch its artifacts by digest
    /// (only copies that still hash to their name are sent; the fetcher verifies them again).
    Serve {
        /// This repository node's name (in the answers it sends).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        reg: RegistryArg,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Fetch an artifact by digest from the repository nodes into this store (verified; a wrong copy is refused
    /// and not kept); prints its path.
    Get {
        /// The digest (`sha256:HEX` or HEX).
        digest: String,
        /// Seconds to wait for a repository node's answer.
        #[arg(long, default_value_t = 10.0)]
        wait: f64,
        #[command(flatten)]
        dir: Dir,
        #[command(flatten)]
        reg: RegistryArg,
        #[command(flatten)]
        node: NodeArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct Dir {
    /// The repository directory [default: $KECHO_REPO, then ~/.local/share/kecho/repo].
    #[arg(long = "repo-dir", env = "KECHO_REPO", value_name = "DIR")]
    dir: Option<PathBuf>,
}

impl Dir {
    /// The store (created if need be).
    pub fn open(&self) -> Result<Store> {
        let dir = match &self.dir {
            Some(d) => d.clone(),
            None => {
                let home = std::env::var_os("HOME").context("no --repo-dir and no $HOME")?;
                PathBuf::from(home).join(".local/share/kecho/repo")
            }
        };
        Store::open(&dir).with_context(|| format!("repository {}", dir.display()))
    }
}

pub async fn run(a: Args) -> Result<()> {
    match a {
        Args::Serve { name, dir, reg, node: node_args } => {
            let store = dir.open()?;
            let name = name.unwrap_or_else(|| format!("repo-{}", std::process::id()));
            let count = store.list()?.len();
            let n = node(&reg, &node_args, None).await?;
            let ch = n.channel(repo_net::CHANNEL).await?;
            let serving = repo_net::serve(&ch, &name, store.clone())?;
            eprintln!(
                "kecho: repository {name} serves {} ({count} artifact(s) now) on {}",
                store.dir().display(),
                repo_net::CHANNEL
            );
            crate::commands::agent::wait_for_stop().await;
            serving.abort();
            n.shutdown().await;
        }
        Args::Get { digest, wait, dir, reg, node: node_args } => {
            let d: Digest = digest.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = dir.open()?;
            let wait = Duration::from_secs_f64(if wait.is_finite() { wait.max(0.0) } else { 10.0 });
            let n = node(&reg, &node_args, None).await?;
            let ch = n.channel(repo_net::CHANNEL).await?;
            let fetch = ChannelFetch::new(&ch, &format!("get-{}", std::process::id()), wait)?;
            let got = Cache::new(store, fetch).ensure(&d).await;
            n.shutdown().await;
            println!("{}", got.with_context(|| format!("fetch {d}"))?.display());
        }
        Args::Add { file, dir } => {
            let d = dir.open()?.put_file(&file).with_context(|| format!("{}", file.display()))?;
            println!("{d}");
        }
        Args::Ls { dir } => {
            let store = dir.open()?;
            for d in store.list()? {
                let size = std::fs::metadata(store.path_of(&d)).map_or(0, |m| m.len());
                println!("{d}  {size}");
            }
        }
        Args::Rm { digest, dir } => {
            let d: Digest = digest.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            dir.open()?.remove(&d)?;
        }
    }
    Ok(())
}
