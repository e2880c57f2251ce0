//! Writing the NAR of a local path, as `nix-store --dump` does.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::{NAR_MAGIC, NarSummary};
use crate::nix::hash::Sha256Digest;

/// Writes the NAR of `path` (a directory, regular file or symlink, not followed) to `w`.
///
/// Directory entries are sorted by name bytes; a file is executable if its owner has the x
/// bit; symlink targets are written as read. Other file types (sockets, devices, FIFOs) are
/// an error, as in Nix. I/O errors name the path at fault.
pub fn dump_path(path: &Path, w: &mut dyn Write) -> io::Result<()> {
    // Tokens are written 8 bytes at a time; buffer them.
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    write_str(&mut w, NAR_MAGIC)?;
    dump_node(path, &mut w)?;
    w.flush()
}

/// The NAR hash and size of `path`, without keeping the NAR.
pub fn nar_hash_path(path: &Path) -> io::Result<NarSummary> {
    let mut hasher = HashingWriter::new(io::sink());
    dump_path(path, &mut hasher)?;
    Ok(hasher.summary())
}

/// Adds the path to an I/O error, so it can be told apart from others in a tree.
fn at(path: &Path) -> impl FnOnce(io::Error) -> io::Error + '_ {
    move |e| io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

fn dump_node(path: &Path, w: &mut dyn Write) -> io::Result<()> {
    let meta = fs::symlink_metadata(path).map_err(at(path))?;
    let kind = meta.file_type();
    write_str(w, b"(")?;
    write_str(w, b"type")?;
    if kind.is_file() {
        write_str(w, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            write_str(w, b"executable")?;
            write_str(w, b"")?;
        }
        write_str(w, b"contents")?;
        let size = meta.len();
        w.write_all(&size.to_le_bytes())?;
        let file = File::open(path).map_err(at(path))?;
        // Take one byte more than announced to notice a file that grew meanwhile.
        let copied = io::copy(&mut file.take(size.saturating_add(1)), w).map_err(at(path))?;
        if copied != size {
            return Err(at(path)(io::Error::other(format!(
                "file changed size while writing the nar ({size} bytes, then {copied})"
            ))));
        }
        write_padding(w, size)?;
    } else if kind.is_dir() {
        write_str(w, b"directory")?;
        let mut names = Vec::new();
        for entry in fs::read_dir(path).map_err(at(path))? {
            names.push(entry.map_err(at(path))?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            write_str(w, b"entry")?;
            write_str(w, b"(")?;
            write_str(w, b"name")?;
            write_str(w, name.as_bytes())?;
            write_str(w, b"node")?;
            dump_node(&path.join(&name), w)?;
            write_str(w, b")")?;
        }
    } else if kind.is_symlink() {
        write_str(w, b"symlink")?;
        write_str(w, b"target")?;
        let target = fs::read_link(path).map_err(at(path))?;
        write_str(w, target.as_os_str().as_bytes())?;
    } else {
        return Err(at(path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "unsupported file type (only files, directories and symlinks can be in a nar)",
        )));
    }
    write_str(w, b")")
}

/// Writes a NAR string: length, bytes, zero padding to a multiple of 8.
pub(crate) fn write_str(w: &mut dyn Write, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    write_padding(w, s.len() as u64)
}

fn write_padding(w: &mut dyn Write, len: u64) -> io::Result<()> {
    let pad = (8 - len % 8) % 8;
    w.write_all(&[0u8; 8][..pad as usize])
}

/// A writer that hashes (SHA-256) and counts everything written through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Hash and count of the bytes written so far.
    pub fn summary(&self) -> NarSummary {
        NarSummary {
            nar_hash: Sha256Digest::from_bytes(self.hasher.clone().finalize().into()),
            nar_size: self.count,
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
