//! The installer on fake host roots (temporary directories) with recording fakes for systemd,
//! the node label and nix-cri's socket.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::testing::{Event, FakeHost};
use super::*;

const SOCKET: &str = "/run/nix-cri/nix-cri.sock";
const ENDPOINT: &str = "unix:///run/nix-cri/nix-cri.sock";

const KUBELET_CONFIG: &str = "\
apiVersion: kubelet.config.k8s.io/v1beta1
authentication:
  anonymous:
    enabled: false
  webhook:
    cacheTTL: 0s
cgroupDriver: systemd
clusterDNS:
- 10.96.0.10
containerRuntimeEndpoint: unix:///var/run/containerd/containerd.sock
kind: KubeletConfiguration
staticPodPath: /etc/kubernetes/manifests
";

/// kubeadm's config.yaml, which leaves the endpoint to the flags file.
const KUBEADM_CONFIG: &str = "\
apiVersion: kubelet.config.k8s.io/v1beta1
cgroupDriver: systemd
kind: KubeletConfiguration
";

const KUBEADM_FLAGS: &str = "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock --pod-infra-container-image=registry.k8s.io/pause:3.9\"\n";

/// A host root with an ordinary Debian-like tree and the given kubelet files (mode 0600 for
/// config.yaml, 0644 for the flags file), plus a binary and config to install.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    opts: InstallOptions,
    fake: FakeHost,
}

fn fixture(config_yaml: Option<&str>, flags: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("host");
    for d in [
        "etc/systemd/system",
        "usr/local/bin",
        "var/lib/kubelet",
        "run",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/systemd/system/containerd.service"),
        "[Service]\n",
    )
    .unwrap();
    if let Some(text) = config_yaml {
        let path = root.join("var/lib/kubelet/config.yaml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    if let Some(text) = flags {
        std::fs::write(root.join("var/lib/kubelet/kubeadm-flags.env"), text).unwrap();
    }
    let binary = dir.path().join("nix-cri");
    std::fs::write(&binary, b"\x7fELF a nix-cri binary").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("listen = \"{SOCKET}\"\nsubstituters = [\"https://cache.nixos.org\"]\n"),
    )
    .unwrap();
    let mut opts = InstallOptions::new(&root, &binary);
    opts.config = Some(config);
    Fixture {
        _dir: dir,
        root,
        opts,
        fake: FakeHost::new(),
    }
}

/// Every entry under `root`: kind, mode, owner and contents (or link target).
fn tree(root: &Path) -> BTreeMap<PathBuf, (String, u32, u32, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let (kind, bytes) = if meta.is_dir() {
                stack.push(path.clone());
                ("dir", Vec::new())
            } else if meta.file_type().is_symlink() {
                (
                    "link",
                    std::fs::read_link(&path)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else {
                ("file", std::fs::read(&path).unwrap())
            };
            out.insert(
                path.strip_prefix(root).unwrap().to_owned(),
                (
                    kind.to_owned(),
                    meta.permissions().mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    bytes,
                ),
            );
        }
    }
    out
}

fn read(root: &Path, path: &str) -> String {
    std::fs::read_to_string(on_host(root, Path::new(path))).unwrap()
}

