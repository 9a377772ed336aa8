//! The failure detector's decisions, sans IO: whom to probe, when a silent node is judged
//! dead, and how beliefs about other nodes change.
//!
//! Each node watches only the first [`WATCHERS`] nodes after it on a ring ordered by node id
//! that it believes alive, so per-node detection traffic is constant in the cluster size
//! (`design.md` §5). A watched node silent for `timeout_ms` is judged dead; the driver then
//! tells the engine ([`crate::engine::Event::Suspect`]) and everyone else. When a watched
//! node is judged dead the watcher moves on to the next one.
//!
//! It also probes the [`LOOKAHEAD`] live nodes after its watched ones, without judging
//! them, so that it knows how long each has been silent. Nodes often die together (a rack,
//! a kill of 40 %), and then the nodes watching a dead node may be dead too. Without the
//! lookahead, the first live node before a run of k dead neighbours finds them one hop at
//! a time, a whole timeout per hop, since a node starts being timed only when it becomes a
//! watched one (E3 at 20 agents, 40 % killed: MTTR p95 3.3 s, 2.0 s with it). With it, the
//! next ones in line are judged in the same probe period, as soon as they become watched
//! ([`Detector::tick`] is called again until it judges no one), on the silence measured
//! while they were looked ahead at.
//!
//! Beliefs must be corrected, or a node judged dead by mistake — say across a partition —
//! is never watched again and its real death later goes unnoticed (the simulator found
//! this). The signs are a probe from a node believed dead, an answer to a re-probe, or a
//! record it wrote after the judgement (the engine drops its judgement then). Nodes
//! believed dead between this node and its last live target are re-probed now and then.
//! A sign revives no one, though (`mutual`'s `node` module since node protocol 4, and the
//! simulator): it may have waited in queues behind thousands of messages and been sent
//! before its sender died. At 100 placed agents a dead holder once stayed believed alive
//! by all but its judges, its jobs untaken for good, while any sign revived. The node
//! that sees the sign tells the sender instead, which refutes with newer info of its
//! own (and sends it to the teller straight, which a healed partition needs: each side's
//! broadcasts reach only the members it believes alive). Judgements carry the version of
//! the info they were made on, only newer info revives, and member anti-entropy carries
//! the dead, so a missed judgement or refutation is repaired.
//!
//! Nodes are addressed by their position on the ring (a shared, sorted list of ids), so a
//! thousand detectors in one simulation share one ring and keep only a bit per node.

use std::sync::Arc;

use crate::ids::NodeId;
use crate::rank::WATCHERS;

/// Live nodes after the watched ones that a node also probes, without judging them, so
/// that their silence is known once they become watched (see the module doc). Each node
/// is probed by `WATCHERS + LOOKAHEAD` others: twice the probes of watching alone.
pub const LOOKAHEAD: usize = WATCHERS;

/// One node's failure detector.
#[derive(Debug, Clone)]
pub struct Detector {
    me: usize,
    ring: Arc<[NodeId]>,
    alive: Vec<bool>,
    alive_count: usize,
    /// Watched nodes (ring positions) with the local time of their last answer.
    targets: Vec<(usize, u64)>,
    /// The next [`LOOKAHEAD`] live nodes after them, timed the same way but not judged.
    ahead: Vec<(usize, u64)>,
    timeout_ms: u64,
}

/// What one probe period asks of the driver.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    /// Ring positions to probe now, in order.
    pub probe: Vec<usize>,
    /// Watched nodes silent past the timeout: judged dead by this node now.
    pub judged: Vec<usize>,
}

impl Detector {
    /// A detector for the node at ring position `me` that believes everyone alive.
    /// `ring` must be sorted by node id.
    pub fn new(me: usize, ring: Arc<[NodeId]>, timeout_ms: u64, now_ms: u64) -> Detector {
        let n = ring.len();
        let mut d = Detector {
            me,
            ring,
            alive: vec![true; n],
            alive_count: n,
            targets: Vec::new(),
            ahead: Vec::new(),
            timeout_ms,
        };
        d.retarget(now_ms);
        d
    }

    /// The ring (sorted node ids).
    pub fn ring(&self) -> &Arc<[NodeId]> {
        &self.ring
    }

    /// True iff this node believes the node at `pos` alive.
    pub fn is_alive(&self, pos: usize) -> bool {
        self.alive.get(pos).copied().unwrap_or(false)
    }

    /// How many nodes (this one included) it believes alive.
    pub fn alive_count(&self) -> usize {
        self.alive_count
    }

