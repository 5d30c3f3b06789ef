//! `kecho completions SHELL`: a shell completion script on standard output.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell.
    shell: clap_complete::Shell,
}

pub fn run(a: Args, mut cmd: clap::Command) -> Result<()> {
    clap_complete::generate(a.shell, &mut cmd, "kecho", &mut std::io::stdout());
    Ok(())
}
