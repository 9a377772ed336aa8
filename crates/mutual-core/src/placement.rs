//! Where a job's document lives: on every node, or on the few nodes XOR-closest to the job.
//!
//! **Why.** Under full replication every node stores every job's document and applies every
//! change any node writes, so a node's work grows with the whole cluster's job rate: at
//! 10,000 nodes that is thousands of messages per node per second (E4), and on one two-core
//! machine 100 nodes already spend most of the CPU applying each other's changes (E2).
//! `design.md` §4 keeps full replication up to about a thousand nodes and, beyond that,
//! places each job document on the [`REPLICAS`] nodes XOR-closest to the job's id, plus the
//! nodes involved in it (the one running it), with lookups one hop away: any node computes
//! the set from its member list and asks one of them. [`Scheme::for_nodes`] is that choice.
//!
//! **Distance.** The XOR of the job id and the first 16 bytes of a node id, read as
//! big-endian integers (Kademlia's metric). Both are uniform: job ids are BLAKE3 output and
//! node ids are public keys. Nodes within distance `< 2^(128 - L)` of a job are exactly
//! those sharing its first `L` bits, a contiguous run of the id-sorted ring, so the `k`
//! closest lie in the longest shared prefix whose run still holds `k` nodes: a binary search
//! over `L` and a sort of that run (about `2k` nodes), O(log N · log N + k log k) per job
//! instead of sorting all N.
//!
//! **Hand-off.** When the live set changes, a job's set changes only if a replica left or a
//! node joined closer than its `k`-th replica: about `k/N` of the jobs per membership change.
//! One node sends the document to each newcomer — the closest old replica still alive
//! ([`handoff`]) — so a change costs one copy per new replica, not `k`. If every old replica
//! is gone there is no sender: the document survives only where the nodes involved in the
//! job hold it, which is why `k` must outnumber the failures that can strike together before
//! a hand-off completes (E4 reports the loss under simultaneous kills).
//!
//! Views that disagree (a death not yet known everywhere) make writers send to slightly
//! different sets: a send to a dead node is lost while the rest of the set has the change,
//! and anti-entropy between replicas repairs the difference. Placement decides where data
//! lives and so which nodes can claim a job (those that hold it); the engine's rules do
//! not change. What `mutual node --replicas k` adds so a claim still reaches every other
//! claimant within the settle window (relay once, answer the writer) is in
//! `docs/invariants.md`.

use crate::ids::{JobId, NodeId};

/// Replicas of a job document under placement (`k`).
pub const REPLICAS: usize = 5;
/// Up to this many live nodes every node holds every document (`design.md` §4).
pub const FULL_REPLICATION_MAX_NODES: usize = 1_000;

/// How job documents are spread over the live nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Every live node holds every document.
    Full,
    /// Each document on its `k` XOR-closest live nodes (plus the nodes involved in it).
    Placed {
        /// Replicas per document.
        k: usize,
    },
}

impl Scheme {
    /// The scheme the product uses with `live` nodes.
    pub fn for_nodes(live: usize) -> Scheme {
        if live <= FULL_REPLICATION_MAX_NODES {
            Scheme::Full
        } else {
            Scheme::Placed { k: REPLICAS }
        }
    }
}

fn node_key(node: &NodeId) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&node.0[..16]);
    u128::from_be_bytes(b)
}

fn job_key(job: JobId) -> u128 {
    u128::from_be_bytes(job.0)
}

/// The XOR distance between a job and a node (smaller is closer).
pub fn distance(job: JobId, node: &NodeId) -> u128 {
    job_key(job) ^ node_key(node)
}

/// Where the run of `ring` nodes sharing the first `bits` bits with `key` begins and ends.
fn prefix_run(ring: &[NodeId], key: u128, bits: u32) -> (usize, usize) {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    let lo = key & mask;
    let hi = lo | !mask;
    let start = ring.partition_point(|n| node_key(n) < lo);
    let end = ring.partition_point(|n| node_key(n) <= hi);
    (start, end)
}

