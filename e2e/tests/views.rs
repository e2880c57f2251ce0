//! Closure views (src/store/views.rs) on a store filled from the fixture cache real Nix wrote:
//! a view holds exactly the closure, as hard links to the store's own files; GC takes views
//! whose top lost its roots, and a failed build leaves nothing.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use nix_cri::cache::{BinaryCacheClient, FetchConfig, SubstituterUrl};
use nix_cri::nix::{StorePath, TrustedKeys, VerifyingKey};
use nix_cri::store::{RootKind, RootName, Store, Substituter, SubstituterConfig, Wanted};
use nix_cri_e2e::fixtures;

struct Setup {
    store: Arc<Store>,
    substituter: Arc<Substituter>,
    _root: tempfile::TempDir,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(root.path()).unwrap());
    let url = format!("file://{}", fixtures().cache_dir("xz").display());
    let cache = BinaryCacheClient::new(
        vec![SubstituterUrl::parse(&url).unwrap()],
        FetchConfig::default(),
    )
    .unwrap();
    let key = VerifyingKey::parse(fixtures().public_key()).unwrap();
    let substituter = Substituter::new(
        store.clone(),
        Arc::new(cache),
        SubstituterConfig::new(TrustedKeys::new(vec![key])),
    );
    Setup {
        store,
        substituter,
        _root: root,
    }
}

impl Setup {
    /// Pulls `path`'s closure and roots it as image `image`.
    async fn pull_as_image(&self, path: &str, image: &str) -> (StorePath, BTreeSet<StorePath>) {
        let root = RootName::new(RootKind::Image, image).unwrap();
        let wanted = Wanted::Path(StorePath::from_absolute_path(path).unwrap());
        let realised = self
            .substituter
            .realise(&wanted, Some(&root))
            .await
            .unwrap();
        let closure = self
            .store
            .closure(std::slice::from_ref(&realised.top))
            .unwrap();
        (realised.top, closure)
    }

    fn views(&self) -> Vec<String> {
        let dir = self.store.root().join("nix/var/nix-cri/views");
        let mut names: Vec<String> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
    }
}

