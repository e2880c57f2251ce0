//! Streaming decompression of NAR files as binary caches store them.
//!
//! Decoders are synchronous `Read` adapters: the NAR pipeline runs on a blocking thread (it writes
//! files anyway), so there is no gain in async codecs, and each NAR gets a core of its own.

use std::io::{self, Read};

use crate::nix::Compression;

use super::CacheError;

/// A reader of the uncompressed NAR.
pub type NarReader = Box<dyn Read + Send>;

/// Wraps `compressed` in the decoder for `compression`.
///
/// Multi-stream decoders are used for every format because parallel compressors (pixz, pzstd,
/// pbzip2) write concatenated streams, and Nix reads those too.
pub fn decoder(compression: &Compression, compressed: NarReader) -> Result<NarReader, CacheError> {
    Ok(match compression {
        Compression::None => compressed,
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(compressed)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(compressed)?),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(compressed)),
        Compression::Other(name) => {
            return Err(CacheError::UnsupportedCompression { name: name.clone() });
        }
    })
}

/// Makes decoder failures say which codec failed, so "corrupt xz data" is not reported as a
/// mere I/O error of the NAR reader.
pub fn describe_decode_error(compression: &Compression, err: &io::Error) -> String {
    format!("{} decompression failed: {err}", compression.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn roundtrip(compression: Compression, compressed: Vec<u8>) -> Vec<u8> {
        let mut out = Vec::new();
        decoder(&compression, Box::new(io::Cursor::new(compressed)))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn decodes_every_compression_nix_writes() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();

        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&data).unwrap();
        assert_eq!(roundtrip(Compression::Xz, xz.finish().unwrap()), data);

        let zst = zstd::encode_all(&data[..], 3).unwrap();
        assert_eq!(roundtrip(Compression::Zstd, zst), data);

        let mut bz = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        bz.write_all(&data).unwrap();
        assert_eq!(roundtrip(Compression::Bzip2, bz.finish().unwrap()), data);

        assert_eq!(roundtrip(Compression::None, data.clone()), data);
    }

    #[test]
    fn concatenated_streams_decode_whole() {
        let mut zst = zstd::encode_all(&b"first "[..], 3).unwrap();
        zst.extend(zstd::encode_all(&b"second"[..], 3).unwrap());
        assert_eq!(roundtrip(Compression::Zstd, zst), b"first second");
    }

    #[test]
    fn corrupt_input_is_an_error_not_short_output() {
        let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&[7u8; 4096]).unwrap();
        let mut bytes = xz.finish().unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0xff;
        let mut out = Vec::new();
        let result = decoder(&Compression::Xz, Box::new(io::Cursor::new(bytes)))
            .unwrap()
            .read_to_end(&mut out);
        assert!(result.is_err());
    }

    #[test]
    fn unsupported_compression_is_named() {
        let err = decoder(
            &Compression::Other("br".into()),
            Box::new(io::Cursor::new(Vec::new())),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("br"), "{err}");
    }
}
