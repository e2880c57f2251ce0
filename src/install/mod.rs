//! The node installer: puts nix-cri under the host's systemd and points kubelet at it.
//!
//! kubelet needs its image service to start any pod, so nix-cri cannot run as a pod: a
//! DaemonSet pod runs `nix-cri install --host-root /host` instead, which works on the host's
//! files under the host root and on the host's systemd through [`HostSystem`].
//!
//! [`install`], in this order (every step skipped when there is nothing to do, so a second
//! run changes nothing and restarts nothing):
//!
//! 1. Read and check everything first: the config to install, the binary, and kubelet's
//!    setup ([`kubelet::detect`]). An unknown setup is refused here, before anything changes.
//! 2. Label the node `nix-cri.io/ready=false` if anything is to be done.
//! 3. Write `/usr/local/bin/nix-cri`, `/etc/nix-cri/config.toml` and
//!    `/etc/systemd/system/nix-cri.service`, each backed up first ([`backup`]).
//!    In front of CRI-O it also writes [`CRIO_REGISTRIES`], which declares nix-cri's loopback
//!    registry insecure (plain HTTP), and `systemctl reload crio.service` when that changed.
//! 4. `systemctl daemon-reload` (unit changed), `enable` (unit changed or not enabled),
//!    `restart nix-cri.service` (any of nix-cri's three files changed, or not active).
//! 5. Wait until nix-cri's socket answers CRI `Version` (bounded).
//! 6. Only then edit kubelet's file (backed up first) and `restart kubelet.service`: a nix-cri
//!    that does not come up leaves kubelet as it was.
//! 7. Label the node `nix-cri.io/ready=true`.
//!
//! [`uninstall`] takes the node label off, puts kubelet's file back and restarts kubelet, stops
//! and disables nix-cri, restores or removes every other file it wrote, reloads systemd and
//! removes the backups and the directories it created. [`watch`] runs [`install`] again every
//! interval until shut down, re-applying whatever drifted.

pub mod backup;
mod error;
pub mod host;
pub mod kube;
pub mod kubelet;
#[cfg(test)]
mod testing;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::InstallError;
pub use host::{
    Clock, CriProbe, CriVersionProbe, HostSystem, HostSystemctl, NoLabeler, NodeLabeler, Outcome,
    Systemctl, SystemctlVia, TokioClock,
};
pub use kube::{KubeNodeLabeler, READY_LABEL, labeler_from_env};
pub use kubelet::{Endpoints, KubeletSetup, SetupKind};

use backup::{Backups, KubeletRecord};

