//! GC roots: symlinks `ROOT/nix/var/nix/gcroots/nix-cri/<kind>/<holder>` → `/nix/store/<path>`.
//!
//! They live where Nix looks for roots and point at the logical store path, as Nix's own roots
//! do, so `nix-store --store ROOT --gc` keeps exactly what nix-cri keeps. One symlink per holder
//! (an image, a container, a CLI pull) is enough: everything reachable from it stays.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::nix::{STORE_DIR, StorePath};

use super::{Store, StoreError, io_err};

/// Who holds a root; each kind is a directory under `gcroots/nix-cri/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RootKind {
    Image,
    Container,
    /// A pull in progress: holds the closure until the image's own root exists.
    Pull,
    /// `nix-cri pull` from the command line.
    Cli,
}

impl RootKind {
    const ALL: [RootKind; 4] = [
        RootKind::Image,
        RootKind::Container,
        RootKind::Pull,
        RootKind::Cli,
    ];

    pub fn dir_name(self) -> &'static str {
        match self {
            RootKind::Image => "images",
            RootKind::Container => "containers",
            RootKind::Pull => "pulls",
            RootKind::Cli => "cli",
        }
    }
}

/// The name of one root: its kind and its holder (an image id, a container id, a path name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootName {
    kind: RootKind,
    holder: String,
}

impl RootName {
    /// Holders become file names, so they are limited to characters that are safe and
    /// unambiguous in one: image ids (`sha256:…`), container ids and store path names fit.
    pub fn new(kind: RootKind, holder: &str) -> Result<Self, StoreError> {
        let invalid = |why| StoreError::InvalidRootName {
            name: holder.to_owned(),
            why,
        };
        if holder.is_empty() || holder.len() > 255 {
            return Err(invalid("must be 1 to 255 characters"));
        }
        if holder.starts_with('.') {
            return Err(invalid("must not start with a dot"));
        }
        if !holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-._:=@".contains(&b))
        {
            return Err(invalid("may hold only letters, digits and + - . _ : = @"));
        }
        Ok(Self {
            kind,
            holder: holder.to_owned(),
        })
    }

    pub fn kind(&self) -> RootKind {
        self.kind
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }
}

impl fmt::Display for RootName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.dir_name(), self.holder)
    }
}

impl Store {
    fn our_roots_dir(&self) -> PathBuf {
        self.state_dir.join("gcroots/nix-cri")
    }

    fn root_link(&self, name: &RootName) -> PathBuf {
        self.our_roots_dir()
            .join(name.kind.dir_name())
            .join(&name.holder)
    }

    /// Roots `path` (which must be valid) under `name`, replacing what that name held before.
    /// The symlink is made under a temporary name and renamed, so the root is never missing.
    pub fn add_root(&self, name: &RootName, path: &StorePath) -> Result<(), StoreError> {
        if !self.is_valid(path)? {
            return Err(StoreError::NotValid { path: path.clone() });
        }
        let link = self.root_link(name);
        let dir = link.parent().unwrap_or(&link);
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let temp = dir.join(format!(".tmp-{}-{}", std::process::id(), name.holder));
        let _ = std::fs::remove_file(&temp);
        std::os::unix::fs::symlink(path.to_absolute_path(), &temp).map_err(io_err(&temp))?;
        std::fs::rename(&temp, &link).map_err(io_err(&link))
    }

