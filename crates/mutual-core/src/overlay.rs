//! Who talks to whom: a sparse overlay on the ring of live nodes, and a broadcast tree on it.
//!
//! Pushing every change to every member costs each node a connection to every other one.
//! On one machine with 100 nodes that full mesh is 9,900 QUIC connections whose handshakes
//! and keep-alives alone starve the cores during a burst, and anti-entropy with a *random*
//! member churns through new connections every round. So a node talks only to its
//! *fingers* — the live nodes 1, 2, 4, 8, … places after it on the ring of live node ids —
//! and to the nodes that have it as a finger: about 2·log₂ N peers, a set that changes only
//! when membership does.
//!
//! A broadcast runs down the binomial tree these fingers span (El-Ansary et al., "Efficient
//! broadcast in structured P2P networks", 2003): a node responsible for the arc up to (not
//! including) `limit` forwards to each of its fingers inside the arc, handing finger *k* the
//! sub-arc up to finger *k+1*. With agreeing views every live node gets the message exactly
//! once, within ⌈log₂ N⌉ hops, and no node sends more than ⌈log₂ N⌉ copies. Views that
//! disagree (a join or a death not yet known everywhere) can miss a node or reach one twice:
//! duplicates are harmless (automerge changes are idempotent) and anti-entropy repairs misses.
//!
//! Up to [`FLAT_MAX_NODES`] live nodes the tree is flat: every node is everyone's finger, so
//! a broadcast is one hop (a 10-node cluster waits less for claims) and each node holds at
//! most 15 links.
//!
//! Positions are in a sorted slice of the ids a node believes alive, itself included.

use crate::ids::NodeId;

/// Rings of at most this many live nodes use a flat tree (everyone is a finger).
pub const FLAT_MAX_NODES: usize = 16;

/// Offsets (places after `me` on a live ring of `ring` nodes) of the fingers below
/// `width`: 1, 2, 4, …, or every offset on a small ring.
fn finger_offsets(ring: usize, width: usize) -> impl Iterator<Item = usize> {
    let flat = ring <= FLAT_MAX_NODES;
    std::iter::successors(Some(1usize), move |o| {
        if flat {
            o.checked_add(1)
        } else {
            o.checked_mul(2)
        }
    })
    .take_while(move |o| *o < width)
}

/// The most hops a broadcast takes on a live ring of `n` nodes with agreeing views.
pub fn depth(n: usize) -> u32 {
    if n <= 1 {
        0
    } else if n <= FLAT_MAX_NODES {
        1
    } else {
        usize::BITS - (n - 1).leading_zeros()
    }
}

/// Where the sub-arc handed to the finger at offset `o` ends, in an arc of `width`.
fn sub_arc_end(ring: usize, o: usize, width: usize) -> usize {
    let next = if ring <= FLAT_MAX_NODES {
        o.saturating_add(1)
    } else {
        o.saturating_mul(2)
    };
    next.min(width)
}

/// Position of `me` in `alive`, or `None` when it is not there.
fn position(alive: &[NodeId], me: NodeId) -> Option<usize> {
    alive.binary_search(&me).ok()
}

/// The fingers of `me`: the live nodes 1, 2, 4, … places after it. `alive` is sorted and
/// contains `me`; empty when it does not.
pub fn fingers(alive: &[NodeId], me: NodeId) -> Vec<NodeId> {
    let Some(i) = position(alive, me) else {
        return Vec::new();
    };
    let n = alive.len();
    finger_offsets(n, n).map(|o| alive[(i + o) % n]).collect()
}

