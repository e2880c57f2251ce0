//! Substitution through the library against the fixture caches real Nix wrote, tampered with
//! where a test needs bad input: every failure names the path and the cause, registers nothing
//! and leaves nothing on disk. Also: concurrent pulls fetch each NAR once; transient faults are
//! retried; stalls time out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_cri::cache::{BinaryCacheClient, FetchConfig, SubstituterUrl};
use nix_cri::nix::nar::{self, NarSummary};
use nix_cri::nix::{NarInfo, SigningKey, StorePath, TrustedKeys, VerifyingKey};
use nix_cri::store::{RootKind, RootName, Store, Substituter, SubstituterConfig, Wanted};
use nix_cri_e2e::{CacheServer, Fault, fixtures, run};

/// A scratch copy of one fixture cache that a test may tamper with.
struct ScratchCache {
    dir: tempfile::TempDir,
}

impl ScratchCache {
    fn of(compression: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        run(std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", fixtures().cache_dir(compression).display()))
            .arg(dir.path()))
        .unwrap();
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn narinfo_file(&self, store_path: &str) -> PathBuf {
        let base = store_path.trim_start_matches("/nix/store/");
        self.path().join(format!("{}.narinfo", &base[..32]))
    }

    fn narinfo(&self, store_path: &str) -> NarInfo {
        let text = std::fs::read_to_string(self.narinfo_file(store_path)).unwrap();
        NarInfo::parse(&text).unwrap()
    }

    fn nar_file(&self, store_path: &str) -> PathBuf {
        self.path().join(self.narinfo(store_path).url())
    }

    /// Rewrites one narinfo line by line.
    fn edit(&self, store_path: &str, edit: impl Fn(&str) -> Option<String>) {
        let file = self.narinfo_file(store_path);
        let text = std::fs::read_to_string(&file).unwrap();
        let edited: String = text
            .lines()
            .filter_map(|line| edit(line).map(|l| l + "\n"))
            .collect();
        std::fs::write(&file, edited).unwrap();
    }

    /// Replaces a narinfo's signatures with a fresh one by `key_file` over its fingerprint.
    fn sign(&self, store_path: &str, key_file: &str) {
        let key = SigningKey::parse(std::fs::read_to_string(key_file).unwrap().trim()).unwrap();
        let fingerprint = self.narinfo(store_path).fingerprint();
        let sig = key.sign(fingerprint.as_bytes());
        self.edit(store_path, |line| {
            (!line.starts_with("Sig:")).then(|| line.to_owned())
        });
        let file = self.narinfo_file(store_path);
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&format!("Sig: {sig}\n"));
        std::fs::write(&file, text).unwrap();
    }

    /// Publishes a hand-made NAR as `store_path` (no references), signed by the trusted key.
    fn publish_raw_nar(&self, store_path: &str, nar_bytes: &[u8], nar_summary: NarSummary) {
        let base = store_path.trim_start_matches("/nix/store/");
        let nar_name = format!("nar/raw-{}.nar", &base[..32]);
        std::fs::write(self.path().join(&nar_name), nar_bytes).unwrap();
        let text = format!(
            "StorePath: {store_path}\nURL: {nar_name}\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: \n",
            nar_summary.nar_hash.to_nix32_string(),
            nar_summary.nar_size
        );
        std::fs::write(self.narinfo_file(store_path), text).unwrap();
        self.sign(store_path, fixtures().secret_key_file());
    }
}

struct Setup {
    store: Arc<Store>,
    substituter: Arc<Substituter>,
    _root: tempfile::TempDir,
}

fn setup_with(urls: &[String], trusted: &[&str], fetch: FetchConfig) -> Setup {
    let root = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(root.path()).unwrap());
    let urls = urls
        .iter()
        .map(|u| SubstituterUrl::parse(u).unwrap())
        .collect();
    let cache = Arc::new(BinaryCacheClient::new(urls, fetch).unwrap());
    let keys = trusted
        .iter()
        .map(|k| VerifyingKey::parse(k).unwrap())
        .collect();
    let substituter = Substituter::new(
        store.clone(),
        cache,
        SubstituterConfig::new(TrustedKeys::new(keys)),
    );
    Setup {
        store,
        substituter,
        _root: root,
    }
}

