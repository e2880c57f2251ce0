//! The embedded registry: a read-only OCI Distribution API over HTTP/1.1 on loopback, from
//! which the runtime pulls root images.
//!
//! ```text
//! GET        /v2/                               200 {}
//! GET|HEAD   /v2/<name>/manifests/<tag|digest>  the manifest (any tag; a digest must match)
//! GET|HEAD   /v2/<name>/blobs/<digest>          the config or a layer
//! otherwise  404 {"errors":[{"code":"NAME_UNKNOWN"|"MANIFEST_UNKNOWN"|"BLOB_UNKNOWN"|"UNSUPPORTED",…}]}
//!            405 for methods other than GET and HEAD
//! ```
//! containerd pulls from `127.0.0.1:PORT/…` and `localhost:PORT/…` over plain HTTP without
//! configuration, which is why the registry only listens on loopback.

mod source;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::image::OciImage;

pub use self::source::{
    ImageSource, NIX_IMAGE_PREFIX, NIX_IMAGE_TAG, NixImages, StaticImages, nix_image_name,
    nix_image_reference,
};

/// How long [`Registry::shutdown`] lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry address {addr} is not a loopback address")]
    NotLoopback { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running registry. Dropping it stops it; [`Registry::shutdown`] also waits.
pub struct Registry {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Registry {
    /// Listens on `addr` (a loopback address; port 0 picks one) and serves `source`.
    pub async fn start(
        addr: SocketAddr,
        source: Arc<dyn ImageSource>,
    ) -> Result<Self, RegistryError> {
        if !addr.ip().is_loopback() {
            return Err(RegistryError::NotLoopback { addr });
        }
        let bind = |source| RegistryError::Bind { addr, source };
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, source, stopped));
        tracing::debug!(addr = %local, "registry listening");
        Ok(Self {
            addr: local,
            stop,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `<addr>/<name>:<tag>`.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.addr)
    }

    /// Stops accepting, lets requests in flight finish (for up to 5 s), then returns.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // The accept loop and connections end by themselves once told.
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    source: Arc<dyn ImageSource>,
    stopped: watch::Receiver<bool>,
) {
    let mut connections = tokio::task::JoinSet::new();
    let mut stop = stopped.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(%err, "registry accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let source = source.clone();
                let stopped = stopped.clone();
                connections.spawn(serve_connection(stream, source, stopped));
            }
            _ = until_stopped(&mut stop) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        connections.abort_all();
    }
}

/// Resolves once the registry is told to stop (or dropped).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    source: Arc<dyn ImageSource>,
    mut stopped: watch::Receiver<bool>,
) {
    let service = service_fn(move |req| {
        let source = source.clone();
        async move { Ok::<_, Infallible>(handle(req, source).await) }
    });
    let connection =
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::debug!(%err, "registry connection failed");
            }
            return;
        }
        _ = until_stopped(&mut stopped) => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

type Reply = Response<Full<Bytes>>;

/// Answers one request. Public within the crate for tests.
pub(crate) async fn handle<B>(req: Request<B>, source: Arc<dyn ImageSource>) -> Reply {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut reply = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "the registry is read-only",
            head,
        );
        reply
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return reply;
    }
    let path = req.uri().path().to_owned();
    if path == "/v2/" || path == "/v2" {
        return ok(Bytes::from_static(b"{}"), "application/json", None, head);
    }
    let Some((name, kind, reference)) = route(&path) else {
        return error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "no such endpoint",
            head,
        );
    };
    let lookup = {
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || source.image(&name)).await
    };
    let image = match lookup {
        Ok(Ok(Some(image))) => image,
        Ok(Ok(None)) => {
            return error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                &format!("repository {name} is not known"),
                head,
            );
        }
        Ok(Err(err)) => {
            tracing::warn!(%name, %err, "registry cannot make the image");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                &err.to_string(),
                head,
            );
        }
        Err(err) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                &err.to_string(),
                head,
            );
        }
    };
    match kind {
        Kind::Manifest => manifest(&image, name, reference, head),
        Kind::Blob => match image.blob(reference) {
            Some(blob) => ok(blob, "application/octet-stream", Some(reference), head),
            None => error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                &format!("blob {reference} is not in {name}"),
                head,
            ),
        },
    }
}

enum Kind {
    Manifest,
    Blob,
}

/// `/v2/<name>/(manifests|blobs)/<reference>` → its parts. Names may hold `/`.
fn route(path: &str) -> Option<(&str, Kind, &str)> {
    let rest = path.strip_prefix("/v2/")?;
    let (head, reference) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    let kind = match kind {
        "manifests" => Kind::Manifest,
        "blobs" => Kind::Blob,
        _ => return None,
    };
    (!name.is_empty() && !reference.is_empty()).then_some((name, kind, reference))
}

fn manifest(image: &OciImage, name: &str, reference: &str, head: bool) -> Reply {
    if reference.contains(':') && reference != image.manifest_digest() {
        return error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            &format!("manifest {reference} is not in {name}"),
            head,
        );
    }
    ok(
        image.manifest().clone(),
        image.manifest_media_type(),
        Some(image.manifest_digest()),
        head,
    )
}

fn ok(body: Bytes, content_type: &str, digest: Option<&str>, head: bool) -> Reply {
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header("Docker-Distribution-API-Version", "registry/2.0");
    if let Some(digest) = digest {
        builder = builder.header("Docker-Content-Digest", digest);
    }
    let body = if head { Bytes::new() } else { body };
    builder
        .body(Full::new(body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, code: &str, message: &str, head: bool) -> Reply {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]});
    let body = Bytes::from(body.to_string());
    let mut reply = ok(body, "application/json", None, head);
    *reply.status_mut() = status;
    reply
}

#[cfg(test)]
mod tests;
