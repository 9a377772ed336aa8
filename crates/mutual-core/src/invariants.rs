//! One checker per invariant of `docs/invariants.md` (from `design.md` §10, plus the ones
//! the model check and this implementation added). The property tests, the simulator and
//! the integration tests all call these same functions, and `tests/checkers_fail.rs` feeds
//! each one a hand-built violating history to show it can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::derive::{Derived, JobState, derive_state, restorable_checkpoint};
use crate::hlc::Hlc;
use crate::ids::{JobId, NodeId};
use crate::token::{Epoch, FencingToken};
use crate::view::JobView;

/// The invariants, numbered as in `docs/invariants.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// 1. Same records ⇒ same derived state.
    Convergence,
    /// 2. One winner per epoch.
    OneWinner,
    /// 3. Nothing written by a node that knew it was fenced becomes the job's.
    Fencing,
    /// 4. Tokens strictly increase with the epoch; epochs are consecutive.
    MonotoneTokens,
    /// 5. Every job ends while an eligible node lives.
    NoLostJob,
    /// 6. Terminal states stick, with precedence succeeded > failed > cancelled.
    TerminalSticks,
    /// 7. A holder that learns it lost stops.
    HolderStops,
    /// 8. Timestamps beyond the drift bound are rejected.
    BoundedClocks,
    /// 9. After full merge every replica accepts the same single result.
    OneAcceptedResult,
}

impl Invariant {
    /// The number in `docs/invariants.md`.
    pub fn number(self) -> u8 {
        self as u8 + 1
    }
}