fn mode(root: &Path, path: &str) -> u32 {
    std::fs::metadata(on_host(root, Path::new(path)))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn sys(call: Systemctl) -> Event {
    Event::Systemctl(call)
}

fn unit(name: &str) -> String {
    name.to_owned()
}

/// What a first install does, in order.
fn first_install_events(root: &Path) -> Vec<Event> {
    vec![
        sys(Systemctl::IsEnabled(unit(UNIT_NAME))),
        sys(Systemctl::IsActive(unit(UNIT_NAME))),
        Event::Label(Some(false)),
        sys(Systemctl::DaemonReload),
        sys(Systemctl::Enable(unit(UNIT_NAME))),
        sys(Systemctl::Restart(unit(UNIT_NAME))),
        Event::Probe(on_host(root, Path::new(SOCKET))),
        sys(Systemctl::Restart(unit(KUBELET_UNIT))),
        Event::Label(Some(true)),
    ]
}

/// What an install that finds everything in place does.
fn idle_install_events(root: &Path) -> Vec<Event> {
    vec![
        sys(Systemctl::IsEnabled(unit(UNIT_NAME))),
        sys(Systemctl::IsActive(unit(UNIT_NAME))),
        Event::Probe(on_host(root, Path::new(SOCKET))),
        Event::Label(Some(true)),
    ]
}

fn uninstall_events() -> Vec<Event> {
    vec![
        Event::Label(None),
        sys(Systemctl::Restart(unit(KUBELET_UNIT))),
        sys(Systemctl::Stop(unit(UNIT_NAME))),
        sys(Systemctl::Disable(unit(UNIT_NAME))),
        sys(Systemctl::DaemonReload),
    ]
}

/// install → install → uninstall → uninstall on one fixture; `kubelet_file` is the file that
/// must change and `expected` its text after install.
async fn round_trip(f: Fixture, kubelet_file: &str, expected: &str) {
    let root = f.root.clone();
    let before = tree(&root);
    let kubelet_mode = mode(&root, kubelet_file);

    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(f.fake.recorder.take(), first_install_events(&root));
    assert_eq!(
        report.changed,
        [BINARY, CONFIG, UNIT, kubelet_file].map(PathBuf::from)
    );
    assert_eq!(report.restarted, [UNIT_NAME, KUBELET_UNIT]);
    assert_eq!(
        std::fs::read(on_host(&root, Path::new(BINARY))).unwrap(),
        b"\x7fELF a nix-cri binary"
    );
    assert_eq!(mode(&root, BINARY), 0o755);
    assert_eq!(
        read(&root, CONFIG),
        std::fs::read_to_string(f.opts.config.as_ref().unwrap()).unwrap()
    );
    let unit_file = read(&root, UNIT);
    assert_eq!(
        unit_file,
        unit_text(Path::new(crate::config::DEFAULT_UPSTREAM))
    );
    for line in [
        "Type=simple",
        "ExecStart=/usr/local/bin/nix-cri serve --config /etc/nix-cri/config.toml",
        "Restart=always",
        "Before=kubelet.service",
        "After=network-online.target containerd.service",
        "WantedBy=multi-user.target",
    ] {
        assert!(unit_file.lines().any(|l| l == line), "{line}:\n{unit_file}");
    }
    assert_eq!(read(&root, kubelet_file), expected);
    assert_eq!(mode(&root, kubelet_file), kubelet_mode);
    let installed = tree(&root);
    let manifest = read(&root, "/var/lib/nix-cri/install-backup/manifest.json");

    // Again: nothing changes, nothing restarts, the backups stay.
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(f.fake.recorder.take(), idle_install_events(&root));
    assert_eq!(tree(&root), installed);
    assert_eq!(
        read(&root, "/var/lib/nix-cri/install-backup/manifest.json"),
        manifest
    );

    // Uninstall: the tree as it was, modes and owners included.
    let report = uninstall(&root, &f.fake.host()).await.unwrap();
    assert_eq!(f.fake.recorder.take(), uninstall_events());
    assert_eq!(report.restarted, [KUBELET_UNIT]);
    assert_eq!(report.stopped, [UNIT_NAME]);
    assert!(!on_host(&root, Path::new(UNIT)).exists());
    assert!(!on_host(&root, Path::new(BINARY)).exists());
    assert_eq!(tree(&root), before);

    // Again: nothing to undo.
    let report = uninstall(&root, &f.fake.host()).await.unwrap();
    assert!(report.is_empty(), "{report:?}");
    assert_eq!(f.fake.recorder.take(), vec![Event::Label(None)]);
    assert_eq!(tree(&root), before);
}

#[tokio::test]
async fn kubelet_configuration_setup() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    let expected = KUBELET_CONFIG.replace(
        "containerRuntimeEndpoint: unix:///var/run/containerd/containerd.sock",
        &format!("containerRuntimeEndpoint: {ENDPOINT}"),
    ) + &format!("imageServiceEndpoint: {ENDPOINT}\n");
    round_trip(f, kubelet::CONFIG_FILE, &expected).await;
}

