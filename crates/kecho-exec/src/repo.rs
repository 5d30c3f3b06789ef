//! The content-addressed component repository.
//!
//! An artifact's name is its SHA-256 ([`Digest`], written `sha256:<64 hex digits>`). Since the name is the hash, an
//! artifact is verified by hashing what arrived, wherever it came from; nothing is run unless the bytes hash to the
//! name asked for.
//!
//! - [`Store`]: a directory of artifacts, one read-only file per digest, written atomically (a temporary file renamed
//!   into place), verified on every read; a damaged file is removed, never served.
//! - [`Fetch`]: where a cache gets what it lacks (a repository node over kecho channels; a [`Store`] or a
//!   [`MemRemote`] in tests).
//! - [`Cache`]: an agent's local store in front of a remote: each artifact is fetched once, verified, kept, and
//!   verified again before it is handed out to run. A wrong artifact is refused and not kept.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The largest artifact a store accepts unless told otherwise (256 MiB).
pub const DEFAULT_MAX_ARTIFACT: u64 = 256 << 20;

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepoError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes do not hash to the name asked for: damaged or wrong, refused.
    #[error("artifact {expected} refused: its content hashes to {actual}")]
    HashMismatch {
        /// The digest asked for.
        expected: Digest,
        /// The digest of what was found or received.
        actual: Digest,
    },
    /// Neither the store nor the remote has the artifact.
    #[error("artifact {0} not found")]
    NotFound(Digest),
    /// The artifact is larger than the store accepts.
    #[error("artifact of {size} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u64,
    },
    /// The remote could not be asked.
    #[error("fetching {digest} failed: {source}")]
    Fetch {
        /// The artifact.
        digest: Digest,
        /// Why (the remote's own error).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Io { path: path.to_path_buf(), source }
}

/// The SHA-256 of an artifact's bytes: its name in the repository.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest([u8; 32]);

/// A text that is not a digest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an artifact digest (expected `sha256:` and 64 hex digits)")]
pub struct BadDigest(String);

impl Digest {
    /// The digest of these bytes.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The raw hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 lowercase hex digits, without the `sha256:` prefix (the file name in a store).
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
            s.push(char::from_digit(u32::from(b & 15), 16).unwrap_or('0'));
        }
        s
    }
}

impl FromStr for Digest {
    type Err = BadDigest;

    /// Accepts `sha256:<64 hex>` or the bare 64 hex digits, either case.
    fn from_str(s: &str) -> Result<Digest, BadDigest> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        let bad = || BadDigest(s.to_string());
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16).ok_or_else(bad)?;
            let lo = (pair[1] as char).to_digit(16).ok_or_else(bad)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Ok(Digest(out))
    }
}

impl TryFrom<String> for Digest {
    type Error = BadDigest;

    fn try_from(s: String) -> Result<Digest, BadDigest> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// A directory of artifacts named by their digest.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    max_size: u64,
}