    /// When the holder of `name` was last used: the root's own mtime.
    pub fn root_last_used(&self, name: &RootName) -> Option<std::time::SystemTime> {
        std::fs::symlink_metadata(self.root_link(name))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Marks the holder of `name` as used now (for least-recently-used collection).
    pub fn touch_root(&self, name: &RootName) -> Result<(), StoreError> {
        let link = self.root_link(name);
        let now = filetime::FileTime::now();
        filetime::set_symlink_file_times(&link, now, now).map_err(io_err(&link))
    }

    /// What `name` holds, if it exists.
    pub fn root_target(&self, name: &RootName) -> Option<StorePath> {
        std::fs::read_link(self.root_link(name))
            .ok()
            .and_then(|target| store_path_in(&target))
    }

    /// Drops a root; dropping one that does not exist is fine (idempotent, like RemoveImage).
    pub fn remove_root(&self, name: &RootName) -> Result<bool, StoreError> {
        let link = self.root_link(name);
        match std::fs::remove_file(&link) {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(err) => Err(io_err(&link)(err)),
        }
    }

    /// nix-cri's own roots, with what each holds. Links that do not point into the store are
    /// skipped with a warning.
    pub fn roots(&self) -> Result<Vec<(RootName, StorePath)>, StoreError> {
        let mut roots = Vec::new();
        for kind in RootKind::ALL {
            let dir = self.our_roots_dir().join(kind.dir_name());
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err(&dir)(err)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err(&dir))?;
                let Some(holder) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let Ok(name) = RootName::new(kind, &holder) else {
                    continue;
                };
                match std::fs::read_link(entry.path())
                    .ok()
                    .and_then(|t| store_path_in(&t))
                {
                    Some(path) => roots.push((name, path)),
                    None => tracing::warn!(root = %name, "GC root does not point into the store"),
                }
            }
        }
        roots.sort();
        Ok(roots)
    }

    /// Every root Nix would honour in this store: symlinks anywhere under `gcroots/` and
    /// `profiles/` (directly into the store, or through one more symlink as Nix's indirect
    /// roots do), and the temporary roots of live Nix processes in `temproots/`.
    pub fn all_roots(&self) -> Result<Vec<StorePath>, StoreError> {
        let mut found = Vec::new();
        for top in ["gcroots", "profiles"] {
            find_roots(&self.state_dir.join(top), &mut found)?;
        }
        temp_roots(&self.state_dir.join("temproots"), &mut found)?;
        Ok(found)
    }
}

/// The store path a link target names: `/nix/store/<hash>-<name>[/anything]`.
fn store_path_in(target: &Path) -> Option<StorePath> {
    let text = target.to_str()?;
    let rest = text.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let base = rest.split('/').next()?;
    StorePath::from_base_name(base).ok()
}

fn find_roots(dir: &Path, found: &mut Vec<StorePath>) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_err(dir)(err)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err(&path))?;
        if file_type.is_dir() {
            find_roots(&path, found)?;
        } else if file_type.is_symlink() {
            let Ok(target) = std::fs::read_link(&path) else {
                continue;
            };
            if let Some(root) = store_path_in(&target) {
                found.push(root);
            } else {
                // An indirect root: a link to a link (e.g. a `result` symlink) into the store.
                let target = dir.join(target);
                if let Some(root) = std::fs::read_link(&target)
                    .ok()
                    .and_then(|t| store_path_in(&t))
                {
                    found.push(root);
                }
            }
        }
    }
    Ok(())
}

/// `temproots/<pid>` files hold NUL-terminated paths and are locked by their live owner; an
/// unlocked file belongs to a dead process and protects nothing.
fn temp_roots(dir: &Path, found: &mut Vec<StorePath>) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_err(dir)(err)),
    };
    for entry in entries.flatten() {
        let Ok(file) = std::fs::File::open(entry.path()) else {
            continue;
        };
        if let Err(std::fs::TryLockError::WouldBlock) = file.try_lock_shared() {
            // Shared fails only against an exclusive lock: the owner is alive.
        } else {
            continue;
        }
        let Ok(contents) = std::fs::read(entry.path()) else {
            continue;
        };
        for item in contents.split(|&b| b == 0) {
            if let Some(root) = std::str::from_utf8(item)
                .ok()
                .and_then(|s| store_path_in(Path::new(s)))
            {
                found.push(root);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_names_are_safe_file_names() {
        assert!(RootName::new(RootKind::Image, "sha256:0123abcd").is_ok());
        assert!(RootName::new(RootKind::Container, "f00ba7-1").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(256)] {
            let err = RootName::new(RootKind::Cli, bad).unwrap_err();
            assert!(err.to_string().contains("invalid GC root name"), "{err}");
        }
    }

    #[test]
    fn link_targets_name_their_store_path() {
        let p = "/nix/store/00bgd045z0d4icpbc2yyz4gx48ak44la-net-tools-1.60_p20170221182432";
        assert_eq!(store_path_in(Path::new(p)).unwrap().to_absolute_path(), p);
        let inside = format!("{p}/bin/netstat");
        assert_eq!(
            store_path_in(Path::new(&inside))
                .unwrap()
                .to_absolute_path(),
            p
        );
        assert!(store_path_in(Path::new("/nix/storex/abc")).is_none());
        assert!(store_path_in(Path::new("/tmp/result")).is_none());
    }
}
