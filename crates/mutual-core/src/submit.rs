//! When a submission under placement may be acknowledged: once another holder has it.
//!
//! **Why.** Under full replication a new job goes down the broadcast tree to every node the
//! submitter can reach, so the submitter's death alone cannot lose it. Under placement it
//! goes only to the job's holders, and a node answered the client as soon as its own write
//! was durable. If a partition put every holder on the other side and the submitter then
//! died for good, an acknowledged job was lost (the simulator's
//! `mutual-sim --nodes 100 --jobs 1000 --seed 0 --replicas 5` did, before this wait).
//!
//! So the submitter asks the holders to confirm (`wire::Msg::Changes` with `reply`
//! [`CONFIRM_REPLY`]); a holder answers once its copy is durable (`wire::Msg::Held`). The
//! submitter acknowledges the job with the first confirmation. Until then it sends the
//! whole document again every resend period to the holders of its current view: in a
//! partition its failure detector soon moves the holders to its own side, and one of
//! those confirms. If no confirmation comes within the wait, the node answers anyway, saying
//! that the job is held by the submitter alone for now (HTTP 202): the client knows what
//! it has, and anti-entropy still brings the job to its holders when they are reachable.
//!
//! [`SubmitWaits`] is the bookkeeping, shared by `mutual node` and the simulator; it has no
//! clock (times are inputs) and a limit ([`MAX_SUBMIT_WAITS`]).

use std::collections::BTreeMap;

use crate::ids::JobId;

/// `wire::Msg::Changes::reply` of a submission: as 2 (relay once, answer if the record
/// sets differ), and the receiver confirms once its copy is durable.
pub const CONFIRM_REPLY: u8 = 3;
/// A submission waits this many failure timeouts for a confirmation before it is answered
/// unconfirmed: enough for the failure detector to judge the far side of a partition dead
/// (one timeout and a broadcast) and for a resend to the new holders (one more), with
/// room to spare.
pub const WAIT_FAILURE_TIMEOUTS: u64 = 6;
/// The shortest confirmation wait (ms), whatever the failure timeout.
pub const WAIT_MIN_MS: u64 = 3_000;
/// The longest confirmation wait (ms): half of `mutual`'s client request timeout (30 s).
pub const WAIT_MAX_MS: u64 = 15_000;

/// How long a submission waits for a confirmation, given the failure timeout in force.
pub fn wait_ms(failure_timeout_ms: u64) -> u64 {
    failure_timeout_ms
        .saturating_mul(WAIT_FAILURE_TIMEOUTS)
        .clamp(WAIT_MIN_MS, WAIT_MAX_MS)
}

/// Most submissions a node waits on at once. A node at the limit answers a new
/// submission at once, as unconfirmed: it never refuses one for this.
pub const MAX_SUBMIT_WAITS: usize = 4_096;

#[derive(Debug, Clone, Copy)]
struct Wait {
    since_ms: u64,
    sent_ms: u64,
}

/// What [`SubmitWaits::due`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due {
    /// Jobs whose document should go to their holders again.
    pub resend: Vec<JobId>,
    /// Jobs that waited the whole wait unconfirmed: answer them as unconfirmed. They are
    /// no longer waited on.
    pub expired: Vec<JobId>,
}

/// The submissions a node waits to see confirmed by another holder.
#[derive(Debug, Default)]
pub struct SubmitWaits {
    waits: BTreeMap<JobId, Wait>,
}

impl SubmitWaits {
    /// Starts waiting for `job`, whose document was just sent to its holders. Returns
    /// false, waiting for nothing, at [`MAX_SUBMIT_WAITS`].
    pub fn add(&mut self, job: JobId, now_ms: u64) -> bool {
        if self.waits.len() >= MAX_SUBMIT_WAITS && !self.waits.contains_key(&job) {
            return false;
        }
        self.waits.insert(
            job,
            Wait {
                since_ms: now_ms,
                sent_ms: now_ms,
            },
        );
        true
    }

