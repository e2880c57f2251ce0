//! OCI images held in memory: a manifest, a config and uncompressed tar layers, each
//! addressed by the sha256 of its exact bytes.
//!
//! JSON is written canonically (object keys sorted, no whitespace) and tar entries with fixed
//! metadata (uid/gid 0, no owner names, mtime [`LAYER_MTIME`], GNU headers), so the same inputs
//! always give the same bytes, digests and image id.

use std::path::Path;

use bytes::Bytes;
use oci_spec::image::{
    Arch, Config, Descriptor, ImageConfiguration, ImageManifestBuilder, MediaType, Os, RootFs,
};
use sha2::{Digest as _, Sha256};

use super::error::{ImageError, io_err};
use super::spec::parse_user;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
/// The modification time of every layer entry (the one Nix gives store paths).
pub const LAYER_MTIME: u64 = 1;

/// A complete single-platform image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciImage {
    manifest: Bytes,
    manifest_digest: String,
    config: Bytes,
    config_digest: String,
    layers: Vec<(String, Bytes)>,
    /// Bytes the image stands for beyond its blobs (a Nix closure's NAR size).
    extra_size: u64,
    /// The config's `User`.
    user: Option<String>,
}

impl OciImage {
    /// Assembles an image from its runtime config and uncompressed tar layers (bottom first),
    /// for the host's architecture and Linux.
    pub fn assemble(
        config: Config,
        layers: Vec<Bytes>,
        extra_size: u64,
    ) -> Result<Self, ImageError> {
        let user = config.user().clone();
        let layers: Vec<(String, Bytes)> = layers
            .into_iter()
            .map(|layer| (sha256_digest(&layer), layer))
            .collect();
        let mut rootfs = RootFs::default();
        rootfs.set_diff_ids(layers.iter().map(|(digest, _)| digest.clone()).collect());
        let mut image_config = ImageConfiguration::default();
        image_config
            .set_architecture(host_arch())
            .set_os(Os::Linux)
            .set_config(Some(config))
            .set_rootfs(rootfs);
        let config = Bytes::from(canonical_json("config", &image_config)?);
        let config_digest = sha256_digest(&config);

        let descriptor = |media_type: &str, digest: &str, size: usize| {
            Ok::<_, ImageError>(Descriptor::new(
                MediaType::from(media_type),
                size as u64,
                oci_spec::image::Digest::try_from(digest).map_err(|e| ImageError::Encode {
                    what: "digest",
                    why: e.to_string(),
                })?,
            ))
        };
        let layer_descriptors = layers
            .iter()
            .map(|(digest, bytes)| descriptor(LAYER_MEDIA_TYPE, digest, bytes.len()))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(descriptor(CONFIG_MEDIA_TYPE, &config_digest, config.len())?)
            .layers(layer_descriptors)
            .build()
            .map_err(|e| ImageError::Encode {
                what: "manifest",
                why: e.to_string(),
            })?;
        let manifest = Bytes::from(canonical_json("manifest", &manifest)?);
        let manifest_digest = sha256_digest(&manifest);
        Ok(Self {
            manifest,
            manifest_digest,
            config,
            config_digest,
            layers,
            extra_size,
            user,
        })
    }

    /// The image id runtimes report: the config digest, `sha256:<hex>`.
    pub fn id(&self) -> &str {
        &self.config_digest
    }

    pub fn manifest(&self) -> &Bytes {
        &self.manifest
    }

    /// The config's `User`, if set.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The user as kubelet's RunAsNonRoot check wants it (see [`parse_user`]).
    pub fn user_ids(&self) -> (Option<i64>, Option<String>) {
        self.user().map(parse_user).unwrap_or((None, None))
    }

    /// `sha256:<hex>` of [`Self::manifest`]; containerd puts it in `repo@<digest>` references.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }

