//! Which differing jobs an anti-entropy round sends, sans IO.
//!
//! Anti-entropy compares per-job fingerprints with a peer and sends the whole saved
//! document of every job that differs. In a busy cluster most differences are pushes still
//! on their way: the job changed a moment ago and the peer is a hop behind. Saving,
//! sending and loading whole documents for those jobs was most of what anti-entropy cost
//! (perf on 50 nodes running E2), and it repaired nothing the pushes did not.
//!
//! So a job whose replica changed here within the *hold* — how long a push may still be on
//! its way: the node uses its settle window, twice the measured time for a push to reach
//! every node — is held back, and a later round looks again. The hold must stay that
//! short: a lost claim or start that anti-entropy repairs a second late lets another node
//! claim the job meanwhile (holding jobs back a whole 1 s round cost the simulator 20 %
//! more duplicate executions under message loss). Two exceptions keep repair prompt:
//!
//! - a job held back once and still differing a hold later is sent, however recently it
//!   changed (a job that keeps changing, or one whose pushes were lost while it keeps
//!   changing, is not starved);
//! - a peer that is restarting gets everything that differs (it waits to catch up before
//!   it claims anything).
//!
//! The node (`mutual node`) and the simulator both ask a [`Pacer`], so the simulator's
//! faults (loss, partitions, crashes) exercise the same rule.

use std::collections::HashMap;

use crate::ids::JobId;

/// Most jobs a pacer remembers in each of its tables; past it, the oldest half is
/// forgotten (a forgotten change only makes a job look quiet: it may be sent once early).
pub const MAX_TRACKED_JOBS: usize = 100_000;

/// Remembers, per job, when its replica last changed here and when a round first held it
/// back. Times are the caller's milliseconds.
#[derive(Debug, Clone)]
pub struct Pacer {
    hold_ms: u64,
    changed: HashMap<JobId, u64>,
    held: HashMap<JobId, u64>,
}

