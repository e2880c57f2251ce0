//! `nix:` image references.
//!
//! ```text
//! reference = "nix:0/" target [ ":" tag ]
//! target    = "/nix/store/" hash "-" name   (the full store path)
//!           | hash "-" name                 (its base name)
//!           | hash                          (its hash part alone)
//! tag       = [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}   (OCI tag grammar; kubelet adds ":latest")
//! ```
//! The `0` is a version of this scheme, so it can change without breaking old references.
//! Store path names cannot hold `:`, so the tag is whatever follows the first `:` after
//! `nix:0/`. The tag names nothing in the store and is ignored.

use std::fmt;

use crate::nix::{STORE_DIR, StorePath, StorePathHash};
use crate::store::Wanted;

pub const SCHEME: &str = "nix:";
const VERSION_0: &str = "nix:0/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid nix image reference {reference:?}: {why}")]
pub struct ReferenceError {
    pub reference: String,
    pub why: String,
}

/// A parsed `nix:0/…` reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NixReference {
    target: Wanted,
    tag: Option<String>,
}

/// Whether `image` is meant for nix-cri at all (and so must parse, or be refused).
pub fn is_nix_reference(image: &str) -> bool {
    image.starts_with(SCHEME)
}

impl NixReference {
    pub fn parse(reference: &str) -> Result<Self, ReferenceError> {
        let fail = |why: String| ReferenceError {
            reference: reference.to_owned(),
            why,
        };
        let rest = reference.strip_prefix(VERSION_0).ok_or_else(|| {
            fail(format!(
                "expected {VERSION_0}/nix/store/<hash>-<name>, {VERSION_0}<hash>-<name> or {VERSION_0}<hash>"
            ))
        })?;
        let (target, tag) = match rest.split_once(':') {
            Some((target, tag)) => (target, Some(tag)),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|why| fail(format!("tag {tag:?} {why}")))?;
        }
        // `nix:0/nix/store/…` is `nix:0` followed by the absolute path.
        let target = if target.contains('/') {
            let absolute = format!("/{target}");
            if !absolute.starts_with(&format!("{STORE_DIR}/")) {
                return Err(fail(format!("paths must be in {STORE_DIR}")));
            }
            Wanted::Path(StorePath::from_absolute_path(&absolute).map_err(|e| fail(e.to_string()))?)
        } else if target.contains('-') {
            Wanted::Path(StorePath::from_base_name(target).map_err(|e| fail(e.to_string()))?)
        } else {
            Wanted::Hash(StorePathHash::parse(target).map_err(|e| fail(e.to_string()))?)
        };
        Ok(Self {
            target,
            tag: tag.map(str::to_owned),
        })
    }

    /// What to realise.
    pub fn target(&self) -> &Wanted {
        &self.target
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }
}

impl fmt::Display for NixReference {
    /// The canonical form, without a tag: `nix:0/nix/store/<hash>-<name>` or `nix:0/<hash>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Wanted::Path(path) => write!(f, "nix:0{path}"),
            Wanted::Hash(hash) => write!(f, "{VERSION_0}{hash}"),
        }
    }
}

fn check_tag(tag: &str) -> Result<(), &'static str> {
    let mut bytes = tag.bytes();
    let first = bytes.next().ok_or("is empty")?;
    if tag.len() > 128 {
        return Err("is longer than 128 characters");
    }
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err("must start with a letter, digit or _");
    }
    if !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        return Err("may hold only letters, digits, _ . and -");
    }
    Ok(())
}

/// Entry point for the fuzzer: any string parses or is refused without panicking, and a parsed
/// reference prints canonically to one that names the same target.
pub fn fuzz_logic(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(reference) = NixReference::parse(text) {
        let canonical = reference.to_string();
        let again = NixReference::parse(&canonical)
            .unwrap_or_else(|e| panic!("canonical form {canonical:?} does not parse: {e}"));
        assert_eq!(again.target(), reference.target());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";
    const HASH: &str = "00bgd045z0d4icpbc2yyz4gx48ak44la";

    #[test]
    fn the_three_forms_with_and_without_tags() {
        for (text, tag) in [
            (format!("nix:0{PATH}"), None),
            (format!("nix:0{PATH}:latest"), Some("latest")),
            (format!("nix:0/{}", &PATH[11..]), None),
            (
                format!("nix:0/{}:v1.2-rc_3", &PATH[11..]),
                Some("v1.2-rc_3"),
            ),
        ] {
            let r = NixReference::parse(&text).unwrap();
            assert_eq!(
                r.target(),
                &Wanted::Path(StorePath::from_absolute_path(PATH).unwrap())
            );
            assert_eq!(r.tag(), tag);
            assert_eq!(r.to_string(), format!("nix:0{PATH}"));
        }
        let r = NixReference::parse(&format!("nix:0/{HASH}:latest")).unwrap();
        assert_eq!(
            r.target(),
            &Wanted::Hash(StorePathHash::parse(HASH).unwrap())
        );
        assert_eq!(r.to_string(), format!("nix:0/{HASH}"));
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        for (text, says) in [
            ("nix:/nix/store/x".to_owned(), "expected nix:0/"),
            ("nix:1/abc".to_owned(), "expected nix:0/"),
            (format!("nix:0/tmp/{HASH}-x"), "paths must be in /nix/store"),
            (format!("nix:0{PATH}:"), "is empty"),
            (format!("nix:0{PATH}:-x"), "must start with"),
            (format!("nix:0{PATH}:a/b"), "may hold only"),
            (
                format!("nix:0{PATH}@sha256:00"),
                "invalid nix image reference",
            ),
            ("nix:0/tooshort".to_owned(), "invalid nix image reference"),
            (
                format!("nix:0/{HASH}-bad name"),
                "invalid nix image reference",
            ),
            (
                format!("nix:0/{}e-x", &HASH[..31]),
                "invalid nix image reference",
            ),
        ] {
            let err = NixReference::parse(&text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains(&text), "{text}: {err}");
        }
    }

    #[test]
    fn only_the_nix_scheme_is_ours() {
        assert!(is_nix_reference("nix:0/abc"));
        assert!(!is_nix_reference("docker.io/library/nginx:latest"));
        assert!(!is_nix_reference("localhost:5000/nix:0"));
    }
}
