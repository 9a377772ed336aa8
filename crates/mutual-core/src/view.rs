//! The typed view of a job document: a growing set of records.
//!
//! Every writer writes only under its own keys (`design.md` §2), so a job document is in
//! effect a set of records — claims, starts, expiries, checkpoints, results, cancels — and
//! merging two replicas is set union. [`JobView`] is that set with total keys (`BTreeMap`),
//! so iteration order never depends on arrival order. The rules ([`crate::derive`], the
//! engine) work on the view; automerge ([`crate::doc`]) is only the replication and storage
//! encoding.
//!
//! Two different values under one key can only come from a bug or a hostile peer. The view
//! keeps the smaller one, so replicas still converge whatever the order they see them in.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::blob::BlobRef;
use crate::hlc::Hlc;
use crate::ids::NodeId;
use crate::spec::JobSpec;
use crate::token::{Epoch, FencingToken};

/// Why an epoch was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpiryReason {
    /// The holder's execution exited non-zero (a used-up attempt).
    Failed,
    /// An observer judged the holder dead.
    HolderDead,
    /// The holder gave up (e.g. it could not start the execution).
    GaveUp,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Outcome {
    /// Exit code (a signal `s` reads as `128 + s`, as shells report it).
    pub exit_code: i32,
    /// The agent killed it at the job's timeout.
    pub timed_out: bool,
}

impl Outcome {
    /// True iff the execution succeeded.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.timed_out
    }
}

/// Per-execution measurements, integers so records have a total order.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct ExecMetrics {
    /// Wall time of the execution.
    pub wall_ms: u64,
    /// Average CPU use in thousandths of a core.
    pub cpu_avg_millis: u32,
    /// Peak resident memory.
    pub memory_peak_bytes: u64,
    /// Bytes read (inputs).
    pub bytes_in: u64,
    /// Bytes written (outputs).
    pub bytes_out: u64,
}

/// A result record (the value under `results[epoch/node]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ResultRec {
    /// HLC of the writer's claim (with epoch and node from the key: its token).
    pub claim_hlc: Hlc,
    /// How it ended.
    pub outcome: Outcome,
    /// The outputs (`MUTUAL_OUTPUT_DIR`), if the execution wrote any.
    pub outputs: Option<BlobRef>,
    /// The execution's stdout and stderr, if it wrote any.
    pub logs: Option<BlobRef>,
    /// Measurements.
    pub metrics: ExecMetrics,
    /// When it was written.
    pub hlc: Hlc,
    /// Claims of this epoch and later epochs the writer held when writing.
    pub seen: BTreeSet<FencingToken>,
}

/// A checkpoint record (the value under `checkpoints[epoch/node/seq]`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CheckpointRec {
    /// HLC of the writer's claim.
    pub claim_hlc: Hlc,
    /// The snapshot of the checkpoint directory.
    pub blob: BlobRef,
    /// When it was written.
    pub hlc: Hlc,
    /// Claims of this epoch and later the writer held when writing.
    pub seen: BTreeSet<FencingToken>,
}

/// An expiry record (the value under `expired[epoch/observer]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ExpiryRec {
    /// When it was written.
    pub hlc: Hlc,
    /// Why.
    pub reason: ExpiryReason,
}

/// One record of a job document, with its key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Record {
    /// The spec (written once, by the accepting node).
    Spec(Arc<JobSpec>),
    /// `node` claims `epoch` at `hlc`.
    Claim {
        /// Epoch claimed.
        epoch: Epoch,
        /// Claimant.
        node: NodeId,
        /// Claim time: with epoch and node, the fencing token.
        hlc: Hlc,
    },
    /// `node`, having won `epoch` after the settle window, started executing at `hlc`.
    Start {
        /// Epoch.
        epoch: Epoch,
        /// Holder.
        node: NodeId,
        /// Start time.
        hlc: Hlc,
    },
    /// `observer` closed `epoch`.
    Expiry {
        /// Epoch closed.
        epoch: Epoch,
        /// Who closed it.
        observer: NodeId,
        /// Details.
        rec: ExpiryRec,
    },
    /// `node` snapshotted its checkpoint directory.
    Checkpoint {
        /// Epoch.
        epoch: Epoch,
        /// Writer.
        node: NodeId,
        /// Sequence number within the writer's epoch.
        seq: u64,
        /// Details.
        rec: Arc<CheckpointRec>,
    },
    /// `node` finished its execution of `epoch`.
    Result {
        /// Epoch.
        epoch: Epoch,
        /// Writer.
        node: NodeId,
        /// Details.
        rec: Arc<ResultRec>,
    },
    /// `node` asked to cancel the job.
    Cancel {
        /// Who.
        node: NodeId,
        /// When.
        hlc: Hlc,
    },
}

