//! Substitution: realise a store path's closure from binary caches.
//!
//! 1. Resolve the closure: narinfo lookups run many at a time, breadth first; paths already
//!    valid stop the walk (their closure is valid by the store's invariant). Every narinfo must
//!    name the path asked for and carry a valid signature by a trusted key.
//! 2. Fetch every missing path at once, bounded by a semaphore: download → decompress → unpack
//!    → hash on a blocking thread per NAR, streaming, into a temporary tree.
//! 3. Commit each path when its references are valid: rename into place, register.
//!
//! Each missing path is one spawned task shared through `in_flight`, so concurrent pulls of
//! overlapping closures fetch every NAR once, and a pull whose caller goes away still finishes
//! what it started (another caller may be waiting for it).

// Errors here are the cold path and carry the path, substituter and cause together; one
// allocation per failure buys nothing.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::Semaphore;

use crate::cache::{self, BinaryCacheClient, CacheError, Found, Miss, Transfer};
use crate::nix::nar::{self, DirSink, NarError, NarLimits};
use crate::nix::{Compression, Sha256Digest, StorePath, StorePathHash, TrustedKeys};

use super::{PathInfo, RootName, Store, StoreError, db, fs};

/// What to realise: a full store path, or only its hash part (`nix:0/<hash>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wanted {
    Path(StorePath),
    Hash(StorePathHash),
}

impl Wanted {
    fn hash(&self) -> StorePathHash {
        match self {
            Wanted::Path(p) => p.hash(),
            Wanted::Hash(h) => *h,
        }
    }

    fn matches(&self, path: &StorePath) -> bool {
        match self {
            Wanted::Path(p) => p == path,
            Wanted::Hash(h) => &path.hash() == h,
        }
    }
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wanted::Path(p) => write!(f, "{p}"),
            Wanted::Hash(h) => write!(f, "{}/{h}", crate::nix::STORE_DIR),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubstituteError {
    #[error("no substituter has {path}: {}", describe_misses(.misses))]
    NotFound { path: String, misses: Vec<Miss> },
    #[error("narinfo from {substituter} for {asked} describes {got} instead")]
    WrongPath {
        asked: String,
        got: StorePath,
        substituter: String,
    },
    #[error(
        "{path} from {substituter} has no valid signature by a trusted key \
         (signed by: {signed_by}; trusted: {trusted})"
    )]
    Unsigned {
        path: StorePath,
        substituter: String,
        signed_by: String,
        trusted: String,
    },
    #[error("cannot fetch {path}: {source}")]
    Cache {
        path: StorePath,
        #[source]
        source: Box<CacheError>,
    },
    #[error(
        "no space left on the store's file system while unpacking {path} (writing {}): {source}",
        entry.display()
    )]
    NoSpace {
        path: StorePath,
        entry: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad NAR for {path} from {substituter} ({compression}): {source}")]
    Nar {
        path: StorePath,
        substituter: String,
        compression: String,
        #[source]
        source: NarError,
    },
    #[error("NAR for {path} from {substituter} failed to decompress ({compression}): {message}")]
    Decompress {
        path: StorePath,
        substituter: String,
        compression: String,
        message: String,
    },
    #[error("hash mismatch for {path} from {substituter}: narinfo says {expected}, NAR has {got}")]
    HashMismatch {
        path: StorePath,
        substituter: String,
        expected: Sha256Digest,
        got: Sha256Digest,
    },
    #[error(
        "size mismatch for {path} from {substituter}: narinfo says {expected} bytes, NAR has {got}"
    )]
    SizeMismatch {
        path: StorePath,
        substituter: String,
        expected: u64,
        got: u64,
    },
    #[error("cannot add {path} to the store: {source}")]
    Store {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot substitute {path}: its reference {reference} failed: {source}")]
    Reference {
        path: StorePath,
        reference: StorePath,
        #[source]
        source: Arc<SubstituteError>,
    },
    #[error("{0}")]
    Shared(Arc<SubstituteError>),
    #[error("substitution of {path} was aborted: {why}")]
    Aborted { path: String, why: String },
}

