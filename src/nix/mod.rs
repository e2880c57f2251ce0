//! Nix formats: everything nix-cri reads from or writes for Nix, in pure synchronous Rust.
//!
//! - [`nixbase32`]: Nix's base-32 encoding of hashes.
//! - [`hash`]: SHA-256 digests in Nix's textual forms.
//! - [`store_path`]: `/nix/store/<hash>-<name>` paths.
//! - [`signature`]: ed25519 keys and signatures in `name:base64` form.
//! - [`narinfo`]: binary-cache `.narinfo` files and their signature fingerprints.
//! - [`cache_info`]: a binary cache's `nix-cache-info`.
//! - [`nar`]: streaming NAR parsing into a sink (the file system, or nothing) and writing.
//!
//! Types have private fields and validating constructors; `Display` writes what the parsers
//! read, byte for byte as Nix writes it. The test vectors in `src/nix/testdata/` come from
//! real Nix (see `testdata/regen.sh`).

pub mod cache_info;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signature;
pub mod store_path;

pub use cache_info::CacheInfo;
pub use hash::Sha256Digest;
pub use narinfo::{Compression, NarInfo};
pub use signature::{Signature, SigningKey, TrustedKeys, VerifyingKey};
pub use store_path::{STORE_DIR, StorePath, StorePathHash};
