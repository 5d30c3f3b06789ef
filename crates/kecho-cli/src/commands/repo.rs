//! `kecho repo add|ls|rm`: the content-addressed component repository on this node (an artifact's SHA-256 is its
//! name; a damaged file is refused, never run). `kecho configure --load FILE` puts a component into every exec
//! agent's store.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kecho_exec::repo::{Digest, Store};

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

pub fn run(a: Args) -> Result<()> {
    match a {
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
