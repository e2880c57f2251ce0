//! Contract tests with a scripted fake upstream, for what cannot be seen on real containerd:
//! the exact bytes the runtime receives, CRI-O's answers, and error statuses with details.
//! The proxy under test is the real one, in process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_cri::v1 as cri;
use nix_cri::cache::{BinaryCacheClient, FetchConfig};
use nix_cri::cri::upstream::UnixConnector;
use nix_cri::cri::{Proxy, ProxyConfig, Upstream, wire};
use nix_cri::nix::TrustedKeys;
use nix_cri::registry::NixImages;
use nix_cri::store::{Store, Substituter, SubstituterConfig};
use prost::Message;
use tokio::net::UnixListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// What the fake runtime received.
#[derive(Clone, Debug)]
struct Received {
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// A fake runtime on a unix socket: records every request and answers from a script.
struct FakeUpstream {
    socket: PathBuf,
    received: Arc<Mutex<Vec<Received>>>,
    /// Set when a `/test.Stream/Echo` call's request stream ended in a reset.
    echo_reset: Arc<std::sync::atomic::AtomicBool>,
    _dir: tempfile::TempDir,
}

/// A bidirectional stream no CRI version has: each request data frame is echoed as it
/// arrives, the end of the request ends the answer. Records a reset in `reset`.
fn echo_stream(mut body: Incoming, reset: Arc<std::sync::atomic::AtomicBool>) -> Response<Body> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data()
                        && tx.send(Ok(Frame::data(data))).await.is_err()
                    {
                        return;
                    }
                }
                Some(Err(_)) => {
                    reset.store(true, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                None => {
                    let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
                    return;
                }
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    grpc_response(StreamBody::new(stream).boxed_unsync())
}

fn frames(items: Vec<Frame<Bytes>>) -> Body {
    StreamBody::new(futures_util::stream::iter(
        items.into_iter().map(Ok::<_, BoxError>),
    ))
    .boxed_unsync()
}

fn ok_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("x-runtime-trailer", HeaderValue::from_static("kept"));
    trailers
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    response
        .headers_mut()
        .insert("x-runtime-header", HeaderValue::from_static("kept"));
    response
}

async fn script(path: &str, body: &Bytes) -> Response<Body> {
    match path {
        "/runtime.v1.ImageService/ImageFsInfo" => {
            // CRI-O answers with both file systems.
            let usage = |mountpoint: &str, used: u64| cri::FilesystemUsage {
                timestamp: 1,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: mountpoint.into(),
                }),
                used_bytes: Some(cri::UInt64Value { value: used }),
                inodes_used: Some(cri::UInt64Value { value: 10 }),
            };
            let answer = cri::ImageFsInfoResponse {
                image_filesystems: vec![usage("/", 1000)],
                container_filesystems: vec![usage("/var/lib/containers", 2000)],
            };
            grpc_response(frames(vec![
                Frame::data(wire::frame(&answer.encode_to_vec())),
                Frame::trailers(ok_trailers()),
            ]))
        }
        "/runtime.v1.RuntimeService/GetContainerEvents" => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
            tokio::spawn(async move {
                for id in ["c1", "c2", "c3"] {
                    let event = cri::ContainerEventResponse {
                        container_id: id.into(),
                        ..Default::default()
                    };
                    let _ = tx
                        .send(Ok(Frame::data(wire::frame(&event.encode_to_vec()))))
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = tx.send(Ok(Frame::trailers(ok_trailers()))).await;
            });
            let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            grpc_response(StreamBody::new(stream).boxed_unsync())
        }
        "/runtime.v1.RuntimeService/StopContainer" => {
            // A trailers-only error with rich details, as grpc-go sends it.
            // An empty body that says so: HEADERS with END_STREAM, no DATA frame.
            let mut response = grpc_response(
                http_body_util::Empty::new()
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            );
            let headers = response.headers_mut();
            headers.insert("grpc-status", HeaderValue::from_static("9"));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("container%20is%20busy"),
            );
            headers.insert(
                "grpc-status-details-bin",
                HeaderValue::from_static("CAkSBGJ1c3k"),
            );
            response
        }
        // A runtime that takes its time: for deadlines.
        "/test.Slow/Sleep" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            grpc_response(frames(vec![
                Frame::data(body.clone()),
                Frame::trailers(ok_trailers()),
            ]))
        }
        // Everything else: echo the request's message back.
        _ => grpc_response(frames(vec![
            Frame::data(body.clone()),
            Frame::trailers(ok_trailers()),
        ])),
    }
}

impl FakeUpstream {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("runtime.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let echo_reset = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log = received.clone();
        let reset = echo_reset.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = log.clone();
                let reset = reset.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let log = log.clone();
                        let reset = reset.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            if parts.uri.path() == "/test.Stream/Echo" {
                                return Ok(echo_stream(body, reset));
                            }
                            let body = body
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            let path = parts.uri.path().to_owned();
                            log.lock().unwrap().push(Received {
                                path: path.clone(),
                                headers: parts.headers,
                                body: body.clone(),
                            });
                            Ok::<_, std::convert::Infallible>(script(&path, &body).await)
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            socket,
            received,
            echo_reset,
            _dir: dir,
        }
    }

    fn last(&self, path: &str) -> Received {
        self.received
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|r| r.path == path)
            .cloned()
            .unwrap_or_else(|| panic!("the runtime never got {path}"))
    }
}