    pub fn manifest_media_type(&self) -> &'static str {
        MANIFEST_MEDIA_TYPE
    }

    pub fn config(&self) -> &Bytes {
        &self.config
    }

    pub fn config_digest(&self) -> &str {
        &self.config_digest
    }

    /// `(digest, bytes)` of each layer, bottom first.
    pub fn layers(&self) -> &[(String, Bytes)] {
        &self.layers
    }

    /// The config, a layer or the manifest with this digest.
    pub fn blob(&self, digest: &str) -> Option<Bytes> {
        if digest == self.config_digest {
            return Some(self.config.clone());
        }
        if digest == self.manifest_digest {
            return Some(self.manifest.clone());
        }
        self.layers
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, bytes)| bytes.clone())
    }

    /// Bytes of the manifest, config and layers, plus what the image stands for beyond them
    /// (for a Nix image, the closure's NAR size). Never 0: kubelet refuses images of size 0.
    pub fn size(&self) -> u64 {
        let blobs: usize = self.manifest.len()
            + self.config.len()
            + self.layers.iter().map(|(_, b)| b.len()).sum::<usize>();
        blobs as u64 + self.extra_size
    }
}

/// `sha256:<lowercase hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in hash {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The host's architecture in OCI (Go) terms.
pub fn host_arch() -> Arch {
    Arch::from(go_arch(std::env::consts::ARCH))
}

fn go_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "arm" => "arm",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "riscv64" => "riscv64",
        "s390x" => "s390x",
        "loongarch64" => "loong64",
        "mips64" if cfg!(target_endian = "little") => "mips64le",
        other => other,
    }
}

/// JSON with object keys sorted at every level and no whitespace. oci-spec keeps labels and
/// exposed ports in `HashMap`s, so serialising its types directly is not stable.
fn canonical_json(
    what: &'static str,
    value: &impl serde::Serialize,
) -> Result<Vec<u8>, ImageError> {
    let encode = |e: serde_json::Error| ImageError::Encode {
        what,
        why: e.to_string(),
    };
    let value = serde_json::to_value(value).map_err(encode)?;
    serde_json::to_vec(&sorted(value)).map_err(encode)
}

fn sorted(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// Writes a deterministic tar layer entry by entry.
pub(crate) struct LayerWriter {
    builder: tar::Builder<Vec<u8>>,
}

impl LayerWriter {
    pub(crate) fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(entry_type: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(entry_type);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(LAYER_MTIME);
        header
    }

    fn fail(path: &str) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
        move |e| ImageError::Encode {
            what: "layer",
            why: format!("{path}: {e}"),
        }
    }

    /// `path` is relative (`etc/passwd`); directories get a trailing `/` in the archive.
    pub(crate) fn dir(&mut self, path: &str, mode: u32) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Directory, mode, 0);
        self.builder
            .append_data(&mut header, format!("{path}/"), std::io::empty())
            .map_err(Self::fail(path))
    }

    pub(crate) fn file(
        &mut self,
        path: &str,
        mode: u32,
        contents: &[u8],
    ) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Regular, mode, contents.len() as u64);
        self.builder
            .append_data(&mut header, path, contents)
            .map_err(Self::fail(path))
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &Path) -> Result<(), ImageError> {
        let mut header = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.builder
            .append_link(&mut header, path, target)
            .map_err(Self::fail(path))
    }

    pub(crate) fn finish(self) -> Result<Bytes, ImageError> {
        self.builder
            .into_inner()
            .map(Bytes::from)
            .map_err(Self::fail("end of archive"))
    }
}

/// An ordinary single-layer image of a host directory: every file, directory and symlink under
/// `dir`, in sorted order, with its permission bits but owned by root and with a fixed mtime.
pub fn from_dir(dir: &Path, config: Config) -> Result<OciImage, ImageError> {
    let mut layer = LayerWriter::new();
    add_dir_contents(&mut layer, dir, "")?;
    OciImage::assemble(config, vec![layer.finish()?], 0)
}

