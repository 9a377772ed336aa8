//! Model-based test of `derive_state` on one job: random operation sequences are applied
//! both to a `JobView` and to a deliberately plain reference model (vectors of tuples and
//! linear scans re-implementing the rules of `design.md` §2 / `derive.rs`). After every
//! operation the derived state, accepted token, attempts used and restorable checkpoint
//! must agree, and the invariant checkers must pass where the protocol says they hold.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{node, spec};
use mutual_core::derive::{
    Derived, JobState, MAX_EXPIRED_EPOCHS, MAX_TAKEOVERS, derive_state, restorable_checkpoint,
};
use mutual_core::hlc::Hlc;
use mutual_core::ids::NodeId;
use mutual_core::invariants::{
    FencedWrites, check_convergence, check_fencing, check_holder_stops, check_monotone_tokens,
    check_one_winner, check_terminal_transition,
};
use mutual_core::token::{Epoch, FencingToken};
use mutual_core::view::{
    CheckpointRec, ExecMetrics, ExpiryReason, ExpiryRec, JobView, Outcome, Record, ResultRec,
};
use proptest::collection::vec;
use proptest::prelude::*;

const NODES: u8 = 5;

/// A token as the model sees it: `(epoch, hlc, node)`, compared lexicographically.
type T = (u32, u64, NodeId);

fn to_t(t: &FencingToken) -> T {
    (t.epoch.0, t.hlc.0, t.node)
}

fn to_token(t: T) -> FencingToken {
    FencingToken {
        epoch: Epoch(t.0),
        hlc: Hlc(t.1),
        node: t.2,
    }
}

/// The reference model: the records as plain tuples.
#[derive(Debug, Default, Clone)]
struct Model {
    max_attempts: u32,
    /// (epoch, hlc, node)
    claims: Vec<T>,
    /// (epoch, node)
    starts: Vec<(u32, NodeId)>,
    /// (epoch, observer)
    expiries: Vec<(u32, NodeId)>,
    /// (writer token, success, seen)
    results: Vec<(T, bool, Vec<T>)>,
    /// (writer token, seq, seen)
    checkpoints: Vec<(T, u64, Vec<T>)>,
    cancels: Vec<NodeId>,
}

/// A write counts iff nothing in its `seen` is of a later epoch, and nothing of its own
/// epoch is smaller than the writer's token.
fn model_counts(writer: T, seen: &[T]) -> bool {
    for s in seen {
        if s.0 > writer.0 {
            return false;
        }
        if s.0 == writer.0 && *s < writer {
            return false;
        }
    }
    true
}

#[derive(Debug, PartialEq, Eq)]
struct Expected {
    state: JobState,
    accepted: Option<FencingToken>,
    attempts_used: u32,
    restorable: Option<(FencingToken, u64)>,
}

impl Model {
    fn max_epoch(&self) -> u32 {
        let mut m = 0;
        for c in &self.claims {
            if c.0 > m {
                m = c.0;
            }
        }
        m
    }

    fn winner(&self, epoch: u32) -> Option<T> {
        let mut best: Option<T> = None;
        for c in &self.claims {
            if c.0 == epoch && best.is_none_or(|b| *c < b) {
                best = Some(*c);
            }
        }
        best
    }

    fn is_expired(&self, epoch: u32) -> bool {
        self.expiries.iter().any(|(e, _)| *e == epoch)
    }