/// Where the binary goes on the host.
pub const BINARY: &str = "/usr/local/bin/nix-cri";
/// Where the config goes on the host.
pub const CONFIG: &str = "/etc/nix-cri/config.toml";
/// The systemd unit.
pub const UNIT: &str = "/etc/systemd/system/nix-cri.service";
pub const UNIT_NAME: &str = "nix-cri.service";
pub const KUBELET_UNIT: &str = "kubelet.service";
/// CRI-O's registries drop-in: containers/image pulls over plain HTTP only from registries
/// declared insecure, and nix-cri's embedded registry serves root images on loopback HTTP.
pub const CRIO_REGISTRIES: &str = "/etc/containers/registries.conf.d/50-nix-cri.conf";
pub const CRIO_UNIT_NAME: &str = "crio.service";
/// How long [`install`] waits for nix-cri's socket by default.
pub const DEFAULT_SOCKET_TIMEOUT: Duration = Duration::from_secs(120);
/// Between two probes of the socket.
const PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// `path` (host-absolute) under `host_root`.
pub fn on_host(host_root: &Path, path: &Path) -> PathBuf {
    host_root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Whether nix-cri forwards to CRI-O (its socket is `…/crio/crio.sock` or `crio.sock`).
pub fn upstream_is_crio(upstream: &Path) -> bool {
    upstream.to_string_lossy().contains("crio")
}

/// The systemd unit, ordered after the runtime nix-cri forwards to and before kubelet.
pub fn unit_text(upstream: &Path) -> String {
    let runtime = if upstream_is_crio(upstream) {
        CRIO_UNIT_NAME
    } else {
        "containerd.service"
    };
    format!(
        "# Written by `nix-cri install`, removed by `nix-cri uninstall`. The installer's watch loop
# rewrites it: change the DaemonSet's config instead.
[Unit]
Description=nix-cri: Nix store paths as Kubernetes images (a CRI proxy in front of {runtime})
Documentation=https://github.com/nix-cri/nix-cri
After=network-online.target {runtime}
Wants=network-online.target
Before={KUBELET_UNIT}

[Service]
Type=simple
ExecStart={BINARY} serve --config {CONFIG}
Restart=always
RestartSec=2
# kubelet starts no pod without its image service.
OOMScoreAdjust=-999
LimitNOFILE=1048576

[Install]
WantedBy=multi-user.target
"
    )
}

/// [`CRIO_REGISTRIES`]: nix-cri's registry, on loopback, declared insecure. Only that address:
/// every other registry keeps CRI-O's TLS rules.
pub fn crio_registries_text(registry: std::net::SocketAddr) -> String {
    format!(
        "# Written by `nix-cri install`, removed by `nix-cri uninstall`. nix-cri's embedded
# registry serves the root images of nix: images to this node's CRI-O over plain HTTP on
# loopback; containers/image pulls over plain HTTP only from registries declared insecure.
[[registry]]
location = \"{registry}\"
insecure = true
"
    )
}

/// kubelet's endpoint for nix-cri's socket: `unix://PATH`.
pub fn endpoint(listen: &Path) -> Result<String, InstallError> {
    let text = listen.to_str().ok_or(InstallError::Endpoint {
        path: listen.to_owned(),
        why: "it is not UTF-8",
    })?;
    if !listen.is_absolute() {
        return Err(InstallError::Endpoint {
            path: listen.to_owned(),
            why: "it is not an absolute path",
        });
    }
    if text.contains(|c: char| c.is_whitespace() || c.is_control() || "\"'\\$`#".contains(c)) {
        return Err(InstallError::Endpoint {
            path: listen.to_owned(),
            why: "it contains whitespace, quotes, `$`, `#` or backslashes",
        });
    }
    Ok(format!("unix://{text}"))
}

/// What [`install`] needs to know.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    /// The host's `/` as this process sees it (`/host` in the DaemonSet, `/` on the host).
    pub host_root: PathBuf,
    /// The nix-cri binary to copy to the host (the running one).
    pub binary: PathBuf,
    /// The config file to install; `None` keeps the one the host has.
    pub config: Option<PathBuf>,
    pub kubelet_setup: KubeletSetup,
    /// How long to wait for nix-cri's socket to answer.
    pub socket_timeout: Duration,
}

impl InstallOptions {
    pub fn new(host_root: impl Into<PathBuf>, binary: impl Into<PathBuf>) -> Self {
        Self {
            host_root: host_root.into(),
            binary: binary.into(),
            config: None,
            kubelet_setup: KubeletSetup::Auto,
            socket_timeout: DEFAULT_SOCKET_TIMEOUT,
        }
    }
}

/// The host's effects, real or fake.
#[derive(Clone, Copy)]
pub struct Host<'a> {
    pub systemd: &'a dyn HostSystem,
    pub labeler: &'a dyn NodeLabeler,
    pub probe: &'a dyn CriProbe,
    pub clock: &'a dyn Clock,
}

impl Host<'_> {
    /// Runs an action; a non-zero exit is an error.
    fn run(&self, call: Systemctl) -> Result<(), InstallError> {
        let outcome = self.systemd.systemctl(&call)?;
        if outcome.success {
            Ok(())
        } else {
            Err(InstallError::Systemctl {
                command: format!("systemctl {}", call.args().join(" ")),
                why: outcome.detail,
            })
        }
    }

    /// Runs a query: exit 0 is yes.
    fn query(&self, call: Systemctl) -> Result<bool, InstallError> {
        Ok(self.systemd.systemctl(&call)?.success)
    }
}

/// What a run changed on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Host-absolute paths written, restored or removed.
    pub changed: Vec<PathBuf>,
    /// Units restarted.
    pub restarted: Vec<String>,
    /// Units stopped and disabled.
    pub stopped: Vec<String>,
}

impl Report {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.restarted.is_empty() && self.stopped.is_empty()
    }
}