impl Record {
    /// The HLC the record carries (checked against the drift bound on receipt).
    pub fn hlc(&self) -> Hlc {
        match self {
            Record::Spec(s) => s.submitted_at,
            Record::Claim { hlc, .. } | Record::Start { hlc, .. } | Record::Cancel { hlc, .. } => {
                *hlc
            }
            Record::Expiry { rec, .. } => rec.hlc,
            Record::Checkpoint { rec, .. } => rec.hlc,
            Record::Result { rec, .. } => rec.hlc,
        }
    }

    /// The node whose key the record is written under.
    pub fn writer(&self) -> NodeId {
        match self {
            Record::Spec(s) => s.submitter,
            Record::Claim { node, .. }
            | Record::Start { node, .. }
            | Record::Checkpoint { node, .. }
            | Record::Result { node, .. }
            | Record::Cancel { node, .. } => *node,
            Record::Expiry { observer, .. } => *observer,
        }
    }
}

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit digest of a record's key and timestamp (see [`JobView::fingerprint`]).
fn record_digest(r: &Record) -> u64 {
    fn node8(n: &NodeId) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&n.0[..8]);
        u64::from_le_bytes(b)
    }
    let (tag, e, n, extra) = match r {
        Record::Spec(s) => (1u64, 0, node8(&s.submitter), 0),
        Record::Claim { epoch, node, .. } => (2, epoch.0, node8(node), 0),
        Record::Start { epoch, node, .. } => (3, epoch.0, node8(node), 0),
        Record::Expiry {
            epoch, observer, ..
        } => (4, epoch.0, node8(observer), 0),
        Record::Checkpoint {
            epoch, node, seq, ..
        } => (5, epoch.0, node8(node), *seq),
        Record::Result { epoch, node, .. } => (6, epoch.0, node8(node), 0),
        Record::Cancel { node, .. } => (7, 0, node8(node), 0),
    };
    mix(tag ^ mix(u64::from(e) ^ mix(n ^ mix(extra ^ mix(r.hlc().0)))))
}

/// A small sorted map: the record sets of one job are tiny (a handful of claims, one or two
/// results), and every node holds a replica of every job, so a `BTreeMap`'s 0.5 KiB leaf
/// per non-empty map multiplied memory by five in 1,000-node simulations. A sorted `Vec`
/// keeps the same total key order and a `BTreeMap`-like read API.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for RecordMap<K, V> {
    fn default() -> Self {
        RecordMap(Vec::new())
    }
}

impl<K: Ord, V> RecordMap<K, V> {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True iff empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn find(&self, key: &K) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.cmp(key))
    }

    /// The value under `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// True iff `key` is present.
    pub fn contains_key(&self, key: &K) -> bool {
        self.find(key).is_ok()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }

    /// Entries with `lo <= key` and, if given, `key <= hi`, in order.
    pub fn range_inclusive(
        &self,
        lo: &K,
        hi: Option<&K>,
    ) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        let start = self.0.partition_point(|(k, _)| k < lo);
        let end = match hi {
            Some(hi) => self.0.partition_point(|(k, _)| k <= hi),
            None => self.0.len(),
        };
        self.0[start..end.max(start)].iter().map(|(k, v)| (k, v))
    }
}

impl<V> RecordMap<(Epoch, NodeId), V> {
    /// Entries of one epoch (any node), in node order.
    pub fn of_epoch(
        &self,
        epoch: Epoch,
    ) -> impl DoubleEndedIterator<Item = (&(Epoch, NodeId), &V)> {
        let start = self.0.partition_point(|((e, _), _)| *e < epoch);
        let end = self.0.partition_point(|((e, _), _)| *e <= epoch);
        self.0[start..end].iter().map(|(k, v)| (k, v))
    }
}

