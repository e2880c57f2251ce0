//! `nix-cri pull` and `nix-cri gc` against real Nix 2.8: the fixture closures, published by
//! real Nix as signed caches, served over loopback HTTP; the resulting store checked by real Nix.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use nix_cri_e2e::{CacheServer, fixtures, nix_command, nix_cri_bin, run};
use serde_json::Value;

const COMPRESSIONS: [&str; 4] = ["xz", "zstd", "bzip2", "none"];

fn pull(root: &Path, server: &CacheServer, path: &str) -> anyhow::Result<String> {
    let output = run(Command::new(nix_cri_bin())
        .arg("pull")
        .arg("--root")
        .arg(root)
        .args(["--substituter", &server.url()])
        .args(["--trusted-public-key", fixtures().public_key()])
        .arg(path))?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `nix path-info -r --json` as path → (narHash, narSize, references).
fn path_infos(
    store: Option<&Path>,
    path: &str,
) -> BTreeMap<String, (String, u64, BTreeSet<String>)> {
    let mut command = nix_command("nix");
    command.args(["path-info", "-r", "--json"]);
    if let Some(store) = store {
        command.arg("--store").arg(store);
    }
    let output = run(command.arg(path)).expect("nix path-info");
    let json: Value = serde_json::from_slice(&output.stdout).expect("path-info JSON");
    json.as_array()
        .expect("path-info gives a list")
        .iter()
        .map(|info| {
            let refs = info["references"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            (
                info["path"].as_str().unwrap_or_default().to_owned(),
                (
                    info["narHash"].as_str().unwrap_or_default().to_owned(),
                    info["narSize"].as_u64().unwrap_or_default(),
                    refs,
                ),
            )
        })
        .collect()
}

/// Compares two trees entry by entry: type, permission bits, contents, symlink targets.
fn assert_same_tree(expected: &Path, actual: &Path) {
    let e = std::fs::symlink_metadata(expected).expect("expected tree");
    let a = std::fs::symlink_metadata(actual)
        .unwrap_or_else(|err| panic!("{} is missing: {err}", actual.display()));
    assert_eq!(e.file_type(), a.file_type(), "{}", actual.display());
    if e.file_type().is_symlink() {
        assert_eq!(
            std::fs::read_link(expected).ok(),
            std::fs::read_link(actual).ok()
        );
        return;
    }
    assert_eq!(
        e.permissions().mode() & 0o7777,
        a.permissions().mode() & 0o7777,
        "mode of {}",
        actual.display()
    );
    if e.is_file() {
        assert!(
            std::fs::read(expected).ok() == std::fs::read(actual).ok(),
            "contents of {}",
            actual.display()
        );
    } else {
        let names = |dir: &Path| -> BTreeSet<_> {
            std::fs::read_dir(dir)
                .expect("read dir")
                .map(|e| e.expect("entry").file_name())
                .collect()
        };
        let expected_names = names(expected);
        assert_eq!(
            expected_names,
            names(actual),
            "entries of {}",
            actual.display()
        );
        for name in expected_names {
            assert_same_tree(&expected.join(&name), &actual.join(&name));
        }
    }
}

fn assert_nix_verifies(root: &Path) {
    let output = run(nix_command("nix-store")
        .arg("--store")
        .arg(root)
        .args(["--verify", "--check-contents"]))
    .expect("nix-store --verify");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("error")
            && !stderr.contains("modified")
            && !stderr.contains("disappeared"),
        "nix-store --verify complained:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_matches_real_nix_for_every_compression() {
    let fx = fixtures();
    let main = fx.closure("main");
    let expected = path_infos(None, main);
    assert!(
        expected.len() >= 19,
        "fixture closure is too small: {expected:?}"
    );

    for compression in COMPRESSIONS {
        let server = CacheServer::start(fx.cache_dir(compression)).await.unwrap();
        let root = tempfile::tempdir().unwrap();
        let report = pull(root.path(), &server, main)
            .unwrap_or_else(|err| panic!("pull from the {compression} cache: {err}"));
        assert!(
            report.contains(&format!("{} paths in closure", expected.len())),
            "{report}"
        );

        // Nothing but the closure is in the store: no temporaries left behind. (Listed before
        // real Nix opens the store: it adds its own `.links`.)
        let entries: BTreeSet<String> = std::fs::read_dir(root.path().join("nix/store"))
            .unwrap()
            .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_string_lossy()))
            .collect();
        assert_eq!(entries, expected.keys().cloned().collect(), "{compression}");

        assert_nix_verifies(root.path());
        assert_eq!(
            path_infos(Some(root.path()), main),
            expected,
            "{compression}: nix path-info differs from the source store"
        );
        for path in expected.keys() {
            let actual = root.path().join(path.trim_start_matches('/'));
            assert_same_tree(Path::new(path), &actual);
        }
        // A second pull finds everything valid and fetches nothing.
        let before = server.all_requests();
        let again = pull(root.path(), &server, main).unwrap();
        assert!(again.contains("0 fetched"), "{again}");
        let after = server.all_requests();
        assert_eq!(before, after, "a warm pull made requests");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_reference_forms_pull_the_same_closure() {
    let fx = fixtures();
    let main = fx.closure("main");
    let server = CacheServer::start(fx.cache_dir("zstd")).await.unwrap();
    let base = main.trim_start_matches("/nix/store/");
    let hash = &base[..32];
    for reference in [
        format!("nix:0{main}:latest"),
        format!("nix:0/{base}"),
        format!("nix:0/{hash}"),
        base.to_owned(),
    ] {
        let root = tempfile::tempdir().unwrap();
        let report = pull(root.path(), &server, &reference)
            .unwrap_or_else(|err| panic!("pull {reference}: {err}"));
        assert!(
            report.contains(&format!("{main}: 19 paths in closure")),
            "{reference}: {report}"
        );
        // The CLI roots what it pulled, where real Nix finds it.
        let roots = root.path().join("nix/var/nix/gcroots/nix-cri/cli");
        let links: Vec<_> = std::fs::read_dir(&roots).unwrap().collect();
        assert_eq!(links.len(), 1, "{reference}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_deletes_exactly_what_real_nix_would() {
    let fx = fixtures();
    let (main, overlap) = (fx.closure("main"), fx.closure("overlap"));
    let server = CacheServer::start(fx.cache_dir("xz")).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    pull(root.path(), &server, main).unwrap();
    pull(root.path(), &server, overlap).unwrap();

    let main_closure: BTreeSet<String> = path_infos(Some(root.path()), main).into_keys().collect();
    let overlap_closure: BTreeSet<String> =
        path_infos(Some(root.path()), overlap).into_keys().collect();
    let only_main: BTreeSet<String> = main_closure.difference(&overlap_closure).cloned().collect();
    assert!(!only_main.is_empty() && main_closure.len() > only_main.len());

    let gc = |dry_run: bool| -> BTreeSet<String> {
        let mut command = Command::new(nix_cri_bin());
        command.arg("gc").arg("--root").arg(root.path());
        if dry_run {
            command.arg("--dry-run");
        }
        let output = run(&mut command).unwrap();
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    };
    assert!(gc(true).is_empty(), "both closures are rooted");

    let main_root = root
        .path()
        .join("nix/var/nix/gcroots/nix-cri/cli")
        .join(main.trim_start_matches("/nix/store/"));
    std::fs::remove_file(&main_root).expect("the CLI rooted main");

    let nix_dead: BTreeSet<String> = String::from_utf8_lossy(
        &run(nix_command("nix-store")
            .arg("--store")
            .arg(root.path())
            .args(["--gc", "--print-dead"]))
        .unwrap()
        .stdout,
    )
    .lines()
    .map(str::to_owned)
    .collect();
    assert_eq!(nix_dead, only_main, "real Nix's idea of dead paths");
    assert_eq!(gc(true), only_main, "dry run");
    assert_eq!(gc(false), only_main, "deleted");

    for path in &only_main {
        assert!(
            !root.path().join(path.trim_start_matches('/')).exists(),
            "{path} still on disk"
        );
    }
    assert_eq!(
        path_infos(Some(root.path()), overlap)
            .into_keys()
            .collect::<BTreeSet<_>>(),
        overlap_closure
    );
    assert_nix_verifies(root.path());
    assert!(gc(false).is_empty(), "a second collection finds nothing");
}

#[test]
fn path_info_reports_what_nix_registered() {
    // path-info on a path that is not there names it.
    let root = tempfile::tempdir().unwrap();
    let path = fixtures().closure("disjoint");
    let output = Command::new(nix_cri_bin())
        .args(["path-info", "--root"])
        .arg(root.path())
        .arg(path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(path) && stderr.contains("not valid"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn path_info_json_has_nix_fields() {
    let fx = fixtures();
    let disjoint = fx.closure("disjoint");
    let server = CacheServer::start(fx.cache_dir("none")).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    pull(root.path(), &server, disjoint).unwrap();
    let ours = run(Command::new(nix_cri_bin())
        .args(["path-info", "--json", "-r", "--root"])
        .arg(root.path())
        .arg(disjoint))
    .unwrap();
    let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
    let nix = path_infos(Some(root.path()), disjoint);
    let ours: BTreeMap<String, (String, u64, BTreeSet<String>)> = ours
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["path"].as_str().unwrap().to_owned(),
                (
                    i["narHash"].as_str().unwrap().to_owned(),
                    i["narSize"].as_u64().unwrap(),
                    i["references"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|r| r.as_str().unwrap().to_owned())
                        .collect(),
                ),
            )
        })
        .collect();
    assert_eq!(ours, nix);
}
