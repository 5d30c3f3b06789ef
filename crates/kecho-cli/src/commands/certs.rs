//! `kecho certs`: a development CA and node certificates for TLS node links.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair};
use std::path::PathBuf;

/// `kecho certs`'s arguments.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory to write ca.pem, ca.key and NAME.pem / NAME.key per node into.
    dir: PathBuf,
    /// A node's name: an IP address or DNS name other nodes dial it by (repeatable). Each gets a certificate.
    #[arg(long = "node", value_name = "NAME", required = true)]
    nodes: Vec<String>,
    /// An extra name put in every node certificate, for use with --tls-name.
    #[arg(long, value_name = "NAME")]
    shared_name: Option<String>,
}

pub fn run(a: Args) -> Result<()> {
    write(&a.dir, &a.nodes, a.shared_name.as_deref())
}

/// Writes `ca.pem` and `ca.key`, and `NAME.pem` / `NAME.key` for every node name, into `dir`. Refuses to overwrite.
fn write(dir: &Path, nodes: &[String], shared: Option<&str>) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut files = vec!["ca.pem".to_owned(), "ca.key".to_owned()];
    for n in nodes {
        if n.is_empty() || n.contains(['/', '\\']) || n.starts_with('.') {
            bail!("invalid node name {n:?}: give an IP address or a DNS name");
        }
        files.push(format!("{n}.pem"));
        files.push(format!("{n}.key"));
    }
    if let Some(f) = files.iter().find(|f| dir.join(f).exists()) {
        bail!("{} exists already; not overwriting", dir.join(f).display());
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name = name("kecho development CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
    save(dir, "ca.pem", &ca.pem())?;
    save(dir, "ca.key", &ca.key().serialize_pem())?;
    for n in nodes {
        let mut names = vec![n.clone()];
        names.extend(shared.map(str::to_owned));
        let mut params = CertificateParams::new(names).with_context(|| format!("invalid node name {n:?}"))?;
        params.distinguished_name = name(n);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        save(dir, &format!("{n}.pem"), &cert.pem())?;
        save(dir, &format!("{n}.key"), &key.serialize_pem())?;
    }
    println!("wrote {} into {}", files.join(", "), dir.display());
    println!(
        "use: --tls-cert {d}/NAME.pem --tls-key {d}/NAME.key --tls-ca {d}/ca.pem{name}",
        d = dir.display(),
        name = shared.map(|s| format!(" --tls-name {s}")).unwrap_or_default()
    );
    Ok(())
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn save(dir: &Path, file: &str, text: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    if file.ends_with(".key") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
