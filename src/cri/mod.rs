//! The CRI proxy.
//!
//! nix-cri listens on a unix socket for `runtime.v1.RuntimeService`, `runtime.v1.ImageService`
//! and its own admin API. Each caller connection is spliced to a runtime connection of its own
//! by the [`relay`], frame by frame: every call is forwarded byte for byte (body frames,
//! trailers, flow control; streaming calls and methods nix-cri has never heard of included;
//! headers re-encoded, field for field) except the few nix-cri must see:
//!
//! | call | what nix-cri does |
//! | --- | --- |
//! | PullImage, ImageStatus, RemoveImage of a `nix:` image | answers itself (PullImage also pulls the root image upstream) |
//! | ListImages, ImageFsInfo | forwards, then adds nix images / the store's usage to the answer |
//! | RunPodSandbox with the nix handler | marks the sandbox, forwards it with the runtime's handler |
//! | CreateContainer of a nix image | appends a read-only bind mount of the closure's view at `/nix/store`, roots the closure |
//! | RemoveContainer | forwards, then drops the container's root |
//! | Status | forwards, then adds the nix handler to `runtime_handlers` |
//!
//! Messages nix-cri changes are patched at the protobuf wire level (see [`wire`]), never
//! decoded and re-encoded, so fields newer than nix-cri's bindings survive.

pub mod admin;
mod error;
mod frame;
mod gc_policy;
pub mod grpc;
pub mod hpack;
mod images;
mod relay;
mod runtime;
pub mod upstream;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::net::UnixListener;
use tracing::Instrument;

use crate::registry::NixImages;
use crate::store::{Store, Substituter};

pub use self::error::CriError;
pub use self::gc_policy::GcPolicy;
use self::grpc::Body;
pub use self::upstream::Upstream;

/// Annotation nix-cri adds to the sandboxes that opted in through the RuntimeClass, so that
/// the decision survives nix-cri restarts: the runtime stores it with the sandbox.
pub const SANDBOX_ANNOTATION: &str = "nix-cri.io/runtime-handler";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {}: {source}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the proxy treats sandboxes and handlers.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The RuntimeClass handler that opts a pod in (default `nix`).
    pub runtime_handler: String,
    /// The handler the runtime gets instead (empty: the runtime's default).
    pub upstream_runtime_handler: String,
    /// Allow nix images in every sandbox, not only those that opted in.
    pub allow_all_sandboxes: bool,
    /// Where the embedded registry serves root images.
    pub registry_addr: SocketAddr,
}

pub struct Proxy {
    upstream: Upstream,
    substituter: Arc<Substituter>,
    store: Arc<Store>,
    images: Arc<NixImages>,
    config: ProxyConfig,
    /// Whether each sandbox seen opted in; filled at RunPodSandbox, else asked of the runtime.
    sandboxes: Mutex<HashMap<String, bool>>,
    /// How the runtime spells image ids, learnt from its answers (see [`images::IdForm`]).
    id_form: images::LearntIdForm,
}

