//! `--config FILE` (or `$KECHO_CONFIG`): a TOML file whose keys are the commands' long flag names, read before the
//! command line. Top-level keys apply to every command that has that flag; a table `[commands.NAME]` (`[commands.sub]`,
//! `[commands.registry]`, ...) applies to that command only and wins over the top level. (Command tables have a
//! table of their own because a key and a table cannot share a name: `registry` is both a flag and a command.) Flags on the command line override
//! the file, and so do environment variables (`$KECHO_REGISTRY`, ...).
//!
//! ```toml
//! registry = "10.0.0.1:7400"
//! heartbeat = 2.0
//! tls-cert = "/etc/kecho/node.pem"
//!
//! [commands.registry]
//! listen = "0.0.0.0:7400"
//! metrics = "0.0.0.0:9464"
//!
//! [commands.sub]
//! report = true
//! attr = ["zone=eu"]
//! ```

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Command;

/// The config file named by `--config FILE`/`--config=FILE` in `args`, else by `$KECHO_CONFIG`.
pub fn path(args: &[std::ffi::OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("KECHO_CONFIG").filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Reads `file` and makes its values the defaults of `cmd`'s subcommands.
pub fn apply(cmd: Command, file: &Path) -> Result<Command> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read config {}", file.display()))?;
    apply_text(cmd, &text).with_context(|| format!("config {}", file.display()))
}

/// [`apply`] on the file's text.
pub fn apply_text(mut cmd: Command, text: &str) -> Result<Command> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
    let mut global = Vec::new();
    let mut per: Vec<(String, toml::Table)> = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(commands) if k == "commands" => {
                for (name, t) in commands {
                    match t {
                        toml::Value::Table(t) if names.contains(&name) => per.push((name, t)),
                        toml::Value::Table(_) => bail!("[commands.{name}]: not a command"),
                        _ => bail!("commands.{name}: expected a table of flags, [commands.{name}]"),
                    }
                }
            }
            toml::Value::Table(_) => bail!("[{k}]: unknown table (a command's flags go in [commands.{k}])"),
            v => global.push((k, v)),
        }
    }
    // Every top-level key must be a flag of some command, or one of kecho's own (--log).
    for (k, v) in &global {
        if k == "config" {
            bail!("config: a config file cannot name another");
        }
        let top = cmd.get_arguments().find(|a| a.get_long() == Some(k.as_str())).map(|a| a.get_id().clone());
        if let Some(id) = top {
            let values = values(k, v)?;
            cmd = cmd.mut_arg(id, |a| a.default_values(values));
        } else if !cmd.get_subcommands().any(|s| s.get_arguments().any(|a| a.get_long() == Some(k.as_str()))) {
            bail!("{k}: not a flag of any command");
        }
    }
    for name in names {
        let own: Vec<(String, toml::Value)> =
            per.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone().into_iter().collect()).unwrap_or_default();
        let sub = cmd.find_subcommand(&name).cloned().context("subcommand")?;
        for (k, _) in &own {
            if !sub.get_arguments().any(|a| a.get_long() == Some(k.as_str())) {
                bail!("[commands.{name}] {k}: not a flag of `kecho {name}`");
            }
        }
        let mut sub2 = sub.clone();
        for (k, v) in global.iter().filter(|(k, _)| !own.iter().any(|(o, _)| o == k)).chain(own.iter()) {
            let Some(arg) = sub.get_arguments().find(|a| a.get_long() == Some(k.as_str())) else { continue };
            let values = values(k, v)?;
            let id = arg.get_id().clone();
            sub2 = sub2.mut_arg(id, |a| a.default_values(values).required(false));
        }
        cmd = cmd.mut_subcommand(&name, |_| sub2);
    }
    Ok(cmd)
}

/// A TOML value as the flag's value(s).
fn values(key: &str, v: &toml::Value) -> Result<Vec<String>> {
    Ok(match v {
        toml::Value::String(s) => vec![s.clone()],
        toml::Value::Integer(i) => vec![i.to_string()],
        toml::Value::Float(f) => vec![f.to_string()],
        toml::Value::Boolean(b) => vec![b.to_string()],
        toml::Value::Array(a) => a.iter().map(|x| values(key, x).map(|mut v| v.remove(0))).collect::<Result<_>>()?,
        _ => bail!("{key}: expected a string, number, boolean or a list of them"),
    })
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, FromArgMatches};

    use super::*;
    use crate::Cli;

    #[test]
    fn the_example_config_in_docs_is_accepted_and_sets_the_flags() {
        let cmd = apply_text(Cli::command(), include_str!("../../../docs/systemd/kecho.toml")).unwrap();
        let m = cmd.try_get_matches_from(["kecho", "balance", "--mode", "rr"]).unwrap();
        let cli = Cli::from_arg_matches(&m).unwrap();
        let text = format!("{cli:?}");
        assert!(text.contains("http_listen: \"0.0.0.0:8080\""), "{text}");
        assert!(text.contains("mode: \"rr\""), "the flag wins: {text}");
        assert!(text.contains("affinity_cookie: Some(\"kecho_server\")"), "{text}");
        assert!(text.contains("report: true"), "{text}");
        assert!(text.contains("registry: \"10.0.0.1:7400\""), "{text}");
    }

    #[test]
    fn config_path_comes_from_the_flag_then_the_environment() {
        let args = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(path(&args(&["kecho", "--config", "a.toml", "sub", "x"])), Some(PathBuf::from("a.toml")));
        assert_eq!(path(&args(&["kecho", "sub", "--config=b.toml"])), Some(PathBuf::from("b.toml")));
    }
}
