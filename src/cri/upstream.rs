//! The runtime behind nix-cri (containerd or CRI-O), over its unix socket, for the calls
//! nix-cri makes itself.
//!
//! Two views of one socket: a raw HTTP/2 client that sends requests as they are (headers,
//! body frames, trailers: nothing decoded), for the calls nix-cri answers by forwarding them
//! with or without a change, and for every call while a caller's own runtime connection is
//! down (see [`super::relay`]); and tonic clients for the few calls nix-cri makes on its own.
//! Both connect lazily and reconnect on the next call after the runtime restarts.
//!
//! The raw client is the `h2` crate's, used directly: a call is sent on the shared connection
//! from the task that serves it, and the connection's task wakes that task when the answer
//! arrives, without hyper's dispatch channel and task per request.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response, Uri};
use hyper::body::Body as _;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::grpc::{self, Body, BoxError};

/// The CRI's message size limit on both kubelet's and containerd's side.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

#[derive(Clone)]
pub struct Upstream {
    socket: Arc<PathBuf>,
    forwarder: Arc<Forwarder>,
    channel: Channel,
}

impl Upstream {
    pub fn new(socket: &Path) -> Self {
        let socket = Arc::new(socket.to_owned());
        let channel = Endpoint::from_static("http://upstream.nix-cri")
            .connect_with_connector_lazy(UnixConnector(socket.clone()));
        Self {
            forwarder: Arc::new(Forwarder {
                socket: socket.clone(),
                connection: std::sync::Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
            socket,
            channel,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn runtime(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    pub fn images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
            .max_encoding_message_size(MAX_MESSAGE_SIZE)
    }

    /// Sends `request` to the runtime as it is and returns the runtime's response as it is.
    /// If the runtime cannot be reached, the answer is UNAVAILABLE naming its socket.
    pub async fn forward(&self, request: Request<Body>) -> Response<Body> {
        match self.forwarder.forward(request).await {
            Ok(response) => response,
            Err(err) => grpc::status_response(Code::Unavailable, &self.unavailable_message(&*err)),
        }
    }

    /// UNAVAILABLE's message: the socket, the error and its causes.
    pub fn unavailable_message(&self, err: &dyn std::error::Error) -> String {
        format!(
            "upstream runtime at {} is unavailable: {}",
            self.socket.display(),
            crate::error_chain(err)
        )
    }
}

/// The forwarding connection to the runtime: one HTTP/2 connection, as kubelet keeps one,
/// opened on first use and again after it fails.
struct Forwarder {
    socket: Arc<PathBuf>,
    /// The open connection's handle, and whether its connection task has ended.
    connection: std::sync::Mutex<Option<(SendRequest<Bytes>, Arc<AtomicBool>)>>,
    /// Held while connecting, so concurrent calls after a restart open one connection.
    connecting: tokio::sync::Mutex<()>,
}

impl Forwarder {
    async fn forward(&self, request: Request<Body>) -> Result<Response<Body>, BoxError> {
        let (mut parts, body) = request.into_parts();
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = Some(http::uri::Authority::from_static("upstream.nix-cri"));
        uri.path_and_query = parts.uri.path_and_query().cloned();
        parts.uri = Uri::from_parts(uri)?;
        parts.version = http::Version::HTTP_2;
        for name in CONNECTION_HEADERS {
            parts.headers.remove(name);
        }
        let end_of_stream = body.is_end_stream();
        let mut sender = self.sender().await?;
        let (response, send_stream) =
            sender.send_request(Request::from_parts(parts, ()), end_of_stream)?;
        if !end_of_stream {
            // Unary calls: the whole body is usually here already, and goes out now. Anything
            // else (a client stream) is sent by a task of its own while the answer is awaited.
            let mut pump = Box::pin(grpc::send_body(body, send_stream));
            if futures_util::poll!(pump.as_mut()).is_pending() {
                tokio::spawn(pump);
            }
        }
        let response = response.await?;
        Ok(response.map(grpc::recv_body))
    }

    /// A ready handle on the open connection, connecting first when there is none.
    async fn sender(&self) -> Result<SendRequest<Bytes>, BoxError> {
        // A connection that failed since is replaced below.
        if let Some(sender) = self.open_sender()
            && let Ok(ready) = sender.ready().await
        {
            return Ok(ready);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(sender) = self.open_sender()
            && let Ok(ready) = sender.ready().await
        {
            return Ok(ready);
        }
        let stream = UnixStream::connect(&*self.socket).await.map_err(|err| {
            std::io::Error::new(err.kind(), format!("{}: {err}", self.socket.display()))
        })?;
        let (sender, connection) = h2::client::Builder::new()
            // kubelet's own client settings: large windows, no artificial stream limit.
            .initial_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let connection_closed = closed.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "runtime connection ended");
            }
            connection_closed.store(true, Ordering::Release);
        });
        *self.slot() = Some((sender.clone(), closed));
        Ok(sender.ready().await?)
    }

    fn open_sender(&self) -> Option<SendRequest<Bytes>> {
        let slot = self.slot();
        let (sender, closed) = slot.as_ref()?;
        (!closed.load(Ordering::Acquire)).then(|| sender.clone())
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<(SendRequest<Bytes>, Arc<AtomicBool>)>> {
        // The slot holds a handle and a flag: a panic elsewhere cannot leave it half-written.
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Hop-by-hop headers, which HTTP/2 forbids (RFC 9113 §8.2.2); `te: trailers` may stay.
const CONNECTION_HEADERS: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::HeaderName::from_static("keep-alive"),
    http::header::HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Connects to a unix socket whatever the URI says.
#[derive(Clone)]
pub struct UnixConnector(Arc<PathBuf>);

impl UnixConnector {
    pub fn new(path: &Path) -> Self {
        Self(Arc::new(path.to_owned()))
    }
}

/// A unix stream as hyper's legacy client wants its connections.
pub struct UnixConnection(TokioIo<UnixStream>);

impl Connection for UnixConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UnixConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UnixConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl tower::Service<Uri> for UnixConnector {
    type Response = UnixConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<UnixConnection, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            let stream = UnixStream::connect(&*path).await.map_err(|err| {
                std::io::Error::new(err.kind(), format!("{}: {err}", path.display()))
            })?;
            Ok(UnixConnection(TokioIo::new(stream)))
        })
    }
}
