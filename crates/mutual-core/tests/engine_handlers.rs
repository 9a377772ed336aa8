//! Handler tests in the openraft manner: drive one engine through a scenario and assert the
//! exact commands it emits at each step (timeouts, cancel, a holder judged dead, a fenced
//! holder), so each engine rule has a direct, readable test.

mod common;

use common::finished;
use mutual_core::engine::{Command, Engine, EngineConfig, Event, StopReason, Timer};
use mutual_core::view::{ExpiryReason, Record};
use mutual_core::{Epoch, FencingToken, Hlc, JobId, JobRequest, JobState, NodeId};

const T0: u64 = 1_000_000_000;

fn cfg() -> EngineConfig {
    EngineConfig {
        settle_ms: 10,
        rank_step_ms: 2,
        slots: 2,
        ..EngineConfig::default()
    }
}

fn timers(cmds: &[Command]) -> Vec<(u64, Timer)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::SetTimer { at_ms, timer } if !matches!(timer, Timer::Sweep) => {
                Some((*at_ms, *timer))
            }
            _ => None,
        })
        .collect()
}

fn writes(cmds: &[Command]) -> Vec<&Record> {
    cmds.iter()
        .filter_map(|c| {
            if let Command::Write { record, .. } = c {
                Some(record)
            } else {
                None
            }
        })
        .collect()
}

/// Submits a job on a lone engine and runs its claim and settle timers: returns the engine,
/// the job, its token and the time.
fn started(req: JobRequest) -> (Engine, JobId, FencingToken, u64) {
    let me = NodeId::from_index(1);
    let mut e = Engine::new(me, cfg(), T0);
    let (job, cmds) = e.submit(T0, req).expect("submit");
    assert!(
        matches!(writes(&cmds)[..], [Record::Spec(_)]),
        "the spec is written first"
    );
    let (at, claim) = timers(&cmds)[0];
    assert_eq!(
        claim,
        Timer::Claim {
            job,
            epoch: Epoch(1)
        }
    );
    let cmds = e.handle(at, Event::Timer(claim)).expect("claim");
    assert!(matches!(
        writes(&cmds)[..],
        [Record::Claim {
            epoch: Epoch(1),
            ..
        }]
    ));
    let (at, settle) = timers(&cmds)[0];
    assert_eq!(
        settle,
        Timer::Settle {
            job,
            epoch: Epoch(1)
        }
    );
    let cmds = e.handle(at, Event::Timer(settle)).expect("settle");
    let token = cmds
        .iter()
        .find_map(|c| {
            if let Command::Start { token, .. } = c {
                Some(*token)
            } else {
                None
            }
        })
        .expect("a lone winner starts after the settle window");
    assert!(matches!(
        writes(&cmds)[..],
        [Record::Start {
            epoch: Epoch(1),
            ..
        }]
    ));
    assert_eq!(e.state(&job), Some(JobState::Running { token }));
    (e, job, token, at)
}

#[test]
fn timeout_stops_then_records_a_timed_out_failure_and_retries() {
    let req = JobRequest {
        command: vec!["sleep".into(), "99".into()],
        timeout_ms: Some(500),
        max_attempts: Some(2),
        ..Default::default()
    };
    let (mut e, job, token, at) = started(req);
    // The settle handler armed the timeout.
    let cmds = e
        .handle(at + 500, Event::Timer(Timer::Timeout { job, token }))
        .expect("timeout");
    assert!(
        matches!(
            cmds[..],
            [Command::Stop {
                reason: StopReason::Timeout,
                ..
            }]
        ),
        "{cmds:?}"
    );
    let cmds = e
        .handle(at + 501, finished(job, token, 137))
        .expect("finished");
    match writes(&cmds)[..] {
        [
            Record::Result { rec, .. },
            Record::Expiry { rec: x, .. },
            ..,
        ] => {
            assert!(rec.outcome.timed_out && !rec.outcome.success());
            assert_eq!(x.reason, ExpiryReason::Failed);
        }
        ref other => panic!("expected result + expiry, got {other:?}"),
    }
    // One attempt used, one left: queued for epoch 2 and a new claim armed.
    assert_eq!(e.state(&job), Some(JobState::Queued { epoch: Epoch(2) }));
    assert!(timers(&cmds).iter().any(|(_, t)| *t
        == Timer::Claim {
            job,
            epoch: Epoch(2)
        }));
}

#[test]
fn cancel_stops_the_execution_and_no_result_is_written() {
    let (mut e, job, token, at) = started(JobRequest {
        command: vec!["x".into()],
        ..Default::default()
    });
    let cmds = e.handle(at + 5, Event::Cancel { job }).expect("cancel");
    assert!(matches!(writes(&cmds)[..], [Record::Cancel { .. }]));
    assert!(cmds.iter().any(
        |c| matches!(c, Command::Stop { token: t, reason: StopReason::Terminal, .. } if *t == token)
    ));
    assert_eq!(e.state(&job), Some(JobState::Cancelled));
    let cmds = e
        .handle(at + 6, finished(job, token, 137))
        .expect("finished");
    assert!(
        writes(&cmds).is_empty(),
        "a stopped execution writes nothing: {cmds:?}"
    );
    // Cancelling again is not an error and writes nothing.
    let cmds = e
        .handle(at + 7, Event::Cancel { job })
        .expect("cancel again");
    assert!(writes(&cmds).is_empty());
    assert!(
        e.cancel(at + 8, JobId([1; 16])).is_err(),
        "unknown jobs are refused"
    );
}