    fn expected(&self) -> Expected {
        let mut best_success: Option<T> = None;
        let mut best_failure: Option<T> = None;
        let mut failed_epochs: Vec<u32> = Vec::new();
        for (w, success, seen) in &self.results {
            if !model_counts(*w, seen) {
                continue;
            }
            if *success {
                if best_success.is_none_or(|b| *w < b) {
                    best_success = Some(*w);
                }
            } else {
                if !failed_epochs.contains(&w.0) {
                    failed_epochs.push(w.0);
                }
                if best_failure.is_none_or(|b| *w < b) {
                    best_failure = Some(*w);
                }
            }
        }
        let mut expired_epochs: Vec<u32> = Vec::new();
        for (e, _) in &self.expiries {
            if !expired_epochs.contains(e) {
                expired_epochs.push(*e);
            }
        }
        let expired_started = expired_epochs
            .iter()
            .filter(|e| self.starts.iter().any(|(s, _)| s == *e))
            .count() as u32;
        let attempts_used = failed_epochs.len() as u32;

        let mut accepted = None;
        let state = if let Some(s) = best_success {
            accepted = Some(to_token(s));
            JobState::Succeeded { token: to_token(s) }
        } else if attempts_used >= self.max_attempts {
            accepted = best_failure.map(to_token);
            JobState::Failed {
                token: best_failure.map(to_token),
            }
        } else if expired_started >= self.max_attempts + MAX_TAKEOVERS
            || expired_epochs.len() as u32 >= MAX_EXPIRED_EPOCHS
        {
            JobState::Failed { token: None }
        } else if !self.cancels.is_empty() {
            JobState::Cancelled
        } else {
            let max = self.max_epoch();
            if max == 0 {
                JobState::Queued { epoch: Epoch(1) }
            } else if self.is_expired(max) || failed_epochs.contains(&max) {
                JobState::Queued {
                    epoch: Epoch(max + 1),
                }
            } else {
                let w = self.winner(max).expect("max epoch has a claim");
                if self.starts.contains(&(w.0, w.2)) {
                    JobState::Running { token: to_token(w) }
                } else {
                    JobState::Claimed { token: to_token(w) }
                }
            }
        };

        // Restorable checkpoint: counted, then highest epoch, smallest token, highest seq.
        let mut restorable: Option<(T, u64)> = None;
        for (w, seq, seen) in &self.checkpoints {
            if !model_counts(*w, seen) {
                continue;
            }
            let better = match restorable {
                None => true,
                Some((bw, bseq)) => {
                    w.0 > bw.0 || (w.0 == bw.0 && (*w < bw || (*w == bw && *seq > bseq)))
                }
            };
            if better {
                restorable = Some((*w, *seq));
            }
        }
        Expected {
            state,
            accepted,
            attempts_used,
            restorable: restorable.map(|(w, s)| (to_token(w), s)),
        }
    }

    /// Whether a holder of `t` may still be running by the rules of invariant 7: the winner
    /// of the highest epoch, that epoch not expired, the job not terminal.
    fn may_run(&self, t: T, terminal: bool) -> bool {
        !terminal && t.0 == self.max_epoch() && self.winner(t.0) == Some(t) && !self.is_expired(t.0)
    }
}

/// One operation, with raw random numbers interpreted against the current state so that
/// claims respect the protocol (epochs consecutive, each node's claims increasing in HLC).
#[derive(Debug, Clone)]
enum Op {
    /// Claim the highest epoch (a concurrent claim) or the next one. `late` makes the claim
    /// carry an older HLC (a claim delayed by a partition), never below the node's own
    /// previous claim.
    Claim {
        next: bool,
        node: u8,
        late: u8,
    },
    Start {
        pick: u8,
    },
    Expire {
        pick: u8,
        observer: u8,
        reason: u8,
    },
    Result {
        pick: u8,
        exit: i32,
        timed_out: bool,
        mask: u16,
        extra: u8,
        forged: bool,
    },
    Cancel {
        node: u8,
    },
    Checkpoint {
        pick: u8,
        seq: u8,
        mask: u16,
        extra: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (any::<bool>(), 0..NODES, prop_oneof![3 => Just(0u8), 1 => any::<u8>()])
            .prop_map(|(next, node, late)| Op::Claim { next, node, late }),
        3 => any::<u8>().prop_map(|pick| Op::Start { pick }),
        3 => (any::<u8>(), 0..NODES, 0u8..3)
            .prop_map(|(pick, observer, reason)| Op::Expire { pick, observer, reason }),
        5 => (
            any::<u8>(),
            prop_oneof![3 => Just(0i32), 3 => Just(1i32), 1 => any::<i32>()],
            prop_oneof![5 => Just(false), 1 => Just(true)],
            any::<u16>(),
            0u8..6,
            prop_oneof![9 => Just(false), 1 => Just(true)],
        )
            .prop_map(|(pick, exit, timed_out, mask, extra, forged)| Op::Result {
                pick, exit, timed_out, mask, extra, forged,
            }),
        1 => (0..NODES).prop_map(|node| Op::Cancel { node }),
        3 => (any::<u8>(), 0u8..4, any::<u16>(), 0u8..6)
            .prop_map(|(pick, seq, mask, extra)| Op::Checkpoint { pick, seq, mask, extra }),
    ]
}

