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
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use filetime::FileTime;

use crate::nix::StorePath;
use crate::nix::nar::STORE_MTIME;

use super::{Store, StoreError, io_err};

/// Prefix of views being built or deleted; never a store path's base name.
const VIEW_TEMP_PREFIX: &str = ".tmp-";

impl Store {
    /// `ROOT/nix/var/nix-cri/views`.
    fn views_dir(&self) -> PathBuf {
        self.root.join("nix/var/nix-cri/views")
    }

    /// Where the view of `top`'s closure is (or would be).
    pub fn view_path(&self, top: &StorePath) -> PathBuf {
        self.views_dir().join(top.base_name())
    }

    /// The view of `top`'s closure (which must be valid and rooted), built when missing.
    pub fn build_view(&self, top: &StorePath) -> Result<PathBuf, StoreError> {
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
        let view = self.view_path(top);
        if fs::symlink_metadata(&view).is_ok_and(|m| m.is_dir()) {
            return Ok(view);
        }
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
            for path in closure {
                let from = self.real_path(path);
                mirror(&from, &temp.join(path.base_name())).map_err(io_err(&from))?;
            }
            super::fs::canonicalise_dirs(&temp).map_err(io_err(&temp))?;
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

/// Recreates the tree at `from` at `to`: directories anew, files as hard links, symlinks with
/// the same target. Directories stay writable until
/// [`super::fs::canonicalise_dirs`] seals the whole view.
fn mirror(from: &Path, to: &Path) -> io::Result<()> {
    let file_type = fs::symlink_metadata(from)?.file_type();
    if file_type.is_dir() {
        fs::create_dir(to)?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            let name = entry.file_name();
            mirror(&from.join(&name), &to.join(&name))?;
        }
        Ok(())
    } else if file_type.is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
        filetime::set_symlink_file_times(
            to,
            FileTime::from_unix_time(STORE_MTIME, 0),
            FileTime::from_unix_time(STORE_MTIME, 0),
        )
    } else if file_type.is_file() {
        fs::hard_link(from, to)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "neither file, directory nor symlink",
        ))
    }
}
