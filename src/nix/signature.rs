//! Ed25519 signatures and keys in Nix's `name:base64` text form.
//!
//! A narinfo carries `Sig: <key name>:<base64 of 64 signature bytes>` lines over its
//! fingerprint (see [`crate::nix::NarInfo::fingerprint`]). A signature counts only when a
//! trusted public key (`name:base64` of 32 bytes) with the *same name* verifies it. Secret keys
//! (`nix-store --generate-binary-cache-key`) are `name:base64` of libsodium's 64-byte secret
//! key, which is the 32-byte seed followed by the 32-byte public key.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE64;
use thiserror::Error;

/// Why a signature or key string is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("{what} {input:?} is not of the form name:base64")]
    Malformed { what: &'static str, input: String },
    #[error("{what} {input:?} has invalid base64")]
    BadBase64 { what: &'static str, input: String },
    #[error("{what} {input:?} has {len} bytes (expected {expected})")]
    BadLength {
        what: &'static str,
        input: String,
        len: usize,
        expected: usize,
    },
    #[error("public key {input:?} is not a valid ed25519 point")]
    BadPublicKey { input: String },
    /// The secret key's embedded public half does not match its seed; the file is corrupt.
    #[error("secret key named {name:?} has a public half that does not match its seed")]
    KeyMismatch { name: String },
    #[error("key name {name:?} is empty or contains ':' or whitespace")]
    BadName { name: String },
    #[error("cannot read randomness from /dev/urandom: {message}")]
    Random { message: String },
}

/// Splits `name:base64` and decodes the payload, which must be `N` bytes.
fn parse_named<const N: usize>(
    input: &str,
    what: &'static str,
) -> Result<(String, [u8; N]), SignatureError> {
    let (name, payload) = input
        .split_once(':')
        .filter(|(name, payload)| valid_name(name) && !payload.is_empty())
        .ok_or_else(|| SignatureError::Malformed {
            what,
            input: input.to_string(),
        })?;
    // Key files written by Nix may end with a newline; never anything else.
    let payload = payload.strip_suffix('\n').unwrap_or(payload);
    let bytes = BASE64
        .decode(payload.as_bytes())
        .map_err(|_| SignatureError::BadBase64 {
            what,
            input: input.to_string(),
        })?;
    let len = bytes.len();
    let bytes: [u8; N] = bytes.try_into().map_err(|_| SignatureError::BadLength {
        what,
        input: input.to_string(),
        len,
        expected: N,
    })?;
    Ok((name.to_string(), bytes))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(':') && !name.contains(char::is_whitespace)
}

/// A detached signature `name:base64(64 bytes)`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(input: &str) -> Result<Self, SignatureError> {
        let (name, bytes) = parse_named::<64>(input, "signature")?;
        Ok(Self { name, bytes })
    }

    /// The name of the key that made it.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn bytes(&self) -> &[u8; 64] {
        &self.bytes
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(&self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl FromStr for Signature {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A named ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl VerifyingKey {
    /// Parses `name:base64(32 bytes)`, as in `trusted-public-keys`.
    pub fn parse(input: &str) -> Result<Self, SignatureError> {
        let (name, bytes) = parse_named::<32>(input, "public key")?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| {
            SignatureError::BadPublicKey {
                input: input.to_string(),
            }
        })?;
        Ok(Self { name, key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True if `sig` was made over `fingerprint` by this key. A signature from a key of
    /// another name never verifies, even if the bytes would.
    pub fn verify(&self, fingerprint: &[u8], sig: &Signature) -> bool {
        // verify_strict rejects malleable and small-order signatures, as libsodium does.
        sig.name == self.name
            && self
                .key
                .verify_strict(
                    fingerprint,
                    &ed25519_dalek::Signature::from_bytes(&sig.bytes),
                )
                .is_ok()
    }
}

impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, BASE64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

impl FromStr for VerifyingKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A named ed25519 secret key.
#[derive(Clone)]
pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl SigningKey {
    /// Parses Nix's secret key file contents: `name:base64(seed ‖ public key)`. A trailing
    /// newline is accepted.
    pub fn parse(input: &str) -> Result<Self, SignatureError> {
        // Never echo the secret in errors.
        let redacted = |e: SignatureError| match e {
            SignatureError::Malformed { what, .. } => SignatureError::Malformed {
                what,
                input: "<redacted>".into(),
            },
            SignatureError::BadBase64 { what, .. } => SignatureError::BadBase64 {
                what,
                input: "<redacted>".into(),
            },
            SignatureError::BadLength {
                what,
                len,
                expected,
                ..
            } => SignatureError::BadLength {
                what,
                input: "<redacted>".into(),
                len,
                expected,
            },
            other => other,
        };
        let (name, bytes) = parse_named::<64>(input, "secret key").map_err(redacted)?;
        let key = ed25519_dalek::SigningKey::from_keypair_bytes(&bytes)
            .map_err(|_| SignatureError::KeyMismatch { name: name.clone() })?;
        Ok(Self { name, key })
    }

    /// A key from a 32-byte seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, SignatureError> {
        if !valid_name(name) {
            return Err(SignatureError::BadName {
                name: name.to_string(),
            });
        }
        Ok(Self {
            name: name.to_string(),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// A fresh random key (seeded from `/dev/urandom`), like
    /// `nix-store --generate-binary-cache-key`.
    pub fn generate(name: &str) -> Result<Self, SignatureError> {
        use std::io::Read;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| SignatureError::Random {
                message: e.to_string(),
            })?;
        Self::from_seed(name, seed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sign(&self, fingerprint: &[u8]) -> Signature {
        use ed25519_dalek::Signer;
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(fingerprint).to_bytes(),
        }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// The secret key file contents Nix reads (`name:base64(seed ‖ public key)`, no newline).
    pub fn to_secret_string(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            BASE64.encode(&self.key.to_keypair_bytes())
        )
    }
}

/// Shows only the name and public key, never the secret.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.verifying_key())
    }
}

/// The set of public keys whose signatures are accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<VerifyingKey>,
}

impl TrustedKeys {
    pub fn new(keys: Vec<VerifyingKey>) -> Self {
        Self { keys }
    }

    /// Parses a whitespace-separated list of keys, as in Nix's `trusted-public-keys`.
    pub fn parse(input: &str) -> Result<Self, SignatureError> {
        let keys = input
            .split_whitespace()
            .map(VerifyingKey::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// True if at least one of `sigs` verifies under a trusted key of the same name.
    pub fn verify_any(&self, fingerprint: &[u8], sigs: &[Signature]) -> bool {
        sigs.iter().any(|sig| {
            self.keys
                .iter()
                .any(|key| key.name == sig.name && key.verify(fingerprint, sig))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST1_PK: &str = include_str!("testdata/test-1.pk");
    const TEST1_SK: &str = include_str!("testdata/test-1.sk");
    const TEST2_PK: &str = include_str!("testdata/test-2.pk");

    /// The fingerprint and signature of `testdata/tree.narinfo`, signed by `nix store sign`.
    fn real_signed() -> (String, Signature) {
        let text = include_str!("testdata/tree.narinfo");
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap()
                .to_string()
        };
        let fingerprint = format!(
            "1;{};{};{};",
            field("StorePath: "),
            field("NarHash: "),
            field("NarSize: ")
        );
        (fingerprint, Signature::parse(&field("Sig: ")).unwrap())
    }

    #[test]
    fn real_nix_signature_verifies() {
        let (fp, sig) = real_signed();
        let pk = VerifyingKey::parse(TEST1_PK).unwrap();
        assert_eq!(pk.name(), "test-1");
        assert_eq!(pk.to_string(), TEST1_PK.trim_end());
        assert!(pk.verify(fp.as_bytes(), &sig));
        assert!(
            TrustedKeys::new(vec![pk.clone()])
                .verify_any(fp.as_bytes(), std::slice::from_ref(&sig))
        );

        let mut flipped = sig.clone();
        flipped.bytes[10] ^= 1;
        assert!(!pk.verify(fp.as_bytes(), &flipped));
        let mut fp_flipped = fp.clone().into_bytes();
        fp_flipped[5] ^= 1;
        assert!(!pk.verify(&fp_flipped, &sig));
    }

    #[test]
    fn same_key_under_another_name_does_not_verify() {
        let (fp, sig) = real_signed();
        let renamed = TEST1_PK.replacen("test-1:", "other:", 1);
        let pk = VerifyingKey::parse(&renamed).unwrap();
        assert!(!pk.verify(fp.as_bytes(), &sig));
        let trusted = TrustedKeys::parse(&format!("{renamed} {TEST2_PK}")).unwrap();
        assert!(!trusted.verify_any(fp.as_bytes(), &[sig]));
    }

    #[test]
    fn real_secret_key_signs_like_nix() {
        let sk = SigningKey::parse(TEST1_SK).unwrap();
        assert_eq!(sk.name(), "test-1");
        assert_eq!(sk.verifying_key(), VerifyingKey::parse(TEST1_PK).unwrap());
        assert_eq!(sk.to_secret_string(), TEST1_SK.trim_end());
        // Ed25519 is deterministic, so our signature equals the one Nix wrote.
        let (fp, sig) = real_signed();
        assert_eq!(sk.sign(fp.as_bytes()), sig);
        assert!(format!("{sk:?}").contains("test-1:"));
        assert!(!format!("{sk:?}").contains(TEST1_SK.trim_end()));
    }

    #[test]
    fn generated_keys_sign_and_verify() {
        let sk = SigningKey::generate("cache.example-1").unwrap();
        let sig = sk.sign(b"hello");
        assert_eq!(Signature::parse(&sig.to_string()).unwrap(), sig);
        let trusted = TrustedKeys::new(vec![
            VerifyingKey::parse(TEST1_PK).unwrap(),
            VerifyingKey::parse(&sk.verifying_key().to_string()).unwrap(),
        ]);
        assert!(trusted.verify_any(b"hello", std::slice::from_ref(&sig)));
        assert!(!trusted.verify_any(b"hellO", std::slice::from_ref(&sig)));
        assert!(!TrustedKeys::default().verify_any(b"hello", &[sig]));
        assert!(TrustedKeys::default().is_empty());
        assert!(SigningKey::generate("bad name").is_err());
        assert!(SigningKey::generate("").is_err());
    }

    #[test]
    fn rejects_malformed() {
        let (_, sig) = real_signed();
        let b64 = sig.to_string()["test-1:".len()..].to_string();
        assert!(matches!(
            Signature::parse(&b64),
            Err(SignatureError::Malformed { .. })
        ));
        assert!(matches!(
            Signature::parse(&format!(":{b64}")),
            Err(SignatureError::Malformed { .. })
        ));
        assert!(matches!(
            Signature::parse("k:"),
            Err(SignatureError::Malformed { .. })
        ));
        assert!(matches!(
            Signature::parse("k:!!!!"),
            Err(SignatureError::BadBase64 { .. })
        ));
        assert!(matches!(
            Signature::parse("k:AAAA"),
            Err(SignatureError::BadLength {
                len: 3,
                expected: 64,
                ..
            })
        ));
        // A 64-byte signature is not a 32-byte public key.
        assert!(matches!(
            VerifyingKey::parse(&sig.to_string()),
            Err(SignatureError::BadLength {
                len: 64,
                expected: 32,
                ..
            })
        ));
        // Public half replaced by another key's: corrupt secret key.
        let sk = SigningKey::parse(TEST1_SK).unwrap();
        let other = SigningKey::from_seed("test-1", [7; 32]).unwrap();
        let mut bytes = sk.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(other.key.verifying_key().as_bytes());
        let corrupt = format!("test-1:{}", BASE64.encode(&bytes));
        assert!(matches!(
            SigningKey::parse(&corrupt),
            Err(SignatureError::KeyMismatch { .. })
        ));
        let err = SigningKey::parse("test-1:AAAA").unwrap_err().to_string();
        assert!(err.contains("<redacted>"), "{err}");
    }
}
