//! The counterexample traces of `shared/protocol-model/REPORT.md`, replayed as record
//! sequences into a `JobView`, asserting the fixed rules. Most traces are replayed in every
//! arrival order: terminal states must stick whatever order a replica sees the records in,
//! and every order ends in the same state.
//!
//! HLCs are the model's time units, taken as raw HLC values; the spec is at HLC 0.

mod common;

use common::{
    cancel, checkpoint, claim, expiry, finished, node, result, start, tok, view_of, view_with_spec,
};
use mutual_core::derive::{JobState, derive_state, restorable_checkpoint, result_counts};
use mutual_core::engine::{Command, Engine, EngineConfig, Event, Timer};
use mutual_core::hlc::Hlc;
use mutual_core::invariants::{
    check_monotone_tokens, check_one_accepted_result, check_terminal_transition,
};
use mutual_core::spec::JobRequest;
use mutual_core::token::{Epoch, FencingToken};
use mutual_core::view::{ExpiryReason, JobView, Record};

/// All permutations of `0..n` (Heap's algorithm).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    fn heap(k: usize, a: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if k <= 1 {
            out.push(a.clone());
            return;
        }
        for i in 0..k - 1 {
            heap(k - 1, a, out);
            if k.is_multiple_of(2) {
                a.swap(i, k - 1);
            } else {
                a.swap(0, k - 1);
            }
        }
        heap(k - 1, a, out);
    }
    let mut out = Vec::new();
    heap(n, &mut (0..n).collect(), &mut out);
    out
}

/// Inserts `records` one by one (in the given order), checking terminal-sticks after each;
/// returns the successive states.
fn replay(max_attempts: u32, records: &[&Record]) -> Vec<JobState> {
    let mut view = view_with_spec(max_attempts);
    let mut states = vec![derive_state(&view).state];
    for r in records {
        view.insert((*r).clone());
        let next = derive_state(&view).state;
        let prev = states.last().expect("non-empty");
        if let Err(v) = check_terminal_transition(common::JOB, prev, &next) {
            panic!("{v}\n  order: {records:?}");
        }
        states.push(next);
    }
    states
}

/// Replays `records` in every order: terminal states stick in each, and all orders end in
/// `expected` with the same accepted result.
fn replay_all_orders(max_attempts: u32, records: &[Record], expected: JobState) {
    let full = view_of(max_attempts, records);
    let want = derive_state(&full);
    assert_eq!(want.state, expected);
    for perm in permutations(records.len()) {
        let order: Vec<&Record> = perm.iter().map(|&i| &records[i]).collect();
        let states = replay(max_attempts, &order);
        assert_eq!(states.last(), Some(&expected), "order {perm:?}");
    }
    // Same records, same accepted result, whatever the order (one replica per order is
    // enough to show it: the views are equal sets).
    let mut reversed = view_with_spec(max_attempts);
    for r in records.iter().rev() {
        reversed.insert(r.clone());
    }
    let other = derive_state(&reversed);
    assert_eq!(
        check_one_accepted_result(common::JOB, &[&want, &other]),
        Ok(())
    );
}

/// REPORT invariant 5 (no lost job): a success after a counted failure must be accepted.
/// As first written, `{claim(1,A), result(1,A,exit1), expiry(1,A), claim(2,B),
/// result(2,B,exit0)}` derived running(2,B) and the job ran again.
#[test]
fn success_after_a_failure_is_accepted() {
    let (a, b) = (node(1), node(2));
    let records = vec![
        claim(1, a, 10),
        result(1, a, 10, 1, 20, [tok(1, 10, a)]),
        expiry(1, a, 21, ExpiryReason::Failed),
        claim(2, b, 30),
        result(2, b, 30, 0, 40, [tok(2, 30, b)]),
    ];
    let succeeded = JobState::Succeeded {
        token: tok(2, 30, b),
    };
    replay_all_orders(3, &records, succeeded);
    let d = derive_state(&view_of(3, &records));
    assert_eq!(d.attempts_used, 1);
    assert_eq!(
        d.accepted.map(|(t, r)| (t, r.outcome.exit_code)),
        Some((tok(2, 30, b), 0))
    );
    // In arrival order the states are: queued, claimed, queued(2), queued(2), claimed(2),
    // succeeded — never running(2,B) after B's success.
    let order: Vec<&Record> = records.iter().collect();
    let names: Vec<&str> = replay(3, &order).iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        [
            "queued",
            "claimed",
            "queued",
            "queued",
            "claimed",
            "succeeded"
        ]
    );
    // Even with one attempt allowed, the failure of epoch 1 does not outrank the success.
    replay_all_orders(1, &records, succeeded);
}

