//! Every invariant checker can fail: for each one a hand-built violating input that makes
//! it return the right `Invariant`, and a passing input next to it. (A checker that cannot
//! fail would make every property test and simulation that calls it vacuous.)

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{JOB, cancel, checkpoint, claim, expiry, node, result, start, tok, view_of};
use mutual_core::derive::{Derived, JobState, derive_state, restorable_checkpoint};
use mutual_core::hlc::Hlc;
use mutual_core::invariants::{
    Invariant, Violation, check_clock_bound, check_convergence, check_fencing, check_holder_stops,
    check_monotone_tokens, check_no_lost_job, check_one_accepted_result, check_one_winner,
    check_replicas, check_terminal_transition,
};
use mutual_core::token::{Epoch, FencingToken};
use mutual_core::view::{ExpiryReason, JobView};

fn violated(r: Result<(), Violation>) -> Invariant {
    match r {
        Ok(()) => panic!("expected a violation, the checker passed"),
        Err(v) => {
            // The message names the invariant by number.
            assert!(
                v.to_string()
                    .starts_with(&format!("invariant {}", v.invariant.number())),
                "{v}"
            );
            v.invariant
        }
    }
}

/// A: claims (1, h=5) and B: (1, h=3); B wins epoch 1.
fn contested() -> (JobView, FencingToken, FencingToken) {
    let (a, b) = (node(1), node(2));
    let v = view_of(3, &[claim(1, a, 5), claim(1, b, 3)]);
    (v, tok(1, 5, a), tok(1, 3, b))
}

fn queued() -> JobState {
    JobState::Queued { epoch: Epoch(1) }
}

#[test]
fn invariant_numbers_match_the_docs() {
    let all = [
        Invariant::Convergence,
        Invariant::OneWinner,
        Invariant::Fencing,
        Invariant::MonotoneTokens,
        Invariant::NoLostJob,
        Invariant::TerminalSticks,
        Invariant::HolderStops,
        Invariant::BoundedClocks,
        Invariant::OneAcceptedResult,
    ];
    for (i, inv) in all.iter().enumerate() {
        assert_eq!(inv.number() as usize, i + 1);
    }
}

#[test]
fn convergence() {
    let (v, _, _) = contested();
    let d = derive_state(&v);
    let same = v.clone();
    // Pass: same records, same state; different records may differ.
    assert_eq!(check_convergence(&[(&v, &d), (&same, &d)]), Ok(()));
    let other = view_of(3, &[claim(1, node(1), 5)]);
    let od = derive_state(&other);
    assert_eq!(check_convergence(&[(&v, &d), (&other, &od)]), Ok(()));
    // Violation: same records, a replica reporting another state.
    let wrong = Derived {
        state: JobState::Cancelled,
        ..d.clone()
    };
    assert_eq!(
        violated(check_convergence(&[
            (&v, &d),
            (&other, &od),
            (&same, &wrong)
        ])),
        Invariant::Convergence
    );
}

#[test]
fn one_winner() {
    let (v, a, b) = contested();
    let d = derive_state(&v);
    assert_eq!(d.winners[&Epoch(1)], b);
    assert_eq!(check_one_winner(&[(&v, &d), (&v, &d)]), Ok(()));
    // Violation: a replica reports the larger claim as the winner.
    let mut wrong = d.clone();
    wrong.winners.insert(Epoch(1), a);
    assert_eq!(
        violated(check_one_winner(&[(&v, &d), (&v, &wrong)])),
        Invariant::OneWinner
    );
    // Violation: a replica reports no winner for a claimed epoch.
    let missing = Derived {
        winners: BTreeMap::new(),
        ..d
    };
    assert_eq!(
        violated(check_one_winner(&[(&v, &missing)])),
        Invariant::OneWinner
    );
}

#[test]
fn fencing() {
    let a = node(1);
    let ta = tok(1, 5, a);
    let v = view_of(
        3,
        &[
            claim(1, a, 5),
            checkpoint(1, a, 1, 5, "c1", 6, [ta]),
            result(1, a, 5, 0, 7, [ta]),
        ],
    );
    let d = derive_state(&v);
    assert_eq!(d.state, JobState::Succeeded { token: ta });
    // Pass: nothing fenced, or only other tokens.
    assert_eq!(check_fencing(&v, &d, &BTreeSet::new()), Ok(()));
    assert_eq!(
        check_fencing(&v, &d, &BTreeSet::from([(tok(1, 3, node(2)), None)])),
        Ok(())
    );
    // Pass: only an unrelated checkpoint of the same token was written fenced.
    assert_eq!(
        check_fencing(&v, &d, &BTreeSet::from([(ta, Some(9))])),
        Ok(())
    );
    // Violation: the accepted result was written after its holder knew it lost.
    assert_eq!(
        violated(check_fencing(&v, &d, &BTreeSet::from([(ta, None)]))),
        Invariant::Fencing
    );
    // Violation through the restorable checkpoint alone (no accepted result).
    let v = view_of(3, &[claim(1, a, 5), checkpoint(1, a, 1, 5, "c1", 6, [ta])]);
    let d = derive_state(&v);
    assert!(d.accepted.is_none());
    assert_eq!(
        violated(check_fencing(&v, &d, &BTreeSet::from([(ta, Some(1))]))),
        Invariant::Fencing
    );
}

