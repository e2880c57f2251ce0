//! Every host file the installer writes is backed up first, once, into
//! `/var/lib/nix-cri/install-backup/`: `manifest.json` records each path, whether it existed,
//! its mode, owner and hash, and the file name of its original bytes under `files/`. An
//! original is never overwritten: a later install (or the watch loop re-applying drift) finds
//! the path already recorded. The manifest also records the directories the installer created
//! and, for kubelet's file, the endpoint values it had, so `uninstall` can put them back even
//! if someone else changed the file since.
//!
//! Files are written atomically (a temporary file in the same directory, fsync, rename) with
//! the original's owner.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::kubelet::{Endpoints, SetupKind};
use super::{InstallError, on_host};

/// Host-absolute directory of the backups and the manifest.
pub const BACKUP_DIR: &str = "/var/lib/nix-cri/install-backup";
const MANIFEST: &str = "manifest.json";
const MANIFEST_VERSION: u32 = 1;

/// Turns a file someone changed after the install back into what it was, as far as the
/// installer's own edit goes (kubelet's endpoints).
pub type ReverseEdit<'a> = dyn Fn(&str) -> Result<String, InstallError> + 'a;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// Directories the installer created (host-absolute), parents first.
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    /// Files the installer wrote, in the order it first wrote them.
    #[serde(default)]
    pub files: Vec<FileRecord>,
    /// kubelet's file and the endpoints it set before the installer changed them.
    #[serde(default)]
    pub kubelet: Option<KubeletRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRecord {
    /// Host-absolute path.
    pub path: PathBuf,
    /// The file as it was before the first install; `None`: it did not exist.
    pub original: Option<Original>,
    /// sha256 of what the installer last wrote there.
    pub written_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Original {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub sha256: String,
    /// Its bytes, under `files/` in the backup directory.
    pub backup: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubeletRecord {
    pub kind: SetupKind,
    /// Host-absolute path.
    pub path: PathBuf,
    pub previous: Endpoints,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    data_encoding::HEXLOWER.encode(&Sha256::digest(bytes))
}

/// The manifest of a host root, and the operations that keep it true.
pub struct Backups {
    host_root: PathBuf,
    pub manifest: Manifest,
    /// Whether a manifest file exists on the host.
    pub exists: bool,
}

impl Backups {
    pub fn open(host_root: &Path) -> Result<Self, InstallError> {
        let path = on_host(host_root, &Path::new(BACKUP_DIR).join(MANIFEST));
        let (manifest, exists) = match std::fs::read(&path) {
            Ok(bytes) => {
                let manifest: Manifest =
                    serde_json::from_slice(&bytes).map_err(|e| InstallError::Manifest {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                if manifest.version != MANIFEST_VERSION {
                    return Err(InstallError::Manifest {
                        path,
                        why: format!(
                            "version {} is not {MANIFEST_VERSION}, the one this nix-cri writes",
                            manifest.version
                        ),
                    });
                }
                (manifest, true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Manifest {
                    version: MANIFEST_VERSION,
                    ..Manifest::default()
                },
                false,
            ),
            Err(e) => return Err(InstallError::io("read", &path)(e)),
        };
        Ok(Self {
            host_root: host_root.to_owned(),
            manifest,
            exists,
        })
    }

    fn host(&self, path: &Path) -> PathBuf {
        on_host(&self.host_root, path)
    }

    pub fn record_of(&self, path: &Path) -> Option<&FileRecord> {
        self.manifest.files.iter().find(|r| r.path == path)
    }

    /// Writes the manifest (creating the backup directory first).
    pub fn save(&mut self) -> Result<(), InstallError> {
        self.ensure_dir(Path::new(BACKUP_DIR))?;
        let files = self.host(&Path::new(BACKUP_DIR).join("files"));
        make_dir(&files, 0o700)?;
        let bytes =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| InstallError::Manifest {
                path: self.host(&Path::new(BACKUP_DIR).join(MANIFEST)),
                why: e.to_string(),
            })?;
        let path = self.host(&Path::new(BACKUP_DIR).join(MANIFEST));
        write_atomic(&path, &bytes, 0o600, None)?;
        self.exists = true;
        Ok(())
    }

    /// Creates `dir` (host-absolute) and its missing parents, recording each one created.
    fn ensure_dir(&mut self, dir: &Path) -> Result<(), InstallError> {
        let mut missing = Vec::new();
        let mut current = Some(dir);
        while let Some(d) = current {
            if d.as_os_str().is_empty() || d == Path::new("/") {
                break;
            }
            match std::fs::symlink_metadata(self.host(d)) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(d.to_owned()),
                Err(e) => return Err(InstallError::io("inspect", self.host(d))(e)),
            }
            current = d.parent();
        }
        for d in missing.into_iter().rev() {
            make_dir(&self.host(&d), 0o755)?;
            if !self.manifest.created_dirs.contains(&d) {
                self.manifest.created_dirs.push(d);
            }
        }
        Ok(())
    }

    /// Records `path` (host-absolute) as it is now, unless it is already recorded: its
    /// original bytes are copied to the backup directory and the manifest is saved before
    /// anything changes it.
    pub fn record(&mut self, path: &Path) -> Result<(), InstallError> {
        if self.record_of(path).is_some() {
            return Ok(());
        }
        let on_host = self.host(path);
        let original = match current_file(&on_host)? {
            Some((bytes, meta)) => {
                let name = format!(
                    "{}-{}",
                    self.manifest.files.len(),
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                );
                // The backup directory must exist before the copy goes in.
                self.save()?;
                let backup = self.host(&Path::new(BACKUP_DIR).join("files").join(&name));
                write_atomic(&backup, &bytes, 0o600, None)?;
                Some(Original {
                    mode: meta.permissions().mode() & 0o7777,
                    uid: meta.uid(),
                    gid: meta.gid(),
                    sha256: sha256_hex(&bytes),
                    backup: name,
                })
            }
            None => None,
        };
        self.manifest.files.push(FileRecord {
            path: path.to_owned(),
            original,
            written_sha256: None,
        });
        self.save()
    }

    /// Writes `bytes` to `path` (host-absolute) unless it already holds them with `mode`
    /// (`None`: whatever mode it has, 0644 for a new file). Returns whether it changed.
    pub fn write(
        &mut self,
        path: &Path,
        bytes: &[u8],
        mode: Option<u32>,
    ) -> Result<bool, InstallError> {
        let on_host = self.host(path);
        if holds(&on_host, bytes, mode)? {
            return Ok(false);
        }
        let current = current_file(&on_host)?;
        self.record(path)?;
        if let Some(parent) = path.parent() {
            self.ensure_dir(parent)?;
        }
        let (mode, owner) = match &current {
            Some((_, meta)) => (
                mode.unwrap_or(meta.permissions().mode() & 0o7777),
                Some((meta.uid(), meta.gid())),
            ),
            None => (mode.unwrap_or(0o644), None),
        };
        write_atomic(&on_host, bytes, mode, owner)?;
        let sha = sha256_hex(bytes);
        if let Some(record) = self.manifest.files.iter_mut().find(|r| r.path == path) {
            record.written_sha256 = Some(sha);
        }
        self.save()?;
        Ok(true)
    }

    /// Puts the recorded file back as it was (or removes it if it did not exist) and forgets
    /// it. Returns whether the host's file changed. `reverse_edit` gives kubelet's file the
    /// previous endpoints when someone changed it after the installer did.
    pub fn restore(
        &mut self,
        path: &Path,
        reverse_edit: Option<&ReverseEdit<'_>>,
    ) -> Result<bool, InstallError> {
        let Some(record) = self.record_of(path).cloned() else {
            return Ok(false);
        };
        let on_host = self.host(path);
        let current = current_file(&on_host)?;
        let changed = match (&record.original, &current) {
            (None, None) => false,
            (None, Some(_)) => {
                std::fs::remove_file(&on_host).map_err(InstallError::io("remove", &on_host))?;
                true
            }
            (Some(original), current) => {
                let backup = self.host(&Path::new(BACKUP_DIR).join("files").join(&original.backup));
                let bytes = std::fs::read(&backup).map_err(InstallError::io("read", &backup))?;
                if sha256_hex(&bytes) != original.sha256 {
                    return Err(InstallError::Manifest {
                        path: backup,
                        why: "the backup does not match the hash recorded for it".to_owned(),
                    });
                }
                let edited_since = current.as_ref().is_some_and(|(now, _)| {
                    record.written_sha256.as_deref() != Some(sha256_hex(now).as_str())
                });
                let target = match (reverse_edit, current) {
                    (Some(edit), Some((now, _))) if edited_since => {
                        let text =
                            std::str::from_utf8(now).map_err(|_| InstallError::KubeletFile {
                                path: on_host.clone(),
                                why: "is not UTF-8 text".to_owned(),
                            })?;
                        tracing::warn!(
                            path = %on_host.display(),
                            "changed since nix-cri was installed: only the endpoints are put back"
                        );
                        edit(text)?.into_bytes()
                    }
                    _ => bytes,
                };
                let same = current.as_ref().is_some_and(|(now, meta)| {
                    *now == target
                        && meta.permissions().mode() & 0o7777 == original.mode
                        && meta.uid() == original.uid
                        && meta.gid() == original.gid
                });
                if !same {
                    if let Some(parent) = path.parent() {
                        self.ensure_dir(parent)?;
                    }
                    write_atomic(
                        &on_host,
                        &target,
                        original.mode,
                        Some((original.uid, original.gid)),
                    )?;
                }
                !same
            }
        };
        self.manifest.files.retain(|r| r.path != path);
        self.save()?;
        Ok(changed)
    }

    /// Removes the backup directory and then every directory the installer created that is
    /// empty now. The manifest is gone afterwards.
    pub fn remove_all(self) -> Result<(), InstallError> {
        let dir = self.host(Path::new(BACKUP_DIR));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(InstallError::io("remove", &dir)(e)),
        }
        for created in self.manifest.created_dirs.iter().rev() {
            let path = self.host(created);
            match std::fs::remove_dir(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    tracing::info!(path = %path.display(), "kept: not empty");
                }
                Err(e) => return Err(InstallError::io("remove", &path)(e)),
            }
        }
        Ok(())
    }
}

/// Whether the regular file at `path` holds exactly `bytes` (and has `mode`, if given). The
/// size is compared first, so a file that differs in size is not read: the installer's watch
/// loop asks this of the nix-cri binary on every pass.
pub fn holds(path: &Path, bytes: &[u8], mode: Option<u32>) -> Result<bool, InstallError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta)
            if meta.file_type().is_file()
                && meta.len() == bytes.len() as u64
                && mode.is_none_or(|m| meta.permissions().mode() & 0o7777 == m) =>
        {
            Ok(std::fs::read(path).map_err(InstallError::io("read", path))? == bytes)
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(InstallError::io("inspect", path)(e)),
    }
}

