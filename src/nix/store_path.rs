//! Store paths: `/nix/store/<hash>-<name>`.
//!
//! The hash part is 20 bytes, written as 32 nixbase32 characters. The name is 1 to 211
//! characters from `[0-9a-zA-Z+._?=-]` and does not start with `.` (Nix 2.8's rules; 211 keeps
//! the base name within 255 bytes, the usual file-name limit).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::nixbase32;

/// The only store directory nix-cri supports.
pub const STORE_DIR: &str = "/nix/store";
/// Bytes in the hash part of a store path.
pub const HASH_LEN: usize = 20;
/// Characters in the nixbase32 hash part of a store path.
pub const HASH_CHARS: usize = nixbase32::encoded_len(HASH_LEN);
/// Longest allowed name.
pub const MAX_NAME_LEN: usize = 211;

/// Which bytes may appear in a store path name.
const NAME_CHARS: [bool; 256] = {
    let mut table = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        table[c] =
            b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=');
        c += 1;
    }
    table
};

/// Why a string is not a store path (or a part of one).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StorePathError {
    #[error("store path {input:?} is not directly under {STORE_DIR}/")]
    NotInStore { input: String },
    #[error("store path {input:?} has a hash part of {len} characters (expected 32)")]
    HashLength { input: String, len: usize },
    #[error("store path {input:?} has an invalid hash part: {source}")]
    HashEncoding {
        input: String,
        source: nixbase32::DecodeError,
    },
    #[error("store path {input:?} has no '-' between hash and name")]
    MissingDash { input: String },
    #[error("store path {input:?} has an empty name")]
    EmptyName { input: String },
    #[error("store path {input:?} has a name of {len} characters (at most 211 allowed)")]
    NameTooLong { input: String, len: usize },
    #[error("store path {input:?} has a name starting with '.'")]
    NameStartsWithDot { input: String },
    #[error("store path {input:?} has invalid character {char:?} in its name")]
    InvalidNameChar { input: String, char: char },
}

/// The 20-byte hash part of a store path.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StorePathHash([u8; HASH_LEN]);

impl StorePathHash {
    pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
        &self.0
    }

    /// Parses the 32 nixbase32 characters of a hash part.
    pub fn parse(input: &str) -> Result<Self, StorePathError> {
        Self::parse_for(input, input)
    }

    /// Parses `s` as a hash part, naming `input` (the whole string being parsed) in errors.
    fn parse_for(s: &str, input: &str) -> Result<Self, StorePathError> {
        if s.len() != HASH_CHARS {
            return Err(StorePathError::HashLength {
                input: input.to_string(),
                len: s.len(),
            });
        }
        let bytes =
            nixbase32::decode(s.as_bytes()).map_err(|source| StorePathError::HashEncoding {
                input: input.to_string(),
                source,
            })?;
        let mut digest = [0u8; HASH_LEN];
        digest.copy_from_slice(&bytes);
        Ok(Self(digest))
    }

    /// The 32 nixbase32 characters, without allocating.
    fn encode(&self) -> [u8; HASH_CHARS] {
        let mut out = [0u8; HASH_CHARS];
        nixbase32::encode_into(&self.0, &mut out);
        out
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The alphabet is ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&self.encode()).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({self})")
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A store path under [`STORE_DIR`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    digest: [u8; HASH_LEN],
    name: String,
}

impl StorePath {
    /// Builds a store path from its parts, checking the name.
    pub fn new(hash: StorePathHash, name: &str) -> Result<Self, StorePathError> {
        check_name(name, &format!("{hash}-{name}"))?;
        Ok(Self {
            digest: hash.0,
            name: name.to_string(),
        })
    }

    /// Parses a base name `<32 nixbase32 chars>-<name>`.
    pub fn from_base_name(input: &str) -> Result<Self, StorePathError> {
        Self::parse_base_name(input, input)
    }

