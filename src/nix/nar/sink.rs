//! [`NarSink`]s: unpacking into the file system, and validating only.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;

use super::{NarError, NarPath, NarSink};

/// Copy buffer size: large enough that big files take few syscalls.
const COPY_BUFFER: usize = 256 * 1024;

/// Unpacks a NAR below a destination path that must not exist yet; the NAR's root becomes
/// that path (a directory, file or symlink).
///
/// Files get mode 0644, or 0755 if executable; directories 0755. The store canonicalises
/// modes and times afterwards. Every entry is created exclusively (`create_new`, `mkdir`,
/// `symlink` all fail on an existing name), so nothing is overwritten and no symlink is ever
/// followed: the NAR grammar makes every parent a directory this sink created.
///
/// [`DirSink::for_store`] gives files and symlinks their final store form as it writes them
/// (files 0444 or 0555, mtime 1, through the open file), so that only directories are left to
/// canonicalise: a closure of many small files then costs one path lookup per file, not four.
pub struct DirSink {
    root: PathBuf,
    buffer: Vec<u8>,
    store_form: bool,
}

/// Nix sets every store file's mtime to 1 so that builds reading timestamps are reproducible.
pub const STORE_MTIME: i64 = 1;

/// [`STORE_MTIME`] as the times to set on an entry: access time left as it is.
pub const STORE_TIMES: rustix::fs::Timestamps = rustix::fs::Timestamps {
    last_access: rustix::fs::Timespec {
        tv_sec: 0,
        tv_nsec: rustix::fs::UTIME_OMIT,
    },
    last_modification: rustix::fs::Timespec {
        tv_sec: STORE_MTIME,
        tv_nsec: 0,
    },
};

impl DirSink {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            buffer: Vec::new(),
            store_form: false,
        }
    }

    /// Like [`DirSink::new`], but files get mode 0444 (0555 if executable) and mtime 1, and
    /// symlinks mtime 1, as Nix's store has them. Directories stay writable (0755) so the
    /// unpacking can go on; the caller canonicalises them afterwards.
    pub fn for_store(root: impl Into<PathBuf>) -> Self {
        Self {
            store_form: true,
            ..Self::new(root)
        }
    }

    /// The file system path of `path`.
    fn target(&self, path: &NarPath) -> PathBuf {
        if path.is_root() {
            self.root.clone()
        } else {
            self.root.join(path.to_relative_path())
        }
    }
}

fn io_error(path: PathBuf) -> impl FnOnce(io::Error) -> NarError {
    move |source| NarError::Io { path, source }
}

impl NarSink for DirSink {
    fn create_directory(&mut self, path: &NarPath) -> Result<(), NarError> {
        let target = self.target(path);
        DirBuilder::new()
            .mode(0o755)
            .create(&target)
            .map_err(io_error(target))
    }

    fn create_file(
        &mut self,
        path: &NarPath,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let target = self.target(path);
        let store_form = self.store_form;
        let mode = match (store_form, executable) {
            (false, false) => 0o644,
            (false, true) => 0o755,
            (true, false) => 0o444,
            (true, true) => 0o555,
        };
        let mut write = |buffer: &mut Vec<u8>| -> io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&target)?;
            if executable || store_form {
                // The umask may have cleared bits; fchmod is not subject to it, and the
                // executable bit is the one mode bit the NAR records. A read-only mode does
                // not stop writing through the descriptor opened for writing.
                file.set_permissions(fs::Permissions::from_mode(mode))?;
            }
            if buffer.is_empty() && size > 0 {
                buffer.resize(COPY_BUFFER, 0);
            }
            let mut left = size;
            while left > 0 {
                let chunk = buffer
                    .len()
                    .min(usize::try_from(left).unwrap_or(usize::MAX));
                contents.read_exact(&mut buffer[..chunk])?;
                file.write_all(&buffer[..chunk])?;
                left -= chunk as u64;
            }
            if store_form {
                // After the last write, which would set it again.
                filetime::set_file_handle_times(
                    &file,
                    None,
                    Some(filetime::FileTime::from_unix_time(STORE_MTIME, 0)),
                )?;
            }
            Ok(())
        };
        write(&mut self.buffer).map_err(io_error(target))
    }

    fn create_symlink(&mut self, path: &NarPath, target: &[u8]) -> Result<(), NarError> {
        let link = self.target(path);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &link)
            .and_then(|()| {
                if !self.store_form {
                    return Ok(());
                }
                // mtime 1, atime left alone, on the link itself, as Nix's lutimes does.
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &link,
                    &STORE_TIMES,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(io::Error::from)
            })
            .map_err(io_error(link))
    }
}

/// Accepts everything and stores nothing: for validating and hashing a NAR (and fuzzing).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl NarSink for NullSink {
    fn create_directory(&mut self, _path: &NarPath) -> Result<(), NarError> {
        Ok(())
    }

    fn create_file(
        &mut self,
        path: &NarPath,
        _executable: bool,
        _size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        io::copy(contents, &mut io::sink())
            .map(|_| ())
            .map_err(io_error(path.to_relative_path()))
    }

    fn create_symlink(&mut self, _path: &NarPath, _target: &[u8]) -> Result<(), NarError> {
        Ok(())
    }
}