/// REPORT 6(a), partition at claim time: n2 claims (h=8001) and succeeds seeing only its own
/// claim; n0's smaller claim (h=1) and its failure arrive later. The job stays succeeded.
#[test]
fn partition_at_claim_time_stays_terminal() {
    let (n0, n2) = (node(0), node(2));
    let records = vec![
        claim(1, n2, 8001),
        result(1, n2, 8001, 0, 8010, [tok(1, 8001, n2)]),
        claim(1, n0, 1),
        result(1, n0, 1, 1, 8020, [tok(1, 1, n0)]),
    ];
    let order: Vec<&Record> = records.iter().collect();
    let states = replay(3, &order);
    assert_eq!(states[2].name(), "succeeded");
    let expected = JobState::Succeeded {
        token: tok(1, 8001, n2),
    };
    assert_eq!(states[4], expected, "reverted to {:?}", states[4]);
    replay_all_orders(3, &records, expected);
    // Both results count (each writer saw only itself): one counted failure used.
    let d = derive_state(&view_of(3, &records));
    assert_eq!(d.attempts_used, 1);
    // The winner of epoch 1 is n0 all the same; the accepted result is n2's success.
    assert_eq!(d.winners[&Epoch(1)], tok(1, 1, n0));
}

/// REPORT 6(b), no faults: claim(1,n1), cancel ⇒ cancelled; then n1's failure, written
/// before it saw the cancel, arrives. As first written the job went back to running and
/// the cancel was ignored for good.
#[test]
fn cancel_racing_a_result_stays_terminal() {
    let (n0, n1) = (node(0), node(1));
    let records = vec![
        claim(1, n1, 10),
        cancel(n0, 20),
        result(1, n1, 10, 1, 15, [tok(1, 10, n1)]),
        expiry(1, n1, 16, ExpiryReason::Failed),
    ];
    let order: Vec<&Record> = records.iter().collect();
    let states = replay(3, &order);
    assert_eq!(states[2], JobState::Cancelled);
    assert!(
        states[2..].iter().all(|s| *s == JobState::Cancelled),
        "{states:?}"
    );
    replay_all_orders(3, &records, JobState::Cancelled);
    // With a single attempt the failure uses it up: cancelled may become failed (up the
    // precedence), never running.
    let failed = JobState::Failed {
        token: Some(tok(1, 10, n1)),
    };
    replay_all_orders(1, &records, failed);
}

/// REPORT 6(c), slow network under the "highest epoch" reading: result(1,exit0) ⇒ S; n0
/// missed it, expired epoch 1, and ran epoch 2, which failed. The job stays succeeded.
#[test]
fn failure_of_a_later_epoch_does_not_undo_a_success() {
    let (n0, n1) = (node(0), node(1));
    let records = vec![
        claim(1, n1, 10),
        start(1, n1, 11),
        result(1, n1, 10, 0, 30, [tok(1, 10, n1)]),
        expiry(1, n0, 25, ExpiryReason::HolderDead),
        claim(2, n0, 26),
        result(2, n0, 26, 1, 40, [tok(2, 26, n0)]),
        expiry(2, n0, 41, ExpiryReason::Failed),
    ];
    let order: Vec<&Record> = records.iter().collect();
    let states = replay(3, &order);
    let expected = JobState::Succeeded {
        token: tok(1, 10, n1),
    };
    assert_eq!(states[3], expected);
    assert_eq!(states.last(), Some(&expected));
    replay_all_orders(3, &records, expected);
}

