//! TLS node links: mutual authentication against a CA, refusal of strangers and of plaintext nodes, clear errors for
//! unusable certificate files.
#![cfg(feature = "tls")]

use std::time::Duration;

use anyhow::{bail, Result};
use kecho::{Attrs, Error, MembershipConfig, Node, RegistryClient, SinkOptions, TlsConfig, TlsError};

mod common;
use common::Ca;

const T: Duration = Duration::from_secs(10);

async fn node(reg: &RegistryClient, tls: Option<TlsConfig>) -> Result<Node> {
    let m = MembershipConfig { open_timeout: Duration::from_secs(3), ..MembershipConfig::default() };
    let mut b = Node::builder().registry_client(reg.clone()).membership(m);
    if let Some(t) = tls {
        b = b.tls(t);
    }
    Ok(b.start().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_ca_exchange_events_over_tls() -> Result<()> {
    let ca = Ca::new()?;
    let reg = RegistryClient::in_process_private();
    let a = node(&reg, Some(ca.loopback()?)).await?;
    let b = node(&reg, Some(ca.loopback()?)).await?;
    let ca_ = a.create_channel("secure").await?;
    let cb = b.open_channel("secure").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ca_.wait_for_sinks(1, T).await?;
    let mut src = ca_.source()?;
    for i in 0..100i64 {
        src.submit("e", &Attrs::new().with("i", i), b"secret payload").await?;
    }
    for i in 0..100i64 {
        let ev = tokio::time::timeout(T, sink.recv()).await??;
        assert_eq!(ev.attrs().get("i"), Some(&kecho::Value::Int(i)));
        assert_eq!(&ev.payload()[..], b"secret payload");
    }
    assert_eq!(a.links(), 1);
    Ok(())
}

/// A node with a certificate of another CA, and a node without TLS, cannot join; the error says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_plaintext_nodes_are_refused_with_a_reason() -> Result<()> {
    let ca = Ca::new()?;
    let other = Ca::new()?;
    let reg = RegistryClient::in_process_private();
    let a = node(&reg, Some(ca.loopback()?)).await?;
    let ch = a.create_channel("secure").await?;
    let _sink = ch.sink(SinkOptions::new())?;

    let stranger = node(&reg, Some(other.config(&["127.0.0.1"])?)).await?;
    match stranger.open_channel("secure").await {
        Err(e @ Error::OpenTimeout { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("TLS handshake"), "{msg}");
            assert!(
                matches!(&e, Error::OpenTimeout { cause: Some(c), .. } if c.kind() == kecho::LinkFailureKind::Tls),
                "{e:?}"
            );
        }
        other => bail!("a stranger joined or failed oddly: {other:?}"),
    }

    let plain = node(&reg, None).await?;
    match plain.open_channel("secure").await {
        Err(e @ Error::OpenTimeout { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("requires TLS"), "{msg}");
        }
        other => bail!("a plaintext node joined or failed oddly: {other:?}"),
    }
    // Neither left a trace: the channel still has its one sink and no other member node.
    assert_eq!(ch.sinks(), 1);
    assert_eq!(a.links(), 0);

    // A certificate for another name is refused too: the dialler checks the address it dials.
    let wrong_name = node(&reg, Some(ca.loopback()?)).await?;
    let b = node(&reg, Some(ca.config(&["node-b.example"])?)).await?;
    let cb = b.create_channel("named").await?;
    let _sb = cb.sink(SinkOptions::new())?;
    match wrong_name.open_channel("named").await {
        Err(e @ Error::OpenTimeout { .. }) => assert!(e.to_string().contains("TLS handshake"), "{e}"),
        other => bail!("a certificate for another name was accepted: {other:?}"),
    }
    Ok(())
}

/// With a shared server name, certificates need not name each node's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_server_name_replaces_addresses() -> Result<()> {
    let ca = Ca::new()?;
    let reg = RegistryClient::in_process_private();
    let cfg = |ca: &Ca| -> Result<TlsConfig> { Ok(ca.config(&["cluster.kecho"])?.server_name("cluster.kecho")?) };
    let a = node(&reg, Some(cfg(&ca)?)).await?;
    let b = node(&reg, Some(cfg(&ca)?)).await?;
    let ch = a.create_channel("shared").await?;
    let cb = b.open_channel("shared").await?;
    let mut sink = cb.sink(SinkOptions::new())?;
    ch.wait_for_sinks(1, T).await?;
    ch.source()?.submit("e", &Attrs::new(), b"x").await?;
    assert_eq!(tokio::time::timeout(T, sink.recv()).await??.ty(), "e");
    Ok(())
}

#[test]
fn unusable_certificate_files_are_clear_errors() -> Result<()> {
    let ca = Ca::new()?;
    let (cert, key) = ca.node(&["127.0.0.1"])?;
    let (_, other_key) = ca.node(&["127.0.0.1"])?;
    let ca_pem = ca.pem();
    let dir = std::env::temp_dir().join(format!("kecho-tls-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let missing = dir.join("missing.pem");
    match TlsConfig::from_pem_files(&missing, &missing, &missing) {
        Err(e @ TlsError::Read { .. }) => assert!(e.to_string().contains("missing.pem"), "{e}"),
        other => bail!("missing file: {other:?}"),
    }
    std::fs::remove_dir_all(&dir)?;
    match TlsConfig::from_pem(b"not pem", key.as_bytes(), ca_pem.as_bytes()) {
        Err(e @ TlsError::Pem { .. }) => assert!(e.to_string().contains("certificate"), "{e}"),
        other => bail!("garbage certificate: {other:?}"),
    }
    match TlsConfig::from_pem(cert.as_bytes(), b"", ca_pem.as_bytes()) {
        Err(e @ TlsError::Pem { .. }) => assert!(e.to_string().contains("private key"), "{e}"),
        other => bail!("no key: {other:?}"),
    }
    match TlsConfig::from_pem(cert.as_bytes(), other_key.as_bytes(), ca_pem.as_bytes()) {
        Err(TlsError::Rustls(_)) => {}
        other => bail!("a key that does not match the certificate: {other:?}"),
    }
    assert!(TlsConfig::from_pem(cert.as_bytes(), key.as_bytes(), ca_pem.as_bytes())?
        .server_name("not a name!")
        .is_err());
    Ok(())
}
