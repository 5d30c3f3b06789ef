//! TLS for node links, after 2K's switchable security policy: plaintext on a trusted network, TLS (rustls) between
//! domains, chosen per deployment with [`crate::NodeBuilder::tls`].
//!
//! Links are mutually authenticated: every node presents a certificate signed by the deployment's CA and accepts
//! only peers whose certificate chains to that CA. A dialling node checks the peer's certificate against the address
//! it dials (an IP address or DNS name in the certificate), or against one name shared by every node's certificate
//! (`TlsConfig::server_name`), which suits clusters whose addresses change.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A PEM input held nothing usable.
    #[error("{what}: {why}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the certificates or key (e.g. a key that does not match the certificate).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA could not be used to verify peers.
    #[error("TLS CA: {0}")]
    Verifier(String),
    /// The name to verify is not a valid DNS name or IP address.
    #[error("invalid TLS server name {0:?}")]
    Name(String),
}

/// Certificates and keys for TLS node links. Cheap to clone.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) client: Arc<ClientConfig>,
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads this node's certificate chain, its private key and the CA certificate(s) that peers' certificates must
    /// chain to, all PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
        };
        Self::from_pem(&read("certificate", cert)?, &read("private key", key)?, &read("CA certificate", ca)?)
    }

    /// As [`TlsConfig::from_pem_files`], from PEM text in memory.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Result<Self, TlsError> {
        let certs = certificates("certificate", cert)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| TlsError::Pem { what: "private key", why: format!("no usable private key ({e})") })?;
        let mut roots = RootCertStore::empty();
        for c in certificates("CA certificate", ca)? {
            roots.add(c).map_err(|e| TlsError::Verifier(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)?;
        Ok(TlsConfig { client: Arc::new(client), server: Arc::new(server), server_name: None })
    }

    /// Verifies `name` in every peer's certificate instead of the address dialled.
    pub fn server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let n = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::Name(name.to_owned()))?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// The name to verify when dialling `addr` (`host:port`).
    pub(crate) fn name_for(&self, addr: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = match addr.parse::<std::net::SocketAddr>() {
            Ok(a) => return Ok(ServerName::IpAddress(a.ip().into())),
            Err(_) => addr.rsplit_once(':').map_or(addr, |(h, _)| h),
        };
        ServerName::try_from(host.to_owned()).map_err(|_| TlsError::Name(host.to_owned()))
    }
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem { what, why: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { what, why: "no certificate in PEM input".into() });
    }
    Ok(certs)
}