impl Proxy {
    pub fn new(
        upstream: Upstream,
        substituter: Arc<Substituter>,
        images: Arc<NixImages>,
        config: ProxyConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            store: substituter.store().clone(),
            upstream,
            substituter,
            images,
            config,
            sandboxes: Mutex::new(HashMap::new()),
            id_form: images::LearntIdForm::default(),
        })
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let admin = admin::server(self.clone());
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(%err, "accept failed");
                        continue;
                    }
                },
                () = &mut shutdown => return,
            };
            let proxy = self.clone();
            let admin = admin.clone();
            tokio::spawn(relay::serve(proxy, admin, stream));
        }
    }

    /// Answers a call nix-cri handles itself (see [`answered_here`]).
    async fn handle(
        self: Arc<Self>,
        request: Request<Body>,
        admin: admin::Server,
    ) -> Response<Body> {
        let path = request.uri().path().to_owned();
        let label = method_label(&path);
        let (service, method) = service_and_method(&path);
        let started = std::time::Instant::now();
        let span = tracing::info_span!("cri", method = %method, image = tracing::field::Empty);
        let response = async {
            match intercepted(service, method) {
                Some(handler) => self.intercept(request, handler).await,
                None => admin::call(admin, request).await,
            }
        }
        .instrument(span)
        .await;
        observe(label, started, response)
    }

    /// Reads a unary call whole and hands it to `handler`, which answers it, forwards it, or
    /// forwards a patched copy.
    async fn intercept(
        self: Arc<Self>,
        request: Request<Body>,
        handler: Handler,
    ) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let body = match read_body(body).await {
            Ok((body, _)) => body,
            Err(err) => {
                return grpc::status_response(
                    tonic::Code::InvalidArgument,
                    &format!("cannot read request: {err}"),
                );
            }
        };
        let unary = Unary { parts, body };
        match handler(self, unary).await {
            Ok(response) => response,
            Err(err) => err.into_response(),
        }
    }

    /// Runs store work (SQLite, readdir, stat, hashing) on a blocking thread. The proxy has one
    /// async thread, which must keep relaying every other call meanwhile: a store query can
    /// wait up to the database's busy timeout for a lock that GC, a commit or a live Nix holds.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Proxy) -> Result<T, CriError> + Send + 'static,
    ) -> Result<T, CriError> {
        let proxy = self.clone();
        tokio::task::spawn_blocking(move || work(&proxy))
            .await
            .map_err(|e| CriError::Internal(format!("store task: {e}")))?
    }

    /// Forwards a call nix-cri read but does not change, with its original bytes.
    async fn forward_unchanged(&self, unary: Unary) -> Response<Body> {
        let body = grpc::boxed(Full::new(unary.body));
        self.upstream
            .forward(Request::from_parts(unary.parts, body))
            .await
    }

    /// Forwards `message` in place of the call's own, keeping its headers.
    async fn forward_message(&self, unary: &Unary, message: &[u8]) -> Response<Body> {
        let mut parts = unary.parts.clone();
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let body = grpc::boxed(Full::new(wire::frame(message)));
        self.upstream
            .forward(Request::from_parts(parts, body))
            .await
    }

    /// Forwards `message` and reads the answer whole so it can be patched. A failed call's
    /// response comes back as `Err`, to be returned as it is.
    async fn forward_and_read(
        &self,
        unary: &Unary,
        message: &[u8],
    ) -> Result<UnaryResponse, Response<Body>> {
        let response = self.forward_message(unary, message).await;
        let (parts, body) = response.into_parts();
        if grpc::status_of(&parts.headers, None).is_some_and(|code| code != tonic::Code::Ok) {
            return Err(Response::from_parts(parts, grpc::empty_body()));
        }
        let (body, trailers) = match read_body(body).await {
            Ok(read) => read,
            Err(err) => {
                return Err(grpc::status_response(
                    tonic::Code::Unavailable,
                    &self.upstream.unavailable_message(&*err),
                ));
            }
        };
        let ok = grpc::status_of(&parts.headers, trailers.as_ref()) == Some(tonic::Code::Ok);
        if !ok || body.is_empty() {
            return Err(rebuild(parts, body, trailers));
        }
        Ok(UnaryResponse {
            parts,
            body,
            trailers,
        })
    }
}

impl crate::metrics::Readiness for Proxy {
    /// Ready when the store answers and the runtime answers `Version` within two seconds.
    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.usage())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("store: {e}"))?;
            let mut runtime = self.upstream.runtime();
            let version = runtime.version(k8s_cri::v1::VersionRequest::default());
            match tokio::time::timeout(std::time::Duration::from_secs(2), version).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(status)) => Err(format!(
                    "runtime at {}: {}",
                    self.upstream.socket().display(),
                    status.message()
                )),
                Err(_) => Err(format!(
                    "runtime at {} did not answer within 2s",
                    self.upstream.socket().display()
                )),
            }
        })
    }

    /// The store's usage, from its database: on a blocking thread.
    fn refresh(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            let store = self.store.clone();
            if let Ok(Ok(usage)) = tokio::task::spawn_blocking(move || store.usage()).await {
                let metrics = crate::metrics::global();
                metrics.store_bytes.set(usage.nar_bytes as i64);
                metrics.store_paths.set(usage.paths as i64);
            }
        })
    }
}

/// A unary call read whole: its headers and its framed message.
pub struct Unary {
    parts: http::request::Parts,
    body: Bytes,
}

impl Unary {
    /// The call's message, decoded for reading only.
    fn decode<M: prost::Message + Default>(&self, method: &'static str) -> Result<M, CriError> {
        let message = self.message()?;
        M::decode(message).map_err(|e| CriError::BadRequest {
            method,
            why: e.to_string(),
        })
    }

    fn message(&self) -> Result<&[u8], CriError> {
        Ok(wire::unframe(&self.body)?)
    }
}

/// A successful unary answer read whole.
struct UnaryResponse {
    parts: http::response::Parts,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl UnaryResponse {
    fn message(&self) -> Result<&[u8], CriError> {
        Ok(wire::unframe(&self.body)?)
    }

    /// The same response with `message` in place of the runtime's.
    fn with_message(self, message: &[u8]) -> Response<Body> {
        let mut parts = self.parts;
        parts.headers.remove(http::header::CONTENT_LENGTH);
        rebuild(parts, wire::frame(message), self.trailers)
    }

    fn unchanged(self) -> Response<Body> {
        rebuild(self.parts, self.body, self.trailers)
    }
}

type Handler = fn(Arc<Proxy>, Unary) -> BoxFuture<'static, Result<Response<Body>, CriError>>;

/// `/service/method` split, or empty strings for a path that is not one.
fn service_and_method(path: &str) -> (&str, &str) {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""))
}

/// Whether nix-cri answers calls to `path` (its own admin API, or a call it must see) rather
/// than only forwarding them.
fn answered_here(path: &[u8]) -> bool {
    let (service, method) = service_and_method(std::str::from_utf8(path).unwrap_or(""));
    service == admin::SERVICE || intercepted(service, method).is_some()
}

