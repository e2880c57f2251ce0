//! ImageService calls for nix images.
//!
//! A nix image is a store path whose closure is valid in the store and rooted under
//! `gcroots/nix-cri/images/<id>`, where `<id>` is the config digest of its root image: the
//! id the runtime reports for the root image, and so for containers made from it. The roots
//! are the whole state: nothing else needs to survive a restart.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use http::Response;
use k8s_cri::v1 as cri;
use prost::Message;

use crate::image::{NixReference, is_nix_reference};
use crate::nix::StorePath;
use crate::store::{RootKind, RootName, Wanted};

use super::grpc::{self, Body};
use super::wire::{self, Edit};
use super::{CriError, Proxy, Unary};

/// A nix image as the proxy reports it.
pub(super) struct NixImage {
    pub id: String,
    pub top: StorePath,
}

impl Proxy {
    /// Every nix image, from the image roots.
    pub(super) fn nix_images(&self) -> Result<Vec<NixImage>, CriError> {
        Ok(self
            .store
            .roots()?
            .into_iter()
            .filter(|(name, _)| name.kind() == RootKind::Image)
            .map(|(name, top)| NixImage {
                id: name.holder().to_owned(),
                top,
            })
            .collect())
    }

    /// The nix image `image` names: a `nix:` reference, or the id of a nix image. `Ok(None)`
    /// when it is not (or no longer) present; `Err` for a malformed `nix:` reference.
    pub(super) fn find_nix_image(&self, image: &str) -> Result<Option<NixImage>, CriError> {
        if is_nix_reference(image) {
            let reference = NixReference::parse(image)?;
            let top = match reference.target() {
                Wanted::Path(path) => self.store.is_valid(path)?.then(|| path.clone()),
                Wanted::Hash(hash) => self.store.path_from_hash(hash)?,
            };
            let Some(top) = top else { return Ok(None) };
            let id = self.images.image_for(&top)?.id().to_owned();
            let rooted = self.store.roots()?.into_iter().any(|(name, path)| {
                name.kind() == RootKind::Image && name.holder() == id && path == top
            });
            return Ok(rooted.then_some(NixImage { id, top }));
        }
        let id = normalise_id(image);
        Ok(self.nix_images()?.into_iter().find(|i| i.id == id))
    }

