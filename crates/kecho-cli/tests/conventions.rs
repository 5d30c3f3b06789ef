//! A config file (`--config`, `$KECHO_CONFIG`) under the flags, shell completions and man pages.

use std::process::Command;

use anyhow::Result;

mod support;
use support::*;

fn temp_dir(name: &str) -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("kecho-conv-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[test]
fn a_config_file_sets_flags_and_the_command_line_overrides_it() -> Result<()> {
    let dir = temp_dir("cfg")?;
    let (from_file, metrics) = (free_port()?, free_port()?);
    let file = dir.join("kecho.toml");
    std::fs::write(
        &file,
        format!("log = \"warn\"\n[commands.registry]\nlisten = \"{from_file}\"\nmetrics = \"{metrics}\"\n"),
    )?;
    let file_s = file.to_string_lossy().into_owned();

    let mut r = Proc::spawn("registry", &["--config", &file_s, "registry"])?;
    let line = r.wait_stderr("listening on")?;
    assert!(line.ends_with(&from_file), "{line}");
    let (code, body) = http_get(&metrics, "/metrics")?;
    assert_eq!(code, 200);
    assert!(body.contains("kecho_registry_up"), "{body}");
    drop(r);

    // The flag wins over the file; the file comes from $KECHO_CONFIG as well.
    let from_flag = free_port()?;
    let child = Command::new(KECHO)
        .args(["registry", "--listen", &from_flag])
        .env("KECHO_CONFIG", &file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut r = Proc { child, name: "registry".into() };
    let line = r.wait_stderr("listening on")?;
    assert!(line.ends_with(&from_flag), "{line}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn config_mistakes_are_clear_errors() -> Result<()> {
    let dir = temp_dir("bad")?;
    for (text, needle) in [
        ("nonsense = 1\n", "nonsense: not a flag of any command"),
        ("[commands.registry]\nheartbeat = 1\n", "[commands.registry] heartbeat: not a flag of `kecho registry`"),
        ("[commands.nothing]\n", "[commands.nothing]: not a command"),
        ("[nothing]\n", "[nothing]: unknown table"),
        ("registry = \n", "not valid TOML"),
    ] {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text)?;
        let o = Command::new(KECHO).arg("--config").arg(&file).args(["channels"]).output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "{text:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    let o = Command::new(KECHO).args(["--config", "/nonexistent/kecho.toml", "channels"]).output()?;
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read config"));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() -> Result<()> {
    let o = Command::new(KECHO).args(["completions", "bash"]).output()?;
    let bash = String::from_utf8(o.stdout)?;
    assert!(o.status.success() && bash.contains("_kecho()") && bash.contains("balance") && bash.contains("--metrics"));
    let o = Command::new(KECHO).args(["completions", "zsh"]).output()?;
    assert!(o.status.success() && String::from_utf8(o.stdout)?.contains("#compdef kecho"));

    // A reader that stops early (`kecho completions bash | head`) is no error: no panic, status 0.
    for args in [&["completions", "bash"][..], &["man"][..]] {
        let mut child = Command::new(KECHO)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        drop(child.stdout.take());
        let o = child.wait_with_output()?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success() && err.is_empty(), "{args:?}: {:?} {err}", o.status);
    }

    let o = Command::new(KECHO).arg("man").output()?;
    let man = String::from_utf8(o.stdout)?;
    assert!(o.status.success() && man.contains(".TH kecho") && man.contains("registry"), "{man}");
    let dir = temp_dir("man")?;
    let o = Command::new(KECHO).args(["man", "--out"]).arg(&dir).output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let sub = std::fs::read_to_string(dir.join("kecho-sub.1"))?;
    assert!(sub.contains(".TH kecho-sub") && sub.contains("\\-\\-metrics"), "{sub}");
    assert!(dir.join("kecho-balance.1").is_file() && dir.join("kecho.1").is_file());
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