/// The system under test and the model, side by side.
struct Harness {
    model: Model,
    view: JobView,
    /// Every record inserted, in order (to rebuild the view in another order).
    log: Vec<Record>,
    /// Next fresh HLC (strictly increasing; the spec is at 0).
    clock: u64,
    /// Tokens with a write that does not count, and with one that does.
    uncounted_writes: FencedWrites,
    counted_writes: FencedWrites,
}

impl Harness {
    fn new(max_attempts: u32) -> Harness {
        let mut view = JobView::default();
        let spec = Record::Spec(Arc::new(spec(max_attempts)));
        view.insert(spec.clone());
        Harness {
            model: Model {
                max_attempts,
                ..Model::default()
            },
            view,
            log: vec![spec],
            clock: 0,
            uncounted_writes: BTreeSet::new(),
            counted_writes: BTreeSet::new(),
        }
    }

    fn fresh(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn insert(&mut self, r: Record) {
        assert!(
            !self.view.contains(&r),
            "generated a duplicate record {r:?}"
        );
        self.view.insert(r.clone());
        self.log.push(r);
    }

    /// `seen` for a write by `writer`: a subset (by `mask`) of the claims of its epoch and
    /// later, plus, by `extra`: its own token, a fabricated later-epoch claim (the writer
    /// saw a claim this replica never got), or a fabricated smaller claim of its epoch.
    fn seen(&mut self, writer: T, mask: u16, extra: u8) -> Vec<T> {
        let mut from: Vec<T> = self
            .model
            .claims
            .iter()
            .copied()
            .filter(|c| c.0 >= writer.0)
            .collect();
        from.sort();
        let mut seen: Vec<T> = from
            .into_iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << (i % 16)) != 0)
            .map(|(_, c)| c)
            .collect();
        match extra {
            1 => seen.push(writer),
            2 => {
                let h = self.fresh();
                seen.push((writer.0 + 1, h, node(9)));
            }
            3 if writer.1 > 0 => seen.push((writer.0, writer.1 - 1, node(9))),
            _ => {}
        }
        seen.sort();
        seen.dedup();
        seen
    }

    fn apply(&mut self, op: &Op) {
        let n = |i: u8| node(u64::from(i));
        match *op {
            Op::Claim {
                next,
                node: i,
                late,
            } => {
                let max = self.model.max_epoch();
                let epoch = if max == 0 || next { max + 1 } else { max };
                let who = n(i);
                if self.model.claims.iter().any(|c| c.0 == epoch && c.2 == who) {
                    return;
                }
                let now = self.fresh();
                let own_last = self
                    .model
                    .claims
                    .iter()
                    .filter(|c| c.2 == who)
                    .map(|c| c.1)
                    .max()
                    .unwrap_or(0);
                let hlc = now.saturating_sub(u64::from(late)).max(own_last + 1);
                self.model.claims.push((epoch, hlc, who));
                self.insert(Record::Claim {
                    epoch: Epoch(epoch),
                    node: who,
                    hlc: Hlc(hlc),
                });
            }
            Op::Start { pick } => {
                if self.model.claims.is_empty() {
                    return;
                }
                let c = self.model.claims[pick as usize % self.model.claims.len()];
                if self.model.starts.contains(&(c.0, c.2)) {
                    return;
                }
                let hlc = self.fresh();
                self.model.starts.push((c.0, c.2));
                self.insert(Record::Start {
                    epoch: Epoch(c.0),
                    node: c.2,
                    hlc: Hlc(hlc),
                });
            }
            Op::Expire {
                pick,
                observer,
                reason,
            } => {
                let max = self.model.max_epoch();
                if max == 0 {
                    return;
                }
                // Mostly the current epoch; sometimes an older one.
                let epoch = if pick % 4 == 0 {
                    1 + u32::from(pick) % max
                } else {
                    max
                };
                let who = n(observer);
                if self.model.expiries.contains(&(epoch, who)) {
                    return;
                }
                let hlc = self.fresh();
                self.model.expiries.push((epoch, who));
                let reason = [
                    ExpiryReason::Failed,
                    ExpiryReason::HolderDead,
                    ExpiryReason::GaveUp,
                ][reason as usize];
                self.insert(Record::Expiry {
                    epoch: Epoch(epoch),
                    observer: who,
                    rec: ExpiryRec {
                        hlc: Hlc(hlc),
                        reason,
                    },
                });
            }
            Op::Result {
                pick,
                exit,
                timed_out,
                mask,
                extra,
                forged,
            } => {
                let writer = if forged || self.model.claims.is_empty() {
                    // A writer whose claim this replica never received.
                    let epoch = 1 + u32::from(pick) % (self.model.max_epoch() + 1);
                    (epoch, self.fresh(), n(pick % NODES))
                } else {
                    self.model.claims[pick as usize % self.model.claims.len()]
                };
                if self
                    .model
                    .results
                    .iter()
                    .any(|(w, _, _)| w.0 == writer.0 && w.2 == writer.2)
                {
                    return;
                }
                let seen = self.seen(writer, mask, extra);
                let outcome = Outcome {
                    exit_code: exit,
                    timed_out,
                };
                let counts = model_counts(writer, &seen);
                if counts {
                    self.counted_writes.insert((to_token(writer), None));
                } else {
                    self.uncounted_writes.insert((to_token(writer), None));
                }
                self.model
                    .results
                    .push((writer, exit == 0 && !timed_out, seen.clone()));
                let hlc = self.fresh();
                self.insert(Record::Result {
                    epoch: Epoch(writer.0),
                    node: writer.2,
                    rec: Arc::new(ResultRec {
                        claim_hlc: Hlc(writer.1),
                        outcome,
                        outputs: None,
                        logs: None,
                        metrics: ExecMetrics::default(),
                        hlc: Hlc(hlc),
                        seen: seen.into_iter().map(to_token).collect(),
                    }),
                });
            }
            Op::Cancel { node: i } => {
                let who = n(i);
                if self.model.cancels.contains(&who) {
                    return;
                }
                let hlc = self.fresh();
                self.model.cancels.push(who);
                self.insert(Record::Cancel {
                    node: who,
                    hlc: Hlc(hlc),
                });
            }
            Op::Checkpoint {
                pick,
                seq,
                mask,
                extra,
            } => {
                if self.model.claims.is_empty() {
                    return;
                }
                let writer = self.model.claims[pick as usize % self.model.claims.len()];
                let seq = u64::from(seq);
                if self
                    .model
                    .checkpoints
                    .iter()
                    .any(|(w, s, _)| w.0 == writer.0 && w.2 == writer.2 && *s == seq)
                {
                    return;
                }
                let seen = self.seen(writer, mask, extra);
                if model_counts(writer, &seen) {
                    self.counted_writes.insert((to_token(writer), Some(seq)));
                } else {
                    self.uncounted_writes.insert((to_token(writer), Some(seq)));
                }
                self.model.checkpoints.push((writer, seq, seen.clone()));
                let hlc = self.fresh();
                self.insert(Record::Checkpoint {
                    epoch: Epoch(writer.0),
                    node: writer.2,
                    seq,
                    rec: Arc::new(CheckpointRec {
                        claim_hlc: Hlc(writer.1),
                        blob: common::blob(&format!("ckpt-{}-{seq}", writer.1)),
                        hlc: Hlc(hlc),
                        seen: seen.into_iter().map(to_token).collect(),
                    }),
                });
            }
        }
    }

    /// Compares the implementation with the model and runs the checkers.
    fn check(&self, prev: &JobState) -> Result<Derived, TestCaseError> {
        let derived = derive_state(&self.view);
        let expected = self.model.expected();
        prop_assert_eq!(
            derived.state,
            expected.state,
            "state differs from the model"
        );
        prop_assert_eq!(
            derived.accepted.as_ref().map(|(t, _)| *t),
            expected.accepted,
            "accepted token differs from the model"
        );
        prop_assert_eq!(derived.attempts_used, expected.attempts_used);
        prop_assert_eq!(
            restorable_checkpoint(&self.view).map(|(t, seq, _)| (t, seq)),
            expected.restorable,
            "restorable checkpoint differs from the model"
        );
        // The accepted record is the one stored under the accepted token.
        if let Some((t, rec)) = &derived.accepted {
            let stored = self
                .view
                .results
                .get(&(t.epoch, t.node))
                .expect("accepted is stored");
            prop_assert_eq!(&**stored, rec);
            prop_assert_eq!(rec.claim_hlc, t.hlc);
        }
        // Winners: the smallest claim of each epoch.
        for (e, w) in &derived.winners {
            prop_assert_eq!(Some(to_t(w)), self.model.winner(e.0));
        }

        // Invariant checkers that must hold for protocol-respecting claims.
        let pair = [(&self.view, &derived)];
        prop_assert_eq!(check_one_winner(&pair), Ok(()));
        prop_assert_eq!(check_monotone_tokens(&self.view, &derived), Ok(()));
        // Convergence: the same records inserted in reverse order derive the same state.
        let mut reversed = JobView::default();
        for r in self.log.iter().rev() {
            reversed.insert(r.clone());
        }
        prop_assert_eq!(&reversed, &self.view);
        let rederived = derive_state(&reversed);
        prop_assert_eq!(
            check_convergence(&[(&self.view, &derived), (&reversed, &rederived)]),
            Ok(())
        );
        // Fencing: a record that does not count is never accepted nor restored.
        let fenced: FencedWrites = self
            .uncounted_writes
            .difference(&self.counted_writes)
            .copied()
            .collect();
        prop_assert_eq!(check_fencing(&self.view, &derived, &fenced), Ok(()));
        // Terminal states stick.
        prop_assert_eq!(
            check_terminal_transition(common::JOB, prev, &derived.state),
            Ok(())
        );
        // Holder stops: exactly the current holder may keep running.
        let terminal = derived.state.is_terminal();
        for c in &self.model.claims {
            let ok = check_holder_stops(&self.view, [to_token(*c)]).is_ok();
            prop_assert_eq!(
                ok,
                self.model.may_run(*c, terminal),
                "holder-stops for {:?}",
                c
            );
        }
        if let Some(h) = derived.state.holder() {
            prop_assert!(check_holder_stops(&self.view, [h]).is_ok());
        }
        Ok(derived)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn derive_state_matches_model(max_attempts in 1u32..=4, ops in vec(op(), 1..60)) {
        let mut h = Harness::new(max_attempts);
        let mut prev = h.check(&JobState::Queued { epoch: Epoch(1) })?.state;
        prop_assert_eq!(prev, JobState::Queued { epoch: Epoch(1) });
        for op in &ops {
            h.apply(op);
            prev = h.check(&prev)?.state;
        }
    }
}