impl<K: Ord, V: Ord> RecordMap<K, V> {
    /// Set-union insert: a new key is added; the same value is a duplicate; a different
    /// value under the same key keeps the smaller of the two (order-independent).
    fn put(&mut self, key: K, value: V) -> Inserted {
        match self.find(&key) {
            Err(i) => {
                self.0.insert(i, (key, value));
                Inserted::New
            }
            Ok(i) => {
                let old = &mut self.0[i].1;
                if *old == value {
                    Inserted::Duplicate
                } else {
                    if value < *old {
                        *old = value;
                    }
                    Inserted::Conflict
                }
            }
        }
    }
}

impl<'a, K, V> IntoIterator for &'a RecordMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = std::iter::Map<std::slice::Iter<'a, (K, V)>, fn(&'a (K, V)) -> (&'a K, &'a V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

/// What inserting a record did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// The record was new.
    New,
    /// The record was already there.
    Duplicate,
    /// Another value was under the same key; the smaller of the two is kept.
    Conflict,
}

/// The typed view of one job document: the union of all records seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobView {
    /// The spec, once seen.
    pub spec: Option<Arc<JobSpec>>,
    /// `claims[(epoch, node)] = hlc`.
    pub claims: RecordMap<(Epoch, NodeId), Hlc>,
    /// `starts[(epoch, node)] = hlc`.
    pub starts: RecordMap<(Epoch, NodeId), Hlc>,
    /// `expiries[(epoch, observer)]`.
    pub expiries: RecordMap<(Epoch, NodeId), ExpiryRec>,
    /// `checkpoints[(epoch, node, seq)]`.
    pub checkpoints: RecordMap<(Epoch, NodeId, u64), Arc<CheckpointRec>>,
    /// `results[(epoch, node)]`.
    pub results: RecordMap<(Epoch, NodeId), Arc<ResultRec>>,
    /// `cancels[node] = hlc`.
    pub cancels: RecordMap<NodeId, Hlc>,
    /// Sum of the record digests, kept up to date by [`JobView::insert`].
    digest: u64,
}

impl JobView {
    /// Adds one record (set union).
    pub fn insert(&mut self, record: Record) -> Inserted {
        let h = record_digest(&record);
        let result = self.insert_raw(record);
        match result {
            Inserted::New => self.digest = self.digest.wrapping_add(h),
            Inserted::Conflict => {
                self.digest = self
                    .records()
                    .map(|r| record_digest(&r))
                    .fold(0, u64::wrapping_add)
            }
            Inserted::Duplicate => {}
        }
        result
    }

    fn insert_raw(&mut self, record: Record) -> Inserted {
        match record {
            Record::Spec(s) => match &self.spec {
                None => {
                    self.spec = Some(s);
                    Inserted::New
                }
                Some(old) if **old == *s => Inserted::Duplicate,
                Some(old) => {
                    if *s < **old {
                        self.spec = Some(s);
                    }
                    Inserted::Conflict
                }
            },
            Record::Claim { epoch, node, hlc } => self.claims.put((epoch, node), hlc),
            Record::Start { epoch, node, hlc } => self.starts.put((epoch, node), hlc),
            Record::Expiry {
                epoch,
                observer,
                rec,
            } => self.expiries.put((epoch, observer), rec),
            Record::Checkpoint {
                epoch,
                node,
                seq,
                rec,
            } => self.checkpoints.put((epoch, node, seq), rec),
            Record::Result { epoch, node, rec } => self.results.put((epoch, node), rec),
            Record::Cancel { node, hlc } => self.cancels.put(node, hlc),
        }
    }

    /// True iff the view holds this exact record.
    pub fn contains(&self, record: &Record) -> bool {
        match record {
            Record::Spec(s) => self.spec.as_deref() == Some(&**s),
            Record::Claim { epoch, node, hlc } => self.claims.get(&(*epoch, *node)) == Some(hlc),
            Record::Start { epoch, node, hlc } => self.starts.get(&(*epoch, *node)) == Some(hlc),
            Record::Expiry {
                epoch,
                observer,
                rec,
            } => self.expiries.get(&(*epoch, *observer)) == Some(rec),
            Record::Checkpoint {
                epoch,
                node,
                seq,
                rec,
            } => self.checkpoints.get(&(*epoch, *node, *seq)) == Some(rec),
            Record::Result { epoch, node, rec } => self.results.get(&(*epoch, *node)) == Some(rec),
            Record::Cancel { node, hlc } => self.cancels.get(node) == Some(hlc),
        }
    }