/// A violated invariant, with enough detail to debug it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// The job concerned, if any.
    pub job: Option<JobId>,
    /// What was seen.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant {} ({:?})",
            self.invariant.number(),
            self.invariant
        )?;
        if let Some(j) = self.job {
            write!(f, " job {j}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

fn fail(invariant: Invariant, job: Option<JobId>, detail: String) -> Result<(), Violation> {
    Err(Violation {
        invariant,
        job,
        detail,
    })
}

fn job_of(view: &JobView) -> Option<JobId> {
    view.spec.as_ref().map(|s| s.id)
}

/// Invariant 1: Replicas holding the same records derive the same state. `replicas` pairs each view
/// with the state its node reported (an engine's cached state, or a fresh derivation).
pub fn check_convergence(replicas: &[(&JobView, &Derived)]) -> Result<(), Violation> {
    // Compare each replica with one representative per distinct record set: O(replicas ×
    // distinct views) rather than all pairs, which matters at a thousand replicas.
    let mut reps: Vec<(&JobView, &Derived)> = Vec::new();
    for &(v, d) in replicas {
        match reps
            .iter()
            .find(|(rv, _)| rv.fingerprint() == v.fingerprint() && *rv == v)
        {
            Some((_, rd)) if *rd != d => {
                return fail(
                    Invariant::Convergence,
                    job_of(v),
                    format!("same records, states {:?} vs {:?}", rd.state, d.state),
                );
            }
            Some(_) => {}
            None => reps.push((v, d)),
        }
    }
    Ok(())
}

/// Invariant 2: Each replica's winner of an epoch is the smallest claim it holds for that epoch, and
/// replicas holding the same claims of an epoch agree on its winner.
pub fn check_one_winner(replicas: &[(&JobView, &Derived)]) -> Result<(), Violation> {
    let cross = replicas.len() > 1;
    let mut by_claims: BTreeMap<(Epoch, Vec<(NodeId, Hlc)>), FencingToken> = BTreeMap::new();
    for (view, derived) in replicas {
        // Claims are sorted by (epoch, node): walk them epoch by epoch without allocating.
        let mut claims = view.claims.iter().peekable();
        while let Some(&(&(e, _), _)) = claims.peek() {
            let mut min: Option<FencingToken> = None;
            let mut group: Vec<(NodeId, Hlc)> = Vec::new();
            while let Some((&(ce, n), &h)) = claims.peek().copied().filter(|((ce, _), _)| *ce == e)
            {
                let t = FencingToken {
                    epoch: ce,
                    hlc: h,
                    node: n,
                };
                min = Some(min.map_or(t, |m| m.min(t)));
                if cross {
                    group.push((n, h));
                }
                claims.next();
            }
            let reported = derived.winners.get(&e).copied();
            if reported != min {
                return fail(
                    Invariant::OneWinner,
                    job_of(view),
                    format!("epoch {e}: reported winner {reported:?}, smallest claim {min:?}"),
                );
            }
            if let (true, Some(reported)) = (cross, reported)
                && let Some(other) = by_claims.insert((e, group), reported)
                && other != reported
            {
                return fail(
                    Invariant::OneWinner,
                    job_of(view),
                    format!(
                        "epoch {e}: replicas with the same claims chose {other:?} and {reported:?}"
                    ),
                );
            }
        }
    }
    Ok(())
}

/// Records written by a holder whose own view already fenced it, by writer token: `None`
/// for its result, `Some(seq)` for checkpoint `seq`. Matching per record matters: a holder
/// whose kill is late may write checkpoint 2 after being fenced, while its checkpoint 1,
/// written before, stays legitimately restorable.
pub type FencedWrites = BTreeSet<(FencingToken, Option<u64>)>;

/// Invariant 3: Records whose writer already knew it was fenced (the simulator logs these; a correct
/// engine never writes them) are never the job's accepted result or restorable checkpoint.
pub fn check_fencing(
    view: &JobView,
    derived: &Derived,
    fenced_writes: &FencedWrites,
) -> Result<(), Violation> {
    if let Some((token, _)) = &derived.accepted
        && fenced_writes.contains(&(*token, None))
    {
        return fail(
            Invariant::Fencing,
            job_of(view),
            format!("accepted result {token:?} was written after its holder knew it lost"),
        );
    }
    if let Some((token, seq, _)) = restorable_checkpoint(view)
        && fenced_writes.contains(&(token, Some(seq)))
    {
        return fail(
            Invariant::Fencing,
            job_of(view),
            format!(
                "restorable checkpoint {token:?}#{seq} was written after its holder knew it lost"
            ),
        );
    }
    Ok(())
}

/// Invariant 4: Winners' tokens strictly increase with the epoch; every claim is later (in HLC) than
/// the spec it claims; each node's own claims increase in HLC with the epoch. Holds on any
/// partial replica. See [`check_no_epoch_gap`] for the part that needs a full merge.
pub fn check_monotone_tokens(view: &JobView, derived: &Derived) -> Result<(), Violation> {
    let job = job_of(view);
    let mut prev: Option<FencingToken> = None;
    for t in derived.winners.values() {
        if prev.is_some_and(|p| p >= *t) {
            return fail(
                Invariant::MonotoneTokens,
                job,
                format!("token {t:?} not above {prev:?}"),
            );
        }
        prev = Some(*t);
    }
    if let Some(spec) = &view.spec
        && let Some((&(e, n), &h)) = view.claims.iter().find(|(_, h)| **h <= spec.submitted_at)
    {
        return fail(
            Invariant::MonotoneTokens,
            job,
            format!("claim ({e:?},{n:?}) at {h:?} not after the spec"),
        );
    }
    let mut last: BTreeMap<NodeId, (Epoch, Hlc)> = BTreeMap::new();
    for (&(e, n), &h) in &view.claims {
        if let Some(&(pe, ph)) = last.get(&n)
            && ph >= h
        {
            return fail(
                Invariant::MonotoneTokens,
                job,
                format!("node {n:?} claimed {e:?} at {h:?}, not after its {pe:?} claim at {ph:?}"),
            );
        }
        last.insert(n, (e, h));
    }
    Ok(())
}

/// 4 (on a fully merged replica). Claimed epochs are exactly 1..=max: a node claims epoch
/// e + 1 only after seeing epoch e claimed and closed, so the union of all records has no
/// gap. A partial replica may lack a claim that was lost in transit, so do not use this on
/// one.
pub fn check_no_epoch_gap(view: &JobView, derived: &Derived) -> Result<(), Violation> {
    for (i, e) in derived.winners.keys().enumerate() {
        if e.0 as usize != i + 1 {
            return fail(
                Invariant::MonotoneTokens,
                job_of(view),
                format!("epoch {e} claimed but epoch {} never was", i + 1),
            );
        }
    }
    Ok(())
}

/// Invariant 5: After the liveness phase every job is terminal.
pub fn check_no_lost_job(job: JobId, state: &JobState) -> Result<(), Violation> {
    if state.is_terminal() {
        Ok(())
    } else {
        fail(
            Invariant::NoLostJob,
            Some(job),
            format!("still {} after the liveness phase", state.name()),
        )
    }
}

/// A state's place in the terminal precedence: 0 not terminal, then cancelled (1) <
/// failed (2) < succeeded (3). One byte, so a simulator can remember it for every replica
/// of every job.
pub fn terminal_rank(s: &JobState) -> u8 {
    match s {
        JobState::Cancelled => 1,
        JobState::Failed { .. } => 2,
        JobState::Succeeded { .. } => 3,
        _ => 0,
    }
}

const RANK_NAMES: [&str; 4] = ["not terminal", "cancelled", "failed", "succeeded"];

/// Invariant 6: One replica's successive states of a job: once terminal, always terminal, and
/// only moving up the precedence cancelled < failed < succeeded.
pub fn check_terminal_transition(
    job: JobId,
    prev: &JobState,
    next: &JobState,
) -> Result<(), Violation> {
    check_terminal_rank(job, terminal_rank(prev), next)
}

/// Invariant 6, given only the previous state's [`terminal_rank`].
pub fn check_terminal_rank(job: JobId, prev_rank: u8, next: &JobState) -> Result<(), Violation> {
    let next_rank = terminal_rank(next);
    if prev_rank == 0 || next_rank >= prev_rank {
        return Ok(());
    }
    let prev = RANK_NAMES
        .get(usize::from(prev_rank))
        .copied()
        .unwrap_or("?");
    let verb = if next_rank == 0 {
        "went back to"
    } else {
        "became"
    };
    fail(
        Invariant::TerminalSticks,
        Some(job),
        format!("{prev} {verb} {}", next.name()),
    )
}

/// Invariant 7: No execution a node still runs (not being stopped) is fenced, expired or terminal in
/// that node's own view.
pub fn check_holder_stops(
    view: &JobView,
    running: impl IntoIterator<Item = FencingToken>,
) -> Result<(), Violation> {
    let mut running = running.into_iter().peekable();
    if running.peek().is_none() {
        return Ok(());
    }
    let state = derive_state(view).state;
    for token in running {
        if view.fences(&token) || view.is_expired(token.epoch) || state.is_terminal() {
            return fail(
                Invariant::HolderStops,
                job_of(view),
                format!(
                    "{token:?} still running although its own view shows {}",
                    state.name()
                ),
            );
        }
    }
    Ok(())
}

/// Invariant 8: A record merged at local physical time `local_ms` is at most `max_drift_ms` ahead.
pub fn check_clock_bound(
    job: JobId,
    record_hlc: Hlc,
    local_ms: u64,
    max_drift_ms: u64,
) -> Result<(), Violation> {
    let ahead = record_hlc.as_millis().saturating_sub(local_ms);
    if ahead > max_drift_ms {
        return fail(
            Invariant::BoundedClocks,
            Some(job),
            format!("merged a timestamp {ahead} ms ahead (bound {max_drift_ms} ms)"),
        );
    }
    Ok(())
}

/// Invariant 9: After full merge all replicas accept the same result (or none).
pub fn check_one_accepted_result(job: JobId, replicas: &[&Derived]) -> Result<(), Violation> {
    let mut tokens = replicas
        .iter()
        .map(|d| d.accepted.as_ref().map(|(t, _)| *t));
    if let Some(first) = tokens.next()
        && let Some(other) = tokens.find(|t| *t != first)
    {
        return fail(
            Invariant::OneAcceptedResult,
            Some(job),
            format!("replicas accept {first:?} and {other:?}"),
        );
    }
    Ok(())
}

/// Runs the per-view checkers (1, 2, 4 and 3 with the given log) over a set of replicas of
/// one job, deriving each state afresh.
pub fn check_replicas(views: &[&JobView], fenced_writes: &FencedWrites) -> Result<(), Violation> {
    let derived: Vec<Derived> = views.iter().map(|v| derive_state(v)).collect();
    let pairs: Vec<(&JobView, &Derived)> = views.iter().copied().zip(derived.iter()).collect();
    check_convergence(&pairs)?;
    check_one_winner(&pairs)?;
    for (v, d) in &pairs {
        check_monotone_tokens(v, d)?;
        check_fencing(v, d, fenced_writes)?;
    }
    Ok(())
}