/// Everyone `me` exchanges messages with: its fingers and the nodes whose finger it is
/// (1, 2, 4, … places before it), sorted, without `me`.
pub fn neighbours(alive: &[NodeId], me: NodeId) -> Vec<NodeId> {
    let Some(i) = position(alive, me) else {
        return Vec::new();
    };
    let n = alive.len();
    let mut out: Vec<NodeId> = finger_offsets(n, n)
        .flat_map(|o| [alive[(i + o) % n], alive[(i + n - o) % n]])
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Where `me` forwards a broadcast it must deliver to the live nodes strictly after it and
/// strictly before `limit` on the ring (`limit == me`: everyone else). Each entry is a
/// finger and the limit to hand it. A `limit` that `me` does not believe alive ends the arc
/// at the first live node after it.
pub fn tree_targets(alive: &[NodeId], me: NodeId, limit: NodeId) -> Vec<(NodeId, NodeId)> {
    let Some(i) = position(alive, me) else {
        return Vec::new();
    };
    let n = alive.len();
    // The arc's width: how many places after `me` the limit sits (n = back to `me`).
    let width = if limit == me {
        n
    } else {
        let j = alive.partition_point(|x| *x < limit) % n;
        match (j + n - i) % n {
            0 => n,
            w => w,
        }
    };
    finger_offsets(n, width)
        .map(|o| {
            (
                alive[(i + o) % n],
                alive[(i + sub_arc_end(n, o, width)) % n],
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn ring(n: u64) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = (0..n).map(NodeId::from_index).collect();
        v.sort();
        v
    }

    /// Runs a broadcast from `origin` over the views in `views`; returns how many times
    /// each node received it and the largest hop count.
    fn run(views: &BTreeMap<NodeId, Vec<NodeId>>, origin: NodeId) -> (BTreeMap<NodeId, u32>, u32) {
        let mut got = BTreeMap::new();
        let mut depth = 0;
        let mut queue = vec![(origin, origin, 0u32)];
        while let Some((at, limit, hops)) = queue.pop() {
            depth = depth.max(hops);
            if at != origin {
                *got.entry(at).or_insert(0) += 1;
            }
            let Some(view) = views.get(&at) else { continue };
            for (to, l) in tree_targets(view, at, limit) {
                queue.push((to, l, hops + 1));
            }
        }
        (got, depth)
    }

    #[test]
    fn small_rings() {
        let r = ring(1);
        assert!(fingers(&r, r[0]).is_empty());
        assert!(tree_targets(&r, r[0], r[0]).is_empty());
        let r = ring(2);
        assert_eq!(fingers(&r, r[0]), vec![r[1]]);
        assert_eq!(neighbours(&r, r[0]), vec![r[1]]);
        assert_eq!(tree_targets(&r, r[1], r[1]), vec![(r[0], r[1])]);
        // Small rings are flat: one hop to everyone.
        let r = ring(5);
        assert_eq!(fingers(&r, r[3]), vec![r[4], r[0], r[1], r[2]]);
        assert_eq!(
            tree_targets(&r, r[0], r[0]),
            vec![(r[1], r[2]), (r[2], r[3]), (r[3], r[4]), (r[4], r[0])]
        );
        assert!(fingers(&r, NodeId::from_index(99)).is_empty());
        // Larger ones use powers of two.
        let r = ring(40);
        assert_eq!(
            fingers(&r, r[38]),
            vec![r[39], r[0], r[2], r[6], r[14], r[30]]
        );
        assert_eq!(
            tree_targets(&r, r[0], r[8]),
            vec![(r[1], r[2]), (r[2], r[4]), (r[4], r[8])]
        );
    }

    proptest! {
        /// With agreeing views every live node gets a broadcast exactly once, within
        /// ⌈log₂ N⌉ hops, and each node sends to at most ⌈log₂ N⌉ peers, all neighbours.
        #[test]
        fn exactly_once_with_agreeing_views(n in 1u64..300, origin in 0usize..300) {
            let r = ring(n);
            let origin = r[origin % r.len()];
            let views: BTreeMap<NodeId, Vec<NodeId>> = r.iter().map(|x| (*x, r.clone())).collect();
            let (got, depth) = run(&views, origin);
            prop_assert_eq!(got.len(), r.len() - 1);
            prop_assert!(got.values().all(|c| *c == 1));
            let flat = r.len() <= FLAT_MAX_NODES;
            let log = usize::BITS - (r.len().max(1) - 1).leading_zeros();
            prop_assert!(depth <= super::depth(r.len()), "depth {} > {}", depth, super::depth(r.len()));
            for x in &r {
                let nb: BTreeSet<NodeId> = neighbours(&r, *x).into_iter().collect();
                for (to, _) in tree_targets(&r, *x, *x) {
                    prop_assert!(nb.contains(&to));
                }
                let most = if flat { FLAT_MAX_NODES } else { 2 * log as usize };
                prop_assert!(neighbours(&r, *x).len() <= most);
            }
        }

        /// A node some views lack (it joined, or died) is missed at worst; the nodes every
        /// view agrees on still get the broadcast, and nobody gets it more than twice.
        #[test]
        fn one_disagreement_loses_at_most_a_subtree(n in 3u64..200, odd in 0usize..200, origin in 0usize..200) {
            let r = ring(n);
            let odd = r[odd % r.len()];
            let origin = r[origin % r.len()];
            prop_assume!(odd != origin);
            let without: Vec<NodeId> = r.iter().copied().filter(|x| *x != odd).collect();
            // Half the nodes do not know `odd`.
            let views: BTreeMap<NodeId, Vec<NodeId>> = r
                .iter()
                .enumerate()
                .map(|(k, x)| (*x, if k % 2 == 0 && *x != odd { without.clone() } else { r.clone() }))
                .collect();
            let (got, _) = run(&views, origin);
            prop_assert!(got.values().all(|c| *c <= 2));
            let missed = r.iter().filter(|x| **x != origin && !got.contains_key(x)).count();
            prop_assert!(missed <= 1, "missed {}", missed);
        }
    }
}
