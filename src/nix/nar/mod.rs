//! NAR (Nix ARchive): the serialisation of a file system tree that Nix hashes and caches.
//!
//! # Grammar
//!
//! ```text
//! nar       = str("nix-archive-1"), node
//! node      = str("("), str("type"), (regular | symlink | directory), str(")")
//! regular   = str("regular"), [ str("executable"), str("") ], str("contents"), str(contents)
//! symlink   = str("symlink"), str("target"), str(target)
//! directory = str("directory"), { entry }
//! entry     = str("entry"), str("("), str("name"), str(name), str("node"), node, str(")")
//! str(s)    = u64 little-endian length of s, s, zero bytes padding to a multiple of 8
//! ```
//!
//! Only the executable bit of a file is recorded; no other mode bits, owners or times.
//! [`unpack`] accepts exactly the NARs Nix writes and nothing else:
//!
//! - directory entries strictly ascending by name bytes (so no duplicates);
//! - names non-empty, at most 255 bytes, not `.` or `..`, without `/` or NUL;
//! - symlink targets non-empty, at most 4096 bytes, without NUL;
//! - padding all zero; the `executable` marker followed by an empty string;
//! - nesting at most [`NarLimits::max_depth`] entries deep;
//! - at most [`NarLimits::max_size`] bytes, failing before reading more;
//! - nothing after the final `)`.
//!
//! [`unpack`] streams: file contents go straight from the input to the [`NarSink`], and every
//! byte read is hashed, so the returned [`NarSummary`] can be checked against a narinfo's
//! `NarHash` and `NarSize` without a second pass. [`dump_path`] writes the NAR of a local path
//! exactly as `nix-store --dump` does.

mod reader;
mod sink;
mod writer;

/// Entry point for the fuzzer: on any input the reader refuses or accepts without panicking,
/// and what it accepts it has read whole, hashed exactly.
pub fn fuzz_logic(data: &[u8]) {
    if let Ok(summary) = unpack(data, &mut NullSink, &NarLimits::default()) {
        assert_eq!(summary.nar_size, data.len() as u64);
        assert_eq!(summary.nar_hash, crate::nix::Sha256Digest::digest(data));
    }
}

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::hash::Sha256Digest;

pub use reader::{HashingReader, unpack};
pub use sink::{DirSink, NullSink, STORE_MTIME, STORE_TIMES};
pub use writer::{HashingWriter, dump_path, nar_hash_path};

/// The magic string every NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";
/// Longest entry name (the usual file-name limit).
pub const MAX_NAME_LEN: usize = 255;
/// Longest symlink target (Linux's PATH_MAX).
pub const MAX_TARGET_LEN: usize = 4096;
/// Default for [`NarLimits::max_depth`]. Nix ≥ 2.35 rejects NARs nested deeper than 64; we
/// accept a little more because rejecting a path Nix itself produced would be worse.
pub const DEFAULT_MAX_DEPTH: usize = 128;

/// Limits [`unpack`] enforces on untrusted input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarLimits {
    /// Most bytes the NAR may have; set it to the narinfo's `NarSize`.
    pub max_size: u64,
    /// Most path components an entry may have (the root has none).
    pub max_depth: usize,
}

impl NarLimits {
    /// Default limits with `max_size` set, typically to the narinfo's `NarSize`.
    pub fn with_max_size(max_size: u64) -> Self {
        Self {
            max_size,
            ..Self::default()
        }
    }
}

impl Default for NarLimits {
    fn default() -> Self {
        Self {
            max_size: u64::MAX,
            max_depth: DEFAULT_MAX_DEPTH,
        }
    }
}

/// Hash and size of a whole NAR, as in a narinfo's `NarHash` and `NarSize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NarSummary {
    pub nar_hash: Sha256Digest,
    pub nar_size: u64,
}

impl NarSummary {
    /// Checks this against the values a narinfo promised.
    pub fn check(&self, nar_hash: &Sha256Digest, nar_size: u64) -> Result<(), NarError> {
        if self.nar_size != nar_size {
            return Err(NarError::SizeMismatch {
                expected: nar_size,
                actual: self.nar_size,
            });
        }
        if self.nar_hash != *nar_hash {
            return Err(NarError::HashMismatch {
                expected: *nar_hash,
                actual: self.nar_hash,
            });
        }
        Ok(())
    }
}

