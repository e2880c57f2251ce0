//! Nix store paths as container images.

pub mod reference;

pub use self::reference::{NixReference, ReferenceError, is_nix_reference};
