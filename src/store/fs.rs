//! File-system steps of writing and deleting store paths.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use filetime::FileTime;

/// Nix sets every store file's mtime to 1 so that builds reading timestamps are reproducible.
const STORE_MTIME: i64 = 1;

/// Gives a freshly unpacked tree the canonical form of a Nix store path: regular files 0444 or
/// 0555 (when any execute bit is set), directories 0555, mtime 1 on everything, symlinks
/// included. Children come before their directory so setting their times cannot disturb it.
pub fn canonicalise(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let file_type = meta.file_type();
    if file_type.is_dir() {
        for entry in fs::read_dir(path)? {
            canonicalise(&entry?.path())?;
        }
        fs::set_permissions(path, fs::Permissions::from_mode(0o555))?;
    } else if file_type.is_file() {
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    } else if !file_type.is_symlink() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is neither file, directory nor symlink", path.display()),
        ));
    }
    let atime = FileTime::from_last_access_time(&meta);
    filetime::set_symlink_file_times(path, atime, FileTime::from_unix_time(STORE_MTIME, 0))
}

/// Removes a file, symlink or whole tree, making read-only directories writable first (store
/// directories are 0555, which only root may ignore). A missing path is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    if !meta.is_dir() {
        return fs::remove_file(path);
    }
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path)?;
            fs::remove_dir_all(path)
        }
        Err(err) => Err(err),
    }
}

fn make_writable(dir: &Path) -> io::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// Disk bytes a tree occupies (allocated blocks), for GC reports.
pub fn disk_usage(path: &Path) -> u64 {
    disk_usage_and_inodes(path).0
}

/// Disk bytes (allocated blocks) and inodes of a tree. Hard links count once per link: the
/// store does not make them.
pub fn disk_usage_and_inodes(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return (0, 0);
    };
    let (mut bytes, mut inodes) = (meta.blocks() * 512, 1);
    if meta.is_dir()
        && let Ok(entries) = fs::read_dir(path)
    {
        for entry in entries.flatten() {
            let (b, i) = disk_usage_and_inodes(&entry.path());
            bytes += b;
            inodes += i;
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn canonical_modes_and_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("p");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("data"), b"x").unwrap();
        fs::write(root.join("sub/tool"), b"#!/bin/sh").unwrap();
        fs::set_permissions(root.join("sub/tool"), fs::Permissions::from_mode(0o700)).unwrap();
        symlink("data", root.join("link")).unwrap();

        canonicalise(&root).unwrap();

        let mode = |p: &str| {
            fs::symlink_metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode(""), 0o555);
        assert_eq!(mode("sub"), 0o555);
        assert_eq!(mode("data"), 0o444);
        assert_eq!(mode("sub/tool"), 0o555);
        for p in ["", "sub", "data", "sub/tool", "link"] {
            let meta = fs::symlink_metadata(root.join(p)).unwrap();
            assert_eq!(
                FileTime::from_last_modification_time(&meta).unix_seconds(),
                1,
                "{p}"
            );
        }

        remove_tree(&root).unwrap();
        assert!(!root.exists());
        remove_tree(&root).unwrap();
    }
}