/// The real proxy in process, in front of `upstream`, with an empty store.
struct ProxyUnderTest {
    socket: PathBuf,
    store_root: PathBuf,
    proxy: Arc<Proxy>,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

async fn start_proxy(upstream: &Path) -> ProxyUnderTest {
    start_proxy_with(upstream, &[]).await
}

/// The proxy with the fixture key trusted and `caches` as substituters.
async fn start_proxy_with(upstream: &Path, caches: &[String]) -> ProxyUnderTest {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(&dir.path().join("root")).unwrap());
    let urls = caches
        .iter()
        .map(|u| nix_cri::cache::SubstituterUrl::parse(u).unwrap())
        .collect();
    let cache = Arc::new(BinaryCacheClient::new(urls, FetchConfig::default()).unwrap());
    let keys = if caches.is_empty() {
        Vec::new()
    } else {
        vec![nix_cri::nix::VerifyingKey::parse(nix_cri_e2e::fixtures().public_key()).unwrap()]
    };
    let substituter = Substituter::new(
        store.clone(),
        cache,
        SubstituterConfig::new(TrustedKeys::new(keys)),
    );
    let images = Arc::new(NixImages::new(store.clone()));
    let config = ProxyConfig {
        runtime_handler: "nix".into(),
        upstream_runtime_handler: "runc".into(),
        allow_all_sandboxes: false,
        registry_addr: "127.0.0.1:7480".parse().unwrap(),
    };
    let socket = dir.path().join("nix-cri.sock");
    let listener = nix_cri::cri::bind(&socket).unwrap();
    let proxy = Proxy::new(Upstream::new(upstream), substituter, images, config);
    tokio::spawn(proxy.clone().serve(listener, std::future::pending()));
    ProxyUnderTest {
        socket,
        store_root: dir.path().join("root"),
        proxy,
        store,
        _dir: dir,
    }
}

