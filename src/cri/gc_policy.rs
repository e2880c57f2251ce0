//! The store's own image GC, as kubelet has for images: above a high watermark (of the store
//! file system's usage, or of the store's size), remove the nix images no container uses,
//! least recently used first, until usage is below the low watermark.
//!
//! An image counts as used when a container root holds its store path. "Recently used" is the
//! mtime of its image root, renewed at PullImage and CreateContainer.

use std::time::{Duration, SystemTime};

use k8s_cri::v1 as cri;

use super::{CriError, Proxy};
use crate::store::{RootKind, RootName};

#[derive(Clone, Debug)]
pub struct GcPolicy {
    /// File-system usage (percent) at which collection starts.
    pub high_percent: u8,
    /// File-system usage (percent) collection brings the store down to.
    pub low_percent: u8,
    /// Store size (NAR bytes) at which collection starts; it then frees down to
    /// `max_store_bytes * low_percent / high_percent`.
    pub max_store_bytes: Option<u64>,
    /// Images younger than this stay, so a pull is not undone before its container exists
    /// (kubelet's imageMinimumGCAge).
    pub min_age: Duration,
    /// How often the policy is checked.
    pub interval: Duration,
}

impl Default for GcPolicy {
    fn default() -> Self {
        Self {
            high_percent: 85,
            low_percent: 80,
            max_store_bytes: None,
            min_age: Duration::from_secs(120),
            interval: Duration::from_secs(60),
        }
    }
}

struct Usage {
    fs_percent: f64,
    store_bytes: u64,
}

impl Proxy {
    fn usage(&self) -> Result<Usage, CriError> {
        let stat = rustix::fs::statvfs(self.store.store_dir()).map_err(|e| {
            CriError::Internal(format!("statvfs {}: {e}", self.store.store_dir().display()))
        })?;
        // As df computes it: used over what unprivileged users could have.
        let used = stat.f_blocks.saturating_sub(stat.f_bfree) as f64;
        let usable = used + stat.f_bavail as f64;
        let fs_percent = if usable > 0.0 {
            100.0 * used / usable
        } else {
            0.0
        };
        Ok(Usage {
            fs_percent,
            store_bytes: self.store.usage()?.nar_bytes,
        })
    }

    /// Runs the policy once; returns the ids of the images it removed.
    /// Store usage and candidates are read on blocking threads (see `Proxy::blocking`).
    pub async fn enforce_gc_policy(
        self: &std::sync::Arc<Self>,
        policy: &GcPolicy,
    ) -> Result<Vec<String>, CriError> {
        let high = |u: &Usage| {
            u.fs_percent >= f64::from(policy.high_percent)
                || policy
                    .max_store_bytes
                    .is_some_and(|max| u.store_bytes >= max)
        };
        let low = |u: &Usage| {
            u.fs_percent <= f64::from(policy.low_percent)
                && policy.max_store_bytes.is_none_or(|max| {
                    u.store_bytes
                        <= max * u64::from(policy.low_percent)
                            / u64::from(policy.high_percent.max(1))
                })
        };
        if !high(&self.blocking(|proxy| proxy.usage()).await?) {
            return Ok(Vec::new());
        }
        let min_age = policy.min_age;
        let candidates = self
            .blocking(move |proxy| proxy.gc_candidates(min_age))
            .await?;
        let mut removed = Vec::new();
        for image in candidates {
            self.remove_image_for_gc(&image.id, &image.top).await?;
            removed.push(image.id);
            if low(&self.blocking(|proxy| proxy.usage()).await?) {
                break;
            }
        }
        if !removed.is_empty() {
            tracing::info!(
                removed = removed.len(),
                "store above its high watermark: removed unused nix images"
            );
        }
        Ok(removed)
    }

    /// Unused images older than `min_age`, least recently used first.
    fn gc_candidates(&self, min_age: Duration) -> Result<Vec<super::images::NixImage>, CriError> {
        let roots = self.store.roots()?;
        let in_use: std::collections::HashSet<_> = roots
            .iter()
            .filter(|(name, _)| name.kind() == RootKind::Container)
            .map(|(_, path)| path.clone())
            .collect();
        let now = SystemTime::now();
        let mut candidates: Vec<(SystemTime, super::images::NixImage)> = Vec::new();
        for image in self.nix_images()? {
            if in_use.contains(&image.top) {
                continue;
            }
            let last_used = self
                .store
                .root_last_used(&RootName::new(RootKind::Image, &image.id)?)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            if now.duration_since(last_used).unwrap_or_default() >= min_age {
                candidates.push((last_used, image));
            }
        }
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        Ok(candidates.into_iter().map(|(_, image)| image).collect())
    }

    async fn remove_image_for_gc(
        &self,
        id: &str,
        top: &crate::nix::StorePath,
    ) -> Result<(), CriError> {
        let reference = self.images.reference(&self.config.registry_addr, top);
        if let Err(status) = self
            .upstream
            .images()
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: reference,
                    ..cri::ImageSpec::default()
                }),
            })
            .await
            && status.code() != tonic::Code::NotFound
        {
            // The runtime keeps a few kilobytes of root image; the store space is what counts.
            tracing::warn!(%id, err = status.message(), "cannot remove the root image from the runtime");
        }
        let store = self.store.clone();
        let root = RootName::new(RootKind::Image, id)?;
        let top = top.clone();
        tokio::task::spawn_blocking(move || {
            store.remove_root(&root)?;
            let closure: Vec<_> = store
                .closure(std::slice::from_ref(&top))?
                .into_iter()
                .collect();
            store.collect_unreachable(&closure)?;
            Ok::<_, CriError>(())
        })
        .await
        .map_err(|e| CriError::Internal(e.to_string()))?
    }

    /// Runs the policy every `policy.interval` until the process ends.
    pub async fn run_gc_policy(self: std::sync::Arc<Self>, policy: GcPolicy) {
        let mut tick = tokio::time::interval(policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(err) = self.enforce_gc_policy(&policy).await {
                tracing::warn!(err = %err.message(), "store GC policy failed");
            }
        }
    }
}
