//! gRPC over HTTP/2 without decoding: bodies (h2 streams as bodies, bodies onto h2 streams),
//! unary responses, and statuses.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::SendStream;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Body as _;
use hyper::body::Frame;
use tonic::Code;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type on both sides of the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty_body() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A successful unary response: one message, then `grpc-status: 0` in the trailers.
pub fn message_response(message: &[u8]) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(super::wire::frame(message))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    let mut response = Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

/// A failed call as a trailers-only response (status in the headers, no body), as gRPC
/// servers send it.
pub fn status_response(code: Code, message: &str) -> Response<Body> {
    let message = bounded(message);
    let mut response = Response::new(empty_body());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(code as i32));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", value);
    }
    response
}

/// The most of a status message nix-cri sends (before percent-encoding). Messages quote what
/// the caller sent, and a caller's input is bounded only by the message size: a 1 MiB image
/// reference must not come back as a header block clients refuse.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// `message`, cut to [`MAX_STATUS_MESSAGE`] bytes at a character boundary, saying how much
/// was cut.
pub fn bounded(message: &str) -> std::borrow::Cow<'_, str> {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message.into();
    }
    let mut end = MAX_STATUS_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… ({} more bytes cut)",
        &message[..end],
        message.len() - end
    )
    .into()
}

/// gRPC's `grpc-message` encoding: printable ASCII except `%` as is, the rest as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The gRPC status of a response: from the trailers, or the headers of a trailers-only one.
pub fn status_of(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<Code> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// How large a message is sent without waiting for flow-control capacity: unary CRI calls
/// fit, and then go out without waiting for the connection task to open their stream first.
const SEND_WITHOUT_CAPACITY: usize = 64 << 10;

/// Sends a request body's frames (data, then any trailers) on an HTTP/2 stream to the
/// runtime. Large chunks wait for flow-control capacity, so a slow runtime holds back the
/// caller rather than filling memory.
/// If the body fails, the stream is reset; if the peer resets the stream, the body is dropped
/// (which resets the stream it comes from, if any).
pub async fn send_body(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let next = tokio::select! {
            biased;
            next = body.frame() => next,
            _ = std::future::poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let frame = match next {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => frame,
            Some(Err(err)) => {
                tracing::debug!(%err, "body failed; resetting the stream");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                if data.len() > SEND_WITHOUT_CAPACITY {
                    stream.reserve_capacity(data.len());
                    match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                }
                let end = body.is_end_stream();
                if stream.send_data(data, end).is_err() || end {
                    return;
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            let _ = stream.send_trailers(trailers);
            return;
        }
    }
}

/// An HTTP/2 stream's incoming body as a body to pass on: data frames (their flow-control capacity given
/// back as they are passed on), then trailers.
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl hyper::body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => self.data_done = true,
            }
        }
        match std::task::ready!(self.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(hyper::body::Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(err) => Poll::Ready(Some(Err(err))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// [`RecvBody`] boxed as the proxy's body type.
pub fn recv_body(recv: h2::RecvStream) -> Body {
    boxed(RecvBody {
        recv,
        data_done: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut() {
        let reference = format!("nix:0/{}", "é".repeat(600_000));
        let message = format!("bad reference {reference}: also {reference}");
        let response = status_response(Code::InvalidArgument, &message);
        let sent = response.headers()["grpc-message"].len();
        assert!(sent <= 3 * MAX_STATUS_MESSAGE + 64, "{sent} bytes");
        let cut = bounded(&message);
        assert!(cut.starts_with("bad reference nix:0/é"));
        assert!(cut.ends_with("more bytes cut)"), "{cut}");
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("100% ok ✓\n"), "100%25 ok %E2%9C%93%0A");
    }

    #[tokio::test]
    async fn unary_response_has_one_frame_and_ok_trailers() {
        let response = message_response(b"abc");
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        assert_eq!(trailers.get("grpc-status").unwrap(), "0");
        assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x03abc");
    }

    #[test]
    fn error_status_is_in_the_headers() {
        let response = status_response(Code::FailedPrecondition, "use RuntimeClass nix");
        assert_eq!(
            status_of(response.headers(), None),
            Some(Code::FailedPrecondition)
        );
        assert_eq!(
            response.headers().get("grpc-message").unwrap(),
            "use RuntimeClass nix"
        );
    }
}
