//! `kecho man`: manual pages generated from the command-line definition.

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write kecho.1 and one page per command (kecho-sub.1, ...) into this directory instead of printing kecho.1.
    #[arg(long, value_name = "DIR")]
    out: Option<std::path::PathBuf>,
}

pub fn run(a: Args, cmd: clap::Command) -> Result<()> {
    let Some(dir) = a.out else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page).context("rendering the man page")?;
        return super::completions::to_stdout(&page).context("writing the man page");
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let write = |name: &str, c: clap::Command| -> Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut f = std::fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        clap_mangen::Man::new(c).render(&mut f).with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("kecho-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("kecho", cmd)
}
