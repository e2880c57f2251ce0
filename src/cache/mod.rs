//! A client for Nix binary caches (`http://`, `https://`, `file://`).
//!
//! It finds narinfos across several substituters in priority order (a 404 or 403 in one means
//! "ask the next") and opens NARs as blocking `Read`ers of the compressed bytes, fed from the
//! network through a small bounded channel so memory stays flat however large the NAR.

pub mod decompress;
pub mod http;
pub mod substituter;

use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::nix::cache_info::CacheInfoError;
use crate::nix::narinfo::NarInfoError;
use crate::nix::{CacheInfo, NarInfo, StorePathHash};

pub use self::decompress::NarReader;
pub use self::http::{FetchConfig, HttpClient};
pub use self::substituter::{DEFAULT_PRIORITY, Location, SubstituterUrl};

/// narinfos list every reference by name; the largest in nixpkgs are well under 1 MiB.
const NARINFO_LIMIT: usize = 4 << 20;
/// Compressed chunks buffered between the network and the unpacking thread, per NAR.
const NAR_CHANNEL_CHUNKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("invalid substituter url {url}: {why}")]
    InvalidUrl { url: String, why: String },
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("cannot reach {url}: {}", crate::error_chain(.source))]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: ::http::StatusCode,
    },
    #[error("{url} sent no data for {seconds}s")]
    Stalled { url: String, seconds: f64 },
    #[error("transfer of {url} broke off: {source}")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{url} is larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("unsupported NAR compression {name:?} (supported: none, xz, zstd, bzip2)")]
    UnsupportedCompression { name: String },
    #[error("cannot start zstd decompression: {0}")]
    Decoder(#[from] io::Error),
    #[error("{url} is not UTF-8 text")]
    NotUtf8 { url: String },
    #[error("bad nix-cache-info at {url}: {source}")]
    CacheInfo {
        url: String,
        #[source]
        source: CacheInfoError,
    },
    #[error("bad narinfo at {url}: {source}")]
    NarInfo {
        url: String,
        #[source]
        source: NarInfoError,
    },
    #[error("narinfo at {narinfo_url} has an unsafe NAR URL {nar_url:?}")]
    UnsafeNarUrl {
        narinfo_url: String,
        nar_url: String,
    },
}

impl CacheError {
    /// Whether trying again may succeed: server errors, throttling, resets and stalls.
    pub fn is_transient(&self) -> bool {
        match self {
            CacheError::Connect { .. } | CacheError::Stalled { .. } | CacheError::Body { .. } => {
                true
            }
            CacheError::Status { status, .. } => {
                status.is_server_error() || *status == ::http::StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }
}

/// Why a narinfo could not be had from one substituter.
#[derive(Debug)]
pub struct Miss {
    pub substituter: String,
    pub reason: String,
}

/// A narinfo and the cache that served it.
#[derive(Debug, Clone)]
pub struct Found {
    pub cache: CacheId,
    pub narinfo: NarInfo,
}

/// Progress of one NAR transfer, shared between the network side and the unpacking thread.
#[derive(Debug, Default)]
pub struct Transfer {
    received: AtomicU64,
    /// Why the transfer broke off, if it did: the unpacker only sees an I/O error, and this
    /// tells a retryable network failure from a bad NAR.
    failure: std::sync::Mutex<Option<CacheError>>,
}

impl Transfer {
    /// Compressed bytes received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn take_failure(&self) -> Option<CacheError> {
        self.failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    fn fail(&self, err: CacheError) -> io::Error {
        let error = io::Error::other(err.to_string());
        *self
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err);
        error
    }
}

/// Index of a substituter in the client's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheId(usize);

struct Cache {
    url: SubstituterUrl,
    /// Fetched on first use; a failed fetch is retried on the next lookup so a cache that was
    /// down when the daemon started comes back without a restart.
    info: OnceCell<CacheInfo>,
}

pub struct BinaryCacheClient {
    http: HttpClient,
    caches: Vec<Cache>,
}

impl BinaryCacheClient {
    pub fn new(urls: Vec<SubstituterUrl>, config: FetchConfig) -> Result<Self, CacheError> {
        Ok(Self {
            http: HttpClient::new(config)?,
            caches: urls
                .into_iter()
                .map(|url| Cache {
                    url,
                    info: OnceCell::new(),
                })
                .collect(),
        })
    }

    pub fn substituter(&self, id: CacheId) -> &SubstituterUrl {
        &self.caches[id.0].url
    }

    pub fn substituters(&self) -> impl Iterator<Item = &SubstituterUrl> {
        self.caches.iter().map(|c| &c.url)
    }

    pub fn fetch_config(&self) -> &FetchConfig {
        self.http.config()
    }

