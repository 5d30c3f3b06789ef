//! The component repository over kecho channels: repository nodes serve their [`Store`] on [`CHANNEL`], and an
//! agent's [`Cache`](crate::repo::Cache) fetches an artifact it lacks through [`ChannelFetch`].
//!
//! A fetch is one `repo.fetch` event to every repository node (kecho fans it out), with the digest and the asker's
//! address as attributes. A node that holds a verified copy answers with a `repo.artifact` event, the bytes as its
//! payload; one that does not answers `repo.missing`. The asker takes the first artifact; the cache then verifies it
//! against the digest and refuses it (keeps nothing, runs nothing) when it does not match, so a repository node that
//! lies or a damaged transfer cannot get anything run. Every exec agent serves its store (so an artifact fetched once
//! is served by that agent too), `kecho repo serve` serves a store alone, and `kecho deploy` serves the deploying
//! user's store while it runs.

use std::future::Future;
use std::time::Duration;

use kecho::{Attrs, Channel, Overflow, Sink, SinkOptions, Source, Value};
use tokio::sync::Mutex;

use crate::repo::{Digest, Fetch, Store};

/// The channel repository nodes and fetchers meet on.
pub const CHANNEL: &str = "kecho.repo";
/// A request for an artifact.
pub const FETCH_TYPE: &str = "repo.fetch";
/// An artifact (the payload).
pub const ARTIFACT_TYPE: &str = "repo.artifact";
/// A repository node that does not hold the artifact.
pub const MISSING_TYPE: &str = "repo.missing";

/// Why a fetch over the channel failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The channel refused a member or closed.
    #[error("repository channel: {0}")]
    Channel(#[from] kecho::Error),
    /// No repository node answered with the artifact in time.
    #[error("no repository node sent {digest} within {waited:?} ({servers} node(s) serve a repository)")]
    Timeout {
        /// The artifact.
        digest: Digest,
        /// How long.
        waited: Duration,
        /// Repository nodes known when the request went out.
        servers: usize,
    },
}

/// Serves `store` on `channel` (normally [`CHANNEL`]) as repository node `name` until the returned task is aborted.
pub fn serve(channel: &Channel, name: &str, store: Store) -> Result<tokio::task::JoinHandle<()>, kecho::Error> {
    let mut sink = channel.sink(SinkOptions::new().types([FETCH_TYPE]).attr("repo", name.to_owned()))?;
    let mut source = channel.source()?;
    let name = name.to_owned();
    Ok(tokio::spawn(async move {
        loop {
            let ev = match sink.recv().await {
                Ok(ev) => ev,
                Err(kecho::RecvError::Closed) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "repository requests");
                    continue;
                }
            };
            let (Some(Value::Str(digest)), Some(Value::Str(to))) = (ev.attrs().get("digest"), ev.attrs().get("to"))
            else {
                continue;
            };
            let Ok(digest) = digest.parse::<Digest>() else { continue };
            let attrs =
                Attrs::new().with("to", to.clone()).with("digest", digest.to_string()).with("node", name.clone());
            // Only a copy that still hashes to its name is served (the store verifies on every read).
            let sent = match store.get(&digest) {
                Ok(bytes) => source.submit(ARTIFACT_TYPE, &attrs, &bytes).await,
                Err(_) => source.submit(MISSING_TYPE, &attrs, &[]).await,
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "could not answer a repository request");
            }
        }
    }))
}

/// Fetches artifacts from the repository nodes on a channel (the remote of an agent's cache).
pub struct ChannelFetch {
    id: String,
    channel: Channel,
    wait: Duration,
    io: Mutex<(Source, Sink)>,
}

impl std::fmt::Debug for ChannelFetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelFetch").field("id", &self.id).field("wait", &self.wait).finish()
    }
}

impl ChannelFetch {
    /// A fetcher on `channel` whose answers are addressed to `id` (letters, digits, `-` and `.`); a fetch waits at
    /// most `wait` for an artifact.
    pub fn new(channel: &Channel, id: &str, wait: Duration) -> Result<ChannelFetch, kecho::Error> {
        let id: String = id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
        let sink = channel.sink(
            SinkOptions::new()
                .types([ARTIFACT_TYPE, MISSING_TYPE])
                .filter(&format!("to == \"{id}\""))
                .attr("fetcher", id.clone())
                .capacity(64)
                .overflow(Overflow::Block),
        )?;
        let source = channel.source()?;
        Ok(ChannelFetch { id, channel: channel.clone(), wait, io: Mutex::new((source, sink)) })
    }

    fn servers(&self) -> usize {
        self.channel.sink_attrs().iter().filter(|(_, a)| a.get("repo").is_some()).count()
    }

    async fn fetch_now(&self, digest: &Digest) -> Result<Option<Vec<u8>>, FetchError> {
        let mut io = self.io.lock().await;
        let (source, sink) = &mut *io;
        // Answers to an earlier fetch that gave up are stale now.
        while sink.try_recv().is_ok() {}
        let end = tokio::time::Instant::now() + self.wait;
        // The fetcher's sink must be known to the servers before they answer, or the answer is lost.
        while self.servers() == 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let servers = self.servers();
        let attrs = Attrs::new().with("to", self.id.clone()).with("digest", digest.to_string());
        source.submit(FETCH_TYPE, &attrs, &[]).await?;
        let mut missing = 0;
        loop {
            let ev = match tokio::time::timeout_at(end, sink.recv()).await {
                Ok(Ok(ev)) => ev,
                Ok(Err(kecho::RecvError::Closed)) => return Err(kecho::Error::Closed(CHANNEL.into()).into()),
                Ok(Err(_)) => continue,
                Err(_) => return Err(FetchError::Timeout { digest: *digest, waited: self.wait, servers }),
            };
            if !matches!(ev.attrs().get("digest"), Some(Value::Str(d)) if *d == digest.to_string()) {
                continue;
            }
            match ev.ty() {
                ARTIFACT_TYPE => return Ok(Some(ev.payload().to_vec())),
                _ => {
                    missing += 1;
                    if missing >= servers {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

impl Fetch for ChannelFetch {
    type Error = FetchError;

    fn fetch(&self, digest: &Digest) -> impl Future<Output = Result<Option<Vec<u8>>, FetchError>> + Send {
        self.fetch_now(digest)
    }
}