/// Sends a raw unary gRPC call and returns the response's headers, body and trailers.
async fn raw_call(
    socket: &Path,
    path: &str,
    message: &[u8],
    metadata: &[(&str, &str)],
) -> (HeaderMap, Bytes, Option<HeaderMap>) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Full<Bytes>>(UnixConnector::new(socket));
    let mut request = Request::post(format!("http://nix-cri{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in metadata {
        request = request.header(*name, *value);
    }
    let response = client
        .request(
            request
                .body(http_body_util::Full::new(wire::frame(message)))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (parts.headers, collected.to_bytes(), trailers)
}

/// A Version call on a new connection comes back from the fake runtime's echo, with status 0.
async fn version_is_echoed(socket: &Path) {
    let (_, body, trailers) = raw_call(
        socket,
        "/runtime.v1.RuntimeService/Version",
        b"\x0a\x02v1",
        &[],
    )
    .await;
    assert_eq!(body, wire::frame(b"\x0a\x02v1"));
    assert_eq!(trailers.unwrap().get("grpc-status").unwrap(), "0");
}

/// A message with a field number no CRI version defines, as a newer kubelet might send.
fn with_unknown_field(message: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::from(message);
    wire::put_len_field(&mut out, 4242, b"field from the future");
    wire::put_varint_field(&mut out, 4243, 7);
    out.to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_methods_and_fields_reach_the_runtime_byte_for_byte() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;

    // A method no CRI version has: forwarded, answered by the runtime, relayed.
    let payload = b"\x0a\x03abc\xa0\x1f\x01 opaque".to_vec();
    let (headers, body, trailers) = raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/FutureMethod",
        &payload,
        &[("x-kubelet-metadata", "v1"), ("grpc-timeout", "120S")],
    )
    .await;
    let got = upstream.last("/runtime.v1.RuntimeService/FutureMethod");
    assert_eq!(got.body, wire::frame(&payload));
    assert_eq!(got.headers.get("x-kubelet-metadata").unwrap(), "v1");
    assert_eq!(got.headers.get("grpc-timeout").unwrap(), "120S");
    assert_eq!(body, wire::frame(&payload));
    assert_eq!(headers.get("x-runtime-header").unwrap(), "kept");
    let trailers = trailers.unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("x-runtime-trailer").unwrap(), "kept");

    // An ordinary image's CreateContainer carrying an unknown field: nix-cri reads it (to
    // see the image) but forwards the original bytes.
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: "sandbox".into(),
        config: Some(cri::ContainerConfig {
            image: Some(cri::ImageSpec {
                image: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
                    .into(),
                user_specified_image: "docker.io/library/busybox:latest".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        sandbox_config: None,
    };
    let message = with_unknown_field(&request.encode_to_vec());
    let (_, body, _) = raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/CreateContainer",
        &message,
        &[],
    )
    .await;
    assert_eq!(
        upstream
            .last("/runtime.v1.RuntimeService/CreateContainer")
            .body,
        wire::frame(&message)
    );
    assert_eq!(body, wire::frame(&message), "the echo came back untouched");

    // A nix sandbox: the handler is replaced, the opt-in annotation added, and the unknown
    // field kept.
    let request = cri::RunPodSandboxRequest {
        config: Some(cri::PodSandboxConfig {
            hostname: "pod".into(),
            ..Default::default()
        }),
        runtime_handler: "nix".into(),
    };
    let message = with_unknown_field(&request.encode_to_vec());
    raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/RunPodSandbox",
        &message,
        &[],
    )
    .await;
    let got = upstream.last("/runtime.v1.RuntimeService/RunPodSandbox");
    let sent = wire::unframe(&got.body).unwrap();
    let decoded = cri::RunPodSandboxRequest::decode(sent).unwrap();
    assert_eq!(decoded.runtime_handler, "runc");
    let config = decoded.config.unwrap();
    assert_eq!(config.hostname, "pod");
    assert_eq!(
        config
            .annotations
            .get("nix-cri.io/runtime-handler")
            .map(String::as_str),
        Some("nix")
    );
    let unknown: Vec<u32> = wire::fields(sent)
        .filter_map(|f| f.ok())
        .map(|f| f.number)
        .filter(|n| *n > 4000)
        .collect();
    assert_eq!(unknown, vec![4242, 4243]);

    // A sandbox for another handler is not touched at all.
    let request = cri::RunPodSandboxRequest {
        config: None,
        runtime_handler: "kata".into(),
    };
    let message = with_unknown_field(&request.encode_to_vec());
    raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/RunPodSandbox",
        &message,
        &[],
    )
    .await;
    assert_eq!(
        upstream
            .last("/runtime.v1.RuntimeService/RunPodSandbox")
            .body,
        wire::frame(&message)
    );
    drop(proxy.store_root);
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_streams_and_crio_answers_are_relayed() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    let channel = tonic::transport::Endpoint::from_static("http://nix-cri")
        .connect_with_connector(UnixConnector::new(&proxy.socket))
        .await
        .unwrap();

    // The runtime's error, code, message and details, unchanged.
    let (headers, body, _) = raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/StopContainer",
        b"",
        &[],
    )
    .await;
    assert!(body.is_empty());
    assert_eq!(headers.get("grpc-status").unwrap(), "9");
    assert_eq!(
        headers.get("grpc-message").unwrap(),
        "container%20is%20busy"
    );
    assert_eq!(
        headers.get("grpc-status-details-bin").unwrap(),
        "CAkSBGJ1c3k"
    );
    let mut runtime = cri::runtime_service_client::RuntimeServiceClient::new(channel.clone());
    let status = runtime
        .stop_container(cri::StopContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert_eq!(status.message(), "container is busy");

    // A server stream arrives message by message.
    let mut events = runtime
        .get_container_events(cri::GetEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(event) = events.message().await.unwrap() {
        ids.push(event.container_id);
    }
    assert_eq!(ids, ["c1", "c2", "c3"]);

    // CRI-O's ImageFsInfo keeps its container file systems; the image file system gains
    // the store's usage when the store is on it (here it is: both are on /).
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    let info = images
        .image_fs_info(cri::ImageFsInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.container_filesystems.len(), 1);
    assert_eq!(
        info.container_filesystems[0].used_bytes.unwrap().value,
        2000
    );
    assert_eq!(info.image_filesystems.len(), 1);
    let image_fs = &info.image_filesystems[0];
    assert_eq!(image_fs.fs_id.as_ref().unwrap().mountpoint, "/");
    let same_device = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/").unwrap().dev() == std::fs::metadata(&proxy.store_root).unwrap().dev()
    };
    if same_device {
        assert!(
            image_fs.used_bytes.unwrap().value > 1000,
            "store usage added"
        );
        assert!(
            image_fs.inodes_used.unwrap().value > 10,
            "store inodes added"
        );
    }
    assert_eq!(image_fs.timestamp, 1, "the rest of the entry is kept");

    // Status gains the nix handler.
    let status = runtime
        .status(cri::StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    let handlers: Vec<_> = status
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(handlers, ["nix"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_nix_references_are_invalid_argument_and_never_forwarded() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    let channel = tonic::transport::Endpoint::from_static("http://nix-cri")
        .connect_with_connector(UnixConnector::new(&proxy.socket))
        .await
        .unwrap();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    for bad in ["nix:0/nix/store/short-x", "nix:1/abc", "nix:0/tmp/x:latest"] {
        let status = images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: bad.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{bad}");
        assert!(status.message().contains(bad), "{}", status.message());
    }
    // A 1 MiB reference is refused with a message that quotes its start only: the whole of it
    // (twice) made a 2 MB header block that clients refuse.
    let huge = format!("nix:0/nix/store/{}", "x".repeat(1 << 20));
    let status = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: huge.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("nix:0/nix/store/xxx")
            && status.message().ends_with("bytes cut)"),
        "{}",
        &status.message()[..200.min(status.message().len())]
    );
    assert!(
        status.message().len() <= 4096,
        "{} bytes",
        status.message().len()
    );
    // An absent nix image is an empty status, not an error.
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec {
                image: "nix:0/00000000000000000000000000000000-absent:latest".into(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none());
    let seen: HashMap<String, usize> =
        upstream
            .received
            .lock()
            .unwrap()
            .iter()
            .fold(HashMap::new(), |mut m, r| {
                *m.entry(r.path.clone()).or_default() += 1;
                m
            });
    assert!(
        !seen.contains_key("/runtime.v1.ImageService/PullImage"),
        "{seen:?}"
    );
    assert!(
        !seen.contains_key("/runtime.v1.ImageService/ImageStatus"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_runtime_is_unavailable_naming_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("containerd.sock");
    let proxy = start_proxy(&missing).await;
    // Not ready while the runtime is down, and /readyz says why; alive all the same.
    let metrics = nix_cri::metrics::serve("127.0.0.1:0".parse().unwrap(), proxy.proxy.clone())
        .await
        .unwrap();
    let (status, body) = nix_cri_e2e::http_get(metrics, "/readyz").unwrap();
    assert_eq!(status, 503);
    assert!(body.contains("containerd.sock"), "{body}");
    assert_eq!(nix_cri_e2e::http_get(metrics, "/healthz").unwrap().0, 200);
    let (headers, _, _) = raw_call(
        &proxy.socket,
        "/runtime.v1.RuntimeService/Version",
        b"",
        &[],
    )
    .await;
    assert_eq!(headers.get("grpc-status").unwrap(), "14");
    let message = headers
        .get("grpc-message")
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("containerd.sock"), "{message}");

    // The runtime comes (back): the next call goes through without restarting the proxy.
    let listener_dir = missing.clone();
    let upstream = tokio::spawn(async move {
        let listener = UnixListener::bind(&listener_dir).unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
            let body = request
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            Ok::<_, std::convert::Infallible>(script("/echo", &body).await)
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    version_is_echoed(&proxy.socket).await;
    upstream.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_policy_removes_unused_images_least_recently_used_first() {
    use nix_cri::cri::GcPolicy;
    use nix_cri::nix::StorePath;
    use nix_cri::store::{RootKind, RootName};

    let fx = nix_cri_e2e::fixtures();
    let upstream = FakeUpstream::start().await;
    let cache = format!("file://{}", fx.cache_dir("none").display());
    let proxy = start_proxy_with(&upstream.socket, &[cache]).await;
    let channel = tonic::transport::Endpoint::from_static("http://nix-cri")
        .connect_with_connector(UnixConnector::new(&proxy.socket))
        .await
        .unwrap();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    let mut ids = HashMap::new();
    for name in ["disjoint", "overlap", "image"] {
        let id = images
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: format!("nix:0{}", fx.closure(name)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .image_ref;
        ids.insert(name, id);
    }
    // "overlap" is in use by a container; "image" was used more recently than "disjoint".
    let overlap_top = StorePath::from_absolute_path(fx.closure("overlap")).unwrap();
    proxy
        .store
        .add_root(
            &RootName::new(RootKind::Container, "c1").unwrap(),
            &overlap_top,
        )
        .unwrap();
    let root_of = |name: &str| RootName::new(RootKind::Image, &ids[name]).unwrap();
    let old = filetime::FileTime::from_unix_time(1_000_000, 0);
    for name in ["disjoint", "overlap"] {
        let link = proxy
            .store_root
            .join("nix/var/nix/gcroots/nix-cri/images")
            .join(&ids[name]);
        filetime::set_symlink_file_times(&link, old, old).unwrap();
    }
    proxy.store.touch_root(&root_of("image")).unwrap();

    // Below the high mark: nothing happens.
    let relaxed = GcPolicy {
        high_percent: 100,
        low_percent: 99,
        max_store_bytes: None,
        min_age: Duration::ZERO,
        ..GcPolicy::default()
    };
    assert!(
        proxy
            .proxy
            .enforce_gc_policy(&relaxed)
            .await
            .unwrap()
            .is_empty()
    );
    // Over the limit, but only images older than an hour may go.
    let young = GcPolicy {
        max_store_bytes: Some(1),
        min_age: Duration::from_secs(3600),
        ..relaxed.clone()
    };
    let removed = proxy.proxy.enforce_gc_policy(&young).await.unwrap();
    assert_eq!(removed, vec![ids["disjoint"].clone()]);
    // With no minimum age the next least recently used unused image goes; the one a
    // container uses stays.
    let strict = GcPolicy {
        min_age: Duration::ZERO,
        ..young
    };
    let removed = proxy.proxy.enforce_gc_policy(&strict).await.unwrap();
    assert_eq!(removed, vec![ids["image"].clone()]);
    assert!(proxy.store.root_target(&root_of("overlap")).is_some());
    let disjoint_top = StorePath::from_absolute_path(fx.closure("disjoint")).unwrap();
    assert!(
        !proxy.store.is_valid(&disjoint_top).unwrap(),
        "its closure was collected"
    );
    assert!(proxy.store.is_valid(&overlap_top).unwrap());
    let removals = upstream
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path == "/runtime.v1.ImageService/RemoveImage")
        .count();
    assert_eq!(
        removals, 2,
        "the root images were removed from the runtime too"
    );
}

/// Opens `/test.Stream/Echo` through the proxy: the request body is fed from the returned
/// sender, the answer's frames arrive on the returned body.
async fn open_echo(
    proxy: &Path,
) -> (
    tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
    Incoming,
) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build::<_, Body>(UnixConnector::new(proxy));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let request = Request::post("http://nix-cri/test.Stream/Echo")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body.boxed_unsync())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), client.request(request))
        .await
        .expect("the answer's headers come before the request ends")
        .unwrap();
    (tx, response.into_body())
}

/// Reads data frames from `body` until `want` bytes arrived.
async fn read_echo(body: &mut Incoming, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("echoed while the request stream is still open")
            .expect("the answer goes on")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            got.extend_from_slice(&data);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread")]
async fn bidirectional_streams_flow_both_ways_and_cancellation_reaches_the_runtime() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;

    // Each message is answered before the next is sent: nothing waits for the whole request.
    // The second is larger than one flow-control window's worth of a small message.
    let (tx, mut answer) = open_echo(&proxy.socket).await;
    let first = wire::frame(b"first message");
    tx.send(Ok(Frame::data(first.clone()))).await.unwrap();
    assert_eq!(read_echo(&mut answer, first.len()).await, first);
    let large: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let second = wire::frame(&large);
    tx.send(Ok(Frame::data(second.clone()))).await.unwrap();
    assert_eq!(read_echo(&mut answer, second.len()).await, second);
    // The request's end ends the answer, with the runtime's trailers.
    drop(tx);
    let rest = answer.collect().await.unwrap();
    assert_eq!(
        rest.trailers().and_then(|t| t.get("x-runtime-trailer")),
        Some(&HeaderValue::from_static("kept"))
    );
    assert!(
        !upstream
            .echo_reset
            .load(std::sync::atomic::Ordering::SeqCst)
    );

    // A caller that goes away mid-stream: the runtime sees its stream reset.
    let (tx, mut answer) = open_echo(&proxy.socket).await;
    tx.send(Ok(Frame::data(first.clone()))).await.unwrap();
    assert_eq!(read_echo(&mut answer, first.len()).await, first);
    tx.send(Err("the caller gave up".into())).await.unwrap();
    drop(answer);
    for _ in 0..50 {
        if upstream
            .echo_reset
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the runtime's stream was not reset after the caller went away");
}

/// One caller connection carrying calls nix-cri answers and calls it only forwards, at once and
/// large: the relay decodes and re-encodes header blocks (HPACK state must stay in step although
/// answered calls' blocks never reach the runtime), takes the answered calls' DATA off the
/// connection, and adds their answers to it (flow-control windows must stay whole both ways).
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_interleaves_answered_and_forwarded_calls_of_any_size() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    // One client, so one HTTP/2 connection for every call; its encoder indexes headers. Its
    // windows are HTTP/2's smallest, so that the runtime's DATA and nix-cri's share them.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_adaptive_window(false)
        .http2_initial_stream_window_size(65_535)
        .http2_initial_connection_window_size(65_535)
        .build::<_, http_body_util::Full<Bytes>>(UnixConnector::new(&proxy.socket));
    let call = |path: &'static str, message: Vec<u8>, call_id: usize| {
        let client = client.clone();
        async move {
            let request = Request::post(format!("http://nix-cri{path}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("x-same-every-call", "indexed-once")
                .header("x-call", call_id.to_string())
                .body(http_body_util::Full::new(wire::frame(&message)))
                .unwrap();
            let response = client.request(request).await.unwrap();
            let collected = response.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().unwrap();
            assert_eq!(trailers.get("grpc-status").unwrap(), "0", "call {call_id}");
            (call_id, message, collected.to_bytes())
        }
    };
    let mut calls = Vec::new();
    for i in 0..24 {
        if i % 3 == 0 {
            // Answered here, several MB each way: ListImages with a huge filter, which the
            // fake runtime echoes back as an image list that nix-cri reads and re-frames.
            let request = cri::ListImagesRequest {
                filter: Some(cri::ImageFilter {
                    image: Some(cri::ImageSpec {
                        image: format!("{i}:{}", "l".repeat(3 << 20)),
                        ..Default::default()
                    }),
                }),
            };
            calls.push(call(
                "/runtime.v1.ImageService/ListImages",
                request.encode_to_vec(),
                i,
            ));
        } else {
            // Forwarded: echoed by the runtime, 1 MB each way, or tiny.
            let size = if i % 3 == 1 { 1 << 20 } else { 16 };
            let message = vec![b'a' + (i % 26) as u8; size];
            calls.push(call("/runtime.v1.RuntimeService/ExecSync", message, i));
        }
    }
    let answers = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("every call is answered: no stalled flow-control window");
    for (i, sent, body) in answers {
        // ListImages' echo is the request's bytes, read as an image list; with no nix images
        // in the store, nix-cri adds nothing to it.
        let message = wire::unframe(&body).unwrap();
        assert_eq!(message.len(), sent.len(), "call {i}");
        assert!(message == &sent[..], "call {i}: the answer came back whole");
    }
    // Every forwarded call reached the runtime with its own headers.
    let received = upstream.received.lock().unwrap().clone();
    let mut seen: Vec<usize> = received
        .iter()
        .filter(|r| r.path == "/runtime.v1.RuntimeService/ExecSync")
        .map(|r| {
            assert_eq!(r.headers.get("x-same-every-call").unwrap(), "indexed-once");
            r.headers
                .get("x-call")
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    seen.sort();
    let want: Vec<usize> = (0..24).filter(|i| i % 3 != 0).collect();
    assert_eq!(seen, want);
    // And the connection is still sound afterwards.
    let (_, _, body) = call(
        "/runtime.v1.RuntimeService/Version",
        b"\x0a\x02v1".to_vec(),
        99,
    )
    .await;
    assert_eq!(body, wire::frame(b"\x0a\x02v1"));
}

/// kubelet's own gRPC library as the caller, on one connection as kubelet keeps one. Unlike
/// Rust's h2, grpc-go indexes its headers in HPACK's dynamic table, grows its windows from BDP
/// pings (SETTINGS and WINDOW_UPDATEs mid-connection), and ends a call past its deadline with
/// RST_STREAM. Forwarded and answered calls, small and large, unary and streaming, share it.
#[tokio::test(flavor = "multi_thread")]
async fn kubelets_grpc_go_client_works_through_the_relay() {
    use nix_cri_e2e::{GoCall, GoResult, GrpcGoCaller};
    const VERSION: &str = "/runtime.v1.RuntimeService/Version";
    const LIST_IMAGES: &str = "/runtime.v1.ImageService/ListImages";
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    let mut kubelet = GrpcGoCaller::connect(&proxy.socket);
    let list_images = |image: String| {
        cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: Some(cri::ImageSpec {
                    image,
                    ..Default::default()
                }),
            }),
        }
        .encode_to_vec()
    };

    // Many small calls at once: forwarded, answered here (ListImages is read and re-framed,
    // a bad nix: pull is refused), and the runtime's own error.
    let version = b"\x0a\x02v1";
    let small_list = list_images("busybox".into());
    let bad_pull = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: "nix:0/nix/store/short-x".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let results = kubelet
        .round(&[
            GoCall::unary(VERSION, version, 64),
            GoCall::unary(LIST_IMAGES, &small_list, 8),
            GoCall::unary("/runtime.v1.RuntimeService/StopContainer", b"", 4),
            GoCall::unary("/runtime.v1.ImageService/PullImage", &bad_pull, 2),
        ])
        .await;
    assert!(results[0].iter().all(|r| *r == GoResult::ok(&[version])));
    assert!(
        results[1]
            .iter()
            .all(|r| *r == GoResult::ok(&[&small_list]))
    );
    for stop in &results[2] {
        // grpc-go takes the status from grpc-status-details-bin when there is one.
        assert_eq!((stop.code, stop.message.as_str()), (9, "busy"));
    }
    for pull in &results[3] {
        assert_eq!(pull.code, 3, "{pull:?}");
        assert!(pull.message.contains("nix:0/nix/store/short-x"), "{pull:?}");
    }

    // Large messages both ways, past every initial window: forwarded and answered unary
    // calls, a bidirectional stream and a server stream, at once.
    let large: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let large_list = list_images(format!("big:{}", "l".repeat(3 << 20)));
    let chunk: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    let results = kubelet
        .round(&[
            GoCall::unary("/runtime.v1.RuntimeService/ExecSync", &large, 4),
            GoCall::unary(LIST_IMAGES, &large_list, 2),
            GoCall {
                sends: 16,
                ..GoCall::unary("/test.Stream/Echo", &chunk, 2)
            },
            GoCall {
                server_stream: true,
                ..GoCall::unary("/runtime.v1.RuntimeService/GetContainerEvents", b"", 2)
            },
        ])
        .await;
    assert!(results[0].iter().all(|r| *r == GoResult::ok(&[&large])));
    assert!(
        results[1]
            .iter()
            .all(|r| *r == GoResult::ok(&[&large_list]))
    );
    let echoes = vec![&chunk[..]; 16];
    assert!(results[2].iter().all(|r| *r == GoResult::ok(&echoes)));
    let events: Vec<Vec<u8>> = ["c1", "c2", "c3"]
        .into_iter()
        .map(|id| {
            cri::ContainerEventResponse {
                container_id: id.into(),
                ..Default::default()
            }
            .encode_to_vec()
        })
        .collect();
    let events: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
    assert!(results[3].iter().all(|r| *r == GoResult::ok(&events)));

    // A deadline: grpc-go sends it as grpc-timeout and, past it, resets the stream; the
    // connection goes on serving.
    let results = kubelet
        .round(&[
            GoCall {
                timeout_ms: 300,
                ..GoCall::unary("/test.Slow/Sleep", b"late", 2)
            },
            GoCall::unary(VERSION, version, 1),
        ])
        .await;
    for late in &results[0] {
        assert_eq!(late.code, 4, "DEADLINE_EXCEEDED: {late:?}");
    }
    assert_eq!(results[1], [GoResult::ok(&[version])]);
    let results = kubelet.round(&[GoCall::unary(VERSION, version, 4)]).await;
    assert!(results[0].iter().all(|r| *r == GoResult::ok(&[version])));

    // What the runtime got: grpc-go's own headers, read back from its HPACK table and written
    // again, on every forwarded call; none of the calls answered here.
    let received = upstream.received.lock().unwrap().clone();
    let versions: Vec<_> = received.iter().filter(|r| r.path == VERSION).collect();
    assert_eq!(versions.len(), 64 + 1 + 4);
    for call in &versions {
        let header = |name: &str| call.headers.get(name).and_then(|v| v.to_str().ok());
        assert!(
            header("user-agent").is_some_and(|a| a.starts_with("grpc-go/")),
            "{call:?}"
        );
        // grpc-go ≥1.6x names the caller's codec: `application/grpc+proto`.
        assert!(
            header("content-type")
                .is_some_and(|t| t == "application/grpc" || t == "application/grpc+proto"),
            "{call:?}"
        );
        assert_eq!(header("te"), Some("trailers"));
    }
    let sleep = received
        .iter()
        .find(|r| r.path == "/test.Slow/Sleep")
        .unwrap();
    assert!(sleep.headers.contains_key("grpc-timeout"), "{sleep:?}");
    assert!(!received.iter().any(|r| r.path.ends_with("/PullImage")));
}

/// Reads frames (type, flags, stream, payload) from a raw HTTP/2 connection until it closes.
async fn frames_until_closed(stream: &mut tokio::net::UnixStream) -> Vec<(u8, u8, u32, Vec<u8>)> {
    frames_within(stream, Duration::from_secs(10)).await
}

/// Reads frames from a raw HTTP/2 connection until it closes or `wait` is over.
async fn frames_within(
    stream: &mut tokio::net::UnixStream,
    wait: Duration,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut bytes)).await;
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream_id = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        let end = (at + 9 + len).min(bytes.len());
        frames.push((
            bytes[at + 3],
            bytes[at + 4],
            stream_id,
            bytes[at + 9..end].to_vec(),
        ));
        at += 9 + len;
    }
    frames
}