/// The position of an entry in a NAR: its path components from the root (empty for the
/// root). Components are raw bytes, as in the NAR.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct NarPath {
    components: Vec<Vec<u8>>,
}

impl NarPath {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn is_root(&self) -> bool {
        self.components.is_empty()
    }

    pub fn components(&self) -> &[Vec<u8>] {
        &self.components
    }

    /// Number of components; 0 for the root.
    pub fn depth(&self) -> usize {
        self.components.len()
    }

    /// The relative file system path (empty for the root).
    pub fn to_relative_path(&self) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        self.components
            .iter()
            .map(|c| std::ffi::OsStr::from_bytes(c))
            .collect()
    }

    /// The path of entry `name` in this directory.
    pub fn child(&self, name: &[u8]) -> Self {
        let mut child = self.clone();
        child.push(name.to_vec());
        child
    }

    pub(crate) fn push(&mut self, name: Vec<u8>) {
        self.components.push(name);
    }

    pub(crate) fn pop(&mut self) {
        self.components.pop();
    }
}

/// `/` for the root, `/a/b` below it; names shown as lossy UTF-8.
impl fmt::Display for NarPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.components.is_empty() {
            return f.write_str("/");
        }
        for c in &self.components {
            write!(f, "/{}", String::from_utf8_lossy(c))?;
        }
        Ok(())
    }
}

impl fmt::Debug for NarPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NarPath({self:?})", self = self.to_string())
    }
}

/// Receives the entries of a NAR from [`unpack`], parents before children, in NAR order.
pub trait NarSink {
    fn create_directory(&mut self, path: &NarPath) -> Result<(), NarError>;
    /// Must read exactly `size` bytes from `contents` (the contents reader then reports EOF);
    /// [`unpack`] fails with [`NarError::FileNotConsumed`] otherwise.
    fn create_file(
        &mut self,
        path: &NarPath,
        executable: bool,
        size: u64,
        contents: &mut dyn io::Read,
    ) -> Result<(), NarError>;
    fn create_symlink(&mut self, path: &NarPath, target: &[u8]) -> Result<(), NarError>;
}

/// Why a NAR could not be read or unpacked. Entry paths are shown as in [`NarPath`].
#[derive(Debug, Error)]
pub enum NarError {
    #[error("nar is truncated: input ended at byte {offset} in entry {path}")]
    Truncated { offset: u64, path: String },
    #[error("nar is larger than the limit of {max} bytes (reached in entry {path})")]
    TooLarge { max: u64, path: String },
    #[error("cannot read nar at byte {offset} in entry {path}: {source}")]
    Source {
        offset: u64,
        path: String,
        source: io::Error,
    },
    #[error("input is not a nar: it starts with {found} instead of \"nix-archive-1\"")]
    BadMagic { found: String },
    #[error("nar has unexpected {found} at byte {offset} in entry {path} (expected {expected})")]
    UnexpectedToken {
        offset: u64,
        path: String,
        expected: &'static str,
        found: String,
    },
    #[error("nar has non-zero padding at byte {offset} in entry {path}")]
    BadPadding { offset: u64, path: String },
    #[error("nar directory {path} has an invalid entry name {name:?}: {reason}")]
    BadName {
        path: String,
        name: String,
        reason: &'static str,
    },
    #[error(
        "nar directory {path} has entry {name:?} after {previous:?} (entries must be strictly ascending)"
    )]
    NotAscending {
        path: String,
        previous: String,
        name: String,
    },
    #[error("nar symlink {path} has an invalid target: {reason}")]
    BadSymlinkTarget { path: String, reason: &'static str },
    #[error("nar entry {path} is nested more than {max} levels deep")]
    TooDeep { path: String, max: usize },
    #[error("nar has trailing data after its end at byte {offset}")]
    TrailingData { offset: u64 },
    #[error("nar sink left {remaining} bytes of file {path} unread")]
    FileNotConsumed { path: String, remaining: u64 },
    #[error("cannot unpack nar entry to {path}: {source}", path = path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("nar size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("nar hash mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
}
