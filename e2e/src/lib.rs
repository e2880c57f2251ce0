//! Harness for nix-cri's end-to-end tests: real Nix fixtures, a loopback binary-cache server
//! that counts requests and can inject faults, and helpers to run real Nix and the nix-cri
//! binary.
//!
//! The tests need Nix 2.8 (`nix-bin`) and the fixture caches; `hack/test` installs and builds
//! everything. Run alone, a test that finds them missing fails with a message saying so: it
//! never passes by skipping.

pub mod containerd;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The fixture closures and caches (see hack/fixtures/README.md).
pub struct Fixtures {
    pub dir: PathBuf,
    pub manifest: Value,
}

impl Fixtures {
    pub fn str_at(&self, pointer: &str) -> &str {
        self.manifest
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("fixture manifest has no {pointer}"))
    }
    pub fn path(&self, key: &str) -> &str {
        self.str_at(&format!("/paths/{key}"))
    }
    pub fn closure(&self, key: &str) -> &str {
        self.str_at(&format!("/closures/{key}"))
    }
    pub fn cache_dir(&self, compression: &str) -> PathBuf {
        PathBuf::from(self.str_at(&format!("/caches/{compression}")))
    }
    pub fn public_key(&self) -> &str {
        self.str_at("/public_key")
    }
    pub fn untrusted_public_key(&self) -> &str {
        self.str_at("/untrusted_public_key")
    }
    pub fn secret_key_file(&self) -> &str {
        self.str_at("/secret_key_file")
    }
    pub fn untrusted_secret_key_file(&self) -> &str {
        self.str_at("/untrusted_secret_key_file")
    }
}

/// Builds the fixtures once per test process (the build script is idempotent and takes a file
/// lock, so concurrent test binaries share one build).
pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = std::env::var_os("NIX_CRI_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/e2e-fixtures"));
        let script = workspace().join("hack/fixtures/build.sh");
        require_tool("nix-store");
        std::fs::create_dir_all(&dir).expect("create the fixture dir");
        let lock = std::fs::File::create(dir.with_extension("lock")).expect("fixture lock");
        lock.lock().expect("lock fixtures");
        let output = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("run hack/fixtures/build.sh");
        assert!(
            output.status.success(),
            "hack/fixtures/build.sh failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let manifest = std::fs::read(dir.join("manifest.json")).expect("fixture manifest");
        Fixtures {
            manifest: serde_json::from_slice(&manifest).expect("fixture manifest is JSON"),
            dir,
        }
    })
}

/// Panics with a clear instruction when a tool the test needs is missing.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run hack/setup (or hack/test), which installs it"
    );
}

/// The nix-cri binary. Cargo builds a package's binaries only for that package's own tests, so
/// the harness builds it once per test process: a test never runs a stale binary.
/// `NIX_CRI_BIN` names a prebuilt one instead.
pub fn nix_cri_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("NIX_CRI_BIN") {
            return PathBuf::from(bin);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "nix-cri-cmd", "--bin", "nix-cri"])
            .current_dir(workspace())
            .status()
            .expect("run cargo build for the nix-cri binary");
        assert!(status.success(), "cargo build -p nix-cri-cmd failed");
        workspace().join("target/debug/nix-cri")
    })
    .clone()
}

/// `e2e/grpc-go`'s `cri-caller`: CRI calls made with grpc-go, the gRPC library kubelet uses,
/// dialled as kubelet dials. Built once per test process with the machine's Go, in module
/// mode: `e2e/grpc-go/go.mod` pins grpc-go (the same version as hack/versions).
pub fn grpc_go_caller() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let go = Path::new(GO);
        assert!(
            go.exists(),
            "{GO} is missing: nix-cri's machines carry Go 1.26 at /usr/local/go"
        );
        let out = workspace().join("target/grpc-go");
        std::fs::create_dir_all(&out).expect("create target/grpc-go");
        let bin = out.join("cri-caller");
        run(Command::new(go)
            .args(["build", "-mod=readonly", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(workspace().join("e2e/grpc-go"))
            .env("GOFLAGS", "-buildvcs=false"))
        .expect("build e2e/grpc-go (its modules come from the Go module proxy)");
        bin
    })
    .clone()
}