fn describe_misses(misses: &[Miss]) -> String {
    if misses.is_empty() {
        return "no substituters are configured".into();
    }
    misses
        .iter()
        .map(|m| format!("{}: {}", m.substituter, m.reason))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Clone, Debug)]
pub struct SubstituterConfig {
    pub trusted_keys: TrustedKeys,
    /// Refuse paths without a valid signature by a trusted key. Only for development may this
    /// be turned off.
    pub require_sigs: bool,
    /// NARs downloaded and unpacked at once.
    pub nar_jobs: usize,
    /// narinfo lookups in flight at once.
    pub narinfo_jobs: usize,
    /// Deepest directory nesting accepted in a NAR.
    pub max_nar_depth: usize,
}

impl SubstituterConfig {
    pub fn new(trusted_keys: TrustedKeys) -> Self {
        Self {
            trusted_keys,
            require_sigs: true,
            nar_jobs: 16,
            narinfo_jobs: 64,
            max_nar_depth: 128,
        }
    }
}

/// How many xz NARs are unpacked at once, whatever `nar_jobs` allows: two per core keep every
/// core decoding, and each xz decoder holds a dictionary of up to 64 MiB (8 MiB for
/// `xz -6`, what Nix writes). With `nar_jobs` of them at once, sixteen by default, a pull of
/// many large xz NARs came within a few MB of the 200 MB memory goal of issue 5.
fn xz_decoders() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).max(2)
}

/// One path this pull fetched (or waited for another pull to fetch).
#[derive(Debug, Clone)]
pub struct PulledPath {
    pub path: StorePath,
    pub nar_size: u64,
    /// Compressed bytes received.
    pub download_size: u64,
    pub compression: Compression,
    pub substituter: String,
    pub elapsed: Duration,
}

/// The result of realising a closure.
#[derive(Debug, Clone)]
pub struct Realised {
    pub top: StorePath,
    /// Every path of the closure.
    pub closure: Vec<StorePath>,
    /// Paths that were missing and are now valid, by this pull or one it joined.
    pub fetched: Vec<PulledPath>,
    /// How many of `fetched` another concurrent pull was already fetching.
    pub joined: usize,
    pub elapsed: Duration,
}

type PathResult = Result<Arc<PulledPath>, Arc<SubstituteError>>;
type SharedFetch = Shared<BoxFuture<'static, PathResult>>;

pub struct Substituter {
    store: Arc<Store>,
    cache: Arc<BinaryCacheClient>,
    config: SubstituterConfig,
    nar_permits: Arc<Semaphore>,
    /// xz NARs unpacked at once: see [`xz_decoders`].
    xz_permits: Arc<Semaphore>,
    in_flight: Mutex<HashMap<StorePath, SharedFetch>>,
    /// NAR downloads started (retries included), for tests and metrics.
    nars_started: AtomicU64,
    paths_started: AtomicU64,
    paths_done: AtomicU64,
    bytes_received: AtomicU64,
}

/// Counters since the substituter was made, for progress displays and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub paths_started: u64,
    pub paths_done: u64,
    /// Compressed bytes of completed paths.
    pub bytes_received: u64,
}

