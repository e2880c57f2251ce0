//! The `nix-cri` command: a thin layer over the library. Each subcommand reads its settings,
//! calls one library entry point and prints the result.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use nix_cri::cache::BinaryCacheClient;
use nix_cri::config::Config;
use nix_cri::image::NixReference;
use nix_cri::nix::StorePath;
use nix_cri::store::{Realised, RootKind, RootName, Store, Substituter, Wanted};

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
    /// Delete every store path no GC root reaches.
    Gc(GcArgs),
    /// Show what the store records about a valid path.
    PathInfo(PathInfoArgs),
}

/// Store settings shared by every subcommand.
#[derive(Args)]
struct StoreArgs {
    /// Store root (the store is ROOT/nix/store). Default /var/lib/nix-cri.
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
}

#[derive(Args)]
struct PullArgs {
    #[command(flatten)]
    store: StoreArgs,
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
    /// /nix/store/<hash>-<name>, <hash>-<name>, or a nix:0/… image reference.
    path: String,
}

#[derive(Args)]
struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
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
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let file_config = match cli.config.as_deref().map(Config::load).transpose() {
        Ok(config) => config.unwrap_or_default(),
        Err(err) => {
            eprintln!("nix-cri: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
            Command::Gc(args) => gc(file_config, args).await,
            Command::PathInfo(args) => path_info(file_config, args).await,
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
    let config = file_config.overridden_by(Config {
        root: args.store.root,
        substituters: args.substituters,
        trusted_public_keys: args.trusted_public_keys,
        no_require_sigs: args.no_require_sigs.then_some(true),
        jobs: args.jobs,
        connect_timeout_secs: args.connect_timeout_secs,
        stall_timeout_secs: args.stall_timeout_secs,
        retries: args.retries,
    });
    let wanted = parse_wanted(&args.path)?;
    if config.substituters.is_empty() {
        bail!("no substituters: give --substituter URL or set substituters in the config file");
    }
    let substituter_config = config.substituter_config()?;
    if !substituter_config.require_sigs {
        eprintln!("nix-cri: warning: signatures are not checked (--no-require-sigs)");
    }
    let cache = BinaryCacheClient::new(config.substituter_urls()?, config.fetch_config()?)?;
    let store = open_store(&config).await?;
    let substituter = Substituter::new(store, Arc::new(cache), substituter_config);

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
    let config = file_config.overridden_by(Config {
        root: args.store.root,
        ..Config::default()
    });
    let store = open_store(&config).await?;
    let dry_run = args.dry_run;
    let report = tokio::task::spawn_blocking(move || store.gc(dry_run)).await??;
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
            "deleted {} paths, {} freed",
            report.dead.len(),
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
