//! `kecho grant`: issue a credential (the right to join a protected channel as a source or sink, or to install
//! filters in it) to one node key.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use kecho::Roles;

use crate::access::{key32, read_authority};

/// `kecho grant`: issue a credential.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The authority's key file (see `kecho authority new`).
    #[arg(long, value_name = "FILE")]
    pub authority: PathBuf,
    /// The channel, or a prefix of channel names followed by `*` (`*` alone: every channel).
    #[arg(long)]
    pub channel: String,
    /// The rights: a comma-separated list of source, sink, filters, exec (start work on exec agents: `kecho run`,
    /// `deploy`, `configure`, `agent drain`; grant it on channel kecho.exec), or all (the three channel rights).
    #[arg(long, value_name = "ROLES")]
    pub roles: String,
    /// The holder's node public key (64 hex digits, as `kecho identity show` prints it).
    #[arg(long, value_name = "HEX", required_unless_present = "holder_identity", conflicts_with = "holder_identity")]
    pub holder: Option<String>,
    /// The holder's identity file, instead of --holder.
    #[arg(long, value_name = "FILE")]
    pub holder_identity: Option<PathBuf>,
    /// How long the credential is valid: seconds, or a number with s, m, h or d; `never` for no expiry.
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    pub valid_for: String,
    /// Write the credential to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let authority = read_authority(&a.authority)?;
    let roles: Roles = a.roles.parse().map_err(|e| anyhow::anyhow!("--roles: {e}"))?;
    if roles.is_empty() {
        bail!("--roles: a credential must grant at least one role");
    }
    let holder = match (&a.holder, &a.holder_identity) {
        (Some(hex), _) => key32(hex).context("--holder must be a node's public key (64 hex digits)")?,
        (None, Some(file)) => crate::secrets::read_identity(file)?.public_key(),
        (None, None) => bail!("give --holder or --holder-identity"),
    };
    let not_after = match parse_duration(&a.valid_for)? {
        None => 0,
        Some(secs) => unix_now().saturating_add(secs),
    };
    let token = authority.grant(&a.channel, roles, holder, not_after).map_err(anyhow::Error::msg)?;
    let text = token.to_text();
    match &a.out {
        Some(file) => {
            std::fs::write(file, format!("{text}\n")).with_context(|| format!("cannot write {}", file.display()))?;
            eprintln!(
                "kecho: granted {roles} in {:?} to node {}{} -> {}",
                a.channel,
                token.holder_node(),
                expiry_text(not_after),
                file.display()
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn expiry_text(not_after: u64) -> String {
    if not_after == 0 {
        ", no expiry".into()
    } else {
        format!(", valid until Unix time {not_after}")
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seconds, or `None` for `never`.
fn parse_duration(s: &str) -> Result<Option<u64>> {
    let s = s.trim();
    if s == "never" {
        return Ok(None);
    }
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => bail!("--valid-for {s:?}: the unit must be s, m, h or d"),
    };
    let n: u64 = num.parse().with_context(|| format!("--valid-for {s:?} is not a duration (say 3600, 12h or 30d)"))?;
    if n == 0 {
        bail!("--valid-for must be more than 0");
    }
    Ok(Some(n.saturating_mul(mult)))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Some(90));
        assert_eq!(parse_duration("2m").unwrap(), Some(120));
        assert_eq!(parse_duration("12h").unwrap(), Some(43_200));
        assert_eq!(parse_duration("30d").unwrap(), Some(2_592_000));
        assert_eq!(parse_duration("never").unwrap(), None);
        assert!(parse_duration("3w").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("0").is_err());
    }
}
