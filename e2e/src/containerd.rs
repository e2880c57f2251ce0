//! A real containerd (Debian's 1.6, with runc) as a child process with its own directories,
//! socket, CNI network and pause image, for tests that go through the CRI.
//!
//! Each [`Containerd`] gets a temporary directory holding `config.toml`, `root/`, `state/`,
//! the socket, `containerd.log`, a CNI conflist (a bridge `nxcri<N>` on `10.244.<N>.0/24`,
//! `N` held by a lock file so parallel harnesses never share it) and a runc wrapper that appends
//! runc's own error log to `runc-failures.log` whenever runc fails. The pause and busybox images
//! come from a [`Registry`] of [`StaticImages`] on 127.0.0.1, made from Debian's static busybox.
//!
//! On drop it removes every pod through the CRI, stops containerd, unmounts what is left under
//! its directory and deletes it; when the test is panicking it prints both logs' tails first.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use nix_cri::image::from_dir;
use nix_cri::image::oci_spec::image::ConfigBuilder;
use nix_cri::registry::{Registry, StaticImages};
use tonic::transport::{Channel, Endpoint, Uri};

pub use k8s_cri::v1;

const CONTAINERD: &str = "/usr/bin/containerd";
const RUNC: &str = "/usr/sbin/runc";
const BUSYBOX: &str = "/bin/busybox";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const PAUSE_NAME: &str = "nix-cri-e2e/pause";
const BUSYBOX_NAME: &str = "nix-cri-e2e/busybox";
/// Third octets of 10.244.X.0/24 that harnesses take turns on.
const SUBNETS: std::ops::RangeInclusive<u8> = 100..=249;
/// CRI messages may be this large (kubelet's and containerd's limit).
const MAX_MESSAGE: usize = 16 << 20;

pub struct Containerd {
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    registry: Option<Registry>,
    subnet: u8,
    _subnet_lock: File,
}

