//! File-system steps of writing and deleting store paths.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use filetime::FileTime;

use crate::nix::nar::STORE_MTIME;

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

/// [`canonicalise`] for a tree whose files and symlinks already have their store form (as
/// [`crate::nix::nar::DirSink::for_store`] writes them): only directories get mode 0555 and
/// mtime 1, children first. The walk reads entry types from the directory listings and so
/// touches no file; a root that is not a directory is left as it is.
pub fn canonicalise_dirs(path: &Path) -> io::Result<()> {
    if !fs::symlink_metadata(path)?.is_dir() {
        return Ok(());
    }
    canonicalise_dir(path)
}

fn canonicalise_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            canonicalise_dir(&entry.path())?;
        } else if !file_type.is_file() && !file_type.is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is neither file, directory nor symlink",
                    entry.path().display()
                ),
            ));
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o555))?;
    filetime::set_file_mtime(dir, FileTime::from_unix_time(STORE_MTIME, 0))
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
    disk_usage_and_inodes(&[path]).0
}

/// Disk bytes (allocated blocks) and inodes of the trees at `paths`. A file with several
/// links (closure views link the store's files; Nix's optimiser links identical ones) counts
/// once, however many of its links the trees hold.
pub fn disk_usage_and_inodes(paths: &[&Path]) -> (u64, u64) {
    let mut linked = std::collections::HashSet::new();
    let mut total = (0, 0);
    for path in paths {
        add_usage(path, &mut linked, &mut total);
    }
    total
}

fn add_usage(
    path: &Path,
    linked: &mut std::collections::HashSet<(u64, u64)>,
    total: &mut (u64, u64),
) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() && meta.nlink() > 1 && !linked.insert((meta.dev(), meta.ino())) {
        return;
    }
    total.0 += meta.blocks() * 512;
    total.1 += 1;
    if meta.is_dir()
        && let Ok(entries) = fs::read_dir(path)
    {
        for entry in entries.flatten() {
            add_usage(&entry.path(), linked, total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn usage_counts_a_linked_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, view) = (dir.path().join("store"), dir.path().join("view"));
        fs::create_dir_all(&store).unwrap();
        fs::create_dir_all(&view).unwrap();
        fs::write(store.join("big"), vec![7u8; 64 << 10]).unwrap();
        let alone = disk_usage_and_inodes(&[&store]);
        fs::hard_link(store.join("big"), view.join("big")).unwrap();
        fs::hard_link(store.join("big"), store.join("again")).unwrap();
        let (bytes, inodes) = disk_usage_and_inodes(&[&store, &view]);
        let view_dir = fs::symlink_metadata(&view).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            bytes,
            alone.0 + view_dir.blocks() * 512,
            "the file's blocks count once"
        );
        assert_eq!(inodes, alone.1 + 1, "one more directory, no more files");
    }

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

    /// Unpacking in store form and canonicalising only directories gives what unpacking
    /// plainly and canonicalising everything gives: same modes, mtime 1, same NAR.
    #[test]
    fn store_form_sink_matches_full_canonicalisation() {
        use crate::nix::nar::{DirSink, NarLimits, dump_path, unpack};
        use std::os::unix::fs::MetadataExt;

        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub/deeper")).unwrap();
        fs::create_dir_all(src.join("empty")).unwrap();
        fs::write(src.join("data"), b"x").unwrap();
        fs::write(src.join("sub/deeper/tool"), b"#!/bin/sh").unwrap();
        fs::set_permissions(
            src.join("sub/deeper/tool"),
            fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        symlink("../data", src.join("sub/link")).unwrap();
        let mut nar = Vec::new();
        dump_path(&src, &mut nar).unwrap();

        let plain = dir.path().join("plain");
        unpack(&nar[..], &mut DirSink::new(&plain), &NarLimits::default()).unwrap();
        canonicalise(&plain).unwrap();
        let store = dir.path().join("store");
        unpack(
            &nar[..],
            &mut DirSink::for_store(&store),
            &NarLimits::default(),
        )
        .unwrap();
        canonicalise_dirs(&store).unwrap();

        for p in [
            "",
            "data",
            "empty",
            "sub",
            "sub/deeper",
            "sub/deeper/tool",
            "sub/link",
        ] {
            let (a, b) = (
                fs::symlink_metadata(plain.join(p)).unwrap(),
                fs::symlink_metadata(store.join(p)).unwrap(),
            );
            assert_eq!(a.mode(), b.mode(), "{p}");
            assert_eq!(b.mtime(), 1, "{p}");
        }
        let mut again = Vec::new();
        dump_path(&store, &mut again).unwrap();
        assert_eq!(again, nar);

        // A NAR of a single file or symlink: the sink did everything, nothing is left to do.
        let file = dir.path().join("file");
        let mut file_nar = Vec::new();
        dump_path(&src.join("data"), &mut file_nar).unwrap();
        unpack(
            &file_nar[..],
            &mut DirSink::for_store(&file),
            &NarLimits::default(),
        )
        .unwrap();
        canonicalise_dirs(&file).unwrap();
        let meta = fs::symlink_metadata(&file).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o444, 1));
    }
}