#[tokio::test]
async fn kubeadm_flags_setup() {
    // kubeadm writes both files; the endpoint is in the flags.
    let f = fixture(Some(KUBEADM_CONFIG), Some(KUBEADM_FLAGS));
    let expected = format!(
        "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint={ENDPOINT} \
         --pod-infra-container-image=registry.k8s.io/pause:3.9 --image-service-endpoint={ENDPOINT}\"\n"
    );
    round_trip(f, kubelet::FLAGS_FILE, &expected).await;
}

#[tokio::test]
async fn kubeadm_flags_alone() {
    let f = fixture(None, Some(KUBEADM_FLAGS));
    let root = f.root.clone();
    install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(
        read(&root, kubelet::FLAGS_FILE),
        format!(
            "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint={ENDPOINT} \
             --pod-infra-container-image=registry.k8s.io/pause:3.9 \
             --image-service-endpoint={ENDPOINT}\"\n"
        )
    );
}

#[tokio::test]
async fn unknown_setups_are_refused_and_nothing_is_written() {
    let not_kubelet = "apiVersion: v1\nkind: ConfigMap\n";
    let cases: [(Option<&str>, Option<&str>, &[&str]); 6] = [
        (
            None,
            None,
            &[
                "neither",
                "var/lib/kubelet/config.yaml",
                "var/lib/kubelet/kubeadm-flags.env",
            ],
        ),
        (
            Some(KUBELET_CONFIG),
            Some(KUBEADM_FLAGS),
            &["both set kubelet's runtime endpoints", "--kubelet-setup"],
        ),
        (
            Some(KUBEADM_CONFIG),
            Some("KUBELET_KUBEADM_ARGS=\"--v=2\"\n"),
            &["neither sets", "config.yaml", "kubeadm-flags.env"],
        ),
        (
            Some(not_kubelet),
            None,
            &[
                "var/lib/kubelet/config.yaml: kind is \"ConfigMap\"",
                "expected a KubeletConfiguration",
            ],
        ),
        (
            None,
            Some("KUBELET_EXTRA_ARGS=\"--v=2\"\n"),
            &["var/lib/kubelet/kubeadm-flags.env: expected one line KUBELET_KUBEADM_ARGS="],
        ),
        (
            Some(not_kubelet),
            Some(KUBEADM_FLAGS),
            &["var/lib/kubelet/config.yaml: kind is \"ConfigMap\""],
        ),
    ];
    for (config, flags, wanted) in cases {
        let f = fixture(config, flags);
        let before = tree(&f.root);
        let err = install(&f.opts, &f.fake.host())
            .await
            .unwrap_err()
            .to_string();
        for text in wanted {
            assert!(err.contains(text), "{config:?} {flags:?}: {err}");
        }
        assert!(err.contains(&f.root.display().to_string()), "{err}");
        assert_eq!(tree(&f.root), before, "{err}");
        assert_eq!(f.fake.recorder.take(), vec![], "{err}");
    }
}

#[tokio::test]
async fn kubelet_setup_can_be_chosen() {
    // Both set the endpoint: refused in auto, the flags chosen explicitly.
    let mut f = fixture(Some(KUBELET_CONFIG), Some(KUBEADM_FLAGS));
    f.opts.kubelet_setup = KubeletSetup::Config;
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("flags win over the KubeletConfiguration"),
        "{err}"
    );
    f.opts.kubelet_setup = KubeletSetup::Flags;
    install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(read(&f.root, kubelet::CONFIG_FILE), KUBELET_CONFIG);
    assert!(read(&f.root, kubelet::FLAGS_FILE).contains(ENDPOINT));
}