    /// Parses an absolute path `/nix/store/<hash>-<name>`. Nothing may follow the base name,
    /// not even a `/`.
    pub fn from_absolute_path(input: &str) -> Result<Self, StorePathError> {
        let base = input
            .strip_prefix(STORE_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|base| !base.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                input: input.to_string(),
            })?;
        Self::parse_base_name(base, input)
    }

    fn parse_base_name(base: &str, input: &str) -> Result<Self, StorePathError> {
        // Split at a byte index that is a char boundary only if the prefix is ASCII; `get`
        // keeps a multi-byte character from panicking the slice.
        let (Some(hash), Some(rest)) = (base.get(..HASH_CHARS), base.get(HASH_CHARS..)) else {
            return Err(StorePathError::HashLength {
                input: input.to_string(),
                len: base.find('-').unwrap_or(base.len()),
            });
        };
        let hash = StorePathHash::parse_for(hash, input)?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::MissingDash {
                input: input.to_string(),
            })?;
        check_name(name, input)?;
        Ok(Self {
            digest: hash.0,
            name: name.to_string(),
        })
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash(), self.name)
    }

    /// The 32 nixbase32 characters of the hash part.
    pub fn hash_part(&self) -> String {
        self.hash().to_string()
    }

    pub fn hash(&self) -> StorePathHash {
        StorePathHash(self.digest)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn digest(&self) -> &[u8; HASH_LEN] {
        &self.digest
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute_path(&self) -> String {
        format!("{STORE_DIR}/{}-{}", self.hash(), self.name)
    }
}

fn check_name(name: &str, input: &str) -> Result<(), StorePathError> {
    let input = || input.to_string();
    if name.is_empty() {
        return Err(StorePathError::EmptyName { input: input() });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong {
            input: input(),
            len: name.len(),
        });
    }
    if name.starts_with('.') {
        return Err(StorePathError::NameStartsWithDot { input: input() });
    }
    if let Some(c) = name
        .chars()
        .find(|&c| !c.is_ascii() || !NAME_CHARS[c as usize])
    {
        return Err(StorePathError::InvalidNameChar {
            input: input(),
            char: c,
        });
    }
    Ok(())
}