/// The machine's Go (Debian's golang-go 1.19 is too old for current grpc-go).
const GO: &str = "/usr/local/go/bin/go";

/// One call of a [`GrpcGoCaller`] round, made `times` times at once. Sent to `cri-caller` as
/// JSON, the request in hex.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GoCall {
    pub method: String,
    #[serde(serialize_with = "hex_string")]
    pub request: Vec<u8>,
    pub times: usize,
    /// A bidirectional stream that sends `request` this many times, when not 0.
    pub sends: usize,
    pub server_stream: bool,
    /// The call's deadline, which grpc-go sends as `grpc-timeout`; none when 0.
    pub timeout_ms: u64,
    /// Return the messages themselves (`GoMessage::data`), not only their digests.
    pub keep: bool,
    /// Repeat the (unary) call for this long in each copy, one call after another, and return
    /// the latencies (`GoResult::latencies_us`): for the benchmarks.
    pub loop_ms: u64,
}

impl GoCall {
    pub fn unary(method: &str, request: &[u8], times: usize) -> Self {
        Self {
            method: method.into(),
            request: request.to_vec(),
            times,
            ..Self::default()
        }
    }
}

/// What grpc-go saw of one call: its status and the messages it received.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct GoResult {
    pub code: u32,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub messages: Vec<GoMessage>,
    /// With `GoCall::loop_ms`: each call's latency, in µs.
    #[serde(default)]
    pub latencies_us: Vec<f64>,
}

/// One message a call received: its length and digest (`sha256:…`), and itself if the call
/// kept it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct GoMessage {
    pub len: usize,
    pub digest: String,
    #[serde(default, deserialize_with = "from_hex_string")]
    pub data: Option<Vec<u8>>,
}

impl GoResult {
    /// How an OK call that received exactly `messages`, and did not keep them, is seen.
    pub fn ok(messages: &[&[u8]]) -> Self {
        Self {
            code: 0,
            message: String::new(),
            messages: messages
                .iter()
                .map(|m| GoMessage {
                    len: m.len(),
                    digest: nix_cri::image::oci::sha256_digest(m),
                    data: None,
                })
                .collect(),
            latencies_us: Vec::new(),
        }
    }
}

fn hex_string<S: serde::Serializer>(bytes: &[u8], to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(&data_encoding::HEXLOWER.encode(bytes))
}

fn from_hex_string<'de, D: serde::Deserializer<'de>>(from: D) -> Result<Option<Vec<u8>>, D::Error> {
    let hex: Option<String> = serde::Deserialize::deserialize(from)?;
    hex.map(|h| data_encoding::HEXLOWER.decode(h.as_bytes()))
        .transpose()
        .map_err(serde::de::Error::custom)
}