#[test]
fn a_holder_judged_dead_by_this_node_has_its_epoch_expired() {
    let (holder, job, token, at) = started(JobRequest {
        command: vec!["x".into()],
        ..Default::default()
    });
    let mut observer = Engine::new(NodeId::from_index(2), cfg(), T0);
    let records: Vec<Record> = holder.view(&job).expect("view").records().collect();
    observer
        .handle(at, Event::Remote { job, records })
        .expect("replicate");
    assert_eq!(observer.state(&job), Some(JobState::Running { token }));
    // Someone else's judgement alone does not expire at once (the sweep does, later).
    let cmds = observer
        .handle(at + 1, Event::MemberDown(token.node))
        .expect("down");
    assert!(writes(&cmds).is_empty());
    let cmds = observer
        .handle(at + 2, Event::Suspect(token.node))
        .expect("suspect");
    assert!(
        matches!(writes(&cmds)[..], [Record::Expiry { epoch: Epoch(1), rec, .. }, ..] if rec.reason == ExpiryReason::HolderDead),
        "{cmds:?}"
    );
    assert_eq!(
        observer.state(&job),
        Some(JobState::Queued { epoch: Epoch(2) })
    );
}

#[test]
fn a_holder_that_learns_of_a_later_epoch_stops_at_once_and_writes_no_result() {
    let (mut holder, job, token, at) = started(JobRequest {
        command: vec!["x".into()],
        ..Default::default()
    });
    let other = NodeId::from_index(9);
    let later = vec![
        Record::Expiry {
            epoch: Epoch(1),
            observer: other,
            rec: mutual_core::view::ExpiryRec {
                hlc: Hlc::from_millis(at + 1),
                reason: ExpiryReason::HolderDead,
            },
        },
        Record::Claim {
            epoch: Epoch(2),
            node: other,
            hlc: Hlc::from_millis(at + 2),
        },
    ];
    let cmds = holder
        .handle(
            at + 3,
            Event::Remote {
                job,
                records: later,
            },
        )
        .expect("merge");
    assert!(
        cmds.iter().any(|c| matches!(c, Command::Stop { token: t, reason: StopReason::Fenced, .. } if *t == token)),
        "{cmds:?}"
    );
    let cmds = holder
        .handle(at + 4, finished(job, token, 0))
        .expect("finished");
    assert!(
        !writes(&cmds)
            .iter()
            .any(|r| matches!(r, Record::Result { .. })),
        "a fenced holder never writes a result: {cmds:?}"
    );
}

#[test]
fn a_timestamp_beyond_the_drift_bound_is_not_merged() {
    let mut e = Engine::new(
        NodeId::from_index(3),
        EngineConfig {
            max_drift_ms: 100,
            ..cfg()
        },
        T0,
    );
    let job = JobId([5; 16]);
    let far = Record::Claim {
        epoch: Epoch(1),
        node: NodeId::from_index(4),
        hlc: Hlc::from_millis(T0 + 10_000),
    };
    e.handle(
        T0,
        Event::Remote {
            job,
            records: vec![far.clone()],
        },
    )
    .expect("handle");
    assert!(e.view(&job).is_none_or(|v| !v.contains(&far)));
    assert_eq!(e.stats().clock_rejections, 1);
    // Once local time has caught up, the same record is accepted.
    e.handle(
        T0 + 9_950,
        Event::Remote {
            job,
            records: vec![far.clone()],
        },
    )
    .expect("handle");
    assert!(e.view(&job).is_some_and(|v| v.contains(&far)));
}

