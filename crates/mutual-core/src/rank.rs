//! Rendezvous ranking for claims, and the ring that decides who watches whom.
//!
//! **Claims.** Every node scores a job attempt with BLAKE3 of (job, epoch, node). Instead
//! of sorting all N eligible nodes (O(N) per node per job, O(N²) in a cluster), a node
//! estimates its own rank from its score alone: scores are uniform, so a node whose score
//! is in the top `r/N` fraction is about rank `r`. It waits `rank × step` before claiming.
//! The best-placed free node therefore claims almost at once and the others only if it
//! did not, which keeps concurrent claims rare without a scheduler, at O(1) per decision.
//!
//! The estimate has a cost in latency: the best node's estimated rank is ⌊X⌋ with X
//! exponential of mean 1, so for 37 % of attempts no node believes itself rank 0 and the
//! first claim waits a step, for 14 % two steps, for 5 % three (E3 at 20 agents: claim
//! after detection p95 250–700 ms with 100 ms steps). Where the driver knows every
//! possible claimant (full replication: every live node) and they are at most
//! [`EXACT_RANK_MAX_NODES`], a node computes its [`exact_rank`] instead, at O(N) per
//! attempt; with agreeing views exactly one node is rank 0.
//!
//! **Watching.** Failure detection must not cost every node O(N): each node probes only the
//! first [`WATCHERS`] live nodes after it on a ring ordered by node id. When a watched node
//! is judged dead its watcher starts watching the next one, so a run of dead neighbours is
//! still found (in one probe period, thanks to `membership::LOOKAHEAD`).

use crate::ids::{JobId, NodeId};
use crate::token::Epoch;

/// Ranks beyond this all wait the same (`MAX_RANK × step`): a bound on claim latency.
pub const MAX_RANK: u64 = 64;
/// How many ring successors each node watches.
pub const WATCHERS: usize = 2;

/// Up to this many claimants a node ranks itself exactly (one score per claimant per
/// attempt, about 0.2 µs each), beyond it by estimate.
pub const EXACT_RANK_MAX_NODES: usize = 128;

/// A node's rendezvous score for one attempt of a job (higher is better).
pub fn score(job: JobId, epoch: Epoch, node: NodeId) -> u64 {
    let mut h = blake3::Hasher::new_derive_key("mutual-cloud rendezvous v1");
    h.update(&job.0);
    h.update(&epoch.0.to_le_bytes());
    h.update(&node.0);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// The rank a node with `score` can expect among `nodes` uniformly scored nodes
/// (0 = best), capped at [`MAX_RANK`].
pub fn estimated_rank(score: u64, nodes: usize) -> u64 {
    let above = u128::from(u64::MAX - score);
    let rank = (above * nodes as u128) >> 64;
    (rank as u64).min(MAX_RANK)
}

/// The rank of `me` among `nodes` for one attempt of `job` (0 = best): how many of the
/// others score higher (ties, which BLAKE3 makes vanishingly rare, go to the higher id),
/// capped at [`MAX_RANK`]. `me` need not be in `nodes`.
pub fn exact_rank(job: JobId, epoch: Epoch, me: NodeId, nodes: &[NodeId]) -> u64 {
    let mine = (score(job, epoch, me), me);
    let above = nodes
        .iter()
        .filter(|n| **n != me && (score(job, epoch, **n), **n) > mine)
        .count();
    (above as u64).min(MAX_RANK)
}

/// The nodes `me` watches: the first `k` nodes after `me` in `ring` (sorted by id, `me`
/// included or not) for which `alive` holds, wrapping around, never `me` itself.
pub fn watch_targets(
    me: NodeId,
    ring: &[NodeId],
    k: usize,
    alive: impl Fn(&NodeId) -> bool,
) -> Vec<NodeId> {
    let start = ring.partition_point(|n| *n <= me);
    ring[start..]
        .iter()
        .chain(ring[..start].iter())
        .filter(|n| **n != me && alive(n))
        .take(k)
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_estimate_is_uniform_enough() {
        let job = JobId([7; 16]);
        let n = 1_000usize;
        let zero = (0..n as u64)
            .filter(|i| estimated_rank(score(job, Epoch(1), NodeId::from_index(*i)), n) == 0)
            .count();
        // Expect about one node at rank 0 (Poisson(1)); allow a wide band.
        assert!(zero <= 6, "{zero} nodes think they are rank 0");
    }

    #[test]
    fn exactly_one_node_is_rank_zero_and_ranks_are_a_permutation() {
        let nodes: Vec<NodeId> = (0..20).map(NodeId::from_index).collect();
        for j in 0..50u8 {
            let job = JobId([j; 16]);
            let mut ranks: Vec<u64> = nodes
                .iter()
                .map(|n| exact_rank(job, Epoch(3), *n, &nodes))
                .collect();
            ranks.sort_unstable();
            assert_eq!(ranks, (0..20).collect::<Vec<u64>>(), "job {j}");
        }
        // A node outside the list ranks among it as if it were in it.
        let job = JobId([1; 16]);
        let outsider = NodeId::from_index(99);
        let mut with: Vec<NodeId> = nodes.clone();
        with.push(outsider);
        assert_eq!(
            exact_rank(job, Epoch(1), outsider, &nodes),
            exact_rank(job, Epoch(1), outsider, &with)
        );
        // The cap.
        let many: Vec<NodeId> = (0..200).map(NodeId::from_index).collect();
        assert!(
            many.iter()
                .all(|n| exact_rank(job, Epoch(1), *n, &many) <= MAX_RANK)
        );
    }

    #[test]
    fn watch_targets_skip_dead_and_wrap() {
        let mut ring: Vec<NodeId> = (0..5).map(NodeId::from_index).collect();
        ring.sort();
        let me = ring[3];
        let dead = ring[4];
        let t = watch_targets(me, &ring, 2, |n| *n != dead);
        assert_eq!(t, vec![ring[0], ring[1]]);
    }
}