/// A holder writes checkpoint 1 while it is the winner, then learns it lost (epoch 1
/// expired, epoch 2 claimed) and — its kill being late — writes checkpoint 2 with the
/// later claim in `seen`. Checkpoint 2 does not count; checkpoint 1 legitimately does, and
/// the next holder should restore it. Only checkpoint 2 is logged as a fenced write, and
/// fenced writes are matched per record, so the legitimate restore is not flagged.
#[test]
fn fencing_allows_checkpoints_written_before_the_fence() {
    let (a, b) = (node(1), node(2));
    let ta = tok(1, 5, a);
    let tb = tok(2, 20, b);
    let v = view_of(
        3,
        &[
            claim(1, a, 5),
            checkpoint(1, a, 1, 5, "before-fence", 6, [ta]),
            expiry(1, b, 19, ExpiryReason::HolderDead),
            claim(2, b, 20),
            checkpoint(1, a, 2, 5, "after-fence", 21, [ta, tb]),
        ],
    );
    let d = derive_state(&v);
    let (t, seq, rec) = restorable_checkpoint(&v).expect("checkpoint 1 counts");
    assert_eq!((t, seq, rec.blob.cid.as_str()), (ta, 1, "before-fence"));
    // Only checkpoint 2 was a fenced write; restoring checkpoint 1 violates nothing.
    assert_eq!(
        check_fencing(&v, &d, &BTreeSet::from([(ta, Some(2))])),
        Ok(())
    );
    assert_eq!(
        violated(check_fencing(&v, &d, &BTreeSet::from([(ta, Some(1))]))),
        Invariant::Fencing
    );
}

#[test]
fn monotone_tokens() {
    let (a, b) = (node(1), node(2));
    // Pass: consecutive epochs, each claim after the spec, each node's claims increasing.
    let good = view_of(
        3,
        &[
            claim(1, a, 5),
            claim(1, b, 6),
            expiry(1, b, 7, ExpiryReason::HolderDead),
            claim(2, b, 8),
            claim(2, a, 9),
        ],
    );
    assert_eq!(check_monotone_tokens(&good, &derive_state(&good)), Ok(()));

    // (An epoch gap — epoch 2 claimed, epoch 1 never — is legitimate on a partial replica
    // whose epoch-1 claim is still in transit; whether this checker or a full-merge-only
    // one reports it is being settled in src/, so it is not asserted here.)
    // Violation: a claim not after the spec (spec at HLC 0).
    let early = view_of(3, &[claim(1, a, 0)]);
    assert_eq!(
        violated(check_monotone_tokens(&early, &derive_state(&early))),
        Invariant::MonotoneTokens
    );
    // Violation: a node's later-epoch claim carries an older HLC.
    let back = view_of(3, &[claim(1, a, 10), claim(1, b, 11), claim(2, a, 9)]);
    assert_eq!(
        violated(check_monotone_tokens(&back, &derive_state(&back))),
        Invariant::MonotoneTokens
    );
    // Violation: winners that do not increase (hand-built Derived).
    let mut d = derive_state(&good);
    let w2 = d.winners[&Epoch(2)];
    d.winners.insert(Epoch(1), w2);
    d.winners.insert(
        Epoch(2),
        FencingToken {
            epoch: Epoch(1),
            ..w2
        },
    );
    assert_eq!(
        violated(check_monotone_tokens(&good, &d)),
        Invariant::MonotoneTokens
    );
}

#[test]
fn no_lost_job() {
    let t = tok(1, 5, node(1));
    for ok in [
        JobState::Succeeded { token: t },
        JobState::Failed { token: None },
        JobState::Failed { token: Some(t) },
        JobState::Cancelled,
    ] {
        assert_eq!(check_no_lost_job(JOB, &ok), Ok(()));
    }
    for lost in [
        queued(),
        JobState::Claimed { token: t },
        JobState::Running { token: t },
    ] {
        assert_eq!(
            violated(check_no_lost_job(JOB, &lost)),
            Invariant::NoLostJob
        );
    }
}

