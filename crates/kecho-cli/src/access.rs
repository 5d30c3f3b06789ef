//! Access control from the command line: authorities (`kecho authority`), credentials (`kecho grant`) and the flags
//! with which a node requires a policy and presents credentials.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use kecho::{Authority, NodeBuilder, Policy, Roles, Token};
use kecho_proto::access::parse_hex;

/// The flags of every command that runs a node.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AccessArgs {
    /// Present this credential (see `kecho grant`; repeatable). It was issued to one node key: pass that node's
    /// --identity too.
    #[arg(long = "token", value_name = "FILE")]
    pub tokens: Vec<PathBuf>,
    /// Require the access policy of this authority (its public key, 64 hex digits; see `kecho authority new`): a
    /// channel this node creates is protected by it, and a channel under another policy (or none) is refused.
    #[arg(long, value_name = "HEX", env = "KECHO_AUTHORITY")]
    pub authority_pub: Option<String>,
    /// The roles that need a credential under --authority-pub: a comma-separated list of source, sink, filters, or
    /// all.
    #[arg(long, value_name = "ROLES", default_value = "all", requires = "authority_pub")]
    pub require: String,
}

impl AccessArgs {
    /// Adds the policy (for every channel this process opens) and the credentials to `builder`; `identity` is the
    /// node's, if one was given.
    pub fn apply(&self, mut builder: NodeBuilder, identity: Option<&kecho::Identity>) -> Result<NodeBuilder> {
        if let Some(key) = &self.authority_pub {
            let authority = key32(key).context("--authority-pub must be an authority's public key (64 hex digits)")?;
            let require: Roles = self.require.parse().map_err(|e| anyhow::anyhow!("--require: {e}"))?;
            builder = builder.policy("*", Policy { authority, require });
        }
        if self.tokens.is_empty() {
            return Ok(builder);
        }
        let Some(identity) = identity else {
            bail!("--token needs --identity: a credential is issued to one node key (see `kecho identity new`)");
        };
        for file in &self.tokens {
            let token = read_token(file)?;
            if token.holder != identity.public_key() {
                bail!(
                    "{} was issued to node {}, not to this node ({})",
                    file.display(),
                    token.holder_node(),
                    identity.node_id()
                );
            }
            builder = builder.token(token);
        }
        Ok(builder)
    }
}

#[derive(Subcommand, Debug)]
pub enum AuthorityCmd {
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

/// `kecho grant`: issue a credential.
#[derive(clap::Args, Debug)]
pub struct GrantArgs {
    /// The authority's key file (see `kecho authority new`).
    #[arg(long, value_name = "FILE")]
    pub authority: PathBuf,
    /// The channel, or a prefix of channel names followed by `*` (`*` alone: every channel).
    #[arg(long)]
    pub channel: String,
    /// The rights: a comma-separated list of source, sink, filters, or all.
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

pub fn authority(cmd: AuthorityCmd) -> Result<()> {
    match cmd {
        AuthorityCmd::New { file } => {
            let secret = crate::rand_secret()?;
            crate::write_secret(&file, &secret)?;
            println!("authority public key {}", crate::hex(&Authority::from_secret(secret).public_key()));
            Ok(())
        }
        AuthorityCmd::Show { file } => {
            let a = read_authority(&file)?;
            println!("authority public key {}", crate::hex(&a.public_key()));
            Ok(())
        }
    }
}

pub fn grant(a: GrantArgs) -> Result<()> {
    let authority = read_authority(&a.authority)?;
    let roles: Roles = a.roles.parse().map_err(|e| anyhow::anyhow!("--roles: {e}"))?;
    if roles.is_empty() {
        bail!("--roles: a credential must grant at least one role");
    }
    let holder = match (&a.holder, &a.holder_identity) {
        (Some(hex), _) => key32(hex).context("--holder must be a node's public key (64 hex digits)")?,
        (None, Some(file)) => crate::read_identity(file)?.public_key(),
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

fn key32(hex: &str) -> Option<[u8; 32]> {
    parse_hex(hex.trim())?.try_into().ok()
}

fn read_authority(file: &Path) -> Result<Authority> {
    let secret = crate::read_secret(file, "authority", "kecho authority new FILE")?;
    Ok(Authority::from_secret(secret))
}

fn read_token(file: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read credential {} (issue one with `kecho grant`)", file.display()))?;
    Token::from_text(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
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
