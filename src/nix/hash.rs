//! SHA-256 digests in the textual forms Nix uses.
//!
//! Nix prints a hash as `sha256:<nixbase32>` in narinfos and fingerprints, as
//! `sha256:<base16>` in the store database, and as SRI `sha256-<base64>` in newer tools. All
//! three (and `sha256:<base64>`, which Nix also reads) parse to the same [`Sha256Digest`].
//!
//! To hash data, use [`sha2::Sha256`] directly or [`Sha256Digest::digest`]; NARs are hashed
//! while streaming by [`crate::nix::nar::HashingReader`].

use std::fmt;
use std::str::FromStr;

use data_encoding::{BASE64, HEXLOWER, HEXLOWER_PERMISSIVE};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::nixbase32;

/// Number of bytes in a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// Why a string is not a SHA-256 hash.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HashError {
    #[error("hash {input:?} has no algorithm prefix (expected sha256: or sha256-)")]
    MissingAlgorithm { input: String },
    #[error("hash {input:?} uses unsupported algorithm {algo:?} (only sha256 is supported)")]
    UnsupportedAlgorithm { input: String, algo: String },
    #[error(
        "hash {input:?} has a digest of {len} characters (expected 52 nixbase32, 64 base16 or 44 base64)"
    )]
    BadLength { input: String, len: usize },
    #[error("hash {input:?} is not valid {encoding}")]
    BadEncoding {
        input: String,
        encoding: &'static str,
    },
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; SHA256_LEN]);

impl Sha256Digest {
    pub const fn from_bytes(bytes: [u8; SHA256_LEN]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; SHA256_LEN] {
        &self.0
    }

    /// The SHA-256 of `data`.
    pub fn digest(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Parses `sha256:<nixbase32>`, `sha256:<base16>`, `sha256:<base64>` or SRI
    /// `sha256-<base64>`.
    pub fn parse(input: &str) -> Result<Self, HashError> {
        let colon = input.find(':');
        let dash = input.find('-');
        // The algorithm ends at whichever separator comes first: base64 can contain neither ':'
        // nor '-', but an algorithm name never contains either.
        let (algo, digest, sri) = match (colon, dash) {
            (Some(c), Some(d)) if d < c => (&input[..d], &input[d + 1..], true),
            (Some(c), _) => (&input[..c], &input[c + 1..], false),
            (None, Some(d)) => (&input[..d], &input[d + 1..], true),
            (None, None) => {
                return Err(HashError::MissingAlgorithm {
                    input: input.to_string(),
                });
            }
        };
        if algo != "sha256" {
            return Err(HashError::UnsupportedAlgorithm {
                input: input.to_string(),
                algo: algo.to_string(),
            });
        }
        let bad = |encoding| HashError::BadEncoding {
            input: input.to_string(),
            encoding,
        };
        let bytes = match digest.len() {
            44 => BASE64
                .decode(digest.as_bytes())
                .map_err(|_| bad("base64"))?,
            52 if !sri => nixbase32::decode(digest.as_bytes()).map_err(|_| bad("nixbase32"))?,
            64 if !sri => HEXLOWER_PERMISSIVE
                .decode(digest.as_bytes())
                .map_err(|_| bad("base16"))?,
            len => {
                return Err(HashError::BadLength {
                    input: input.to_string(),
                    len,
                });
            }
        };
        let bytes: [u8; SHA256_LEN] = bytes.try_into().map_err(|_| bad("base64"))?;
        Ok(Self(bytes))
    }

    /// `sha256:<nixbase32>`, as in narinfos and signature fingerprints.
    pub fn to_nix32_string(&self) -> String {
        format!("sha256:{}", nixbase32::encode(&self.0))
    }

    /// `sha256:<base16>`, as in the store database (`ValidPaths.hash`).
    pub fn to_base16_string(&self) -> String {
        format!("sha256:{}", HEXLOWER.encode(&self.0))
    }

    /// SRI form `sha256-<base64>`.
    pub fn to_sri_string(&self) -> String {
        format!("sha256-{}", BASE64.encode(&self.0))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix32_string())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({})", self.to_nix32_string())
    }
}

impl FromStr for Sha256Digest {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<[u8; SHA256_LEN]> for Sha256Digest {
    fn from(bytes: [u8; SHA256_LEN]) -> Self {
        Self(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(base16, nixbase32, sri)` sha256 lines of `testdata/hashes.txt`, made by real Nix.
    fn real_vectors() -> Vec<(String, String, String)> {
        include_str!("testdata/hashes.txt")
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() == 4 && f[0] == "sha256")
                    .then(|| (f[1].to_string(), f[2].to_string(), f[3].to_string()))
            })
            .collect()
    }

    #[test]
    fn real_nix_forms_agree() {
        let vectors = real_vectors();
        assert_eq!(vectors.len(), 4);
        for (hex, nix32, sri) in vectors {
            let d = Sha256Digest::parse(&format!("sha256:{nix32}")).unwrap();
            assert_eq!(d, Sha256Digest::parse(&format!("sha256:{hex}")).unwrap());
            assert_eq!(
                d,
                Sha256Digest::parse(&format!("sha256:{}", hex.to_uppercase())).unwrap()
            );
            assert_eq!(d, Sha256Digest::parse(&sri).unwrap());
            assert_eq!(
                d,
                Sha256Digest::parse(&format!("sha256:{}", &sri[7..])).unwrap()
            );
            assert_eq!(d.to_nix32_string(), format!("sha256:{nix32}"));
            assert_eq!(d.to_base16_string(), format!("sha256:{hex}"));
            assert_eq!(d.to_sri_string(), sri);
            assert_eq!(d.to_string(), format!("sha256:{nix32}"));
            assert_eq!(format!("{d:?}"), format!("Sha256Digest(sha256:{nix32})"));
        }
    }

    #[test]
    fn digest_of_empty_input() {
        assert_eq!(
            Sha256Digest::digest(b"").to_nix32_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn rejects_bad_hashes() {
        let nix32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73";
        let err = |s: &str| Sha256Digest::parse(s).unwrap_err();
        assert!(matches!(err(nix32), HashError::MissingAlgorithm { .. }));
        assert_eq!(
            err("sha512:abc"),
            HashError::UnsupportedAlgorithm {
                input: "sha512:abc".into(),
                algo: "sha512".into()
            }
        );
        assert!(
            err("md5-1B2M2Y8AsgTpgAmY7PhCfg==")
                .to_string()
                .contains("\"md5\"")
        );
        assert!(matches!(
            err("sha256:"),
            HashError::BadLength { len: 0, .. }
        ));
        assert!(matches!(
            err(&format!("sha256:{}", &nix32[1..])),
            HashError::BadLength { len: 51, .. }
        ));
        // 'e' is not in the nixbase32 alphabet.
        let bad = format!("sha256:e{}", &nix32[1..]);
        assert!(matches!(
            err(&bad),
            HashError::BadEncoding {
                encoding: "nixbase32",
                ..
            }
        ));
        let bad = format!("sha256:{}", "g".repeat(64));
        assert!(matches!(
            err(&bad),
            HashError::BadEncoding {
                encoding: "base16",
                ..
            }
        ));
        // SRI takes only base64; a nixbase32 digest after a dash is a length error.
        assert!(matches!(
            err(&format!("sha256-{nix32}")),
            HashError::BadLength { .. }
        ));
        // Non-canonical base64 (non-zero trailing bits) is rejected.
        assert!(matches!(
            err("sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFV="),
            HashError::BadEncoding {
                encoding: "base64",
                ..
            }
        ));
    }
}
