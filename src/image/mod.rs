//! Nix store paths as container images.

pub mod error;
pub mod oci;
pub mod reference;
pub mod root;
pub mod spec;

pub use oci_spec;

pub use self::error::ImageError;
pub use self::oci::{OciImage, from_dir};
pub use self::reference::{NixReference, ReferenceError, is_nix_reference};
pub use self::root::{STORE_PATH_LABEL, build_root_image};
pub use self::spec::{ImageConfig, NixImageSpec, SpecKind, parse_user};