impl Store {
    /// Opens (creating if needed) a store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Store, RepoError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Store { dir, max_size: DEFAULT_MAX_ARTIFACT })
    }

    /// Sets the largest artifact accepted.
    pub fn with_max_size(mut self, max: u64) -> Store {
        self.max_size = max;
        self
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the artifact lives (whether or not it is there).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Whether the store holds a file for this digest (not verified).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.path_of(digest).is_file()
    }

    /// Stores bytes under their digest and returns it. Storing what is already there is a no-op.
    pub fn put(&self, bytes: &[u8]) -> Result<Digest, RepoError> {
        let digest = Digest::of(bytes);
        self.store_as(&digest, bytes)?;
        Ok(digest)
    }

    /// Stores bytes only if they hash to `expected` (what a cache does with a fetched artifact).
    pub fn put_expecting(&self, expected: &Digest, bytes: &[u8]) -> Result<(), RepoError> {
        let actual = Digest::of(bytes);
        if actual != *expected {
            return Err(RepoError::HashMismatch { expected: *expected, actual });
        }
        self.store_as(expected, bytes)
    }

    /// Writes bytes already known to hash to `digest`.
    fn store_as(&self, digest: &Digest, bytes: &[u8]) -> Result<(), RepoError> {
        self.check_size(bytes.len() as u64)?;
        if !self.contains(digest) {
            self.write_atomically(digest, |f| f.write_all(bytes))?;
        }
        Ok(())
    }

    /// Stores a file's content, hashing it as it is copied, and returns its digest.
    pub fn put_file(&self, path: &Path) -> Result<Digest, RepoError> {
        let mut src = fs::File::open(path).map_err(io_err(path))?;
        let size = src.metadata().map_err(io_err(path))?.len();
        self.check_size(size)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(&self.dir))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(io_err(path))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            self.check_size(total)?;
            hasher.update(&buf[..n]);
            tmp.write_all(&buf[..n]).map_err(io_err(tmp.path()))?;
        }
        let digest = Digest(hasher.finalize().into());
        self.persist(tmp, &digest)?;
        Ok(digest)
    }

    /// Reads an artifact and verifies it. A file that does not hash to its name is removed and refused.
    pub fn get(&self, digest: &Digest) -> Result<Vec<u8>, RepoError> {
        let path = self.path_of(digest);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(RepoError::NotFound(*digest)),
            Err(e) => return Err(RepoError::Io { path, source: e }),
        };
        let actual = Digest::of(&bytes);
        if actual != *digest {
            tracing::warn!(%digest, %actual, "removing a damaged artifact from the store");
            let _ = fs::remove_file(&path);
            return Err(RepoError::HashMismatch { expected: *digest, actual });
        }
        Ok(bytes)
    }

    /// Verifies an artifact and returns the path of its (read-only, executable) file, to run it. The file is not
    /// writable by its owner, so only someone who can change the store's directory can swap it after the check.
    pub fn verified_path(&self, digest: &Digest) -> Result<PathBuf, RepoError> {
        self.get(digest)?;
        Ok(self.path_of(digest))
    }

    /// Every digest the store holds a file for, sorted (temporary files are skipped).
    pub fn list(&self) -> Result<Vec<Digest>, RepoError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let entry = entry.map_err(io_err(&self.dir))?;
            if let Some(d) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                out.push(d);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes an artifact; removing one that is not there is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<(), RepoError> {
        let path = self.path_of(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(RepoError::Io { path, source: e }),
            _ => Ok(()),
        }
    }

    fn check_size(&self, size: u64) -> Result<(), RepoError> {
        if size > self.max_size {
            return Err(RepoError::TooLarge { size, max: self.max_size });
        }
        Ok(())
    }

    fn write_atomically(
        &self,
        digest: &Digest,
        write: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
    ) -> Result<(), RepoError> {
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir).map_err(io_err(&self.dir))?;
        write(tmp.as_file_mut()).map_err(io_err(tmp.path()))?;
        self.persist(tmp, digest)
    }

    /// Makes the temporary file read-only and executable and renames it to its digest. The file is not synced to
    /// disk: a file that a crash left short or empty fails verification on its next read and is fetched again, so
    /// integrity does not depend on durability.
    fn persist(&self, tmp: tempfile::NamedTempFile, digest: &Digest) -> Result<(), RepoError> {
        let file = tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(0o555)).map_err(io_err(tmp.path()))?;
        let dest = self.path_of(digest);
        tmp.persist(&dest).map_err(|e| RepoError::Io { path: dest, source: e.error })?;
        Ok(())
    }
}

/// Where a cache fetches artifacts it lacks. The answer is not trusted: the cache verifies it.
pub trait Fetch {
    /// Why a fetch failed.
    type Error: std::error::Error + Send + Sync + 'static;
    /// The artifact's bytes, or `Ok(None)` when the remote does not have it.
    fn fetch(&self, digest: &Digest) -> impl Future<Output = Result<Option<Vec<u8>>, Self::Error>> + Send;
}

