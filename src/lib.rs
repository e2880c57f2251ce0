//! nix-cri: run Nix store paths as Kubernetes images through a CRI proxy.
#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod cri;
pub mod image;
pub mod install;
pub mod metrics;
pub mod nix;
pub mod registry;
pub mod store;