/// A grpc-go client connection to a CRI socket, as kubelet holds one, driven a round at a time.
pub struct GrpcGoCaller {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl GrpcGoCaller {
    /// Dials `socket` (grpc-go waits for the connection, as `WithBlock` does).
    pub fn connect(socket: &Path) -> Self {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(grpc_go_caller())
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start cri-caller");
        let stdin = child.stdin.take().expect("cri-caller's stdin");
        let stdout = child.stdout.take().expect("cri-caller's stdout");
        Self {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// Makes every call of `calls` at once on the one connection; returns, for each, the
    /// results of its copies.
    pub async fn round(&mut self, calls: &[GoCall]) -> Vec<Vec<GoResult>> {
        use tokio::io::AsyncWriteExt;
        let mut line = serde_json::to_vec(calls).expect("encode a round");
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .await
            .expect("write to cri-caller");
        let answer = tokio::time::timeout(Duration::from_secs(120), self.stdout.next_line())
            .await
            .expect("cri-caller answers a round within two minutes")
            .expect("read cri-caller's output");
        let Some(answer) = answer else {
            let status = self.child.wait().await;
            panic!("cri-caller ended without answering: {status:?}");
        };
        serde_json::from_str(&answer).expect("cri-caller writes one result list a call")
    }
}

/// Runs a command, returning its output; fails with the command line and stderr if it fails.
pub fn run(command: &mut Command) -> anyhow::Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed with {}:\nstdout: {}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// A `Command` for real Nix with the experimental CLI enabled.
pub fn nix_command(program: &str) -> Command {
    let mut command = Command::new(program);
    command.env("NIX_CONFIG", "experimental-features = nix-command");
    command
}

/// What the server does to one request instead of serving it plainly.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this status and an empty body.
    Status(u16),
    /// Send the headers and this many body bytes, then close the connection.
    Truncate(usize),
    /// Send the headers and this many body bytes, then send nothing more (keep it open).
    Stall(usize),
    /// Serve these bytes instead of the file.
    Replace(Bytes),
    /// Send the body in small pieces with this pause between them.
    Drip { chunk: usize, pause: Duration },
}

#[derive(Default)]
struct ServerState {
    requests: HashMap<String, usize>,
    /// Faults by request path, used up one per request, in order.
    faults: HashMap<String, VecDeque<Fault>>,
}

/// A static HTTP binary-cache server on 127.0.0.1 over a directory, counting requests per path.
pub struct CacheServer {
    addr: SocketAddr,
    state: Arc<Mutex<ServerState>>,
    task: tokio::task::JoinHandle<()>,
}

impl CacheServer {
    pub async fn start(dir: PathBuf) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ServerState::default()));
        let dir = Arc::new(dir);
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let state = state.clone();
                    let dir = dir.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| serve(req, dir.clone(), state.clone()));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Ok(Self { addr, state, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen for `path` (e.g. `/nar/xyz.nar.xz`).
    pub fn requests(&self, path: &str) -> usize {
        self.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// Every request path with its count.
    pub fn all_requests(&self) -> HashMap<String, usize> {
        self.lock().requests.clone()
    }

    /// The next requests of `path` get these faults, in order; later ones are served normally.
    pub fn inject(&self, path: &str, faults: impl IntoIterator<Item = Fault>) {
        self.lock()
            .faults
            .entry(path.to_owned())
            .or_default()
            .extend(faults);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for CacheServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn serve(
    req: Request<hyper::body::Incoming>,
    dir: Arc<PathBuf>,
    state: Arc<Mutex<ServerState>>,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let fault = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        *state.requests.entry(path.clone()).or_default() += 1;
        state.faults.get_mut(&path).and_then(VecDeque::pop_front)
    };
    let relative = path.trim_start_matches('/');
    let file = if relative.split('/').any(|c| c == ".." || c.is_empty()) {
        None
    } else {
        std::fs::read(dir.join(relative)).ok().map(Bytes::from)
    };
    let full = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body).map_err(|e| match e {}).boxed());
        *response.status_mut() = status;
        Ok(response)
    };
    let Some(contents) = file else {
        return full(StatusCode::NOT_FOUND, Bytes::new());
    };
    match fault {
        None => full(StatusCode::OK, contents),
        Some(Fault::Status(code)) => full(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Bytes::new(),
        ),
        Some(Fault::Replace(bytes)) => full(StatusCode::OK, bytes),
        Some(Fault::Truncate(n)) => {
            let head = contents.slice(..n.min(contents.len()));
            let len = contents.len();
            let stream = futures_stream(vec![Ok(head), Err(std::io::Error::other("cut"))]);
            let mut response = Response::new(stream);
            response
                .headers_mut()
                .insert(http::header::CONTENT_LENGTH, len.into());
            Ok(response)
        }
        Some(Fault::Stall(n)) => {
            let head = contents.slice(..n.min(contents.len()));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                let _ = tx.send(Ok(Frame::data(head))).await;
                // Hold the sender: the body never ends until the client gives up.
                tokio::time::sleep(Duration::from_secs(3600)).await;
                drop(tx);
            });
            let body = StreamBody::new(tokio_stream_from(rx));
            Ok(Response::new(BodyExt::boxed(body)))
        }
        Some(Fault::Drip { chunk, pause }) => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
            tokio::spawn(async move {
                for piece in contents.chunks(chunk.max(1)) {
                    if tx
                        .send(Ok(Frame::data(Bytes::copy_from_slice(piece))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
            });
            Ok(Response::new(BodyExt::boxed(StreamBody::new(
                tokio_stream_from(rx),
            ))))
        }
    }
}