/// Claims `epochs` epochs one after another, each expired by node 0, starting the claim
/// first when `start` is true; checks every step against the model. Returns the state
/// before the last expiry and after it.
fn expire_chain(max_attempts: u32, epochs: u32, start: bool) -> (Harness, JobState, JobState) {
    let mut h = Harness::new(max_attempts);
    let mut prev = h
        .check(&JobState::Queued { epoch: Epoch(1) })
        .expect("initial")
        .state;
    let mut before_last = prev;
    for e in 1..=epochs {
        h.apply(&Op::Claim {
            next: true,
            node: (e % u32::from(NODES)) as u8,
            late: 0,
        });
        prev = h.check(&prev).expect("after claim").state;
        assert!(!prev.is_terminal(), "terminal after {e} claims: {prev:?}");
        if start {
            // One claim per epoch: claim e is at index e - 1.
            h.apply(&Op::Start {
                pick: (e - 1) as u8,
            });
            prev = h.check(&prev).expect("after start").state;
        }
        before_last = prev;
        h.apply(&Op::Expire {
            pick: 1,
            observer: 0,
            reason: 1,
        });
        prev = h.check(&prev).expect("after expiry").state;
    }
    (h, before_last, prev)
}

/// Long chains of takeovers reach the takeover cap: `max_attempts + MAX_TAKEOVERS` expired
/// epochs that had started fail the job (with no accepted result), one fewer does not.
#[test]
fn takeover_cap_fails_the_job() {
    for max_attempts in [1u32, 3] {
        let cap = max_attempts + MAX_TAKEOVERS;
        let (_, _, state) = expire_chain(max_attempts, cap - 1, true);
        assert_eq!(state, JobState::Queued { epoch: Epoch(cap) });
        let (h, _, state) = expire_chain(max_attempts, cap, true);
        assert_eq!(state, JobState::Failed { token: None });
        assert_eq!(derive_state(&h.view).accepted, None);
    }
}

