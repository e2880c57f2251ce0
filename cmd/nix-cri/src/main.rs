//! The `nix-cri` command: a thin layer over the library. Each subcommand reads its settings,
//! calls one library entry point and prints the result.
#![deny(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use nix_cri::cache::BinaryCacheClient;
use nix_cri::config::Config;
use nix_cri::cri::admin::{self, AdminClient};
use nix_cri::cri::upstream::UnixConnector;
use nix_cri::cri::{Proxy, Upstream};
use nix_cri::image::NixReference;
use nix_cri::nix::StorePath;
use nix_cri::registry::{NixImages, Registry};
use nix_cri::store::{Realised, RootKind, RootName, Store, Substituter, Wanted};

mod install;

/// Keeps glibc's malloc from holding on to the memory of a pull once it is over.
///
/// glibc serves allocations of 128 KiB and more with mmap, and gives them back to the kernel
/// when freed, but each such free raises that threshold to the size freed (up to 32 MiB). After
/// the first xz decoder's 8 MiB dictionary is freed, decoders and buffers come from the malloc
/// heaps, which keep freed memory: `nix-cri serve` stayed at 80–100 MB after a pull, against
/// 13 MB before. Setting the threshold, here to glibc's own default, turns the raising off
/// (mallopt(3)): RSS then falls back to 15–20 MB after the same pulls and the peaks are lower,
/// for about 0.1 s more on a 1.5 s zstd pull (docs/benchmarks.md). The library forbids unsafe
/// code; this one call is the binary's, made before any other thread exists.
#[allow(unsafe_code)]
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a parameter of the allocator, under its own lock.
    // It fails only for an unknown parameter, which M_MMAP_THRESHOLD is not.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// EX_USAGE from sysexits.h: the command line or configuration is wrong.
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "nix-cri",
    version,
    about = "Run Nix store paths as Kubernetes images"
)]
struct Cli {
    /// TOML file with settings; command-line flags win over it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Substitute a store path's closure into the store and hold it with a GC root.
    Pull(PullArgs),
    /// Serve the CRI: proxy kubelet's calls to the runtime, running nix: images.
    Serve(ServeArgs),
    /// List the nix images a running nix-cri holds.
    Images(SocketArgs),
    /// Show a running nix-cri's store and runtime status.
    Status(SocketArgs),
    /// Delete every store path no GC root reaches.
    Gc(GcArgs),
    /// Show what the store records about a valid path.
    PathInfo(PathInfoArgs),
    /// Install nix-cri on a node: binary, config and systemd unit on the host, kubelet
    /// pointed at nix-cri's socket (what the Helm chart's DaemonSet runs).
    Install(install::InstallArgs),
    /// Undo `install`: kubelet's file and every other file restored as it was.
    Uninstall(install::UninstallArgs),
}

