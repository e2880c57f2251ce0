//! RuntimeService calls nix-cri must see: the RuntimeClass opt-in, the closure's bind
//! mounts, container roots, and the `nix` handler in Status.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::BytesMut;
use http::Response;
use k8s_cri::v1 as cri;
use prost::Message;

use crate::nix::STORE_DIR;
use crate::store::{RootKind, RootName};

use super::grpc::{self, Body};
use super::wire::{self, Edit};
use super::{CriError, Proxy, SANDBOX_ANNOTATION, Unary};

impl Proxy {
    /// A sandbox whose handler is ours is forwarded with the runtime's handler and marked
    /// with an annotation the runtime keeps, so the opt-in survives our restarts.
    pub(super) async fn run_pod_sandbox(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::RunPodSandboxRequest = unary.decode("RunPodSandbox")?;
        if request.runtime_handler != self.config.runtime_handler {
            return Ok(self.forward_unchanged(unary).await);
        }
        let mut append = BytesMut::new();
        if !self.config.upstream_runtime_handler.is_empty() {
            wire::put_len_field(
                &mut append,
                2,
                self.config.upstream_runtime_handler.as_bytes(),
            );
        }
        // config (1) → annotations (7): one more map entry, merged into the config as sent.
        let mut config_patch = BytesMut::new();
        wire::put_len_field(
            &mut config_patch,
            7,
            &wire::map_entry(SANDBOX_ANNOTATION, &self.config.runtime_handler),
        );
        wire::put_len_field(&mut append, 1, &config_patch);
        let patched = wire::rewrite(
            unary.message()?,
            |field| {
                Ok(if field.number == 2 {
                    Edit::Drop
                } else {
                    Edit::Keep
                })
            },
            &append,
        )?;
        let response = match self.forward_and_read(&unary, &patched).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        if let Ok(created) = cri::RunPodSandboxResponse::decode(response.message()?) {
            self.remember_sandbox(created.pod_sandbox_id, true);
        }
        Ok(response.unchanged())
    }