/// Ordered like the base-name strings, which is how Nix sorts references (for example in
/// signature fingerprints). nixbase32 does not preserve byte order, so this compares the
/// encoded hash, not the digest.
impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> Ordering {
        // The hash part has a fixed length, so comparing (hash, name) equals comparing
        // "<hash>-<name>". nixbase32 writes the digest as one little-endian 160-bit number,
        // most significant digit first, from an alphabet in ASCII order, with no padding
        // (32 × 5 = 160 bits): the encoded hashes compare as the digests read from their last
        // byte. Encoding both hashes on every comparison was most of the CPU of a warm pull of
        // a 1000-path closure (sorting the closure).
        self.digest
            .iter()
            .rev()
            .cmp(other.digest.iter().rev())
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash(), self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    /// Parses an absolute store path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_absolute_path(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TREE: &str = "5pfv6s6by7gii82n013bc8y49zs1d1fs-tree";

    #[test]
    fn parses_real_paths() {
        let p = StorePath::from_absolute_path(&format!("/nix/store/{TREE}")).unwrap();
        assert_eq!(p.base_name(), TREE);
        assert_eq!(p.hash_part(), "5pfv6s6by7gii82n013bc8y49zs1d1fs");
        assert_eq!(p.name(), "tree");
        assert_eq!(p.to_absolute_path(), format!("/nix/store/{TREE}"));
        assert_eq!(p.to_string(), format!("/nix/store/{TREE}"));
        assert_eq!(format!("{p:?}"), format!("StorePath(/nix/store/{TREE})"));
        assert_eq!(StorePath::from_base_name(TREE).unwrap(), p);
        assert_eq!(p.hash(), StorePathHash::parse(&p.hash_part()).unwrap());
        assert_eq!(p.hash().to_string(), p.hash_part());
        assert_eq!(StorePath::new(p.hash(), "tree").unwrap(), p);
        assert_eq!(p.digest(), p.hash().as_bytes());
        let drv =
            StorePath::from_base_name("2fimmy00hgf9c7d46a8lffbq2avvq28z-fetched.drv").unwrap();
        assert_eq!(drv.name(), "fetched.drv");
    }

    #[test]
    fn allowed_name_characters() {
        let h = "5pfv6s6by7gii82n013bc8y49zs1d1fs";
        for name in ["a", "A-Z_0.9+?=", "-x", "x.", &"n".repeat(211)] {
            let p = StorePath::from_base_name(&format!("{h}-{name}")).unwrap();
            assert_eq!(p.name(), name);
        }
    }

    #[test]
    fn rejects_bad_paths() {
        let h = "5pfv6s6by7gii82n013bc8y49zs1d1fs";
        let base = |s: &str| StorePath::from_base_name(s).unwrap_err();
        let abs = |s: &str| StorePath::from_absolute_path(s).unwrap_err();
        assert!(matches!(
            base(&format!("{h}-")),
            StorePathError::EmptyName { .. }
        ));
        assert!(matches!(base(h), StorePathError::MissingDash { .. }));
        assert!(matches!(
            base(&format!("{h}_x")),
            StorePathError::MissingDash { .. }
        ));
        assert!(matches!(
            base("abc-x"),
            StorePathError::HashLength { len: 3, .. }
        ));
        assert!(matches!(
            base(&format!("{h}0-x")),
            StorePathError::MissingDash { .. }
        ));
        assert!(matches!(
            base(&format!("e{}-x", &h[1..])),
            StorePathError::HashEncoding { .. }
        ));
        assert!(matches!(
            base(&format!("{h}-.hidden")),
            StorePathError::NameStartsWithDot { .. }
        ));
        assert!(matches!(
            base(&format!("{h}-{}", "n".repeat(212))),
            StorePathError::NameTooLong { len: 212, .. }
        ));
        for c in [" ", "/", "\0", "é", "@", ":", "~"] {
            assert!(
                matches!(
                    base(&format!("{h}-a{c}b")),
                    StorePathError::InvalidNameChar { .. }
                ),
                "{c:?}"
            );
        }
        // A multi-byte character inside the hash part must not panic the parser.
        assert!(matches!(
            base("aéééééééééééééééé-x"),
            StorePathError::HashLength { .. }
        ));
        for bad in [
            format!("/nix/store/{TREE}/"),
            format!("/nix/store/{TREE}/bin"),
            format!("/nix/store//{TREE}"),
            format!("/nix/store{TREE}"),
            format!("/other/store/{TREE}"),
            format!("nix/store/{TREE}"),
            TREE.to_string(),
        ] {
            assert!(
                matches!(abs(&bad), StorePathError::NotInStore { .. }),
                "{bad}"
            );
        }
        let msg = abs("/tmp/x").to_string();
        assert_eq!(
            msg,
            "store path \"/tmp/x\" is not directly under /nix/store/"
        );
        assert!(StorePathHash::parse("short").is_err());
    }

    #[test]
    fn orders_by_base_name_string() {
        let mut digests: Vec<StorePath> = (0u8..=255)
            .map(|b| StorePath::new(StorePathHash::from_bytes([b; 20]), "x").unwrap())
            .collect();
        digests.push(StorePath::from_base_name(&format!("{}-a", digests[3].hash())).unwrap());
        digests.push(StorePath::from_base_name(&format!("{}-x-y", digests[3].hash())).unwrap());
        let mut by_string = digests.clone();
        by_string.sort_by_key(|p| p.base_name());
        digests.sort();
        assert_eq!(digests, by_string);
    }

    #[test]
    fn orders_arbitrary_digests_by_base_name_string() {
        // Digests whose bytes all differ, from a fixed xorshift sequence.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut paths: Vec<StorePath> = (0..2000)
            .map(|_| {
                let mut digest = [0u8; HASH_LEN];
                for byte in &mut digest {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    // Few distinct values, so that long common prefixes occur too.
                    *byte = (state % 5) as u8 * 61;
                }
                StorePath::new(StorePathHash::from_bytes(digest), "p").unwrap()
            })
            .collect();
        let mut by_string = paths.clone();
        by_string.sort_by_key(|p| p.base_name());
        paths.sort();
        assert_eq!(paths, by_string);
    }
}