    /// The nodes it watches, by ring position.
    pub fn targets(&self) -> impl Iterator<Item = usize> + '_ {
        self.targets.iter().map(|(t, _)| *t)
    }

    fn retarget(&mut self, now_ms: u64) {
        // The first WATCHERS + LOOKAHEAD nodes after this one on the ring believed alive,
        // wrapping around (the first WATCHERS are `rank::watch_targets`), walked by
        // position so no id is looked up. A node already timed keeps its time.
        let n = self.ring.len();
        let mut new = Vec::with_capacity(WATCHERS + LOOKAHEAD);
        let mut k = (self.me + 1) % n.max(1);
        while k != self.me && new.len() < WATCHERS + LOOKAHEAD {
            if self.alive[k] {
                new.push(k);
            }
            k = (k + 1) % n;
        }
        let old_targets = std::mem::take(&mut self.targets);
        let old_ahead = std::mem::take(&mut self.ahead);
        let mut timed = new.into_iter().map(|t| {
            let last = old_targets
                .iter()
                .chain(&old_ahead)
                .find(|(o, _)| *o == t)
                .map_or(now_ms, |(_, last)| *last);
            (t, last)
        });
        self.targets = timed.by_ref().take(WATCHERS).collect();
        self.ahead = timed.collect();
    }

    /// One probe period: which nodes to probe (watched and looked ahead at), and which
    /// watched ones have been silent too long. Judged nodes are *not* marked dead here:
    /// the driver calls [`Detector::set`], which also picks the next nodes to watch, and
    /// then calls `tick` again, until it judges no one, so that a run of dead neighbours
    /// timed while looked ahead at is judged in one period. The probes to send are those
    /// of the last call.
    pub fn tick(&self, now_ms: u64) -> Tick {
        let mut tick = Tick::default();
        for &(t, last) in &self.targets {
            if now_ms.saturating_sub(last) > self.timeout_ms {
                tick.judged.push(t);
            } else {
                tick.probe.push(t);
            }
        }
        tick.probe.extend(self.ahead.iter().map(|(t, _)| *t));
        tick
    }

    /// The local time at which the first watched node will have been silent past the
    /// timeout, if no answer comes first. Judging only at probe periods let a dead node go
    /// unjudged for up to a period past its timeout (E3 at 20 agents: detection p50 about
    /// 650 ms for a 500 ms timeout and 250 ms probes); the driver calls [`Detector::tick`]
    /// again at this moment as well.
    pub fn next_judgement_ms(&self) -> Option<u64> {
        self.targets
            .iter()
            .map(|(_, last)| last.saturating_add(self.timeout_ms).saturating_add(1))
            .min()
    }

    /// Nodes believed dead between this node and its last live target, to re-probe.
    pub fn reprobe(&self) -> Vec<usize> {
        let n = self.ring.len();
        let mut out = Vec::new();
        let mut k = (self.me + 1) % n.max(1);
        let mut live_seen = 0;
        while k != self.me && live_seen < WATCHERS {
            if self.alive[k] {
                live_seen += 1;
            } else {
                out.push(k);
            }
            k = (k + 1) % n;
        }
        out
    }

    /// Records an answer from `pos` (to a probe or a re-probe).
    pub fn answered(&mut self, pos: usize, now_ms: u64) {
        if let Some(t) = self
            .targets
            .iter_mut()
            .chain(&mut self.ahead)
            .find(|(t, _)| *t == pos)
        {
            t.1 = now_ms;
        }
    }

    /// Changes the timeout (the driver adapts it to measured round trips).
    pub fn set_timeout(&mut self, timeout_ms: u64) {
        self.timeout_ms = timeout_ms;
    }

    /// The timeout in force.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    /// Does not count `ms` of silence against the watched nodes: the driver calls this when
    /// it was itself kept from running that long (its probe tick came late), since answers
    /// it could not read then say nothing about the peers (Lifeguard's local health, in
    /// its simplest form). A target is never credited past `now_ms`.
    pub fn forgive(&mut self, ms: u64, now_ms: u64) {
        for t in self.targets.iter_mut().chain(&mut self.ahead) {
            t.1 = t.1.saturating_add(ms).min(now_ms);
        }
    }

    /// Changes the belief about `pos`; returns whether it changed (the driver then tells
    /// the engine `MemberUp`/`MemberDown` and the new cluster size).
    pub fn set(&mut self, pos: usize, alive: bool, now_ms: u64) -> bool {
        if pos >= self.alive.len() || self.alive[pos] == alive {
            return false;
        }
        self.alive[pos] = alive;
        if alive {
            self.alive_count += 1;
        } else {
            self.alive_count -= 1;
        }
        self.retarget(now_ms);
        true
    }
}

