//! Fault injection: nix-cri killed mid-pull, a full disk, many concurrent pulls, slow caches.
//! Every scenario is bounded in time and uses loopback only. After each fault the store must
//! verify with real Nix, hold no leftovers, and keep every root it had.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix_cri::cache::{BinaryCacheClient, FetchConfig, SubstituterUrl};
use nix_cri::nix::{NarInfo, StorePath, TrustedKeys, VerifyingKey};
use nix_cri::store::{Store, Substituter, SubstituterConfig, Wanted};
use nix_cri_e2e::{
    CacheServer, Fault, GoCall, GrpcGoCaller, fixtures, nix_command, nix_cri_bin, run,
};

fn pull_command(root: &Path, url: &str, path: &str) -> Command {
    let mut command = Command::new(nix_cri_bin());
    command
        .arg("pull")
        .arg("--root")
        .arg(root)
        .args(["--substituter", url])
        .args(["--trusted-public-key", fixtures().public_key()])
        .arg(path);
    command
}

/// Real Nix finds the store consistent, and nothing but store paths is in it.
fn assert_store_sound(root: &Path) {
    let leftovers: Vec<String> = std::fs::read_dir(root.join("nix/store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.') && name != ".links")
        .collect();
    assert!(
        leftovers.is_empty(),
        "leftovers in the store: {leftovers:?}"
    );
    let output = run(nix_command("nix-store")
        .arg("--store")
        .arg(root)
        .args(["--verify", "--check-contents"]))
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("error")
            && !stderr.contains("modified")
            && !stderr.contains("disappeared"),
        "{stderr}"
    );
}

fn narinfo(cache: &Path, path: &str) -> NarInfo {
    let hash = &path["/nix/store/".len()..][..32];
    NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{hash}.narinfo"))).unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_mid_pull_the_store_stays_sound_and_roots_stay() {
    let fx = fixtures();
    let cache_dir = fx.cache_dir("none");
    let server = CacheServer::start(cache_dir.clone()).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let main = fx.closure("main");

    // A closure rooted before the crashes must survive all of them.
    run(&mut pull_command(
        root.path(),
        &server.url(),
        fx.closure("disjoint"),
    ))
    .unwrap();
    let disjoint_root = root
        .path()
        .join("nix/var/nix/gcroots/nix-cri/cli")
        .join(&fx.closure("disjoint")["/nix/store/".len()..]);
    assert!(disjoint_root.exists());

    let big_nar = format!("/{}", narinfo(&cache_dir, fx.path("big_file")).url());
    let main_root = root
        .path()
        .join("nix/var/nix/gcroots/nix-cri/cli")
        .join(&main["/nix/store/".len()..]);
    let trials = 24;
    let mut interrupted = 0;
    for trial in 0..trials {
        // The big NAR drips, so kills land before, during and after the transfers, and in the
        // commits that follow; the delays spread over the whole pull.
        server.inject(
            &big_nar,
            [Fault::Drip {
                chunk: 512 << 10,
                pause: Duration::from_millis(40),
            }],
        );
        let delay = Duration::from_millis(30 + (trial * 997 % 23) * 45);
        let mut child = pull_command(root.path(), &server.url(), main)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(delay).await;
        let _ = child.kill();
        let _ = child.wait();
        // Count the kills that cut a pull short, so the test cannot pass by killing too late.
        if Store::open(root.path()).unwrap().usage().unwrap().paths < 21 {
            interrupted += 1;
        }

        // Restarted, the pull completes; the store is sound; both roots hold.
        let output = run(&mut pull_command(root.path(), &server.url(), main))
            .unwrap_or_else(|err| panic!("trial {trial} (kill after {delay:?}): {err}"));
        assert!(String::from_utf8_lossy(&output.stdout).contains("19 paths in closure"));
        assert_store_sound(root.path());
        assert!(
            disjoint_root.exists() && main_root.exists(),
            "trial {trial}: a root is gone"
        );

        // Start the next trial from a store without main's closure.
        std::fs::remove_file(&main_root).unwrap();
        run(Command::new(nix_cri_bin())
            .args(["gc", "--root"])
            .arg(root.path()))
        .unwrap();
    }
    let store = Store::open(root.path()).unwrap();
    assert_eq!(
        store.usage().unwrap().paths,
        2,
        "only the disjoint closure is left"
    );
    assert!(
        interrupted >= trials / 2,
        "only {interrupted} of {trials} kills interrupted a pull"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_is_a_clear_error_and_leaves_a_consistent_store() {
    let fx = fixtures();
    let root = tempfile::tempdir().unwrap();
    // A 4 MiB tmpfs: the 8 MiB file of the main closure cannot fit.
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(root.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(root.path());

    let server = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    run(&mut pull_command(
        root.path(),
        &server.url(),
        fx.closure("disjoint"),
    ))
    .unwrap();
    let output = pull_command(root.path(), &server.url(), fx.closure("main"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    // Said as what it is, not as a fault of the cache's NAR.
    assert!(
        stderr.contains("no space left on the store's file system"),
        "{stderr}"
    );
    assert!(!stderr.contains("bad NAR"), "{stderr}");
    assert!(
        stderr.contains("/nix/store/"),
        "the error names the path: {stderr}"
    );

    // What was there is intact, nothing of the failed pull is registered, no leftovers.
    let store = Store::open(root.path()).unwrap();
    assert_eq!(store.usage().unwrap().paths, 2, "only the disjoint closure");
    assert_store_sound(root.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_concurrent_overlapping_pulls_fetch_each_nar_once() {
    let fx = fixtures();
    let server = CacheServer::start(fx.cache_dir("xz")).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(root.path()).unwrap());
    let cache = Arc::new(
        BinaryCacheClient::new(
            vec![SubstituterUrl::parse(&server.url()).unwrap()],
            FetchConfig::default(),
        )
        .unwrap(),
    );
    let keys = TrustedKeys::new(vec![VerifyingKey::parse(fx.public_key()).unwrap()]);
    let substituter = Substituter::new(store.clone(), cache, SubstituterConfig::new(keys));
    let tops = ["main", "overlap", "disjoint", "image"].map(|c| fx.closure(c).to_owned());
    let started = Instant::now();
    let pulls = (0..100).map(|i| {
        let substituter = substituter.clone();
        let top = tops[i % tops.len()].clone();
        tokio::spawn(async move {
            let wanted = Wanted::Path(StorePath::from_absolute_path(&top).unwrap());
            substituter
                .realise(&wanted, None)
                .await
                .map(|r| r.closure.len())
        })
    });
    let results = futures_util::future::join_all(pulls).await;
    for result in results {
        result.unwrap().unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(60));

    let union: BTreeSet<StorePath> = tops
        .iter()
        .flat_map(|t| {
            store
                .closure(&[StorePath::from_absolute_path(t).unwrap()])
                .unwrap()
        })
        .collect();
    let cache_dir = fx.cache_dir("xz");
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for path in &union {
        *expected
            .entry(format!(
                "/{}",
                narinfo(&cache_dir, &path.to_absolute_path()).url()
            ))
            .or_default() += 1;
    }
    let nar_requests: BTreeMap<String, usize> = server
        .all_requests()
        .into_iter()
        .filter(|(p, _)| p.starts_with("/nar/"))
        .collect();
    assert_eq!(nar_requests, expected, "every NAR fetched once");
    assert_eq!(substituter.nars_started(), union.len() as u64);
    assert_store_sound(root.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_drip_within_the_stall_timeout_succeeds_and_one_beyond_it_fails_in_time() {
    let fx = fixtures();
    let cache_dir = fx.cache_dir("none");
    let server = CacheServer::start(cache_dir.clone()).await.unwrap();
    let leaf = fx.path("disjoint_leaf");
    let nar = format!("/{}", narinfo(&cache_dir, leaf).url());

    // 64-byte pieces 100 ms apart: slow, but never silent for the 1 s stall timeout.
    server.inject(
        &nar,
        [Fault::Drip {
            chunk: 64,
            pause: Duration::from_millis(100),
        }],
    );
    let root = tempfile::tempdir().unwrap();
    run(pull_command(root.path(), &server.url(), leaf).args(["--stall-timeout-secs", "1"]))
        .unwrap();

    // Pieces 2 s apart with a 1 s stall timeout and one retry: fails within a few seconds.
    let slow = Fault::Drip {
        chunk: 64,
        pause: Duration::from_secs(2),
    };
    server.inject(&nar, [slow.clone(), slow]);
    let root = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = pull_command(root.path(), &server.url(), leaf)
        .args(["--stall-timeout-secs", "1", "--retries", "1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("sent no data for 1s") && stderr.contains(leaf),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(Store::open(root.path()).unwrap().usage().unwrap().paths, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_restarting_under_a_live_nix_cri_is_unavailable_then_recovers() {
    use k8s_cri::v1 as cri;
    use nix_cri_e2e::NixCriServer;
    use nix_cri_e2e::containerd::{Containerd, image_client, runtime_client};

    let fx = fixtures();
    let mut containerd = Containerd::start().await.expect("start containerd");
    let cache = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    let nix_cri = NixCriServer::start(containerd.socket(), &cache.url(), &[])
        .await
        .unwrap();
    let mut runtime = runtime_client(&nix_cri.socket).await.unwrap();
    runtime
        .version(cri::VersionRequest::default())
        .await
        .unwrap();
    // kubelet's own client too, grpc-go, its one connection kept throughout.
    let version = GoCall::unary("/runtime.v1.RuntimeService/Version", b"\x0a\x02v1", 4);
    let mut kubelet = GrpcGoCaller::connect(&nix_cri.socket);
    let results = kubelet.round(std::slice::from_ref(&version)).await;
    assert!(results[0].iter().all(|r| r.code == 0), "{results:?}");

    containerd.kill();
    for _ in 0..3 {
        let status = runtime
            .version(cri::VersionRequest::default())
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            status
                .message()
                .contains(&containerd.socket().display().to_string()),
            "the message names the socket: {}",
            status.message()
        );
    }
    let results = kubelet.round(std::slice::from_ref(&version)).await;
    for result in &results[0] {
        assert_eq!(result.code, 14, "UNAVAILABLE: {result:?}");
        let socket = containerd.socket().display().to_string();
        assert!(result.message.contains(&socket), "{result:?}");
    }
    let (status, body) = nix_cri_e2e::http_get(nix_cri.metrics, "/readyz").unwrap();
    assert_eq!(status, 503, "{body}");

    containerd.restart().await.unwrap();
    // The same nix-cri process, not restarted, serves again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match runtime.version(cri::VersionRequest::default()).await {
            Ok(_) => break,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("no recovery: {status:?}\n{}", nix_cri.log_tail()),
        }
    }
    assert_eq!(
        nix_cri_e2e::http_get(nix_cri.metrics, "/readyz").unwrap().0,
        200
    );
    // grpc-go recovers on the same client: the calls that still meet the dead runtime are
    // UNAVAILABLE, then all succeed, across the GOAWAY that moves it to a relayed connection.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut good_rounds = 0;
    while good_rounds < 3 {
        let results = kubelet.round(std::slice::from_ref(&version)).await;
        if results[0].iter().all(|r| r.code == 0) {
            good_rounds += 1;
        } else {
            assert!(good_rounds == 0, "a failure after recovery: {results:?}");
            assert!(
                results[0].iter().all(|r| r.code == 0 || r.code == 14),
                "{results:?}"
            );
            assert!(Instant::now() < deadline, "no recovery: {results:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let pulled = image_client(&nix_cri.socket)
        .await
        .unwrap()
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: format!("nix:0{}", fx.closure("disjoint")),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("pull after recovery: {e}\n{}", nix_cri.log_tail()));
    let image_id = pulled.into_inner().image_ref;
    assert!(containerd.is_image_id(&image_id), "{image_id}");
}
