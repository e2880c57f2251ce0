//! The HTTP(S) side of the binary-cache client: one pooled hyper client (HTTP/1.1 keep-alive, and
//! HTTP/2 where the server offers it through ALPN), with a connect timeout, a stall timeout on
//! every wait for bytes, and bounded retries with exponential backoff.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::CacheError;

/// Timeouts and retry policy for fetching from binary caches.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// How long a TCP (and TLS) connect may take.
    pub connect_timeout: Duration,
    /// How long we wait for the next bytes (response headers or body data) before giving up on a
    /// transfer. A stalled transfer is retried like a reset connection.
    pub stall_timeout: Duration,
    /// How many times a failed request is retried (5xx, 429, resets, stalls).
    pub max_retries: u32,
    /// The first retry waits this long; each further retry doubles it.
    pub retry_base_delay: Duration,
    /// Idle pooled connections kept per cache host.
    pub max_idle_per_host: usize,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            max_retries: 3,
            retry_base_delay: Duration::from_millis(250),
            max_idle_per_host: 64,
        }
    }
}

impl FetchConfig {
    /// The wait before retry number `attempt` (1-based), capped so a long outage still fails in
    /// reasonable time.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(6);
        (self.retry_base_delay * factor).min(Duration::from_secs(10))
    }
}

#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    config: FetchConfig,
}

/// A response body read chunk by chunk, each wait bounded by the stall timeout.
pub struct BodyStream {
    url: String,
    body: Incoming,
    stall_timeout: Duration,
}

impl HttpClient {
    pub fn new(config: FetchConfig) -> Result<Self, CacheError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        // Native roots first, as nodes with an internal CA expect; a host with no CA bundle
        // at all still reaches public caches through the built-in Mozilla roots.
        let builder = match hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider.clone())
        {
            Ok(builder) => builder,
            Err(err) => {
                tracing::debug!(%err, "no native CA roots, using the built-in ones");
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_provider_and_webpki_roots(provider)
                    .map_err(|e| CacheError::Tls(e.to_string()))?
            }
        };
        let https = builder
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_idle_per_host)
            .build(https);
        Ok(Self { client, config })
    }

    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// One GET without retries. `Ok(None)` when the cache says it does not have the file
    /// (404, or 403 as S3 answers for missing keys).
    pub async fn get_once(&self, url: &str) -> Result<Option<Response<Incoming>>, CacheError> {
        let uri: http::Uri = url.parse().map_err(|e| CacheError::InvalidUrl {
            url: url.to_owned(),
            why: format!("{e}"),
        })?;
        let request = Request::get(uri)
            .header(
                http::header::USER_AGENT,
                concat!("nix-cri/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::new())
            .map_err(|e| CacheError::InvalidUrl {
                url: url.to_owned(),
                why: e.to_string(),
            })?;
        let response =
            tokio::time::timeout(self.config.stall_timeout, self.client.request(request))
                .await
                .map_err(|_| CacheError::Stalled {
                    url: url.to_owned(),
                    seconds: self.config.stall_timeout.as_secs_f64(),
                })?
                .map_err(|source| CacheError::Connect {
                    url: url.to_owned(),
                    source,
                })?;
        match response.status() {
            StatusCode::OK => Ok(Some(response)),
            StatusCode::NOT_FOUND | StatusCode::FORBIDDEN => Ok(None),
            status => Err(CacheError::Status {
                url: url.to_owned(),
                status,
            }),
        }
    }

    /// GET with retries, returning the body as a stream.
    pub async fn get(&self, url: &str) -> Result<Option<BodyStream>, CacheError> {
        self.retrying(url, || async {
            Ok(self.get_once(url).await?.map(|response| BodyStream {
                url: url.to_owned(),
                body: response.into_body(),
                stall_timeout: self.config.stall_timeout,
            }))
        })
        .await
    }

    /// GET with retries of a small file read whole (narinfo, nix-cache-info); a body over
    /// `limit` bytes is refused rather than buffered.
    pub async fn get_small(&self, url: &str, limit: usize) -> Result<Option<Bytes>, CacheError> {
        self.retrying(url, || async {
            let Some(response) = self.get_once(url).await? else {
                return Ok(None);
            };
            let mut body = BodyStream {
                url: url.to_owned(),
                body: response.into_body(),
                stall_timeout: self.config.stall_timeout,
            };
            let mut buf = BytesMut::new();
            while let Some(chunk) = body.next_chunk().await? {
                if buf.len() + chunk.len() > limit {
                    return Err(CacheError::TooLarge {
                        url: url.to_owned(),
                        limit,
                    });
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(Some(buf.freeze()))
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails with an error that retrying cannot fix, or the
    /// retry budget is spent.
    pub async fn retrying<T, F, Fut>(&self, url: &str, mut attempt: F) -> Result<T, CacheError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, CacheError>>,
    {
        let mut failures = 0;
        loop {
            match attempt().await {
                Ok(value) => return Ok(value),
                Err(err) if err.is_transient() && failures < self.config.max_retries => {
                    failures += 1;
                    let delay = self.config.backoff(failures);
                    tracing::debug!(url, %err, failures, ?delay, "retrying");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

impl BodyStream {
    /// The next chunk of the body, `None` at its end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, CacheError> {
        loop {
            let frame = tokio::time::timeout(self.stall_timeout, self.body.frame())
                .await
                .map_err(|_| CacheError::Stalled {
                    url: self.url.clone(),
                    seconds: self.stall_timeout.as_secs_f64(),
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(CacheError::Body {
                        url: self.url.clone(),
                        source,
                    });
                }
                Some(Ok(frame)) => {
                    // Trailers carry nothing we use; skip them and empty data frames.
                    if let Ok(data) = frame.into_data()
                        && !data.is_empty()
                    {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let config = FetchConfig {
            retry_base_delay: Duration::from_millis(100),
            ..FetchConfig::default()
        };
        assert_eq!(config.backoff(1), Duration::from_millis(100));
        assert_eq!(config.backoff(2), Duration::from_millis(200));
        assert_eq!(config.backoff(3), Duration::from_millis(400));
        let slow = FetchConfig {
            retry_base_delay: Duration::from_secs(1),
            ..config
        };
        assert_eq!(slow.backoff(4), Duration::from_secs(8));
        assert_eq!(slow.backoff(5), Duration::from_secs(10));
        assert_eq!(slow.backoff(u32::MAX), Duration::from_secs(10));
    }
}
