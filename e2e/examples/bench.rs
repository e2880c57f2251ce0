//! nix-cri's benchmarks (issue 5), run by `hack/bench`: real Nix 2.8, real containerd 1.6 and
//! the release `nix-cri` binary on loopback, with the closures of `hack/bench-closure.sh`.
//!
//! ```text
//! bench --manifest target/bench/manifest.json --out target/bench/results.json
//!       [--work DIR] [--quick] [--runs N] [--only cold,rss,warm,incremental,forwarding,create]
//! ```
//!
//! `--work` holds every store (nix-cri's, Nix's) and nix-cri's own files; `hack/bench` makes it
//! a tmpfs and points TMPDIR (containerd's root) there too, so that no contender pays for the
//! disk, or for deleting the previous round's store from it.
//!
//! Every comparison is interleaved within one session (A, B, C, A, B, C, …) so that a
//! concurrent load on the machine hits every contender alike; `hack/bench-plot.py` turns the
//! raw samples in `results.json` into medians, percentiles and ratios. Every wait and every loop
//! is bounded; every child process is killed if it overruns.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use nix_cri::image::oci::sha256_digest;
use nix_cri_e2e::containerd::{Containerd, image_client, image_spec, remove_pod, runtime_client};
use nix_cri_e2e::{
    CacheServer, GoCall, GrpcGoCaller, NixCriServer, ServeOptions, nix_cri_bin, workspace,
};
use serde_json::{Value, json};

/// Longest any child process (a pull, `nix copy`, the floor) may run.
const CHILD_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest any CRI call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

struct Options {
    manifest: PathBuf,
    out: PathBuf,
    quick: bool,
    runs: usize,
    only: Option<Vec<String>>,
    /// Scratch directory for every store, nix-cri's and Nix's (hack/bench mounts a tmpfs).
    work: PathBuf,
}

fn options() -> anyhow::Result<Options> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        manifest: workspace().join("target/bench/manifest.json"),
        out: workspace().join("target/bench/results.json"),
        quick: false,
        runs: 0,
        only: None,
        work: workspace().join("target/bench/work"),
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--manifest" => o.manifest = args.next().context("--manifest FILE")?.into(),
            "--out" => o.out = args.next().context("--out FILE")?.into(),
            "--quick" => o.quick = true,
            "--runs" => o.runs = args.next().context("--runs N")?.parse()?,
            "--work" => o.work = args.next().context("--work DIR")?.into(),
            "--only" => {
                o.only = Some(
                    args.next()
                        .context("--only a,b")?
                        .split(',')
                        .map(String::from)
                        .collect(),
                )
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.runs == 0 {
        o.runs = if o.quick { 3 } else { 5 };
    }
    Ok(o)
}

fn say(text: impl AsRef<str>) {
    eprintln!(
        "[bench {:>7.1}s] {}",
        started().elapsed().as_secs_f64(),
        text.as_ref()
    );
}

fn started() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

// ---------------------------------------------------------------------------------------------
// Child processes: wall time and peak RSS (VmHWM, sampled from /proc every 10 ms).

struct Timed {
    secs: f64,
    peak_rss_kb: u64,
}

fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn run_timed(command: &mut Command, what: &str) -> anyhow::Result<Timed> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn().with_context(|| format!("start {what}"))?;
    let pid = child.id();
    // Drain the pipes on threads so the child never blocks on them.
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().context("stdout")?));
    let err = drain(Box::new(child.stderr.take().context("stderr")?));
    let mut peak = 0;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(kb) = status_kb(pid, "VmHWM:") {
            peak = peak.max(kb);
        }
        if start.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} ran longer than {CHILD_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let secs = start.elapsed().as_secs_f64();
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    ensure!(
        status.success(),
        "{what} failed with {status}\nstdout: {}\nstderr: {}",
        tail(&out, 20),
        tail(&err, 40)
    );
    Ok(Timed {
        secs,
        peak_rss_kb: peak,
    })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn sh(script: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Lets the previous contender's teardown (process exit, unmounts) finish before the next one
/// starts. No `sync`: the stores live on a tmpfs (see hack/bench), and a global sync would
/// wait for other processes' disk writes.
fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

fn remove_tree(path: &Path) {
    if path.exists() {
        let _ = Command::new("rm").arg("-rf").arg(path).status();
    }
}

// ---------------------------------------------------------------------------------------------
// A loopback OCI Distribution registry serving one layered image with gzip layers (the
// library's registry serves uncompressed layers only), counting the blob bytes it sends.

struct OciRegistry {
    addr: SocketAddr,
    blob_bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct OciImage {
    manifest: Bytes,
    manifest_digest: String,
    config_digest: String,
    blobs: HashMap<String, Bytes>,
    layer_bytes: u64,
}

impl OciImage {
    /// The closure's layers from the manifest (`oci_layers`: file, size, digest, diff_id).
    fn load(layers: &[Value]) -> anyhow::Result<Self> {
        let mut blobs = HashMap::new();
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut layer_bytes = 0;
        for layer in layers {
            let file = layer["file"].as_str().context("layer file")?;
            let bytes = Bytes::from(std::fs::read(file).with_context(|| format!("read {file}"))?);
            let digest = sha256_digest(&bytes);
            ensure!(
                digest == layer["digest"].as_str().unwrap_or(""),
                "{file} changed: rerun hack/bench-closure.sh"
            );
            layer_bytes += bytes.len() as u64;
            descriptors.push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest, "size": bytes.len(),
            }));
            diff_ids.push(layer["diff_id"].clone());
            blobs.insert(digest, bytes);
        }
        let config = Bytes::from(serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?);
        let config_digest = sha256_digest(&config);
        let manifest = Bytes::from(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest, "size": config.len()},
            "layers": descriptors,
        }))?);
        blobs.insert(config_digest.clone(), config);
        Ok(Self {
            manifest_digest: sha256_digest(&manifest),
            manifest,
            config_digest,
            blobs,
            layer_bytes,
        })
    }
}