fn setup(url: &str) -> Setup {
    setup_with(&[url.to_owned()], &[fixtures().public_key()], quick_fetch())
}

fn quick_fetch() -> FetchConfig {
    FetchConfig {
        stall_timeout: Duration::from_secs(2),
        retry_base_delay: Duration::from_millis(20),
        ..FetchConfig::default()
    }
}

fn wanted(path: &str) -> Wanted {
    Wanted::Path(StorePath::from_absolute_path(path).unwrap())
}

impl Setup {
    async fn pull(&self, path: &str) -> Result<nix_cri::store::Realised, String> {
        let root = RootName::new(RootKind::Cli, "test").unwrap();
        self.substituter
            .realise(&wanted(path), Some(&root))
            .await
            .map_err(|e| e.to_string())
    }

    /// The store holds no valid path and no file: the failed pull left nothing.
    fn assert_empty(&self) {
        assert_eq!(
            self.store.usage().unwrap().paths,
            0,
            "paths were registered"
        );
        let entries: Vec<_> = std::fs::read_dir(self.store.store_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(entries.is_empty(), "left on disk: {entries:?}");
        assert!(self.store.roots().unwrap().is_empty(), "a root was added");
    }
}

/// Asserts the pull failed with a message holding every one of `needles`, and left nothing.
async fn assert_refused(setup: &Setup, path: &str, needles: &[&str]) {
    let err = setup.pull(path).await.expect_err("the pull must fail");
    for needle in needles {
        assert!(err.contains(needle), "error lacks {needle:?}: {err}");
    }
    setup.assert_empty();
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_narinfo_names_the_path() {
    let fx = fixtures();
    let cache = ScratchCache::of("none");
    let bottom = fx.path("diamond_bottom");
    std::fs::remove_file(cache.narinfo_file(bottom)).unwrap();
    let s = setup(&cache.url());
    assert_refused(
        &s,
        fx.closure("main"),
        &[bottom, "no substituter has", "not found"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_or_untrusted_signatures_are_refused() {
    let fx = fixtures();
    let top = fx.closure("main");

    let cache = ScratchCache::of("none");
    cache.edit(top, |line| {
        Some(match line.strip_prefix("Sig: ") {
            // Flip one base64 character of the signature.
            Some(sig) => {
                let (head, tail) = sig.split_at(sig.len() - 10);
                let flipped = if tail.starts_with('A') { 'B' } else { 'A' };
                format!("Sig: {head}{flipped}{}", &tail[1..])
            }
            None => line.to_owned(),
        })
    });
    let s = setup(&cache.url());
    assert_refused(&s, top, &[top, "no valid signature", "nix-cri-test-1"]).await;

    let cache = ScratchCache::of("none");
    let s = setup_with(&[cache.url()], &[fx.untrusted_public_key()], quick_fetch());
    assert_refused(
        &s,
        top,
        &[top, "no valid signature", "trusted: other-key-1"],
    )
    .await;

    // Signed, but by a key nobody trusts.
    cache.sign(top, fx.untrusted_secret_key_file());
    let s = setup(&cache.url());
    assert_refused(&s, top, &[top, "signed by: other-key-1"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nar_hash_and_size_mismatches_are_refused() {
    let fx = fixtures();
    let top = fx.closure("main");
    let bottom = fx.path("diamond_bottom");
    let other_hash = ScratchCache::of("none")
        .narinfo(fx.path("busybox"))
        .nar_hash()
        .to_nix32_string();

    let cache = ScratchCache::of("none");
    cache.edit(bottom, |line| {
        Some(if line.starts_with("NarHash:") {
            format!("NarHash: {other_hash}")
        } else {
            line.to_owned()
        })
    });
    cache.sign(bottom, fx.secret_key_file());
    assert_refused(&setup(&cache.url()), top, &[bottom, "hash mismatch"]).await;

    for delta in [1i64, -1] {
        let cache = ScratchCache::of("none");
        let size = cache.narinfo(bottom).nar_size() as i64;
        cache.edit(bottom, |line| {
            Some(if line.starts_with("NarSize:") {
                format!("NarSize: {}", size + delta)
            } else {
                line.to_owned()
            })
        });
        cache.sign(bottom, fx.secret_key_file());
        let needle = if delta > 0 { "size mismatch" } else { "NAR" };
        assert_refused(&setup(&cache.url()), top, &[bottom, needle]).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_nar_and_corrupt_compression_are_refused() {
    let fx = fixtures();
    let top = fx.closure("main");
    let big = fx.path("big_file");

    let cache = ScratchCache::of("none");
    let nar = cache.nar_file(big);
    let len = std::fs::metadata(&nar).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&nar)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    assert_refused(&setup(&cache.url()), top, &[big, "truncated"]).await;

    for compression in ["xz", "zstd", "bzip2"] {
        let cache = ScratchCache::of(compression);
        let nar = cache.nar_file(big);
        let mut bytes = std::fs::read(&nar).unwrap();
        let middle = bytes.len() / 2;
        for b in &mut bytes[middle..middle + 64] {
            *b ^= 0x5a;
        }
        std::fs::write(&nar, bytes).unwrap();
        // xz and bzip2 check their own CRCs; zstd as Nix writes it has no checksum, so its
        // garbage is caught by the NAR grammar or the NAR hash instead.
        let s = setup(&cache.url());
        let err = s.pull(top).await.expect_err("corrupt NAR accepted");
        assert!(err.contains(big), "{err}");
        assert!(
            err.contains(compression) || err.contains("hash mismatch"),
            "{compression}: {err}"
        );
        s.assert_empty();
    }
}

/// A NAR of a directory whose entries are given raw, so names and order can break the rules.
fn raw_directory_nar(entries: &[&[u8]]) -> Vec<u8> {
    fn token(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    let mut out = Vec::new();
    for t in [&b"nix-archive-1"[..], b"(", b"type", b"directory"] {
        token(&mut out, t);
    }
    for name in entries {
        for t in [
            &b"entry"[..],
            b"(",
            b"name",
            name,
            b"node",
            b"(",
            b"type",
            b"regular",
        ] {
            token(&mut out, t);
        }
        for t in [&b"contents"[..], b"x", b")", b")"] {
            token(&mut out, t);
        }
    }
    token(&mut out, b")");
    out
}

fn summary_of(bytes: &[u8]) -> NarSummary {
    use sha2::Digest;
    NarSummary {
        nar_hash: nix_cri::nix::Sha256Digest::from_bytes(sha2::Sha256::digest(bytes).into()),
        nar_size: bytes.len() as u64,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nar_grammar_violations_are_refused() {
    let path = "/nix/store/0000000000000000000000000000000a-bad-nar";
    for (entries, cause) in [
        (&[&b".."[..]][..], ".."),
        (&[&b"a/b"[..]], "/"),
        (&[&b"b"[..], b"a"], "ascending"),
        (&[&b"a"[..], b"a"], "ascending"),
    ] {
        let cache = ScratchCache::of("none");
        let bytes = raw_directory_nar(entries);
        assert!(
            nar::unpack(&bytes[..], &mut nar::NullSink, &nar::NarLimits::default()).is_err(),
            "the reader must refuse {entries:?}"
        );
        cache.publish_raw_nar(path, &bytes, summary_of(&bytes));
        assert_refused(&setup(&cache.url()), path, &[path, cause]).await;
    }
    // The same NAR with proper entries goes through, so the refusals above are the grammar's.
    let cache = ScratchCache::of("none");
    let bytes = raw_directory_nar(&[b"a", b"b"]);
    cache.publish_raw_nar(path, &bytes, summary_of(&bytes));
    setup(&cache.url()).pull(path).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn narinfo_for_another_path_or_with_a_bad_reference_is_refused() {
    let fx = fixtures();
    let top = fx.closure("main");
    let left = fx.path("diamond_left");

    // The narinfo served under left's hash describes bottom.
    let cache = ScratchCache::of("none");
    std::fs::copy(
        cache.narinfo_file(fx.path("diamond_bottom")),
        cache.narinfo_file(left),
    )
    .unwrap();
    assert_refused(
        &setup(&cache.url()),
        top,
        &[left, "describes", fx.path("diamond_bottom")],
    )
    .await;

    let cache = ScratchCache::of("none");
    cache.edit(left, |line| {
        Some(if line.starts_with("References:") {
            format!("{line} not-a-store-path")
        } else {
            line.to_owned()
        })
    });
    assert_refused(&setup(&cache.url()), top, &["not-a-store-path"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_overlapping_pulls_fetch_each_nar_once() {
    let fx = fixtures();
    let server = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    // The shared bottom of the diamond arrives slowly, so whichever pull starts it, the other
    // finds it in flight and must join rather than fetch it again.
    let bottom = fx.path("diamond_bottom");
    let bottom_nar = format!("/{}", ScratchCache::of("zstd").narinfo(bottom).url());
    server.inject(
        &bottom_nar,
        [Fault::Drip {
            chunk: 32,
            pause: Duration::from_millis(100),
        }],
    );
    let s = setup(&server.url());
    let (main, overlap) = (wanted(fx.closure("main")), wanted(fx.closure("overlap")));
    let (a, b) = tokio::join!(
        s.substituter.realise(&main, None),
        s.substituter.realise(&overlap, None),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.closure.len(), 19);
    assert_eq!(b.closure.len(), 5);

    // Paths with identical contents share one NAR file, so count the paths behind each URL.
    let cache = ScratchCache::of("zstd");
    let union: std::collections::BTreeSet<_> = a.closure.iter().chain(&b.closure).collect();
    assert_eq!(union.len(), 21);
    let mut expected: std::collections::BTreeMap<String, usize> = Default::default();
    for path in &union {
        let url = format!("/{}", cache.narinfo(&path.to_absolute_path()).url());
        *expected.entry(url).or_default() += 1;
    }
    let nar_requests: std::collections::BTreeMap<String, usize> = server
        .all_requests()
        .into_iter()
        .filter(|(p, _)| p.starts_with("/nar/"))
        .collect();
    assert_eq!(nar_requests, expected, "each path's NAR fetched once");
    assert_eq!(s.substituter.nars_started(), union.len() as u64);
    // Together they fetched the shared paths once: one pull joined the other's fetches.
    assert_eq!(
        a.fetched.len() + b.fetched.len(),
        union.len() + a.joined + b.joined
    );
    assert!(
        a.joined + b.joined > 0,
        "the pulls overlapped but did not share"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn caches_are_asked_in_priority_order_and_misses_fall_through() {
    let fx = fixtures();
    let empty = tempfile::tempdir().unwrap();
    std::fs::write(
        empty.path().join("nix-cache-info"),
        "StoreDir: /nix/store\nPriority: 10\n",
    )
    .unwrap();
    let empty_server = CacheServer::start(empty.path().to_owned()).await.unwrap();
    let full = CacheServer::start(fx.cache_dir("xz")).await.unwrap();
    // The full cache is listed first but has the default priority 50; the empty one (10) is
    // asked first and answers 404 for everything.
    let s = setup_with(
        &[full.url(), empty_server.url()],
        &[fx.public_key()],
        quick_fetch(),
    );
    let realised = s.pull(fx.closure("disjoint")).await.unwrap();
    assert_eq!(realised.closure.len(), 2);
    for pulled in &realised.fetched {
        assert_eq!(pulled.substituter, full.url());
    }
    let top_hash = &fx.closure("disjoint")[11..43];
    assert_eq!(empty_server.requests(&format!("/{top_hash}.narinfo")), 1);
    assert_eq!(full.requests(&format!("/{top_hash}.narinfo")), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_faults_are_retried() {
    let fx = fixtures();
    let cache = ScratchCache::of("xz");
    let server = CacheServer::start(cache.path().to_owned()).await.unwrap();
    let big = fx.path("big_file");
    let top = fx.closure("disjoint");
    let top_hash = &top[11..43];
    let nar_url = format!("/{}", cache.narinfo(big).url());
    server.inject(
        &format!("/{top_hash}.narinfo"),
        [Fault::Status(500), Fault::Status(503)],
    );
    server.inject(&nar_url, [Fault::Truncate(100_000), Fault::Status(502)]);

    let s = setup(&server.url());
    s.pull(top).await.unwrap();
    s.pull(big).await.unwrap();
    assert_eq!(server.requests(&format!("/{top_hash}.narinfo")), 3);
    assert_eq!(
        server.requests(&nar_url),
        3,
        "cut transfer, 502, then success"
    );
    assert!(
        s.store
            .is_valid(&StorePath::from_absolute_path(big).unwrap())
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_transfers_time_out_and_register_nothing() {
    let fx = fixtures();
    let cache = ScratchCache::of("none");
    let server = CacheServer::start(cache.path().to_owned()).await.unwrap();
    let big = fx.path("big_file");
    let nar_url = format!("/{}", cache.narinfo(big).url());
    server.inject(&nar_url, std::iter::repeat_n(Fault::Stall(4096), 10));
    let fetch = FetchConfig {
        stall_timeout: Duration::from_millis(300),
        max_retries: 2,
        retry_base_delay: Duration::from_millis(10),
        ..FetchConfig::default()
    };
    let s = setup_with(&[server.url()], &[fx.public_key()], fetch);
    let start = Instant::now();
    let err = s.pull(big).await.unwrap_err();
    assert!(err.contains("sent no data") && err.contains(big), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(server.requests(&nar_url), 3, "first try and two retries");
    s.assert_empty();
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_cache_is_a_clear_error() {
    let fx = fixtures();
    // A port nothing listens on: bind, note the port, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let fetch = FetchConfig {
        max_retries: 1,
        retry_base_delay: Duration::from_millis(10),
        ..quick_fetch()
    };
    let s = setup_with(std::slice::from_ref(&url), &[fx.public_key()], fetch);
    let top = fx.closure("disjoint");
    let err = s.pull(top).await.unwrap_err();
    assert!(
        err.contains(top) && err.contains(&url) && err.contains("cannot reach"),
        "{err}"
    );
    s.assert_empty();
}

#[tokio::test(flavor = "multi_thread")]
async fn leftovers_of_interrupted_writes_are_removed_at_open() {
    let fx = fixtures();
    let cache = ScratchCache::of("none");
    let s = setup(&cache.url());
    s.pull(fx.closure("disjoint")).await.unwrap();
    let Setup {
        store,
        substituter,
        _root: root_dir,
    } = s;
    let store_dir = store.store_dir().to_owned();
    drop((store, substituter));

    // What a kill -9 can leave: a half-unpacked temporary, and a complete tree renamed into
    // place whose registration never happened.
    std::fs::create_dir_all(store_dir.join(".nix-cri-tmp-1-x/sub")).unwrap();
    let unregistered = store_dir.join("0000000000000000000000000000000b-ghost");
    std::fs::create_dir_all(&unregistered).unwrap();

    let store = Store::open(root_dir.path()).unwrap();
    assert!(!store_dir.join(".nix-cri-tmp-1-x").exists());
    assert!(!unregistered.exists());
    assert_eq!(store.usage().unwrap().paths, 2, "valid paths stay");
}
