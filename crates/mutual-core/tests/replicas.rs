//! Multi-replica property tests of one job.
//!
//! 1. `JobView` replicas (3–7) that act on their own view — claim, start, finish, expire
//!    the holder, cancel, checkpoint, claim concurrently — and exchange random subsets of
//!    each other's records in random (causal) order. After every merge the replica checkers
//!    run; after a final full merge all replicas are equal and accept the same result.
//! 2. The same on real automerge `JobDoc`s: merging documents in any order decodes to the
//!    union of the records written.
//! 3. Real `Engine`s (3–5 nodes) with an in-test message queue: random delivery delays and
//!    drops, timers, executions that finish with random outcomes, false suspicions and
//!    cancels. Holders must stop as soon as their view fences them; after a full exchange the
//!    job is terminal on every node.
//!
//! Partial merges deliver causally closed sets of records, as automerge does: a record is
//! applied only with every record its writer held when writing it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use common::{Rng, node, spec_at};
use mutual_core::derive::{Derived, JobState, checkpoint_counts, derive_state, result_counts};
use mutual_core::doc::JobDoc;
use mutual_core::engine::{Command, Engine, EngineConfig, EngineError, Event, Timer};
use mutual_core::hlc::{Hlc, HlcClock};
use mutual_core::ids::{JobId, NodeId};
use mutual_core::invariants::{
    check_clock_bound, check_holder_stops, check_no_lost_job, check_one_accepted_result,
    check_replicas, check_terminal_transition,
};
use mutual_core::spec::JobRequest;
use mutual_core::token::{Epoch, FencingToken};
use mutual_core::view::{
    CheckpointRec, ExecMetrics, ExpiryReason, ExpiryRec, JobView, Outcome, Record, ResultRec,
};
use proptest::collection::vec;
use proptest::prelude::*;

const DRIFT_MS: u64 = 500;
const SPEC_MS: u64 = 1_000;

// ---------------------------------------------------------------------------------------
// A world of view replicas
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Act {
    Claim,
    Start,
    Finish,
    ExpireHolder,
    Cancel,
    Checkpoint,
}

#[derive(Debug, Clone)]
enum Op {
    /// Replica `r` acts on its own view. `rogue`: a fenced holder writes its result anyway
    /// (a delayed kill); the `seen` rule must keep it from counting.
    Act {
        r: u8,
        act: Act,
        exit: i32,
        rogue: bool,
    },
    /// Every replica in `mask` claims its queued epoch before anyone merges.
    ConcurrentClaim { mask: u8 },
    /// `to` receives a random causally-closed subset of `from`'s records (all of them if
    /// `all`), in a random causal order.
    Merge {
        from: u8,
        to: u8,
        seed: u64,
        all: bool,
    },
    /// Physical time passes.
    Tick(u8),
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        16 => Just(Act::Claim),
        12 => Just(Act::Start),
        16 => Just(Act::Finish),
        7 => Just(Act::ExpireHolder),
        1 => Just(Act::Cancel),
        8 => Just(Act::Checkpoint),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (any::<u8>(), act(), prop_oneof![Just(0), Just(0), Just(1), Just(2)], prop_oneof![6 => Just(false), 1 => Just(true)])
            .prop_map(|(r, act, exit, rogue)| Op::Act { r, act, exit, rogue }),
        1 => any::<u8>().prop_map(|mask| Op::ConcurrentClaim { mask }),
        6 => (any::<u8>(), any::<u8>(), any::<u64>(), prop_oneof![3 => Just(false), 1 => Just(true)])
            .prop_map(|(from, to, seed, all)| Op::Merge { from, to, seed, all }),
        2 => (1u8..20).prop_map(Op::Tick),
    ]
}

struct Written {
    record: Record,
    /// Indices of the records its writer held when writing it (its causal past).
    deps: Vec<usize>,
}

struct Replica {
    me: NodeId,
    view: JobView,
    known: BTreeSet<usize>,
    clock: HlcClock,
    skew: u64,
    prev: JobState,
    ckpt_seq: u64,
    /// The replica's automerge document, in the document variant.
    doc: Option<JobDoc>,
}

struct World {
    replicas: Vec<Replica>,
    log: Vec<Written>,
    now: u64,
    /// Tokens of results written by holders whose own view already fenced them.
    rogue: BTreeSet<FencingToken>,
}

impl World {
    fn new(n: usize, max_attempts: u32, skews: &[u64], with_docs: bool) -> World {
        let spec = spec_at(max_attempts, Hlc::from_millis(SPEC_MS));
        let spec_rec = Record::Spec(Arc::new(spec.clone()));
        let saved = with_docs.then(|| JobDoc::create(&spec, node(0)).expect("create").save());
        let replicas = (0..n)
            .map(|i| {
                let mut view = JobView::default();
                view.insert(spec_rec.clone());
                let mut clock = HlcClock::new(DRIFT_MS);
                let skew = skews[i % skews.len()];
                clock
                    .observe(spec.submitted_at, SPEC_MS + skew)
                    .expect("spec within the bound");
                let doc = saved.as_ref().map(|bytes| {
                    let doc = JobDoc::load(bytes, node(i as u64)).expect("load");
                    assert_eq!(doc.view().expect("decode"), view);
                    doc
                });
                Replica {
                    me: node(i as u64),
                    view,
                    known: BTreeSet::from([0]),
                    clock,
                    skew,
                    prev: JobState::Queued { epoch: Epoch(1) },
                    ckpt_seq: 0,
                    doc,
                }
            })
            .collect();
        World {
            replicas,
            log: vec![Written {
                record: spec_rec,
                deps: Vec::new(),
            }],
            now: SPEC_MS + 1,
            rogue: BTreeSet::new(),
        }
    }