    /// Drops every in-progress pull root. At start-up no pull is in progress, so any such root
    /// is a crashed pull's, and would pin its closure for ever. Returns how many there were.
    pub fn sweep_pull_roots(&self) -> Result<usize, CriError> {
        let mut swept = 0;
        for (name, _) in self.store.roots()? {
            if name.kind() == RootKind::Pull {
                self.store.remove_root(&name)?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// The CRI `Image` for a nix image.
    pub(super) fn image_message(&self, image: &NixImage) -> Result<cri::Image, CriError> {
        let root = self.images.image_for(&image.top)?;
        let closure_size = self.store.closure_nar_size(&image.top)?;
        let (uid, username) = crate::image::spec::load(&self.store, &image.top)?.user_ids();
        let reference = format!("nix:0{}", image.top);
        Ok(cri::Image {
            id: self.id_form.get().spell(&image.id),
            repo_tags: vec![reference.clone()],
            repo_digests: Vec::new(),
            // kubelet treats size 0 as an error: the closure plus the root image.
            size: closure_size + root.size(),
            uid: uid.map(|value| cri::Int64Value { value }),
            username: username.unwrap_or_default(),
            spec: Some(cri::ImageSpec {
                image: reference,
                ..cri::ImageSpec::default()
            }),
            pinned: false,
        })
    }

    pub(super) async fn pull_image(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::PullImageRequest = unary.decode("PullImage")?;
        let image = request.image.map(|i| i.image).unwrap_or_default();
        tracing::Span::current().record("image", image.as_str());
        if !is_nix_reference(&image) {
            return Ok(self.forward_unchanged(unary).await);
        }
        // kubelet's pulls name the pod they are for: one that did not opt in is refused before
        // anything is fetched. Pulls without a pod (crictl pull) are checked at CreateContainer.
        if let Some(config) = &request.sandbox_config
            && !self.pod_opted_in(config).await?
        {
            let pod = config
                .metadata
                .as_ref()
                .map(|m| format!("of pod {}/{} (uid {})", m.namespace, m.name, m.uid))
                .unwrap_or_else(|| "(a config without metadata)".to_owned());
            return Err(CriError::NotOptedIn {
                image,
                sandbox: pod,
                handler: self.config.runtime_handler.clone(),
            });
        }
        let metrics = crate::metrics::global();
        let timer = metrics.pull_duration.start_timer();
        let result = self.pull_nix_image(&image).await;
        timer.observe_duration();
        metrics
            .pulls
            .with_label_values(&[if result.is_ok() { "success" } else { "failure" }])
            .inc();
        result
    }

    async fn pull_nix_image(self: &Arc<Self>, image: &str) -> Result<Response<Body>, CriError> {
        let reference = NixReference::parse(image)?;
        let wanted = reference.target().clone();
        // Held by an in-progress root of this pull's own until the image root exists, so a
        // GC in between cannot take the closure. Its own: a failed pull takes it away again
        // without touching a concurrent pull of the same image.
        static PULLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pending = RootName::new(
            RootKind::Pull,
            &format!(
                "{}.{}",
                wanted_holder(&wanted),
                PULLS.fetch_add(1, Ordering::Relaxed)
            ),
        )?;
        let result = self.pull_into_runtime(&reference, &wanted, &pending).await;
        if result.is_err() {
            // Paths already registered stay valid and unrooted: GC may collect them, and a
            // retry after a failure past the substitution fetches nothing again.
            let store = self.store.clone();
            let dropped = pending.clone();
            let _ = tokio::task::spawn_blocking(move || store.remove_root(&dropped)).await;
        }
        result
    }

    /// The rest of a pull, under its in-progress root `pending`: the closure, the root image
    /// in the runtime, the image root.
    async fn pull_into_runtime(
        self: &Arc<Self>,
        reference: &NixReference,
        wanted: &Wanted,
        pending: &RootName,
    ) -> Result<Response<Body>, CriError> {
        let pending = pending.clone();
        let realised = self.substituter.realise(wanted, Some(&pending)).await?;
        let top = realised.top.clone();
        let id = self
            .blocking(move |proxy| Ok(proxy.images.image_for(&top)?.id().to_owned()))
            .await?;

        // The runtime pulls the root image from our registry; its answer is the id the
        // runtime will report for containers made from it.
        let upstream_reference = self
            .images
            .reference(&self.config.registry_addr, &realised.top);
        let root_spec = cri::ImageSpec {
            image: upstream_reference.clone(),
            ..cri::ImageSpec::default()
        };
        // When the runtime already has the root image (the image was pulled before), asking is
        // one metadata lookup, while its PullImage resolves the reference through our registry
        // again: tens of milliseconds in containerd 1.6, most of a warm pull. Any doubt (an
        // error, another id) falls through to PullImage.
        let present = self
            .upstream
            .images()
            .image_status(cri::ImageStatusRequest {
                image: Some(root_spec.clone()),
                verbose: false,
            })
            .await
            .ok()
            .and_then(|status| status.into_inner().image)
            .is_some_and(|image| {
                self.id_form.learn(&image.id);
                normalise_id(&image.id) == id
            });
        if !present {
            let pulled = self
                .upstream
                .images()
                .pull_image(cri::PullImageRequest {
                    image: Some(root_spec),
                    auth: None,
                    sandbox_config: None,
                })
                .await
                .map_err(CriError::upstream)?
                .into_inner();
            self.id_form.learn(&pulled.image_ref);
            if normalise_id(&pulled.image_ref) != id {
                tracing::warn!(
                    runtime = %pulled.image_ref, ours = %id,
                    "the runtime reports another id for the root image than its config digest"
                );
            }
        }
        let store = self.store.clone();
        let top = realised.top.clone();
        let image_root = RootName::new(RootKind::Image, &id)?;
        tokio::task::spawn_blocking(move || {
            store.add_root(&image_root, &top)?;
            store.remove_root(&pending)?;
            // Built now so that containers start with one mount; if it cannot be built,
            // CreateContainer tries again and else mounts path by path.
            if let Err(err) = store.build_view(&top) {
                tracing::warn!(%top, %err, "cannot build the closure view");
            }
            Ok::<_, crate::store::StoreError>(())
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))??;
        tracing::info!(image = %reference, %id, paths = realised.closure.len(), fetched = realised.fetched.len(), "pulled nix image");
        let image_ref = self.id_form.get().spell(&id);
        Ok(grpc::message_response(
            &cri::PullImageResponse { image_ref }.encode_to_vec(),
        ))
    }

    pub(super) async fn image_status(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::ImageStatusRequest = unary.decode("ImageStatus")?;
        // kubelet names the image by id or by the pod's own string; the latter may come only
        // as user_specified_image.
        let image = request
            .image
            .map(|i| {
                if i.image.is_empty() {
                    i.user_specified_image
                } else {
                    i.image
                }
            })
            .unwrap_or_default();
        tracing::Span::current().record("image", image.as_str());
        let verbose = request.verbose;
        let wanted = image.clone();
        let response = self
            .blocking(move |proxy| {
                let Some(found) = proxy.find_nix_image(&wanted)? else {
                    return Ok(None);
                };
                let mut info = std::collections::HashMap::new();
                if verbose {
                    let closure = proxy.store.closure(std::slice::from_ref(&found.top))?;
                    let details = serde_json::json!({
                        "storePath": found.top.to_absolute_path(),
                        "closure": closure.iter().map(StorePath::to_absolute_path).collect::<Vec<_>>(),
                        "rootImage": proxy.images.reference(&proxy.config.registry_addr, &found.top),
                    });
                    info.insert("info".to_owned(), details.to_string());
                }
                Ok(Some(cri::ImageStatusResponse {
                    image: Some(proxy.image_message(&found)?),
                    info,
                }))
            })
            .await?;
        let Some(response) = response else {
            if is_nix_reference(&image) {
                // Absent is an empty answer, not an error.
                return Ok(grpc::message_response(&[]));
            }
            return Ok(self.forward_unchanged(unary).await);
        };
        Ok(grpc::message_response(&response.encode_to_vec()))
    }

    /// The runtime's list, with each nix image once under its nix reference in place of the
    /// root image the runtime knows.
    pub(super) async fn list_images(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::ListImagesRequest = unary.decode("ListImages")?;
        let filter = request
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .unwrap_or_default();
        if is_nix_reference(&filter) {
            let wanted = filter.clone();
            let images = self
                .blocking(move |proxy| match proxy.find_nix_image(&wanted)? {
                    Some(image) => Ok(vec![proxy.image_message(&image)?]),
                    None => Ok(Vec::new()),
                })
                .await?;
            return Ok(grpc::message_response(
                &cri::ListImagesResponse { images }.encode_to_vec(),
            ));
        }
        let message = unary.message()?.to_vec();
        let response = match self.forward_and_read(&unary, &message).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        // Learnt before our images are spelt: the runtime's own ids show its spelling.
        let runtime_ids: Vec<String> = cri::ListImagesResponse::decode(response.message()?)
            .map(|list| list.images.into_iter().map(|i| i.id).collect())
            .unwrap_or_default();
        if let Some(first) = runtime_ids.first() {
            self.id_form.learn(first);
        }
        // Every nix image's closure size and spec, read from the store: on a blocking thread,
        // as the proxy's one async thread keeps forwarding other calls meanwhile.
        let proxy = self.clone();
        let (ids, append) = tokio::task::spawn_blocking(move || {
            let nix_images = proxy.nix_images()?;
            let mut append = bytes::BytesMut::new();
            for image in &nix_images {
                if filter.is_empty() || normalise_id(&filter) == image.id {
                    let message = proxy.image_message(image)?.encode_to_vec();
                    wire::put_len_field(&mut append, 1, &message);
                }
            }
            let ids: HashSet<String> = nix_images.into_iter().map(|i| i.id).collect();
            Ok::<_, CriError>((ids, append))
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))??;
        let patched = wire::rewrite(
            response.message()?,
            |field| {
                if field.number != 1 {
                    return Ok(Edit::Keep);
                }
                let id = cri::Image::decode(field.value)
                    .map(|i| i.id)
                    .unwrap_or_default();
                Ok(if ids.contains(normalise_id(&id).as_str()) {
                    Edit::Drop
                } else {
                    Edit::Keep
                })
            },
            &append,
        )?;
        Ok(response.with_message(&patched))
    }

    /// Idempotent: drops the image root, removes the root image from the runtime, and
    /// collects what only this image held. Containers still running keep their paths through
    /// their own roots.
    pub(super) async fn remove_image(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::RemoveImageRequest = unary.decode("RemoveImage")?;
        let image = request.image.map(|i| i.image).unwrap_or_default();
        tracing::Span::current().record("image", image.as_str());
        let wanted = image.clone();
        let found = self
            .blocking(move |proxy| proxy.find_nix_image(&wanted))
            .await?;
        let Some(found) = found else {
            if is_nix_reference(&image) {
                return Ok(grpc::message_response(&[]));
            }
            return Ok(self.forward_unchanged(unary).await);
        };
        let upstream_reference = self
            .images
            .reference(&self.config.registry_addr, &found.top);
        match self
            .upstream
            .images()
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: upstream_reference,
                    ..cri::ImageSpec::default()
                }),
            })
            .await
        {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(CriError::upstream(status)),
        }
        let store = self.store.clone();
        let root = RootName::new(RootKind::Image, &found.id)?;
        tokio::task::spawn_blocking(move || {
            store.remove_root(&root)?;
            store.collect_closure_in_background(found.top);
            Ok::<_, CriError>(())
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))??;
        tracing::info!(%image, "removed nix image");
        Ok(grpc::message_response(&[]))
    }

    /// The runtime's answer, with the store's bytes and inodes added to the image file
    /// system it shares (kubelet's image GC watches that usage).
    pub(super) async fn image_fs_info(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let message = unary.message()?.to_vec();
        let response = match self.forward_and_read(&unary, &message).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        let usage = self.store_disk_usage().await;
        let store_device = device_of(self.store.store_dir());
        let mut patched_first = false;
        let patched = wire::rewrite(
            response.message()?,
            |field| {
                if field.number != 1 || patched_first {
                    return Ok(Edit::Keep);
                }
                patched_first = true;
                let Ok(fs) = cri::FilesystemUsage::decode(field.value) else {
                    return Ok(Edit::Keep);
                };
                let mountpoint = fs
                    .fs_id
                    .as_ref()
                    .map(|f| f.mountpoint.clone())
                    .unwrap_or_default();
                if store_device.is_none()
                    || device_of(std::path::Path::new(&mountpoint)) != store_device
                {
                    return Ok(Edit::Keep);
                }
                let used = fs.used_bytes.map(|v| v.value).unwrap_or(0) + usage.0;
                let inodes = fs.inodes_used.map(|v| v.value).unwrap_or(0) + usage.1;
                // Replace only the two counters inside the entry; the rest stays as sent.
                let mut append = bytes::BytesMut::new();
                wire::put_len_field(
                    &mut append,
                    3,
                    &cri::UInt64Value { value: used }.encode_to_vec(),
                );
                wire::put_len_field(
                    &mut append,
                    4,
                    &cri::UInt64Value { value: inodes }.encode_to_vec(),
                );
                let entry = wire::rewrite(
                    field.value,
                    |inner| {
                        Ok(if inner.number == 3 || inner.number == 4 {
                            Edit::Drop
                        } else {
                            Edit::Keep
                        })
                    },
                    &append,
                )?;
                Ok(Edit::Replace(wire::len_field(1, &entry)))
            },
            &[],
        )?;
        Ok(response.with_message(&patched))
    }

    /// Bytes and inodes under the store directory, cached briefly: kubelet asks often and a
    /// walk of a large store is not free.
    async fn store_disk_usage(&self) -> (u64, u64) {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.disk_usage_cached())
            .await
            .unwrap_or((0, 0))
    }
}

