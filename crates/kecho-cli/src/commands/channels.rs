//! `kecho channels`: list the registry's channels with member counts.

use anyhow::Result;

use crate::node_args::RegistryArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    reg: RegistryArg,
}

pub async fn run(a: Args) -> Result<()> {
    let client = a.reg.client()?;
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
