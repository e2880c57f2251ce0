//! The runtime under test as a child process with its own directories, socket, CNI network
//! and pause image, for tests that go through the CRI. It is one of [`RuntimeKind`]:
//! containerd 2.x (built by hack/peers/build from its Go module), Debian's containerd 1.6, or
//! CRI-O (built the same way, run with Debian's conmon). `NIX_CRI_E2E_RUNTIME` picks it for a
//! whole test run (default `containerd2`); hack/test runs the suite once per runtime.
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
const CONMON: &str = "/usr/bin/conmon";
/// Where hack/peers/build links the peers' commands (`NIX_CRI_PEERS`/bin).
const PEERS: &str = "/var/cache/nix-cri/peers";
const RUNC: &str = "/usr/sbin/runc";
const BUSYBOX: &str = "/bin/busybox";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const PAUSE_NAME: &str = "nix-cri-e2e/pause";
const BUSYBOX_NAME: &str = "nix-cri-e2e/busybox";
/// Third octets of 10.244.X.0/24 that harnesses take turns on.
const SUBNETS: std::ops::RangeInclusive<u8> = 100..=249;
/// CRI messages may be this large (kubelet's and containerd's limit).
const MAX_MESSAGE: usize = 16 << 20;

/// The runtimes the suite runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// containerd 2.x, the newest release (hack/versions).
    Containerd2,
    /// Debian 12's containerd 1.6, the oldest release supported.
    Containerd16,
    /// CRI-O (hack/versions), with Debian's conmon and runc.
    Crio,
}

impl RuntimeKind {
    /// `NIX_CRI_E2E_RUNTIME`, or containerd 2.x when unset.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("NIX_CRI_E2E_RUNTIME") {
            Ok(name) if !name.is_empty() => name.parse(),
            _ => Ok(Self::Containerd2),
        }
    }

    pub fn is_containerd(self) -> bool {
        matches!(self, Self::Containerd2 | Self::Containerd16)
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = anyhow::Error;
    fn from_str(name: &str) -> anyhow::Result<Self> {
        match name {
            "containerd2" => Ok(Self::Containerd2),
            "containerd1.6" => Ok(Self::Containerd16),
            "crio" => Ok(Self::Crio),
            other => {
                bail!("unknown runtime {other:?}: expected containerd2, containerd1.6 or crio")
            }
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Containerd2 => "containerd2",
            Self::Containerd16 => "containerd1.6",
            Self::Crio => "crio",
        })
    }
}

