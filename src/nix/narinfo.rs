//! `<hash>.narinfo` files of binary caches.
//!
//! A narinfo is a list of `Key: value` lines, each ending in `\n`:
//!
//! ```text
//! StorePath: /nix/store/<hash>-<name>      required
//! URL: nar/<filehash>.nar.xz               required, relative to the cache
//! Compression: xz                          missing or empty means bzip2
//! FileHash: sha256:<nixbase32>             hash of the compressed file
//! FileSize: <bytes>
//! NarHash: sha256:<nixbase32>              required
//! NarSize: <bytes>                         required, non-zero
//! References: <base name> <base name> ...  may be empty
//! Deriver: <base name>                     `unknown-deriver` means none
//! Sig: <key name>:<base64>                 repeatable
//! CA: <content address>
//! ```
//!
//! Parsing is strict: every line needs a `:`, a field other than `Sig` may appear at most once,
//! and every known field must be valid. Unknown fields (for example the obsolete `System`) are
//! ignored. [`NarInfo`]'s `Display` writes the fields in the order Nix writes them; like Nix it
//! keeps references and signatures sorted and deduplicated, so a narinfo Nix wrote round-trips
//! byte for byte.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::hash::{HashError, Sha256Digest};
use super::signature::{Signature, SignatureError, SigningKey, TrustedKeys};
use super::store_path::{StorePath, StorePathError};