/// Store settings shared by every subcommand.
#[derive(Args)]
struct StoreArgs {
    /// Store root (the store is ROOT/nix/store). Default /var/lib/nix-cri.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

/// Where and how to substitute from.
#[derive(Args)]
struct SubstituterArgs {
    /// Binary cache URL (repeatable): https://…, http://…, file:///…, with ?priority=N.
    #[arg(long = "substituter", value_name = "URL")]
    substituters: Vec<String>,
    /// Trusted signing key as NAME:BASE64 (repeatable).
    #[arg(long = "trusted-public-key", value_name = "NAME:KEY")]
    trusted_public_keys: Vec<String>,
    /// Accept unsigned paths. For development only.
    #[arg(long)]
    no_require_sigs: bool,
    /// NARs fetched at once.
    #[arg(long)]
    jobs: Option<usize>,
    /// Connect timeout in seconds.
    #[arg(long, value_name = "SECS")]
    connect_timeout_secs: Option<f64>,
    /// Abandon a transfer after this many seconds without data.
    #[arg(long, value_name = "SECS")]
    stall_timeout_secs: Option<f64>,
    /// Retries of a failed request.
    #[arg(long)]
    retries: Option<u32>,
}

impl SubstituterArgs {
    fn into_config(self, root: Option<PathBuf>) -> Config {
        Config {
            root,
            substituters: self.substituters,
            trusted_public_keys: self.trusted_public_keys,
            no_require_sigs: self.no_require_sigs.then_some(true),
            jobs: self.jobs,
            connect_timeout_secs: self.connect_timeout_secs,
            stall_timeout_secs: self.stall_timeout_secs,
            retries: self.retries,
            ..Config::default()
        }
    }
}

#[derive(Args)]
struct PullArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    substituters: SubstituterArgs,
    /// /nix/store/<hash>-<name>, <hash>-<name>, or a nix:0/… image reference.
    path: String,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    substituters: SubstituterArgs,
    /// The CRI socket to serve. Default /run/nix-cri/nix-cri.sock.
    #[arg(long, value_name = "PATH")]
    listen: Option<PathBuf>,
    /// The runtime's CRI socket. Default /run/containerd/containerd.sock.
    #[arg(long, value_name = "PATH")]
    upstream: Option<PathBuf>,
    /// Loopback address of the embedded registry. Default 127.0.0.1:7480.
    #[arg(long, value_name = "ADDR")]
    registry_addr: Option<std::net::SocketAddr>,
    /// RuntimeClass handler that opts pods in. Default nix.
    #[arg(long, value_name = "NAME")]
    runtime_handler: Option<String>,
    /// The runtime's handler for opted-in pods. Default: the runtime's default.
    #[arg(long, value_name = "NAME")]
    upstream_runtime_handler: Option<String>,
    /// Allow nix images in every pod, not only those with the nix RuntimeClass.
    #[arg(long)]
    allow_all_sandboxes: bool,
    /// Address for /metrics, /healthz and /readyz. Default 127.0.0.1:9477.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// File-system usage (percent) at which unused nix images are removed. Default 85.
    #[arg(long, value_name = "PERCENT")]
    gc_high_watermark_percent: Option<u8>,
    /// File-system usage (percent) that image removal brings the store down to. Default 80.
    #[arg(long, value_name = "PERCENT")]
    gc_low_watermark_percent: Option<u8>,
    /// Store size (NAR bytes) at which unused nix images are removed too.
    #[arg(long, value_name = "BYTES")]
    gc_max_store_bytes: Option<u64>,
}