    fn stamp(&mut self, r: usize) -> Hlc {
        let rep = &mut self.replicas[r];
        rep.clock.now(self.now + rep.skew)
    }

    fn write(&mut self, r: usize, record: Record) -> Result<(), TestCaseError> {
        let rep = &mut self.replicas[r];
        prop_assert!(!rep.view.contains(&record), "rewrote {record:?}");
        let idx = self.log.len();
        self.log.push(Written {
            record: record.clone(),
            deps: rep.known.iter().copied().collect(),
        });
        rep.view.insert(record.clone());
        rep.known.insert(idx);
        if let Some(doc) = rep.doc.as_mut() {
            doc.write(&record).expect("doc write");
        }
        self.after_change(r)
    }

    /// Terminal-sticks for one replica, after any change to its view.
    fn after_change(&mut self, r: usize) -> Result<(), TestCaseError> {
        let rep = &mut self.replicas[r];
        let state = derive_state(&rep.view).state;
        prop_assert_eq!(
            check_terminal_transition(common::JOB, &rep.prev, &state),
            Ok(()),
            "replica {}",
            r
        );
        rep.prev = state;
        Ok(())
    }

    fn act(&mut self, r: usize, act: Act, exit: i32, rogue: bool) -> Result<(), TestCaseError> {
        let me = self.replicas[r].me;
        let view = &self.replicas[r].view;
        let state = derive_state(view).state;
        match act {
            Act::Claim => {
                if let JobState::Queued { epoch } = state
                    && !view.claims.contains_key(&(epoch, me))
                {
                    let hlc = self.stamp(r);
                    self.write(
                        r,
                        Record::Claim {
                            epoch,
                            node: me,
                            hlc,
                        },
                    )?;
                }
            }
            Act::Start => {
                if let JobState::Claimed { token } = state
                    && token.node == me
                {
                    let hlc = self.stamp(r);
                    self.write(
                        r,
                        Record::Start {
                            epoch: token.epoch,
                            node: me,
                            hlc,
                        },
                    )?;
                }
            }
            Act::Finish => {
                // The latest epoch this replica started and has not finished.
                let Some(epoch) = view
                    .starts
                    .keys()
                    .filter(|(e, n)| *n == me && !view.results.contains_key(&(*e, me)))
                    .map(|(e, _)| *e)
                    .max()
                else {
                    return Ok(());
                };
                let token = view
                    .token_of(epoch, me)
                    .expect("started epochs are claimed");
                let fenced = view.fences(&token);
                let stopped = fenced || view.is_expired(epoch) || state.is_terminal();
                if stopped && !(rogue && fenced) {
                    return Ok(());
                }
                let seen = view.claims_from(epoch);
                let rec = ResultRec {
                    claim_hlc: token.hlc,
                    outcome: Outcome {
                        exit_code: exit,
                        timed_out: false,
                    },
                    outputs: Some(common::blob(&format!("out-{r}-{}", epoch.0))),
                    logs: None,
                    metrics: ExecMetrics::default(),
                    hlc: self.stamp(r),
                    seen,
                };
                let counts = result_counts(epoch, me, &rec);
                prop_assert_eq!(
                    counts,
                    !fenced,
                    "a result counts iff its writer was unfenced"
                );
                if fenced {
                    self.rogue.insert(token);
                }
                self.write(
                    r,
                    Record::Result {
                        epoch,
                        node: me,
                        rec: Arc::new(rec),
                    },
                )?;
                if exit != 0 && !fenced {
                    let hlc = self.stamp(r);
                    self.write(
                        r,
                        Record::Expiry {
                            epoch,
                            observer: me,
                            rec: ExpiryRec {
                                hlc,
                                reason: ExpiryReason::Failed,
                            },
                        },
                    )?;
                }
            }
            Act::ExpireHolder => {
                if let Some(token) = state.holder()
                    && !view.expiries.contains_key(&(token.epoch, me))
                {
                    let hlc = self.stamp(r);
                    let reason = if token.node == me {
                        ExpiryReason::GaveUp
                    } else {
                        ExpiryReason::HolderDead
                    };
                    self.write(
                        r,
                        Record::Expiry {
                            epoch: token.epoch,
                            observer: me,
                            rec: ExpiryRec { hlc, reason },
                        },
                    )?;
                }
            }
            Act::Cancel => {
                if !state.is_terminal() && !view.cancels.contains_key(&me) {
                    let hlc = self.stamp(r);
                    self.write(r, Record::Cancel { node: me, hlc })?;
                }
            }
            Act::Checkpoint => {
                if let JobState::Running { token } = state
                    && token.node == me
                {
                    let seen = view.claims_from(token.epoch);
                    let rep = &mut self.replicas[r];
                    rep.ckpt_seq += 1;
                    let seq = rep.ckpt_seq;
                    let rec = CheckpointRec {
                        claim_hlc: token.hlc,
                        blob: common::blob(&format!("ckpt-{r}-{seq}")),
                        hlc: self.stamp(r),
                        seen,
                    };
                    prop_assert!(checkpoint_counts(token.epoch, me, &rec));
                    self.write(
                        r,
                        Record::Checkpoint {
                            epoch: token.epoch,
                            node: me,
                            seq,
                            rec: Arc::new(rec),
                        },
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Delivers records `idx` (a causally closed set, in causal order) to replica `to`.
    fn deliver(&mut self, to: usize, order: &[usize]) -> Result<(), TestCaseError> {
        for &i in order {
            let rep = &mut self.replicas[to];
            prop_assert!(
                self.log[i].deps.iter().all(|d| rep.known.contains(d)),
                "delivery out of causal order"
            );
            let record = self.log[i].record.clone();
            prop_assert!(
                rep.clock.observe(record.hlc(), self.now + rep.skew).is_ok(),
                "a record within the skew was refused"
            );
            rep.view.insert(record);
            rep.known.insert(i);
            self.after_change(to)?;
        }
        Ok(())
    }

    /// A random causally-closed subset of `from`'s records that `to` lacks, in a random
    /// causal order.
    fn partial(&self, from: usize, to: usize, rng: &mut Rng, all: bool) -> Vec<usize> {
        let have = &self.replicas[to].known;
        let missing: Vec<usize> = self.replicas[from]
            .known
            .iter()
            .copied()
            .filter(|i| !have.contains(i))
            .collect();
        let mut chosen: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<usize> = missing.into_iter().filter(|_| all || rng.pct(50)).collect();
        while let Some(i) = stack.pop() {
            if have.contains(&i) || !chosen.insert(i) {
                continue;
            }
            stack.extend(self.log[i].deps.iter().copied());
        }
        // Random linear extension of the causal order.
        let mut order = Vec::with_capacity(chosen.len());
        let mut placed: BTreeSet<usize> = BTreeSet::new();
        while placed.len() < chosen.len() {
            let ready: Vec<usize> = chosen
                .iter()
                .copied()
                .filter(|i| {
                    !placed.contains(i)
                        && self.log[*i]
                            .deps
                            .iter()
                            .all(|d| have.contains(d) || placed.contains(d))
                })
                .collect();
            let pick = ready[rng.below(ready.len() as u64) as usize];
            placed.insert(pick);
            order.push(pick);
        }
        order
    }

    fn views(&self) -> Vec<&JobView> {
        self.replicas.iter().map(|r| &r.view).collect()
    }

    /// The replica checkers, plus: no rogue (fenced) result ever counts or is accepted.
    fn check_all(&self) -> Result<Vec<Derived>, TestCaseError> {
        let views = self.views();
        prop_assert_eq!(check_replicas(&views, &BTreeSet::new()), Ok(()));
        let derived: Vec<Derived> = views.iter().map(|v| derive_state(v)).collect();
        for d in &derived {
            if let Some((t, _)) = &d.accepted {
                prop_assert!(
                    !self.rogue.contains(t),
                    "a fenced result was accepted: {t:?}"
                );
            }
        }
        for v in &views {
            for (&(e, n), rec) in &v.results {
                let t = FencingToken {
                    epoch: e,
                    hlc: rec.claim_hlc,
                    node: n,
                };
                if self.rogue.contains(&t) {
                    prop_assert!(!result_counts(e, n, rec));
                }
            }
        }
        Ok(derived)
    }

    fn full_merge(&mut self) -> Result<(), TestCaseError> {
        let all: Vec<usize> = (0..self.log.len()).collect();
        for to in 0..self.replicas.len() {
            let missing: Vec<usize> = all
                .iter()
                .copied()
                .filter(|i| !self.replicas[to].known.contains(i))
                .collect();
            // Index order is a causal order: a record's past was written before it.
            self.deliver(to, &missing)?;
        }
        Ok(())
    }

    fn run(&mut self, ops: &[Op], rng: &mut Rng) -> Result<(), TestCaseError> {
        let n = self.replicas.len();
        for op in ops {
            match *op {
                Op::Act {
                    r,
                    act,
                    exit,
                    rogue,
                } => {
                    self.act(r as usize % n, act, exit, rogue)?;
                }
                Op::ConcurrentClaim { mask } => {
                    for r in (0..n).filter(|r| mask & (1 << r) != 0) {
                        self.act(r, Act::Claim, 0, false)?;
                    }
                }
                Op::Merge {
                    from,
                    to,
                    seed,
                    all,
                } => {
                    let (from, to) = (from as usize % n, to as usize % n);
                    if from == to {
                        continue;
                    }
                    let mut local = Rng::new(seed ^ rng.next_u64());
                    let order = self.partial(from, to, &mut local, all);
                    self.deliver(to, &order)?;
                    self.check_all()?;
                }
                Op::Tick(ms) => self.now += u64::from(ms),
            }
            self.now += 1;
        }
        self.full_merge()?;
        let derived = self.check_all()?;
        let first = &self.replicas[0].view;
        prop_assert_eq!(first.len(), self.log.len(), "the full merge lost records");
        for rep in &self.replicas[1..] {
            prop_assert_eq!(&rep.view, first, "replicas differ after the full merge");
        }
        let refs: Vec<&Derived> = derived.iter().collect();
        prop_assert_eq!(check_one_accepted_result(common::JOB, &refs), Ok(()));
        no_epoch_gap(first)?;
        Ok(())
    }
}

/// On the union of all records, the claimed epochs are exactly 1..=max: a replica claims
/// epoch e + 1 only after seeing epoch e claimed and closed.
fn no_epoch_gap(view: &JobView) -> Result<(), TestCaseError> {
    let epochs: BTreeSet<Epoch> = view.claims.keys().map(|(e, _)| *e).collect();
    let expected: BTreeSet<Epoch> = (1..=view.max_epoch().0).map(Epoch).collect();
    prop_assert_eq!(
        epochs,
        expected,
        "claimed epochs have a gap after the full merge"
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn view_replicas_keep_the_invariants(
        n in 3usize..=7,
        max_attempts in 1u32..=3,
        skews in vec(0u64..30, 1..4),
        seed in any::<u64>(),
        ops in vec(op(), 20..200),
    ) {
        let mut world = World::new(n, max_attempts, &skews, false);
        let mut rng = Rng::new(seed);
        world.run(&ops, &mut rng)?;
    }
}

// ---------------------------------------------------------------------------------------
// The same on automerge documents
// ---------------------------------------------------------------------------------------

proptest! {
    // Every write is an automerge change and every merge decodes whole documents.
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Replicas write their records into their own `JobDoc`; documents merged pairwise in
    /// random order always decode to the union of the two replicas' records, and after
    /// everyone has merged everyone (in a random order) all documents decode to the union
    /// of everything written, equal to the view-level result.
    #[test]
    fn doc_merges_in_any_order_decode_to_the_union(
        n in 3usize..=4,
        max_attempts in 1u32..=3,
        seed in any::<u64>(),
        ops in vec(op(), 10..50),
    ) {
        let mut world = World::new(n, max_attempts, &[0, 7, 13], true);
        let mut rng = Rng::new(seed);
        for op in &ops {
            match *op {
                Op::Act { r, act, exit, rogue } => world.act(r as usize % n, act, exit, rogue)?,
                Op::ConcurrentClaim { mask } => {
                    for r in (0..n).filter(|r| mask & (1 << r) != 0) {
                        world.act(r, Act::Claim, 0, false)?;
                    }
                }
                Op::Merge { from, to, .. } => {
                    let (from, to) = (from as usize % n, to as usize % n);
                    if from != to {
                        merge_docs(&mut world, from, to)?;
                        world.check_all()?;
                    }
                }
                Op::Tick(ms) => world.now += u64::from(ms),
            }
            world.now += 1;
        }
        // Everyone merges everyone, in a random order, until all have all records.
        let mut pairs: Vec<(usize, usize)> =
            (0..n).flat_map(|a| (0..n).map(move |b| (a, b))).filter(|(a, b)| a != b).collect();
        rng.shuffle(&mut pairs);
        for (from, to) in pairs.iter().chain(pairs.iter()) {
            merge_docs(&mut world, *from, *to)?;
        }
        let union: JobView = {
            let mut v = JobView::default();
            for w in &world.log {
                v.insert(w.record.clone());
            }
            v
        };
        for rep in &mut world.replicas {
            let doc = rep.doc.as_mut().expect("doc variant");
            prop_assert_eq!(&doc.view().expect("decode"), &union);
            // And the saved form loads to the same.
            let bytes = doc.save();
            prop_assert_eq!(&JobDoc::load(&bytes, rep.me).expect("load").view().expect("decode"), &union);
        }
        let derived = world.check_all()?;
        let refs: Vec<&Derived> = derived.iter().collect();
        prop_assert_eq!(check_one_accepted_result(common::JOB, &refs), Ok(()));
        no_epoch_gap(&union)?;
    }
}

/// `to` merges `from`'s whole document; its decoded view must be the union of both
/// replicas' views (tracked in the views alongside).
fn merge_docs(world: &mut World, from: usize, to: usize) -> Result<(), TestCaseError> {
    let mut other = world.replicas[from].doc.clone().expect("doc variant");
    let mut expected = world.replicas[to].view.clone();
    expected.merge(&world.replicas[from].view);
    let rep = &mut world.replicas[to];
    rep.doc
        .as_mut()
        .expect("doc variant")
        .merge(&mut other)
        .expect("merge");
    let decoded = rep
        .doc
        .as_ref()
        .expect("doc variant")
        .view()
        .expect("decode");
    prop_assert_eq!(&decoded, &expected, "merged document is not the union");
    // Keep the view and the causal bookkeeping in step with the document.
    let from_known = world.replicas[from].known.clone();
    let rep = &mut world.replicas[to];
    for r in decoded.records() {
        rep.clock
            .observe(r.hlc(), world.now + rep.skew)
            .expect("within the bound");
    }
    rep.view = decoded;
    rep.known.extend(from_known);
    world.after_change(to)
}

/// Two replicas that (through a bug or a hostile peer) write different values under the
/// same key converge on the smaller one, whatever the merge direction.
#[test]
fn concurrent_values_under_one_key_converge() {
    let spec = spec_at(3, Hlc::from_millis(SPEC_MS));
    let bytes = JobDoc::create(&spec, node(0)).expect("create").save();
    let mut a = JobDoc::load(&bytes, node(1)).expect("load");
    let mut b = JobDoc::load(&bytes, node(2)).expect("load");
    let who = node(5);
    let big = Record::Claim {
        epoch: Epoch(1),
        node: who,
        hlc: Hlc::from_millis(SPEC_MS + 20),
    };
    let small = Record::Claim {
        epoch: Epoch(1),
        node: who,
        hlc: Hlc::from_millis(SPEC_MS + 10),
    };
    a.write(&big).expect("write");
    b.write(&small).expect("write");
    let (mut a2, mut b2) = (a.clone(), b.clone());
    a.merge(&mut b2).expect("merge");
    b.merge(&mut a2).expect("merge");
    let (va, vb) = (a.view().expect("decode"), b.view().expect("decode"));
    assert_eq!(va, vb);
    assert!(va.contains(&small) && !va.contains(&big));
}

// ---------------------------------------------------------------------------------------
// Real engines
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Ev {
    Deliver {
        to: usize,
        records: Vec<Record>,
    },
    Timer {
        node: usize,
        timer: Timer,
    },
    Finish {
        node: usize,
        token: FencingToken,
        outcome: Outcome,
    },
    Checkpoint {
        node: usize,
        token: FencingToken,
        n: u64,
    },
    Cancel {
        node: usize,
    },
    Suspect {
        node: usize,
        target: usize,
    },
    Up {
        node: usize,
        target: usize,
    },
}

struct Sim {
    rng: Rng,
    engines: Vec<Engine>,
    skew: Vec<u64>,
    queue: BTreeMap<(u64, u64), Ev>,
    seq: u64,
    now: u64,
    job: JobId,
    drop_pct: u64,
    repairing: bool,
    prev: Vec<Option<JobState>>,
    steps: u64,
}

impl Sim {
    fn schedule(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.insert((at.max(self.now), self.seq), ev);
    }

    fn local(&self, i: usize) -> u64 {
        self.now + self.skew[i]
    }

    fn run_commands(&mut self, i: usize, cmds: Vec<Command>) -> Result<(), TestCaseError> {
        let n = self.engines.len();
        for c in cmds {
            match c {
                Command::Write { job, record } => {
                    prop_assert_eq!(job, self.job);
                    let view = self.engines[i]
                        .view(&job)
                        .expect("the writer holds the job");
                    prop_assert!(
                        view.contains(&record),
                        "the engine's view lacks its own write"
                    );
                    prop_assert_eq!(record.writer(), self.engines[i].id());
                    // The fence: an engine never writes a result or checkpoint its own view
                    // fences, so whatever it writes counts.
                    match &record {
                        Record::Result { epoch, node, rec } => {
                            let t = FencingToken {
                                epoch: *epoch,
                                hlc: rec.claim_hlc,
                                node: *node,
                            };
                            prop_assert!(!view.fences(&t), "fenced result written: {t:?}");
                            prop_assert!(result_counts(*epoch, *node, rec));
                        }
                        Record::Checkpoint {
                            epoch, node, rec, ..
                        } => {
                            let t = FencingToken {
                                epoch: *epoch,
                                hlc: rec.claim_hlc,
                                node: *node,
                            };
                            prop_assert!(!view.fences(&t), "fenced checkpoint written: {t:?}");
                            prop_assert!(checkpoint_counts(*epoch, *node, rec));
                        }
                        _ => {}
                    }
                    // Push the writer's replica (causal, like automerge sync).
                    let snapshot: Vec<Record> = view.records().collect();
                    for j in (0..n).filter(|j| *j != i) {
                        if !self.repairing && self.rng.pct(self.drop_pct) {
                            continue;
                        }
                        let at = self.now + self.rng.range(0, 15);
                        self.schedule(
                            at,
                            Ev::Deliver {
                                to: j,
                                records: snapshot.clone(),
                            },
                        );
                    }
                }
                Command::SetTimer { at_ms, timer } => {
                    let at = at_ms.saturating_sub(self.skew[i]);
                    self.schedule(at, Ev::Timer { node: i, timer });
                }
                Command::Start {
                    job, token, spec, ..
                } => {
                    prop_assert_eq!(job, self.job);
                    prop_assert_eq!(spec.id, job);
                    prop_assert_eq!(token.node, self.engines[i].id());
                    let took = self.rng.range(1, 60);
                    let exit_code = if self.rng.pct(60) {
                        0
                    } else {
                        self.rng.range(1, 3) as i32
                    };
                    let outcome = Outcome {
                        exit_code,
                        timed_out: false,
                    };
                    self.schedule(
                        self.now + took,
                        Ev::Finish {
                            node: i,
                            token,
                            outcome,
                        },
                    );
                    for k in 0..self.rng.below(3) {
                        let at = self.now + self.rng.range(0, took);
                        self.schedule(
                            at,
                            Ev::Checkpoint {
                                node: i,
                                token,
                                n: k,
                            },
                        );
                    }
                }
                Command::Stop { job, token, .. } => {
                    prop_assert_eq!(job, self.job);
                    let at = self.now + self.rng.range(0, 4);
                    let outcome = Outcome {
                        exit_code: 137,
                        timed_out: false,
                    };
                    self.schedule(
                        at,
                        Ev::Finish {
                            node: i,
                            token,
                            outcome,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn handle(&mut self, i: usize, event: Event) -> Result<(), TestCaseError> {
        let local = self.local(i);
        match self.engines[i].handle(local, event) {
            Ok(cmds) => self.run_commands(i, cmds),
            // A cancel at a node that has not heard of the job yet.
            Err(EngineError::UnknownJob(_)) => Ok(()),
            Err(e) => Err(TestCaseError::fail(format!("engine error: {e}"))),
        }
    }

    fn step(&mut self) -> Result<bool, TestCaseError> {
        let Some(((at, _), ev)) = self.queue.pop_first() else {
            return Ok(false);
        };
        self.now = at;
        self.steps += 1;
        let job = self.job;
        match ev {
            Ev::Deliver { to, records } => {
                let before = self.engines[to].view(&job).cloned().unwrap_or_default();
                self.handle(
                    to,
                    Event::Remote {
                        job,
                        records: records.clone(),
                    },
                )?;
                // Invariant 8: whatever was merged is within the drift bound.
                let local = self.local(to);
                if let Some(after) = self.engines[to].view(&job) {
                    for r in records
                        .iter()
                        .filter(|r| after.contains(r) && !before.contains(r))
                    {
                        prop_assert_eq!(check_clock_bound(job, r.hlc(), local, DRIFT_MS), Ok(()));
                    }
                }
            }
            Ev::Timer { node, timer } => self.handle(node, Event::Timer(timer))?,
            Ev::Finish {
                node,
                token,
                outcome,
            } => self.handle(
                node,
                Event::ExecutionFinished {
                    job,
                    token,
                    outcome,
                    metrics: ExecMetrics::default(),
                    outputs: None,
                    logs: None,
                },
            )?,
            Ev::Checkpoint { node, token, n } => self.handle(
                node,
                Event::CheckpointTaken {
                    job,
                    token,
                    blob: common::blob(&format!("ck-{node}-{n}")),
                },
            )?,
            Ev::Cancel { node } => self.handle(node, Event::Cancel { job })?,
            Ev::Suspect { node, target } => {
                let t = self.engines[target].id();
                self.handle(node, Event::Suspect(t))?;
            }
            Ev::Up { node, target } => {
                let t = self.engines[target].id();
                self.handle(node, Event::MemberUp(t))?;
            }
        }
        self.check()?;
        Ok(true)
    }

    /// Per-step checks: cached state = derived state, terminal states stick, holders that
    /// are fenced do not run, and the replica checkers.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let job = self.job;
        let mut views = Vec::new();
        for (i, e) in self.engines.iter().enumerate() {
            let Some(view) = e.view(&job) else { continue };
            if view.spec.is_none() {
                continue;
            }
            let state = e.state(&job).expect("a job with a spec has a state");
            prop_assert_eq!(
                state,
                derive_state(view).state,
                "node {} caches a stale state",
                i
            );
            if let Some(prev) = &self.prev[i] {
                prop_assert_eq!(
                    check_terminal_transition(job, prev, &state),
                    Ok(()),
                    "node {}",
                    i
                );
            }
            self.prev[i] = Some(state);
            let running: Vec<FencingToken> = e
                .executions()
                .filter(|(j, _, running)| *j == job && *running)
                .map(|(_, t, _)| t)
                .collect();
            prop_assert_eq!(check_holder_stops(view, running), Ok(()), "node {}", i);
            views.push(view);
        }
        prop_assert_eq!(check_replicas(&views, &BTreeSet::new()), Ok(()));
        Ok(())
    }

    fn quiet(&self) -> bool {
        let job = self.job;
        self.queue.values().all(|ev| {
            matches!(
                ev,
                Ev::Timer {
                    timer: Timer::Sweep,
                    ..
                }
            )
        }) && self.engines.iter().all(|e| {
            e.executions().next().is_none() && e.state(&job).is_some_and(|s| s.is_terminal())
        })
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn engines_stop_when_fenced_and_finish_every_job(
        n in 3usize..=5,
        seed in any::<u64>(),
        drop_pct in prop_oneof![Just(0u64), 0u64..40],
    ) {
        let mut rng = Rng::new(seed);
        let config = EngineConfig::default();
        let skew: Vec<u64> = (0..n).map(|_| rng.range(0, 5)).collect();
        let engines: Vec<Engine> = (0..n)
            .map(|i| Engine::new(node(i as u64), config.clone(), skew[i]))
            .collect();
        let mut sim = Sim {
            rng,
            engines,
            skew,
            queue: BTreeMap::new(),
            seq: 0,
            now: 0,
            job: JobId::default(),
            drop_pct,
            repairing: false,
            prev: vec![None; n],
            steps: 0,
        };
        // Membership: sometimes the true size (spread rendezvous delays), sometimes 1
        // (everyone claims at once: maximal contention).
        let size = if sim.rng.pct(50) { n } else { 1 };
        for i in 0..n {
            sim.handle(i, Event::ClusterSize(size))?;
        }
        let request = JobRequest {
            command: vec!["true".into()],
            max_attempts: Some(sim.rng.range(1, 3) as u32),
            timeout_ms: sim.rng.pct(30).then(|| sim.rng.range(20, 80)),
            ..Default::default()
        };
        let local = sim.local(0);
        let (job, cmds) = sim.engines[0].submit(local, request).expect("valid request");
        sim.job = job;
        sim.run_commands(0, cmds)?;

        let main_ms = sim.rng.range(50, 600);
        if sim.rng.pct(20) {
            let (node, at) = (sim.rng.below(n as u64) as usize, sim.rng.range(0, main_ms));
            sim.schedule(at, Ev::Cancel { node });
        }
        for _ in 0..sim.rng.below(3) {
            let node = sim.rng.below(n as u64) as usize;
            let target = (node + 1 + sim.rng.below(n as u64 - 1) as usize) % n;
            let at = sim.rng.range(0, main_ms);
            sim.schedule(at, Ev::Suspect { node, target });
            let up = at + sim.rng.range(20, 200);
            sim.schedule(up, Ev::Up { node, target });
        }

        // Main phase: delays, drops, suspicions.
        while sim.queue.first_key_value().is_some_and(|((at, _), _)| *at <= main_ms) {
            sim.step()?;
        }

        // Repair: no more drops or suspicions, everyone is up, and a full exchange.
        sim.repairing = true;
        sim.queue.retain(|_, ev| !matches!(ev, Ev::Suspect { .. }));
        for i in 0..n {
            for t in 0..n {
                if t != i {
                    sim.schedule(sim.now, Ev::Up { node: i, target: t });
                }
            }
        }
        let mut union = JobView::default();
        for e in &sim.engines {
            if let Some(v) = e.view(&job) {
                union.merge(v);
            }
        }
        let records: Vec<Record> = union.records().collect();
        for to in 0..n {
            sim.schedule(sim.now, Ev::Deliver { to, records: records.clone() });
        }
        let deadline = sim.now + 120_000;
        while !sim.quiet() {
            prop_assert!(sim.now <= deadline, "job not finished 120 s after the repair");
            prop_assert!(sim.step()?, "event queue ran dry");
        }

        // Every node: the same records, a terminal state, one accepted result.
        let views: Vec<&JobView> = sim.engines.iter().map(|e| e.view(&job).expect("known")).collect();
        for v in &views[1..] {
            prop_assert_eq!(*v, views[0], "replicas differ after the full exchange");
        }
        let derived: Vec<Derived> = views.iter().map(|v| derive_state(v)).collect();
        for d in &derived {
            prop_assert_eq!(check_no_lost_job(job, &d.state), Ok(()));
        }
        let refs: Vec<&Derived> = derived.iter().collect();
        prop_assert_eq!(check_one_accepted_result(job, &refs), Ok(()));
        prop_assert_eq!(check_replicas(&views, &BTreeSet::new()), Ok(()));
        no_epoch_gap(views[0])?;
        // A job that was never cancelled and did not fail its attempts succeeded.
        if views[0].cancels.is_empty() && !matches!(derived[0].state, JobState::Failed { .. }) {
            prop_assert!(matches!(derived[0].state, JobState::Succeeded { .. }), "{:?}", derived[0].state);
        }
    }
}

/// A node whose clock runs far ahead has its records refused (invariant 8), and nothing
/// beyond the bound ever enters a view.
#[test]
fn engine_refuses_records_beyond_the_drift_bound() {
    let config = EngineConfig::default();
    let mut fast = Engine::new(node(1), config.clone(), 10_000 + 2_000);
    let mut slow = Engine::new(node(2), config.clone(), 10_000);
    let (job, cmds) = fast
        .submit(
            12_000,
            JobRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .expect("valid");
    let records: Vec<Record> = cmds
        .into_iter()
        .filter_map(|c| match c {
            Command::Write { record, .. } => Some(record),
            _ => None,
        })
        .collect();
    assert!(!records.is_empty());
    slow.handle(
        10_000,
        Event::Remote {
            job,
            records: records.clone(),
        },
    )
    .expect("handled");
    assert_eq!(slow.stats().clock_rejections, records.len() as u64);
    assert!(slow.view(&job).is_none_or(|v| v.is_empty()));
    assert!(slow.state(&job).is_none());
    for r in &records {
        assert!(check_clock_bound(job, r.hlc(), 10_000, config.max_drift_ms).is_err());
    }
    // Within the bound, the same records are merged.
    slow.handle(11_900, Event::Remote { job, records })
        .expect("handled");
    assert!(matches!(
        slow.state(&job),
        Some(JobState::Queued { .. } | JobState::Claimed { .. })
    ));
}

/// Everything a command list asks to write, start or stop, in short form.
fn summarize(cmds: &[Command]) -> Vec<String> {
    cmds.iter()
        .map(|c| match c {
            Command::Write { record, .. } => format!("write {record:?}"),
            Command::Start { token, .. } => format!("start {token:?}"),
            Command::Stop { token, reason, .. } => format!("stop {token:?} {reason:?}"),
            Command::SetTimer { at_ms, timer } => format!("timer {at_ms} {timer:?}"),
        })
        .collect()
}

fn settle_timer(cmds: &[Command]) -> Option<(u64, Timer)> {
    cmds.iter().find_map(|c| match c {
        Command::SetTimer {
            at_ms,
            timer: t @ Timer::Settle { .. },
        } => Some((*at_ms, *t)),
        _ => None,
    })
}

fn claim_timer(cmds: &[Command]) -> Option<(u64, Timer)> {
    cmds.iter().find_map(|c| match c {
        Command::SetTimer {
            at_ms,
            timer: t @ Timer::Claim { .. },
        } => Some((*at_ms, *t)),
        _ => None,
    })
}

fn started(cmds: &[Command]) -> Option<FencingToken> {
    cmds.iter().find_map(|c| match c {
        Command::Start { token, .. } => Some(*token),
        _ => None,
    })
}

/// A node whose execution of epoch 1 is being stopped (an observer expired the epoch)
/// must not start the same job again before that execution has ended: the engine would
/// lose track of the old execution, ignore its `ExecutionFinished`, and leak its slot.
#[test]
fn engine_does_not_restart_a_job_while_its_execution_is_stopping() {
    let config = EngineConfig {
        slots: 2,
        ..EngineConfig::default()
    };
    let me = node(1);
    let observer = node(2);
    let mut e = Engine::new(me, config, 0);
    let (job, cmds) = e
        .submit(
            0,
            JobRequest {
                command: vec!["true".into()],
                ..Default::default()
            },
        )
        .expect("valid");
    let (at, timer) = claim_timer(&cmds).expect("claim timer");
    let cmds = e.handle(at, Event::Timer(timer)).expect("claim");
    let (at, timer) = settle_timer(&cmds).expect("settle timer");
    let cmds = e.handle(at, Event::Timer(timer)).expect("settle");
    let t1 = started(&cmds).expect("epoch 1 starts");

    // An observer judged us dead and expired epoch 1: we must stop.
    let expiry = Record::Expiry {
        epoch: Epoch(1),
        observer,
        rec: ExpiryRec {
            hlc: Hlc::from_millis(20),
            reason: ExpiryReason::HolderDead,
        },
    };
    let cmds = e
        .handle(
            20,
            Event::Remote {
                job,
                records: vec![expiry],
            },
        )
        .expect("remote");
    assert!(
        summarize(&cmds).iter().any(|c| c.starts_with("stop")),
        "{:?}",
        summarize(&cmds)
    );
    assert_eq!(e.executions().collect::<Vec<_>>(), vec![(job, t1, false)]);

    // While the old execution is still being killed, the job is queued for epoch 2.
    let mut now = 20;
    let mut pending = cmds;
    for _ in 0..4 {
        let Some((at, timer)) = claim_timer(&pending).or_else(|| settle_timer(&pending)) else {
            break;
        };
        now = now.max(at);
        pending = e.handle(now, Event::Timer(timer)).expect("timer");
        if let Some(t2) = started(&pending) {
            panic!(
                "started {t2:?} while {t1:?} is still stopping; executions now: {:?}",
                e.executions().collect::<Vec<_>>()
            );
        }
    }
    // The stopping execution is still tracked until it reports back.
    assert!(
        e.executions().any(|(_, t, _)| t == t1),
        "lost track of {t1:?}"
    );
}

/// The consequence of the bug above: after the restarted job finishes, the node has lost a
/// slot for good. With two slots and nothing running it claims only one of two new jobs.
#[test]
fn engine_frees_the_slot_of_a_stopped_execution() {
    let config = EngineConfig {
        slots: 2,
        ..EngineConfig::default()
    };
    let me = node(1);
    let mut e = Engine::new(me, config, 0);
    let request = || JobRequest {
        command: vec!["true".into()],
        ..Default::default()
    };
    let (job, cmds) = e.submit(0, request()).expect("valid");
    let (at, timer) = claim_timer(&cmds).expect("claim timer");
    let cmds = e.handle(at, Event::Timer(timer)).expect("claim");
    let (at, timer) = settle_timer(&cmds).expect("settle timer");
    let t1 = started(&e.handle(at, Event::Timer(timer)).expect("settle")).expect("epoch 1 starts");
    let expiry = Record::Expiry {
        epoch: Epoch(1),
        observer: node(2),
        rec: ExpiryRec {
            hlc: Hlc::from_millis(20),
            reason: ExpiryReason::HolderDead,
        },
    };
    let mut pending = e
        .handle(
            20,
            Event::Remote {
                job,
                records: vec![expiry],
            },
        )
        .expect("remote");
    // Let the engine do whatever it does with the queued epoch 2 (it currently starts it).
    let mut now = 20;
    let mut t2 = None;
    while let Some((at, timer)) = claim_timer(&pending).or_else(|| settle_timer(&pending)) {
        now = now.max(at);
        pending = e.handle(now, Event::Timer(timer)).expect("timer");
        t2 = t2.or(started(&pending));
    }
    // Both executions end.
    let finish = |token, exit_code| common::finished(job, token, exit_code);
    e.handle(now + 1, finish(t1, 137)).expect("t1 ends");
    if let Some(t2) = t2 {
        e.handle(now + 2, finish(t2, 0)).expect("t2 ends");
    }
    assert_eq!(e.executions().count(), 0);

    // Two new jobs: with both slots free, the node claims both.
    let mut claims = 0;
    for k in 0..2 {
        let (_, cmds) = e.submit(100 + k, request()).expect("valid");
        if let Some((at, timer)) = claim_timer(&cmds) {
            let cmds = e
                .handle(at.max(100 + k), Event::Timer(timer))
                .expect("claim");
            claims += cmds
                .iter()
                .filter(|c| {
                    matches!(
                        c,
                        Command::Write {
                            record: Record::Claim { .. },
                            ..
                        }
                    )
                })
                .count();
        }
    }
    assert_eq!(
        claims, 2,
        "a slot leaked: only {claims} of 2 jobs claimed on an idle 2-slot node"
    );
}
