//! The installer's errors. Each names the host path, command or node at fault.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(
        "no nix-cri config to install: give --config FILE (the host has no {} yet)",
        path.display()
    )]
    NoConfig { path: PathBuf },
    #[error("{}: {why}", path.display())]
    KubeletFile { path: PathBuf, why: String },
    #[error(
        "cannot tell how kubelet is configured: neither {} (a KubeletConfiguration) nor {} \
         (kubeadm's KUBELET_KUBEADM_ARGS) exists",
        config.display(),
        flags.display()
    )]
    NoKubeletSetup { config: PathBuf, flags: PathBuf },
    #[error(
        "cannot tell how kubelet is configured: {} and {} {why}; choose one with \
         --kubelet-setup config|flags",
        config.display(),
        flags.display()
    )]
    AmbiguousKubeletSetup {
        config: PathBuf,
        flags: PathBuf,
        why: &'static str,
    },
    #[error("{} overrides {}: {why}", flags.display(), config.display())]
    KubeletFlagsOverride {
        config: PathBuf,
        flags: PathBuf,
        why: String,
    },
    #[error("socket path {} cannot be a kubelet endpoint: {why}", path.display())]
    Endpoint { path: PathBuf, why: &'static str },
    #[error("install manifest {}: {why}", path.display())]
    Manifest { path: PathBuf, why: String },
    #[error("`{command}` failed: {why}")]
    Systemctl { command: String, why: String },
    #[error("cannot label node {node:?} {label}: {why}")]
    Label {
        node: String,
        label: String,
        why: String,
    },
    #[error("NODE_NAME is not set: the installer cannot label its node (give --node-name)")]
    NoNodeName,
    #[error(
        "nix-cri's socket {} did not answer CRI Version within {}s: {last_error}",
        socket.display(),
        timeout.as_secs()
    )]
    SocketTimeout {
        socket: PathBuf,
        timeout: Duration,
        last_error: String,
    },
}

impl InstallError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| InstallError::Io {
            action,
            path,
            source,
        }
    }
}