/// Walks `view` and `store` side by side: same names, files are the same inodes, symlinks have
/// the same targets, directories are in store form. Returns how many entries it compared.
fn assert_mirrors(view: &Path, store: &Path) -> usize {
    let view_meta = std::fs::symlink_metadata(view).unwrap();
    let store_meta = std::fs::symlink_metadata(store).unwrap();
    let kind = view_meta.file_type();
    assert_eq!(
        kind.is_dir(),
        store_meta.is_dir(),
        "{} vs {}",
        view.display(),
        store.display()
    );
    if kind.is_symlink() {
        assert_eq!(
            std::fs::read_link(view).unwrap(),
            std::fs::read_link(store).unwrap()
        );
        return 1;
    }
    if kind.is_file() {
        assert_eq!(
            (view_meta.dev(), view_meta.ino()),
            (store_meta.dev(), store_meta.ino()),
            "{} is not a link to {}",
            view.display(),
            store.display()
        );
        return 1;
    }
    assert_eq!(
        view_meta.permissions().mode() & 0o7777,
        0o555,
        "{}",
        view.display()
    );
    assert_eq!(view_meta.mtime(), 1, "{}", view.display());
    let names = |dir: &Path| -> BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    let in_view = names(view);
    assert_eq!(in_view, names(store), "{}", view.display());
    1 + in_view
        .iter()
        .map(|name| assert_mirrors(&view.join(name), &store.join(name)))
        .sum::<usize>()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_holds_exactly_the_closure_as_links_to_the_store() {
    let setup = setup();
    let fx = fixtures();
    let (top, closure) = setup.pull_as_image(fx.closure("main"), "main").await;
    assert!(closure.len() > 3, "{closure:?}");
    let view = setup.store.build_view(&top).unwrap();
    assert_eq!(view, setup.store.view_path(&top));

    let listed: BTreeSet<String> = std::fs::read_dir(&view)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = closure.iter().map(|p| p.base_name()).collect();
    assert_eq!(
        listed, expected,
        "the view holds the closure and nothing else"
    );
    let mut compared = 0;
    for path in &closure {
        compared += assert_mirrors(&view.join(path.base_name()), &setup.store.real_path(path));
    }
    assert!(compared > closure.len(), "the walk went into directories");
    // The fixture's symlinks survive as symlinks: a store path that is one, and links inside.
    let single = StorePath::from_absolute_path(fx.path("single_symlink")).unwrap();
    assert!(closure.contains(&single));
    assert!(
        std::fs::symlink_metadata(view.join(single.base_name()))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // Asking again returns the view as it is: it is not rebuilt.
    let inode = std::fs::metadata(&view).unwrap().ino();
    assert_eq!(setup.store.build_view(&top).unwrap(), view);
    assert_eq!(std::fs::metadata(&view).unwrap().ino(), inode);
    // The store itself is untouched: real Nix still verifies every path's contents.
    nix_cri_e2e::run(
        nix_cri_e2e::nix_command("nix-store")
            .arg("--store")
            .arg(setup.store.root())
            .args(["--verify", "--check-contents"]),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_views_whose_top_lost_its_roots_and_leftovers() {
    let setup = setup();
    let fx = fixtures();
    let (main, _) = setup.pull_as_image(fx.closure("main"), "main").await;
    let (disjoint, _) = setup
        .pull_as_image(fx.closure("disjoint"), "disjoint")
        .await;
    setup.store.build_view(&main).unwrap();
    setup.store.build_view(&disjoint).unwrap();
    // What a crash mid-build leaves: a temporary with a sealed directory in it.
    let leftover = setup
        .store
        .root()
        .join("nix/var/nix-cri/views/.tmp-1-crashed-0");
    std::fs::create_dir_all(leftover.join("sealed")).unwrap();
    std::fs::set_permissions(
        leftover.join("sealed"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    assert_eq!(setup.views().len(), 3);

    // A GC with both roots in place deletes only the leftover.
    let report = setup.store.gc(false).unwrap();
    assert_eq!(report.views_removed, 1);
    let mut both = vec![disjoint.base_name(), main.base_name()];
    both.sort();
    assert_eq!(setup.views(), both);
    // A dry run deletes nothing.
    setup
        .store
        .remove_root(&RootName::new(RootKind::Image, "disjoint").unwrap())
        .unwrap();
    setup.store.gc(true).unwrap();
    assert_eq!(setup.views().len(), 2);
    // Its top unrooted, the view goes with the paths; the other stays whole.
    let report = setup.store.gc(false).unwrap();
    assert_eq!(report.views_removed, 1);
    assert_eq!(setup.views(), vec![main.base_name()]);
    assert!(!setup.store.real_path(&disjoint).exists());
    // Only main's closure is left in the store, so its view mirrors the whole store.
    let view = setup.store.view_path(&main);
    assert!(assert_mirrors(&view, setup.store.store_dir()) > 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_that_cannot_be_built_is_an_error_that_leaves_nothing() {
    let setup = setup();
    let fx = fixtures();
    let (top, mut closure) = setup.pull_as_image(fx.closure("main"), "main").await;
    // A closure naming a path the store does not have: the build fails on it, naming it.
    let absent = StorePath::from_absolute_path(fx.closure("disjoint")).unwrap();
    closure.insert(absent.clone());
    let err = setup.store.ensure_view(&top, &closure).unwrap_err();
    assert!(err.to_string().contains(&absent.base_name()), "{err}");
    assert!(setup.views().is_empty(), "left: {:?}", setup.views());

    // What a crash mid-build leaves is removed when the store is next opened while idle.
    let leftover = setup
        .store
        .root()
        .join("nix/var/nix-cri/views/.tmp-1-crashed-0");
    std::fs::create_dir_all(leftover.join("sealed")).unwrap();
    Store::open(setup.store.root()).unwrap();
    assert!(setup.views().is_empty(), "left: {:?}", setup.views());
}