impl Fetch for Store {
    type Error = RepoError;
    fn fetch(&self, digest: &Digest) -> impl Future<Output = Result<Option<Vec<u8>>, RepoError>> + Send {
        let answer = match self.get(digest) {
            Ok(b) => Ok(Some(b)),
            Err(RepoError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        };
        std::future::ready(answer)
    }
}

/// A remote held in memory, for tests: it answers with whatever bytes it was given under a digest, right or wrong.
#[derive(Debug, Default)]
pub struct MemRemote {
    artifacts: std::sync::Mutex<BTreeMap<Digest, Vec<u8>>>,
    /// How many fetches it answered.
    pub fetches: AtomicU64,
}

impl MemRemote {
    /// Holds `bytes` under their own digest and returns it.
    pub fn put(&self, bytes: &[u8]) -> Digest {
        let d = Digest::of(bytes);
        self.put_as(d, bytes);
        d
    }

    /// Holds `bytes` under any digest (to play a damaged or lying remote).
    pub fn put_as(&self, digest: Digest, bytes: &[u8]) {
        self.artifacts.lock().unwrap_or_else(|p| p.into_inner()).insert(digest, bytes.to_vec());
    }
}

impl Fetch for MemRemote {
    type Error = std::convert::Infallible;
    fn fetch(&self, digest: &Digest) -> impl Future<Output = Result<Option<Vec<u8>>, Self::Error>> + Send {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let found = self.artifacts.lock().unwrap_or_else(|p| p.into_inner()).get(digest).cloned();
        std::future::ready(Ok(found))
    }
}

/// What a cache did, counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Artifacts served from the local store.
    pub hits: u64,
    /// Artifacts fetched from the remote and kept.
    pub fetched: u64,
    /// Artifacts refused because their content did not match their name (local or fetched).
    pub refused: u64,
}

/// An agent's local store in front of a remote repository.
#[derive(Debug)]
pub struct Cache<F> {
    local: Store,
    remote: F,
    hits: AtomicU64,
    fetched: AtomicU64,
    refused: AtomicU64,
}

impl<F: Fetch> Cache<F> {
    /// A cache keeping artifacts in `local`, fetching from `remote`.
    pub fn new(local: Store, remote: F) -> Cache<F> {
        Cache { local, remote, hits: AtomicU64::new(0), fetched: AtomicU64::new(0), refused: AtomicU64::new(0) }
    }