/// REPORT "what remains (inherent)": the accepted execution changes when a smaller counted
/// success arrives late. n2's claim (h=1) took longer than W to reach n0, which claimed at
/// h=22017 and succeeded; then n2's success arrives. Both count; the smaller token wins on
/// every replica once merged, and the change is succeeded → succeeded (allowed).
#[test]
fn a_late_smaller_success_takes_over_the_accepted_result() {
    let (n0, n2) = (node(0), node(2));
    let records = vec![
        claim(1, n2, 1),
        claim(1, n0, 22017),
        result(1, n0, 22017, 0, 22030, [tok(1, 22017, n0)]),
        result(1, n2, 1, 0, 22040, [tok(1, 1, n2)]),
    ];
    let mut view = view_with_spec(3);
    let mut accepted = Vec::new();
    for r in &records {
        view.insert(r.clone());
        accepted.push(derive_state(&view).accepted.map(|(t, _)| t));
    }
    assert_eq!(accepted[2], Some(tok(1, 22017, n0)));
    assert_eq!(accepted[3], Some(tok(1, 1, n2)));
    replay_all_orders(
        3,
        &records,
        JobState::Succeeded {
            token: tok(1, 1, n2),
        },
    );
    // Cancelled and failed may likewise become succeeded when a concurrent success
    // surfaces (documented as "final unless a concurrent success surfaces").
    let mut with_cancel = records.clone();
    with_cancel.insert(2, cancel(node(3), 22020));
    replay_all_orders(
        3,
        &with_cancel,
        JobState::Succeeded {
            token: tok(1, 1, n2),
        },
    );
}

/// REPORT invariant 4: n1 claims epoch 2 (h=38001) and epoch 3 (h=58003), then dies; n2
/// never saw n1's epoch-2 claim and claims epoch 2 at h=79001. The winners' HLCs drop, but
/// fencing is by epoch first: n2's token is below the epoch-3 token, so once n1's claims
/// surface n2 is fenced and its result cannot count.
#[test]
fn fencing_is_by_epoch_not_by_hlc() {
    let (n0, n1, n2) = (node(0), node(1), node(2));
    let t_e3 = tok(3, 58003, n1);
    let t_n2 = tok(2, 79001, n2);
    assert!(t_e3 > t_n2, "a later epoch outranks a larger HLC");
    assert!(t_e3.hlc < t_n2.hlc);

    // n2's partial replica: epoch 1, its expiry, and n2's own epoch-2 claim. It wins.
    let partial = view_of(
        3,
        &[
            claim(1, n0, 1000),
            expiry(1, n2, 30000, ExpiryReason::HolderDead),
            claim(2, n2, 79001),
        ],
    );
    assert!(!partial.fences(&t_n2));
    assert_eq!(
        derive_state(&partial).state,
        JobState::Claimed { token: t_n2 }
    );

    // n1's claims surface (its disk survived): n2 lost epoch 2 and epoch 3 is open.
    let mut full = partial.clone();
    for r in [
        claim(2, n1, 38001),
        expiry(2, n0, 50000, ExpiryReason::HolderDead),
        claim(3, n1, 58003),
    ] {
        full.insert(r);
    }
    assert!(full.fences(&t_n2));
    let d = derive_state(&full);
    assert_eq!(d.winners[&Epoch(2)], tok(2, 38001, n1));
    assert_eq!(d.state, JobState::Claimed { token: t_e3 });
    assert_eq!(check_monotone_tokens(&full, &d), Ok(()));
    // n2 finishes with what it has now seen: its success does not count.
    let late = result(2, n2, 79001, 0, 80000, full.claims_from(Epoch(2)));
    let Record::Result {
        epoch,
        node: w,
        rec,
    } = &late
    else {
        unreachable!()
    };
    assert!(!result_counts(*epoch, *w, rec));
    full.insert(late);
    assert_eq!(derive_state(&full).state, JobState::Claimed { token: t_e3 });
}

