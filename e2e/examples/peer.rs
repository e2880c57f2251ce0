//! Starts one runtime under test and nix-cri in front of it, for the conformance tools
//! (critest, h2spec) that hack/conformance runs against both sockets.
//!
//! `peer RUNTIME [IMAGES_FILE]`: RUNTIME is one of the harness's runtimes (`containerd2`,
//! `containerd1.6`, `crio`). When IMAGES_FILE is given it is a JSON object of image name to
//! image config (`{"name": {"cmd": [...], "user": "1000"}}`) to serve from the harness's
//! loopback registry besides pause and busybox.
//!
//! Prints `KEY=VALUE` lines (RUNTIME_SOCKET, NIX_CRI_SOCKET, REGISTRY, PAUSE_IMAGE,
//! BUSYBOX_IMAGE), then `READY`, and runs until its standard input closes; then it stops
//! everything it started.

use anyhow::Context;
use nix_cri_e2e::containerd::{Containerd, RuntimeKind};
use nix_cri_e2e::{CacheServer, NixCriServer, fixtures};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kind: RuntimeKind = args
        .next()
        .context("usage: peer RUNTIME [IMAGES_FILE]")?
        .parse()?;
    let extra_images = match args.next() {
        Some(file) => {
            serde_json::from_slice(&std::fs::read(&file).with_context(|| format!("read {file}"))?)
                .with_context(|| format!("parse {file}"))?
        }
        None => serde_json::Map::new(),
    };
    let fx = fixtures();
    let runtime = Containerd::start_with(kind, &extra_images)
        .await
        .with_context(|| format!("start {kind}"))?;
    let cache = CacheServer::start(fx.cache_dir("xz")).await?;
    let nix_cri = NixCriServer::start(runtime.socket(), &cache.url(), &[]).await?;
    println!("RUNTIME_SOCKET={}", runtime.socket().display());
    println!("NIX_CRI_SOCKET={}", nix_cri.socket.display());
    println!("NIX_CRI_LOG={}", nix_cri.log.display());
    println!("RUNTIME_LOG={}", runtime.log_path().display());
    println!("REGISTRY={}", runtime.registry_host());
    println!("PAUSE_IMAGE={}", runtime.pause_image());
    println!("BUSYBOX_IMAGE={}", runtime.busybox_image());
    println!("READY");
    let mut rest = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut rest).await;
    drop(nix_cri);
    drop(runtime);
    Ok(())
}
