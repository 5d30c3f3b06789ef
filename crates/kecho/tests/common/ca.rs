//! A certificate authority for the TLS and QUIC tests (rcgen): node certificates signed by it, and nodes' TLS
//! configurations that trust it.

use anyhow::Result;
use kecho::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A self-signed CA.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new() -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Ok(Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate()?)? })
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A node certificate for `names` (IP addresses or DNS names) and its key, both PEM.
    pub fn node(&self, names: &[&str]) -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A node's TLS configuration: a certificate for `names`, trusting this CA.
    pub fn config(&self, names: &[&str]) -> Result<TlsConfig> {
        let (cert, key) = self.node(names)?;
        Ok(TlsConfig::from_pem(cert.as_bytes(), key.as_bytes(), self.pem().as_bytes())?)
    }

    /// A node's TLS configuration for a node on loopback (a certificate for 127.0.0.1).
    pub fn loopback(&self) -> Result<TlsConfig> {
        self.config(&["127.0.0.1"])
    }
}
