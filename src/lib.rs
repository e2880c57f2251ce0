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

/// An error and its causes on one line, each cause once: hyper's and std's errors often hide
/// the cause that matters (refused, timed out, TLS) a level or two down, and some repeat their
/// cause's text in their own.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