/// REPORT 7: n0 expires epoch 1 and claims epoch 2 (h=34001); n1, whose kill is late,
/// still writes checkpoint seq 5 with that claim in `seen`. It must never be restored; the
/// last checkpoint n1 wrote as the winner is.
#[test]
fn fenced_checkpoint_is_not_restorable() {
    let (n0, n1) = (node(0), node(1));
    let own = tok(1, 1, n1);
    let e2 = tok(2, 34001, n0);
    let mut records = vec![claim(1, n1, 1)];
    for seq in 1..=4 {
        records.push(checkpoint(
            1,
            n1,
            seq,
            1,
            &format!("ck{seq}"),
            1000 * seq,
            [own],
        ));
    }
    records.push(expiry(1, n0, 34000, ExpiryReason::HolderDead));
    records.push(claim(2, n0, 34001));
    records.push(checkpoint(1, n1, 5, 1, "ck5-fenced", 38000, [own, e2]));
    let view = view_of(3, &records);
    let (t, seq, rec) = restorable_checkpoint(&view).expect("seq 4 counts");
    assert_eq!((t, seq, rec.blob.cid.as_str()), (own, 4, "ck4"));

    // Without the earlier checkpoints there is nothing to restore at all.
    let only_fenced = view_of(
        3,
        &[
            claim(1, n1, 1),
            expiry(1, n0, 34000, ExpiryReason::HolderDead),
            claim(2, n0, 34001),
            checkpoint(1, n1, 5, 1, "ck5-fenced", 38000, [own, e2]),
        ],
    );
    assert!(restorable_checkpoint(&only_fenced).is_none());

    // In whatever order a replica receives the records, it never restores seq 5.
    let tail = &records[4..];
    for perm in permutations(tail.len()) {
        let mut v = view_of(3, &records[..4]);
        for &i in &perm {
            v.insert(tail[i].clone());
            let (_, seq, _) = restorable_checkpoint(&v).expect("some checkpoint counts");
            assert_ne!(seq, 5, "restored the fenced checkpoint, order {perm:?}");
        }
    }

    // A later epoch's own checkpoint outranks epoch 1's.
    let mut v = view.clone();
    v.insert(checkpoint(2, n0, 1, 34001, "e2-ck1", 40000, [e2]));
    let (t, seq, _) = restorable_checkpoint(&v).expect("counts");
    assert_eq!((t, seq), (e2, 1));
}

/// REPORT invariant 1 caveat: if one key ever holds two results, the outcome must not
/// depend on arrival order. The view keeps the smaller value under a key.
#[test]
fn two_results_under_one_key_converge() {
    let a = node(1);
    let ok = result(1, a, 10, 0, 20, [tok(1, 10, a)]);
    let bad = result(1, a, 10, 1, 20, [tok(1, 10, a)]);
    let mut x = view_of(3, &[claim(1, a, 10), ok.clone(), bad.clone()]);
    let y = view_of(3, &[claim(1, a, 10), bad, ok]);
    assert_eq!(x, y);
    assert_eq!(derive_state(&x), derive_state(&y));
    assert_eq!(x.merge(&y), 0);
}

// ---------------------------------------------------------------------------------------
// Engine-level regressions (the engine fixes of the REPORT)
// ---------------------------------------------------------------------------------------

fn request() -> JobRequest {
    JobRequest {
        command: vec!["true".into()],
        ..Default::default()
    }
}

fn timer_of(cmds: &[Command], want: fn(&Timer) -> bool) -> Option<(u64, Timer)> {
    cmds.iter().find_map(|c| match c {
        Command::SetTimer { at_ms, timer } if want(timer) => Some((*at_ms, *timer)),
        _ => None,
    })
}

fn writes(cmds: &[Command]) -> Vec<&Record> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Write { record, .. } => Some(record),
            _ => None,
        })
        .collect()
}

/// Runs one engine from submission to a started execution of epoch 1.
fn started_engine() -> (Engine, mutual_core::ids::JobId, FencingToken) {
    let mut e = Engine::new(node(1), EngineConfig::default(), 0);
    let (job, cmds) = e.submit(0, request()).expect("valid");
    let (at, t) = timer_of(&cmds, |t| matches!(t, Timer::Claim { .. })).expect("claim timer");
    let cmds = e.handle(at, Event::Timer(t)).expect("claim");
    let (at, t) = timer_of(&cmds, |t| matches!(t, Timer::Settle { .. })).expect("settle timer");
    let cmds = e.handle(at, Event::Timer(t)).expect("settle");
    let token = cmds
        .iter()
        .find_map(|c| match c {
            Command::Start { token, .. } => Some(*token),
            _ => None,
        })
        .expect("started");
    (e, job, token)
}

