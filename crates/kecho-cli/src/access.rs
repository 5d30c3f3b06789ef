//! The access-control flags of every command that runs a node: the policy it requires and the credentials it
//! presents (`kecho authority` and `kecho grant` make them).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kecho::{Authority, NodeBuilder, Policy, Roles, Token};
use kecho_proto::access::parse_hex;

/// The flags of every command that runs a node.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct AccessArgs {
    /// Present this credential (see `kecho grant`; repeatable). It was issued to one node key: pass that node's
    /// --identity too. A credential with the exec right is also presented to exec agents with each request.
    #[arg(long = "token", value_name = "FILE")]
    pub tokens: Vec<PathBuf>,
    /// Require the access policy of this authority (its public key, 64 hex digits; see `kecho authority new`): a
    /// channel this node creates is protected by it, and a channel under another policy (or none) is refused.
    #[arg(long, value_name = "HEX", env = "KECHO_AUTHORITY")]
    pub authority_pub: Option<String>,
    /// The roles that need a credential under --authority-pub: a comma-separated list of source, sink, filters, or
    /// all (also --require-roles, the name `kecho reserve` takes it under).
    #[arg(
        long,
        visible_alias = "require-roles",
        value_name = "ROLES",
        default_value = "all",
        requires = "authority_pub"
    )]
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
            if token.roles.minus(Roles::EXEC).is_empty() {
                // An exec credential only: it travels with exec requests (`kecho run`, `deploy`, ...), not in
                // channel snapshots, where it would stand in for a channel credential and grant nothing.
                continue;
            }
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

pub(crate) fn key32(hex: &str) -> Option<[u8; 32]> {
    parse_hex(hex.trim())?.try_into().ok()
}

pub(crate) fn read_authority(file: &Path) -> Result<Authority> {
    let secret = crate::secrets::read_secret(file, "authority", "kecho authority new FILE")?;
    Ok(Authority::from_secret(secret))
}

pub(crate) fn read_token(file: &Path) -> Result<Token> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read credential {} (issue one with `kecho grant`)", file.display()))?;
    Token::from_text(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}
