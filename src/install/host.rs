//! The installer's effects outside the host's files, behind traits: the host's systemd, the
//! node's label, nix-cri's socket and the clock. [`super::testing`] has recording fakes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;

use super::InstallError;

/// One `systemctl` invocation on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Systemctl {
    DaemonReload,
    Enable(String),
    Disable(String),
    Restart(String),
    /// `reload`: the unit re-reads its configuration without a restart (CRI-O: SIGHUP).
    Reload(String),
    Stop(String),
    /// `is-active --quiet`: success means active.
    IsActive(String),
    /// `is-enabled --quiet`: success means enabled.
    IsEnabled(String),
}

impl Systemctl {
    pub fn args(&self) -> Vec<&str> {
        match self {
            Systemctl::DaemonReload => vec!["daemon-reload"],
            Systemctl::Enable(unit) => vec!["enable", unit],
            Systemctl::Disable(unit) => vec!["disable", unit],
            Systemctl::Restart(unit) => vec!["restart", unit],
            Systemctl::Reload(unit) => vec!["reload", unit],
            Systemctl::Stop(unit) => vec!["stop", unit],
            Systemctl::IsActive(unit) => vec!["is-active", "--quiet", unit],
            Systemctl::IsEnabled(unit) => vec!["is-enabled", "--quiet", unit],
        }
    }
}

/// The host's systemd.
pub trait HostSystem: Send + Sync {
    /// Runs one `systemctl` call on the host. `Ok(true)` when it exited 0; `Ok(false)` when it
    /// ran and exited non-zero (a query's "no", or an action's failure, with `detail`);
    /// `Err` when it could not be run at all.
    fn systemctl(&self, call: &Systemctl) -> Result<Outcome, InstallError>;
}

/// What a `systemctl` call said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub success: bool,
    /// stderr (and stdout) when it failed, for messages.
    pub detail: String,
}

impl Outcome {
    pub fn ok() -> Self {
        Self {
            success: true,
            detail: String::new(),
        }
    }
}

/// How [`HostSystemctl`] reaches the host's systemd from inside a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemctlVia {
    /// `nsenter -t 1 -m -u -i -n -p systemctl …`: the host's `systemctl` in all of PID 1's
    /// namespaces. Needs `hostPID: true` and a privileged container (the chart has both), and
    /// `nsenter` in the container (the image has busybox's). Works from a shell on the host
    /// too (as root).
    Nsenter,
    /// `chroot HOST_ROOT systemctl …` with `SYSTEMD_IGNORE_CHROOT=1`: the host's `systemctl`
    /// talking to systemd through `HOST_ROOT/run/systemd`. Needs the host's `/run` visible
    /// under the host root (hostPath mounts are recursive binds) but no host PID namespace.
    Chroot(PathBuf),
}

/// The real [`HostSystem`]: runs the host's `systemctl` through `nsenter` or `chroot`.
#[derive(Debug, Clone)]
pub struct HostSystemctl {
    via: SystemctlVia,
}

impl HostSystemctl {
    pub fn new(via: SystemctlVia) -> Self {
        Self { via }
    }

    fn command(&self, call: &Systemctl) -> Command {
        let mut command = match &self.via {
            SystemctlVia::Nsenter => {
                let mut c = Command::new("nsenter");
                c.args(["-t", "1", "-m", "-u", "-i", "-n", "-p", "systemctl"]);
                c
            }
            SystemctlVia::Chroot(root) => {
                let mut c = Command::new("chroot");
                c.arg(root)
                    .arg("systemctl")
                    .env("SYSTEMD_IGNORE_CHROOT", "1");
                c
            }
        };
        // The host's systemctl, wherever the host keeps it.
        command
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .args(call.args())
            .stdin(std::process::Stdio::null());
        command
    }
}

impl HostSystem for HostSystemctl {
    fn systemctl(&self, call: &Systemctl) -> Result<Outcome, InstallError> {
        let mut command = self.command(call);
        let shown = format!("{command:?}");
        tracing::debug!(command = %shown, "running");
        let output = command.output().map_err(|e| InstallError::Systemctl {
            command: shown.clone(),
            why: format!("cannot run it: {e}"),
        })?;
        let mut detail = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !stdout.trim().is_empty() {
            if !detail.is_empty() {
                detail.push_str("; ");
            }
            detail.push_str(stdout.trim());
        }
        if detail.is_empty() {
            detail = format!("exited with {}", output.status);
        }
        Ok(Outcome {
            success: output.status.success(),
            detail,
        })
    }
}

/// Sets or removes the node label `nix-cri.io/ready`.
pub trait NodeLabeler: Send + Sync {
    /// `Some(true|false)` sets the label to that value; `None` removes it.
    fn set_ready(&self, ready: Option<bool>) -> BoxFuture<'_, Result<(), InstallError>>;
}

/// Asks a CRI socket for its `Version`.
pub trait CriProbe: Send + Sync {
    /// The runtime's name and version, or why it did not answer.
    fn version<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<String, String>>;
}

/// Time, so tests do not wait.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()>;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'_, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// The real [`CriProbe`]: a tonic channel over the unix socket, CRI `Version`, each step
/// bounded by five seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CriVersionProbe;

impl CriProbe for CriVersionProbe {
    fn version<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
            let step = Duration::from_secs(5);
            let channel = tonic::transport::Endpoint::from_static("http://nix-cri.local")
                .connect_timeout(step)
                .connect_with_connector(crate::cri::upstream::UnixConnector::new(socket))
                .await
                .map_err(|e| crate::error_chain(&e))?;
            let mut client = RuntimeServiceClient::new(channel);
            let response = tokio::time::timeout(
                step,
                client.version(k8s_cri::v1::VersionRequest {
                    version: "v1".to_owned(),
                }),
            )
            .await
            .map_err(|_| format!("no answer within {}s", step.as_secs()))?
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
            .into_inner();
            Ok(format!(
                "{} {}",
                response.runtime_name, response.runtime_version
            ))
        })
    }
}

/// The labeler outside a cluster: logs and does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLabeler;

impl NodeLabeler for NoLabeler {
    fn set_ready(&self, ready: Option<bool>) -> BoxFuture<'_, Result<(), InstallError>> {
        tracing::info!(
            label = %super::kube::label_text(ready),
            "not in a cluster (KUBERNETES_SERVICE_HOST is not set): node label skipped"
        );
        Box::pin(async { Ok(()) })
    }
}
