//! Where the registry's images come from.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::image::{ImageError, OciImage, build_root_image, spec};
use crate::nix::{StorePath, StorePathHash};
use crate::store::Store;

/// Repository prefix of root images: `nix-cri/<32-character hash>`.
pub const NIX_IMAGE_PREFIX: &str = "nix-cri/";
/// The tag nix-cri uses for root images. The registry serves them under any tag.
pub const NIX_IMAGE_TAG: &str = "root";

/// Images by repository name. Called from blocking threads: it may do disk I/O.
pub trait ImageSource: Send + Sync + 'static {
    /// The image named `name` (the tag does not matter), `Ok(None)` when there is none.
    fn image(&self, name: &str) -> Result<Option<Arc<OciImage>>, ImageError>;
}

/// A fixed set of images, for tests and the sandbox image.
#[derive(Default, Clone)]
pub struct StaticImages {
    images: HashMap<String, Arc<OciImage>>,
}

impl StaticImages {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `name`.
    pub fn with(mut self, name: &str, image: OciImage) -> Self {
        self.images.insert(name.to_owned(), Arc::new(image));
        self
    }
}

impl ImageSource for StaticImages {
    fn image(&self, name: &str) -> Result<Option<Arc<OciImage>>, ImageError> {
        Ok(self.images.get(name).cloned())
    }
}

/// `nix-cri/<hash>`, the repository of the root image of the store path with that hash.
pub fn nix_image_name(hash: &StorePathHash) -> String {
    format!("{NIX_IMAGE_PREFIX}{hash}")
}

/// `<addr>/nix-cri/<hash>:root`, what the runtime is asked to pull.
pub fn nix_image_reference(addr: &SocketAddr, hash: &StorePathHash) -> String {
    format!("{addr}/{}:{NIX_IMAGE_TAG}", nix_image_name(hash))
}

/// Root images of the valid paths of a store, built on first use and kept.
pub struct NixImages {
    store: Arc<Store>,
    built: Mutex<HashMap<StorePath, Arc<OciImage>>>,
}

/// Built images kept at most; each is a few kilobytes. Past it the cache starts over.
const MAX_CACHED: usize = 4096;

impl NixImages {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            built: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The root image of `top`, which must be valid. Its [`OciImage::size`] counts the root
    /// image's own bytes only: add the closure's NAR size (`Store::closure_nar_size`) for
    /// the size of the whole image.
    pub fn image_for(&self, top: &StorePath) -> Result<Arc<OciImage>, ImageError> {
        if let Some(image) = self.lock().get(top) {
            return Ok(image.clone());
        }
        let spec = spec::load(&self.store, top)?;
        let image = Arc::new(build_root_image(&spec, top, &self.store_symlinks(top)?, 0)?);
        let mut built = self.lock();
        if built.len() >= MAX_CACHED {
            built.clear();
        }
        Ok(built.entry(top.clone()).or_insert(image).clone())
    }

    /// The closure paths of `top` that are symlinks, by base name, with their targets.
    fn store_symlinks(&self, top: &StorePath) -> Result<BTreeMap<String, String>, ImageError> {
        let mut links = BTreeMap::new();
        for path in self.store.closure(std::slice::from_ref(top))? {
            let real = self.store.real_path(&path);
            let meta = std::fs::symlink_metadata(&real).map_err(|source| ImageError::Io {
                path: real.clone(),
                source,
            })?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&real).map_err(|source| ImageError::Io {
                    path: real.clone(),
                    source,
                })?;
                links.insert(path.base_name(), target.to_string_lossy().into_owned());
            }
        }
        Ok(links)
    }

    /// What the runtime pulls for `top`: `<addr>/nix-cri/<hash>:root`.
    pub fn reference(&self, addr: &SocketAddr, top: &StorePath) -> String {
        nix_image_reference(addr, &top.hash())
    }

    /// Drops the built image of `top`, if any (it is rebuilt on next use).
    pub fn forget(&self, top: &StorePath) {
        self.lock().remove(top);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<StorePath, Arc<OciImage>>> {
        self.built.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ImageSource for NixImages {
    /// `nix-cri/<hash>` of a path valid in the store now; anything else is unknown.
    fn image(&self, name: &str) -> Result<Option<Arc<OciImage>>, ImageError> {
        let Some(hash) = name
            .strip_prefix(NIX_IMAGE_PREFIX)
            .and_then(|h| StorePathHash::parse(h).ok())
        else {
            return Ok(None);
        };
        let Some(top) = self.store.path_from_hash(&hash)? else {
            return Ok(None);
        };
        self.image_for(&top).map(Some)
    }
}