/// Why a narinfo is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NarInfoError {
    #[error("narinfo line {line} is not of the form 'Key: value': {content:?}")]
    MalformedLine { line: usize, content: String },
    #[error("narinfo field {field} appears more than once")]
    DuplicateField { field: &'static str },
    #[error("narinfo is missing required field {field}")]
    MissingField { field: &'static str },
    #[error("narinfo field {field} is invalid: {source}")]
    BadStorePath {
        field: &'static str,
        source: StorePathError,
    },
    #[error("narinfo field {field} is invalid: {source}")]
    BadHash {
        field: &'static str,
        source: HashError,
    },
    #[error("narinfo field {field} is not a decimal number: {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("narinfo field NarSize is zero")]
    ZeroNarSize,
    #[error("narinfo field Sig is invalid: {source}")]
    BadSignature { source: SignatureError },
    #[error("narinfo field {field} must not be empty or contain a newline: {value:?}")]
    BadText { field: &'static str, value: String },
}

/// How the file at a narinfo's URL is compressed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
    /// Any other name (`br`, `gzip`, `lz4`, `lzip`, ...), kept so it can be reported.
    Other(String),
}

impl Compression {
    /// Parses a `Compression` value; empty means bzip2, as in Nix.
    pub fn parse(value: &str) -> Self {
        match value {
            "" | "bzip2" => Self::Bzip2,
            "none" => Self::None,
            "xz" => Self::Xz,
            "zstd" => Self::Zstd,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::None => "none",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Bzip2 => "bzip2",
            Self::Other(name) => name,
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of a narinfo, for building one with [`NarInfo::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfoFields {
    pub store_path: StorePath,
    pub url: String,
    pub compression: Compression,
    pub file_hash: Option<Sha256Digest>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256Digest,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub signatures: Vec<Signature>,
    pub ca: Option<String>,
}

/// A parsed, valid narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    store_path: StorePath,
    url: String,
    compression: Compression,
    file_hash: Option<Sha256Digest>,
    file_size: Option<u64>,
    nar_hash: Sha256Digest,
    nar_size: u64,
    /// Sorted by base name, no duplicates.
    references: Vec<StorePath>,
    deriver: Option<StorePath>,
    /// Sorted, no duplicates.
    signatures: Vec<Signature>,
    ca: Option<String>,
}

impl NarInfo {
    /// Builds a narinfo, checking what the text form requires: a non-zero NAR size and URL,
    /// compression and CA values that are one line. References and signatures are sorted and
    /// deduplicated.
    pub fn new(fields: NarInfoFields) -> Result<Self, NarInfoError> {
        check_text("URL", &fields.url)?;
        if let Compression::Other(name) = &fields.compression {
            check_text("Compression", name)?;
        }
        if let Some(ca) = &fields.ca {
            check_text("CA", ca)?;
        }
        if fields.nar_size == 0 {
            return Err(NarInfoError::ZeroNarSize);
        }
        Ok(Self {
            store_path: fields.store_path,
            url: fields.url,
            compression: fields.compression,
            file_hash: fields.file_hash,
            file_size: fields.file_size,
            nar_hash: fields.nar_hash,
            nar_size: fields.nar_size,
            references: sorted_unique(fields.references),
            deriver: fields.deriver,
            signatures: sorted_unique(fields.signatures),
            ca: fields.ca,
        })
    }

    /// The fields, for changing and rebuilding a narinfo.
    pub fn into_fields(self) -> NarInfoFields {
        NarInfoFields {
            store_path: self.store_path,
            url: self.url,
            compression: self.compression,
            file_hash: self.file_hash,
            file_size: self.file_size,
            nar_hash: self.nar_hash,
            nar_size: self.nar_size,
            references: self.references,
            deriver: self.deriver,
            signatures: self.signatures,
            ca: self.ca,
        }
    }

    /// Parses narinfo text (see the module docs for the rules).
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = None;
        let mut deriver = None;
        let mut signatures = Vec::new();
        let mut ca = None;

        // A final newline ends the last line rather than starting an empty one.
        let body = text.strip_suffix('\n').unwrap_or(text);
        let lines = body.split('\n').filter(|_| !body.is_empty());
        for (index, line) in lines.enumerate() {
            let malformed = || NarInfoError::MalformedLine {
                line: index + 1,
                content: line.to_string(),
            };
            let (key, value) = line.split_once(':').ok_or_else(malformed)?;
            // Nix writes "Key: value"; an empty value may come without the space.
            let value = match value.strip_prefix(' ') {
                Some(v) => v,
                None if value.is_empty() => value,
                None => return Err(malformed()),
            };
            match key {
                "StorePath" => set(&mut store_path, "StorePath", || {
                    StorePath::from_absolute_path(value).map_err(|source| {
                        NarInfoError::BadStorePath {
                            field: "StorePath",
                            source,
                        }
                    })
                })?,
                "URL" => set(&mut url, "URL", || Ok(value.to_string()))?,
                "Compression" => set(&mut compression, "Compression", || {
                    Ok(Compression::parse(value))
                })?,
                "FileHash" => set(&mut file_hash, "FileHash", || hash_field("FileHash", value))?,
                "FileSize" => set(&mut file_size, "FileSize", || number("FileSize", value))?,
                "NarHash" => set(&mut nar_hash, "NarHash", || hash_field("NarHash", value))?,
                "NarSize" => set(&mut nar_size, "NarSize", || number("NarSize", value))?,
                "References" => set(&mut references, "References", || {
                    value
                        .split(' ')
                        .filter(|r| !r.is_empty())
                        .map(|r| {
                            StorePath::from_base_name(r).map_err(|source| {
                                NarInfoError::BadStorePath {
                                    field: "References",
                                    source,
                                }
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                })?,
                "Deriver" => set(&mut deriver, "Deriver", || match value {
                    "unknown-deriver" => Ok(None),
                    _ => StorePath::from_base_name(value)
                        .map(Some)
                        .map_err(|source| NarInfoError::BadStorePath {
                            field: "Deriver",
                            source,
                        }),
                })?,
                "Sig" => signatures.push(
                    Signature::parse(value)
                        .map_err(|source| NarInfoError::BadSignature { source })?,
                ),
                "CA" => set(&mut ca, "CA", || Ok(value.to_string()))?,
                _ => {}
            }
        }

        let missing = |field| NarInfoError::MissingField { field };
        let url = url.filter(|u| !u.is_empty()).ok_or(missing("URL"))?;
        Self::new(NarInfoFields {
            store_path: store_path.ok_or(missing("StorePath"))?,
            url,
            compression: compression.unwrap_or(Compression::Bzip2),
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(missing("NarHash"))?,
            nar_size: nar_size.ok_or(missing("NarSize"))?,
            references: references.unwrap_or_default(),
            deriver: deriver.flatten(),
            signatures,
            ca: ca.filter(|ca| !ca.is_empty()),
        })
    }

    pub fn store_path(&self) -> &StorePath {
        &self.store_path
    }

    /// Where the (compressed) NAR is, relative to the cache root.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn compression(&self) -> &Compression {
        &self.compression
    }

    /// Hash of the compressed file at [`Self::url`].
    pub fn file_hash(&self) -> Option<&Sha256Digest> {
        self.file_hash.as_ref()
    }

    pub fn file_size(&self) -> Option<u64> {
        self.file_size
    }

    /// Hash of the uncompressed NAR.
    pub fn nar_hash(&self) -> &Sha256Digest {
        &self.nar_hash
    }

    /// Size of the uncompressed NAR, never zero.
    pub fn nar_size(&self) -> u64 {
        self.nar_size
    }

    /// Sorted by base name, without duplicates.
    pub fn references(&self) -> &[StorePath] {
        &self.references
    }

    pub fn deriver(&self) -> Option<&StorePath> {
        self.deriver.as_ref()
    }

    /// Sorted, without duplicates.
    pub fn signatures(&self) -> &[Signature] {
        &self.signatures
    }

    /// The content address, if the path is content-addressed (for example `fixed:r:sha256:…`).
    pub fn ca(&self) -> Option<&str> {
        self.ca.as_deref()
    }

    /// What signatures sign:
    /// `1;<store path>;<NarHash as sha256:nixbase32>;<NarSize>;<sorted comma-separated
    /// reference paths>`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self
            .references
            .iter()
            .map(StorePath::to_absolute_path)
            .collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix32_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// True if at least one signature verifies under a trusted key of the same name.
    pub fn verify(&self, trusted: &TrustedKeys) -> bool {
        trusted.verify_any(self.fingerprint().as_bytes(), &self.signatures)
    }

    /// Adds a signature by `key` (replacing an identical one).
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        if let Err(pos) = self.signatures.binary_search(&sig) {
            self.signatures.insert(pos, sig);
        }
    }
}

impl fmt::Display for NarInfo {
    /// The text Nix writes, field order included.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StorePath: {}", self.store_path)?;
        writeln!(f, "URL: {}", self.url)?;
        writeln!(f, "Compression: {}", self.compression)?;
        if let Some(h) = &self.file_hash {
            writeln!(f, "FileHash: {}", h.to_nix32_string())?;
        }
        if let Some(n) = self.file_size {
            writeln!(f, "FileSize: {n}")?;
        }
        writeln!(f, "NarHash: {}", self.nar_hash.to_nix32_string())?;
        writeln!(f, "NarSize: {}", self.nar_size)?;
        // Nix writes the line even when empty, leaving "References: ".
        f.write_str("References: ")?;
        for (i, r) in self.references.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(&r.base_name())?;
        }
        f.write_str("\n")?;
        if let Some(d) = &self.deriver {
            writeln!(f, "Deriver: {}", d.base_name())?;
        }
        for sig in &self.signatures {
            writeln!(f, "Sig: {sig}")?;
        }
        if let Some(ca) = &self.ca {
            writeln!(f, "CA: {ca}")?;
        }
        Ok(())
    }
}

impl FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Stores the first value of a field; a second occurrence is an error.
fn set<T>(
    slot: &mut Option<T>,
    field: &'static str,
    parse: impl FnOnce() -> Result<T, NarInfoError>,
) -> Result<(), NarInfoError> {
    if slot.is_some() {
        return Err(NarInfoError::DuplicateField { field });
    }
    *slot = Some(parse()?);
    Ok(())
}

fn hash_field(field: &'static str, value: &str) -> Result<Sha256Digest, NarInfoError> {
    Sha256Digest::parse(value).map_err(|source| NarInfoError::BadHash { field, source })
}

/// Plain decimal digits only (`u64::from_str` would also take a leading `+`).
fn number(field: &'static str, value: &str) -> Result<u64, NarInfoError> {
    value
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| value.parse().ok())
        .flatten()
        .ok_or_else(|| NarInfoError::BadNumber {
            field,
            value: value.to_string(),
        })
}