/// Epochs expired before their claimant started (it died, or was judged dead, within its
/// settle window) say nothing against the job: they do not count towards
/// `MAX_TAKEOVERS`, only towards the far larger `MAX_EXPIRED_EPOCHS`.
#[test]
fn epochs_expired_before_a_start_fail_the_job_only_at_the_epoch_bound() {
    let (_, _, state) = expire_chain(3, 3 + MAX_TAKEOVERS, false);
    assert_eq!(
        state,
        JobState::Queued {
            epoch: Epoch(4 + MAX_TAKEOVERS)
        }
    );
    let (h, before, state) = expire_chain(3, MAX_EXPIRED_EPOCHS, false);
    assert!(!before.is_terminal(), "{before:?}");
    assert_eq!(state, JobState::Failed { token: None });
    assert_eq!(derive_state(&h.view).accepted, None);
}

/// A worked example through the model: two counted failures and a success.
#[test]
fn model_worked_example() {
    let mut h = Harness::new(3);
    let mut prev = JobState::Queued { epoch: Epoch(1) };
    let steps: Vec<(Op, &str)> = vec![
        (
            Op::Claim {
                next: true,
                node: 1,
                late: 0,
            },
            "claimed",
        ),
        (Op::Start { pick: 0 }, "running"),
        (
            Op::Result {
                pick: 0,
                exit: 1,
                timed_out: false,
                mask: u16::MAX,
                extra: 0,
                forged: false,
            },
            "queued",
        ),
        (
            Op::Claim {
                next: true,
                node: 2,
                late: 0,
            },
            "claimed",
        ),
        (
            Op::Result {
                pick: 1,
                exit: 0,
                timed_out: true,
                mask: u16::MAX,
                extra: 0,
                forged: false,
            },
            "queued",
        ),
        (
            Op::Claim {
                next: true,
                node: 3,
                late: 0,
            },
            "claimed",
        ),
        (Op::Cancel { node: 4 }, "cancelled"),
        (
            Op::Result {
                pick: 2,
                exit: 0,
                timed_out: false,
                mask: u16::MAX,
                extra: 0,
                forged: false,
            },
            "succeeded",
        ),
    ];
    for (op, name) in steps {
        h.apply(&op);
        let d = h.check(&prev).expect("model agrees");
        assert_eq!(d.state.name(), name, "after {op:?}");
        prev = d.state;
    }
    let d = derive_state(&h.view);
    assert_eq!(d.attempts_used, 2);
    assert_eq!(d.accepted.map(|(t, _)| t.epoch), Some(Epoch(3)));
}