impl Pacer {
    /// A pacer that presumes a difference in flight for `hold_ms` after a change.
    pub fn new(hold_ms: u64) -> Pacer {
        Pacer {
            hold_ms: hold_ms.max(1),
            changed: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Changes the hold (the node's settle window adapts to measured round trips).
    pub fn set_hold(&mut self, hold_ms: u64) {
        self.hold_ms = hold_ms.max(1);
    }

    /// How long a change is presumed in flight (ms).
    pub fn hold_ms(&self) -> u64 {
        self.hold_ms
    }

    /// The replica of `job` changed here at `now_ms` (a local write or new records from a
    /// peer).
    pub fn changed(&mut self, job: JobId, now_ms: u64) {
        bound(&mut self.changed);
        self.changed.insert(job, now_ms);
    }

    /// Whether the replica of `job` changed within the hold.
    pub fn is_recent(&self, job: &JobId, now_ms: u64) -> bool {
        self.changed
            .get(job)
            .is_some_and(|at| now_ms.saturating_sub(*at) < self.hold_ms)
    }

    /// Whether to send `job`, which differs from the peer's digest, now; `catching_up`:
    /// the peer is restarting. Records a job held back.
    pub fn should_send(&mut self, job: JobId, now_ms: u64, catching_up: bool) -> bool {
        let held_long = self
            .held
            .get(&job)
            .is_some_and(|at| now_ms.saturating_sub(*at) >= self.hold_ms);
        if catching_up || held_long || !self.is_recent(&job, now_ms) {
            self.held.remove(&job);
            return true;
        }
        bound(&mut self.held);
        self.held.entry(job).or_insert(now_ms);
        false
    }

    /// Forgets what is too old to matter: changes older than the hold, and jobs held back
    /// more than two holds ago and not asked about since (a difference gone by then was a
    /// push in flight). Call once a round.
    pub fn tick(&mut self, now_ms: u64) {
        let h = self.hold_ms;
        self.changed.retain(|_, at| now_ms.saturating_sub(*at) < h);
        self.held.retain(|_, at| now_ms.saturating_sub(*at) < 2 * h);
    }

    /// Forgets everything (a restart).
    pub fn clear(&mut self) {
        self.changed.clear();
        self.held.clear();
    }
}

/// Most far partners one round's queued jobs bring in (jobs past it wait for a later
/// round): a burst must not turn one round into a broadcast.
pub const MAX_FAR_PARTNERS_PER_ROUND: usize = 32;
/// Times a queued job is compared with its holders: a digest lost, or sent across a
/// partition, must not leave the job to the sweep, which may never come (the node may
/// hold the job in nobody's view).
pub const FAR_COMPARISONS: u32 = 3;
/// Each comparison after the first waits this many times longer than the one before
/// (the hold, then 4 holds, then 16): the later ones outlast a partition.
pub const FAR_BACKOFF: u64 = 4;

/// Jobs whose document this node holds but cannot read yet, to be compared with their
/// holders: a relayed change reached it and the spec did not. Nobody else knows it lacks
/// the job, and a node that is a holder in nobody's view any more kept that unreadable
/// document for good (6 of 30 simulator seeds with `--automerge --replicas 5` ended so).
/// Each is compared once it has been quiet for the hold (the spec may be on its way), then
/// [`FAR_COMPARISONS`]` - 1` more times, [`FAR_BACKOFF`] times further apart each; the
/// digest names it with fingerprint 0, so every holder that has it sends it whole. The
/// queue takes any job, so a writer could also check its own writes this way.
#[derive(Debug, Clone, Default)]
pub struct FarQueue {
    /// Job → when it last joined the queue or was last compared (the caller's ms).
    at: HashMap<JobId, u64>,
    /// Job → comparisons done since it last joined.
    done: HashMap<JobId, u32>,
}

impl FarQueue {
    /// `job` is to be compared with its holders once quiet (again, from `now_ms`).
    pub fn add(&mut self, job: JobId, now_ms: u64) {
        if self.at.len() >= MAX_TRACKED_JOBS {
            bound(&mut self.at);
            let at = &self.at;
            self.done.retain(|id, _| at.contains_key(id));
        }
        self.at.insert(job, now_ms);
        self.done.remove(&job);
    }

    /// Jobs due for a comparison, oldest first (ties by id, so runs repeat): added at least
    /// `hold_ms` ago, or compared `n` times and last [`FAR_BACKOFF`]`^n` holds ago. The
    /// caller reports what it compared with [`FarQueue::compared`].
    pub fn quiet(&self, now_ms: u64, hold_ms: u64) -> Vec<JobId> {
        let mut due: Vec<(u64, JobId)> = self
            .at
            .iter()
            .filter(|(id, at)| {
                let n = self.done.get(*id).copied().unwrap_or(0);
                let wait = hold_ms.saturating_mul(FAR_BACKOFF.saturating_pow(n));
                now_ms.saturating_sub(**at) >= wait
            })
            .map(|(id, at)| (*at, *id))
            .collect();
        due.sort_unstable();
        due.into_iter().map(|(_, id)| id).collect()
    }

    /// `job` was compared with its holders at `now_ms`: after the last of
    /// [`FAR_COMPARISONS`] it is forgotten until it is added again.
    pub fn compared(&mut self, job: &JobId, now_ms: u64) {
        let n = self.done.get(job).copied().unwrap_or(0) + 1;
        if n >= FAR_COMPARISONS {
            self.at.remove(job);
            self.done.remove(job);
        } else if let Some(at) = self.at.get_mut(job) {
            *at = now_ms;
            self.done.insert(*job, n);
        }
    }

    /// `job` became readable: its engine learnt it, so anti-entropy's digests, which name
    /// it with its real fingerprint from now on, repair what it still lacks. Its remaining
    /// comparisons are not needed.
    pub fn readable(&mut self, job: &JobId) {
        self.at.remove(job);
        self.done.remove(job);
    }

    /// Jobs waiting.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Forgets everything (a restart: the catch-up compares everything anyway).
    pub fn clear(&mut self) {
        self.at.clear();
        self.done.clear();
    }
}

/// This round's far partners — holders of a job that are not ring neighbours: the holders
/// of the quiet queued jobs, oldest first, until adding the next job's holders would pass
/// [`MAX_FAR_PARTNERS_PER_ROUND`] (the first job always goes); then the holders of `sweep`,
/// the next held job in the caller's rotation, so each job is compared with each of its
/// holders once per pass. Returns the partners, sorted and without duplicates, and the
/// queued jobs they cover, to mark compared.
///
/// The sweep dials about one new connection per node per round in a busy cluster, most of
/// the 16 dials a job cost 200 hosted nodes. Sweeping only every 2nd or 4th round was
/// measured in the simulator and not kept: 100 nodes with `--replicas 5` then ended runs
/// with far replicas still differing (every 4th round with each writer also checking its
/// own writes through a [`FarQueue`]: 2 of the first 5 seeds; checking each write three
/// times: 1 of 10). See `docs/experiments.md`.
pub fn far_partners<N: Ord + Clone>(
    quiet: &[JobId],
    sweep: Option<JobId>,
    mut holders: impl FnMut(&JobId) -> Vec<N>,
) -> (Vec<N>, Vec<JobId>) {
    let mut out: Vec<N> = Vec::new();
    let mut covered = Vec::new();
    for job in quiet {
        let mut with = out.clone();
        with.extend(holders(job));
        with.sort();
        with.dedup();
        if !covered.is_empty() && with.len() > MAX_FAR_PARTNERS_PER_ROUND {
            break;
        }
        out = with;
        covered.push(*job);
    }
    if let Some(job) = sweep {
        out.extend(holders(&job));
        out.sort();
        out.dedup();
    }
    (out, covered)
}

/// Keeps a table under [`MAX_TRACKED_JOBS`] by dropping its older half.
fn bound(table: &mut HashMap<JobId, u64>) {
    if table.len() < MAX_TRACKED_JOBS {
        return;
    }
    let mut times: Vec<u64> = table.values().copied().collect();
    let mid = times.len() / 2;
    let (_, median, _) = times.select_nth_unstable(mid);
    let median = *median;
    table.retain(|_, at| *at > median);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(i: u8) -> JobId {
        let mut id = JobId::default();
        id.0[0] = i;
        id
    }

    #[test]
    fn a_quiet_job_is_sent_and_a_recent_one_held_back_once() {
        let mut p = Pacer::new(1_000);
        assert!(p.should_send(job(1), 0, false), "never changed here");
        p.changed(job(1), 5_000);
        assert!(!p.should_send(job(1), 5_100, false), "changed 100 ms ago");
        assert!(
            !p.should_send(job(1), 5_500, false),
            "still within a period of both"
        );
        // A period after it was first held back it goes, however recently it changed.
        p.changed(job(1), 6_050);
        assert!(p.should_send(job(1), 6_100, false));
        // Sent: the next difference starts afresh.
        assert!(!p.should_send(job(1), 6_200, false));
    }

    #[test]
    fn queued_jobs_wait_for_the_hold_and_are_compared_three_times() {
        let mut w = FarQueue::default();
        w.add(job(1), 1_000);
        w.add(job(2), 500);
        w.add(job(3), 1_900);
        assert!(w.quiet(1_400, 1_000).is_empty(), "nothing quiet yet");
        assert_eq!(w.quiet(2_000, 1_000), vec![job(2), job(1)]);
        // A new write starts its hold again.
        w.add(job(2), 1_950);
        assert_eq!(w.quiet(2_000, 1_000), vec![job(1)]);
        w.compared(&job(1), 2_000);
        assert_eq!(
            w.quiet(5_000, 1_000),
            vec![job(3), job(2)],
            "oldest write first"
        );
        // Compared once at 2 s: next due 4 holds later, then 16 holds after the second.
        assert_eq!(w.quiet(6_000, 1_000), vec![job(3), job(2), job(1)]);
        w.compared(&job(1), 6_000);
        assert!(!w.quiet(21_999, 1_000).contains(&job(1)));
        assert!(w.quiet(22_000, 1_000).contains(&job(1)));
        w.compared(&job(1), 22_000);
        assert!(!w.quiet(1_000_000, 1_000).contains(&job(1)), "done after 3");
        assert_eq!(w.len(), 2);
        // A new write starts over.
        w.add(job(1), 30_000);
        assert!(w.quiet(31_000, 1_000).contains(&job(1)));
    }

    #[test]
    fn a_job_that_became_readable_is_no_longer_asked_for() {
        let mut w = FarQueue::default();
        w.add(job(1), 0);
        w.add(job(2), 0);
        w.compared(&job(1), 1_000);
        w.readable(&job(1));
        assert_eq!(w.quiet(1_000_000, 1_000), vec![job(2)]);
        assert_eq!(w.len(), 1);
        // Unreadable again (a copy lost and re-created): asked for from the start.
        w.add(job(1), 2_000);
        assert!(w.quiet(3_000, 1_000).contains(&job(1)));
    }

    #[test]
    fn far_partners_are_capped_and_the_sweep_runs_every_few_rounds() {
        // Job i's holders: i*20 ..= i*20+20 (21 nodes), so two jobs exceed the cap.
        let holders = |j: &JobId| -> Vec<u32> {
            let b = u32::from(j.0[0]) * 20;
            (b..=b + 20).collect()
        };
        let quiet = [job(1), job(2), job(3)];
        let (out, covered) = far_partners(&quiet, None, holders);
        assert_eq!(covered, vec![job(1)], "job 2 would pass the cap: it waits");
        assert_eq!(out, (20..=40).collect::<Vec<u32>>());
        // One job always goes, however many holders it has.
        let many = |_: &JobId| -> Vec<u32> { (0..100).collect() };
        let (out, covered) = far_partners(&quiet, None, many);
        assert_eq!((out.len(), covered.len()), (100, 1));
        // Nothing queued: only the sweep.
        let (out, covered) = far_partners(&[], Some(job(9)), holders);
        assert!(covered.is_empty());
        assert_eq!(out, (180..=200).collect::<Vec<u32>>());
        // Overlapping holders count once: jobs 1 and 2 share 20..=30.
        let small = |j: &JobId| -> Vec<u32> {
            let b = u32::from(j.0[0]) * 10;
            (b..b + 12).collect()
        };
        let (out, covered) = far_partners(&quiet[..2], None, small);
        assert_eq!(covered, vec![job(1), job(2)]);
        assert_eq!(out, (10..32).collect::<Vec<u32>>());
    }

    #[test]
    fn a_job_left_alone_for_a_period_is_sent() {
        let mut p = Pacer::new(1_000);
        p.changed(job(2), 10_000);
        assert!(!p.should_send(job(2), 10_999, false));
        assert!(p.should_send(job(2), 11_000, false));
    }

    #[test]
    fn a_restarting_peer_gets_everything() {
        let mut p = Pacer::new(1_000);
        p.changed(job(3), 10_000);
        assert!(p.should_send(job(3), 10_001, true));
    }

    #[test]
    fn a_difference_that_went_away_is_forgotten() {
        let mut p = Pacer::new(1_000);
        p.changed(job(4), 0);
        assert!(!p.should_send(job(4), 10, false));
        p.tick(2_100);
        // Held back more than two periods ago and not asked since: a push in flight that
        // arrived. A new change is held back again.
        p.changed(job(4), 2_100);
        assert!(!p.should_send(job(4), 2_200, false));
        assert!(p.is_recent(&job(4), 2_200));
        p.tick(3_200);
        assert!(!p.is_recent(&job(4), 3_200));
    }

    #[test]
    fn tables_stay_bounded() {
        let mut p = Pacer::new(1_000);
        for i in 0..(MAX_TRACKED_JOBS as u64 + 10) {
            let mut id = JobId::default();
            id.0[..8].copy_from_slice(&i.to_le_bytes());
            p.changed(id, i);
            assert!(!p.should_send(id, i, false));
        }
        assert!(p.changed.len() <= MAX_TRACKED_JOBS);
        assert!(p.held.len() <= MAX_TRACKED_JOBS);
    }
}