    async fn cache_info<'a>(&self, cache: &'a Cache) -> Result<&'a CacheInfo, CacheError> {
        cache
            .info
            .get_or_try_init(|| async {
                let (url, text) = match cache.url.location() {
                    Location::Http { base } => {
                        let url = format!("{base}/nix-cache-info");
                        let body = self.http.get_small(&url, NARINFO_LIMIT).await?;
                        (url, body)
                    }
                    Location::File { dir } => {
                        let path = dir.join("nix-cache-info");
                        (path.display().to_string(), read_optional(&path).await?)
                    }
                };
                // Nix treats a cache without nix-cache-info as one with default settings.
                let text = text.unwrap_or_else(|| Bytes::from_static(b"StoreDir: /nix/store\n"));
                let text = std::str::from_utf8(&text)
                    .map_err(|_| CacheError::NotUtf8 { url: url.clone() })?;
                let parsed = CacheInfo::parse(text)
                    .and_then(|info| info.check_store_dir().map(|()| info))
                    .map_err(|source| CacheError::CacheInfo { url, source })?;
                Ok(parsed)
            })
            .await
    }

    /// The caches in the order to ask them: by priority (lower first), then as configured.
    /// Caches whose nix-cache-info cannot be read are left out, with the reason.
    async fn ordered(&self) -> (Vec<CacheId>, Vec<Miss>) {
        let infos =
            futures_util::future::join_all(self.caches.iter().map(|c| self.cache_info(c))).await;
        let mut usable = Vec::new();
        let mut misses = Vec::new();
        for (index, (cache, info)) in self.caches.iter().zip(infos).enumerate() {
            match info {
                Ok(info) => {
                    let priority = cache
                        .url
                        .priority_override()
                        .or(info.priority())
                        .unwrap_or(DEFAULT_PRIORITY);
                    usable.push((priority, index));
                }
                Err(err) => misses.push(Miss {
                    substituter: cache.url.to_string(),
                    reason: err.to_string(),
                }),
            }
        }
        usable.sort();
        (
            usable.into_iter().map(|(_, i)| CacheId(i)).collect(),
            misses,
        )
    }

    /// Looks `hash` up in every cache in priority order and returns the first narinfo found.
    /// `Err` lists why each cache did not have it.
    pub async fn narinfo(&self, hash: &StorePathHash) -> Result<Found, Vec<Miss>> {
        let (order, mut misses) = self.ordered().await;
        for id in order {
            let cache = &self.caches[id.0];
            match self.narinfo_from(cache, hash).await {
                Ok(Some(narinfo)) => return Ok(Found { cache: id, narinfo }),
                Ok(None) => misses.push(Miss {
                    substituter: cache.url.to_string(),
                    reason: "not found".into(),
                }),
                Err(err) => {
                    // As Nix does: a broken cache is reported but does not stop the others.
                    tracing::warn!(substituter = %cache.url, %err, "narinfo lookup failed");
                    misses.push(Miss {
                        substituter: cache.url.to_string(),
                        reason: err.to_string(),
                    });
                }
            }
        }
        Err(misses)
    }

    async fn narinfo_from(
        &self,
        cache: &Cache,
        hash: &StorePathHash,
    ) -> Result<Option<NarInfo>, CacheError> {
        let (url, body) = match cache.url.location() {
            Location::Http { base } => {
                let url = format!("{base}/{hash}.narinfo");
                let body = self.http.get_small(&url, NARINFO_LIMIT).await?;
                (url, body)
            }
            Location::File { dir } => {
                let path = dir.join(format!("{hash}.narinfo"));
                (path.display().to_string(), read_optional(&path).await?)
            }
        };
        let Some(body) = body else { return Ok(None) };
        let text =
            std::str::from_utf8(&body).map_err(|_| CacheError::NotUtf8 { url: url.clone() })?;
        let narinfo = NarInfo::parse(text).map_err(|source| CacheError::NarInfo { url, source })?;
        Ok(Some(narinfo))
    }

    /// Opens the compressed NAR a narinfo points at; `transfer` follows its progress. The
    /// returned reader blocks: read it on a blocking thread.
    pub async fn open_nar(
        &self,
        found: &Found,
        transfer: Arc<Transfer>,
    ) -> Result<NarReader, CacheError> {
        let cache = &self.caches[found.cache.0];
        let nar_url = found.narinfo.url();
        let narinfo_name = format!("{}.narinfo", found.narinfo.store_path().hash());
        let safe = !nar_url.is_empty()
            && Path::new(nar_url)
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !safe {
            return Err(CacheError::UnsafeNarUrl {
                narinfo_url: format!("{}/{narinfo_name}", cache.url),
                nar_url: nar_url.to_owned(),
            });
        }
        match cache.url.location() {
            Location::Http { base } => {
                let url = format!("{base}/{nar_url}");
                let Some(mut body) = self.http.get(&url).await? else {
                    return Err(CacheError::Status {
                        url,
                        status: ::http::StatusCode::NOT_FOUND,
                    });
                };
                let (tx, rx) = tokio::sync::mpsc::channel(NAR_CHANNEL_CHUNKS);
                tokio::spawn(async move {
                    loop {
                        let item = match body.next_chunk().await {
                            Ok(Some(chunk)) => Ok(chunk),
                            Ok(None) => break,
                            Err(err) => Err(err),
                        };
                        let failed = item.is_err();
                        // The reader hung up (it failed or finished): stop downloading.
                        if tx.send(item).await.is_err() || failed {
                            break;
                        }
                    }
                });
                Ok(Box::new(ChannelReader {
                    rx,
                    current: Bytes::new(),
                    transfer,
                }))
            }
            Location::File { dir } => {
                let path = dir.join(nar_url);
                let file =
                    std::fs::File::open(&path).map_err(|source| CacheError::Io { path, source })?;
                Ok(Box::new(CountingReader {
                    inner: file,
                    transfer,
                }))
            }
        }
    }
}

async fn read_optional(path: &Path) -> Result<Option<Bytes>, CacheError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => Ok(Some(bytes.into())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CacheError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The blocking end of the download channel.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, CacheError>>,
    current: Bytes,
    transfer: Arc<Transfer>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => {
                    self.transfer
                        .received
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    self.current = chunk;
                }
                Some(Err(err)) => return Err(self.transfer.fail(err)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

struct CountingReader<R> {
    inner: R,
    transfer: Arc<Transfer>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.transfer
            .received
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}