#[tokio::test]
async fn drift_is_reapplied_and_the_original_backup_kept() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    let root = f.root.clone();
    let before = tree(&root);
    install(&f.opts, &f.fake.host()).await.unwrap();
    let installed = tree(&root);
    f.fake.recorder.take();

    // Someone puts the original back (kubeadm upgrade, an admin): the watch loop's next pass
    // re-applies only the kubelet edit.
    std::fs::write(
        on_host(&root, Path::new(kubelet::CONFIG_FILE)),
        KUBELET_CONFIG,
    )
    .unwrap();
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(report.changed, [PathBuf::from(kubelet::CONFIG_FILE)]);
    assert_eq!(report.restarted, [KUBELET_UNIT]);
    assert_eq!(
        f.fake.recorder.take(),
        vec![
            sys(Systemctl::IsEnabled(unit(UNIT_NAME))),
            sys(Systemctl::IsActive(unit(UNIT_NAME))),
            Event::Label(Some(false)),
            Event::Probe(on_host(&root, Path::new(SOCKET))),
            sys(Systemctl::Restart(unit(KUBELET_UNIT))),
            Event::Label(Some(true)),
        ]
    );
    assert_eq!(tree(&root), installed);

    // nix-cri crashed for good: restarted, nothing written.
    f.fake.systemd.crash(UNIT_NAME);
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert!(report.changed.is_empty());
    assert_eq!(report.restarted, [UNIT_NAME]);
    f.fake.recorder.take();

    // A new binary: nix-cri restarts, kubelet and systemd's unit state are left alone.
    std::fs::write(&f.opts.binary, b"\x7fELF nix-cri, the next version").unwrap();
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(report.changed, [PathBuf::from(BINARY)]);
    assert_eq!(
        f.fake.recorder.take(),
        vec![
            sys(Systemctl::IsEnabled(unit(UNIT_NAME))),
            sys(Systemctl::IsActive(unit(UNIT_NAME))),
            Event::Label(Some(false)),
            sys(Systemctl::Restart(unit(UNIT_NAME))),
            Event::Probe(on_host(&root, Path::new(SOCKET))),
            Event::Label(Some(true)),
        ]
    );

    uninstall(&root, &f.fake.host()).await.unwrap();
    assert_eq!(tree(&root), before);
}

#[tokio::test]
async fn uninstall_keeps_later_changes_to_kubelets_file() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    let root = f.root.clone();
    install(&f.opts, &f.fake.host()).await.unwrap();
    let path = on_host(&root, Path::new(kubelet::CONFIG_FILE));
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("maxPods: 200\n");
    std::fs::write(&path, &text).unwrap();
    uninstall(&root, &f.fake.host()).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{KUBELET_CONFIG}maxPods: 200\n")
    );
}

#[tokio::test]
async fn a_socket_that_never_answers_leaves_kubelet_alone() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    let root = f.root.clone();
    *f.fake.probe.down.lock().unwrap() = Some("connection refused".to_owned());
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "{}/run/nix-cri/nix-cri.sock did not answer CRI Version within 120s: connection refused",
            root.display()
        )),
        "{err}"
    );
    assert_eq!(read(&root, kubelet::CONFIG_FILE), KUBELET_CONFIG);
    let events = f.fake.recorder.take();
    assert_eq!(
        events.last(),
        Some(&Event::Probe(on_host(&root, Path::new(SOCKET))))
    );
    assert!(!events.contains(&Event::Label(Some(true))));
    assert!(!events.contains(&sys(Systemctl::Restart(unit(KUBELET_UNIT)))));
    // nix-cri comes up later: the next pass finishes the job.
    *f.fake.probe.down.lock().unwrap() = None;
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert_eq!(report.changed, [PathBuf::from(kubelet::CONFIG_FILE)]);
}