/// The file's bytes and metadata, `None` if it does not exist. A symlink or directory there is
/// an error: the installer only replaces regular files.
pub fn current_file(path: &Path) -> Result<Option<(Vec<u8>, std::fs::Metadata)>, InstallError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => {
            let bytes = std::fs::read(path).map_err(InstallError::io("read", path))?;
            Ok(Some((bytes, meta)))
        }
        Ok(_) => Err(InstallError::Io {
            action: "replace",
            path: path.to_owned(),
            source: std::io::Error::other(
                "not a regular file (a symlink or directory); the installer only replaces \
                 regular files",
            ),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InstallError::io("inspect", path)(e)),
    }
}

fn make_dir(path: &Path, mode: u32) -> Result<(), InstallError> {
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(InstallError::io("create directory", path)(e)),
    }
}

/// Writes `bytes` to a temporary file next to `path`, sets its mode (and owner), syncs it and
/// renames it over `path`.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), InstallError> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.nix-cri-tmp"));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        }
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(dir) = path.parent()
            && let Ok(dir) = std::fs::File::open(dir)
        {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        InstallError::Io {
            action: "write",
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_compares_size_mode_and_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert!(!holds(&path, b"abc", None).unwrap(), "missing");
        write_atomic(&path, b"abc", 0o644, None).unwrap();
        assert!(holds(&path, b"abc", None).unwrap());
        assert!(holds(&path, b"abc", Some(0o644)).unwrap());
        assert!(!holds(&path, b"abc", Some(0o755)).unwrap(), "mode");
        assert!(
            !holds(&path, b"abd", None).unwrap(),
            "same size, other bytes"
        );
        assert!(!holds(&path, b"abcd", None).unwrap(), "size");
        std::os::unix::fs::symlink(&path, dir.path().join("link")).unwrap();
        assert!(
            !holds(&dir.path().join("link"), b"abc", None).unwrap(),
            "a symlink"
        );
    }
}
