//! The runtime behind nix-cri (containerd or CRI-O), over its unix socket.
//!
//! Two views of one socket: a raw HTTP/2 client that forwards requests as they are (headers,
//! body frames, trailers: nothing decoded), and tonic clients for the few calls nix-cri makes
//! itself. Both connect lazily and reconnect on the next call after the runtime restarts.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use super::grpc::{self, Body};

/// The CRI's message size limit on both kubelet's and containerd's side.
pub const MAX_MESSAGE_SIZE: usize = 16 << 20;

#[derive(Clone)]
pub struct Upstream {
    socket: Arc<PathBuf>,
    client: Client<UnixConnector, Body>,
    channel: Channel,
}

impl Upstream {
    pub fn new(socket: &Path) -> Self {
        let socket = Arc::new(socket.to_owned());
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            // kubelet's own client settings: large frames, no artificial stream limit.
            .http2_initial_stream_window_size(Some(4 << 20))
            .http2_initial_connection_window_size(Some(16 << 20))
            .build(UnixConnector(socket.clone()));
        let channel = Endpoint::from_static("http://upstream.nix-cri")
            .connect_with_connector_lazy(UnixConnector(socket.clone()));
        Self {
            socket,
            client,
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
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match format!("http://upstream.nix-cri{path}").parse::<Uri>() {
            Ok(uri) => uri,
            Err(err) => {
                return grpc::status_response(Code::Internal, &format!("bad request path: {err}"));
            }
        };
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => response.map(grpc::boxed),
            Err(err) => grpc::status_response(Code::Unavailable, &self.unavailable_message(&err)),
        }
    }

    pub fn unavailable_message(&self, err: &dyn std::error::Error) -> String {
        let mut message = format!(
            "upstream runtime at {} is unavailable: {err}",
            self.socket.display()
        );
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        message
    }
}

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
