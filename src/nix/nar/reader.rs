//! Streaming NAR parser.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

use super::{
    MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC, NarError, NarLimits, NarPath, NarSink, NarSummary,
};
use crate::nix::hash::Sha256Digest;

/// Longest keyword token; anything longer cannot be a keyword, so it is not read.
const MAX_TOKEN_LEN: u64 = 16;

/// A reader that hashes (SHA-256) and counts every byte passed through it, and refuses to go
/// past a byte limit.
///
/// At the limit, one byte is read ahead to tell "exactly at the limit, then EOF" (fine) from
/// "more to come" (an error, and [`Self::limit_exceeded`] becomes true).
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    limit: u64,
    exceeded: bool,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, u64::MAX)
    }

    pub fn with_limit(inner: R, limit: u64) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
            limit,
            exceeded: false,
        }
    }

    /// Bytes read (and hashed) so far.
    pub fn bytes_read(&self) -> u64 {
        self.count
    }

    /// True once a read found more input than the limit allows.
    pub fn limit_exceeded(&self) -> bool {
        self.exceeded
    }

    /// Hash and count of the bytes read so far.
    pub fn summary(&self) -> NarSummary {
        NarSummary {
            nar_hash: Sha256Digest::from_bytes(self.hasher.clone().finalize().into()),
            nar_size: self.count,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let allowed = self.limit - self.count;
        if allowed == 0 {
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.exceeded = true;
            return Err(io::Error::other(format!(
                "input is larger than the limit of {} bytes",
                self.limit
            )));
        }
        let len = buf
            .len()
            .min(usize::try_from(allowed).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..len])?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Parses a NAR from `reader`, handing entries to `sink`, and returns the hash and size of
/// the bytes read. See the [module docs](super) for what is rejected.
///
/// The summary is not compared with anything here; check it with [`NarSummary::check`].
pub fn unpack<R: Read>(
    reader: R,
    sink: &mut dyn NarSink,
    limits: &NarLimits,
) -> Result<NarSummary, NarError> {
    // Tokens are 8 bytes at a time; buffering keeps that from becoming a read per token.
    // Large file reads bypass BufReader's buffer, so contents are not copied twice.
    let input = BufReader::with_capacity(64 * 1024, reader);
    let mut parser = Parser {
        input: HashingReader::with_limit(input, limits.max_size),
        limits: *limits,
        path: NarPath::root(),
    };
    parser.magic()?;
    parser.node(sink)?;
    parser.end()?;
    Ok(parser.input.summary())
}

struct Parser<R> {
    input: HashingReader<R>,
    limits: NarLimits,
    /// The entry being parsed, for the sink and for error messages.
    path: NarPath,
}

impl<R: Read> Parser<R> {
    fn offset(&self) -> u64 {
        self.input.bytes_read()
    }

    fn path(&self) -> String {
        self.path.to_string()
    }

    fn read_error(&self, err: io::Error) -> NarError {
        read_error(&self.input, self.limits.max_size, &self.path, err)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), NarError> {
        self.input.read_exact(buf).map_err(|e| self.read_error(e))
    }

    fn read_u64(&mut self) -> Result<u64, NarError> {
        let mut buf = [0u8; 8];
        self.read_exact(&mut buf)?;
        Ok(u64::from_le_bytes(buf))
    }

    /// Fails early if a string of `len` bytes (plus padding) cannot fit in the size limit,
    /// so a huge length prefix is rejected before anything is read or allocated.
    fn check_fits(&self, len: u64) -> Result<(), NarError> {
        let end = self
            .offset()
            .saturating_add(len)
            .saturating_add(padding(len));
        if end > self.limits.max_size {
            return Err(NarError::TooLarge {
                max: self.limits.max_size,
                path: self.path(),
            });
        }
        Ok(())
    }

    fn read_padding(&mut self, len: u64) -> Result<(), NarError> {
        let mut pad = [0u8; 8];
        let pad = &mut pad[..padding(len) as usize];
        let offset = self.offset();
        self.read_exact(pad)?;
        if pad.iter().any(|&b| b != 0) {
            return Err(NarError::BadPadding {
                offset,
                path: self.path(),
            });
        }
        Ok(())
    }

    /// Reads the body of a string of `len` bytes (already checked to be small) and its padding.
    fn read_body(&mut self, len: u64) -> Result<Vec<u8>, NarError> {
        self.check_fits(len)?;
        let mut buf = vec![0u8; len as usize];
        self.read_exact(&mut buf)?;
        self.read_padding(len)?;
        Ok(buf)
    }

    /// Reads a keyword-sized string. A longer length is reported as what was found, unread.
    fn token(&mut self, expected: &'static str) -> Result<(u64, Vec<u8>), NarError> {
        let offset = self.offset();
        let len = self.read_u64()?;
        if len > MAX_TOKEN_LEN {
            return Err(NarError::UnexpectedToken {
                offset,
                path: self.path(),
                expected,
                found: format!("string of {len} bytes"),
            });
        }
        Ok((offset, self.read_body(len)?))
    }

    fn unexpected(&self, offset: u64, expected: &'static str, found: &[u8]) -> NarError {
        NarError::UnexpectedToken {
            offset,
            path: self.path(),
            expected,
            found: format!("{:?}", String::from_utf8_lossy(found)),
        }
    }

    fn expect(&mut self, token: &[u8], expected: &'static str) -> Result<(), NarError> {
        let (offset, found) = self.token(expected)?;
        if found != token {
            return Err(self.unexpected(offset, expected, &found));
        }
        Ok(())
    }

    fn magic(&mut self) -> Result<(), NarError> {
        let len = self.read_u64()?;
        let found = if len == NAR_MAGIC.len() as u64 {
            let magic = self.read_body(len)?;
            if magic == NAR_MAGIC {
                return Ok(());
            }
            format!("{:?}", String::from_utf8_lossy(&magic))
        } else {
            format!("a length prefix of {len}")
        };
        Err(NarError::BadMagic { found })
    }

    fn node(&mut self, sink: &mut dyn NarSink) -> Result<(), NarError> {
        self.expect(b"(", "\"(\"")?;
        self.expect(b"type", "\"type\"")?;
        const KINDS: &str = "\"regular\", \"symlink\" or \"directory\"";
        let (offset, kind) = self.token(KINDS)?;
        match kind.as_slice() {
            b"regular" => self.regular(sink)?,
            b"symlink" => self.symlink(sink)?,
            b"directory" => return self.directory(sink),
            other => return Err(self.unexpected(offset, KINDS, other)),
        }
        self.expect(b")", "\")\"")
    }

    fn regular(&mut self, sink: &mut dyn NarSink) -> Result<(), NarError> {
        const NEXT: &str = "\"executable\" or \"contents\"";
        let (mut offset, mut token) = self.token(NEXT)?;
        let executable = token == b"executable";
        if executable {
            self.expect(b"", "\"\" after \"executable\"")?;
            (offset, token) = self.token("\"contents\"")?;
        }
        if token != b"contents" {
            return Err(self.unexpected(offset, NEXT, &token));
        }
        let size = self.read_u64()?;
        self.check_fits(size)?;

        let mut contents = ContentReader {
            input: &mut self.input,
            max_size: self.limits.max_size,
            path: &self.path,
            remaining: size,
            failure: None,
        };
        // The sink sees only io::Errors; the reader's own failure explains them better.
        let result = sink.create_file(&self.path, executable, size, &mut contents);
        let ContentReader {
            remaining, failure, ..
        } = contents;
        if let Some(failure) = failure {
            return Err(failure);
        }
        result?;
        if remaining != 0 {
            return Err(NarError::FileNotConsumed {
                path: self.path(),
                remaining,
            });
        }
        self.read_padding(size)
    }

    fn symlink(&mut self, sink: &mut dyn NarSink) -> Result<(), NarError> {
        self.expect(b"target", "\"target\"")?;
        let len = self.read_u64()?;
        if len == 0 {
            return Err(self.bad_target("empty"));
        }
        if len > MAX_TARGET_LEN as u64 {
            return Err(self.bad_target("longer than 4096 bytes"));
        }
        let target = self.read_body(len)?;
        if target.contains(&0) {
            return Err(self.bad_target("contains NUL"));
        }
        sink.create_symlink(&self.path, &target)
    }

    fn bad_target(&self, reason: &'static str) -> NarError {
        NarError::BadSymlinkTarget {
            path: self.path(),
            reason,
        }
    }

    /// Parses entries up to and including the directory's closing `)`.
    fn directory(&mut self, sink: &mut dyn NarSink) -> Result<(), NarError> {
        sink.create_directory(&self.path)?;
        let mut previous: Option<Vec<u8>> = None;
        loop {
            const NEXT: &str = "\"entry\" or \")\"";
            let (offset, token) = self.token(NEXT)?;
            match token.as_slice() {
                b")" => return Ok(()),
                b"entry" => {}
                other => return Err(self.unexpected(offset, NEXT, other)),
            }
            self.expect(b"(", "\"(\"")?;
            self.expect(b"name", "\"name\"")?;
            let name = self.name()?;
            if let Some(previous) = &previous
                && name <= *previous
            {
                return Err(NarError::NotAscending {
                    path: self.path(),
                    previous: String::from_utf8_lossy(previous).into_owned(),
                    name: String::from_utf8_lossy(&name).into_owned(),
                });
            }
            self.expect(b"node", "\"node\"")?;
            self.path.push(name.clone());
            if self.path.depth() > self.limits.max_depth {
                return Err(NarError::TooDeep {
                    path: self.path(),
                    max: self.limits.max_depth,
                });
            }
            self.node(sink)?;
            self.path.pop();
            self.expect(b")", "\")\"")?;
            previous = Some(name);
        }
    }

    fn name(&mut self) -> Result<Vec<u8>, NarError> {
        let len = self.read_u64()?;
        let bad = |parser: &Self, name: &[u8], reason| NarError::BadName {
            path: parser.path(),
            name: String::from_utf8_lossy(name).into_owned(),
            reason,
        };
        if len > MAX_NAME_LEN as u64 {
            return Err(bad(self, b"", "longer than 255 bytes"));
        }
        let name = self.read_body(len)?;
        let reason = match name.as_slice() {
            b"" => "empty",
            b"." | b".." => "a relative directory",
            n if n.contains(&b'/') => "contains '/'",
            n if n.contains(&0) => "contains NUL",
            _ => return Ok(name),
        };
        Err(bad(self, &name, reason))
    }

    /// After the root node the input must end.
    fn end(&mut self) -> Result<(), NarError> {
        let offset = self.offset();
        let mut probe = [0u8; 1];
        loop {
            return match self.input.read(&mut probe) {
                Ok(0) => Ok(()),
                Ok(_) => Err(NarError::TrailingData { offset }),
                // Past the size limit, any further byte is trailing data.
                Err(_) if self.input.limit_exceeded() => Err(NarError::TrailingData { offset }),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(self.read_error(e)),
            };
        }
    }
}

/// Turns a read error into the most precise [`NarError`].
fn read_error<R>(
    input: &HashingReader<R>,
    max_size: u64,
    path: &NarPath,
    err: io::Error,
) -> NarError {
    if input.exceeded {
        NarError::TooLarge {
            max: max_size,
            path: path.to_string(),
        }
    } else if err.kind() == io::ErrorKind::UnexpectedEof {
        NarError::Truncated {
            offset: input.count,
            path: path.to_string(),
        }
    } else {
        NarError::Source {
            offset: input.count,
            path: path.to_string(),
            source: err,
        }
    }
}

/// Number of zero bytes after a string of `len` bytes.
fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}

/// The contents of one regular file: exactly `remaining` bytes of the NAR, then EOF.
struct ContentReader<'a, R> {
    input: &'a mut HashingReader<R>,
    max_size: u64,
    path: &'a NarPath,
    remaining: u64,
    /// Why reading failed, reported instead of whatever error the sink makes of it.
    failure: Option<NarError>,
}

impl<R: Read> Read for ContentReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || buf.is_empty() {
            return Ok(0);
        }
        let len = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        match self.input.read(&mut buf[..len]) {
            Ok(0) => {
                self.failure = Some(NarError::Truncated {
                    offset: self.input.count,
                    path: self.path.to_string(),
                });
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                // io::Error is not Clone: keep the original, give the sink a copy.
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failure = Some(read_error(self.input, self.max_size, self.path, e));
                Err(copy)
            }
        }
    }
}
