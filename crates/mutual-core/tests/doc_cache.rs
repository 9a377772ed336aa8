//! `DocCache` behaves exactly like a map of live documents, however small its budget:
//! random sequences of remote changes (delivered out of order, so some wait for their
//! dependencies), local writes, saves and removals give the same views and the same
//! saved documents as a plain `HashMap<JobId, JobDoc>`.

mod common;

use std::collections::HashMap;

use common::{claim, node, spec_at, start};
use mutual_core::doc::JobDoc;
use mutual_core::doc_cache::DocCache;
use mutual_core::hlc::Hlc;
use mutual_core::ids::JobId;
use proptest::prelude::*;

const JOBS: usize = 5;
const CHANGES_PER_JOB: usize = 6;

fn job(i: usize) -> JobId {
    let mut id = JobId::default();
    id.0[0] = i as u8 + 1;
    id
}

/// Each job's history as written by other nodes: the creator's change, then claims and
/// starts from nodes 1..=5, each change depending on the ones before it.
fn histories() -> Vec<Vec<Vec<u8>>> {
    (0..JOBS)
        .map(|j| {
            let mut spec = spec_at(3, Hlc(10));
            spec.id = job(j);
            let mut doc = JobDoc::create(&spec, node(0)).expect("create");
            let mut changes = vec![doc.last_change().expect("first change")];
            for k in 1..CHANGES_PER_JOB as u64 {
                let writer = node(k);
                let mut w = JobDoc::load(&doc.save(), writer).expect("load");
                let record = if k % 2 == 1 {
                    claim(k as u32, writer, 100 + k)
                } else {
                    start(k as u32 - 1, node(k - 1), 100 + k)
                };
                w.write(&record).expect("write");
                changes.push(w.last_change().expect("change"));
                doc = w;
            }
            changes
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    /// Apply change `c` of job `j` (in any order: later ones wait for earlier ones).
    Apply(usize, usize),
    /// The local node (node 9) writes a claim of epoch `e` on job `j`.
    Write(usize, u32),
    /// Save job `j` (anti-entropy's path).
    Save(usize),
    /// Drop job `j`.
    Remove(usize),
    /// Save everything (compaction's path).
    SaveAll,
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..JOBS, 0..CHANGES_PER_JOB).prop_map(|(j, c)| Op::Apply(j, c)),
        2 => (0..JOBS, 1u32..8).prop_map(|(j, e)| Op::Write(j, e)),
        1 => (0..JOBS).prop_map(Op::Save),
        1 => (0..JOBS).prop_map(Op::Remove),
        1 => Just(Op::SaveAll),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_cache_of_any_budget_acts_like_a_map(
        max_hot in 1usize..4,
        ops in proptest::collection::vec(arb_op(), 1..60),
    ) {
        let changes = histories();
        let me = node(9);
        let mut cache = DocCache::new(me, max_hot);
        let mut map: HashMap<JobId, JobDoc> = HashMap::new();
        for op in ops {
            match op {
                Op::Apply(j, c) => {
                    let bytes = &changes[j][c];
                    cache.get_or_empty(job(j)).expect("cache").apply(bytes).expect("apply");
                    map.entry(job(j)).or_insert_with(|| JobDoc::empty(me)).apply(bytes).expect("apply");
                }
                Op::Write(j, e) => {
                    // Only on a document that decodes (the node writes only to jobs it knows).
                    let Some(m) = map.get_mut(&job(j)) else { continue };
                    if m.view().is_err() {
                        continue;
                    }
                    let record = claim(e, me, 1_000 + u64::from(e));
                    m.write(&record).expect("write");
                    let c = cache.get_mut(&job(j)).expect("load").expect("held");
                    c.write(&record).expect("write");
                    prop_assert_eq!(c.last_change(), m.last_change());
                }
                Op::Save(j) => {
                    let a = cache.saved(&job(j)).map(|b| JobDoc::load(&b, me).expect("load").view().ok());
                    let b = map.get_mut(&job(j)).map(|d| d.view().ok());
                    prop_assert_eq!(a, b);
                }
                Op::Remove(j) => {
                    cache.remove(&job(j));
                    map.remove(&job(j));
                }
                Op::SaveAll => {
                    let mut saved = cache.saved_all();
                    saved.sort_by_key(|(id, _)| *id);
                    let ids: Vec<JobId> = saved.iter().map(|(id, _)| *id).collect();
                    let mut want: Vec<JobId> = map.keys().copied().collect();
                    want.sort();
                    prop_assert_eq!(ids, want);
                }
            }
            prop_assert!(cache.hot_len() <= max_hot);
            prop_assert_eq!(cache.len(), map.len());
        }
        // Every document decodes to the same view, and holds the same changes: delivering
        // everything now completes both the same way.
        for (j, history) in changes.iter().enumerate() {
            let id = job(j);
            prop_assert_eq!(cache.contains(&id), map.contains_key(&id));
            let Some(m) = map.get_mut(&id) else { continue };
            let c = cache.get_mut(&id).expect("load").expect("held");
            prop_assert_eq!(c.view().ok(), m.view().ok());
            for bytes in history {
                c.apply(bytes).expect("apply");
                m.apply(bytes).expect("apply");
            }
            let (cv, mv) = (c.view().expect("complete"), m.view().expect("complete"));
            prop_assert_eq!(&cv, &mv);
            prop_assert_eq!(cv.records().count(), mv.records().count());
        }
    }
}

/// A change that arrived before its dependencies survives eviction: once the missing
/// change arrives, the document is complete.
#[test]
fn eviction_keeps_changes_waiting_for_their_dependencies() {
    let changes = histories();
    let me = node(9);
    let mut cache = DocCache::new(me, 1);
    // Job 0 gets only its last change (its dependencies are missing), then job 1 evicts it.
    cache
        .get_or_empty(job(0))
        .expect("empty")
        .apply(&changes[0][CHANGES_PER_JOB - 1])
        .expect("queued");
    cache.get_or_empty(job(1)).expect("empty");
    cache.get_or_empty(job(2)).expect("empty");
    assert!(cache.stats().evictions >= 1, "{:?}", cache.stats());
    let doc = cache.get_mut(&job(0)).expect("load").expect("held");
    assert!(
        doc.view().is_err(),
        "nothing decodes before the creator's change"
    );
    for bytes in &changes[0][..CHANGES_PER_JOB - 1] {
        doc.apply(bytes).expect("apply");
    }
    let view = doc.view().expect("complete");
    assert_eq!(view.records().count(), CHANGES_PER_JOB, "spec + 5 records");
    assert!(cache.stats().loads >= 1);
}