impl Containerd {
    /// Starts containerd and waits until its CRI answers `Version`.
    pub async fn start() -> anyhow::Result<Self> {
        for tool in [CONTAINERD, RUNC, BUSYBOX, &format!("{CNI_BIN_DIR}/bridge")] {
            anyhow::ensure!(
                Path::new(tool).exists(),
                "{tool} is missing: run hack/setup (it installs containerd, runc, busybox-static \
                 and containernetworking-plugins)"
            );
        }
        let dir = tempfile::Builder::new().prefix("nix-cri-ctrd-").tempdir()?;
        let path = dir.path().to_owned();
        let (subnet, subnet_lock) = take_subnet()?;

        // Pause and busybox images: one layer holding bin/busybox and bin/sh.
        let image_dir = path.join("busybox-image");
        std::fs::create_dir_all(image_dir.join("bin"))?;
        std::fs::copy(BUSYBOX, image_dir.join("bin/busybox"))?;
        std::os::unix::fs::symlink("busybox", image_dir.join("bin/sh"))?;
        let path_env = vec!["PATH=/bin".to_owned()];
        let pause = from_dir(
            &image_dir,
            ConfigBuilder::default()
                .env(path_env.clone())
                .cmd(["/bin/busybox", "sleep", "inf"].map(String::from).to_vec())
                .build()?,
        )?;
        let busybox = from_dir(
            &image_dir,
            ConfigBuilder::default()
                .env(path_env)
                .cmd(vec!["/bin/sh".to_owned()])
                .build()?,
        )?;
        let images = StaticImages::new()
            .with(PAUSE_NAME, pause)
            .with(BUSYBOX_NAME, busybox);
        let registry = Registry::start("127.0.0.1:0".parse()?, Arc::new(images)).await?;

        let socket = path.join("containerd.sock");
        let log = path.join("containerd.log");
        let runc_wrapper = path.join("runc-wrapper");
        std::fs::write(
            &runc_wrapper,
            runc_wrapper_script(&path.join("runc-failures.log")),
        )?;
        std::fs::set_permissions(
            &runc_wrapper,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let cni_dir = path.join("cni");
        std::fs::create_dir_all(&cni_dir)?;
        std::fs::write(
            cni_dir.join("10-nix-cri-e2e.conflist"),
            cni_conflist(subnet, &path.join("cni-ipam")),
        )?;
        let config = path.join("config.toml");
        std::fs::write(
            &config,
            config_toml(
                &path,
                &socket,
                &registry.reference(PAUSE_NAME, "3.9"),
                &runc_wrapper,
                &cni_dir,
            ),
        )?;
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(&log)?)
            .spawn()
            .context("start containerd")?;
        let mut containerd = Self {
            dir,
            socket,
            log,
            child: Some(child),
            registry: Some(registry),
            subnet,
            _subnet_lock: subnet_lock,
        };
        containerd.wait_ready().await?;
        Ok(containerd)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited with {status}:\n{}", self.diagnostics());
            }
            if self.socket.exists()
                && let Ok(mut runtime) = runtime_client(&self.socket).await
                && runtime
                    .version(cri::VersionRequest::default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "containerd's CRI did not answer within 30s:\n{}",
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills containerd with SIGKILL, as a crash would (its shims keep running).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts containerd again on the same state, config and socket, and waits until its
    /// CRI answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let log = std::fs::OpenOptions::new().append(true).open(&self.log)?;
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(self.dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("restart containerd")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    /// containerd's gRPC socket (the CRI endpoint).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn runtime(&self) -> anyhow::Result<RuntimeServiceClient<Channel>> {
        runtime_client(&self.socket).await
    }

    pub async fn images(&self) -> anyhow::Result<ImageServiceClient<Channel>> {
        image_client(&self.socket).await
    }

    /// The sandbox image containerd is configured with.
    pub fn pause_image(&self) -> String {
        self.registry().reference(PAUSE_NAME, "3.9")
    }

    /// An ordinary image: static busybox at `/bin/busybox` and `/bin/sh`, `PATH=/bin`,
    /// `Cmd ["/bin/sh"]`.
    pub fn busybox_image(&self) -> String {
        self.registry().reference(BUSYBOX_NAME, "latest")
    }

    fn registry(&self) -> &Registry {
        self.registry
            .as_ref()
            .expect("the registry lives as long as the harness")
    }

    /// A fresh directory for pod logs and other files of a test; removed with the harness.
    pub fn scratch_dir(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.dir.path().join("scratch").join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// `10.244.<n>.0/24`, the pod subnet of this instance.
    pub fn pod_subnet(&self) -> String {
        format!("10.244.{}.0/24", self.subnet)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// What runc said each time it failed (its `log.json`), appended by the wrapper.
    pub fn runc_failures(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runc-failures.log")).unwrap_or_default()
    }

    /// containerd's log tail and runc's failures, for error messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- containerd log ({}), last 60 lines ---\n{}\n--- runc failures ---\n{}",
            self.log.display(),
            self.log_tail(60),
            self.runc_failures()
        )
    }

    /// Stops and removes every pod sandbox (and so its containers).
    pub async fn remove_all_pods(&self) -> anyhow::Result<()> {
        remove_all_pods_at(&self.socket).await
    }

    fn stop(&mut self) {
        // Pods first, while containerd can still tear them down properly. Drop may run inside
        // a runtime, so this gets a thread and a runtime of its own.
        if self.child.is_some() {
            let socket = self.socket.clone();
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), remove_all_pods_at(&socket))
                        .await
                        .context("removing pods timed out")?
                })
            });
            match cleanup.join() {
                Ok(Ok(())) => {}
                Ok(Err(err)) => eprintln!("containerd harness: cannot remove pods: {err:#}"),
                Err(_) => eprintln!("containerd harness: pod cleanup panicked"),
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive containerd; ours name our socket on their command line.
        for pid in processes_mentioning(&self.socket.to_string_lossy()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        unmount_under(self.dir.path());
        let _ = Command::new("ip")
            .args(["link", "delete", &format!("nxcri{}", self.subnet)])
            .stderr(Stdio::null())
            .status();
        self.registry.take();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
        self.stop();
    }
}

async fn remove_all_pods_at(socket: &Path) -> anyhow::Result<()> {
    let mut runtime = runtime_client(socket).await?;
    let pods = runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest::default())
        .await?
        .into_inner()
        .items;
    for pod in pods {
        remove_pod(&mut runtime, &pod.id).await?;
    }
    Ok(())
}

/// Stops and removes a pod sandbox, as kubelet does when a pod goes.
pub async fn remove_pod(
    runtime: &mut RuntimeServiceClient<Channel>,
    pod_id: &str,
) -> Result<(), tonic::Status> {
    runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        })
        .await?;
    runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        })
        .await?;
    Ok(())
}

/// An image spec that names `image` and nothing else.
pub fn image_spec(image: impl Into<String>) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.into(),
        ..Default::default()
    })
}

