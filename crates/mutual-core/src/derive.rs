//! `derive_state`: the job's state as a pure function of its records.
//!
//! These are the rules that survived the model check (`shared/protocol-model/REPORT.md`,
//! the "fixed" mode), restated:
//!
//! - A result *counts* iff its writer's token is the smallest claim of its epoch in the
//!   result's own `seen` set and `seen` holds no later epoch. Validity depends only on the
//!   record, so nothing that arrives later can void it.
//! - *Succeeded* iff a counted exit-0 result exists; the accepted one has the smallest
//!   token among them. *Failed* iff `max_attempts` distinct epochs hold counted non-zero
//!   results, or a takeover cap is reached (expired epochs that had started, or expired
//!   epochs of any kind: [`MAX_TAKEOVERS`], [`MAX_EXPIRED_EPOCHS`]). *Cancelled* iff a cancel
//!   record exists. Precedence: succeeded > failed > cancelled. Each condition only grows
//!   with the record set, so terminal states stick (invariant 6).
//! - Otherwise: no claim → queued for epoch 1; the highest epoch expired or closed by a
//!   counted failure → queued for the next epoch; else claimed (running once the winner
//!   wrote its start record).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::ids::NodeId;
use crate::token::{Epoch, FencingToken, unfenced_by};
use crate::view::{CheckpointRec, JobView, ResultRec};

/// Expired epochs that had started, beyond `max_attempts`, a job may go through (holders
/// that died while it ran, not counted failures) before it is failed: a job that kills
/// every node it lands on must not loop forever. Such a job always has a start record
/// (the winner writes it before it fetches inputs or runs anything), so epochs expired
/// before any start do not count here. Those are claimants that died or were judged dead
/// within their settle window. A node judged dead by mistake keeps claiming until it
/// hears of it, and for the clock-drift window after the judgement its claims are expired
/// as soon as they are seen: the simulator saw one job go through 19 such epochs in 360 ms
/// and fail, having never run (`mutual-sim --nodes 20 --jobs 200 --seed 75 --kill-percent
/// 40 --kill-together`, with the failure detector's lookahead).
pub const MAX_TAKEOVERS: u32 = 16;
/// Expired epochs of any kind after which a job is failed all the same: a bound on the
/// epochs, and so the records, of a job that never gets to start.
pub const MAX_EXPIRED_EPOCHS: u32 = 128;

/// The state of a job, as every replica with the same records derives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a claim of `epoch`.
    Queued {
        /// The epoch the next claim is for.
        epoch: Epoch,
    },
    /// Won but not yet started.
    Claimed {
        /// The winner's token.
        token: FencingToken,
    },
    /// Started by the winner.
    Running {
        /// The winner's token.
        token: FencingToken,
    },
    /// A counted exit-0 result exists.
    Succeeded {
        /// Token of the accepted result.
        token: FencingToken,
    },
    /// Out of attempts (or takeovers).
    Failed {
        /// Token of the smallest counted failure, if the attempts ran out.
        token: Option<FencingToken>,
    },
    /// A cancel record exists and nothing succeeded or failed.
    Cancelled,
}

impl JobState {
    /// Succeeded, failed or cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded { .. } | JobState::Failed { .. } | JobState::Cancelled
        )
    }

    /// The short name used by the API and CLI.
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued { .. } => "queued",
            JobState::Claimed { .. } => "claimed",
            JobState::Running { .. } => "running",
            JobState::Succeeded { .. } => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// The token of the current holder while claimed or running.
    pub fn holder(&self) -> Option<FencingToken> {
        match self {
            JobState::Claimed { token } | JobState::Running { token } => Some(*token),
            _ => None,
        }
    }
}

/// Everything derived from a job's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    /// The job's state.
    pub state: JobState,
    /// The winning token of every claimed epoch.
    pub winners: BTreeMap<Epoch, FencingToken>,
    /// The accepted result (key and record), if the job succeeded or failed on attempts.
    pub accepted: Option<(FencingToken, ResultRec)>,
    /// Distinct epochs with a counted non-zero result.
    pub attempts_used: u32,
}

/// Does this result count (its writer was unfenced by everything it had seen)?
pub fn result_counts(epoch: Epoch, node: NodeId, rec: &ResultRec) -> bool {
    let token = FencingToken {
        epoch,
        hlc: rec.claim_hlc,
        node,
    };
    unfenced_by(&token, rec.seen.iter())
}

/// Does this checkpoint pass the same rule?
pub fn checkpoint_counts(epoch: Epoch, node: NodeId, rec: &CheckpointRec) -> bool {
    let token = FencingToken {
        epoch,
        hlc: rec.claim_hlc,
        node,
    };
    unfenced_by(&token, rec.seen.iter())
}

