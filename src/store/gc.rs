//! Garbage collection: delete every valid path not reachable from a root.

use std::collections::{HashMap, HashSet};

use crate::nix::StorePath;

use super::{Store, StoreError, TRASH_PREFIX, fs, io_err};

/// What a collection removed (or, for a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Dead paths, sorted.
    pub dead: Vec<StorePath>,
    /// Sum of the dead paths' NAR sizes.
    pub nar_bytes: u64,
    /// Disk space freed (allocated blocks); 0 for a dry run.
    pub disk_bytes_freed: u64,
    /// Leftovers of interrupted writes removed on the way.
    pub leftovers_removed: usize,
    /// Closure views deleted because no root holds their top any more.
    pub views_removed: usize,
}

impl Store {
    /// Collects garbage. Waits for running pulls to finish rooting what they fetched.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        self.collect(dry_run, None)
    }

    /// Deletes those of `candidates` that no root reaches: what a failed pull added. Paths
    /// that another pull has rooted meanwhile stay.
    pub fn collect_unreachable(&self, candidates: &[StorePath]) -> Result<GcReport, StoreError> {
        let only: HashSet<StorePath> = candidates.iter().cloned().collect();
        self.collect(false, Some(&only))
    }

    /// Collects what of `top`'s closure no root reaches any more, on a thread of its own:
    /// the collection waits for running pulls (they hold the GC lock), and the CRI call that
    /// dropped the root should not.
    pub fn collect_closure_in_background(self: &std::sync::Arc<Self>, top: StorePath) {
        let store = self.clone();
        std::thread::spawn(move || {
            let closure: Vec<StorePath> = match store.closure(std::slice::from_ref(&top)) {
                Ok(closure) => closure.into_iter().collect(),
                Err(err) => {
                    tracing::debug!(%top, %err, "nothing to collect");
                    return;
                }
            };
            match store.collect_unreachable(&closure) {
                Ok(report) => tracing::info!(%top, deleted = report.dead.len(), "collected"),
                Err(err) => tracing::warn!(%top, %err, "cannot collect"),
            }
        });
    }

    fn collect(
        &self,
        dry_run: bool,
        only: Option<&HashSet<StorePath>>,
    ) -> Result<GcReport, StoreError> {
        let _lock = self.lock_gc_exclusive()?;
        let roots = self.all_roots()?;
        let graph = self.db().graph()?;

        let mut live: HashSet<&StorePath> = HashSet::new();
        let mut stack: Vec<&StorePath> = roots.iter().filter(|r| graph.contains_key(*r)).collect();
        while let Some(path) = stack.pop() {
            if live.insert(path)
                && let Some((_, references)) = graph.get(path)
            {
                stack.extend(references.iter().filter(|r| !live.contains(r)));
            }
        }
        let mut dead: Vec<StorePath> = graph
            .keys()
            .filter(|p| !live.contains(p) && only.is_none_or(|only| only.contains(*p)))
            .cloned()
            .collect();
        dead.sort();
        let nar_bytes = dead.iter().map(|p| nar_size(&graph, p)).sum();
        let mut report = GcReport {
            dead,
            nar_bytes,
            ..GcReport::default()
        };
        if dry_run {
            return Ok(report);
        }

        // Unregister first: a crash after this leaves unregistered trees, which are leftovers
        // removed at the next start; the other order could leave registered paths with no files.
        self.db().unregister(&report.dead)?;
        for path in &report.dead {
            let real = self.real_path(path);
            let trash = self
                .store_dir
                .join(format!("{TRASH_PREFIX}{}", path.hash()));
            match std::fs::rename(&real, &trash) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(io_err(&real)(err)),
            }
            report.disk_bytes_freed += fs::disk_usage(&trash);
            fs::remove_tree(&trash).map_err(io_err(&trash))?;
        }
        if only.is_none() {
            report.leftovers_removed = self.remove_leftovers()?.len();
        }
        report.views_removed = self.remove_unrooted_views(&roots.iter().cloned().collect())?;
        let metrics = crate::metrics::global();
        metrics.gc_runs.inc();
        metrics.gc_freed_bytes.inc_by(report.disk_bytes_freed);
        Ok(report)
    }
}

fn nar_size(graph: &HashMap<StorePath, (u64, Vec<StorePath>)>, path: &StorePath) -> u64 {
    graph.get(path).map(|(size, _)| *size).unwrap_or(0)
}
