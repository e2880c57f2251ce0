//! Closure views: for a rooted top path, one directory holding exactly its closure, laid out as
//! `/nix/store` is, so a container can get its whole closure with one read-only bind mount.
//!
//! Why: runc spends about 0.2–0.4 ms on every bind mount (create the mount point, bind, remount
//! read-only), so a 500-path closure mounted path by path adds a fifth of a second to every
//! container start. One mount of a view costs what one mount costs.
//!
//! A view holds no copies. Files are hard links to the store's own (same inode: the store's
//! files are immutable, mode 0444/0555), symlinks are recreated with the same target, and
//! directories are recreated in store form (0555, mtime 1). It therefore shares the store's
//! file system: it lives at `ROOT/nix/var/nix-cri/views/<top>`, next to the store. The store
//! itself is untouched, so real Nix reads and verifies it as before.
//!
//! Lifetime: a view is built complete under a temporary name and renamed into place, so a view
//! under its final name is always whole. Builders hold `gc.lock` shared, and garbage collection
//! (holding it exclusively) deletes the views whose top no root holds any more, and any
//! temporary a crash left. A container's root holds its image's top, so the view a running
//! container has mounted stays until the container is removed.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{
    AtFlags, CWD, Dir, FileType, Mode, OFlags, fchmod, futimens, linkat, mkdirat, openat,
    readlinkat, statat, symlinkat, utimensat,
};

use crate::nix::StorePath;
use crate::nix::nar::STORE_TIMES;

use super::{Store, StoreError, io_err};

/// Prefix of views being built or deleted; never a store path's base name.
const VIEW_TEMP_PREFIX: &str = ".tmp-";

impl Store {
    /// `ROOT/nix/var/nix-cri/views`.
    pub(super) fn views_dir(&self) -> PathBuf {
        self.root.join("nix/var/nix-cri/views")
    }

    /// Where the view of `top`'s closure is (or would be).
    pub fn view_path(&self, top: &StorePath) -> PathBuf {
        self.views_dir().join(top.base_name())
    }

    /// The view of `top`'s closure, if it is built.
    pub fn existing_view(&self, top: &StorePath) -> Option<PathBuf> {
        let view = self.view_path(top);
        fs::symlink_metadata(&view)
            .is_ok_and(|m| m.is_dir())
            .then_some(view)
    }

    /// The view of `top`'s closure (which must be valid and rooted), built when missing.
    /// A view that exists is returned at once: a warm PullImage should not read the closure.
    pub fn build_view(&self, top: &StorePath) -> Result<PathBuf, StoreError> {
        if let Some(view) = self.existing_view(top) {
            return Ok(view);
        }
        let _gc = self.lock_gc_shared()?;
        let closure = self.closure(std::slice::from_ref(top))?;
        self.ensure_view(top, &closure)
    }

    /// The view of `closure`, which must be `top`'s closure, all valid; built when missing.
    /// The caller holds `gc.lock` shared and a root on `top`, so that GC neither deletes the
    /// paths nor takes the view away.
    pub fn ensure_view(
        &self,
        top: &StorePath,
        closure: &BTreeSet<StorePath>,
    ) -> Result<PathBuf, StoreError> {
        if let Some(view) = self.existing_view(top) {
            return Ok(view);
        }
        let view = self.view_path(top);
        let views = self.views_dir();
        fs::create_dir_all(&views).map_err(io_err(&views))?;
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = views.join(format!(
            "{VIEW_TEMP_PREFIX}{}-{}-{n}",
            std::process::id(),
            top.hash()
        ));
        let built = (|| {
            fs::create_dir(&temp).map_err(io_err(&temp))?;
            mirror_closure(&self.store_dir, closure, &temp)?;
            fs::rename(&temp, &view).map_err(io_err(&view))
        })();
        match built {
            Ok(()) => Ok(view),
            // Another builder renamed its view into place first: theirs is as good.
            Err(_) if fs::symlink_metadata(&view).is_ok_and(|m| m.is_dir()) => {
                let _ = super::fs::remove_tree(&temp);
                Ok(view)
            }
            Err(err) => {
                let _ = super::fs::remove_tree(&temp);
                Err(err)
            }
        }
    }

