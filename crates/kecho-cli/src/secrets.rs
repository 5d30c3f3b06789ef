//! Secrets kept in files as hex: node identities and authority keys.

use anyhow::{Context, Result};

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes a 32-byte secret as hex to a new file readable by its owner only.
pub fn write_secret(file: &std::path::Path, secret: &[u8; 32]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(file).with_context(|| format!("cannot create {} (it must not exist)", file.display()))?;
    writeln!(f, "{}", hex(secret)).with_context(|| format!("cannot write {}", file.display()))
}

/// 32 random bytes from the operating system.
pub fn rand_secret() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b).context("cannot read /dev/urandom")?;
    Ok(b)
}

pub fn read_identity(file: &std::path::Path) -> Result<kecho::Identity> {
    Ok(kecho::Identity::from_secret(read_secret(file, "identity", "kecho identity new FILE")?))
}

/// Reads a 32-byte secret kept as hex (an identity or an authority).
pub fn read_secret(file: &std::path::Path, what: &str, make: &str) -> Result<[u8; 32]> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read {what} {} (make one with `{make}`)", file.display()))?;
    kecho_proto::access::parse_hex(text.trim())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("{} is not a kecho {what} (64 hex digits)", file.display()))
}