/// Installs nix-cri on the host under `opts.host_root` (see the module docs for the steps).
pub async fn install(opts: &InstallOptions, host: &Host<'_>) -> Result<Report, InstallError> {
    let root = &opts.host_root;

    // 1. Everything read and checked before anything changes.
    let config_source = match &opts.config {
        Some(path) => path.clone(),
        None => {
            let installed = on_host(root, Path::new(CONFIG));
            if !installed.exists() {
                return Err(InstallError::NoConfig { path: installed });
            }
            installed
        }
    };
    let config = crate::config::Config::load(&config_source)?;
    // What `serve` would refuse is refused here, before anything on the host changes.
    config.validate()?;
    let config_bytes =
        std::fs::read(&config_source).map_err(InstallError::io("read", &config_source))?;
    let binary = std::fs::read(&opts.binary).map_err(InstallError::io("read", &opts.binary))?;
    let endpoint = endpoint(&config.listen())?;
    let socket = on_host(root, &config.listen());
    let unit = unit_text(&config.upstream());
    let kubelet = kubelet::detect(root, opts.kubelet_setup)?;
    let kubelet_path = on_host(root, &kubelet.path);
    let kubelet_text = kubelet
        .kind
        .edit(&kubelet.text, &Endpoints::both(&endpoint))
        .map_err(|why| InstallError::KubeletFile {
            path: kubelet_path.clone(),
            why,
        })?;
    let mut backups = Backups::open(root)?;

    let crio = upstream_is_crio(&config.upstream());
    let crio_registries = crio_registries_text(config.proxy_config()?.registry_addr);
    let mut files: Vec<(&str, &[u8], u32)> = vec![
        (BINARY, &binary, 0o755),
        (CONFIG, &config_bytes, 0o644),
        (UNIT, unit.as_bytes(), 0o644),
    ];
    if crio {
        files.push((CRIO_REGISTRIES, crio_registries.as_bytes(), 0o644));
    }
    // Files found as they should be are not looked at again below: on a watch pass where
    // nothing drifted, each is read once (and not at all if its size differs).
    let mut stale = Vec::new();
    for (path, bytes, mode) in files {
        if !backup::holds(&on_host(root, Path::new(path)), bytes, Some(mode))? {
            stale.push((path, bytes, mode));
        }
    }
    let differs = !stale.is_empty();
    let kubelet_differs = kubelet_text != kubelet.text;
    let enabled = host.query(Systemctl::IsEnabled(UNIT_NAME.into()))?;
    let active = host.query(Systemctl::IsActive(UNIT_NAME.into()))?;
    let mut report = Report::default();

    // 2. Not ready while it changes.
    if differs || kubelet_differs || !enabled || !active {
        host.labeler.set_ready(Some(false)).await?;
    }

    // 3. nix-cri's files.
    for (path, bytes, mode) in stale {
        if backups.write(Path::new(path), bytes, Some(mode))? {
            report.changed.push(PathBuf::from(path));
        }
    }

    // 4. systemd. CRI-O re-reads its registries on reload; nix-cri restarts for its own files.
    let registries_changed = report
        .changed
        .iter()
        .any(|p| p == Path::new(CRIO_REGISTRIES));
    if registries_changed {
        host.run(Systemctl::Reload(CRIO_UNIT_NAME.into()))?;
    }
    let nix_cri_changed = report
        .changed
        .iter()
        .any(|p| p != Path::new(CRIO_REGISTRIES));
    let unit_changed = report.changed.iter().any(|p| p == Path::new(UNIT));
    if unit_changed {
        host.run(Systemctl::DaemonReload)?;
    }
    if unit_changed || !enabled {
        host.run(Systemctl::Enable(UNIT_NAME.into()))?;
    }
    if nix_cri_changed || !active {
        host.run(Systemctl::Restart(UNIT_NAME.into()))?;
        report.restarted.push(UNIT_NAME.into());
    }

    // 5. nix-cri answers.
    let version = wait_for_socket(host, &socket, opts.socket_timeout).await?;
    tracing::info!(socket = %socket.display(), %version, "nix-cri answers");

    // 6. kubelet.
    if kubelet_differs {
        if backups.manifest.kubelet.is_none() {
            backups.manifest.kubelet = Some(KubeletRecord {
                kind: kubelet.kind,
                path: kubelet.path.clone(),
                previous: kubelet.endpoints.clone(),
            });
            backups.save()?;
        }
        backups.write(&kubelet.path, kubelet_text.as_bytes(), None)?;
        report.changed.push(kubelet.path.clone());
        host.run(Systemctl::Restart(KUBELET_UNIT.into()))?;
        report.restarted.push(KUBELET_UNIT.into());
    }

    // 7. Ready.
    host.labeler.set_ready(Some(true)).await?;
    Ok(report)
}