fn add_dir_contents(layer: &mut LayerWriter, dir: &Path, prefix: &str) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let mut entries = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(dir))?;
    entries.sort();
    for path in entries {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| ImageError::Layer {
                path: path.clone(),
                why: "the name is not UTF-8".to_owned(),
            })?;
        let inner = format!("{prefix}{name}");
        let meta = std::fs::symlink_metadata(&path).map_err(io_err(&path))?;
        let mode = meta.permissions().mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).map_err(io_err(&path))?;
            layer.symlink(&inner, &target)?;
        } else if meta.is_dir() {
            layer.dir(&inner, mode)?;
            add_dir_contents(layer, &path, &format!("{inner}/"))?;
        } else if meta.is_file() {
            let contents = std::fs::read(&path).map_err(io_err(&path))?;
            layer.file(&inner, mode, &contents)?;
        } else {
            return Err(ImageError::Layer {
                path,
                why: "only files, directories and symlinks are supported".to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::ConfigBuilder;
    use std::collections::HashMap;

    fn config_with_labels(n: usize) -> Config {
        let labels: HashMap<String, String> = (0..n)
            .map(|i| (format!("label-{i}"), format!("{i}")))
            .collect();
        ConfigBuilder::default()
            .cmd(vec![
                "/bin/busybox".to_owned(),
                "sleep".to_owned(),
                "inf".to_owned(),
            ])
            .labels(labels)
            .exposed_ports(vec![
                "80/tcp".to_owned(),
                "53/udp".to_owned(),
                "1/tcp".to_owned(),
            ])
            .build()
            .unwrap()
    }

    #[test]
    fn digests_are_sha256_of_the_bytes_and_the_manifest_points_at_them() {
        let image =
            OciImage::assemble(config_with_labels(3), vec![Bytes::from_static(b"layer")], 0)
                .unwrap();
        assert_eq!(image.id(), sha256_digest(image.config()));
        assert_eq!(image.manifest_digest(), sha256_digest(image.manifest()));
        assert_eq!(image.layers()[0].0, sha256_digest(b"layer"));
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let manifest: serde_json::Value = serde_json::from_slice(image.manifest()).unwrap();
        assert_eq!(manifest["schemaVersion"], 2);
        assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(manifest["config"]["mediaType"], CONFIG_MEDIA_TYPE);
        assert_eq!(manifest["config"]["digest"], image.id());
        assert_eq!(manifest["config"]["size"], image.config().len());
        assert_eq!(manifest["layers"][0]["mediaType"], LAYER_MEDIA_TYPE);
        assert_eq!(manifest["layers"][0]["digest"], image.layers()[0].0);
        let config: serde_json::Value = serde_json::from_slice(image.config()).unwrap();
        assert_eq!(config["os"], "linux");
        assert_eq!(config["architecture"], go_arch(std::env::consts::ARCH));
        assert_eq!(config["rootfs"]["type"], "layers");
        assert_eq!(config["rootfs"]["diff_ids"][0], image.layers()[0].0);
        assert_eq!(
            config["config"]["ExposedPorts"]["80/tcp"],
            serde_json::json!({})
        );
        assert_eq!(image.blob(image.id()).as_ref(), Some(image.config()));
        assert_eq!(image.blob(&image.layers()[0].0).unwrap(), &b"layer"[..]);
        assert_eq!(image.blob(&sha256_digest(b"other")), None);
        assert_eq!(
            image.size(),
            (image.manifest().len() + image.config().len() + 5) as u64
        );
    }

    #[test]
    fn hash_maps_do_not_change_the_bytes() {
        // Each HashMap gets its own random order; the JSON must not depend on it.
        let first = OciImage::assemble(config_with_labels(20), vec![], 0).unwrap();
        for _ in 0..10 {
            let again = OciImage::assemble(config_with_labels(20), vec![], 0).unwrap();
            assert_eq!(first, again);
        }
        assert!(!first.config().contains(&b' ') || !first.config().contains(&b'\n'));
    }

    #[test]
    fn from_dir_is_deterministic_and_keeps_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let long = "d".repeat(120);
        std::fs::create_dir_all(dir.path().join("bin").join(&long)).unwrap();
        std::fs::write(dir.path().join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(
            dir.path().join("bin/tool"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::os::unix::fs::symlink("tool", dir.path().join("bin/sh")).unwrap();
        let config = Config::default();
        let a = from_dir(dir.path(), config.clone()).unwrap();
        // Touching times changes nothing.
        filetime::set_file_mtime(
            dir.path().join("bin/tool"),
            filetime::FileTime::from_unix_time(5, 0),
        )
        .unwrap();
        let b = from_dir(dir.path(), config).unwrap();
        assert_eq!(a, b);

        let mut archive = tar::Archive::new(&a.layers()[0].1[..]);
        let entries: Vec<(String, u32, u64, Option<String>)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0));
                assert_eq!(h.mtime().unwrap(), LAYER_MTIME);
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.size().unwrap(),
                    e.link_name()
                        .unwrap()
                        .map(|l| l.to_string_lossy().into_owned()),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("bin/".to_owned(), 0o755, 0, None),
                (format!("bin/{long}/"), 0o755, 0, None),
                ("bin/sh".to_owned(), 0o777, 0, Some("tool".to_owned())),
                ("bin/tool".to_owned(), 0o755, 10, None),
            ]
        );
    }
}