/// A gRPC channel to a CRI endpoint on a unix socket (containerd, or nix-cri in front of it).
pub async fn cri_channel(socket: &Path) -> anyhow::Result<Channel> {
    let socket = socket.to_owned();
    let shown = socket.display().to_string();
    // The URI is required by tonic but unused: the connector ignores it.
    Endpoint::try_from("http://[::1]:0")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .with_context(|| format!("connect to {shown}"))
}

pub async fn runtime_client(socket: &Path) -> anyhow::Result<RuntimeServiceClient<Channel>> {
    Ok(RuntimeServiceClient::new(cri_channel(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

pub async fn image_client(socket: &Path) -> anyhow::Result<ImageServiceClient<Channel>> {
    Ok(ImageServiceClient::new(cri_channel(socket).await?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

/// Polls `ContainerStatus` until the container has exited; returns its last status.
pub async fn wait_for_exit(
    runtime: &mut RuntimeServiceClient<Channel>,
    container_id: &str,
    timeout: Duration,
) -> anyhow::Result<cri::ContainerStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: container_id.to_owned(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("ContainerStatus without a status")?;
        if status.state == cri::ContainerState::ContainerExited as i32 {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("container {container_id} did not exit within {timeout:?}: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The output in a CRI container log file (`<time> <stream> <P|F> <text>` lines), streams
/// merged in order, partial lines joined.
pub fn read_cri_log(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = String::new();
    for line in text.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag) = (parts.next(), parts.next(), parts.next());
        out.push_str(parts.next().unwrap_or_default());
        if tag != Some("P") {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Takes a free 10.244.X.0/24 by locking `X.lock` in a shared directory; the lock is held as
/// long as the returned file is open.
fn take_subnet() -> anyhow::Result<(u8, File)> {
    let dir = std::env::temp_dir().join("nix-cri-e2e-subnets");
    std::fs::create_dir_all(&dir)?;
    // Start from a different place per process so parallel test binaries rarely contend.
    let span = (*SUBNETS.end() - *SUBNETS.start()) as u32 + 1;
    let offset = std::process::id() % span;
    for i in 0..span {
        let subnet = *SUBNETS.start() + ((offset + i) % span) as u8;
        let file = File::create(dir.join(format!("{subnet}.lock")))?;
        if file.try_lock().is_ok() {
            return Ok((subnet, file));
        }
    }
    bail!("all test subnets 10.244.{SUBNETS:?}.0/24 are in use")
}

fn runc_wrapper_script(failures: &Path) -> String {
    format!(
        r#"#!/bin/sh
# runc, but when it fails its own error log (--log FILE, usually the bundle's log.json) is
# appended to {failures} so it survives the bundle's removal.
{RUNC} "$@"
rc=$?
if [ "$rc" -ne 0 ]; then
  log=""; prev=""
  for a in "$@"; do
    if [ "$prev" = "--log" ]; then log="$a"; fi
    prev="$a"
  done
  {{
    echo "runc $* exited with $rc"
    if [ -n "$log" ] && [ -f "$log" ]; then tail -n 20 "$log"; fi
  }} >> "{failures}" 2>&1
fi
exit "$rc"
"#,
        failures = failures.display()
    )
}

fn cni_conflist(subnet: u8, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": format!("nix-cri-e2e-{subnet}"),
        "plugins": [
            {
                "type": "bridge",
                "bridge": format!("nxcri{subnet}"),
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.244.{subnet}.0/24")}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "loopback"}
        ]
    })
    .to_string()
}

fn config_toml(
    dir: &Path,
    socket: &Path,
    sandbox_image: &str,
    runc: &Path,
    cni_dir: &Path,
) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_dir}"
    max_conf_num = 1
"#,
        socket = socket.display(),
        runc = runc.display(),
        cni_dir = cni_dir.display(),
    )
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Pids whose command line holds `needle` as one argument.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|cmdline| {
                    cmdline
                        .split(|&b| b == 0)
                        .any(|arg| arg == needle.as_bytes())
                })
                .unwrap_or(false)
        })
        .collect()
}

/// Unmounts everything mounted at or under `dir`, deepest first; best effort.
fn unmount_under(dir: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    let mut points: Vec<String> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p == &prefix || p.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for point in points {
        let ok = Command::new("umount")
            .arg(&point)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(&point)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(value) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|octal| u8::from_str_radix(octal, 8).ok())
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