/// REPORT 7 at the engine: once the holder sees a later epoch's claim it stops, and
/// neither a checkpoint taken nor the execution's end after that writes anything.
#[test]
fn engine_writes_nothing_after_it_is_fenced() {
    let (mut e, job, t1) = started_engine();
    let n0 = node(0);
    let cmds = e
        .handle(
            37,
            Event::Remote {
                job,
                records: vec![
                    expiry(1, n0, Hlc::from_millis(34).0, ExpiryReason::HolderDead),
                    claim(2, n0, Hlc::from_millis(34).0 + 1),
                ],
            },
        )
        .expect("remote");
    assert!(
        cmds.iter()
            .any(|c| matches!(c, Command::Stop { token, .. } if *token == t1))
    );
    let cmds = e
        .handle(
            38,
            Event::CheckpointTaken {
                job,
                token: t1,
                blob: common::blob("late"),
            },
        )
        .expect("checkpoint");
    assert!(writes(&cmds).is_empty(), "{:?}", writes(&cmds));
    let cmds = e.handle(40, finished(job, t1, 0)).expect("finished");
    assert!(
        !writes(&cmds)
            .iter()
            .any(|r| matches!(r, Record::Result { .. } | Record::Checkpoint { .. })),
        "{:?}",
        writes(&cmds)
    );
    let view = e.view(&job).expect("known");
    assert!(view.results.is_empty() && view.checkpoints.is_empty());
}

/// REPORT "ambiguities": a holder exiting non-zero writes its result and an expiry; the
/// job is queued for the next epoch with one attempt used.
#[test]
fn engine_nonzero_exit_writes_result_and_expiry() {
    let (mut e, job, t1) = started_engine();
    let cmds = e.handle(50, finished(job, t1, 3)).expect("finished");
    let w = writes(&cmds);
    assert!(
        w.iter()
            .any(|r| matches!(r, Record::Result { rec, .. } if rec.outcome.exit_code == 3))
    );
    assert!(w.iter().any(|r| matches!(
        r,
        Record::Expiry { rec, .. } if rec.reason == ExpiryReason::Failed
    )));
    let view = e.view(&job).expect("known");
    assert_eq!(derive_state(view).attempts_used, 1);
    assert_eq!(e.state(&job), Some(JobState::Queued { epoch: Epoch(2) }));
}

/// REPORT "engine fixes": a restarted node with its full replica stays passive (claims and
/// expires nothing) until it has caught up, and a finished job stays finished.
#[test]
fn engine_restart_is_passive_until_caught_up() {
    let (e, job, t1) = started_engine();
    let mut views: Vec<JobView> = e.into_views().collect();
    assert_eq!(views.len(), 1);
    let (restarted, cmds) = Engine::restart(node(1), EngineConfig::default(), views.clone(), 100);
    let mut restarted = restarted;
    assert!(restarted.is_passive());
    assert!(
        writes(&cmds).is_empty(),
        "a passive node wrote {:?}",
        writes(&cmds)
    );
    assert!(timer_of(&cmds, |t| matches!(t, Timer::Claim { .. })).is_none());
    // The view says we run epoch 1, but the execution died with the old process: once
    // caught up, the node gives the epoch up instead of leaving it held forever.
    assert_eq!(restarted.state(&job), Some(JobState::Running { token: t1 }));
    assert!(
        restarted.clock() > t1.hlc,
        "the clock moved past our own records"
    );
    let cmds = restarted.handle(110, Event::CaughtUp).expect("caught up");
    assert!(!restarted.is_passive());
    assert!(writes(&cmds).iter().any(|r| matches!(
        r,
        Record::Expiry { epoch: Epoch(1), rec, .. } if rec.reason == ExpiryReason::GaveUp
    )));
    assert_eq!(
        restarted.state(&job),
        Some(JobState::Queued { epoch: Epoch(2) })
    );

    // A succeeded job restarts succeeded and nothing runs again.
    let t = t1;
    views[0].insert(result(1, t.node, t.hlc.0, 0, t.hlc.0 + 100, [t]));
    let (mut again, cmds) = Engine::restart(node(1), EngineConfig::default(), views, 200);
    assert_eq!(again.state(&job), Some(JobState::Succeeded { token: t }));
    let cmds2 = again.handle(210, Event::CaughtUp).expect("caught up");
    for c in cmds.iter().chain(cmds2.iter()) {
        assert!(
            !matches!(c, Command::Start { .. } | Command::Write { .. }),
            "{c:?}"
        );
    }
}
