//! Helpers shared by the integration tests: record builders, a fixed spec, and a tiny
//! deterministic PRNG (the core itself never draws randomness; tests feed it seeds).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mutual_core::hlc::Hlc;
use mutual_core::ids::{JobId, NodeId};
use mutual_core::spec::{JobSpec, Resources};
use mutual_core::token::{Epoch, FencingToken};
use mutual_core::view::{
    CheckpointRec, ExecMetrics, ExpiryReason, ExpiryRec, JobView, Outcome, Record, ResultRec,
};

/// The job every single-job test uses.
pub const JOB: JobId = JobId([7; 16]);

/// Node `i` (the same ids the simulator uses).
pub fn node(i: u64) -> NodeId {
    NodeId::from_index(i)
}

/// A valid spec submitted by node 0 at `submitted_at`.
pub fn spec_at(max_attempts: u32, submitted_at: Hlc) -> JobSpec {
    JobSpec {
        id: JOB,
        namespace: "default".into(),
        name: "test".into(),
        command: vec!["true".into()],
        image: None,
        env: BTreeMap::new(),
        resources: Resources::default(),
        labels: BTreeMap::new(),
        priority: 0,
        timeout_ms: None,
        max_attempts,
        inputs: Vec::new(),
        checkpoint_interval_ms: None,
        submitted_at,
        submitter: node(0),
    }
}

/// A valid spec submitted at HLC 0 (every claim with a positive HLC is after it).
pub fn spec(max_attempts: u32) -> JobSpec {
    spec_at(max_attempts, Hlc(0))
}

/// A view holding only the spec.
pub fn view_with_spec(max_attempts: u32) -> JobView {
    let mut v = JobView::default();
    v.insert(Record::Spec(Arc::new(spec(max_attempts))));
    v
}

/// A view of `records` on top of the spec.
pub fn view_of(max_attempts: u32, records: &[Record]) -> JobView {
    let mut v = view_with_spec(max_attempts);
    for r in records {
        v.insert(r.clone());
    }
    v
}

pub fn tok(epoch: u32, hlc: u64, node: NodeId) -> FencingToken {
    FencingToken {
        epoch: Epoch(epoch),
        hlc: Hlc(hlc),
        node,
    }
}

pub fn claim(epoch: u32, node: NodeId, hlc: u64) -> Record {
    Record::Claim {
        epoch: Epoch(epoch),
        node,
        hlc: Hlc(hlc),
    }
}

pub fn start(epoch: u32, node: NodeId, hlc: u64) -> Record {
    Record::Start {
        epoch: Epoch(epoch),
        node,
        hlc: Hlc(hlc),
    }
}

pub fn expiry(epoch: u32, observer: NodeId, hlc: u64, reason: ExpiryReason) -> Record {
    Record::Expiry {
        epoch: Epoch(epoch),
        observer,
        rec: ExpiryRec {
            hlc: Hlc(hlc),
            reason,
        },
    }
}

/// A result of `node`'s claim `(epoch, claim_hlc)` with `exit_code`, written at `hlc`.
pub fn result(
    epoch: u32,
    node: NodeId,
    claim_hlc: u64,
    exit_code: i32,
    hlc: u64,
    seen: impl IntoIterator<Item = FencingToken>,
) -> Record {
    Record::Result {
        epoch: Epoch(epoch),
        node,
        rec: Arc::new(ResultRec {
            claim_hlc: Hlc(claim_hlc),
            outcome: Outcome {
                exit_code,
                timed_out: false,
            },
            outputs: None,
            logs: None,
            metrics: ExecMetrics::default(),
            hlc: Hlc(hlc),
            seen: seen.into_iter().collect(),
        }),
    }
}

#[allow(clippy::too_many_arguments)]
pub fn checkpoint(
    epoch: u32,
    node: NodeId,
    seq: u64,
    claim_hlc: u64,
    cid: &str,
    hlc: u64,
    seen: impl IntoIterator<Item = FencingToken>,
) -> Record {
    Record::Checkpoint {
        epoch: Epoch(epoch),
        node,
        seq,
        rec: Arc::new(CheckpointRec {
            claim_hlc: Hlc(claim_hlc),
            blob: blob(cid),
            hlc: Hlc(hlc),
            seen: seen.into_iter().collect::<BTreeSet<_>>(),
        }),
    }
}

pub fn cancel(node: NodeId, hlc: u64) -> Record {
    Record::Cancel {
        node,
        hlc: Hlc(hlc),
    }
}

/// splitmix64: a small, deterministic PRNG for tests that drive many random choices from
/// one proptest-generated seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `pct` percent.
    pub fn pct(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The event an agent reports when an execution ends (no metrics, outputs or logs).
pub fn finished(job: JobId, token: FencingToken, exit_code: i32) -> mutual_core::engine::Event {
    mutual_core::engine::Event::ExecutionFinished {
        job,
        token,
        outcome: Outcome {
            exit_code,
            timed_out: false,
        },
        metrics: ExecMetrics::default(),
        outputs: None,
        logs: None,
    }
}

/// A blob reference whose content id is `cid` (the core never looks inside).
pub fn blob(cid: &str) -> mutual_core::BlobRef {
    mutual_core::BlobRef {
        cid: cid.to_string(),
        key: "00".into(),
        bytes: 0,
        holders: Vec::new(),
    }
}