/// The directory of the peers' commands that hack/peers/build made.
pub fn peers_bin() -> PathBuf {
    std::env::var_os("NIX_CRI_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(PEERS))
        .join("bin")
}

/// The runtime under test (the name is historical: it may be CRI-O).
pub struct Containerd {
    kind: RuntimeKind,
    /// The runtime's program and its arguments, to start it again.
    command: Vec<std::ffi::OsString>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    registry: Option<Registry>,
    subnet: u8,
    _subnet_lock: File,
}

impl Containerd {
    /// Starts the runtime `NIX_CRI_E2E_RUNTIME` names and waits until its CRI answers
    /// `Version`.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(RuntimeKind::from_env()?, &serde_json::Map::new()).await
    }

    /// Starts a runtime of `kind`, its registry also serving `extra_images` (image name to
    /// `{"cmd": [...], "entrypoint": [...], "user": "...", "env": [...], "workdir": "..."}`, each
    /// on the busybox layer), and waits until its CRI answers `Version`.
    pub async fn start_with(
        kind: RuntimeKind,
        extra_images: &serde_json::Map<String, serde_json::Value>,
    ) -> anyhow::Result<Self> {
        let program = match kind {
            RuntimeKind::Containerd2 => peers_bin().join("containerd2"),
            RuntimeKind::Containerd16 => PathBuf::from(CONTAINERD),
            RuntimeKind::Crio => peers_bin().join("crio"),
        };
        let mut tools = vec![program.clone(), RUNC.into(), BUSYBOX.into()];
        tools.push(format!("{CNI_BIN_DIR}/bridge").into());
        if kind == RuntimeKind::Crio {
            tools.extend([PathBuf::from(CONMON), peers_bin().join("pinns")]);
        }
        for tool in &tools {
            anyhow::ensure!(
                tool.exists(),
                "{} is missing: run hack/setup (it installs Debian's containerd, runc, conmon, \
                 busybox-static and containernetworking-plugins, and builds the peers in \
                 hack/versions)",
                tool.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("nix-cri-{kind}-"))
            .tempdir()?;
        let path = dir.path().to_owned();
        let (subnet, subnet_lock) = take_subnet()?;

        // Pause and busybox images: one layer shaped like Docker's busybox image.
        let image_dir = path.join("busybox-image");
        write_busybox_layer(&image_dir)?;
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
                .env(path_env.clone())
                .cmd(vec!["/bin/sh".to_owned()])
                .build()?,
        )?;
        let mut images = StaticImages::new()
            .with(PAUSE_NAME, pause)
            .with(BUSYBOX_NAME, busybox);
        for (name, spec) in extra_images {
            let strings = |key: &str| -> Option<Vec<String>> {
                spec.get(key)?.as_array().map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
            };
            let mut config =
                ConfigBuilder::default().env(strings("env").unwrap_or_else(|| path_env.clone()));
            if let Some(cmd) = strings("cmd") {
                config = config.cmd(cmd);
            }
            if let Some(entrypoint) = strings("entrypoint") {
                config = config.entrypoint(entrypoint);
            }
            if let Some(user) = spec.get("user").and_then(|u| u.as_str()) {
                config = config.user(user.to_owned());
            }
            if let Some(workdir) = spec.get("workdir").and_then(|u| u.as_str()) {
                config = config.working_dir(workdir.to_owned());
            }
            images = images.with(name, from_dir(&image_dir, config.build()?)?);
        }
        let registry = Registry::start("127.0.0.1:0".parse()?, Arc::new(images)).await?;

        let socket = path.join(format!("{kind}.sock"));
        let log = path.join(format!("{kind}.log"));
        let runc_wrapper = path.join("runc-wrapper");
        std::fs::write(
            &runc_wrapper,
            runc_wrapper_script(&path.join("runc-failures.log"), kind == RuntimeKind::Crio),
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
        let pause_image = registry.reference(PAUSE_NAME, "3.9");
        let registry_host = pause_image.split('/').next().unwrap_or_default().to_owned();
        write_mirrors(&path.join("certs.d"), &registry_host)?;
        let config = match kind {
            RuntimeKind::Containerd16 => {
                config_toml_v2(&path, &socket, &pause_image, &runc_wrapper, &cni_dir)
            }
            RuntimeKind::Containerd2 => {
                config_toml_v3(&path, &socket, &pause_image, &runc_wrapper, &cni_dir)
            }
            RuntimeKind::Crio => {
                std::fs::write(
                    path.join("registries.conf"),
                    registries_conf(&registry_host),
                )?;
                std::fs::write(path.join("policy.json"), POLICY_JSON)?;
                std::fs::create_dir_all(path.join("crio.conf.d"))?;
                crio_conf(&path, &socket, &pause_image, &runc_wrapper, &cni_dir)
            }
        };
        let config_file = path.join(if kind == RuntimeKind::Crio {
            "crio.conf"
        } else {
            "config.toml"
        });
        std::fs::write(&config_file, config)?;
        let mut command: Vec<std::ffi::OsString> = vec![program.into()];
        match kind {
            RuntimeKind::Crio => command.extend([
                "--config".into(),
                config_file.into(),
                "--config-dir".into(),
                path.join("crio.conf.d").into(),
                // CRI-O's own (hidden) flag: containers/image's CONTAINERS_REGISTRIES_CONF is
                // not what CRI-O reads.
                "--registries-conf".into(),
                path.join("registries.conf").into(),
            ]),
            _ => command.extend(["--config".into(), config_file.into()]),
        }
        let mut containerd = Self {
            kind,
            command,
            dir,
            socket,
            log,
            child: None,
            registry: Some(registry),
            subnet,
            _subnet_lock: subnet_lock,
        };
        containerd.spawn(false)?;
        containerd.wait_ready().await?;
        Ok(containerd)
    }

    /// Starts the runtime's process, its output going to the log (appended when `append`).
    fn spawn(&mut self, append: bool) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(append)
            .write(true)
            .truncate(!append)
            .open(&self.log)?;
        // containerd finds its runc shim on PATH: 2.x must get its own (hack/peers/build), and
        // 1.6 Debian's, which speaks the older shim API.
        let system_path = std::env::var("PATH").unwrap_or_default();
        let path_var = match self.kind {
            RuntimeKind::Containerd16 => system_path,
            _ => format!("{}:{system_path}", peers_bin().display()),
        };
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env("PATH", path_var)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.kind))?;
        self.child = Some(child);
        Ok(())
    }

    /// Which runtime this is.
    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    /// An image's config digest (`sha256:<hex>`) spelt as this runtime spells image ids.
    pub fn image_id(&self, config_digest: &str) -> String {
        let hex = config_digest.trim_start_matches("sha256:");
        match self.kind {
            RuntimeKind::Crio => hex.to_owned(),
            RuntimeKind::Containerd2 | RuntimeKind::Containerd16 => format!("sha256:{hex}"),
        }
    }

    /// Whether `id` is an image id as this runtime spells them: containerd's `sha256:<hex>`,
    /// CRI-O's bare `<hex>`. nix-cri must report its images' ids the same way.
    pub fn is_image_id(&self, id: &str) -> bool {
        let hex = match self.kind {
            RuntimeKind::Crio => Some(id),
            RuntimeKind::Containerd2 | RuntimeKind::Containerd16 => id.strip_prefix("sha256:"),
        };
        hex.is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }

    /// `127.0.0.1:PORT` of the loopback registry that serves pause and busybox.
    pub fn registry_host(&self) -> String {
        self.pause_image()
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned()
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "{} exited with {status}:\n{}",
                    self.kind,
                    self.diagnostics()
                );
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
                    "{}'s CRI did not answer within 30s:\n{}",
                    self.kind,
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

    /// Starts the runtime again on the same state, config and socket, and waits until its
    /// CRI answers.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn(true)?;
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
            "--- {} log ({}), last 60 lines ---\n{}\n--- runc failures ---\n{}",
            self.kind,
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

