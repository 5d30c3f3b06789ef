//! `kecho completions SHELL`: a shell completion script on standard output.

use std::io::Write;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shell.
    shell: clap_complete::Shell,
}

pub fn run(a: Args, mut cmd: clap::Command) -> Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "kecho", &mut script);
    to_stdout(&script).context("writing the completion script")
}

/// Writes `bytes` to standard output; a reader that stopped early (`kecho completions bash | head`) is not an error.
pub fn to_stdout(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
