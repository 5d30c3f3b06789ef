//! The same-host transport: links between nodes of one host through shared memory, set up over Unix-domain stream
//! sockets.
//!
//! A node started with [`crate::NodeBuilder::same_host`] also listens on a Unix-domain socket (a file in
//! `$XDG_RUNTIME_DIR`, or the temporary directory, removed when the node stops) and adds `unix://HOST/PATH` to the
//! address other nodes read, where `HOST` names this host for this boot (the kernel's `boot_id`). A dialler that
//! runs same-host itself and reads its own `HOST` there dials the socket instead of the node's TCP or QUIC endpoint;
//! if that fails (another mount namespace, a removed file, a refused set-up) it dials as it would have without. Nodes
//! that do not know the scheme ignore it.
//!
//! Right after connecting, the dialler sets the link up over shared memory (crate `kecho-shm`): it passes the
//! acceptor a sealed memory file holding one byte ring per direction (`SCM_RIGHTS`), and from then on the link's
//! bytes go through the rings; the socket carries only one-byte wake-ups for a side that said it sleeps, and its end
//! is the peer's end (a process that exits or crashes closes it; the reader sees it at once). The acceptor tells a
//! set-up from a plain link by its first bytes, so a dialler with [`crate::NodeBuilder::shared_memory`] `None` links
//! over the socket itself, as before. Either way the link above is the same as over TCP: the same handshake (run over
//! the rings) with identity proofs, frames, outbox, heartbeats, loss accounting and duplicate rule (`dial.rs`,
//! `reader.rs`, `writer.rs`); only the byte stream differs. The ring (or the socket's send buffer) bounds what waits
//! between the nodes, the outbox what waits in the node. A peer that hangs without closing is found by the
//! heartbeat, as over TCP.
//!
//! All `unsafe` code (the mapping, atomics over memory another process writes) lives in `kecho-shm`, which checks
//! every index it reads from shared memory, so a corrupt or hostile peer makes a malformed stream (the link closes),
//! never undefined behaviour here; this crate stays `#![forbid(unsafe_code)]`. In the low-latency mode
//! ([`crate::NodeBuilder::low_latency`]) the ring's reader polls the ring itself (loads from memory, no system call)
//! before it sleeps; over a plain socket the mode is `spin.rs`'s. See BENCHMARKS.md for what each gains.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};

use super::tls::{Rd, Wr};
use super::{LinkError, LinkHandler, Links, HANDSHAKE_TIMEOUT};
use crate::config::NodeConfig;

/// The scheme of a same-host endpoint in a node's address.
pub(crate) const SCHEME: &str = "unix://";

/// The longest path a Unix-domain socket address holds (`sun_path`, with its terminating zero).
const MAX_PATH: usize = 107;

/// This host's id for this boot: nodes with the same id run on one kernel. `None` if the kernel does not say.
pub(crate) fn host_id() -> Option<&'static str> {
    static ID: OnceLock<Option<String>> = OnceLock::new();
    ID.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        let id = id.trim();
        (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
    })
    .as_deref()
}

/// The endpoint a node advertises for its socket at `path`.
pub(crate) fn endpoint(host: &str, path: &Path) -> String {
    format!("{SCHEME}{host}{}", path.display())
}

/// The socket path in `addr` if it names a same-host endpoint on host `host`.
pub(crate) fn reachable<'a>(addr: &'a str, host: &str) -> Option<&'a str> {
    addr.split(',').map(str::trim).find_map(|part| {
        let rest = part.strip_prefix(SCHEME)?;
        let slash = rest.find('/')?;
        (&rest[..slash] == host).then(|| &rest[slash..])
    })
}

/// A node's listening socket; its file is removed when it is dropped (the node stopped).
pub(crate) struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LocalListener {
    /// Binds a new socket in `$XDG_RUNTIME_DIR` (or the temporary directory) under a name no other node uses.
    pub(crate) fn bind() -> std::io::Result<LocalListener> {
        let dir = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("kecho-{}-{:016x}.sock", std::process::id(), rand::random::<u64>()));
        if path.as_os_str().len() > MAX_PATH {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("socket path {} is longer than {MAX_PATH} bytes", path.display()),
            ));
        }
        let listener = UnixListener::bind(&path)?;
        Ok(LocalListener { listener, path })
    }

    /// Where the socket is.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Accepts same-host connections until the node stops.