/// How the CLI reaches a running nix-cri.
#[derive(Args)]
struct SocketArgs {
    /// nix-cri's socket. Default /run/nix-cri/nix-cri.sock.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Args)]
struct GcArgs {
    /// Collect in this store directly. Without it, ask the running nix-cri.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(flatten)]
    socket: SocketArgs,
    /// List what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct PathInfoArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON in the shape of Nix 2.8's `nix path-info --json`.
    #[arg(long)]
    json: bool,
    /// Show the whole closure.
    #[arg(long, short)]
    recursive: bool,
    /// A store path.
    path: String,
}

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let cli = Cli::parse();
    let config_path = cli.config.clone();
    init_logging(cli.log_format);
    let file_config = match cli.config.as_deref().map(Config::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(err) => {
            eprintln!("nix-cri: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    // One thread for all async work, as linkerd2-proxy runs by default: forwarding a call
    // then never wakes another thread, which on the benchmark machine took a third of the
    // latency nix-cri adds. The CPU-heavy work of a pull (decompression, hashing, writing)
    // runs on blocking threads, so pulls do not share that thread's core.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("nix-cri: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Pull(args) => pull(file_config, args).await,
            Command::Serve(args) => serve(file_config, args).await,
            Command::Images(args) => images(file_config, args).await,
            Command::Status(args) => status(file_config, args).await,
            Command::Gc(args) => gc(file_config, args).await,
            Command::PathInfo(args) => path_info(file_config, args).await,
            Command::Install(args) => install::install(config_path.as_deref(), args).await,
            Command::Uninstall(args) => install::uninstall(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("nix-cri: {}", describe(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Library errors already spell out their causes, so a
/// cause whose text is already shown is not repeated.
fn describe(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NIX_CRI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<Store>> {
    let root = config.root();
    tokio::task::spawn_blocking(move || {
        Store::open(&root).with_context(|| format!("cannot open the store at {}", root.display()))
    })
    .await?
    .map(Arc::new)
}

async fn make_substituter(config: &Config) -> anyhow::Result<Arc<Substituter>> {
    config.require_substituters()?;
    let substituter_config = config.substituter_config()?;
    if !substituter_config.require_sigs {
        eprintln!("nix-cri: warning: signatures are not checked (--no-require-sigs)");
    }
    let cache = BinaryCacheClient::new(config.substituter_urls()?, config.fetch_config()?)?;
    let store = open_store(config).await?;
    Ok(Substituter::new(store, Arc::new(cache), substituter_config))
}

async fn serve(file_config: Config, args: ServeArgs) -> anyhow::Result<()> {
    let config = file_config.overridden_by(Config {
        listen: args.listen,
        upstream: args.upstream,
        registry_addr: args.registry_addr,
        runtime_handler: args.runtime_handler,
        upstream_runtime_handler: args.upstream_runtime_handler,
        allow_all_sandboxes: args.allow_all_sandboxes.then_some(true),
        metrics_addr: args.metrics_addr,
        gc_high_watermark_percent: args.gc_high_watermark_percent,
        gc_low_watermark_percent: args.gc_low_watermark_percent,
        gc_max_store_bytes: args.gc_max_store_bytes,
        ..args.substituters.into_config(args.store.root)
    });
    config.validate()?;
    let mut proxy_config = config.proxy_config()?;
    let gc_policy = config.gc_policy()?;
    let metrics_addr = config.metrics_addr()?;
    let substituter = make_substituter(&config).await?;
    let images = Arc::new(NixImages::new(substituter.store().clone()));
    let registry = Registry::start(proxy_config.registry_addr, images.clone())
        .await
        .with_context(|| {
            format!(
                "cannot start the registry on {}",
                proxy_config.registry_addr
            )
        })?;
    proxy_config.registry_addr = registry.local_addr();
    let upstream = Upstream::new(&config.upstream());
    let listen = config.listen();
    let listener = nix_cri::cri::bind(&listen)?;
    let proxy = Proxy::new(upstream, substituter, images, proxy_config);
    // Before serving, so no pull of ours is under way yet.
    let sweeper = proxy.clone();
    match tokio::task::spawn_blocking(move || sweeper.sweep_pull_roots()).await? {
        Ok(0) => {}
        Ok(swept) => tracing::info!(swept, "dropped the pull roots of pulls a crash cut short"),
        Err(err) => tracing::warn!(err = %err.message(), "cannot sweep pull roots"),
    }
    let metrics_addr = nix_cri::metrics::serve(metrics_addr, proxy.clone())
        .await
        .with_context(|| format!("cannot serve metrics on {metrics_addr}"))?;
    tokio::spawn(reconcile_until_done(proxy.clone()));
    tokio::spawn(proxy.clone().run_gc_policy(gc_policy));
    tracing::info!(
        listen = %listen.display(),
        upstream = %config.upstream().display(),
        registry = %registry.local_addr(),
        metrics = %metrics_addr,
        root = %config.root().display(),
        "serving"
    );
    eprintln!(
        "nix-cri: serving {} (registry {})",
        listen.display(),
        registry.local_addr()
    );
    proxy.serve(listener, shutdown_signal()).await;
    let _ = std::fs::remove_file(&listen);
    Ok(())
}

/// Container roots are reconciled with the runtime once it answers; until then the proxy
/// serves already (kubelet needs the socket to start at all).
async fn reconcile_until_done(proxy: Arc<Proxy>) {
    loop {
        match proxy.reconcile().await {
            Ok((dropped, added)) => {
                tracing::info!(
                    dropped,
                    added,
                    "container roots reconciled with the runtime"
                );
                return;
            }
            Err(err) => {
                tracing::warn!(err = %err.message(), "cannot reconcile container roots yet");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}

async fn admin_client(
    config: &Config,
    args: &SocketArgs,
) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    let socket = args.socket.clone().unwrap_or_else(|| config.listen());
    let channel = tonic::transport::Endpoint::from_static("http://nix-cri")
        .connect_with_connector(UnixConnector::new(&socket))
        .await
        .with_context(|| format!("cannot reach nix-cri at {}", socket.display()))?;
    Ok(AdminClient::new(channel))
}

async fn images(config: Config, args: SocketArgs) -> anyhow::Result<()> {
    let mut client = admin_client(&config, &args).await?;
    let images = client
        .list_images(admin::proto::ListImagesRequest {})
        .await?
        .into_inner()
        .images;
    println!(
        "{:<73} {:>6} {:>10} {:>4}  REFERENCE",
        "IMAGE ID", "PATHS", "SIZE", "CTRS"
    );
    for image in images {
        println!(
            "{:<73} {:>6} {:>10} {:>4}  {}",
            image.id,
            image.closure_paths,
            human_bytes(image.closure_nar_size),
            image.containers.len(),
            image.reference
        );
    }
    Ok(())
}

async fn status(config: Config, args: SocketArgs) -> anyhow::Result<()> {
    let mut client = admin_client(&config, &args).await?;
    let status = client
        .status(admin::proto::StatusRequest {})
        .await?
        .into_inner();
    println!("nix-cri {}", status.version);
    println!(
        "store:     {} ({} paths, {} NAR)",
        status.store_root,
        status.store_paths,
        human_bytes(status.store_nar_bytes)
    );
    println!(
        "upstream:  {} ({})",
        status.upstream_socket,
        if status.upstream_ready {
            "ready".to_owned()
        } else {
            format!("not ready: {}", status.upstream_error)
        }
    );
    println!("registry:  {}", status.registry);
    println!("handler:   {}", status.runtime_handler);
    Ok(())
}

/// A store path, its base name, or a `nix:0/…` reference.
fn parse_wanted(text: &str) -> anyhow::Result<Wanted> {
    if nix_cri::image::is_nix_reference(text) {
        return Ok(NixReference::parse(text)?.target().clone());
    }
    let path = if text.starts_with('/') {
        StorePath::from_absolute_path(text)?
    } else {
        StorePath::from_base_name(text)?
    };
    Ok(Wanted::Path(path))
}

async fn pull(file_config: Config, args: PullArgs) -> anyhow::Result<()> {
    let config = file_config.overridden_by(args.substituters.into_config(args.store.root));
    let wanted = parse_wanted(&args.path)?;
    let substituter = make_substituter(&config).await?;

    let holder = match &wanted {
        Wanted::Path(path) => path.base_name(),
        Wanted::Hash(hash) => hash.to_string(),
    };
    let root = RootName::new(RootKind::Cli, &holder)?;
    let progress = std::io::stderr()
        .is_terminal()
        .then(|| spawn_progress(substituter.clone()));
    let result = substituter.realise(&wanted, Some(&root)).await;
    if let Some(progress) = progress {
        progress.abort();
        eprint!("\r\x1b[K");
    }
    let realised = result?;
    print_pull_report(&realised);
    Ok(())
}

/// A one-line progress display for terminals.
fn spawn_progress(substituter: Arc<Substituter>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            let progress = substituter.progress();
            eprint!(
                "\r\x1b[Kfetching: {} of {} paths done, {} received",
                progress.paths_done,
                progress.paths_started,
                human_bytes(progress.bytes_received)
            );
        }
    })
}

fn print_pull_report(realised: &Realised) {
    let mut fetched = realised.fetched.clone();
    fetched.sort_by(|a, b| a.path.cmp(&b.path));
    for pulled in &fetched {
        println!(
            "fetched {}  {} NAR, {} {} from {} in {:.2}s",
            pulled.path,
            human_bytes(pulled.nar_size),
            human_bytes(pulled.download_size),
            pulled.compression.as_str(),
            pulled.substituter,
            pulled.elapsed.as_secs_f64()
        );
    }
    let nar: u64 = fetched.iter().map(|p| p.nar_size).sum();
    let download: u64 = fetched.iter().map(|p| p.download_size).sum();
    println!(
        "{}: {} paths in closure, {} fetched ({} NAR, {} downloaded) in {:.2}s",
        realised.top,
        realised.closure.len(),
        fetched.len(),
        human_bytes(nar),
        human_bytes(download),
        realised.elapsed.as_secs_f64()
    );
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn gc(file_config: Config, args: GcArgs) -> anyhow::Result<()> {
    let dry_run = args.dry_run;
    let report = if args.root.is_some() {
        let config = file_config.overridden_by(Config {
            root: args.root,
            ..Config::default()
        });
        let store = open_store(&config).await?;
        let report = tokio::task::spawn_blocking(move || store.gc(dry_run)).await??;
        admin::proto::CollectGarbageResponse {
            dead: report.dead.iter().map(|p| p.to_absolute_path()).collect(),
            nar_bytes: report.nar_bytes,
            disk_bytes_freed: report.disk_bytes_freed,
            views_removed: report.views_removed as u64,
        }
    } else {
        let mut client = admin_client(&file_config, &args.socket).await?;
        client
            .collect_garbage(admin::proto::CollectGarbageRequest { dry_run })
            .await?
            .into_inner()
    };
    for path in &report.dead {
        println!("{path}");
    }
    if dry_run {
        eprintln!(
            "{} paths would be deleted ({} NAR)",
            report.dead.len(),
            human_bytes(report.nar_bytes)
        );
    } else {
        eprintln!(
            "deleted {} paths and {} closure views, {} freed",
            report.dead.len(),
            report.views_removed,
            human_bytes(report.disk_bytes_freed)
        );
    }
    Ok(())
}

async fn path_info(file_config: Config, args: PathInfoArgs) -> anyhow::Result<()> {
    let config = file_config.overridden_by(Config {
        root: args.store.root,
        ..Config::default()
    });
    let path = match parse_wanted(&args.path)? {
        Wanted::Path(path) => path,
        Wanted::Hash(_) => bail!("path-info needs a full store path, not only its hash"),
    };
    let store = open_store(&config).await?;
    let recursive = args.recursive;
    let infos = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let paths = if recursive {
            store
                .closure(std::slice::from_ref(&path))?
                .into_iter()
                .collect()
        } else {
            vec![path.clone()]
        };
        paths
            .iter()
            .map(|p| {
                store
                    .path_info(p)?
                    .with_context(|| format!("{p} is not valid in {}", store.root().display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    if args.json {
        let json: Vec<_> = infos
            .iter()
            .map(|info| {
                serde_json::json!({
                    "path": info.path.to_absolute_path(),
                    // SRI, as `nix path-info --json` writes it.
                    "narHash": info.nar_hash.to_sri_string(),
                    "narSize": info.nar_size,
                    "references": info.references.iter().map(StorePath::to_absolute_path).collect::<Vec<_>>(),
                    "deriver": info.deriver.as_ref().map(StorePath::to_absolute_path),
                    "signatures": info.signatures.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "ca": info.ca,
                    "registrationTime": info.registration_time,
                    "valid": true,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        for info in &infos {
            println!("{}", info.path);
            println!("  narHash:    {}", info.nar_hash.to_nix32_string());
            println!("  narSize:    {}", info.nar_size);
            for reference in &info.references {
                println!("  reference:  {reference}");
            }
            if let Some(deriver) = &info.deriver {
                println!("  deriver:    {deriver}");
            }
            for sig in &info.signatures {
                println!("  signature:  {sig}");
            }
            if let Some(ca) = &info.ca {
                println!("  ca:         {ca}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every config key (docs/configuration.md is generated from the same type) has a
    /// `serve` flag of the documented name.
    #[test]
    fn every_config_key_is_a_serve_flag() {
        let command = Cli::command();
        let serve = command.find_subcommand("serve").expect("serve subcommand");
        let flags: Vec<String> = serve
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        let table = nix_cri::config::reference_table();
        let keys: Vec<&str> = table
            .lines()
            .skip(2)
            .filter_map(|row| row.split('`').nth(3))
            .collect();
        assert!(keys.len() >= 18, "{table}");
        for flag in keys {
            assert!(
                flags.iter().any(|f| f == flag),
                "serve lacks {flag}: {flags:?}"
            );
        }
    }
}
