//! Nix's base-32 encoding ("nixbase32").
//!
//! The alphabet is `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`). Unlike RFC 4648
//! base32 the encoding walks the input as one little-endian bit string and emits 5-bit groups
//! starting from the *most significant* end, without padding: `n` bytes become
//! `ceil(n * 8 / 5)` characters. The first character may carry fewer than 5 meaningful bits;
//! like Nix, [`decode`] rejects encodings whose unused high bits are set, so every byte string
//! has exactly one valid encoding.

use thiserror::Error;

/// The 32 characters, indexed by digit value.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Digit value of each byte, or `INVALID`.
const INVALID: u8 = 0xff;
const DECODE_TABLE: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// Why a string is not valid nixbase32.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("invalid nixbase32 character {char:?} at position {position}")]
    InvalidChar { position: usize, char: char },
    #[error("invalid nixbase32 length {len}: no byte string encodes to that many characters")]
    InvalidLength { len: usize },
    #[error("invalid nixbase32 encoding: unused high bits of the first character are set")]
    NonZeroPadding,
}

/// Number of characters that encode `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    if n == 0 { 0 } else { (n * 8 - 1) / 5 + 1 }
}

/// Number of bytes encoded by `n` characters (for a valid length `n`).
pub const fn decoded_len(n: usize) -> usize {
    n * 5 / 8
}

/// True if `c` is a character of the nixbase32 alphabet.
pub fn is_valid_char(c: u8) -> bool {
    DECODE_TABLE[c as usize] != INVALID
}

/// Encodes `bytes` into `out`, which must be exactly `encoded_len(bytes.len())` long.
/// Lets callers encode store-path hashes without allocating.
pub(crate) fn encode_into(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), encoded_len(bytes.len()));
    let len = out.len();
    for (k, slot) in out.iter_mut().enumerate() {
        // Character k (from the left) holds bits [5n, 5n+5) with n counted from the right.
        let b = (len - 1 - k) * 5;
        let i = b / 8;
        let j = b % 8;
        let low = bytes[i] >> j;
        let high = match bytes.get(i + 1) {
            // `checked_shl` because j == 0 would shift a u8 by 8.
            Some(next) => u8::checked_shl(*next, (8 - j) as u32).unwrap_or(0),
            None => 0,
        };
        *slot = ALPHABET[((low | high) & 0x1f) as usize];
    }
}

/// Encodes `bytes` as nixbase32.
pub fn encode(bytes: &[u8]) -> String {
    let mut out = vec![0u8; encoded_len(bytes.len())];
    encode_into(bytes, &mut out);
    out.into_iter().map(char::from).collect()
}

/// Decodes nixbase32, strictly: only alphabet characters, only lengths that some byte string
/// encodes to, and zero unused high bits.
pub fn decode(s: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let n = decoded_len(s.len());
    if encoded_len(n) != s.len() {
        return Err(DecodeError::InvalidLength { len: s.len() });
    }
    let mut out = vec![0u8; n];
    for (k, &c) in s.iter().enumerate() {
        let digit = DECODE_TABLE[c as usize];
        if digit == INVALID {
            return Err(DecodeError::InvalidChar {
                position: k,
                char: char::from(c),
            });
        }
        let b = (s.len() - 1 - k) * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= digit << j;
        let carry = u8::checked_shr(digit, (8 - j) as u32).unwrap_or(0);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry,
            None if carry != 0 => return Err(DecodeError::NonZeroPadding),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(algo, base16, nixbase32)` from `testdata/hashes.txt`, made by `nix-hash --to-base32`.
    fn real_vectors() -> Vec<(String, Vec<u8>, String)> {
        include_str!("testdata/hashes.txt")
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                (f.len() == 4).then(|| {
                    let bytes = data_encoding::HEXLOWER.decode(f[1].as_bytes()).unwrap();
                    (f[0].to_string(), bytes, f[2].to_string())
                })
            })
            .collect()
    }

    #[test]
    fn real_nix_vectors_round_trip() {
        let vectors = real_vectors();
        assert_eq!(vectors.len(), 16);
        for (algo, bytes, nix32) in vectors {
            assert_eq!(encode(&bytes), nix32, "{algo}");
            assert_eq!(decode(nix32.as_bytes()).unwrap(), bytes, "{algo}");
            assert_eq!(encoded_len(bytes.len()), nix32.len());
            assert_eq!(decoded_len(nix32.len()), bytes.len());
        }
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &str)] = &[
            (b"", ""),
            (&[0x00], "00"),
            (&[0x1f], "0z"),
            (&[0xff], "7z"),
            (&[0x00, 0x01], "0080"),
            (&[0xff, 0xff], "1zzz"),
            (b"\x01\x02\x03\x04\x05", "0l2060h1"),
        ];
        for (bytes, s) in cases {
            assert_eq!(encode(bytes), *s, "encode {bytes:?}");
            assert_eq!(decode(s.as_bytes()).unwrap(), *bytes, "decode {s}");
        }
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(decoded_len(32), 20);
        assert_eq!(decoded_len(52), 32);
        for n in 0..100 {
            assert_eq!(decoded_len(encoded_len(n)), n);
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode(b"0e"),
            Err(DecodeError::InvalidChar {
                position: 1,
                char: 'e'
            })
        );
        for bad in [&b"0o"[..], b"0u", b"0t", b"0E", b"0-", b"0\xff"] {
            assert!(
                matches!(decode(bad), Err(DecodeError::InvalidChar { .. })),
                "{bad:?}"
            );
        }
        assert_eq!(decode(b"0"), Err(DecodeError::InvalidLength { len: 1 }));
        assert_eq!(decode(b"000"), Err(DecodeError::InvalidLength { len: 3 }));
        // One byte has 8 bits; two characters carry 10, so the top 2 bits must be zero.
        assert_eq!(decode(b"8z"), Err(DecodeError::NonZeroPadding));
        assert!(decode(b"7z").is_ok());
        // A 52-character sha256 whose first character is above '1' overflows 256 bits.
        let mut s = encode(&[0xff; 32]).into_bytes();
        assert_eq!(s[0], b'1');
        s[0] = b'2';
        assert_eq!(decode(&s), Err(DecodeError::NonZeroPadding));
    }

    proptest::proptest! {
        #[test]
        fn round_trip(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            let s = encode(&bytes);
            proptest::prop_assert_eq!(s.len(), encoded_len(bytes.len()));
            proptest::prop_assert_eq!(decode(s.as_bytes()).unwrap(), bytes);
        }

        #[test]
        fn decode_never_panics(s in proptest::collection::vec(proptest::num::u8::ANY, 0..80)) {
            if let Ok(bytes) = decode(&s) {
                let again = encode(&bytes);
                proptest::prop_assert_eq!(again.as_bytes(), &s[..]);
            }
        }
    }
}