/// A SETTINGS frame with `settings` (identifier, value).
fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| [&id.to_be_bytes()[..], &value.to_be_bytes()[..]].concat())
        .collect();
    raw_frame(0x4, 0, 0, &payload)
}

/// A raw HTTP/2 connection to the proxy that has sent the preface, SETTINGS with `settings`,
/// then `frames`.
async fn raw_caller(
    socket: &Path,
    settings: &[(u16, u32)],
    frames: &[u8],
) -> tokio::net::UnixStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(settings_frame(settings));
    bytes.extend_from_slice(frames);
    stream.write_all(&bytes).await.unwrap();
    stream
}

fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    frame.extend_from_slice(&[kind, flags]);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Bad HTTP/2 from a caller ends its connection with a GOAWAY that says what was wrong (RFC
/// 9113 §5.4.1), and a message over the CRI's size limit to a call nix-cri answers is refused
/// with a status that says so. The runtime and other connections go on.
#[tokio::test(flavor = "multi_thread")]
async fn bad_http2_from_a_caller_is_a_goaway_that_says_why() {
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    let cases: [(&str, Vec<u8>, u32, &str); 5] = [
        // An index into an empty dynamic table.
        (
            "bad HPACK",
            raw_frame(0x1, 0x5, 1, &[0x82, 0xbe]),
            0x9,
            "index 62",
        ),
        // Over the runtime's SETTINGS_MAX_FRAME_SIZE (16384 unless it says otherwise).
        (
            "oversize frame",
            raw_frame(0x0, 0, 1, &vec![0; 20_000]),
            0x6,
            "over the limit",
        ),
        (
            "CONTINUATION alone",
            raw_frame(0x9, 0x4, 1, &[0x82]),
            0x1,
            "CONTINUATION",
        ),
        // PINGs are answered here (RFC 9113 6.7): 8 bytes, on stream 0, or a connection error
        // (found by h2spec 6.7/3 and 6.7/4; the answer was a malformed ACK).
        ("short PING", raw_frame(0x6, 0, 0, &[0; 6]), 0x6, "PING"),
        (
            "PING on a stream",
            raw_frame(0x6, 0, 1, &[0; 8]),
            0x1,
            "PING",
        ),
    ];
    for (what, bad, code, why) in cases {
        let mut stream = raw_caller(&proxy.socket, &[], &bad).await;
        let frames = frames_until_closed(&mut stream).await;
        let goaway = frames
            .iter()
            .find(|f| f.0 == 0x7)
            .unwrap_or_else(|| panic!("{what}: no GOAWAY in {frames:?}"));
        let error = u32::from_be_bytes(goaway.3[4..8].try_into().unwrap());
        assert_eq!(error, code, "{what}");
        let debug = String::from_utf8_lossy(&goaway.3[8..]);
        assert!(debug.contains(why), "{what}: {debug}");
    }

    // ListImages is answered here: nix-cri reads the whole request, up to the CRI's limit.
    let oversize = vec![0u8; (16 << 20) + 1];
    let (headers, _, _) = raw_call(
        &proxy.socket,
        "/runtime.v1.ImageService/ListImages",
        &oversize,
        &[],
    )
    .await;
    assert_eq!(headers.get("grpc-status").unwrap(), "3");
    let message = headers.get("grpc-message").unwrap().to_str().unwrap();
    assert!(message.contains("larger than 16777216 bytes"), "{message}");

    // Nothing of that reached the runtime, and calls go on.
    version_is_echoed(&proxy.socket).await;
    assert!(
        upstream
            .received
            .lock()
            .unwrap()
            .iter()
            .all(|r| r.path == "/runtime.v1.RuntimeService/Version")
    );
}

/// Calls nix-cri answers hold a task and their request each: one connection may have 200 open
/// at once, and the next is refused with REFUSED_STREAM (not started; grpc-go retries it),
/// while the connection and its open calls go on.
#[tokio::test(flavor = "multi_thread")]
async fn answered_calls_open_at_once_are_capped_per_connection() {
    use tokio::io::AsyncWriteExt;
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    let block = list_images_block();
    // 201 requests whose bodies never end, so that none is answered.
    let requests: Vec<u8> = (0..201u32)
        .flat_map(|i| raw_frame(0x1, 0x4, 2 * i + 1, &block))
        .collect();
    let mut stream = raw_caller(&proxy.socket, &[], &requests).await;
    let frames = frames_within(&mut stream, Duration::from_secs(2)).await;
    let resets: Vec<_> = frames.iter().filter(|f| f.0 == 0x3).collect();
    assert_eq!(resets.len(), 1, "{resets:?}");
    assert_eq!(resets[0].2, 401, "the 201st call is the one refused");
    assert_eq!(resets[0].3, 7u32.to_be_bytes(), "REFUSED_STREAM");
    assert!(!frames.iter().any(|f| f.0 == 0x7), "no GOAWAY: {frames:?}");

    // An open call still completes: its (empty) message, then END_STREAM.
    let mut end = raw_frame(0x0, 0, 1, &[0, 0, 0, 0, 0]);
    end.extend(raw_frame(0x0, 0x1, 1, &[]));
    stream.write_all(&end).await.unwrap();
    let frames = frames_within(&mut stream, Duration::from_secs(2)).await;
    assert!(
        frames.iter().any(|f| f.0 == 0x1 && f.2 == 1),
        "call 1 answered: {frames:?}"
    );
}

/// The request header block of a ListImages call (answered here), in the simplest HPACK:
/// static-table :method POST and :scheme http, then literals without indexing for :path,
/// :authority and content-type (RFC 7541 §6.2.2), so it reads the same on any connection.
fn list_images_block() -> Vec<u8> {
    let path = b"/runtime.v1.ImageService/ListImages";
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend_from_slice(path);
    block.extend_from_slice(&[0x01, 0x01, b'x', 0x0f, 0x10, 16]);
    block.extend_from_slice(b"application/grpc");
    block
}

/// A caller's SETTINGS_INITIAL_WINDOW_SIZE changes the window of the streams already open
/// (RFC 9113 §6.9.2), those nix-cri answers included: an answer held back by a window of 0
/// goes out once the caller's SETTINGS open it, with no WINDOW_UPDATE for the stream.
#[tokio::test(flavor = "multi_thread")]
async fn a_callers_new_initial_window_reaches_the_answers_under_way() {
    use tokio::io::AsyncWriteExt;
    let upstream = FakeUpstream::start().await;
    let proxy = start_proxy(&upstream.socket).await;
    // SETTINGS_INITIAL_WINDOW_SIZE is setting 4.
    let mut request = raw_frame(0x1, 0x4, 1, &list_images_block());
    request.extend(raw_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    let mut stream = raw_caller(&proxy.socket, &[(4, 0)], &request).await;
    let frames = frames_within(&mut stream, Duration::from_secs(2)).await;
    assert!(
        frames.iter().any(|f| f.0 == 0x1 && f.2 == 1),
        "the answer's headers are not flow-controlled: {frames:?}"
    );
    assert!(
        !frames.iter().any(|f| f.0 == 0x0 && f.2 == 1),
        "no DATA into a window of 0: {frames:?}"
    );
    stream
        .write_all(&settings_frame(&[(4, 65_535)]))
        .await
        .unwrap();
    let frames = frames_within(&mut stream, Duration::from_secs(2)).await;
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == 0x0 && f.2 == 1)
        .flat_map(|f| f.3.clone())
        .collect();
    assert_eq!(data, [0, 0, 0, 0, 0], "the empty image list: {frames:?}");
    assert!(
        frames
            .iter()
            .any(|f| f.0 == 0x1 && f.2 == 1 && f.1 & 0x1 != 0),
        "then the trailers end the call: {frames:?}"
    );
}

/// A live Nix on the same store (here: python's sqlite3, holding the database's write lock as a
/// `nix-store` write does) makes nix-cri's commits wait up to the busy timeout, holding the
/// store. Every store query waits behind them, on a blocking thread: nix-cri's one async
/// thread keeps relaying every other call meanwhile. The real binary runs here, as its runtime
/// has one thread, which a test's runtime does not.
#[tokio::test(flavor = "multi_thread")]
async fn a_locked_store_database_stalls_no_forwarded_call() {
    let upstream = FakeUpstream::start().await;
    let fx = nix_cri_e2e::fixtures();
    let cache = nix_cri_e2e::CacheServer::start(fx.cache_dir("none"))
        .await
        .unwrap();
    let nix_cri = nix_cri_e2e::NixCriServer::start(&upstream.socket, &cache.url(), &[])
        .await
        .unwrap();
    version_is_echoed(&nix_cri.socket).await;

    const HOLD_SECS: u64 = 6;
    let db = nix_cri.root.join("nix/var/nix/db/db.sqlite");
    let mut locker = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import sqlite3, sys, time\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
                 c.execute('begin immediate')\n\
                 print('locked', flush=True)\n\
                 time.sleep({HOLD_SECS})\n\
                 c.execute('commit')\n"
            ),
        ])
        .arg(&db)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(locker.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let locked_at = std::time::Instant::now();

    // A pull's commit waits for the lock, holding the store...
    let image = format!("nix:0{}", fx.closure("main"));
    let pull = cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: image.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let socket = nix_cri.socket.clone();
    let pulled = tokio::spawn(async move {
        raw_call(&socket, "/runtime.v1.ImageService/PullImage", &pull, &[]).await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // ...an ImageStatus of a nix image waits behind it...
    let status = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec {
            image,
            ..Default::default()
        }),
        verbose: false,
    }
    .encode_to_vec();
    let socket = nix_cri.socket.clone();
    let status = tokio::spawn(async move {
        raw_call(
            &socket,
            "/runtime.v1.ImageService/ImageStatus",
            &status,
            &[],
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...while a forwarded call on another connection goes through at once.
    version_is_echoed(&nix_cri.socket).await;
    let answered_after = locked_at.elapsed();
    assert!(
        answered_after < Duration::from_secs(HOLD_SECS - 2),
        "Version waited {answered_after:?} for a store lock it does not need\n{}",
        nix_cri.log_tail()
    );
    // Both answer once the lock is gone.
    for call in [pulled, status] {
        let (headers, _, trailers) = call.await.unwrap();
        let code = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| headers.get("grpc-status"))
            .cloned();
        assert!(code.is_some(), "{headers:?} {trailers:?}");
    }
    assert!(locker.wait().unwrap().success());
}

/// A pull that fails after its closure arrived (here: the runtime is down, so the root image
/// cannot be pulled) leaves no in-progress root: nothing pins the closure, which stays valid
/// for a retry. Pull roots left by a crash are swept at start-up.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_pull_leaves_no_pull_root() {
    let fx = nix_cri_e2e::fixtures();
    let cache = nix_cri_e2e::CacheServer::start(fx.cache_dir("none"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let proxy = start_proxy_with(&dir.path().join("missing.sock"), &[cache.url()]).await;
    let channel = tonic::transport::Endpoint::from_static("http://nix-cri")
        .connect_with_connector(UnixConnector::new(&proxy.socket))
        .await
        .unwrap();
    let mut images = cri::image_service_client::ImageServiceClient::new(channel);
    let top = fx.closure("main");
    let status = images
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("nix:0{top}"),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let roots = proxy.store.roots().unwrap();
    assert!(roots.is_empty(), "{roots:?}");
    let top = nix_cri::nix::StorePath::from_absolute_path(top).unwrap();
    assert!(
        proxy.store.is_valid(&top).unwrap(),
        "the closure stays for a retry"
    );

    // A crash between a pull's start and its image root leaves a pull root behind.
    let crashed = nix_cri::store::RootName::new(nix_cri::store::RootKind::Pull, "crashed").unwrap();
    proxy.store.add_root(&crashed, &top).unwrap();
    assert_eq!(proxy.proxy.sweep_pull_roots().unwrap(), 1);
    assert!(proxy.store.roots().unwrap().is_empty());
}
