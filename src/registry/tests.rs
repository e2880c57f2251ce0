use std::collections::HashMap;

use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use oci_spec::image::ConfigBuilder;

use super::*;
use crate::image::oci::sha256_digest;

fn image(cmd: &str) -> OciImage {
    let config = ConfigBuilder::default()
        .cmd(vec![cmd.to_owned()])
        .build()
        .unwrap();
    OciImage::assemble(config, vec![Bytes::from(format!("layer of {cmd}"))], 0).unwrap()
}

struct Fetched {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Fetched {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn error_code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        json["errors"][0]["code"].as_str().unwrap().to_owned()
    }
}

async fn fetch(registry: &Registry, method: Method, path: &str) -> Fetched {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", registry.local_addr()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Fetched {
        status,
        headers,
        body,
    }
}

async fn start() -> (Registry, OciImage) {
    let pause = image("pause");
    let source = StaticImages::new()
        .with("test/pause", pause.clone())
        .with("other", image("other"));
    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), Arc::new(source))
        .await
        .unwrap();
    (registry, pause)
}

#[tokio::test]
async fn base_manifests_and_blobs() {
    let (registry, pause) = start().await;
    let base = fetch(&registry, Method::GET, "/v2/").await;
    assert_eq!(base.status, StatusCode::OK);
    assert_eq!(&base.body[..], b"{}");
    assert_eq!(
        base.header("docker-distribution-api-version"),
        "registry/2.0"
    );

    let by_digest = format!("/v2/test/pause/manifests/{}", pause.manifest_digest());
    for path in [
        "/v2/test/pause/manifests/latest",
        "/v2/test/pause/manifests/3.9",
        &by_digest,
    ] {
        let got = fetch(&registry, Method::GET, path).await;
        assert_eq!(got.status, StatusCode::OK, "{path}");
        assert_eq!(&got.body, pause.manifest());
        assert_eq!(
            got.header("content-type"),
            crate::image::oci::MANIFEST_MEDIA_TYPE
        );
        assert_eq!(got.header("docker-content-digest"), pause.manifest_digest());
        assert_eq!(
            got.header("content-length"),
            pause.manifest().len().to_string()
        );
        assert_eq!(sha256_digest(&got.body), pause.manifest_digest());

        let head = fetch(&registry, Method::HEAD, path).await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
        assert_eq!(
            head.header("content-length"),
            pause.manifest().len().to_string()
        );
        assert_eq!(
            head.header("docker-content-digest"),
            pause.manifest_digest()
        );
    }

    let blobs = [pause.id().to_owned(), pause.layers()[0].0.clone()];
    for digest in &blobs {
        let path = format!("/v2/test/pause/blobs/{digest}");
        let got = fetch(&registry, Method::GET, &path).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(Some(&got.body), pause.blob(digest).as_ref());
        assert_eq!(sha256_digest(&got.body), *digest);
        assert_eq!(got.header("docker-content-digest"), digest);
        let head = fetch(&registry, Method::HEAD, &path).await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.header("content-length"), got.body.len().to_string());
        assert!(head.body.is_empty());
    }
}

#[tokio::test]
async fn unknown_things_get_distribution_errors() {
    let (registry, pause) = start().await;
    let other = image("other");
    for (method, path, status, code) in [
        (
            Method::GET,
            "/v2/nope/manifests/latest".to_owned(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/nope/blobs/sha256:00".to_owned(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            format!("/v2/test/pause/manifests/{}", other.manifest_digest()),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            format!("/v2/test/pause/blobs/{}", other.id()),
            404,
            "BLOB_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/test/pause/tags/list".to_owned(),
            404,
            "UNSUPPORTED",
        ),
        (Method::GET, "/v1/x".to_owned(), 404, "UNSUPPORTED"),
        (
            Method::GET,
            "/v2/manifests/latest".to_owned(),
            404,
            "UNSUPPORTED",
        ),
        (
            Method::PUT,
            format!("/v2/test/pause/manifests/{}", pause.manifest_digest()),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/test/pause/blobs/uploads/".to_owned(),
            405,
            "UNSUPPORTED",
        ),
        (Method::DELETE, "/v2/".to_owned(), 405, "UNSUPPORTED"),
    ] {
        let got = fetch(&registry, method.clone(), &path).await;
        assert_eq!(got.status.as_u16(), status, "{method} {path}");
        assert_eq!(got.error_code(), code, "{method} {path}");
        assert_eq!(got.header("content-type"), "application/json");
        if status == 405 {
            assert_eq!(got.header("allow"), "GET, HEAD");
        }
    }
    let head = fetch(&registry, Method::HEAD, "/v2/nope/manifests/latest").await;
    assert_eq!(head.status, StatusCode::NOT_FOUND);
    assert!(head.body.is_empty());
}

#[tokio::test]
async fn only_loopback_and_stops_on_shutdown_and_drop() {
    let source: Arc<dyn ImageSource> = Arc::new(StaticImages::new());
    let err = Registry::start("0.0.0.0:0".parse().unwrap(), source.clone())
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("0.0.0.0:0 is not a loopback"),
        "{err}"
    );

    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), source.clone())
        .await
        .unwrap();
    let addr = registry.local_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(registry.reference("a/b", "t"), format!("{addr}/a/b:t"));
    // A kept-alive connection must not hold shutdown up.
    assert_eq!(
        fetch(&registry, Method::GET, "/v2/").await.status,
        StatusCode::OK
    );
    tokio::time::timeout(Duration::from_secs(2), registry.shutdown())
        .await
        .expect("shutdown is prompt");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), source)
        .await
        .unwrap();
    let addr = registry.local_addr();
    drop(registry);
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "the listener outlived the registry");
}

#[test]
fn nix_image_names() {
    let hash = crate::nix::StorePathHash::parse("00bgd045z0d4icpbc2yyz4gx48ak44la").unwrap();
    assert_eq!(
        nix_image_name(&hash),
        "nix-cri/00bgd045z0d4icpbc2yyz4gx48ak44la"
    );
    assert_eq!(
        nix_image_reference(&"127.0.0.1:7480".parse().unwrap(), &hash),
        "127.0.0.1:7480/nix-cri/00bgd045z0d4icpbc2yyz4gx48ak44la:root"
    );
}

/// Counts builds, to check the registry does not rebuild per request.
struct Counting {
    image: Arc<OciImage>,
    calls: std::sync::Mutex<HashMap<String, usize>>,
}

impl ImageSource for Counting {
    fn image(&self, name: &str) -> Result<Option<Arc<OciImage>>, crate::image::ImageError> {
        *self
            .calls
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default() += 1;
        Ok((name == "x").then(|| self.image.clone()))
    }
}

#[tokio::test]
async fn the_source_is_asked_once_per_request() {
    let source = Arc::new(Counting {
        image: Arc::new(image("x")),
        calls: Default::default(),
    });
    let registry = Registry::start("127.0.0.1:0".parse().unwrap(), source.clone())
        .await
        .unwrap();
    fetch(&registry, Method::GET, "/v2/x/manifests/latest").await;
    fetch(&registry, Method::GET, "/v2/").await;
    assert_eq!(source.calls.lock().unwrap()["x"], 1);
}