    pub(super) async fn remove_pod_sandbox(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::RemovePodSandboxRequest = unary.decode("RemovePodSandbox")?;
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request.pod_sandbox_id);
        Ok(self.forward_unchanged(unary).await)
    }

    fn remember_sandbox(&self, id: String, opted_in: bool) {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, opted_in);
    }

    async fn sandbox_opted_in(&self, id: &str) -> Result<bool, CriError> {
        if self.config.allow_all_sandboxes {
            return Ok(true);
        }
        if let Some(known) = self
            .sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(*known);
        }
        let status = self
            .upstream
            .runtime()
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_owned(),
                verbose: false,
            })
            .await
            .map_err(CriError::upstream)?
            .into_inner();
        let opted_in = status
            .status
            .and_then(|s| s.annotations.get(SANDBOX_ANNOTATION).cloned())
            .is_some_and(|handler| handler == self.config.runtime_handler);
        self.remember_sandbox(id.to_owned(), opted_in);
        Ok(opted_in)
    }

    /// A container of a nix image gets its closure's view (see `store::views`) at /nix/store
    /// in one read-only bind mount, and a root that holds the closure and the view until the
    /// container is removed.
    pub(super) async fn create_container(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::CreateContainerRequest = unary.decode("CreateContainer")?;
        let image = request
            .config
            .as_ref()
            .and_then(|c| c.image.as_ref())
            .cloned()
            .unwrap_or_default();
        tracing::Span::current().record(
            "image",
            if image.user_specified_image.is_empty() {
                image.image.as_str()
            } else {
                image.user_specified_image.as_str()
            },
        );
        let mut found = self.find_nix_image(&image.image)?;
        if found.is_none() && crate::image::is_nix_reference(&image.user_specified_image) {
            found = self.find_nix_image(&image.user_specified_image)?;
        }
        let Some(found) = found else {
            if crate::image::is_nix_reference(&image.image) {
                return Err(CriError::NotPulled {
                    image: image.image.clone(),
                });
            }
            return Ok(self.forward_unchanged(unary).await);
        };
        if !self.sandbox_opted_in(&request.pod_sandbox_id).await? {
            return Err(CriError::NotOptedIn {
                image: if image.user_specified_image.is_empty() {
                    image.image
                } else {
                    image.user_specified_image
                },
                sandbox: request.pod_sandbox_id,
                handler: self.config.runtime_handler.clone(),
            });
        }

        // Held from before the closure is read until the container's root exists, so a GC
        // cannot remove the image's paths in between (RemoveImage racing CreateContainer).
        let store = self.store.clone();
        let top = found.top.clone();
        let (gc_lock, mounts) = tokio::task::spawn_blocking(move || {
            let lock = store.lock_gc_shared()?;
            if let Some(view) = store.existing_view(&top) {
                return Ok::<_, CriError>((lock, ClosureMounts::View(view)));
            }
            let closure = store.closure(std::slice::from_ref(&top))?;
            let mounts = match store.ensure_view(&top, &closure) {
                Ok(view) => ClosureMounts::View(view),
                Err(err) => {
                    tracing::warn!(%top, %err, "no closure view; mounting path by path");
                    ClosureMounts::Paths(closure)
                }
            };
            Ok((lock, mounts))
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))??;

        // config (2) → mounts (7), appended to the config as sent: the closure view at
        // /nix/store, one mount for the whole closure (see store::views).
        let mut config_patch = BytesMut::new();
        let mut put_mount = |container_path: String, host_path: &std::path::Path| {
            let mount = cri::Mount {
                container_path,
                host_path: host_path.display().to_string(),
                readonly: true,
                ..cri::Mount::default()
            };
            wire::put_len_field(&mut config_patch, 7, &mount.encode_to_vec());
        };
        match &mounts {
            ClosureMounts::View(view) => put_mount(STORE_DIR.to_owned(), view),
            // Without a view, one mount per path. Paths that are symlinks are in the root
            // image already: a runtime resolves a bind mount's host path, which would follow
            // the link into the host's own /nix/store.
            ClosureMounts::Paths(closure) => {
                for path in closure {
                    let real = self.store.real_path(path);
                    if std::fs::symlink_metadata(&real).is_ok_and(|m| m.file_type().is_symlink()) {
                        continue;
                    }
                    put_mount(format!("{STORE_DIR}/{}", path.base_name()), &real);
                }
            }
        }
        let patched = wire::rewrite(
            unary.message()?,
            |_| Ok(Edit::Keep),
            &wire::len_field(2, &config_patch),
        )?;
        let response = match self.forward_and_read(&unary, &patched).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        let created = cri::CreateContainerResponse::decode(response.message()?)
            .map_err(|e| CriError::Internal(format!("runtime's CreateContainer answer: {e}")))?;
        let store = self.store.clone();
        let top = found.top.clone();
        let image_root = RootName::new(RootKind::Image, &found.id)?;
        tokio::task::spawn_blocking(move || {
            let root = RootName::new(RootKind::Container, &created.container_id)?;
            store.add_root(&root, &top)?;
            // Recently used: the GC policy removes least recently used images first.
            let _ = store.touch_root(&image_root);
            drop(gc_lock);
            Ok::<_, CriError>(())
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))??;
        Ok(response.unchanged())
    }

    pub(super) async fn remove_container(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::RemoveContainerRequest = unary.decode("RemoveContainer")?;
        let message = unary.message()?.to_vec();
        let (response, removed) = match self.forward_and_read(&unary, &message).await {
            Ok(response) => (response.unchanged(), true),
            Err(response) => {
                let gone = grpc::status_of(response.headers(), None) == Some(tonic::Code::NotFound);
                (response, gone)
            }
        };
        if removed && let Ok(root) = RootName::new(RootKind::Container, &request.container_id) {
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let top = store.root_target(&root);
                store.remove_root(&root)?;
                if let Some(top) = top {
                    // The image may be gone already (RemoveImage while the container ran):
                    // then the closure goes with the last container.
                    store.collect_closure_in_background(top);
                }
                Ok::<_, crate::store::StoreError>(())
            })
            .await;
        }
        Ok(response)
    }

    /// The runtime's status with the `nix` handler added to `runtime_handlers`.
    pub(super) async fn status(self: Arc<Self>, unary: Unary) -> Result<Response<Body>, CriError> {
        let message = unary.message()?.to_vec();
        let response = match self.forward_and_read(&unary, &message).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        let status = cri::StatusResponse::decode(response.message()?).unwrap_or_default();
        if status
            .runtime_handlers
            .iter()
            .any(|h| h.name == self.config.runtime_handler)
        {
            return Ok(response.unchanged());
        }
        // Our handler runs on the runtime's: it offers what that handler offers.
        let features = status
            .runtime_handlers
            .iter()
            .find(|h| h.name == self.config.upstream_runtime_handler)
            .and_then(|h| h.features);
        let handler = cri::RuntimeHandler {
            name: self.config.runtime_handler.clone(),
            features,
        };
        let patched = wire::rewrite(
            response.message()?,
            |_| Ok(Edit::Keep),
            &wire::len_field(3, &handler.encode_to_vec()),
        )?;
        Ok(response.with_message(&patched))
    }

    /// Brings container roots in line with the runtime's containers: roots of containers that
    /// are gone are dropped (a crash between RemoveContainer and its root), and containers of
    /// nix images without a root get one (a crash between CreateContainer and its root).
    pub async fn reconcile(&self) -> Result<(usize, usize), CriError> {
        let containers = self
            .upstream
            .runtime()
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .map_err(CriError::upstream)?
            .into_inner()
            .containers;
        let images = self.nix_images()?;
        let store = self.store.clone();
        let live: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
        let mut wanted = Vec::new();
        for container in &containers {
            let image_id = container
                .image
                .as_ref()
                .map(|i| i.image.as_str())
                .unwrap_or_default();
            self.id_form.learn(&container.image_ref);
            let (image_id, image_ref) = (
                super::images::normalise_id(image_id),
                super::images::normalise_id(&container.image_ref),
            );
            if let Some(image) = images
                .iter()
                .find(|i| i.id == image_id || i.id == image_ref)
            {
                wanted.push((container.id.clone(), image.top.clone()));
            }
        }
        tokio::task::spawn_blocking(move || {
            let mut dropped = 0;
            let mut added = 0;
            let held: HashSet<String> = store
                .roots()?
                .into_iter()
                .filter(|(name, _)| name.kind() == RootKind::Container)
                .map(|(name, _)| {
                    if !live.contains(name.holder()) {
                        let _ = store.remove_root(&name);
                        dropped += 1;
                    }
                    name.holder().to_owned()
                })
                .collect();
            for (id, top) in wanted {
                if !held.contains(&id) && store.is_valid(&top)? {
                    store.add_root(&RootName::new(RootKind::Container, &id)?, &top)?;
                    added += 1;
                }
            }
            Ok((dropped, added))
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))?
    }
}

/// How a container gets its image's closure.
enum ClosureMounts {
    /// One read-only bind mount of the closure's view at /nix/store.
    View(std::path::PathBuf),
    /// One read-only bind mount per path, when no view can be built.
    Paths(std::collections::BTreeSet<crate::nix::StorePath>),
}