#[tokio::test]
async fn config_is_required_once_and_checked() {
    let mut f = fixture(Some(KUBELET_CONFIG), None);
    let given = f.opts.config.take().unwrap();
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("give --config FILE"), "{err}");
    assert!(err.contains("etc/nix-cri/config.toml"), "{err}");

    std::fs::write(&given, "registry_addr = \"10.0.0.1:5000\"\n").unwrap();
    f.opts.config = Some(given.clone());
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("loopback"), "{err}");
    std::fs::write(&given, "nonsense = 1\n").unwrap();
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&given.display().to_string()), "{err}");
    assert!(!on_host(&f.root, Path::new(CONFIG)).exists());

    // Once installed, the host's config is kept when none is given.
    // A config serve would refuse (here: no substituters) is refused before anything changes.
    std::fs::write(&given, "upstream = \"/var/run/crio/crio.sock\"\n").unwrap();
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no substituters"), "{err}");
    assert!(!on_host(&f.root, Path::new(CONFIG)).exists());
    std::fs::write(
        &given,
        "upstream = \"/var/run/crio/crio.sock\"\nsubstituters = [\"file:///cache\"]\n",
    )
    .unwrap();
    f.fake.recorder.take();
    install(&f.opts, &f.fake.host()).await.unwrap();
    assert!(read(&f.root, UNIT).contains("After=network-online.target crio.service"));
    // CRI-O pulls root images over plain HTTP only from a registry declared insecure; it
    // re-reads its registries on reload.
    let registries = read(&f.root, CRIO_REGISTRIES);
    assert!(
        registries.contains("location = \"127.0.0.1:") && registries.contains("insecure = true"),
        "{registries}"
    );
    let reload = Event::Systemctl(Systemctl::Reload(unit(CRIO_UNIT_NAME)));
    assert!(f.fake.recorder.take().contains(&reload));
    f.opts.config = None;
    let report = install(&f.opts, &f.fake.host()).await.unwrap();
    assert!(report.is_empty(), "{report:?}");
    // Uninstalled, the drop-in goes, and CRI-O forgets it.
    uninstall(&f.root, &f.fake.host()).await.unwrap();
    assert!(!on_host(&f.root, Path::new(CRIO_REGISTRIES)).exists());
    assert!(f.fake.recorder.take().contains(&reload));
}

#[tokio::test]
async fn a_failing_restart_is_reported() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    f.fake
        .systemd
        .failing
        .lock()
        .unwrap()
        .push(Systemctl::Restart(unit(UNIT_NAME)));
    let err = install(&f.opts, &f.fake.host())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "`systemctl restart nix-cri.service` failed: failed (fake)"
    );
    assert_eq!(read(&f.root, kubelet::CONFIG_FILE), KUBELET_CONFIG);
}

#[tokio::test]
async fn watch_reapplies_until_shut_down() {
    let f = fixture(Some(KUBELET_CONFIG), None);
    let root = f.root.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let host = f.fake.host();
    let path = on_host(&root, Path::new(kubelet::CONFIG_FILE));
    let watcher = watch(&f.opts, &host, std::time::Duration::from_secs(60), async {
        let _ = stopped.await;
    });
    let driver = async {
        // Wait for the first pass, then drift, then wait for the re-apply.
        while !std::fs::read_to_string(&path).unwrap().contains(ENDPOINT) {
            tokio::task::yield_now().await;
        }
        std::fs::write(&path, KUBELET_CONFIG).unwrap();
        while !std::fs::read_to_string(&path).unwrap().contains(ENDPOINT) {
            tokio::task::yield_now().await;
        }
        let _ = stop.send(());
    };
    // Bounded: a watch loop that never re-applies must fail the test, not hang it.
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        tokio::join!(watcher, driver)
    })
    .await
    .expect("the watch loop re-applied the drift within 30s");
    let restarts = f
        .fake
        .recorder
        .take()
        .into_iter()
        .filter(|e| *e == sys(Systemctl::Restart(unit(KUBELET_UNIT))))
        .count();
    assert_eq!(restarts, 2);
}