/// A watcher that judged a node dead broadcasts the judgement again this many times while it
/// still holds: the first after [`DOWN_REPEAT_FIRST_TIMEOUTS`] failure timeouts, each next
/// one twice as long after the one before. One repeat was not enough. The first broadcast
/// goes down a tree built before the other members that died at the same moment were
/// judged, and every branch through them is lost (E2 at 100 hosted agents: 38 of 90
/// survivors never learnt of one death); a repeat two timeouts later goes around them. But
/// sent across a partition, both reach only some members, and the rest believe the dead
/// node alive for good: the holders of a job it ran then wait on it for ever (simulator,
/// 30 nodes with `--replicas 5`, seed 2, once the far sweep was slowed). With the repeats
/// spread over 14 timeouts, the last outlasts a partition of the simulator's longest.
pub const DOWN_REPEATS: u32 = 3;
/// Failure timeouts after a judgement before its first repeat (see [`DOWN_REPEATS`]).
pub const DOWN_REPEAT_FIRST_TIMEOUTS: u64 = 2;
/// Most judgements a node keeps to repeat; past it, new ones are broadcast once.
pub const MAX_DOWN_REPEATS_TRACKED: usize = 4_096;

/// The judgements this node made and is to broadcast again ([`DOWN_REPEATS`]).
#[derive(Debug, Clone)]
pub struct DownRepeats<N> {
    /// (when, whom, repeats done).
    due: Vec<(u64, N, u32)>,
}

impl<N> Default for DownRepeats<N> {
    fn default() -> Self {
        DownRepeats { due: Vec::new() }
    }
}

impl<N: Clone + PartialEq> DownRepeats<N> {
    /// This node judged `node` dead at `now_ms`.
    pub fn judged(&mut self, node: N, now_ms: u64, timeout_ms: u64) {
        self.due.retain(|(_, n, _)| *n != node);
        if self.due.len() < MAX_DOWN_REPEATS_TRACKED {
            let at = now_ms.saturating_add(timeout_ms.saturating_mul(DOWN_REPEAT_FIRST_TIMEOUTS));
            self.due.push((at, node, 0));
        }
    }