/// The metrics' method label for a call. Label values come from the wire: only the CRI's and
/// our own services get their method names, so a stray client cannot grow the label set
/// without bound.
fn method_label(path: &str) -> &str {
    let (service, method) = service_and_method(path);
    if service.starts_with("runtime.v1.") || service == admin::SERVICE {
        method
    } else {
        "other"
    }
}

/// The calls nix-cri reads; everything else is forwarded untouched.
fn intercepted(service: &str, method: &str) -> Option<Handler> {
    Some(match (service, method) {
        ("runtime.v1.ImageService", "PullImage") => |p, u| p.pull_image(u).boxed(),
        ("runtime.v1.ImageService", "ImageStatus") => |p, u| p.image_status(u).boxed(),
        ("runtime.v1.ImageService", "ListImages") => |p, u| p.list_images(u).boxed(),
        ("runtime.v1.ImageService", "RemoveImage") => |p, u| p.remove_image(u).boxed(),
        ("runtime.v1.ImageService", "ImageFsInfo") => |p, u| p.image_fs_info(u).boxed(),
        ("runtime.v1.RuntimeService", "RunPodSandbox") => |p, u| p.run_pod_sandbox(u).boxed(),
        ("runtime.v1.RuntimeService", "RemovePodSandbox") => |p, u| p.remove_pod_sandbox(u).boxed(),
        ("runtime.v1.RuntimeService", "CreateContainer") => |p, u| p.create_container(u).boxed(),
        ("runtime.v1.RuntimeService", "RemoveContainer") => |p, u| p.remove_container(u).boxed(),
        ("runtime.v1.RuntimeService", "Status") => |p, u| p.status(u).boxed(),
        _ => return None,
    })
}

/// Records the call's latency to response headers and, once known, its gRPC status code (in
/// the headers of a trailers-only answer, else in the trailers at the end of the body).
fn observe(method: &str, started: std::time::Instant, response: Response<Body>) -> Response<Body> {
    observe_latency(method, started);
    if let Some(code) = grpc::status_of(response.headers(), None) {
        count_call(method, code);
        return response;
    }
    let method = method.to_owned();
    response.map(|body| {
        body.map_frame(move |frame| {
            if let Some(code) = frame.trailers_ref().and_then(|t| grpc::status_of(t, None)) {
                count_call(&method, code);
            }
            frame
        })
        .boxed_unsync()
    })
}

/// Records the time from a call's arrival to its response headers.
fn observe_latency(method: &str, started: std::time::Instant) {
    crate::metrics::global()
        .forward_duration
        .with_label_values(&[method])
        .observe(started.elapsed().as_secs_f64());
}

/// Counts a finished call by its gRPC status.
fn count_call(method: &str, code: tonic::Code) {
    crate::metrics::global()
        .cri_requests
        .with_label_values(&[method, code_label(code)])
        .inc();
}

/// A status code's metrics label: its name as tonic spells it, without formatting one per call.
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "Ok",
        Cancelled => "Cancelled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// Reads a unary body whole (at most the CRI's message size) with its trailers.
async fn read_body(mut body: Body) -> Result<(Bytes, Option<http::HeaderMap>), grpc::BoxError> {
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len() + chunk.len() > upstream::MAX_MESSAGE_SIZE + 5 {
                    return Err(format!(
                        "message larger than {} bytes",
                        upstream::MAX_MESSAGE_SIZE
                    )
                    .into());
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    Ok((data.freeze(), trailers))
}

fn rebuild(
    parts: http::response::Parts,
    body: Bytes,
    trailers: Option<http::HeaderMap>,
) -> Response<Body> {
    let mut frames: Vec<Result<hyper::body::Frame<Bytes>, grpc::BoxError>> = Vec::new();
    if !body.is_empty() {
        frames.push(Ok(hyper::body::Frame::data(body)));
    }
    if let Some(trailers) = trailers {
        frames.push(Ok(hyper::body::Frame::trailers(trailers)));
    }
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    Response::from_parts(parts, body.boxed_unsync())
}

/// Binds the proxy's socket: any stale socket file is replaced, and the socket gets mode
/// 0660 so only root and the socket's group (kubelet runs as root) can talk to it.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ServeError::Listen {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_are_tonics_names() {
        for i in 0..=16 {
            let code = tonic::Code::from_i32(i);
            assert_eq!(code_label(code), format!("{code:?}"));
        }
    }

    #[test]
    fn calls_answered_here_and_their_labels() {
        assert!(answered_here(b"/runtime.v1.ImageService/PullImage"));
        assert!(answered_here(b"/runtime.v1.RuntimeService/CreateContainer"));
        assert!(answered_here(format!("/{}/Gc", admin::SERVICE).as_bytes()));
        assert!(!answered_here(b"/runtime.v1.RuntimeService/Version"));
        assert!(!answered_here(b"/runtime.v1.ImageService"));
        assert!(!answered_here(b"\xff/x"));
        assert_eq!(
            method_label("/runtime.v1.RuntimeService/Version"),
            "Version"
        );
        assert_eq!(method_label("/some.Other/Method"), "other");
    }
}