impl OciRegistry {
    async fn start(image: Arc<OciImage>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let blob_bytes = Arc::new(AtomicU64::new(0));
        let counter = blob_bytes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let image = image.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let reply = oci_reply(&req, &image, &counter);
                        async move { Ok::<_, Infallible>(reply) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            blob_bytes,
            task,
        })
    }

    fn reference(&self, name: &str) -> String {
        format!("{}/{name}:latest", self.addr)
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn oci_reply<B>(req: &Request<B>, image: &OciImage, counter: &AtomicU64) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    let path = req.uri().path();
    let found: Option<(Bytes, &str, Option<String>)> = if path == "/v2/" || path == "/v2" {
        Some((Bytes::from_static(b"{}"), "application/json", None))
    } else if path.contains("/manifests/") {
        let reference = path.rsplit('/').next().unwrap_or("");
        (!reference.starts_with("sha256:") || reference == image.manifest_digest).then(|| {
            (
                image.manifest.clone(),
                "application/vnd.oci.image.manifest.v1+json",
                Some(image.manifest_digest.clone()),
            )
        })
    } else if path.contains("/blobs/") {
        let digest = path.rsplit('/').next().unwrap_or("");
        image.blobs.get(digest).map(|b| {
            if !head {
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            (
                b.clone(),
                "application/octet-stream",
                Some(digest.to_owned()),
            )
        })
    } else {
        None
    };
    let Some((body, content_type, digest)) = found else {
        let mut r = Response::new(Full::new(Bytes::from_static(
            br#"{"errors":[{"code":"NAME_UNKNOWN","message":"unknown"}]}"#,
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    };
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", content_type)
        .header("Content-Length", body.len())
        .header("Docker-Distribution-API-Version", "registry/2.0");
    if let Some(digest) = digest {
        builder = builder.header("Docker-Content-Digest", digest);
    }
    builder
        .body(Full::new(if head { Bytes::new() } else { body }))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

// ---------------------------------------------------------------------------------------------
// `nix-cri serve` as a child process whose pid we know (for /proc/<pid>/status).

/// `nix-cri serve` (the release binary) with its store and socket under `base` (a tmpfs).
async fn serve(
    base: &Path,
    upstream: &Path,
    cache_url: &str,
    key: &str,
) -> anyhow::Result<NixCriServer> {
    NixCriServer::spawn(ServeOptions {
        upstream,
        cache_url,
        trusted_key: key,
        root: None,
        dir_in: Some(base),
        log_filter: "info",
        extra_args: &[],
    })
    .await
}

/// Store paths (not temporary entries) in the store under `root`.
fn store_entries(root: &Path) -> usize {
    std::fs::read_dir(root.join("nix/store"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

async fn pull(
    images: &mut cri::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> anyhow::Result<(f64, String)> {
    let start = Instant::now();
    let reply = tokio::time::timeout(
        CALL_TIMEOUT,
        images.pull_image(cri::PullImageRequest {
            image: image_spec(image),
            ..Default::default()
        }),
    )
    .await
    .context("PullImage timed out")?
    .with_context(|| format!("PullImage {image}"))?;
    Ok((start.elapsed().as_secs_f64(), reply.into_inner().image_ref))
}

async fn remove_image(
    images: &mut cri::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    image: &str,
) -> anyhow::Result<()> {
    tokio::time::timeout(
        CALL_TIMEOUT,
        images.remove_image(cri::RemoveImageRequest {
            image: image_spec(image),
        }),
    )
    .await
    .context("RemoveImage timed out")?
    .with_context(|| format!("RemoveImage {image}"))?;
    Ok(())
}

/// Polls `done` every 50 ms for up to `limit`.
async fn wait_until(
    limit: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn count_dir(path: &Path) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------

struct Bench {
    o: Options,
    m: Value,
    key: String,
    work: PathBuf,
    results: serde_json::Map<String, Value>,
}

impl Bench {
    fn closure(&self, name: &str) -> &Value {
        &self.m["closures"][name]
    }
    fn top(&self, name: &str) -> String {
        self.closure(name)["top"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
    fn wants(&self, scenario: &str) -> bool {
        self.o.only.as_ref().is_none_or(|o| {
            o.iter().any(|s| {
                s == scenario
                    || (s == "cri"
                        && ["warm", "incremental", "forwarding", "create"].contains(&scenario))
            })
        })
    }
    fn save(&self) -> anyhow::Result<()> {
        std::fs::write(
            &self.o.out,
            serde_json::to_vec_pretty(&Value::Object(self.results.clone()))?,
        )?;
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    started();
    let o = options()?;
    let m: Value =
        serde_json::from_slice(&std::fs::read(&o.manifest).with_context(|| {
            format!("read {}: run hack/bench-closure.sh", o.manifest.display())
        })?)?;
    // The library's nix_cri_bin() would build a debug binary without it.
    ensure!(
        std::env::var_os("NIX_CRI_BIN").is_some(),
        "NIX_CRI_BIN is not set: run the benchmarks through hack/bench, which builds and names \
         the release binary"
    );
    ensure!(
        nix_cri_bin().exists(),
        "{} is missing: cargo build --release -p nix-cri-cmd",
        nix_cri_bin().display()
    );
    let work = o.work.clone();
    remove_tree(&work);
    std::fs::create_dir_all(&work)?;
    let mut b = Bench {
        key: m["public_key"].as_str().context("public_key")?.to_owned(),
        o,
        m,
        work,
        results: serde_json::Map::new(),
    };
    b.results.insert("machine".into(), machine());
    b.results.insert(
        "config".into(),
        json!({"quick": b.o.quick, "runs": b.o.runs,
               "work_fs": sh(&format!("stat -f -c %T {}", b.work.display())),
               "tmpdir_fs": sh(&format!("stat -f -c %T {}", std::env::temp_dir().display())), "started_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs()}),
    );
    let mut closures = serde_json::Map::new();
    for name in ["big", "quick", "update", "tiny500", "tiny1000", "huge"] {
        let c = b.closure(name);
        closures.insert(
            name.into(),
            json!({
                "top": c["top"], "paths": c["paths"], "nar_size": c["nar_size"],
                "xz_size": c["caches"]["xz"]["file_size"], "zstd_size": c["caches"]["zstd"]["file_size"],
                "gzip_layers": c["oci_layers"].as_array().map(Vec::len),
                "gzip_size": c["oci_layers"].as_array().map(|l| l.iter().filter_map(|x| x["size"].as_u64()).sum::<u64>()),
            }),
        );
    }
    b.results.insert("closures".into(), Value::Object(closures));
    b.results
        .insert("load_before".into(), json!(sh("cat /proc/loadavg")));

    say("starting containerd 1.6");
    let containerd = Containerd::start().await.context("start containerd")?;
    let caches: HashMap<&str, CacheServer> = [
        (
            "xz",
            CacheServer::start(PathBuf::from(
                b.m["caches"]["xz"].as_str().unwrap_or_default(),
            ))
            .await?,
        ),
        (
            "zstd",
            CacheServer::start(PathBuf::from(
                b.m["caches"]["zstd"].as_str().unwrap_or_default(),
            ))
            .await?,
        ),
    ]
    .into_iter()
    .collect();

    if b.wants("cold") {
        cold_pull(&mut b, &containerd, &caches).await?;
        b.save()?;
    }
    if b.wants("rss") {
        rss(&mut b, &containerd, &caches).await?;
        b.save()?;
    }
    if ["warm", "incremental", "forwarding", "create"]
        .iter()
        .any(|s| b.wants(s))
    {
        cri_scenarios(&mut b, &containerd, &caches).await?;
        b.save()?;
    }
    b.results
        .insert("load_after".into(), json!(sh("cat /proc/loadavg")));
    b.results.insert(
        "duration_secs".into(),
        json!(started().elapsed().as_secs_f64()),
    );
    b.save()?;
    say(format!("results in {}", b.o.out.display()));
    drop(containerd);
    remove_tree(&b.work);
    Ok(())
}

fn machine() -> Value {
    json!({
        "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "cores": sh("nproc"),
        "memory": sh("free -g | awk '/Mem:/{print $2\" GiB\"}'"),
        "kernel": sh("uname -r"),
        "os": sh(". /etc/os-release && echo $PRETTY_NAME"),
        "nix": sh("nix --version"),
        "containerd": sh("containerd --version | awk '{print $3}'"),
        "runc": sh("runc --version | head -1 | awk '{print $3}'"),
        "xz": sh("xz --version | head -1"),
        "zstd": sh("zstd --version"),
        "gzip": sh("gzip --version | head -1"),
        "rustc": sh("rustc --version"),
        "nix_cri": sh(&format!("cd {} && git rev-parse --short HEAD && git status --porcelain -- src cmd | wc -l", workspace().display())).replace('\n', " (uncommitted files in src, cmd: ") + ")",
    })
}

// ---------------------------------------------------------------------------------------------
// Cold pull into an empty store: nix-cri pull vs nix copy vs containerd (gzip OCI) vs the floor.

async fn cold_pull(
    b: &mut Bench,
    containerd: &Containerd,
    caches: &HashMap<&str, CacheServer>,
) -> anyhow::Result<()> {
    let name = if b.o.quick { "quick" } else { "big" };
    let top = b.top(name);
    let closure = b.closure(name).clone();
    say(format!(
        "cold pull of `{name}`: {} paths, {:.0} MB of NAR, {} runs of each, interleaved",
        closure["paths"],
        closure["nar_size"].as_f64().unwrap_or(0.0) / 1e6,
        b.o.runs
    ));
    let layers = closure["oci_layers"]
        .as_array()
        .context("oci_layers")?
        .clone();
    let image = Arc::new(OciImage::load(&layers)?);
    let layer_bytes = image.layer_bytes;
    let config_digest = image.config_digest.clone();
    let registry = OciRegistry::start(image).await?;
    let reference = registry.reference("bench/closure");
    let mut ctrd_images = image_client(containerd.socket()).await?;
    let ctrd_dir = containerd
        .log_path()
        .parent()
        .context("containerd dir")?
        .to_owned();
    let snapshots = ctrd_dir.join("root/io.containerd.snapshotter.v1.overlayfs/snapshots");
    let first_layer = ctrd_dir.join(format!(
        "root/io.containerd.content.v1.content/blobs/sha256/{}",
        layers[0]["digest"]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("sha256:")
    ));
    let baseline_snapshots = count_dir(&snapshots);

    // The floor: decompress and hash every NAR, one process per NAR, on all cores.
    let floor_lists: HashMap<&str, PathBuf> = ["xz", "zstd"]
        .into_iter()
        .map(|c| {
            let list = b.work.join(format!("floor-{c}.txt"));
            let mut nars: Vec<&str> = closure["caches"][c]["nars"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            // Largest first: the best schedule for the floor, so no long NAR starts last.
            nars.sort_by_key(|n| {
                std::cmp::Reverse(std::fs::metadata(n).map(|m| m.len()).unwrap_or(0))
            });
            std::fs::write(&list, nars.join("\n") + "\n").map(|_| (c, list))
        })
        .collect::<Result<_, _>>()?;

    let mut samples: HashMap<String, Vec<f64>> = HashMap::new();
    let mut rss: HashMap<String, Vec<u64>> = HashMap::new();
    let mut record = |key: String, secs: f64| {
        say(format!("  {key:<22} {secs:>7.2} s"));
        samples.entry(key).or_default().push(secs);
    };
    for run in 0..b.o.runs {
        say(format!("round {}/{}", run + 1, b.o.runs));
        for c in ["xz", "zstd"] {
            let url = caches[c].url();
            // nix-cri
            let root = b.work.join("nix-cri-store");
            remove_tree(&root);
            settle();
            let t = run_timed(
                Command::new(nix_cri_bin())
                    .arg("pull")
                    .arg("--root")
                    .arg(&root)
                    .args(["--substituter", &url, "--trusted-public-key", &b.key, &top])
                    .env("NIX_CRI_LOG", "warn"),
                "nix-cri pull",
            )?;
            ensure!(
                root.join(top.trim_start_matches('/')).exists(),
                "nix-cri pull did not make {top}"
            );
            rss.entry(c.to_string()).or_default().push(t.peak_rss_kb);
            record(format!("{c}/nix-cri"), t.secs);
            remove_tree(&root);

            // Nix 2.8
            let root = b.work.join("nix-store");
            let xdg = b.work.join("nix-xdg-cache");
            remove_tree(&root);
            remove_tree(&xdg);
            settle();
            let t = run_timed(
                Command::new("nix")
                    .args(["copy", "--from", &url, "--to"])
                    .arg(&root)
                    .args(["--trusted-public-keys", &b.key])
                    .args([
                        "--option",
                        "narinfo-cache-positive-ttl",
                        "0",
                        "--option",
                        "narinfo-cache-negative-ttl",
                        "0",
                    ])
                    .args(["--option", "substituters", ""])
                    .arg(&top)
                    .env("NIX_CONFIG", "experimental-features = nix-command")
                    .env("XDG_CACHE_HOME", &xdg),
                "nix copy",
            )?;
            ensure!(
                root.join(top.trim_start_matches('/')).exists(),
                "nix copy did not make {top}"
            );
            record(format!("{c}/nix"), t.secs);
            remove_tree(&root);

            // The floor.
            settle();
            let decompress = if c == "xz" { "xz -dc" } else { "zstd -dcq" };
            let t = run_timed(
                Command::new("sh").arg("-c").arg(format!(
                    "xargs -P \"$(nproc)\" -n 1 sh -c '{decompress} \"$0\" | openssl dgst -sha256 > /dev/null' < {}",
                    floor_lists[c].display()
                )),
                "the floor",
            )?;
            record(format!("{c}/floor"), t.secs);
        }
        // containerd: PullImage of the layered gzip image, then remove it and let its GC
        // delete content and snapshots, so the next pull starts from nothing again.
        settle();
        let before = registry.blob_bytes.load(Ordering::Relaxed);
        let (secs, id) = pull(&mut ctrd_images, &reference).await?;
        let sent = registry.blob_bytes.load(Ordering::Relaxed) - before;
        ensure!(
            id == config_digest,
            "containerd reports image {id}, expected {config_digest}"
        );
        ensure!(
            sent >= layer_bytes,
            "containerd fetched {sent} bytes, the layers are {layer_bytes}: not a cold pull"
        );
        record("gzip/containerd".into(), secs);
        remove_image(&mut ctrd_images, &reference).await?;
        wait_until(Duration::from_secs(60), "containerd's GC", || {
            !first_layer.exists() && count_dir(&snapshots) <= baseline_snapshots
        })
        .await?;
    }
    b.results.insert(
        "cold_pull".into(),
        json!({"closure": name, "seconds": samples, "nix_cri_peak_rss_kb": rss,
               "containerd_max_concurrent_downloads": 3, "gzip_layer_bytes": layer_bytes}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// RSS of `nix-cri serve`: idle, then while pulling ≥ 1 GB of NAR in one PullImage (`huge`,
// zstd), and `big` from the xz cache (xz decoders need far more memory than zstd's).

async fn rss(
    b: &mut Bench,
    containerd: &Containerd,
    caches: &HashMap<&str, CacheServer>,
) -> anyhow::Result<()> {
    let cases: &[(&str, &str)] = if b.o.quick {
        &[("zstd", "quick"), ("xz", "quick")]
    } else {
        &[("zstd", "huge"), ("xz", "big")]
    };
    let mut out = serde_json::Map::new();
    for &(c, name) in cases {
        let top = b.top(name);
        let nar = b.closure(name)["nar_size"].as_u64().unwrap_or(0);
        let paths = b.closure(name)["paths"].as_u64().unwrap_or(0);
        say(format!(
            "RSS of nix-cri serve: idle, then pulling `{name}` ({paths} paths, {:.0} MB of NAR) from the {c} cache",
            nar as f64 / 1e6
        ));
        let serve = serve(&b.work, containerd.socket(), &caches[c].url(), &b.key).await?;
        let pid = serve.pid();
        let mut images = image_client(&serve.socket).await?;
        // Idle: after start-up and one forwarded call, as a node's nix-cri sits between pulls.
        images
            .list_images(cri::ListImagesRequest::default())
            .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_start = status_kb(pid, "VmRSS:").unwrap_or(0);
        let image = format!("nix:0{top}");
        // Sample VmRSS every 20 ms while pulling, for the plot (VmHWM is the kernel's exact peak).
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            std::thread::spawn(move || {
                let mut trace = Vec::new();
                let start = Instant::now();
                while sampling.load(Ordering::Relaxed) && start.elapsed() < CHILD_TIMEOUT {
                    trace.push((
                        start.elapsed().as_secs_f64(),
                        status_kb(pid, "VmRSS:").unwrap_or(0),
                    ));
                    std::thread::sleep(Duration::from_millis(20));
                }
                trace
            })
        };
        settle();
        let pulled = pull(&mut images, &image)
            .await
            .with_context(|| serve.log_tail());
        sampling.store(false, Ordering::Relaxed);
        let trace = sampler.join().unwrap_or_default();
        let (secs, _) = pulled?;
        let peak = status_kb(pid, "VmHWM:").unwrap_or(0);
        say(format!(
            "  pulled in {secs:.2} s; idle {idle_start} kB, peak (VmHWM) {peak} kB"
        ));
        remove_image(&mut images, &image).await?;
        wait_until(
            Duration::from_secs(120),
            "nix-cri collecting the closure",
            || store_entries(&serve.root) == 0,
        )
        .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle_after = status_kb(pid, "VmRSS:").unwrap_or(0);
        let step = (trace.len() / 400).max(1);
        out.insert(
            format!("{c}/{name}"),
            json!({"cache": c, "closure": name, "idle_start_kb": idle_start, "peak_kb": peak,
                   "idle_after_kb": idle_after, "pulled_nar_bytes": nar, "pulled_paths": paths,
                   "pull_seconds": secs,
                   "trace": trace.iter().step_by(step).map(|t| json!([t.0, t.1])).collect::<Vec<_>>()}),
        );
        drop(serve);
    }
    b.results.insert("rss".into(), Value::Object(out));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Through the CRI, with nix-cri serve in front of containerd (zstd cache): warm pull of the
// 1000-path closure, the incremental pull, forwarded calls, CreateContainer + StartContainer.

async fn cri_scenarios(
    b: &mut Bench,
    containerd: &Containerd,
    caches: &HashMap<&str, CacheServer>,
) -> anyhow::Result<()> {
    let serve = serve(&b.work, containerd.socket(), &caches["zstd"].url(), &b.key).await?;
    let mut images = image_client(&serve.socket).await?;
    let mut ctrd_images = image_client(containerd.socket()).await?;
    let busybox_image = containerd.busybox_image();
    // Pulled once up front: the forwarding and create scenarios use it too.
    pull(&mut ctrd_images, &busybox_image).await?;

    // -- warm pull of the 1000-path closure
    if b.wants("warm") {
        let tiny = format!("nix:0{}", b.top("tiny1000"));
        say(format!(
            "warm pull: {} ({} paths)",
            tiny,
            b.closure("tiny1000")["paths"]
        ));
        let (cold, _) = pull(&mut images, &tiny)
            .await
            .with_context(|| serve.log_tail())?;
        let _ = pull(&mut ctrd_images, &busybox_image).await?;
        let n = if b.o.quick { 20 } else { 100 };
        let mut warm_nix = Vec::new();
        let mut warm_ctrd = Vec::new();
        let mut warm_forwarded = Vec::new();
        for _ in 0..n {
            warm_nix.push(pull(&mut images, &tiny).await?.0 * 1e3);
            warm_ctrd.push(pull(&mut ctrd_images, &busybox_image).await?.0 * 1e3);
            warm_forwarded.push(pull(&mut images, &busybox_image).await?.0 * 1e3);
        }
        b.results.insert(
            "warm_pull".into(),
            json!({"paths": b.closure("tiny1000")["paths"], "cold_seconds": cold,
               "ms": {"nix-cri (nix: image, 1000 paths)": warm_nix,
                      "containerd direct (ordinary image)": warm_ctrd,
                      "nix-cri forwarding (ordinary image)": warm_forwarded}}),
        );
        say(format!(
            "  cold {cold:.2} s; warm p50 {:.2} ms",
            median(&warm_nix)
        ));
    }

    // -- incremental pull: big present, then `update` (90% shared)
    if b.wants("incremental") {
        let before_big = store_entries(&serve.root);
        let big = format!("nix:0{}", b.top("big"));
        let update = format!("nix:0{}", b.top("update"));
        say("incremental pull: big present, then update (90% of its paths shared)");
        pull(&mut images, &big)
            .await
            .with_context(|| serve.log_tail())?;
        let with_big = store_entries(&serve.root);
        let mut incremental = Vec::new();
        let mut cold = Vec::new();
        for run in 0..b.o.runs {
            settle();
            let (secs, _) = pull(&mut images, &update).await?;
            say(format!("  round {}: incremental {secs:.2} s", run + 1));
            incremental.push(secs);
            remove_image(&mut images, &update).await?;
            wait_until(
                Duration::from_secs(60),
                "collecting update's own paths",
                || store_entries(&serve.root) == with_big,
            )
            .await?;
            let root = b.work.join("nix-cri-store");
            remove_tree(&root);
            settle();
            let t = run_timed(
                Command::new(nix_cri_bin())
                    .arg("pull")
                    .arg("--root")
                    .arg(&root)
                    .args([
                        "--substituter",
                        &caches["zstd"].url(),
                        "--trusted-public-key",
                        &b.key,
                        &b.top("update"),
                    ])
                    .env("NIX_CRI_LOG", "warn"),
                "nix-cri pull",
            )?;
            say(format!(
                "  round {}: cold (CLI, empty store) {:.2} s",
                run + 1,
                t.secs
            ));
            cold.push(t.secs);
            remove_tree(&root);
        }
        remove_image(&mut images, &big).await?;
        let u = b.closure("update");
        let big_paths: Vec<&str> = b.closure("big")["caches"]["zstd"]["nars"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let new_nars: Vec<&str> = u["caches"]["zstd"]["nars"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .filter(|n| !big_paths.contains(n))
            .collect();
        let new_bytes: u64 = new_nars
            .iter()
            .filter_map(|n| std::fs::metadata(n).ok())
            .map(|m| m.len())
            .sum();
        b.results.insert(
            "incremental".into(),
            json!({"paths": u["paths"], "new_paths": new_nars.len(), "new_zstd_bytes": new_bytes,
                   "zstd_bytes": u["caches"]["zstd"]["file_size"],
                   "seconds": {"incremental (CRI, big present)": incremental, "cold (CLI, empty store)": cold}}),
        );
        wait_until(Duration::from_secs(120), "collecting big", || {
            store_entries(&serve.root) == before_big
        })
        .await?;
    }

    // -- forwarded calls: Version, direct vs through nix-cri
    if b.wants("forwarding") {
        forwarding(b, containerd, &serve).await?;
    }

    // -- CreateContainer + StartContainer: 500-path closure vs an ordinary image
    if b.wants("create") {
        create_start(b, containerd, &serve).await?;
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn forwarding(
    b: &mut Bench,
    containerd: &Containerd,
    serve: &NixCriServer,
) -> anyhow::Result<()> {
    let point_time = Duration::from_millis(if b.o.quick { 300 } else { 700 });
    say(format!(
        "forwarded Version: 1, 16, 64 callers; {} runs of {point_time:?} per point, direct and through nix-cri interleaved",
        b.o.runs
    ));
    let mut out = Points::new();
    let targets = [
        ("direct", containerd.socket().to_owned()),
        ("nix-cri", serve.socket.clone()),
    ];
    // One connection per target, as kubelet keeps one; warm both up. The same again with
    // grpc-go, kubelet's own gRPC library (e2e/grpc-go), measured in turn with the Rust client.
    let mut clients = HashMap::new();
    let mut go_clients = HashMap::new();
    let version = GoCall::unary("/runtime.v1.RuntimeService/Version", &[], 200);
    for (name, socket) in &targets {
        let mut client = runtime_client(socket).await?;
        for _ in 0..200 {
            client.version(cri::VersionRequest::default()).await?;
        }
        clients.insert(*name, client);
        let mut go = GrpcGoCaller::connect(socket);
        if let Some(failed) = go.round(std::slice::from_ref(&version)).await[0]
            .iter()
            .find(|r| r.code != 0)
        {
            bail!("grpc-go's Version through {name}: {failed:?}");
        }
        go_clients.insert(*name, go);
    }
    let mut go_out = Points::new();
    for run in 0..b.o.runs {
        for callers in [1usize, 16, 64] {
            for (name, _) in &targets {
                let go = go_clients
                    .get_mut(name)
                    .context("a grpc-go client per target")?;
                let round = GoCall {
                    loop_ms: point_time.as_millis() as u64,
                    ..GoCall::unary("/runtime.v1.RuntimeService/Version", &[], callers)
                };
                let mut all = Vec::new();
                for result in &go.round(&[round]).await[0] {
                    if result.code != 0 {
                        bail!("grpc-go's Version failed through {name}: {result:?}");
                    }
                    all.extend(&result.latencies_us);
                }
                let point = Point {
                    run,
                    callers,
                    target: name,
                    client: "grpc-go",
                };
                point.record(&mut go_out, all, point_time.as_secs_f64());
            }
            for (name, _) in &targets {
                let client = clients[name].clone();
                let deadline = Instant::now() + point_time;
                let start = Instant::now();
                let mut tasks = tokio::task::JoinSet::new();
                for _ in 0..callers {
                    let mut client = client.clone();
                    tasks.spawn(async move {
                        let mut lat = Vec::new();
                        while Instant::now() < deadline {
                            let t = Instant::now();
                            if client
                                .version(cri::VersionRequest::default())
                                .await
                                .is_err()
                            {
                                return Err(lat.len());
                            }
                            lat.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        Ok(lat)
                    });
                }
                let mut all = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    match r? {
                        Ok(l) => all.extend(l),
                        Err(n) => bail!("Version failed through {name} after {n} calls"),
                    }
                }
                let point = Point {
                    run,
                    callers,
                    target: name,
                    client: "Rust",
                };
                point.record(&mut out, all, start.elapsed().as_secs_f64());
            }
        }
    }
    b.results.insert("forwarding".into(), json!({"call": "RuntimeService/Version", "point_seconds": point_time.as_secs_f64(), "points": out}));
    b.results.insert("forwarding_grpc_go".into(), json!({"call": "RuntimeService/Version", "point_seconds": point_time.as_secs_f64(), "points": go_out}));
    Ok(())
}

/// Latency summaries by caller count, then by target.
type Points = HashMap<String, HashMap<String, Vec<Value>>>;

/// One forwarding measurement: a run's point for one target, with one client library.
struct Point<'a> {
    run: usize,
    callers: usize,
    target: &'a str,
    client: &'a str,
}

impl Point<'_> {
    /// Adds the point's p50, p99 and call rate to `out`, and shows the first run's and the
    /// 64-caller points as they come.
    fn record(&self, out: &mut Points, mut latencies_us: Vec<f64>, seconds: f64) {
        latencies_us.sort_by(f64::total_cmp);
        let v = json!({"p50_us": percentile(&latencies_us, 0.5), "p99_us": percentile(&latencies_us, 0.99),
                       "calls_per_s": latencies_us.len() as f64 / seconds, "calls": latencies_us.len()});
        if self.run == 0 || self.callers == 64 {
            say(format!(
                "  run {} {:>2} callers {:<8} p50 {:>7.0} µs p99 {:>7.0} µs {:>7.0}/s ({})",
                self.run + 1,
                self.callers,
                self.target,
                v["p50_us"].as_f64().unwrap_or(0.0),
                v["p99_us"].as_f64().unwrap_or(0.0),
                v["calls_per_s"].as_f64().unwrap_or(0.0),
                self.client
            ));
        }
        out.entry(self.callers.to_string())
            .or_default()
            .entry(self.target.to_string())
            .or_default()
            .push(v);
    }
}

fn sandbox_config(log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "bench".into(),
            uid: "bench-0b6a1c8e".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: "bench".into(),
        log_directory: log_dir.display().to_string(),
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

async fn create_start(
    b: &mut Bench,
    containerd: &Containerd,
    serve: &NixCriServer,
) -> anyhow::Result<()> {
    let mut images = image_client(&serve.socket).await?;
    let mut runtime = runtime_client(&serve.socket).await?;
    let tiny = format!("nix:0{}", b.top("tiny500"));
    let paths = b.closure("tiny500")["paths"].clone();
    say(format!(
        "CreateContainer + StartContainer: {tiny} ({paths} paths) vs an ordinary image"
    ));
    let nix_id = pull(&mut images, &tiny)
        .await
        .with_context(|| serve.log_tail())?
        .1;
    let busybox_image = containerd.busybox_image();
    let ordinary_id = pull(&mut images, &busybox_image).await?.1;
    let logs = containerd.scratch_dir("bench-logs")?;
    let config = sandbox_config(&logs);
    let sandbox = runtime
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: "nix".into(),
        })
        .await
        .with_context(|| containerd.diagnostics())?
        .into_inner()
        .pod_sandbox_id;
    let bb = b.m["busybox"].as_str().unwrap_or_default().to_owned();
    let nix_cmd = vec![format!("{bb}/bin/busybox"), "sleep".into(), "3600".into()];
    let ordinary_cmd = vec!["/bin/busybox".to_owned(), "sleep".into(), "3600".into()];
    // The same sandbox serves all three; the last case skips nix-cri, to show what forwarding
    // itself costs here.
    let mut direct = runtime_client(containerd.socket()).await?;
    let cases = [
        ("nix: image, 500 paths", nix_id, tiny.clone(), nix_cmd, true),
        (
            "ordinary image",
            ordinary_id.clone(),
            busybox_image.clone(),
            ordinary_cmd.clone(),
            true,
        ),
        (
            "ordinary image, direct to containerd",
            ordinary_id,
            busybox_image.clone(),
            ordinary_cmd,
            false,
        ),
    ];
    let n = if b.o.quick { 5 } else { 15 };
    let mut out: HashMap<&str, Vec<f64>> = HashMap::new();
    let mut create_only: HashMap<&str, Vec<f64>> = HashMap::new();
    for i in 0..n {
        for (label, id, user_image, cmd, via_nix_cri) in &cases {
            let runtime = if *via_nix_cri {
                &mut runtime
            } else {
                &mut direct
            };
            let container = cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: format!("c{i}"),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: id.clone(),
                    user_specified_image: user_image.clone(),
                    ..Default::default()
                }),
                command: cmd.clone(),
                log_path: format!("c{i}-{}.log", label.len()),
                linux: Some(cri::LinuxContainerConfig::default()),
                ..Default::default()
            };
            let start = Instant::now();
            let created = tokio::time::timeout(
                CALL_TIMEOUT,
                runtime.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox.clone(),
                    config: Some(container),
                    sandbox_config: Some(config.clone()),
                }),
            )
            .await?
            .with_context(|| format!("create {label}: {}", serve.log_tail()))?
            .into_inner()
            .container_id;
            let created_at = start.elapsed().as_secs_f64();
            tokio::time::timeout(
                CALL_TIMEOUT,
                runtime.start_container(cri::StartContainerRequest {
                    container_id: created.clone(),
                }),
            )
            .await?
            .with_context(|| format!("start {label}: {}", containerd.diagnostics()))?;
            let secs = start.elapsed().as_secs_f64();
            out.entry(label).or_default().push(secs * 1e3);
            create_only.entry(label).or_default().push(created_at * 1e3);
            runtime
                .stop_container(cri::StopContainerRequest {
                    container_id: created.clone(),
                    timeout: 0,
                })
                .await?;
            runtime
                .remove_container(cri::RemoveContainerRequest {
                    container_id: created,
                })
                .await?;
        }
    }
    for (label, v) in &out {
        say(format!("  {label:<24} p50 {:.1} ms", median(v)));
    }
    remove_pod(&mut runtime, &sandbox).await?;
    b.results.insert(
        "create_start".into(),
        json!({"paths": paths, "ms": out, "create_ms": create_only}),
    );
    Ok(())
}
