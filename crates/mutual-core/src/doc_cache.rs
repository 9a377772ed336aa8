//! A replica's job documents, held in memory within a budget.
//!
//! A job document loaded as a live automerge document takes about 20 KiB of memory,
//! while its saved form is under 1 KiB. A replica holds every job of its cluster and most
//! of them are finished and never change again, so keeping every one live made a node's
//! memory grow by 26.8 KiB for every finished job it held; with the default budget it
//! grows by 7.6 KiB (5,000 jobs, `bench/results/doc-memory.json`). [`DocCache`] keeps the
//! most recently used `max_hot` documents live and the rest as their saved bytes; a cold
//! document is loaded again when a change for it arrives or a record is written. Loading
//! a finished job's document costs about 26 µs and saving it 22 µs
//! (`bench/results/engine.json`), against 11–14 µs per record to apply or write it.
//!
//! Nothing is lost by evicting: [`JobDoc::save`] keeps changes still waiting for their
//! dependencies (automerge's `retain_orphans`), and loading queues them again. A document
//! whose saved form would be too large to load back ([`MAX_DOC_BYTES`]) stays live.
//!
//! The cache has no clock: "recently used" is a use counter, so the simulator drives it
//! deterministically.

use std::collections::HashMap;

use crate::doc::{DocError, JobDoc, MAX_DOC_BYTES};
use crate::{JobId, JobView, NodeId};

/// Counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DocCacheStats {
    /// Cold documents loaded back.
    pub loads: u64,
    /// Live documents saved and dropped.
    pub evictions: u64,
}

#[derive(Debug)]
struct Hot {
    doc: JobDoc,
    used: u64,
}

/// Job documents by job id: the `max_hot` most recently used live, the others saved.
#[derive(Debug)]
pub struct DocCache {
    actor: NodeId,
    max_hot: usize,
    hot: HashMap<JobId, Hot>,
    cold: HashMap<JobId, Vec<u8>>,
    uses: u64,
    stats: DocCacheStats,
}

impl DocCache {
    /// An empty cache for the replica `actor` that keeps at most `max_hot` (at least one)
    /// documents live.
    pub fn new(actor: NodeId, max_hot: usize) -> DocCache {
        DocCache {
            actor,
            max_hot: max_hot.max(1),
            hot: HashMap::new(),
            cold: HashMap::new(),
            uses: 0,
            stats: DocCacheStats::default(),
        }
    }

    /// Documents held, live or saved.
    pub fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }

    /// True iff it holds no document.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Documents held live.
    pub fn hot_len(&self) -> usize {
        self.hot.len()
    }

    /// Whether it holds `job`'s document.
    pub fn contains(&self, job: &JobId) -> bool {
        self.hot.contains_key(job) || self.cold.contains_key(job)
    }

    /// Loads and evictions so far.
    pub fn stats(&self) -> DocCacheStats {
        self.stats
    }

    /// The ids of every document held.
    pub fn ids(&self) -> impl Iterator<Item = &JobId> {
        self.hot.keys().chain(self.cold.keys())
    }

    /// Holds `doc` as `job`'s document (replacing any), live, and returns it.
    pub fn insert(&mut self, job: JobId, doc: JobDoc) -> &mut JobDoc {
        self.cold.remove(&job);
        // `trim` never evicts `job`; `touch` stamps its use.
        self.hot.insert(job, Hot { doc, used: 0 });
        self.trim(job);
        self.touch(job)
    }

    /// `job`'s document, live (loaded back if it was saved), or `None` if it holds none.
    /// Fails only if saved bytes do not load, which they do unless memory was corrupted;
    /// the bytes are kept either way.
    pub fn get_mut(&mut self, job: &JobId) -> Result<Option<&mut JobDoc>, DocError> {
        if !self.make_hot(job)? {
            return Ok(None);
        }
        Ok(Some(self.touch(*job)))
    }

    /// `job`'s document, live; an empty replica of it (see [`JobDoc::empty`]) if it holds
    /// none yet.
    pub fn get_or_empty(&mut self, job: JobId) -> Result<&mut JobDoc, DocError> {
        if !self.make_hot(&job)? {
            let empty = JobDoc::empty(self.actor);
            return Ok(self.insert(job, empty));
        }
        Ok(self.touch(job))
    }

    /// Loads `job`'s saved document back if it is saved; false if it holds none.
    fn make_hot(&mut self, job: &JobId) -> Result<bool, DocError> {
        if self.hot.contains_key(job) {
            return Ok(true);
        }
        let Some(bytes) = self.cold.remove(job) else {
            return Ok(false);
        };
        match JobDoc::load(&bytes, self.actor) {
            Ok(doc) => {
                self.stats.loads += 1;
                self.insert(*job, doc);
                Ok(true)
            }
            Err(e) => {
                self.cold.insert(*job, bytes);
                Err(e)
            }
        }
    }

    /// Marks live `job` as just used and returns it. Callers make it live first; if it
    /// were not, an empty replica is held rather than panicking.
    fn touch(&mut self, job: JobId) -> &mut JobDoc {
        self.uses += 1;
        let (actor, used) = (self.actor, self.uses);
        let h = self.hot.entry(job).or_insert_with(|| Hot {
            doc: JobDoc::empty(actor),
            used,
        });
        h.used = used;
        &mut h.doc
    }

    /// `job`'s document decoded, without changing what is live (a saved one is loaded
    /// into a temporary document); `None` if it holds none.
    pub fn view(&self, job: &JobId) -> Option<Result<JobView, DocError>> {
        if let Some(h) = self.hot.get(job) {
            return Some(h.doc.view());
        }
        let bytes = self.cold.get(job)?;
        Some(JobDoc::load(bytes, self.actor).and_then(|d| d.view()))
    }

    /// Drops `job`'s document.
    pub fn remove(&mut self, job: &JobId) {
        self.hot.remove(job);
        self.cold.remove(job);
    }

    /// `job`'s document saved whole, without loading it if it is saved already.
    pub fn saved(&mut self, job: &JobId) -> Option<Vec<u8>> {
        if let Some(bytes) = self.cold.get(job) {
            return Some(bytes.clone());
        }
        self.hot.get_mut(job).map(|h| h.doc.save())
    }

    /// Every document saved whole (for a snapshot of the log).
    pub fn saved_all(&mut self) -> Vec<(JobId, Vec<u8>)> {
        let mut all: Vec<(JobId, Vec<u8>)> = self
            .cold
            .iter()
            .map(|(job, bytes)| (*job, bytes.clone()))
            .collect();
        all.extend(self.hot.iter_mut().map(|(job, h)| (*job, h.doc.save())));
        all
    }

    /// Saves the least recently used live documents, other than `keep`, until three
    /// quarters of `max_hot` are live: evicting a quarter at a time keeps the sort
    /// amortised to O(log n) per eviction.
    fn trim(&mut self, keep: JobId) {
        if self.hot.len() <= self.max_hot {
            return;
        }
        let target = self.max_hot - self.max_hot / 4;
        let mut by_age: Vec<(u64, JobId)> = self
            .hot
            .iter()
            .filter(|(job, _)| **job != keep)
            .map(|(job, h)| (h.used, *job))
            .collect();
        by_age.sort_unstable();
        let excess = self.hot.len().saturating_sub(target);
        for (_, job) in by_age.into_iter().take(excess) {
            let Some(h) = self.hot.get_mut(&job) else {
                continue;
            };
            let bytes = h.doc.save();
            if bytes.len() > MAX_DOC_BYTES {
                continue;
            }
            self.hot.remove(&job);
            self.cold.insert(job, bytes);
            self.stats.evictions += 1;
        }
    }
}