#[test]
fn terminal_transition() {
    let t = tok(1, 5, node(1));
    let s = JobState::Succeeded { token: t };
    let f = JobState::Failed { token: Some(t) };
    let c = JobState::Cancelled;
    let running = JobState::Running { token: t };
    // Pass: anything from a non-terminal state; staying; moving up the precedence.
    for (p, n) in [
        (queued(), running),
        (running, queued()),
        (running, c),
        (c, c),
        (c, f),
        (c, s),
        (f, s),
        (f, JobState::Failed { token: None }),
        (
            s,
            JobState::Succeeded {
                token: tok(1, 3, node(2)),
            },
        ),
    ] {
        assert_eq!(
            check_terminal_transition(JOB, &p, &n),
            Ok(()),
            "{p:?} -> {n:?}"
        );
    }
    // Violations: back to non-terminal, or down the precedence.
    for (p, n) in [
        (s, running),
        (f, queued()),
        (c, JobState::Claimed { token: t }),
        (s, f),
        (s, c),
        (f, c),
    ] {
        assert_eq!(
            violated(check_terminal_transition(JOB, &p, &n)),
            Invariant::TerminalSticks,
            "{p:?} -> {n:?}"
        );
    }
}

#[test]
fn holder_stops() {
    let (v, a, b) = contested();
    // Pass: the winner runs; nothing runs.
    assert_eq!(check_holder_stops(&v, [b]), Ok(()));
    assert_eq!(check_holder_stops(&v, []), Ok(()));
    // Violation: the loser of the epoch still runs.
    assert_eq!(
        violated(check_holder_stops(&v, [b, a])),
        Invariant::HolderStops
    );
    // Violation: the epoch was expired.
    let mut expired = v.clone();
    expired.insert(expiry(1, node(3), 9, ExpiryReason::HolderDead));
    assert_eq!(
        violated(check_holder_stops(&expired, [b])),
        Invariant::HolderStops
    );
    // Violation: a later epoch was claimed.
    let mut later = expired.clone();
    later.insert(claim(2, node(3), 10));
    assert_eq!(
        violated(check_holder_stops(&later, [b])),
        Invariant::HolderStops
    );
    // Violation: the job is terminal (cancelled).
    let mut cancelled = v.clone();
    cancelled.insert(cancel(node(3), 9));
    assert_eq!(
        violated(check_holder_stops(&cancelled, [b])),
        Invariant::HolderStops
    );
    // Still fine after the winner's own start record.
    let mut started = v.clone();
    started.insert(start(1, b.node, 6));
    assert_eq!(check_holder_stops(&started, [b]), Ok(()));
}

#[test]
fn clock_bound() {
    let local = 10_000;
    assert_eq!(
        check_clock_bound(JOB, Hlc::from_millis(local + 500), local, 500),
        Ok(())
    );
    assert_eq!(
        check_clock_bound(JOB, Hlc::from_millis(1), local, 500),
        Ok(())
    );
    assert_eq!(
        violated(check_clock_bound(
            JOB,
            Hlc::from_millis(local + 501),
            local,
            500
        )),
        Invariant::BoundedClocks
    );
}

#[test]
fn one_accepted_result() {
    let (a, b) = (node(1), node(2));
    let va = view_of(3, &[claim(1, a, 5), result(1, a, 5, 0, 6, [tok(1, 5, a)])]);
    let vb = view_of(3, &[claim(1, b, 3), result(1, b, 3, 0, 6, [tok(1, 3, b)])]);
    let da = derive_state(&va);
    let db = derive_state(&vb);
    let none = derive_state(&view_of(3, &[]));
    assert_eq!(check_one_accepted_result(JOB, &[]), Ok(()));
    assert_eq!(check_one_accepted_result(JOB, &[&da, &da.clone()]), Ok(()));
    assert_eq!(check_one_accepted_result(JOB, &[&none, &none]), Ok(()));
    assert_eq!(
        violated(check_one_accepted_result(JOB, &[&da, &da, &db])),
        Invariant::OneAcceptedResult
    );
    assert_eq!(
        violated(check_one_accepted_result(JOB, &[&da, &none])),
        Invariant::OneAcceptedResult
    );
}

#[test]
fn check_replicas_reports_what_its_parts_find() {
    let a = node(1);
    let good = view_of(3, &[claim(1, a, 5)]);
    assert_eq!(check_replicas(&[&good, &good], &BTreeSet::new()), Ok(()));
    let early = view_of(3, &[claim(1, a, 0)]);
    assert_eq!(
        violated(check_replicas(&[&good, &early], &BTreeSet::new())),
        Invariant::MonotoneTokens
    );
    // Two replicas with the same claims but a wrong cached winner cannot occur here:
    // check_replicas derives every state afresh, so it reports what the records imply.
    let (v, _, b) = contested();
    assert_eq!(derive_state(&v).winners[&Epoch(1)], b);
    assert_eq!(check_replicas(&[&v, &v.clone()], &BTreeSet::new()), Ok(()));
    let ta = tok(1, 5, a);
    let done = view_of(3, &[claim(1, a, 5), result(1, a, 5, 0, 6, [ta])]);
    assert_eq!(
        violated(check_replicas(&[&done], &BTreeSet::from([(ta, None)]))),
        Invariant::Fencing
    );
}
