//! `kecho identity`: make or show a node identity, the key a node proves its node id with.

use anyhow::Result;
use clap::Subcommand;

use crate::secrets::{hex, rand_secret, read_identity, write_secret};

#[derive(Subcommand, Debug)]
pub enum Args {
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

pub fn run(cmd: Args) -> Result<()> {
    match cmd {
        Args::New { file } => identity_new(&file),
        Args::Show { file } => {
            let id = read_identity(&file)?;
            println!("node {}  public key {}", id.node_id(), hex(&id.public_key()));
            Ok(())
        }
    }
}

fn identity_new(file: &std::path::Path) -> Result<()> {
    let secret: [u8; 32] = rand_secret()?;
    write_secret(file, &secret)?;
    let id = kecho::Identity::from_secret(secret);
    println!("node {}  public key {}", id.node_id(), hex(&id.public_key()));
    Ok(())
}
