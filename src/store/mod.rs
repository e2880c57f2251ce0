//! The node-local Nix store: `ROOT/nix/store` plus Nix's own database under
//! `ROOT/nix/var/nix/db`, so real Nix (`nix-store --store ROOT …`) can read, verify and collect it.
//!
//! Invariants:
//! - A path appears under its final name only when complete: it is unpacked under a temporary
//!   name in the store directory (same file system), checked, canonicalised, then renamed.
//! - A path is registered only after all its references are (the closure invariant); the
//!   database's foreign keys refuse anything else.
//! - Garbage collection takes `gc.lock` exclusively, as Nix does; every pull holds it shared
//!   from the first validity check until its closure is rooted, so GC never deletes a path a
//!   pull is about to root.
//! - Anything left by an interrupted write (temporary trees, paths renamed but not registered)
//!   is removed when the store is opened and no one else is using it.

pub mod db;
pub mod fs;
mod gc;
mod roots;
pub mod substitute;
mod views;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::nix::{StorePath, StorePathHash};

pub use self::db::PathInfo;
pub use self::gc::GcReport;
pub use self::roots::{RootKind, RootName};
pub use self::substitute::{
    Progress, PulledPath, Realised, SubstituteError, Substituter, SubstituterConfig, Wanted,
};

/// Prefix of in-progress writes in the store directory. It starts with a dot, so it can never be
/// a store path (store path names cannot start with one, and hashes come first anyway).
const TEMP_PREFIX: &str = ".nix-cri-tmp-";
/// Prefix of paths being deleted by GC: renamed out of the way first so that a crash mid-delete
/// never leaves a half-deleted tree under a store path's name.
const TRASH_PREFIX: &str = ".nix-cri-trash-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("store database {}: {source}", file.display())]
    Db {
        file: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store database {} is corrupt at {path}: {what}", file.display())]
    CorruptDb {
        file: PathBuf,
        path: String,
        what: String,
    },
    #[error("store database {} has schema version {found:?}; nix-cri writes version 10", file.display())]
    SchemaVersion { file: PathBuf, found: String },
    #[error("cannot register {path}: its reference {reference} is not valid")]
    MissingReference {
        path: StorePath,
        reference: StorePath,
    },
    #[error("{path} is not valid in this store")]
    NotValid { path: StorePath },
    #[error("invalid GC root name {name:?}: {why}")]
    InvalidRootName { name: String, why: &'static str },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Bytes and paths in the store, from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUsage {
    pub nar_bytes: u64,
    pub paths: u64,
}

pub struct Store {
    root: PathBuf,
    store_dir: PathBuf,
    state_dir: PathBuf,
    db: Mutex<db::Db>,
    /// Held shared for the store's lifetime, as every Nix process does, so a Nix schema upgrade
    /// (which takes it exclusively) cannot run under us.
    _big_lock: File,
    temp_counter: AtomicU64,
    disk_usage: Mutex<Option<(std::time::Instant, (u64, u64))>>,
}

/// A held `gc.lock`; shared for pulls, exclusive for GC. The lock is the open file itself:
/// closing it on drop releases the lock.
pub struct GcLock(#[allow(dead_code)] File);

impl Store {
    /// Opens (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let root = root.to_owned();
        let store_dir = root.join("nix/store");
        let state_dir = root.join("nix/var/nix");
        let db_dir = state_dir.join("db");
        for dir in [
            &store_dir,
            &db_dir,
            &state_dir.join("gcroots"),
            &state_dir.join("profiles"),
            &state_dir.join("temproots"),
        ] {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let big_lock_path = db_dir.join("big-lock");
        let big_lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&big_lock_path)
            .map_err(io_err(&big_lock_path))?;
        big_lock.lock_shared().map_err(io_err(&big_lock_path))?;

        let schema_path = db_dir.join("schema");
        match std::fs::read_to_string(&schema_path) {
            Ok(found) if found.trim() == db::SCHEMA_VERSION => {}
            Ok(found) => {
                return Err(StoreError::SchemaVersion {
                    file: schema_path,
                    found: found.trim().to_owned(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(&schema_path)(err)),
        }
        let db = db::Db::open(&db_dir.join("db.sqlite"))?;
        // Written after the tables exist: Nix reads a missing schema file as "new store".
        if !schema_path.exists() {
            write_atomically(&schema_path, db::SCHEMA_VERSION.as_bytes())?;
        }
        let store = Self {
            root,
            store_dir,
            state_dir,
            db: Mutex::new(db),
            _big_lock: big_lock,
            temp_counter: AtomicU64::new(0),
            disk_usage: Mutex::new(None),
        };
        store.remove_leftovers_if_idle()?;
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `ROOT/nix/store`.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// Where `path` lives on this host.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.store_dir.join(path.base_name())
    }

    fn db(&self) -> MutexGuard<'_, db::Db> {
        // A panic while holding the lock cannot leave the connection inconsistent (SQLite
        // transactions roll back on drop), so a poisoned lock is still usable.
        self.db
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        self.db().is_valid(path)
    }

    /// The valid path whose hash part is `hash`, if any.
    pub fn path_from_hash(&self, hash: &StorePathHash) -> Result<Option<StorePath>, StoreError> {
        self.db().path_from_hash(hash)
    }

    pub fn path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        self.db().path_info(path)
    }

    /// The closure of valid `paths` (each included), in no particular order.
    pub fn closure(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError> {
        let db = self.db();
        let mut closure = BTreeSet::new();
        for path in paths {
            if closure.contains(path) {
                continue;
            }
            let (members, _) = db
                .closure(path)?
                .ok_or_else(|| StoreError::NotValid { path: path.clone() })?;
            closure.extend(members);
        }
        Ok(closure)
    }

    /// Sum of the NAR sizes of `top`'s closure.
    pub fn closure_nar_size(&self, top: &StorePath) -> Result<u64, StoreError> {
        self.db()
            .closure(top)?
            .map(|(_, size)| size)
            .ok_or_else(|| StoreError::NotValid { path: top.clone() })
    }

    /// Disk bytes and inodes under the store directory and the closure views (a file linked
    /// from both counts once), recomputed at most every 30 seconds.
    pub fn disk_usage_cached(&self) -> (u64, u64) {
        const FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(30);
        let mut cached = self
            .disk_usage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at, usage)) = *cached
            && at.elapsed() < FRESH_FOR
        {
            return usage;
        }
        let usage = fs::disk_usage_and_inodes(&[&self.store_dir, &self.views_dir()]);
        *cached = Some((std::time::Instant::now(), usage));
        usage
    }

    pub fn usage(&self) -> Result<StoreUsage, StoreError> {
        let (nar_bytes, paths) = self.db().usage()?;
        Ok(StoreUsage { nar_bytes, paths })
    }

    /// A fresh name in the store directory for unpacking `path` before it is complete. Only
    /// the hash part goes in: a full 211-character name plus the prefix would pass NAME_MAX.
    pub fn temp_path(&self, path: &StorePath) -> PathBuf {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        self.store_dir.join(format!(
            "{TEMP_PREFIX}{}-{}-{n}",
            std::process::id(),
            path.hash()
        ))
    }

    /// Moves a complete, checked and canonicalised tree from `temp` to its store path and
    /// registers it. If the path became valid meanwhile (another process fetched it), the
    /// temporary copy is dropped instead.
    pub fn commit(&self, temp: &Path, info: &PathInfo) -> Result<(), StoreError> {
        let mut db = self.db();
        let target = self.real_path(&info.path);
        if db.is_valid(&info.path)? {
            fs::remove_tree(temp).map_err(io_err(temp))?;
            return Ok(());
        }
        // An invalid tree under the final name is a leftover of a crash between rename and
        // registration; it is garbage by definition.
        fs::remove_tree(&target).map_err(io_err(&target))?;
        std::fs::rename(temp, &target).map_err(io_err(&target))?;
        if let Err(err) = db.register(info) {
            let _ = fs::remove_tree(&target);
            return Err(err);
        }
        Ok(())
    }

    fn gc_lock_file(&self) -> Result<(File, PathBuf), StoreError> {
        let path = self.state_dir.join("gc.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok((file, path))
    }

    /// Blocks until no GC runs, then keeps GC out until the guard drops.
    pub fn lock_gc_shared(&self) -> Result<GcLock, StoreError> {
        let (file, path) = self.gc_lock_file()?;
        file.lock_shared().map_err(io_err(&path))?;
        Ok(GcLock(file))
    }

    fn lock_gc_exclusive(&self) -> Result<GcLock, StoreError> {
        let (file, path) = self.gc_lock_file()?;
        file.lock().map_err(io_err(&path))?;
        Ok(GcLock(file))
    }

    /// Removes what interrupted writes and deletes left behind, and closure views no root
    /// holds, but only when no pull or GC (ours or another process's) holds `gc.lock`: their
    /// in-progress temporaries are not leftovers.
    fn remove_leftovers_if_idle(&self) -> Result<(), StoreError> {
        let (file, path) = self.gc_lock_file()?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::debug!("store in use; leaving leftovers for later");
                return Ok(());
            }
            Err(std::fs::TryLockError::Error(err)) => return Err(io_err(&path)(err)),
        }
        let removed = self.remove_leftovers()?;
        let rooted = self.all_roots()?.into_iter().collect();
        let views = self.remove_unrooted_views(&rooted)?;
        if views > 0 {
            tracing::info!(count = views, "removed unrooted closure views");
        }
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "removed leftovers of interrupted writes"
            );
        }
        Ok(())
    }

    /// Entries of the store directory that are not valid paths: our temporaries and trash,
    /// and store-path-named trees that were never registered. Caller holds `gc.lock`
    /// exclusively.
    fn remove_leftovers(&self) -> Result<Vec<PathBuf>, StoreError> {
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.store_dir).map_err(io_err(&self.store_dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.store_dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let leftover = if name.starts_with(TEMP_PREFIX) || name.starts_with(TRASH_PREFIX) {
                true
            } else if let Ok(path) = StorePath::from_base_name(name) {
                !self.is_valid(&path)?
            } else {
                // Not ours to judge (e.g. Nix's `.links`).
                false
            };
            if leftover {
                let full = entry.path();
                fs::remove_tree(&full).map_err(io_err(&full))?;
                removed.push(full);
            }
        }
        Ok(removed)
    }
}

impl GcLock {
    /// Releases the lock now rather than at drop.
    pub fn release(self) {}
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers never see a
/// partial file.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let temp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temp, bytes).map_err(io_err(&temp))?;
    std::fs::rename(&temp, path).map_err(io_err(path))
}
