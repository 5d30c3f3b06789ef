//! `kecho authority`: make or show the key that signs credentials for protected channels.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use kecho::Authority;

use crate::access::read_authority;
use crate::secrets::{hex, rand_secret, write_secret};

#[derive(Subcommand, Debug)]
pub enum Args {
    /// Write a new authority key to FILE (refuses to overwrite) and print its public key.
    New {
        /// Where to keep it (readable by its owner only). Whoever holds it can grant any right.
        file: PathBuf,
    },
    /// Print the public key of the authority in FILE.
    Show {
        /// The authority file.
        file: PathBuf,
    },
}

pub fn run(cmd: Args) -> Result<()> {
    match cmd {
        Args::New { file } => {
            let secret = rand_secret()?;
            write_secret(&file, &secret)?;
            println!("authority public key {}", hex(&Authority::from_secret(secret).public_key()));
            Ok(())
        }
        Args::Show { file } => {
            let a = read_authority(&file)?;
            println!("authority public key {}", hex(&a.public_key()));
            Ok(())
        }
    }
}