pub(crate) async fn accept_loop<H: LinkHandler>(links: Weak<Links<H>>, l: LocalListener) {
    loop {
        let stream = match l.listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("same-host accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(links) = links.upgrade() else { return };
        let Ok(slot) = links.conn_slots.clone().try_acquire_owned() else {
            tracing::warn!("too many connections; refusing a same-host one");
            continue;
        };
        let l = links.clone();
        links.tasks.spawn(async move {
            let _slot = slot;
            let Some((rd, wr, poller)) = accept(stream, &l.cfg).await else { return };
            super::dial::accept_link(l, rd, wr, None, crate::Transport::Tcp, poller).await;
        });
    }
}

/// Takes an accepted connection: shared memory if the dialler sets it up, the socket itself if not. `None`: the
/// set-up failed (logged).
async fn accept(stream: UnixStream, cfg: &NodeConfig) -> Option<(Rd, Wr, Option<super::spin::Poller>)> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, kecho_shm::accept(stream, cfg.low_latency)).await {
        Ok(Ok(kecho_shm::Accepted::Shm(rd, wr))) => Some((Box::new(rd), Wr::Shm(Box::new(wr)), None)),
        Ok(Ok(kecho_shm::Accepted::Plain { stream, prefix })) => {
            let poller = super::dial::poller(&stream, cfg);
            let (rd, wr) = stream.into_split();
            // The bytes read while looking for a set-up come first.
            let rd: Rd = Box::new(std::io::Cursor::new(prefix).chain(rd));
            Some((rd, Wr::Stream(Box::new(wr)), poller))
        }
        Ok(Err(e)) => {
            tracing::warn!("refusing a same-host connection: {e}");
            None
        }
        Err(_) => {
            tracing::warn!("closing a same-host connection: no set-up within {HANDSHAKE_TIMEOUT:?}");
            None
        }
    }
}

/// Dials the socket at `path` and sets the link's byte stream up: shared-memory rings unless the node says
/// otherwise ([`crate::NodeBuilder::shared_memory`]), the socket itself then.
pub(crate) async fn dial(path: &str, cfg: &NodeConfig) -> Result<(Rd, Wr, Option<super::spin::Poller>), LinkError> {
    let addr = || format!("{SCHEME}{path}");
    let stream = tokio::time::timeout(cfg.connect_timeout, UnixStream::connect(path))
        .await
        .map_err(|_| LinkError::ConnectTimeout { addr: addr() })?
        .map_err(|source| LinkError::Connect { addr: addr(), source })?;
    let Some(ring_bytes) = cfg.shared_memory else {
        let poller = super::dial::poller(&stream, cfg);
        let (rd, wr) = stream.into_split();
        return Ok((Box::new(rd), Wr::Stream(Box::new(wr)), poller));
    };
    let opts = kecho_shm::Options { ring_bytes, spin: cfg.low_latency };
    let (rd, wr) = tokio::time::timeout(HANDSHAKE_TIMEOUT, kecho_shm::connect(stream, &opts))
        .await
        .map_err(|_| LinkError::HandshakeTimeout)?
        .map_err(|e| LinkError::Handshake(format!("shared-memory set-up with {}: {e}", addr())))?;
    Ok((Box::new(rd), Wr::Shm(Box::new(wr)), None))
}

/// Marks `peer`'s current link as same-host or not, and over shared memory or not (for `Node::link_stats`).
pub(crate) fn mark(peer: &Arc<super::Peer>, same_host: bool, wr: &Wr) {
    use std::sync::atomic::Ordering::Relaxed;
    peer.counters.same_host.store(same_host, Relaxed);
    peer.counters.shared_memory.store(matches!(wr, Wr::Shm(_)), Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_hosts_endpoint_is_reachable() {
        let addr = format!("127.0.0.1:7000,{}", endpoint("b00t", Path::new("/run/user/1/kecho-1-ab.sock")));
        assert_eq!(reachable(&addr, "b00t"), Some("/run/user/1/kecho-1-ab.sock"));
        assert_eq!(reachable(&addr, "other"), None);
        assert_eq!(reachable("127.0.0.1:7000", "b00t"), None);
        assert_eq!(reachable("unix://b00t", "b00t"), None, "no path");
        // TCP and QUIC dialling reads past the new endpoint.
        assert_eq!(crate::transport::pick(crate::Transport::Tcp, &addr).unwrap().1, "127.0.0.1:7000");
    }

    #[test]
    fn the_socket_file_goes_with_the_listener() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let path = rt.block_on(async {
            let l = LocalListener::bind().unwrap();
            let p = l.path().to_owned();
            assert!(p.exists());
            p
        });
        assert!(!path.exists(), "{} left behind", path.display());
    }
}