impl Substituter {
    pub fn new(
        store: Arc<Store>,
        cache: Arc<BinaryCacheClient>,
        config: SubstituterConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            nar_permits: Arc::new(Semaphore::new(config.nar_jobs.max(1))),
            xz_permits: Arc::new(Semaphore::new(xz_decoders())),
            store,
            cache,
            config,
            in_flight: Mutex::new(HashMap::new()),
            nars_started: AtomicU64::new(0),
            paths_started: AtomicU64::new(0),
            paths_done: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        })
    }

    pub fn progress(&self) -> Progress {
        Progress {
            paths_started: self.paths_started.load(Ordering::Relaxed),
            paths_done: self.paths_done.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn nars_started(&self) -> u64 {
        self.nars_started.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<StorePath, SharedFetch>> {
        self.in_flight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes `wanted` and its closure valid and, if `root` is given, roots it under that name
    /// before returning, so a concurrent GC cannot take it.
    pub async fn realise(
        self: &Arc<Self>,
        wanted: &Wanted,
        root: Option<&RootName>,
    ) -> Result<Realised, SubstituteError> {
        let start = Instant::now();
        let store_err = |source| SubstituteError::Store {
            path: wanted.to_string(),
            source,
        };
        let store = self.store.clone();
        let gc_lock = tokio::task::spawn_blocking(move || store.lock_gc_shared())
            .await
            .map_err(|e| aborted(wanted, e))?
            .map_err(store_err)?;

        let (top, missing) = self.resolve(wanted).await?;
        let mut waits = Vec::with_capacity(missing.len());
        let mut joined = 0;
        {
            let mut in_flight = self.in_flight();
            // References first, so each task is handed the shared fetches of its references
            // and sees their real outcome (a lookup later could find a failed fetch gone).
            for path in references_first(&missing) {
                if let Some(existing) = in_flight.get(&path) {
                    joined += 1;
                    waits.push(existing.clone());
                    continue;
                }
                // Another pull may have committed it since we resolved; it leaves the map only
                // after its commit, so checking here, under the lock, cannot miss it.
                if self.store.is_valid(&path).map_err(store_err)? {
                    continue;
                }
                let Some(found) = missing.get(&path).cloned() else {
                    continue;
                };
                let references: Vec<(StorePath, SharedFetch)> = found
                    .narinfo
                    .references()
                    .iter()
                    .filter(|r| **r != path)
                    .filter_map(|r| in_flight.get(r).map(|f| (r.clone(), f.clone())))
                    .collect();
                let this = self.clone();
                let task_path = path.clone();
                let handle = tokio::spawn(async move {
                    let result = this
                        .clone()
                        .fetch_and_commit(found, references)
                        .await
                        .map(Arc::new)
                        .map_err(Arc::new);
                    // Removed only after the commit: a later pull that finds no entry finds
                    // the path valid in the database.
                    this.in_flight().remove(&task_path);
                    result
                });
                let shared = handle
                    .map(|joined| match joined {
                        Ok(result) => result,
                        Err(err) => Err(Arc::new(SubstituteError::Aborted {
                            path: String::new(),
                            why: err.to_string(),
                        })),
                    })
                    .boxed()
                    .shared();
                in_flight.insert(path, shared.clone());
                waits.push(shared);
            }
        }
        let mut fetched = Vec::with_capacity(waits.len());
        let mut first_error = None;
        for result in futures_util::future::join_all(waits).await {
            match result {
                Ok(pulled) => fetched.push((*pulled).clone()),
                // Report a cause rather than its echo in a referrer, where there is one.
                Err(err) => match (&first_error, &*err) {
                    (None, _) | (Some(_), SubstituteError::Reference { .. }) => {
                        first_error.get_or_insert(err);
                    }
                    (Some(current), _) => {
                        if matches!(**current, SubstituteError::Reference { .. }) {
                            first_error = Some(err);
                        }
                    }
                },
            }
        }
        if let Some(err) = first_error {
            // A failed pull registers nothing: what it added is collected, unless another pull
            // rooted it meanwhile. Our shared GC lock must go first, or the collection would
            // wait for ourselves.
            drop(gc_lock);
            let added: Vec<StorePath> = fetched.into_iter().map(|p| p.path).collect();
            if !added.is_empty() {
                let store = self.store.clone();
                match tokio::task::spawn_blocking(move || store.collect_unreachable(&added)).await {
                    Ok(Ok(report)) => {
                        tracing::debug!(removed = report.dead.len(), "rolled back a failed pull")
                    }
                    Ok(Err(gc_err)) => tracing::warn!(%gc_err, "cannot roll back a failed pull"),
                    Err(join_err) => tracing::warn!(%join_err, "cannot roll back a failed pull"),
                }
            }
            return Err(unshare(err));
        }

        let store = self.store.clone();
        let root = root.cloned();
        let top_for_root = top.clone();
        let closure = tokio::task::spawn_blocking(move || {
            let closure = store.closure(std::slice::from_ref(&top_for_root))?;
            if let Some(root) = root {
                store.add_root(&root, &top_for_root)?;
            }
            drop(gc_lock);
            Ok::<_, StoreError>(closure)
        })
        .await
        .map_err(|e| aborted(wanted, e))?
        .map_err(store_err)?;
        Ok(Realised {
            top,
            closure: closure.into_iter().collect(),
            fetched,
            joined,
            elapsed: start.elapsed(),
        })
    }

    /// Finds the top path and the narinfos of every missing path of its closure.
    async fn resolve(
        &self,
        wanted: &Wanted,
    ) -> Result<(StorePath, HashMap<StorePath, Found>), SubstituteError> {
        let store_err = |source| SubstituteError::Store {
            path: wanted.to_string(),
            source,
        };
        // A path already valid needs no lookup at all: the warm pull is a database query.
        let top_valid = match wanted {
            Wanted::Path(p) => self
                .store
                .is_valid(p)
                .map_err(store_err)?
                .then(|| p.clone()),
            Wanted::Hash(h) => self.store.path_from_hash(h).map_err(store_err)?,
        };
        if let Some(top) = top_valid {
            return Ok((top, HashMap::new()));
        }

        let mut missing: HashMap<StorePath, Found> = HashMap::new();
        let mut seen: HashSet<StorePathHash> = HashSet::from([wanted.hash()]);
        let mut queue: VecDeque<Wanted> = VecDeque::from([wanted.clone()]);
        let mut lookups = FuturesUnordered::new();
        let mut top = None;
        loop {
            while lookups.len() < self.config.narinfo_jobs.max(1)
                && let Some(next) = queue.pop_front()
            {
                lookups.push(async move {
                    let result = self.cache.narinfo(&next.hash()).await;
                    (next, result)
                });
            }
            let Some((asked, result)) = lookups.next().await else {
                break;
            };
            let found = result.map_err(|misses| SubstituteError::NotFound {
                path: asked.to_string(),
                misses,
            })?;
            let path = found.narinfo.store_path().clone();
            let substituter = self.cache.substituter(found.cache).to_string();
            if !asked.matches(&path) {
                return Err(SubstituteError::WrongPath {
                    asked: asked.to_string(),
                    got: path,
                    substituter,
                });
            }
            self.check_signature(&found, &substituter)?;
            if top.is_none() {
                top = Some(path.clone());
            }
            for reference in found.narinfo.references() {
                if reference == &path || !seen.insert(reference.hash()) {
                    continue;
                }
                if !self.store.is_valid(reference).map_err(store_err)? {
                    queue.push_back(Wanted::Path(reference.clone()));
                }
            }
            missing.insert(path, found);
        }
        let top = top.ok_or_else(|| aborted(wanted, "empty closure"))?;
        Ok((top, missing))
    }

    fn check_signature(&self, found: &Found, substituter: &str) -> Result<(), SubstituteError> {
        if !self.config.require_sigs {
            return Ok(());
        }
        let narinfo = &found.narinfo;
        if self
            .config
            .trusted_keys
            .verify_any(narinfo.fingerprint().as_bytes(), narinfo.signatures())
        {
            return Ok(());
        }
        let signed_by = narinfo
            .signatures()
            .iter()
            .map(|s| s.name().to_owned())
            .collect::<Vec<_>>();
        Err(SubstituteError::Unsigned {
            path: narinfo.store_path().clone(),
            substituter: substituter.to_owned(),
            signed_by: if signed_by.is_empty() {
                "nobody".into()
            } else {
                signed_by.join(", ")
            },
            trusted: if self.config.trusted_keys.is_empty() {
                "none configured".into()
            } else {
                self.config
                    .trusted_keys
                    .keys()
                    .iter()
                    .map(|k| k.name().to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    async fn fetch_and_commit(
        self: Arc<Self>,
        found: Found,
        references: Vec<(StorePath, SharedFetch)>,
    ) -> Result<PulledPath, SubstituteError> {
        let start = Instant::now();
        let path = found.narinfo.store_path().clone();
        let substituter = self.cache.substituter(found.cache).to_string();
        self.paths_started.fetch_add(1, Ordering::Relaxed);
        let permit = self
            .nar_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| aborted(&Wanted::Path(path.clone()), e))?;
        let xz_permit = match found.narinfo.compression() {
            Compression::Xz => Some(
                self.xz_permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| aborted(&Wanted::Path(path.clone()), e))?,
            ),
            _ => None,
        };
        let (temp, download_size) = self.fetch_to_temp(&found, &substituter).await?;
        drop((permit, xz_permit));
        let temp = TempTree(Some(temp));

        // References not handed over were valid when the pull resolved its closure, and the
        // pull's shared GC lock keeps them so.
        for (reference, fetch) in references {
            fetch.await.map_err(|source| SubstituteError::Reference {
                path: path.clone(),
                reference,
                source,
            })?;
        }

        let info = PathInfo {
            path: path.clone(),
            nar_hash: *found.narinfo.nar_hash(),
            nar_size: found.narinfo.nar_size(),
            references: found.narinfo.references().iter().cloned().collect(),
            deriver: found.narinfo.deriver().cloned(),
            signatures: found.narinfo.signatures().to_vec(),
            ca: found.narinfo.ca().map(str::to_owned),
            registration_time: db::now(),
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut temp = temp;
            let dir = temp.0.take().ok_or_else(|| StoreError::NotValid {
                path: info.path.clone(),
            })?;
            let result = store.commit(&dir, &info);
            if result.is_err() {
                let _ = fs::remove_tree(&dir);
            }
            result
        })
        .await
        .map_err(|e| aborted(&Wanted::Path(path.clone()), e))?
        .map_err(|source| SubstituteError::Store {
            path: path.to_string(),
            source,
        })?;
        tracing::debug!(%path, nar_size = found.narinfo.nar_size(), "substituted");
        self.paths_done.fetch_add(1, Ordering::Relaxed);
        let metrics = crate::metrics::global();
        metrics.paths_substituted.inc();
        metrics
            .fetched_bytes
            .with_label_values(&[
                self.cache.substituter(found.cache).label(),
                found.narinfo.compression().as_str(),
            ])
            .inc_by(download_size);
        self.bytes_received
            .fetch_add(download_size, Ordering::Relaxed);
        Ok(PulledPath {
            path,
            nar_size: found.narinfo.nar_size(),
            download_size,
            compression: found.narinfo.compression().clone(),
            substituter,
            elapsed: start.elapsed(),
        })
    }

    /// Downloads and unpacks one NAR into a temporary tree, retrying transfers that break off.
    async fn fetch_to_temp(
        &self,
        found: &Found,
        substituter: &str,
    ) -> Result<(std::path::PathBuf, u64), SubstituteError> {
        let path = found.narinfo.store_path().clone();
        let fetch = self.cache.fetch_config().clone();
        let mut failures = 0;
        loop {
            self.nars_started.fetch_add(1, Ordering::Relaxed);
            let transfer = Arc::new(Transfer::default());
            let reader = self
                .cache
                .open_nar(found, transfer.clone())
                .await
                .map_err(|source| SubstituteError::Cache {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            let temp = self.store.temp_path(&path);
            let job = UnpackJob {
                narinfo_path: path.clone(),
                substituter: substituter.to_owned(),
                compression: found.narinfo.compression().clone(),
                nar_hash: *found.narinfo.nar_hash(),
                nar_size: found.narinfo.nar_size(),
                max_depth: self.config.max_nar_depth,
                temp: temp.clone(),
            };
            let outcome = tokio::task::spawn_blocking(move || job.run(reader))
                .await
                .map_err(|e| aborted(&Wanted::Path(path.clone()), e))
                .and_then(|r| r);
            match outcome {
                Ok(()) => return Ok((temp, transfer.received())),
                Err(err) => {
                    let _ = tokio::task::spawn_blocking({
                        let temp = temp.clone();
                        move || fs::remove_tree(&temp)
                    })
                    .await;
                    // A transfer that broke off explains whatever the unpacker then saw.
                    let Some(transport) = transfer.take_failure() else {
                        return Err(err);
                    };
                    if transport.is_transient() && failures < fetch.max_retries {
                        failures += 1;
                        tracing::debug!(%path, %transport, failures, "retrying NAR download");
                        tokio::time::sleep(fetch.backoff(failures)).await;
                        continue;
                    }
                    return Err(SubstituteError::Cache {
                        path,
                        source: Box::new(transport),
                    });
                }
            }
        }
    }
}

/// The missing paths ordered so that every path comes after its missing references.
fn references_first(missing: &HashMap<StorePath, Found>) -> Vec<StorePath> {
    fn visit(
        path: &StorePath,
        missing: &HashMap<StorePath, Found>,
        done: &mut HashSet<StorePath>,
        order: &mut Vec<StorePath>,
    ) {
        if !done.insert(path.clone()) {
            return;
        }
        if let Some(found) = missing.get(path) {
            for reference in found.narinfo.references() {
                if reference != path && missing.contains_key(reference) {
                    visit(reference, missing, done, order);
                }
            }
            order.push(path.clone());
        }
    }
    let mut done = HashSet::new();
    let mut order = Vec::with_capacity(missing.len());
    let mut roots: Vec<&StorePath> = missing.keys().collect();
    roots.sort();
    for path in roots {
        visit(path, missing, &mut done, &mut order);
    }
    order
}

/// The blocking part of fetching one NAR.
struct UnpackJob {
    narinfo_path: StorePath,
    substituter: String,
    compression: Compression,
    nar_hash: Sha256Digest,
    nar_size: u64,
    max_depth: usize,
    temp: std::path::PathBuf,
}

impl UnpackJob {
    fn run(self, compressed: cache::NarReader) -> Result<(), SubstituteError> {
        let path = &self.narinfo_path;
        let decoded =
            cache::decompress::decoder(&self.compression, compressed).map_err(|source| {
                SubstituteError::Cache {
                    path: path.clone(),
                    source: Box::new(source),
                }
            })?;
        let limits = NarLimits {
            max_size: self.nar_size,
            max_depth: self.max_depth,
        };
        // Files leave the sink in their store form; only directories remain to canonicalise.
        let mut sink = DirSink::for_store(&self.temp);
        let summary = nar::unpack(decoded, &mut sink, &limits).map_err(|source| match source {
            NarError::Source { ref source, .. } => SubstituteError::Decompress {
                path: path.clone(),
                substituter: self.substituter.clone(),
                compression: self.compression.as_str().to_owned(),
                message: source.to_string(),
            },
            // The NAR is fine; the disk is full. Saying "bad NAR" sends users to the cache.
            NarError::Io {
                path: entry,
                source,
            } if source.kind() == std::io::ErrorKind::StorageFull => SubstituteError::NoSpace {
                path: path.clone(),
                entry,
                source,
            },
            source => SubstituteError::Nar {
                path: path.clone(),
                substituter: self.substituter.clone(),
                compression: self.compression.as_str().to_owned(),
                source,
            },
        })?;
        if summary.nar_size != self.nar_size {
            return Err(SubstituteError::SizeMismatch {
                path: path.clone(),
                substituter: self.substituter,
                expected: self.nar_size,
                got: summary.nar_size,
            });
        }
        if summary.nar_hash != self.nar_hash {
            return Err(SubstituteError::HashMismatch {
                path: path.clone(),
                substituter: self.substituter,
                expected: self.nar_hash,
                got: summary.nar_hash,
            });
        }
        fs::canonicalise_dirs(&self.temp).map_err(|source| SubstituteError::Store {
            path: path.to_string(),
            source: StoreError::Io {
                path: self.temp.clone(),
                source,
            },
        })
    }
}

/// Removes a temporary tree unless it was handed on.
struct TempTree(Option<std::path::PathBuf>);

impl Drop for TempTree {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_tree(&dir);
        }
    }
}

fn aborted(wanted: &impl fmt::Display, why: impl fmt::Display) -> SubstituteError {
    SubstituteError::Aborted {
        path: wanted.to_string(),
        why: why.to_string(),
    }
}

/// Returns the error itself when this was its only holder, else a shared wrapper.
fn unshare(err: Arc<SubstituteError>) -> SubstituteError {
    Arc::try_unwrap(err).unwrap_or_else(SubstituteError::Shared)
}

impl From<StorePath> for Wanted {
    fn from(path: StorePath) -> Self {
        Wanted::Path(path)
    }
}