/// A root like Docker's busybox image: static busybox at `/bin/busybox` with every applet
/// linked beside it (critest runs `top`, `sleep`, `touch` by name), and the users and groups
/// critest's test images define (`www-data`, `default-user` 1000 in group 50000).
fn write_busybox_layer(dir: &Path) -> anyhow::Result<()> {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy(BUSYBOX, bin.join("busybox"))?;
    let applets = Command::new(BUSYBOX)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = bin.join(applet);
        if !applet.is_empty() && applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link)?;
        }
    }
    if !bin.join("sh").exists() {
        std::os::unix::fs::symlink("busybox", bin.join("sh"))?;
    }
    for empty in ["etc", "tmp", "root", "var/www", "home/default-user"] {
        std::fs::create_dir_all(dir.join(empty))?;
    }
    std::fs::set_permissions(
        dir.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n\
         www-data:x:33:33:www-data:/var/www:/bin/false\n\
         default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n\
         nobody:x:65534:65534:nobody:/home:/bin/false\n",
    )?;
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nwww-data:x:33:\ndefault-user:x:1000:\n\
         group-defined-in-image:x:50000:default-user\nnogroup:x:65534:\n",
    )?;
    Ok(())
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

/// The runc the runtime runs: Debian's, with its error log kept. With `clamp_oom_score_adj`
/// it also raises a negative `oomScoreAdj` in the bundle's config.json (or an exec's process
/// file) to the wrapper's own value first, as containerd's `restrict_oom_score_adj` does: this
/// VM's root lacks CAP_SYS_RESOURCE, so runc cannot lower a process's oom_score_adj
/// ("failed to update /proc/self/oom_score_adj: Permission denied"), and CRI-O, which gives
/// its infra containers -998, has no such option. A real node's runtime has the capability.
fn runc_wrapper_script(failures: &Path, clamp_oom_score_adj: bool) -> String {
    let clamp = if clamp_oom_score_adj {
        r#"own=$(cat /proc/self/oom_score_adj)
prev=""
for a in "$@"; do
  case "$prev" in
    --bundle|-b) f="$a/config.json" ;;
    --process|-p) f="$a" ;;
    *) f="" ;;
  esac
  if [ -n "$f" ] && [ -f "$f" ]; then
    sed -i -E "s/(\"oomScoreAdj\": *)-[0-9]+/\1$own/" "$f"
  fi
  prev="$a"