/// The job's state as a pure function of its records (see the module docs).
pub fn derive_state(view: &JobView) -> Derived {
    // A spec decoded from a peer's document is not re-validated: never trust it to hold
    // max_attempts >= 1 (0 would make every job "failed" before it ran).
    let max_attempts = view
        .spec
        .as_ref()
        .map_or(u32::MAX, |s| s.max_attempts.max(1));

    let mut winners: BTreeMap<Epoch, FencingToken> = BTreeMap::new();
    for (&(epoch, node), &hlc) in &view.claims {
        let t = FencingToken { epoch, hlc, node };
        winners
            .entry(epoch)
            .and_modify(|w| *w = (*w).min(t))
            .or_insert(t);
    }

    let mut best_success: Option<(FencingToken, &ResultRec)> = None;
    let mut best_failure: Option<(FencingToken, &ResultRec)> = None;
    let mut failed_epochs: BTreeSet<Epoch> = BTreeSet::new();
    for (&(epoch, node), rec) in &view.results {
        if !result_counts(epoch, node, rec) {
            continue;
        }
        let token = FencingToken {
            epoch,
            hlc: rec.claim_hlc,
            node,
        };
        let slot = if rec.outcome.success() {
            &mut best_success
        } else {
            failed_epochs.insert(epoch);
            &mut best_failure
        };
        if slot.as_ref().is_none_or(|(t, _)| token < *t) {
            *slot = Some((token, rec));
        }
    }
    let attempts_used = failed_epochs.len() as u32;
    // Both counts only grow with the record set, so a failure by either cap sticks.
    let (expired_epochs, expired_started) = {
        let (mut all, mut started) = (0u32, 0u32);
        let mut last = None;
        for &(epoch, _) in view.expiries.keys() {
            if last != Some(epoch) {
                all += 1;
                started += u32::from(view.is_started(epoch));
                last = Some(epoch);
            }
        }
        (all, started)
    };

    let (state, accepted) = if let Some((token, rec)) = best_success {
        (JobState::Succeeded { token }, Some((token, rec.clone())))
    } else if let Some((token, rec)) = best_failure.filter(|_| attempts_used >= max_attempts) {
        (
            JobState::Failed { token: Some(token) },
            Some((token, rec.clone())),
        )
    } else if expired_started >= max_attempts.saturating_add(MAX_TAKEOVERS)
        || expired_epochs >= MAX_EXPIRED_EPOCHS
    {
        (JobState::Failed { token: None }, None)
    } else if !view.cancels.is_empty() {
        (JobState::Cancelled, None)
    } else {
        let max_epoch = view.max_epoch();
        let state = if max_epoch == Epoch(0) {
            JobState::Queued { epoch: Epoch(1) }
        } else if view.is_expired(max_epoch) || failed_epochs.contains(&max_epoch) {
            JobState::Queued {
                epoch: max_epoch.next(),
            }
        } else {
            let token = winners[&max_epoch];
            if view.starts.contains_key(&(token.epoch, token.node)) {
                JobState::Running { token }
            } else {
                JobState::Claimed { token }
            }
        };
        (state, None)
    };
    Derived {
        state,
        winners,
        accepted,
        attempts_used,
    }
}

/// The checkpoint a new holder restores: among checkpoints that pass the counted rule, the
/// highest epoch, then the smallest writer token, then the highest sequence number.
pub fn restorable_checkpoint(view: &JobView) -> Option<(FencingToken, u64, &CheckpointRec)> {
    view.checkpoints
        .iter()
        .filter(|((epoch, node, _), rec)| checkpoint_counts(*epoch, *node, rec))
        .map(|(&(epoch, node, seq), rec)| {
            (
                FencingToken {
                    epoch,
                    hlc: rec.claim_hlc,
                    node,
                },
                seq,
                &**rec,
            )
        })
        .max_by(|a, b| {
            a.0.epoch
                .cmp(&b.0.epoch)
                .then_with(|| b.0.cmp(&a.0))
                .then_with(|| a.1.cmp(&b.1))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::Hlc;
    use crate::ids::{JobId, NodeId};
    use crate::view::Record;
    use std::sync::Arc;

    #[test]
    fn hostile_spec_with_zero_attempts_does_not_panic() {
        let mut spec = crate::spec::JobRequest {
            command: vec!["x".into()],
            ..Default::default()
        }
        .validate(JobId::default(), Hlc(1), NodeId::default())
        .unwrap();
        spec.max_attempts = 0;
        let mut view = JobView::default();
        view.insert(Record::Spec(Arc::new(spec)));
        assert_eq!(
            derive_state(&view).state,
            JobState::Queued { epoch: Epoch(1) }
        );
    }
}