    /// Whether `job` waits for a confirmation.
    pub fn is_waiting(&self, job: &JobId) -> bool {
        self.waits.contains_key(job)
    }

    /// A holder confirmed `job`. Returns whether it was waited on (then it no longer is),
    /// and how long it waited.
    pub fn confirm(&mut self, job: &JobId, now_ms: u64) -> Option<u64> {
        self.waits
            .remove(job)
            .map(|w| now_ms.saturating_sub(w.since_ms))
    }

    /// Submissions waited on.
    pub fn len(&self) -> usize {
        self.waits.len()
    }

    /// Whether none is waited on.
    pub fn is_empty(&self) -> bool {
        self.waits.is_empty()
    }

    /// The waits due at `now_ms`: sent `resend_ms` ago or more (marked sent now), or
    /// waiting `wait_ms` or more (removed).
    pub fn due(&mut self, now_ms: u64, resend_ms: u64, wait_ms: u64) -> Due {
        let mut due = Due::default();
        self.waits.retain(|job, w| {
            if now_ms.saturating_sub(w.since_ms) >= wait_ms {
                due.expired.push(*job);
                return false;
            }
            if now_ms.saturating_sub(w.sent_ms) >= resend_ms {
                w.sent_ms = now_ms;
                due.resend.push(*job);
            }
            true
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(i: u8) -> JobId {
        JobId([i; 16])
    }

    #[test]
    fn a_confirmed_submission_is_no_longer_waited_on() {
        let mut w = SubmitWaits::default();
        assert!(w.add(job(1), 100));
        assert!(w.is_waiting(&job(1)));
        assert_eq!(w.confirm(&job(1), 350), Some(250));
        assert!(!w.is_waiting(&job(1)));
        assert_eq!(
            w.confirm(&job(1), 400),
            None,
            "a second confirmation is nothing"
        );
        assert!(w.is_empty());
    }

    #[test]
    fn an_unconfirmed_submission_is_resent_each_period_then_expires() {
        let mut w = SubmitWaits::default();
        w.add(job(1), 0);
        w.add(job(2), 150);
        assert_eq!(w.due(99, 100, 1_000), Due::default());
        assert_eq!(
            w.due(100, 100, 1_000),
            Due {
                resend: vec![job(1)],
                expired: vec![]
            }
        );
        // Sent again at 100: not due again before 200.
        assert_eq!(
            w.due(199, 100, 1_000).resend,
            Vec::<JobId>::new(),
            "resent at most once a period"
        );
        assert_eq!(w.due(250, 100, 1_000).resend, vec![job(1), job(2)]);
        let last = w.due(1_000, 100, 1_000);
        assert_eq!(last.expired, vec![job(1)]);
        assert_eq!(last.resend, vec![job(2)]);
        assert!(!w.is_waiting(&job(1)));
        assert_eq!(w.due(1_150, 100, 1_000).expired, vec![job(2)]);
        assert!(w.is_empty());
    }

    #[test]
    fn the_wait_covers_detection_and_a_resend_within_bounds() {
        assert_eq!(wait_ms(500), WAIT_MIN_MS, "short timeouts wait the floor");
        assert_eq!(wait_ms(1_000), 6_000);
        assert_eq!(
            wait_ms(10_000),
            WAIT_MAX_MS,
            "long timeouts wait the ceiling"
        );
        assert_eq!(wait_ms(u64::MAX), WAIT_MAX_MS);
    }

    #[test]
    fn waits_are_bounded() {
        let mut w = SubmitWaits::default();
        for i in 0..MAX_SUBMIT_WAITS as u32 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            assert!(w.add(JobId(id), 0));
        }
        assert!(!w.add(job(0xff), 0), "one past the limit is refused");
        assert_eq!(w.len(), MAX_SUBMIT_WAITS);
        let mut first = [0u8; 16];
        first[..4].copy_from_slice(&0u32.to_le_bytes());
        assert!(
            w.add(JobId(first), 5),
            "a job already waited on may be added again"
        );
    }
}