    /// Deletes the views whose top is not among `rooted`, and leftovers of interrupted builds
    /// and deletes. Caller holds `gc.lock` exclusively. Returns how many it deleted.
    pub(super) fn remove_unrooted_views(
        &self,
        rooted: &BTreeSet<StorePath>,
    ) -> Result<usize, StoreError> {
        let views = self.views_dir();
        let entries = match fs::read_dir(&views) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(io_err(&views)(err)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_err(&views))?;
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|name| StorePath::from_base_name(name).ok())
                .is_some_and(|top| rooted.contains(&top));
            if keep {
                continue;
            }
            let full = entry.path();
            if name
                .to_str()
                .is_some_and(|n| n.starts_with(VIEW_TEMP_PREFIX))
            {
                super::fs::remove_tree(&full).map_err(io_err(&full))?;
            } else {
                // Out of its name first, so a crash mid-delete leaves a leftover, never a
                // partial view under a top's name.
                let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
                let trash = views.join(format!(
                    "{VIEW_TEMP_PREFIX}{}-deleted-{n}",
                    std::process::id()
                ));
                fs::rename(&full, &trash).map_err(io_err(&full))?;
                super::fs::remove_tree(&trash).map_err(io_err(&trash))?;
            }
            removed += 1;
        }
        Ok(removed)
    }
}

/// Mirrors every path of `closure` from `store_dir` into the empty directory `view`, then
/// gives `view` the store's form. The paths are shared out among a few threads: a view of a
/// large closure is tens of thousands of links, and PullImage waits for it.
fn mirror_closure(
    store_dir: &Path,
    closure: &BTreeSet<StorePath>,
    view: &Path,
) -> Result<(), StoreError> {
    let open = |dir: &Path| open_dir(CWD, dir).map_err(io_err(dir));
    let from = open(store_dir)?;
    let to = open(view)?;
    let paths: Vec<&StorePath> = closure.iter().collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(paths.len().max(1));
    let mirror_some = || -> Result<(), StoreError> {
        loop {
            let Some(path) = paths.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return Ok(());
            };
            let name = path.base_name();
            CString::new(name.as_str())
                .map_err(io::Error::other)
                .and_then(|c_name| {
                    let stat = statat(&from, c_name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)?;
                    let kind = FileType::from_raw_mode(stat.st_mode);
                    mirror_entry(from.as_fd(), to.as_fd(), &c_name, kind)
                })
                .map_err(io_err(&store_dir.join(&name)))?;
        }
    };
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).map(|_| scope.spawn(mirror_some)).collect();
        let mut result = mirror_some();
        for helper in helpers {
            let joined = helper.join().unwrap_or_else(|_| {
                Err(io_err(view)(io::Error::other(
                    "a view-building thread panicked",
                )))
            });
            result = result.and(joined);
        }
        result
    })?;
    seal(&to).map_err(io_err(view))
}

/// Recreates the entry `name` of the directory `from` in the directory `to`: a directory
/// anew (its entries likewise, then sealed in store form), a file as a hard link, a symlink
/// with the same target. All through directory descriptors, so no path is resolved twice.
fn mirror_entry(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    name: &CStr,
    kind: FileType,
) -> io::Result<()> {
    match kind {
        FileType::RegularFile => Ok(linkat(from, name, to, name, AtFlags::empty())?),
        FileType::Symlink => {
            let target = readlinkat(from, name, Vec::new())?;
            symlinkat(target.as_c_str(), to, name)?;
            Ok(utimensat(
                to,
                name,
                &STORE_TIMES,
                AtFlags::SYMLINK_NOFOLLOW,
            )?)
        }
        FileType::Directory => {
            mkdirat(to, name, Mode::from_raw_mode(0o755))?;
            let from_dir = open_dir(from, name)?;
            let to_dir = open_dir(to, name)?;
            for entry in Dir::read_from(&from_dir)? {
                let entry = entry?;
                // Store file names are any bytes but `/` and NUL: kept as the C string they are.
                let child = entry.file_name();
                if matches!(child.to_bytes(), b"." | b"..") {
                    continue;
                }
                let mut kind = entry.file_type();
                if kind == FileType::Unknown {
                    // File systems that do not report types in listings.
                    kind = FileType::from_raw_mode(
                        statat(&from_dir, child, AtFlags::SYMLINK_NOFOLLOW)?.st_mode,
                    );
                }
                mirror_entry(from_dir.as_fd(), to_dir.as_fd(), child, kind).map_err(|err| {
                    let child = child.to_string_lossy();
                    io::Error::new(err.kind(), format!("{child}: {err}"))
                })?;
            }
            seal(&to_dir)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "neither file, directory nor symlink",
        )),
    }
}

/// A directory in store form: mode 0555, mtime 1.
fn seal(dir: &OwnedFd) -> io::Result<()> {
    fchmod(dir, Mode::from_raw_mode(0o555))?;
    Ok(futimens(dir, &STORE_TIMES)?)
}

fn open_dir<P: rustix::path::Arg>(at: impl AsFd, path: P) -> io::Result<OwnedFd> {
    Ok(openat(
        at,
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}
