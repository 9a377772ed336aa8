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