fn check_text(field: &'static str, value: &str) -> Result<(), NarInfoError> {
    if value.is_empty() || value.contains('\n') {
        return Err(NarInfoError::BadText {
            field,
            value: value.to_string(),
        });
    }
    Ok(())
}

fn sorted_unique<T: Ord>(items: Vec<T>) -> Vec<T> {
    items
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Entry point for the fuzzer: any text parses or is refused without panicking, and a parsed
/// narinfo prints to text that parses to the same narinfo.
pub fn fuzz_logic(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(info) = NarInfo::parse(text) {
        let printed = info.to_string();
        let again = NarInfo::parse(&printed)
            .unwrap_or_else(|e| panic!("printed narinfo does not parse: {e}\n{printed}"));
        assert_eq!(again, info);
        let _ = info.fingerprint();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::signature::VerifyingKey;

    const TREE: &str = include_str!("testdata/tree.narinfo");
    const TREE_XZ: &str = include_str!("testdata/tree-xz.narinfo");
    const WITH_REFS: &str = include_str!("testdata/with-refs.narinfo");
    const FETCHED: &str = include_str!("testdata/fetched.narinfo");

    fn trusted(names: &[&str]) -> TrustedKeys {
        TrustedKeys::new(
            names
                .iter()
                .map(|n| match *n {
                    "test-1" => VerifyingKey::parse(include_str!("testdata/test-1.pk")),
                    _ => VerifyingKey::parse(include_str!("testdata/test-2.pk")),
                })
                .collect::<Result<_, _>>()
                .unwrap(),
        )
    }

    #[test]
    fn real_narinfos_round_trip_byte_for_byte() {
        for text in [TREE, TREE_XZ, WITH_REFS, FETCHED] {
            let info = NarInfo::parse(text).unwrap();
            assert_eq!(info.to_string(), text);
            let rebuilt = NarInfo::new(info.clone().into_fields()).unwrap();
            assert_eq!(rebuilt, info);
        }
    }

    #[test]
    fn parses_fields() {
        let info = NarInfo::parse(WITH_REFS).unwrap();
        assert_eq!(
            info.store_path().to_string(),
            "/nix/store/23zdbdgdn6iw1v0mgwlr3mwnn6jjd9wr-with-refs"
        );
        assert_eq!(
            info.url(),
            "nar/0gi7gs9mg4dilfvwd3byqklwh6p78s5qlk8pdqbw4ry0gnan1r5h.nar"
        );
        assert_eq!(info.compression(), &Compression::None);
        assert_eq!(info.file_hash(), Some(info.nar_hash()));
        assert_eq!(info.file_size(), Some(168));
        assert_eq!(info.nar_size(), 168);
        assert_eq!(info.references().len(), 1);
        assert_eq!(info.references()[0].name(), "tree");
        assert_eq!(info.deriver(), None);
        assert_eq!(info.signatures().len(), 2);
        assert!(info.ca().unwrap().starts_with("text:sha256:"));

        let fetched = NarInfo::parse(FETCHED).unwrap();
        assert_eq!(
            fetched.deriver().unwrap().base_name(),
            "2fimmy00hgf9c7d46a8lffbq2avvq28z-fetched.drv"
        );
        assert_eq!(
            NarInfo::parse(TREE_XZ).unwrap().compression(),
            &Compression::Xz
        );
    }

    #[test]
    fn real_signatures_verify() {
        for text in [TREE, TREE_XZ, WITH_REFS, FETCHED] {
            let info = NarInfo::parse(text).unwrap();
            assert!(info.verify(&trusted(&["test-1"])), "{text}");
            assert!(!info.verify(&TrustedKeys::default()));
        }
        // with-refs is signed by test-2 too; the others are not.
        assert!(
            NarInfo::parse(WITH_REFS)
                .unwrap()
                .verify(&trusted(&["test-2"]))
        );
        assert!(!NarInfo::parse(TREE).unwrap().verify(&trusted(&["test-2"])));
    }

    #[test]
    fn fingerprint_lists_full_reference_paths() {
        let info = NarInfo::parse(WITH_REFS).unwrap();
        assert_eq!(
            info.fingerprint(),
            "1;/nix/store/23zdbdgdn6iw1v0mgwlr3mwnn6jjd9wr-with-refs;\
             sha256:0gi7gs9mg4dilfvwd3byqklwh6p78s5qlk8pdqbw4ry0gnan1r5h;168;\
             /nix/store/5pfv6s6by7gii82n013bc8y49zs1d1fs-tree"
        );
        // Tampering with any signed field breaks verification.
        let tampered = WITH_REFS.replace("NarSize: 168", "NarSize: 169");
        assert!(
            !NarInfo::parse(&tampered)
                .unwrap()
                .verify(&trusted(&["test-1", "test-2"]))
        );
        let tampered = WITH_REFS.replace("References: 5pfv", "References: 6pfv");
        assert!(
            !NarInfo::parse(&tampered)
                .unwrap()
                .verify(&trusted(&["test-1"]))
        );
        // Unsigned fields may change.
        let moved = WITH_REFS.replace("URL: nar/", "URL: elsewhere/");
        assert!(
            NarInfo::parse(&moved)
                .unwrap()
                .verify(&trusted(&["test-1"]))
        );
    }

    #[test]
    fn references_are_sorted_and_deduplicated() {
        let a = "5pfv6s6by7gii82n013bc8y49zs1d1fs-tree";
        let b = "23zdbdgdn6iw1v0mgwlr3mwnn6jjd9wr-with-refs";
        let text = TREE.replace("References: ", &format!("References: {a} {b}  {a}"));
        let info = NarInfo::parse(&text).unwrap();
        let names: Vec<String> = info.references().iter().map(|r| r.base_name()).collect();
        assert_eq!(names, [b, a]);
        assert!(info.to_string().contains(&format!("References: {b} {a}\n")));
        assert!(
            info.fingerprint()
                .ends_with(&format!(";/nix/store/{b},/nix/store/{a}"))
        );
    }

    #[test]
    fn builds_and_signs() {
        let tree = NarInfo::parse(TREE).unwrap();
        let sk = SigningKey::generate("built-1").unwrap();
        let mut info = NarInfo::new(NarInfoFields {
            store_path: tree.store_path().clone(),
            url: "nar/x.nar.zst".into(),
            compression: Compression::Zstd,
            file_hash: None,
            file_size: None,
            nar_hash: *tree.nar_hash(),
            nar_size: tree.nar_size(),
            references: vec![],
            deriver: None,
            signatures: vec![],
            ca: None,
        })
        .unwrap();
        info.sign(&sk);
        info.sign(&sk);
        assert_eq!(info.signatures().len(), 1);
        assert!(info.verify(&TrustedKeys::new(vec![sk.verifying_key()])));
        let text = info.to_string();
        assert_eq!(
            text,
            format!(
                "StorePath: {}\nURL: nar/x.nar.zst\nCompression: zstd\nNarHash: {}\nNarSize: 1288\n\
                 References: \nSig: {}\n",
                tree.store_path(),
                tree.nar_hash(),
                info.signatures()[0]
            )
        );
        assert_eq!(NarInfo::parse(&text).unwrap(), info);
        assert!(info.verify(&TrustedKeys::new(vec![sk.verifying_key()])));
    }

    #[test]
    fn compression_names() {
        for (s, c) in [
            ("", Compression::Bzip2),
            ("bzip2", Compression::Bzip2),
            ("none", Compression::None),
            ("xz", Compression::Xz),
            ("zstd", Compression::Zstd),
            ("br", Compression::Other("br".into())),
        ] {
            assert_eq!(Compression::parse(s), c);
            if !s.is_empty() {
                assert_eq!(c.as_str(), s);
            }
        }
        let text = TREE.replace("Compression: none\n", "");
        assert_eq!(
            NarInfo::parse(&text).unwrap().compression(),
            &Compression::Bzip2
        );
        let text = TREE.replace("Compression: none", "Compression:");
        assert_eq!(
            NarInfo::parse(&text).unwrap().compression(),
            &Compression::Bzip2
        );
    }

    #[test]
    fn tolerated_variations() {
        // No final newline, unknown fields, unknown-deriver, FileHash in base16, no FileHash.
        let hex = NarInfo::parse(TREE).unwrap().nar_hash().to_base16_string();
        let text = TREE
            .replace(
                "FileHash: sha256:14migc49dpkfzyppb7bbqzl85gsinc6h69s1kdnqsf0pngk7ja7f\n",
                "",
            )
            .replace(
                "NarHash: sha256:14migc49dpkfzyppb7bbqzl85gsinc6h69s1kdnqsf0pngk7ja7f",
                &format!("NarHash: {hex}\nSystem: x86_64-linux\nDeriver: unknown-deriver"),
            );
        let info = NarInfo::parse(text.trim_end()).unwrap();
        assert_eq!(info.file_hash(), None);
        assert_eq!(info.deriver(), None);
        assert_eq!(info.nar_hash().to_base16_string(), hex);
        assert!(info.verify(&trusted(&["test-1"])));
    }

    #[test]
    fn rejects_invalid() {
        let err = |text: &str| NarInfo::parse(text).unwrap_err();
        let replace = |from: &str, to: &str| {
            assert!(TREE.contains(from), "{from}");
            err(&TREE.replacen(from, to, 1))
        };
        assert_eq!(
            replace("URL: ", "URL: x\nURL: "),
            NarInfoError::DuplicateField { field: "URL" }
        );
        assert_eq!(
            replace("NarSize: 1288", "NarSize: 1288\nNarSize: 1288"),
            NarInfoError::DuplicateField { field: "NarSize" }
        );
        assert_eq!(
            replace("CA: ", "CA: x\nCA: "),
            NarInfoError::DuplicateField { field: "CA" }
        );
        assert_eq!(
            replace("References: ", "References: \nReferences: "),
            NarInfoError::DuplicateField {
                field: "References"
            }
        );
        for field in ["StorePath", "URL", "NarHash", "NarSize"] {
            let text: String = TREE
                .lines()
                .filter(|l| !l.starts_with(&format!("{field}:")))
                .map(|l| format!("{l}\n"))
                .collect();
            assert_eq!(err(&text), NarInfoError::MissingField { field });
        }
        assert_eq!(
            replace(
                "URL: nar/14migc49dpkfzyppb7bbqzl85gsinc6h69s1kdnqsf0pngk7ja7f.nar",
                "URL: "
            ),
            NarInfoError::MissingField { field: "URL" }
        );
        assert_eq!(
            replace("NarSize: 1288", "NarSize: 0"),
            NarInfoError::ZeroNarSize
        );
        for bad in ["+1288", "-1", "12a", "", " 1288", "99999999999999999999"] {
            assert_eq!(
                replace("NarSize: 1288", &format!("NarSize: {bad}")),
                NarInfoError::BadNumber {
                    field: "NarSize",
                    value: bad.into()
                }
            );
        }
        assert!(matches!(
            replace("FileSize: 1288", "FileSize: x"),
            NarInfoError::BadNumber {
                field: "FileSize",
                ..
            }
        ));
        assert!(matches!(
            replace("NarHash: sha256:", "NarHash: md5:"),
            NarInfoError::BadHash {
                field: "NarHash",
                ..
            }
        ));
        assert!(matches!(
            replace("FileHash: sha256:1", "FileHash: sha256:"),
            NarInfoError::BadHash {
                field: "FileHash",
                ..
            }
        ));
        assert!(matches!(
            replace("/nix/store/", "/gnu/store/"),
            NarInfoError::BadStorePath {
                field: "StorePath",
                ..
            }
        ));
        let e = replace("References: ", "References: not-a-path");
        assert!(matches!(
            e,
            NarInfoError::BadStorePath {
                field: "References",
                ..
            }
        ));
        assert!(e.to_string().contains("not-a-path"), "{e}");
        assert!(matches!(
            replace(
                "References: ",
                "References: /nix/store/5pfv6s6by7gii82n013bc8y49zs1d1fs-tree"
            ),
            NarInfoError::BadStorePath {
                field: "References",
                ..
            }
        ));
        assert!(matches!(
            replace("CA: ", "Deriver: bad\nCA: "),
            NarInfoError::BadStorePath {
                field: "Deriver",
                ..
            }
        ));
        assert!(matches!(
            replace("Sig: test-1:", "Sig: test-1:AAAA"),
            NarInfoError::BadSignature { .. }
        ));
        assert!(matches!(
            replace("Sig: test-1:", "Sig: "),
            NarInfoError::BadSignature { .. }
        ));
        assert_eq!(
            replace("CA: ", "garbage\nCA: "),
            NarInfoError::MalformedLine {
                line: 10,
                content: "garbage".into()
            }
        );
        assert!(matches!(
            replace("URL: ", "URL:"),
            NarInfoError::MalformedLine { line: 2, .. }
        ));
        assert!(matches!(
            err(&format!("\n{TREE}")),
            NarInfoError::MalformedLine { line: 1, .. }
        ));
        assert!(matches!(
            err(&format!("{TREE}\n")),
            NarInfoError::MalformedLine { .. }
        ));
        assert!(matches!(
            err(&TREE.replace('\n', "\r\n")),
            NarInfoError::BadStorePath {
                field: "StorePath",
                ..
            }
        ));
        assert!(err("").to_string().contains("is missing required field"));
    }

    #[test]
    fn builder_rejects_what_cannot_be_written() {
        let mut fields = NarInfo::parse(TREE).unwrap().into_fields();
        fields.url = "a\nNarSize: 1".into();
        assert!(matches!(
            NarInfo::new(fields.clone()),
            Err(NarInfoError::BadText { field: "URL", .. })
        ));
        fields.url = "nar/x".into();
        fields.ca = Some(String::new());
        assert!(matches!(
            NarInfo::new(fields.clone()),
            Err(NarInfoError::BadText { field: "CA", .. })
        ));
        fields.ca = None;
        fields.nar_size = 0;
        assert_eq!(NarInfo::new(fields), Err(NarInfoError::ZeroNarSize));
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(text in "(?s)[A-Za-z: \\n0-9/.-]{0,300}") {
            let _ = NarInfo::parse(&text);
        }
    }
}
