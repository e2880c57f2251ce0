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
    /// with an annotation the runtime keeps, so the opt-in survives our restarts. Only nix-cri
    /// may set that annotation: kubelet copies a pod's own annotations into the sandbox config,
    /// so a pod that names it itself has it dropped, whatever its handler.
    pub(super) async fn run_pod_sandbox(
        self: Arc<Self>,
        unary: Unary,
    ) -> Result<Response<Body>, CriError> {
        let request: cri::RunPodSandboxRequest = unary.decode("RunPodSandbox")?;
        let opting_in = request.runtime_handler == self.config.runtime_handler;
        let claimed = request
            .config
            .as_ref()
            .is_some_and(|c| c.annotations.contains_key(SANDBOX_ANNOTATION));
        if claimed {
            let pod = request.config.as_ref().and_then(|c| c.metadata.as_ref());
            tracing::warn!(
                pod = %pod.map(|m| format!("{}/{}", m.namespace, m.name)).unwrap_or_default(),
                "the pod's own annotations name {SANDBOX_ANNOTATION}: dropped, only the \
                 RuntimeClass handler opts a pod in"
            );
        }
        if !opting_in && !claimed {
            return Ok(self.forward_unchanged(unary).await);
        }
        let mut append = BytesMut::new();
        if opting_in {
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
        }
        let patched = without_opt_in_claims(unary.message()?, opting_in, &append)?;
        let response = match self.forward_and_read(&unary, &patched).await {
            Ok(response) => response,
            Err(response) => return Ok(response),
        };
        if let Ok(created) = cri::RunPodSandboxResponse::decode(response.message()?) {
            self.remember_sandbox(created.pod_sandbox_id, opting_in);
        }
        Ok(response.unchanged())
    }

    /// Whether the pod a PullImage names (by its sandbox config) has a sandbox that opted in.
    /// kubelet runs a pod's sandbox before it pulls the pod's images, so a pod with no such
    /// sandbox has not opted in either. Asked of the runtime: pulls of nix images are rare, and
    /// the runtime's list survives our restarts.
    pub(super) async fn pod_opted_in(
        &self,
        config: &cri::PodSandboxConfig,
    ) -> Result<bool, CriError> {
        if self.config.allow_all_sandboxes {
            return Ok(true);
        }
        let Some(uid) = config.metadata.as_ref().map(|m| m.uid.as_str()) else {
            return Ok(false);
        };
        let sandboxes = self
            .upstream
            .runtime()
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .map_err(CriError::upstream)?
            .into_inner()
            .items;
        Ok(sandboxes.iter().any(|sandbox| {
            sandbox.metadata.as_ref().is_some_and(|m| m.uid == uid)
                && self.marked_opted_in(&sandbox.annotations)
        }))
    }

    /// Whether a sandbox's annotations, as the runtime keeps them, carry our opt-in mark.
    fn marked_opted_in(&self, annotations: &std::collections::HashMap<String, String>) -> bool {
        annotations.get(SANDBOX_ANNOTATION) == Some(&self.config.runtime_handler)
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
            .is_some_and(|s| self.marked_opted_in(&s.annotations));
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
        let (by_id, by_reference) = (image.image.clone(), image.user_specified_image.clone());
        let found = self
            .blocking(move |proxy| {
                let found = proxy.find_nix_image(&by_id)?;
                if found.is_none() && crate::image::is_nix_reference(&by_reference) {
                    return proxy.find_nix_image(&by_reference);
                }
                Ok(found)
            })
            .await?;
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

/// A `RunPodSandboxRequest` without the [`SANDBOX_ANNOTATION`] entries of its config's
/// annotations (config = 1, annotations = 7), without its runtime handler (2) when
/// `drop_handler`, and with `append` added. Every other byte stays as sent.
fn without_opt_in_claims(
    message: &[u8],
    drop_handler: bool,
    append: &[u8],
) -> Result<bytes::Bytes, wire::WireError> {
    wire::rewrite(
        message,
        |field| match field.number {
            1 if field.wire_type == wire::WIRE_LEN => {
                let mut dropped = false;
                let config = wire::rewrite(
                    field.value,
                    |entry| {
                        if entry.number == 7
                            && entry.wire_type == wire::WIRE_LEN
                            && map_key(entry.value)? == Some(SANDBOX_ANNOTATION.as_bytes())
                        {
                            dropped = true;
                            return Ok(Edit::Drop);
                        }
                        Ok(Edit::Keep)
                    },
                    &[],
                )?;
                Ok(if dropped {
                    Edit::Replace(wire::len_field(1, &config))
                } else {
                    Edit::Keep
                })
            }
            2 if drop_handler => Ok(Edit::Drop),
            _ => Ok(Edit::Keep),
        },
        append,
    )
}

/// The key (1) of an encoded map entry.
fn map_key(entry: &[u8]) -> Result<Option<&[u8]>, wire::WireError> {
    for field in wire::fields(entry) {
        let field = field?;
        if field.number == 1 && field.wire_type == wire::WIRE_LEN {
            return Ok(Some(field.value));
        }
    }
    Ok(None)
}

/// How a container gets its image's closure.
enum ClosureMounts {
    /// One read-only bind mount of the closure's view at /nix/store.
    View(std::path::PathBuf),
    /// One read-only bind mount per path, when no view can be built.
    Paths(std::collections::BTreeSet<crate::nix::StorePath>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(annotations: &[(&str, &str)], handler: &str) -> Vec<u8> {
        cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                hostname: "pod".into(),
                annotations: annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            }),
            runtime_handler: handler.into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn a_pods_own_opt_in_annotation_is_dropped() {
        let sent = request(&[(SANDBOX_ANNOTATION, "nix"), ("team", "a")], "");
        let patched = without_opt_in_claims(&sent, false, &[]).unwrap();
        let got = cri::RunPodSandboxRequest::decode(patched).unwrap();
        let config = got.config.unwrap();
        assert_eq!(config.annotations.len(), 1);
        assert_eq!(config.annotations["team"], "a");
        assert_eq!(config.hostname, "pod");
    }

    #[test]
    fn without_a_claim_every_byte_stays() {
        let sent = request(&[("team", "a")], "runc");
        let patched = without_opt_in_claims(&sent, false, &[]).unwrap();
        assert_eq!(&patched[..], &sent[..]);
    }

    #[test]
    fn an_opted_in_sandbox_gets_our_annotation_only() {
        // The pod claims another value; ours is the one the runtime keeps.
        let sent = request(&[(SANDBOX_ANNOTATION, "forged")], "nix");
        let mut config_patch = BytesMut::new();
        wire::put_len_field(
            &mut config_patch,
            7,
            &wire::map_entry(SANDBOX_ANNOTATION, "nix"),
        );
        let append = wire::len_field(1, &config_patch);
        let patched = without_opt_in_claims(&sent, true, &append).unwrap();
        let got = cri::RunPodSandboxRequest::decode(patched.clone()).unwrap();
        assert_eq!(got.runtime_handler, "");
        assert_eq!(got.config.unwrap().annotations[SANDBOX_ANNOTATION], "nix");
        let forged = wire::map_entry(SANDBOX_ANNOTATION, "forged");
        assert!(!patched.windows(forged.len()).any(|w| w == &forged[..]));
    }
}
