//! Prometheus metrics (`nix_cri_*`) and the `/metrics`, `/healthz`, `/readyz` endpoints.
//!
//! One process-wide registry: the proxy, the substituter and the store record into it
//! wherever the event happens, so no handle has to be threaded through every layer.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub pulls: IntCounterVec,
    pub pull_duration: Histogram,
    pub fetched_bytes: IntCounterVec,
    pub paths_substituted: IntCounter,
    pub store_bytes: IntGauge,
    pub store_paths: IntGauge,
    pub gc_runs: IntCounter,
    pub gc_freed_bytes: IntCounter,
    pub cri_requests: IntCounterVec,
    pub forward_duration: HistogramVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let counter_vec =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
    let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
        let metric = IntCounter::new(name, help)?;
        registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    };
    let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
        let metric = IntGauge::new(name, help)?;
        registry.register(Box::new(metric.clone()))?;
        Ok(metric)
    };
    let pull_duration = Histogram::with_opts(
        HistogramOpts::new(
            "nix_cri_pull_duration_seconds",
            "PullImage of nix images, whole",
        )
        .buckets(vec![
            0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ]),
    )?;
    registry.register(Box::new(pull_duration.clone()))?;
    let forward_duration = HistogramVec::new(
        HistogramOpts::new(
            "nix_cri_forward_duration_seconds",
            "Time from a CRI call's arrival to the runtime's response headers, by method",
        )
        .buckets(vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
        ]),
        &["method"],
    )?;
    registry.register(Box::new(forward_duration.clone()))?;
    Ok(Metrics {
        pulls: counter_vec(
            "nix_cri_pulls_total",
            "PullImage of nix images, by result",
            &["result"],
        )?,
        pull_duration,
        fetched_bytes: counter_vec(
            "nix_cri_fetched_bytes_total",
            "Compressed NAR bytes downloaded, by substituter and compression",
            &["substituter", "compression"],
        )?,
        paths_substituted: counter("nix_cri_paths_substituted_total", "Store paths substituted")?,
        store_bytes: gauge(
            "nix_cri_store_bytes",
            "NAR bytes of the valid paths in the store",
        )?,
        store_paths: gauge("nix_cri_store_paths", "Valid paths in the store")?,
        gc_runs: counter("nix_cri_gc_runs_total", "Garbage collections run")?,
        gc_freed_bytes: counter(
            "nix_cri_gc_freed_bytes_total",
            "Disk bytes freed by garbage collection",
        )?,
        cri_requests: counter_vec(
            "nix_cri_cri_requests_total",
            "CRI calls answered, by method and gRPC status code",
            &["method", "code"],
        )?,
        forward_duration,
        registry,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| match build() {
    Ok(metrics) => metrics,
    // Only a programming error (a duplicate or malformed name) gets here; tests catch it.
    Err(err) => panic!("metric definitions are invalid: {err}"),
});

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// The text exposition format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%err, "cannot encode metrics");
        }
        out
    }
}

/// What `/readyz` asks: is the node ready to serve pods?
pub trait Readiness: Send + Sync + 'static {
    /// `Err` says why not.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
    /// Refreshes gauges that are read rather than counted (store size) before a scrape.
    fn refresh(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async {})
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, readiness: Arc<dyn Readiness>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: http::Request<hyper::body::Incoming>| {
                        let readiness = readiness.clone();
                        async move {
                            Ok::<_, Infallible>(answer(request.uri().path(), &*readiness).await)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

async fn answer(path: &str, readiness: &dyn Readiness) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => {
            readiness.refresh().await;
            (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                global().render(),
            )
        }
        "/healthz" => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => match readiness.check().await {
            Ok(()) => (StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n").into_bytes(),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_name() {
        let metrics = global();
        metrics.pulls.with_label_values(&["success"]).inc();
        metrics
            .cri_requests
            .with_label_values(&["Version", "Ok"])
            .inc();
        metrics
            .fetched_bytes
            .with_label_values(&["http://cache", "xz"])
            .inc_by(10);
        metrics
            .forward_duration
            .with_label_values(&["Version"])
            .observe(0.001);
        let text = String::from_utf8(metrics.render()).unwrap();
        for name in [
            "nix_cri_pulls_total{result=\"success\"}",
            "nix_cri_pull_duration_seconds",
            "nix_cri_fetched_bytes_total",
            "nix_cri_paths_substituted_total",
            "nix_cri_store_bytes",
            "nix_cri_store_paths",
            "nix_cri_gc_runs_total",
            "nix_cri_gc_freed_bytes_total",
            "nix_cri_cri_requests_total{code=\"Ok\",method=\"Version\"}",
            "nix_cri_forward_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