    /// Every record, in a fixed order.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        let spec = self.spec.iter().map(|s| Record::Spec(s.clone()));
        let claims = self
            .claims
            .iter()
            .map(|(&(epoch, node), &hlc)| Record::Claim { epoch, node, hlc });
        let starts = self
            .starts
            .iter()
            .map(|(&(epoch, node), &hlc)| Record::Start { epoch, node, hlc });
        let expiries = self
            .expiries
            .iter()
            .map(|(&(epoch, observer), &rec)| Record::Expiry {
                epoch,
                observer,
                rec,
            });
        let checkpoints =
            self.checkpoints
                .iter()
                .map(|(&(epoch, node, seq), rec)| Record::Checkpoint {
                    epoch,
                    node,
                    seq,
                    rec: rec.clone(),
                });
        let results = self
            .results
            .iter()
            .map(|(&(epoch, node), rec)| Record::Result {
                epoch,
                node,
                rec: rec.clone(),
            });
        let cancels = self
            .cancels
            .iter()
            .map(|(&node, &hlc)| Record::Cancel { node, hlc });
        spec.chain(claims)
            .chain(starts)
            .chain(expiries)
            .chain(checkpoints)
            .chain(results)
            .chain(cancels)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        usize::from(self.spec.is_some())
            + self.claims.len()
            + self.starts.len()
            + self.expiries.len()
            + self.checkpoints.len()
            + self.results.len()
            + self.cancels.len()
    }

    /// True iff the view holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Merges every record of `other` into `self`; returns how many were new.
    pub fn merge(&mut self, other: &JobView) -> usize {
        other
            .records()
            .filter(|r| self.insert(r.clone()) == Inserted::New)
            .count()
    }

    /// Claims of epoch `epoch` or later, as tokens: what a writer puts in `seen`.
    pub fn claims_from(&self, epoch: Epoch) -> BTreeSet<FencingToken> {
        self.claims
            .range_inclusive(&(epoch, NodeId([0; 32])), None)
            .map(|(&(epoch, node), &hlc)| FencingToken { epoch, hlc, node })
            .collect()
    }

    /// The winning (smallest) claim of `epoch`, if any.
    pub fn winner(&self, epoch: Epoch) -> Option<FencingToken> {
        self.claims
            .of_epoch(epoch)
            .map(|(&(epoch, node), &hlc)| FencingToken { epoch, hlc, node })
            .min()
    }

    /// The highest epoch with a claim (0 if none).
    pub fn max_epoch(&self) -> Epoch {
        self.claims
            .keys()
            .next_back()
            .map(|(e, _)| *e)
            .unwrap_or_default()
    }

    /// The token `node` holds in `epoch`, if it claimed it.
    pub fn token_of(&self, epoch: Epoch, node: NodeId) -> Option<FencingToken> {
        self.claims
            .get(&(epoch, node))
            .map(|&hlc| FencingToken { epoch, hlc, node })
    }

    /// True iff the holder of `token` can tell from this view that it lost: a smaller claim
    /// in its epoch, or any claim of a later epoch.
    pub fn fences(&self, token: &FencingToken) -> bool {
        self.max_epoch() > token.epoch || self.winner(token.epoch).is_some_and(|w| w < *token)
    }

    /// An order-independent 64-bit digest of the record keys and timestamps, for cheap
    /// anti-entropy comparison (equal record sets give equal digests; a mismatch means the
    /// replicas differ). Not cryptographic: peers still validate every record they merge.
    pub fn fingerprint(&self) -> u64 {
        self.digest
    }

    /// True iff some node wrote a start record for `epoch`.
    pub fn is_started(&self, epoch: Epoch) -> bool {
        self.starts.of_epoch(epoch).next().is_some()
    }

    /// True iff some epoch has been expired by anyone.
    pub fn is_expired(&self, epoch: Epoch) -> bool {
        self.expiries.of_epoch(epoch).next().is_some()
    }
}
