//! `nix-cri install` and `nix-cri uninstall`: put nix-cri under the host's systemd and point
//! kubelet at it, from a DaemonSet pod (`--host-root /host`) or on the host itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use nix_cri::install::{
    self as installer, CriVersionProbe, Host, HostSystemctl, InstallOptions, KubeletSetup,
    NodeLabeler, Report, SystemctlVia, TokioClock,
};

#[derive(Args)]
pub struct InstallArgs {
    #[command(flatten)]
    host: HostArgs,
    /// Keep running: check every --interval seconds and re-apply whatever drifted, until
    /// SIGTERM.
    #[arg(long)]
    watch: bool,
    /// Seconds between two checks with --watch.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// Which kubelet file gets the endpoints: auto picks the one that exists (or, when both
    /// do, the one that sets the runtime endpoint), config is /var/lib/kubelet/config.yaml,
    /// flags is kubeadm's /var/lib/kubelet/kubeadm-flags.env.
    #[arg(long, value_enum, default_value = "auto")]
    kubelet_setup: KubeletSetupArg,
    /// Seconds to wait for nix-cri's socket to answer CRI Version after it is (re)started.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    socket_timeout: u64,
}

#[derive(Args)]
pub struct UninstallArgs {
    #[command(flatten)]
    host: HostArgs,
}

/// Where the host is and how to reach it.
#[derive(Args)]
struct HostArgs {
    /// The host's root directory as this process sees it (/host in the DaemonSet).
    #[arg(long, value_name = "DIR", default_value = "/")]
    host_root: PathBuf,
    /// How to run the host's systemctl: nsenter into PID 1's namespaces (needs hostPID), or
    /// chroot into --host-root.
    #[arg(long, value_enum, default_value = "nsenter")]
    systemctl_via: Via,
    /// The node to label nix-cri.io/ready (in a cluster; the DaemonSet sets NODE_NAME).
    #[arg(long, env = "NODE_NAME", value_name = "NAME")]
    node_name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum KubeletSetupArg {
    Auto,
    Config,
    Flags,
}

#[derive(Clone, Copy, ValueEnum)]
enum Via {
    Nsenter,
    Chroot,
}

impl HostArgs {
    /// The real host: its systemctl, the node label (in a cluster), nix-cri's socket.
    fn effects(&self) -> anyhow::Result<HostEffects> {
        Ok(HostEffects {
            systemd: HostSystemctl::new(match self.systemctl_via {
                Via::Nsenter => SystemctlVia::Nsenter,
                Via::Chroot => SystemctlVia::Chroot(self.host_root.clone()),
            }),
            labeler: installer::labeler_from_env(self.node_name.clone())?,
        })
    }
}

/// What [`Host`] borrows.
struct HostEffects {
    systemd: HostSystemctl,
    labeler: Box<dyn NodeLabeler>,
}

impl HostEffects {
    fn host(&self) -> Host<'_> {
        Host {
            systemd: &self.systemd,
            labeler: self.labeler.as_ref(),
            probe: &CriVersionProbe,
            clock: &TokioClock,
        }
    }
}

pub async fn install(config_path: Option<&Path>, args: InstallArgs) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the running nix-cri binary")?;
    let opts = InstallOptions {
        host_root: args.host.host_root.clone(),
        binary,
        config: config_path.map(Path::to_path_buf),
        kubelet_setup: match args.kubelet_setup {
            KubeletSetupArg::Auto => KubeletSetup::Auto,
            KubeletSetupArg::Config => KubeletSetup::Config,
            KubeletSetupArg::Flags => KubeletSetup::Flags,
        },
        socket_timeout: Duration::from_secs(args.socket_timeout),
    };
    let effects = args.host.effects()?;
    let host = effects.host();
    if args.watch {
        eprintln!(
            "nix-cri: watching the installation under {} every {}s",
            opts.host_root.display(),
            args.interval
        );
        installer::watch(
            &opts,
            &host,
            Duration::from_secs(args.interval),
            super::shutdown_signal(),
        )
        .await;
        return Ok(());
    }
    let report = installer::install(&opts, &host).await?;
    print_report("installed", &report);
    Ok(())
}

pub async fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let effects = args.host.effects()?;
    let host = effects.host();
    let report = installer::uninstall(&args.host.host_root, &host).await?;
    print_report("uninstalled", &report);
    Ok(())
}

fn print_report(done: &str, report: &Report) {
    if report.is_empty() {
        eprintln!("nix-cri: {done}; nothing needed changing");
        return;
    }
    for path in &report.changed {
        eprintln!("nix-cri: changed {}", path.display());
    }
    for unit in &report.restarted {
        eprintln!("nix-cri: restarted {unit}");
    }
    for unit in &report.stopped {
        eprintln!("nix-cri: stopped and disabled {unit}");
    }
    eprintln!("nix-cri: {done}");
}