    /// The judgements to broadcast again now: those due that `still_dead` confirms. The
    /// others due are dropped (the node came back); the returned ones are scheduled again
    /// until their last repeat.
    pub fn due(&mut self, now_ms: u64, timeout_ms: u64, still_dead: impl Fn(&N) -> bool) -> Vec<N> {
        if !self.due.iter().any(|(at, _, _)| *at <= now_ms) {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut keep = Vec::with_capacity(self.due.len());
        for (at, node, done) in std::mem::take(&mut self.due) {
            if at > now_ms {
                keep.push((at, node, done));
            } else if still_dead(&node) {
                out.push(node.clone());
                let done = done + 1;
                if done < DOWN_REPEATS {
                    let wait = timeout_ms
                        .saturating_mul(DOWN_REPEAT_FIRST_TIMEOUTS)
                        .saturating_mul(1 << done.min(16));
                    keep.push((now_ms.saturating_add(wait), node, done));
                }
            }
        }
        self.due = keep;
        out
    }

    /// Forgets everything (a restart).
    pub fn clear(&mut self) {
        self.due.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(n: u64) -> Arc<[NodeId]> {
        let mut v: Vec<NodeId> = (0..n).map(NodeId::from_index).collect();
        v.sort();
        v.into()
    }

    #[test]
    fn targets_agree_with_rank_watch_targets() {
        let r = ring(9);
        let mut d = Detector::new(4, r.clone(), 500, 0);
        for dead in [5usize, 6, 0] {
            d.set(dead, false, 0);
            let want: Vec<usize> = crate::rank::watch_targets(r[4], &r, WATCHERS, |n| {
                d.is_alive(r.binary_search(n).unwrap())
            })
            .iter()
            .map(|n| r.binary_search(n).unwrap())
            .collect();
            assert_eq!(d.targets().collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn judges_silent_targets_and_moves_on() {
        let r = ring(6);
        let mut d = Detector::new(0, r, 500, 0);
        assert_eq!(d.targets().collect::<Vec<_>>(), vec![1, 2]);
        for pos in [1, 3, 4] {
            d.answered(pos, 400);
        }
        let t = d.tick(600);
        assert_eq!(
            t,
            Tick {
                probe: vec![1, 3, 4],
                judged: vec![2]
            },
            "3 and 4 are looked ahead at: probed, never judged"
        );
        assert!(d.set(2, false, 600));
        assert!(!d.set(2, false, 600), "no change the second time");
        assert_eq!(d.targets().collect::<Vec<_>>(), vec![1, 3]);
        assert!(
            d.tick(600).judged.is_empty(),
            "3 answered while looked ahead at"
        );
        assert_eq!(d.alive_count(), 5);
        assert_eq!(
            d.reprobe(),
            vec![2],
            "the dead node inside the watch range is re-probed"
        );
        assert!(d.set(2, true, 700));
        // A driver starved for 300 ms forgives that much silence, never beyond now.
        d.answered(1, 700);
        d.answered(2, 700);
        assert_eq!(d.tick(1_250).judged, vec![1, 2]);
        d.forgive(300, 1_250);
        assert!(d.tick(1_250).judged.is_empty());
        d.forgive(10_000, 1_250);
        assert_eq!(d.tick(1_751).judged, vec![1, 2]);
        assert_eq!(d.targets().collect::<Vec<_>>(), vec![1, 2]);
        assert!(d.reprobe().is_empty());
    }

    /// Ticks as the driver does: judges, marks dead, and ticks again until no one is
    /// judged. Returns the judged nodes and the last tick's probes.
    fn judge_all(d: &mut Detector, now_ms: u64) -> (Vec<usize>, Vec<usize>) {
        let mut judged = Vec::new();
        loop {
            let t = d.tick(now_ms);
            if t.judged.is_empty() {
                return (judged, t.probe);
            }
            for j in t.judged {
                assert!(d.set(j, false, now_ms));
                judged.push(j);
            }
        }
    }

    #[test]
    fn a_run_of_dead_neighbours_is_judged_in_one_period() {
        // Node 0 watches 1 and 2 and looks ahead at 3 and 4; 1 to 4 die together at 0.
        let r = ring(8);
        let mut d = Detector::new(0, r, 500, 0);
        let (judged, probe) = judge_all(&mut d, 600);
        assert_eq!(judged, vec![1, 2, 3, 4], "all four in one period");
        assert_eq!(d.targets().collect::<Vec<_>>(), vec![5, 6]);
        assert_eq!(probe, vec![5, 6, 7], "the ring wraps before a fourth");
        assert_eq!(d.alive_count(), 4);
        // Nodes not looked ahead at before they were watched get a whole timeout.
        assert!(
            judge_all(&mut d, 1_100).0.is_empty(),
            "5 and 6: timed from 600"
        );
        d.answered(6, 1_000);
        assert_eq!(judge_all(&mut d, 1_101).0, vec![5, 7]);
        assert_eq!(d.targets().collect::<Vec<_>>(), vec![6]);
    }

    #[test]
    fn the_next_judgement_is_due_one_timeout_after_the_oldest_answer() {
        let r = ring(6);
        let mut d = Detector::new(0, r, 500, 0);
        assert_eq!(d.next_judgement_ms(), Some(501));
        d.answered(1, 300);
        d.answered(2, 200);
        // Looked-ahead nodes are never judged, so they set no deadline.
        d.answered(3, 100);
        assert_eq!(d.next_judgement_ms(), Some(701));
        assert!(d.tick(700).judged.is_empty(), "not before the deadline");
        assert_eq!(d.tick(701).judged, vec![2], "at it");
        d.set_timeout(1_000);
        assert_eq!(d.next_judgement_ms(), Some(1_201));
        // With no one watched (a ring of one), nothing is due.
        let alone = Detector::new(0, ring(1), 500, 0);
        assert_eq!(alone.next_judgement_ms(), None);
    }

    #[test]
    fn a_judgement_is_repeated_while_it_holds_and_then_stops() {
        let mut r: DownRepeats<u32> = DownRepeats::default();
        r.judged(7, 1_000, 500);
        assert!(r.due(1_999, 500, |_| true).is_empty());
        assert_eq!(r.due(2_000, 500, |_| true), vec![7]);
        // Each next one twice as long after: 2 s later, then 4 s.
        assert!(r.due(3_999, 500, |_| true).is_empty());
        assert_eq!(r.due(4_000, 500, |_| true), vec![7]);
        assert!(r.due(7_999, 500, |_| true).is_empty());
        assert_eq!(r.due(8_000, 500, |_| true), vec![7]);
        assert!(
            r.due(1_000_000, 500, |_| true).is_empty(),
            "{DOWN_REPEATS} repeats"
        );
        // A node believed alive again is not repeated, and forgotten.
        r.judged(8, 0, 500);
        assert!(r.due(1_000, 500, |_| false).is_empty());
        assert!(r.due(1_000_000, 500, |_| true).is_empty());
        // A new judgement of the same node starts over, once.
        r.judged(9, 0, 500);
        r.judged(9, 100, 500);
        assert!(r.due(1_099, 500, |_| true).is_empty());
        assert_eq!(r.due(1_100, 500, |_| true), vec![9]);
    }
}