    /// The local store.
    pub fn local(&self) -> &Store {
        &self.local
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            fetched: self.fetched.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Makes sure a verified copy of the artifact is in the local store (fetching it once) and returns the path to
    /// run. A local copy that is damaged is dropped and fetched again; a fetched copy that is wrong is refused.
    pub async fn ensure(&self, digest: &Digest) -> Result<PathBuf, RepoError> {
        match self.local.verified_path(digest) {
            Ok(p) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(p);
            }
            Err(RepoError::NotFound(_)) => {}
            Err(RepoError::HashMismatch { .. }) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        let bytes = self
            .remote
            .fetch(digest)
            .await
            .map_err(|e| RepoError::Fetch { digest: *digest, source: Box::new(e) })?
            .ok_or(RepoError::NotFound(*digest))?;
        if let Err(e) = self.local.put_expecting(digest, &bytes) {
            if matches!(e, RepoError::HashMismatch { .. }) {
                self.refused.fetch_add(1, Ordering::Relaxed);
            }
            return Err(e);
        }
        self.fetched.fetch_add(1, Ordering::Relaxed);
        // Just verified and written; verified again whenever it is read back.
        Ok(self.local.path_of(digest))
    }

    /// The artifact's verified bytes (fetched once, as for [`Cache::ensure`]).
    pub async fn get(&self, digest: &Digest) -> Result<Vec<u8>, RepoError> {
        self.ensure(digest).await?;
        self.local.get(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn digest_of_known_bytes() {
        // SHA-256("test"), as printed by sha256sum.
        let d = Digest::of(b"test");
        assert_eq!(d.to_string(), "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        assert_eq!("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08".parse::<Digest>().unwrap(), d);
        for bad in
            ["", "sha256:", "md5:9f86", "sha256:zz86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
        {
            assert!(bad.parse::<Digest>().is_err(), "{bad} accepted");
        }
        // A multi-byte character must be refused, not split.
        assert!("é".repeat(32).parse::<Digest>().is_err());
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("artifacts")).unwrap();
        (dir, store)
    }

    #[test]
    fn put_get_and_list() {
        let (_dir, s) = store();
        let d = s.put(b"component v1").unwrap();
        assert_eq!(d, Digest::of(b"component v1"));
        assert_eq!(s.put(b"component v1").unwrap(), d, "storing twice is a no-op");
        assert_eq!(s.get(&d).unwrap(), b"component v1");
        let mode = fs::metadata(s.path_of(&d)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o555, "stored read-only and executable");
        let other = Digest::of(b"absent");
        assert!(matches!(s.get(&other), Err(RepoError::NotFound(x)) if x == other));
        assert_eq!(s.list().unwrap(), vec![d]);
        s.remove(&d).unwrap();
        s.remove(&d).unwrap();
        assert!(s.list().unwrap().is_empty());
    }

    #[test]
    fn put_file_hashes_while_copying() {
        let (dir, s) = store();
        let src = dir.path().join("tool.sh");
        let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&src, &content).unwrap();
        let d = s.put_file(&src).unwrap();
        assert_eq!(d, Digest::of(&content));
        assert_eq!(s.get(&d).unwrap(), content);
        let small = s.clone().with_max_size(1000);
        assert!(matches!(small.put_file(&src), Err(RepoError::TooLarge { size: 200_000, max: 1000 })));
        assert!(matches!(small.put(&content), Err(RepoError::TooLarge { .. })));
    }

    #[test]
    fn damaged_artifact_is_refused_and_removed() {
        let (_dir, s) = store();
        let d = s.put(b"good bytes").unwrap();
        let path = s.path_of(&d);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"evil bytes").unwrap();
        match s.verified_path(&d) {
            Err(RepoError::HashMismatch { expected, actual }) => {
                assert_eq!(expected, d);
                assert_eq!(actual, Digest::of(b"evil bytes"));
            }
            other => panic!("damaged artifact not refused: {other:?}"),
        }
        assert!(!path.exists(), "the damaged file is gone");
        assert!(matches!(s.put_expecting(&d, b"other"), Err(RepoError::HashMismatch { .. })));
        assert!(!s.contains(&d));
    }

    #[tokio::test]
    async fn cache_fetches_once_and_refuses_wrong_artifacts() {
        let (_dir, local) = store();
        let remote = MemRemote::default();
        let good = remote.put(b"#!/bin/sh\necho hi\n");
        let claimed = Digest::of(b"what was asked for");
        remote.put_as(claimed, b"something else entirely");
        let cache = Cache::new(local, remote);

        let path = cache.ensure(&good).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"#!/bin/sh\necho hi\n");
        cache.ensure(&good).await.unwrap();
        assert_eq!(cache.get(&good).await.unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(cache.remote.fetches.load(Ordering::Relaxed), 1, "fetched once");
        assert_eq!(cache.stats(), CacheStats { hits: 2, fetched: 1, refused: 0 });

        let err = cache.ensure(&claimed).await.unwrap_err();
        assert!(matches!(err, RepoError::HashMismatch { expected, .. } if expected == claimed), "{err}");
        assert!(!cache.local().contains(&claimed), "a wrong artifact is not kept");
        assert_eq!(cache.stats().refused, 1);

        let missing = Digest::of(b"nobody has this");
        assert!(matches!(cache.ensure(&missing).await, Err(RepoError::NotFound(_))));

        // A local copy damaged after the fact is dropped and fetched again.
        let p = cache.local().path_of(&good);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&p, b"tampered").unwrap();
        cache.ensure(&good).await.unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"#!/bin/sh\necho hi\n");
        assert_eq!(cache.remote.fetches.load(Ordering::Relaxed), 4);
        assert_eq!(cache.stats().refused, 2);
    }

    #[tokio::test]
    async fn a_store_serves_as_a_remote() {
        let (_d1, repo) = store();
        let (_d2, local) = store();
        let d = repo.put(b"served").unwrap();
        let cache = Cache::new(local, repo);
        assert_eq!(cache.get(&d).await.unwrap(), b"served");
    }

    proptest! {
        #[test]
        fn digest_text_round_trip(bytes in proptest::array::uniform32(any::<u8>())) {
            let d = Digest(bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
            let json = serde_json::to_string(&d).unwrap();
            prop_assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        }
    }
}