#[test]
fn a_freed_slot_resumes_a_taken_over_job_before_work_that_never_started() {
    use std::sync::Arc;
    // One slot, one claim armed per freed slot: the queue order alone decides.
    let one = EngineConfig {
        slots: 1,
        claim_window: 1,
        ..cfg()
    };
    let fresh = JobId([1; 16]);
    let resumed = JobId([2; 16]);
    let spec_of = |id: JobId, submitted_at: u64| {
        let mut s = common::spec_at(3, Hlc(submitted_at));
        s.id = id;
        Record::Spec(Arc::new(s))
    };
    let me = NodeId::from_index(2);
    let mut e = Engine::new(me, one, T0);
    // This node is busy with its own job.
    let (own, cmds) = e
        .submit(
            T0,
            JobRequest {
                command: vec!["x".into()],
                ..Default::default()
            },
        )
        .expect("submit");
    let (at, claim) = timers(&cmds)[0];
    let cmds = e.handle(at, Event::Timer(claim)).expect("claim");
    let (at, settle) = timers(&cmds)[0];
    let cmds = e.handle(at, Event::Timer(settle)).expect("settle");
    let own_token = cmds
        .iter()
        .find_map(|c| match c {
            Command::Start { token, .. } => Some(*token),
            _ => None,
        })
        .expect("own job starts");
    // A job that never started, submitted first...
    e.handle(
        at + 1,
        Event::Remote {
            job: fresh,
            records: vec![spec_of(fresh, 10)],
        },
    )
    .expect("fresh");
    // ... and a later one, running on node 1 until node 1 dies.
    let holder = NodeId::from_index(1);
    e.handle(
        at + 2,
        Event::Remote {
            job: resumed,
            records: vec![
                spec_of(resumed, 20),
                common::claim(1, holder, 30),
                common::start(1, holder, 31),
            ],
        },
    )
    .expect("resumed");
    e.handle(at + 3, Event::Suspect(holder)).expect("suspect");
    assert_eq!(
        e.state(&resumed),
        Some(JobState::Queued { epoch: Epoch(2) })
    );
    assert_eq!(e.state(&fresh), Some(JobState::Queued { epoch: Epoch(1) }));
    // The slot frees: the taken-over job is the one armed, though submitted later.
    let cmds = e
        .handle(at + 4, finished(own, own_token, 0))
        .expect("finished");
    let armed: Vec<JobId> = timers(&cmds)
        .into_iter()
        .filter_map(|(_, t)| match t {
            Timer::Claim { job, .. } => Some(job),
            _ => None,
        })
        .collect();
    assert_eq!(armed, vec![resumed], "{cmds:?}");
}

#[test]
fn the_settle_window_counts_from_the_claims_stamp_when_the_clock_runs_behind() {
    // A record stamped 200 ms ahead of this node's clock (a faster peer, within the drift
    // bound) pulls its HLC ahead. A better claim is one stamped earlier, and the settle
    // window is sized as stamp-to-arrival delays (`mutual_core::propagation`), so the
    // window must run from this node's stamp, not from its own clock.
    let mut e = Engine::new(NodeId::from_index(1), cfg(), T0);
    let ahead = Record::Claim {
        epoch: Epoch(1),
        node: NodeId::from_index(4),
        hlc: Hlc::from_millis(T0 + 200),
    };
    e.handle(
        T0,
        Event::Remote {
            job: JobId([9; 16]),
            records: vec![ahead],
        },
    )
    .expect("handle");
    let req = JobRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let (job, cmds) = e.submit(T0, req).expect("submit");
    let (at, claim) = timers(&cmds)[0];
    let cmds = e.handle(at, Event::Timer(claim)).expect("claim");
    let Some(Record::Claim { hlc, .. }) = writes(&cmds).first().copied() else {
        panic!("the claim is written");
    };
    assert!(hlc.as_millis() >= T0 + 200, "the HLC ran ahead: {hlc:?}");
    let (settle_at, settle) = timers(&cmds)[0];
    assert_eq!(
        settle,
        Timer::Settle {
            job,
            epoch: Epoch(1)
        }
    );
    assert_eq!(settle_at, hlc.as_millis() + cfg().settle_ms);
    assert!(
        settle_at >= at + 200 + cfg().settle_ms,
        "not the local clock's window"
    );
}

#[test]
fn with_the_claimants_listed_exactly_one_node_claims_at_once() {
    // Full replication: the driver lists the live nodes. Every node ranks itself exactly
    // among them, so one node is rank 0 and claims without delay, the next ranks wait a
    // step each, and only the first `claim_rank_cutoff` arm a claim at all.
    let nodes: Vec<NodeId> = (0..20).map(NodeId::from_index).collect();
    let mut sorted = nodes.clone();
    sorted.sort();
    let list: std::sync::Arc<[NodeId]> = std::sync::Arc::from(sorted);
    let mut submitter = Engine::new(nodes[0], cfg(), T0);
    submitter
        .handle(T0, Event::Claimants(list.clone()))
        .expect("claimants");
    let req = JobRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let (job, cmds) = submitter.submit(T0, req).expect("submit");
    let spec = writes(&cmds)[0].clone();
    let mut delays: Vec<u64> = timers(&cmds).iter().map(|(at, _)| at - T0).collect();
    for n in &nodes[1..] {
        let mut e = Engine::new(*n, cfg(), T0);
        e.handle(T0, Event::Claimants(list.clone()))
            .expect("claimants");
        let cmds = e
            .handle(
                T0,
                Event::Remote {
                    job,
                    records: vec![spec.clone()],
                },
            )
            .expect("remote");
        delays.extend(
            timers(&cmds)
                .iter()
                .filter(|(_, t)| matches!(t, Timer::Claim { .. }))
                .map(|(at, _)| at - T0),
        );
    }
    delays.sort_unstable();
    let step = cfg().rank_step_ms;
    let cutoff = cfg().claim_rank_cutoff;
    assert_eq!(delays, (0..cutoff).map(|r| r * step).collect::<Vec<u64>>());
}