/// How a runtime spells image ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IdForm {
    /// `sha256:<hex>`: containerd, and what nix-cri assumes until the runtime shows otherwise.
    Prefixed,
    /// `<hex>`: CRI-O.
    Bare,
}

impl IdForm {
    /// The form of `id`, if it is an image id at all.
    fn of(id: &str) -> Option<Self> {
        if is_hex_digest(id) {
            Some(Self::Bare)
        } else if id.strip_prefix("sha256:").is_some_and(is_hex_digest) {
            Some(Self::Prefixed)
        } else {
            None
        }
    }

    /// `id` (`sha256:<hex>` or `<hex>`) spelt this way.
    pub(super) fn spell(self, id: &str) -> String {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        match self {
            Self::Prefixed => format!("sha256:{hex}"),
            Self::Bare => hex.to_owned(),
        }
    }
}

/// The runtime's [`IdForm`], learnt from the ids in its answers; [`IdForm::Prefixed`] until
/// one is seen. A runtime never changes its spelling, so the last id seen decides.
#[derive(Debug, Default)]
pub(super) struct LearntIdForm(AtomicU8);

impl LearntIdForm {
    const BARE: u8 = 1;

    pub(super) fn get(&self) -> IdForm {
        if self.0.load(Ordering::Relaxed) == Self::BARE {
            IdForm::Bare
        } else {
            IdForm::Prefixed
        }
    }