fn futures_stream(items: Vec<Result<Bytes, std::io::Error>>) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(items.len().max(1));
    for item in items {
        let _ = tx.try_send(item.map(Frame::data));
    }
    BodyExt::boxed(StreamBody::new(tokio_stream_from(rx)))
}

/// An mpsc receiver as a `Stream`.
fn tokio_stream_from<T>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A plain HTTP/1.0 GET on loopback: the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// How [`NixCriServer::spawn`] starts `nix-cri serve`.
pub struct ServeOptions<'a> {
    /// The runtime's socket.
    pub upstream: &'a Path,
    pub cache_url: &'a str,
    /// `NAME:KEY` of the cache's signing key.
    pub trusted_key: &'a str,
    /// An existing store root; `None`: a fresh one in the server's directory.
    pub root: Option<&'a Path>,
    /// Where the server's temporary directory goes; `None`: the system's temporary directory.
    pub dir_in: Option<&'a Path>,
    /// `NIX_CRI_LOG`.
    pub log_filter: &'a str,
    pub extra_args: &'a [&'a str],
}

/// `nix-cri serve` as a child process, as the node runs it.
pub struct NixCriServer {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
    /// Where its `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics: SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl NixCriServer {
    /// Starts nix-cri in front of `upstream` with the fixture key trusted and `cache_url` as
    /// its substituter; waits until its socket accepts connections.
    pub async fn start(
        upstream: &Path,
        cache_url: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::start_with_root(upstream, cache_url, None, extra_args).await
    }

    /// As [`NixCriServer::start`], on the store at `root` (another server's, after a crash)
    /// instead of a fresh one.
    pub async fn start_with_root(
        upstream: &Path,
        cache_url: &str,
        root: Option<&Path>,
        extra_args: &[&str],
    ) -> anyhow::Result<Self> {
        Self::spawn(ServeOptions {
            upstream,
            cache_url,
            trusted_key: fixtures().public_key(),
            root,
            dir_in: None,
            log_filter: "nix_cri=debug,info",
            extra_args,
        })
        .await
    }

    /// Starts `nix-cri serve` as `options` say; waits until its socket accepts connections.
    pub async fn spawn(options: ServeOptions<'_>) -> anyhow::Result<Self> {
        let dir = match options.dir_in {
            Some(base) => tempfile::Builder::new().prefix("serve-").tempdir_in(base)?,
            None => tempfile::tempdir()?,
        };
        let socket = dir.path().join("nix-cri.sock");
        let root = options
            .root
            .map(Path::to_owned)
            .unwrap_or_else(|| dir.path().join("root"));
        let log = dir.path().join("nix-cri.log");
        let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(nix_cri_bin())
            .arg("serve")
            .arg("--listen")
            .arg(&socket)
            .arg("--upstream")
            .arg(options.upstream)
            .arg("--root")
            .arg(&root)
            .args(["--registry-addr", "127.0.0.1:0"])
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .args(["--substituter", options.cache_url])
            .args(["--trusted-public-key", options.trusted_key])
            .args(options.extra_args)
            .env("NIX_CRI_LOG", options.log_filter)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start nix-cri serve")?;
        let mut server = Self {
            socket,
            root,
            log,
            metrics,
            child,
            _dir: dir,
        };
        for _ in 0..200 {
            if tokio::net::UnixStream::connect(&server.socket)
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("nix-cri exited with {status}:\n{}", server.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("nix-cri did not listen within 10s:\n{}", server.log_tail())
    }

    /// The server's process id (to read its memory use).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Kills nix-cri at once, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NixCriServer {
    fn drop(&mut self) {
        self.kill();
    }
}