/// Polls `socket` with CRI `Version` until it answers or `timeout` has passed.
async fn wait_for_socket(
    host: &Host<'_>,
    socket: &Path,
    timeout: Duration,
) -> Result<String, InstallError> {
    let deadline = host.clock.now() + timeout;
    loop {
        let last_error = match host.probe.version(socket).await {
            Ok(version) => return Ok(version),
            Err(err) => err,
        };
        if host.clock.now() >= deadline {
            return Err(InstallError::SocketTimeout {
                socket: socket.to_owned(),
                timeout,
                last_error,
            });
        }
        host.clock.sleep(PROBE_INTERVAL).await;
    }
}

/// Undoes [`install`] on the host under `host_root`: every file it changed is restored byte
/// for byte (kubelet's file, if someone changed it since, gets only its endpoints back), every
/// file it created is removed. Without a manifest there is nothing to undo.
pub async fn uninstall(host_root: &Path, host: &Host<'_>) -> Result<Report, InstallError> {
    let mut backups = Backups::open(host_root)?;
    let mut report = Report::default();
    host.labeler.set_ready(None).await?;
    if !backups.exists {
        tracing::info!(
            manifest = %on_host(host_root, Path::new(backup::BACKUP_DIR)).display(),
            "no install manifest: nothing to undo"
        );
        return Ok(report);
    }

    // kubelet first, so it talks to the runtime directly before nix-cri goes away.
    if let Some(record) = backups.manifest.kubelet.clone() {
        let path = on_host(host_root, &record.path);
        let reverse = |text: &str| {
            record
                .kind
                .edit(text, &record.previous)
                .map_err(|why| InstallError::KubeletFile {
                    path: path.clone(),
                    why,
                })
        };
        if backups.restore(&record.path, Some(&reverse))? {
            report.changed.push(record.path.clone());
            host.run(Systemctl::Restart(KUBELET_UNIT.into()))?;
            report.restarted.push(KUBELET_UNIT.into());
        }
        backups.manifest.kubelet = None;
        backups.save()?;
    }

    if on_host(host_root, Path::new(UNIT)).exists() {
        for call in [
            Systemctl::Stop(UNIT_NAME.into()),
            Systemctl::Disable(UNIT_NAME.into()),
        ] {
            let outcome = host.systemd.systemctl(&call)?;
            if !outcome.success {
                tracing::warn!(
                    command = %format!("systemctl {}", call.args().join(" ")),
                    detail = %outcome.detail,
                    "failed; going on"
                );
            }
        }
        report.stopped.push(UNIT_NAME.into());
    }

    let paths: Vec<PathBuf> = backups
        .manifest
        .files
        .iter()
        .rev()
        .map(|r| r.path.clone())
        .collect();
    for path in paths {
        if backups.restore(&path, None)? {
            report.changed.push(path);
        }
    }
    if report.changed.iter().any(|p| p == Path::new(UNIT)) {
        host.run(Systemctl::DaemonReload)?;
    }
    if report
        .changed
        .iter()
        .any(|p| p == Path::new(CRIO_REGISTRIES))
    {
        host.run(Systemctl::Reload(CRIO_UNIT_NAME.into()))?;
        report.restarted.push(format!("{CRIO_UNIT_NAME} (reload)"));
    }
    backups.remove_all()?;
    Ok(report)
}

/// Runs [`install`] now and then every `interval`, logging what it re-applied and what
/// failed, until `shutdown` completes.
pub async fn watch(
    opts: &InstallOptions,
    host: &Host<'_>,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            result = install(opts, host) => match result {
                Ok(report) if report.is_empty() => tracing::debug!("installation as it should be"),
                Ok(report) => tracing::info!(
                    changed = ?report.changed,
                    restarted = ?report.restarted,
                    "drift re-applied"
                ),
                Err(err) => tracing::warn!(%err, "cannot re-apply the installation; trying again"),
            },
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = host.clock.sleep(interval) => {}
        }
    }
}