    /// Learns from an id the runtime reported; anything that is not an image id says nothing.
    pub(super) fn learn(&self, runtime_id: &str) {
        match IdForm::of(runtime_id) {
            Some(IdForm::Bare) => self.0.store(Self::BARE, Ordering::Relaxed),
            Some(IdForm::Prefixed) => self.0.store(0, Ordering::Relaxed),
            None => {}
        }
    }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Image ids come as `sha256:<hex>` or bare `<hex>`.
pub(super) fn normalise_id(image: &str) -> String {
    if is_hex_digest(image) {
        format!("sha256:{image}")
    } else {
        image.to_owned()
    }
}

fn wanted_holder(wanted: &Wanted) -> String {
    match wanted {
        Wanted::Path(path) => path.hash().to_string(),
        Wanted::Hash(hash) => hash.to_string(),
    }
}

fn device_of(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.dev())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "5f4b2de564623914064f679d13fb2df6f206ef67e3b58cbb1bdb02d02c2bdb6d";

    #[test]
    fn ids_take_the_runtimes_spelling() {
        let form = LearntIdForm::default();
        let ours = format!("sha256:{HEX}");
        assert_eq!(
            form.get().spell(&ours),
            ours,
            "containerd's spelling until told"
        );
        // Neither a reference nor a repo digest says how ids are spelt.
        form.learn("registry.k8s.io/pause:3.9");
        form.learn(&format!("repo@sha256:{HEX}"));
        assert_eq!(form.get(), IdForm::Prefixed);
        form.learn(HEX);
        assert_eq!(form.get(), IdForm::Bare);
        assert_eq!(form.get().spell(&ours), HEX);
        assert_eq!(form.get().spell(HEX), HEX);
        form.learn(&ours);
        assert_eq!(form.get().spell(HEX), ours);
    }

    #[test]
    fn either_spelling_names_the_same_image() {
        assert_eq!(normalise_id(HEX), format!("sha256:{HEX}"));
        assert_eq!(
            normalise_id(&format!("sha256:{HEX}")),
            format!("sha256:{HEX}")
        );
        assert_eq!(normalise_id("busybox"), "busybox");
        assert_eq!(IdForm::of(&HEX[1..]), None);
    }
}
