//! Errors of image specs, root images and image sources.

use std::io;
use std::path::PathBuf;

use crate::nix::StorePath;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The top path carries the `nixCriImage` marker but is not a valid image spec.
    #[error("invalid image spec {path}: {why}")]
    InvalidSpec { path: StorePath, why: String },
    #[error("image spec {path} is larger than the limit of {limit} bytes")]
    SpecTooLarge { path: StorePath, limit: u64 },
    #[error("{} cannot go into an image layer: {why}", path.display())]
    Layer { path: PathBuf, why: String },
    /// Writing the in-memory tar or JSON failed; it cannot on valid input.
    #[error("cannot encode the image {what}: {why}")]
    Encode { what: &'static str, why: String },
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}