done
"#
    } else {
        ""
    };
    format!(
        r#"#!/bin/sh
# runc, but when it fails its own error log (--log FILE, usually the bundle's log.json) is
# appended to {failures} so it survives the bundle's removal.
{clamp}{RUNC} "$@"
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

fn config_toml_v2(
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

  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"

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

/// containerd 2.x's config: version 3, where the CRI plugin is split into images and runtime.
fn config_toml_v3(
    dir: &Path,
    socket: &Path,
    sandbox_image: &str,
    runc: &Path,
    cni_dir: &Path,
) -> String {
    let d = dir.display();
    format!(
        r#"version = 3
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{sandbox_image}"

  [plugins."io.containerd.cri.v1.images".registry]
    config_path = "{d}/certs.d"

[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true

  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"

    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"

  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_dir}"
    max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

# NRI's socket is /var/run/nri/nri.sock by default: one per instance, so harnesses can run side
# by side.
[plugins."io.containerd.nri.v1.nri"]
  socket_path = "{d}/nri.sock"
"#,
        socket = socket.display(),
        runc = runc.display(),
        cni_dir = cni_dir.display(),
    )
}

/// CRI-O's config: everything under `dir`, nothing read from /etc/crio or /var/lib/containers.
fn crio_conf(dir: &Path, socket: &Path, pause_image: &str, runc: &Path, cni_dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"[crio]
root = "{d}/storage"
runroot = "{d}/runroot"
storage_driver = "overlay"
log_dir = "{d}/pod-logs"
version_file = "{d}/version"
version_file_persist = "{d}/version-persist"
clean_shutdown_file = "{d}/clean.shutdown"
internal_wipe = true

[crio.api]
listen = "{socket}"
stream_address = "127.0.0.1"
stream_port = "0"

[crio.runtime]
default_runtime = "runc"
cgroup_manager = "cgroupfs"
conmon_cgroup = "pod"
pinns_path = "{pinns}"
namespaces_dir = "{d}/ns"
container_exits_dir = "{d}/exits"
container_attach_socket_dir = "{d}/attach"
hooks_dir = []
log_level = "info"
# GetContainerEvents (kubelet's evented PLEG) streams nothing without it.
enable_pod_events = true

[crio.runtime.runtimes.runc]
runtime_path = "{runc}"
runtime_type = "oci"
runtime_root = "{d}/runc"
monitor_path = "{CONMON}"
monitor_cgroup = "pod"

[crio.image]
pause_image = "{pause_image}"
# Empty: run the pause image's own command (ours is busybox, not k8s' /pause).
pause_command = ""
signature_policy = "{d}/policy.json"

[crio.network]
network_dir = "{cni_dir}"
plugin_dirs = ["{CNI_BIN_DIR}"]

[crio.metrics]
enable_metrics = false

[crio.nri]
enable_nri = false
"#,
        socket = socket.display(),
        runc = runc.display(),
        cni_dir = cni_dir.display(),
        pinns = peers_bin().join("pinns").display(),
    )
}

/// Public registries whose images tests name (critest's among them): each is served by the
/// loopback registry, under the same repository names, as a mirror would.
const MIRRORED: [&str; 4] = ["registry.k8s.io", "gcr.io", "k8s.gcr.io", "docker.io"];

/// containerd's hosts.toml for each mirrored registry (`config_path`).
fn write_mirrors(certs_d: &Path, registry_host: &str) -> anyhow::Result<()> {
    for host in MIRRORED {
        let dir = certs_d.join(host);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n\n[host.\"http://{registry_host}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
    }
    Ok(())
}

/// containers/image's registries.conf: registries on 127.0.0.1 (the test registry, and the one
/// nix-cri embeds for root images, at any port) are plain HTTP, and the test registry stands
/// in for the mirrored registries.
fn registries_conf(registry_host: &str) -> String {
    let mut conf = "unqualified-search-registries = [\"docker.io\"]\n\n\
         [[registry]]\nlocation = \"127.0.0.1\"\ninsecure = true\n"
        .to_owned();
    for host in MIRRORED {
        conf.push_str(&format!(
            "\n[[registry]]\nprefix = \"{host}\"\nlocation = \"{registry_host}\"\ninsecure = true\n"
        ));
    }
    conf
}

/// containers/image's signature policy: accept what the test registry serves.
const POLICY_JSON: &str = r#"{"default": [{"type": "insecureAcceptAnything"}]}"#;

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