/// The `k` nodes of `ring` closest to `job`, closest first (all of them if `ring` has at
/// most `k`). `ring` must be sorted by id (as the overlay keeps it) and hold no duplicates.
pub fn replicas(ring: &[NodeId], job: JobId, k: usize) -> Vec<NodeId> {
    let key = job_key(job);
    let (mut start, mut end) = (0, ring.len());
    if ring.len() > k {
        // Longest prefix whose run still holds k nodes: the count falls as `bits` grows.
        let (mut lo, mut hi) = (0u32, 128u32);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let (s, e) = prefix_run(ring, key, mid);
            if e - s >= k {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        (start, end) = prefix_run(ring, key, lo);
    }
    let mut run: Vec<NodeId> = ring[start..end].to_vec();
    run.sort_by_key(|n| (distance(job, n), *n));
    run.truncate(k);
    run
}

/// The nodes that hold `job`'s document under `scheme`: every node, or its replicas.
pub fn holders(scheme: Scheme, ring: &[NodeId], job: JobId) -> Vec<NodeId> {
    match scheme {
        Scheme::Full => ring.to_vec(),
        Scheme::Placed { k } => replicas(ring, job, k),
    }
}

/// Whether `me` holds `job`'s document under `scheme` on `ring`.
pub fn holds(scheme: Scheme, ring: &[NodeId], job: JobId, me: &NodeId) -> bool {
    match scheme {
        Scheme::Full => ring.binary_search(me).is_ok(),
        Scheme::Placed { k } => replicas(ring, job, k).contains(me),
    }
}

/// The nodes other than `me` that hold `job`'s document under placement with `k`
/// replicas on the live `ring` (sorted): its replicas, and every node on `ring` that wrote
/// to it (`writers`: its submitter, claimants and runners, wherever they are on the ring).
/// Sorted, each node once. The node and the simulator both send a job's writes, relays,
/// hand-offs and anti-entropy to exactly this set, so they must compute it alike.
pub fn holders_with_writers(
    ring: &[NodeId],
    job: JobId,
    k: usize,
    writers: impl IntoIterator<Item = NodeId>,
    me: &NodeId,
) -> Vec<NodeId> {
    let mut out = replicas(ring, job, k);
    out.extend(
        writers
            .into_iter()
            .filter(|w| ring.binary_search(w).is_ok()),
    );
    out.sort();
    out.dedup();
    out.retain(|n| n != me);
    out
}

/// Where a holder relays a record it learnt from the record's writer: the holders in its
/// own view (`mine`, itself excluded, as [`holders_with_writers`] gives them) other than
/// the `writer` and the nodes the writer sent the record to itself (`sent`). When the two
/// views of the holders agree, that is nobody: every holder had the record from the
/// writer in one hop. When they differ (one has not yet learnt of a join or a death),
/// the holders only this one sees get it in two hops, which is what the settle window
/// needs ("Relay once" in `docs/invariants.md`). Relaying to every holder instead made
/// each write cost about `k²` messages, and as many connections between holders spread
/// over the ring: most of a job's messages and handshakes at 100 nodes.
pub fn relay_targets<T: Copy + PartialEq>(mine: &[T], writer: T, sent: &[T]) -> Vec<T> {
    mine.iter()
        .copied()
        .filter(|n| *n != writer && !sent.contains(n))
        .collect()
}

/// The up to `k` nodes on either side of `me` on the sorted `ring` (`me` excluded, each
/// node once). A job's replicas all share a prefix with it, so they lie close together on
/// the ring (within the run of nodes sharing that prefix, about `2k` of them): most of the
/// other replicas of the jobs `me` holds as a replica are among these, and anti-entropy
/// with them repairs what a write under a stale view, or a hand-off racing a write, left
/// out.
pub fn ring_neighbours(ring: &[NodeId], me: &NodeId, k: usize) -> Vec<NodeId> {
    let n = ring.len();
    let at = ring.partition_point(|x| x < me);
    let mut out: Vec<NodeId> = (1..=k)
        .flat_map(|d| [(at + d) % n.max(1), (at + n * k - d) % n.max(1)])
        .filter_map(|p| ring.get(p).copied())
        .filter(|x| x != me)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// What a change of the live ring from `before` to `after` asks of one job's document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handoff {
    /// Who sends the document: the closest replica under `before` that is alive in
    /// `after`. `None` when every old replica is gone (only the nodes involved in the job
    /// can still have it).
    pub sender: Option<NodeId>,
    /// New replicas that did not hold the document, closest first.
    pub to: Vec<NodeId>,
    /// Old replicas alive in `after` that are no longer replicas (they may drop it once
    /// the new ones have it).
    pub released: Vec<NodeId>,
}

/// The hand-off of `job`'s document when the live ring changes from `before` to `after`
/// (both sorted), with `k` replicas. Empty when the set did not change.
pub fn handoff(before: &[NodeId], after: &[NodeId], job: JobId, k: usize) -> Handoff {
    let old = replicas(before, job, k);
    let new = replicas(after, job, k);
    let alive = |n: &NodeId| after.binary_search(n).is_ok();
    Handoff {
        sender: old.iter().find(|n| alive(n)).copied(),
        to: new.iter().filter(|n| !old.contains(n)).copied().collect(),
        released: old
            .iter()
            .filter(|n| alive(n) && !new.contains(n))
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(ids: impl IntoIterator<Item = u64>) -> Vec<NodeId> {
        let mut r: Vec<NodeId> = ids.into_iter().map(NodeId::from_index).collect();
        r.sort();
        r.dedup();
        r
    }

    fn job(i: u64) -> JobId {
        let mut b = [0u8; 16];
        b.copy_from_slice(&NodeId::from_index(i ^ 0xdead_beef).0[..16]);
        JobId(b)
    }

    fn brute(ring: &[NodeId], j: JobId, k: usize) -> Vec<NodeId> {
        let mut all = ring.to_vec();
        all.sort_by_key(|n| (distance(j, n), *n));
        all.truncate(k);
        all
    }

    #[test]
    fn the_scheme_switches_to_placement_above_the_full_replication_limit() {
        assert_eq!(Scheme::for_nodes(3), Scheme::Full);
        assert_eq!(Scheme::for_nodes(FULL_REPLICATION_MAX_NODES), Scheme::Full);
        assert_eq!(
            Scheme::for_nodes(FULL_REPLICATION_MAX_NODES + 1),
            Scheme::Placed { k: REPLICAS }
        );
    }

    #[test]
    fn full_replication_holds_everything_everywhere() {
        let r = ring(0..20);
        assert_eq!(holders(Scheme::Full, &r, job(1)), r);
        assert!(holds(Scheme::Full, &r, job(1), &r[7]));
        assert!(!holds(Scheme::Full, &r, job(1), &NodeId::from_index(99)));
    }

    #[test]
    fn a_relay_goes_only_to_holders_the_writer_missed() {
        // Views agree: the writer reached every holder, so nothing is relayed.
        assert_eq!(relay_targets(&[2, 3, 4], 1, &[2, 3, 4]), Vec::<u32>::new());
        // This holder (5) knows of 6, which the writer does not: only 6 gets the relay.
        assert_eq!(relay_targets(&[2, 3, 6], 1, &[2, 3, 5]), vec![6]);
        // The writer itself is never a target, even when it is one of my holders.
        assert_eq!(relay_targets(&[1, 2], 1, &[]), vec![2]);
        // Without the writer's list (one over the limit is dropped) every holder is.
        assert_eq!(relay_targets(&[2, 3], 1, &[]), vec![2, 3]);
    }

    #[test]
    fn holders_are_replicas_and_live_writers_without_me() {
        let r = ring(0..20);
        let j = job(3);
        let reps = replicas(&r, j, 3);
        let me = reps[0];
        let far = *r.iter().find(|n| !reps.contains(n)).expect("a non-replica");
        let gone = NodeId::from_index(99);
        let got = holders_with_writers(&r, j, 3, [far, gone, me, far], &me);
        let mut want: Vec<NodeId> = reps[1..].to_vec();
        want.push(far);
        want.sort();
        assert_eq!(got, want, "replicas but me, plus the live writer once");
        assert!(
            !got.contains(&gone),
            "a writer off the live ring is not a holder"
        );
    }

    #[test]
    fn a_small_ring_places_on_every_node() {
        let r = ring(0..3);
        let got = replicas(&r, job(5), REPLICAS);
        assert_eq!(got.len(), 3);
        assert_eq!(got, brute(&r, job(5), REPLICAS));
        assert!(replicas(&[], job(5), REPLICAS).is_empty());
    }

    #[test]
    fn ring_neighbours_are_the_k_nearest_on_each_side() {
        let r = ring(0..50);
        for (at, me) in r.iter().enumerate() {
            let near = ring_neighbours(&r, me, 3);
            let mut want: Vec<NodeId> = [1, 2, 3, 47, 48, 49]
                .iter()
                .map(|d| r[(at + d) % 50])
                .collect();
            want.sort();
            assert_eq!(near, want);
        }
        // A ring smaller than 2k + 1: everyone else, once.
        let small = ring(0..4);
        assert_eq!(ring_neighbours(&small, &small[0], 3), small[1..].to_vec());
        assert!(ring_neighbours(&small[..1], &small[0], 3).is_empty());
        // Most of the other replicas of a node's jobs are among them (anti-entropy relies
        // on it; the rest are reached through the job-by-job round).
        let big = ring(0..2_000);
        let (mut near, mut all) = (0usize, 0usize);
        for j in 0..2_000u64 {
            let job = job(j);
            let reps = replicas(&big, job, REPLICAS);
            let n = ring_neighbours(&big, &reps[0], REPLICAS);
            all += reps.len() - 1;
            near += reps[1..].iter().filter(|x| n.contains(x)).count();
        }
        assert!(
            near * 10 >= all * 9,
            "{near} of {all} replicas within k ring places"
        );
    }

    #[test]
    fn jobs_spread_evenly_over_a_large_ring() {
        let r = ring(0..1_000);
        let mut count = std::collections::HashMap::<NodeId, usize>::new();
        for j in 0..20_000 {
            for n in replicas(&r, job(j), REPLICAS) {
                *count.entry(n).or_default() += 1;
            }
        }
        // 100 copies per node on average; XOR placement's spread is a few times that at most.
        let max = count.values().copied().max().unwrap_or(0);
        assert_eq!(count.values().sum::<usize>(), 20_000 * REPLICAS);
        assert!(max < 400, "busiest node holds {max} copies");
        assert!(
            count.len() > 950,
            "only {} nodes hold anything",
            count.len()
        );
    }

    proptest! {
        #[test]
        fn replicas_are_the_k_closest(
            ids in proptest::collection::vec(any::<u64>(), 0..300),
            j in any::<u64>(),
            k in 1usize..9,
        ) {
            let r = ring(ids);
            let got = replicas(&r, job(j), k);
            prop_assert_eq!(got.len(), k.min(r.len()));
            prop_assert_eq!(got, brute(&r, job(j), k));
        }

        #[test]
        fn one_join_or_leave_moves_at_most_one_replica(
            ids in proptest::collection::vec(any::<u64>(), 1..200),
            extra in any::<u64>(),
            j in any::<u64>(),
        ) {
            let before = ring(ids);
            let mut after = before.clone();
            let newcomer = NodeId::from_index(extra);
            if let Err(at) = after.binary_search(&newcomer) {
                after.insert(at, newcomer);
            }
            let h = handoff(&before, &after, job(j), REPLICAS);
            prop_assert!(h.to.len() <= 1);
            prop_assert!(h.to.iter().all(|n| *n == newcomer));
            prop_assert_eq!(h.released.len(), usize::from(before.len() >= REPLICAS && !h.to.is_empty()));
            if !h.to.is_empty() {
                prop_assert_eq!(h.sender, Some(replicas(&before, job(j), REPLICAS)[0]));
            }
            // The reverse: the newcomer leaves again.
            let back = handoff(&after, &before, job(j), REPLICAS);
            prop_assert!(back.to.len() <= 1);
            prop_assert_eq!(back.to.is_empty(), h.to.is_empty() || before.len() < REPLICAS);
        }

        #[test]
        fn after_a_handoff_every_new_replica_is_served(
            ids in proptest::collection::vec(any::<u64>(), 1..200),
            dead in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
            j in any::<u64>(),
        ) {
            let before = ring(ids);
            let gone: Vec<NodeId> = dead.iter().map(|i| before[i.index(before.len())]).collect();
            let after: Vec<NodeId> = before.iter().filter(|n| !gone.contains(n)).copied().collect();
            let h = handoff(&before, &after, job(j), REPLICAS);
            let old = replicas(&before, job(j), REPLICAS);
            let new = replicas(&after, job(j), REPLICAS);
            // Survivors keep their copy; newcomers get one from the sender, if anyone is left.
            let mut have: Vec<NodeId> = old.iter().filter(|n| after.contains(n)).copied().collect();
            match h.sender {
                Some(s) => {
                    prop_assert!(old.contains(&s) && after.contains(&s));
                    have.extend(h.to.iter().copied());
                }
                None => prop_assert!(old.iter().all(|n| gone.contains(n))),
            }
            if h.sender.is_some() {
                prop_assert!(new.iter().all(|n| have.contains(n)));
            }
            prop_assert!(h.released.iter().all(|n| !new.contains(n) && after.contains(n)));
        }
    }
}
